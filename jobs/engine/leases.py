"""Exactly one result per item: claim with a lease, write back only while holding it.

- claim(): pending -> running with the slice's lease token, in one UPDATE ... RETURNING (on
  Postgres the candidate rows are picked FOR UPDATE SKIP LOCKED, so slices never wait on each
  other). The job's counters move in the same transaction.
- write(): each result is stored `WHERE id = ? AND lease_token = ? AND status = 'running'`; a
  slice whose lease expired and was handed to another cannot overwrite the newer result, and
  only rows actually updated count toward the job's totals.
- expire(): the sweeper's half: leases past their time go back to pending. A lease lasts
  BATCHSITE_LEASE_SECONDS from its holder's last heartbeat (a quarter of that apart), so a dead
  holder's items run again seconds later, and a live one keeps them however long its requests take.

Lock order: a transaction that writes a job's items locks the job's row first (Job.lock), then the
items; Job.cancel() and Job.retry_failed() do the same. With one order, two transactions never wait
on each other in a circle (Postgres would abort one as deadlocked).

Raw SQL because these run hundreds of times a second in the worker, and because the ORM
cannot express UPDATE ... RETURNING.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal

from django.conf import settings
from django.db import InterfaceError, OperationalError, connection, transaction
from django.db.models import Q, Sum

from jobs import clock, tokens
from jobs.engine.upstream import PERMANENT, UpstreamError
from jobs.models import CachedAnswer, Item, Job, JobTick, RemoteBatch, SpendingLimit
from jobs.pricing import PriceBook

ITEM = Item._meta.db_table
# Statuses in the raw SQL below: constants of Item.Status, never user input.
PENDING, RUNNING = Item.Status.PENDING.value, Item.Status.RUNNING.value


@dataclass
class Claimed:
    id: int
    custom_id: str
    body: str
    est_tokens: int
    attempts: int
    cache_key: str = ""  # set when this slice sends the request for the answer cache (answercache.sort_out)


@dataclass
class Outcome:
    """What became of a claimed item: a final result, or back to pending for a later attempt."""

    item_id: int
    status: str  # Item.Status.SUCCEEDED, Item.Status.FAILED, or Item.Status.PENDING (retry later / released)
    attempts: int
    http_status: int | None = None
    response: str = ""
    request_id: str = ""
    error_code: str = ""
    error_message: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    cost: Decimal = Decimal(0)
    latency_ms: int | None = None
    next_attempt_at: datetime | None = None
    retries: int = 0  # failed attempts to be tried again, decided during this claim (the timeline's "retried")
    cache_key: str = ""  # the answer goes into the answer cache (answercache.sort_out)
    from_cache: bool = False  # answered from the answer cache: not sent
    saved: Decimal = Decimal(0)  # with from_cache: what the answer cost when it was sent

    @classmethod
    def succeeded(
        cls,
        item_id: int,
        attempts: int,
        retries: int,
        *,
        http_status: int,
        response: str,
        request_id: str,
        usage: tuple[int, int, int],
        cost: Decimal,
        latency_ms: int,
    ) -> Outcome:
        prompt, completion, cached = usage
        return cls(
            item_id,
            Item.Status.SUCCEEDED,
            attempts,
            http_status=http_status,
            response=response,
            request_id=request_id,
            prompt_tokens=prompt,
            completion_tokens=completion,
            cached_tokens=cached,
            cost=cost,
            latency_ms=latency_ms,
            retries=retries,
        )

    @classmethod
    def failed(
        cls, item_id: int, attempts: int, error: UpstreamError, retries: int = 0, latency_ms: int | None = None
    ) -> Outcome:
        return cls(
            item_id,
            Item.Status.FAILED,
            attempts,
            http_status=error.http_status,
            response=error.body,
            request_id=error.request_id,
            error_code=error.code,
            error_message=error.message,
            latency_ms=latency_ms,
            retries=retries,
        )

    @classmethod
    def retry_later(
        cls, item_id: int, attempts: int, retries: int, error: UpstreamError | None, wait: float
    ) -> Outcome:
        """Back to pending, to be tried again `wait` seconds from now (at once if that is past)."""
        return cls(
            item_id,
            Item.Status.PENDING,
            attempts,
            http_status=error.http_status if error else None,
            error_code=error.code if error else "",
            error_message=error.message if error else "",
            next_attempt_at=clock.now() + timedelta(seconds=wait) if wait > 0 else None,
            retries=retries,
        )

    @classmethod
    def released(cls, item_id: int, attempts: int, retries: int = 0, error: UpstreamError | None = None) -> Outcome:
        """Back to pending, due at once: not sent (pause, shutdown), or not the item's fault."""
        return cls.retry_later(item_id, attempts, retries, error, wait=0)


