"""Uploads in an S3-compatible bucket shared by the nodes: moto's S3 server over real HTTP, django-storages,
and nodes (gunicorn, qcluster) that each have their own data dir, so only the bucket can carry a file
from one to the other."""

import shutil
import time
import urllib.request
import uuid

import boto3
import openai
import pytest
from django.conf import settings as django_settings
from django.core.files.uploadedfile import SimpleUploadedFile

from jobs import ingest, storage
from jobs.models import ApiToken, File, Job
from tests.factories import api_headers, chat_line, jsonl, make_endpoint
from tests.servers import Process, free_port, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3_url(tmp_path_factory):
    port = free_port()
    server = Process(
        ["-H", "127.0.0.1", "-p", str(port)],
        tmp_path_factory.mktemp("moto") / "moto.out",
        program=["-m", "moto.server"],
    )
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=1)
            return True
        except OSError:
            return False

    wait_until(up, timeout=30, message="moto's S3 server")
    yield url
    server.stop()


@pytest.fixture
def bucket(s3_url, settings, monkeypatch):
    """A fresh bucket, and the uploads storage pointed at it (as BATCHSITE_S3_* would). Returns the env
    a node needs to use it, and a boto3 client to look inside."""
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    name = f"bs-{uuid.uuid4().hex[:12]}"
    s3 = boto3.client("s3", endpoint_url=s3_url, region_name="us-east-1")
    s3.create_bucket(Bucket=name)
    settings.STORAGES = {
        **settings.STORAGES,
        "uploads": {
            "BACKEND": "storages.backends.s3.S3Storage",
            "OPTIONS": {"bucket_name": name, "endpoint_url": s3_url, "location": "batchsite", "default_acl": None},
        },
    }
    env = {**CREDENTIALS, "BATCHSITE_S3_BUCKET": name, "BATCHSITE_S3_ENDPOINT_URL": s3_url}
    return env, s3, name


def keys(s3, name: str) -> list[str]:
    return [o["Key"] for o in s3.list_objects_v2(Bucket=name).get("Contents", [])]


@pytest.mark.django_db
def test_an_upload_goes_to_the_bucket_and_a_node_without_it_reads_it_from_there(client, owner, data_dir, bucket):
    env, s3, name = bucket
    headers = api_headers(owner)
    content = jsonl([chat_line(f"r{i}") for i in range(3000)])  # several streamed chunks

    obj = client.post(
        "/v1/files", {"file": SimpleUploadedFile("in.jsonl", content), "purpose": "batch"}, headers=headers
    ).json()
    file = File.objects.get(public_id=obj["id"])
    assert keys(s3, name) == [f"batchsite/{file.path}"]
    assert s3.get_object(Bucket=name, Key=f"batchsite/{file.path}")["Body"].read() == content

    shutil.rmtree(file.full_path.parent)  # as on a node that did not take the upload
    response = client.get(f"/v1/files/{obj['id']}/content", headers=headers)
    assert response.status_code == 200 and response["Content-Length"] == str(len(content))
    assert b"".join(response.streaming_content) == content  # streamed from the bucket, no copy kept
    assert not file.full_path.exists()

    assert storage.local_path(file.path).read_bytes() == content  # a worker fetches it once, whole
    assert not list(file.full_path.parent.glob(".*part"))  # and leaves no half file behind

    assert client.delete(f"/v1/files/{obj['id']}", headers=headers).json()["deleted"] is True
    assert keys(s3, name) == [] and not file.full_path.exists()
    assert client.get(f"/v1/files/{obj['id']}/content", headers=headers).status_code == 404


@pytest.mark.django_db
def test_a_bucket_that_refuses_loses_nothing_and_says_so(client, owner, data_dir, bucket, settings):
    env, s3, name = bucket
    uploads = settings.STORAGES["uploads"]
    settings.STORAGES = {
        **settings.STORAGES,
        "uploads": {**uploads, "OPTIONS": {**uploads["OPTIONS"], "bucket_name": "no-such-bucket"}},
    }
    content = jsonl([chat_line("a")])

    response = client.post(
        "/v1/files", {"file": SimpleUploadedFile("in.jsonl", content), "purpose": "batch"}, headers=api_headers(owner)
    )
    assert response.status_code == 503, response.content
    assert response.json()["error"]["code"] == ingest.STORAGE_UNAVAILABLE
    assert File.objects.count() == 0 and not any((data_dir / "uploads").iterdir())

    client.force_login(owner)
    page = client.post("/jobs/new/", {"file": SimpleUploadedFile("in.jsonl", content)})
    assert page.status_code == 200 and "could not be stored" in page.content.decode()
    assert not any((data_dir / "uploads").iterdir())


