"""Remote and hybrid jobs against the simulator's Files + Batches API, over real HTTP with the official SDK.

The poller's rounds are driven here one by one (remote.poll_round), and a hybrid job's live part by running
its slices in this process: each test decides when the engine looks, so none waits on a schedule."""

import json
import time
from datetime import timedelta
from decimal import Decimal

import httpx2
import openai
import pytest
from django.utils import timezone

from jobs import ingest
from jobs.engine import remote, runner
from jobs.engine.remote import batchapi, claims, poller, steps
from jobs.models import Endpoint, InvalidTransition, Item, Job, RemoteBatch, control, ledger
from jobs.pricing import PriceBook
from simulator import SimConfig, serve_in_thread
from tests.factories import chat_line, connection_error, make_endpoint, seed_prices

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def quick_polls(settings, monkeypatch):
    settings.BATCHSITE_REMOTE_POLL_SECONDS = 0
    settings.BATCHSITE_HYBRID_MARGIN_SECONDS = 1
    started = []
    monkeypatch.setattr("jobs.queue.async_task", lambda *a, **k: started.append(a))  # rounds run here
    seed_prices()
    return started


@pytest.fixture
def sim():
    config = SimConfig(batch_seconds=1.0, seed=1)
    with serve_in_thread(config) as base_url:
        yield config, base_url


def stats(base_url: str) -> dict:
    import urllib.request

    with urllib.request.urlopen(base_url.removesuffix("/v1") + "/_sim/stats") as response:
        return json.loads(response.read())


def finish_batches(base_url: str, outcome: str = "complete") -> dict:
    """End the simulator's running batches now (POST /_sim/batches/finish) rather than wait out their window."""
    import urllib.request

    request = urllib.request.Request(
        base_url.removesuffix("/v1") + "/_sim/batches/finish", data=json.dumps({"outcome": outcome}).encode()
    )
    with urllib.request.urlopen(request) as response:
        return json.loads(response.read())


def live_requests(base_url: str) -> int:
    return stats(base_url)["by_path"].get("/v1/chat/completions", 0)


def remote_job(write, owner, endpoint, n: int, mode=Job.Mode.REMOTE, text=lambda i: f"Question {i}", **kw) -> Job:
    lines = [chat_line(f"req-{i}", text(i), max_tokens=20) for i in range(n)]
    plan = ingest.validate(write(f"remote-{n}.jsonl", lines))
    assert plan.ok, plan.errors
    job = ingest.create_job(plan, owner=owner, endpoint=endpoint, options=ingest.RunOptions(mode=mode, **kw))
    job.start()
    return job


def drive(job: Job, until=lambda j: j.is_finished, timeout: float = 60, live: bool = False, clock=None) -> Job:
    """Poller rounds (and, for a switched hybrid job, live slices) until `until(job)`. With the test's `clock`,
    each round moves it to the job's next due moment (a chunk's next look, the hybrid switch) rather than
    waiting for it."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        remote.poll_round()
        job.refresh_from_db()
        assert job.n_answered <= job.total, job.counts()  # remote counts never add to joined results
        if live and job.switched_at and job.n_pending:
            runner.run(job.pk, budget=2)
            job.refresh_from_db()
        if until(job):
            return job
        if clock is None or not skip_to_next_look(clock, job):
            time.sleep(0.05)
    raise AssertionError(f"job {job.pk} still {job.status}: {job.counts()} {list(job.remote_batches.values())}")


def skip_to_next_look(clock, job: Job) -> bool:
    """Move the engine's clock to the next moment something of `job` is due, if that is still ahead."""
    moments = [m for m in job.remote_batches.filter(collected_at__isnull=True).values_list("next_poll_at", flat=True)]
    if job.switch_at and not job.switched_at:
        moments.append(job.switch_at)
    ahead = min(((m - clock.now()).total_seconds() for m in moments if m), default=0)
    if ahead > 0:
        clock.advance(ahead)
    return ahead > 0


def one_result_each(job: Job) -> None:
    items = list(job.items.all())
    assert len({i.custom_id for i in items}) == job.total
    assert all(i.status in Item.FINAL for i in items)
    ledger.recount(job)
    assert job.n_pending == job.n_running == 0


def test_full_remote_cycle_answers_every_item_at_half_price(sim, write, owner, settings):
    settings.BATCHSITE_REMOTE_DELETE_FILES = False  # to look at the input file
    config, base_url = sim
    endpoint = make_endpoint(base_url)
    job = remote_job(write, owner, endpoint, 30)

    job = drive(job)

    assert job.status == Job.Status.COMPLETED and job.n_succeeded == 30
    chunk = job.remote_batches.get()
    assert chunk.status == RemoteBatch.Status.COMPLETED and chunk.batch_id.startswith("batch_")
    client = openai.OpenAI(base_url=base_url, api_key="x")
    assert client.files.retrieve(chunk.input_file_id).bytes == chunk.bytes  # the byte limit counts true sizes
    assert chunk.input_file_id and chunk.output_file_id and chunk.n_completed == 30
    assert live_requests(base_url) == 0
    item = job.items.get(custom_id="req-7")
    assert json.loads(item.response)["choices"][0]["message"]["content"]
    full = sum(PriceBook.load().cost("gpt-4o-mini", i.prompt_tokens, i.completion_tokens) for i in job.items.all())
    assert full > 0 and job.cost == pytest.approx(full / 2, abs=Decimal("0.000001"))
    one_result_each(job)


