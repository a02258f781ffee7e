"""/v1/batches with Django's test client: create, validation, status mapping, files, cancel, lists, scoping."""

import json
from datetime import timedelta

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.utils import timezone
from openai.types import Batch as SdkBatch
from openai.types import FileObject

from jobs import export
from jobs.engine.tasks import validate_batch
from jobs.models import Batch, Endpoint, File, Item, Job, control, ledger
from tests.factories import api_headers, chat_line, jsonl, make_endpoint

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("data_dir")]


@pytest.fixture(autouse=True)
def off_the_request_path(settings):
    """These tests follow a batch through its worker-side validation, whatever the file's size."""
    settings.BATCHSITE_INLINE_VALIDATION_BYTES = -1


@pytest.fixture
def endpoint():
    return make_endpoint("http://127.0.0.1:9/v1")


@pytest.fixture
def headers(owner):
    return api_headers(owner)


def upload(client, headers, content: bytes) -> str:
    response = client.post(
        "/v1/files", {"file": SimpleUploadedFile("in.jsonl", content), "purpose": "batch"}, headers=headers
    )
    assert response.status_code == 200, response.content
    return response.json()["id"]


def create(client, headers, file_id, **fields):
    body = {"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h", **fields}
    return client.post("/v1/batches", body, content_type="application/json", headers=headers)


def validated(client, headers, batch: dict) -> dict:
    """The batch once a worker has validated its file (the task run here), as /v1 answers then."""
    validate_batch(batch["batchsite"]["job_id"])
    return client.get(f"/v1/batches/{batch['id']}", headers=headers).json()


def good_batch(client, headers, n=3, **fields) -> dict:
    """A batch of `n` good requests, validated."""
    response = create(
        client, headers, upload(client, headers, jsonl([chat_line(f"req-{i}", f"Q{i}") for i in range(n)])), **fields
    )
    assert response.status_code == 200, response.content
    return validated(client, headers, response.json())


def answer(text: str) -> str:
    return json.dumps(
        {
            "id": "c",
            "object": "chat.completion",
            "created": 1,
            "model": "gpt-4o-mini",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
        }
    )


def run_to_the_end(job: Job, failed=()) -> Job:
    """What the engine would leave behind: every item answered (or failed with a 400), the job completed."""
    for item in job.items.all():
        if item.custom_id in failed:
            Item.objects.filter(pk=item.pk).update(
                status=Item.Status.FAILED,
                http_status=400,
                error_code="http_400",
                response='{"error":{"message":"bad","type":"invalid_request_error"}}',
            )
        else:
            Item.objects.filter(pk=item.pk).update(
                status=Item.Status.SUCCEEDED,
                http_status=200,
                response=answer(f"A {item.custom_id}"),
                prompt_tokens=5,
                completion_tokens=2,
            )
    ledger.recount(job)
    now = timezone.now()
    Job.objects.filter(pk=job.pk).update(
        status=Job.Status.COMPLETED, started_at=now - timedelta(seconds=5), finished_at=now
    )
    job.refresh_from_db()
    return job


