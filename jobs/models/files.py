"""File and Batch: the /v1 API's objects. A Batch is a Job seen through OpenAI's Batch API."""

import secrets
from datetime import datetime
from pathlib import Path

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.utils import timezone

from jobs import storage
from jobs.models.job import Job


def _file_id() -> str:
    return "file-" + secrets.token_hex(12)


def _batch_id() -> str:
    return "batch_" + secrets.token_hex(12)


class File(models.Model):
    """A file of the /v1 API: an uploaded batch input on disk, or a job's output or error file.

    Output files are not written anywhere: their content is exported from the job's items when
    downloaded (jobs/export.py, file_chunks), so they cost nothing until someone asks for them.
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
    # None: an output or error file not measured yet (export.file_size); lists of batches never export jobs.
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
    def full_path(self) -> Path:
        return settings.DATA_DIR / self.path

    @classmethod
    def of_job(cls, job: Job, kind: str) -> "File | None":
        """The job's output (RESULTS) or error (ERRORS) file, made on first request; None when it would be empty.

        Cheap, for batch objects and their lists: the size is measured (by exporting) only when the File
        object itself is asked for, see export.file_size. A job that ran again since (retried items) keeps
        the file's id and is measured again.
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

    @classmethod
    def remove_expired(cls, now: datetime | None = None) -> int:
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
                storage.remove(file.path)
            removed += 1
        return removed

    def delete_content(self) -> None:
        """Mark deleted, and remove an upload from disk unless a job still names it as its source."""
        File.objects.filter(pk=self.pk).update(deleted_at=timezone.now())
        if self.path.startswith("uploads/") and not Job.objects.filter(source_file=self.path).exists():
            storage.remove(self.path)


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
