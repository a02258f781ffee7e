"""POST /v1/batches answers before the file is validated: a worker validates it and creates the items (then the
batch moves on), or fails the batch with its line errors; cancels, crashes and lost tasks on the way."""

import time
from datetime import timedelta

import openai
import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.utils import timezone

from jobs.engine import tasks
from jobs.engine.tasks import sweep, validate_batch
from jobs.ingest import VALIDATION_QUIET
from jobs.models import ApiToken, Item, Job, control
from jobs.queue import SLICE as SLICE_TASK
from jobs.queue import VALIDATE_BATCH as VALIDATE_TASK
from tests.factories import api_headers, chat_line, jsonl, make_endpoint
from tests.servers import wait_until

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("data_dir")]

GOOD = jsonl([chat_line(f"req-{i}", f"Q{i}") for i in range(4)])
BAD = jsonl([chat_line("a")]) + b'{"custom_id": "b",\n' + jsonl([chat_line("a"), chat_line("c", model="")])


@pytest.fixture(autouse=True)
def off_the_request_path(settings):
    settings.BATCHSITE_INLINE_VALIDATION_BYTES = -1  # every file, however small, goes to a worker here


@pytest.fixture
def endpoint():
    return make_endpoint("http://127.0.0.1:9/v1")  # never called: no slice runs here


@pytest.fixture
def headers(owner):
    return api_headers(owner)


@pytest.fixture
def worker(monkeypatch):
    """async_task as a cluster would take it, here and now: validations run, the rest (slices) is listed."""
    enqueued = []

    def run(func, *args, **options):
        if func == "jobs.engine.tasks.send_notifications":
            return  # an ended job's email and webhooks: not what these tests look at
        enqueued.append((func, args))
        if func == VALIDATE_TASK:
            validate_batch(*args)

    monkeypatch.setattr("jobs.queue.async_task", run)
    return enqueued