# Changes to a job's counters (Job.add_to_counters): counts, tokens, and the cost, a Decimal.
Deltas = dict[str, int | Decimal]

# A locked SQLite database or a dropped connection: worth trying the same write again (database.py does).
TRANSIENT_DB_ERRORS = (OperationalError, InterfaceError)


def lease_seconds() -> int:
    return settings.BATCHSITE_LEASE_SECONDS


def _uuid(value: uuid.UUID):
    return Item._meta.get_field("lease_token").get_db_prep_value(value, connection)


def _dt(value: datetime | None):
    return connection.ops.adapt_datetimefield_value(value) if value is not None else None


def claim(job_id: int, lease: uuid.UUID, limit: int) -> list[Claimed]:
    now = clock.now()
    until = now + timedelta(seconds=lease_seconds())
    lock = "FOR UPDATE SKIP LOCKED" if connection.vendor == "postgresql" else ""
    # MATERIALIZED: the candidates are picked once. Inlined into the UPDATE, Postgres may re-run
    # the LIMIT subquery and claim more rows than asked for.
    sql = f"""
        WITH picked AS MATERIALIZED (
            SELECT id FROM {ITEM}
            WHERE job_id = %s AND status = '{PENDING}' AND (next_attempt_at IS NULL OR next_attempt_at <= %s)
            ORDER BY line LIMIT %s {lock}
        )
        UPDATE {ITEM} SET status = '{RUNNING}', lease_token = %s, lease_until = %s
        WHERE id IN (SELECT id FROM picked) AND status = '{PENDING}'
        RETURNING id, custom_id, body, est_tokens, attempts, line
    """
    with transaction.atomic():
        if Job.lock(job_id) != Job.Status.RUNNING:
            return []  # paused, cancelled or finished since the slice last looked: send nothing more
        job = Job.objects.only(*BUDGET_FIELDS).get(pk=job_id)
        with connection.cursor() as cursor:
            cursor.execute(sql, [job_id, _dt(now), limit, _uuid(lease), _dt(until)])
            rows = cursor.fetchall()
        rows.sort(key=lambda r: r[5])  # RETURNING order is not guaranteed; keep input order
        if rows:
            rows = _within_budgets(job, rows)
        if rows:
            Job(pk=job_id).add_to_counters(n_pending=-len(rows), n_running=len(rows))
    return [Claimed(*row[:5]) for row in rows]


# What a budget check reads of the job (claim here, RemoteJob._within_budgets for the Batch API).
BUDGET_FIELDS = ("cost_cap", "cost", "model", "url", "owner_id", "endpoint_id")


@dataclass
class Budget:
    cap: Decimal
    committed: Decimal  # spent, plus the most the running requests in its scope may still cost
    spent: Decimal
    says: str  # "The job's cost cap", "alice's monthly spending limit"...
    fix: str

    def pause_reason(self, next_one: str, most: Decimal) -> str:
        """Why the job pauses before `next_one` ("the next one (line 5)"), which may cost up to `most`."""
        return (
            f"{self.says} is ${self.cap:,.4f}: ${self.spent:,.4f} is spent, requests in flight may cost up to "
            f"${self.committed - self.spent:,.4f} more, and {next_one} up to ${most:,.4f}. {self.fix}, then resume."
        )


