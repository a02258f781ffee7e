"""The engine's rules, without a cluster: failure classification, Retry-After, backoff, leases, budgets."""

import contextlib
import json
import math
import multiprocessing as mp
import re
import struct
import time
import urllib.request
import uuid
from datetime import timedelta
from decimal import Decimal

import pytest
from django.utils import timezone

from jobs.engine import database, leases, ratelimit, runner, send, tasks, upstream
from jobs.models import Item, Job, Price, control, ledger
from jobs.models.outcome import Outcome
from jobs.pricing import PriceBook
from simulator import SimConfig, serve_in_thread
from tests.factories import make_endpoint, make_job


def err(code=None, type_=None, message="m"):
    return json.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}})


@pytest.mark.parametrize(
    "status,body,kind",
    [
        (429, err("rate_limit_exceeded", "requests"), upstream.RETRY),
        (429, err("insufficient_quota", "insufficient_quota"), upstream.STOP),
        (429, err(None, "insufficient_quota"), upstream.STOP),
        (429, err("credit_balance_exhausted"), upstream.STOP),
        (401, err("invalid_api_key"), upstream.STOP),
        (403, err(None), upstream.STOP),
        (408, "", upstream.RETRY),
        (409, "", upstream.RETRY),
        (500, err(None, "server_error"), upstream.RETRY),
        (503, "<html>unavailable</html>", upstream.RETRY),
        (400, err(None, "invalid_request_error", "bad messages"), upstream.PERMANENT),
        (404, err("model_not_found"), upstream.PERMANENT),
        (422, "{}", upstream.PERMANENT),
    ],
)
def test_classification(status, body, kind):
    error = upstream.classify(status, body, {})
    assert error.kind == kind and error.http_status == status


def test_quota_stop_message_is_plain_words():
    error = upstream.classify(429, err("insufficient_quota"), {})
    assert "quota" in error.message and "resume" in error.message


