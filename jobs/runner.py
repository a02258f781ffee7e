"""Live execution of one slice of a job: claim items, send them concurrently, store the results.

One slice runs in one django-q2 task (see tasks.py): it claims work until its time budget is
spent, then enqueues its successor and finishes the requests it has in flight. A slice that ends
early (nothing left to claim) enqueues a successor anyway while items are pending, so a job always
has a slice or is finalized (settle()). Inside, asyncio
keeps up to `concurrency` requests going through one AsyncOpenAI client with max_retries=0:
retries, backoff and the classification of failures are ours, because the SDK's rules (give up
on a Retry-After over 120 s, retry every 429 including insufficient_quota) are wrong for a batch.
A rate-limit 429 is back-pressure, not an attempt; server errors, timeouts and lost connections have
a budget of their own (BATCHSITE_TRANSIENT_ATTEMPTS); see the README's "Failures and retries".

Every database call runs on one worker thread (Django's ORM is synchronous); results are
written in batches of up to a few hundred, a fraction of a second apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import functools
import hashlib
import json
import logging
import math
import random
import ssl
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import aiohttp
import httpx2
import openai
from django.conf import settings
from django.db import connection, connections, transaction
from django.db.models import Q
from django.utils import timezone

from jobs import egress, leases, tokens
from jobs.leases import TRANSIENT_DB_ERRORS, Claimed, Outcome
from jobs.models import Endpoint, InvalidTransition, Item, Job
from jobs.pricing import PriceBook
from jobs.ratelimit import Limiter

log = logging.getLogger(__name__)

BACKOFF_BASE = 0.25
BACKOFF_CAP = 60.0
# Over each window, a slice whose answers were more than a third 429s (of at least AIMD_MIN_ANSWERS)
# cuts the endpoint's shared send rate (ratelimit.py).
AIMD_WINDOW_SECONDS = 1.0
AIMD_MIN_ANSWERS = 20
FIRST_REQUEST_HEAD_START = 0.005
HELD_PER_SLOT = 4  # requests a slice holds (sent or waiting for a retry) per concurrency slot, at most
FLUSH_SECONDS = 0.25
FLUSH_SIZE = 250
STATUS_CHECK_SECONDS = 1.0
INTERNAL_ERROR_RETRY_SECONDS = 30.0
DB_PATIENCE = 30.0  # how long a transient database error is tried again (_patiently)

RETRY, PERMANENT, STOP = "retry", "permanent", "stop"
QUOTA_CODES = {"insufficient_quota", "credit_balance_exhausted", "billing_hard_limit_reached"}

# Limiter keys of endpoints that answered without rate-limit headers, in this worker process: their
# slices need not send one request alone first to find out their limits.
_SENDS_NO_LIMITS: set[str] = set()


@dataclass
class UpstreamError(Exception):
    """A failed attempt, and what it means: retry the item, fail it for good, or stop the whole job."""

    kind: str
    message: str
    http_status: int | None = None
    body: str = ""
    code: str = ""
    retry_after: float | None = None
    request_id: str = ""


MAX_RETRY_AFTER = 86_400.0  # a day: a longer wait is a broken header, not advice


def retry_after_seconds(headers) -> float | None:
    """retry-after-ms, then retry-after (seconds or an HTTP date), whatever their size up to a day."""
    seconds = None
    if value := headers.get("retry-after-ms"):
        seconds = _number(value, scale=1000.0)
    if seconds is None and (value := headers.get("retry-after")):
        seconds = _number(value)
        if seconds is None:
            try:
                seconds = (email.utils.parsedate_to_datetime(value) - timezone.now()).total_seconds()
            except (TypeError, ValueError):
                return None
    if seconds is None or math.isnan(seconds):
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


def _number(text: str, scale: float = 1.0) -> float | None:
    try:
        return float(text) / scale
    except ValueError:
        return None


def _error_fields(text: str) -> tuple[str, str, str]:
    """(code, type, message) of an OpenAI-shaped error body; empty strings when it is not one."""
    try:
        error = json.loads(text).get("error")
    except (ValueError, AttributeError):
        return "", "", text[:500]
    if isinstance(error, str):
        return "", "", error
    if not isinstance(error, dict):
        return "", "", text[:500]
    return str(error.get("code") or ""), str(error.get("type") or ""), str(error.get("message") or "")


def one_line(text: str) -> str:
    """A JSON body re-encoded compactly, on one line. Servers pretty-print errors (OpenAI does), and the
    JSONL exports need one record per line. Text that is not JSON stays as it is: the export wraps it
    in an error object as a JSON string."""
    try:
        return json.dumps(json.loads(text), ensure_ascii=False, separators=(",", ":"))
    except ValueError:
        return text


def classify(status: int, text: str, headers) -> UpstreamError:
    code, kind, message = _error_fields(text)
    request_id = headers.get("x-request-id", "")
    common = dict(http_status=status, body=one_line(text), request_id=request_id)
    if status == 429 and (code in QUOTA_CODES or kind in QUOTA_CODES):
        return UpstreamError(
            STOP,
            "The API account has run out of quota (insufficient_quota). Add credit or raise the usage "
            "limit, then resume the job.",
            code=code or kind,
            **common,
        )
    if status == 401:
        return UpstreamError(
            STOP,
            "The endpoint rejected the API key (401 Unauthorized). Fix the key on the Endpoints page, "
            "then resume the job.",
            code=code or "invalid_api_key",
            **common,
        )
    if status == 403:
        detail = f": {message}" if message else ""
        return UpstreamError(
            STOP,
            f"The endpoint refused access (403 Forbidden){detail}. Check the key's permissions, then resume the job.",
            code=code or "forbidden",
            **common,
        )
    if status in (408, 409, 429) or status >= 500:
        return UpstreamError(
            RETRY,
            message or f"HTTP {status}",
            code=code or f"http_{status}",
            retry_after=retry_after_seconds(headers),
            **common,
        )
    return UpstreamError(PERMANENT, message or f"HTTP {status}", code=code or f"http_{status}", **common)


def backoff(attempt: int) -> float:
    """Exponential with jitter: 0.25, 0.5, 1 ... 60 s, each shortened by up to half at random."""
    return min(BACKOFF_CAP, BACKOFF_BASE * 2 ** max(attempt - 1, 0)) * random.uniform(0.5, 1.0)


def usage_of(url: str, body: dict) -> tuple[int, int, int]:
    """(prompt, completion, cached) tokens from a response's usage block, for every endpoint shape."""
    usage = body.get("usage") or {}
    if url == "/v1/responses":
        details = usage.get("input_tokens_details") or {}
        return usage.get("input_tokens") or 0, usage.get("output_tokens") or 0, details.get("cached_tokens") or 0
    details = usage.get("prompt_tokens_details") or {}
    return usage.get("prompt_tokens") or 0, usage.get("completion_tokens") or 0, details.get("cached_tokens") or 0


