"""The live engine end to end: a real qcluster, the simulator over HTTP, the SQLite test database."""

import json
import random
import time
from collections import defaultdict

import pytest

from jobs import export, ingest
from jobs.models import Item, Job, control
from tests.factories import answers, chat_line, make_endpoint, make_job
from tests.servers import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def wait_status(job, statuses, timeout=120):
    statuses = (statuses,) if isinstance(statuses, str) else statuses

    def reached():
        job.refresh_from_db()
        return job.status in statuses

    wait_until(reached, timeout, 0.3, f"job to become {statuses} (it is {job.status}, {job.counts()})")
    return job


def test_job_completes_with_every_right_answer(cluster, simulator, write, owner):
    sim = simulator("--latency-ms", "50")
    cluster()
    job = make_job(write, owner, make_endpoint(sim.base_url), 300)
    wait_status(job, Job.Status.COMPLETED, 90)
    assert job.counts() == {"pending": 0, "running": 0, "succeeded": 300, "failed": 0, "cancelled": 0, "expired": 0}
    assert answers(job) == {f"req-{i}": f"Echo: Question {i}" for i in range(300)}
    assert sim.stats()["total"] == 300  # no error, so not one request more than items
    assert job.prompt_tokens > 0 and job.completion_tokens > 0
    assert job.cost > 0  # gpt-4o-mini is in the price table
    assert sum(t.succeeded for t in job.ticks.all()) == 300
    assert job.started_at and job.finished_at and job.finished_at >= job.started_at


def test_rides_out_a_429_storm_honouring_retry_after(cluster, simulator, write, owner):
    sim = simulator("--latency-ms", "20", "--error-rate", "429=0.3", "--retry-after-ms", "700", "--seed", "3")
    cluster()
    job = make_job(write, owner, make_endpoint(sim.base_url), 200, start=False)
    Job.objects.filter(pk=job.pk).update(max_attempts=12)
    job.start()
    wait_status(job, Job.Status.COMPLETED, 150)
    assert job.n_succeeded == 200
    assert answers(job) == {f"req-{i}": f"Echo: Question {i}" for i in range(200)}
    by_marker = defaultdict(list)
    for entry in sim.requests():
        by_marker[entry["marker"]].append(entry)
    retried = 0
    for entries in by_marker.values():
        for first, second in zip(entries, entries[1:]):
            assert first["status"] == 429, "only 429s are retried here"
            gap = second["t"] - first["t"]
            assert gap >= 0.7 - 0.05, f"retried after {gap:.3f}s, before retry-after-ms 700"
            retried += 1
    assert retried >= 30
    assert sum(t.retried for t in job.ticks.all()) == retried


def test_5xx_retried_and_400_not_retried(cluster, simulator, write, owner):
    sim = simulator("--latency-ms", "10", "--error-rate", "500=0.25", "--error-rate", "503=0.1", "--seed", "5")
    cluster()
    text = lambda i: f"Question {i} SIMULATE_400" if i % 10 == 0 else f"Question {i}"  # noqa: E731
    job = make_job(write, owner, make_endpoint(sim.base_url), 150, text=text, start=False)
    Job.objects.filter(pk=job.pk).update(max_attempts=12)
    job.start()
    wait_status(job, Job.Status.COMPLETED, 150)
    assert (job.n_succeeded, job.n_failed) == (135, 15)
    failed = job.items.filter(status=Item.Status.FAILED)
    assert {i.custom_id for i in failed} == {f"req-{i}" for i in range(0, 150, 10)}
    requests = sim.requests()
    for item in failed:
        tries = [r for r in requests if r["marker"] == f"Question {item.custom_id[4:]} SIMULATE_400"]
        # injected 5xx may come first (and are retried), but a 400 is the last word
        assert [r["status"] for r in tries][-1] == 400 and sum(r["status"] == 400 for r in tries) == 1
        assert (item.http_status, item.attempts) == (400, len(tries))
    statuses = [r["status"] for r in requests]
    assert statuses.count(500) + statuses.count(503) >= 20
    assert job.items.filter(status=Item.Status.SUCCEEDED, attempts__gt=1).exists()
    errors = [json.loads(line) for line in "".join(export.errors_jsonl(job)).splitlines()]
    assert len(errors) == 15 and {e["response"]["status_code"] for e in errors} == {400}


