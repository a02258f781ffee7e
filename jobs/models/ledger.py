"""The ledger: every change to an item's state, and to its job's counters, cost, timeline and cached answers.

An item's fate is written here and nowhere else, whoever holds it: a live slice (its lease), a chunk at the
Batch API, or a person (cancel, retry). `open(job_id)` is a transaction on one job's books: it locks the job's
row first (the lock order: the job, then its items, then anything else), reads the job's status, and
collects what each write changes; on the way out it adds the counters once (with F(), so concurrent writers
lose nothing), records the month's spending, and the timeline's bucket. Every write is guarded by the
holder (`lease_token = ?`, or `remote_batch = ?` with no lease, and `status = 'running'`): a holder that lost
its items (an expired lease, a chunk handed back) changes nothing, and only rows actually changed count.

The operations, by holder:
- live (lease): lease pending items, unlease those over a budget, settle outcomes (final, or back to pending
  for a later attempt, or released unsent), expire dead holders' leases;
- remote (chunk): take pending items into a chunk, give them back before it is sent, join its result lines,
  settle the rest by the batch's final status (or by line, for a batch that failed validation);
- people: cancel the pending items, reopen the failed and expired ones.

`recount` sums the counters from the items; BATCHSITE_AUDIT_BOOKS makes every close compare the two (tests)."""

from __future__ import annotations

import logging
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Count, F, Q, Sum

from jobs import clock
from jobs.models.budget import Spending
from jobs.models.cache import CachedAnswer
from jobs.models.item import Item, JobTick, id_batches
from jobs.models.job import InvalidTransition, Job
from jobs.models.outcome import Outcome, Result
from jobs.models.remote import RemoteBatch

log = logging.getLogger(__name__)

ITEM = Item._meta.db_table
# Statuses in the raw SQL below: constants of Item.Status, never user input.
PENDING, RUNNING = Item.Status.PENDING.value, Item.Status.RUNNING.value
COUNTS = tuple(f"n_{s}" for s in Item.Status.values)
SPENT = ("prompt_tokens", "completion_tokens", "cached_tokens", "cost")

# Changes to a job's counters: counts, tokens, and the cost, a Decimal.
Deltas = dict[str, int | Decimal]


class OutOfBalance(AssertionError):
    """BATCHSITE_AUDIT_BOOKS: a job's counters differ from a recount of its items after a write."""


def _uuid(value: uuid.UUID) -> Any:
    return Item._meta.get_field("lease_token").get_db_prep_value(value, connection)


def _dt(value: datetime | None) -> Any:
    return connection.ops.adapt_datetimefield_value(value) if value is not None else None


def _text(value: str) -> str:
    """Postgres text cannot hold NUL (SQLite can): an upstream's stray NUL becomes U+FFFD."""
    return value.replace("\x00", "\ufffd") if "\x00" in value else value


# Tokens and cost add up over an item's sends: a send handed back (or retried later) may have paid for
# answers already (rejected for breaking their schema), and the job's counters, which a recount sums from
# the items, took them in then.
_SPENT_SQL = """prompt_tokens = prompt_tokens + %s, completion_tokens = completion_tokens + %s,
        cached_tokens = cached_tokens + %s, cost = cost + %s"""
_FINAL_SQL = f"""
    UPDATE {ITEM} SET status = %s, attempts = %s, http_status = %s, response = %s, request_id = %s,
        error_code = %s, error_message = %s, {_SPENT_SQL}, latency_ms = %s, finished_at = %s, from_cache = %s,
        lease_token = NULL, lease_until = NULL, next_attempt_at = NULL
    WHERE id = %s AND lease_token = %s AND status = '{RUNNING}'
"""
_RELEASE_SQL = f"""
    UPDATE {ITEM} SET status = %s, attempts = %s, next_attempt_at = %s, error_code = %s, error_message = %s,
        http_status = %s, {_SPENT_SQL}, lease_token = NULL, lease_until = NULL
    WHERE id = %s AND lease_token = %s AND status = '{RUNNING}'
"""
# MATERIALIZED: the candidates are picked once. Inlined into the UPDATE, Postgres may re-run the LIMIT
# subquery and lease more rows than asked for.
_LEASE_SQL = f"""
    WITH picked AS MATERIALIZED (
        SELECT id FROM {ITEM}
        WHERE job_id = %s AND status = '{PENDING}' AND (next_attempt_at IS NULL OR next_attempt_at <= %s)
        ORDER BY line LIMIT %s {{lock}}
    )
    UPDATE {ITEM} SET status = '{RUNNING}', lease_token = %s, lease_until = %s
    WHERE id IN (SELECT id FROM picked) AND status = '{PENDING}'
    RETURNING id, custom_id, body, est_tokens, attempts, line
"""