def most_cost(
    book: PriceBook, url: str, body: dict, est_tokens: int, model: str, discount: Decimal = Decimal(0)
) -> Decimal:
    """A request's most possible cost: its input plus all the output it may be billed for, every choice at its
    max tokens or its model's most (tokens.most_output_tokens), at the Batch API's discount for a batch."""
    output = tokens.most_output_tokens(url, body)
    return book.cost(body.get("model") or model, est_tokens, output, discount=discount)


def budgets(job: Job, weighed: Q) -> list[Budget]:
    """The job's cost cap and the monthly limits of its owner and its endpoint, each with what is committed:
    spent, plus the est_cost of running items other than the `weighed` ones (live claims, and the chunks sent
    to the Batch API and not yet collected; a chunk only planned holds no money yet, and its items' est_cost
    may be left from an earlier run)."""
    planned = RemoteBatch.objects.filter(status=RemoteBatch.Status.PLANNED)
    running = Item.objects.filter(status=Item.Status.RUNNING).exclude(weighed).exclude(remote_batch__in=planned)
    found = []
    if job.cost_cap is not None:
        flying = running.filter(job_id=job.pk).aggregate(s=Sum("est_cost"))["s"] or Decimal(0)
        found.append(
            Budget(job.cost_cap, job.cost + flying, job.cost, "The job's cost cap", "Raise the cap (or remove it)")
        )
    scope = Q(user_id=job.owner_id) | Q(endpoint_id=job.endpoint_id) if job.endpoint_id else Q(user_id=job.owner_id)
    for limit in SpendingLimit.objects.filter(scope).select_related("user", "endpoint").order_by("pk"):
        limit.lock()  # in pk order, after the job's row: claims against one limit are weighed one at a time
        spent = limit.spent()
        flying = running.filter(job__in=limit.jobs()).aggregate(s=Sum("est_cost"))["s"] or Decimal(0)
        found.append(
            Budget(
                limit.monthly_usd,
                spent + flying,
                spent,
                f"{limit.label[0].upper()}{limit.label[1:]} monthly spending limit",
                "Staff can raise it on the Usage page",
            )
        )
    return found


def unpriced(book: PriceBook, model: str, found: list[Budget]) -> str:
    """Why a request of `model` may not run under the budgets `found`, or "": a model with no price would cost
    $0 as far as any limit could tell, so it could run past every one."""
    if not found or book.price(model) is not None:
        return ""
    return (
        f"No price is known for the model “{model[:200]}”, and {found[0].says[0].lower()}{found[0].says[1:]} applies "
        "to this job: without a price it cannot be kept. Staff can add the model's price (Admin → Prices), "
        "then resume."
    )


def _within_budgets(job: Job, rows: list) -> list:
    """The claimed rows whose requests fit under every budget (the job's cost cap, its owner's and its
    endpoint's monthly limits), each at its most possible cost. The first that does not fit, and those after
    it, go back to pending, and the job pauses, saying which and why."""
    found = budgets(job, Q(id__in=[r[0] for r in rows]))
    if not found:
        return rows
    book = PriceBook.load()
    kept: list = []
    for row in rows:
        body = json.loads(row[2])
        most = most_cost(book, job.url, body, row[3], job.model)
        over = next((b for b in found if b.committed + most > b.cap), None)
        why = unpriced(book, str(body.get("model") or job.model), found)
        if over is not None or why:
            back = [r[0] for r in rows[len(kept) :]]
            Item.objects.filter(id__in=back).update(status=Item.Status.PENDING, lease_token=None, lease_until=None)
            job.pause_itself(why or (over and over.pause_reason(f"the next one (line {row[5]})", most)) or "")
            break
        for b in found:
            b.committed += most
        Item.objects.filter(id=row[0]).update(est_cost=most)
        kept.append(row)
    return kept


def next_due(job_id: int) -> datetime | None:
    """When the earliest pending item may be tried (None: nothing is pending)."""
    pending = Item.objects.filter(job_id=job_id, status=Item.Status.PENDING)
    if pending.filter(next_attempt_at__isnull=True).exists():
        return clock.now()
    return pending.order_by("next_attempt_at").values_list("next_attempt_at", flat=True).first()