def test_insufficient_quota_pauses_without_more_requests(cluster, simulator, write, owner):
    sim = simulator("--latency-ms", "100")
    cluster()
    job = make_job(write, owner, make_endpoint(sim.base_url, concurrency=20), 400)
    wait_until(lambda: sim.stats()["total"] >= 60, 60, message="some requests")
    sim.configure(insufficient_quota=True)
    wait_status(job, Job.Status.PAUSED, 60)
    assert "quota" in job.status_reason
    wait_until(lambda: Job.objects.get(pk=job.pk).n_running == 0, 30, message="in-flight requests to finish")
    settled = sim.stats()["total"]
    time.sleep(3)
    assert sim.stats()["total"] == settled, "requests kept going after the job paused"
    quota_429s = sum(1 for r in sim.requests() if r["status"] == 429)
    assert quota_429s <= 40  # the requests in flight when quota ran out, no more
    job.refresh_from_db()
    assert job.n_failed == 0 and job.n_pending > 0

    sim.configure(insufficient_quota=False)
    control.resume(job)
    wait_status(job, Job.Status.COMPLETED, 90)
    assert job.n_succeeded == 400 and job.status_reason == ""
    assert answers(job) == {f"req-{i}": f"Echo: Question {i}" for i in range(400)}


def test_pause_then_resume(cluster, simulator, write, owner):
    sim = simulator("--latency-ms", "100")
    cluster()
    job = make_job(write, owner, make_endpoint(sim.base_url, concurrency=20), 500)
    wait_until(lambda: Job.objects.get(pk=job.pk).n_succeeded >= 50, 60, message="progress")
    job.refresh_from_db()
    control.pause(job)
    control.pause(job)  # twice is fine
    wait_until(lambda: Job.objects.get(pk=job.pk).n_running == 0, 30, message="in-flight requests to finish")
    job.refresh_from_db()
    done, sent = job.n_succeeded, sim.stats()["total"]
    assert done < 500
    time.sleep(2.5)
    job.refresh_from_db()
    assert (job.status, job.n_succeeded, sim.stats()["total"]) == (Job.Status.PAUSED, done, sent)
    control.resume(job)
    wait_status(job, Job.Status.COMPLETED, 90)
    assert job.n_succeeded == 500 and sim.stats()["total"] == 500


def test_cancel_keeps_finished_results(cluster, simulator, write, owner):
    sim = simulator("--latency-ms", "100")
    cluster()
    job = make_job(write, owner, make_endpoint(sim.base_url, concurrency=20), 500)
    wait_until(lambda: Job.objects.get(pk=job.pk).n_succeeded >= 40, 60, message="progress")
    job.refresh_from_db()
    control.cancel(job)
    control.cancel(job)
    wait_status(job, Job.Status.CANCELLED, 60)
    assert job.n_succeeded >= 40 and job.n_cancelled > 0
    assert job.n_succeeded + job.n_cancelled == 500 and job.n_pending == job.n_running == 0
    assert len(answers(job)) == job.n_succeeded
    time.sleep(1.5)
    assert sim.stats()["total"] == job.n_succeeded  # nothing sent after the in-flight ones


def test_retry_failed_items_only(cluster, simulator, write, owner):
    sim = simulator("--latency-ms", "10", "--error-rate", "500=0.5", "--seed", "9")
    cluster(BATCHSITE_TRANSIENT_ATTEMPTS="1")  # a job's max attempts 1 is then all a server error gets
    job = make_job(write, owner, make_endpoint(sim.base_url), 120, start=False)
    Job.objects.filter(pk=job.pk).update(max_attempts=1)
    job.start()
    wait_status(job, Job.Status.COMPLETED, 90)
    assert 30 < job.n_failed < 90
    first_round = set(answers(job))
    failed = job.n_failed
    sim.configure(error_rates={})
    assert control.retry_failed(job) == failed
    wait_status(job, Job.Status.COMPLETED, 90)
    assert job.n_succeeded == 120 and job.n_failed == 0
    assert set(answers(job)) == {f"req-{i}" for i in range(120)}
    assert sim.stats()["total"] == 120 + failed  # succeeded items were not sent again
    assert first_round < set(answers(job))


def test_kill_9_mid_job_then_resume_exactly_once(cluster, simulator, write, owner):
    sim = simulator("--latency-ms", "200")
    first = cluster()
    n = 2000
    job = make_job(write, owner, make_endpoint(sim.base_url, concurrency=100), n)
    wait_until(lambda: Job.objects.get(pk=job.pk).n_succeeded >= 500, 90, message="progress before the crash")
    first.kill()  # SIGKILL to the whole process group: no cleanup of any kind
    time.sleep(0.5)
    job.refresh_from_db()
    in_flight = job.n_running
    sent_before = sim.stats()["total"]
    assert in_flight > 0 and job.n_succeeded < n
    cluster()
    wait_status(job, Job.Status.COMPLETED, 180)
    assert job.n_succeeded == n
    assert answers(job) == {f"req-{i}": f"Echo: Question {i}" for i in range(n)}
    assert job.items.count() == n
    total = sim.stats()["total"]
    # at-least-once requests, exactly-once results: only what was in flight may be sent twice
    assert total <= n + in_flight, (total, sent_before, in_flight)