class Books:
    """One job's books, open for one transaction (`open`): its row locked, its status as of the lock."""

    def __init__(self, job_id: int, status: str | None):
        self.job_id = job_id
        self.status = status  # None: the job was deleted
        self.now = clock.now()
        self.deltas: defaultdict[str, int | Decimal] = defaultdict(int)
        self.tick: Counter[str] = Counter()
        self.released = 0  # items handed back to pending by a chunk (for live slices, past a hybrid switch)

    def count(self, **deltas: int | Decimal) -> None:
        for name, change in deltas.items():
            self.deltas[name] += change

    def _moved(self, n: int, source: str, target: str) -> int:
        if n:
            self.count(**{f"n_{source}": -n})
            self.count(**{f"n_{target}": n})
        return n

    @property
    def release_to(self) -> str:
        """Where work handed back goes: cancelled while the job is being cancelled, else pending."""
        return Item.Status.CANCELLED if self.status == Job.Status.CANCELLING else Item.Status.PENDING

    # Live: leases

    def lease(self, lease: uuid.UUID, until: datetime, limit: int) -> list[tuple[Any, ...]]:
        """Up to `limit` due pending items, running under `lease` until `until`, in line order: rows of (id,
        custom_id, body, est_tokens, attempts, line). On Postgres the candidates are picked FOR UPDATE SKIP
        LOCKED, so slices never wait on each other."""
        lock = "FOR UPDATE SKIP LOCKED" if connection.vendor == "postgresql" else ""
        with connection.cursor() as cursor:
            cursor.execute(_LEASE_SQL.format(lock=lock), [self.job_id, _dt(self.now), limit, _uuid(lease), _dt(until)])
            rows: list[tuple[Any, ...]] = cursor.fetchall()
        rows.sort(key=lambda r: r[5])  # RETURNING order is not guaranteed; keep input order
        self._moved(len(rows), PENDING, RUNNING)
        return rows

    def unlease(self, item_ids: Sequence[int]) -> None:
        """Items just leased back to pending, unsent (over a budget)."""
        for ids in id_batches(item_ids):
            n = Item.objects.filter(id__in=ids, status=Item.Status.RUNNING).update(
                status=Item.Status.PENDING, lease_token=None, lease_until=None
            )
            self._moved(n, RUNNING, PENDING)

    def hold_cost(self, by_cost: Mapping[Decimal, Sequence[int]]) -> None:
        """The most each running item may cost, held as in flight against the budgets until it is settled."""
        for cost, item_ids in by_cost.items():
            for ids in id_batches(item_ids):
                Item.objects.filter(id__in=ids).update(est_cost=cost)

    def settle(self, lease: uuid.UUID, outcomes: list[Outcome]) -> None:
        """Store outcomes of items held under `lease`; an item whose lease was lost (another slice holds it
        now) is left as it is."""
        token = _uuid(lease)
        adapt_decimal = connection.ops.adapt_decimalfield_value
        release_to = self.release_to  # handed back while the job is being cancelled: cancelled
        with connection.cursor() as cursor:
            for o in outcomes:
                error = [_text(o.error_code[:100]), _text(o.error_message[:2000])]
                spent = [o.prompt_tokens, o.completion_tokens, o.cached_tokens, adapt_decimal(o.cost, 12, 8)]
                held = [o.item_id, token]
                if o.status == Item.Status.PENDING:
                    when = _dt(o.next_attempt_at)
                    cursor.execute(_RELEASE_SQL, [release_to, o.attempts, when, *error, o.http_status, *spent, *held])
                    if cursor.rowcount == 1:
                        self._moved(1, RUNNING, release_to)
                        self.tick["retried"] += o.retries
                        self._spent(o)
                    continue
                answer = [o.http_status, _text(o.response), _text(o.request_id[:200])]
                done = [o.latency_ms, _dt(self.now), o.from_cache]
                cursor.execute(_FINAL_SQL, [o.status, o.attempts, *answer, *error, *spent, *done, *held])
                if cursor.rowcount != 1:
                    continue  # the lease was lost: another slice owns this item now
                self._moved(1, RUNNING, o.status)
                if o.from_cache:
                    self.count(cache_hits=1, cache_saved=o.saved)
                self.tick[o.status] += 1
                self.tick["retried"] += o.retries
                self._spent(o)
        self._remember_answers(lease, outcomes)

    def _spent(self, o: Outcome) -> None:
        self.count(prompt_tokens=o.prompt_tokens, completion_tokens=o.completion_tokens, cached_tokens=o.cached_tokens)
        self.count(cost=o.cost)
        self.tick["prompt_tokens"] += o.prompt_tokens
        self.tick["completion_tokens"] += o.completion_tokens

    def _remember_answers(self, lease: uuid.UUID, outcomes: list[Outcome]) -> None:
        """The answers of requests sent for the answer cache go into it, and the cache rows of sends that ended
        without one are let go (the items waiting on them then send their own)."""
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
                    answered_at=self.now,
                    sending_lease=None,
                    sending_until=None,
                )
            else:  # failed, handed back, or to be tried later: whichever item of this request comes first sends it
                mine.update(sending_lease=None, sending_until=None)

    def expire_leases(self, until: datetime) -> int:
        """Items whose lease ran out before `until` (their slice died) back to pending, or cancelled."""
        target = self.release_to
        n = Item.objects.filter(job_id=self.job_id, status=Item.Status.RUNNING, lease_until__lt=until).update(
            status=target, lease_token=None, lease_until=None, next_attempt_at=None
        )
        return self._moved(n, RUNNING, target)

    # Remote: chunks

    def take_into_chunk(self, chunk: RemoteBatch, item_ids: Sequence[int]) -> int:
        """Pending items into a chunk: running, held by the chunk (no lease). Returns how many were pending."""
        taken = 0
        for ids in id_batches(item_ids):
            taken += Item.objects.filter(id__in=ids, status=Item.Status.PENDING).update(
                status=Item.Status.RUNNING, remote_batch=chunk, lease_token=None, lease_until=None
            )
        return self._moved(taken, PENDING, RUNNING)

    def _held(self, chunk: RemoteBatch) -> Any:
        """The chunk's items it still holds: running in it, and not leased by a live slice (retried since)."""
        return Item.objects.filter(
            job_id=self.job_id, remote_batch=chunk, status=Item.Status.RUNNING, lease_token__isnull=True
        )

    def give_back(self, chunk: RemoteBatch, item_ids: Sequence[int]) -> int:
        """Items of a chunk not yet uploaded back to pending."""
        n = 0
        for ids in id_batches(item_ids):
            n += self._held(chunk).filter(id__in=ids).update(status=Item.Status.PENDING, remote_batch=None)
        return self._moved(n, RUNNING, PENDING)

    def join(self, chunk: RemoteBatch, results: list[Result], *, max_attempts: int, hybrid: bool) -> Counter[str]:
        """Result lines of a chunk to its items. A transient failure goes back to pending while the item has sends
        left (it keeps the error meanwhile); what expired goes back to pending in a hybrid job (it promised an
        answer by its deadline). Returns how many items went to each status (n_succeeded, n_failed, n_expired,
        and n_pending: to be sent again)."""
        resend = self.status != Job.Status.CANCELLING  # a cancelling job sends nothing again
        changed: Counter[str] = Counter()
        for result in results:
            fields = dict(result.fields)
            held = self._held(chunk).filter(custom_id=result.custom_id)
            if resend and result.transient:
                again = {**fields, "status": Item.Status.PENDING, "remote_batch": None}
                if self._store(held.filter(attempts__lt=max_attempts - 1), again, changed):
                    self.tick["retried"] += 1
                    continue
            if fields["status"] == Item.Status.EXPIRED and hybrid:
                fields = {"status": Item.Status.PENDING, "remote_batch": None}
            else:
                fields["finished_at"] = self.now
            self._store(held, fields, changed)
        self.released += changed["n_pending"]
        return changed

    def _store(self, held: Any, fields: dict[str, Any], changed: Counter[str]) -> bool:
        """A result line's fields to its item, if the chunk still holds it. Tokens, cost and attempts are added to
        what the item holds: a retried item keeps what its earlier sends cost."""
        spent = {key: F(key) + fields[key] for key in (*SPENT, "attempts") if key in fields}
        if not held.update(**{**fields, **spent}):
            return False
        status = fields["status"]
        changed[f"n_{status}"] += 1
        self._moved(1, RUNNING, status)
        self.count(**{key: fields.get(key, 0) for key in SPENT})
        if status == Item.Status.SUCCEEDED:
            self.tick["succeeded"] += 1
        elif status != PENDING:
            self.tick["failed"] += 1
        self.tick["prompt_tokens"] += fields.get("prompt_tokens", 0)
        self.tick["completion_tokens"] += fields.get("completion_tokens", 0)
        return True

    def settle_rest(self, chunk: RemoteBatch, status: str, **fields: Any) -> int:
        """The chunk's items no result line settled, to `status` with `fields` (an error's code and message)."""
        if status != PENDING:
            fields["finished_at"] = self.now
        else:
            fields["remote_batch"] = None
        n = self._held(chunk).update(status=status, **fields)
        if status == PENDING:
            self.released += n
        return self._moved(n, RUNNING, status)

    def fail_by_line(self, chunk: RemoteBatch, error_of: Mapping[int, dict[str, Any]], fallback: dict[str, Any]) -> int:
        """A chunk that failed validation: each item it holds fails with the error naming its line of the chunk's
        file (1-based, the items in line order), or with `fallback`, the batch's general error."""
        n = 0
        rows = Item.objects.filter(remote_batch=chunk).order_by("line").values_list("id", "status")
        for position, (item_id, status) in enumerate(rows, start=1):
            if status != Item.Status.RUNNING:
                continue
            error = error_of.get(position, fallback)
            n += (
                self._held(chunk)
                .filter(id=item_id)
                .update(
                    status=Item.Status.FAILED,
                    error_code=str(error.get("code") or "invalid_request")[:100],
                    error_message=str(error.get("message") or "")[:2000],
                    attempts=F("attempts") + 1,
                    finished_at=self.now,
                )
            )
        return self._moved(n, RUNNING, Item.Status.FAILED)

    # People

    def cancel_pending(self) -> int:
        n = Item.objects.filter(job_id=self.job_id, status=Item.Status.PENDING).update(
            status=Item.Status.CANCELLED, next_attempt_at=None
        )
        return self._moved(n, PENDING, Item.Status.CANCELLED)

    def reopen_failed(self) -> int:
        """Failed and expired items back to pending, with fresh attempts and no result."""
        reset = dict(
            status=Item.Status.PENDING,
            remote_batch=None,  # no longer the old chunk's: collecting it again must not touch the item
            attempts=0,
            http_status=None,
            response="",
            request_id="",
            error_code="",
            error_message="",
            next_attempt_at=None,
            finished_at=None,
            latency_ms=None,
        )
        n = 0
        for status in (Item.Status.FAILED, Item.Status.EXPIRED):
            n += self._moved(Item.objects.filter(job_id=self.job_id, status=status).update(**reset), status, PENDING)
        return n

    # Closing

    def close(self) -> None:
        """Write what the transaction changed to the job's row, the spending table and the timeline."""
        deltas = {k: v for k, v in self.deltas.items() if v}
        if deltas:
            Job.objects.filter(pk=self.job_id).update(
                **{k: F(k) + v for k, v in deltas.items()}, updated_at=clock.now()
            )
            if deltas.get("cost"):
                Spending.record(self.job_id, Decimal(deltas["cost"]))
        if self.tick:
            JobTick.add(self.job_id, self.now, self.tick)
        if settings.BATCHSITE_AUDIT_BOOKS and self.status is not None:
            audit(self.job_id)


