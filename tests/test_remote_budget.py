"""Cost caps and monthly limits hold for work sent to the Batch API (issue 14): a chunk goes only if its
requests, each at its most possible cost at the batch price, fit on top of what is spent and in flight;
else the job pauses before sending it, and goes on once the budget is raised. Against the simulator over
HTTP, the poller's rounds driven here (tests/test_remote.py)."""

from decimal import Decimal

import openai
import pytest

from jobs import ingest
from jobs.engine import remote, runner
from jobs.models import Job, JobEvent, RemoteBatch, Spending, SpendingLimit, control
from jobs.pricing import PriceBook
from simulator import SimConfig, serve_in_thread
from tests import test_remote
from tests.factories import chat_line, make_endpoint, make_job
from tests.test_remote import drive

pytestmark = pytest.mark.django_db(transaction=True)

quick_polls, sim = test_remote.quick_polls, test_remote.sim  # its fixtures, here too

MAX_TOKENS = 1000  # each request may cost up to ~$0.0003 at the batch price: budgets of a few cents bite


@pytest.fixture(autouse=True)
def no_emails_sent_here(monkeypatch):
    monkeypatch.setattr("jobs.queue.send_notifications_on_commit", lambda *a, **k: None)


def batch_job(write, owner, endpoint, n: int, mode=Job.Mode.REMOTE, **options) -> Job:
    lines = [chat_line(f"req-{i}", f"Question {i}", max_tokens=MAX_TOKENS) for i in range(n)]
    plan = ingest.validate(write(f"budget-{n}.jsonl", lines))
    job = ingest.create_job(plan, owner=owner, endpoint=endpoint, options=ingest.RunOptions(mode=mode, **options))
    job.start()
    return job


def most(job: Job, lines: range, discount: Decimal = Decimal("0.5")) -> Decimal:
    """The most the requests on `lines` may cost (at the Batch API's half price by default)."""
    book = PriceBook.load()
    items = job.items.filter(line__in=list(lines))
    return sum(book.cost("gpt-4o-mini", i.est_tokens, MAX_TOKENS, discount=discount) for i in items)


def batches_at(base_url: str) -> int:
    return len(openai.OpenAI(base_url=base_url, api_key="x").batches.list().data)


def test_a_remote_job_pauses_before_the_batch_that_would_pass_its_cap_and_goes_on_when_raised(sim, write, owner):
    config, base_url = sim
    job = batch_job(write, owner, make_endpoint(base_url), 10, cost_cap=Decimal("0.0001"))
    assert most(job, range(1, 11)) > Decimal("0.0001")

    job = drive(job, until=lambda j: j.status == Job.Status.PAUSED)

    assert batches_at(base_url) == 0  # nothing was sent, not even the file
    assert job.remote_batches.get().status == RemoteBatch.Status.PLANNED
    assert job.status_reason.startswith("The job's cost cap is $0.0001: $0.0000 is spent")
    assert f"the next batch (lines 1–10) up to ${most(job, range(1, 11)):,.4f}" in job.status_reason
    assert JobEvent.objects.filter(job=job, event="batch.paused").exists()  # its owner is told
    for _ in range(3):
        remote.poll_round()
    assert batches_at(base_url) == 0  # later rounds leave the paused job's chunk as it is

    Job.objects.filter(pk=job.pk).update(cost_cap=Decimal("1"))
    job.refresh_from_db()
    control.resume(job)
    job = drive(job)
    assert (job.status, job.n_succeeded) == (Job.Status.COMPLETED, 10)
    assert batches_at(base_url) == 1 and 0 < job.cost < Decimal("1")


