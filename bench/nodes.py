"""Scale-out: one node with 1, 2 and 4 worker processes, and one node against two, on a latency-bound job.

Everything runs for real, on Postgres + Redis (throwaway servers of its own from scripts/services.sh,
unless DATABASE_URL and REDIS_URL are both set) and a throwaway data dir shared by the nodes:
  - `manage.py simulate_openai` in a subprocess: 500 ms an answer by default, no rate limit;
  - for each run, fresh `manage.py qcluster` nodes (BATCHSITE_WORKERS each), warmed up with a small job,
    then a timed job: from job.start() to the Job row reading `completed` (polled every 0.1 s);
  - every worker process gets the same share: the endpoint's concurrency is C x the processes in all and
    BATCHSITE_SLICES_PER_JOB is that number of processes, so each slice keeps C requests in flight
    (jobs/engine/slice.py); each run has `seconds` worth of items per process, so every run lasts as long.
Each run prints its rate, how full the concurrency was kept, the slices each node ran, CPU and the load
average; then the ratios against 1 worker and against 1 node, and a check of one result per item.

    .venv/bin/python bench/nodes.py [--latency-ms 500] [--concurrency 25] [--seconds 25] [--keep]

Target: two nodes of 2 workers >= 1.8x one node of 2 where the upstream allows it (here it has no limit).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _setup import ROOT, django_in_tempdir
from throughput import (
    STARTED,
    USER_PROMPT,
    Server,
    SimSampler,
    Simulator,
    _terminate,
    group_pids,
    loadavg,
    make_file,
    proc_stat,
    start,
    stop_all,
    system_cpu_seconds,
)

# Where our own Postgres and Redis live, away from the test suite's (5440/6390).
SERVICES_ENV = {
    "BATCHSITE_SERVICES_DIR": "/tmp/bs-nodes-svc",
    "BATCHSITE_PG_PORT": "5442",
    "BATCHSITE_REDIS_PORT": "6392",
}
RUNS = [  # (nodes, worker processes per node)
    (1, 1),
    (1, 2),
    (1, 4),
    (2, 2),
]


def services(action: str) -> None:
    """scripts/services.sh start|stop; `start` exports the DATABASE_URL and REDIS_URL it prints."""
    done = subprocess.run(
        ["bash", str(ROOT / "scripts/services.sh"), action],
        env={**os.environ, **SERVICES_ENV},
        capture_output=True,
        text=True,
    )
    if done.returncode:
        raise SystemExit(f"scripts/services.sh {action} failed:\n{done.stderr}")
    for line in done.stdout.splitlines():
        if line.startswith("export "):
            name, _, value = line.removeprefix("export ").partition("=")
            os.environ[name] = value


def node_env(data_dir: Path, workers: int, processes: int) -> dict:
    return {
        "BATCHSITE_DATA_DIR": str(data_dir),
        "BATCHSITE_WORKERS": str(workers),
        # Slices carry their count with them; this is for the sweeper's restarts, so that they agree.
        "BATCHSITE_SLICES_PER_JOB": str(processes),
        "OPENAI_API_KEY": "",
        "OPENAI_BASE_URL": "",
        "LOG_LEVEL": "WARNING",
    }


def stop_node(node: Server) -> None:
    """SIGTERM to the main process only, as systemd's KillMode=mixed does; then whatever is left."""
    node.proc.send_signal(signal.SIGTERM)
    try:
        node.proc.wait(30)
    except subprocess.TimeoutExpired:
        pass
    node.stop()
    STARTED.remove(node)


def cpu_seconds(pids: list[int]) -> float:
    return sum(stat[1] for stat in map(proc_stat, pids) if stat)


