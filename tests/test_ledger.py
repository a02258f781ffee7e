"""The ledger (jobs/models/ledger.py), tested directly: every operation, from every holder, in any order, keeps a
job's counters equal to a recount of its items; a holder that lost its items changes nothing; and no code of
jobs/ writes an item's state or a job's counters around it (tests/conftest.py watches every query)."""

import random
import uuid
from datetime import timedelta
from decimal import Decimal

import pytest
from django.db import transaction
from django.utils import timezone

from jobs.models import Endpoint, Item, Job, RemoteBatch, control, ledger
from jobs.models.outcome import Outcome, Result
from tests.conftest import JOBS_DIR, LedgerBypassed
from tests.factories import make_endpoint, make_job

pytestmark = pytest.mark.django_db


def running_job(write, owner, n: int = 30) -> Job:
    endpoint = Endpoint.objects.first() or make_endpoint("http://127.0.0.1:9/v1")
    job = make_job(write, owner, endpoint, n, start=False)
    Job.objects.filter(pk=job.pk).update(status=Job.Status.RUNNING)
    return Job.objects.get(pk=job.pk)


def kept(job: Job) -> dict:
    return Job.objects.filter(pk=job.pk).values(*ledger.tally(job.pk)).get()


def assert_balanced(job: Job) -> None:
    counted = ledger.tally(job.pk)
    have = kept(job)
    assert {k: have[k] for k in counted if k != "cost"} == {k: v for k, v in counted.items() if k != "cost"}
    assert abs(have["cost"] - counted["cost"]) < Decimal("0.000001") * (counted["total"] + 1)


def answer(item_id: int, rng: random.Random) -> Outcome:
    return Outcome.succeeded(
        item_id,
        1,
        0,
        http_status=200,
        response='{"model":"gpt-4o-mini"}',
        request_id="req",
        usage=(rng.randint(1, 50), rng.randint(1, 50), 0),
        cost=Decimal("0.00001234"),
        latency_ms=5,
    )


def test_any_sequence_of_operations_keeps_the_books_balanced(write, owner):
    """Live leases, chunks, people and the sweeper take turns on one job, at random (a few fixed seeds): after
    every transaction the counters equal a recount of the items (the audit checks each close, this test again)."""
    for seed in range(4):
        rng = random.Random(seed)
        job = running_job(write, owner, 40)
        endpoint = job.endpoint
        chunks: list[RemoteBatch] = []
        leases: list[uuid.UUID] = []
        for _ in range(60):
            op = rng.choice(["lease", "settle", "unlease", "expire", "chunk", "give_back", "join", "rest", "people"])
            if op == "lease":
                lease = uuid.uuid4()
                with ledger.open(job.pk) as books:
                    if books.status == Job.Status.RUNNING:
                        books.lease(lease, timezone.now() + timedelta(seconds=rng.choice([-5, 60])), rng.randint(1, 6))
                leases.append(lease)
            elif op == "settle" and leases:
                lease = rng.choice(leases)
                held = list(
                    Item.objects.filter(lease_token=lease, status=Item.Status.RUNNING).values_list("id", "attempts")
                )
                outcomes = []
                for item_id, attempts in held:
                    kind = rng.choice(["ok", "failed", "later", "released"])
                    if kind == "ok":
                        outcomes.append(answer(item_id, rng))
                    elif kind == "failed":
                        outcomes.append(Outcome(item_id, Item.Status.FAILED, attempts + 1, http_status=400))
                    elif kind == "later":
                        outcomes.append(Outcome.retry_later(item_id, attempts + 1, 1, None, wait=0))
                    else:
                        outcomes.append(Outcome.released(item_id, attempts))
                ledger.settle(job.pk, rng.choice([lease, uuid.uuid4()]), outcomes)  # now and then a lost lease
            elif op == "unlease" and leases:
                ids = list(Item.objects.filter(lease_token=rng.choice(leases)).values_list("id", flat=True)[:3])
                with ledger.open(job.pk) as books:
                    books.unlease(ids)
            elif op == "expire":
                ledger.expire(timezone.now())
            elif op == "chunk":
                with ledger.open(job.pk) as books:
                    if books.status == Job.Status.RUNNING:
                        chunk = RemoteBatch.objects.create(job=job, endpoint=endpoint, number=len(chunks) + 1)
                        pending = Item.objects.filter(job=job, status=Item.Status.PENDING)
                        books.take_into_chunk(chunk, list(pending.values_list("id", flat=True)[: rng.randint(1, 8)]))
                        chunks.append(chunk)
            elif op == "give_back" and chunks:
                chunk = rng.choice(chunks)
                with ledger.open(job.pk) as books:
                    books.give_back(chunk, list(chunk.items.values_list("id", flat=True)[:2]))
            elif op == "join" and chunks:
                chunk = rng.choice(chunks)
                results = []
                for custom_id in chunk.items.values_list("custom_id", flat=True):
                    status = rng.choice([Item.Status.SUCCEEDED, Item.Status.FAILED, Item.Status.EXPIRED])
                    fields = {
                        "status": status,
                        "attempts": 1,
                        "http_status": 200,
                        "prompt_tokens": 3,
                        "cost": Decimal("0.001"),
                    }
                    results.append(Result(custom_id, fields, transient=rng.random() < 0.3))
                with ledger.open(job.pk) as books:
                    books.join(chunk, results, max_attempts=3, hybrid=rng.random() < 0.5)
            elif op == "rest" and chunks:
                status = rng.choice(
                    [Item.Status.CANCELLED, Item.Status.EXPIRED, Item.Status.FAILED, Item.Status.PENDING]
                )
                with ledger.open(job.pk) as books:
                    books.settle_rest(rng.choice(chunks), status)
            elif op == "people":
                job.refresh_from_db()
                try:
                    rng.choice([control.cancel, control.retry_failed])(job)
                except Exception as e:  # a state the diagram does not allow: nothing changes
                    assert "cannot" in str(e) or "no failed items" in str(e) or "Wait until" in str(e)
                job.refresh_from_db()
                if job.status == Job.Status.QUEUED:
                    Job.objects.filter(pk=job.pk).update(status=Job.Status.RUNNING)
            assert_balanced(job)


