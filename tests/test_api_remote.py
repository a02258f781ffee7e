"""/v1/batches in remote and hybrid modes: metadata picks the mode and deadline; the Batch object follows the job."""

from datetime import UTC, datetime, timedelta

import openai
import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.utils import timezone
from openai.types import Batch as SdkBatch

from jobs.engine.tasks import validate_batch
from jobs.models import ApiToken, Batch, Job
from jobs.queue import POLL_REMOTE as REMOTE_TASK
from jobs.queue import SLICE as SLICE_TASK
from jobs.queue import VALIDATE_BATCH as VALIDATE_TASK
from tests.factories import api_headers, chat_line, jsonl, make_endpoint

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("data_dir")]

UTC_PLUS_2 = timezone.get_fixed_timezone(120)


@pytest.fixture(autouse=True)
def off_the_request_path(settings):
    """These tests follow a batch through its worker-side validation, whatever the file's size."""
    settings.BATCHSITE_INLINE_VALIDATION_BYTES = -1


@pytest.fixture
def endpoint():
    return make_endpoint("http://127.0.0.1:9/v1")  # never called: nothing runs the jobs here


@pytest.fixture
def headers(owner):
    return api_headers(owner)


def submit(client, headers, metadata: dict, content: bytes = b""):
    """POST /v1/batches for a new upload of `content` (3 good requests by default) with `metadata`."""
    content = content or jsonl([chat_line(f"req-{i}") for i in range(3)])
    upload = client.post(
        "/v1/files", {"file": SimpleUploadedFile("in.jsonl", content), "purpose": "batch"}, headers=headers
    )
    body = {
        "input_file_id": upload.json()["id"],
        "endpoint": "/v1/chat/completions",
        "completion_window": "24h",
        "metadata": metadata,
    }
    return client.post("/v1/batches", body, content_type="application/json", headers=headers)


def validated(client, headers, batch: dict) -> dict:
    """The batch once a worker has validated its file (the task run here), as /v1 answers then."""
    validate_batch(batch["batchsite"]["job_id"])
    return client.get(f"/v1/batches/{batch['id']}", headers=headers).json()


def good_batch(client, headers, metadata: dict) -> dict:
    response = submit(client, headers, metadata)
    assert response.status_code == 200, response.content
    return validated(client, headers, response.json())


def in_two_hours() -> datetime:
    return (timezone.now() + timedelta(hours=2)).replace(microsecond=0)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_sdk_asks_for_remote_and_hybrid_through_metadata(web_server, owner, endpoint):
    web = web_server(BATCHSITE_INLINE_VALIDATION_BYTES="-1")  # a worker validates, whatever the size
    client = openai.OpenAI(base_url=web.base_url, api_key=ApiToken.create_for(owner, "sdk")[1], max_retries=0)
    file = client.files.create(file=("in.jsonl", jsonl([chat_line(f"req-{i}") for i in range(3)])), purpose="batch")

    def create(**metadata):
        return client.batches.create(
            input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h", metadata=metadata
        )

    remote = create(batchsite_mode="remote")
    assert remote.status == "validating" and remote.request_counts.total == 0  # no worker validates it here
    assert remote.batchsite["mode"] == "remote" and remote.batchsite["deadline"] is None
    job = Job.objects.get(pk=remote.batchsite["job_id"])
    assert (job.mode, job.deadline, job.status) == (Job.Mode.REMOTE, None, Job.Status.VALIDATING)

    deadline = in_two_hours()
    by_iso = create(batchsite_mode="hybrid", batchsite_deadline=deadline.astimezone(UTC_PLUS_2).isoformat())
    by_unix = create(batchsite_mode="hybrid", batchsite_deadline=str(int(deadline.timestamp())))
    for batch in (by_iso, by_unix):
        assert batch.batchsite["mode"] == "hybrid" and batch.batchsite["deadline"] == int(deadline.timestamp())
        assert batch.batchsite["switch_at"] is None and batch.batchsite["switched_at"] is None
        assert Job.objects.get(pk=batch.batchsite["job_id"]).deadline == deadline
    assert client.batches.retrieve(by_unix.id).to_dict()["batchsite"] == by_unix.batchsite

    with pytest.raises(openai.BadRequestError) as e:
        create(batchsite_mode="hybrid")
    assert e.value.param == "metadata.batchsite_deadline" and "Hybrid mode needs" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        create(batchsite_mode="batch")
    assert e.value.param == "metadata.batchsite_mode" and "live, remote, hybrid" in e.value.message
    assert Job.objects.count() == Batch.objects.count() == 3