def test_batches_in_flight_count_at_their_most_and_what_would_pass_the_cap_waits(sim, write, owner):
    config, base_url = sim
    endpoint = make_endpoint(base_url, batch_max_requests=10)
    job = batch_job(write, owner, endpoint, 30)
    first_two = most(job, range(1, 21))
    cap = (first_two + most(job, range(21, 31)) / 2).quantize(Decimal("0.0001"))
    assert first_two < cap < first_two + most(job, range(21, 31))
    Job.objects.filter(pk=job.pk).update(cost_cap=cap)

    def settled(j: Job) -> bool:
        return j.status == Job.Status.PAUSED and j.n_running == j.remote_batches.get(status="planned").n_items

    job = drive(
        job,
        until=lambda j: (
            j.status == Job.Status.PAUSED and j.remote_batches.filter(status="planned").exists() and settled(j)
        ),
    )

    # Two whole batches, and of the third the lines that fit, as a live job runs up to its cap.
    assert batches_at(base_url) == 3 and 20 < job.n_succeeded < 30
    waiting = job.remote_batches.get(status=RemoteBatch.Status.PLANNED)
    assert waiting.n_items == 30 - job.n_succeeded
    assert "cost cap" in job.status_reason and f"the next batch (lines {job.n_succeeded + 1}–30)" in job.status_reason
    assert job.cost <= cap

    Job.objects.filter(pk=job.pk).update(cost_cap=None)
    job.refresh_from_db()
    control.resume(job)
    job = drive(job)
    assert (job.status, job.n_succeeded, batches_at(base_url)) == (Job.Status.COMPLETED, 30, 4)


@pytest.mark.parametrize("mode", [Job.Mode.REMOTE, Job.Mode.HYBRID])
def test_a_monthly_limit_holds_for_work_sent_to_the_batch_api(sim, write, owner, mode):
    config, base_url = sim
    endpoint = make_endpoint(base_url)
    earlier = make_job(write, owner, endpoint, 1, start=False)
    Spending.record(earlier.pk, Decimal("0.0099"))  # spent this month already (the spending table has it)
    limit = SpendingLimit.objects.create(user=owner, monthly_usd=Decimal("0.01"))
    job = batch_job(write, owner, endpoint, 10, mode=mode)
    assert most(job, range(1, 11)) > Decimal("0.0001")

    job = drive(job, until=lambda j: j.status == Job.Status.PAUSED)

    assert batches_at(base_url) == 0
    assert job.status_reason.startswith("Owner's monthly spending limit is $0.0100: $0.0099 is spent")
    assert "the next batch (lines 1–10)" in job.status_reason

    limit.monthly_usd = Decimal("5")
    limit.save()
    control.resume(job)
    job = drive(job)
    assert (job.status, job.n_succeeded) == (Job.Status.COMPLETED, 10)
    # What the batch cost counts toward the month, as the Usage page counts it.
    assert job.cost > 0 and limit.spent() == pytest.approx(Decimal("0.0099") + job.cost, abs=Decimal("0.000001"))


def test_a_batch_in_flight_counts_toward_the_monthly_limit_of_a_live_job(write, owner, settings):
    settings.BATCHSITE_SLICES_PER_JOB = 1
    with serve_in_thread(SimConfig(batch_seconds=60, seed=1)) as base_url:
        endpoint = make_endpoint(base_url)
        out = batch_job(write, owner, endpoint, 10)
        live = make_job(write, owner, endpoint, 1, start=False, max_tokens=MAX_TOKENS)
        in_flight = most(out, range(1, 11))
        room = in_flight + most(live, range(1, 2), discount=Decimal(0)) / 2
        earlier = make_job(write, owner, endpoint, 1, start=False)
        Spending.record(earlier.pk, Decimal("0.01") - room)
        SpendingLimit.objects.create(user=owner, monthly_usd=Decimal("0.01"))

        drive(out, until=lambda j: j.remote_batches.filter(batch_id__gt="").exists())
        assert batches_at(base_url) == 1  # it fits the room left

        Job.start_slices(live.pk)
        runner.run(live.pk, budget=2, slices=1)
        live.refresh_from_db()
        assert live.status == Job.Status.PAUSED and live.n_succeeded == 0, live.counts()
        assert f"requests in flight may cost up to ${in_flight:,.4f} more" in live.status_reason
        assert "the next one (line 1)" in live.status_reason