def submit(client, headers, content: bytes) -> dict:
    upload = client.post(
        "/v1/files", {"file": SimpleUploadedFile("in.jsonl", content), "purpose": "batch"}, headers=headers
    )
    body = {"input_file_id": upload.json()["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    response = client.post("/v1/batches", body, content_type="application/json", headers=headers)
    assert response.status_code == 200, response.content
    return response.json()


def poll(client, headers, batch: dict) -> dict:
    return client.get(f"/v1/batches/{batch['id']}", headers=headers).json()


def test_create_reads_nothing_and_leaves_validation_to_a_worker(
    client, headers, endpoint, worker, monkeypatch, django_capture_on_commit_callbacks
):
    def no_reading(*args, **kwargs):
        raise AssertionError("the file was read inside the request")

    with monkeypatch.context() as m, django_capture_on_commit_callbacks() as at_commit:
        m.setattr("jobs.ingest.validate", no_reading)
        batch = submit(client, headers, GOOD)
    job = Job.objects.get()
    assert (batch["status"], job.status, job.total, job.items.count()) == ("validating", "validating", 0, 0)
    assert worker == []  # enqueued once the request's transaction commits

    with django_capture_on_commit_callbacks(execute=True):
        for callback in at_commit:  # the commit: the validation is enqueued, and a worker runs it
            callback()
    job.refresh_from_db()
    assert (job.status, job.total, job.n_pending, job.model) == (Job.Status.QUEUED, 4, 4, "gpt-4o-mini")
    assert list(job.items.values_list("custom_id", flat=True)) == [f"req-{i}" for i in range(4)]
    assert worker[0][0] == VALIDATE_TASK and {func for func, _ in worker[1:]} == {SLICE_TASK}  # validated, started
    assert poll(client, headers, batch)["request_counts"]["total"] == 4


def test_file_with_errors_ends_failed_with_its_lines(
    client, owner, headers, endpoint, worker, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True):
        batch = submit(client, headers, BAD)
    assert batch["status"] == "validating" and batch["errors"] is None
    failed = poll(client, headers, batch)
    assert failed["status"] == "failed" and failed["failed_at"] and failed["in_progress_at"] is None
    assert [(e["line"], e["code"]) for e in failed["errors"]["data"]] == [
        (2, "invalid_json_line"),
        (3, "duplicate_custom_id"),
        (4, "missing_model"),
    ]
    assert failed["request_counts"] == {"total": 0, "completed": 0, "failed": 0}
    job = Job.objects.get()
    assert (job.status, job.items.count(), job.owner) == (Job.Status.FAILED, 0, owner)
    assert job.status_reason.startswith("The input file has 3 errors: Line 2 is not valid JSON")
    assert [func for func, _ in worker] == [VALIDATE_TASK]  # nothing started


def test_more_errors_than_are_listed_are_counted(client, headers, endpoint, worker, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        batch = submit(client, headers, b"not json\n" * 150)
    data = poll(client, headers, batch)["errors"]["data"]
    assert len(data) == 101 and data[-1] == {
        "code": "too_many_errors",
        "line": None,
        "param": None,
        "message": "50 more errors are not listed.",
    }


def test_cancel_while_validating_ends_cancelled_and_the_validation_does_nothing(client, headers, endpoint):
    batch = submit(client, headers, GOOD)  # its validation is enqueued at commit, which never comes here
    cancelled = client.post(f"/v1/batches/{batch['id']}/cancel", headers=headers).json()
    assert cancelled["status"] == "cancelled" and cancelled["cancelling_at"] and cancelled["cancelled_at"]
    assert cancelled["request_counts"] == {"total": 0, "completed": 0, "failed": 0}
    assert cancelled["output_file_id"] is None and cancelled["error_file_id"] is None
    assert validate_batch(cancelled["batchsite"]["job_id"])["skipped"]
    job = Job.objects.get()
    assert (job.status, job.total, job.items.count()) == (Job.Status.CANCELLED, 0, 0)


def test_cancel_while_the_file_is_read_stops_the_reading(client, headers, endpoint, monkeypatch):
    batch = submit(client, headers, jsonl([chat_line(f"req-{i}") for i in range(10)]))
    monkeypatch.setattr("jobs.ingest.plan.PROGRESS_EVERY", 3)
    read = []
    real_validate = tasks.ingest.validate

    def cancelled_on_the_way(*args, progress, **kwargs):
        def cancel_then_report(count):
            read.append(count)
            control.cancel(Job.objects.get())
            progress(count)

        return real_validate(*args, progress=cancel_then_report, **kwargs)

    monkeypatch.setattr("jobs.ingest.validating.validate", cancelled_on_the_way)
    assert validate_batch(batch["batchsite"]["job_id"]) == {
        "job": batch["batchsite"]["job_id"],
        "skipped": "cancelled while validating",
    }
    assert read == [3]  # it stopped at its first look
    assert poll(client, headers, batch)["status"] == "cancelled" and not Item.objects.exists()


def test_a_crash_while_writing_items_leaves_none_and_a_later_run_writes_them_all(
    client, headers, endpoint, monkeypatch
):
    batch = submit(client, headers, jsonl([chat_line(f"req-{i}") for i in range(12)]))
    job_id = batch["batchsite"]["job_id"]
    monkeypatch.setattr("jobs.ingest.create.CHUNK", 5)
    real_insert = tasks.ingest.create._insert_items

    def insert_then_die(*args):
        real_insert(*args)
        raise RuntimeError("the worker died")

    monkeypatch.setattr("jobs.ingest.create._insert_items", insert_then_die)
    with pytest.raises(RuntimeError):
        validate_batch(job_id)
    job = Job.objects.get()
    assert (job.status, job.total, job.n_pending, Item.objects.count()) == (Job.Status.VALIDATING, 0, 0, 0)

    monkeypatch.setattr("jobs.ingest.create._insert_items", real_insert)
    assert validate_batch(job_id)["skipped"]  # its heartbeat is fresh: another worker may be on it
    Job.objects.filter(pk=job_id).update(heartbeat_at=timezone.now() - VALIDATION_QUIET - timedelta(seconds=1))
    assert validate_batch(job_id) == {"job": job_id, "requests": 12, "errors": 0, "status": Job.Status.QUEUED}
    job.refresh_from_db()
    assert (job.status, job.total, job.n_pending, job.items.count()) == (Job.Status.QUEUED, 12, 12, 12)


def test_a_second_validation_does_nothing(client, headers, endpoint):
    batch = submit(client, headers, GOOD)
    job_id = batch["batchsite"]["job_id"]
    assert validate_batch(job_id)["status"] == Job.Status.QUEUED
    assert validate_batch(job_id)["skipped"]
    assert Item.objects.count() == 4 and Job.objects.get().total == 4


def test_sweep_enqueues_a_lost_validation_again_once(
    client, headers, endpoint, monkeypatch, django_capture_on_commit_callbacks
):
    enqueued = []
    monkeypatch.setattr("jobs.queue.send_notifications_on_commit", lambda job_id: None)
    monkeypatch.setattr("jobs.queue.async_task", lambda func, *args, **options: enqueued.append((func, args)))
    batch = submit(client, headers, GOOD)  # enqueued at a commit that never comes: as lost as a task can be
    job_id = batch["batchsite"]["job_id"]
    assert sweep()["revalidated"] == [] and enqueued == []  # not quiet for long yet

    long_ago = timezone.now() - VALIDATION_QUIET - timedelta(seconds=1)
    Job.objects.filter(pk=job_id).update(updated_at=long_ago, heartbeat_at=timezone.now())
    assert sweep()["revalidated"] == [] and enqueued == []  # a worker is reading the file

    Job.objects.filter(pk=job_id).update(heartbeat_at=long_ago)  # ... and died
    with django_capture_on_commit_callbacks(execute=True):  # a sweeper runs outside any transaction
        assert sweep()["revalidated"] == [job_id]
    assert enqueued == [(VALIDATE_TASK, (job_id,))]
    assert sweep()["revalidated"] == [] and len(enqueued) == 1  # enqueued once, not at every sweep

    validate_batch(job_id)
    assert Job.objects.get().status == Job.Status.QUEUED and Item.objects.count() == 4


def test_a_validating_job_shows_in_the_dashboard_and_cannot_be_deleted(client, owner, headers, endpoint):
    submit(client, headers, GOOD)
    job = Job.objects.get()
    client.force_login(owner)
    assert "badge-validating" in client.get("/").content.decode()
    assert 'data-status="validating"' in client.get(job.get_absolute_url()).content.decode()
    client.post(f"/jobs/{job.pk}/delete")
    assert Job.objects.filter(pk=job.pk).exists()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_million_lines_are_answered_in_under_a_second_then_run(cluster, web_server, owner, settings):
    """Issue 13's figure, over real HTTP with the official SDK: the id back in under a second, in_progress later."""
    make_endpoint("http://127.0.0.1:9/v1")  # nothing listens: requests fail and retry, the batch stays in progress
    n = 1_000_000
    path = settings.DATA_DIR / "million.jsonl"
    with open(path, "w") as f:
        for i in range(n):
            f.write(
                f'{{"custom_id":"r{i}","method":"POST","url":"/v1/chat/completions",'
                f'"body":{{"model":"gpt-4o-mini","messages":[{{"role":"user","content":"Q{i}"}}]}}}}\n'
            )
    # The servers share the test's data dir (data_dir), not the one its SECRET_KEY came from: they get the key.
    cluster(SECRET_KEY=settings.SECRET_KEY)
    web = web_server(SECRET_KEY=settings.SECRET_KEY)
    client = openai.OpenAI(base_url=web.base_url, api_key=ApiToken.create_for(owner, "1M")[1], max_retries=0)
    upload = client.files.create(file=path.open("rb"), purpose="batch")

    asked = time.monotonic()
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
    answered = time.monotonic() - asked
    assert answered < 1.0 and batch.status == "validating", (answered, batch.status)

    job = Job.objects.get(pk=batch.batchsite["job_id"])

    def validated() -> bool:
        job.refresh_from_db()
        return job.status != Job.Status.VALIDATING

    wait_until(validated, 150, 0.5, "the validation of a million lines")
    validated_in = time.monotonic() - asked
    assert job.total == n and job.status in (Job.Status.QUEUED, Job.Status.RUNNING), (job.status, job.status_reason)
    wait_until(lambda: client.batches.retrieve(batch.id).status == "in_progress", 30, 0.3, "in_progress")
    print(
        f"\n1,000,000 lines: POST /v1/batches answered in {answered * 1000:.0f} ms; validated in {validated_in:.1f} s"
    )
    assert client.batches.retrieve(batch.id).batchsite["status"] == "running"
    assert client.batches.cancel(batch.id).status in ("cancelling", "cancelled")


def test_a_small_file_is_checked_in_the_request(client, headers, endpoint, settings):
    settings.BATCHSITE_INLINE_VALIDATION_BYTES = 2 * 1024 * 1024
    batch = submit(client, headers, jsonl([chat_line("a"), chat_line("b")]))

    job = Job.objects.get(pk=batch["batchsite"]["job_id"])
    assert job.status == Job.Status.QUEUED and job.items.count() == 2  # no worker's turn before its first request
