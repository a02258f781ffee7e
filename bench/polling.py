"""What polling costs a running job: 30 API clients polling GET /v1/batches/{id} 5 times a second.

Everything runs for real on a throwaway data dir and SQLite database: the simulator (100 ms latency),
a `manage.py qcluster` (BATCHSITE_WORKERS=2) and gunicorn as `make run` starts it (gunicorn.conf.py).
A 2,000-request job runs alternately without and with the pollers (aiohttp, in this process), a few
rounds each; it prints the job's duration both ways (median) and the polls' latency percentiles.

    .venv/bin/python bench/polling.py [--items 2000] [--clients 30] [--rate 5] [--rounds 3]

Targets (issue 9): with polling the job takes <= 1.15x as long; poll p95 < 100 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import (
    ROOT,
    Server,
    Simulator,
    django_in_tempdir,
    free_port,
    group_pids,
    loadavg,
    make_file,
    proc_stat,
    run_job,
    start,
    stop_all,
    wait_job,
)


def group_cpu(pgid: int) -> float:
    return sum(stat[1] for pid in group_pids(pgid) if (stat := proc_stat(pid)))


class Gunicorn(Server):
    def __init__(self, data_dir: Path, env: dict):
        self.port = free_port()
        self.log_path = data_dir / "gunicorn.out"
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "--config", "gunicorn.conf.py", "--bind", f"127.0.0.1:{self.port}"],
            cwd=ROOT,
            env={**os.environ, **env},
            stdout=self.log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.pid = self.proc.pid
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=2).read()
                return
            except urllib.error.HTTPError:  # it answers (/healthz says 503 until a cluster is up)
                return
            except OSError:
                if not self.alive() or time.monotonic() > deadline:
                    raise SystemExit("gunicorn did not start:\n" + self.tail()) from None
                time.sleep(0.2)


class Pollers(threading.Thread):
    """`clients` coroutines, each polling `url` `rate` times a second until stopped; latencies in ms."""

    def __init__(self, url: str, token: str, clients: int, rate: float):
        super().__init__(daemon=True)
        self.url, self.token, self.clients, self.rate = url, token, clients, rate
        self.latencies: list[float] = []
        self.errors = 0
        self._done = threading.Event()

    def run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        import aiohttp

        headers = {"Authorization": f"Bearer {self.token}"}
        async with aiohttp.ClientSession(headers=headers, connector=aiohttp.TCPConnector(limit=0)) as session:
            await asyncio.gather(*(self._client(session, i) for i in range(self.clients)))

    async def _client(self, session, i: int) -> None:
        period = 1 / self.rate
        await asyncio.sleep(period * i / self.clients)  # spread out, as independent clients are
        next_at = time.monotonic()
        while not self._done.is_set():
            start = time.monotonic()
            try:
                async with session.get(self.url) as response:
                    await response.read()
                    if response.status != 200:
                        self.errors += 1
            except Exception:
                self.errors += 1
            self.latencies.append((time.monotonic() - start) * 1000)
            next_at += period
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    def stop(self) -> None:
        self._done.set()
        self.join(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=30)
    parser.add_argument("--rate", type=float, default=5, help="polls per second per client")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--latency-ms", type=float, default=100)
    args = parser.parse_args()

    os.environ["BATCHSITE_WORKERS"] = "2"
    os.environ.pop("BATCHSITE_SLICES_PER_JOB", None)
    data_dir = django_in_tempdir("batchsite-polling-")
    db_path = Path(os.environ.get("BATCHSITE_SQLITE_PATH") or data_dir / "batchsite.sqlite3")
    env = {"BATCHSITE_SQLITE_PATH": str(db_path), "BATCHSITE_DATA_DIR": str(data_dir)}
    print(
        f"Polling: a {args.items:,}-request job (simulator latency {args.latency_ms:.0f} ms, concurrency 100), "
        f"{args.clients} clients x {args.rate:g} polls/s on GET /v1/batches/{{id}}; data dir {data_dir}"
    )
    print(f"  load average at start: {loadavg()}")
    try:
        from django.contrib.auth.models import User

        from jobs import ingest
        from jobs.engine import tasks
        from jobs.models import ApiToken, Batch, Endpoint, File

        sim = start(Simulator, data_dir, args.latency_ms)
        owner = User.objects.create_user("bench")
        endpoint = Endpoint(name="simulator", base_url=sim.base_url, is_default=True, concurrency=100)
        endpoint.set_api_key("sk-bench-simulator-key")
        endpoint.save()
        tasks.ensure_schedules()
        cluster = start(Server, ["qcluster"], data_dir / "qcluster.out", {**env, "BATCHSITE_WORKERS": "2"})
        web = start(Gunicorn, data_dir, {**env, "DEBUG": "0"})
        _, token = ApiToken.create_for(owner, "bench")
        path = make_file(data_dir / "job.jsonl", args.items)
        run_job(make_file(data_dir / "warmup.jsonl", 400), owner, endpoint, cluster, 120)
        time.sleep(1.5)

        def timed_job(pollers_for=None) -> tuple[float, Pollers | None]:
            """Job created -> completed, in seconds; with pollers on its batch from a second before it starts."""
            job = ingest.create_job(ingest.validate(path), owner=owner, endpoint=endpoint)
            pollers = None
            if pollers_for:
                input_file = File.objects.create(
                    owner=owner, filename="job.jsonl", purpose=File.BATCH, path="job.jsonl"
                )
                batch = Batch.objects.create(job=job, input_file=input_file)
                pollers = Pollers(f"http://127.0.0.1:{web.port}/v1/batches/{batch.public_id}", token, *pollers_for)
                pollers.start()
                time.sleep(1)
            t0, cpu0 = time.perf_counter(), group_cpu(web.pid)
            job.start()
            status = wait_job(job.pk, 600, cluster=cluster)
            seconds = time.perf_counter() - t0
            if pollers:
                polls_then = len(pollers.latencies)
                pollers.stop()
                web_cpu.append((group_cpu(web.pid) - cpu0) * 1000 / max(polls_then, 1))
            assert status == "completed", status
            time.sleep(1)
            return seconds, pollers

        plain, polled, latencies, errors, web_cpu = [], [], [], 0, []
        for round_ in range(args.rounds):
            plain.append(timed_job()[0])
            seconds, pollers = timed_job((args.clients, args.rate))
            polled.append(seconds)
            latencies += pollers.latencies
            errors += pollers.errors
            print(
                f"  round {round_ + 1}: without polling {plain[-1]:.2f} s, with polling {polled[-1]:.2f} s "
                f"({len(pollers.latencies):,} polls)"
            )
        latencies.sort()
        p50, p95, p99 = (latencies[int(len(latencies) * q) - 1] for q in (0.5, 0.95, 0.99))
        ratio = statistics.median(polled) / statistics.median(plain)
        print(
            f"  job duration, median of {args.rounds}: without polling {statistics.median(plain):.2f} s, "
            f"with polling {statistics.median(polled):.2f} s = {ratio:.2f}x (target <= 1.15x)"
        )
        print(
            f"  {len(latencies):,} polls, {errors} errors: p50 {p50:.1f} ms, p95 {p95:.1f} ms, p99 {p99:.1f} ms "
            f"(target p95 < 100 ms); load average {loadavg()}"
        )
        print(f"  gunicorn CPU per poll (its processes, from /proc): {statistics.median(web_cpu):.2f} ms")
    finally:
        stop_all()


if __name__ == "__main__":
    main()