def test_retry_after_header_forms():
    assert upstream.retry_after_seconds({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5
    assert upstream.retry_after_seconds({"retry-after": "300"}) == 300.0  # large values are honoured too
    http_date = (timezone.now() + timedelta(seconds=30)).strftime("%a, %d %b %Y %H:%M:%S GMT")
    assert 25 < upstream.retry_after_seconds({"retry-after": http_date}) <= 31
    assert upstream.retry_after_seconds({}) is None
    # Broken headers: never an infinite (or NaN) wait that would freeze the endpoint for every process
    assert upstream.retry_after_seconds({"retry-after": "inf"}) == upstream.MAX_RETRY_AFTER
    assert upstream.retry_after_seconds({"retry-after-ms": "1e400"}) == upstream.MAX_RETRY_AFTER
    assert upstream.retry_after_seconds({"retry-after": "nan"}) is None
    assert upstream.retry_after_seconds({"retry-after-ms": "soon", "retry-after": "2"}) == 2.0
    assert upstream.retry_after_seconds({"retry-after": "Someday, 99 Foo"}) is None


def test_backoff_grows_with_jitter_and_a_cap():
    for attempt, (low, high) in {1: (0.125, 0.25), 2: (0.25, 0.5), 3: (0.5, 1), 10: (30, 60)}.items():
        values = [upstream.backoff(attempt) for _ in range(50)]
        assert all(low <= v <= high for v in values)
        assert len(set(values)) > 1


@pytest.mark.parametrize(
    "text,seconds",
    [("12ms", 0.012), ("1s", 1), ("6m0s", 360), ("1h2m3.5s", 3723.5), ("2.5", 2.5), ("", None), ("x", None)],
)
def test_go_durations(text, seconds):
    assert ratelimit.parse_duration(text) == (pytest.approx(seconds) if seconds is not None else None)


def test_usage_for_each_endpoint_shape():
    chat = {"usage": {"prompt_tokens": 10, "completion_tokens": 5, "prompt_tokens_details": {"cached_tokens": 4}}}
    assert upstream.usage_of("/v1/chat/completions", chat) == (10, 5, 4)
    assert upstream.usage_of("/v1/embeddings", {"usage": {"prompt_tokens": 7, "total_tokens": 7}}) == (7, 0, 0)
    responses = {"usage": {"input_tokens": 3, "output_tokens": 2, "input_tokens_details": {"cached_tokens": 1}}}
    assert upstream.usage_of("/v1/responses", responses) == (3, 2, 1)


@pytest.mark.django_db
def test_a_snapshot_is_priced_as_its_model_and_another_model_never_is():
    book = PriceBook.load()
    assert book.price("gpt-4o-mini-2024-07-18").model == "gpt-4o-mini"
    assert book.price("gpt-4o-2024-08-06").model == "gpt-4o"
    assert book.price("GPT-4o-mini").model == "gpt-4o-mini"
    assert book.price("llama3:8b") is None and book.cost("llama3:8b", 1000, 1000) == 0
    assert book.price("o3-2025-04-16").model == "o3"
    # Issue 21: prefix matching priced these as their shorter neighbours
    assert book.price("o3-pro") is None and book.price("o3-pro-2025-06-10") is None
    assert book.price("gpt-4o-mini-search-preview") is None
    Price.objects.create(model="llama3*", input_per_mtok=0, output_per_mtok=0)
    Price.objects.create(model="llama3.1*", input_per_mtok=1, output_per_mtok=1)
    Price.objects.create(model="qwen3", input_per_mtok=1, output_per_mtok=1)
    book = PriceBook.load()
    assert book.price("llama3:8b").model == "llama3*" and book.price("llama3.1:70b").model == "llama3.1*"
    assert book.price("qwen3:32b").model == "qwen3" and book.price("qwen3-coder") is None
    # 1M uncached input at 0.15, 1M cached at 0.075, 1M output at 0.60
    assert book.cost("gpt-4o-mini", 2_000_000, 1_000_000, cached_tokens=1_000_000) == Decimal("0.825")
    Price.objects.filter(model="gpt-4o-mini").update(output_per_mtok=1)
    assert PriceBook.load().cost("gpt-4o-mini", 0, 1_000_000) == 1


@pytest.mark.django_db
def test_a_stale_lease_cannot_overwrite_a_result(write, owner):
    job = make_job(write, owner, make_endpoint("http://127.0.0.1:9/v1"), 3, start=False)
    Job.objects.filter(pk=job.pk).update(status=Job.Status.RUNNING)  # slices claim only for a running job
    old, new = uuid.uuid4(), uuid.uuid4()
    claimed = leases.claim(job.pk, old, 10)
    assert [c.custom_id for c in claimed] == ["req-0", "req-1", "req-2"]
    assert leases.claim(job.pk, new, 10) == []  # nothing left to claim
    # The first worker stalls; its leases expire and a second worker takes the items over.
    ledger.expire(timezone.now() + timedelta(seconds=leases.lease_seconds() + 1))
    assert len(leases.claim(job.pk, new, 10)) == 3
    ok = lambda item, text: Outcome(item.id, Item.Status.SUCCEEDED, 1, http_status=200, response=text)  # noqa: E731
    assert ledger.settle(job.pk, new, [ok(claimed[0], '{"who":"new"}')])["n_succeeded"] == 1
    assert ledger.settle(job.pk, old, [ok(c, '{"who":"old"}') for c in claimed]) == {}
    job.refresh_from_db()
    assert (job.n_succeeded, job.n_running, job.n_pending) == (1, 2, 0)
    assert Item.objects.get(pk=claimed[0].id).response == '{"who":"new"}'
    ledger.recount(job)
    assert (job.n_succeeded, job.n_running) == (1, 2)


@pytest.mark.django_db
def test_nothing_is_claimed_once_the_job_is_paused(write, owner):
    job = make_job(write, owner, make_endpoint("http://127.0.0.1:9/v1"), 4, start=False)
    Job.objects.filter(pk=job.pk).update(status=Job.Status.RUNNING)
    assert len(leases.claim(job.pk, uuid.uuid4(), 1)) == 1
    control.pause(Job.objects.get(pk=job.pk))
    assert leases.claim(job.pk, uuid.uuid4(), 10) == []


@pytest.mark.django_db
def test_claims_respect_next_attempt_and_input_order(write, owner):
    job = make_job(write, owner, make_endpoint("http://127.0.0.1:9/v1"), 4, start=False)
    Job.objects.filter(pk=job.pk).update(status=Job.Status.RUNNING)  # slices claim only for a running job
    first = Item.objects.get(job=job, custom_id="req-0")
    Item.objects.filter(pk=first.pk).update(next_attempt_at=timezone.now() + timedelta(minutes=5))
    assert [c.custom_id for c in leases.claim(job.pk, uuid.uuid4(), 2)] == ["req-1", "req-2"]
    assert leases.next_due(job.pk) <= timezone.now()
    leases.claim(job.pk, uuid.uuid4(), 10)
    assert leases.next_due(job.pk) > timezone.now() + timedelta(minutes=4)


@pytest.mark.django_db
def test_control_actions_are_safe_twice_and_explain_refusals(write, owner):
    job = make_job(write, owner, make_endpoint("http://127.0.0.1:9/v1"), 3, start=False)
    control.pause(job)
    control.pause(job)
    assert job.status == Job.Status.PAUSED
    control.resume(job)
    control.resume(job)
    assert job.status == Job.Status.QUEUED
    control.cancel(job)
    control.cancel(job)
    assert (job.status, job.n_cancelled) == (Job.Status.CANCELLED, 3)
    with pytest.raises(Exception, match="cannot be resumed"):
        control.resume(job)
    with pytest.raises(Exception, match="no failed items"):
        control.retry_failed(job)
    copy = control.duplicate(job, owner)
    assert (copy.status, copy.total, copy.n_pending, copy.name) == (Job.Status.QUEUED, 3, 3, f"Copy of {job.name}")
    assert list(copy.items.values_list("custom_id", "status")) == [(f"req-{i}", "pending") for i in range(3)]


def _reserve_many(folder, n, out):
    limiter = ratelimit.Limiter("ep", rpm=600, tpm=None, store=ratelimit.FileStore(folder))
    start = time.time()
    sends = []
    for _ in range(n):
        delay = limiter.reserve(1)
        sends.append(start + (time.time() - start) + delay)
    out.put(sends)


def test_budget_is_shared_between_processes(tmp_path):
    """Three processes reserving from one 600 RPM budget get slots 0.1 s apart between them."""
    queue = mp.get_context("fork").Queue()
    procs = [mp.get_context("fork").Process(target=_reserve_many, args=(tmp_path, 20, queue)) for _ in range(3)]
    for p in procs:
        p.start()
    slots = sorted(t for _ in procs for t in queue.get(timeout=30))
    for p in procs:
        p.join()
    assert len(slots) == 60
    span = slots[-1] - slots[0]
    burst = ratelimit.BURST_SECONDS / 0.1  # the first second's worth may go at once
    assert span == pytest.approx((60 - burst - 1) * 0.1, abs=0.15)
    gaps = [b - a for a, b in zip(slots[int(burst) :], slots[int(burst) + 1 :])]
    assert min(gaps) > 0.09


def test_cool_down_reaches_every_sender(tmp_path):
    store = ratelimit.FileStore(tmp_path)
    a = ratelimit.Limiter("ep", None, None, store=store)
    b = ratelimit.Limiter("ep", None, None, store=ratelimit.FileStore(tmp_path))
    assert b.reserve(1) == 0
    a.cool_down(2.0)
    assert 1.9 < b.reserve(1) <= 2.0


def test_limits_learned_from_headers(tmp_path):
    limiter = ratelimit.Limiter("ep", None, None, store=ratelimit.FileStore(tmp_path))
    assert not limiter.paced
    limiter.observe({"x-ratelimit-limit-requests": "3000", "x-ratelimit-limit-tokens": "-1"})
    assert (limiter.rpm, limiter.tpm, limiter.learned.rpm) == (3000, None, 3000)
    configured = ratelimit.Limiter("ep2", 100, None, store=ratelimit.FileStore(tmp_path))
    configured.observe({"x-ratelimit-limit-requests": "3000"})
    assert configured.rpm == 100  # a configured limit wins over what the server says
    limiter.observe({"x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "1.5s"})
    assert 1.3 < limiter.store.cooldown_until("ep") - time.time() <= 1.5


def test_an_empty_budget_waits_for_one_more_request_not_a_full_reset(tmp_path):
    limiter = ratelimit.Limiter("ep", None, None, store=ratelimit.FileStore(tmp_path))
    # An empty bucket of 3,000 a minute: full again in 60 s, room for the next request in 20 ms.
    limiter.observe(
        {
            "x-ratelimit-limit-requests": "3000",
            "x-ratelimit-remaining-requests": "0",
            "x-ratelimit-reset-requests": "1m0s",
        }
    )
    assert limiter.store.cooldown_until("ep") - time.time() <= 0.02


def test_error_bodies_are_stored_on_one_line():
    pretty = json.dumps(
        {
            "error": {
                "message": "Invalid 'messages': empty.",
                "type": "invalid_request_error",
                "param": "messages",
                "code": None,
            }
        },
        indent=2,
    )
    error = upstream.classify(400, pretty, {})
    assert "\n" not in error.body and json.loads(error.body) == json.loads(pretty)
    assert error.message == "Invalid 'messages': empty."
    html = "<html>\n<body>502 Bad Gateway</body>\n</html>"
    assert upstream.classify(502, html, {}).body == html  # not JSON: kept as it is, the export wraps it


def test_limiter_takes_no_slot_after_the_deadline(tmp_path):
    limiter = ratelimit.Limiter("ep", rpm=60, tpm=None, store=ratelimit.FileStore(tmp_path))
    deadline = time.time() + 2.5
    waits = [limiter.reserve(1, latest=deadline) for _ in range(5)]
    # one slot a second: now (and the burst allowance), +1 s, +2 s; then none before the deadline
    assert [w < 2.6 for w in waits] == [True, True, True, False, False] and waits[3] == math.inf
    assert 2.5 < limiter.reserve(1) <= 3.05  # refused slots were not taken: the next one follows +2 s


def test_unpaced_cool_down_past_the_deadline_is_refused(tmp_path):
    limiter = ratelimit.Limiter("ep", None, None, store=ratelimit.FileStore(tmp_path))
    limiter.cool_down(600)
    assert limiter.reserve(1, latest=time.time() + 60) == math.inf
    assert 599 < limiter.reserve(1) <= 600


def _touches(sql: str, model) -> bool:
    return re.search(rf'(?<![\w"])"?{model._meta.db_table}"?(?![\w"])', sql) is not None


def _locks_job_before_items(run) -> bool:
    """Whether `run()` takes the job's row (SELECT ... FOR UPDATE, or an UPDATE of it) before it first
    writes an item. SQLite has no FOR UPDATE: there, reading the job's row first is what counts."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    with CaptureQueriesContext(connection) as captured:
        run()
    sql = [" ".join(q["sql"].split()) for q in captured.captured_queries]
    writes = ("UPDATE", "INSERT", "DELETE", "WITH")
    first_item_write = next(i for i, s in enumerate(sql) if s.upper().startswith(writes) and _touches(s, Item))
    locks = [s for s in sql[:first_item_write] if _touches(s, Job)]
    if connection.features.has_select_for_update:
        locks = [s for s in locks if "FOR UPDATE" in s.upper() or s.upper().startswith("UPDATE")]
    return bool(locks)


@pytest.mark.django_db(transaction=True)
def test_every_writer_locks_the_job_before_its_items(write, owner):
    """One lock order (job row, then items) for claims, writes, expiry, cancel and retry: with two
    orders, a cancel and a claim on Postgres wait on each other in a circle."""
    job = make_job(write, owner, make_endpoint("http://127.0.0.1:9/v1"), 6, start=False)
    Job.objects.filter(pk=job.pk).update(status=Job.Status.RUNNING)  # slices claim only for a running job
    lease = uuid.uuid4()
    claimed = []
    assert _locks_job_before_items(lambda: claimed.extend(leases.claim(job.pk, lease, 3)))
    failed = Outcome(claimed[0].id, Item.Status.FAILED, 1, http_status=400, response="{}")
    assert _locks_job_before_items(lambda: ledger.settle(job.pk, lease, [failed]))
    after_the_leases = timezone.now() + timedelta(seconds=leases.lease_seconds() + 1)
    assert _locks_job_before_items(lambda: ledger.expire(after_the_leases))
    job = Job.objects.get(pk=job.pk)
    assert _locks_job_before_items(lambda: control.retry_failed(job))
    assert _locks_job_before_items(lambda: control.cancel(job))


# A slice run in this process against a simulator in a thread: the engine's behaviour over real HTTP,
# without a cluster. Slice tasks it enqueues are recorded instead of going to the broker.


@pytest.fixture
def sim():
    """sim(**SimConfig fields) -> base URL of a simulator in a thread of this process."""
    with contextlib.ExitStack() as stack:
        yield lambda **config: stack.enter_context(serve_in_thread(SimConfig(**config)))


def sim_get(url: str, path: str):
    with urllib.request.urlopen(url.removesuffix("/v1") + path, timeout=10) as response:
        return json.load(response)


@pytest.fixture
def enqueued(monkeypatch):
    """The slice tasks enqueued during the test, as their argument tuples (job_id, slices, generation, enqueued_at)."""
    calls = []
    monkeypatch.setattr("jobs.queue.send_notifications_on_commit", lambda job_id: None)
    monkeypatch.setattr("jobs.queue.async_task", lambda func, *args, **options: calls.append(args))
    return calls


def slice_run(job, budget: float, slices: int = 1) -> tuple[dict, float]:
    started = time.monotonic()
    summary = runner.run(job.pk, budget=budget, slices=slices)
    job.refresh_from_db()
    return summary, time.monotonic() - started


@pytest.mark.django_db(transaction=True)
def test_a_retry_released_past_the_deadline_keeps_the_chain_going(sim, enqueued, write, owner):
    """The released item is stored before the slice looks for due work: it waits for it up to its
    deadline and hands over, instead of seeing the item as still running and leaving without a successor."""
    url = sim(error_rates={429: 1.0}, retry_after_ms=60_000)
    job = make_job(write, owner, make_endpoint(url, concurrency=4), 1, start=False)
    summary, elapsed = slice_run(job, budget=1.5)
    assert summary["sent"] == 1 and summary["handed_over"] and len(enqueued) == 1
    assert elapsed >= 1.4
    item = job.items.get()
    assert (job.status, item.status, item.attempts) == (
        Job.Status.RUNNING,
        Item.Status.PENDING,
        0,
    )  # a 429 is no attempt
    assert item.error_code == "rate_limit_exceeded"
    assert item.next_attempt_at > timezone.now() + timedelta(seconds=55)


@pytest.mark.django_db(transaction=True)
def test_waiting_for_a_retry_costs_one_slice_per_budget(sim, enqueued, write, owner):
    """Nothing due before the deadline: the slice sleeps until it, then hands over once; it does not hand
    over at once (a tight loop of slices for as long as a Retry-After lasts)."""
    url = sim()
    job = make_job(write, owner, make_endpoint(url), 3, start=False)
    job.items.update(next_attempt_at=timezone.now() + timedelta(minutes=10))
    summary, elapsed = slice_run(job, budget=2.0)
    assert elapsed >= 1.9 and summary["sent"] == 0 and len(enqueued) == 1
    assert sim_get(url, "/_sim/stats")["total"] == 0


@pytest.mark.django_db(transaction=True)
def test_a_429_of_a_spent_budget_shows_its_cool_down_on_the_endpoint(sim, enqueued, write, owner):
    url = sim(rpm=2, start_empty=True)  # the first request finds the bucket empty: "remaining 0", 30 s to wait
    job = make_job(write, owner, make_endpoint(url), 2, start=False)
    before = timezone.now()
    slice_run(job, budget=1.0)
    job.endpoint.refresh_from_db()
    assert before + timedelta(seconds=29) < job.endpoint.cooldown_until < timezone.now() + timedelta(seconds=31)


@pytest.mark.django_db(transaction=True)
def test_reservations_never_outlive_the_slice(sim, enqueued, write, owner):
    """At 6 requests a minute, 20 requests in flight would hold slots for 200 s; a 2 s slice takes only
    what it can use before its deadline, gives the other items back, and ends on time."""
    url = sim(latency_ms=10)
    job = make_job(write, owner, make_endpoint(url, rpm=6, concurrency=20), 20, start=False)
    summary, elapsed = slice_run(job, budget=2.0)
    assert elapsed < 4.0 and summary["sent"] == 1 and summary["handed_over"]
    assert (job.n_succeeded, job.n_pending, job.n_running) == (1, 19, 0)
    assert job.items.filter(status=Item.Status.PENDING, attempts=0).count() == 19  # given back without an attempt


@pytest.mark.django_db(transaction=True)
def test_the_timeline_does_not_count_items_given_back_unsent_as_retries(sim, enqueued, write, owner):
    """Items tried before (attempts > 0) and handed back without being sent are not retried again;
    each 429 counts once, whether retried inside the slice or released for a later one."""
    url = sim(latency_ms=10)
    job = make_job(write, owner, make_endpoint(url, rpm=6, concurrency=20), 20, start=False)
    job.items.update(attempts=1)
    slice_run(job, budget=2.0)
    assert (job.n_succeeded, job.n_pending) == (1, 19)
    assert sum(t.retried for t in job.ticks.all()) == 0


@pytest.mark.django_db(transaction=True)
def test_the_timeline_counts_retries_in_and_after_the_slice(sim, enqueued, write, owner):
    url = sim(latency_ms=10, error_rates={429: 1.0}, retry_after_ms=300)
    job = make_job(write, owner, make_endpoint(url, concurrency=1), 1, start=False)
    Job.objects.filter(pk=job.pk).update(max_attempts=50)
    slice_run(job, budget=1.2)  # 429 ... 429 while the slice lasts, then one released past the deadline
    sent = sim_get(url, "/_sim/stats")["total"]
    assert sent >= 2 and job.items.get().attempts == 0  # 429s are not attempts
    assert sum(t.retried for t in job.ticks.all()) == sent


@pytest.mark.django_db(transaction=True)
def test_a_request_that_crashes_the_runner_fails_after_its_attempts(sim, enqueued, write, owner, monkeypatch):
    def broken(url, body):
        raise RuntimeError("usage block not understood")

    monkeypatch.setattr(upstream, "usage_of", broken)
    monkeypatch.setattr(send, "INTERNAL_ERROR_RETRY_SECONDS", 0.1)
    url = sim()
    job = make_job(write, owner, make_endpoint(url), 1, start=False)
    Job.objects.filter(pk=job.pk).update(max_attempts=3)
    slice_run(job, budget=5.0)
    item = job.items.get()
    assert (item.status, item.attempts, item.error_code) == (Item.Status.FAILED, 3, "internal_error")
    assert "RuntimeError" in item.error_message
    assert sim_get(url, "/_sim/stats")["total"] == 3
    assert job.status == Job.Status.COMPLETED


@pytest.mark.django_db(transaction=True)
def test_results_survive_a_locked_database(sim, enqueued, write, owner, monkeypatch):
    """A "database is locked" while storing results is waited out: nothing is lost, nothing sent twice."""
    from django.db import OperationalError

    real_write, failures = ledger.settle, []

    def flaky_write(*args):
        if len(failures) < 2:
            failures.append(1)
            raise OperationalError("database is locked")
        return real_write(*args)

    monkeypatch.setattr(ledger, "settle", flaky_write)
    url = sim(latency_ms=20)
    job = make_job(write, owner, make_endpoint(url, concurrency=10), 30, start=False)
    slice_run(job, budget=10.0)
    assert len(failures) == 2
    assert (job.status, job.n_succeeded) == (Job.Status.COMPLETED, 30)
    assert sim_get(url, "/_sim/stats")["total"] == 30


@pytest.mark.django_db(transaction=True)
def test_first_request_alone_finds_out_the_limits(sim, enqueued, write, owner):
    """Before the endpoint's limits are known one request goes alone; the rest wait for its headers
    instead of going out as a blind burst that an exhausted budget answers with 429s."""
    url = sim(latency_ms=100, rpm=1200)
    job = make_job(write, owner, make_endpoint(url, concurrency=20), 20, start=False)
    slice_run(job, budget=10.0)
    times = sorted(entry["t"] for entry in sim_get(url, "/_sim/log"))
    assert len(times) == 20 and times[1] - times[0] >= 0.09  # the others after the first answer
    job.endpoint.refresh_from_db()
    assert job.endpoint.learned_rpm == 1200


def _set(job, **fields):
    Job.objects.filter(pk=job.pk).update(**fields)
    job.refresh_from_db()


@pytest.mark.django_db
def test_sweeper_leaves_jobs_waiting_in_the_queue_alone(write, owner, enqueued, settings):
    """More jobs than workers: a job whose slices wait behind others' shows no life for minutes, but
    starting it again would only add chains (each one growing without bound, sweep after sweep)."""
    settings.BATCHSITE_SLICES_PER_JOB = 2
    endpoint = make_endpoint("http://127.0.0.1:9/v1")
    now = timezone.now()
    running, waiting = (make_job(write, owner, endpoint, 3, start=False) for _ in range(2))
    # `running` was enqueued first and its slice runs; `waiting` was enqueued after it, 10 minutes ago.
    _set(
        running,
        status=Job.Status.RUNNING,
        heartbeat_at=now,
        slice_enqueued_at=now - timedelta(minutes=11),
        slice_picked_at=now - timedelta(minutes=11),
    )
    _set(waiting, created_at=now - timedelta(minutes=10), slice_enqueued_at=now - timedelta(minutes=10), slice_gen=1)
    for _ in range(3):
        assert tasks.sweep()["restarted"] == []
    assert enqueued == []

    # A slice enqueued well after `waiting`'s has started: the queue is first in, first out, so its
    # slices were lost (a worker died with them). It is restarted once, with one new generation.
    _set(running, slice_picked_at=now - timedelta(minutes=2))
    assert tasks.sweep()["restarted"] == [waiting.pk]
    assert tasks.sweep()["restarted"] == []  # the new slices wait in the queue now
    assert [(job_id, gen) for job_id, _, gen, _ in enqueued] == [(waiting.pk, 2), (waiting.pk, 2)]


@pytest.mark.django_db
def test_sweeper_restarts_a_job_whose_slices_are_gone(write, owner, enqueued):
    endpoint = make_endpoint("http://127.0.0.1:9/v1")
    long_ago = timezone.now() - timedelta(minutes=10)
    # Its last slice started and died (no heartbeat since), and nothing else runs.
    died = make_job(write, owner, endpoint, 3, start=False)
    _set(died, status=Job.Status.RUNNING, heartbeat_at=long_ago, slice_enqueued_at=long_ago, slice_picked_at=long_ago)
    # Its slice was enqueued but never started, on a cluster that runs nothing: it was lost.
    lost = make_job(write, owner, endpoint, 3, start=False)
    _set(lost, created_at=long_ago, slice_enqueued_at=long_ago)
    assert sorted(tasks.sweep()["restarted"]) == sorted([died.pk, lost.pk])
    assert tasks.sweep()["restarted"] == []


@pytest.mark.django_db
def test_slices_of_an_older_generation_stop(write, owner, enqueued):
    job = make_job(write, owner, make_endpoint("http://127.0.0.1:9/v1"), 3, start=False)
    Job.start_slices(job.pk)
    Job.start_slices(job.pk)  # a restart: generation 2
    assert runner.run(job.pk, generation=1) == {"job": job.pk, "skipped": "superseded"}
    assert Job.enqueue_next_slice(job.pk, 2, generation=1) is False  # an old chain does not go on
    assert Job.enqueue_next_slice(job.pk, 2, generation=2) is True
    assert [gen for _, _, gen, _ in enqueued] == [1, 1, 2, 2, 2]
    assert not database.job_wants_slice(job.pk, 1)


@pytest.mark.django_db
def test_resume_and_retry_never_add_chains(write, owner, enqueued, settings, django_capture_on_commit_callbacks):
    settings.BATCHSITE_SLICES_PER_JOB = 2
    job = make_job(write, owner, make_endpoint("http://127.0.0.1:9/v1"), 4, start=False)
    with django_capture_on_commit_callbacks(execute=True):
        job.start()
    _set(job, status=Job.Status.RUNNING)
    job.items.filter(line__lte=2).update(status=Item.Status.FAILED)
    ledger.recount(job)
    # Retrying while the job runs: its slices take the items up; a new chain would be one too many.
    with django_capture_on_commit_callbacks(execute=True):
        assert control.retry_failed(job) == 2
    assert len(enqueued) == 2
    # Resuming starts a new generation, and the slices still finishing from before stop.
    control.pause(job)
    with django_capture_on_commit_callbacks(execute=True):
        control.resume(job)
    assert [gen for _, _, gen, _ in enqueued] == [1, 1, 2, 2]
    assert not database.job_wants_slice(job.pk, 1)
    # A completed job's retry starts it again.
    job.items.update(status=Item.Status.SUCCEEDED)
    job.items.filter(line=1).update(status=Item.Status.FAILED)
    ledger.recount(job)
    _set(job, status=Job.Status.COMPLETED)
    with django_capture_on_commit_callbacks(execute=True):
        assert control.retry_failed(job) == 1
    assert [gen for _, _, gen, _ in enqueued] == [1, 1, 2, 2, 3, 3]


@pytest.mark.django_db
def test_schedules_are_registered_once_and_clean_up_runs(settings, tmp_path):
    settings.DATA_DIR = tmp_path  # other tests' uploads are not this test's
    from django_q.models import Schedule

    from jobs.engine import tasks

    tasks.ensure_schedules()
    tasks.ensure_schedules()
    assert sorted(Schedule.objects.values_list("name", "func")) == [
        ("batchsite-clean-up", "jobs.engine.tasks.clean_up"),
        ("batchsite-notifications", "jobs.engine.tasks.send_notifications"),
        ("batchsite-remote-poller", "jobs.engine.tasks.poll_remote"),
        ("batchsite-sweeper", "jobs.engine.tasks.sweep"),
    ]
    assert tasks.clean_up() == {"uploads_removed": 0, "cached_answers_removed": 0, "events_removed": 0}


@pytest.mark.django_db(transaction=True)
def test_a_slice_stays_while_another_holds_items_it_may_hand_back(sim, enqueued, write, owner):
    """Another slice (already handed over, so with no successor of its own) holds every item, then hands
    them back for a retry: this slice must still be there to take them, not have left at once."""
    import threading

    from django.db import connection

    url = sim()
    job = make_job(write, owner, make_endpoint(url), 3, start=False)
    Job.objects.filter(pk=job.pk).update(status=Job.Status.RUNNING)
    other = uuid.uuid4()
    held = leases.claim(job.pk, other, 3)

    def hand_back():
        ledger.settle(job.pk, other, [Outcome.released(c.id, 1) for c in held])
        connection.close()

    threading.Timer(0.7, hand_back).start()
    summary, elapsed = slice_run(job, budget=4.0)
    assert summary["sent"] == 3 and job.status == Job.Status.COMPLETED and job.n_succeeded == 3


@pytest.mark.django_db(transaction=True)
def test_a_slice_leaves_at_once_when_nothing_is_pending_or_held(sim, enqueued, write, owner):
    url = sim()
    job = make_job(write, owner, make_endpoint(url), 2, start=False)
    Job.objects.filter(pk=job.pk).update(status=Job.Status.RUNNING)
    job.items.update(status=Item.Status.SUCCEEDED)
    ledger.recount(job)
    summary, elapsed = slice_run(job, budget=5.0)
    assert elapsed < 2 and summary["finished"] and not enqueued


@pytest.mark.django_db(transaction=True)
def test_a_result_the_database_refuses_fails_that_item_only(sim, enqueued, write, owner, monkeypatch):
    """One row Postgres refuses (say, an absurd cost) must not cost the batch's other results, nor send
    its own request again and again."""
    from django.db import DataError

    url = sim(latency_ms=5)
    job = make_job(write, owner, make_endpoint(url, concurrency=10), 10, start=False)
    bad = job.items.get(custom_id="req-3").pk
    real_write = ledger.settle

    def refusing_write(job_id, lease, outcomes):
        if any(o.item_id == bad and o.status == Item.Status.SUCCEEDED for o in outcomes):
            raise DataError("numeric field overflow")
        return real_write(job_id, lease, outcomes)

    monkeypatch.setattr(ledger, "settle", refusing_write)
    slice_run(job, budget=5.0)
    assert (job.status, job.n_succeeded, job.n_failed) == (Job.Status.COMPLETED, 9, 1)
    item = Item.objects.get(pk=bad)
    assert item.error_code == "internal_error" and "numeric field overflow" in item.error_message
    assert sim_get(url, "/_sim/stats")["total"] == 10


@pytest.mark.django_db
def test_nul_characters_from_upstream_are_stored_as_replacement_characters(write, owner):
    job = make_job(write, owner, make_endpoint("http://127.0.0.1:9/v1"), 1, start=False)
    Job.objects.filter(pk=job.pk).update(status=Job.Status.RUNNING)  # slices claim only for a running job
    lease = uuid.uuid4()
    (claimed,) = leases.claim(job.pk, lease, 1)
    ledger.settle(
        job.pk,
        lease,
        [
            Outcome(
                claimed.id,
                Item.Status.FAILED,
                1,
                http_status=500,
                response="bad\x00gateway",
                error_code="http_500",
                error_message="bad\x00gateway",
            )
        ],
    )
    item = job.items.get()
    assert item.response == item.error_message == "bad\ufffdgateway"


@pytest.mark.django_db(transaction=True)
def test_a_slice_that_fails_before_sending_pauses_the_job_instead_of_looping(sim, enqueued, write, owner, monkeypatch):
    def broken():
        raise RuntimeError("price table unreadable")

    monkeypatch.setattr(PriceBook, "load", staticmethod(broken))
    job = make_job(write, owner, make_endpoint(sim()), 3, start=False)
    with pytest.raises(RuntimeError):
        runner.run(job.pk, budget=2.0)
    job.refresh_from_db()
    assert job.status == Job.Status.PAUSED and "price table unreadable" in job.status_reason
    assert not enqueued  # no successor that would fail the same way at once


def test_a_429_with_budget_left_is_one_off_and_an_empty_budget_is_spent(tmp_path):
    limiter = ratelimit.Limiter("ep", None, None, store=ratelimit.FileStore(tmp_path))
    assert not limiter.spent({}, 100)  # no headers, no known limit: a one-off
    assert limiter.spent({"x-ratelimit-remaining-requests": "0"}, 100)
    assert limiter.spent({"x-ratelimit-remaining-requests": "5", "x-ratelimit-remaining-tokens": "99"}, 100)
    assert not limiter.spent({"x-ratelimit-remaining-requests": "5", "x-ratelimit-remaining-tokens": "500"}, 100)
    assert not limiter.spent({"x-ratelimit-remaining-requests": "-1"}, 100)  # "not limited"
    # No headers on the 429, but a known limit: spent when our own sending is at that pace.
    paced = ratelimit.Limiter("ep2", 600, None, store=ratelimit.FileStore(tmp_path))
    assert not paced.spent({}, 1)  # nothing sent yet: far below the pace
    for _ in range(10):
        paced.reserve(1)  # a second's worth at once: the schedule is booked ahead of now
    assert paced.spent({}, 1)


def test_aimd_halves_the_rate_at_most_once_a_second_and_climbs_back(tmp_path, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(ratelimit.time, "time", lambda: clock[0])
    store = ratelimit.FileStore(tmp_path)
    a = ratelimit.Limiter("ep", 600, None, store=store)
    b = ratelimit.Limiter("ep", 600, None, store=ratelimit.FileStore(tmp_path))  # another process
    assert store.peek("ep")[2] == 1.0
    a.slow_down()
    a.slow_down()  # the same second: one cut
    assert store.peek("ep")[2] == pytest.approx(0.5)
    clock[0] += 1.0
    b.slow_down()  # 0.5 + 0.05 climbed back in that second, then halved
    assert store.peek("ep")[2] == pytest.approx(0.275)
    clock[0] += 4.5  # + 0.05 a second
    assert store.peek("ep")[2] == pytest.approx(0.5)
    # A cut rate spaces the slots out for every sender: 0.1 s apart at the full rate, 0.2 s at half.
    assert b.reserve(1) == 0.0
    assert b.reserve(1) == 0.0  # the burst allowance
    assert b.reserve(1) == pytest.approx(0.4 - ratelimit.BURST_SECONDS)
    clock[0] += 100
    assert store.peek("ep")[2] == 1.0  # all the way back, and no further
    for _ in range(20):
        clock[0] += 1
        a.slow_down()
    assert store.peek("ep")[2] == pytest.approx(ratelimit.MIN_FACTOR, abs=1e-4)


def test_a_state_file_of_the_older_layout_is_read(tmp_path):
    (tmp_path / "ep.bin").write_bytes(struct.pack("ddd", 0.0, 0.0, time.time() + 30))
    limiter = ratelimit.Limiter("ep", None, None, store=ratelimit.FileStore(tmp_path))
    assert 29 < limiter.reserve(1) <= 30 and limiter.factor() == 1.0


@pytest.mark.django_db(transaction=True)
def test_one_off_429s_delay_only_their_own_requests(sim, enqueued, write, owner):
    """A tenth of the answers are 429s asking for 3 s, with no rate headers and no known limit: one-offs.
    Only those requests wait; the others are all done long before (the old engine froze the endpoint)."""
    url = sim(latency_ms=20, error_rates={429: 0.1}, retry_after_ms=3000, seed=2)
    job = make_job(write, owner, make_endpoint(url, concurrency=5), 60, start=False)
    slice_run(job, budget=15.0)
    assert job.n_succeeded == 60
    log = sim_get(url, "/_sim/log")
    start = min(e["t"] for e in log)
    first_answers = {}
    for e in log:
        first_answers.setdefault(e["marker"], e)
    lucky = [e for e in first_answers.values() if e["status"] == 200]
    assert 40 <= len(lucky) < 60
    assert max(e["t"] for e in lucky) < start + 2.0  # 60 requests at 5 x 20 ms: ~0.3 s unfaulted
    stats = sim_get(url, "/_sim/stats")
    assert stats["retries_checked"] == stats["by_status"]["429"] and stats["retry_after_violations"] == 0


@pytest.mark.django_db(transaction=True)
def test_a_500_every_time_fails_after_the_transient_budget_and_no_429_counts(
    sim, enqueued, write, owner, settings, monkeypatch
):
    monkeypatch.setattr(upstream, "BACKOFF_BASE", 0.02)
    settings.BATCHSITE_TRANSIENT_ATTEMPTS = 4
    url = sim(latency_ms=5)
    job = make_job(write, owner, make_endpoint(url), 2, text=lambda i: f"Q{i} SIMULATE_500" if i else "Q0", start=False)
    Job.objects.filter(pk=job.pk).update(max_attempts=1)
    slice_run(job, budget=10.0)
    poison = job.items.get(custom_id="req-1")
    assert (poison.status, poison.attempts, poison.http_status) == (Item.Status.FAILED, 4, 500)
    assert job.items.get(custom_id="req-0").status == Item.Status.SUCCEEDED
    Job.objects.filter(pk=job.pk).update(max_attempts=6)  # a job's own max attempts above the floor wins
    control.retry_failed(job)
    slice_run(job, budget=10.0)
    assert job.items.get(custom_id="req-1").attempts == 6


@pytest.mark.django_db(transaction=True)
def test_a_fifth_of_answers_503_loses_nothing_with_max_attempts_1(sim, enqueued, write, owner, monkeypatch):
    """Server errors have their own budget (BATCHSITE_TRANSIENT_ATTEMPTS, 10): at a 20% error rate a
    request is lost once in ten million, whatever the job's max attempts (the old engine lost a fifth)."""
    monkeypatch.setattr(upstream, "BACKOFF_BASE", 0.005)
    url = sim(error_rates={503: 0.2}, seed=8)
    job = make_job(write, owner, make_endpoint(url, concurrency=50), 1000, start=False)
    Job.objects.filter(pk=job.pk).update(max_attempts=1)
    slice_run(job, budget=60.0)
    assert (job.n_succeeded, job.n_failed) == (1000, 0)
    assert sim_get(url, "/_sim/stats")["by_status"]["503"] >= 150


def _rate_factor(endpoint) -> float:
    import hashlib

    key = f"endpoint-{endpoint.pk}-{hashlib.sha1(endpoint.base_url.encode()).hexdigest()[:8]}"
    return ratelimit.default_store().peek(key)[2]  # the file store, or Redis when REDIS_URL is set


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("share,cut", [(0.2, False), (0.7, True)])
def test_only_429s_thick_and_fast_cut_the_shared_send_rate(sim, enqueued, write, owner, share, cut):
    url = sim(latency_ms=20, error_rates={429: share}, retry_after_ms=50, seed=3)
    job = make_job(write, owner, make_endpoint(url, concurrency=20), 300, start=False)
    slice_run(job, budget=30.0)
    assert job.n_succeeded == 300
    assert (_rate_factor(job.endpoint) < 0.9) is cut


@pytest.mark.django_db(transaction=True)
def test_a_refused_connection_is_retried_and_named(enqueued, write, owner, settings, monkeypatch):
    monkeypatch.setattr(upstream, "BACKOFF_BASE", 0.01)
    settings.BATCHSITE_TRANSIENT_ATTEMPTS = 3
    job = make_job(write, owner, make_endpoint("http://127.0.0.1:9/v1"), 1, start=False)  # nothing listens
    Job.objects.filter(pk=job.pk).update(max_attempts=1)
    slice_run(job, budget=10.0)
    item = job.items.get()
    assert (item.status, item.attempts, item.error_code) == (Item.Status.FAILED, 3, "connection_error")
    assert item.error_message.startswith("Could not connect")


def test_a_job_pauses_instead_of_sending_to_a_metadata_address(db, owner, write):
    """An endpoint saved (or changed in the database) to point at a cloud metadata service sends nothing:
    the slice checks the URL again and pauses the job with the reason."""
    from jobs.engine.runner import run
    from jobs.models import Endpoint, Job
    from tests.factories import make_job

    endpoint = Endpoint(name="metadata", base_url="http://169.254.169.254/v1", is_default=True)
    endpoint.set_api_key("sk-test")
    endpoint.save()
    job = make_job(write, owner, endpoint, 3, start=False)
    Job.objects.filter(pk=job.pk).update(status=Job.Status.RUNNING)
    assert run(job.pk)["skipped"] == "unsafe endpoint"
    job.refresh_from_db()
    assert job.status == Job.Status.PAUSED and "metadata" in job.status_reason and job.n_pending == 3


@pytest.mark.django_db(transaction=True)
def test_a_slice_whose_heartbeats_fail_stops_sending_before_its_leases_can_run_out(
    sim, enqueued, write, owner, monkeypatch, settings
):
    """Its items may go to another slice once the leases run out; sending them too would send them twice.
    With every heartbeat failing (a stalled database), nothing is sent past three quarters of a lease."""
    from django.db import OperationalError

    def stalled(*args):
        raise OperationalError("database is locked")

    monkeypatch.setattr(database, "renew_leases", stalled)
    settings.BATCHSITE_LEASE_SECONDS = 4
    url = sim(latency_ms=200)
    job = make_job(write, owner, make_endpoint(url, concurrency=2), 200, start=False)
    started = time.time()
    summary, elapsed = slice_run(job, budget=20.0)
    log = sim_get(url, "/_sim/log?limit=1000")
    entries = log if isinstance(log, list) else log.get("data", log.get("entries", []))
    # Three quarters of the lease (3 s) plus one answer (0.2 s), and slack for a loaded machine: under the lease.
    assert entries and max(e["t"] for e in entries) < started + 3.6
    assert 0 < summary["sent"] < 200 and elapsed < 6
    assert job.n_running == 0 and job.n_succeeded + job.n_pending == 200  # the rest given back unsent