@pytest.mark.django_db
def test_stale_uploads_leave_the_bucket_but_a_jobs_source_stays(owner, data_dir, bucket):
    env, s3, name = bucket
    kept, error = ingest.store_upload([jsonl([chat_line("a")])], "kept.jsonl")
    stale, error = ingest.store_upload([jsonl([chat_line("b")])], "stale.jsonl")
    assert kept and stale and error is None
    plan = ingest.validate(kept)
    ingest.create_job(plan, owner=owner)
    shutil.rmtree(stale.parent)  # only in the bucket now, as for an upload another node took

    time.sleep(1.1)  # S3 times are whole seconds
    assert ingest.remove_stale_uploads(max_age_hours=0) >= 1

    assert keys(s3, name) == [f"batchsite/{storage.name_of(kept)}"]
    assert kept.exists()


def test_a_batch_uploaded_to_one_node_is_validated_and_run_by_another(
    transactional_db, bucket, cluster, simulator, web_server, owner, tmp_path
):
    """Two nodes with separate data dirs: gunicorn takes the upload, a qcluster elsewhere validates the
    file (it arrives through the bucket only) and runs it; the results come back through the web node."""
    env, s3, name = bucket
    sim = simulator("--latency-ms", "5")
    make_endpoint(sim.base_url)
    shared = {**env, "SECRET_KEY": django_settings.SECRET_KEY}  # endpoint keys are encrypted with it
    web_dir, worker_dir = tmp_path / "web-node", tmp_path / "worker-node"
    web = web_server(BATCHSITE_DATA_DIR=str(web_dir), BATCHSITE_INLINE_VALIDATION_BYTES="0", **shared)
    cluster(BATCHSITE_DATA_DIR=str(worker_dir), **shared)

    lines = [chat_line(f"req-{i}", f"Question {i}") for i in range(40)]
    path = tmp_path / "batchinput.jsonl"
    path.write_bytes(jsonl(lines))
    sdk = openai.OpenAI(base_url=web.base_url, api_key=ApiToken.create_for(owner, "s3 test")[1])
    uploaded = sdk.files.create(file=open(path, "rb"), purpose="batch")
    batch = sdk.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert batch.status == "validating"

    def done() -> bool:
        return sdk.batches.retrieve(batch.id).status in ("completed", "failed", "expired", "cancelled")

    wait_until(done, timeout=90, message="the batch to finish")
    batch = sdk.batches.retrieve(batch.id)
    assert batch.status == "completed", (batch, Job.objects.get().status_reason)
    assert (batch.request_counts.completed, batch.request_counts.failed) == (40, 0)
    output = sdk.files.content(batch.output_file_id).text.splitlines()
    assert len(output) == 40
    source = File.objects.get(public_id=uploaded.id).path
    assert (worker_dir / source).read_bytes() == path.read_bytes()  # fetched by the worker node
    from jobs.models import Installation

    assert f"batchsite/{Installation.own_key()}/{source}" in keys(s3, name)  # the installation's own folder


@pytest.mark.django_db
def test_installations_sharing_a_bucket_keep_to_their_own_folder(owner, data_dir, bucket, settings):
    """Without BATCHSITE_S3_PREFIX each installation writes under batchsite/<its key>/: another's uploads in the
    same bucket are neither listed nor swept away by ours (they were, under the one default prefix)."""
    from jobs.models import Installation

    env, s3, name = bucket
    settings.STORAGES = {
        **settings.STORAGES,
        "uploads": {**settings.STORAGES["uploads"], "BACKEND": "jobs.bucket.InstallationS3Storage"},
    }
    theirs = f"batchsite/other-install/uploads/{uuid.uuid4().hex}/theirs.jsonl"
    legacy = f"batchsite/uploads/{uuid.uuid4().hex}/old.jsonl"
    for key in (theirs, legacy):
        s3.put_object(Bucket=name, Key=key, Body=jsonl([chat_line("x")]))
    mine, error = ingest.store_upload([jsonl([chat_line("a")])], "mine.jsonl")
    assert mine and error is None
    key = Installation.own_key()
    assert key and f"batchsite/{key}/{storage.name_of(mine)}" in keys(s3, name)
    shutil.rmtree(mine.parent)

    time.sleep(1.1)  # S3 times are whole seconds
    assert ingest.remove_stale_uploads(max_age_hours=0) == 1  # ours, which no job names
    assert sorted(keys(s3, name)) == sorted([theirs, legacy])
