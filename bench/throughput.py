"""Live-engine throughput against the simulator, next to a raw HTTP client and a plain AsyncOpenAI
script, and worker memory.

Everything runs for real, on a throwaway data dir and SQLite database:
  - `manage.py simulate_openai` in a subprocess (200 ms latency by default);
  - ceiling: a raw aiohttp client (one session, a connection per concurrent request, JSON in and
    out), in this process, before the cluster exists (so nothing shares the CPU with it);
  - baseline: asyncio.gather + Semaphore(C) over AsyncOpenAI(max_retries=0).chat.completions.create,
    likewise;
  - Batchsite through /v1, as a user runs it: gunicorn (as `make run` starts it) and a real
    `manage.py qcluster` (BATCHSITE_WORKERS=2), both warmed up before the clock starts; the official
    SDK uploads the JSONL (files.create) and creates the batch (batches.create, which validates and
    ingests it); timed from the upload to the Job row reading `completed`, every result stored
    (polled every 0.1 s). Also: batches.create -> the first request reaching the simulator;
  - memory: a 50,000-item job at low latency through the same cluster, with the RSS of every
    qcluster process sampled every 0.2 s from /proc.
CPU per request of the simulator, the cluster processes and this process is read from /proc for
each phase, with the CPU used by everything else on the machine (to spot a disturbed run).

    .venv/bin/python bench/throughput.py [--items 5000] [--latency-ms 200] [--concurrency 100]
                                         [--memory-items 50000] [--memory-latency-ms 20]
                                         [--workers 2] [--keep] [--py-spy FILE]

Targets: Batchsite through /v1 >= 0.95 of the raw client; batches.create -> first request upstream
<= 300 ms; largest worker peak RSS <= 250 MB.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _setup import ROOT, django_in_tempdir

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024
USER_PROMPT = (
    "Review #{i}: The blender arrived two days late and the lid cracked, "
    "but support replaced it quickly. Is this customer happy? Explain briefly."
)


def body(i: int) -> dict:
    return {
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system", "content": "You are a careful analyst. Answer in one short paragraph."},
            {"role": "user", "content": USER_PROMPT.format(i=i)},
        ],
        "max_tokens": 200,
        "temperature": 0.2,
    }


def make_file(path: Path, n: int) -> Path:
    with open(path, "w") as f:
        for i in range(n):
            line = {"custom_id": f"review-{i}", "method": "POST", "url": "/v1/chat/completions", "body": body(i)}
            f.write(json.dumps(line) + "\n")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- /proc readings ---------------------------------------------------------------------------


def proc_stat(pid: int) -> tuple[int, float] | None:
    """(process group, CPU seconds) of a live process, None if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None
    return int(fields[2]), (int(fields[11]) + int(fields[12])) / CLK_TCK


