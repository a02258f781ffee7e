"""Remote and hybrid jobs in the dashboard: the form's mode and deadline, the estimate's Batch API figures,
the chunk table, the retry's mode, and the endpoint's Batch API settings."""

import re
from collections import Counter
from datetime import timedelta
from decimal import Decimal
from types import SimpleNamespace
from unittest import mock
from zoneinfo import ZoneInfo

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from django.utils.dateformat import format as date_format

from jobs.models import Endpoint, Item, Job, RemoteBatch, ledger
from jobs.pricing import PriceBook, estimate
from jobs.queue import POLL_REMOTE as REMOTE_TASK
from tests.factories import chat_line, jsonl, make_endpoint, make_job

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def enqueued():
    """What the pages hand to django-q2: recorded, never run."""
    with mock.patch("jobs.queue.async_task") as async_task:
        yield async_task


@pytest.fixture
def endpoint():
    return make_endpoint("http://127.0.0.1:9/v1", rpm=600, batch_cancel_seconds=600)


def review_url(client, n=30):
    lines = [chat_line(f"r{i}", f"Review {i}: " + "it was fine " * 1000, max_tokens=50) for i in range(n)]
    response = client.post("/jobs/new/", {"file": SimpleUploadedFile("reviews.jsonl", jsonl(lines))})
    assert response.status_code == 302, response.content[:500]
    return response.url


def launch(client, url, endpoint, **fields):
    form = {"name": "Reviews", "endpoint": endpoint.pk, "max_attempts": 5, "action": "launch", **fields}
    return client.post(url, form)


def local_input(when, zone: str) -> str:
    """`when` as a datetime-local input sends it: wall time in `zone`, no offset."""
    return timezone.localtime(when, ZoneInfo(zone)).strftime("%Y-%m-%dT%H:%M")


def test_form_creates_a_hybrid_job_with_its_deadline_in_server_time(
    client, owner, endpoint, data_dir, settings, enqueued, django_capture_on_commit_callbacks
):
    settings.TIME_ZONE = "Europe/Paris"
    client.force_login(owner)
    url = review_url(client)
    deadline = (timezone.now() + timedelta(days=1)).replace(second=0, microsecond=0)
    with django_capture_on_commit_callbacks(execute=True):
        response = launch(client, url, endpoint, mode="hybrid", deadline=local_input(deadline, "Europe/Paris"))
    job = Job.objects.get()
    assert response.status_code == 302 and response.url == f"/jobs/{job.pk}/"
    assert (job.mode, job.deadline, job.total) == (Job.Mode.HYBRID, deadline, 30)
    assert enqueued.call_args.args == (REMOTE_TASK,)  # it starts at the Batch API


def test_remote_job_from_the_form(client, owner, endpoint, data_dir):
    client.force_login(owner)
    launch(client, review_url(client), endpoint, mode="remote")
    job = Job.objects.get()
    assert job.mode == Job.Mode.REMOTE and job.deadline is None


@pytest.mark.parametrize(
    "deadline, message",
    [
        ("", "A hybrid job needs a deadline"),
        ("2020-01-01T09:00", "The deadline has passed"),
        ("tomorrow at nine", "Enter a valid date/time"),
    ],
)
def test_hybrid_without_a_future_deadline_is_refused(client, owner, endpoint, data_dir, deadline, message):
    client.force_login(owner)
    response = launch(client, review_url(client), endpoint, mode="hybrid", deadline=deadline)
    page = response.content.decode()
    assert response.status_code == 200 and "Some settings need fixing" in page
    assert f"<li><strong>Deadline</strong>: {message}" in page
    assert f'<div class="field-error">{message}' in page
    assert not Job.objects.exists()


def test_a_deadline_is_ignored_outside_hybrid_mode(client, owner, endpoint, data_dir):
    client.force_login(owner)
    launch(client, review_url(client), endpoint, mode="live", deadline="not a date")
    job = Job.objects.get()
    assert job.mode == Job.Mode.LIVE and job.deadline is None


def plan(count=30, input_tokens=3000, max_output_tokens=1500, model="gpt-4o-mini"):
    return SimpleNamespace(
        count=count, models=Counter({model: count}), est_input_tokens=input_tokens, max_output_tokens=max_output_tokens
    )


