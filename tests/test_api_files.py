"""/v1/files with Django's test client: upload, list, retrieve, content, delete, limits, scoping."""

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from jobs.models import File
from tests.factories import api_headers, chat_line, jsonl

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("data_dir")]

FILE_KEYS = {"id", "object", "bytes", "created_at", "filename", "purpose", "status", "expires_at", "status_details"}


def upload(client, headers, content: bytes = b"", name="batchinput.jsonl", purpose="batch"):
    content = content or jsonl([chat_line("a"), chat_line("b")])
    return client.post("/v1/files", {"file": SimpleUploadedFile(name, content), "purpose": purpose}, headers=headers)


def test_upload_returns_an_openai_file_object(client, owner, data_dir):
    content = jsonl([chat_line("a"), chat_line("b", "Grüße")])
    response = upload(client, api_headers(owner), content)
    assert response.status_code == 200, response.content
    obj = response.json()
    assert set(obj) == FILE_KEYS
    assert obj["id"].startswith("file-") and obj["object"] == "file" and obj["status"] == "processed"
    assert (obj["bytes"], obj["filename"], obj["purpose"]) == (len(content), "batchinput.jsonl", "batch")
    file = File.objects.get(public_id=obj["id"])
    assert file.owner == owner and file.full_path.read_bytes() == content
    assert str(file.full_path).startswith(str(data_dir / "uploads"))


def test_retrieve_list_content_and_delete(client, owner, data_dir):
    headers = api_headers(owner)
    content = jsonl([chat_line(f"r{i}") for i in range(3000)])  # bigger than one streamed chunk
    first = upload(client, headers, content, "one.jsonl").json()
    second = upload(client, headers, name="two.jsonl").json()

    assert client.get(f"/v1/files/{first['id']}", headers=headers).json() == first
    listing = client.get("/v1/files", headers=headers).json()
    assert listing["object"] == "list" and [f["id"] for f in listing["data"]] == [second["id"], first["id"]]
    assert listing["has_more"] is False and listing["first_id"] == second["id"] and listing["last_id"] == first["id"]
    assert [f["id"] for f in client.get("/v1/files?order=asc", headers=headers).json()["data"]] == [
        first["id"],
        second["id"],
    ]
    page = client.get("/v1/files?limit=1", headers=headers).json()
    assert [f["id"] for f in page["data"]] == [second["id"]] and page["has_more"] is True
    page = client.get(f"/v1/files?limit=1&after={second['id']}", headers=headers).json()
    assert [f["id"] for f in page["data"]] == [first["id"]] and page["has_more"] is False
    assert client.get("/v1/files?purpose=batch_output", headers=headers).json()["data"] == []

    response = client.get(f"/v1/files/{first['id']}/content", headers=headers)
    assert response.status_code == 200 and response.streaming
    assert b"".join(response.streaming_content) == content

    path = File.objects.get(public_id=first["id"]).full_path
    deleted = client.delete(f"/v1/files/{first['id']}", headers=headers)
    assert deleted.json() == {"id": first["id"], "object": "file", "deleted": True}
    assert not path.exists()
    for url in (f"/v1/files/{first['id']}", f"/v1/files/{first['id']}/content"):
        assert client.get(url, headers=headers).status_code == 404
    assert client.delete(f"/v1/files/{first['id']}", headers=headers).status_code == 404
    assert [f["id"] for f in client.get("/v1/files", headers=headers).json()["data"]] == [second["id"]]


def test_unknown_file_is_openai_404(client, owner):
    response = client.get("/v1/files/file-doesnotexist", headers=api_headers(owner))
    assert response.status_code == 404
    assert response.json()["error"]["message"] == "No such File object: file-doesnotexist"


@pytest.mark.parametrize(
    "data, param, code",
    [
        ({"purpose": "fine-tune"}, "purpose", "invalid_value"),
        ({}, "purpose", "missing_required_parameter"),
        ({"purpose": "batch", "no_file": True}, "file", "missing_required_parameter"),
    ],
)
def test_upload_errors_are_400_with_param(client, owner, data, param, code):
    form = {"file": SimpleUploadedFile("x.jsonl", jsonl([chat_line("a")]))}
    if data.pop("no_file", False):
        form = {}
    response = client.post("/v1/files", {**form, **data}, headers=api_headers(owner))
    assert response.status_code == 400
    assert (response.json()["error"]["param"], response.json()["error"]["code"]) == (param, code)
    assert not File.objects.exists()


def test_upload_over_the_size_limit_is_refused(client, owner, settings, data_dir):
    settings.BATCHSITE_MAX_UPLOAD_MB = 1
    response = upload(client, api_headers(owner), b"x" * (1024 * 1024 + 1))
    assert response.status_code == 413  # stopped while it streamed in (jobs/middleware.py)
    error = response.json()["error"]
    assert error["code"] == "file_too_large" and "1 MB" in error["message"]
    assert not File.objects.exists() and not any((data_dir / "uploads").glob("*"))


