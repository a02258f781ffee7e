"""Job: a batch of requests, its counters and its state diagram.

The job's lifecycle lives here, on Job: the state diagram, the one lock order, and how it starts. What
people do to a job is in control.py, what happens to its items in ledger.py."""

import logging
from decimal import Decimal

from django.conf import settings
from django.contrib.auth.base_user import AbstractBaseUser
from django.contrib.auth.models import AbstractUser, AnonymousUser
from django.db import models, transaction
from django.db.models import F
from django.db.models.signals import pre_delete
from django.dispatch import receiver
from django.urls import reverse
from django.utils import timezone

from jobs import clock, queue
from jobs.models.endpoint import Endpoint
from jobs.models.item import Item
from jobs.models.notify import EVENTS, PAUSED, JobEvent

log = logging.getLogger(__name__)

# Duplicate and retry of more requests than this run in a worker, not the request (control.duplicate, retry).
INLINE_ROWS = 5_000

SUPPORTED_URLS = ("/v1/chat/completions", "/v1/embeddings", "/v1/completions", "/v1/responses")


class InvalidTransition(Exception):
    """A control action that the job's current state does not allow; the message says why."""


class QuotaExceeded(InvalidTransition):
    """A member is at a limit of the installation's (jobs in flight, stored bytes); the message says which."""


