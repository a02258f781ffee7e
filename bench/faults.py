"""Transient faults: Batchsite end to end next to a plain asyncio.gather with the SDK's own retries.

The issue's scenario, on the simulator: 2,000 chat requests, 100 ms latency, 20% answered 429
(Retry-After 1 s) and 10% answered 503, concurrency 100. In the same run, on a throwaway data dir:
  - gather: asyncio.gather + Semaphore(C) over AsyncOpenAI(max_retries=8) in this process, before
    the cluster exists; a request whose retries ran out is lost;
  - Batchsite through /v1: gunicorn and a real qcluster, warmed up first; the official SDK uploads
    the file and creates the batch; timed to the Job row reading `completed`; lost = requests that
    did not succeed (the job's default max attempts, 5).
For each: lost requests, seconds, and the simulator's audit of Retry-After (retries that came back
before the wait a 429 asked for, measured from the 429's answer to the retry's arrival).

    .venv/bin/python bench/faults.py [--items 2000] [--latency-ms 100] [--concurrency 100] [--seed 1]

Targets: Batchsite 0 lost, <= 8 s, faster than the gather; no Retry-After violation.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _setup import django_in_tempdir
from throughput import (
    CpuMeter,
    Server,
    Simulator,
    WebServer,
    _baseline,
    _terminate,
    body,
    cluster_env,
    loadavg,
    make_file,
    print_cpu,
    run_api_job,
    start,
    stop_all,
)


def tail(log: Path, since: float) -> str:
    """When the requests succeeded (from the simulator's log), and what the last one went through."""
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r["t"] >= since]
    done = sorted(r["t"] - since for r in rows if r["status"] == 200)
    if not done:
        return "no request succeeded"
    marks = ", ".join(f"{q:.0%} at {done[min(len(done) - 1, int(q * len(done)))]:.1f} s" for q in (0.5, 0.9, 0.99))
    last = max((r for r in rows if r["status"] == 200), key=lambda r: r["t"])["marker"]
    history = " ".join(f"{r['status']}@{r['t'] - since:.1f}" for r in rows if r["marker"] == last)
    return f"succeeded: {marks}, all at {done[-1]:.1f} s; the last one's answers: {history}"


def audit(stats: dict) -> str:
    worst = min((v["gap_ms"] / v["retry_after_ms"] for v in stats["retry_after_violation_details"]), default=None)
    return (
        f"{stats['retries_checked']:,} retries after a 429 checked, {stats['retry_after_violations']} came back "
        f"before their Retry-After" + (f" (shortest gap {worst:.0%} of the wait asked)" if worst is not None else "")
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--latency-ms", type=float, default=100)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--sdk-retries", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    signal.signal(signal.SIGTERM, _terminate)
    os.environ["BATCHSITE_WORKERS"] = str(args.workers)  # job.start() here: as many slices as the cluster's workers
    os.environ.pop("BATCHSITE_SLICES_PER_JOB", None)
    data_dir = django_in_tempdir("batchsite-faults-")
    logging.getLogger("django-q").setLevel(logging.WARNING)
    db_path = Path(os.environ.get("BATCHSITE_SQLITE_PATH") or data_dir / "batchsite.sqlite3")
    faults = [
        "--error-rate",
        "429=0.2",
        "--error-rate",
        "503=0.1",
        "--retry-after-ms",
        "1000",
        "--seed",
        str(args.seed),
    ]
    print(
        f"Faults: {args.items:,} chat requests, concurrency {args.concurrency}, simulator latency "
        f"{args.latency_ms:.0f} ms, 20% 429 (Retry-After 1 s) + 10% 503; data dir {data_dir}"
    )
    print(f"  load average at start: {loadavg()}")
    ok = False
    try:
        sim_log = data_dir / "simulator.jsonl"
        sim = start(Simulator, data_dir, args.latency_ms, *faults, "--log", str(sim_log))
        bodies = [body(i) for i in range(args.items)]

        # 1. The gather, with no cluster on the machine yet.
        asyncio.run(
            _baseline(sim.base_url, bodies[: 2 * args.concurrency], args.concurrency, args.sdk_retries)
        )  # warm-up
        sim.reset()
        with CpuMeter(sim, None) as meter:
            started, since = time.perf_counter(), time.time()
            gather_lost = asyncio.run(_baseline(sim.base_url, bodies, args.concurrency, args.sdk_retries))
            gather_s = time.perf_counter() - started
        stats = sim.stats()
        print(
            f"  gather, AsyncOpenAI(max_retries={args.sdk_retries}): {gather_lost} lost, {gather_s:.2f} s; "
            f"simulator saw {stats['total']:,} requests ({stats['by_status']})"
        )
        print(f"    {audit(stats)}")
        print(f"    {tail(sim_log, since)}")
        print_cpu(meter, args.items)

        # 2. Batchsite through /v1, warm.
        from django.contrib.auth.models import User

        from jobs.engine import tasks
        from jobs.models import ApiToken, Endpoint

        owner = User.objects.create_user("bench")
        _, token = ApiToken.create_for(owner, "bench")
        endpoint = Endpoint(name="simulator", base_url=sim.base_url, is_default=True, concurrency=args.concurrency)
        endpoint.set_api_key("sk-bench-simulator-key")
        endpoint.save()
        tasks.ensure_schedules()
        env = cluster_env(data_dir, db_path, args.workers)
        cluster = start(Server, ["qcluster"], data_dir / "qcluster.out", env)
        web = start(WebServer, data_dir, env)
        warm = make_file(data_dir / "warmup.jsonl", 2 * args.concurrency)
        for _ in range(2):  # as in throughput.py: each round runs a slice per worker
            run_api_job(warm, web, token, sim, cluster, 120)
        time.sleep(1.5)
        path = make_file(data_dir / "faults.jsonl", args.items)
        sim.reset()
        since = time.time()
        with CpuMeter(sim, cluster) as meter:
            r = run_api_job(path, web, token, sim, cluster, 600)
        job, stats = r["job"], sim.stats()
        lost = args.items - job.n_succeeded
        print(
            f"  Batchsite through /v1: {lost} lost ({job.n_failed} failed), {r['total_s']:.2f} s "
            f"(batches.create {r['create_s']:.2f} s, from its call to the first request upstream "
            f"{r['first_request_s'] * 1000:.0f} ms); simulator saw "
            f"{stats['total']:,} requests ({stats['by_status']})"
        )
        print(f"    {audit(stats)}")
        print(f"    {tail(sim_log, since)}")
        print_cpu(meter, args.items)
        print(f"  lost:    Batchsite {lost}, gather {gather_lost}   target: Batchsite 0")
        print(
            f"  seconds: Batchsite {r['total_s']:.2f}, gather {gather_s:.2f}  (Batchsite {gather_s / r['total_s']:.2f}x "
            f"as fast)   target: <= 8 s and faster than the gather"
        )
        print(f"  load average after: {loadavg()}")
        ok = True
    finally:
        stop_all()
    if ok:
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