class Slice:
    def __init__(
        self,
        job: Job,
        endpoint: Endpoint,
        lease: uuid.UUID,
        budget: float,
        db: ThreadPoolExecutor,
        slices: int,
        gen: int,
    ):
        self.job_id = job.pk
        self.gen = gen
        self.url = job.url
        self.path = job.url.removeprefix("/v1")
        self.max_attempts = job.max_attempts
        self.endpoint = endpoint
        self.lease = lease
        self.db_executor = db
        # The endpoint's concurrency is shared by the job's slices, which usually run at the same time.
        # `slices` comes with the task from whoever started the job, so every slice agrees on it.
        self.slices = max(1, slices)
        self.concurrency = max(1, -(-endpoint.concurrency // self.slices))
        self.started = time.monotonic()
        self.deadline = self.started + budget
        self.deadline_wall = time.time() + budget  # the same moment, for the shared rate-limit store
        # The key names the server too, so budgets never carry over to a different server.
        key = f"endpoint-{endpoint.pk}-{hashlib.sha1(endpoint.base_url.encode()).hexdigest()[:8]}"
        self.limiter = Limiter(key, endpoint.rpm, endpoint.tpm, endpoint.learned_rpm, endpoint.learned_tpm)
        # Until the endpoint's limits are known, one request goes alone and its headers tell them:
        # a blind burst of `concurrency` requests would draw as many 429s from a spent budget.
        self.limits_known = asyncio.Event()
        if self.limiter.paced or key in _SENDS_NO_LIMITS:
            self.limits_known.set()
        self.probing = False
        self.prices: PriceBook | None = None
        self.draining = asyncio.Event()  # set: pause, cancel, stop or superseded; nothing new is sent
        self.booked = False  # the endpoint's budget is spoken for up to the deadline: claim nothing more
        self.stop_reason = ""
        self.handed_over = False
        self.outcomes: list[Outcome] = []
        self.flushing = asyncio.Lock()  # one write at a time, in the order the outcomes came
        self.closing = asyncio.Event()  # set: the slice is done; the flusher stores what is left and stops
        self.more_to_claim = True
        self.cooldown_shown = 0.0
        self.sent = 0
        self.window_start, self.window_answers, self.window_limited = time.monotonic(), 0, 0
        self.waiting = 0  # requests in flight that wait for a retry: they hold no concurrency slot
        self.in_flight: set[asyncio.Task] = set()  # the slice's requests: being sent, or waiting for a retry
        self.slot_opened = asyncio.Event()  # replaced by a new one each time it is set (see _open_slot)
        # Until when the slice's leases certainly hold: a claim or a heartbeat that started at t renews them to
        # t + lease. Past it (heartbeats failing: a database stalled for longer than a lease) the sweeper may
        # have handed the items to another slice, which may be sending them: send nothing more (_lease_lapsing).
        self.leased_until = self.started + leases.lease_seconds()

    async def db(self, fn, *args, patience: float = DB_PATIENCE):
        """Run `fn` on the slice's database thread, patiently (see _patiently)."""
        call = functools.partial(_patiently, fn, *args, patience=patience)
        return await asyncio.get_running_loop().run_in_executor(self.db_executor, call)

    async def run(self) -> None:
        self.prices = await self.db(PriceBook.load)
        self.client = openai.AsyncOpenAI(
            api_key=self.endpoint.api_key or "none",
            base_url=self.endpoint.base_url,
            max_retries=0,
            # aiohttp's transport: httpcore's pool probes every idle connection's socket on each request,
            # which at a concurrency of 100 cost more CPU than the rest of the request (bench/throughput.py).
            http_client=openai.DefaultAioHttpClient(
                verify=_tls_context(), timeout=httpx2.Timeout(settings.BATCHSITE_REQUEST_TIMEOUT, connect=15.0)
            ),
        )
        flusher = asyncio.create_task(self._flush_loop())
        # Heartbeats on a thread and connection of their own: behind a slow flush on the slice's database
        # thread they would come late, and a lease that runs out makes another slice send the same items.
        beats = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"slice-beat-{self.job_id}")
        heart = asyncio.create_task(self._heartbeat_loop(beats))
        in_flight = self.in_flight
        queue: deque[Claimed] = deque()
        last_check = 0.0
        try:
            while not self.draining.is_set():
                now = time.monotonic()
                if now - last_check >= STATUS_CHECK_SECONDS:
                    last_check = now
                    if not await self.db(_wanted, self.job_id, self.gen):
                        self.draining.set()
                        break
                if now >= self.deadline:
                    await self._hand_over()
                    break
                if self.booked:  # no rate-limit slot left before the deadline (_wait_for_slot): claim no more
                    await self._wait(in_flight, self.deadline - now)
                    continue
                if self._full(in_flight):
                    if len(queue) < self.concurrency // 2 and self.more_to_claim:
                        # Claim the next batch while every slot is busy, so that freed slots are
                        # refilled at once instead of waiting on the database.
                        claimed = await self.db(leases.claim, self.job_id, self.lease, self.concurrency - len(queue))
                        self.more_to_claim = bool(claimed)
                        queue.extend(claimed)
                        continue
                    await self._wait(in_flight, STATUS_CHECK_SECONDS)
                    continue
                if not queue:
                    claimed = await self.db(leases.claim, self.job_id, self.lease, self.concurrency)
                    self.more_to_claim = bool(claimed)
                    queue.extend(claimed)
                if queue:
                    while queue and not self._full(in_flight):
                        task = asyncio.create_task(self._process_safely(queue.popleft()))
                        in_flight.add(task)
                        task.add_done_callback(self._finished)
                        if not self.sent and len(in_flight) == 1:
                            # The slice's first request goes out on its own: started together, the
                            # concurrency's worth of requests would each be built (a few ms of CPU apiece)
                            # before the first of them reached the wire.
                            await asyncio.sleep(FIRST_REQUEST_HEAD_START)
                    continue
                if in_flight:
                    await self._wait(in_flight, STATUS_CHECK_SECONDS)
                    continue
                # Nothing to claim. Store what this slice released first: until then those items still
                # look held (running), and the slice would leave while they wait for their retry.
                await self._flush()
                due = await self.db(leases.next_due, self.job_id)
                if due is None:
                    if not await self.db(_held_elsewhere, self.job_id):
                        break  # nothing pending, nothing running: done (settle() finalizes the job)
                    # Other slices hold the rest and may hand some back for a retry after they have
                    # handed over, with no successor of their own left to take it: stay and look again.
                    due = timezone.now() + timedelta(seconds=STATUS_CHECK_SECONDS)
                # Wait here, up to the deadline, for the earliest retry: a successor would only find the
                # same nothing to do, and hand over again, for as long as a Retry-After lasts.
                wait = (due - timezone.now()).total_seconds()
                await self._sleep(min(max(wait, 0.05), STATUS_CHECK_SECONDS, max(self.deadline - now, 0.0)))
        finally:
            if queue:
                try:
                    await self.db(leases.release, self.job_id, self.lease, list(queue))
                except TRANSIENT_DB_ERRORS:
                    log.exception(
                        "Job %s: could not release %d unsent items; their leases will run out", self.job_id, len(queue)
                    )
            while in_flight:  # finish what was claimed; a pause still stops what has not been sent
                await asyncio.wait(in_flight, timeout=STATUS_CHECK_SECONDS)
                if in_flight and not self.draining.is_set():
                    try:
                        if not await self.db(_wanted, self.job_id, self.gen):
                            self.draining.set()
                    except TRANSIENT_DB_ERRORS:
                        pass  # asked again in a second
            self.closing.set()
            await flusher  # never cancel it mid-write: the batch it holds would be lost
            heart.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heart
            await asyncio.get_running_loop().run_in_executor(beats, connections.close_all)  # its own connection
            beats.shutdown()
            try:
                # Past the leases' end another slice may own the items: writing would change nothing.
                await self._flush(patience=leases.lease_seconds())
            except TRANSIENT_DB_ERRORS:
                log.exception(
                    "Job %s: %d results could not be stored; their items will run again",
                    self.job_id,
                    len(self.outcomes),
                )
            await self.client.close()

    def _full(self, in_flight: set[asyncio.Task]) -> bool:
        """No room for another request: as many are being sent as the concurrency allows, or so many more
        wait for a retry that claiming further would take the job's work away from other slices."""
        return (
            len(in_flight) - self.waiting >= self._concurrency_now()
            or len(in_flight) >= HELD_PER_SLOT * self.concurrency
        )

    def _open_slot(self) -> None:
        """Wake everyone waiting for a free slot (the run loop, requests back from a retry wait)."""
        self.slot_opened.set()
        self.slot_opened = asyncio.Event()

    def _finished(self, task: asyncio.Task) -> None:
        self.in_flight.discard(task)
        self._open_slot()

    async def _wait_for_retry(self, due: float) -> bool:
        """Sleep until `due` (monotonic) holding no concurrency slot, then wait for a free one. False if the
        slice started draining meanwhile."""
        self.waiting += 1
        self._open_slot()
        try:
            if not await self._sleep(due - time.monotonic()):
                return False
            while len(self.in_flight) - self.waiting >= self._concurrency_now():
                opened = self.slot_opened
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(opened.wait(), STATUS_CHECK_SECONDS)
                if self.draining.is_set():
                    return False
            return True
        finally:
            self.waiting -= 1

    async def _wait(self, in_flight: set[asyncio.Task], seconds: float) -> None:
        """Until a request finishes or starts waiting for a retry, or `seconds` (at most a status check's
        interval) have passed."""
        seconds = min(max(seconds, 0.0), STATUS_CHECK_SECONDS)
        if in_flight:
            opened = asyncio.ensure_future(self.slot_opened.wait())
            await asyncio.wait({*in_flight, opened}, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
            opened.cancel()
        else:
            await self._sleep(seconds)

    async def _hand_over(self) -> None:
        """Enqueue the next slice now, so new work starts while this one finishes its requests."""
        from jobs import tasks

        self.handed_over = await self.db(tasks.enqueue_slice, self.job_id, self.slices, self.gen)

    async def _sleep(self, seconds: float) -> bool:
        """Sleep unless the slice starts draining first; False if it did."""
        if seconds <= 0:
            return not self.draining.is_set()
        try:
            await asyncio.wait_for(self.draining.wait(), timeout=seconds)
            return False
        except TimeoutError:
            return True

    async def _process_safely(self, item: Claimed) -> None:
        try:
            await self._process(item)
        except Exception as e:
            # A bug must neither strand the item as running until its lease expires nor send it forever:
            # the crash counts as an attempt, and the item fails once it is out of attempts.
            log.exception("Job %s: item %s crashed the runner", self.job_id, item.id)
            self.limits_known.set()  # in case it was the request finding out the limits: nobody waits forever
            attempts = item.attempts + 1
            error = UpstreamError(
                PERMANENT, f"Batchsite could not process this request ({type(e).__name__}: {e}).", code="internal_error"
            )
            if attempts >= self.max_attempts:
                self._failed(item, attempts, 0, error, None)
            else:
                self._release(item, attempts, 1, error, INTERNAL_ERROR_RETRY_SECONDS)

    async def _process(self, item: Claimed) -> None:
        body = json.loads(item.body)
        model = body.get("model", "")
        # What the endpoint charges against its token budget when the request arrives.
        cost = item.est_tokens + tokens.max_output_tokens(body)
        # `attempts` counts the sends that were answered (or timed out, or lost their connection) other
        # than with a rate-limit 429: what a job's max_attempts limits, and what the item shows.
        attempts, retries, limited = item.attempts, 0, 0
        last: UpstreamError | None = None
        while True:
            probe = self._probe()
            if not await self._wait_for_slot(cost, probe) or self._lease_lapsing():
                if probe:
                    self.limits_known.set()
                return self._release(item, attempts, retries, last)
            self.sent += 1
            started = time.perf_counter()
            answered = False
            last_headers = {}
            try:
                response = await self.client.post(self.path, body=body, cast_to=httpx2.Response)
                answered = True
                latency = int((time.perf_counter() - started) * 1000)
                self._count_answer(False)
                return self._succeeded(item, model, response, attempts + 1, retries, latency)
            except openai.APIStatusError as e:
                answered = True
                last_headers = e.response.headers
                last = classify(e.status_code, e.response.text, last_headers)
                self.limiter.observe(last_headers)
                self._count_answer(last.http_status == 429)
            except openai.APITimeoutError as e:
                last = _timeout_or_refused(e)
            except openai.APIConnectionError as e:
                last = UpstreamError(RETRY, f"Could not connect: {e.__cause__ or e}", code="connection_error")
            except _InvalidResponse as e:
                last = e.error
            finally:
                if probe:
                    self._limits_found(answered)
            answered_at = time.monotonic()
            latency = int((time.perf_counter() - started) * 1000)

            if last.kind == PERMANENT:
                return self._failed(item, attempts + 1, retries, last, latency)
            if last.kind == STOP:
                # Not the item's fault: no attempt counted; the job pauses.
                await self._stop_job(last.message)
                return self._release(item, attempts, retries, last)
            if last.http_status == 429:
                # Back-pressure, not the request's failure: it costs no attempt, and the request is tried
                # again for as long as the job runs. Only a spent budget holds back every sender.
                limited += 1
                delay = last.retry_after if last.retry_after is not None else backoff(limited)
                if self.limiter.spent(last_headers, cost):
                    self.limiter.cool_down(delay)
                    await self._show_cooldown(delay)
            else:
                attempts += 1
                delay = last.retry_after if last.retry_after is not None else backoff(attempts)
                if attempts >= max(self.max_attempts, settings.BATCHSITE_TRANSIENT_ATTEMPTS):
                    return self._failed(item, attempts, retries, last, latency)
            retries += 1  # counted once, here, whether the retry happens in this slice or a later one
            # Measured from the answer: the server asked for `delay` from then on, however long the
            # bookkeeping above took.
            due = answered_at + delay
            if due > self.deadline:
                # Too long to hold the item here: back to pending, due after the wait.
                return self._release(item, attempts, retries, last, due - time.monotonic())
            # While it waits, the request holds no concurrency slot: another one is sent in its place.
            if not await self._wait_for_retry(due):
                # Draining (pause, stop, a newer generation): whoever takes the item up next still owes
                # the server the rest of the wait.
                return self._release(item, attempts, retries, last, due - time.monotonic())

    def _count_answer(self, limited: bool) -> None:
        """AIMD's decrease: when over a second more than a third of this slice's answers were 429s (and
        they were enough to tell), the endpoint's send rate is cut for every sender. A few one-off 429s
        (a fifth of the answers, at random) leave it alone: they cost only their own requests' waits."""
        now = time.monotonic()
        if now - self.window_start >= AIMD_WINDOW_SECONDS:
            if self.window_answers >= AIMD_MIN_ANSWERS and self.window_limited * 3 > self.window_answers:
                self.limiter.slow_down()
            self.window_start, self.window_answers, self.window_limited = now, 0, 0
        self.window_answers += 1
        self.window_limited += limited

    def _concurrency_now(self) -> int:
        """The slice's concurrency, cut by AIMD when the endpoint has no known rate to slow down instead."""
        if self.limiter.paced:
            return self.concurrency  # the factor stretches the rate limiter's slots instead
        return max(1, int(self.concurrency * self.limiter.factor()))

    def _probe(self) -> bool:
        """True for the one request that goes first, alone, while the endpoint's limits are unknown."""
        if self.limits_known.is_set() or self.probing:
            return False
        self.probing = True
        return True

    def _limits_found(self, answered: bool) -> None:
        if answered and not self.limiter.paced:
            _SENDS_NO_LIMITS.add(self.limiter.key)  # no rate-limit headers: nothing to find out next time
        self.limits_known.set()

    async def _wait_for_slot(self, cost: int, probe: bool) -> bool:
        """Wait for the endpoint's budget (and any cool-down after a 429). False: give the item back,
        because the slice is draining or because no slot is free before its deadline."""
        if not probe and not self.limits_known.is_set():
            await _first_of(self.limits_known, self.draining)
        while not self.draining.is_set():
            # Never reserve past the deadline: a slot the slice cannot use would be lost to every sender,
            # and waiting for it would keep the slice alive past its task's time limit.
            delay = self.limiter.reserve(cost, latest=self.deadline_wall)
            if delay == math.inf:
                self.booked = True
                return False
            if delay <= 0:
                return True
            if not await self._sleep(delay):
                return False
            if self.limiter.paced:
                return True
            # Unpaced, the wait was a cool-down, which another 429 may have extended: ask again.
        return False

    async def _show_cooldown(self, seconds: float) -> None:
        """Keep Endpoint.cooldown_until (shown in the admin) up to date, with a write only when it moves
        on by a second or more, not one per 429."""
        until = time.time() + seconds
        if until < self.cooldown_shown + 1.0:
            return
        self.cooldown_shown = until
        try:
            await self.db(_set_cooldown, self.endpoint.pk, until, patience=0)
        except TRANSIENT_DB_ERRORS:
            pass  # only a display; the next 429 tries again

    def _succeeded(self, item, model, response, attempts, retries, latency) -> None:
        text = response.text
        try:
            data = json.loads(text)
            if not isinstance(data, dict):
                raise ValueError("not an object")
        except ValueError:
            raise _InvalidResponse(
                UpstreamError(RETRY, "The endpoint answered 200 with a body that is not JSON.", code="invalid_response")
            ) from None
        if "\n" in text or "\r" in text:  # the JSONL exports splice stored bodies in as they are: one line
            text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
        self.limiter.observe(response.headers)
        prompt, completion, cached = usage_of(self.url, data)
        self.outcomes.append(
            Outcome(
                item.id,
                Item.SUCCEEDED,
                attempts,
                http_status=response.status_code,
                response=text,
                request_id=response.headers.get("x-request-id", ""),
                prompt_tokens=prompt,
                completion_tokens=completion,
                cached_tokens=cached,
                cost=self.prices.cost(data.get("model") or model, prompt, completion, cached),
                latency_ms=latency,
                retries=retries,
            )
        )

    def _failed(self, item, attempts, retries, error: UpstreamError, latency) -> None:
        self.outcomes.append(
            Outcome(
                item.id,
                Item.FAILED,
                attempts,
                http_status=error.http_status,
                response=error.body,
                request_id=error.request_id,
                error_code=error.code,
                error_message=error.message,
                latency_ms=latency,
                retries=retries,
            )
        )

    def _release(self, item, attempts, retries, error: UpstreamError | None, delay: float = 0) -> None:
        self.outcomes.append(
            Outcome(
                item.id,
                Item.PENDING,
                attempts,
                http_status=error.http_status if error else None,
                error_code=error.code if error else "",
                error_message=error.message if error else "",
                next_attempt_at=timezone.now() + timedelta(seconds=delay) if delay > 0 else None,
                retries=retries,
            )
        )

    async def _stop_job(self, reason: str) -> None:
        if not self.stop_reason:
            self.stop_reason = reason
            self.draining.set()
            await self.db(_pause_job, self.job_id, reason)

    async def _flush(self, patience: float = DB_PATIENCE) -> None:
        async with self.flushing:
            if not self.outcomes:
                return
            batch, self.outcomes = self.outcomes, []
            try:
                try:
                    await self.db(leases.write, self.job_id, self.lease, batch, patience=patience)
                except TRANSIENT_DB_ERRORS:
                    raise
                except Exception:  # one row the database refuses must not cost the batch (nor kill the flusher)
                    log.exception(
                        "Job %s: a batch of %d results was refused; storing them one by one", self.job_id, len(batch)
                    )
                    await self.db(leases.write_each, self.job_id, self.lease, batch, patience=patience)
            except TRANSIENT_DB_ERRORS:
                self.outcomes[:0] = batch  # kept, ahead of newer ones, for the next try
                raise

    async def _flush_loop(self) -> None:
        while not self.closing.is_set():
            with contextlib.suppress(TimeoutError):  # woken early at the end: the job's last results go at once
                await asyncio.wait_for(self.closing.wait(), FLUSH_SECONDS)
            try:
                await self._flush()
            except TRANSIENT_DB_ERRORS:
                log.exception("Job %s: results not stored yet; trying again", self.job_id)

    async def _heartbeat_loop(self, beats: ThreadPoolExecutor) -> None:
        interval = max(leases.lease_seconds() / 4, 1)
        while True:
            await asyncio.sleep(interval)
            started = time.monotonic()
            call = functools.partial(_patiently, _heartbeat, self.job_id, self.lease, patience=interval)
            try:
                await asyncio.get_running_loop().run_in_executor(beats, call)
                self.leased_until = started + leases.lease_seconds()
            except TRANSIENT_DB_ERRORS:
                log.exception("Job %s: heartbeat missed; trying again at the next beat", self.job_id)

    def _lease_lapsing(self) -> bool:
        """True once the leases may run out before a request now sent is answered: heartbeats have failed
        for most of a lease. The slice then sends nothing more and finishes; its successor claims afresh."""
        if time.monotonic() < self.leased_until - leases.lease_seconds() / 4:
            return False
        if not self.draining.is_set():
            log.warning("Job %s: heartbeats failing, the slice's leases may run out; it stops sending", self.job_id)
            self.draining.set()
        return True


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """One TLS context per process: loading the CA bundle takes 50-150 ms, which every slice's new HTTP
    client would otherwise spend before its first request."""
    return httpx2.create_ssl_context()


async def _first_of(*events: asyncio.Event) -> None:
    waits = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()


def _timeout_or_refused(error: openai.APITimeoutError) -> UpstreamError:
    """The aiohttp transport reports a refused connection as a connect timeout: say which it was."""
    cause = error.__cause__
    while cause is not None and not isinstance(cause, aiohttp.ClientConnectorError):
        cause = cause.__cause__
    if cause is not None:
        return UpstreamError(RETRY, f"Could not connect: {cause}", code="connection_error")
    return UpstreamError(RETRY, "The request timed out.", code="timeout")


class _InvalidResponse(Exception):
    def __init__(self, error: UpstreamError):
        self.error = error


def _wanted(job_id: int, gen: int) -> bool:
    """Whether the job still wants this slice: it is running, and no newer generation of slices replaced it."""
    return Job.objects.filter(pk=job_id, status=Job.RUNNING, slice_gen=gen).exists()


def _held_elsewhere(job_id: int) -> bool:
    """Items of the job are running under another slice's lease (or a dead one's, until it expires)."""
    return Job.objects.filter(pk=job_id, n_running__gt=0).exists()


def _drop_broken_connection() -> None:
    connection.close_if_unusable_or_obsolete()


def _set_cooldown(endpoint_id: int, until: float) -> None:
    moment = datetime.fromtimestamp(until, tz=UTC)
    later = Q(cooldown_until__isnull=True) | Q(cooldown_until__lt=moment)
    Endpoint.objects.filter(later, pk=endpoint_id).update(cooldown_until=moment)


def _heartbeat(job_id: int, lease: uuid.UUID) -> None:
    leases.heartbeat(lease)
    Job.objects.filter(pk=job_id).update(heartbeat_at=timezone.now())


def _pause_job(job_id: int, reason: str) -> None:
    job = Job.objects.get(pk=job_id)
    try:
        job.transition(Job.PAUSED, reason=reason)
        log.warning("Job %s paused itself: %s", job_id, reason)
    except InvalidTransition:
        pass  # already paused or cancelled by someone else


def run_slice(job_id: int, budget: float | None = None, slices: int | None = None, gen: int | None = None) -> dict:
    """Run one slice of a live job; return a summary (for logs and tests).

    `gen` is the generation of slices the task belongs to (tasks.start_job); a task of an older one
    does nothing. None (a task enqueued before generations existed) means the current one."""
    job = Job.objects.select_related("endpoint").filter(pk=job_id).first()
    if job is None:
        return {"job": job_id, "skipped": "deleted"}
    gen = job.slice_gen if gen is None else gen
    if gen != job.slice_gen:
        return {"job": job_id, "skipped": "superseded"}
    if job.status == Job.QUEUED:
        try:
            job.transition(Job.RUNNING, started_at=job.started_at or timezone.now())
        except InvalidTransition:
            job.refresh_from_db()
    if job.status != Job.RUNNING:
        return {"job": job_id, "skipped": job.status}
    endpoint = job.endpoint or Endpoint.default()
    if endpoint is None:
        _pause_job(
            job_id, "No endpoint is configured. Add one on the Endpoints page (or set OPENAI_API_KEY), then resume."
        )
        return {"job": job_id, "skipped": "no endpoint"}
    try:
        endpoint.api_key  # noqa: B018 - decrypting now turns a changed SECRET_KEY into a clear pause
    except ValueError as e:
        _pause_job(job_id, str(e))
        return {"job": job_id, "skipped": "bad key"}
    try:  # checked again at each slice: the name may resolve elsewhere now than when the endpoint was saved
        egress.check_base_url(endpoint.base_url)
    except egress.UnsafeURL as e:
        _pause_job(job_id, f"The endpoint's base URL is refused: {e} Fix it on the Endpoints page, then resume.")
        return {"job": job_id, "skipped": "unsafe endpoint"}

    Job.objects.filter(pk=job_id).update(heartbeat_at=timezone.now())
    budget = settings.BATCHSITE_SLICE_SECONDS if budget is None else budget
    db = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"slice-db-{job_id}")
    work = Slice(job, endpoint, uuid.uuid4(), budget, db, slices or settings.BATCHSITE_SLICES_PER_JOB, gen)
    try:
        asyncio.run(work.run())
    except Exception as crash:
        if not work.sent and not isinstance(crash, TRANSIENT_DB_ERRORS):
            # It failed before sending anything: it would fail the same way again at once, slice after
            # slice. Say so on the job instead; resuming tries again.
            _pause_job(
                job_id, f"Batchsite could not run this job: {type(crash).__name__}: {crash}. Resume to try again."
            )
        raise
    finally:
        db.submit(connections.close_all).result()  # the slice thread's own connection
        db.shutdown()
        # Even after a crash: the chain must go on while items are pending.
        finished = _patiently(settle, job_id, gen, work.slices, work.handed_over)
        try:
            _remember_learned_limits(endpoint, work.limiter)
        except Exception:  # a nicety: the next slice learns them again
            log.exception("Job %s: could not store the learned limits", job_id)
    return {
        "job": job_id,
        "sent": work.sent,
        "handed_over": work.handed_over,
        "finished": finished,
        "stopped": work.stop_reason,
    }


def _patiently(fn, *args, patience: float = DB_PATIENCE):
    """`fn(*args)`, retrying transient database errors ("database is locked", a dropped connection)
    with a short backoff for up to `patience` seconds. A slice runs its calls this way on its database
    thread (Slice.db); a wait there holds back its other calls, which would meet the same lock."""
    give_up, pause = time.monotonic() + patience, 0.05
    while True:
        try:
            return fn(*args)
        except TRANSIENT_DB_ERRORS as e:
            if time.monotonic() + pause > give_up:
                raise
            log.warning("%s in %s; trying again in %.2f s", e, fn.__name__, pause)
            _drop_broken_connection()
            time.sleep(pause)
            pause = min(pause * 2, 2.0)


def settle(job_id: int, gen: int, slices: int, handed_over: bool) -> bool:
    """After a slice: finalize the job if nothing is left, else make sure a slice follows while items
    are pending. True if the job was finalized.

    A slice that did not hand over stopped because nothing was pending or held, or because it was told
    to stop. Items may have become pending in between (a retry of failed items), so it continues its
    chain while any are. Paused, cancelled or superseded jobs get no successor."""
    from jobs import tasks

    if finalize_if_done(job_id):
        return True
    if not handed_over and Job.objects.filter(pk=job_id, status=Job.RUNNING, slice_gen=gen, n_pending__gt=0).exists():
        tasks.enqueue_slice(job_id, slices, gen)
    return False


def _remember_learned_limits(endpoint: Endpoint, limiter: Limiter) -> None:
    learned = {}
    if limiter.learned.rpm and limiter.learned.rpm != endpoint.learned_rpm:
        learned["learned_rpm"] = limiter.learned.rpm
    if limiter.learned.tpm and limiter.learned.tpm != endpoint.learned_tpm:
        learned["learned_tpm"] = limiter.learned.tpm
    if learned:
        Endpoint.objects.filter(pk=endpoint.pk).update(**learned)


def finalize_if_done(job_id: int) -> bool:
    """Completed (or cancelled) once no item is pending or running; counters recomputed as a check.

    Under the job's row lock, so that items made pending again at the same moment (Job.retry_failed)
    either come first and keep the job running, or find it completed."""
    with transaction.atomic():
        job = Job.objects.select_for_update().filter(pk=job_id).first()
        if job is None or job.status not in (Job.RUNNING, Job.CANCELLING) or job.n_pending or job.n_running:
            return False
        job.recount()
        if job.n_pending or job.n_running:
            log.warning("Job %s counters had drifted; recounted", job_id)
            return False
        try:
            job.transition(Job.CANCELLED if job.status == Job.CANCELLING else Job.COMPLETED)
        except InvalidTransition:
            return False
    return True
