"""django-q2 entry points. Thin: the work is in runner.py (and the slice it runs) and the ledger (jobs/models/ledger.py).

A job runs as a few *chains* of slice tasks, each slice enqueueing its successor; their generations
and enqueue times are kept on the Job (Job.start_slices, jobs/models/job.py). The sweeper here uses
them to tell a job whose slices wait in the queue behind other jobs (leave it alone) from one whose
slices are gone (restart it).

Recovery: every worker process of a cluster sweeps at once when it starts and then every quarter of a
lease (watch()), so work a killed worker or cluster held runs again about a lease after its last
heartbeat, without waiting for the once-a-minute schedule. The schedules themselves are registered
by `manage.py migrate` (apps.py connects ensure_schedules to post_migrate).

An API batch's file is validated here too (validate_batch), off the request path; the sweeper enqueues
a validation again when its worker went quiet.
"""

import logging
import random
import threading
import time
from datetime import datetime, timedelta
from typing import Any

from django.apps import apps as global_apps
from django.apps.registry import Apps
from django.db import DEFAULT_DB_ALIAS, close_old_connections, router
from django.db.models import Max, Q

from jobs import clock, ingest, queue
from jobs.engine import answercache, leases, notify, remote, runner
from jobs.models import File, InvalidTransition, Job, JobEvent, control, ledger

log = logging.getLogger(__name__)

# The queue is first in, first out, but workers take turns and clocks differ a little: a slice counts as
# lost only when one enqueued this much later than it has started.
QUEUE_ORDER_SLACK = timedelta(seconds=30)


def run_slice(
    job_id: int, slices: int | None = None, generation: int | None = None, enqueued_at: datetime | None = None
) -> dict[str, Any]:
    if enqueued_at is not None:  # this slice has left the queue, and so have those enqueued before it
        later = Q(slice_picked_at__isnull=True) | Q(slice_picked_at__lt=enqueued_at)
        Job.objects.filter(later, pk=job_id).update(slice_picked_at=enqueued_at)
    result = runner.run(job_id, slices=slices, generation=generation)
    log.info("slice %s", result)
    return result


def validate_batch(job_id: int) -> dict[str, Any]:
    """A validating job's file checked off the request path (Job.validate_later): jobs/ingest/validating.py."""
    result = ingest.validate_job(job_id)
    log.info("validated %s", result)
    return result


def retry_failed(job_id: int, mode: str | None = None) -> dict[str, Any]:
    """A big job's failed items queued again (control.retry_later)."""
    job = Job.objects.filter(pk=job_id).first()
    if job is None:
        return {"job": job_id, "skipped": "deleted"}
    try:
        n = control.retry_failed(job, mode)
    except InvalidTransition as e:
        log.warning("job %s: retry of failed items not done: %s", job_id, e)
        return {"job": job_id, "skipped": str(e)}
    return {"job": job_id, "retried": n}


def poll_remote() -> dict[str, Any]:
    """Remote and hybrid jobs (the Batch API): the schedule starts this once a minute, Job.start and Job.cancel
    at once; it polls for up to BATCHSITE_REMOTE_POLL_WINDOW seconds, one poller in the cluster at a time."""
    result = remote.poll()
    log.info("remote poll %s", result)
    return result


def sweep() -> dict[str, Any]:
    """Expired leases back to pending, jobs left without a slice restarted, finished jobs finalized, lost
    validations enqueued again.

    Safe to run in several processes at once: each change is a compare-and-set."""
    now = clock.now()
    expired = ledger.expire()
    restarted = [job_id for job_id, gen in _orphans(now) if Job.start_slices(job_id, replacing=gen)]
    finished = [
        job_id
        for job_id in Job.objects.filter(
            status__in=[Job.Status.RUNNING, Job.Status.CANCELLING], n_pending=0, n_running=0
        ).values_list("pk", flat=True)
        if ledger.finalize_if_done(job_id)
    ]
    revalidated = _revalidate(now)
    if expired or restarted or finished or revalidated:
        log.info(
            "sweep: %s leases expired, restarted %s, finalized %s, validation enqueued again for %s",
            expired,
            restarted,
            finished,
            revalidated,
        )
    return {"expired": expired, "restarted": restarted, "finalized": finished, "revalidated": revalidated}


def _revalidate(now: datetime) -> list[int]:
    """Validating jobs whose validation is lost (its worker died, or a Redis broker dropped the task): no life
    shown and not enqueued for ingest.VALIDATION_QUIET. Enqueued again, once whichever sweeps run side by side."""
    quiet = now - ingest.VALIDATION_QUIET
    lost = Job.objects.filter(status=Job.Status.VALIDATING, updated_at__lt=quiet).filter(
        Q(heartbeat_at__isnull=True) | Q(heartbeat_at__lt=quiet)
    )
    enqueued = []
    for job_id in lost.values_list("pk", flat=True):
        if lost.filter(pk=job_id).update(updated_at=now):  # updated_at: when its validation was last enqueued
            Job.validate_later(job_id)
            enqueued.append(job_id)
    return enqueued