def group_pids(pgid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = proc_stat(int(entry))
            if stat and stat[0] == pgid:
                pids.append(int(entry))
    return pids


def rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/statm") as f:  # cheaper than status; field 2 is VmRSS in pages
            return int(f.read().split()[1]) * PAGE_KB / 1024
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def system_cpu_seconds() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine (all cores), from /proc/stat. Steal is time the
    hypervisor gave to other guests: the cores were not ours, so it is counted apart from busy."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = values[:8]
    return (user + nice + system + irq + softirq) / CLK_TCK, steal / CLK_TCK


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class CpuMeter:
    """CPU used during a phase by: the simulator, the cluster (every process of its group), this
    process, and everything else on the machine."""

    def __init__(self, sim: Server, cluster: Server | None):
        self.sim, self.cluster = sim, cluster

    def _read(self) -> dict:
        cluster = {}
        if self.cluster:
            for pid in group_pids(self.cluster.pid):
                stat = proc_stat(pid)
                if stat:
                    cluster[pid] = stat[1]
        return {
            "sim": (proc_stat(self.sim.pid) or (0, 0.0))[1],
            "cluster": cluster,
            "self": own_cpu(),
            "system": system_cpu_seconds(),
            "wall": time.perf_counter(),
        }

    def __enter__(self):
        self.start = self._read()
        return self

    def __exit__(self, *exc):
        self.end = self._read()

    def split(self) -> dict:
        a, b = self.start, self.end
        cluster = {pid: cpu - a["cluster"].get(pid, 0.0) for pid, cpu in b["cluster"].items()}
        out = {
            "sim": b["sim"] - a["sim"],
            "cluster": sum(cluster.values()),
            "self": b["self"] - a["self"],
            "wall": b["wall"] - a["wall"],
            "per_pid": cluster,
        }
        out["other"] = max(0.0, (b["system"][0] - a["system"][0]) - out["sim"] - out["cluster"] - out["self"])
        out["steal"] = b["system"][1] - a["system"][1]
        return out


def print_cpu(meter: CpuMeter, requests: int, indent: str = "    ") -> None:
    s = meter.split()
    parts = [f"simulator {s['sim'] * 1000 / requests:.2f}"]
    if meter.cluster:
        parts.append(f"qcluster {s['cluster'] * 1000 / requests:.2f}")
    parts.append(f"bench process {s['self'] * 1000 / requests:.2f}")
    total = s["sim"] + s["cluster"] + s["self"]
    print(
        f"{indent}CPU ms/request: {', '.join(parts)}  (sum {total * 1000 / requests:.2f});  "
        f"machine {100 * (total + s['other']) / s['wall']:.0f}% of 200%, "
        f"other processes {100 * s['other'] / s['wall']:.0f}%, hypervisor steal {100 * s['steal'] / s['wall']:.0f}%"
        + ("   <- DISTURBED: re-run on a quiet machine" if s["other"] + s["steal"] > 0.15 * s["wall"] else "")
    )
    if meter.cluster:
        busy = sorted(((cpu, pid) for pid, cpu in s["per_pid"].items()), reverse=True)
        print(f"{indent}qcluster CPU s by pid: " + ", ".join(f"{pid}: {cpu:.2f}" for cpu, pid in busy if cpu >= 0.01))


# --- subprocesses -----------------------------------------------------------------------------


class Server:
    """`manage.py ARGS` in its own process group, so stopping it takes its children too."""

    def __init__(self, args: list[str], log: Path, env: dict | None = None, program: tuple = ("manage.py",)):
        self.log_path = log
        self.log = open(log, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, *program, *args],
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            stdout=self.log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.pid = self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(grace)
                break
            except subprocess.TimeoutExpired:
                continue
        try:  # anything of the group left behind by the parent
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.log.close()

    def tail(self, n: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])


class Simulator(Server):
    def __init__(self, data_dir: Path, latency_ms: float, *extra: str):
        self.port = free_port()
        super().__init__(
            ["simulate_openai", "--port", str(self.port), "--latency-ms", str(latency_ms), *extra],
            data_dir / "simulator.out",
        )
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        deadline = time.monotonic() + 30
        while True:
            try:
                self.stats()
                return
            except urllib.error.HTTPError:  # it answers (/healthz says 503 until a cluster is up)
                return
            except OSError:
                if not self.alive() or time.monotonic() > deadline:
                    raise SystemExit("the simulator did not start:\n" + self.tail()) from None
                time.sleep(0.1)

    def _call(self, path: str, payload=None):
        data = json.dumps(payload).encode() if payload is not None else None
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}",
            data=data,
            method="POST" if data else "GET",
            headers={"content-type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def stats(self) -> dict:
        return self._call("/_sim/stats")

    def reset(self) -> None:
        self._call("/_sim/reset", {})

    def configure(self, **values) -> None:
        self._call("/_sim/config", values)


class WebServer(Server):
    """gunicorn with the options `make run` uses, on the bench's database."""

    def __init__(self, data_dir: Path, env: dict):
        self.port = free_port()
        super().__init__(
            ["--config", str(ROOT / "gunicorn.conf.py"), "--bind", f"127.0.0.1:{self.port}"],
            data_dir / "web.out",
            env,
            program=("-m", "gunicorn"),
        )
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=5):
                    return
            except urllib.error.HTTPError:  # it answers (/healthz says 503 until a cluster is up)
                return
            except OSError:
                if not self.alive() or time.monotonic() > deadline:
                    raise SystemExit("the web server did not start:\n" + self.tail()) from None
                time.sleep(0.1)


