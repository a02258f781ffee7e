"""One chunk's step: what its status asks for next (send it, look at it, cancel it, collect it), and what a
failed call's verdict (batchapi.py) means for it. Each step is taken under a claim (claims.py), and every
state it reaches is saved before the call that follows: a crash at any point is recovered without sending a
chunk twice (an `uploading` chunk first looks for its file by name, a `creating` one for its batch by the key
in its metadata)."""

from __future__ import annotations

import json
import logging
import math
import tempfile
from typing import Any, NamedTuple

import openai
from django.conf import settings
from django.core.cache import cache
from openai.types import Batch

from jobs import clock
from jobs.engine.database import pause_itself
from jobs.engine.remote import batchapi, budgets, claims, collect, hybrid
from jobs.engine.remote.batchapi import CallFailed
from jobs.engine.remote.claims import LONG_CLAIM_SECONDS, LostClaim
from jobs.engine.remote.plan import PLAN_ROWS
from jobs.engine.remote.rounds import Round, unusable
from jobs.models import Endpoint, Item, Job, RemoteBatch

log = logging.getLogger(__name__)

RB = RemoteBatch.Status
GONE_AFTER = 5  # 404s in a row before a batch counts as gone
BACKOFF_CAP = budgets.BACKOFF_CAP


class Next(NamedTuple):
    delay: float  # seconds to the chunk's next look
    released: int = 0  # items handed back to pending (for live slices, past a hybrid switch)


def step(rnd: Round, chunk: RemoteBatch) -> int:
    """Claim the chunk (a second poller skips it), do what is due, then let go of it with the time of its next
    look. Returns the items handed back to pending."""
    if not claims.take(chunk):
        return 0
    after = Next(0.0)
    client: openai.OpenAI | None = None
    try:
        client = _client(rnd, chunk)
        after = _step(rnd, chunk, client) if client is not None else Next(0.0)
    except CallFailed as failed:
        after = on_failure(rnd, chunk, client, failed)
    except LostClaim:
        log.warning("job %s chunk %s: another poller took it over; leaving it", rnd.job.pk, chunk.number)
    except Exception as e:
        # Anything else (an answer of a shape nobody expected, a value the database refuses): backed off as a
        # failed call, so a bad answer is not fetched and parsed again every second, and the chunk says why.
        log.exception("job %s chunk %s: step failed", rnd.job.pk, chunk.number)
        text = f"Batchsite could not process the endpoint's answer: {type(e).__name__}: {e}"
        after = on_failure(rnd, chunk, client, CallFailed(batchapi.AGAIN, text))
    finally:
        claims.let_go(chunk, after.delay)
    return after.released


def _client(rnd: Round, chunk: RemoteBatch) -> openai.OpenAI | None:
    """The SDK client of the chunk's endpoint (the job's, unless the job moved since). None: that endpoint is
    gone or unusable, and the chunk is settled as gone (its requests may have run there)."""
    if chunk.endpoint_id is None or chunk.endpoint_id == rnd.endpoint.pk:
        return rnd.client()
    endpoint = Endpoint.objects.filter(pk=chunk.endpoint_id).first()
    problem = unusable(endpoint)
    if problem or endpoint is None:
        error = collect.error_entry(f"The batch's endpoint is gone: {problem}")
        collect.finish(rnd, chunk, None, RB.FAILED, errors=[error], gone=True)
        return None
    return rnd.client(endpoint)


def _step(rnd: Round, chunk: RemoteBatch, client: openai.OpenAI) -> Next:
    if chunk.status in RemoteBatch.NOT_SENT:
        if chunk.status == RB.CREATING:
            _find_batch(rnd, chunk, client)
        if chunk.status in RemoteBatch.NOT_SENT:
            if rnd.cancel_wanted:  # never sent: cancelled, or pending for live slices
                return Next(0.0, collect.finish(rnd, chunk, client, RB.CANCELLED))
            if (
                rnd.job.status != Job.Status.RUNNING
                or not budgets.tokens_allow(rnd.endpoint, chunk)
                or not budgets.money_allows(rnd, chunk)
            ):
                # Paused (perhaps just now, by a cost cap or a monthly limit), or the endpoint's enqueued-token
                # budget is spoken for: the chunk stays as it is, looked at again later.
                return Next(max(settings.BATCHSITE_REMOTE_POLL_SECONDS, min(30, interval(chunk))))
            _send(rnd, chunk, client)
            return Next(interval(chunk))
    if chunk.status in RemoteBatch.FINAL:
        return Next(0.0, collect.collect(rnd, chunk, client))
    batch = None
    if rnd.cancel_wanted and chunk.cancel_requested_at is None and chunk.status != RB.CANCELLING:
        chunk.cancel_requested_at = rnd.now
        batch = batchapi.cancel(client, chunk.batch_id)  # None: it ended meanwhile; what it says now is final
    _update(rnd, chunk, batch or batchapi.retrieve(client, chunk.batch_id))
    released = collect.collect(rnd, chunk, client) if chunk.status in RemoteBatch.FINAL else 0
    return Next(interval(chunk), released)


