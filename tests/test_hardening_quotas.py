"""Quotas (issue 21, item 6): a member's jobs in flight and stored /v1 bytes are bounded, and the duplicate and
retry of a big job run in a worker, not the request (a million-row copy held the request and SQLite's write lock).
Over HTTP: the dashboard through Django's client, /v1 through the official SDK against a live server."""

import time

import openai
import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from jobs.models import Item, Job, control, ledger
from tests.factories import api_headers, chat_line, jsonl, make_endpoint, make_job

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def no_workers(monkeypatch):
    """Tasks are recorded, not run: what a request enqueues is what is checked."""
    queued = []
    monkeypatch.setattr("jobs.queue.async_task", lambda *a, **k: queued.append(a))
    monkeypatch.setattr("jobs.queue.send_notifications_on_commit", lambda *a, **k: None)
    return queued


def test_a_member_at_the_jobs_in_flight_limit_cannot_launch_duplicate_or_submit_more(
    client, owner, write, settings, no_workers, live_server
):
    settings.BATCHSITE_MAX_ACTIVE_JOBS = 2
    endpoint = make_endpoint("http://127.0.0.1:9/v1")
    first, second = (make_job(write, owner, endpoint, 2) for _ in range(2))
    assert {first.status, second.status} == {Job.Status.QUEUED}
    client.force_login(owner)

    response = client.post(f"/jobs/{first.pk}/duplicate", follow=True)
    assert "2 jobs in flight" in response.content.decode() and Job.objects.count() == 2

    url = client.post("/jobs/new/", {"file": SimpleUploadedFile("in.jsonl", jsonl([chat_line("a")]))}).url
    response = client.post(url, {"endpoint": endpoint.pk, "max_attempts": 5, "action": "launch", "mode": "live"})
    assert response.status_code == 302
    page = client.get(response.url).content.decode()
    assert "BATCHSITE_MAX_ACTIVE_JOBS is 2" in page and Job.objects.count() == 2

    sdk = openai.OpenAI(
        api_key=api_headers(owner)["Authorization"].split()[1], base_url=f"{live_server.url}/v1", max_retries=0
    )
    file = sdk.files.create(file=("in.jsonl", jsonl([chat_line("a")])), purpose="batch")
    with pytest.raises(openai.RateLimitError) as refused:
        sdk.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert refused.value.code == "too_many_active_batches" and Job.objects.count() == 2

    control.pause(first)  # paused jobs are not in flight: room for one more
    assert client.post(f"/jobs/{second.pk}/duplicate").status_code == 302 and Job.objects.count() == 3


def test_a_member_cannot_store_more_than_their_share_of_v1_files(owner, settings, live_server):
    settings.BATCHSITE_MAX_STORED_MB = 1
    sdk = openai.OpenAI(
        api_key=api_headers(owner)["Authorization"].split()[1], base_url=f"{live_server.url}/v1", max_retries=0
    )
    line = chat_line("a", "x" * 1000)
    kept = sdk.files.create(file=("a.jsonl", jsonl([line] * 600)), purpose="batch")  # ~0.6 MB
    with pytest.raises(openai.BadRequestError) as refused:
        sdk.files.create(file=("b.jsonl", jsonl([line] * 600)), purpose="batch")
    assert refused.value.code == "storage_limit_exceeded" and "BATCHSITE_MAX_STORED_MB" in str(refused.value)
    assert [f.id for f in sdk.files.list()] == [kept.id]  # the refused one was not kept
    sdk.files.delete(kept.id)
    sdk.files.create(file=("b.jsonl", jsonl([line] * 600)), purpose="batch")  # room again


def test_a_big_duplicate_is_made_by_a_worker_and_the_request_answers_at_once(client, owner, write, no_workers):
    from jobs.engine import tasks
    from jobs.models.job import INLINE_ROWS

    job = make_job(write, owner, make_endpoint("http://127.0.0.1:9/v1"), INLINE_ROWS + 1, start=False)
    client.force_login(owner)
    started = time.thread_time()
    response = client.post(f"/jobs/{job.pk}/duplicate", follow=True)
    took = time.thread_time() - started
    copy = Job.objects.exclude(pk=job.pk).get()
    assert copy.status == Job.Status.VALIDATING and not copy.items.exists()  # nothing copied in the request
    assert "a worker is reading its 5,001 requests again" in response.content.decode()
    assert took < 0.5, took
    validate = [a for a in no_workers if a[0] == "jobs.engine.tasks.validate_batch"]
    assert validate == [("jobs.engine.tasks.validate_batch", copy.pk)]

    tasks.validate_batch(copy.pk)  # what the worker does
    copy.refresh_from_db()
    assert copy.status == Job.Status.QUEUED and copy.total == copy.n_pending == INLINE_ROWS + 1
    assert list(copy.items.order_by("line").values_list("custom_id", "body")[:3]) == list(
        job.items.order_by("line").values_list("custom_id", "body")[:3]
    )


def test_a_small_duplicate_is_made_at_once(client, owner, write, no_workers):
    job = make_job(write, owner, make_endpoint("http://127.0.0.1:9/v1"), 3, start=False)
    client.force_login(owner)
    client.post(f"/jobs/{job.pk}/duplicate")
    copy = Job.objects.exclude(pk=job.pk).get()
    assert copy.status == Job.Status.QUEUED and copy.items.count() == copy.n_pending == 3


def test_retrying_many_failed_items_is_done_by_a_worker(client, owner, write, no_workers):
    from jobs.engine import tasks
    from jobs.models.job import INLINE_ROWS

    n = INLINE_ROWS + 10
    job = make_job(write, owner, make_endpoint("http://127.0.0.1:9/v1"), n, start=False)
    job.items.update(status=Item.Status.FAILED, error_code="http_500")
    ledger.recount(job)
    Job.objects.filter(pk=job.pk).update(status=Job.Status.COMPLETED)
    client.force_login(owner)
    response = client.post(f"/jobs/{job.pk}/retry", follow=True)
    assert "being queued again" in response.content.decode()
    assert job.items.filter(status=Item.Status.FAILED).count() == n  # not in the request
    assert ("jobs.engine.tasks.retry_failed", job.pk, None) in no_workers

    assert tasks.retry_failed(job.pk) == {"job": job.pk, "retried": n}
    job.refresh_from_db()
    assert job.status == Job.Status.QUEUED and job.n_pending == n and job.n_failed == 0