def cluster_env(data_dir: Path, db_path: Path, workers: int) -> dict:
    return {
        "BATCHSITE_SQLITE_PATH": str(db_path),
        "BATCHSITE_DATA_DIR": str(data_dir),
        "BATCHSITE_WORKERS": str(workers),
        "OPENAI_API_KEY": "",
        "OPENAI_BASE_URL": "",
        "LOG_LEVEL": "WARNING",
    }


STARTED: list[Server] = []


def start(server_class, *args, **kwargs):
    server = server_class(*args, **kwargs)
    STARTED.append(server)
    return server


def stop_all() -> None:
    while STARTED:
        STARTED.pop().stop()


def _terminate(signum, frame):
    raise SystemExit(128 + signum)  # unwinds through the finally that stops the subprocesses


# --- the runs ---------------------------------------------------------------------------------


async def _baseline(base_url: str, bodies: list[dict], concurrency: int, retries: int = 0) -> int:
    """A plain asyncio.gather over AsyncOpenAI with the SDK's own retries; returns the requests lost."""
    import openai

    semaphore = asyncio.Semaphore(concurrency)
    async with openai.AsyncOpenAI(base_url=base_url, api_key="x", max_retries=retries) as client:

        async def one(i: int, request: dict) -> bool:
            async with semaphore:
                answer = await client.chat.completions.create(**request)
            return answer.choices[0].message.content.endswith(USER_PROMPT.format(i=i))

        results = await asyncio.gather(*(one(i, b) for i, b in enumerate(bodies)), return_exceptions=True)
    return sum(1 for r in results if r is not True)


async def _raw(base_url: str, bodies: list[dict], concurrency: int) -> int:
    import aiohttp

    semaphore = asyncio.Semaphore(concurrency)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, headers={"Authorization": "Bearer x"}) as session:

        async def one(i: int, request: dict) -> bool:
            async with semaphore, session.post(base_url + "/chat/completions", json=request) as response:
                answer = await response.json()
            return answer["choices"][0]["message"]["content"].endswith(USER_PROMPT.format(i=i))

        results = await asyncio.gather(*(one(i, b) for i, b in enumerate(bodies)), return_exceptions=True)
    return sum(1 for r in results if r is not True)


def run_raw(sim: Simulator, n: int, concurrency: int) -> float:
    """The ceiling: the same requests from a raw aiohttp client, nothing but HTTP and JSON."""
    asyncio.run(_raw(sim.base_url, [body(i) for i in range(2 * concurrency)], concurrency))
    bodies = [body(i) for i in range(n)]
    sim.reset()
    with CpuMeter(sim, None) as meter:
        started = time.perf_counter()
        failures = asyncio.run(_raw(sim.base_url, bodies, concurrency))
        elapsed = time.perf_counter() - started
    rate = n / elapsed
    print(
        f"  raw aiohttp client, {concurrency} connections: {n:,} requests in {elapsed:.2f} s = {rate:.0f} req/s"
        + (f"  FAILED {failures}" if failures else "")
    )
    print_cpu(meter, n)
    return rate


def run_api_job(path: Path, web: WebServer, token: str, sim: Simulator, cluster: Server, timeout: float) -> dict:
    """Through /v1 as a user does it: files.create -> batches.create -> every result stored (the Job
    row reads completed; polled every 0.1 s)."""
    import openai

    from jobs.models import Batch, Job

    client = openai.OpenAI(base_url=web.base_url, api_key=token, max_retries=0, timeout=600)
    t0 = time.perf_counter()
    with open(path, "rb") as f:
        upload = client.files.create(file=f, purpose="batch")
    t_uploaded, wall_create = time.perf_counter(), time.time()
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
    t_created = time.perf_counter()
    job_id = Batch.objects.filter(public_id=batch.id).values_list("job_id", flat=True).get()
    status = wait_job(job_id, timeout, cluster=cluster)
    t_done = time.perf_counter()
    job = Job.objects.get(pk=job_id)
    assert status == Job.Status.COMPLETED, f"job ended {status}: {job.status_reason} {job.counts()}"
    first = sim.stats()["first_arrival"]
    client.close()
    return {
        "job": job,
        "upload_s": t_uploaded - t0,
        "create_s": t_created - t_uploaded,
        "total_s": t_done - t0,
        "first_request_s": (first - wall_create) if first else math.nan,
        "started_at": t0,
        "done_at": t_done,
    }


