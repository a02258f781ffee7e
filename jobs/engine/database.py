"""The slice's database side. Django's ORM is synchronous: a slice runs its calls on a thread of its own
(DatabaseThread), each retried through transient errors (with_db_retries). Below them, the queries a slice
runs besides the leases' (leases.py)."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any, TypeVar

from django.db import connection, connections
from django.db.models import Q

from jobs import clock
from jobs.engine import leases
from jobs.engine.leases import TRANSIENT_DB_ERRORS
from jobs.models import Endpoint, Job

log = logging.getLogger(__name__)

DB_PATIENCE = 30.0  # how long a transient database error is tried again (with_db_retries)

T = TypeVar("T")


def with_db_retries(fn: Callable[..., T], *args: Any, patience: float = DB_PATIENCE) -> T:
    """`fn(*args)`, retrying transient database errors ("database is locked", a dropped connection)
    with a short backoff for up to `patience` seconds. A slice runs its calls this way on its database
    thread (DatabaseThread); a wait there holds back its other calls, which would meet the same lock."""
    give_up, pause = time.monotonic() + patience, 0.05
    while True:
        try:
            return fn(*args)
        except TRANSIENT_DB_ERRORS as e:
            if time.monotonic() + pause > give_up:
                raise
            log.warning("%s in %s; trying again in %.2f s", e, fn.__name__, pause)
            connection.close_if_unusable_or_obsolete()
            time.sleep(pause)
            pause = min(pause * 2, 2.0)


class DatabaseThread:
    """One thread, so one connection (Django's are per thread), that an event loop hands its database calls to."""

    def __init__(self, name: str):
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    async def call(self, fn: Callable[..., T], *args: Any, patience: float = DB_PATIENCE) -> T:
        """`fn(*args)` on the thread, with transient errors retried for up to `patience` seconds."""
        call = functools.partial(with_db_retries, fn, *args, patience=patience)
        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    def close(self) -> None:
        self._executor.submit(connections.close_all).result()
        self._executor.shutdown()

    async def aclose(self) -> None:
        """close(), from inside the event loop."""
        await asyncio.get_running_loop().run_in_executor(self._executor, connections.close_all)
        self._executor.shutdown()


def job_wants_slice(job_id: int, generation: int) -> bool:
    """Whether the job still wants this slice: it is running, and no newer generation of slices replaced it."""
    return Job.objects.filter(pk=job_id, status=Job.Status.RUNNING, slice_gen=generation).exists()


def held_elsewhere(job_id: int) -> bool:
    """Items of the job are running under another slice's lease (or a dead one's, until it expires)."""
    return Job.objects.filter(pk=job_id, n_running__gt=0).exists()


def renew_leases(job_id: int, lease: uuid.UUID) -> None:
    leases.heartbeat(lease)
    Job.objects.filter(pk=job_id).update(heartbeat_at=clock.now())


def pause_itself(job_id: int, reason: str) -> None:
    """Job.pause_itself by the job's id: the engine found it cannot go on, and says why. (A person pauses a job
    with control.pause; a paused job waits for a person to resume it either way.)"""
    Job.objects.get(pk=job_id).pause_itself(reason)


def show_cooldown(endpoint_id: int, until: float) -> None:
    """Endpoint.cooldown_until (shown in the admin) moves on to `until` (unix time), never back."""
    moment = datetime.fromtimestamp(until, tz=UTC)
    later = Q(cooldown_until__isnull=True) | Q(cooldown_until__lt=moment)
    Endpoint.objects.filter(later, pk=endpoint_id).update(cooldown_until=moment)