def on_failure(rnd: Round, chunk: RemoteBatch, client: openai.OpenAI | None, failed: CallFailed) -> Next:
    """Act on a failed call's verdict; returns when to look again."""
    text = failed.text
    if failed.verdict in (batchapi.KEY_REFUSED, batchapi.REDIRECTED, batchapi.ADDRESS_REFUSED):
        pause_itself(rnd.job.pk, failed.why)  # and the chunk backs off, below
    if failed.verdict == batchapi.NO_BATCH_API_HERE:
        return _no_batch_api(rnd, chunk, client, text)
    if failed.verdict == batchapi.FILE_LOST:
        # The endpoint lost the uploaded file (deleted, expired; OpenAI names input_file_id), or has a Files API
        # but no Batches API: upload again a few times, then give up on its Batch API.
        if tries(chunk, "lost") >= GONE_AFTER:
            return _no_batch_api(rnd, chunk, client, text)
        chunk.status, chunk.status_since, chunk.input_file_id = RB.PLANNED, clock.now(), ""
        chunk.last_error = text[:2000]
        chunk.save(update_fields=["status", "status_since", "input_file_id", "last_error"])
        return Next(10.0)
    if failed.verdict == batchapi.FILE_NOT_READY_YET:
        # Azure answers 400 to a batch made from a file it has not processed yet: that passes, within an hour.
        n = tries(chunk, "not-ready")
        if n < 2 * GONE_AFTER:
            set_status(chunk, RB.UPLOADED, last_error=text[:2000])  # no batch was made: no search
            return Next(min(5.0 * 2 ** (n - 1), BACKOFF_CAP))
    if failed.verdict in (batchapi.REFUSED, batchapi.FILE_NOT_READY_YET):
        # The endpoint refused the file or the batch itself (too big, or a path it does not batch): it will not
        # change its mind, so the chunk's items fail saying why.
        return Next(0.0, collect.finish(rnd, chunk, client, RB.FAILED, errors=[collect.error_entry(text)]))
    chunk.failures += 1
    if failed.verdict == batchapi.NOT_FOUND:
        if chunk.batch_id and chunk.status not in RemoteBatch.FINAL and chunk.failures >= GONE_AFTER:
            # The endpoint does not know the batch any more: deleted, or another project's key.
            error = collect.error_entry(f"The endpoint no longer has this batch: {text}")
            return Next(0.0, collect.finish(rnd, chunk, client, RB.FAILED, errors=[error], gone=True))
        if chunk.status in RemoteBatch.FINAL and chunk.failures >= 2 * GONE_AFTER:
            # A finished batch whose result files stay missing (for about an hour of tries): deleted there.
            error = collect.error_entry(f"The endpoint no longer has this batch's results: {text}")
            return Next(0.0, collect.finish(rnd, chunk, client, chunk.status, errors=[error], gone=True))
    delay = min(max(settings.BATCHSITE_REMOTE_POLL_SECONDS, 1) * 2**chunk.failures, BACKOFF_CAP)
    chunk.last_error = text[:2000]
    chunk.save(update_fields=["failures", "last_error"])
    log.warning("job %s chunk %s: %s (next try in %.0f s)", rnd.job.pk, chunk.number, text[:500], delay)
    return Next(delay)


def tries(chunk: RemoteBatch, what: str) -> int:
    """How many times `what` went wrong for the chunk (kept apart from `failures`, which each step clears)."""
    key = f"batchsite-remote-{what}:{chunk.key}"
    cache.add(key, 0, timeout=86400)
    try:
        return int(cache.incr(key))
    except ValueError:  # expired in between
        cache.set(key, 1, timeout=86400)
        return 1


def _no_batch_api(rnd: Round, chunk: RemoteBatch, client: openai.OpenAI | None, text: str) -> Next:
    """The endpoint has no Files or Batches API (llama.cpp, vLLM and Ollama answer 404): retrying will not help.
    A hybrid job runs live at once, its deadline still holds; a remote job's items fail saying so, and "Retry
    failed" can send them live."""
    why = f"The endpoint does not offer OpenAI's Batch API ({text})."
    if rnd.job.mode == Job.Mode.HYBRID:
        hybrid.switch_now(rnd, why)
        return Next(0.0, collect.finish(rnd, chunk, client, RB.CANCELLED))  # switched: its items go back to pending
    error = {"code": "batch_api_unavailable", "line": None, "message": f"{why} Retry these requests live."}
    return Next(0.0, collect.finish(rnd, chunk, client, RB.FAILED, errors=[error]))


def set_status(chunk: RemoteBatch, status: str, **fields: Any) -> None:
    if status != chunk.status:
        fields["status_since"] = clock.now()
    fields = {"failures": 0, "last_error": "", **fields, "status": status}
    for name, value in fields.items():
        setattr(chunk, name, value)
    chunk.save(update_fields=list(fields))