def heartbeat(lease: uuid.UUID) -> None:
    until = clock.now() + timedelta(seconds=lease_seconds())
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {ITEM} SET lease_until = %s WHERE lease_token = %s AND status = '{RUNNING}'",
            [_dt(until), _uuid(lease)],
        )
    # The answer-cache rows this slice is sending for stay its own as long as its items do.
    CachedAnswer.objects.filter(sending_lease=lease).update(sending_until=until)


# Tokens and cost add up over an item's claims: a send handed back (or retried later) may have paid for
# answers already (rejected for breaking their schema), and the job's counters, which a recount sums from
# the items, took them in then.
_SPENT = """prompt_tokens = prompt_tokens + %s, completion_tokens = completion_tokens + %s,
        cached_tokens = cached_tokens + %s, cost = cost + %s"""
_FINAL_SQL = f"""
    UPDATE {ITEM} SET status = %s, attempts = %s, http_status = %s, response = %s, request_id = %s,
        error_code = %s, error_message = %s, {_SPENT}, latency_ms = %s, finished_at = %s, from_cache = %s,
        lease_token = NULL, lease_until = NULL, next_attempt_at = NULL
    WHERE id = %s AND lease_token = %s AND status = '{RUNNING}'
"""
_RELEASE_SQL = f"""
    UPDATE {ITEM} SET status = %s, attempts = %s, next_attempt_at = %s, error_code = %s, error_message = %s,
        http_status = %s, {_SPENT}, lease_token = NULL, lease_until = NULL
    WHERE id = %s AND lease_token = %s AND status = '{RUNNING}'
"""


def write(job_id: int, lease: uuid.UUID, outcomes: list[Outcome]) -> Deltas:
    """Store outcomes held under `lease`; return the counter changes that took effect."""
    if not outcomes:
        return {}
    now = clock.now()
    token = _uuid(lease)
    adapt_decimal = connection.ops.adapt_decimalfield_value
    deltas: Deltas = defaultdict(int)
    tick: Counter[str] = Counter()
    with transaction.atomic():
        status = Job.lock(job_id)
        # Work handed back while the job is being cancelled is cancelled, not queued again.
        release_to = Item.Status.CANCELLED if status == Job.Status.CANCELLING else Item.Status.PENDING
        with connection.cursor() as cursor:
            for o in outcomes:
                if o.status == Item.Status.PENDING:
                    cursor.execute(
                        _RELEASE_SQL,
                        [
                            release_to,
                            o.attempts,
                            _dt(o.next_attempt_at),
                            _text(o.error_code[:100]),
                            _text(o.error_message[:2000]),
                            o.http_status,
                            o.prompt_tokens,
                            o.completion_tokens,
                            o.cached_tokens,
                            adapt_decimal(o.cost, 12, 8),
                            o.item_id,
                            token,
                        ],
                    )
                    if cursor.rowcount == 1:
                        deltas["n_running"] -= 1
                        deltas[f"n_{release_to}"] += 1
                        tick["retried"] += o.retries
                        _count_spent(o, deltas, tick)
                    continue
                cursor.execute(
                    _FINAL_SQL,
                    [
                        o.status,
                        o.attempts,
                        o.http_status,
                        _text(o.response),
                        _text(o.request_id[:200]),
                        _text(o.error_code[:100]),
                        _text(o.error_message[:2000]),
                        o.prompt_tokens,
                        o.completion_tokens,
                        o.cached_tokens,
                        adapt_decimal(o.cost, 12, 8),
                        o.latency_ms,
                        _dt(now),
                        o.from_cache,
                        o.item_id,
                        token,
                    ],
                )
                if cursor.rowcount != 1:
                    continue  # the lease was lost: another slice owns this item now
                deltas["n_running"] -= 1
                deltas[f"n_{o.status}"] += 1
                if o.from_cache:
                    deltas["cache_hits"] += 1
                    deltas["cache_saved"] += o.saved
                tick[o.status] += 1
                tick["retried"] += o.retries
                _count_spent(o, deltas, tick)
        if deltas:
            Job(pk=job_id).add_to_counters(**deltas)
        if tick:
            JobTick.add(job_id, now, tick)
        _remember_answers(lease, outcomes, now)
    return deltas


