"""Item: one request of a job and its one result; JobTick, the job's timeline. Their states change only
through the ledger (jobs/models/ledger.py)."""

from collections.abc import Collection, Iterator, Mapping, Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any

from django.db import connection, models
from django.db.models import F, Q

SQL_IDS = 900  # ids in one query's IN (...): SQLite allows 999 parameters a query in older builds


def id_batches(ids: Sequence[int]) -> Iterator[Sequence[int]]:
    """`ids` a query's worth at a time (SQL_IDS)."""
    for start in range(0, len(ids), SQL_IDS):
        yield ids[start : start + SQL_IDS]


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

    job = models.ForeignKey("jobs.Job", on_delete=models.CASCADE, related_name="items")
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
    def column_defaults(cls, given: Collection[str]) -> dict[str, Any]:
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

    job = models.ForeignKey("jobs.Job", on_delete=models.CASCADE, related_name="ticks")
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
    def add(cls, job_id: int, when: datetime, counts: Mapping[str, int]) -> None:
        """Add counts to the bucket holding `when` (call inside the transaction that wrote the items)."""
        at = when.replace(second=when.second - when.second % cls.SECONDS, microsecond=0)
        keys = ("succeeded", "failed", "retried", "prompt_tokens", "completion_tokens")
        values = {k: counts[k] for k in keys if counts.get(k)}
        if not values:
            return
        n = cls.objects.filter(job_id=job_id, at=at).update(**{k: F(k) + v for k, v in values.items()})
        if not n:
            cls.objects.create(job_id=job_id, at=at, **values)
