"""Graceful shutdown of a qcluster node (jobs/engine/shutdown.py): SIGTERM to its main process, as systemd's
KillMode=mixed and `make run` send it, and the node's claims go back at once for another node to take."""

import signal
import time

import pytest

from jobs.models import Item, Job
from tests.factories import answers, make_endpoint, make_job
from tests.servers import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def test_sigterm_hands_a_nodes_claims_back_at_once_and_another_node_finishes(cluster, simulator, write, owner):
    sim = simulator("--latency-ms", "1500")
    # A long lease: only the hand-over, not a lease running out, can free the items within seconds.
    node = cluster(BATCHSITE_LEASE_SECONDS="60", BATCHSITE_SHUTDOWN_SECONDS="2", BATCHSITE_SLICE_SECONDS="60")
    n = 300
    job = make_job(write, owner, make_endpoint(sim.base_url, concurrency=20), n)
    wait_until(lambda: Job.objects.get(pk=job.pk).n_succeeded >= 20, 60, 0.2, "progress")
    assert job.items.filter(status=Item.Status.RUNNING).exists()

    node.proc.send_signal(signal.SIGTERM)  # the main process only
    told = time.monotonic()
    wait_until(lambda: not job.items.filter(status=Item.Status.RUNNING).exists(), 15, 0.1, "claims handed back")
    released_after = time.monotonic() - told
    wait_until(lambda: node.proc.poll() is not None, 30, 0.2, "the node to exit")
    print(f"claims back after {released_after:.1f} s; node gone after {time.monotonic() - told:.1f} s")
    assert released_after < 2 + 3  # the in-flight bound, plus a status check and a write
    assert "told to hand their work over" in node.output()
    job.refresh_from_db()
    assert job.status == Job.Status.RUNNING and job.n_pending > 0  # not paused, not lost: waiting for a node

    cluster(BATCHSITE_LEASE_SECONDS="60")  # another node: it starts the handed-over chain at once
    wait_until(lambda: Job.objects.get(pk=job.pk).status == Job.Status.COMPLETED, 120, 0.5, "the job to complete")
    job.refresh_from_db()
    assert (job.n_succeeded, job.n_failed) == (n, 0)
    assert answers(job) == {f"req-{i}": f"Echo: Question {i}" for i in range(n)}  # one result each
