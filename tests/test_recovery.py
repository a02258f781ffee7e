"""Recovery without an extra command, in seconds: schedules from `migrate` alone, a killed cluster's work
resumed by a new one within 30 s, and never one item sent twice at once by two live clusters.

The clusters here run with the production lease (the default BATCHSITE_LEASE_SECONDS), not the tests'
short one.
"""

import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import defaultdict
from datetime import timedelta

import pytest
from django.conf import settings
from django.utils import timezone
from django_q.models import Schedule

from jobs.engine import tasks
from jobs.models import Item, Job
from tests.factories import answers, make_endpoint, make_job, seed_prices
from tests.servers import ROOT, Cluster, wait_until

SCHEDULES = [
    ("batchsite-clean-up", "jobs.engine.tasks.clean_up"),
    ("batchsite-notifications", "jobs.engine.tasks.send_notifications"),
    ("batchsite-remote-poller", "jobs.engine.tasks.poll_remote"),
    ("batchsite-sweeper", "jobs.engine.tasks.sweep"),
]
LATENCY = 0.3  # seconds the simulator takes to answer, so a request was in flight from t - LATENCY to t

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def migrate(db, *args):
    env = {**os.environ, "BATCHSITE_SQLITE_PATH": str(db), "BATCHSITE_DATA_DIR": str(db.parent)}
    env.pop("DATABASE_URL", None)  # a throwaway SQLite file, whatever the suite runs on
    env.pop("REDIS_URL", None)
    done = subprocess.run(
        [sys.executable, "manage.py", "migrate", "--no-input", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def schedules(db) -> list[tuple[str, str]]:
    with sqlite3.connect(db) as conn:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "django_q_schedule" not in tables:
            return []
        return sorted(conn.execute("SELECT name, func FROM django_q_schedule"))


def test_migrate_alone_registers_the_schedules_once(tmp_path):
    db = tmp_path / "fresh.sqlite3"
    migrate(db, "jobs")  # only our app (and what it depends on) on a new database: must not fail
    assert schedules(db) in ([], SCHEDULES)
    migrate(db)
    assert schedules(db) == SCHEDULES
    migrate(db)
    assert schedules(db) == SCHEDULES  # idempotent: not twice


@pytest.fixture
def production_cluster(transactional_db, tmp_path):
    """cluster() starts a qcluster with the production lease and slice lengths (stopped after the test),
    the lease this process has too (the default, unless the environment shortens it: the tests say so).

    Unlike conftest's `cluster`, it registers no schedules: those here come from `migrate` (the test
    database is made by it, and flushed with its post_migrate signal)."""
    seed_prices()
    started = []

    def start(**env):
        lease = str(settings.BATCHSITE_LEASE_SECONDS)
        c = Cluster(tmp_path, **{"BATCHSITE_LEASE_SECONDS": lease, "BATCHSITE_SLICE_SECONDS": "", **env})
        started.append(c)
        return c

    yield start
    for c in started:  # the test is over: a graceful stop would only wait out BATCHSITE_SHUTDOWN_SECONDS
        c.stop(signal.SIGKILL)


def sends(sim) -> dict[str, list[float]]:
    """custom_id -> when each request for it was answered (the simulator's log of every request)."""
    by_item = defaultdict(list)
    for entry in sim.requests():
        assert entry["status"] == 200, entry
        by_item["req-" + entry["marker"].removeprefix("Question ")].append(entry["t"])
    return {custom_id: sorted(times) for custom_id, times in by_item.items()}


def overlapping(sent: dict[str, list[float]], latency: float) -> list[str]:
    """Items with two requests in flight at the same moment: answered less than one latency apart."""
    return [custom_id for custom_id, times in sent.items() if any(b - a < latency for a, b in zip(times, times[1:]))]


def test_killed_cluster_resumes_within_30_s_without_prepare(production_cluster, simulator, write, owner):
    assert sorted(Schedule.objects.values_list("name", "func")) == SCHEDULES  # from migrate's post_migrate
    assert settings.BATCHSITE_LEASE_SECONDS >= 15, "run with the default lease: a short one proves nothing"
    sim = simulator("--latency-ms", str(int(LATENCY * 1000)))
    first = production_cluster()
    n = 400
    job = make_job(write, owner, make_endpoint(sim.base_url, concurrency=10), n)
    wait_until(lambda: Job.objects.get(pk=job.pk).n_succeeded >= 100, 60, message="progress before the crash")
    first.kill()  # SIGKILL to the whole process group: no clean-up of any kind
    killed_at = time.time()
    held = set(job.items.filter(status=Item.Status.RUNNING).values_list("custom_id", flat=True))
    done = Job.objects.get(pk=job.pk).n_succeeded
    assert held and done < n

    production_cluster()  # at once: the dead cluster's leases are as fresh as they can be
    restarted = time.monotonic()
    wait_until(lambda: Job.objects.get(pk=job.pk).n_succeeded > done, 30, 0.2, "the job to resume")
    resumed_after = time.monotonic() - restarted
    print(f"resumed {resumed_after:.1f} s after the restart")
    wait_until(lambda: Job.objects.get(pk=job.pk).status == Job.Status.COMPLETED, 90, message="the job to complete")
    job.refresh_from_db()
    assert (job.n_succeeded, job.n_failed, job.items.count()) == (n, 0, n)
    assert answers(job) == {f"req-{i}": f"Echo: Question {i}" for i in range(n)}  # one result per item

    sent = sends(sim)
    assert set(sent) == {f"req-{i}" for i in range(n)}
    twice = {custom_id for custom_id, times in sent.items() if len(times) > 1}
    # At least once: only what the dead cluster held may go again, once, and only after it died.
    assert twice <= held, twice - held
    assert all(len(sent[c]) == 2 and sent[c][1] - LATENCY > killed_at for c in twice)
    assert not overlapping(sent, LATENCY)


def test_two_live_clusters_never_send_an_item_twice(production_cluster, simulator, write, owner):
    """Both clusters run the job's slices (handed over every 5 s, from one to the other), and requests
    that take longer than a lease keep theirs: each item is sent exactly once."""
    sim = simulator("--latency-ms", str(int(LATENCY * 1000)))
    production_cluster(BATCHSITE_SLICE_SECONDS="5")
    production_cluster(BATCHSITE_SLICE_SECONDS="5")
    n = 400
    job = make_job(write, owner, make_endpoint(sim.base_url, concurrency=10), n)
    wait_until(lambda: Job.objects.get(pk=job.pk).n_succeeded >= 100, 60, message="progress")
    slow = settings.BATCHSITE_LEASE_SECONDS * 1.7
    sim.configure(latency_ms=slow * 1000)  # what is sent now outlives its lease, unless heartbeats renew it
    time.sleep(1.5)
    sim.configure(latency_ms=LATENCY * 1000)
    wait_until(lambda: Job.objects.get(pk=job.pk).status == Job.Status.COMPLETED, 120, message="the job to complete")
    job.refresh_from_db()
    assert (job.n_succeeded, job.items.count()) == (n, n)
    sent = sends(sim)
    # No fault, so each item goes exactly once: no two sends of one at the same time (nor one after another).
    # Answer times alone cannot show the overlap here, as the slow requests were in flight for longer.
    assert {c: len(times) for c, times in sent.items() if len(times) != 1} == {}
    assert len(sent) == n
    assert len(answers(job)) == n
    # The slow ones were there, and kept their leases to the end (else their results were another send's).
    assert job.items.filter(latency_ms__gte=settings.BATCHSITE_LEASE_SECONDS * 1000).count() >= 5


@pytest.mark.django_db
def test_sweeps_side_by_side_restart_a_stalled_job_once(write, owner, monkeypatch):
    """Every worker of every cluster sweeps: two that find the same stalled job start one new generation."""
    enqueued = []
    monkeypatch.setattr("jobs.queue.async_task", lambda func, *args, **options: enqueued.append(args))
    job = make_job(write, owner, make_endpoint("http://127.0.0.1:9/v1"), 3, start=False)
    long_ago = timezone.now() - timedelta(minutes=10)
    Job.objects.filter(pk=job.pk).update(
        status=Job.Status.RUNNING,
        heartbeat_at=long_ago,
        slice_gen=1,
        slice_enqueued_at=long_ago,
        slice_picked_at=long_ago,
    )
    seen_by_one, seen_by_other = tasks._orphans(timezone.now()), tasks._orphans(timezone.now())
    assert seen_by_one == seen_by_other == [(job.pk, 1)]
    assert [Job.start_slices(*seen_by_one[0]), Job.start_slices(*seen_by_other[0])] == [True, False]
    assert {gen for _, _, gen, _ in enqueued} == {2}
    assert tasks.sweep()["restarted"] == []
