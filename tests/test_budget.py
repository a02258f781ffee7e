"""Cost caps (issue 14): a job pauses before the request whose most possible cost (its input plus all the
output it may ask for) would take it past its cap, says so, and goes on once the cap is raised. Run in this
process against the simulator over HTTP."""

import time
from decimal import Decimal

import pytest

from jobs import tokens
from jobs.engine import runner
from jobs.models import Job, JobEvent, Spending, control
from jobs.pricing import PriceBook
from simulator import SimConfig, serve_in_thread
from tests.factories import make_endpoint, make_job, seed_prices

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def in_this_process(monkeypatch):
    monkeypatch.setattr("jobs.queue.async_task", lambda *a, **k: None)
    monkeypatch.setattr("jobs.queue.send_notifications_on_commit", lambda *a, **k: None)
    seed_prices()


def run_until(job: Job, done) -> Job:
    end = time.monotonic() + 60
    while time.monotonic() < end:
        runner.run(job.pk, budget=2, slices=1)
        job.refresh_from_db()
        if done(job):
            return job
    raise AssertionError(job.counts())


def test_a_cost_cap_pauses_the_job_at_the_request_that_would_pass_it_and_raising_it_goes_on(write, owner, settings):
    settings.BATCHSITE_SLICES_PER_JOB = 1
    with serve_in_thread(SimConfig(latency_ms=5)) as base_url:
        endpoint = make_endpoint(base_url, concurrency=10)
        job = make_job(write, owner, endpoint, 10, start=False, max_tokens=1000)
        item = job.items.get(line=1)
        most = PriceBook.load().cost("gpt-4o-mini", item.est_tokens, tokens.max_output_tokens({"max_tokens": 1000}))
        assert most > 0
        cap = (most * Decimal("4.5")).quantize(Decimal("0.0001"))
        Job.objects.filter(pk=job.pk).update(cost_cap=cap)
        Job.start_slices(job.pk)

        job = run_until(job, lambda j: j.status == Job.Status.PAUSED and j.n_running == 0)
        # Four requests fit the cap at their most; the fifth would not, so it was never sent.
        assert job.n_succeeded == 4 and job.n_pending == 6, job.counts()
        assert "cost cap" in job.status_reason and "line 5" in job.status_reason
        assert job.cost <= cap
        assert JobEvent.objects.filter(job=job, event="batch.paused").exists()  # its owner is told

        Job.objects.filter(pk=job.pk).update(cost_cap=cap * 10)
        job.refresh_from_db()
        control.resume(job)
        job = run_until(job, lambda j: j.is_finished)
        assert (job.status, job.n_succeeded) == (Job.Status.COMPLETED, 10)


@pytest.mark.usefixtures("data_dir")
def test_the_form_the_job_page_and_v1_set_the_cap(client, owner):
    from django.core.files.uploadedfile import SimpleUploadedFile

    from tests.factories import api_headers, chat_line, jsonl

    endpoint = make_endpoint("http://127.0.0.1:9/v1")
    client.force_login(owner)
    url = client.post("/jobs/new/", {"file": SimpleUploadedFile("in.jsonl", jsonl([chat_line("a")]))}).url
    client.post(
        url, {"endpoint": endpoint.pk, "max_attempts": 5, "action": "launch", "mode": "live", "cost_cap": "2.5"}
    )
    job = Job.objects.get()
    assert job.cost_cap == Decimal("2.5")
    page = client.get(f"/jobs/{job.pk}/").content.decode()
    assert "of a $2.5000 cap" in page and 'name="cost_cap"' in page
    client.post(f"/jobs/{job.pk}/cost-cap", {"cost_cap": "10"})
    job.refresh_from_db()
    assert job.cost_cap == Decimal("10")
    client.post(f"/jobs/{job.pk}/cost-cap", {"cost_cap": ""})
    job.refresh_from_db()
    assert job.cost_cap is None
    client.force_login(type(owner).objects.create_user("eve", password="eve-pass-123"))
    assert client.post(f"/jobs/{job.pk}/cost-cap", {"cost_cap": "0"}).status_code == 403  # not hers

    headers = api_headers(owner)
    for value, status in (("abc", 400), ("-1", 400), ("NaN", 400), ("12.5", 200)):
        file = client.post(
            "/v1/files",
            {"file": SimpleUploadedFile("in.jsonl", jsonl([chat_line("a")])), "purpose": "batch"},
            headers=headers,
        ).json()
        body = {"input_file_id": file["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"}
        body["metadata"] = {"batchsite_cost_cap": value}
        assert client.post("/v1/batches", body, content_type="application/json", headers=headers).status_code == status
    assert Job.objects.latest("pk").cost_cap == Decimal("12.5")


def test_a_monthly_limit_of_the_owner_or_the_endpoint_pauses_the_job_and_the_usage_page_shows_it(
    write, owner, staff, client, settings
):
    from jobs.models import SpendingLimit

    settings.BATCHSITE_SLICES_PER_JOB = 1
    with serve_in_thread(SimConfig(latency_ms=5)) as base_url:
        endpoint = make_endpoint(base_url, concurrency=10)
        earlier = make_job(write, owner, endpoint, 1, start=False)
        Spending.record(earlier.pk, Decimal("0.0010"))  # spent this month already (the spending table has it)
        job = make_job(write, owner, endpoint, 10, start=False, max_tokens=4000)
        item = job.items.get(line=1)
        most = PriceBook.load().cost("gpt-4o-mini", item.est_tokens, tokens.max_output_tokens({"max_tokens": 4000}))
        limit = SpendingLimit.objects.create(user=owner, monthly_usd=Decimal("0.01"))
        fits = int((Decimal("0.01") - Decimal("0.0010")) / most)
        assert 1 <= fits < 10
        Job.start_slices(job.pk)

        job = run_until(job, lambda j: j.status == Job.Status.PAUSED and j.n_running == 0)
        assert job.n_succeeded == fits and f"line {fits + 1}" in job.status_reason, (fits, job.status_reason)
        assert "owner's monthly spending limit" in job.status_reason or "monthly spending limit" in job.status_reason

        client.force_login(owner)
        page = client.get("/usage/").content.decode()
        assert "Monthly limits" in page and "$0.01" in page and "Set limit" not in page  # staff set them
        assert client.post("/usage/limits", {"target": f"user:{owner.pk}", "monthly_usd": "5"}).status_code == 403
        client.force_login(staff)
        client.post("/usage/limits", {"target": f"user:{owner.pk}", "monthly_usd": "5"})
        limit.refresh_from_db()
        assert limit.monthly_usd == Decimal("5")
        client.post("/usage/limits", {"target": f"endpoint:{endpoint.pk}", "monthly_usd": "abc"})
        assert not SpendingLimit.objects.filter(endpoint=endpoint).exists()

        control.resume(job)
        job = run_until(job, lambda j: j.is_finished)
        assert (job.status, job.n_succeeded) == (Job.Status.COMPLETED, 10)

        client.post("/usage/limits", {"target": f"endpoint:{endpoint.pk}", "monthly_usd": "0"})
        again = make_job(write, owner, endpoint, 2, start=False)
        Job.start_slices(again.pk)
        again = run_until(again, lambda j: j.status == Job.Status.PAUSED)
        assert "the endpoint" in again.status_reason.lower() and again.n_succeeded == 0
        client.post("/usage/limits", {"target": f"user:{owner.pk}", "monthly_usd": ""})
        assert not SpendingLimit.objects.filter(user=owner).exists()
