"""Budgets that cannot be dodged (issue 21): spending is a ledger written as results are, so deleting a job
gives nothing back and work counts in the month it was done; a model with no price cannot run under a limit;
a request without max_tokens weighs its model's most output, times `n`; and two jobs of one person claim
against their limit one at a time."""

from datetime import timedelta
from decimal import Decimal

import pytest
from django.db.models import Sum
from django.utils import timezone

from jobs import ingest, tokens
from jobs.models import Job, Spending, SpendingLimit, control
from jobs.pricing import PriceBook
from simulator import SimConfig, serve_in_thread
from tests.factories import chat_line, make_endpoint, make_job, seed_prices
from tests.servers import wait_until
from tests.test_budget import run_until


@pytest.fixture
def in_this_process(monkeypatch, transactional_db, settings):
    monkeypatch.setattr("jobs.queue.async_task", lambda *a, **k: None)
    monkeypatch.setattr("jobs.queue.send_notifications_on_commit", lambda *a, **k: None)
    settings.BATCHSITE_SLICES_PER_JOB = 1
    dear_prices()


def dear_prices():
    """gpt-4o-mini at prices that make a few requests cost cents (limits are set in whole cents)."""
    from jobs.models import Price

    seed_prices()
    Price.objects.filter(model="gpt-4o-mini").update(input_per_mtok=1000, output_per_mtok=4000)


def most_of(job: Job) -> Decimal:
    item = job.items.get(line=1)
    return PriceBook.load().cost("gpt-4o-mini", item.est_tokens, 1000)


def ledger(**scope) -> Decimal:
    return Spending.objects.filter(**scope).aggregate(s=Sum("usd"))["s"] or Decimal(0)


@pytest.mark.usefixtures("in_this_process")
def test_deleting_a_job_does_not_give_its_spending_back(write, owner, client):
    with serve_in_thread(SimConfig(latency_ms=5)) as base_url:
        endpoint = make_endpoint(base_url, concurrency=10)
        first = make_job(write, owner, endpoint, 4, start=False, max_tokens=1000)
        first.start_slices(first.pk)
        first = run_until(first, lambda j: j.is_finished)
        spent, most = ledger(owner=owner), most_of(first)
        assert spent > 0 and abs(spent - first.cost) < Decimal("0.000001")  # Job.cost keeps 6 places, the ledger 8
        SpendingLimit.objects.create(user=owner, monthly_usd=(spent + most * Decimal("2.5")).quantize(Decimal("0.01")))
        limit = SpendingLimit.objects.get(user=owner)

        client.force_login(owner)  # the attack: delete the job that spent, then run another
        assert client.post(f"/jobs/{first.pk}/delete").status_code == 302
        assert not Job.objects.filter(pk=first.pk).exists()
        assert ledger(owner=owner) == spent and limit.spent() == spent  # still counted

        second = make_job(write, owner, endpoint, 10, start=False, max_tokens=1000)
        Job.start_slices(second.pk)
        second = run_until(second, lambda j: j.status == Job.Status.PAUSED and j.n_running == 0)
    room = limit.monthly_usd - spent
    assert second.n_succeeded == int(room / most) < 10, (room, most, second.counts())
    assert "monthly spending limit" in second.status_reason and f"${spent:,.4f} is spent" in second.status_reason
    assert limit.spent() <= limit.monthly_usd


@pytest.mark.usefixtures("in_this_process")
def test_work_counts_in_the_month_it_was_done_not_the_month_its_job_was_made(write, owner, clock):
    with serve_in_thread(SimConfig(latency_ms=5)) as base_url:
        job = make_job(write, owner, make_endpoint(base_url, concurrency=10), 3, start=False, max_tokens=50)
        now = timezone.localtime()
        next_month = (now.replace(day=1) + timedelta(days=32)).replace(day=1, hour=1, minute=0, second=0)
        clock.advance((next_month - now).total_seconds())  # made on the last evening, run after midnight on the 1st
        limit = SpendingLimit.objects.create(user=owner, monthly_usd=Decimal("100"))
        Job.start_slices(job.pk)
        job = run_until(job, lambda j: j.is_finished)
    assert job.created_at < next_month and job.cost > 0
    assert list(Spending.objects.values_list("month", flat=True)) == [next_month.date()]
    assert abs(limit.spent() - job.cost) < Decimal("0.000001")  # this month's, though the job was made last month


