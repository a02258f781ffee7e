"""The poll loop. One poller (a django-q2 task: the schedule starts one a minute, a job's start and cancel one at
once; a cache lock keeps it to one in the cluster) goes round every job with remote work due, and for each:
plans its pending items into chunks, plans (or makes) its hybrid switch, takes a step on each chunk due, and
ends the job once nothing is left."""

from __future__ import annotations

import logging
import time
import uuid
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.core.cache import cache
from django.db import close_old_connections
from django.db.models import Q, QuerySet

from jobs import clock, queue
from jobs.engine import shutdown
from jobs.engine.database import pause_itself
from jobs.engine.remote import hybrid, plan, steps
from jobs.engine.remote.rounds import Round, unusable
from jobs.models import Endpoint, InvalidTransition, Job, RemoteBatch, ledger

log = logging.getLogger(__name__)

LOCK = "batchsite-remote-poller"


def poll(window: float | None = None) -> dict[str, Any]:
    """Rounds every second while some remote work is due within seconds, for up to `window` seconds.

    Batches that run for hours are looked at less often (steps.interval), so most minutes the poller takes a
    worker for a round or two, and the schedule's next start does the next. The cache lock keeps pollers from
    doubling each other's work; correctness does not rest on it (chunks are claimed one by one, claims.py)."""
    window = settings.BATCHSITE_REMOTE_POLL_WINDOW if window is None else window
    end = clock.monotonic() + window
    rounds = 0
    while True:
        token = uuid.uuid4().hex
        if not cache.add(LOCK, token, timeout=int(window) + 120):
            return {"skipped": "another poller is running", "rounds": rounds}
        try:
            while True:
                close_old_connections()
                rounds += 1
                poll_round()
                if clock.monotonic() >= end or shutdown.requested() or not due_soon():
                    break
                time.sleep(1.0)
        finally:
            if cache.get(LOCK) == token:
                cache.delete(LOCK)
        if not due_soon():
            return {"rounds": rounds}
        if clock.monotonic() >= end or shutdown.requested():
            # Work is still due: hand over to a successor now rather than leave it to the schedule's next start
            # (up to a minute away, past a hybrid switch). The worker is freed for other tasks meanwhile.
            queue.poll_remote_successor()
            return {"rounds": rounds, "handed_over": True}
        # A job started while this poller was finishing found the lock taken and left its work to us.
        time.sleep(1.0)


def _sending() -> Q:
    """Jobs whose pending items go to the Batch API: to plan into chunks, or queued to be started."""
    remote = Q(mode__in=[Job.Mode.REMOTE, Job.Mode.HYBRID], switched_at__isnull=True)
    return remote & (Q(status=Job.Status.QUEUED) | Q(status=Job.Status.RUNNING, n_pending__gt=0))


def _hybrid_near_switch(now: datetime) -> Q:
    running = Q(mode=Job.Mode.HYBRID, status=Job.Status.RUNNING, switched_at__isnull=True)
    return running & (Q(switch_at__isnull=True) | Q(switch_at__lte=now + timedelta(seconds=70)))


def _due_chunks(until: datetime) -> QuerySet[RemoteBatch]:
    free = Q(claimed_until__isnull=True) | Q(claimed_until__lt=clock.now())
    return RemoteBatch.objects.filter(free, collected_at__isnull=True, next_poll_at__lte=until)


def jobs_due(now: datetime | None = None) -> list[int]:
    """Jobs with remote work due now: planning, a chunk to look at, or a hybrid switch near. Indexed queries, so
    jobs waiting on long batches cost nothing between their looks."""
    now = now or clock.now()
    due = set(Job.objects.filter(_sending()).values_list("pk", flat=True))
    due.update(_due_chunks(now).values_list("job_id", flat=True))
    due.update(Job.objects.filter(_hybrid_near_switch(now)).values_list("pk", flat=True))
    return sorted(due)


def due_soon() -> bool:
    """Whether a round within the next few seconds has something to do."""
    now = clock.now()
    soon = now + timedelta(seconds=2 * settings.BATCHSITE_REMOTE_POLL_SECONDS + 1)
    return (
        _due_chunks(soon).exists()
        or Job.objects.filter(_sending()).exists()
        or Job.objects.filter(_hybrid_near_switch(now)).exists()
    )


def poll_round() -> bool:
    """One pass over the jobs with remote work due. True if there were any."""
    due = jobs_due()
    for job_id in due:
        try:
            advance(job_id)
        except Exception:  # one job's trouble (a database hiccup, a bug) must not stop the others
            log.exception("remote job %s: round failed", job_id)
    return bool(due)


def advance(job_id: int) -> None:
    """Everything due for one job: plan, send, follow, collect, cancel, switch."""
    job = Job.objects.select_related("endpoint").filter(pk=job_id).first()
    if job is None:
        return
    endpoint = job.endpoint or Endpoint.default()
    problem = unusable(endpoint)
    if problem or endpoint is None:
        pause_itself(job_id, problem)
        # Looked at again in a minute (a fixed endpoint, a resume), not every second.
        later = clock.now() + timedelta(seconds=60)
        job.remote_batches.filter(collected_at__isnull=True).update(next_poll_at=later)
        return
    if job.status == Job.Status.QUEUED and job.runs_remotely:
        try:
            job.transition(Job.Status.RUNNING, started_at=job.started_at or clock.now())
        except InvalidTransition:
            job.refresh_from_db()
    if job.status == Job.Status.RUNNING and job.runs_remotely and job.n_pending:
        plan.plan_chunks(job, endpoint)
    rnd = Round(job, endpoint)
    if job.mode == Job.Mode.HYBRID and job.switched_at is None and job.status == Job.Status.RUNNING:
        hybrid.plan_switch(rnd)
    released = 0
    for chunk in _due_chunks(rnd.now).filter(job=job).order_by("number"):
        released += steps.step(rnd, chunk)
    _after_round(rnd, released)


def _after_round(rnd: Round, released: int) -> None:
    """The job's view of its remote batches, a live start for items handed back, and the end of the job."""
    job = rnd.job
    ledger.show_remote_counts(job.pk)
    if released and job.switched_at is not None:
        Job.start_slices(job.pk)  # live slices for them (else a new chunk takes them, next round)
    done = Q(n_pending=0, n_running=0, status__in=[Job.Status.RUNNING, Job.Status.CANCELLING])
    if Job.objects.filter(done, pk=job.pk).exists():
        ledger.finalize_if_done(job.pk)