class Cpu:
    """CPU used during a run by the nodes (every process of their groups), the simulator, and the whole machine
    (which includes Postgres, Redis, this process and anything else running)."""

    def __init__(self, sim: Server, nodes: list[Server]):
        self.sim, self.nodes = sim, nodes

    def _read(self) -> tuple[float, float, float, float]:
        node_pids = [pid for node in self.nodes for pid in group_pids(node.pid)]
        return cpu_seconds(node_pids), cpu_seconds([self.sim.pid]), system_cpu_seconds()[0], time.perf_counter()

    def __enter__(self):
        self.start = self._read()
        return self

    def __exit__(self, *exc):
        self.end = self._read()

    def summary(self, requests: int) -> str:
        nodes, sim, machine, wall = (b - a for a, b in zip(self.start, self.end, strict=True))
        return (
            f"CPU ms/request: qcluster nodes {nodes * 1000 / requests:.2f}, simulator {sim * 1000 / requests:.2f}; "
            f"machine {100 * machine / wall:.0f}% of 200% (Postgres, Redis and the rest: "
            f"{100 * max(0.0, machine - nodes - sim) / wall:.0f}%)"
        )


def wait_finished(job_id: int, nodes: list[Server], timeout: float) -> None:
    from jobs.models import Job

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = Job.objects.filter(pk=job_id).values_list("status", flat=True).get()
        if status in Job.FINISHED or status == Job.Status.PAUSED:
            if status != Job.Status.COMPLETED:
                job = Job.objects.get(pk=job_id)
                raise SystemExit(f"job {job_id} ended {status}: {job.status_reason} {job.counts()}")
            return
        for node in nodes:
            if not node.alive():
                raise SystemExit("a node died:\n" + node.tail())
        time.sleep(0.1)
    raise SystemExit(f"job {job_id} still {status} after {timeout:.0f} s")


def run_job(path: Path, owner, endpoint, nodes: list[Server]) -> tuple[object, float, float]:
    """ingest, then job.start() -> completed; returns the job, when it started and the seconds it took."""
    from jobs import ingest

    plan = ingest.validate(path)
    assert plan.ok, plan.errors[:3]
    job = ingest.create_job(plan, owner=owner, endpoint=endpoint)
    started = time.perf_counter()
    job.start()  # outside a transaction: the slice tasks are enqueued now
    wait_finished(job.pk, nodes, 600)
    return job, started, time.perf_counter() - started


def one_result_each(job, n: int) -> str:
    """Every item has exactly one stored result, and it is the answer to its own request."""
    from jobs import export

    job.refresh_from_db()
    seen: dict[str, str] = {}
    for line in "".join(export.results_jsonl(job)).splitlines():
        record = json.loads(line)
        assert record["custom_id"] not in seen, f"{record['custom_id']} has two results"
        seen[record["custom_id"]] = record["response"]["body"]["choices"][0]["message"]["content"]
    assert (job.n_succeeded, job.n_failed, len(seen)) == (n, 0, n), (job.counts(), len(seen))
    wrong = [i for i in range(n) if not seen[f"review-{i}"].endswith(USER_PROMPT.format(i=i))]
    assert not wrong, f"{len(wrong)} items hold another request's answer, e.g. review-{wrong[0]}"
    return f"one result per item: {len(seen):,} of {n:,}"


