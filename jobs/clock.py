"""The time as the engine reads it: one seam, so that tests of timing logic move the clock instead of sleeping.

In production this is the system clock. A test may `advance` it, in its own process only: the remote poller,
the hybrid planner, leases, sweeps and the job's lifecycle then see the later time at once (a batch that has
run for an hour, a deadline that has come). The processes a test starts (qcluster, gunicorn, the simulator)
keep the real clock, as do the real-time end-to-end tests (a real kill -9, a 429 storm, Chromium), so the
system clock stays covered too. Only forward: nothing the engine wrote may be later than its clock.
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta

from django.utils import timezone

_ahead = 0.0  # seconds this process's clock is ahead of the system clock; 0 outside tests


def now() -> datetime:
    """timezone.now(), as the engine must read it."""
    return timezone.now() + timedelta(seconds=_ahead)


def monotonic() -> float:
    """time.monotonic(), as the engine must read it."""
    return time.monotonic() + _ahead


def advance(seconds: float) -> None:
    """Move this process's clock `seconds` forward (tests only)."""
    global _ahead
    if seconds < 0:
        raise ValueError("the clock only moves forward")
    _ahead += seconds


def reset() -> None:
    """Back to the system clock (a test's clean-up)."""
    global _ahead
    _ahead = 0.0