def test_estimate_compares_live_and_batch_api_and_gives_the_earliest_hybrid_deadline(settings):
    settings.BATCHSITE_HYBRID_MARGIN_SECONDS = 60
    now = timezone.now()
    endpoint = Endpoint(name="e", base_url="http://x/v1", concurrency=100, rpm=600, batch_cancel_seconds=600)
    e = estimate(plan(), endpoint, now=now)
    book = PriceBook.load()
    assert e["input_cost"] == book.cost("gpt-4o-mini", 3000, 0) > 0
    assert e["remote_input_cost"] == e["input_cost"] * Decimal("0.5")
    assert e["remote_max_cost"] == book.cost("gpt-4o-mini", 3000, 1500) * Decimal("0.5")
    # 30 requests at 600/min take 3 s live; a cancel settles in up to 600 s; the margin is at least 60 s.
    assert e["live_seconds"] == 3 and e["basis"] == "at 600 requests/min"
    assert e["hybrid_earliest"] == now + timedelta(seconds=3 + 600 + 60)


def test_estimate_uses_what_the_endpoint_learned_and_its_own_discount(settings):
    settings.BATCHSITE_HYBRID_MARGIN_SECONDS = 60
    now = timezone.now()
    endpoint = Endpoint(
        name="e",
        base_url="http://x/v1",
        concurrency=1000,
        learned_tpm=60_000,
        learned_cancel_seconds=30,
        batch_discount=Decimal("0.25"),
    )
    # 10,000 requests of 100 input tokens at 60,000 tokens/min: 1,000 s live, a fifth of that as margin.
    e = estimate(plan(count=10_000, input_tokens=1_000_000, max_output_tokens=0), endpoint, now=now)
    assert e["live_seconds"] == 1000 and e["basis"] == "at 60,000 tokens/min"
    assert e["remote_input_cost"] == e["input_cost"] * Decimal("0.75") and e["remote_max_cost"] is None
    assert e["hybrid_earliest"] == now + timedelta(seconds=1000 + 30 + 200)


def test_estimate_counts_the_most_output_against_a_tokens_per_minute_limit():
    endpoint = Endpoint(name="e", base_url="http://x/v1", concurrency=1000, tpm=60_000)
    # 100 requests of 100 input and at most 500 output tokens: 600 tokens each, 100 a minute.
    e = estimate(plan(count=100, input_tokens=10_000, max_output_tokens=50_000), endpoint)
    assert e["live_seconds"] == 60 and e["basis"] == "at 60,000 tokens/min"


def test_estimate_without_an_endpoint_has_no_time_and_no_batch_api_figures():
    e = estimate(plan(), None)
    assert e["live_seconds"] is None and e["remote_input_cost"] is None and e["hybrid_earliest"] is None
    assert e["input_cost"] > 0


def test_review_page_shows_the_batch_api_cost_and_the_earliest_hybrid_deadline(
    client, owner, endpoint, data_dir, settings
):
    settings.BATCHSITE_HYBRID_MARGIN_SECONDS = 60
    client.force_login(owner)
    url = review_url(client)
    before = timezone.now()
    page = client.get(url).content.decode()
    after = timezone.now()
    input_cost = re.search(r"<dt>Input cost \(est\.\)</dt><dd>\$([\d.]+)</dd>", page).group(1)
    remote_cost = re.search(r"<dt>Input cost at the Batch API \(est\.\)</dt><dd>\$([\d.]+)</dd>", page).group(1)
    assert Decimal(input_cost) > 0 and abs(Decimal(remote_cost) - Decimal(input_cost) / 2) <= Decimal("0.0001")
    assert "50% off the live price" in page and "within 24 hours" in page
    shown = re.search(r'class="hybrid-earliest">([^<]+)</strong>', page).group(1)
    earliest = [date_format(t + timedelta(seconds=3 + 600 + 60), "D j M, H:i") for t in (before, after)]
    assert shown in earliest
    assert "gives the Batch API time to answer part of the file at the discount" in page