def _orphans(now: datetime) -> list[tuple[int, int]]:
    """Queued or running jobs with pending items and no slice: none has shown life for a lease period,
    and none waits in the queue.

    A slice enqueued but not started is waiting for a worker (jobs queue behind each other), unless it
    is known to be lost: a slice enqueued well after it has started already (the queue is first in,
    first out), or the cluster runs no slice at all yet has not started it for a lease period."""
    quiet = now - timedelta(seconds=leases.lease_seconds())
    live = Job.objects.filter(
        status__in=[Job.Status.QUEUED, Job.Status.RUNNING, Job.Status.PAUSED, Job.Status.CANCELLING]
    )
    newest_started = live.aggregate(at=Max("slice_picked_at"))["at"]
    cluster_idle = not live.filter(heartbeat_at__gte=quiet).exists()
    stalled = (
        live.filter(status__in=[Job.Status.QUEUED, Job.Status.RUNNING], n_pending__gt=0)
        .filter(Q(heartbeat_at__lt=quiet) | Q(heartbeat_at__isnull=True, created_at__lt=quiet))
        .exclude(mode__in=[Job.Mode.REMOTE, Job.Mode.HYBRID], switched_at__isnull=True)  # the remote poller's
    )
    orphans = []
    fields = ("pk", "slice_gen", "slice_enqueued_at", "slice_picked_at")
    for job_id, gen, enqueued, started in stalled.values_list(*fields):
        if enqueued is not None and (started is None or enqueued > started):
            overtaken = newest_started is not None and newest_started > enqueued + QUEUE_ORDER_SLACK
            forgotten = cluster_idle and enqueued < quiet
            if not (overtaken or forgotten):
                continue  # its slice waits in the queue: another one would only add a chain
        orphans.append((job_id, gen))
    return orphans


def clean_up() -> dict[str, Any]:
    """Every hour: uploads nobody launched, or whose job was deleted, leave the disk after a day."""
    removed = ingest.remove_stale_uploads() + File.remove_expired()  # and /v1 files past their expires_at
    answers = answercache.trim()  # past their age, or beyond the size bound
    events = JobEvent.prune()  # and their webhook deliveries
    if removed or answers or events:
        log.info("clean-up: removed %s stale uploads, %s cached answers, %s events", removed, answers, events)
    return {"uploads_removed": removed, "cached_answers_removed": answers, "events_removed": events}


def ensure_schedules(apps: Apps = global_apps, using: str = DEFAULT_DB_ALIAS) -> None:
    """Register the sweeper and the clean-up once (idempotent). After every `manage.py migrate` (post_migrate,
    with the migrated state's `apps`), so a deployment needs no extra command; tests and benches call it too.
    The sweeper's schedule is a backstop: workers sweep every few seconds themselves (watch())."""
    try:
        model = apps.get_model("django_q", "Schedule")
    except LookupError:
        return  # django_q is not migrated on this database yet (`migrate jobs` alone): its next migrate does it
    if not router.allow_migrate_model(using, model):
        return
    for name, (func, kind, minutes) in queue.SCHEDULES.items():
        fields = {"func": func, "schedule_type": kind, "minutes": minutes}
        model.objects.using(using).update_or_create(name=name, defaults={**fields, "repeats": -1})


def send_notifications() -> dict[str, Any]:
    """Emails and webhook deliveries that are due, sent on this worker's outbox thread (jobs/engine/notify.py):
    the task returns at once, so a slow receiver never holds a worker that jobs need."""
    return {"started": notify.send_in_background()}


def sweep_seconds() -> float:
    """How often each worker process sweeps: a quarter of a lease, as often as slices renew theirs."""
    return max(leases.lease_seconds() / 4, 1.0)


def watch() -> None:
    """django-q's post_spawn, in each new worker process: sweep now, then every sweep_seconds(), on a thread.

    The schedule is too slow for recovery in seconds: django-q's scheduler looks at schedules every 30 s
    (first 30 s after a cluster starts) and runs one at most once a minute. Sweeps are safe side by side,
    so every worker of every cluster sweeps and none has to be elected."""
    threading.Thread(target=_sweep_forever, name="batchsite-sweep", daemon=True).start()


def _sweep_forever() -> None:
    while True:
        close_old_connections()  # a connection broken by an error, or past its age, is replaced
        try:
            sweep()
        except Exception:  # the database is locked or away: the next sweep tries again
            log.exception("sweep failed")
        time.sleep(sweep_seconds() * random.uniform(0.8, 1.2))  # workers spread out, not in step
