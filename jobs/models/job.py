"""Job and Item: a batch of requests and each request with its one result; JobTick, their timeline.

The job's lifecycle lives here, on Job: the state diagram, the one lock order, and the control actions."""

import logging
from collections.abc import Iterator, Sequence
from decimal import Decimal

from django.conf import settings
from django.db import connection, models, transaction
from django.db.models import Count, F, Q, Sum
from django.db.models.signals import pre_delete
from django.dispatch import receiver
from django.urls import reverse
from django.utils import timezone

from jobs import clock, queue
from jobs.models.budget import Spending
from jobs.models.endpoint import Endpoint
from jobs.models.notify import EVENTS, PAUSED, JobEvent

log = logging.getLogger(__name__)

# The engine's entry point, by name: the one thing the core knows of the engine (django-q2 imports it
# in the worker that runs the task).
# Duplicate and retry of more requests than this run in a worker, not the request (Job.duplicate, retry_later).
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
    # Not a field: the owner's username, where a raw query joined it (the progress poll, jobs/web/views.py).
    owner_name: str

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

    def can_view(self, user) -> bool:
        return user.is_authenticated and user.is_active

    def can_control(self, user) -> bool:
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

    def transition(self, new: str, reason: str | None = None, **fields) -> None:
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

    def add_to_counters(self, **deltas) -> None:
        """Add to counters with F() so concurrent writers never lose an update. Money spent goes into the
        spending ledger too (budget.Spending), which monthly limits read: callers hold the job's lock."""
        Job.objects.filter(pk=self.pk).update(**{k: F(k) + v for k, v in deltas.items() if v}, updated_at=clock.now())
        if deltas.get("cost"):
            Spending.record(self.pk, deltas["cost"])

    # The lifecycle. Control actions are safe to call twice and from any state: one the state does not
    # allow raises InvalidTransition with a message for the person who clicked.
    #
    # Lock order: a transaction that changes a job's items locks the job's row first (Job.lock), then
    # the items. Every writer keeps it (claims and results in jobs/engine/leases.py, cancel, retry,
    # delete), so two transactions never wait on each other in a circle (Postgres would abort one).

    @classmethod
    def lock(cls, job_id: int) -> str | None:
        """Lock the job's row until the transaction ends (Postgres; SQLite's write lock covers it) and
        return its status (None: deleted)."""
        return cls.objects.select_for_update().filter(pk=job_id).values_list("status", flat=True).first()

    @classmethod
    def check_room(cls, owner) -> None:
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
            queue.run_slice(job_id, slices, generation, now)
        return True

    @classmethod
    def enqueue_next_slice(cls, job_id: int, slices: int, generation: int) -> bool:
        """The next slice of a chain of generation `generation`; nothing if a newer generation replaced it."""
        now = clock.now()
        if not cls.objects.filter(pk=job_id, slice_gen=generation).update(slice_enqueued_at=now):
            return False
        queue.run_slice(job_id, slices, generation, now)
        return True

    def pause(self) -> None:
        if self.status == Job.Status.PAUSED:
            return
        if self.status not in (Job.Status.QUEUED, Job.Status.RUNNING):
            raise InvalidTransition(f"A {self.status} job cannot be paused.")
        self.transition(Job.Status.PAUSED, reason="")

    def resume(self) -> None:
        if self.status in (Job.Status.QUEUED, Job.Status.RUNNING):
            return
        if self.status != Job.Status.PAUSED:
            raise InvalidTransition(f"A {self.status} job cannot be resumed.")
        with transaction.atomic():
            self.transition(Job.Status.QUEUED, reason="")
            self.start()

    def cancel(self) -> None:
        """Cancel pending items now; items in flight finish, then the job is cancelled."""
        if self.status in (Job.Status.CANCELLING, Job.Status.CANCELLED):
            return
        if self.status in (Job.Status.COMPLETED, Job.Status.FAILED):
            raise InvalidTransition(f"A {self.status} job cannot be cancelled.")
        with transaction.atomic():
            # The job's row first (the transition locks it), then its items: the order every writer
            # takes (the lock order above), so this never deadlocks with a slice claiming or writing items.
            self.transition(Job.Status.CANCELLING, reason="")
            n = self.items.filter(status=Item.Status.PENDING).update(status=Item.Status.CANCELLED, next_attempt_at=None)
            self.add_to_counters(n_pending=-n, n_cancelled=n)
            if self.remote_batches.filter(collected_at__isnull=True).update(next_poll_at=clock.now()):
                # The poller cancels the remote batches at once, keeping what they finished.
                queue.poll_remote_on_commit(self.pk)
        Job.finalize_if_done(self.pk)
        self.refresh_from_db()

    def retry_failed(self, mode: str | None = None) -> int:
        """Failed and expired items back to pending with fresh attempts; returns how many. `mode`: run them
        live or at the Batch API this time (the job's mode changes)."""
        reset = dict(
            status=Item.Status.PENDING,
            remote_batch=None,  # no longer the old chunk's: collecting it again must not touch the item
            attempts=0,
            http_status=None,
            response="",
            request_id="",
            error_code="",
            error_message="",
            next_attempt_at=None,
            finished_at=None,
            latency_ms=None,
        )
        with transaction.atomic():
            # The job's row first, then its items (the lock order), and its status as of
            # now: a slice may have just completed the job.
            status = Job.lock(self.pk)
            if status is None:
                raise InvalidTransition("This job was deleted.")
            self.status = status
            if self.status == Job.Status.CANCELLING:
                raise InvalidTransition("Wait until the job is cancelled, then retry its failed items.")
            n_failed = self.items.filter(status=Item.Status.FAILED).update(**reset)
            n_expired = self.items.filter(status=Item.Status.EXPIRED).update(**reset)
            n = n_failed + n_expired
            if not n:
                raise InvalidTransition("This job has no failed items to retry.")
            if self.status in Job.FINISHED:
                Job.check_room(self.owner)  # it runs again: in flight once more
            self.add_to_counters(n_failed=-n_failed, n_expired=-n_expired, n_pending=n)
            if mode and mode != self.mode:
                if mode not in (Job.Mode.LIVE, Job.Mode.REMOTE):
                    raise InvalidTransition("Failed items are retried live or at the Batch API.")
                if self.status not in Job.FINISHED:
                    raise InvalidTransition("The mode of a retry can change only once the job has finished.")
                # A hybrid retry starts remotely again, with a new switch plan.
                self.mode, self.switched_at, self.switch_at = mode, None, None
                Job.objects.filter(pk=self.pk).update(mode=mode, switched_at=None, switch_at=None)
            if self.status in Job.FINISHED:
                self.transition(Job.Status.QUEUED, reason="", finished_at=None)
                self.start()
            # A queued or running job's slices take the items up (a slice never ends its chain while
            # items are pending), a paused job's on resume: more slices would only add chains.
        return n

    def pause_itself(self, reason: str) -> None:
        """A slice found it cannot go on (no endpoint, a key it cannot read): paused, saying why."""
        try:
            with transaction.atomic():
                self.transition(Job.Status.PAUSED, reason=reason)
                JobEvent.record(self, PAUSED)
            log.warning("Job %s paused itself: %s", self.pk, reason)
        except InvalidTransition:
            pass  # already paused or cancelled by someone else

    @classmethod
    def finalize_if_done(cls, job_id: int) -> bool:
        """Completed (or cancelled) once no item is pending or running; counters recomputed as a check.

        Under the job's row lock, so that items made pending again at the same moment (retry_failed)
        either come first and keep the job running, or find it completed."""
        with transaction.atomic():
            job = cls.objects.select_for_update().filter(pk=job_id).first()
            if job is None or job.status not in (Job.Status.RUNNING, Job.Status.CANCELLING):
                return False
            if job.n_pending or job.n_running:
                return False
            job.recount()
            if job.n_pending or job.n_running:
                log.warning("Job %s counters had drifted; recounted", job_id)
                return False
            try:
                job.transition(Job.Status.CANCELLED if job.status == Job.Status.CANCELLING else Job.Status.COMPLETED)
            except InvalidTransition:
                return False
        return True

    def deletable(self) -> bool:
        """Whether a person may delete it now: not while its slices may be sending requests, nor while a batch
        of it runs at an endpoint (it would go on, paid for, with nobody to collect it)."""
        if self.status in Job.ACTIVE:
            return False
        return self.mode == Job.Mode.LIVE or not self.remote_batches.filter(collected_at__isnull=True).exists()

    def duplicate(self, owner) -> "Job":
        """A new job with the same requests, owned by `owner`, started. A big one (over INLINE_ROWS requests) is
        made `validating` and a worker reads its source file again to make its items, as a big upload is: a
        million-row copy inside the request would hold SQLite's write lock (and a web thread) for many
        seconds."""
        if self.status == Job.Status.VALIDATING:
            raise InvalidTransition("Its file is still being checked: duplicate it once it has its requests.")
        Job.check_room(owner)
        fields = [
            "url",
            "model",
            "mode",
            "deadline",
            "endpoint",
            "source_name",
            "source_format",
            "source_file",
            "columns",
            "template",
            "metadata",
            "max_attempts",
            "output_retries",
            "use_cache",
            "notify",
            "cost_cap",
        ]
        copied = {f: getattr(self, f) for f in fields}
        name = f"Copy of {self.name}"[:200]
        if self.total > INLINE_ROWS:
            with transaction.atomic():
                copy = Job.objects.create(owner=owner, name=name, status=Job.Status.VALIDATING, **copied)
                Job.validate_later(copy.pk)
            return copy
        with transaction.atomic():
            copy = Job.objects.create(
                owner=owner,
                name=name,
                n_pending=self.total,
                total=self.total,
                est_input_tokens=self.est_input_tokens,
                **copied,
            )
            table, quote = Item._meta.db_table, connection.ops.quote_name
            columns_copied = ["line", "custom_id", "body", "input_row", "est_tokens"]
            defaults = Item.column_defaults(["job_id", *columns_copied])
            columns = ", ".join(quote(c) for c in ["job_id", *columns_copied, *defaults])
            placeholders = ", ".join(["%s"] * len(defaults))
            with connection.cursor() as cursor:
                cursor.execute(
                    f"INSERT INTO {table} ({columns}) SELECT %s, {', '.join(quote(c) for c in columns_copied)}, "
                    f"{placeholders} FROM {table} WHERE job_id = %s ORDER BY line",
                    [copy.pk, *defaults.values(), self.pk],
                )
            copy.start()
        return copy

    def retry_later(self, mode: str | None = None) -> int:
        """retry_failed, by a worker when there are more than INLINE_ROWS items to queue again (updating a
        million rows would hold the request and SQLite's write lock); returns how many will be."""
        n = self.n_failed + self.n_expired
        if n <= INLINE_ROWS:
            return self.retry_failed(mode)
        if self.status == Job.Status.CANCELLING:
            raise InvalidTransition("Wait until the job is cancelled, then retry its failed items.")
        if self.status in Job.FINISHED:
            Job.check_room(self.owner)
        queue.retry_failed_on_commit(self.pk, mode)
        return n

    def recount(self) -> None:
        """Recompute the counters from the items: the check that the running totals are right."""
        by_status = dict(self.items.values_list("status").annotate(n=Count("id")).order_by())
        sums = self.items.aggregate(
            p=Sum("prompt_tokens"), c=Sum("completion_tokens"), k=Sum("cached_tokens"), cost=Sum("cost")
        )
        fields = {f"n_{s}": by_status.get(s, 0) for s in Item.Status.values}
        fields.update(
            total=sum(by_status.values()),
            prompt_tokens=sums["p"] or 0,
            completion_tokens=sums["c"] or 0,
            cached_tokens=sums["k"] or 0,
            cost=sums["cost"] or Decimal(0),
        )
        Job.objects.filter(pk=self.pk).update(**fields)
        for name, value in fields.items():
            setattr(self, name, value)