def interval(chunk: RemoteBatch) -> float:
    """Seconds to the next look: every BATCHSITE_REMOTE_POLL_SECONDS at first, then a tenth of the time the batch
    has spent in its status, up to a minute (a batch in progress for an hour is not polled every 5 s)."""
    age = (clock.now() - chunk.status_since).total_seconds()
    if chunk.status == RB.CANCELLING and age < 60:
        # A hybrid job waits on this to go live: every second, for the first minute.
        return float(min(settings.BATCHSITE_REMOTE_POLL_SECONDS, 1.0))
    return float(min(max(settings.BATCHSITE_REMOTE_POLL_SECONDS, age / 10), 60.0))


# Sending, each state saved before the next call


def _send(rnd: Round, chunk: RemoteBatch, client: openai.OpenAI) -> None:
    job = rnd.job
    if chunk.status in (RB.PLANNED, RB.UPLOADING):
        file_id = _find_upload(chunk, client) if chunk.status == RB.UPLOADING else None
        if file_id is None:
            set_status(chunk, RB.UPLOADING)
            file_id = _upload(rnd, chunk, client)
        set_status(chunk, RB.UPLOADED, input_file_id=file_id)
    set_status(chunk, RB.CREATING)
    metadata = {
        "batchsite_job": str(job.pk),
        "batchsite_chunk": str(chunk.key),
        "description": f"{job.name} ({chunk.number})"[:512],
    }
    batch = batchapi.create(client, chunk.input_file_id, job.url, metadata)
    chunk.batch_id = batch.id
    _update(rnd, chunk, batch)
    log.info("job %s chunk %s: batch %s created (%s items)", job.pk, chunk.number, batch.id, chunk.n_items)
    budgets.sent_accepted(rnd.endpoint, chunk)


def _upload(rnd: Round, chunk: RemoteBatch, client: openai.OpenAI) -> str:
    """The chunk's input file, written to a spooled temporary file (never whole in memory) and uploaded."""
    url = json.dumps(rnd.job.url)
    with tempfile.SpooledTemporaryFile(max_size=8 * 1024 * 1024) as out:
        rows = Item.objects.filter(remote_batch=chunk).order_by("line").values_list("custom_id", "body")
        for custom_id, body in rows.iterator(PLAN_ROWS):
            out.write(f'{{"custom_id":{json.dumps(custom_id)},"method":"POST","url":{url},"body":{body}}}\n'.encode())
        out.seek(0)
        claims.renew(chunk, LONG_CLAIM_SECONDS)
        file_id = batchapi.upload(client, chunk.filename(), out)
    claims.renew(chunk)  # back to a short claim for the calls that follow
    return file_id


def _find_upload(chunk: RemoteBatch, client: openai.OpenAI) -> str | None:
    since = chunk.created_at.timestamp() - 3600
    return batchapi.find_upload(client, chunk.filename(), since, on_page=lambda: claims.renew(chunk))


def _find_batch(rnd: Round, chunk: RemoteBatch, client: openai.OpenAI) -> None:
    """The batch an interrupted create may have made; if none, the chunk is uploaded (and created this round)."""
    since = chunk.status_since.timestamp() - 3600
    batch = batchapi.find_batch(client, str(chunk.key), chunk.input_file_id, since, on_page=lambda: claims.renew(chunk))
    if batch is None:
        set_status(chunk, RB.UPLOADED)
        return
    chunk.batch_id = batch.id
    _update(rnd, chunk, batch)
    log.info("job %s chunk %s: found batch %s made before a crash", rnd.job.pk, chunk.number, batch.id)


def _update(rnd: Round, chunk: RemoteBatch, batch: Batch) -> None:
    counts = batch.request_counts
    fields = {
        "batch_id": batch.id,
        "n_completed": counts.completed if counts else 0,
        "n_failed": counts.failed if counts else 0,
        "output_file_id": batch.output_file_id or "",
        "error_file_id": batch.error_file_id or "",
        "errors": batchapi.errors_of(batch),
        "cancel_requested_at": chunk.cancel_requested_at,
    }
    status = batch.status if batch.status in RB.values else chunk.status
    if status == RB.CANCELLED and chunk.cancel_requested_at and chunk.status != RB.CANCELLED:
        _learn_cancel_time(rnd.endpoint, chunk, batch)
    set_status(chunk, status, **fields)


def _learn_cancel_time(endpoint: Endpoint, chunk: RemoteBatch, batch: Batch) -> None:
    """The slowest cancel of a batch that was working (a validating batch cancels at once, and would teach hybrid
    plans too short a time): the endpoint's own times when it gives them, else what the poller saw."""
    if batch.in_progress_at is None or chunk.cancel_requested_at is None:
        return
    if batch.cancelled_at and batch.cancelling_at:
        settle = batch.cancelled_at - batch.cancelling_at
    else:
        settle = math.ceil((clock.now() - chunk.cancel_requested_at).total_seconds())
    # The slowest recent cancel: one slow cancel long ago fades (by a quarter with each cancel seen since).
    settle = max(int(settle), 1, int((endpoint.learned_cancel_seconds or 0) * 0.75))
    Endpoint.objects.filter(pk=endpoint.pk).update(learned_cancel_seconds=settle)
    endpoint.learned_cancel_seconds = settle
