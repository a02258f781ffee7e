"""How many chat completions per second the OpenAI simulator sustains.

The simulator must never be what limits Batchsite's own benchmarks (about 500 req/s at
concurrency 100 against 200 ms latency, on 2 cores). It runs here in a subprocess, as
`simulate_openai` would, and is driven from this process by:
  1. a raw aiohttp client, latency 0 (the simulator's ceiling);
  2. AsyncOpenAI, latency 0 (what an SDK client can get out of it);
  3. the raw client at concurrency 100 against 200 ms latency (Batchsite's benchmark shape:
     the ideal is 100 / 0.2 s = 500 req/s).
Server and client CPU per request come from /proc and getrusage.

    .venv/bin/python bench/simulator.py [--requests 20000] [--concurrency 200] [--sdk-requests 5000]
"""

import argparse
import asyncio
import json
import os
import resource
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import aiohttp
import openai

ROOT = Path(__file__).resolve().parent.parent
MODEL = "gpt-4o-mini"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int) -> subprocess.Popen:
    code = f"from simulator import SimConfig, run; run(SimConfig(), '127.0.0.1', {port})"
    server = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)
    deadline = time.monotonic() + 15
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=1).close()
            return server
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                raise SystemExit("the simulator did not start")
            time.sleep(0.1)


def admin(port: int, path: str, payload: dict) -> None:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(payload).encode(), method="POST")
    urllib.request.urlopen(request).close()


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process, from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def drive(send, total: int, concurrency: int) -> int:
    """Run `send(i)` for i in range(total) with `concurrency` in flight; returns how many failed."""
    next_index, failures = 0, 0

    async def worker():
        nonlocal next_index, failures
        while next_index < total:
            i, next_index = next_index, next_index + 1
            if not await send(i):
                failures += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return failures


async def raw_client(base: str, total: int, concurrency: int) -> int:
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def send(i):
            body = {"model": MODEL, "messages": [{"role": "user", "content": f"benchmark item {i}"}]}
            async with session.post(base + "/chat/completions", json=body) as response:
                answer = await response.json()
                return response.status == 200 and answer["choices"][0]["message"]["content"].endswith(f" {i}")

        return await drive(send, total, concurrency)


async def sdk_client(base: str, total: int, concurrency: int) -> int:
    async with openai.AsyncOpenAI(base_url=base, api_key="sk-bench", max_retries=0) as client:

        async def send(i):
            answer = await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": f"benchmark item {i}"}]
            )
            return answer.choices[0].message.content.endswith(f" {i}")

        return await drive(send, total, concurrency)


def measure(name, client, port, server, total, concurrency, latency_ms=0):
    admin(port, "/_sim/config", {"latency_ms": latency_ms})
    admin(port, "/_sim/reset", {})
    server_cpu, own_cpu, started = cpu_seconds(server.pid), own_cpu_seconds(), time.perf_counter()
    failures = asyncio.run(client(f"http://127.0.0.1:{port}/v1", total, concurrency))
    elapsed = time.perf_counter() - started
    server_ms = (cpu_seconds(server.pid) - server_cpu) * 1000 / total
    client_ms = (own_cpu_seconds() - own_cpu) * 1000 / total
    print(
        f"{name:<44} {total:>6} req  C={concurrency:<4} latency {latency_ms:>3} ms  "
        f"{total / elapsed:>7.0f} req/s  server {server_ms:.3f} ms CPU/req  client {client_ms:.3f} ms CPU/req"
        + (f"  FAILED {failures}" if failures else "")
    )
    return total / elapsed


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--sdk-requests", type=int, default=5_000)
    args = parser.parse_args()

    port = free_port()
    server = start_server(port)
    try:
        raw = measure("raw aiohttp client", raw_client, port, server, args.requests, args.concurrency)
        sdk = measure(
            "AsyncOpenAI chat.completions.create", sdk_client, port, server, args.sdk_requests, args.concurrency
        )
        shaped = measure(
            "raw client, Batchsite's benchmark shape", raw_client, port, server, 3_000, 100, latency_ms=200
        )
    finally:
        server.terminate()
        server.wait(10)
    print(
        f"AsyncOpenAI gets {sdk / raw:.0%} of the simulator's ceiling; "
        f"at 200 ms latency and C=100 it delivers {shaped / 500:.0%} of the ideal 500 req/s."
    )


if __name__ == "__main__":
    main()