SQL_IDS = 900  # ids in one query's IN (...): SQLite allows 999 parameters a query in older builds


def id_batches(ids: Sequence[int]) -> Iterator[Sequence[int]]:
    """`ids` a query's worth at a time (SQL_IDS)."""
    for start in range(0, len(ids), SQL_IDS):
        yield ids[start : start + SQL_IDS]


@receiver(pre_delete, sender=Job, dispatch_uid="batchsite-lock-before-delete")
def lock_before_delete(sender, instance: Job, **kwargs) -> None:
    """Every way of deleting a job passes here, inside the deleting transaction and before any row goes:
    job.delete(), a QuerySet's delete(), the admin's bulk delete, and a user's deletion cascading to their
    jobs. The job's row is locked first, the lock order, so a slice still writing the job's items cannot
    deadlock with the cascade; once the job is gone, its slices find nothing to claim or write.

    People are asked to cancel or pause a job before deleting it (the dashboard's Delete, the admin's
    delete pages: Job.deletable()); code may delete any job."""
    Job.lock(instance.pk)


class ItemStatus(models.TextChoices):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"


class Item(models.Model):
    """One request of a job, and once it ran, its one result."""

    Status = ItemStatus
    FINAL = (Status.SUCCEEDED, Status.FAILED, Status.CANCELLED, Status.EXPIRED)

    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="items")
    line = models.PositiveIntegerField(help_text="Line (JSONL) or row start line (CSV) in the source file")
    custom_id = models.TextField()
    body = models.TextField(help_text="The request body as compact JSON")
    input_row = models.TextField(blank=True, help_text="CSV jobs: the input row as a JSON list of cells")
    est_tokens = models.PositiveIntegerField(default=0, help_text="Estimated input tokens")

    status = models.CharField(max_length=10, choices=Status.choices, default=Status.PENDING)
    attempts = models.PositiveSmallIntegerField(default=0)
    next_attempt_at = models.DateTimeField(null=True, blank=True)
    lease_token = models.UUIDField(null=True, blank=True)
    lease_until = models.DateTimeField(null=True, blank=True)
    # Remote and hybrid jobs: the chunk the item was last sent in (while it runs there: status running, no
    # lease). Items and chunks go together with their job, so no constraint or cascade of its own.
    remote_batch = models.ForeignKey(
        "jobs.RemoteBatch",
        null=True,
        blank=True,
        on_delete=models.DO_NOTHING,
        db_constraint=False,
        related_name="items",
        db_index=False,
    )

    http_status = models.PositiveSmallIntegerField(null=True, blank=True)
    request_id = models.CharField(max_length=200, blank=True)
    response = models.TextField(blank=True, help_text="The response body as received")
    error_code = models.CharField(max_length=100, blank=True)
    error_message = models.TextField(blank=True)
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    cached_tokens = models.PositiveIntegerField(default=0)
    cost = models.DecimalField(max_digits=12, decimal_places=8, default=Decimal(0))
    est_cost = models.DecimalField(
        max_digits=12, decimal_places=8, default=Decimal(0), help_text="While running: its most possible cost"
    )
    from_cache = models.BooleanField(default=False, help_text="Answered from the answer cache, not sent")
    latency_ms = models.PositiveIntegerField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["job", "line"]
        constraints = [
            models.UniqueConstraint(fields=["job", "line"], name="item_job_line"),
            models.UniqueConstraint(fields=["job", "custom_id"], name="item_job_custom_id"),
        ]
        indexes = [
            models.Index(fields=["job", "status", "line"], name="item_job_status_line"),
            models.Index(fields=["lease_until"], condition=Q(status=ItemStatus.RUNNING), name="item_running_lease"),
            # Only items out at the Batch API: the index stays small, and costs bulk inserts nothing.
            models.Index(fields=["remote_batch"], condition=Q(remote_batch__isnull=False), name="item_remote_batch"),
        ]

    def __str__(self) -> str:
        return f"{self.custom_id} ({self.status})"

    @classmethod
    def column_defaults(cls, given) -> dict:
        """{column: default as a database value} for every column but the primary key and `given`:
        the constant part of the raw INSERTs that create items in bulk (ingest, duplicate)."""
        return {
            f.column: f.get_db_prep_save(f.get_default(), connection)
            for f in cls._meta.concrete_fields
            if not f.primary_key and f.column not in given
        }


