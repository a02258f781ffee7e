"""`make run` stops everything it started, grandchildren included, on Ctrl-C and on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.servers import ROOT, free_port, wait_until

pytestmark = pytest.mark.slow


def _processes_of(marker: str) -> dict[int, str]:
    """Every live process whose environment carries `marker` (our data dir): all that `make run` started,
    whatever process group or session they moved to."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:  # gone meanwhile
            continue
        if marker.encode() in environ.split(b"\0") and state != "Z":
            found[int(entry.name)] = cmdline
    return found


def _in_group(pgid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z" and pgid in (int(fields[2]), int(fields[3])):  # pgrp, session
                pids.append(int(entry.name))
    return pids


def _sim_total(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/_sim/stats", timeout=3) as response:
            return json.loads(response.read())["total"]
    except OSError:
        return -1


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=3):
            return True
    except urllib.error.HTTPError:  # /healthz is 503 until the workers are up: the web server answers all the same
        return True
    except OSError:
        return False


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_make_run_leaves_no_process_behind(tmp_path, sig):
    data_dir = tmp_path / "data"
    port, sim_port = free_port(), free_port()
    marker = f"BATCHSITE_DATA_DIR={data_dir}"
    env = {
        k: v
        for k, v in os.environ.items()
        if k
        not in (
            "DATABASE_URL",
            "REDIS_URL",
            "BATCHSITE_SQLITE_PATH",
            "OPENAI_API_KEY",
            "OPENAI_BASE_URL",
            "HOST",
            "BIND",
        )
    }
    env.update(
        BATCHSITE_DATA_DIR=str(data_dir),
        PORT=str(port),
        BATCHSITE_SIMULATOR_PORT=str(sim_port),
        BATCHSITE_WORKERS="2",
        WEB_CONCURRENCY="2",
        OPENAI_CONCURRENCY="4",
        BATCHSITE_DEMO_USER="1",
    )
    log = open(tmp_path / "make-run.out", "wb")
    # Its own process group, as a shell gives a foreground job; a terminal's Ctrl-C signals the whole group.
    make = subprocess.Popen(
        ["make", "--no-print-directory", "run"],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    output = lambda: (tmp_path / "make-run.out").read_text(errors="replace")  # noqa: E731
    try:
        wait_until(
            lambda: _answers(f"http://127.0.0.1:{port}/healthz") or make.poll() is not None, 180, 0.5, "the web port"
        )
        assert make.poll() is None, output()
        # The cluster's sentinel, monitor, pusher and workers are the grandchildren the old script left behind.
        wait_until(lambda: sum("qcluster" in c for c in _processes_of(marker).values()) >= 5, 60, 0.5, "the cluster")
        wait_until(lambda: _sim_total(sim_port) >= 0, 60, 0.5, "the simulator")
        # A job in flight: its slice keeps a worker busy for a minute, longer than the cluster's own
        # shutdown waits, which is when the old script gave up and orphaned the grandchildren.
        lines = tmp_path / "job.jsonl"
        lines.write_text(
            "".join(
                json.dumps(
                    {
                        "custom_id": f"r{i}",
                        "method": "POST",
                        "url": "/v1/chat/completions",
                        "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
                    }
                )
                + "\n"
                for i in range(2000)
            )
        )
        wait_until(lambda: "Press Ctrl-C" in output(), 60, 0.2, "the banner (the demo user exists)")
        sim = {"OPENAI_API_KEY": "sk-simulator", "OPENAI_BASE_URL": f"http://127.0.0.1:{sim_port}/v1"}
        submit = subprocess.run(
            [str(ROOT / ".venv/bin/python"), "manage.py", "submit", str(lines)],
            cwd=ROOT,
            env={**env, **sim},
            capture_output=True,
            text=True,
        )
        assert submit.returncode == 0, submit.stdout + submit.stderr
        wait_until(lambda: _sim_total(sim_port) > 0, 60, 0.2, "the first request upstream")

        if sig == signal.SIGINT:  # a terminal signals the whole foreground group
            os.killpg(make.pid, sig)
        else:  # `kill PID`, or a service manager stopping its main process
            os.kill(make.pid, sig)
        signalled = time.monotonic()
        deadline = signalled + 15
        while time.monotonic() < deadline and (_processes_of(marker) or _in_group(make.pid)):
            time.sleep(0.25)
        stopped_in = time.monotonic() - signalled
        left = _processes_of(marker)
        assert not left, f"left running after {sig.name}: {left}\n{output()}"
        assert not _in_group(make.pid)
        assert _port_free(port) and _port_free(sim_port)
        make.wait(5)
        assert "Stopping" in output()
        # The cluster's own graceful stop: its workers gave their claimed items back at once, so a next
        # start has them without waiting for leases to expire.
        assert "told to hand their work over" in output() and "'handed_over': True" in output(), output()
        with sqlite3.connect(data_dir / "batchsite.sqlite3") as db:
            held = db.execute("SELECT count(*) FROM jobs_item WHERE status = 'running'").fetchone()[0]
        assert held == 0, f"{held} items still claimed after a stop of {stopped_in:.1f} s"
    finally:
        for pid in _processes_of(marker):  # only what this test started
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        log.close()


def test_make_run_binds_loopback_and_says_debug(tmp_path):
    """A laptop's `make run` is reachable from that laptop only, and the banner says DEBUG is on."""
    data_dir = tmp_path / "data"
    port = free_port()
    marker = f"BATCHSITE_DATA_DIR={data_dir}"
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DATABASE_URL", "REDIS_URL", "BATCHSITE_SQLITE_PATH", "HOST", "BIND", "DEBUG")
    }
    env.update(
        BATCHSITE_DATA_DIR=str(data_dir),
        PORT=str(port),
        BATCHSITE_SIMULATOR_PORT=str(free_port()),
        BATCHSITE_DEMO_USER="0",
        PYTHON=str(ROOT / ".venv/bin/python"),
    )
    subprocess.run([env["PYTHON"], "manage.py", "migrate", "-v0"], cwd=ROOT, env=env, check=True)
    log = open(tmp_path / "run.out", "wb")
    run = subprocess.Popen(
        ["bash", "scripts/run.sh"],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_until(lambda: _answers(f"http://127.0.0.1:{port}/healthz"), 120, 0.5, "the web port")
        wait_until(lambda: "Press Ctrl-C" in (tmp_path / "run.out").read_text(), 30, 0.2, "the banner")
        listening = Path("/proc/net/tcp").read_text().splitlines()[1:]
        local = {line.split()[1] for line in listening if line.split()[3] == "0A"}  # LISTEN
        assert f"0100007F:{port:04X}" in local and f"00000000:{port:04X}" not in local, local
        assert "DEBUG is on" in (tmp_path / "run.out").read_text()
    finally:
        os.killpg(run.pid, signal.SIGINT)
        try:
            run.wait(20)
        finally:
            for pid in _processes_of(marker):
                os.kill(pid, signal.SIGKILL)
            log.close()