def _count_spent(o: Outcome, deltas: Deltas, tick: Counter[str]) -> None:
    deltas["prompt_tokens"] += o.prompt_tokens
    deltas["completion_tokens"] += o.completion_tokens
    deltas["cached_tokens"] += o.cached_tokens
    deltas["cost"] += o.cost
    tick["prompt_tokens"] += o.prompt_tokens
    tick["completion_tokens"] += o.completion_tokens


def _remember_answers(lease: uuid.UUID, outcomes: list[Outcome], now: datetime) -> None:
    """With the results: the answers of requests sent for the answer cache go into it, and the cache rows of
    sends that ended without one are let go (the items waiting on them then send their own)."""
    for o in outcomes:
        if not o.cache_key:
            continue
        mine = CachedAnswer.objects.filter(key=o.cache_key, sending_lease=lease)
        if o.status == Item.Status.SUCCEEDED:
            mine.update(
                response=o.response,
                model=_model_of(o.response),
                prompt_tokens=o.prompt_tokens,
                completion_tokens=o.completion_tokens,
                cost=o.cost,
                answered_at=now,
                sending_lease=None,
                sending_until=None,
            )
        else:  # failed, handed back, or to be tried later: whichever item of this request comes first sends it
            mine.update(sending_lease=None, sending_until=None)


def _model_of(response: str) -> str:
    marker = '"model":"'
    start = response.find(marker)
    if start < 0:
        return ""
    start += len(marker)
    return response[start : response.find('"', start)][:200]


def write_each(job_id: int, lease: uuid.UUID, outcomes: list[Outcome]) -> Deltas:
    """After a batch was refused for one bad row (a value the database rejects): store the outcomes
    one by one, and one that is still refused as a failed item saying why, so that a result the
    database cannot hold never sends its request again and again."""
    deltas: Deltas = defaultdict(int)

    def add(stored: Deltas) -> None:
        for name, change in stored.items():
            deltas[name] += change

    for o in outcomes:
        try:
            add(write(job_id, lease, [o]))
        except TRANSIENT_DB_ERRORS:
            raise  # transient: the caller tries the whole batch again (stored ones no longer match the lease)
        except Exception as e:
            message = f"The result could not be stored: {type(e).__name__}: {e}"
            unstorable = UpstreamError(PERMANENT, message, http_status=o.http_status, code="internal_error")
            add(write(job_id, lease, [Outcome.failed(o.item_id, o.attempts, unstorable)]))
    return deltas


def _text(value: str) -> str:
    """Postgres text cannot hold NUL (SQLite can): an upstream's stray NUL becomes U+FFFD."""
    return value.replace("\x00", "\ufffd") if "\x00" in value else value


def release(job_id: int, lease: uuid.UUID, items: list[Claimed]) -> None:
    """Give back claimed items that were never sent (pause, shutdown)."""
    write(job_id, lease, [_with_key(Outcome.released(i.id, i.attempts), i.cache_key) for i in items])


def _with_key(outcome: Outcome, key: str) -> Outcome:
    outcome.cache_key = key  # its row in the answer cache is let go too
    return outcome


def expire(now: datetime | None = None) -> int:
    """Return items whose lease ran out (their worker died) to pending, or cancelled for a cancelling job."""
    total = 0
    stale = Item.objects.filter(status=Item.Status.RUNNING, lease_until__lt=now or clock.now())
    for job_id in list(stale.values_list("job_id", flat=True).distinct().order_by()):
        with transaction.atomic():
            target = Item.Status.CANCELLED if Job.lock(job_id) == Job.Status.CANCELLING else Item.Status.PENDING
            # The clock is read with the lock held: a heartbeat that was waiting for the same lock has landed.
            until = now or clock.now()
            n = Item.objects.filter(job_id=job_id, status=Item.Status.RUNNING, lease_until__lt=until).update(
                status=target, lease_token=None, lease_until=None, next_attempt_at=None
            )
            if n:
                Job(pk=job_id).add_to_counters(n_running=-n, **{f"n_{target}": n})
        total += n
    return total