def test_create_makes_a_job_of_the_tokens_user_and_an_openai_batch(client, owner, headers, endpoint):
    lines = jsonl([chat_line(f"req-{i}", f"Q{i}") for i in range(3)])
    metadata = {"description": "nightly eval", "team": "search"}
    batch = create(client, headers, upload(client, headers, lines), metadata=metadata).json()
    SdkBatch.model_validate(batch)  # every field the SDK requires, with the right types
    assert batch["id"].startswith("batch_") and batch["object"] == "batch"
    assert batch["status"] == "validating" and batch["endpoint"] == "/v1/chat/completions"
    assert batch["completion_window"] == "24h" and batch["model"] is None  # known once the file is read
    assert batch["request_counts"] == {"total": 0, "completed": 0, "failed": 0}
    assert batch["expires_at"] == batch["created_at"] + 86400
    assert batch["output_file_id"] is None and batch["error_file_id"] is None and batch["errors"] is None
    assert batch["metadata"] == {"description": "nightly eval", "team": "search"}
    job = Job.objects.get()
    assert (job.owner, job.endpoint, job.name, job.total, job.status) == (
        owner,
        endpoint,
        "nightly eval",
        0,
        Job.Status.VALIDATING,
    )
    assert batch["batchsite"] == {
        "job_id": job.pk,
        "status": "validating",
        "status_reason": "",
        "url": f"http://testserver/jobs/{job.pk}/",
        "mode": "live",
        "deadline": None,
        "switch_at": None,
        "switched_at": None,
    }
    assert job.batch.public_id == batch["id"] and job.batch.input_file.public_id == batch["input_file_id"]
    assert client.get(f"/v1/batches/{batch['id']}", headers=headers).json() == batch

    batch = validated(client, headers, batch)
    SdkBatch.model_validate(batch)
    # Validated, and waiting for its first worker: still `validating` to OpenAI's clients.
    assert (batch["status"], batch["batchsite"]["status"], batch["model"]) == ("validating", "queued", "gpt-4o-mini")
    assert batch["request_counts"] == {"total": 3, "completed": 0, "failed": 0}
    job.refresh_from_db()
    assert (job.total, job.n_pending, job.status) == (3, 3, Job.Status.QUEUED) and job.est_input_tokens > 0
    assert list(job.items.values_list("custom_id", flat=True)) == ["req-0", "req-1", "req-2"]


def test_metadata_picks_an_endpoint_by_name(client, headers, endpoint):
    other = Endpoint.objects.create(name="vllm", base_url="http://127.0.0.1:10/v1")
    good_batch(client, headers, metadata={"batchsite_endpoint": other.name})
    assert Job.objects.get().endpoint == other
    response = create(
        client, headers, upload(client, headers, jsonl([chat_line("a")])), metadata={"batchsite_endpoint": "nope"}
    )
    assert response.status_code == 400 and response.json()["error"]["param"] == "metadata.batchsite_endpoint"


def test_invalid_file_gives_a_failed_batch_with_line_numbers(client, owner, headers, endpoint):
    lines = (
        jsonl([chat_line("a")])
        + b'{"custom_id": "b",\n'
        + jsonl([chat_line("a"), {**chat_line("c"), "url": "/v1/embeddings"}])
    )
    response = create(client, headers, upload(client, headers, lines))
    assert response.status_code == 200 and response.json()["status"] == "validating"
    batch = validated(client, headers, response.json())
    SdkBatch.model_validate(batch)
    assert batch["status"] == "failed" and batch["failed_at"] and batch["in_progress_at"] is None
    errors = batch["errors"]
    assert errors["object"] == "list"
    assert [(e["line"], e["code"]) for e in errors["data"]] == [
        (2, "invalid_json_line"),
        (3, "duplicate_custom_id"),
        (4, "mismatched_url"),
    ]
    assert all(e["message"] and "param" in e for e in errors["data"])
    assert batch["request_counts"] == {"total": 0, "completed": 0, "failed": 0}
    assert batch["output_file_id"] is None and batch["error_file_id"] is None
    job = Job.objects.get()  # the team sees the rejected batch in the dashboard
    assert (job.status, job.total, job.owner, len(job.errors)) == (Job.Status.FAILED, 0, owner, 3)
    assert "3 errors" in job.status_reason and not job.items.exists()
    assert client.post(f"/v1/batches/{batch['id']}/cancel", headers=headers).status_code == 409


def test_empty_file_fails_without_a_line(client, headers, endpoint):
    batch = validated(client, headers, create(client, headers, upload(client, headers, b"\n\n")).json())
    assert batch["status"] == "failed"
    assert [(e["code"], e["line"]) for e in batch["errors"]["data"]] == [("empty_file", None)]