def test_files_are_private_to_their_owner_but_staff_may_read(client, owner, teammate, django_user_model):
    mine = upload(client, api_headers(owner)).json()
    theirs = api_headers(teammate)
    assert client.get(f"/v1/files/{mine['id']}", headers=theirs).status_code == 404
    assert client.get(f"/v1/files/{mine['id']}/content", headers=theirs).status_code == 404
    assert client.delete(f"/v1/files/{mine['id']}", headers=theirs).status_code == 404
    assert client.get("/v1/files", headers=theirs).json()["data"] == []
    staff = django_user_model.objects.create_user("boss", is_staff=True)
    assert client.get(f"/v1/files/{mine['id']}", headers=api_headers(staff)).status_code == 200
    assert client.get("/v1/files", headers=api_headers(staff)).json()["data"] == []  # lists stay per user


def test_bad_limit_and_cursor(client, owner):
    headers = api_headers(owner)
    for query in ("limit=0", "limit=abc", "limit=10001", "order=sideways"):
        response = client.get(f"/v1/files?{query}", headers=headers)
        assert response.status_code == 400 and response.json()["error"]["param"] in ("limit", "order")
    assert client.get("/v1/files?after=file-nope", headers=headers).status_code == 404


def test_expires_after_sets_expires_at_and_bad_values_are_refused(client, owner, settings):
    headers = api_headers(owner)
    content = jsonl([chat_line("a")])
    form = {"purpose": "batch", "expires_after[anchor]": "created_at", "expires_after[seconds]": "3600"}
    obj = client.post("/v1/files", {**form, "file": SimpleUploadedFile("a.jsonl", content)}, headers=headers).json()
    assert obj["expires_at"] == obj["created_at"] + 3600
    assert client.get(f"/v1/files/{obj['id']}", headers=headers).json()["expires_at"] == obj["expires_at"]

    default = upload(client, headers).json()  # no expires_after: BATCHSITE_FILE_EXPIRY_DAYS (30)
    assert default["expires_at"] == default["created_at"] + 30 * 86400
    settings.BATCHSITE_FILE_EXPIRY_DAYS = 0
    assert upload(client, headers).json()["expires_at"] is None

    for anchor, seconds, param in [
        ("created_at", "3599", "seconds"),
        ("created_at", "2592001", "seconds"),
        ("created_at", "soon", "seconds"),
        ("last_active_at", "3600", "anchor"),
        (None, "3600", "anchor"),
        ("created_at", None, "seconds"),
    ]:
        bad = {"purpose": "batch", "expires_after[anchor]": anchor, "expires_after[seconds]": seconds}
        bad = {k: v for k, v in bad.items() if v is not None}
        response = client.post("/v1/files", {**bad, "file": SimpleUploadedFile("a.jsonl", content)}, headers=headers)
        assert response.status_code == 400, (anchor, seconds)
        assert response.json()["error"]["param"] == f"expires_after.{param}"
    assert File.objects.count() == 3


def test_sdk_expires_after_reaches_the_file(owner, live_server, settings):
    """The official SDK's own encoding of expires_after, over HTTP."""
    from openai import OpenAI

    sdk = OpenAI(
        base_url=f"{live_server.url}/v1", api_key=api_headers(owner)["Authorization"].split()[1], max_retries=0
    )
    obj = sdk.files.create(
        file=("a.jsonl", jsonl([chat_line("a")])),
        purpose="batch",
        expires_after={"anchor": "created_at", "seconds": 7200},
    )
    assert obj.expires_at == obj.created_at + 7200


def test_clean_up_removes_expired_files_but_not_one_a_running_batch_came_from(client, owner, settings):
    from datetime import timedelta

    from django.utils import timezone

    from jobs.engine import tasks
    from jobs.models import Endpoint, Job
    from tests.factories import make_endpoint

    make_endpoint("http://127.0.0.1:9/v1")
    headers = api_headers(owner)
    gone, kept, used = (upload(client, headers).json() for _ in range(3))
    body = {"input_file_id": used["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    assert client.post("/v1/batches", body, content_type="application/json", headers=headers).status_code == 200
    past = timezone.now() - timedelta(seconds=1)
    File.objects.filter(public_id__in=[gone["id"], used["id"]]).update(expires_at=past)
    paths = {f.public_id: f.full_path for f in File.objects.all()}

    tasks.clean_up()
    assert client.get(f"/v1/files/{gone['id']}", headers=headers).status_code == 404
    assert not paths[gone["id"]].exists() and paths[kept["id"]].exists()
    assert client.get(f"/v1/files/{used['id']}", headers=headers).status_code == 200  # its batch is queued
    assert paths[used["id"]].exists()

    Job.objects.update(status=Job.Status.COMPLETED, finished_at=timezone.now())
    tasks.clean_up()
    assert client.get(f"/v1/files/{used['id']}", headers=headers).status_code == 404
    assert not paths[used["id"]].exists() and paths[kept["id"]].exists()
    assert Endpoint.objects.exists()
