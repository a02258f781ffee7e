import csv
import json
import os
import re
import signal
import sys
from pathlib import Path

import pytest
from django.conf import settings as django_settings
from django.contrib.auth.hashers import PBKDF2PasswordHasher

from jobs import clock as engine_clock
from jobs import tokens
from tests.factories import seed_prices


class QuickPBKDF2(PBKDF2PasswordHasher):
    """Django's PBKDF2 with few rounds: a password costs 0.5 ms to set or check, not 0.5 s (the suite makes
    and signs in some thousand users). The hashes are ordinary pbkdf2_sha256 ones that name their rounds, so
    the servers the tests start (gunicorn, runserver), which keep Django's hashers, check them as they are."""

    iterations = 1000


def pytest_configure(config):
    django_settings.PASSWORD_HASHERS = ["tests.conftest.QuickPBKDF2", *django_settings.PASSWORD_HASHERS]


# What a test needs, read from its fixtures and marks (see pyproject.toml's markers). The suite's second
# pass (Postgres + Redis) runs the `database` tests only: the rest behave the same on either stack.
NEEDS = {
    "database": {"db", "transactional_db", "django_db_setup", "live_server"},
    "cluster": {"cluster", "production_cluster"},
    "browser": {"page", "browser", "context"},
}


def pytest_itemcollected(item):
    names = set(item.fixturenames)
    for mark, fixtures in NEEDS.items():
        if names & fixtures or (mark == "database" and item.get_closest_marker("django_db")):
            item.add_marker(mark)


@pytest.fixture
def clock():
    """The engine's clock (jobs/clock.py), for tests of timing logic: clock.advance(seconds) instead of sleeping.
    In this process only: servers the test starts keep the real clock."""
    yield engine_clock
    engine_clock.reset()


@pytest.fixture(autouse=True)
def csv_field_limit():
    """ingest sets csv's process-wide field limit from the limits it is given: a test's small limits must
    not outlive it (another test may read big CSV cells)."""
    previous = csv.field_size_limit()
    yield
    csv.field_size_limit(previous)


@pytest.fixture
def owner(django_user_model):
    return django_user_model.objects.create_user("owner", password="owner-pass-123")


@pytest.fixture
def teammate(django_user_model):
    return django_user_model.objects.create_user("teammate", password="teammate-pass-123")


@pytest.fixture
def staff(django_user_model):
    return django_user_model.objects.create_user("boss", password="boss-pass-123", is_staff=True)


@pytest.fixture
def write(tmp_path):
    """write("name.jsonl", text or bytes or list of objects) -> Path"""

    def _write(name: str, content) -> Path:
        path = tmp_path / name
        if isinstance(content, list):
            content = "".join(json.dumps(obj, ensure_ascii=False) + "\n" for obj in content)
        if isinstance(content, str):
            content = content.encode()
        path.write_bytes(content)
        return path

    return _write


@pytest.fixture
def data_dir(settings, tmp_path):
    """Uploads in a directory of the test's own (the token data stays in the real data dir)."""
    tokens.seed_cache()
    settings.DATA_DIR = tmp_path
    return tmp_path


@pytest.fixture
def simulator(tmp_path):
    """simulator(*args) starts `manage.py simulate_openai` with those arguments (stopped after the test)."""
    from tests.servers import Simulator

    started = []

    def start(*args: str):
        sim = Simulator(tmp_path, *args)
        started.append(sim)
        return sim

    yield start
    for sim in started:
        sim.stop()


@pytest.fixture
def cluster(transactional_db, tmp_path):
    """cluster(**env) starts a real qcluster on the test database (stopped after the test)."""
    from jobs.engine import tasks
    from tests.servers import Cluster

    tasks.ensure_schedules()
    seed_prices()
    started = []

    def start(**env):
        c = Cluster(tmp_path, **env)
        started.append(c)
        return c

    yield start
    for c in started:  # the test is over: a graceful stop would only wait out BATCHSITE_SHUTDOWN_SECONDS
        c.stop(signal.SIGKILL)


@pytest.fixture
def web_server(transactional_db, tmp_path):
    """web_server(**env) starts `manage.py runserver` on the test database (stopped after the test)."""
    from tests.servers import WebServer

    started = []

    def start(**env):
        server = WebServer(tmp_path, **env)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items):
    """Browser tests last: Playwright keeps an event loop running in the main thread for the rest of
    the session, and tests that call asyncio.run() cannot start after it."""
    items.sort(key=lambda item: item.fspath.basename == "test_browser.py")


# The ledger (jobs/models/ledger.py) is the one writer of items' states and jobs' counters. In the tests, every
# write to its books is audited against a recount (BATCHSITE_AUDIT_BOOKS), and any UPDATE of an item's status or
# a job's counters made by code of jobs/ outside the ledger fails the test that runs it. (Tests may set up
# items and counters as they like: only the app's own code is held to this.)
LEDGER_COLUMNS = re.compile(r'"?(status|n_pending|n_running|n_succeeded|n_failed|n_cancelled|n_expired|total)"? =')
LEDGER_TABLES = re.compile(r'^\s*UPDATE "?(jobs_item|jobs_job)"? SET ', re.IGNORECASE)
JOBS_DIR = str(Path(__file__).resolve().parent.parent / "jobs") + "/"
LEDGER_FILE = JOBS_DIR + "models/ledger.py"


class LedgerBypassed(AssertionError):
    pass


def _ledger_only(execute, sql, params, many, context):
    match = LEDGER_TABLES.match(sql)
    if match:
        assignments = re.split(r"\sWHERE\s", sql[match.end() :], maxsplit=1, flags=re.IGNORECASE)[0]
        columns = {m.group(1) for m in LEDGER_COLUMNS.finditer(assignments)}
        if match.group(1) == "jobs_job":
            columns.discard("status")  # a job's status is the state diagram's (Job.transition), not the books'
        if columns:
            frame = sys._getframe(1)
            while frame is not None and not frame.f_code.co_filename.startswith(JOBS_DIR):
                frame = frame.f_back
            if frame is not None and frame.f_code.co_filename != LEDGER_FILE:
                where = f"{frame.f_code.co_filename[len(JOBS_DIR) - 5 :]}:{frame.f_lineno}"
                raise LedgerBypassed(f"{where} writes {sorted(columns)} of {match.group(1)} outside the ledger")
    return execute(sql, params, many, context)


def _watch(sender, connection, **kwargs):
    if _ledger_only not in connection.execute_wrappers:
        connection.execute_wrappers.append(_ledger_only)


def pytest_sessionstart(session):
    from django.db import connections
    from django.db.backends.signals import connection_created

    django_settings.BATCHSITE_AUDIT_BOOKS = True
    os.environ["BATCHSITE_AUDIT_BOOKS"] = "1"  # the servers and clusters the tests start
    connection_created.connect(_watch, dispatch_uid="batchsite-ledger-only")
    for connection in connections.all(initialized_only=True):
        _watch(None, connection)
