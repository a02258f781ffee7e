"""django-q2 entry points. Thin: the work is in runner.py and leases.py."""

import logging
from datetime import timedelta

from django.conf import settings
from django.db.models import Q
from django.utils import timezone
from django_q.models import Schedule
from django_q.tasks import async_task

from jobs import leases, runner
from jobs.models import Job

log = logging.getLogger(__name__)


def enqueue_slice(job_id: int, slices: int | None = None) -> None:
    """One more slice of a job that runs as `slices` side by side (they split its concurrency)."""
    slices = slices or settings.BATCHSITE_SLICES_PER_JOB
    async_task("jobs.tasks.run_slice", job_id, slices, task_name=f"job-{job_id}-slice", group=f"job-{job_id}")


def start_job(job_id: int) -> None:
    slices = max(1, settings.BATCHSITE_SLICES_PER_JOB)
    for _ in range(slices):
        enqueue_slice(job_id, slices)


def run_slice(job_id: int, slices: int | None = None) -> dict:
    result = runner.run_slice(job_id, slices=slices)
    log.info("slice %s", result)
    return result


def sweep() -> dict:
    """Every minute: expired leases back to pending, stalled jobs restarted, finished jobs finalized."""
    expired = leases.expire()
    now = timezone.now()
    quiet_since = now - timedelta(seconds=leases.lease_seconds())
    stalled = Job.objects.filter(status__in=[Job.QUEUED, Job.RUNNING], n_pending__gt=0).filter(
        Q(heartbeat_at__lt=quiet_since) | Q(heartbeat_at__isnull=True, created_at__lt=quiet_since)
    )
    restarted = []
    for job_id in stalled.values_list("pk", flat=True):
        # heartbeat_at doubles as "a slice was asked for": no second restart until it had time to run.
        if Job.objects.filter(pk=job_id).filter(
            Q(heartbeat_at__lt=quiet_since) | Q(heartbeat_at__isnull=True)
        ).update(heartbeat_at=now):
            enqueue_slice(job_id)
            restarted.append(job_id)
    finished = [
        job_id
        for job_id in Job.objects.filter(status__in=[Job.RUNNING, Job.CANCELLING], n_pending=0, n_running=0).values_list(
            "pk", flat=True
        )
        if runner.finalize_if_done(job_id)
    ]
    if expired or restarted or finished:
        log.info("sweep: %s leases expired, restarted %s, finalized %s", expired, restarted, finished)
    return {"expired": expired, "restarted": restarted, "finalized": finished}


def ensure_schedules() -> None:
    """Register the sweeper once (idempotent: called by `manage.py prepare` and at cluster start)."""
    Schedule.objects.update_or_create(
        name="batchsite-sweeper",
        defaults={"func": "jobs.tasks.sweep", "schedule_type": Schedule.MINUTES, "minutes": 1, "repeats": -1},
    )
