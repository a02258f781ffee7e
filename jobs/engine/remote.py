"""Remote and hybrid jobs: the endpoint's own Files + Batches API instead of the slice loop.

One poller (a django-q2 task: the schedule starts one a minute, Job.start and Job.cancel one at once; a
cache lock keeps it to one in the cluster) goes round every job with remote work:

- plan: pending items into chunks (jobs/remoteplan.py: one model each, under the request, byte and
  enqueued-token limits), recorded as RemoteBatch rows holding their items (status running, no lease);
- send: upload, then batches.create, each step saved before the call that follows it. A crash at any
  point is recovered without sending a chunk twice: an `uploading` chunk first looks for its file by
  name, a `creating` one for its batch by the key in its metadata. A chunk waits while the same model's
  batches already at the endpoint hold the enqueued-token budget;
- follow: retrieve each batch every BATCHSITE_REMOTE_POLL_SECONDS (backing off on errors), its
  request_counts shown as the job's progress;
- collect: once a batch is final, its output and error files are streamed line by line and joined to the
  items by custom_id, as lease writes are: only items still running in that chunk change, so collecting
  twice changes nothing. What the files do not mention is settled by the batch's status (expired,
  cancelled, failed validation);
- cancel: a cancelling job's batches are cancelled at the endpoint; what they finished is kept;
- hybrid: past the last safe moment (remoteplan.switch_time) the remote batches are cancelled, and their
  unanswered items go back to pending for live slices only once the batch is final and its partial
  output joined, so no request is answered (or paid) twice.
"""

from __future__ import annotations

import json
import logging
import math
import re
import tempfile
import time
import uuid
from array import array
from collections import Counter, defaultdict
from datetime import timedelta
from decimal import Decimal

import httpx2
import openai
from django.conf import settings
from django.core.cache import cache
from django.db import close_old_connections, transaction
from django.db.models import F, Max, Q, Sum
from django.db.models.functions import Least

from jobs import clock, egress, queue, remoteplan
from jobs.engine import leases, schemacheck, shutdown, upstream, wire
from jobs.engine.database import pause_job
from jobs.engine.upstream import QUOTA_CODES, one_line, usage_of
from jobs.models import Endpoint, InvalidTransition, Item, Job, JobTick, RemoteBatch
from jobs.models.job import id_batches
from jobs.pricing import PriceBook

log = logging.getLogger(__name__)

RB = RemoteBatch.Status
LOCK = "batchsite-remote-poller"
JOIN_LINES = 1000  # result lines joined per transaction
JOIN_BYTES = 32 * 1024 * 1024  # or fewer, when they hold this much text
LIST_PAGES = 20  # pages of the endpoint's batches (or files) searched when recovering a chunk
BACKOFF_CAP = 600.0
PLAN_ROWS = 5000
GONE_AFTER = 5  # 404s in a row before a batch counts as gone
SPENT = ("prompt_tokens", "completion_tokens", "cached_tokens", "cost")
NO_BATCH_API = (404, 405, 501)  # answers to files.create / batches.create from a server without them
# Calls that only look or decide (retrieve, cancel, create, list) get a short timeout, so that a poller killed
# while it holds a chunk for one of them holds it for a minute and a half, not the 12 minutes an upload may
# need: a hybrid switch is not held up by a dead worker for longer than its margin. An upload or a
# collection holds the chunk for the request timeout (RemoteJob._hold).
CONTROL_TIMEOUT = 30.0
CLAIM_SECONDS = 3 * CONTROL_TIMEOUT
LONG_CLAIM_SECONDS = settings.BATCHSITE_REQUEST_TIMEOUT + 120


class LostClaim(Exception):
    """Another poller holds the chunk now."""


def _error(message: str) -> dict:
    """An entry of a chunk's errors, in the shape of a batch's errors.data."""
    return {"code": "batch_failed", "line": None, "message": message[:2000]}


def client_for(endpoint: Endpoint) -> openai.OpenAI:
    # No SDK retries: a create retried after a timeout could make a second batch. Failed calls are tried
    # again on a later round, after looking for what the first call may have made.
    timeout = httpx2.Timeout(settings.BATCHSITE_REQUEST_TIMEOUT, connect=15.0)
    return openai.OpenAI(
        api_key=endpoint.api_key or "none",
        base_url=endpoint.base_url,
        max_retries=0,
        timeout=timeout,
        # The SDK's clients follow redirects: a 3xx pauses the job instead (_failed_call). Each connection
        # goes only to an address egress allows, checked as it is made (DNS rebinding).
        http_client=openai.DefaultHttpxClient(
            timeout=timeout,
            follow_redirects=False,
            transport=egress.checked_transport(),  # which also reads no answer past a bound
            trust_env=False,
        ),
    )


# The poller


def poll(window: float | None = None) -> dict:
    """Rounds every second while some remote work is due within seconds, for up to `window` seconds.

    Batches that run for hours are looked at less often (RemoteJob._interval), so most minutes the poller
    takes a worker for a round or two, and the schedule's next start does the next. The cache lock keeps
    pollers from doubling each other's work; correctness does not rest on it (chunks are claimed one by
    one, RemoteJob.step)."""
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


def _sending(now) -> Q:
    """Jobs whose pending items go to the Batch API: to plan into chunks, or queued to be started."""
    remote = Q(mode__in=[Job.Mode.REMOTE, Job.Mode.HYBRID], switched_at__isnull=True)
    return remote & (Q(status=Job.Status.QUEUED) | Q(status=Job.Status.RUNNING, n_pending__gt=0))


def _hybrid_near_switch(now) -> Q:
    running = Q(mode=Job.Mode.HYBRID, status=Job.Status.RUNNING, switched_at__isnull=True)
    return running & (Q(switch_at__isnull=True) | Q(switch_at__lte=now + timedelta(seconds=70)))


def _due_chunks(until):
    free = Q(claimed_until__isnull=True) | Q(claimed_until__lt=clock.now())
    return RemoteBatch.objects.filter(free, collected_at__isnull=True, next_poll_at__lte=until)


def jobs_due(now=None) -> list[int]:
    """Jobs with remote work due now: planning, a chunk to look at, or a hybrid switch near. Indexed queries,
    so jobs waiting on long batches cost nothing between their looks."""
    now = now or clock.now()
    due = set(Job.objects.filter(_sending(now)).values_list("pk", flat=True))
    due.update(_due_chunks(now).values_list("job_id", flat=True))
    due.update(Job.objects.filter(_hybrid_near_switch(now)).values_list("pk", flat=True))
    return sorted(due)


