"""One slice of a live job: claim items while its time lasts, send them concurrently, store the results.

A slice claims work until its time budget is spent, then hands over (enqueues its successor) and
finishes the requests it has in flight. Told to stop (pause, cancel, a stopping answer, a newer
generation of slices), it drains: nothing new is sent, and claimed items that were not go back.
Inside, asyncio keeps up to `concurrency` requests going (send.py); every database call runs on one
worker thread (database.py), and results are written in batches (results.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from datetime import timedelta

from django.conf import settings

from jobs import clock
from jobs.engine import answercache, database, leases, shutdown
from jobs.engine.database import DatabaseThread
from jobs.engine.heartbeat import Heartbeat
from jobs.engine.leases import TRANSIENT_DB_ERRORS, Claimed
from jobs.engine.pacing import Pacing, sleep_unless
from jobs.engine.results import Results
from jobs.engine.send import STATUS_CHECK_SECONDS, Sender
from jobs.models import Endpoint, Job

log = logging.getLogger(__name__)


class Slice:
    def __init__(
        self,
        job: Job,
        endpoint: Endpoint,
        lease: uuid.UUID,
        budget: float,
        db: DatabaseThread,
        slices: int,
        generation: int,
    ):
        self.job_id = job.pk
        self.endpoint_id = endpoint.pk
        self.base_url = endpoint.base_url  # where this slice sends: what its answers are cached under
        self.url = job.url
        self.use_cache = job.use_cache
        self.generation = generation
        self.lease = lease
        self.db = db
        # The endpoint's concurrency is shared by the job's slices, which usually run at the same time.
        # `slices` comes with the task from whoever started the job, so every slice agrees on it.
        self.slices = max(1, slices)
        self.concurrency = max(1, -(-endpoint.concurrency // self.slices))
        self.deadline = time.monotonic() + budget
        self.draining = asyncio.Event()  # set: pause, cancel, stop or superseded; nothing new is sent
        self.handed_over = False
        self.leaving = False  # the node is shutting down (shutdown.py)
        self.more_to_claim = True
        self.queue: deque[Claimed] = deque()  # claimed, not sent yet
        self.heartbeat = Heartbeat(self.job_id, lease, self.draining)
        self.results = Results(self.job_id, lease, db)
        self.pacing = Pacing(endpoint, self.concurrency, time.time() + budget, self.draining, db)
        self.sender = Sender(job, endpoint, self.deadline, self.draining, db, self.pacing, self.results, self.heartbeat)

    async def run(self) -> None:
        await self.sender.open()
        storing = asyncio.create_task(self.results.keep_storing())
        self.heartbeat.start()
        try:
            await self._claim_and_send()
        finally:
            await self._release_unsent()
            await self._finish_in_flight()
            self.results.closing.set()
            await storing  # never cancel it mid-write: the batch it holds would be lost
            await self.heartbeat.stop()
            try:
                # Past the leases' end another slice may own the items: writing would change nothing.
                await self.results.flush(patience=leases.lease_seconds())
            except TRANSIENT_DB_ERRORS:
                log.exception(
                    "Job %s: %d results could not be stored; their items will run again",
                    self.job_id,
                    len(self.results.unstored),
                )
            await self.sender.close()

    async def _claim_and_send(self) -> None:
        sender, queue = self.sender, self.queue
        last_check = 0.0
        while not self.draining.is_set():
            now = time.monotonic()
            if shutdown.requested():
                # The node is going: the chain goes on elsewhere (this node reads the broker no more), and
                # what this slice holds goes back now, in flight after BATCHSITE_SHUTDOWN_SECONDS.
                await self._hand_over()
                self.leaving = True
                self.draining.set()
                return
            if now - last_check >= STATUS_CHECK_SECONDS:
                last_check = now
                if not await self.db.call(database.job_wants_slice, self.job_id, self.generation):
                    self.draining.set()
                    return
            if now >= self.deadline:
                await self._hand_over()
                return
            if self.pacing.no_slot_before_deadline:  # no rate-limit slot left before the deadline: claim no more
                await sender.wait(self.deadline - now)
                continue
            if sender.full():
                if len(queue) < self.concurrency // 2 and self.more_to_claim:
                    # Claim the next batch while every slot is busy, so that freed slots are
                    # refilled at once instead of waiting on the database.
                    await self._claim(self.concurrency - len(queue))
                    continue
                await sender.wait(STATUS_CHECK_SECONDS)
                continue
            if not queue:
                await self._claim(self.concurrency)
            if queue:
                while queue and not sender.full():
                    await sender.start(queue.popleft())
                continue
            if sender.in_flight:
                await sender.wait(STATUS_CHECK_SECONDS)
                continue
            if not await self._wait_for_due_work(now):
                return  # nothing pending, nothing running: done (runner.continue_or_finish finalizes the job)

    async def _claim(self, limit: int) -> None:
        claimed = await self.db.call(leases.claim, self.job_id, self.lease, limit)
        self.more_to_claim = bool(claimed)
        if claimed and self.use_cache:
            # Answered before: from the cache. Being sent by another item right now: wait for its answer.
            claimed, others = await self.db.call(
                answercache.sort_out, self.endpoint_id, self.base_url, self.url, self.lease, claimed
            )
            for outcome in others:
                self.results.add(outcome)
        self.queue.extend(claimed)

    async def _wait_for_due_work(self, now: float) -> bool:
        """Nothing to claim or send now: wait (a second at most) for the earliest retry. False if nothing
        is pending and no other slice holds items it may hand back: the job is done."""
        # Store what this slice released first: until then those items still look held (running), and
        # the slice would leave while they wait for their retry.
        await self.results.flush()
        due = await self.db.call(leases.next_due, self.job_id)
        if due is None:
            if not await self.db.call(database.held_elsewhere, self.job_id):
                return False
            # Other slices hold the rest and may hand some back for a retry after they have
            # handed over, with no successor of their own left to take it: stay and look again.
            due = clock.now() + timedelta(seconds=STATUS_CHECK_SECONDS)
        # Wait here, up to the deadline, for the earliest retry: a successor would only find the
        # same nothing to do, and hand over again, for as long as a Retry-After lasts.
        wait = (due - clock.now()).total_seconds()
        await sleep_unless(self.draining, min(max(wait, 0.05), STATUS_CHECK_SECONDS, max(self.deadline - now, 0.0)))
        return True

    async def _hand_over(self) -> None:
        """Enqueue the next slice now, so new work starts while this one finishes its requests."""
        self.handed_over = await self.db.call(Job.enqueue_next_slice, self.job_id, self.slices, self.generation)

    async def _release_unsent(self) -> None:
        if not self.queue:
            return
        try:
            await self.db.call(leases.release, self.job_id, self.lease, list(self.queue))
        except TRANSIENT_DB_ERRORS:
            log.exception(
                "Job %s: could not release %d unsent items; their leases will run out", self.job_id, len(self.queue)
            )

    async def _finish_in_flight(self) -> None:
        """Wait for the requests in flight; a pause (or cancel) still stops those not sent yet. When the node
        is shutting down, those still out after BATCHSITE_SHUTDOWN_SECONDS are handed back (their items run
        again elsewhere: requests are at-least-once, results exactly-once)."""
        in_flight = self.sender.in_flight
        give_up = None
        while in_flight:
            if give_up is None and (self.leaving or shutdown.requested()):
                give_up = time.monotonic() + settings.BATCHSITE_SHUTDOWN_SECONDS
            if give_up is not None and time.monotonic() >= give_up:
                for task in list(in_flight):
                    task.cancel()
                await asyncio.gather(*in_flight, return_exceptions=True)
                return
            await asyncio.wait(in_flight, timeout=STATUS_CHECK_SECONDS)
            if in_flight and not self.draining.is_set():
                try:
                    if not await self.db.call(database.job_wants_slice, self.job_id, self.generation):
                        self.draining.set()
                except TRANSIENT_DB_ERRORS:
                    pass  # asked again in a second
