"""RemoteBatch: one chunk of a remote or hybrid job, sent to the endpoint's own Files + Batches API."""

import uuid

from django.db import models
from django.utils import timezone


class RemoteBatch(models.Model):
    """A chunk of a job's items, the input file uploaded for it and the batch made from that file.

    Before a batch exists the chunk goes through our own steps, each recorded before the next call, so that
    a crash at any moment never sends a chunk twice (jobs/engine/remote.py):
    planned (items chosen) -> uploading (about to upload; on recovery, look for the file by name first) ->
    uploaded (input file id saved) -> creating (about to call batches.create; on
    recovery, look for the batch by `key` in the endpoint's list before creating another) -> the endpoint's
    own statuses."""

    class Status(models.TextChoices):
        PLANNED = "planned"
        UPLOADING = "uploading"
        UPLOADED = "uploaded"
        CREATING = "creating"
        VALIDATING = "validating"
        IN_PROGRESS = "in_progress"
        FINALIZING = "finalizing"
        CANCELLING = "cancelling"
        COMPLETED = "completed"
        EXPIRED = "expired"
        CANCELLED = "cancelled"
        FAILED = "failed"

    NOT_SENT = (Status.PLANNED, Status.UPLOADING, Status.UPLOADED, Status.CREATING)
    REMOTE_ACTIVE = (Status.VALIDATING, Status.IN_PROGRESS, Status.FINALIZING, Status.CANCELLING)
    FINAL = (Status.COMPLETED, Status.EXPIRED, Status.CANCELLED, Status.FAILED)

    job = models.ForeignKey("jobs.Job", on_delete=models.CASCADE, related_name="remote_batches")
    number = models.PositiveIntegerField(help_text="1, 2, ... within the job")
    key = models.UUIDField(default=uuid.uuid4, unique=True, editable=False, help_text="In the batch's metadata")
    model = models.CharField(max_length=200, blank=True)
    n_items = models.PositiveIntegerField(default=0)
    est_tokens = models.BigIntegerField(default=0, help_text="Input plus maximum output tokens")
    bytes = models.BigIntegerField(default=0)

    status = models.CharField(max_length=12, choices=Status.choices, default=Status.PLANNED)
    status_since = models.DateTimeField(default=timezone.now)
    input_file_id = models.CharField(max_length=200, blank=True)
    batch_id = models.CharField(max_length=200, blank=True)
    output_file_id = models.CharField(max_length=200, blank=True)
    error_file_id = models.CharField(max_length=200, blank=True)
    n_completed = models.PositiveIntegerField(default=0, help_text="request_counts.completed")
    n_failed = models.PositiveIntegerField(default=0, help_text="request_counts.failed")
    errors = models.JSONField(default=list, blank=True, help_text="The batch's errors.data (validation failures)")
    last_error = models.TextField(blank=True, help_text="Why the last call about this chunk failed")
    failures = models.PositiveSmallIntegerField(default=0, help_text="Failed calls in a row (backoff)")
    next_poll_at = models.DateTimeField(default=timezone.now)
    cancel_requested_at = models.DateTimeField(null=True, blank=True)
    # The endpoint the chunk was sent to: it is followed there even if the job's endpoint changes.
    endpoint = models.ForeignKey("jobs.Endpoint", null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    # A poller working on the chunk holds it until then (a compare-and-set), so two pollers never send it twice.
    claimed_until = models.DateTimeField(null=True, blank=True, editable=False)
    collected_at = models.DateTimeField(null=True, blank=True, help_text="Results joined to the items")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["job", "number"]
        constraints = [models.UniqueConstraint(fields=["job", "number"], name="remotebatch_job_number")]
        indexes = [
            models.Index(fields=["next_poll_at"], condition=models.Q(collected_at__isnull=True), name="remote_to_poll")
        ]

    def __str__(self) -> str:
        return f"job {self.job_id} chunk {self.number} ({self.status})"

    @property
    def is_final(self) -> bool:
        return self.status in self.FINAL

    @property
    def n_answered(self) -> int:
        return self.n_completed + self.n_failed

    def filename(self) -> str:
        """The input file's name at the endpoint: finds an upload whose id a crash kept us from saving."""
        return f"batchsite-{self.key}.jsonl"