@pytest.mark.parametrize(
    "fields, status, param",
    [
        ({"endpoint": "/v1/moderations"}, 400, "endpoint"),
        ({"endpoint": None}, 400, "endpoint"),
        ({"completion_window": "48h"}, 400, "completion_window"),
        ({"completion_window": None}, 400, "completion_window"),
        ({"input_file_id": None}, 400, "input_file_id"),
        ({"input_file_id": 7}, 400, "input_file_id"),
        ({"input_file_id": "file-unknown"}, 404, "input_file_id"),
        ({"metadata": ["x"]}, 400, "metadata"),
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, 400, "metadata"),
        ({"metadata": {"k": 1}}, 400, "metadata.k"),
        ({"metadata": {"k": "v" * 513}}, 400, "metadata.k"),
    ],
)
def test_create_rejects_bad_parameters(client, headers, endpoint, fields, status, param):
    file_id = upload(client, headers, jsonl([chat_line("a")]))
    body = {"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h", **fields}
    response = client.post(
        "/v1/batches",
        {k: v for k, v in body.items() if v is not None},
        content_type="application/json",
        headers=headers,
    )
    assert response.status_code == status, response.content
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert not Job.objects.exists()


def test_create_rejects_a_body_that_is_not_json(client, headers):
    response = client.post("/v1/batches", "{nope", content_type="application/json", headers=headers)
    assert response.status_code == 400 and "JSON" in response.json()["error"]["message"]


def test_an_output_file_cannot_be_a_batch_input(client, headers, endpoint):
    job = run_to_the_end(Job.objects.get(pk=good_batch(client, headers)["batchsite"]["job_id"]))
    output = File.of_job(job, File.RESULTS)
    response = create(client, headers, output.public_id)
    assert response.status_code == 400 and response.json()["error"]["param"] == "input_file_id"


def test_a_running_job_is_an_in_progress_batch(client, headers, endpoint):
    batch = good_batch(client, headers)
    started = timezone.now()
    Job.objects.update(status=Job.Status.RUNNING, started_at=started)
    running = client.get(f"/v1/batches/{batch['id']}", headers=headers).json()
    assert running["status"] == "in_progress" and running["in_progress_at"] == int(started.timestamp())


def test_a_paused_job_is_an_in_progress_batch_that_says_why(client, headers, endpoint):
    batch = good_batch(client, headers)
    Job.objects.update(status=Job.Status.PAUSED, status_reason="The API account has run out of quota.")
    paused = client.get(f"/v1/batches/{batch['id']}", headers=headers).json()
    assert paused["status"] == "in_progress"
    assert paused["batchsite"]["status"] == "paused" and "quota" in paused["batchsite"]["status_reason"]


@pytest.fixture
def done(client, headers, endpoint):
    """A batch of 4 whose job completed with req-1 failed: (the batch as /v1 answers, the job)."""
    batch = good_batch(client, headers, n=4)
    job = run_to_the_end(Job.objects.get(), failed={"req-1"})
    return client.get(f"/v1/batches/{batch['id']}", headers=headers).json(), job


def test_a_completed_job_is_a_completed_batch_with_counts_and_usage(client, headers, done):
    batch, job = done
    SdkBatch.model_validate(batch)
    assert batch["status"] == "completed"
    assert batch["completed_at"] == batch["finalizing_at"] == int(job.finished_at.timestamp())
    assert batch["request_counts"] == {"total": 4, "completed": 3, "failed": 1}
    assert batch["usage"] == {
        "input_tokens": 15,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": 6,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 21,
    }
    again = client.get(f"/v1/batches/{batch['id']}", headers=headers).json()
    assert again["output_file_id"] == batch["output_file_id"]  # stable


def test_a_completed_batchs_output_file_holds_the_answers(client, headers, done):
    batch, job = done
    output = client.get(f"/v1/files/{batch['output_file_id']}", headers=headers).json()
    FileObject.model_validate(output)
    assert output["purpose"] == "batch_output" and output["filename"] == f"{batch['id']}_output.jsonl"
    content = b"".join(client.get(f"/v1/files/{batch['output_file_id']}/content", headers=headers).streaming_content)
    assert content.decode() == "".join(export.results_jsonl(job)) and len(content) == output["bytes"]
    assert {json.loads(line)["custom_id"] for line in content.splitlines()} == {"req-0", "req-2", "req-3"}


def test_a_completed_batchs_error_file_holds_the_failures(client, headers, done):
    batch, _ = done
    errors = b"".join(client.get(f"/v1/files/{batch['error_file_id']}/content", headers=headers).streaming_content)
    assert [json.loads(line)["response"]["status_code"] for line in errors.splitlines()] == [400]