@contextmanager
def open(job_id: int) -> Iterator[Books]:
    """A transaction on the job's books: the job's row locked first, what changes written once on the way out."""
    with transaction.atomic():
        books = Books(job_id, Job.lock(job_id))
        yield books
        books.close()


def count(job_id: int, **deltas: int | Decimal) -> None:
    """Add to a job's counters (and the month's spending, for a cost), under its lock."""
    with open(job_id) as books:
        books.count(**deltas)


def settle(job_id: int, lease: uuid.UUID, outcomes: list[Outcome]) -> Deltas:
    """Store outcomes held under `lease`; return the counter changes that took effect."""
    if not outcomes:
        return {}
    with open(job_id) as books:
        books.settle(lease, outcomes)
    return dict(books.deltas)


def expire(now: datetime | None = None) -> int:
    """Items whose lease ran out (their worker died) back to pending, or cancelled for a cancelling job."""
    total = 0
    stale = Item.objects.filter(status=Item.Status.RUNNING, lease_until__lt=now or clock.now())
    for job_id in list(stale.values_list("job_id", flat=True).distinct().order_by()):
        with open(job_id) as books:
            # The clock is read with the lock held: a heartbeat that was waiting for the same lock has landed.
            total += books.expire_leases(now or clock.now())
    return total


