"""Real processes for integration tests: the OpenAI simulator and a qcluster on the test database."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from django.conf import settings
from django.db import connection

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float = 60, interval: float = 0.2, message: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {message}")


class Process:
    def __init__(self, args: list[str], log: Path, env: dict | None = None, program: list[str] | None = None):
        self.log_path = log
        self.log = open(log, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, *(program or ["manage.py"]), *args],
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            stdout=self.log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: kill() takes the workers too
        )

    def kill(self, sig=signal.SIGKILL, grace: float = 5) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        try:  # workers left behind by a killed parent
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def stop(self, sig=signal.SIGTERM) -> None:
        self.kill(sig)
        self.log.close()

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


class Simulator(Process):
    def __init__(self, tmp: Path, *args: str):
        self.port = free_port()
        self.request_log = tmp / f"sim-{self.port}.jsonl"
        super().__init__(
            ["simulate_openai", "--port", str(self.port), "--log", str(self.request_log), *args], tmp / "simulator.out"
        )
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        wait_until(self._up, 30, message="the simulator")

    def _up(self) -> bool:
        try:
            self.stats()
            return True
        except OSError:
            assert self.proc.poll() is None, self.output()
            return False

    def _call(self, path: str, payload=None):
        data = json.dumps(payload).encode() if payload is not None else None
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}", data=data, method="POST" if data else "GET"
        )
        request.add_header("content-type", "application/json")
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def stats(self) -> dict:
        return self._call("/_sim/stats")

    def configure(self, **values) -> dict:
        return self._call("/_sim/config", values)

    def requests(self) -> list[dict]:
        """Every request the simulator answered, from its log file (complete, unlike /_sim/log)."""
        if not self.request_log.exists():
            return []
        return [json.loads(line) for line in self.request_log.read_text().splitlines() if line.strip()]


def database_env() -> dict[str, str]:
    """Environment that points another process at the database this test run uses."""
    db = connection.settings_dict
    if connection.vendor == "sqlite":
        return {"BATCHSITE_SQLITE_PATH": str(db["NAME"])}
    assert connection.vendor == "postgresql"
    return {"DATABASE_URL": f"postgres://{db['USER']}:{db['PASSWORD'] or ''}@{db['HOST']}:{db['PORT']}/{db['NAME']}"}


class Cluster(Process):
    """`manage.py qcluster` on the test database, with short leases and slices so tests run fast."""

    def __init__(self, tmp: Path, **env: str):
        env = {
            "BATCHSITE_DATA_DIR": str(settings.DATA_DIR),
            "BATCHSITE_WORKERS": "2",
            "BATCHSITE_LEASE_SECONDS": "8",
            "BATCHSITE_SLICE_SECONDS": "5",
            **database_env(),
            **env,
        }
        super().__init__(["qcluster"], tmp / "qcluster.out", env)


def gunicorn_args(bind: str, workers: int) -> list[str]:
    """The same options as scripts/run.sh, which reads them from gunicorn.conf.py."""
    return ["--config", str(ROOT / "gunicorn.conf.py"), "--bind", bind, "--workers", str(workers)]


class WebServer(Process):
    """The web server `make run` starts (gunicorn) on the test database, for clients over real HTTP."""

    def __init__(self, tmp: Path, **env: str):
        self.port = free_port()
        env = {
            "BATCHSITE_DATA_DIR": str(settings.DATA_DIR),
            "DEBUG": "1",
            # The endpoint comes from the test's database, not from the developer's environment.
            "OPENAI_API_KEY": "",
            "OPENAI_BASE_URL": "",
            **database_env(),
            **env,
        }
        super().__init__(
            gunicorn_args(f"127.0.0.1:{self.port}", workers=2), tmp / "web.out", env, program=["-m", "gunicorn"]
        )
        self.url = f"http://127.0.0.1:{self.port}"
        self.base_url = f"{self.url}/v1"
        wait_until(self._up, 30, message="the web server")

    def _up(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/healthz", timeout=5):
                return True
        except urllib.error.HTTPError:  # 503 while no qcluster runs: the web server answers all the same
            return True
        except OSError:
            assert self.proc.poll() is None, self.output()
            return False
