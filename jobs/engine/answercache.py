"""The answer cache in a live slice (jobs with use_cache): claimed items whose identical request was answered
before are answered from the cache; of several items with the same request (in this job or another running
at once), one is sent and the others wait for its answer.

Who sends a request is decided by a compare-and-set on its CachedAnswer row (sending_lease, for a lease's
time), so two slices never both send one. The answer goes into the cache in the transaction that stores the
item's result (the ledger, Books._remember_answers); a send that ends without an answer lets go of the row, and the
waiting items then send their own.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import F, Q, Sum, Window
from django.db.models.functions import Length
from django.utils import timezone

from jobs.engine.leases import Claimed, lease_seconds
from jobs.models import CachedAnswer, Item, cache_key
from jobs.models.outcome import Outcome

WAIT_FOR_TWIN_SECONDS = 1.0  # an item whose twin is being sent looks again this much later


def max_age() -> timedelta:
    return timedelta(hours=settings.BATCHSITE_CACHE_MAX_AGE_HOURS)


def sort_out(
    endpoint_id: int, base_url: str, url: str, lease: uuid.UUID, claimed: list[Claimed]
) -> tuple[list[Claimed], list[Outcome]]:
    """(items to send, outcomes of the others: answered from the cache, or back to pending for a moment
    while their twin is sent). Each item to send carries its cache key."""
    with transaction.atomic():  # all or nothing: a retry after a locked database starts from a clean slate
        return _sort_out(endpoint_id, base_url, url, lease, claimed)


def _sort_out(
    endpoint_id: int, base_url: str, url: str, lease: uuid.UUID, claimed: list[Claimed]
) -> tuple[list[Claimed], list[Outcome]]:
    now = timezone.now()
    fresh_since = now - max_age()
    until = now + timedelta(seconds=lease_seconds())
    keyed = [(item, cache_key(endpoint_id, base_url, url, item.body)) for item in claimed]
    rows = {row.key: row for row in CachedAnswer.objects.filter(key__in={k for _, k in keyed})}
    send: list[Claimed] = []
    others: list[Outcome] = []
    taken: set[str] = set()  # keys this slice sends
    hit_keys: list[str] = []
    for item, key in keyed:
        row = rows.get(key)
        if row is not None and row.response and row.answered_at and row.answered_at >= fresh_since:
            others.append(_answered(item, row))
            hit_keys.append(key)
        elif key in taken or not _take(key, row, endpoint_id, url, item, lease, now, until):
            others.append(Outcome.retry_later(item.id, item.attempts, 0, None, wait=WAIT_FOR_TWIN_SECONDS))
        else:
            taken.add(key)
            item.cache_key = key
            send.append(item)
    if hit_keys:
        for key in set(hit_keys):
            CachedAnswer.objects.filter(key=key).update(hits=F("hits") + hit_keys.count(key), last_hit_at=now)
    return send, others


def _take(
    key: str,
    row: CachedAnswer | None,
    endpoint_id: int,
    url: str,
    item: Claimed,
    lease: uuid.UUID,
    now: datetime,
    until: datetime,
) -> bool:
    """Become the sender of `key` (compare-and-set): unless another slice is sending it right now."""
    if row is None:
        try:
            with transaction.atomic():
                CachedAnswer.objects.create(
                    key=key, endpoint_id=endpoint_id, url=url, sending_lease=lease, sending_until=until
                )
            return True
        except IntegrityError:  # another slice created it a moment ago: it sends
            return False
    free = Q(sending_lease__isnull=True) | Q(sending_until__lt=now)  # this slice too may hold it, for a twin
    return bool(CachedAnswer.objects.filter(free, key=key).update(sending_lease=lease, sending_until=until))


def _answered(item: Claimed, row: CachedAnswer) -> Outcome:
    return Outcome(
        item.id,
        Item.Status.SUCCEEDED,
        item.attempts,
        http_status=200,
        response=row.response,
        latency_ms=0,
        from_cache=True,
        saved=row.cost,
    )


def trim(now: datetime | None = None) -> int:
    """Answers past the age limit go, then the oldest beyond BATCHSITE_CACHE_MAX_ENTRIES, then the oldest beyond
    BATCHSITE_CACHE_MAX_MB of answer text (a few huge answers weigh more than many small ones); how many went."""
    now = now or timezone.now()
    stale = Q(answered_at__lt=now - max_age()) | Q(answered_at__isnull=True, sending_until__lt=now)
    removed = CachedAnswer.objects.filter(stale).delete()[0]
    keep = settings.BATCHSITE_CACHE_MAX_ENTRIES
    answered = CachedAnswer.objects.exclude(answered_at=None).order_by("-answered_at")
    cutoff = answered.values_list("answered_at", flat=True)[keep : keep + 1]
    if cutoff:
        removed += CachedAnswer.objects.filter(answered_at__lte=cutoff[0]).delete()[0]
    # The newest answer whose running total of text (newest first) passes the bound, and every older one.
    running = answered.annotate(total=Window(Sum(Length("response")), order_by=F("answered_at").desc()))
    over = running.filter(total__gt=settings.BATCHSITE_CACHE_MAX_MB * 1024 * 1024)
    cutoff = over.values_list("answered_at", flat=True)[:1]
    if cutoff:
        removed += CachedAnswer.objects.filter(answered_at__lte=cutoff[0]).delete()[0]
    return removed
