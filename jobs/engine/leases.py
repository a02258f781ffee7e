"""Live holders: a slice leases items, sends them, and settles them through the ledger while it holds them.

- claim(): pending -> running with the slice's lease token (ledger.Books.lease: one UPDATE ... RETURNING; on
  Postgres the candidate rows are picked FOR UPDATE SKIP LOCKED, so slices never wait on each other), each
  weighed against the budgets (budgets.py) in the same transaction.
- results are stored by ledger.settle, `WHERE id = ? AND lease_token = ? AND status = 'running'`: a slice whose
  lease expired and was handed to another cannot overwrite the newer result.
- a lease lasts BATCHSITE_LEASE_SECONDS from its holder's last heartbeat (a quarter of that apart), so a dead
  holder's items run again seconds later (ledger.expire, by the sweeper), and a live one keeps them however
  long its requests take.
"""

from __future__ import annotations

import json
import uuid
from collections import defaultdict
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db import InterfaceError, OperationalError, connection, transaction
from django.db.models import Q

from jobs import clock
from jobs.engine import budgets
from jobs.engine.upstream import PERMANENT, UpstreamError
from jobs.models import CachedAnswer, Item, Job, ledger
from jobs.models.ledger import Deltas
from jobs.models.outcome import Outcome
from jobs.pricing import PriceBook


@dataclass
class Claimed:
    id: int
    custom_id: str
    body: str
    est_tokens: int
    attempts: int
    cache_key: str = ""  # set when this slice sends the request for the answer cache (answercache.sort_out)


# A locked SQLite database or a dropped connection: worth trying the same write again (database.py does).
TRANSIENT_DB_ERRORS = (OperationalError, InterfaceError)


def lease_seconds() -> int:
    return int(settings.BATCHSITE_LEASE_SECONDS)


def claim(job_id: int, lease: uuid.UUID, limit: int) -> list[Claimed]:
    until = clock.now() + timedelta(seconds=lease_seconds())
    with ledger.open(job_id) as books:
        if books.status != Job.Status.RUNNING:
            return []  # paused, cancelled or finished since the slice last looked: send nothing more
        rows = books.lease(lease, until, limit)
        if rows:
            rows = _within_budgets(books, rows)
    return [Claimed(*row[:5]) for row in rows]


def _within_budgets(books: ledger.Books, rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """The leased rows whose requests fit under every budget, each at its most possible cost. The first that
    does not fit, and those after it, go back to pending, and the job pauses, saying which and why."""
    job = Job.objects.only(*budgets.BUDGET_FIELDS).get(pk=books.job_id)
    found = budgets.budgets(job, Q(id__in=[r[0] for r in rows]))
    if not found:
        return rows
    book = PriceBook.load()
    kept: list[tuple[Any, ...]] = []
    held: dict[Decimal, list[int]] = defaultdict(list)
    for row in rows:
        body = json.loads(row[2])
        most = budgets.most_cost(book, job.url, body, row[3], job.model)
        over = next((b for b in found if b.committed + most > b.cap), None)
        why = budgets.unpriced(book, str(body.get("model") or job.model), found)
        if over is not None or why:
            books.unlease([r[0] for r in rows[len(kept) :]])
            job.pause_itself(why or (over and over.pause_reason(f"the next one (line {row[5]})", most)) or "")
            break
        for b in found:
            b.committed += most
        held[most].append(row[0])
        kept.append(row)
    books.hold_cost(held)
    return kept


def next_due(job_id: int) -> datetime | None:
    """When the earliest pending item may be tried (None: nothing is pending)."""
    pending = Item.objects.filter(job_id=job_id, status=Item.Status.PENDING)
    if pending.filter(next_attempt_at__isnull=True).exists():
        return clock.now()
    due: datetime | None = pending.order_by("next_attempt_at").values_list("next_attempt_at", flat=True).first()
    return due


def heartbeat(lease: uuid.UUID) -> None:
    until = clock.now() + timedelta(seconds=lease_seconds())
    token = Item._meta.get_field("lease_token").get_db_prep_value(lease, connection)
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {ledger.ITEM} SET lease_until = %s WHERE lease_token = %s AND status = '{ledger.RUNNING}'",
            [connection.ops.adapt_datetimefield_value(until), token],
        )
    # The answer-cache rows this slice is sending for stay its own as long as its items do.
    CachedAnswer.objects.filter(sending_lease=lease).update(sending_until=until)


def write_each(job_id: int, lease: uuid.UUID, outcomes: list[Outcome]) -> Deltas:
    """After a batch was refused for one bad row (a value the database rejects): store the outcomes one by one,
    and one that is still refused as a failed item saying why, so that a result the database cannot hold never
    sends its request again and again."""
    deltas: defaultdict[str, int | Decimal] = defaultdict(int)

    def add(stored: Deltas) -> None:
        for name, change in stored.items():
            deltas[name] += change

    for o in outcomes:
        try:
            add(ledger.settle(job_id, lease, [o]))
        except TRANSIENT_DB_ERRORS:
            raise  # transient: the caller tries the whole batch again (stored ones no longer match the lease)
        except Exception as e:
            message = f"The result could not be stored: {type(e).__name__}: {e}"
            unstorable = UpstreamError(PERMANENT, message, http_status=o.http_status, code="internal_error")
            add(ledger.settle(job_id, lease, [Outcome.failed(o.item_id, o.attempts, unstorable)]))
    return dict(deltas)


def release(job_id: int, lease: uuid.UUID, items: list[Claimed]) -> None:
    """Give back leased items that were never sent (pause, shutdown); their answer-cache rows are let go too."""
    ledger.settle(job_id, lease, [replace(Outcome.released(i.id, i.attempts), cache_key=i.cache_key) for i in items])