@pytest.mark.usefixtures("in_this_process")
def test_a_model_without_a_price_cannot_run_under_a_limit(write, owner):
    with serve_in_thread(SimConfig(latency_ms=5)) as base_url:
        endpoint = make_endpoint(base_url, concurrency=10)
        SpendingLimit.objects.create(user=owner, monthly_usd=Decimal("1"))
        lines = [chat_line(f"r{i}", "hi", model="mystery-model-9") for i in range(3)]
        plan = ingest.validate(write("m.jsonl", lines))
        job = ingest.create_job(plan, owner=owner, endpoint=endpoint)
        Job.start_slices(job.pk)
        job = run_until(job, lambda j: j.status == Job.Status.PAUSED)
        assert job.n_succeeded == 0 and job.n_pending == 3
        assert "No price is known for the model “mystery-model-9”" in job.status_reason
        assert "Prices" in job.status_reason

        SpendingLimit.objects.all().delete()  # with no limit or cap, a model without a price runs
        control.resume(job)
        job = run_until(job, lambda j: j.is_finished)
        assert job.n_succeeded == 3


@pytest.mark.django_db
def test_the_most_output_counts_n_and_the_models_most_when_max_tokens_is_absent(write):
    plan = ingest.validate(
        write(
            "n.jsonl",
            [
                chat_line("a", "hi", n=3),  # no max_tokens: the model's most, three times
                chat_line("b", "hi", max_tokens=100, n=2),
                chat_line("c", "hi", model="some-local-model"),
            ],
        )
    )
    assert plan.max_output_tokens == 3 * 16_384 + 2 * 100 + tokens.DEFAULT_MAX_OUTPUT
    assert tokens.most_output_tokens("/v1/embeddings", {"model": "text-embedding-3-small", "input": "x"}) == 0
    assert tokens.most_output_tokens("/v1/chat/completions", {"model": "o3-mini", "n": 10**9}) == 100_000 * 128


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_two_jobs_of_one_person_never_spend_past_their_limit_together(cluster, simulator, write, owner):
    """Both jobs claim side by side (two workers, two slices each) against one limit: claims lock the limit's row,
    so each sees what the other committed, and together they stop at it."""
    from jobs.models import Price

    sim = simulator("--latency-ms", "30")
    dear_prices()
    # Input only: a request's most cost is then close to what it is charged, and the limit binds within the jobs.
    Price.objects.filter(model="gpt-4o-mini").update(output_per_mtok=0)
    endpoint = make_endpoint(sim.base_url, concurrency=20)
    jobs = [make_job(write, owner, endpoint, 60, start=False, max_tokens=200) for _ in range(2)]
    most = PriceBook.load().cost("gpt-4o-mini", jobs[0].items.get(line=1).est_tokens, 0)
    limit = SpendingLimit.objects.create(user=owner, monthly_usd=(most * 30).quantize(Decimal("0.01")))
    cluster(BATCHSITE_WORKERS="2")
    for job in jobs:
        job.start()

    def settled():
        states = [Job.objects.get(pk=j.pk) for j in jobs]
        return all(j.status in (Job.Status.PAUSED, Job.Status.COMPLETED) and not j.n_running for j in states)

    wait_until(settled, 120, 0.3, "both jobs to pause at the limit (or end)")
    states = [Job.objects.get(pk=j.pk) for j in jobs]
    spent = limit.spent()
    assert spent <= limit.monthly_usd, f"spent ${spent} past a ${limit.monthly_usd} limit"
    assert any(j.status == Job.Status.PAUSED for j in states), [j.counts() for j in states]  # the limit bound
    assert sum(j.n_succeeded for j in states) >= 20  # and both ran up to it
