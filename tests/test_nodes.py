"""Several worker nodes on Postgres + Redis: two `qcluster` processes, each with its own workers, run one job
against the simulator. They keep one rate limit together, survive each other's kill -9, and hand work over
at once on SIGTERM. Runs in the suite's Postgres + Redis pass (scripts/test.sh)."""

import os
import signal
import time

import pytest
from django.db import connection

from jobs.models import Item, Job
from tests.factories import answers, make_endpoint, make_job
from tests.servers import wait_until

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(300),
    pytest.mark.skipif(
        connection.vendor != "postgresql" or not os.environ.get("REDIS_URL"),
        reason="several nodes share Postgres and Redis: the suite's second pass",
    ),
]


def processed_slices(node) -> int:
    return node.output().count("processing job-")


def running_a_slice(node) -> bool:
    """The node has started a slice it has not finished (django-q logs both)."""
    out = node.output()
    return out.count("processing job-") > out.count("Processed 'jobs.engine.tasks.run_slice'")


def finished_by(job, items: set[str], timeout: float) -> float:
    """Seconds until every item in `items` has its result."""
    started = time.monotonic()
    open_ = job.items.filter(custom_id__in=items).exclude(status__in=Item.FINAL)
    wait_until(lambda: not open_.exists(), timeout, 0.2, f"{open_.count()} items to finish")
    return time.monotonic() - started


def test_two_nodes_keep_one_learned_rate_limit(cluster, simulator, write, owner):
    # The limit is learned from the simulator's headers, not configured: were each node to keep its own
    # budget, the two together would send twice as fast.
    sim = simulator("--latency-ms", "50", "--rpm", "3000", "--start-empty")
    nodes = [cluster(BATCHSITE_SLICE_SECONDS="5"), cluster(BATCHSITE_SLICE_SECONDS="5")]
    job = make_job(write, owner, make_endpoint(sim.base_url, concurrency=100), 2000)
    wait_until(lambda: Job.objects.get(pk=job.pk).is_finished, 150, 0.5, "the job to finish")

    job.refresh_from_db()
    assert (job.status, job.n_succeeded) == (Job.Status.COMPLETED, 2000)
    assert all(processed_slices(node) >= 2 for node in nodes), "both nodes ran slices"
    from tests.test_engine_cluster import steady_rate

    requests = sim.requests()
    limited = sum(r["status"] == 429 for r in requests)
    rate = steady_rate([r["t"] for r in requests if r["status"] == 200])
    print(f"two nodes: {rate / 3000:.1%} of the limit, {limited} 429s in {len(requests)}")
    assert limited <= 0.01 * len(requests), f"{limited} of {len(requests)} were 429"
    assert 0.95 * 3000 <= rate <= 1.03 * 3000, f"{rate:.0f} requests/min"


def test_a_node_killed_mid_job_leaves_its_items_to_the_other_within_30_s(cluster, simulator, write, owner):
    sim = simulator("--latency-ms", "300")
    doomed = cluster(BATCHSITE_LEASE_SECONDS="15", BATCHSITE_SLICE_SECONDS="5")
    survivor = cluster(BATCHSITE_LEASE_SECONDS="15", BATCHSITE_SLICE_SECONDS="5")
    n = 600
    job = make_job(write, owner, make_endpoint(sim.base_url, concurrency=20), n)
    wait_until(lambda: processed_slices(doomed) and processed_slices(survivor), 60, 0.2, "both nodes at work")
    wait_until(lambda: Job.objects.get(pk=job.pk).n_succeeded >= 100, 60, 0.2, "progress")
    wait_until(lambda: running_a_slice(doomed), 30, 0.05, "a slice on the node to kill")

    doomed.kill()  # SIGKILL to its whole process group
    held = set(job.items.filter(status=Item.Status.RUNNING).values_list("custom_id", flat=True))
    resumed = finished_by(job, held, 45)

    wait_until(lambda: Job.objects.get(pk=job.pk).is_finished, 120, 0.5, "the job to finish")
    job.refresh_from_db()
    print(f"items held at the kill done {resumed:.1f} s later")
    assert resumed <= 30  # the dead node's items wait for their leases (15 s) at most
    assert (job.status, job.n_succeeded, job.n_failed) == (Job.Status.COMPLETED, n, 0)
    assert answers(job) == {f"req-{i}": f"Echo: Question {i}" for i in range(n)}  # one result per item


def test_sigterm_moves_a_nodes_claims_to_the_other_at_once(cluster, simulator, write, owner):
    sim = simulator("--latency-ms", "800")
    # Leases of a minute: only the hand-over can move the items within seconds.
    going = cluster(BATCHSITE_LEASE_SECONDS="60", BATCHSITE_SHUTDOWN_SECONDS="2", BATCHSITE_SLICE_SECONDS="30")
    staying = cluster(BATCHSITE_LEASE_SECONDS="60", BATCHSITE_SLICE_SECONDS="30")
    n = 600
    job = make_job(write, owner, make_endpoint(sim.base_url, concurrency=40), n)
    wait_until(lambda: processed_slices(going) and processed_slices(staying), 60, 0.2, "both nodes at work")
    wait_until(lambda: Job.objects.get(pk=job.pk).n_succeeded >= 60, 60, 0.2, "progress")
    wait_until(lambda: running_a_slice(going), 30, 0.05, "a slice on the node to stop")

    going.proc.send_signal(signal.SIGTERM)  # its main process, as systemd's KillMode=mixed does
    held = set(job.items.filter(status=Item.Status.RUNNING).values_list("custom_id", flat=True))
    moved = finished_by(job, held, 30)
    wait_until(lambda: going.proc.poll() is not None, 30, 0.2, "the node to exit")

    wait_until(lambda: Job.objects.get(pk=job.pk).is_finished, 120, 0.5, "the job to finish")
    job.refresh_from_db()
    print(f"items held at SIGTERM done {moved:.1f} s later")
    assert moved < 2 + 8  # the in-flight bound, then one request's time elsewhere: not a lease (60 s)
    assert (job.status, job.n_succeeded) == (Job.Status.COMPLETED, n)
    assert answers(job) == {f"req-{i}": f"Echo: Question {i}" for i in range(n)}
