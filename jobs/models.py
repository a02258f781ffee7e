import hashlib
import os
import secrets
import shutil
from decimal import Decimal

from django.conf import settings
from django.db import connection, models, transaction
from django.db.models import Count, F, Q, Sum
from django.urls import reverse
from django.utils import timezone

from jobs import crypto

SUPPORTED_URLS = ("/v1/chat/completions", "/v1/embeddings", "/v1/completions", "/v1/responses")


class Endpoint(models.Model):
    """An OpenAI-compatible server that jobs run against (OpenAI, Azure, vLLM, Ollama, LiteLLM...)."""

    name = models.CharField(max_length=100, unique=True)
    base_url = models.URLField(max_length=500, help_text="Up to and including /v1, e.g. https://api.openai.com/v1")
    api_key_encrypted = models.TextField(blank=True, editable=False)
    key_hint = models.CharField(max_length=12, blank=True, editable=False)
    concurrency = models.PositiveIntegerField(default=100, help_text="Requests in flight at once")
    rpm = models.PositiveIntegerField(null=True, blank=True, help_text="Requests per minute; empty: learned")
    tpm = models.PositiveIntegerField(null=True, blank=True, help_text="Tokens per minute; empty: learned")
    learned_rpm = models.PositiveIntegerField(null=True, blank=True, editable=False)
    learned_tpm = models.PositiveIntegerField(null=True, blank=True, editable=False)
    cooldown_until = models.DateTimeField(null=True, blank=True, editable=False)
    is_default = models.BooleanField(default=False)
    from_env = models.BooleanField(default=False, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    ENV_NAME = "Default (from environment)"

    class Meta:
        ordering = ["-is_default", "name"]
        constraints = [
            models.UniqueConstraint(fields=["is_default"], condition=Q(is_default=True), name="one_default_endpoint"),
        ]

    def __str__(self) -> str:
        return self.name

    @property
    def api_key(self) -> str:
        return crypto.decrypt(self.api_key_encrypted)

    def set_api_key(self, key: str) -> None:
        self.api_key_encrypted = crypto.encrypt(key)
        self.key_hint = key[-4:] if len(key) >= 12 else ""

    @property
    def masked_key(self) -> str:
        if not self.api_key_encrypted:
            return "(none)"
        return f"…{self.key_hint}" if self.key_hint else "••••"

    @property
    def effective_rpm(self) -> int | None:
        return self.rpm or self.learned_rpm

    @property
    def effective_tpm(self) -> int | None:
        return self.tpm or self.learned_tpm

    @classmethod
    def sync_from_env(cls) -> "Endpoint | None":
        """Create or update the endpoint described by OPENAI_API_KEY/OPENAI_BASE_URL and friends.

        The environment owns that one endpoint: editing it on the page is overwritten at the
        next start, which is what an operator who set the variables expects.
        """
        key = os.environ.get("OPENAI_API_KEY", "")
        base_url = (os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1").rstrip("/")
        if not key and not os.environ.get("OPENAI_BASE_URL"):
            return None

        def envint(name):
            value = os.environ.get(name, "").strip()
            return int(value) if value else None

        endpoint = cls.objects.filter(from_env=True).first() or cls(name=cls.ENV_NAME, from_env=True)
        if not endpoint.pk and cls.objects.filter(name=cls.ENV_NAME).exists():
            endpoint = cls.objects.get(name=cls.ENV_NAME)
            endpoint.from_env = True
        before = endpoint._values()
        changed_url = endpoint.base_url != base_url
        endpoint.base_url = base_url
        try:
            same_key = endpoint.api_key == key
        except ValueError:  # encrypted under an older SECRET_KEY: the environment's key replaces it
            same_key = False
        if not same_key or not endpoint.api_key_encrypted:
            endpoint.set_api_key(key)
        endpoint.concurrency = envint("OPENAI_CONCURRENCY") or 100
        endpoint.rpm = envint("OPENAI_RPM")
        endpoint.tpm = envint("OPENAI_TPM")
        if changed_url:  # limits learned from another server mean nothing here
            endpoint.learned_rpm = endpoint.learned_tpm = None
            endpoint.cooldown_until = None
        if not cls.objects.filter(is_default=True).exclude(pk=endpoint.pk).exists():
            endpoint.is_default = True
        # Pages call this: write (and, on SQLite, take the write lock) only when the environment
        # really changed something.
        if endpoint.pk is None or endpoint._values() != before:
            with transaction.atomic():
                endpoint.save()
        return endpoint

    def _values(self) -> dict:
        return {f.attname: getattr(self, f.attname) for f in self._meta.concrete_fields if f.name != "updated_at"}

    @classmethod
    def default(cls) -> "Endpoint | None":
        cls.sync_from_env()
        return cls.objects.filter(is_default=True).first() or cls.objects.first()

    def make_default(self) -> None:
        with transaction.atomic():
            Endpoint.objects.filter(is_default=True).exclude(pk=self.pk).update(is_default=False)
            Endpoint.objects.filter(pk=self.pk).update(is_default=True)
        self.is_default = True


class InvalidTransition(Exception):
    """A control action that the job's current state does not allow; the message says why."""


class Job(models.Model):
    QUEUED = "queued"
    RUNNING = "running"
    PAUSED = "paused"
    CANCELLING = "cancelling"
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    FAILED = "failed"
    STATUS_CHOICES = [
        (QUEUED, "Queued"),
        (RUNNING, "Running"),
        (PAUSED, "Paused"),
        (CANCELLING, "Cancelling"),
        (COMPLETED, "Completed"),
        (CANCELLED, "Cancelled"),
        (FAILED, "Failed"),
    ]
    ACTIVE = (QUEUED, RUNNING, CANCELLING)
    FINISHED = (COMPLETED, CANCELLED, FAILED)
    # Which states each state may move to. Everything that changes a job's status goes
    # through transition(), a compare-and-set on this table, so two clicks or a click racing
    # a worker cannot produce a state the diagram does not have.
    TRANSITIONS = {
        QUEUED: {RUNNING, PAUSED, CANCELLING, CANCELLED, FAILED},
        RUNNING: {PAUSED, CANCELLING, CANCELLED, COMPLETED, FAILED},
        PAUSED: {QUEUED, RUNNING, CANCELLING, CANCELLED},
        CANCELLING: {CANCELLED},
        COMPLETED: {QUEUED},  # retry failed items
        CANCELLED: {QUEUED},  # retry failed items
        FAILED: {QUEUED},
    }

    LIVE = "live"
    REMOTE = "remote"
    MODE_CHOICES = [(LIVE, "Live (concurrent requests)"), (REMOTE, "OpenAI Batch API (50% cheaper, up to 24 h)")]

    JSONL = "jsonl"
    CSV = "csv"
    FORMAT_CHOICES = [(JSONL, "OpenAI batch JSONL"), (CSV, "CSV + prompt template")]

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="jobs")
    name = models.CharField(max_length=200)
    url = models.CharField(max_length=40, help_text="Target path, e.g. /v1/chat/completions")
    model = models.CharField(max_length=200, blank=True)
    mode = models.CharField(max_length=10, choices=MODE_CHOICES, default=LIVE)
    endpoint = models.ForeignKey(Endpoint, null=True, blank=True, on_delete=models.SET_NULL, related_name="jobs")
    status = models.CharField(max_length=12, choices=STATUS_CHOICES, default=QUEUED)
    status_reason = models.TextField(blank=True, help_text="Plain-words reason for a pause or failure")

    source_name = models.CharField(max_length=255, blank=True)
    source_format = models.CharField(max_length=5, choices=FORMAT_CHOICES, default=JSONL)
    source_file = models.CharField(max_length=500, blank=True, help_text="Path under the data dir")
    columns = models.JSONField(default=list, blank=True, help_text="CSV input columns, for the joined CSV export")
    template = models.JSONField(default=dict, blank=True)
    errors = models.JSONField(default=list, blank=True, help_text="Validation errors (API batches that failed)")
    metadata = models.JSONField(default=dict, blank=True)
    max_attempts = models.PositiveSmallIntegerField(default=5)

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
    heartbeat_at = models.DateTimeField(null=True, blank=True, help_text="Last sign of life from a slice")
    # Slice bookkeeping (see jobs/tasks.py): the generation of slices allowed to run, when the newest
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

    @property
    def is_finished(self) -> bool:
        return self.status in self.FINISHED

    @property
    def n_done(self) -> int:
        return self.n_succeeded + self.n_failed + self.n_cancelled + self.n_expired

    @property
    def n_answered(self) -> int:
        """Items that ran to a result or an error: what the job got done (cancelled ones never ran)."""
        return self.n_succeeded + self.n_failed + self.n_expired

    def progress(self) -> float:
        """Percent of items answered: a job cancelled half-way stays at half, it does not read as done."""
        return 100.0 * self.n_answered / self.total if self.total else 100.0

    def cancelled_percent(self) -> float:
        return 100.0 * self.n_cancelled / self.total if self.total else 0.0

    def elapsed_seconds(self) -> float | None:
        """Wall time since the first request, to the end if finished (pauses included)."""
        if self.started_at is None:
            return None
        return ((self.finished_at or timezone.now()) - self.started_at).total_seconds()

    def counts(self) -> dict[str, int]:
        return {s: getattr(self, f"n_{s}") for s in Item.STATUSES}

    def transition(self, new: str, reason: str | None = None, **fields) -> None:
        """Move to `new` if the state diagram allows it from the status in the database."""
        allowed_from = [s for s, targets in self.TRANSITIONS.items() if new in targets]
        changes = {"status": new, "updated_at": timezone.now(), **fields}
        if reason is not None:
            changes["status_reason"] = reason
        if new in self.FINISHED:
            changes.setdefault("finished_at", timezone.now())
        n = Job.objects.filter(pk=self.pk, status__in=allowed_from).update(**changes)
        if n != 1:
            current = Job.objects.filter(pk=self.pk).values_list("status", flat=True).first()
            raise InvalidTransition(f"A {current or 'deleted'} job cannot become {new}.")
        for name, value in changes.items():
            setattr(self, name, value)

    def bump(self, **deltas) -> None:
        """Add to counters with F() so concurrent writers never lose an update."""
        Job.objects.filter(pk=self.pk).update(
            **{k: F(k) + v for k, v in deltas.items() if v}, updated_at=timezone.now()
        )

    # Control. Each is safe to call twice and from any state: an action the state does not allow
    # raises InvalidTransition with a message for the person who clicked.

    def start(self) -> None:
        """Enqueue the slices that run a queued job, once the surrounding transaction commits.

        They are a new generation: slices still running from before (a resume right after a pause)
        stop at their next look at the job, so the job never runs more slices than it was given."""
        from jobs import tasks

        transaction.on_commit(lambda: tasks.start_job(self.pk))

    def pause(self) -> None:
        if self.status == Job.PAUSED:
            return
        if self.status not in (Job.QUEUED, Job.RUNNING):
            raise InvalidTransition(f"A {self.status} job cannot be paused.")
        self.transition(Job.PAUSED, reason="")

    def resume(self) -> None:
        if self.status in (Job.QUEUED, Job.RUNNING):
            return
        if self.status != Job.PAUSED:
            raise InvalidTransition(f"A {self.status} job cannot be resumed.")
        with transaction.atomic():
            self.transition(Job.QUEUED, reason="")
            self.start()

    def cancel(self) -> None:
        """Cancel pending items now; items in flight finish, then the job is cancelled."""
        if self.status in (Job.CANCELLING, Job.CANCELLED):
            return
        if self.status in (Job.COMPLETED, Job.FAILED):
            raise InvalidTransition(f"A {self.status} job cannot be cancelled.")
        with transaction.atomic():
            # The job's row first (the transition locks it), then its items: the order every writer
            # takes (jobs/leases.py), so this never deadlocks with a slice claiming or writing items.
            self.transition(Job.CANCELLING, reason="")
            n = self.items.filter(status=Item.PENDING).update(status=Item.CANCELLED, next_attempt_at=None)
            self.bump(n_pending=-n, n_cancelled=n)
        from jobs.runner import finalize_if_done

        finalize_if_done(self.pk)
        self.refresh_from_db()

    def retry_failed(self) -> int:
        """Failed and expired items back to pending with fresh attempts; returns how many."""
        from jobs.leases import lock_job

        reset = dict(
            status=Item.PENDING,
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
            # The job's row first, then its items (the order of jobs/leases.py), and its status as of
            # now: a slice may have just completed the job.
            self.status = lock_job(self.pk)
            if self.status == Job.CANCELLING:
                raise InvalidTransition("Wait until the job is cancelled, then retry its failed items.")
            n_failed = self.items.filter(status=Item.FAILED).update(**reset)
            n_expired = self.items.filter(status=Item.EXPIRED).update(**reset)
            n = n_failed + n_expired
            if not n:
                raise InvalidTransition("This job has no failed items to retry.")
            self.bump(n_failed=-n_failed, n_expired=-n_expired, n_pending=n)
            if self.status in Job.FINISHED:
                self.transition(Job.QUEUED, reason="", finished_at=None)
                self.start()
            # A queued or running job's slices take the items up (a slice never ends its chain while
            # items are pending), a paused job's on resume: more slices would only add chains.
        return n

    def delete(self, *args, **kwargs):
        # Lock the job's row before the cascade deletes its items: the order every writer of items
        # keeps (jobs/leases.py), so a slice still finishing a paused job cannot deadlock with it.
        from jobs.leases import lock_job

        with transaction.atomic():
            lock_job(self.pk)
            return super().delete(*args, **kwargs)

    def duplicate(self, owner) -> "Job":
        """A new queued job with the same requests, owned by `owner`, started."""
        fields = [
            "url",
            "model",
            "mode",
            "endpoint",
            "source_name",
            "source_format",
            "source_file",
            "columns",
            "template",
            "metadata",
            "max_attempts",
            "total",
            "est_input_tokens",
        ]
        with transaction.atomic():
            copy = Job.objects.create(
                owner=owner,
                name=f"Copy of {self.name}"[:200],
                n_pending=self.total,
                **{f: getattr(self, f) for f in fields},
            )
            table, quote = Item._meta.db_table, connection.ops.quote_name
            copied = ["line", "custom_id", "body", "input_row", "est_tokens"]
            defaults = Item.column_defaults(["job_id", *copied])
            columns = ", ".join(quote(c) for c in ["job_id", *copied, *defaults])
            placeholders = ", ".join(["%s"] * len(defaults))
            with connection.cursor() as cursor:
                cursor.execute(
                    f"INSERT INTO {table} ({columns}) SELECT %s, {', '.join(quote(c) for c in copied)}, {placeholders} "
                    f"FROM {table} WHERE job_id = %s ORDER BY line",
                    [copy.pk, *defaults.values(), self.pk],
                )
            copy.start()
        return copy

    def recount(self) -> None:
        """Recompute the counters from the items: the check that the running totals are right."""
        by_status = dict(self.items.values_list("status").annotate(n=Count("id")).order_by())
        sums = self.items.aggregate(
            p=Sum("prompt_tokens"), c=Sum("completion_tokens"), k=Sum("cached_tokens"), cost=Sum("cost")
        )
        fields = {f"n_{s}": by_status.get(s, 0) for s in Item.STATUSES}
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


class Item(models.Model):
    """One request of a job, and once it ran, its one result."""

    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"
    STATUSES = (PENDING, RUNNING, SUCCEEDED, FAILED, CANCELLED, EXPIRED)
    STATUS_CHOICES = [(s, s.capitalize()) for s in STATUSES]
    FINAL = (SUCCEEDED, FAILED, CANCELLED, EXPIRED)

    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="items")
    line = models.PositiveIntegerField(help_text="Line (JSONL) or row start line (CSV) in the source file")
    custom_id = models.TextField()
    body = models.TextField(help_text="The request body as compact JSON")
    input_row = models.TextField(blank=True, help_text="CSV jobs: the input row as a JSON list of cells")
    est_tokens = models.PositiveIntegerField(default=0, help_text="Estimated input tokens")

    status = models.CharField(max_length=10, choices=STATUS_CHOICES, default=PENDING)
    attempts = models.PositiveSmallIntegerField(default=0)
    next_attempt_at = models.DateTimeField(null=True, blank=True)
    lease_token = models.UUIDField(null=True, blank=True)
    lease_until = models.DateTimeField(null=True, blank=True)

    http_status = models.PositiveSmallIntegerField(null=True, blank=True)
    request_id = models.CharField(max_length=200, blank=True)
    response = models.TextField(blank=True, help_text="The response body as received")
    error_code = models.CharField(max_length=100, blank=True)
    error_message = models.TextField(blank=True)
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    cached_tokens = models.PositiveIntegerField(default=0)
    cost = models.DecimalField(max_digits=12, decimal_places=8, default=Decimal(0))
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
            models.Index(fields=["lease_until"], condition=Q(status="running"), name="item_running_lease"),
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


class Price(models.Model):
    """USD per million tokens; the longest matching model prefix wins. Editable in the admin."""

    model = models.CharField(max_length=100, unique=True, help_text="Model name or prefix, e.g. gpt-4o-mini")
    input_per_mtok = models.DecimalField(max_digits=10, decimal_places=4)
    cached_input_per_mtok = models.DecimalField(max_digits=10, decimal_places=4, null=True, blank=True)
    output_per_mtok = models.DecimalField(max_digits=10, decimal_places=4, default=Decimal(0))

    class Meta:
        ordering = ["model"]

    def __str__(self) -> str:
        return self.model

    def cost(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> Decimal:
        cached_rate = self.cached_input_per_mtok if self.cached_input_per_mtok is not None else self.input_per_mtok
        uncached = max(prompt_tokens - cached_tokens, 0)
        total = uncached * self.input_per_mtok + cached_tokens * cached_rate + completion_tokens * self.output_per_mtok
        return (total / Decimal(1_000_000)).quantize(Decimal("0.00000001"))


class ApiToken(models.Model):
    """A personal token for the OpenAI-compatible /v1 API; only its SHA-256 is stored."""

    PREFIX = "bs-"
    SHOWN = 10  # leading characters kept in clear, so people can tell their tokens apart
    USED_EVERY = 60  # seconds: last_used_at is written at most this often, not on every request

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens")
    name = models.CharField(max_length=100)
    prefix = models.CharField(max_length=12)
    token_hash = models.CharField(max_length=64, unique=True)
    created_at = models.DateTimeField(default=timezone.now)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"

    @staticmethod
    def digest(plaintext: str) -> str:
        return hashlib.sha256(plaintext.encode()).hexdigest()

    @classmethod
    def create_for(cls, user, name: str) -> tuple["ApiToken", str]:
        """A new token for `user`; the plaintext is returned once and never stored."""
        plaintext = cls.PREFIX + secrets.token_urlsafe(32)
        token = cls.objects.create(
            user=user,
            name=name.strip()[:100] or "API token",
            prefix=plaintext[: cls.SHOWN],
            token_hash=cls.digest(plaintext),
        )
        return token, plaintext

    @classmethod
    def authenticate(cls, plaintext: str) -> "ApiToken | None":
        """The token (with its user) that `plaintext` is, whether revoked or not; None if none is."""
        if not plaintext:
            return None
        token = cls._by_digest(cls.digest(plaintext))
        if token is not None and token.is_active:
            now = timezone.now()
            cutoff = now - timezone.timedelta(seconds=cls.USED_EVERY)
            # Checked here first: an UPDATE that changes nothing still takes SQLite's write lock, on every poll.
            if token.last_used_at is None or token.last_used_at < cutoff:
                stale = Q(last_used_at__isnull=True) | Q(last_used_at__lt=cutoff)
                ApiToken.objects.filter(stale, pk=token.pk).update(last_used_at=now)
        return token

    @classmethod
    def _by_digest(cls, digest: str) -> "ApiToken | None":
        """One raw query for the token and the user fields every API call reads. Every /v1 request, every
        poll included, starts here: the ORM spends ~0.3 ms of CPU compiling a select_related query, the
        raw one a tenth of that. The user's other fields load on first use."""
        user_model = cls._meta.get_field("user").related_model
        q = connection.ops.quote_name
        sql = (
            f"SELECT t.*, u.{q('is_active')} AS u_active, u.{q('is_staff')} AS u_staff, u.{q('is_superuser')} AS u_super "
            f"FROM {q(cls._meta.db_table)} t JOIN {q(user_model._meta.db_table)} u ON u.{q(user_model._meta.pk.column)} = t.{q('user_id')} "
            f"WHERE t.{q('token_hash')} = %s"
        )
        token = next(iter(cls.objects.raw(sql, [digest])), None)
        if token is not None:
            known = {
                user_model._meta.pk.attname: token.user_id,
                "is_active": bool(token.u_active),
                "is_staff": bool(token.u_staff),
                "is_superuser": bool(token.u_super),
            }
            names = [f.attname for f in user_model._meta.concrete_fields if f.attname in known]  # from_db's order
            token.user = user_model.from_db(token._state.db, names, [known[n] for n in names])
        return token

    @property
    def is_active(self) -> bool:
        return self.revoked_at is None and self.user.is_active

    def revoke(self) -> None:
        ApiToken.objects.filter(pk=self.pk, revoked_at__isnull=True).update(revoked_at=timezone.now())
        self.refresh_from_db(fields=["revoked_at"])


def _file_id() -> str:
    return "file-" + secrets.token_hex(12)


def _batch_id() -> str:
    return "batch_" + secrets.token_hex(12)


class File(models.Model):
    """A file of the /v1 API: an uploaded batch input on disk, or a job's output or error file.

    Output files are not written anywhere: their content is exported from the job's items when
    downloaded, so they cost nothing until someone asks for them.
    """

    BATCH = "batch"
    BATCH_OUTPUT = "batch_output"
    PURPOSE_CHOICES = [(BATCH, "Batch input"), (BATCH_OUTPUT, "Batch output")]
    RESULTS = "results"
    ERRORS = "errors"
    KIND_CHOICES = [(RESULTS, "Results"), (ERRORS, "Errors")]

    public_id = models.CharField(max_length=40, unique=True, default=_file_id, editable=False)
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_files")
    filename = models.CharField(max_length=255)
    purpose = models.CharField(max_length=20, choices=PURPOSE_CHOICES)
    # None: an output or error file not measured yet (see size()); lists of batches never export jobs.
    bytes = models.BigIntegerField(null=True, default=0)
    path = models.CharField(max_length=500, blank=True, help_text="Uploads: path under the data dir")
    job = models.ForeignKey(Job, null=True, blank=True, on_delete=models.CASCADE, related_name="api_files")
    kind = models.CharField(max_length=10, blank=True, choices=KIND_CHOICES)
    created_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField(
        null=True, blank=True, help_text="Uploads: removed by the hourly clean-up after this"
    )
    deleted_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-id"]
        constraints = [
            models.UniqueConstraint(fields=["job", "kind"], condition=Q(job__isnull=False), name="file_job_kind"),
        ]
        indexes = [
            models.Index(fields=["owner", "-id"], name="file_owner_recent"),
            models.Index(fields=["expires_at"], condition=Q(deleted_at__isnull=True), name="file_live_expiry"),
        ]

    def __str__(self) -> str:
        return self.public_id

    @property
    def full_path(self):
        return settings.DATA_DIR / self.path

    @classmethod
    def of_job(cls, job: Job, kind: str) -> "File | None":
        """The job's output (RESULTS) or error (ERRORS) file, made on first request; None when it would be empty.

        Cheap, for batch objects and their lists: the size is measured (by exporting) only when the File
        object itself is asked for, see size(). A job that ran again since (retried items) keeps the
        file's id and is measured again.
        """
        if kind == cls.RESULTS:
            has_lines = job.n_succeeded > 0
        else:
            has_lines = job.n_failed + job.n_expired + job.n_cancelled > 0
        if not has_lines:
            return None
        file = next((f for f in job.api_files.all() if f.kind == kind), None)  # prefetched for lists
        if file is not None and (job.finished_at is None or file.created_at >= job.finished_at):
            return file
        stem = job.batch.public_id if hasattr(job, "batch") else f"job-{job.pk}"
        suffix = "output" if kind == cls.RESULTS else "error"
        file, created = cls.objects.get_or_create(
            job=job,
            kind=kind,
            defaults={
                "owner_id": job.owner_id,
                "filename": f"{stem}_{suffix}.jsonl",
                "purpose": cls.BATCH_OUTPUT,
                "bytes": None,
            },
        )
        if not created:
            File.objects.filter(pk=file.pk).update(bytes=None, created_at=timezone.now(), deleted_at=None)
            file.refresh_from_db()
        return file

    def size(self) -> int:
        """Bytes of the content; an output or error file is exported once to measure it, then remembered."""
        if self.bytes is None:
            self.bytes = sum(len(chunk.encode()) for chunk in self.chunks())
            File.objects.filter(pk=self.pk, bytes=None).update(bytes=self.bytes)
        return self.bytes

    @classmethod
    def remove_expired(cls, now=None) -> int:
        """Uploads past their expires_at leave, content and all, unless an unfinished job came from them."""
        now = now or timezone.now()
        expired = cls.objects.filter(job=None, deleted_at=None, expires_at__lte=now)
        busy = set(
            Job.objects.exclude(status__in=Job.FINISHED)
            .filter(source_file__in=expired.values("path"))
            .values_list("source_file", flat=True)
        )
        removed = 0
        for file in expired.exclude(path__in=busy):
            File.objects.filter(pk=file.pk).update(deleted_at=now)
            if file.path.startswith("uploads/"):
                shutil.rmtree(file.full_path.parent, ignore_errors=True)
            removed += 1
        return removed

    def chunks(self):
        """The content: bytes read from disk, or text exported from the job."""
        from jobs import export

        if self.job_id is not None:
            writer = export.results_jsonl if self.kind == self.RESULTS else export.errors_jsonl
            return writer(self.job)
        return _read_chunks(self.full_path)

    def delete_content(self) -> None:
        """Mark deleted, and remove an upload from disk unless a job still names it as its source."""
        File.objects.filter(pk=self.pk).update(deleted_at=timezone.now())
        if self.path.startswith("uploads/") and not Job.objects.filter(source_file=self.path).exists():
            shutil.rmtree(self.full_path.parent, ignore_errors=True)


def _read_chunks(path, size: int = 64 * 1024):
    with open(path, "rb") as f:
        while chunk := f.read(size):
            yield chunk


class Batch(models.Model):
    """A Job created through the OpenAI-compatible API: the fields OpenAI's Batch object has and a Job lacks."""

    public_id = models.CharField(max_length=40, unique=True, default=_batch_id, editable=False)
    job = models.OneToOneField(Job, on_delete=models.CASCADE, related_name="batch")
    # RESTRICT: files are only ever marked deleted, and a user's deletion takes both along.
    input_file = models.ForeignKey(File, on_delete=models.RESTRICT, related_name="batches")
    completion_window = models.CharField(max_length=10, default="24h")
    cancelling_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-id"]

    def __str__(self) -> str:
        return self.public_id