def test_the_batch_files_are_deleted_at_the_endpoint_once_the_results_are_in(sim, write, owner):
    config, base_url = sim
    config.batch_client_error_rate = 0.5  # an error file too
    job = remote_job(write, owner, make_endpoint(base_url), 10)

    job = drive(job)

    chunk = job.remote_batches.get()
    assert chunk.input_file_id and chunk.output_file_id and chunk.error_file_id
    assert job.n_succeeded + job.n_failed == 10 and job.n_failed > 0
    assert list(openai.OpenAI(base_url=base_url, api_key="x").files.list()) == []


def test_answers_from_the_batch_api_that_break_their_schema_fail_as_invalid_output(sim, write, owner):
    config, base_url = sim
    config.bad_output_rate = 0.5
    schema = {
        "type": "object",
        "properties": {"a": {"type": "string"}},
        "required": ["a"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}
    lines = [chat_line(f"req-{i}", f"Question {i}", max_tokens=20, response_format=fmt) for i in range(20)]
    lines += [chat_line(f"free-{i}", f"Question {i}", max_tokens=20) for i in range(10)]  # free text: never judged
    plan = ingest.validate(write("mixed.jsonl", lines))
    job = ingest.create_job(
        plan, owner=owner, endpoint=make_endpoint(base_url), options=ingest.RunOptions(mode=Job.Mode.REMOTE)
    )
    job.start()

    job = drive(job)

    bad = job.items.filter(status=Item.Status.FAILED)
    assert 3 <= bad.count() <= 17 and job.n_succeeded == 30 - bad.count(), job.counts()
    assert set(bad.values_list("error_code", flat=True)) == {"invalid_output"}
    assert all(i.custom_id.startswith("req-") and json.loads(i.response)["choices"] for i in bad)
    assert all(i.cost > 0 for i in bad)  # the Batch API charged for them
    assert job.cost == pytest.approx(sum(i.cost for i in job.items.all()), abs=Decimal("0.000001"))
    one_result_each(job)

    # Sent again at the Batch API: the rejected answers stay paid for, on the item and the job.
    paid = {i.pk: (i.cost, i.prompt_tokens) for i in bad}
    config.bad_output_rate = 0
    assert control.retry_failed(job) == len(paid)
    job = drive(job)
    assert job.n_succeeded == 30
    for item in job.items.filter(pk__in=paid):
        cost, prompt = paid[item.pk]
        assert item.cost > cost and item.prompt_tokens == 2 * prompt  # the same request, answered twice
    ledger.recount(job)
    assert job.cost == pytest.approx(sum(i.cost for i in job.items.all()), abs=Decimal("0.000001"))


def test_request_counts_show_as_progress_before_results_are_joined(sim, write, owner):
    config, base_url = sim
    config.batch_seconds = 4
    job = remote_job(write, owner, make_endpoint(base_url), 40)

    job = drive(job, until=lambda j: j.remote_completed > 0, timeout=10)

    assert job.n_succeeded == 0 and 0 < job.progress() < 100
    finish_batches(base_url)  # the rest of the window proves nothing more
    job = drive(job)
    assert job.n_succeeded == 40 and job.progress() == 100


def test_each_batch_holds_one_model_as_openai_requires(sim, write, owner, settings):
    settings.BATCHSITE_REMOTE_DELETE_FILES = False  # to look at the input files
    config, base_url = sim
    models = ["gpt-4o-mini", "gpt-4o", "gpt-4o-mini", "gpt-4o", "gpt-4o-mini"]
    lines = [chat_line(f"req-{i}", f"Question {i}", model=m, max_tokens=20) for i, m in enumerate(models)]
    plan = ingest.validate(write("two-models.jsonl", lines))
    options = ingest.RunOptions(mode=Job.Mode.REMOTE)
    job = ingest.create_job(plan, owner=owner, endpoint=make_endpoint(base_url), options=options)
    job.start()

    job = drive(job)

    assert job.status == Job.Status.COMPLETED and job.n_succeeded == 5
    client = openai.OpenAI(base_url=base_url, api_key="x")
    for chunk in job.remote_batches.all():
        sent = client.files.content(chunk.input_file_id).text.splitlines()
        assert {json.loads(line)["body"]["model"] for line in sent} == {chunk.model}
    assert sorted(job.remote_batches.values_list("model", "n_items")) == [("gpt-4o", 2), ("gpt-4o-mini", 3)]
    assert {i.custom_id: json.loads(i.response)["model"] for i in job.items.all()} == {
        f"req-{i}": m for i, m in enumerate(models)
    }


def test_a_job_above_the_request_limit_is_split_into_several_batches(sim, write, owner):
    """An endpoint's request limit (OpenAI's 50,000 by default: test_remoteplan cuts 50,001 requests in two
    with it) cuts a job into batches that each complete; a small limit shows it without 50,001 requests."""
    config, base_url = sim
    endpoint = make_endpoint(base_url, batch_max_requests=40)
    job = remote_job(write, owner, endpoint, 81)

    job = drive(job, timeout=60)

    assert job.status == Job.Status.COMPLETED and job.n_succeeded == 81
    assert list(job.remote_batches.order_by("pk").values_list("n_items", flat=True)) == [40, 40, 1]
    assert len(set(job.remote_batches.values_list("batch_id", flat=True))) == 3
    one_result_each(job)
    assert Endpoint._meta.get_field("batch_max_requests").default == 50_000  # a new endpoint's, as OpenAI's


LONG = "The quick brown fox jumps over the lazy dog. " * 80  # ~800 tokens


def test_the_enqueued_token_budget_splits_long_prompts_and_is_never_passed(sim, write, owner):
    config, base_url = sim
    config.batch_token_limit = 4000  # the endpoint counts tokens its own way: the budget set leaves room
    endpoint = make_endpoint(base_url, batch_token_limit=3000)
    job = remote_job(write, owner, endpoint, 12, text=lambda i: LONG)

    job = drive(job, timeout=90)

    assert job.status == Job.Status.COMPLETED and job.n_succeeded == 12
    chunks = list(job.remote_batches.all())
    assert len(chunks) >= 4 and all(c.est_tokens <= 3000 for c in chunks)
    assert all(c.status == RemoteBatch.Status.COMPLETED for c in chunks)  # none refused by the endpoint
    assert 0 < stats(base_url)["batch_peak_enqueued_tokens"]["gpt-4o-mini"] <= 4000


def test_a_refused_token_budget_is_learned_and_the_items_wait_for_room(sim, write, owner):
    config, base_url = sim
    config.batch_token_limit = 3000
    endpoint = make_endpoint(base_url)  # no budget set: the first refusals teach it
    job = remote_job(write, owner, endpoint, 12, text=lambda i: LONG)

    job = drive(job, timeout=120)

    assert job.status == Job.Status.COMPLETED and job.n_succeeded == 12 and job.n_failed == 0
    endpoint.refresh_from_db()
    assert 0 < endpoint.learned_token_limits["gpt-4o-mini"] < 3000 * 1.2
    refused = job.remote_batches.filter(status=RemoteBatch.Status.FAILED)
    assert refused.exists() and all(c.errors[0]["code"] == "token_limit_exceeded" for c in refused)
    one_result_each(job)


def test_a_request_alone_over_the_token_limit_fails_saying_so_and_teaches_nothing_wrong(sim, write, owner):
    config, base_url = sim
    config.batch_token_limit = 300  # less than the one request needs: no smaller batch could ever pass
    endpoint = make_endpoint(base_url)
    job = remote_job(write, owner, endpoint, 1, text=lambda i: LONG)

    job = drive(job, timeout=20)

    assert job.status == Job.Status.COMPLETED and job.n_failed == 1
    item = job.items.get()
    assert item.error_code == "token_limit_exceeded" and "Limit: 300 enqueued tokens" in item.error_message
    assert stats(base_url)["by_path"]["/v1/batches"] == 1  # one refusal, not a loop of ever smaller batches
    endpoint.refresh_from_db()
    assert not endpoint.learned_token_limits  # a request too big alone says nothing about the budget


def test_refusals_pause_between_tries_and_never_plan_below_the_largest_request(sim, write, owner):
    config, base_url = sim
    config.batch_token_limit = 300
    endpoint = make_endpoint(base_url)
    job = remote_job(write, owner, endpoint, 4, text=lambda i: LONG)  # each request alone is over the limit

    job = drive(job, timeout=60)

    assert job.status == Job.Status.COMPLETED and job.n_failed == 4
    endpoint.refresh_from_db()
    largest = max(c.est_tokens for c in job.remote_batches.filter(n_items=1))
    assert endpoint.learned_token_limits["gpt-4o-mini"] >= largest  # never below what one request needs
    assert stats(base_url)["by_path"]["/v1/batches"] <= 6  # a batch of 4, then at most one batch each


def test_expiry_keeps_partial_results_and_a_retry_sends_only_the_expired(sim, write, owner):
    config, base_url = sim
    config.batch_expire = True
    job = remote_job(write, owner, make_endpoint(base_url), 20)

    job = drive(job)

    assert job.status == Job.Status.COMPLETED
    assert job.n_succeeded == 10 and job.n_expired == 10
    expired = set(job.items.filter(status=Item.Status.EXPIRED).values_list("custom_id", flat=True))
    assert job.items.filter(status=Item.Status.EXPIRED, error_code="batch_expired").count() == 10

    config.batch_expire = False
    assert control.retry_failed(job) == 10
    job = drive(job)

    assert job.status == Job.Status.COMPLETED and job.n_succeeded == 20
    second = job.remote_batches.get(number=2)
    assert second.n_items == 10
    assert set(second.items.values_list("custom_id", flat=True)) == expired
    one_result_each(job)


def test_expired_items_can_be_retried_live(sim, write, owner):
    config, base_url = sim
    config.batch_expire = True
    job = remote_job(write, owner, make_endpoint(base_url), 10)
    job = drive(job)
    assert job.n_expired == 5

    assert control.retry_failed(job, mode=Job.Mode.LIVE) == 5
    job.refresh_from_db()
    runner.run(job.pk, budget=5)
    job.refresh_from_db()

    assert job.status == Job.Status.COMPLETED and job.n_succeeded == 10 and job.mode == Job.Mode.LIVE
    assert live_requests(base_url) == 5
    job.endpoint.refresh_from_db()
    assert job.endpoint.learned_latency_ms  # what a hybrid job's plan takes a live request to cost


def test_a_remote_validation_failure_shows_its_lines(sim, write, owner):
    config, base_url = sim
    config.batch_reject = True
    job = remote_job(write, owner, make_endpoint(base_url), 5)

    job = drive(job)

    assert job.status == Job.Status.COMPLETED and job.n_failed == 5
    chunk = job.remote_batches.get()
    assert chunk.status == RemoteBatch.Status.FAILED and chunk.errors
    first = job.items.get(custom_id="req-0")
    assert first.error_message.startswith("Line 1 of batch ") and first.error_code


def test_an_endpoint_without_the_batch_api_fails_a_remote_job_saying_so_and_a_retry_runs_live(sim, write, owner):
    config, base_url = sim
    config.batch_api = False  # /v1/files and /v1/batches are 404s, as on llama.cpp, vLLM or Ollama
    job = remote_job(write, owner, make_endpoint(base_url), 6)

    job = drive(job, timeout=10)

    assert job.status == Job.Status.COMPLETED and job.n_failed == 6
    item = job.items.get(custom_id="req-0")
    assert item.error_code == "batch_api_unavailable"
    assert (
        "does not offer OpenAI's Batch API (404" in item.error_message
        and "Retry these requests live" in item.error_message
    )
    assert stats(base_url)["by_path"] == {"/v1/files": 1}  # asked once, not retried for ever

    assert control.retry_failed(job, mode=Job.Mode.LIVE) == 6
    runner.run(job.pk, budget=5)
    job.refresh_from_db()
    assert job.status == Job.Status.COMPLETED and job.n_succeeded == 6
    one_result_each(job)


def test_a_hybrid_job_at_an_endpoint_without_the_batch_api_runs_live_at_once(sim, write, owner):
    config, base_url = sim
    config.batch_api = False
    endpoint = make_endpoint(base_url, rpm=6000)
    deadline = timezone.now() + timedelta(hours=12)
    job = remote_job(write, owner, endpoint, 8, mode=Job.Mode.HYBRID, deadline=deadline)

    job = drive(job, live=True, timeout=20)

    assert job.status == Job.Status.COMPLETED and job.n_succeeded == 8
    assert job.switched_at is not None and "does not offer OpenAI's Batch API" in job.switch_note
    assert job.finished_at < deadline - timedelta(hours=11)  # not at the planned switch, hours away
    assert live_requests(base_url) == 8
    one_result_each(job)


def test_an_input_file_the_endpoint_lost_is_uploaded_again(sim, write, owner, monkeypatch):
    """OpenAI answers 404 naming input_file_id when the file is gone: the API is there, the file is not."""
    config, base_url = sim
    real = batchapi.client_for
    lost = []

    def losing_client(endpoint):
        client = real(endpoint)
        create = client.batches.create

        def create_after_losing_the_file(**kwargs):
            if not lost:
                lost.append(kwargs["input_file_id"])
                client.files.delete(kwargs["input_file_id"])
            return create(**kwargs)

        client.batches.create = create_after_losing_the_file  # type: ignore[method-assign]
        return client

    monkeypatch.setattr(batchapi, "client_for", losing_client)
    job = remote_job(write, owner, make_endpoint(base_url), 4)
    remote.poll_round()
    chunk = job.remote_batches.get()
    assert chunk.status == RemoteBatch.Status.PLANNED and "No such File" in chunk.last_error
    RemoteBatch.objects.filter(pk=chunk.pk).update(next_poll_at=timezone.now())

    job = drive(job)

    assert job.status == Job.Status.COMPLETED and job.n_succeeded == 4
    assert stats(base_url)["by_path"]["/v1/files"] == 2 and job.remote_batches.get().input_file_id != lost[0]
    one_result_each(job)


def test_client_errors_in_the_output_file_fail_their_items(sim, write, owner):
    config, base_url = sim
    config.batch_client_error_rate = 0.5
    job = remote_job(write, owner, make_endpoint(base_url), 20)

    job = drive(job)

    failed = list(job.items.filter(status=Item.Status.FAILED))
    assert failed and job.n_succeeded + len(failed) == 20
    assert all(i.http_status == 400 and i.error_code for i in failed)


class Killed(BaseException):
    """A worker killed at this very moment: not an Exception, so nothing in the engine catches it."""


@pytest.mark.parametrize("call", ["files.create", "batches.create"])
def test_a_crash_right_after_a_call_never_sends_the_chunk_twice(sim, write, owner, monkeypatch, call, settings):
    settings.BATCHSITE_REMOTE_DELETE_FILES = False  # to count the uploads
    config, base_url = sim
    real = batchapi.client_for
    crashed = []

    def crashing_client(endpoint):
        client = real(endpoint)
        group, name = call.split(".")
        api = getattr(client, group)
        made = getattr(api, name)

        def then_die(*args, **kwargs):
            result = made(*args, **kwargs)
            if not crashed:
                crashed.append(result.id)
                raise Killed
            return result

        setattr(api, name, then_die)
        return client

    monkeypatch.setattr(batchapi, "client_for", crashing_client)
    job = remote_job(write, owner, make_endpoint(base_url), 8)

    with pytest.raises(Killed):
        remote.poll_round()
    job = drive(job)

    assert job.status == Job.Status.COMPLETED and job.n_succeeded == 8
    client = openai.OpenAI(base_url=base_url, api_key="x")
    assert len(list(client.batches.list())) == 1
    assert len([f for f in client.files.list(purpose="batch")]) == 1
    chunk = job.remote_batches.get()
    assert crashed[0] in (chunk.input_file_id, chunk.batch_id)


def test_cancel_mid_flight_keeps_what_finished(sim, write, owner):
    config, base_url = sim
    config.batch_seconds = 6
    job = remote_job(write, owner, make_endpoint(base_url), 40)
    job = drive(job, until=lambda j: j.remote_completed >= 5, timeout=20)

    control.cancel(job)
    job = drive(job)

    assert job.status == Job.Status.CANCELLED
    assert job.n_succeeded >= 5 and job.n_cancelled > 0 and job.n_succeeded + job.n_cancelled == 40
    assert job.remote_batches.get().status == RemoteBatch.Status.CANCELLED
    job.endpoint.refresh_from_db()
    assert job.endpoint.learned_cancel_seconds is not None  # hybrid plans use it from now on
    one_result_each(job)


def test_hybrid_switches_to_live_and_meets_a_deadline_shorter_than_the_batch(sim, write, owner):
    config, base_url = sim
    config.batch_seconds = 30
    endpoint = make_endpoint(base_url, rpm=6000, batch_cancel_seconds=1)
    deadline = timezone.now() + timedelta(seconds=8)
    job = remote_job(write, owner, endpoint, 40, mode=Job.Mode.HYBRID, deadline=deadline)

    job = drive(job, live=True, timeout=30)

    assert job.status == Job.Status.COMPLETED and job.n_succeeded == 40
    assert job.finished_at <= deadline
    assert job.switched_at is not None and job.switch_note
    remote_items = job.items.filter(latency_ms__isnull=True)
    live_items = job.items.filter(latency_ms__isnull=False)
    assert remote_items.count() > 0 and live_items.count() > 0
    assert live_requests(base_url) == live_items.count()  # nothing sent live twice, nothing answered twice
    client = openai.OpenAI(base_url=base_url, api_key="x")
    answered_remotely = sum(
        client.batches.retrieve(c.batch_id).request_counts.completed for c in job.remote_batches.all()
    )
    assert answered_remotely == remote_items.count() and answered_remotely + live_requests(base_url) == 40
    book = PriceBook.load()
    for item in remote_items:
        full = book.cost("gpt-4o-mini", item.prompt_tokens, item.completion_tokens)
        assert abs(item.cost - full / 2) < Decimal("1e-8")
    one_result_each(job)


def test_a_hybrid_job_waits_for_its_batch_until_the_planned_switch_then_meets_its_deadline_live(
    sim, write, owner, clock
):
    """Timing logic on the engine's clock: a batch that would take an hour, a deadline in ten minutes. The test
    moves the clock to each moment the engine waits for (the next look at the batch, the switch) instead of
    sleeping ten minutes; this test's hybrid switch above, the cluster's and the browser's run on the real clock."""
    config, base_url = sim
    config.batch_seconds = 3600
    endpoint = make_endpoint(base_url, rpm=6000, batch_cancel_seconds=1)
    deadline = clock.now() + timedelta(minutes=10)
    job = remote_job(write, owner, endpoint, 40, mode=Job.Mode.HYBRID, deadline=deadline)
    job = drive(job, until=lambda j: j.switch_at is not None, clock=clock)
    planned = job.switch_at
    assert deadline - timedelta(minutes=3) < planned < deadline  # 40 requests live, the cancel, the margin

    job = drive(job, until=lambda j: j.switched_at is not None, clock=clock)
    assert job.switched_at >= planned and job.n_succeeded == 0  # not a moment early: nothing came back yet

    job = drive(job, live=True, clock=clock)
    assert job.status == Job.Status.COMPLETED and job.n_succeeded == 40 and job.finished_at <= deadline
    assert live_requests(base_url) == 40
    assert job.remote_batches.get().status == RemoteBatch.Status.CANCELLED
    one_result_each(job)


def test_hybrid_whose_remote_part_finishes_first_sends_nothing_live(sim, write, owner):
    config, base_url = sim
    endpoint = make_endpoint(base_url, rpm=6000, batch_cancel_seconds=1)
    job = remote_job(write, owner, endpoint, 20, mode=Job.Mode.HYBRID, deadline=timezone.now() + timedelta(minutes=10))

    job = drive(job, live=True)

    assert job.status == Job.Status.COMPLETED and job.n_succeeded == 20
    assert job.switched_at is None and job.switch_at is not None
    assert live_requests(base_url) == 0


def test_endpoint_errors_back_off_then_recover(sim, write, owner, monkeypatch):
    config, base_url = sim
    job = remote_job(write, owner, make_endpoint(base_url), 5)
    remote.poll_round()  # sent
    real = batchapi.client_for
    outages = []

    def flaky(endpoint):
        client = real(endpoint)
        retrieve = client.batches.retrieve

        def unreachable(*args, **kwargs):
            if len(outages) < 2:
                outages.append(1)
                raise connection_error()
            return retrieve(*args, **kwargs)

        client.batches.retrieve = unreachable  # type: ignore[method-assign]
        return client

    monkeypatch.setattr(batchapi, "client_for", flaky)
    chunk = job.remote_batches.get()
    RemoteBatch.objects.filter(pk=chunk.pk).update(next_poll_at=timezone.now())
    remote.poll_round()
    chunk.refresh_from_db()
    assert chunk.failures == 1 and "Could not reach" in chunk.last_error
    assert chunk.next_poll_at > timezone.now()  # backs off instead of hammering the endpoint

    RemoteBatch.objects.filter(pk=chunk.pk).update(next_poll_at=timezone.now())
    remote.poll_round()
    chunk.refresh_from_db()
    assert chunk.failures == 2
    assert (chunk.next_poll_at - timezone.now()).total_seconds() > 2  # twice as long as the first wait

    RemoteBatch.objects.filter(pk=chunk.pk).update(next_poll_at=timezone.now())
    job = drive(job)
    assert job.status == Job.Status.COMPLETED and job.remote_batches.get().failures == 0


def test_a_refused_key_pauses_the_job_saying_why(sim, write, owner):
    config, base_url = sim
    config.batch_seconds = 5
    job = remote_job(write, owner, make_endpoint(base_url), 5)
    remote.poll_round()
    config.api_key = "sk-another-key"  # the endpoint no longer takes ours

    job = drive(job, until=lambda j: j.status == Job.Status.PAUSED, timeout=10)

    assert "refused the key" in job.status_reason


def test_only_one_poller_runs_at_a_time(settings):
    from django.core.cache import cache

    cache.add(poller.LOCK, "someone else", timeout=30)
    try:
        assert remote.poll(window=1)["skipped"]
    finally:
        cache.delete(poller.LOCK)
    assert "skipped" not in remote.poll(window=1)


def test_a_poller_whose_window_ends_with_work_due_hands_over_to_a_successor(sim, write, owner, monkeypatch):
    config, base_url = sim
    config.batch_seconds = 30
    successors = []
    monkeypatch.setattr("jobs.queue.poll_remote_successor", lambda: successors.append("jobs.engine.tasks.poll_remote"))
    job = remote_job(write, owner, make_endpoint(base_url), 3)

    result = remote.poll(window=0)  # sends the batch; its next look is due within seconds

    assert result["handed_over"] and successors == ["jobs.engine.tasks.poll_remote"]
    assert job.remote_batches.get().batch_id
    RemoteBatch.objects.update(next_poll_at=timezone.now() + timedelta(minutes=5))  # nothing due soon: no successor
    assert "handed_over" not in remote.poll(window=0) and len(successors) == 1


def test_a_cancel_that_arrives_after_the_batch_finished_keeps_every_result(sim, write, owner):
    config, base_url = sim
    job = remote_job(write, owner, make_endpoint(base_url), 6)
    remote.poll_round()  # sent
    client = openai.OpenAI(base_url=base_url, api_key="x")
    batch_id = job.remote_batches.get().batch_id
    end = time.monotonic() + 10
    while client.batches.retrieve(batch_id).status != "completed" and time.monotonic() < end:
        time.sleep(0.1)

    control.cancel(job)  # the endpoint answers the cancel with 409: the batch is already completed
    job = drive(job)

    assert job.status == Job.Status.CANCELLED and job.n_succeeded == 6
    assert job.remote_batches.get().status == RemoteBatch.Status.COMPLETED


def test_a_killed_poller_holds_a_chunk_long_only_while_it_uploads(sim, write, owner, monkeypatch, settings):
    """What a kill -9 leaves behind is the claim in the database: short while the poller only looks at a batch
    (a hybrid switch waits for it), as long as the request timeout while it uploads or collects."""
    config, base_url = sim
    real = batchapi.client_for
    held: dict[str, float] = {}

    def held_for(call: str) -> None:
        until = RemoteBatch.objects.get().claimed_until
        held[call] = max(held.get(call, 0), (until - timezone.now()).total_seconds())

    def watching_client(endpoint):
        client = real(endpoint)
        for group, name in [("files", "create"), ("batches", "create"), ("batches", "retrieve")]:
            api, made = getattr(client, group), getattr(getattr(client, group), name)

            def watched(*args, _made=made, _call=f"{group}.{name}", **kwargs):
                held_for(_call)
                return _made(*args, **kwargs)

            setattr(api, name, watched)
        return client

    monkeypatch.setattr(batchapi, "client_for", watching_client)
    job = remote_job(write, owner, make_endpoint(base_url), 3)
    drive(job)

    assert held["files.create"] > settings.BATCHSITE_REQUEST_TIMEOUT
    assert held["batches.create"] <= claims.CLAIM_SECONDS <= 90
    assert held["batches.retrieve"] <= claims.CLAIM_SECONDS


def test_a_poller_whose_claim_was_taken_over_stops(sim, write, owner):
    config, base_url = sim
    job = remote_job(write, owner, make_endpoint(base_url), 2)
    remote.poll_round()
    chunk = job.remote_batches.get()
    Endpoint.objects.get()
    mine = timezone.now() + timedelta(seconds=60)
    RemoteBatch.objects.filter(pk=chunk.pk).update(claimed_until=mine)
    chunk.claimed_until = mine
    RemoteBatch.objects.filter(pk=chunk.pk).update(claimed_until=mine + timedelta(seconds=1))  # another poller's

    with pytest.raises(claims.LostClaim):
        claims.renew(chunk)


def test_a_chunk_another_poller_holds_is_left_alone(sim, write, owner):
    config, base_url = sim
    job = remote_job(write, owner, make_endpoint(base_url), 4)
    remote.poll_round()  # planned and sent
    chunk = job.remote_batches.get()
    RemoteBatch.objects.filter(pk=chunk.pk).update(
        claimed_until=timezone.now() + timedelta(minutes=5), next_poll_at=timezone.now()
    )
    time.sleep(1.5)  # the batch completes meanwhile

    remote.poll_round()
    chunk.refresh_from_db()
    assert chunk.status != RemoteBatch.Status.COMPLETED and chunk.collected_at is None  # not looked at

    RemoteBatch.objects.filter(pk=chunk.pk).update(claimed_until=timezone.now() - timedelta(seconds=1))
    assert drive(job).n_succeeded == 4  # a claim whose holder died runs out, and the work goes on


def test_a_paused_remote_job_resumed_after_its_batches_ended_completes(sim, write, owner):
    config, base_url = sim
    job = remote_job(write, owner, make_endpoint(base_url), 6)
    remote.poll_round()
    job.refresh_from_db()
    control.pause(job)
    job = drive(job, until=lambda j: j.remote_batches.filter(collected_at__isnull=False).exists())
    assert job.status == Job.Status.PAUSED and job.n_succeeded == 6

    control.resume(job)
    job = drive(job)

    assert job.status == Job.Status.COMPLETED


def test_a_paused_remote_job_with_batches_out_cannot_be_deleted(sim, write, owner):
    config, base_url = sim
    config.batch_seconds = 30
    job = remote_job(write, owner, make_endpoint(base_url), 3)
    remote.poll_round()
    job.refresh_from_db()
    control.pause(job)

    assert not job.deletable()


def test_a_token_refusal_while_cancelling_ends_cancelled(sim, write, owner):
    config, base_url = sim
    config.batch_token_limit = 10  # every batch is refused
    job = remote_job(write, owner, make_endpoint(base_url), 3)
    remote.poll_round()
    client = openai.OpenAI(base_url=base_url, api_key="x")
    batch_id = job.remote_batches.get().batch_id
    end = time.monotonic() + 10
    while client.batches.retrieve(batch_id).status != "failed" and time.monotonic() < end:
        time.sleep(0.05)
    job.refresh_from_db()

    control.cancel(job)
    job = drive(job)

    assert job.status == Job.Status.CANCELLED and job.n_cancelled == 3


def test_a_batch_the_endpoint_no_longer_has_fails_its_items_saying_so(sim, write, owner):
    config, base_url = sim
    job = remote_job(write, owner, make_endpoint(base_url), 3)
    remote.poll_round()
    RemoteBatch.objects.update(batch_id="batch_gone", failures=steps.GONE_AFTER - 1, next_poll_at=timezone.now())

    job = drive(job)

    assert job.status == Job.Status.COMPLETED and job.n_failed == 3
    assert "no longer has this batch" in job.items.first().error_message


def test_results_the_endpoint_lost_are_tried_for_a_while_then_fail_and_never_run_live(sim, write, owner):
    config, base_url = sim
    endpoint = make_endpoint(base_url, rpm=6000)
    deadline = timezone.now() + timedelta(hours=1)
    job = remote_job(write, owner, endpoint, 3, mode=Job.Mode.HYBRID, deadline=deadline)
    drive(
        job,
        until=lambda j: (
            j.remote_batches.filter(status=RemoteBatch.Status.COMPLETED).exists() or not remote.poll_round()
        ),
    )
    remote.poll_round()  # sent
    chunk = job.remote_batches.get()
    client = openai.OpenAI(base_url=base_url, api_key="x")
    while (batch := client.batches.retrieve(chunk.batch_id)).status != "completed":
        time.sleep(0.1)
    client.files.delete(batch.output_file_id)  # paid for, then lost before Batchsite collected it
    Job.objects.filter(pk=job.pk).update(switched_at=timezone.now())  # and the job has switched to live meanwhile

    for _ in range(2 * steps.GONE_AFTER + 1):
        RemoteBatch.objects.filter(pk=chunk.pk).update(next_poll_at=timezone.now())
        remote.poll_round()
        chunk.refresh_from_db()
        if chunk.collected_at:
            break
        assert chunk.failures and chunk.last_error  # tried again, with backoff, not failed at the first 404

    job.refresh_from_db()
    assert job.n_failed == 3 and chunk.status == RemoteBatch.Status.COMPLETED
    assert "no longer has this batch's results" in job.items.first().error_message
    assert live_requests(base_url) == 0  # answered (and paid) at the Batch API: never sent again


def test_a_file_the_endpoint_has_not_processed_yet_is_waited_for(sim, write, owner, monkeypatch):
    """Azure OpenAI refuses a batch made from a file still `pending` with a 400: that passes."""
    config, base_url = sim
    body = {"message": "The input file is in 'pending' state. Only files with status 'Processed' are accepted"}
    refused = refusing_client(monkeypatch, 400, body, times=2)
    job = remote_job(write, owner, make_endpoint(base_url), 4)
    for _ in range(3):
        remote.poll_round()
        RemoteBatch.objects.update(next_poll_at=timezone.now())

    job = drive(job)

    assert job.status == Job.Status.COMPLETED and job.n_succeeded == 4 and len(refused) == 2
    assert job.remote_batches.count() == 1


def refusing_client(monkeypatch, status: int, body: dict, times: int = 10**6) -> list:
    """client_for, with batches.create answering `status` with `body` the first `times` times."""
    real = batchapi.client_for
    refused: list = []

    def make(endpoint):
        client = real(endpoint)
        create = client.batches.create

        def refuse(**kwargs):
            if len(refused) < times:
                refused.append(kwargs["input_file_id"])
                request = httpx2.Request("POST", str(client.base_url) + "batches")
                error = openai.BadRequestError if status == 400 else openai.NotFoundError
                raise error(
                    f"Error code: {status} - {body}", response=httpx2.Response(status, request=request), body=body
                )
            return create(**kwargs)

        client.batches.create = refuse  # type: ignore[method-assign]
        return client

    monkeypatch.setattr(batchapi, "client_for", make)
    return refused


def rounds_until_collected(job: Job, most: int) -> int:
    for n in range(1, most + 1):
        RemoteBatch.objects.update(next_poll_at=timezone.now())
        remote.poll_round()
        if not job.remote_batches.filter(collected_at__isnull=True).exists():
            return n
    raise AssertionError(f"still not collected after {most} rounds: {list(job.remote_batches.values())}")


def test_a_file_never_processed_fails_its_batch_after_a_while(sim, write, owner, monkeypatch):
    config, base_url = sim
    body = {"message": "The input file is in 'pending' state. Only files with status 'Processed' are accepted"}
    refused = refusing_client(monkeypatch, 400, body)
    job = remote_job(write, owner, make_endpoint(base_url), 3)

    rounds = rounds_until_collected(job, 30)

    job.refresh_from_db()
    assert job.n_failed == 3 and "pending" in job.items.first().error_message
    assert len(refused) == 2 * steps.GONE_AFTER and rounds <= 2 * steps.GONE_AFTER + 1
    assert stats(base_url)["by_path"]["/v1/files"] == 1  # the one file, never uploaded again


def test_a_404_to_batches_create_uploads_again_a_few_times_then_gives_up_on_the_batch_api(
    sim, write, owner, monkeypatch
):
    """VoyageAI answers {"detail": "Input file not found"}: no param, so no proof either way at first."""
    config, base_url = sim
    refused = refusing_client(monkeypatch, 404, {"detail": "Input file not found"})
    job = remote_job(write, owner, make_endpoint(base_url), 3)

    rounds_until_collected(job, 30)

    job.refresh_from_db()
    assert job.n_failed == 3 and job.items.first().error_code == "batch_api_unavailable"
    assert len(refused) == steps.GONE_AFTER == len(set(refused))  # a new upload each time, then no more


def test_a_404_to_batches_create_once_is_only_a_lost_file(sim, write, owner, monkeypatch):
    config, base_url = sim
    refusing_client(monkeypatch, 404, {"detail": "Input file not found"}, times=1)
    job = remote_job(write, owner, make_endpoint(base_url), 3)
    remote.poll_round()
    RemoteBatch.objects.update(next_poll_at=timezone.now())

    job = drive(job)

    assert job.status == Job.Status.COMPLETED and job.n_succeeded == 3


def test_a_batch_made_before_a_crash_is_found_by_its_file_when_its_metadata_was_dropped(sim, write, owner, monkeypatch):
    config, base_url = sim
    real = batchapi.client_for
    crashed = []

    def proxy_client(endpoint):  # a proxy that drops batch metadata, and a worker killed after the create
        client = real(endpoint)
        create = client.batches.create

        def create_without_metadata(**kwargs):
            batch = create(**{**kwargs, "metadata": None})
            if not crashed:
                crashed.append(batch.id)
                raise Killed
            return batch

        client.batches.create = create_without_metadata  # type: ignore[method-assign]
        return client

    monkeypatch.setattr(batchapi, "client_for", proxy_client)
    job = remote_job(write, owner, make_endpoint(base_url), 5)
    with pytest.raises(Killed):
        remote.poll_round()

    job = drive(job)

    assert job.status == Job.Status.COMPLETED and job.n_succeeded == 5
    assert job.remote_batches.get().batch_id == crashed[0]
    assert len(list(openai.OpenAI(base_url=base_url, api_key="x").batches.list())) == 1  # none made twice


def test_hybrid_runs_what_the_batch_api_let_expire_again(sim, write, owner):
    config, base_url = sim
    config.batch_expire = True
    endpoint = make_endpoint(base_url, rpm=6000, batch_cancel_seconds=1)
    job = remote_job(write, owner, endpoint, 20, mode=Job.Mode.HYBRID, deadline=timezone.now() + timedelta(hours=2))
    job = drive(job, until=lambda j: j.remote_batches.filter(collected_at__isnull=False).exists())
    config.batch_expire = False

    job = drive(job, live=True)

    assert job.status == Job.Status.COMPLETED and job.n_succeeded == 20 and job.n_expired == 0
    assert job.remote_batches.count() == 2  # the expired half went in a second batch


def test_a_poller_with_an_unusable_endpoint_neither_spins_nor_stays(sim, write, owner):
    config, base_url = sim
    job = remote_job(write, owner, make_endpoint(base_url), 3)
    remote.poll_round()
    Endpoint.objects.all().delete()  # the job's endpoint is gone and there is no default

    started = time.monotonic()
    result = remote.poll(window=5)

    job.refresh_from_db()
    assert job.status == Job.Status.PAUSED and "No endpoint" in job.status_reason
    assert result["rounds"] <= 2 and time.monotonic() - started < 4


def test_a_hybrid_retry_is_refused_live_and_remote_are_the_choices(sim, write, owner):
    config, base_url = sim
    config.batch_expire = True
    job = drive(remote_job(write, owner, make_endpoint(base_url), 4))

    with pytest.raises(InvalidTransition):
        control.retry_failed(job, mode=Job.Mode.HYBRID)


def test_the_admin_protects_a_paused_job_whose_batches_are_out(sim, write, owner, client, staff):
    config, base_url = sim
    config.batch_seconds = 30
    job = remote_job(write, owner, make_endpoint(base_url), 3)
    remote.poll_round()
    job.refresh_from_db()
    control.pause(job)
    staff.is_superuser = True
    staff.save()
    client.force_login(staff)

    page = client.get(f"/admin/jobs/job/{job.pk}/delete/").content.decode()

    assert "its batches still run at the endpoint: cancel it first" in page