class Job(models.Model):
    class Status(models.TextChoices):
        VALIDATING = "validating"  # an API batch whose file a worker is checking; no items yet
        QUEUED = "queued"
        RUNNING = "running"
        PAUSED = "paused"
        CANCELLING = "cancelling"
        COMPLETED = "completed"
        CANCELLED = "cancelled"
        FAILED = "failed"

    class Mode(models.TextChoices):
        LIVE = "live", "Live (concurrent requests)"
        REMOTE = "remote", "Batch API (half price, up to 24 h)"
        HYBRID = "hybrid", "Batch API with a deadline (the rest live in time)"

    class Format(models.TextChoices):
        JSONL = "jsonl", "OpenAI batch JSONL"
        CSV = "csv", "CSV + prompt template"

    # Slices, or a validation writing items, may be running: not deleted.
    ACTIVE = (Status.VALIDATING, Status.QUEUED, Status.RUNNING, Status.CANCELLING)
    FINISHED = (Status.COMPLETED, Status.CANCELLED, Status.FAILED)
    # Which states each state may move to. Everything that changes a job's status goes
    # through transition(), a compare-and-set on this table, so two clicks or a click racing
    # a worker cannot produce a state the diagram does not have.
    TRANSITIONS = {
        # Items created then started, or the file's errors. cancel() goes by cancelling as for any job, and
        # with nothing in flight, on to cancelled in the same call.
        Status.VALIDATING: {Status.QUEUED, Status.FAILED, Status.CANCELLING},
        Status.QUEUED: {Status.RUNNING, Status.PAUSED, Status.CANCELLING, Status.CANCELLED, Status.FAILED},
        Status.RUNNING: {Status.PAUSED, Status.CANCELLING, Status.CANCELLED, Status.COMPLETED, Status.FAILED},
        Status.PAUSED: {Status.QUEUED, Status.RUNNING, Status.CANCELLING, Status.CANCELLED},
        Status.CANCELLING: {Status.CANCELLED},
        Status.COMPLETED: {Status.QUEUED},  # retry failed items
        Status.CANCELLED: {Status.QUEUED},  # retry failed items
        Status.FAILED: {Status.QUEUED},
    }

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="jobs")
    name = models.CharField(max_length=200)
    url = models.CharField(max_length=40, help_text="Target path, e.g. /v1/chat/completions")
    model = models.CharField(max_length=200, blank=True)
    mode = models.CharField(max_length=10, choices=Mode.choices, default=Mode.LIVE)
    endpoint = models.ForeignKey(Endpoint, null=True, blank=True, on_delete=models.SET_NULL, related_name="jobs")
    status = models.CharField(max_length=12, choices=Status.choices, default=Status.QUEUED)
    status_reason = models.TextField(blank=True, help_text="Plain-words reason for a pause or failure")

    source_name = models.CharField(max_length=255, blank=True)
    source_format = models.CharField(max_length=5, choices=Format.choices, default=Format.JSONL)
    source_file = models.CharField(max_length=500, blank=True, help_text="Path under the data dir")
    columns = models.JSONField(default=list, blank=True, help_text="CSV input columns, for the joined CSV export")
    template = models.JSONField(default=dict, blank=True)
    errors = models.JSONField(default=list, blank=True, help_text="Validation errors (API batches that failed)")
    metadata = models.JSONField(default=dict, blank=True)
    max_attempts = models.PositiveSmallIntegerField(default=5)
    cost_cap = models.DecimalField(
        max_digits=12,
        decimal_places=4,
        null=True,
        blank=True,
        help_text="The job pauses before a request whose estimated cost (input plus its most output) would pass this",
    )
    notify = models.BooleanField(default=True, help_text="Email the owner when the job ends or pauses by itself")
    use_cache = models.BooleanField(
        default=False,
        help_text="Answer requests answered before from the team's answer cache, and send duplicates once",
    )
    cache_hits = models.IntegerField(default=0)
    cache_saved = models.DecimalField(max_digits=14, decimal_places=6, default=Decimal(0))
    output_retries = models.PositiveSmallIntegerField(
        default=2, help_text="Sends more for an answer that is not the JSON its request's schema asks for"
    )
    # Remote and hybrid jobs (jobs/engine/remote.py). A hybrid job runs remotely until `switch_at`, the last
    # safe moment (recomputed as it goes, `switch_note` says why), then cancels its remote batches and runs
    # the rest live from `switched_at`.
    deadline = models.DateTimeField(null=True, blank=True, help_text="Hybrid: everything answered by then")
    switch_at = models.DateTimeField(null=True, blank=True, editable=False)
    switch_note = models.TextField(blank=True, editable=False)
    switched_at = models.DateTimeField(null=True, blank=True, editable=False)
    # Requests the endpoint reports done (request_counts) in batches whose results are not joined yet.
    remote_completed = models.IntegerField(default=0, editable=False)
    remote_failed = models.IntegerField(default=0, editable=False)

    total = models.PositiveIntegerField(default=0)
    n_pending = models.IntegerField(default=0)
    n_running = models.IntegerField(default=0)
    n_succeeded = models.IntegerField(default=0)
    n_failed = models.IntegerField(default=0)
    n_cancelled = models.IntegerField(default=0)
    n_expired = models.IntegerField(default=0)
    est_input_tokens = models.BigIntegerField(default=0)
    prompt_tokens = models.BigIntegerField(default=0)
    completion_tokens = models.BigIntegerField(default=0)
    cached_tokens = models.BigIntegerField(default=0)
    cost = models.DecimalField(max_digits=14, decimal_places=6, default=Decimal(0))

    created_at = models.DateTimeField(default=timezone.now)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)
    heartbeat_at = models.DateTimeField(
        null=True, blank=True, help_text="Last sign of life from a slice, or from the validation of the job's file"
    )
    # Slice bookkeeping (see start_slices() below): the generation of slices allowed to run, when the newest
    # slice was enqueued, and the enqueue time of the newest one that has started.
    slice_gen = models.PositiveIntegerField(default=0, editable=False)
    slice_enqueued_at = models.DateTimeField(null=True, blank=True, editable=False)
    slice_picked_at = models.DateTimeField(null=True, blank=True, editable=False)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [
            models.Index(fields=["-created_at", "-id"], name="job_recent"),
            models.Index(fields=["owner", "-created_at"], name="job_owner_recent"),
            models.Index(fields=["status"], name="job_status"),
        ]

    def __str__(self) -> str:
        return self.name

    def get_absolute_url(self) -> str:
        return reverse("job_detail", args=[self.pk])

    # Access, for pages and the API alike. Jobs are shared by the team: every signed-in member sees every
    # job in the dashboard; only its owner or staff change it. Through /v1 a token acts for its user, and
    # sees what its user may change, as an OpenAI key sees its own project's batches.

    def can_view(self, user: AbstractUser | AnonymousUser) -> bool:
        return user.is_authenticated and user.is_active

    def can_control(self, user: AbstractUser | AnonymousUser) -> bool:
        return self.can_view(user) and (self.owner_id == user.pk or user.is_staff)

    @property
    def is_finished(self) -> bool:
        return self.status in self.FINISHED

    @property
    def n_done(self) -> int:
        return self.n_succeeded + self.n_failed + self.n_cancelled + self.n_expired

    @property
    def n_answered(self) -> int:
        """Items that ran to a result or an error: what the job got done (cancelled ones never ran), with
        what remote batches report done before their results are joined."""
        return self.n_succeeded + self.n_failed + self.n_expired + self.remote_completed + self.remote_failed

    @property
    def runs_remotely(self) -> bool:
        """Whether pending items go to the Batch API (remote, or hybrid before its switch) rather than live."""
        return self.mode == Job.Mode.REMOTE or (self.mode == Job.Mode.HYBRID and self.switched_at is None)

    def progress(self) -> float:
        """Percent of items answered: a job cancelled half-way stays at half, it does not read as done."""
        if not self.total:  # no items yet (its file is being checked), or a job with none
            return 0.0 if self.status == Job.Status.VALIDATING else 100.0
        return 100.0 * self.n_answered / self.total

    def cancelled_percent(self) -> float:
        return 100.0 * self.n_cancelled / self.total if self.total else 0.0

    def elapsed_seconds(self) -> float | None:
        """Wall time since the first request, to the end if finished (pauses included)."""
        if self.started_at is None:
            return None
        return ((self.finished_at or clock.now()) - self.started_at).total_seconds()

    def counts(self) -> dict[str, int]:
        return {s: getattr(self, f"n_{s}") for s in Item.Status.values}

    def transition(self, new: str, reason: str | None = None, **fields: object) -> None:
        """Move to `new` if the state diagram allows it from the status in the database."""
        allowed_from = [s for s, targets in self.TRANSITIONS.items() if new in targets]
        changes = {"status": new, "updated_at": clock.now(), **fields}
        if reason is not None:
            # Reasons quote the upstream at times (a 403's message): shown on every poll, emailed, in /v1.
            changes["status_reason"] = reason if len(reason) <= 2000 else reason[:1999] + "…"
        if new in self.FINISHED:
            changes.setdefault("finished_at", clock.now())
        with transaction.atomic():
            n = Job.objects.filter(pk=self.pk, status__in=allowed_from).update(**changes)
            if n != 1:
                current = Job.objects.filter(pk=self.pk).values_list("status", flat=True).first()
                raise InvalidTransition(f"A {current or 'deleted'} job cannot become {new}.")
            for name, value in changes.items():
                setattr(self, name, value)
            if new in EVENTS:  # the end of a run: emailed, and sent to the webhooks (jobs/models/notify.py)
                JobEvent.record(self, EVENTS[new])

    # Lock order: a transaction that changes a job's items locks the job's row first (Job.lock), then the
    # items. The ledger (jobs/models/ledger.py), the one writer of items and counters, keeps it, and so does
    # delete (lock_before_delete), so two transactions never wait on each other in a circle (Postgres would
    # abort one). The control actions people take are in jobs/models/control.py.

    @classmethod
    def lock(cls, job_id: int) -> str | None:
        """Lock the job's row until the transaction ends (Postgres; SQLite's write lock covers it) and
        return its status (None: deleted)."""
        return cls.objects.select_for_update().filter(pk=job_id).values_list("status", flat=True).first()

    @classmethod
    def check_room(cls, owner: AbstractBaseUser | None) -> None:
        """QuotaExceeded if `owner` has as many jobs in flight (validating, queued, running, cancelling) as a
        member may: each job's slices take turns on the shared workers, so one member's hundred jobs would
        starve everyone else's. Paused and finished jobs do not count."""
        limit = settings.BATCHSITE_MAX_ACTIVE_JOBS
        if not limit or owner is None:
            return
        active = cls.objects.filter(owner=owner, status__in=cls.ACTIVE).count()
        if active >= limit:
            raise QuotaExceeded(
                f"You have {active} jobs in flight, the most a member may have at once "
                f"(BATCHSITE_MAX_ACTIVE_JOBS is {limit}). Wait for one to finish, or pause or cancel one."
            )

    def start(self) -> None:
        """Enqueue what runs a queued job once the surrounding transaction commits: its slices, or for the
        Batch API a round of the remote poller (which sends it, then follows it every few seconds)."""
        if self.runs_remotely:
            queue.poll_remote_on_commit(self.pk)
        else:
            transaction.on_commit(lambda: Job.start_slices(self.pk))

    @classmethod
    def validate_later(cls, job_id: int) -> None:
        """Enqueue the check of a validating job's file, which creates its items and starts it (or fails it),
        once the surrounding transaction commits. The sweeper enqueues it again if it is lost."""
        queue.validate_batch_on_commit(job_id)

    # Slices. A job runs as a few chains of slice tasks, each slice enqueueing its successor. Every start
    # (start, resume, a retry of a finished job, the sweeper's restart) is a new *generation*: slices of an
    # older one stop at their next look at the job, so starting again never adds chains. The job records
    # when its newest slice was enqueued and the enqueue time of the newest one that started, so the
    # sweeper can tell slices waiting in the queue from lost ones (jobs/engine/tasks.py).

    @classmethod
    def start_slices(cls, job_id: int, replacing: int | None = None) -> bool:
        """Start a new generation of BATCHSITE_SLICES_PER_JOB slices (they split the job's concurrency).

        `replacing`: only if generation `replacing` is still the job's newest, so that sweeps running side
        by side restart a job once. True if started."""
        slices = max(1, settings.BATCHSITE_SLICES_PER_JOB)
        now = clock.now()
        current = {} if replacing is None else {"slice_gen": replacing}
        with transaction.atomic():
            if not cls.objects.filter(pk=job_id, **current).update(slice_gen=F("slice_gen") + 1, slice_enqueued_at=now):
                return False
            generation = cls.objects.filter(pk=job_id).values_list("slice_gen", flat=True).get()
        for _ in range(slices):
            queue.enqueue_slice(job_id, slices, generation, now)
        return True

    @classmethod
    def enqueue_next_slice(cls, job_id: int, slices: int, generation: int) -> bool:
        """The next slice of a chain of generation `generation`; nothing if a newer generation replaced it."""
        now = clock.now()
        if not cls.objects.filter(pk=job_id, slice_gen=generation).update(slice_enqueued_at=now):
            return False
        queue.enqueue_slice(job_id, slices, generation, now)
        return True

    def pause_itself(self, reason: str) -> None:
        """A slice found it cannot go on (no endpoint, a key it cannot read): paused, saying why."""
        try:
            with transaction.atomic():
                self.transition(Job.Status.PAUSED, reason=reason)
                JobEvent.record(self, PAUSED)
            log.warning("Job %s paused itself: %s", self.pk, reason)
        except InvalidTransition:
            pass  # already paused or cancelled by someone else

    def deletable(self) -> bool:
        """Whether a person may delete it now: not while its slices may be sending requests, nor while a batch
        of it runs at an endpoint (it would go on, paid for, with nobody to collect it)."""
        if self.status in Job.ACTIVE:
            return False
        return self.mode == Job.Mode.LIVE or not self.remote_batches.filter(collected_at__isnull=True).exists()


@receiver(pre_delete, sender=Job, dispatch_uid="batchsite-lock-before-delete")
def lock_before_delete(sender: type[Job], instance: Job, **kwargs: object) -> None:
    """Every way of deleting a job passes here, inside the deleting transaction and before any row goes:
    job.delete(), a QuerySet's delete(), the admin's bulk delete, and a user's deletion cascading to their
    jobs. The job's row is locked first, the lock order, so a slice still writing the job's items cannot
    deadlock with the cascade; once the job is gone, its slices find nothing to claim or write.

    People are asked to cancel or pause a job before deleting it (the dashboard's Delete, the admin's
    delete pages: Job.deletable()); code may delete any job."""
    Job.lock(instance.pk)
