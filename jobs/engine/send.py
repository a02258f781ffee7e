"""Sending a slice's claimed items, each until it has an outcome: a result, a failure, or back to pending.

All requests go through one lean aiohttp client (wire.py), bounded and checked at connect time; retries are
ours (upstream.py).
A rate-limit 429 is back-pressure, not an attempt: the request is tried again for as long as the job
runs. Server errors, timeouts and lost connections have a budget of their own
(BATCHSITE_TRANSIENT_ATTEMPTS); other failures end the item at once, and an answer that says the job
cannot go on (no quota, a rejected key) pauses it. A request that waits for a retry holds no concurrency
slot: another one is sent in its place.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Mapping
from decimal import Decimal

import aiohttp
from django.conf import settings

from jobs import egress, tokens
from jobs.engine import database, schemacheck, upstream, wire
from jobs.engine.database import DatabaseThread
from jobs.engine.heartbeat import Heartbeat
from jobs.engine.leases import Claimed
from jobs.engine.pacing import Pacing, sleep_unless
from jobs.engine.results import Results
from jobs.engine.upstream import PERMANENT, RETRY, STOP, UpstreamError
from jobs.models import Endpoint, Job
from jobs.models.outcome import Outcome
from jobs.pricing import PriceBook

log = logging.getLogger(__name__)

FIRST_REQUEST_HEAD_START = 0.005
HELD_PER_SLOT = 4  # requests a slice holds (sent or waiting for a retry) per concurrency slot, at most
STATUS_CHECK_SECONDS = 1.0  # how often a waiting slice looks again (at the job, at a slot)
INTERNAL_ERROR_RETRY_SECONDS = 30.0


class Sender:
    client: wire.Client  # set by open()
    prices: PriceBook

    def __init__(
        self,
        job: Job,
        endpoint: Endpoint,
        deadline: float,
        draining: asyncio.Event,
        db: DatabaseThread,
        pacing: Pacing,
        results: Results,
        heartbeat: Heartbeat,
    ):
        self.job_id = job.pk
        self.url = job.url
        self.path = job.url.removeprefix("/v1")
        self.max_attempts = job.max_attempts
        self.output_retries = job.output_retries
        self.endpoint = endpoint
        self.deadline = deadline
        self.draining = draining
        self.db = db
        self.pacing = pacing
        self.results = results
        self.heartbeat = heartbeat
        self.sent = 0
        self.latencies: collections.deque[int] = collections.deque(maxlen=1000)  # ms, successful requests
        self.rate_limited = 0  # 429s answered to this slice
        self.stop_reason = ""
        self.in_flight: set[asyncio.Task[None]] = set()  # the slice's requests: being sent, or waiting for a retry
        self.waiting = 0  # requests in flight that wait for a retry: they hold no concurrency slot
        self.slot_opened = asyncio.Event()  # replaced by a new one each time it is set (see _open_slot)

    async def open(self) -> None:
        self.prices = await self.db.call(PriceBook.load)
        self.client = wire.Client(self.endpoint.base_url, self.endpoint.api_key, settings.BATCHSITE_REQUEST_TIMEOUT)

    async def close(self) -> None:
        await self.client.close()

    def full(self) -> bool:
        """No room for another request: as many are being sent as the concurrency allows, or so many more
        wait for a retry that claiming further would take the job's work away from other slices."""
        return (
            len(self.in_flight) - self.waiting >= self.pacing.concurrency_now()
            or len(self.in_flight) >= HELD_PER_SLOT * self.pacing.concurrency
        )

    async def start(self, item: Claimed) -> None:
        task = asyncio.create_task(self._send_safely(item))
        self.in_flight.add(task)
        task.add_done_callback(self._finished)
        if not self.sent and len(self.in_flight) == 1:
            # The slice's first request goes out on its own: started together, the concurrency's worth
            # of requests would each be built (a few ms of CPU apiece) before the first reached the wire.
            await asyncio.sleep(FIRST_REQUEST_HEAD_START)

    async def wait(self, seconds: float) -> None:
        """Until a request finishes or starts waiting for a retry, or `seconds` (at most a status check's
        interval) have passed."""
        seconds = min(max(seconds, 0.0), STATUS_CHECK_SECONDS)
        if self.in_flight:
            opened = asyncio.ensure_future(self.slot_opened.wait())
            await asyncio.wait({*self.in_flight, opened}, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
            opened.cancel()
        else:
            await sleep_unless(self.draining, seconds)

    def _open_slot(self) -> None:
        """Wake everyone waiting for a free slot (the claim loop, requests back from a retry wait)."""
        self.slot_opened.set()
        self.slot_opened = asyncio.Event()

    def _finished(self, task: asyncio.Task[None]) -> None:
        self.in_flight.discard(task)
        self._open_slot()

    async def _wait_for_retry(self, due: float) -> bool:
        """Sleep until `due` (monotonic) holding no concurrency slot, then wait for a free one. False if the
        slice started draining meanwhile."""
        self.waiting += 1
        self._open_slot()
        try:
            if not await sleep_unless(self.draining, due - time.monotonic()):
                return False
            while len(self.in_flight) - self.waiting >= self.pacing.concurrency_now():
                opened = self.slot_opened
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(opened.wait(), STATUS_CHECK_SECONDS)
                if self.draining.is_set():
                    return False
            return True
        finally:
            self.waiting -= 1

    async def _send_safely(self, item: Claimed) -> None:
        # Answers rejected for breaking their schema were paid for: whatever the send ends in (a result, back
        # to pending, a crash), its outcome carries them.
        spent = _Spent()
        try:
            outcome = await self._send(item, spent)
        except asyncio.CancelledError:
            # Handed back on shutdown (Slice._finish_in_flight): another node sends it again.
            released = dataclasses.replace(Outcome.released(item.id, item.attempts), cache_key=item.cache_key)
            self.results.add(spent.added_to(released))
            raise
        except Exception as e:
            # A bug must neither strand the item as running until its lease expires nor send it forever:
            # the crash counts as an attempt, and the item fails once it is out of attempts.
            log.exception("Job %s: item %s crashed the runner", self.job_id, item.id)
            self.pacing.limits_known.set()  # in case it was the request finding out the limits: nobody waits forever
            attempts = item.attempts + 1
            error = UpstreamError(
                PERMANENT, f"Batchsite could not process this request ({type(e).__name__}: {e}).", code="internal_error"
            )
            if attempts >= self.max_attempts:
                outcome = Outcome.failed(item.id, attempts, error)
            else:
                outcome = Outcome.retry_later(
                    item.id, attempts, retries=1, error=error, wait=INTERNAL_ERROR_RETRY_SECONDS
                )
        outcome = spent.added_to(outcome)
        outcome.cache_key = item.cache_key  # its answer goes into the answer cache, or its claim there is let go
        self.results.add(outcome)

    async def _send(self, item: Claimed, spent: _Spent) -> Outcome:
        body = json.loads(item.body)
        raw = item.body.encode()  # sent as stored: the request the user wrote, byte for byte
        model = body.get("model", "")
        # What an OpenAI-style endpoint charges against its token budget when the request arrives; the limiter
        # scales it by what this endpoint is learned to charge.
        estimate, output = tokens.rate_charge(self.url, body), tokens.rate_output(self.url, body)
        # `attempts` counts the sends that were answered (or timed out, or lost their connection) other
        # than with a rate-limit 429: what a job's max_attempts limits, and what the item shows.
        attempts, retries, limited = item.attempts, 0, 0
        last: UpstreamError | None = None
        want = schemacheck.wanted(self.url, body)
        invalid = 0  # answers that broke their schema: sent again, and added to `spent`
        while True:
            probe = self.pacing.start_probe()
            cost = self.pacing.limiter.charge(estimate, output)
            if not await self.pacing.wait_for_slot(cost, probe) or self.heartbeat.lapsing():
                if probe:
                    self.pacing.probe_done(answered=False)
                return Outcome.released(item.id, attempts, retries, last)
            self.sent += 1
            started = time.perf_counter()
            answered = False
            headers: Mapping[str, str] = {}
            try:
                response = await self.client.post(self.path, raw)
                answered = True
                if response.status >= 300:
                    headers = response.headers
                    last = upstream.classify(response.status, response.text, headers)
                    self.pacing.limiter.observe(headers)
                    if last.rate_limited:
                        self.pacing.limiter.refused(response.text, estimate, cost, output)
                    self.pacing.count_answer(last.rate_limited)
                else:
                    latency = int((time.perf_counter() - started) * 1000)
                    self.pacing.count_answer(limited=False)
                    outcome = self._succeeded(item, model, response, attempts + 1, retries, latency, want)
                    if outcome.error_code != schemacheck.INVALID_OUTPUT:
                        return outcome
                    invalid += 1
                    if invalid > self.output_retries:
                        return outcome
                    spent.add(outcome)
                    attempts, retries = attempts + 1, retries + 1
                    continue  # at once: the answer was wrong, not the server busy
            except wire.AnswerTooLarge as e:
                answered = True
                last = UpstreamError(PERMANENT, str(e), code="answer_too_large")
            except egress.UnsafeURL as e:
                # The name leads somewhere endpoints may not go now (DNS rebinding): nothing was sent.
                last = UpstreamError(STOP, f"The endpoint's address is refused: {e}", code="address_refused")
            except (aiohttp.ClientError, TimeoutError) as e:
                code, message = wire.network_error(e)
                last = UpstreamError(RETRY, message, code=code)
            except UpstreamError as e:  # a 200 whose body is no answer
                last = e
            finally:
                if probe:
                    self.pacing.probe_done(answered)
            answered_at = time.monotonic()
            latency = int((time.perf_counter() - started) * 1000)

            if last.kind == PERMANENT:
                return Outcome.failed(item.id, attempts + 1, last, retries, latency)
            if last.kind == STOP:
                # Not the item's fault: no attempt counted; the job pauses.
                await self._stop_job(last.message)
                return Outcome.released(item.id, attempts, retries, last)
            if last.rate_limited:
                # Back-pressure, not the request's failure: it costs no attempt, and the request is tried
                # again for as long as the job runs. Only a spent budget holds back every sender.
                limited += 1
                self.rate_limited += 1
                delay = last.retry_delay(limited)
                await self.pacing.after_429(headers, cost, delay)
            else:
                attempts += 1
                delay = last.retry_delay(attempts)
                if attempts >= max(self.max_attempts, settings.BATCHSITE_TRANSIENT_ATTEMPTS):
                    return Outcome.failed(item.id, attempts, last, retries, latency)
            retries += 1  # counted once, here, whether the retry happens in this slice or a later one
            # Measured from the answer: the server asked for `delay` from then on, however long the
            # bookkeeping above took.
            due = answered_at + delay
            if due > self.deadline:
                # Too long to hold the item here: back to pending, due after the wait.
                return Outcome.retry_later(item.id, attempts, retries, last, due - time.monotonic())
            # While it waits, the request holds no concurrency slot: another one is sent in its place.
            if not await self._wait_for_retry(due):
                # Draining (pause, stop, a newer generation): whoever takes the item up next still owes
                # the server the rest of the wait.
                return Outcome.retry_later(item.id, attempts, retries, last, due - time.monotonic())

    def _succeeded(
        self,
        item: Claimed,
        model: str,
        response: wire.Answer,
        attempts: int,
        retries: int,
        latency: int,
        want: schemacheck.Wanted | None = None,
    ) -> Outcome:
        """The outcome of a 200: succeeded, or failed with invalid_output when its answer is not the JSON the
        request asked for (the caller decides whether to send it again)."""
        data, text = upstream.success_body(response.text)
        self.pacing.limiter.observe(response.headers)
        self.latencies.append(latency)
        usage = upstream.usage_of(self.url, data)
        cost = self.prices.cost(data.get("model") or model, *usage)
        why = schemacheck.problem(want, self.url, data) if want is not None else None
        if why is not None:
            error = UpstreamError(
                PERMANENT,
                why,
                http_status=response.status,
                body=text,
                code=schemacheck.INVALID_OUTPUT,
                request_id=response.headers.get("x-request-id", ""),
            )
            failed = Outcome.failed(item.id, attempts, error, retries, latency)
            prompt, completion, cached = usage
            return dataclasses.replace(
                failed, prompt_tokens=prompt, completion_tokens=completion, cached_tokens=cached, cost=cost
            )
        return Outcome.succeeded(
            item.id,
            attempts,
            retries,
            http_status=response.status,
            response=text,
            request_id=response.headers.get("x-request-id", ""),
            usage=usage,
            cost=cost,
            latency_ms=latency,
        )

    async def _stop_job(self, reason: str) -> None:
        if not self.stop_reason:
            self.stop_reason = reason
            self.draining.set()
            await self.db.call(database.pause_itself, self.job_id, reason)


@dataclasses.dataclass
class _Spent:
    """Tokens and cost of answers thrown away for breaking their schema: the send's outcome carries them,
    final or not, as the endpoint charged for them (the ledger adds them to the item and the job)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    cost: Decimal = Decimal(0)

    def add(self, outcome: Outcome) -> None:
        self.prompt_tokens += outcome.prompt_tokens
        self.completion_tokens += outcome.completion_tokens
        self.cached_tokens += outcome.cached_tokens
        self.cost += outcome.cost

    def added_to(self, outcome: Outcome) -> Outcome:
        if not self.cost and not self.prompt_tokens and not self.completion_tokens:
            return outcome
        return dataclasses.replace(
            outcome,
            prompt_tokens=outcome.prompt_tokens + self.prompt_tokens,
            completion_tokens=outcome.completion_tokens + self.completion_tokens,
            cached_tokens=outcome.cached_tokens + self.cached_tokens,
            cost=outcome.cost + self.cost,
        )