@pytest.fixture
def remote_job(owner, endpoint, write):
    job = make_job(write, owner, endpoint, 20, start=False)
    Job.objects.filter(pk=job.pk).update(mode=Job.Mode.REMOTE, status=Job.Status.RUNNING)
    now = timezone.now()
    RemoteBatch.objects.create(
        job=job,
        number=1,
        n_items=10,
        n_completed=4,
        n_failed=1,
        status=RemoteBatch.Status.IN_PROGRESS,
        status_since=now - timedelta(minutes=5),
        batch_id="batch_abc123",
    )
    RemoteBatch.objects.create(
        job=job,
        number=2,
        n_items=10,
        status=RemoteBatch.Status.FAILED,
        status_since=now - timedelta(hours=2),
        batch_id="batch_def456",
        last_error="<img src=x onerror=alert(1)>",
        errors=[{"line": 3, "code": "invalid_request", "message": "<script>alert('chunk')</script>"}],
    )
    job.refresh_from_db()
    return job


def test_job_page_shows_the_chunks_and_escapes_their_errors(client, teammate, remote_job):
    client.force_login(teammate)
    for url in (f"/jobs/{remote_job.pk}/", f"/jobs/{remote_job.pk}/progress"):
        page = client.get(url, HTTP_HX_REQUEST="true").content.decode()
        assert 'class="table compact chunks"' in page, url
        assert "batch_abc123" in page and "batch_def456" in page
        assert 'data-status="in_progress">in progress<' in page and 'data-status="failed">failed<' in page
        assert "5\xa0minutes" in page and "2\xa0hours" in page  # how long in that status
        assert '<td class="num">4</td>' in page and '<td class="num">10</td>' in page
        assert "Chunk 2 was refused by the endpoint's validation" in page
        assert "<script>alert" not in page and "&lt;script&gt;alert(&#x27;chunk&#x27;)&lt;/script&gt;" in page
        assert "<img src=x" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page
        assert ">Batch API</span>" in page  # the mode


def test_progress_poll_reads_the_chunks_in_one_query(client, owner, remote_job):
    client.force_login(owner)
    url = f"/jobs/{remote_job.pk}/progress"
    client.get(url, HTTP_HX_REQUEST="true")  # the chart and errors by kind are reused from here on
    with CaptureQueriesContext(connection) as queries:
        client.get(url, HTTP_HX_REQUEST="true")
    assert len([q for q in queries if "jobs_remotebatch" in q["sql"]]) == 1
    assert len(queries) <= 4, [q["sql"][:100] for q in queries]  # session, user, job, chunks


def test_hybrid_job_page_shows_the_deadline_and_the_planned_switch(client, owner, remote_job, settings):
    settings.TIME_ZONE = "UTC"
    deadline = timezone.now().replace(microsecond=0) + timedelta(hours=3)
    Job.objects.filter(pk=remote_job.pk).update(
        mode=Job.Mode.HYBRID,
        deadline=deadline,
        switch_at=deadline - timedelta(minutes=40),
        switch_note="7 requests left take <b>25 min</b> live.",
    )
    client.force_login(owner)
    page = client.get(f"/jobs/{remote_job.pk}/").content.decode()
    assert f"Deadline <strong>{deadline:%a %-d %b, %H:%M} UTC</strong>" in page
    assert f"Switches to live at <strong>{deadline - timedelta(minutes=40):%a %-d %b, %H:%M} UTC</strong>" in page
    assert "7 requests left take &lt;b&gt;25 min&lt;/b&gt; live." in page
    switched = deadline - timedelta(minutes=35)
    Job.objects.filter(pk=remote_job.pk).update(switched_at=switched)
    page = client.get(f"/jobs/{remote_job.pk}/progress").content.decode()
    assert f"Switched to live at <strong>{switched:%a %-d %b, %H:%M:%S} UTC</strong>" in page
    assert "Switches to live at" not in page


def finish_with_failures(job, n=3):
    Item.objects.filter(job=job, line__lte=n).update(status=Item.Status.EXPIRED, error_code="batch_expired")
    Item.objects.filter(job=job, line__gt=n).update(status=Item.Status.SUCCEEDED)
    ledger.recount(job)
    Job.objects.filter(pk=job.pk).update(status=Job.Status.COMPLETED, finished_at=timezone.now())
    job.refresh_from_db()


def test_retry_of_a_finished_remote_job_offers_both_modes_and_runs_live(client, owner, remote_job, enqueued):
    finish_with_failures(remote_job)
    client.force_login(owner)
    page = client.get(f"/jobs/{remote_job.pk}/").content.decode()
    assert 'name="mode" value="remote">Retry 3 failed at the Batch API' in page
    assert 'name="mode" value="live">Retry 3 failed live' in page
    response = client.post(f"/jobs/{remote_job.pk}/retry", {"mode": "live"}, follow=True)
    assert "3 failed items are queued again to run live." in response.content.decode()
    remote_job.refresh_from_db()
    assert (remote_job.mode, remote_job.status, remote_job.n_pending) == (Job.Mode.LIVE, Job.Status.QUEUED, 3)