def test_a_completed_batchs_files_are_listed_as_batch_output(client, headers, done):
    batch, _ = done
    listed = client.get("/v1/files?purpose=batch_output", headers=headers).json()["data"]
    assert {f["id"] for f in listed} == {batch["output_file_id"], batch["error_file_id"]}


def test_a_job_with_no_failures_has_no_error_file(client, headers, endpoint):
    batch = good_batch(client, headers)
    run_to_the_end(Job.objects.get())
    done = client.get(f"/v1/batches/{batch['id']}", headers=headers).json()
    assert done["output_file_id"] and done["error_file_id"] is None


def test_output_file_is_measured_again_after_a_retry(client, headers, endpoint):
    batch = good_batch(client, headers)
    job = run_to_the_end(Job.objects.get(), failed={"req-0"})
    before = client.get(f"/v1/batches/{batch['id']}", headers=headers).json()
    size = client.get(f"/v1/files/{before['output_file_id']}", headers=headers).json()["bytes"]
    control.retry_failed(job)
    assert client.get(f"/v1/batches/{batch['id']}", headers=headers).json()["status"] == "in_progress"
    run_to_the_end(job)
    after = client.get(f"/v1/batches/{batch['id']}", headers=headers).json()
    assert after["output_file_id"] == before["output_file_id"]
    assert client.get(f"/v1/files/{after['output_file_id']}", headers=headers).json()["bytes"] > size


def test_cancel_a_queued_batch(client, headers, endpoint):
    batch = good_batch(client, headers, n=5)
    response = client.post(f"/v1/batches/{batch['id']}/cancel", headers=headers)
    assert response.status_code == 200
    cancelled = response.json()
    SdkBatch.model_validate(cancelled)
    assert cancelled["status"] == "cancelled" and cancelled["cancelling_at"] and cancelled["cancelled_at"]
    assert cancelled["request_counts"] == {"total": 5, "completed": 0, "failed": 0}
    assert cancelled["output_file_id"] is None
    errors = b"".join(client.get(f"/v1/files/{cancelled['error_file_id']}/content", headers=headers).streaming_content)
    assert {json.loads(line)["error"]["code"] for line in errors.splitlines()} == {"batch_cancelled"}
    assert (
        client.post(f"/v1/batches/{batch['id']}/cancel", headers=headers).json()["status"] == "cancelled"
    )  # twice is fine


def test_cancel_a_completed_batch_is_a_conflict_not_retried(client, headers, endpoint):
    batch = good_batch(client, headers)
    run_to_the_end(Job.objects.get())
    response = client.post(f"/v1/batches/{batch['id']}/cancel", headers=headers)
    assert response.status_code == 409 and response["x-should-retry"] == "false"
    assert "completed" in response.json()["error"]["message"]


def test_list_newest_first_with_limit_and_after(client, headers, endpoint):
    ids = [good_batch(client, headers, n=1)["id"] for _ in range(5)][::-1]
    page = client.get("/v1/batches?limit=2", headers=headers).json()
    assert [b["id"] for b in page["data"]] == ids[:2]
    assert (page["object"], page["first_id"], page["last_id"], page["has_more"]) == ("list", ids[0], ids[1], True)
    page = client.get(f"/v1/batches?limit=2&after={ids[1]}", headers=headers).json()
    assert [b["id"] for b in page["data"]] == ids[2:4] and page["has_more"] is True
    page = client.get(f"/v1/batches?limit=2&after={ids[3]}", headers=headers).json()
    assert [b["id"] for b in page["data"]] == ids[4:] and page["has_more"] is False
    assert [b["id"] for b in client.get("/v1/batches", headers=headers).json()["data"]] == ids
    for query in ("limit=0", "limit=101", "limit=x"):
        assert client.get(f"/v1/batches?{query}", headers=headers).status_code == 400
    assert client.get("/v1/batches?after=batch_nope", headers=headers).status_code == 404