def due_soon() -> bool:
    """Whether a round within the next few seconds has something to do."""
    now = clock.now()
    soon = now + timedelta(seconds=2 * settings.BATCHSITE_REMOTE_POLL_SECONDS + 1)
    return (
        _due_chunks(soon).exists()
        or Job.objects.filter(_sending(now)).exists()
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
    problem = _unusable(endpoint)
    if problem or endpoint is None:
        pause_job(job_id, problem)
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
        plan_chunks(job, endpoint)
    remote = RemoteJob(job, endpoint)
    if job.mode == Job.Mode.HYBRID and job.switched_at is None and job.status == Job.Status.RUNNING:
        remote.plan_switch()
    for chunk in _due_chunks(remote.now).filter(job=job).order_by("number"):
        remote.step(chunk)
    remote.after_round()


def _unusable(endpoint: Endpoint | None) -> str:
    if endpoint is None:
        return "No endpoint is configured. Add one on the Endpoints page (or set OPENAI_API_KEY), then resume."
    try:
        endpoint.api_key  # noqa: B018 - decrypting now turns a changed SECRET_KEY into a clear pause
        egress.check_base_url(endpoint.base_url)
    except (ValueError, egress.UnsafeURL) as e:
        return f"The endpoint cannot be used: {e}"
    return ""


def _refused_for_tokens(errors: list) -> bool:
    return bool(errors) and all(e.get("code") == "token_limit_exceeded" for e in errors)


def _too_large(line: wire.LongLine) -> dict | None:
    """A result line over the limit, as an error line for the request its head names (if it names one)."""
    custom_id = line.custom_id()
    if custom_id is None:
        return None
    limit = wire.max_answer_bytes()
    message = str(wire.AnswerTooLarge(limit))
    return {"custom_id": custom_id, "response": None, "error": {"code": "answer_too_large", "message": message}}


def _transient(fields: dict) -> bool:
    """Whether a result line (as _result_fields reads it) failed through no fault of its request: a server error
    or a rate limit, which another send may well not meet (OpenAI's error files routinely hold 500s and 503s).
    A spent quota is not worth another send."""
    status, code = fields["http_status"], fields.get("error_code")
    if fields["status"] != Item.Status.FAILED or code in QUOTA_CODES:
        return False
    if status is None:
        return code in ("server_error", "rate_limit_exceeded")
    return status == 429 or status >= 500


# OpenAI's refusal states the limit: "... Limit: 90,000 enqueued tokens. Please try submitting fewer tokens ..."
# "The input file ... is in 'pending' state. Only files with status 'Processed' are accepted" (Azure OpenAI).
FILE_NOT_READY = re.compile(r"'?pending'? state|not (?:yet )?processed|only files with status", re.IGNORECASE)
STATED_LIMIT = re.compile(r"Limit: ?([0-9,]{1,20}) enqueued tokens")


def _stated_limit(errors: list) -> int | None:
    for error in errors:
        if match := STATED_LIMIT.search(str(error.get("message") or "")[:2000]):
            return int(match.group(1).replace(",", "")) or None
    return None


def _token_wait_key(endpoint_id: int, model: str) -> str:
    return f"batchsite-token-wait:{endpoint_id}:{model}"


# Planning

# The bytes a request's line adds to the input file beyond its custom_id, URL and body:
# {"custom_id":,"method":"POST","url":,"body":} and a newline.
LINE_OVERHEAD = len('{"custom_id":,"method":"POST","url":"","body":}\n')


def plan_chunks(job: Job, endpoint: Endpoint) -> int:
    """Pending items into new chunks (running, no lease, held by their chunk), one transaction per chunk;
    returns how many chunks. A million pending items take a few compact arrays, not a million objects."""
    fixed = LINE_OVERHEAD + len(job.url.encode())
    ids, sizes, tokens, model_of = array("q"), array("q"), array("q"), array("l")
    models: dict[str, int] = {}
    pending = Item.objects.filter(job=job, status=Item.Status.PENDING).order_by("line")
    rows = pending.values_list("id", "custom_id", "body", "est_tokens").iterator(PLAN_ROWS)
    for item_id, custom_id, body, est in rows:
        data = json.loads(body)
        model = data.get("model") if isinstance(data.get("model"), str) else ""
        ids.append(item_id)
        sizes.append(fixed + len(body.encode()) + len(json.dumps(custom_id).encode()))
        tokens.append(remoteplan.request_tokens(data, est))
        model_of.append(models.setdefault(model, len(models)))
    if not ids:
        return 0
    names = {index: name for name, index in models.items()}
    made = 0
    by_model: dict[str, list[int]] = defaultdict(list)
    for position in range(len(ids)):
        by_model[names[model_of[position]]].append(position)
    for model, positions in by_model.items():
        # 5% below the byte limit: a limit of "200 MB" may be counted in decimal megabytes (0.95 x 200 MiB is
        # 199.2 million bytes).
        limits = remoteplan.Limits(
            endpoint.batch_max_requests, int(endpoint.batch_max_bytes * 0.95), endpoint.token_limit(model)
        )
        requests = (remoteplan.Request(ids[p], model, sizes[p], tokens[p]) for p in positions)
        for chunk_requests in remoteplan.split(requests, limits):
            if not _make_chunk(job, endpoint, model, chunk_requests):
                return made
            made += 1
    return made


def _make_chunk(job: Job, endpoint: Endpoint, model: str, requests: list[remoteplan.Request]) -> bool:
    """One chunk and its items, in one transaction; False if the job no longer runs."""
    with transaction.atomic():
        if Job.lock(job.pk) != Job.Status.RUNNING:
            return False
        number = (job.remote_batches.aggregate(n=Max("number"))["n"] or 0) + 1
        chunk = RemoteBatch.objects.create(
            job=job,
            endpoint=endpoint,
            number=number,
            model=model,
            n_items=len(requests),
            est_tokens=sum(r.tokens for r in requests),
            bytes=sum(r.bytes for r in requests),
        )
        taken = 0
        for batch_ids in id_batches([r.id for r in requests]):
            taken += Item.objects.filter(id__in=batch_ids, status=Item.Status.PENDING).update(
                status=Item.Status.RUNNING, remote_batch=chunk, lease_token=None, lease_until=None
            )
        if taken != len(requests):  # some were cancelled meanwhile
            RemoteBatch.objects.filter(pk=chunk.pk).update(n_items=taken)
        job.add_to_counters(n_pending=-taken, n_running=taken)
    return True


class RemoteJob:
    """One round's work on one job's chunks."""

    def __init__(self, job: Job, endpoint: Endpoint):
        self.job, self.endpoint = job, endpoint
        self.clients: dict[int, openai.OpenAI] = {}
        self.client = self._client_of(endpoint)  # the chunk's own, while a step runs
        self.now = clock.now()
        self.released = 0  # items handed back to pending for live slices (hybrid)
        self.prices: PriceBook | None = None
        self.calling = ""

    @property
    def cancel_wanted(self) -> bool:
        return self.job.status == Job.Status.CANCELLING or self.job.switched_at is not None

    # Hybrid

    def plan_switch(self) -> None:
        job = self.job
        if job.deadline is None:
            return
        done = job.n_succeeded + job.n_failed + job.n_expired + job.n_cancelled
        in_remote = job.remote_batches.filter(collected_at__isnull=True).exclude(status__in=RemoteBatch.FINAL)
        answered_remote = sum(c.n_answered for c in in_remote)
        remaining = max(job.total - done - answered_remote, 0)
        # Tokens per request as a tokens-per-minute limit counts them: input plus the most it may generate,
        # as the chunks recorded them (remoteplan.request_tokens).
        sent = job.remote_batches.aggregate(tokens=Sum("est_tokens"), items=Sum("n_items"))
        per_request = (sent["tokens"] or 0) / sent["items"] if sent["items"] else 0.0
        rate, basis = remoteplan.live_rate(
            self.endpoint.concurrency,
            self.endpoint.effective_rpm,
            self.endpoint.effective_tpm,
            per_request,
            self.endpoint.latency_seconds,
        )
        live = remaining / rate if rate else 0.0
        margin = remoteplan.margin_for(live, settings.BATCHSITE_HYBRID_MARGIN_SECONDS)
        plan = remoteplan.switch_time(
            job.deadline, remaining, rate, self.endpoint.effective_cancel_seconds, margin, basis
        )
        fields: dict = {}
        if (
            job.switch_at is None
            or abs((job.switch_at - plan.at).total_seconds()) >= 1
            or job.switch_note != plan.reason
        ):
            fields.update(switch_at=plan.at, switch_note=plan.reason)
        if remaining and self.now >= plan.at:
            fields.update(switched_at=self.now, switch_note=plan.reason)
            log.info("job %s: switching to live (%s)", job.pk, plan.reason)
        if fields:
            Job.objects.filter(pk=job.pk).update(**fields)
            for name, value in fields.items():
                setattr(job, name, value)
        if job.switched_at is not None:
            job.remote_batches.filter(collected_at__isnull=True).update(next_poll_at=self.now)  # cancel them now
            Job.start_slices(job.pk)  # the pending items now; the rest as their batches settle (after_round)

    def _client_of(self, endpoint: Endpoint) -> openai.OpenAI:
        if endpoint.pk not in self.clients:
            self.clients[endpoint.pk] = client_for(endpoint)
        return self.clients[endpoint.pk]

    # One chunk

    def step(self, chunk: RemoteBatch) -> None:
        """Claim the chunk (compare-and-set: a second poller skips it), do what is due, then let go of it with
        the time of its next look. A poller killed meanwhile leaves the claim to run out (CLAIM_SECONDS, or
        LONG_CLAIM_SECONDS during an upload or a collection)."""
        now = clock.now()
        free = Q(claimed_until__isnull=True) | Q(claimed_until__lt=now)
        hold = now + timedelta(seconds=CLAIM_SECONDS)
        # next_poll_at moves to the end of the claim too: a cancel meanwhile brings it forward (Job.cancel),
        # and letting go keeps the earlier of the two.
        if not RemoteBatch.objects.filter(free, pk=chunk.pk, collected_at__isnull=True).update(
            claimed_until=hold, next_poll_at=hold
        ):
            return
        chunk.refresh_from_db()
        delay: float = 0.0
        try:
            delay = self._step(chunk)
        except openai.APIStatusError as e:
            delay = self._failed_call(chunk, e, f"{e.status_code}: {e.message}")
        except (openai.APIConnectionError, openai.APITimeoutError, httpx2.HTTPError) as e:
            delay = self._failed_call(chunk, e, f"Could not reach the endpoint: {e}")
        except LostClaim:
            log.warning("job %s chunk %s: another poller took it over; leaving it", self.job.pk, chunk.number)
        except Exception as e:
            # Anything else (an answer of a shape nobody expected, a value the database refuses): backed off as a
            # failed call, so a bad answer is not fetched and parsed again every second, and the chunk says why.
            log.exception("job %s chunk %s: step failed", self.job.pk, chunk.number)
            delay = self._failed_call(
                chunk, e, f"Batchsite could not process the endpoint's answer: {type(e).__name__}: {e}"
            )
        finally:
            next_look = clock.now() + timedelta(seconds=delay)
            # Our claim: `hold`, or later if a long collection renewed it (_join).
            RemoteBatch.objects.filter(pk=chunk.pk, claimed_until=chunk.claimed_until).update(
                claimed_until=None, next_poll_at=Least(F("next_poll_at"), next_look)
            )

    def _step(self, chunk: RemoteBatch) -> float:
        """What is due for the chunk; returns the seconds until its next look."""
        self.calling = ""  # the call that creates something, while it runs (a refusal of a lookup is no refusal)
        if chunk.endpoint_id is not None and chunk.endpoint_id != self.endpoint.pk:
            endpoint = Endpoint.objects.filter(pk=chunk.endpoint_id).first()
            problem = _unusable(endpoint)
            if problem or endpoint is None:
                error = _error(f"The batch's endpoint is gone: {problem}")
                self._finish_chunk(chunk, RB.FAILED, errors=[error], gone=True)
                return 0.0
            self.client = self._client_of(endpoint)
        else:
            self.client = self._client_of(self.endpoint)
        if chunk.status in RemoteBatch.NOT_SENT:
            if chunk.status == RB.CREATING:
                self._find_batch(chunk)
            if chunk.status in RemoteBatch.NOT_SENT:
                if self.cancel_wanted:
                    self._finish_chunk(chunk, RB.CANCELLED)  # never sent: cancelled, or pending for live slices
                    return 0.0
                if (
                    self.job.status != Job.Status.RUNNING
                    or not self._budget_allows(chunk)
                    or not self._within_budgets(chunk)
                ):
                    # Paused (perhaps just now, by a cost cap or a monthly limit), or the endpoint's enqueued-token
                    # budget is spoken for: the chunk stays as it is, looked at again later.
                    return max(settings.BATCHSITE_REMOTE_POLL_SECONDS, min(30, self._interval(chunk)))
                self._send(chunk)
                return self._interval(chunk)
        if chunk.status in RemoteBatch.FINAL:
            self._collect(chunk)
            return 0.0
        batch = None
        if self.cancel_wanted and chunk.cancel_requested_at is None and chunk.status != RB.CANCELLING:
            chunk.cancel_requested_at = self.now
            try:
                batch = self.client.batches.cancel(chunk.batch_id, timeout=CONTROL_TIMEOUT)
            except openai.APIStatusError as e:
                if e.status_code not in (400, 409):
                    raise
                # It ended meanwhile (a batch that finished cannot be cancelled): what it says now is final.
        self._update(chunk, batch or self.client.batches.retrieve(chunk.batch_id, timeout=CONTROL_TIMEOUT))
        if chunk.status in RemoteBatch.FINAL:
            self._collect(chunk)
        return self._interval(chunk)

    def _failed_call(self, chunk: RemoteBatch, error: Exception, text: str) -> float:
        """Record a failed call and return the backoff before the next look."""
        status = getattr(error, "status_code", None)
        if status in (401, 403):
            pause_job(
                self.job.pk, f"The endpoint refused the key ({status}). Fix the key on the Endpoints page, then resume."
            )
        if status is not None and 300 <= status < 400:
            headers = getattr(getattr(error, "response", None), "headers", {})
            pause_job(self.job.pk, upstream.redirect_refused(status, headers) + " Then resume the job.")
        if refused := egress.refusal(error):
            pause_job(
                self.job.pk, f"The endpoint's address is refused: {refused} Fix it on the Endpoints page, then resume."
            )
        # The verdicts below rest on what the endpoint said to the call that creates something, never on a
        # lookup (a lookup's 404 is no proof, and a batch made before a crash may be running).
        if status in NO_BATCH_API and self.calling == "files.create":
            return self._no_batch_api(chunk, text)
        if status == 404 and self.calling == "batches.create":
            # The endpoint lost the uploaded file (deleted, expired; OpenAI names input_file_id), or has a Files
            # API but no Batches API: upload again a few times, then give up on its Batch API.
            if self._tries(chunk, "lost") >= GONE_AFTER:
                return self._no_batch_api(chunk, text)
            chunk.status, chunk.status_since, chunk.input_file_id = RB.PLANNED, clock.now(), ""
            chunk.last_error = text[:2000]
            chunk.save(update_fields=["status", "status_since", "input_file_id", "last_error"])
            return 10.0
        if status == 400 and self.calling == "batches.create" and FILE_NOT_READY.search(text[:2000]):
            # Azure answers 400 to a batch made from a file it has not processed yet: that passes, within an hour.
            tries = self._tries(chunk, "not-ready")
            if tries < 2 * GONE_AFTER:
                self._set_status(chunk, RB.UPLOADED, last_error=text[:2000])  # no batch was made: no search
                return min(5.0 * 2 ** (tries - 1), BACKOFF_CAP)
        if status in (400, 413, 422) and self.calling in ("files.create", "batches.create"):
            # The endpoint refused the file or the batch itself (too big, or a path it does not batch): it will
            # not change its mind, so the chunk's items fail saying why.
            self._finish_chunk(chunk, RB.FAILED, errors=[_error(text)])
            return 0.0
        chunk.failures += 1
        if status == 404 and chunk.batch_id and chunk.status not in RemoteBatch.FINAL and chunk.failures >= GONE_AFTER:
            # The endpoint does not know the batch any more: deleted, or another project's key.
            self._finish_chunk(
                chunk, RB.FAILED, errors=[_error(f"The endpoint no longer has this batch: {text}")], gone=True
            )
            return 0.0
        if status == 404 and chunk.status in RemoteBatch.FINAL and chunk.failures >= 2 * GONE_AFTER:
            # A finished batch whose result files stay missing (for about an hour of tries): deleted at the endpoint.
            message = f"The endpoint no longer has this batch's results: {text}"
            self._finish_chunk(chunk, chunk.status, errors=[_error(message)], gone=True)
            return 0.0
        delay = min(max(settings.BATCHSITE_REMOTE_POLL_SECONDS, 1) * 2**chunk.failures, BACKOFF_CAP)
        chunk.last_error = text[:2000]
        chunk.save(update_fields=["failures", "last_error"])
        log.warning("job %s chunk %s: %s (next try in %.0f s)", self.job.pk, chunk.number, text[:500], delay)
        return delay

    def _tries(self, chunk: RemoteBatch, what: str) -> int:
        """How many times `what` went wrong for the chunk (kept apart from `failures`, which each step clears)."""
        key = f"batchsite-remote-{what}:{chunk.key}"
        cache.add(key, 0, timeout=86400)
        try:
            return cache.incr(key)
        except ValueError:  # expired in between
            cache.set(key, 1, timeout=86400)
            return 1

    def _no_batch_api(self, chunk: RemoteBatch, text: str) -> float:
        """The endpoint has no Files or Batches API (llama.cpp, vLLM and Ollama answer 404): retrying will not
        help. A hybrid job runs live at once, its deadline still holds; a remote job's items fail saying so,
        and "Retry failed" can send them live."""
        why = f"The endpoint does not offer OpenAI's Batch API ({text})."
        if self.job.mode == Job.Mode.HYBRID:
            switched = Job.objects.filter(pk=self.job.pk, switched_at__isnull=True).update(
                switched_at=self.now, switch_at=self.now, switch_note=f"{why} Running live instead."
            )
            if switched:
                log.info("job %s: switching to live, %s", self.job.pk, why)
                self.job.refresh_from_db(fields=["switched_at", "switch_at", "switch_note"])
                self.job.remote_batches.filter(collected_at__isnull=True).update(next_poll_at=self.now)
            self._finish_chunk(chunk, RB.CANCELLED)  # switched: its items go back to pending, for live slices
            return 0.0
        error = {"code": "batch_api_unavailable", "line": None, "message": f"{why} Retry these requests live."}
        self._finish_chunk(chunk, RB.FAILED, errors=[error])
        return 0.0

    def _hold(self, chunk: RemoteBatch, seconds: float = CLAIM_SECONDS) -> None:
        """Extend our claim on the chunk before a long call. A claim already lost (this poller stalled past it,
        and another took the chunk) stops the step: two pollers must never work one chunk."""
        until = clock.now() + timedelta(seconds=seconds)
        if not RemoteBatch.objects.filter(pk=chunk.pk, claimed_until=chunk.claimed_until).update(claimed_until=until):
            raise LostClaim(chunk.pk)
        chunk.claimed_until = until

    def _set_status(self, chunk: RemoteBatch, status: str, **fields) -> None:
        if status != chunk.status:
            fields["status_since"] = clock.now()
        fields = {"failures": 0, "last_error": "", **fields, "status": status}
        for name, value in fields.items():
            setattr(chunk, name, value)
        chunk.save(update_fields=list(fields))

    # Sending, each step saved before the next call

    def _enqueued_tokens(self, chunk: RemoteBatch) -> int:
        """Tokens of the same model's other batches at this endpoint that are not finished (any job's)."""
        active = [RB.CREATING, *RemoteBatch.REMOTE_ACTIVE]
        others = RemoteBatch.objects.filter(endpoint=chunk.endpoint_id, model=chunk.model, status__in=active)
        return others.exclude(pk=chunk.pk).aggregate(n=Sum("est_tokens"))["n"] or 0

    def _budget_allows(self, chunk: RemoteBatch) -> bool:
        if cache.get(_token_wait_key(self.endpoint.pk, chunk.model)):
            return False  # pausing after a refusal (_wait_for_room)
        limit = self.endpoint.token_limit(chunk.model)
        if not limit:
            return True
        enqueued = self._enqueued_tokens(chunk)
        # A chunk over the limit by itself still goes when nothing else is enqueued: the endpoint then says why.
        return enqueued == 0 or enqueued + chunk.est_tokens <= limit

    def _within_budgets(self, chunk: RemoteBatch) -> bool:
        """Whether the chunk fits under the job's cost cap and its owner's and endpoint's monthly limits, each of
        its requests at its most possible cost at the Batch API's price, on top of what is spent and in flight (as
        a live claim counts it, jobs/engine/leases.py). If not, the job pauses before sending it, saying why; if
        so, its items hold that cost as in flight until they are collected."""
        with transaction.atomic():
            if Job.lock(self.job.pk) != Job.Status.RUNNING:
                return False
            job = Job.objects.only(*leases.BUDGET_FIELDS).get(pk=self.job.pk)
            found = leases.budgets(job, Q(remote_batch=chunk))
            if not found:
                return True
            if self.prices is None:
                self.prices = PriceBook.load()
            discount = Decimal(self.endpoint.batch_discount)
            rows = Item.objects.filter(remote_batch=chunk, status=Item.Status.RUNNING, lease_token__isnull=True)
            room = min(b.cap - b.committed for b in found)
            by_cost: dict[Decimal, list[int]] = defaultdict(list)  # a few distinct costs: a few updates
            lines: list[int] = []
            most, fits, over_ids = Decimal(0), Decimal(0), list[int]()
            fields = ("id", "line", "body", "est_tokens")
            for item_id, line, body, est in rows.order_by("line").values_list(*fields).iterator(PLAN_ROWS):
                request = json.loads(body)
                cost = leases.most_cost(self.prices, job.url, request, est, job.model, discount)
                if why := leases.unpriced(self.prices, str(request.get("model") or job.model), found):
                    job.pause_itself(why)
                    self.job.status = Job.Status.PAUSED
                    return False
                most += cost
                lines.append(line)
                if not over_ids and fits + cost <= room:
                    fits += cost
                    by_cost[cost].append(item_id)
                else:
                    over_ids.append(item_id)
            if over_ids and by_cost and chunk.status == RB.PLANNED:
                # Not yet uploaded: send the lines that fit, as a live job runs up to its cap; the rest go back
                # to pending, and the next batch made of them pauses the job, saying so.
                self._give_back(chunk, over_ids)
            elif over_ids and lines:
                over = next((b for b in found if b.committed + most > b.cap), found[0])
                job.pause_itself(over.pause_reason(f"the next batch (lines {min(lines)}–{max(lines)})", most))
                self.job.status = Job.Status.PAUSED  # the job's other chunks wait too
                return False
            for cost, ids in by_cost.items():
                for batch_ids in id_batches(ids):
                    Item.objects.filter(id__in=batch_ids).update(est_cost=cost)
        return True

    def _give_back(self, chunk: RemoteBatch, item_ids: list[int]) -> None:
        """Items of a chunk not yet uploaded back to pending (in the caller's transaction, under the job's lock)."""
        n = 0
        for batch_ids in id_batches(item_ids):
            held = Item.objects.filter(id__in=batch_ids, remote_batch=chunk, status=Item.Status.RUNNING)
            n += held.update(status=Item.Status.PENDING, remote_batch=None)
        RemoteBatch.objects.filter(pk=chunk.pk).update(n_items=F("n_items") - n)
        chunk.n_items -= n
        self.job.add_to_counters(n_running=-n, n_pending=n)

    def _send(self, chunk: RemoteBatch) -> None:
        if chunk.status in (RB.PLANNED, RB.UPLOADING):
            file_id = self._find_upload(chunk) if chunk.status == RB.UPLOADING else None
            if file_id is None:
                self._set_status(chunk, RB.UPLOADING)
                file_id = self._upload(chunk)
            self._set_status(chunk, RB.UPLOADED, input_file_id=file_id)
        self._set_status(chunk, RB.CREATING)
        self.calling = "batches.create"
        batch = self.client.batches.create(
            timeout=CONTROL_TIMEOUT,
            input_file_id=chunk.input_file_id,
            endpoint=self.job.url,  # type: ignore[arg-type]
            completion_window="24h",
            metadata={
                "batchsite_job": str(self.job.pk),
                "batchsite_chunk": str(chunk.key),
                "description": f"{self.job.name} ({chunk.number})"[:512],
            },
        )
        chunk.batch_id = batch.id
        self._update(chunk, batch)
        log.info("job %s chunk %s: batch %s created (%s items)", self.job.pk, chunk.number, batch.id, chunk.n_items)
        cache.delete(_token_wait_key(self.endpoint.pk, chunk.model) + ":n")  # accepted: refusals start over

    def _upload(self, chunk: RemoteBatch) -> str:
        """The chunk's input file, written to a spooled temporary file (never whole in memory) and uploaded."""
        url = json.dumps(self.job.url)
        with tempfile.SpooledTemporaryFile(max_size=8 * 1024 * 1024) as out:
            rows = Item.objects.filter(remote_batch=chunk).order_by("line").values_list("custom_id", "body")
            for custom_id, body in rows.iterator(PLAN_ROWS):
                out.write(
                    f'{{"custom_id":{json.dumps(custom_id)},"method":"POST","url":{url},"body":{body}}}\n'.encode()
                )
            out.seek(0)
            self.calling = "files.create"
            self._hold(chunk, LONG_CLAIM_SECONDS)
            uploaded = self.client.files.create(file=(chunk.filename(), out, "application/jsonl"), purpose="batch")
        self._hold(chunk)  # back to a short claim for the calls that follow
        return uploaded.id

    def _find_upload(self, chunk: RemoteBatch) -> str | None:
        """The file an interrupted upload may have made, found by its name among the endpoint's batch files."""
        seen = 0
        for f in self.client.files.list(purpose="batch", order="desc", limit=1000, timeout=CONTROL_TIMEOUT):
            if f.filename == chunk.filename():
                return f.id
            seen += 1
            if seen % 1000 == 0:
                self._hold(chunk)  # a page each
            if seen >= LIST_PAGES * 1000 or f.created_at < chunk.created_at.timestamp() - 3600:
                break
        return None

    def _find_batch(self, chunk: RemoteBatch) -> None:
        """The batch an interrupted create may have made, found by the chunk's key in its metadata."""
        seen = 0
        for batch in self.client.batches.list(limit=100, timeout=CONTROL_TIMEOUT):
            # By the key in its metadata, or by its input file (a proxy may drop metadata): both are the chunk's own.
            mine = (batch.metadata or {}).get("batchsite_chunk") == str(chunk.key)
            if mine or (chunk.input_file_id and batch.input_file_id == chunk.input_file_id):
                chunk.batch_id = batch.id
                self._update(chunk, batch)
                log.info("job %s chunk %s: found batch %s made before a crash", self.job.pk, chunk.number, batch.id)
                return
            seen += 1
            if seen % 100 == 0:
                self._hold(chunk)  # a page each
            if seen >= LIST_PAGES * 100 or batch.created_at < chunk.status_since.timestamp() - 3600:
                break
        self._set_status(chunk, RB.UPLOADED)  # no batch was made: create it (this round, as uploaded)

    def _update(self, chunk: RemoteBatch, batch) -> None:
        counts = batch.request_counts
        fields = {
            "batch_id": batch.id,
            "n_completed": counts.completed if counts else 0,
            "n_failed": counts.failed if counts else 0,
            "output_file_id": batch.output_file_id or "",
            "error_file_id": batch.error_file_id or "",
            "errors": [e.model_dump() for e in batch.errors.data or []] if batch.errors else [],
            "cancel_requested_at": chunk.cancel_requested_at,
        }
        status = batch.status if batch.status in RB.values else chunk.status
        if status == RB.CANCELLED and chunk.cancel_requested_at and chunk.status != RB.CANCELLED:
            self._learn_cancel_time(chunk, batch)
        self._set_status(chunk, status, **fields)

    def _learn_cancel_time(self, chunk: RemoteBatch, batch) -> None:
        """The slowest cancel of a batch that was working (a validating batch cancels at once, and would teach
        hybrid plans too short a time): the endpoint's own times when it gives them, else what the poller saw."""
        if batch.in_progress_at is None or chunk.cancel_requested_at is None:
            return
        if batch.cancelled_at and batch.cancelling_at:
            settle = batch.cancelled_at - batch.cancelling_at
        else:
            settle = math.ceil((clock.now() - chunk.cancel_requested_at).total_seconds())
        # The slowest recent cancel: one slow cancel long ago fades (by a quarter with each cancel seen since).
        settle = max(int(settle), 1, int((self.endpoint.learned_cancel_seconds or 0) * 0.75))
        Endpoint.objects.filter(pk=self.endpoint.pk).update(learned_cancel_seconds=settle)
        self.endpoint.learned_cancel_seconds = settle

    def _interval(self, chunk: RemoteBatch) -> float:
        """Seconds to the next look: every BATCHSITE_REMOTE_POLL_SECONDS at first, then a tenth of the time the
        batch has spent in its status, up to a minute (a batch in progress for an hour is not polled every 5 s)."""
        age = (clock.now() - chunk.status_since).total_seconds()
        if chunk.status == RB.CANCELLING and age < 60:
            # A hybrid job waits on this to go live: every second, for the first minute.
            return min(settings.BATCHSITE_REMOTE_POLL_SECONDS, 1.0)
        return min(max(settings.BATCHSITE_REMOTE_POLL_SECONDS, age / 10), 60.0)

    # Collecting

    def _collect(self, chunk: RemoteBatch) -> None:
        reported = (chunk.n_completed, chunk.n_failed)  # the chunk table shows them again once it is collected
        # The chunk's latest request_counts count as progress until its lines are joined: each join moves them
        # from the remote counts to the items' own, so progress never dips (and never counts a line twice).
        self._show_remote_counts()
        for file_id in (chunk.output_file_id, chunk.error_file_id):
            if file_id:
                self._join_file(chunk, file_id)
                self._hold(chunk)  # joined: a short claim again
        self._finish_chunk(chunk, chunk.status, errors=chunk.errors)
        if chunk.batch_id:
            # The endpoint's own counts for the chunk table: those read before a collection that was cut short
            # and resumed had already been lowered by the lines it joined.
            try:
                counts = self.client.batches.retrieve(chunk.batch_id, timeout=CONTROL_TIMEOUT).request_counts
                if counts is not None:
                    reported = (counts.completed, counts.failed)
            except (openai.APIError, httpx2.HTTPError):
                pass
        chunk.n_completed, chunk.n_failed = reported
        RemoteBatch.objects.filter(pk=chunk.pk).update(n_completed=chunk.n_completed, n_failed=chunk.n_failed)

    def _join_file(self, chunk: RemoteBatch, file_id: str) -> None:
        """Stream a result file and join its lines to the chunk's items, JOIN_LINES per transaction."""
        self._hold(chunk, LONG_CLAIM_SECONDS)
        with self.client.files.with_streaming_response.content(file_id) as response:
            lines: list[dict] = []
            held = 0  # bytes of the lines in `lines`
            # Each line is read up to BATCHSITE_MAX_ANSWER_MB: a longer one fails its request, unread.
            for raw in wire.bounded_lines(response.iter_bytes(), wire.max_answer_bytes()):
                if isinstance(raw, wire.LongLine):
                    record = _too_large(raw)
                    if record is None:
                        log.warning(
                            "job %s chunk %s: a result line too long to read names no request",
                            self.job.pk,
                            chunk.number,
                        )
                        continue
                    lines.append(record)
                elif not raw.strip():
                    continue
                else:
                    try:
                        record = json.loads(raw)
                    except (ValueError, RecursionError):
                        log.warning("job %s chunk %s: a result line is not JSON", self.job.pk, chunk.number)
                        continue
                    if isinstance(record, dict) and isinstance(record.get("custom_id"), str):
                        lines.append(record)
                        held += len(raw)
                if len(lines) >= JOIN_LINES or held > JOIN_BYTES:  # a thousand small lines, or fewer big ones
                    self._join(chunk, lines)
                    lines, held = [], 0
            self._join(chunk, lines)

    def _join(self, chunk: RemoteBatch, records: list[dict]) -> None:
        if not records:
            return
        if self.prices is None:
            self.prices = PriceBook.load()
        discount = Decimal(self.endpoint.batch_discount)
        now = clock.now()
        deltas: Counter = Counter()
        cost = Decimal(0)
        wants = self._structured(chunk, records)
        retried = 0
        with transaction.atomic():
            resend = Job.lock(self.job.pk) != Job.Status.CANCELLING  # a cancelling job sends nothing again
            for record in records:
                fields = self._result_fields(chunk, record, discount, wants.get(record.get("custom_id")))
                held = Item.objects.filter(
                    job_id=self.job.pk,
                    custom_id=record["custom_id"],
                    remote_batch=chunk,
                    status=Item.Status.RUNNING,
                    lease_token__isnull=True,  # not an item a live slice holds (retried since)
                )
                if resend and _transient(fields):
                    # Sent again while it has sends left, as live slices do: in the next chunk, or live past a
                    # hybrid switch. It keeps the error meanwhile; out of sends, it fails with it below.
                    again = {**fields, "status": Item.Status.PENDING, "remote_batch": None}
                    again["attempts"] = F("attempts") + 1
                    if held.filter(attempts__lt=self.job.max_attempts - 1).update(**again):
                        retried += 1
                        continue
                if fields["status"] == Item.Status.EXPIRED and self.job.mode == Job.Mode.HYBRID:
                    # A hybrid job promised everything by its deadline: what the Batch API let expire runs live.
                    fields = {"status": Item.Status.PENDING, "remote_batch": None}
                    self.released += 1
                else:
                    fields["finished_at"] = now
                # Added to what the item already holds: a retried item keeps what its earlier sends cost, and
                # counts them.
                spent = {key: F(key) + fields[key] for key in (*SPENT, "attempts") if key in fields}
                if held.update(**{**fields, **spent}):
                    deltas[f"n_{fields['status']}"] += 1
                    deltas["n_running"] -= 1
                    for key in ("prompt_tokens", "completion_tokens", "cached_tokens"):
                        deltas[key] += fields.get(key, 0)
                    cost += fields.get("cost", Decimal(0))
            self.released += retried
            deltas["n_pending"] += retried
            deltas["n_running"] -= retried
            # The lines joined leave the chunk's remote counts (_show_remote_counts), in the same transaction as
            # they reach the items' own: answers its `completed`, the rest its `failed`, each spilling over to the
            # other (the endpoint counts an answer that breaks its schema as completed, say).
            succeeded, others = deltas["n_succeeded"], -deltas["n_running"] - deltas["n_succeeded"]
            completed, failed = min(chunk.n_completed, succeeded), min(chunk.n_failed, others)
            rest = succeeded + others - completed - failed
            spill = min(chunk.n_completed - completed, rest)
            completed, failed = completed + spill, failed + min(chunk.n_failed - failed, rest - spill)
            deltas["remote_completed"] -= completed
            deltas["remote_failed"] -= failed
            # The claim is renewed too: a collection of many lines outlasts any claim (step lets go of it).
            left = {"n_completed": chunk.n_completed - completed, "n_failed": chunk.n_failed - failed}
            claim = clock.now() + timedelta(seconds=LONG_CLAIM_SECONDS)
            if not RemoteBatch.objects.filter(pk=chunk.pk, claimed_until=chunk.claimed_until).update(
                **left, claimed_until=claim
            ):
                raise LostClaim(chunk.pk)  # another poller collects it now: this transaction is undone
            if any(deltas.values()):
                self.job.add_to_counters(**deltas, cost=cost)
                JobTick.add(
                    self.job.pk,
                    now,
                    {
                        "succeeded": deltas["n_succeeded"],
                        "failed": deltas["n_failed"] + deltas["n_expired"],
                        "retried": retried,
                        "prompt_tokens": deltas["prompt_tokens"],
                        "completion_tokens": deltas["completion_tokens"],
                    },
                )
        chunk.n_completed, chunk.n_failed, chunk.claimed_until = left["n_completed"], left["n_failed"], claim

    def _structured(self, chunk: RemoteBatch, records: list[dict]) -> dict:
        """custom_id -> the structured output its request asks for, for the records' requests that ask for one
        (one query; bodies without a JSON response format are not even read)."""
        ids = [r["custom_id"] for r in records if isinstance(r.get("custom_id"), str)]
        asking = Q(body__contains='"json_schema"') | Q(body__contains='"json_object"')
        rows = Item.objects.filter(asking, job_id=self.job.pk, remote_batch=chunk, custom_id__in=ids)
        wants = {}
        for custom_id, body in rows.values_list("custom_id", "body"):
            want = schemacheck.wanted(self.job.url, json.loads(body))
            if want is not None:
                wants[custom_id] = want
        return wants

    def _result_fields(
        self, chunk: RemoteBatch, record: dict, discount: Decimal, want: schemacheck.Wanted | None = None
    ) -> dict:
        """An output or error line as the item's result. A 4xx or 5xx `response.status_code` is a failure
        even when `error` is null (OpenAI puts such answers in the output file); a 5xx or 429 one is sent
        again while it has attempts left (_join). An answer that is not the JSON its request asked for fails
        as invalid_output, paid for (the Batch API cannot be asked again here: "retry failed" sends it again,
        at the Batch API or live)."""
        response = record.get("response") if isinstance(record.get("response"), dict) else None
        error = record.get("error") if isinstance(record.get("error"), dict) else None
        status_code = response.get("status_code") if response else None
        body = response.get("body") if response else None
        request_id = str((response or {}).get("request_id") or "")[:200]
        text = one_line(json.dumps(body, ensure_ascii=False)) if body is not None else ""
        fields: dict = {"attempts": 1, "http_status": status_code if isinstance(status_code, int) else None}
        fields.update(request_id=request_id, response=text.replace("\x00", "\ufffd"))
        if error is None and isinstance(status_code, int) and 200 <= status_code < 300 and isinstance(body, dict):
            prompt, completion, cached = usage_of(self.job.url, body)
            model = body["model"] if isinstance(body.get("model"), str) else chunk.model
            assert self.prices is not None
            fields.update(
                status=Item.Status.SUCCEEDED,
                error_code="",
                error_message="",
                prompt_tokens=prompt,
                completion_tokens=completion,
                cached_tokens=cached,
                cost=self.prices.cost(model, prompt, completion, cached, discount=discount),
            )
            why = schemacheck.problem(want, self.job.url, body) if want is not None else None
            if why is not None:
                fields.update(status=Item.Status.FAILED, error_code=schemacheck.INVALID_OUTPUT, error_message=why)
            return fields
        detail = error or ((body or {}).get("error") if isinstance(body, dict) else None) or {}
        if not isinstance(detail, dict):
            detail = {"message": str(detail)}
        code = str(detail.get("code") or (f"http_{status_code}" if status_code else "batch_error"))[:100]
        message = str(detail.get("message") or "The batch reported this request as failed.")[:2000]
        expired = code == "batch_expired"
        fields.update(
            status=Item.Status.EXPIRED if expired else Item.Status.FAILED, error_code=code, error_message=message
        )
        return fields

    def _finish_chunk(self, chunk: RemoteBatch, status: str, errors: list | None = None, gone: bool = False) -> None:
        """Settle the items no result line mentioned, by the batch's final status, and mark the chunk collected."""
        leftover = Item.objects.filter(remote_batch=chunk, status=Item.Status.RUNNING, lease_token__isnull=True)
        # Before the job's lock: a refusal's lesson reads every request of the chunk.
        wait = (
            status == RB.FAILED
            and not gone
            and _refused_for_tokens(errors or [])
            and self._wait_for_room(chunk, errors)
        )
        with transaction.atomic():
            current = Job.lock(self.job.pk)
            switched = Job.objects.filter(pk=self.job.pk, switched_at__isnull=False).exists()
            now = clock.now()
            changes: dict[str, int] = defaultdict(int)
            # Requests the Batch API did not answer and that are still wanted go back to pending: live slices
            # take them (a switched hybrid job), or a new chunk does.
            # Not a batch the endpoint lost track of: its requests may have run there, and would be paid twice.
            again = (
                current != Job.Status.CANCELLING
                and not gone
                and (switched or wait or (status == RB.EXPIRED and self.job.mode == Job.Mode.HYBRID))
            )
            if gone:
                n = leftover.update(
                    status=Item.Status.FAILED,
                    error_code="batch_gone",
                    error_message=str((errors or [{}])[0].get("message") or "The endpoint lost the batch.")[:2000],
                    finished_at=now,
                )
                changes["n_failed"] += n
            elif again:
                n = leftover.update(status=Item.Status.PENDING, remote_batch=None)
                changes["n_pending"] += n
                self.released += n
            elif status == RB.CANCELLED or current == Job.Status.CANCELLING:
                n = leftover.update(status=Item.Status.CANCELLED, finished_at=now)
                changes["n_cancelled"] += n
            elif status == RB.EXPIRED:
                n = leftover.update(
                    status=Item.Status.EXPIRED,
                    error_code="batch_expired",
                    error_message="This request could not be executed before the completion window expired.",
                    finished_at=now,
                )
                changes["n_expired"] += n
            elif status == RB.FAILED:
                n = self._fail_by_line(chunk, errors or [], now)
                changes["n_failed"] += n
            else:
                n = leftover.update(
                    status=Item.Status.FAILED,
                    error_code="missing_result",
                    error_message="The batch ended without a result for this request.",
                    finished_at=now,
                )
                changes["n_failed"] += n
            changes["n_running"] -= n
            if n:
                self.job.add_to_counters(**changes)
            RemoteBatch.objects.filter(pk=chunk.pk).update(status=status, collected_at=now, errors=errors or [])
            self._show_remote_counts()  # what is left of its request_counts no longer counts: its items are settled
        chunk.collected_at = now
        log.info("job %s chunk %s: %s, collected", self.job.pk, chunk.number, status)
        if settings.BATCHSITE_REMOTE_DELETE_FILES and not gone:  # (a gone chunk's client may be another's)
            self._delete_files(chunk)

    def _delete_files(self, chunk: RemoteBatch) -> None:
        """The batch's files at the endpoint, once its results are here: best effort, as nothing depends on it
        (a file left behind costs the endpoint's storage, not a result)."""
        for file_id in dict.fromkeys(f for f in (chunk.input_file_id, chunk.output_file_id, chunk.error_file_id) if f):
            try:
                self.client.files.delete(file_id, timeout=CONTROL_TIMEOUT)
            except (openai.APIError, httpx2.HTTPError) as e:
                log.info(
                    "job %s chunk %s: file %s not deleted at the endpoint: %s", self.job.pk, chunk.number, file_id, e
                )

    def _wait_for_room(self, chunk: RemoteBatch, errors: list | None) -> bool:
        """A batch refused for the model's enqueued-token limit ("try again once some in_progress batches have
        been completed"). True: its requests wait for a new chunk, planned under a lower budget (90% of what was
        refused, and of the limit the endpoint states, never below the chunk's largest request), after a pause
        that doubles with each refusal. False: one request, with nothing else of ours enqueued, is refused on
        its own: it fails saying why (waiting would never end)."""
        others = self._enqueued_tokens(chunk)
        if chunk.n_items <= 1 and others == 0:
            return False
        model = chunk.model
        refused_at = others + chunk.est_tokens
        ceiling = min(n for n in (refused_at, self.endpoint.token_limit(model), _stated_limit(errors or [])) if n)
        limit = max(int(ceiling * 0.9), self._largest_request(chunk), 1)
        with transaction.atomic():
            learned = Endpoint.objects.select_for_update().values_list("learned_token_limits", flat=True)
            limits = dict(learned.get(pk=self.endpoint.pk) or {})
            limits[model] = min(limit, limits.get(model) or limit)
            Endpoint.objects.filter(pk=self.endpoint.pk).update(learned_token_limits=limits)
        self.endpoint.learned_token_limits = limits
        key = _token_wait_key(self.endpoint.pk, model)
        refusals = (cache.get(key + ":n") or 0) + 1
        cache.set(key + ":n", refusals, timeout=3600)
        wait = min(max(settings.BATCHSITE_REMOTE_POLL_SECONDS, 1) * 2 ** (refusals - 1), BACKOFF_CAP)
        cache.set(key, True, timeout=max(1, int(wait)))
        log.info(
            "endpoint %s: enqueued-token limit for %s now taken as %s; next batch in %.0f s",
            self.endpoint.pk,
            model,
            limits[model],
            wait,
        )
        return True

    def _largest_request(self, chunk: RemoteBatch) -> int:
        rows = Item.objects.filter(remote_batch=chunk).values_list("body", "est_tokens").iterator(PLAN_ROWS)
        return max((remoteplan.request_tokens(json.loads(body), est) for body, est in rows), default=0)

    def _fail_by_line(self, chunk: RemoteBatch, errors: list, now) -> int:
        """A batch that failed validation: each item fails with the error naming its line of the chunk's file
        (1-based), or with the batch's general error (a token limit, say)."""
        general = [e for e in errors if not e.get("line")]
        fallback = (
            general[0]
            if general
            else (errors[0] if errors else {"code": "batch_failed", "message": "The batch failed."})
        )
        by_line = {e["line"]: e for e in errors if isinstance(e.get("line"), int)}
        n = 0
        rows = Item.objects.filter(remote_batch=chunk).order_by("line").values_list("id", "status")
        for position, (item_id, status) in enumerate(rows, start=1):  # the chunk's file lists its items by line
            if status != Item.Status.RUNNING:
                continue
            error = by_line.get(position, fallback)
            message = str(error.get("message") or "")
            if error.get("line"):
                message = f"Line {error['line']} of batch {chunk.batch_id or chunk.number}: {message}"
            n += Item.objects.filter(id=item_id, status=Item.Status.RUNNING).update(
                status=Item.Status.FAILED,
                error_code=str(error.get("code") or "invalid_request")[:100],
                error_message=message[:2000],
                attempts=F("attempts") + 1,
                finished_at=now,
            )
        return n

    # After the round

    def _show_remote_counts(self) -> None:
        """The job's remote_completed/remote_failed: what its batches report done and is not joined yet. A final
        batch counts until it is collected; one being collected counts what is left (_join lowers its counts)."""
        active = self.job.remote_batches.filter(collected_at__isnull=True)
        sums = active.aggregate(c=Sum("n_completed"), f=Sum("n_failed"))
        counts = {"remote_completed": sums["c"] or 0, "remote_failed": sums["f"] or 0}
        changed = ~Q(**counts)
        Job.objects.filter(changed, pk=self.job.pk).update(**counts)

    def after_round(self) -> None:
        """The job's view of its remote batches, a live start for items handed back, and the end of the job."""
        self._show_remote_counts()
        if self.released and self.job.switched_at is not None:
            Job.start_slices(self.job.pk)  # live slices for them (else a new chunk takes them, next round)
        done = Q(n_pending=0, n_running=0, status__in=[Job.Status.RUNNING, Job.Status.CANCELLING])
        if Job.objects.filter(done, pk=self.job.pk).exists():
            Job.finalize_if_done(self.job.pk)
