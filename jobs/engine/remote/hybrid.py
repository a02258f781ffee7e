"""The hybrid switch: a hybrid job runs at the Batch API until the last safe moment before its deadline
(remoteplan.switch_time, recomputed each round as the batches progress), then its remote batches are cancelled
and the rest runs live. Items of a cancelled batch go back to pending for live slices only once the batch is
final and its partial output joined (collect.py), so no request is answered (or paid) twice."""

from __future__ import annotations

import logging
from typing import Any

from django.conf import settings
from django.db.models import Sum

from jobs import remoteplan
from jobs.engine.remote.rounds import Round
from jobs.models import Job, RemoteBatch

log = logging.getLogger(__name__)


def plan_switch(rnd: Round) -> None:
    """The job's switch time, recorded (and why); past it, the switch: its batches are cancelled at their next
    look (now), and live slices start on what is pending."""
    job, endpoint = rnd.job, rnd.endpoint
    if job.deadline is None:
        return
    done = job.n_succeeded + job.n_failed + job.n_expired + job.n_cancelled
    in_remote = job.remote_batches.filter(collected_at__isnull=True).exclude(status__in=RemoteBatch.FINAL)
    answered_remote = sum(c.n_answered for c in in_remote)
    remaining = max(job.total - done - answered_remote, 0)
    # Tokens per request as a tokens-per-minute limit counts them: input plus the most it may generate, as the
    # chunks recorded them (remoteplan.request_tokens).
    sent = job.remote_batches.aggregate(tokens=Sum("est_tokens"), items=Sum("n_items"))
    per_request = (sent["tokens"] or 0) / sent["items"] if sent["items"] else 0.0
    rate, basis = remoteplan.live_rate(
        endpoint.concurrency, endpoint.effective_rpm, endpoint.effective_tpm, per_request, endpoint.latency_seconds
    )
    live = remaining / rate if rate else 0.0
    margin = remoteplan.margin_for(live, settings.BATCHSITE_HYBRID_MARGIN_SECONDS)
    plan = remoteplan.switch_time(job.deadline, remaining, rate, endpoint.effective_cancel_seconds, margin, basis)
    fields: dict[str, Any] = {}
    if job.switch_at is None or abs((job.switch_at - plan.at).total_seconds()) >= 1 or job.switch_note != plan.reason:
        fields.update(switch_at=plan.at, switch_note=plan.reason)
    if remaining and rnd.now >= plan.at:
        fields.update(switched_at=rnd.now, switch_note=plan.reason)
        log.info("job %s: switching to live (%s)", job.pk, plan.reason)
    if fields:
        Job.objects.filter(pk=job.pk).update(**fields)
        for name, value in fields.items():
            setattr(job, name, value)
    if job.switched_at is not None:
        job.remote_batches.filter(collected_at__isnull=True).update(next_poll_at=rnd.now)  # cancel them now
        Job.start_slices(job.pk)  # the pending items now; the rest as their batches settle (poller.after_round)


def switch_now(rnd: Round, why: str) -> None:
    """Go live at once (the endpoint has no Batch API): the deadline still holds."""
    job = rnd.job
    switched = Job.objects.filter(pk=job.pk, switched_at__isnull=True).update(
        switched_at=rnd.now, switch_at=rnd.now, switch_note=f"{why} Running live instead."
    )
    if switched:
        log.info("job %s: switching to live, %s", job.pk, why)
        job.refresh_from_db(fields=["switched_at", "switch_at", "switch_note"])
        job.remote_batches.filter(collected_at__isnull=True).update(next_poll_at=rnd.now)