def run_baseline(sim: Simulator, n: int, concurrency: int) -> float:
    # Warm-up, untimed, as the cluster gets: the SDK's imports and pydantic models built once.
    asyncio.run(_baseline(sim.base_url, [body(i) for i in range(2 * concurrency)], concurrency))
    bodies = [body(i) for i in range(n)]
    sim.reset()
    with CpuMeter(sim, None) as meter:
        started = time.perf_counter()
        failures = asyncio.run(_baseline(sim.base_url, bodies, concurrency))
        elapsed = time.perf_counter() - started
    stats = sim.stats()
    rate = n / elapsed
    print(
        f"  baseline AsyncOpenAI gather+Semaphore({concurrency}): {n:,} requests in {elapsed:.2f} s = "
        f"{rate:.0f} req/s  (simulator saw {stats['total']:,}, max in flight {stats['max_in_flight']})"
        + (f"  FAILED {failures}" if failures else "")
    )
    print_cpu(meter, n)
    return rate


def wait_job(job_id: int, timeout: float, interval: float = 0.1, cluster: Server | None = None) -> str:
    from jobs.models import Job

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = Job.objects.filter(pk=job_id).values_list("status", flat=True).first()
        if status in Job.FINISHED or status == Job.Status.PAUSED:
            return status
        if cluster is not None and not cluster.alive():
            raise SystemExit("the cluster died:\n" + cluster.tail())
        time.sleep(interval)
    raise SystemExit(f"job {job_id} still {status} after {timeout:.0f} s")


def run_job(path: Path, owner, endpoint, cluster: Server, timeout: float) -> dict:
    """ingest -> start -> completed, timed; the Job row is polled every 0.1 s."""
    from jobs import ingest
    from jobs.models import Job

    t0 = time.perf_counter()
    plan = ingest.validate(path)
    assert plan.ok, plan.errors[:3]
    job = ingest.create_job(plan, owner=owner, endpoint=endpoint)
    t_created = time.perf_counter()
    job.start()  # outside a transaction: the slice tasks are enqueued now
    status = wait_job(job.pk, timeout, cluster=cluster)
    t_done = time.perf_counter()
    job = Job.objects.get(pk=job.pk)
    assert status == Job.Status.COMPLETED, f"job ended {status}: {job.status_reason} {job.counts()}"
    return {
        "job": job,
        "ingest_s": t_created - t0,
        "run_s": t_done - t_created,
        "total_s": t_done - t0,
        "started_at": t_created,
        "done_at": t_done,
    }


class RssSampler(threading.Thread):
    """Peak RSS of every process in the cluster's group, sampled every `interval` seconds."""

    def __init__(self, pgid: int, interval: float = 0.2):
        super().__init__(daemon=True)
        self.pgid, self.interval = pgid, interval
        self.peak: dict[int, float] = {}
        self.samples = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            for pid in group_pids(self.pgid):
                mb = rss_mb(pid)
                if mb is not None and mb > self.peak.get(pid, 0.0):
                    self.peak[pid] = mb
            self.samples += 1
            self.done.wait(self.interval)

    def stop(self) -> None:
        self.done.set()
        self.join(5)


