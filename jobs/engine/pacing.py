"""How fast a slice sends: within the endpoint's budgets, which every sender shares (ratelimit.py).

Until the endpoint's limits are known, one request goes alone and its headers tell them: a blind burst
of `concurrency` requests would draw as many 429s from a spent budget. A 429 that shows the budget is
spent cools the endpoint down for every sender. When 429s come thick and fast, AIMD cuts the shared
send rate, or the slice's concurrency where the endpoint has no known rate to cut.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from collections.abc import Mapping

from jobs.engine import database
from jobs.engine.database import DatabaseThread
from jobs.engine.leases import TRANSIENT_DB_ERRORS
from jobs.engine.ratelimit import Limiter
from jobs.models import Endpoint

# Over each window, a slice whose answers were more than a third 429s (of at least AIMD_MIN_ANSWERS)
# cuts the endpoint's shared send rate (ratelimit.py).
AIMD_WINDOW_SECONDS = 1.0
AIMD_MIN_ANSWERS = 20

# Limiter keys of endpoints that answered without rate-limit headers, in this worker process: their
# slices need not send one request alone first to find out their limits.
_SENDS_NO_LIMITS: set[str] = set()


class Pacing:
    def __init__(
        self, endpoint: Endpoint, concurrency: int, deadline_wall: float, draining: asyncio.Event, db: DatabaseThread
    ):
        # The key names the server too, so budgets never carry over to a different server.
        key = f"endpoint-{endpoint.pk}-{hashlib.sha1(endpoint.base_url.encode()).hexdigest()[:8]}"
        self.limiter = Limiter(
            key,
            endpoint.rpm,
            endpoint.tpm,
            endpoint.learned_rpm,
            endpoint.learned_tpm,
            token_ratio=endpoint.learned_token_ratio,
        )
        self.endpoint_id = endpoint.pk
        self.concurrency = concurrency
        self.deadline_wall = deadline_wall  # the slice's deadline in unix time, as the shared store keeps it
        self.draining = draining
        self.db = db
        self.limits_known = asyncio.Event()
        if self.limiter.paced or key in _SENDS_NO_LIMITS:
            self.limits_known.set()
        self.probing = False
        # The endpoint's budget is spoken for up to the slice's deadline: the slice claims nothing more.
        self.no_slot_before_deadline = False
        self.cooldown_shown = 0.0
        self.window_start, self.window_answers, self.window_limited = time.monotonic(), 0, 0

    def concurrency_now(self) -> int:
        """The slice's concurrency, cut by AIMD when the endpoint has no known rate to slow down instead."""
        if self.limiter.paced:
            return self.concurrency  # the factor stretches the rate limiter's slots instead
        return max(1, int(self.concurrency * self.limiter.factor()))

    def start_probe(self) -> bool:
        """True for the one request that goes first, alone, while the endpoint's limits are unknown."""
        if self.limits_known.is_set() or self.probing:
            return False
        self.probing = True
        return True

    def probe_done(self, answered: bool) -> None:
        if answered and not self.limiter.paced:
            _SENDS_NO_LIMITS.add(self.limiter.key)  # no rate-limit headers: nothing to find out next time
        self.limits_known.set()

    async def wait_for_slot(self, cost: int, probe: bool) -> bool:
        """Wait for the endpoint's budget (and any cool-down after a 429). False: give the item back,
        because the slice is draining or because no slot is free before its deadline."""
        if not probe and not self.limits_known.is_set():
            await _first_of(self.limits_known, self.draining)
        while not self.draining.is_set():
            # Never reserve past the deadline: a slot the slice cannot use would be lost to every sender,
            # and waiting for it would keep the slice alive past its task's time limit.
            delay = self.limiter.reserve(cost, latest=self.deadline_wall)
            if delay == math.inf:
                self.no_slot_before_deadline = True
                return False
            if delay <= 0:
                return True
            if not await sleep_unless(self.draining, delay):
                return False
            if self.limiter.paced:
                return True
            # Unpaced, the wait was a cool-down, which another 429 may have extended: ask again.
        return False

    def count_answer(self, limited: bool) -> None:
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

    async def after_429(self, headers: Mapping[str, str], cost: int, delay: float) -> None:
        """Only a spent budget holds back every sender (for `delay`); a one-off 429 costs only its own request's wait."""
        if self.limiter.spent(headers, cost):
            self.limiter.cool_down(delay)
            await self._show_cooldown(delay)

    async def _show_cooldown(self, seconds: float) -> None:
        """Keep Endpoint.cooldown_until (shown in the admin) up to date, with a write only when it moves
        on by a second or more, not one per 429."""
        until = time.time() + seconds
        if until < self.cooldown_shown + 1.0:
            return
        self.cooldown_shown = until
        try:
            await self.db.call(database.show_cooldown, self.endpoint_id, until, patience=0)
        except TRANSIENT_DB_ERRORS:
            pass  # only a display; the next 429 tries again


async def sleep_unless(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep unless `stop` is set first; False if it was (or is already)."""
    if seconds <= 0:
        return not stop.is_set()
    try:
        await asyncio.wait_for(stop.wait(), timeout=seconds)
        return False
    except TimeoutError:
        return True


async def _first_of(*events: asyncio.Event) -> None:
    waits = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