def test_default_stays_live(client, headers, endpoint):
    batch = good_batch(client, headers, metadata={"description": "plain"})
    job = Job.objects.get()
    assert (job.mode, job.deadline) == (Job.Mode.LIVE, None)
    assert {key: batch["batchsite"][key] for key in ("mode", "deadline", "switch_at", "switched_at")} == {
        "mode": "live",
        "deadline": None,
        "switch_at": None,
        "switched_at": None,
    }


@pytest.mark.parametrize(
    "metadata, mode, task",
    [
        ({}, Job.Mode.LIVE, SLICE_TASK),
        ({"batchsite_mode": "live"}, Job.Mode.LIVE, SLICE_TASK),
        ({"batchsite_mode": "remote"}, Job.Mode.REMOTE, REMOTE_TASK),
        ({"batchsite_mode": "hybrid", "batchsite_deadline": "2099-01-01T00:00:00Z"}, Job.Mode.HYBRID, REMOTE_TASK),
    ],
)
def test_mode_decides_who_runs_the_job(
    client, headers, endpoint, monkeypatch, django_capture_on_commit_callbacks, metadata, mode, task
):
    enqueued = []
    monkeypatch.setattr("jobs.queue.async_task", lambda func, *args, **options: enqueued.append(func))
    with django_capture_on_commit_callbacks(execute=True):
        batch = good_batch(client, headers, metadata=metadata)  # validated here, as the enqueued task would
    assert Job.objects.get().mode == mode and batch["batchsite"]["mode"] == mode
    assert enqueued[0] == VALIDATE_TASK and set(enqueued[1:]) == {task}


@pytest.mark.parametrize(
    "write_deadline",
    [
        lambda at: at.strftime("%Y-%m-%dT%H:%M:%SZ"),
        lambda at: at.astimezone(UTC).replace(tzinfo=None).isoformat(),  # naive: UTC
        lambda at: at.astimezone(UTC_PLUS_2).isoformat(),
        lambda at: str(int(at.timestamp())),
        lambda at: f"{int(at.timestamp())}.0",
    ],
    ids=["iso-z", "iso-naive", "iso-offset", "unix", "unix-fraction"],
)
def test_hybrid_deadline_as_iso_time_or_unix_seconds(client, headers, endpoint, write_deadline):
    deadline = in_two_hours()
    text = write_deadline(deadline)
    batch = good_batch(client, headers, metadata={"batchsite_mode": "hybrid", "batchsite_deadline": text})
    job = Job.objects.get()
    assert (job.mode, job.deadline) == (Job.Mode.HYBRID, deadline), text
    assert batch["batchsite"]["deadline"] == int(deadline.timestamp())
    assert batch["metadata"]["batchsite_deadline"] == text  # metadata comes back as given


