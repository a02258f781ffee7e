"""The engine's rules, without a cluster: failure classification, Retry-After, backoff, leases, budgets."""

import multiprocessing as mp
import time
import uuid
from datetime import timedelta
from decimal import Decimal

import pytest
from django.utils import timezone

from jobs import leases, ratelimit, runner
from jobs.leases import Outcome
from jobs.models import Item, Job, Price
from jobs.pricing import PriceBook
from tests.conftest import make_endpoint, make_job


def err(code=None, type_=None, message="m"):
    import json

    return json.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}})


@pytest.mark.parametrize(
    "status,body,kind",
    [
        (429, err("rate_limit_exceeded", "requests"), runner.RETRY),
        (429, err("insufficient_quota", "insufficient_quota"), runner.STOP),
        (429, err(None, "insufficient_quota"), runner.STOP),
        (429, err("credit_balance_exhausted"), runner.STOP),
        (401, err("invalid_api_key"), runner.STOP),
        (403, err(None), runner.STOP),
        (408, "", runner.RETRY),
        (409, "", runner.RETRY),
        (500, err(None, "server_error"), runner.RETRY),
        (503, "<html>unavailable</html>", runner.RETRY),
        (400, err(None, "invalid_request_error", "bad messages"), runner.PERMANENT),
        (404, err("model_not_found"), runner.PERMANENT),
        (422, "{}", runner.PERMANENT),
    ],
)
def test_classification(status, body, kind):
    error = runner.classify(status, body, {})
    assert error.kind == kind and error.http_status == status


def test_quota_stop_message_is_plain_words():
    error = runner.classify(429, err("insufficient_quota"), {})
    assert "quota" in error.message and "resume" in error.message


def test_retry_after_header_forms():
    assert runner.retry_after_seconds({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5
    assert runner.retry_after_seconds({"retry-after": "300"}) == 300.0  # large values are honoured too
    http_date = (timezone.now() + timedelta(seconds=30)).strftime("%a, %d %b %Y %H:%M:%S GMT")
    assert 25 < runner.retry_after_seconds({"retry-after": http_date}) <= 31
    assert runner.retry_after_seconds({}) is None


def test_backoff_grows_with_jitter_and_a_cap():
    for attempt, (low, high) in {1: (0.5, 1), 2: (1, 2), 3: (2, 4), 10: (30, 60)}.items():
        values = [runner.backoff(attempt) for _ in range(50)]
        assert all(low <= v <= high for v in values)
        assert len(set(values)) > 1


@pytest.mark.parametrize(
    "text,seconds", [("12ms", 0.012), ("1s", 1), ("6m0s", 360), ("1h2m3.5s", 3723.5), ("2.5", 2.5), ("", None), ("x", None)]
)
def test_go_durations(text, seconds):
    assert ratelimit.parse_duration(text) == (pytest.approx(seconds) if seconds is not None else None)


def test_usage_for_each_endpoint_shape():
    chat = {"usage": {"prompt_tokens": 10, "completion_tokens": 5, "prompt_tokens_details": {"cached_tokens": 4}}}
    assert runner.usage_of("/v1/chat/completions", chat) == (10, 5, 4)
    assert runner.usage_of("/v1/embeddings", {"usage": {"prompt_tokens": 7, "total_tokens": 7}}) == (7, 0, 0)
    responses = {"usage": {"input_tokens": 3, "output_tokens": 2, "input_tokens_details": {"cached_tokens": 1}}}
    assert runner.usage_of("/v1/responses", responses) == (3, 2, 1)


@pytest.mark.django_db
def test_price_longest_prefix_wins():
    book = PriceBook.load()
    assert book.price("gpt-4o-mini-2024-07-18").model == "gpt-4o-mini"
    assert book.price("gpt-4o-2024-08-06").model == "gpt-4o"
    assert book.price("llama3:8b") is None and book.cost("llama3:8b", 1000, 1000) == 0
    # 1M uncached input at 0.15, 1M cached at 0.075, 1M output at 0.60
    assert book.cost("gpt-4o-mini", 2_000_000, 1_000_000, cached_tokens=1_000_000) == Decimal("0.825")
    Price.objects.filter(model="gpt-4o-mini").update(output_per_mtok=1)
    assert PriceBook.load().cost("gpt-4o-mini", 0, 1_000_000) == 1


@pytest.mark.django_db
def test_a_stale_lease_cannot_overwrite_a_result(write, owner):
    job = make_job(write, owner, make_endpoint("http://127.0.0.1:9/v1"), 3, start=False)
    old, new = uuid.uuid4(), uuid.uuid4()
    claimed = leases.claim(job.pk, old, 10)
    assert [c.custom_id for c in claimed] == ["req-0", "req-1", "req-2"]
    assert leases.claim(job.pk, new, 10) == []  # nothing left to claim
    # The first worker stalls; its leases expire and a second worker takes the items over.
    leases.expire(timezone.now() + timedelta(seconds=leases.lease_seconds() + 1))
    assert len(leases.claim(job.pk, new, 10)) == 3
    ok = lambda item, text: Outcome(item.id, Item.SUCCEEDED, 1, http_status=200, response=text)  # noqa: E731
    assert leases.write(job.pk, new, [ok(claimed[0], '{"who":"new"}')])["n_succeeded"] == 1
    assert leases.write(job.pk, old, [ok(c, '{"who":"old"}') for c in claimed]) == {}
    job.refresh_from_db()
    assert (job.n_succeeded, job.n_running, job.n_pending) == (1, 2, 0)
    assert Item.objects.get(pk=claimed[0].id).response == '{"who":"new"}'
    job.recount()
    assert (job.n_succeeded, job.n_running) == (1, 2)


@pytest.mark.django_db
def test_claims_respect_next_attempt_and_input_order(write, owner):
    job = make_job(write, owner, make_endpoint("http://127.0.0.1:9/v1"), 4, start=False)
    first = Item.objects.get(job=job, custom_id="req-0")
    Item.objects.filter(pk=first.pk).update(next_attempt_at=timezone.now() + timedelta(minutes=5))
    assert [c.custom_id for c in leases.claim(job.pk, uuid.uuid4(), 2)] == ["req-1", "req-2"]
    assert leases.next_due(job.pk) <= timezone.now()
    leases.claim(job.pk, uuid.uuid4(), 10)
    assert leases.next_due(job.pk) > timezone.now() + timedelta(minutes=4)


@pytest.mark.django_db
def test_control_actions_are_safe_twice_and_explain_refusals(write, owner):
    job = make_job(write, owner, make_endpoint("http://127.0.0.1:9/v1"), 3, start=False)
    job.pause()
    job.pause()
    assert job.status == Job.PAUSED
    job.resume()
    job.resume()
    assert job.status == Job.QUEUED
    job.cancel()
    job.cancel()
    assert (job.status, job.n_cancelled) == (Job.CANCELLED, 3)
    with pytest.raises(Exception, match="cannot be resumed"):
        job.resume()
    with pytest.raises(Exception, match="no failed items"):
        job.retry_failed()
    copy = job.duplicate(owner)
    assert (copy.status, copy.total, copy.n_pending, copy.name) == (Job.QUEUED, 3, 3, f"Copy of {job.name}")
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