def test_retry_at_the_batch_api_keeps_the_remote_mode(client, owner, remote_job):
    finish_with_failures(remote_job)
    client.force_login(owner)
    client.post(f"/jobs/{remote_job.pk}/retry", {"mode": "remote"})
    remote_job.refresh_from_db()
    assert (remote_job.mode, remote_job.n_pending, remote_job.n_expired) == (Job.Mode.REMOTE, 3, 0)


def test_retry_with_an_unknown_mode_is_refused(client, owner, remote_job):
    finish_with_failures(remote_job)
    client.force_login(owner)
    assert client.post(f"/jobs/{remote_job.pk}/retry", {"mode": "carrier-pigeon"}).status_code == 400
    remote_job.refresh_from_db()
    assert (remote_job.mode, remote_job.n_expired) == (Job.Mode.REMOTE, 3)


def test_teammate_cannot_retry_anothers_job(client, teammate, remote_job):
    finish_with_failures(remote_job)
    client.force_login(teammate)
    assert client.post(f"/jobs/{remote_job.pk}/retry", {"mode": "live"}).status_code == 403
    assert Job.objects.get(pk=remote_job.pk).mode == Job.Mode.REMOTE


@pytest.mark.parametrize(
    "method, url", [("get", "/jobs/{job}/"), ("get", "/jobs/{job}/progress"), ("post", "/jobs/{job}/retry")]
)
def test_anonymous_is_sent_to_sign_in(client, remote_job, method, url):
    response = getattr(client, method)(url.format(job=remote_job.pk), {"mode": "live"} if method == "post" else {})
    assert response.status_code == 302 and response.url.startswith("/login/")


def test_job_list_shows_the_mode(client, owner, remote_job, endpoint, write):
    make_job(write, owner, endpoint, 1, start=False)  # a live one: no badge
    client.force_login(owner)
    page = client.get("/").content.decode()
    assert page.count('class="badge badge-mode"') == 1 and ">Batch API</span>" in page


def test_staff_sets_the_batch_api_limits_of_an_endpoint(client, staff):
    client.force_login(staff)
    page = client.get("/endpoints/new/").content.decode()
    assert "Batch API" in page and "0.5 is half price" in page and "Enqueued tokens per model" in page
    form = {"name": "OpenAI", "base_url": "http://127.0.0.1:9/v1", "concurrency": 50}
    batch = {
        "batch_max_requests": 1000,
        "batch_token_limit": 2_000_000,
        "batch_discount": "0.4",
        "batch_cancel_seconds": 120,
    }
    response = client.post("/endpoints/new/", {**form, **batch, "batch_max_bytes": ""})
    assert response.status_code == 302, response.content.decode()[:2000]
    endpoint = Endpoint.objects.get(name="OpenAI")
    assert (endpoint.batch_max_requests, endpoint.batch_token_limit, endpoint.batch_cancel_seconds) == (
        1000,
        2_000_000,
        120,
    )
    assert endpoint.batch_discount == Decimal("0.4") and endpoint.batch_max_bytes == 200 * 1024 * 1024  # empty: default
    client.post(f"/endpoints/{endpoint.pk}/", {**form, "concurrency": 10})  # not sent: kept as stored
    endpoint.refresh_from_db()
    assert (endpoint.concurrency, endpoint.batch_max_requests, endpoint.batch_discount) == (10, 1000, Decimal("0.4"))


@pytest.mark.parametrize(
    "field, value", [("batch_discount", "1.5"), ("batch_discount", "-0.1"), ("batch_max_requests", "0")]
)
def test_endpoint_batch_settings_out_of_range_are_refused(client, staff, field, value):
    client.force_login(staff)
    form = {"name": "OpenAI", "base_url": "http://127.0.0.1:9/v1", "concurrency": 50, field: value}
    response = client.post("/endpoints/new/", form)
    assert response.status_code == 200 and 'class="field-error"' in response.content.decode()
    assert not Endpoint.objects.filter(name="OpenAI").exists()