def steady_rate(times: list[float], amounts: list[float] | None = None, settle: float = 3) -> float:
    """Per minute, between the first and last of `times` after the first `settle` seconds (the start-up: probing
    the limits, the first burst); `amounts` weighs each time (tokens), else each counts one."""
    order = sorted(range(len(times)), key=times.__getitem__)
    start = times[order[0]] + settle
    steady = [i for i in order if times[i] >= start]
    weights = [amounts[i] if amounts else 1 for i in steady]
    return (sum(weights) - weights[0]) / (times[steady[-1]] - times[steady[0]]) * 60


def test_rate_limit_reaches_95_percent_with_few_429s(cluster, simulator, write, owner):
    # The simulator's bucket is empty when the first request arrives, so every request the engine
    # sends faster than 3,000 a minute, from the first second on, is a 429.
    sim = simulator("--latency-ms", "50", "--rpm", "3000", "--start-empty")
    cluster()
    job = make_job(write, owner, make_endpoint(sim.base_url, concurrency=100), 1500)
    wait_status(job, Job.Status.COMPLETED, 120)
    requests = sim.requests()
    limited = sum(r["status"] == 429 for r in requests)
    assert limited <= 0.02 * len(requests), f"{limited} of {len(requests)} were 429"
    rate = steady_rate([r["t"] for r in requests if r["status"] == 200])
    print(f"RPM test: {rate / 3000:.1%} of the limit, {limited} 429s in {len(requests)}")
    assert 0.95 * 3000 <= rate <= 1.03 * 3000, f"{rate:.0f} requests/min"
    job.endpoint.refresh_from_db()
    assert job.endpoint.learned_rpm == 3000
    assert job.endpoint.rate_limited_total == limited  # each 429 counted once, for /metrics


WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches at dawn".split()


def mixed_requests(n: int, seed: int = 1) -> list[tuple[str, int]]:
    """(prompt, max_tokens) of `n` chat requests of mixed sizes: prompts from tens to a few thousand tokens, output
    budgets from 50 to 400."""
    rng = random.Random(seed)
    made = []
    for i in range(n):
        words = rng.choice([3, 20, 60, 250, 1200, 2500])
        text = f"Request {i}: " + " ".join(rng.choice(WORDS) for _ in range(words))
        made.append((text, rng.choice([50, 100, 200, 400])))
    return made


@pytest.mark.parametrize("token_count", ["chars", "tokenizer"])
def test_token_limit_reaches_97_percent_with_under_1_percent_429s(cluster, simulator, write, owner, token_count):
    """The token budget is charged as the server charges it, whichever way it counts a prompt: a token per four
    characters (OpenAI's estimate, and what Batchsite starts from), or the tokenizer's exact count (learned from
    the drop in x-ratelimit-remaining-tokens). The whole max_tokens of every request counts, as OpenAI's does,
    however short the answers (nothing is given back)."""
    from simulator.tokenizer import count_tokens

    tpm = 900_000
    sim = simulator("--latency-ms", "50", "--tpm", str(tpm), "--start-empty", "--token-count", token_count)
    cluster()
    # Enough requests that the few sent before any limit is known (each slice's first, alone, into the empty
    # bucket) stay under 1%.
    made = mixed_requests(700)
    lines = [chat_line(f"req-{i}", text, max_tokens=most) for i, (text, most) in enumerate(made)]
    plan = ingest.validate(write("mixed.jsonl", lines))
    assert plan.ok, plan.errors
    job = ingest.create_job(plan, owner=owner, endpoint=make_endpoint(sim.base_url, concurrency=100))
    job.start()
    wait_status(job, Job.Status.COMPLETED, 150)
    requests = sim.requests()
    limited = sum(r["status"] == 429 for r in requests)
    # What the server charged each answered request, by its own rule.
    rule = (lambda text: -(-len(text) // 4)) if token_count == "chars" else count_tokens
    charged = {text[:100]: rule(text) + most for text, most in made}
    answered = [r for r in requests if r["status"] == 200]
    # From 8 s on: by then the ratio has had three looks (CALIBRATE_SECONDS apart) to learn the server's count.
    times, amounts = [r["t"] for r in answered], [charged[r["marker"]] for r in answered]
    rate, whole = steady_rate(times, amounts, settle=8), steady_rate(times, amounts, settle=0)
    job.endpoint.refresh_from_db()
    print(
        f"TPM test ({token_count}): {rate / tpm:.1%} of the limit from 8 s on ({whole / tpm:.1%} from the start), "
        f"{limited} 429s in {len(requests)}; ratio learned {job.endpoint.learned_token_ratio}"
    )
    assert limited <= 0.01 * len(requests), f"{limited} of {len(requests)} were 429"
    assert 0.97 * tpm <= rate <= 1.03 * tpm, f"{rate:.0f} tokens/min"
    assert job.endpoint.learned_tpm == tpm
