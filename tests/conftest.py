import csv
import json
import signal
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
