"""Transient faults end to end (a real qcluster, the simulator over HTTP): nothing lost, every
Retry-After honoured, isolated 429s cost only their own request's wait."""

import time

import pytest

from jobs.models import Item, Job, control
from tests.factories import make_endpoint, make_job
from tests.servers import wait_until
from tests.test_engine_cluster import answers, wait_status

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_a_storm_of_429s_and_503s_loses_nothing_and_honours_every_retry_after(cluster, simulator, write, owner):
    """The issue's fault scenario: 20% 429 (retry-after 1 s) + 10% 503 on 2,000 requests, with max
    attempts 1: a 429 is back-pressure, not an attempt, and a 503 has its own retry budget."""
    sim = simulator("--latency-ms", "100", "--error-rate", "429=0.2", "--error-rate", "503=0.1", "--seed", "11")
    cluster()
    n = 2000
    job = make_job(write, owner, make_endpoint(sim.base_url, concurrency=100), n, start=False)
    Job.objects.filter(pk=job.pk).update(max_attempts=1)
    job.start()
    wait_status(job, Job.Status.COMPLETED, 200)
    stats = sim.stats()
    # The simulator audits every retry of a 429 (per request: hash of its body).
    assert stats["retries_checked"] >= 300
    assert stats["retry_after_violations"] == 0, stats["retry_after_violation_details"]
    assert (job.n_succeeded, job.n_failed) == (n, 0), job.counts()
    assert answers(job) == {f"req-{i}": f"Echo: Question {i}" for i in range(n)}
    assert stats["by_status"].get("429", 0) >= 300 and stats["by_status"].get("503", 0) >= 150
    # A 429 is not an attempt: an item's attempts count its other answers only.
    statuses = {}
    for entry in sim.requests():
        statuses.setdefault(entry["marker"], []).append(entry["status"])
    for item in job.items.filter(attempts__gt=1)[:50]:
        sent = statuses[f"Question {item.custom_id[4:]}"]
        assert item.attempts == len(sent) - sent.count(429)


def test_a_request_answered_500_every_time_fails_after_its_bounded_attempts(cluster, simulator, write, owner):
    sim = simulator("--latency-ms", "10")
    cluster(BATCHSITE_TRANSIENT_ATTEMPTS="4")
    text = lambda i: f"Question {i} SIMULATE_500" if i == 7 else f"Question {i}"  # noqa: E731
    job = make_job(write, owner, make_endpoint(sim.base_url), 20, text=text, start=False)
    Job.objects.filter(pk=job.pk).update(max_attempts=2)
    started = time.monotonic()
    job.start()
    wait_status(job, Job.Status.COMPLETED, 60)
    assert time.monotonic() - started < 30
    assert (job.n_succeeded, job.n_failed) == (19, 1)
    poison = job.items.get(status=Item.Status.FAILED)
    # max(max attempts 2, BATCHSITE_TRANSIENT_ATTEMPTS 4): a server error is tried 4 times, then fails
    assert (poison.custom_id, poison.attempts, poison.http_status) == ("req-7", 4, 500)
    assert sum(1 for r in sim.requests() if r["marker"] == "Question 7 SIMULATE_500") == 4


def _rate(sim) -> float:
    """Successes per second until 80% of the requests had succeeded (the tail of late retries aside)."""
    times = sorted(r["t"] for r in sim.requests() if r["status"] == 200)
    first = min(r["t"] for r in sim.requests())
    k = int(0.8 * len(times))
    return k / (times[k - 1] - first)


def test_isolated_429s_do_not_stall_other_requests(cluster, simulator, write, owner):
    """10% of answers are one-off 429s with a 2 s Retry-After: only those requests wait; the others
    keep going at (nearly) the unfaulted rate. The old engine froze the whole endpoint on each one."""
    n = 1500
    clean = simulator("--latency-ms", "100")
    cluster()
    endpoint = make_endpoint(clean.base_url, concurrency=20)
    job = make_job(write, owner, endpoint, n)
    wait_status(job, Job.Status.COMPLETED, 120)
    unfaulted = _rate(clean)

    faulted = simulator("--latency-ms", "100", "--error-rate", "429=0.1", "--retry-after-ms", "2000", "--seed", "4")
    endpoint.base_url = faulted.base_url
    endpoint.save(update_fields=["base_url"])
    job = make_job(write, owner, endpoint, n)
    wait_status(job, Job.Status.COMPLETED, 120)
    assert job.n_succeeded == n
    rate = _rate(faulted)
    assert rate >= 0.8 * unfaulted, f"{rate:.0f} vs {unfaulted:.0f} requests/s unfaulted"


def test_a_retry_after_outlasts_a_pause_and_resume(cluster, simulator, write, owner):
    """Requests waiting out a Retry-After when the job is paused go back to the queue still owing the
    rest of their wait: the slices of the resumed job must not send them before it is over (the old
    engine handed them back due at once)."""
    sim = simulator("--latency-ms", "50", "--error-rate", "429=0.3", "--retry-after-ms", "3000", "--seed", "6")
    cluster()
    job = make_job(write, owner, make_endpoint(sim.base_url, concurrency=20), 300, start=False)
    Job.objects.filter(pk=job.pk).update(max_attempts=20)
    job.start()
    wait_until(lambda: sim.stats()["rate_limited"] >= 15, 60, message="some 429s")
    job.refresh_from_db()
    control.pause(job)
    control.resume(job)
    wait_status(job, Job.Status.COMPLETED, 120)
    stats = sim.stats()
    assert job.n_succeeded == 300 and stats["retries_checked"] >= 30
    assert stats["retry_after_violations"] == 0, stats["retry_after_violation_details"]
