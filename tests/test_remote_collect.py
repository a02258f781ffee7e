"""Collecting a finished batch (jobs/engine/remote.py, RemoteJob._collect): progress only moves forward while
the result files are joined, and the server errors and rate limits in them are sent again. Against the
simulator over HTTP, the poller's rounds driven here (tests/test_remote.py)."""

from datetime import timedelta

import pytest
from django.db.models import Sum
from django.utils import timezone

from jobs.engine.remote import collect
from jobs.engine.remote.rounds import Round
from jobs.models import Item, Job, RemoteBatch, control
from tests import test_remote
from tests.factories import connection_error, make_endpoint
from tests.test_remote import drive, live_requests, one_result_each, remote_job

pytestmark = pytest.mark.django_db(transaction=True)

quick_polls, sim = test_remote.quick_polls, test_remote.sim  # its fixtures, here too


def watch_joins(monkeypatch, seen: list, fail_after: int | None = None) -> list:
    """Record the job's answered count around every join (lines joined a few at a time), and each renewed claim.
    `fail_after`: the connection drops once, after that many joins."""
    monkeypatch.setattr(collect, "JOIN_LINES", 5)
    real = collect.join
    claims: list = []

    def join(rnd, chunk, records):
        job = Job.objects.get(pk=rnd.job.pk)
        seen.append(job.n_answered)
        released = real(rnd, chunk, records)
        job.refresh_from_db()
        seen.append(job.n_answered)
        if records:
            claims.append(RemoteBatch.objects.get(pk=chunk.pk).claimed_until)
        if fail_after is not None and len(claims) == fail_after:
            raise connection_error()
        return released

    monkeypatch.setattr(collect, "join", join)
    return claims


def test_progress_never_goes_back_while_a_batch_is_collected(sim, write, owner, monkeypatch):
    config, base_url = sim
    config.batch_seconds = 3
    seen: list[int] = []
    claims = watch_joins(monkeypatch, seen)
    job = remote_job(write, owner, make_endpoint(base_url), 40)

    job = drive(job, until=lambda j: seen.append(j.n_answered) or j.remote_completed > 0, timeout=10)
    shown = seen[-1]  # what the endpoint's request_counts said before the batch was final
    job = drive(job, until=lambda j: seen.append(j.n_answered) or j.is_finished)

    assert job.status == Job.Status.COMPLETED and job.n_succeeded == 40
    assert len(claims) == 8  # 40 lines, 5 a join
    assert 0 < shown < 40 and seen == sorted(seen) and seen[-1] == 40, seen
    assert job.remote_completed == job.remote_failed == 0
    assert claims == sorted(claims) and claims[0] < claims[-1]  # each join renews the claim
    chunk = job.remote_batches.get()
    assert chunk.n_completed == 40 and chunk.claimed_until is None  # as the endpoint reported it; let go of
    one_result_each(job)


def test_a_collection_cut_short_keeps_the_progress_and_resumes(sim, write, owner, monkeypatch):
    config, base_url = sim
    seen: list[int] = []
    watch_joins(monkeypatch, seen, fail_after=3)
    job = remote_job(write, owner, make_endpoint(base_url), 30)

    job = drive(job, until=lambda j: seen.append(j.n_answered) or j.remote_batches.filter(failures=1).exists())

    chunk = job.remote_batches.get()
    assert chunk.status == RemoteBatch.Status.COMPLETED and chunk.collected_at is None
    assert job.n_succeeded == 15 and job.n_answered == 30  # 15 joined, 15 still counted from request_counts
    assert chunk.n_completed == 15 and chunk.claimed_until is None  # the renewed claim was let go of too
    job = drive(job, until=lambda j: seen.append(j.n_answered) or j.is_finished)
    assert job.status == Job.Status.COMPLETED and job.n_succeeded == 30
    assert seen == sorted(seen) and max(seen) == 30, seen
    assert job.remote_batches.get().n_completed == 30  # the chunk table shows the endpoint's own count again
    one_result_each(job)