def test_list_of_finished_batches_takes_few_queries(client, headers, endpoint, django_assert_max_num_queries):
    for _ in range(4):
        good_batch(client, headers, n=2)
    for job in Job.objects.all():
        run_to_the_end(job)
    client.get("/v1/batches", headers=headers)  # makes the output files
    with django_assert_max_num_queries(6):
        assert len(client.get("/v1/batches", headers=headers).json()["data"]) == 4


@pytest.fixture
def batch(client, headers, endpoint) -> dict:
    return good_batch(client, headers)


@pytest.fixture
def theirs(teammate) -> dict:
    return api_headers(teammate)


def test_teammate_cannot_see_anothers_batch(client, batch, theirs):
    error = client.get(f"/v1/batches/{batch['id']}", headers=theirs)
    assert error.status_code == 404 and error.json()["error"]["message"] == f"No batch found with id '{batch['id']}'."


def test_teammate_cannot_cancel_anothers_batch(client, batch, theirs):
    assert client.post(f"/v1/batches/{batch['id']}/cancel", headers=theirs).status_code == 404
    assert Job.objects.get().status == Job.Status.QUEUED


def test_teammate_lists_only_their_own_batches(client, batch, theirs):
    assert client.get("/v1/batches", headers=theirs).json()["data"] == []


def test_teammate_cannot_read_anothers_input_file(client, batch, theirs):
    assert client.get(f"/v1/files/{batch['input_file_id']}", headers=theirs).status_code == 404


def test_teammate_cannot_start_a_batch_from_anothers_file(client, batch, theirs):
    assert create(client, theirs, batch["input_file_id"]).status_code == 404


def test_staff_sees_and_cancels_anyones_batch(client, batch, staff):
    headers = api_headers(staff)
    assert client.get(f"/v1/batches/{batch['id']}", headers=headers).status_code == 200
    assert client.post(f"/v1/batches/{batch['id']}/cancel", headers=headers).json()["status"] == "cancelled"


def test_staff_lists_only_their_own_batches(client, batch, staff):
    assert client.get("/v1/batches", headers=api_headers(staff)).json()["data"] == []


def test_input_file_deleted_after_create_keeps_the_job_source(client, headers, endpoint):
    batch = good_batch(client, headers)
    file = File.objects.get(public_id=batch["input_file_id"])
    assert client.delete(f"/v1/files/{file.public_id}", headers=headers).status_code == 200
    assert file.full_path.exists()  # the job still names it as its source
    assert client.get(f"/v1/batches/{batch['id']}", headers=headers).json()["input_file_id"] == file.public_id


def test_deleting_the_job_deletes_its_batch_but_not_the_input_file(batch):
    Job.objects.get().delete()
    assert not Batch.objects.exists() and File.objects.count() == 1


def test_deleting_the_user_deletes_their_batches_files_and_jobs(owner, batch):
    owner.delete()
    assert not (Batch.objects.exists() or File.objects.exists() or Job.objects.exists())


def test_listing_batches_exports_no_job(client, headers, endpoint, monkeypatch):
    """Batch objects name their output files without exporting the jobs to measure them; the File object does."""
    for _ in range(5):
        good_batch(client, headers)
    for job in Job.objects.all():
        run_to_the_end(job, failed={"req-1"})
    exports = []
    for name in ("results_jsonl", "errors_jsonl"):
        real = getattr(export, name)
        monkeypatch.setattr(export, name, lambda job, real=real: exports.append(job.pk) or real(job))

    listed = client.get("/v1/batches?limit=100", headers=headers).json()["data"]
    assert len(listed) == 5 and all(b["output_file_id"] and b["error_file_id"] for b in listed)
    assert client.get(f"/v1/batches/{listed[0]['id']}", headers=headers).status_code == 200
    assert exports == []

    output = client.get(f"/v1/files/{listed[0]['output_file_id']}", headers=headers).json()
    content = b"".join(client.get(f"/v1/files/{output['id']}/content", headers=headers).streaming_content)
    assert output["bytes"] == len(content) > 0
    measured = len(exports)
    assert client.get(f"/v1/files/{output['id']}", headers=headers).json()["bytes"] == len(content)
    assert len(exports) == measured  # measured once, then remembered
