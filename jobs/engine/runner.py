"""Live execution of a job, one slice at a time: run() is the work of the django-q2 task run_slice (tasks.py).

A job runs as a few chains of slices (Job.start_slices). Each slice runs in one task: it claims work until
its time budget is spent, then enqueues its successor and finishes the requests it has in flight
(slice.py). A slice that ends early (nothing left to claim) enqueues a successor anyway while items are
pending, so a job always has a slice or is finalized (continue_or_finish()).
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import uuid
from collections.abc import Collection
from typing import Any

from django.conf import settings
from django.db.models import F

from jobs import clock, egress
from jobs.engine import shutdown
from jobs.engine.database import DatabaseThread, pause_itself, with_db_retries
from jobs.engine.leases import TRANSIENT_DB_ERRORS
from jobs.engine.ratelimit import Limiter
from jobs.engine.slice import Slice
from jobs.models import Endpoint, InvalidTransition, Job, ledger

log = logging.getLogger(__name__)


def run(
    job_id: int, budget: float | None = None, slices: int | None = None, generation: int | None = None
) -> dict[str, Any]:
    """Run one slice of a live job; return a summary (for logs and tests).

    `generation` is the generation of slices the task belongs to (Job.start_slices); a task of an older
    one does nothing. None (a task enqueued before generations existed) means the current one."""
    job = Job.objects.select_related("endpoint").filter(pk=job_id).first()
    if job is None:
        return {"job": job_id, "skipped": "deleted"}
    generation = job.slice_gen if generation is None else generation
    if generation != job.slice_gen:
        return {"job": job_id, "skipped": "superseded"}
    if job.runs_remotely:
        return {"job": job_id, "skipped": "runs at the Batch API"}
    if shutdown.requested():  # taken from the queue as the node stops: another node runs it
        Job.enqueue_next_slice(job_id, slices or settings.BATCHSITE_SLICES_PER_JOB, generation)
        return {"job": job_id, "skipped": "node shutting down"}
    if job.status == Job.Status.QUEUED:
        try:
            job.transition(Job.Status.RUNNING, started_at=job.started_at or clock.now())
        except InvalidTransition:
            job.refresh_from_db()
    if job.status != Job.Status.RUNNING:
        return {"job": job_id, "skipped": job.status}
    endpoint = job.endpoint or Endpoint.default()
    if endpoint is None:
        pause_itself(
            job_id, "No endpoint is configured. Add one on the Endpoints page (or set OPENAI_API_KEY), then resume."
        )
        return {"job": job_id, "skipped": "no endpoint"}
    try:
        endpoint.api_key  # noqa: B018 - decrypting now turns a changed SECRET_KEY into a clear pause
    except ValueError as e:
        pause_itself(job_id, str(e))
        return {"job": job_id, "skipped": "bad key"}
    try:  # checked again at each slice: the name may resolve elsewhere now than when the endpoint was saved
        egress.check_base_url(endpoint.base_url)
    except egress.UnsafeURL as e:
        pause_itself(job_id, f"The endpoint's base URL is refused: {e} Fix it on the Endpoints page, then resume.")
        return {"job": job_id, "skipped": "unsafe endpoint"}

    Job.objects.filter(pk=job_id).update(heartbeat_at=clock.now())
    budget = settings.BATCHSITE_SLICE_SECONDS if budget is None else budget
    slices = slices or settings.BATCHSITE_SLICES_PER_JOB
    db = DatabaseThread(f"slice-db-{job_id}")
    work = Slice(job, endpoint, uuid.uuid4(), budget, db, slices, generation)
    try:
        asyncio.run(work.run())
    except Exception as crash:
        if not work.sender.sent and not isinstance(crash, TRANSIENT_DB_ERRORS):
            # It failed before sending anything: it would fail the same way again at once, slice after
            # slice. Say so on the job instead; resuming tries again.
            pause_itself(
                job_id, f"Batchsite could not run this job: {type(crash).__name__}: {crash}. Resume to try again."
            )
        raise
    finally:
        db.close()  # and the slice thread's own connection
        # Even after a crash: the chain must go on while items are pending.
        finished = with_db_retries(continue_or_finish, job_id, generation, work.slices, work.handed_over)
        try:
            _remember_learned_limits(endpoint, work.pacing.limiter, work.sender.latencies)
            if work.sender.rate_limited:
                Endpoint.objects.filter(pk=endpoint.pk).update(
                    rate_limited_total=F("rate_limited_total") + work.sender.rate_limited
                )
        except Exception:  # a nicety: the next slice learns them again
            log.exception("Job %s: could not store the learned limits", job_id)
    return {
        "job": job_id,
        "sent": work.sender.sent,
        "handed_over": work.handed_over,
        "finished": finished,
        "stopped": work.sender.stop_reason,
    }


def continue_or_finish(job_id: int, generation: int, slices: int, handed_over: bool) -> bool:
    """After a slice: finalize the job if nothing is left, else make sure a slice follows while items
    are pending. True if the job was finalized.

    A slice that did not hand over stopped because nothing was pending or held, or because it was told
    to stop. Items may have become pending in between (a retry of failed items), so it continues its
    chain while any are. Paused, cancelled or superseded jobs get no successor."""
    if ledger.finalize_if_done(job_id):
        return True
    if (
        not handed_over
        and Job.objects.filter(pk=job_id, status=Job.Status.RUNNING, slice_gen=generation, n_pending__gt=0).exists()
    ):
        Job.enqueue_next_slice(job_id, slices, generation)
    return False


def _remember_learned_limits(endpoint: Endpoint, limiter: Limiter, latencies: Collection[int]) -> None:
    learned: dict[str, int | float] = {}
    if latencies:
        learned["learned_latency_ms"] = max(1, int(statistics.median(latencies)))
    if limiter.learned.rpm and limiter.learned.rpm != endpoint.learned_rpm:
        learned["learned_rpm"] = limiter.learned.rpm
    if limiter.learned.tpm and limiter.learned.tpm != endpoint.learned_tpm:
        learned["learned_tpm"] = limiter.learned.tpm
    ratio = limiter.learned.token_ratio
    if ratio and abs(ratio - (endpoint.learned_token_ratio or 1.0)) > 0.01:
        learned["learned_token_ratio"] = round(ratio, 4)
    if learned:
        Endpoint.objects.filter(pk=endpoint.pk).update(**learned)