@pytest.mark.parametrize(
    "mode, deadline, key, says",
    [
        ("batch", None, "batchsite_mode", "Supported values are: live, remote, hybrid"),
        ("Remote", None, "batchsite_mode", "Supported values"),
        ("hybrid", None, "batchsite_deadline", "Hybrid mode needs"),
        ("hybrid", "", "batchsite_deadline", "Hybrid mode needs"),
        ("hybrid", "tomorrow 9am", "batchsite_deadline", "ISO 8601"),
        ("hybrid", "9" * 30, "batchsite_deadline", "ISO 8601"),  # beyond the year 9999
        ("hybrid", "-5", "batchsite_deadline", "ISO 8601"),
        ("hybrid", "2020-01-01T00:00:00", "batchsite_deadline", "2020-01-01 00:00:00 UTC, which has passed"),
        ("hybrid", "1577836800", "batchsite_deadline", "2020-01-01 00:00:00 UTC, which has passed"),
        ("remote", "2099-01-01", "batchsite_deadline", "hybrid mode only"),
        (None, "2099-01-01", "batchsite_deadline", "mode is 'live'"),
    ],
)
def test_bad_mode_or_deadline_is_a_400_that_creates_nothing(client, headers, endpoint, mode, deadline, key, says):
    asked = {"batchsite_mode": mode, "batchsite_deadline": deadline}
    response = submit(client, headers, {k: v for k, v in asked.items() if v is not None})
    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert (error["param"], error["type"]) == (f"metadata.{key}", "invalid_request_error")
    assert says in error["message"], error["message"]
    assert not Job.objects.exists() and not Batch.objects.exists()


def test_a_rejected_file_keeps_the_mode_it_asked_for(client, headers, endpoint):
    deadline = in_two_hours()
    metadata = {"batchsite_mode": "hybrid", "batchsite_deadline": deadline.isoformat()}
    batch = validated(client, headers, submit(client, headers, metadata, content=b"not json\n").json())
    assert batch["status"] == "failed" and batch["batchsite"]["mode"] == "hybrid"
    assert batch["batchsite"]["deadline"] == int(deadline.timestamp())


def test_request_counts_include_what_remote_batches_report(client, headers, endpoint):
    batch = good_batch(client, headers, metadata={"batchsite_mode": "remote"})
    # 3 requests: one joined (succeeded), the endpoint reports one more completed and one failed.
    Job.objects.update(
        status=Job.Status.RUNNING, started_at=timezone.now(), n_succeeded=1, remote_completed=1, remote_failed=1
    )
    polled = client.get(f"/v1/batches/{batch['id']}", headers=headers).json()
    SdkBatch.model_validate(polled)
    assert polled["status"] == "in_progress"
    assert polled["request_counts"] == {"total": 3, "completed": 2, "failed": 1}
    listed = client.get("/v1/batches", headers=headers).json()["data"]
    assert listed[0]["request_counts"] == polled["request_counts"]


def test_hybrid_batch_shows_its_planned_and_actual_switch(client, headers, endpoint):
    deadline = in_two_hours()
    batch = good_batch(
        client, headers, metadata={"batchsite_mode": "hybrid", "batchsite_deadline": deadline.isoformat()}
    )
    switch_at = deadline - timedelta(minutes=40)
    Job.objects.update(status=Job.Status.RUNNING, started_at=timezone.now(), switch_at=switch_at, switch_note="why")
    polled = client.get(f"/v1/batches/{batch['id']}", headers=headers).json()["batchsite"]
    assert (polled["switch_at"], polled["switched_at"]) == (int(switch_at.timestamp()), None)
    Job.objects.update(switched_at=switch_at)
    polled = client.get(f"/v1/batches/{batch['id']}", headers=headers).json()["batchsite"]
    assert polled["switched_at"] == int(switch_at.timestamp()) and polled["deadline"] == int(deadline.timestamp())


def test_polling_a_hybrid_batch_loads_its_fields_with_the_job(client, headers, endpoint, django_assert_num_queries):
    batch = good_batch(client, headers, metadata={"batchsite_mode": "hybrid", "batchsite_deadline": "2099-01-01"})
    Job.objects.update(switch_at=timezone.now(), switched_at=timezone.now(), remote_completed=1)
    # The token, the batch and the job: a field the raw query left out would cost one more.
    with django_assert_num_queries(3):
        polled = client.get(f"/v1/batches/{batch['id']}", headers=headers).json()
    assert polled["batchsite"]["switched_at"] and polled["request_counts"]["completed"] == 1