class SimSampler(threading.Thread):
    """The simulator's requests in flight and answered, every `interval` seconds: when the first request
    arrived, how full the concurrency was kept, when the last answer went out."""

    def __init__(self, sim: Simulator, interval: float = 0.1):
        super().__init__(daemon=True)
        self.sim, self.interval = sim, interval
        self.samples: list[tuple[float, int, int]] = []  # (perf_counter, in_flight, total)
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                stats = self.sim.stats()
                self.samples.append((time.perf_counter(), stats["in_flight"], stats["total"]))
            except OSError:
                pass
            self.done.wait(self.interval)

    def stop(self) -> None:
        self.done.set()
        self.join(5)

    def summary(self, t_start: float, t_end: float, n: int) -> str:
        busy = [(t, f, total) for t, f, total in self.samples if f > 0 or 0 < total < n]
        if not busy:
            return "no requests seen"
        first = next(t for t, f, total in self.samples if f > 0 or total > 0)
        last = next((t for t, f, total in self.samples if total >= n), busy[-1][0])
        steady = [f for t, f, total in busy if first + 0.5 <= t <= last - 0.5]
        mean = sum(steady) / len(steady) if steady else 0.0
        low = sum(1 for f in steady if f < 0.9 * max(f for _, f, _ in busy)) if steady else 0
        return (
            f"first request ~{first - t_start:.2f} s after start(), last answer ~{t_end - last:.2f} s before "
            f"'completed' was seen; in flight between: mean {mean:.0f}, "
            f"{100 * low / max(1, len(steady)):.0f}% of samples under 90% of the peak"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=5000)
    parser.add_argument("--latency-ms", type=float, default=200)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--memory-items", type=int, default=50_000, help="0 skips the memory run")
    parser.add_argument("--memory-latency-ms", type=float, default=20)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--keep", action="store_true", help="keep the data dir (DB, logs) after a successful run")
    parser.add_argument(
        "--py-spy",
        metavar="FILE",
        help="py-spy record the cluster (with --subprocesses, "
        "--threads) during the timed run into FILE: .json speedscope, .svg flamegraph, else "
        "collapsed stacks; costs some CPU",
    )
    args = parser.parse_args()

    signal.signal(signal.SIGTERM, _terminate)
    # job.start() runs here and enqueues BATCHSITE_SLICES_PER_JOB slices, which defaults to *this*
    # process's BATCHSITE_WORKERS, while each slice splits the endpoint's concurrency by the cluster's:
    # both sides must agree, or the job runs with a fraction of its concurrency.
    os.environ["BATCHSITE_WORKERS"] = str(args.workers)
    os.environ.pop("BATCHSITE_SLICES_PER_JOB", None)
    data_dir = django_in_tempdir("batchsite-throughput-")
    logging.getLogger("django-q").setLevel(logging.WARNING)  # no "Enqueued" line per slice task
    db_path = Path(os.environ.get("BATCHSITE_SQLITE_PATH") or data_dir / "batchsite.sqlite3")
    ideal = args.concurrency / (args.latency_ms / 1000)
    print(
        f"Throughput: {args.items:,} chat requests, concurrency {args.concurrency}, simulator latency "
        f"{args.latency_ms:.0f} ms (ideal {ideal:.0f} req/s); data dir {data_dir}"
    )
    print(f"  load average at start: {loadavg()}")
    try:
        sim = start(Simulator, data_dir, args.latency_ms)

        # 1. Ceiling and baseline, with no cluster on the machine yet.
        ceiling = run_raw(sim, args.items, args.concurrency)
        baseline = run_baseline(sim, args.items, args.concurrency)

        # 2. Batchsite through /v1: web server and cluster up and warm before the clock starts.
        from django.contrib.auth.models import User

        from jobs.engine import tasks
        from jobs.models import ApiToken, Endpoint

        owner = User.objects.create_user("bench")
        _, token = ApiToken.create_for(owner, "bench")
        endpoint = Endpoint(name="simulator", base_url=sim.base_url, is_default=True, concurrency=args.concurrency)
        endpoint.set_api_key("sk-bench-simulator-key")
        endpoint.save()
        tasks.ensure_schedules()  # as `manage.py prepare` does in production: the sweeper runs too
        env = cluster_env(data_dir, db_path, args.workers)
        cluster = start(Server, ["qcluster"], data_dir / "qcluster.out", env)
        web = start(WebServer, data_dir, env)
        warm = make_file(data_dir / "warmup.jsonl", 4 * args.concurrency)
        for _ in range(2):  # each round runs a slice per worker: imports, connections, first queries done
            run_api_job(warm, web, token, sim, cluster, 120)
        time.sleep(1.5)  # let the slices' successors / finalization settle: the cluster is idle
        print(
            f"  cluster warm: {len(group_pids(cluster.pid))} qcluster processes "
            f"(BATCHSITE_WORKERS={args.workers}), gunicorn up; load average {loadavg()}"
        )

        path = make_file(data_dir / "throughput.jsonl", args.items)
        sim.reset()
        spy = None
        if args.py_spy:
            fmt = {".json": "speedscope", ".svg": "flamegraph"}.get(Path(args.py_spy).suffix, "raw")
            spy = subprocess.Popen(
                [
                    str(ROOT / ".venv/bin/py-spy"),
                    "record",
                    "--pid",
                    str(cluster.pid),
                    "--subprocesses",
                    "--threads",
                    "--format",
                    fmt,
                    "--output",
                    args.py_spy,
                    "--rate",
                    "100",
                    "--nonblocking",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            time.sleep(1.0)
        flight = SimSampler(sim)
        flight.start()
        with CpuMeter(sim, cluster) as meter:
            r = run_api_job(path, web, token, sim, cluster, 600)
        flight.stop()
        if spy:
            spy.send_signal(signal.SIGINT)
            spy.wait(30)
        job, stats = r["job"], sim.stats()
        rate = args.items / r["total_s"]
        print(
            f"  Batchsite through /v1: {args.items:,} requests in {r['total_s']:.2f} s = {rate:.0f} req/s  "
            f"(files.create {r['upload_s']:.2f} s, batches.create {r['create_s']:.2f} s; batches.create -> "
            f"first request upstream {r['first_request_s'] * 1000:.0f} ms)"
        )
        print(
            f"    job: {job.n_succeeded:,} succeeded, {job.n_failed} failed; simulator saw {stats['total']:,}, "
            f"max in flight {stats['max_in_flight']}"
        )
        print("    " + flight.summary(r["started_at"], r["done_at"], args.items))
        print_cpu(meter, args.items)
        print(f"  ideal (concurrency / latency):        {ideal:.0f} req/s")
        print(f"  raw aiohttp client (ceiling):         {ceiling:.0f} req/s  ({ceiling / ideal:.0%} of ideal)")
        print(f"  AsyncOpenAI gather baseline:          {baseline:.0f} req/s  ({baseline / ideal:.0%} of ideal)")
        print(f"  Batchsite through /v1:                {rate:.0f} req/s  ({rate / ideal:.0%} of ideal)")
        print(f"  ratio Batchsite / raw client:         {rate / ceiling:.2f}   target >= 0.95")
        print(f"  ratio Batchsite / gather baseline:    {rate / baseline:.2f}")
        print(f"  batches.create -> first request:      {r['first_request_s'] * 1000:.0f} ms   target <= 300 ms")
        print(f"  load average after: {loadavg()}")

        # 3. Worker memory on a big job.
        if args.memory_items:
            sim.configure(latency_ms=args.memory_latency_ms)
            sim.reset()
            big = make_file(data_dir / "memory.jsonl", args.memory_items)
            time.sleep(1.0)
            sampler = RssSampler(cluster.pid)
            sampler.start()
            with CpuMeter(sim, cluster) as meter:
                r = run_job(big, owner, endpoint, cluster, 1800)  # straight to the models: no upload to time
            sampler.stop()
            job, stats = r["job"], sim.stats()
            cpu = meter.split()["per_pid"]
            workers = {pid for pid, seconds in cpu.items() if seconds > 1.0}
            print(
                f"Memory: {args.memory_items:,} requests, simulator latency {args.memory_latency_ms:.0f} ms: "
                f"{r['total_s']:.1f} s total (ingest {r['ingest_s']:.1f} s, run {r['run_s']:.1f} s = "
                f"{args.memory_items / r['run_s']:.0f} req/s), {job.n_succeeded:,} succeeded, "
                f"{job.n_failed} failed; simulator saw {stats['total']:,}, max in flight {stats['max_in_flight']} "
                f"(endpoint concurrency {args.concurrency}); {sampler.samples} RSS samples"
            )
            for pid, mb in sorted(sampler.peak.items(), key=lambda kv: -kv[1]):
                role = "parent" if pid == cluster.pid else ("worker" if pid in workers else "")
                print(f"    pid {pid:>7} {role:<7} peak RSS {mb:6.1f} MB  CPU {cpu.get(pid, 0.0):6.1f} s")
            worker_peak = max((mb for pid, mb in sampler.peak.items() if pid in workers), default=0.0)
            print(
                f"  largest worker peak RSS: {worker_peak:.0f} MB   target <= 250 MB"
                f"   (largest of any qcluster process {max(sampler.peak.values()):.0f} MB)"
            )
            print_cpu(meter, args.memory_items)
            print(f"  load average after: {loadavg()}")
    finally:
        stop_all()
    if args.keep:
        print(f"  data dir kept: {data_dir}")
    else:  # the 50,000 stored responses make it big; on failure it stays, with the logs
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