class JobTick(models.Model):
    """Per-job counts in 10-second buckets: the timeline the dashboard charts (throughput, retries, tokens)."""

    SECONDS = 10

    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="ticks")
    at = models.DateTimeField()
    succeeded = models.PositiveIntegerField(default=0)
    failed = models.PositiveIntegerField(default=0)
    retried = models.PositiveIntegerField(default=0)
    prompt_tokens = models.BigIntegerField(default=0)
    completion_tokens = models.BigIntegerField(default=0)

    class Meta:
        ordering = ["job", "at"]
        constraints = [models.UniqueConstraint(fields=["job", "at"], name="jobtick_job_at")]

    def __str__(self) -> str:
        return f"job {self.job_id} at {self.at:%H:%M:%S}"

    @classmethod
    def add(cls, job_id: int, when, counts) -> None:
        """Add counts to the bucket holding `when` (call inside the transaction that wrote the items)."""
        at = when.replace(second=when.second - when.second % cls.SECONDS, microsecond=0)
        keys = ("succeeded", "failed", "retried", "prompt_tokens", "completion_tokens")
        values = {k: counts[k] for k in keys if counts.get(k)}
        if not values:
            return
        n = cls.objects.filter(job_id=job_id, at=at).update(**{k: F(k) + v for k, v in values.items()})
        if not n:
            cls.objects.create(job_id=job_id, at=at, **values)