def test_server_errors_in_the_error_file_are_sent_again_in_a_new_batch(sim, write, owner):
    config, base_url = sim
    config.batch_fail_rate = 0.3  # lines answered 500 in the error file
    job = remote_job(write, owner, make_endpoint(base_url), 30)

    job = drive(job)

    assert job.status == Job.Status.COMPLETED and job.n_succeeded == 30 and job.n_failed == 0
    chunks = list(job.remote_batches.all())
    assert len(chunks) >= 2 and chunks[0].n_failed > 0
    first = {c for c, a in job.items.values_list("custom_id", "attempts") if a == 1}
    again = job.items.filter(attempts__gt=1)
    assert again.count() == chunks[0].n_failed and len(first) == 30 - again.count()
    assert set(chunks[1].items.values_list("custom_id", flat=True)) <= set(again.values_list("custom_id", flat=True))
    assert job.ticks.aggregate(n=Sum("retried"))["n"] >= chunks[0].n_failed  # the timeline shows the retries
    one_result_each(job)


def test_server_errors_of_a_hybrid_job_past_its_switch_are_sent_again_live(sim, write, owner):
    config, base_url = sim
    config.batch_seconds = 30
    config.batch_fail_rate = 0.5
    endpoint = make_endpoint(base_url, rpm=6000, batch_cancel_seconds=1)
    deadline = timezone.now() + timedelta(seconds=8)
    job = remote_job(write, owner, endpoint, 40, mode=Job.Mode.HYBRID, deadline=deadline)

    job = drive(job, live=True, timeout=30)

    assert job.status == Job.Status.COMPLETED and job.n_succeeded == 40 and job.switched_at is not None
    assert job.remote_batches.count() == 1  # none after the switch
    again = job.items.filter(attempts=2, latency_ms__isnull=False)  # a 500 in the batch's error file, then live
    assert again.exists() and live_requests(base_url) == job.items.filter(latency_ms__isnull=False).count()
    one_result_each(job)


def test_server_errors_fail_once_the_job_is_out_of_attempts(sim, write, owner):
    config, base_url = sim
    config.batch_fail_rate = 1.0
    job = remote_job(write, owner, make_endpoint(base_url), 4, max_attempts=2)

    job = drive(job)

    assert job.status == Job.Status.COMPLETED and job.n_failed == 4
    assert job.remote_batches.count() == 2  # sent twice, then no more
    assert all(
        i.attempts == 2 and i.http_status == 500 and "server had an error" in i.error_message for i in job.items.all()
    )
    one_result_each(job)


def test_a_cancelling_job_does_not_send_server_errors_again(sim, write, owner):
    config, base_url = sim
    config.batch_fail_rate = 1.0
    config.batch_seconds = 6
    job = remote_job(write, owner, make_endpoint(base_url), 40)
    job = drive(job, until=lambda j: j.remote_failed >= 5, timeout=20)

    control.cancel(job)
    job = drive(job)

    assert job.status == Job.Status.CANCELLED and job.remote_batches.count() == 1
    assert job.n_failed >= 5 and job.n_failed + job.n_cancelled == 40
    one_result_each(job)


@pytest.mark.parametrize(
    ("record", "again"),
    [
        ({"response": {"status_code": 503, "body": {"error": {"code": None, "message": "busy"}}}}, True),
        ({"response": {"status_code": 429, "body": {"error": {"code": "rate_limit_exceeded"}}}}, True),
        ({"response": None, "error": {"code": "server_error", "message": "oops"}}, True),
        ({"response": {"status_code": 429, "body": {"error": {"code": "insufficient_quota"}}}}, False),
        ({"response": {"status_code": 400, "body": {"error": {"code": "invalid_request_error"}}}}, False),
        ({"response": None, "error": {"code": "batch_expired", "message": "late"}}, False),
    ],
)
def test_which_result_lines_are_worth_another_send(write, owner, record, again):
    endpoint = make_endpoint("http://127.0.0.1:9/v1")  # never called
    job = remote_job(write, owner, endpoint, 1)
    chunk = RemoteBatch.objects.create(job=job, number=1, model="gpt-4o-mini")
    fields = collect.result_fields(Round(job, endpoint), chunk, {"custom_id": "req-0", **record})
    assert fields["status"] in (Item.Status.FAILED, Item.Status.EXPIRED)
    assert collect.transient(fields) is again
