"""A slice's heartbeat: its leases renewed every quarter of a lease, and the job shown alive.

The beats run on a thread and connection of their own: behind a slow flush on the slice's database
thread they would come late, and a lease that runs out makes another slice send the same items.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid

from jobs.engine import database, leases
from jobs.engine.database import DatabaseThread
from jobs.engine.leases import TRANSIENT_DB_ERRORS

log = logging.getLogger(__name__)


class Heartbeat:
    def __init__(self, job_id: int, lease: uuid.UUID, draining: asyncio.Event):
        self.job_id = job_id
        self.lease = lease
        self.draining = draining
        # Until when the slice's leases certainly hold: a claim or a heartbeat that started at t renews them to
        # t + lease. Past it (heartbeats failing: a database stalled for longer than a lease) the sweeper may
        # have handed the items to another slice, which may be sending them: send nothing more (lapsing()).
        self.leased_until = time.monotonic() + leases.lease_seconds()

    def start(self) -> None:
        self._thread = DatabaseThread(f"slice-beat-{self.job_id}")
        self._task = asyncio.create_task(self._beat())

    async def stop(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        await self._thread.aclose()

    def lapsing(self) -> bool:
        """True once the leases may run out before a request now sent is answered: heartbeats have failed
        for most of a lease. The slice then sends nothing more and finishes; its successor claims afresh."""
        if time.monotonic() < self.leased_until - leases.lease_seconds() / 4:
            return False
        if not self.draining.is_set():
            log.warning("Job %s: heartbeats failing, the slice's leases may run out; it stops sending", self.job_id)
            self.draining.set()
        return True

    async def _beat(self) -> None:
        interval = max(leases.lease_seconds() / 4, 1)
        while True:
            await asyncio.sleep(interval)
            started = time.monotonic()
            try:
                await self._thread.call(database.renew_leases, self.job_id, self.lease, patience=interval)
                self.leased_until = started + leases.lease_seconds()
            except TRANSIENT_DB_ERRORS:
                log.exception("Job %s: heartbeat missed; trying again at the next beat", self.job_id)