def _model_of(response: str) -> str:
    marker = '"model":"'
    start = response.find(marker)
    if start < 0:
        return ""
    start += len(marker)
    return response[start : response.find('"', start)][:200]


# The checks


def tally(job_id: int) -> dict[str, Any]:
    """The counters as the items say they are."""
    items = Item.objects.filter(job_id=job_id)
    by_status = dict(items.values_list("status").annotate(n=Count("id")).order_by())
    sums = items.aggregate(p=Sum("prompt_tokens"), c=Sum("completion_tokens"), k=Sum("cached_tokens"), cost=Sum("cost"))
    fields: dict[str, Any] = {f"n_{s}": by_status.get(s, 0) for s in Item.Status.values}
    fields.update(
        total=sum(by_status.values()),
        prompt_tokens=sums["p"] or 0,
        completion_tokens=sums["c"] or 0,
        cached_tokens=sums["k"] or 0,
        cost=sums["cost"] or Decimal(0),
    )
    return fields


def recount(job: Job) -> None:
    """Set the counters from the items (a job whose items were made or changed in bulk, or a check)."""
    fields = tally(job.pk)
    Job.objects.filter(pk=job.pk).update(**fields)
    for name, value in fields.items():
        setattr(job, name, value)


def audit(job_id: int) -> None:
    """OutOfBalance unless the job's counters equal a recount of its items (BATCHSITE_AUDIT_BOOKS, in tests)."""
    want = tally(job_id)
    have = Job.objects.filter(pk=job_id).values(*want).first()
    if have is None:
        return
    # Job.cost keeps 6 places and an item's 8: a sum of rounded costs may differ in the last place.
    wrong = {
        k: (have[k], v)
        for k, v in want.items()
        if (abs(have[k] - v) > Decimal("0.00001") if k == "cost" else have[k] != v)
    }
    if wrong:
        raise OutOfBalance(f"job {job_id}: counters (as kept, as recounted) {wrong}")


