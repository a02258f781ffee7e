"""Token-per-minute pacing in the server's currency: Batchsite next to a plain asyncio.gather, on a simulator
that charges a TPM budget.

For each way the simulator counts a prompt (`--token-count chars`: a token per four characters, OpenAI's
estimate and Batchsite's; `tokenizer`: the exact o200k count, which Batchsite has to learn), on a throwaway
data dir and SQLite database, the scenario of tests/test_engine_cluster.py's TPM test: N chat requests of
mixed sizes (prompts of 3 to 2,500 words, max_tokens 50 to 400, seed 1), simulator latency 50 ms,
`--tpm T --start-empty` (the bucket is empty when the first request arrives). Each run gets a fresh simulator:
  - gather: asyncio.gather + Semaphore(100) over AsyncOpenAI(max_retries=8), in this process, before the
    cluster exists;
  - Batchsite: ingest + job.start() here, run by a real `manage.py qcluster` (warmed up on an unlimited
    simulator), timed from start() to the Job row reading completed; endpoint concurrency 100, told nothing
    of the limit.
From each simulator's request log: % of the TPM cap (what the server charged answered requests, by its own
rule, per minute, from 8 s on and from the first answer), 429s / sends, wall time against the ideal (every
token charged / TPM x 60 s); for Batchsite also the ratio it learned (Endpoint.learned_token_ratio).

    .venv/bin/python bench/ratelimit.py [--requests 700] [--tpm 900000]

Targets (the test's): Batchsite 97-103% of the cap from 8 s on, 429s under 1% of sends.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import random
import shutil
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _setup import django_in_tempdir
from throughput import (
    STARTED,
    CpuMeter,
    Server,
    Simulator,
    _terminate,
    cluster_env,
    loadavg,
    print_cpu,
    run_job,
    start,
    stop_all,
)

RULES = ("chars", "tokenizer")
LATENCY_MS = 50
CONCURRENCY = 100
WORKERS = 2  # qcluster processes, as in the test
SETTLE = 8  # seconds: by then the ratio has had three looks (CALIBRATE_SECONDS apart) at the server's count
WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches at dawn".split()


def mixed_requests(n: int, seed: int = 1) -> list[tuple[str, int]]:
    """(prompt, max_tokens) as tests/test_engine_cluster.py makes them: prompts from tens to a few thousand
    tokens, output budgets from 50 to 400."""
    rng = random.Random(seed)
    made = []
    for i in range(n):
        words = rng.choice([3, 20, 60, 250, 1200, 2500])
        text = f"Request {i}: " + " ".join(rng.choice(WORDS) for _ in range(words))
        made.append((text, rng.choice([50, 100, 200, 400])))
    return made


def chat(text: str, most: int) -> dict:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}], "max_tokens": most}


def per_minute(times: list[float], amounts: list[int], settle: float) -> float:
    """Tokens a minute between the first and last answer after `settle` seconds (the first's tokens were
    earned before the span began, so they do not count); nan with fewer than two answers."""
    pairs = sorted(zip(times, amounts))
    steady = [(t, a) for t, a in pairs if t >= pairs[0][0] + settle]
    if len(steady) < 2:  # a run that gave up before then
        return float("nan")
    return (sum(a for _, a in steady) - steady[0][1]) / (steady[-1][0] - steady[0][0]) * 60


def measure(log: Path, charged: dict[str, int], tpm: int, wall: float) -> dict:
    """Figures of one run from the simulator's log; `charged` maps a request's marker to the server's charge."""
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r["marker"] in charged]  # not the start-up's /_sim/stats
    answered = [r for r in rows if r["status"] == 200]
    times, amounts = [r["t"] for r in answered], [charged[r["marker"]] for r in answered]
    return {
        "steady": per_minute(times, amounts, SETTLE) / tpm,
        "whole": per_minute(times, amounts, 0) / tpm,
        "sends": len(rows),
        "limited": sum(r["status"] == 429 for r in rows),
        "lost": len(charged) - len({r["marker"] for r in answered}),
        "wall": wall,
    }


def simulator(data_dir: Path, name: str, tpm: int, rule: str) -> tuple[Simulator, Path]:
    log = data_dir / f"{name}.jsonl"
    limits = ["--tpm", str(tpm), "--start-empty", "--token-count", rule]
    return start(Simulator, data_dir, LATENCY_MS, *limits, "--log", str(log)), log


def finish(server: Server) -> None:
    """Stop a run's simulator at once: an idle server still costs CPU the next run may want."""
    server.stop()
    STARTED.remove(server)


async def gather(base_url: str, bodies: list[dict]) -> None:
    import openai

    semaphore = asyncio.Semaphore(CONCURRENCY)
    async with openai.AsyncOpenAI(base_url=base_url, api_key="x", max_retries=8) as client:

        async def one(body: dict) -> None:
            async with semaphore:
                await client.chat.completions.create(**body)

        await asyncio.gather(*(one(b) for b in bodies), return_exceptions=True)  # lost ones: from the log


def percent(share: float) -> str:
    return "-" if math.isnan(share) else f"{share:.1%}"