def test_a_holder_that_lost_its_items_changes_nothing(write, owner):
    job = running_job(write, owner, 4)
    mine = uuid.uuid4()
    with ledger.open(job.pk) as books:
        leased = books.lease(mine, timezone.now() + timedelta(seconds=60), 4)
    before = kept(job)
    assert ledger.settle(job.pk, uuid.uuid4(), [answer(r[0], random.Random(1)) for r in leased]) == {}
    assert kept(job) == before
    assert set(Item.objects.values_list("status", flat=True)) == {Item.Status.RUNNING}


def test_joining_a_chunk_twice_changes_nothing_the_second_time(write, owner):
    job = running_job(write, owner, 5)
    chunk = RemoteBatch.objects.create(job=job, number=1)
    with ledger.open(job.pk) as books:
        books.take_into_chunk(chunk, list(job.items.values_list("id", flat=True)))
    results = [
        Result(c, {"status": Item.Status.SUCCEEDED, "attempts": 1, "prompt_tokens": 2, "cost": Decimal("0.5")})
        for c in job.items.values_list("custom_id", flat=True)
    ]
    for _ in range(2):
        with ledger.open(job.pk) as books:
            books.join(chunk, results, max_attempts=3, hybrid=False)
    job.refresh_from_db()
    assert (job.n_succeeded, job.n_running, job.prompt_tokens, job.cost) == (5, 0, 10, Decimal("2.5"))


def test_work_handed_back_while_the_job_is_being_cancelled_is_cancelled(write, owner):
    job = running_job(write, owner, 3)
    lease = uuid.uuid4()
    with ledger.open(job.pk) as books:
        leased = books.lease(lease, timezone.now() + timedelta(seconds=60), 3)
    control.cancel(job)  # nothing pending; the three in flight finish
    ledger.settle(job.pk, lease, [Outcome.released(r[0], 0) for r in leased])
    job.refresh_from_db()
    assert (job.n_cancelled, job.n_running) == (3, 0)
    assert ledger.finalize_if_done(job.pk) and Job.objects.get(pk=job.pk).status == Job.Status.CANCELLED


def test_the_audit_catches_counters_that_drifted(write, owner, settings):
    settings.BATCHSITE_AUDIT_BOOKS = True
    job = running_job(write, owner, 3)
    Job.objects.filter(pk=job.pk).update(n_pending=2)  # as a writer around the ledger would leave it
    with pytest.raises(ledger.OutOfBalance, match="n_pending"):
        with ledger.open(job.pk) as books:
            books.cancel_pending()


def test_a_write_around_the_ledger_fails_the_test_that_runs_it(write, owner):
    """The watch in tests/conftest.py: an UPDATE of an item's status or a job's counters made by code of jobs/
    outside jobs/models/ledger.py raises, so any path of the app that bypasses the ledger fails its tests."""
    job = running_job(write, owner, 2)
    around = "Item.objects.filter(job_id=job_id).update(status='cancelled')"
    counters = "Job.objects.filter(pk=job_id).update(n_pending=0)"
    for code in (around, counters):
        bypass = compile(code, JOBS_DIR + "engine/somewhere.py", "exec")
        with pytest.raises(LedgerBypassed, match="engine/somewhere.py"), transaction.atomic():
            exec(bypass, {"Item": Item, "Job": Job, "job_id": job.pk})
        within = compile(code, JOBS_DIR + "models/ledger.py", "exec")
        exec(within, {"Item": Item, "Job": Job, "job_id": job.pk})  # the ledger itself may
    # A job's status is the state diagram's, and other columns are anyone's.
    elsewhere = compile(
        "Job.objects.filter(pk=job_id).update(status='paused', name='x')", JOBS_DIR + "web/v.py", "exec"
    )
    exec(elsewhere, {"Job": Job, "job_id": job.pk})