def show_remote_counts(job_id: int) -> None:
    """The job's remote_completed/remote_failed: what its batches report done and is not joined yet. A final
    batch counts until it is collected; one being collected counts what is left (a join lowers its counts)."""
    active = RemoteBatch.objects.filter(job_id=job_id, collected_at__isnull=True)
    sums = active.aggregate(c=Sum("n_completed"), f=Sum("n_failed"))
    counts = {"remote_completed": sums["c"] or 0, "remote_failed": sums["f"] or 0}
    Job.objects.filter(~Q(**counts), pk=job_id).update(**counts)


def finalize_if_done(job_id: int) -> bool:
    """Completed (or cancelled) once no item is pending or running; the counters recounted as a check.

    Under the job's row lock, so that items made pending again at the same moment (a retry) either come
    first and keep the job running, or find it completed."""
    with transaction.atomic():
        job = Job.objects.select_for_update().filter(pk=job_id).first()
        if job is None or job.status not in (Job.Status.RUNNING, Job.Status.CANCELLING):
            return False
        if job.n_pending or job.n_running:
            return False
        kept = {k: getattr(job, k) for k in COUNTS}
        recount(job)
        if any(getattr(job, k) != v for k, v in kept.items()):
            # A smoke detector: every writer goes through these books, so this should never be seen.
            log.warning("Job %s counters had drifted; recounted", job_id)
        if job.n_pending or job.n_running:
            return False
        try:
            job.transition(Job.Status.CANCELLED if job.status == Job.Status.CANCELLING else Job.Status.COMPLETED)
        except InvalidTransition:
            return False
    return True
