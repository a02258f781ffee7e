"""Remote and hybrid jobs end to end: a real qcluster runs the poller task (enqueued by Job.start) and, for
a hybrid job past its switch, the live slices; the simulator runs as its own process."""

from datetime import timedelta

import pytest
from django.utils import timezone

from jobs import ingest
from jobs.models import Job, RemoteBatch
from tests.factories import answers, chat_line, make_endpoint
from tests.servers import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def start_job(write, owner, endpoint, n, **kw) -> Job:
    plan = ingest.validate(write("remote.jsonl", [chat_line(f"req-{i}", f"Question {i}") for i in range(n)]))
    job = ingest.create_job(plan, owner=owner, endpoint=endpoint, options=ingest.RunOptions(**kw))
    job.start()
    return job


def finished(job: Job, timeout: float) -> Job:
    def done():
        job.refresh_from_db()
        return job.is_finished

    wait_until(done, timeout, 0.3, "the job to finish")
    return job


def test_the_cluster_sends_follows_and_collects_a_remote_job(cluster, simulator, write, owner):
    sim = simulator("--batch-seconds", "2")
    cluster(BATCHSITE_REMOTE_POLL_SECONDS="1")
    job = start_job(write, owner, make_endpoint(sim.base_url), 50, mode=Job.Mode.REMOTE)

    job = finished(job, 90)

    assert job.status == Job.Status.COMPLETED and job.n_succeeded == 50
    assert answers(job) == {f"req-{i}": f"Echo: Question {i}" for i in range(50)}
    assert job.remote_batches.get().status == RemoteBatch.Status.COMPLETED
    assert sim.stats()["by_path"].get("/v1/chat/completions", 0) == 0


def test_the_cluster_switches_a_hybrid_job_to_live_before_its_deadline(cluster, simulator, write, owner):
    sim = simulator("--batch-seconds", "120")
    cluster(BATCHSITE_REMOTE_POLL_SECONDS="1", BATCHSITE_HYBRID_MARGIN_SECONDS="2")
    endpoint = make_endpoint(sim.base_url, rpm=6000, batch_cancel_seconds=1)
    deadline = timezone.now() + timedelta(seconds=25)
    job = start_job(write, owner, endpoint, 60, mode=Job.Mode.HYBRID, deadline=deadline)

    job = finished(job, 60)

    assert job.status == Job.Status.COMPLETED and job.n_succeeded == 60
    assert job.finished_at <= deadline and job.switched_at is not None
    assert answers(job) == {f"req-{i}": f"Echo: Question {i}" for i in range(60)}  # one answer each
    live = sim.stats()["by_path"].get("/v1/chat/completions", 0)
    assert live == job.items.filter(latency_ms__isnull=False).count() > 0
