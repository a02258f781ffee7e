"""/v1/files with Django's test client: upload, list, retrieve, content, delete, limits, scoping."""

import json

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from jobs import tokens
from jobs.models import File
from tests.conftest import api_headers, chat_line

pytestmark = pytest.mark.django_db

FILE_KEYS = {"id", "object", "bytes", "created_at", "filename", "purpose", "status", "expires_at", "status_details"}


@pytest.fixture(autouse=True)
def data_dir(settings, tmp_path):
    """Uploads in a directory of the test's own (the token data stays in the real data dir)."""
    tokens.seed_cache()
    settings.DATA_DIR = tmp_path
    return tmp_path


def jsonl(lines) -> bytes:
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


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
    assert [f["id"] for f in client.get("/v1/files?order=asc", headers=headers).json()["data"]] == [first["id"], second["id"]]
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
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "file_too_large" and "1 MB" in error["message"]
    assert not File.objects.exists() and not any((data_dir / "uploads").iterdir())


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
