"""A slice's outcomes, stored in batches a fraction of a second apart, in the order they came (ledger.settle)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid

from jobs.engine import leases
from jobs.engine.database import DB_PATIENCE, DatabaseThread
from jobs.engine.leases import TRANSIENT_DB_ERRORS
from jobs.models import ledger
from jobs.models.outcome import Outcome

log = logging.getLogger(__name__)

FLUSH_SECONDS = 0.25


class Results:
    def __init__(self, job_id: int, lease: uuid.UUID, db: DatabaseThread):
        self.job_id = job_id
        self.lease = lease
        self.db = db
        self.unstored: list[Outcome] = []
        self.flushing = asyncio.Lock()  # one write at a time, in the order the outcomes came
        self.closing = asyncio.Event()  # set: the slice is done; keep_storing() stores what is left and stops

    def add(self, outcome: Outcome) -> None:
        self.unstored.append(outcome)

    async def flush(self, patience: float = DB_PATIENCE) -> None:
        async with self.flushing:
            if not self.unstored:
                return
            batch, self.unstored = self.unstored, []
            try:
                try:
                    await self.db.call(ledger.settle, self.job_id, self.lease, batch, patience=patience)
                except TRANSIENT_DB_ERRORS:
                    raise
                except Exception:  # one row the database refuses must not cost the batch (nor kill the flusher)
                    log.exception(
                        "Job %s: a batch of %d results was refused; storing them one by one", self.job_id, len(batch)
                    )
                    await self.db.call(leases.write_each, self.job_id, self.lease, batch, patience=patience)
            except TRANSIENT_DB_ERRORS:
                self.unstored[:0] = batch  # kept, ahead of newer ones, for the next try
                raise

    async def keep_storing(self) -> None:
        """Flush every FLUSH_SECONDS until closing is set; then once more, at once."""
        while not self.closing.is_set():
            with contextlib.suppress(TimeoutError):  # woken early at the end: the job's last results go at once
                await asyncio.wait_for(self.closing.wait(), FLUSH_SECONDS)
            try:
                await self.flush()
            except TRANSIENT_DB_ERRORS:
                log.exception("Job %s: results not stored yet; trying again", self.job_id)
