"""Claims: one poller works a chunk at a time. A claim is a compare-and-set on the chunk's claimed_until; the
step that holds it renews it before a long call (an upload, a result file) and lets go of it with the time of
the chunk's next look. A poller killed meanwhile leaves the claim to run out."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db.models import F, Q
from django.db.models.functions import Least

from jobs import clock
from jobs.engine.remote.batchapi import CONTROL_TIMEOUT
from jobs.models import RemoteBatch

# A claim outlasts the calls made under it: a minute and a half for the short ones (a hybrid switch is not held
# up by a dead poller for longer than its margin), the request timeout and two minutes during an upload or a
# collection.
CLAIM_SECONDS = 3 * CONTROL_TIMEOUT
LONG_CLAIM_SECONDS = settings.BATCHSITE_REQUEST_TIMEOUT + 120


class LostClaim(Exception):
    """Another poller holds the chunk now."""


def take(chunk: RemoteBatch) -> bool:
    """Claim the chunk, unless another poller holds it or it was collected; reads it afresh if so."""
    now = clock.now()
    free = Q(claimed_until__isnull=True) | Q(claimed_until__lt=now)
    hold = now + timedelta(seconds=CLAIM_SECONDS)
    # next_poll_at moves to the end of the claim too: a cancel meanwhile brings it forward (control.cancel), and
    # letting go keeps the earlier of the two.
    if not RemoteBatch.objects.filter(free, pk=chunk.pk, collected_at__isnull=True).update(
        claimed_until=hold, next_poll_at=hold
    ):
        return False
    chunk.refresh_from_db()
    return True


def renew(chunk: RemoteBatch, seconds: float = CLAIM_SECONDS, **fields: Any) -> None:
    """Extend our claim on the chunk (and write `fields` with it). A claim already lost (this poller stalled past
    it, and another took the chunk) raises LostClaim: two pollers must never work one chunk."""
    until = clock.now() + timedelta(seconds=seconds)
    if not RemoteBatch.objects.filter(pk=chunk.pk, claimed_until=chunk.claimed_until).update(
        **fields, claimed_until=until
    ):
        raise LostClaim(chunk.pk)
    chunk.claimed_until = until


def let_go(chunk: RemoteBatch, delay: float) -> None:
    """Our claim ends; the chunk is looked at again in `delay` seconds (or sooner, if a cancel asked)."""
    next_look = clock.now() + timedelta(seconds=delay)
    RemoteBatch.objects.filter(pk=chunk.pk, claimed_until=chunk.claimed_until).update(
        claimed_until=None, next_poll_at=Least(F("next_poll_at"), next_look)
    )