def show(label: str, m: dict, ideal: float, ratio: str = "") -> None:
    print(
        f"  {label:<20} {percent(m['steady']):>7} {percent(m['whole']):>8}   {m['limited']:>5} / {m['sends']:<5} "
        f"{m['limited'] / m['sends']:>6.1%}  {m['wall']:>6.1f} s  {m['wall'] / ideal:>5.2f}x  {m['lost']:>4}  {ratio}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=700)
    parser.add_argument("--tpm", type=int, default=900_000)
    args = parser.parse_args()

    signal.signal(signal.SIGTERM, _terminate)
    os.environ["BATCHSITE_WORKERS"] = str(WORKERS)  # job.start() here: as many slices as the cluster's workers
    os.environ.pop("BATCHSITE_SLICES_PER_JOB", None)
    data_dir = django_in_tempdir("batchsite-ratelimit-")
    logging.getLogger("django-q").setLevel(logging.WARNING)
    db_path = Path(os.environ.get("BATCHSITE_SQLITE_PATH") or data_dir / "batchsite.sqlite3")

    from simulator.tokenizer import count_tokens

    made = mixed_requests(args.requests)
    bodies = [chat(text, most) for text, most in made]
    charge_rules = {"chars": lambda text: -(-len(text) // 4), "tokenizer": count_tokens}
    # What the server charges each request, by its rule, keyed by the marker its log shows (the prompt's start).
    charged = {rule: {text[:100]: count(text) + most for text, most in made} for rule, count in charge_rules.items()}
    ideal = {rule: sum(charged[rule].values()) / args.tpm * 60 for rule in RULES}
    print(
        f"TPM pacing: {args.requests:,} mixed chat requests, simulator latency {LATENCY_MS} ms, --tpm {args.tpm:,} "
        f"--start-empty, concurrency {CONCURRENCY}; data dir {data_dir}"
    )
    print(f"  load average at start: {loadavg()}")
    results: dict[tuple[str, str], dict] = {}
    ok = False
    try:
        warm = start(Simulator, data_dir, LATENCY_MS)  # no limit: warm-ups must not touch a measured budget
        asyncio.run(gather(warm.base_url, bodies[:CONCURRENCY]))  # the SDK's imports and models, untimed

        # 1. The gather, with no cluster on the machine yet.
        for rule in RULES:
            sim, log = simulator(data_dir, f"gather-{rule}", args.tpm, rule)
            with CpuMeter(sim, None) as meter:
                started = time.perf_counter()
                asyncio.run(gather(sim.base_url, bodies))
                wall = time.perf_counter() - started
            finish(sim)
            results["gather", rule] = measure(log, charged[rule], args.tpm, wall)
            print(f"  gather, {rule}: done in {wall:.1f} s (ideal {ideal[rule]:.1f} s)")
            print_cpu(meter, args.requests)

        # 2. Batchsite: a warm cluster, then a fresh endpoint per rule (nothing learned carries over).
        from django.contrib.auth.models import User

        from jobs.engine import tasks
        from jobs.models import Endpoint

        owner = User.objects.create_user("bench")

        def endpoint(name: str, base_url: str) -> Endpoint:
            row = Endpoint(name=name, base_url=base_url, concurrency=CONCURRENCY)
            row.set_api_key("sk-bench-simulator-key")
            row.save()
            return row

        def jsonl(name: str, rows: list[dict]) -> Path:
            path = data_dir / f"{name}.jsonl"
            lines = [
                {"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions", "body": b}
                for i, b in enumerate(rows)
            ]
            path.write_text("".join(json.dumps(line) + "\n" for line in lines))
            return path

        tasks.ensure_schedules()  # as `manage.py prepare` does in production: the sweeper runs too
        cluster = start(Server, ["qcluster"], data_dir / "qcluster.out", cluster_env(data_dir, db_path, WORKERS))
        warm_endpoint = endpoint("warm-up", warm.base_url)
        for _ in range(2):  # each round runs a slice per worker: imports, connections, first queries done
            run_job(jsonl("warmup", bodies[: 2 * CONCURRENCY]), owner, warm_endpoint, cluster, 120)
        finish(warm)
        time.sleep(1.5)  # the slices' successors and finalization settle: the cluster is idle
        path = jsonl("mixed", bodies)
        for rule in RULES:
            sim, log = simulator(data_dir, f"batchsite-{rule}", args.tpm, rule)
            row = endpoint(f"simulator {rule}", sim.base_url)
            with CpuMeter(sim, cluster) as meter:
                r = run_job(path, owner, row, cluster, 600)
            finish(sim)
            row.refresh_from_db()
            results["batchsite", rule] = {
                **measure(log, charged[rule], args.tpm, r["run_s"]),
                "ratio": row.learned_token_ratio,
                "learned_tpm": row.learned_tpm,
            }
            print(f"  Batchsite, {rule}: done in {r['run_s']:.1f} s (ingest {r['ingest_s']:.2f} s before start())")
            print_cpu(meter, args.requests)

        print(
            f"  {'run':<20} {'cap 8s+':>7} {'cap all':>8}   {'429s / sends':<13} {'share':>6}  {'wall':>8}  "
            f"{'/ideal':>6}  {'lost':>4}  learned"
        )
        for rule in RULES:
            b = results["batchsite", rule]
            print(f"  {rule}: ideal at the cap {ideal[rule]:.1f} s ({sum(charged[rule].values()):,} tokens charged)")
            show(f"gather {rule}", results["gather", rule], ideal[rule])
            show(f"Batchsite {rule}", b, ideal[rule], f"ratio {b['ratio']}, tpm {b['learned_tpm']}")
        for rule in RULES:
            b, g = results["batchsite", rule], results["gather", rule]
            share = (b["limited"] / b["sends"]) / (g["limited"] / g["sends"]) if g["limited"] else float("nan")
            print(
                f"  {rule}: Batchsite 429 share / gather's {share:.3f}; time / ideal: Batchsite {b['wall'] / ideal[rule]:.2f}, "
                f"gather {g['wall'] / ideal[rule]:.2f} (it lost {g['lost']} of {args.requests})   "
                f"target: cap 8s+ 97-103% (is {percent(b['steady'])}), 429s < 1% (is {b['limited'] / b['sends']:.2%})"
            )
        print(f"  load average after: {loadavg()}")
        ok = True
    finally:
        stop_all()
    if ok:  # on failure the data dir stays, with the logs
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
