"""The work queue: every task Batchsite enqueues or schedules, as typed functions, in one place.

django-q2 names a task by its dotted path, which no tool checks: here, and only here, are those names
(`scripts/check_names.py` fails `make check` if one appears elsewhere; `tests/test_queue.py` imports each).
Callers say what they want done (`queue.enqueue_slice(...)`); tests that keep work from a cluster patch
`jobs.queue.async_task`.
"""

from __future__ import annotations

from datetime import datetime

from django.db import transaction
from django_q.tasks import async_task

SLICE = "jobs.engine.tasks.run_slice"
POLL_REMOTE = "jobs.engine.tasks.poll_remote"
VALIDATE_BATCH = "jobs.engine.tasks.validate_batch"
RETRY_FAILED = "jobs.engine.tasks.retry_failed"
SEND_NOTIFICATIONS = "jobs.engine.tasks.send_notifications"
CHECK_UPLOAD = "jobs.ingest.validating.check_upload"
SWEEP = "jobs.engine.tasks.sweep"
CLEAN_UP = "jobs.engine.tasks.clean_up"

# name -> (task, schedule type, minutes): registered by tasks.ensure_schedules after every migrate.
SCHEDULES: dict[str, tuple[str, str, int | None]] = {
    "batchsite-sweeper": (SWEEP, "I", 1),  # a backstop: workers sweep every few seconds themselves
    "batchsite-clean-up": (CLEAN_UP, "H", None),
    "batchsite-remote-poller": (POLL_REMOTE, "I", 1),
    # Retries of emails and webhooks that failed (the first try is enqueued with the event).
    "batchsite-notifications": (SEND_NOTIFICATIONS, "I", 1),
}
TASKS = (SLICE, POLL_REMOTE, VALIDATE_BATCH, RETRY_FAILED, SEND_NOTIFICATIONS, CHECK_UPLOAD, SWEEP, CLEAN_UP)


def enqueue_slice(job_id: int, slices: int, generation: int, enqueued_at: datetime) -> None:
    """A slice of a live job (Job.start_slices): now, not on commit (the caller has committed its generation)."""
    async_task(SLICE, job_id, slices, generation, enqueued_at, task_name=f"job-{job_id}-slice", group=f"job-{job_id}")


def poll_remote_on_commit(job_id: int) -> None:
    """A round of the remote poller once the transaction commits: it sends a remote job's batches, or cancels them."""
    transaction.on_commit(lambda: async_task(POLL_REMOTE, task_name=f"job-{job_id}-remote"))


def poll_remote_successor() -> None:
    """The next poller, now: work is still due as this one's window ends."""
    async_task(POLL_REMOTE, task_name="remote-poller-successor")


def validate_batch_on_commit(job_id: int) -> None:
    """The check of a validating job's file, which creates its items and starts it (or fails it)."""
    transaction.on_commit(lambda: async_task(VALIDATE_BATCH, job_id, task_name=f"job-{job_id}-validate"))


def retry_failed_on_commit(job_id: int, mode: str | None) -> None:
    """A big job's failed items queued again by a worker (control.retry_later)."""
    transaction.on_commit(lambda: async_task(RETRY_FAILED, job_id, mode, task_name=f"job-{job_id}-retry"))


def send_notifications_on_commit(job_id: int) -> None:
    """The emails and webhook deliveries of a job's event, once it is committed."""
    transaction.on_commit(lambda: async_task(SEND_NOTIFICATIONS, task_name=f"job-{job_id}-notify"))


def check_upload(name: str, format: str, template: dict | None, source_name: str, key: str) -> None:
    """A worker's check of an upload too big to read in the review page's request."""
    async_task(CHECK_UPLOAD, name, format, template, source_name, task_name=f"check-{key[-40:]}")