def database_connections() -> int:
    """Connections to our database other than this process's own (nodes keep theirs open for 60 s)."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) - 1 FROM pg_stat_activity WHERE datname = current_database()")
        return cursor.fetchone()[0]


def describe(run: tuple[int, int]) -> str:
    nodes, workers = run
    return f"{nodes} node{'s' if nodes > 1 else ''} x {workers} worker{'s' if workers > 1 else ''}"


def measure(nodes_n: int, workers: int, args, sim: Simulator, owner, data_dir: Path) -> float:
    from django.conf import settings

    from jobs.models import Endpoint

    processes = nodes_n * workers
    label = describe((nodes_n, workers))
    # job.start() runs in this process: as many slices as worker processes in all, each with C of the concurrency.
    settings.BATCHSITE_SLICES_PER_JOB = processes
    endpoint = Endpoint(name=f"simulator {label}", base_url=sim.base_url, concurrency=args.concurrency * processes)
    endpoint.set_api_key("sk-bench-simulator-key")
    endpoint.save()
    env = node_env(data_dir, workers, processes)
    tag = f"{nodes_n}x{workers}"
    nodes = [start(Server, ["qcluster"], data_dir / f"node{k}-{tag}.out", env) for k in range(nodes_n)]
    try:
        warm = make_file(data_dir / f"warmup-{tag}.jsonl", 2 * args.concurrency * processes)
        run_job(warm, owner, endpoint, nodes)  # imports, connections and first queries done in every worker
        time.sleep(1.0)  # the slices' successors and the finalization settle: the nodes are idle

        ideal = processes * args.concurrency / (args.latency_ms / 1000)
        n = round(ideal * args.seconds)
        path = make_file(data_dir / f"run-{tag}.jsonl", n)
        sim.reset()
        flight = SimSampler(sim)
        flight.start()
        with Cpu(sim, nodes) as cpu:
            job, started, seconds = run_job(path, owner, endpoint, nodes)
        flight.stop()
        stats = sim.stats()
        rate = n / seconds
        slices = [node.log_path.read_text(errors="replace").count(f"processing job-{job.pk}-slice") for node in nodes]
        print(
            f"  {label}: {n:,} requests in {seconds:.2f} s = {rate:.1f} req/s ({rate / ideal:.0%} of the ideal "
            f"{ideal:.0f}); simulator saw {stats['total']:,}, max in flight {stats['max_in_flight']} "
            f"(concurrency {args.concurrency} x {processes}); slices run per node: {slices}"
        )
        print("    " + flight.summary(started, started + seconds, n))
        print("    " + cpu.summary(n))
        print(
            f"    {one_result_each(job, n)}; Postgres connections of the nodes: {database_connections()}; "
            f"load average after: {loadavg()}"
        )
        return rate
    finally:
        for node in nodes:
            stop_node(node)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--latency-ms", type=float, default=500)
    parser.add_argument("--concurrency", type=int, default=25, help="requests in flight per worker process")
    parser.add_argument("--seconds", type=float, default=25, help="ideal length of each timed run")
    parser.add_argument("--keep", action="store_true", help="keep the data dir (logs) after a successful run")
    args = parser.parse_args()

    signal.signal(signal.SIGTERM, _terminate)
    own_services = not (os.environ.get("DATABASE_URL") and os.environ.get("REDIS_URL"))
    data_dir = None
    try:
        if own_services:
            services("start")  # before Django reads its settings
        data_dir = django_in_tempdir("batchsite-nodes-")
        logging.getLogger("django-q").setLevel(logging.WARNING)  # no "Enqueued" line per slice task
        print(
            f"Nodes: a latency-bound job, simulator latency {args.latency_ms:.0f} ms and no rate limit, "
            f"{args.concurrency} requests in flight per worker process, ~{args.seconds:.0f} s of work per run; "
            f"Postgres + Redis ({'throwaway, ports 5442/6392' if own_services else 'DATABASE_URL, REDIS_URL'}); "
            f"data dir {data_dir}"
        )
        print(
            f"  This machine has {os.cpu_count()} cores, shared by the simulator, Postgres, Redis and every node: "
            f"the nodes are processes on one machine here. Latency-bound work scales while the CPU is not full."
        )
        print(f"  load average at start: {loadavg()}")
        from django.contrib.auth.models import User

        owner = User.objects.create_user("bench")
        sim = start(Simulator, data_dir, args.latency_ms)
        rates = {run: measure(*run, args, sim, owner, data_dir) for run in RUNS}

        print("  ratios:")
        for run, base, note in [
            ((1, 2), (1, 1), "ideal 2"),
            ((1, 4), (1, 1), "ideal 4"),
            ((2, 2), (1, 1), "ideal 4"),
            ((2, 2), (1, 2), "target >= 1.8"),
            ((2, 2), (1, 4), "the same processes: ideal 1"),
        ]:
            print(f"    {describe(run) + ' / ' + describe(base) + ':':<44} {rates[run] / rates[base]:.2f}   {note}")
        print(f"  load average at the end: {loadavg()}")
    finally:
        stop_all()
        if own_services:
            if data_dir is not None:
                from django.db import connections

                connections.close_all()
            services("stop")
    if args.keep:
        print(f"  data dir kept: {data_dir}")
    else:  # on failure it stays, with the nodes' logs
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
