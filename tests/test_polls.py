"""Polls are cheap: what a running job's pollers cost, in queries and writes (bench/pages.py measures CPU)."""

import json
from datetime import timedelta

import pytest
from django.db import connection
from django.db.models import F
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from jobs import ingest, tokens
from jobs.models import Batch, File, Item, Job, JobTick, ledger
from tests.factories import api_headers, chat_line

pytestmark = pytest.mark.django_db


@pytest.fixture
def running(owner, tmp_path, settings):
    """A running 300-item job with a day of ticks, as an API batch."""
    tokens.seed_cache()
    settings.DATA_DIR = tmp_path
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(chat_line(f"r{i}")) + "\n" for i in range(300)))
    job = ingest.create_job(ingest.validate(path), owner=owner, name="big")
    Item.objects.filter(job=job, line__lte=100).update(status=Item.Status.SUCCEEDED, http_status=200, response="{}")
    Item.objects.filter(job=job, line__gt=100, line__lte=110).update(
        status=Item.Status.FAILED, http_status=500, error_code="http_500"
    )
    ledger.recount(job)
    start = timezone.now() - timedelta(days=1)
    Job.objects.filter(pk=job.pk).update(status=Job.Status.RUNNING, started_at=start)
    JobTick.objects.bulk_create(
        [JobTick(job=job, at=start + timedelta(seconds=10 * i), succeeded=3) for i in range(8640)]
    )
    input_file = File.objects.create(owner=owner, filename="in.jsonl", purpose=File.BATCH, path="in.jsonl")
    batch = Batch.objects.create(job=job, input_file=input_file)
    job.refresh_from_db()
    return batch


def test_batch_poll_reads_three_rows_and_writes_nothing(client, owner, running):
    headers = api_headers(owner)
    url = f"/v1/batches/{running.public_id}"
    client.get(url, headers=headers)  # the token's first use is recorded once
    with CaptureQueriesContext(connection) as queries:
        response = client.get(url, headers=headers)
    assert response.status_code == 200 and response.json()["status"] == "in_progress"
    sql = [q["sql"].split()[0].upper() for q in queries]
    assert sql == ["SELECT"] * 3, [q["sql"][:120] for q in queries]  # the token, the batch, its job


def test_unchanged_batch_answers_304_and_a_change_a_new_body(client, owner, running):
    headers = api_headers(owner)
    url = f"/v1/batches/{running.public_id}"
    first = client.get(url, headers=headers)
    etag = first["ETag"]
    again = client.get(url, headers={**headers, "If-None-Match": etag})
    assert again.status_code == 304 and again.content == b""
    Job.objects.filter(pk=running.job.pk).update(n_pending=F("n_pending") - 1, n_succeeded=F("n_succeeded") + 1)
    changed = client.get(url, headers={**headers, "If-None-Match": etag})
    assert changed.status_code == 200 and changed["ETag"] != etag
    assert changed.json()["request_counts"]["completed"] == first.json()["request_counts"]["completed"] + 1


def test_progress_partial_draws_the_chart_once_per_tick_period(client, owner, running):
    client.force_login(owner)
    url = f"/jobs/{running.job.pk}/progress"
    with CaptureQueriesContext(connection) as first:
        assert client.get(url, HTTP_HX_REQUEST="true").status_code == 200
    assert any("jobtick" in q["sql"] for q in first)
    Job.objects.filter(pk=running.job.pk).update(n_pending=F("n_pending") - 5, n_succeeded=F("n_succeeded") + 5)
    with CaptureQueriesContext(connection) as second:
        response = client.get(url, HTTP_HX_REQUEST="true")
    assert not any("jobtick" in q["sql"] or "jobs_item" in q["sql"] for q in second), [q["sql"][:100] for q in second]
    assert len(second) <= 3  # session, user, job
    html = response.content.decode()
    assert "115 of 300 done" in html and '<figure class="chart">' in html and "HTTP 500" in html

    # A status change draws it again at once.
    Job.objects.filter(pk=running.job.pk).update(status=Job.Status.PAUSED)
    with CaptureQueriesContext(connection) as paused:
        client.get(url, HTTP_HX_REQUEST="true")
    assert any("jobtick" in q["sql"] for q in paused)
