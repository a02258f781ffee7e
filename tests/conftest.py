import csv
import json
from pathlib import Path

import pytest


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


def chat_line(custom_id: str, text: str = "Hello", model: str = "gpt-4o-mini", **body) -> dict:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": model, "messages": [{"role": "user", "content": text}], **body},
    }


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
    from jobs import tasks
    from tests.servers import Cluster

    tasks.ensure_schedules()
    seed_prices()
    started = []

    def start(**env):
        c = Cluster(tmp_path, **env)
        started.append(c)
        return c

    yield start
    for c in started:
        c.stop()


def make_endpoint(base_url: str, **fields):
    from jobs.models import Endpoint

    endpoint = Endpoint(name=f"sim {base_url}", base_url=base_url, is_default=True, **fields)
    endpoint.set_api_key("sk-test-simulator-key")
    endpoint.save()
    return endpoint


def make_job(write, owner, endpoint, n: int, text=lambda i: f"Question {i}", start=True, **body):
    from jobs import ingest

    lines = [chat_line(f"req-{i}", text(i), **body) for i in range(n)]
    plan = ingest.validate(write(f"job-{n}.jsonl", lines))
    assert plan.ok, plan.errors
    job = ingest.create_job(plan, owner=owner, endpoint=endpoint)
    if start:
        job.start()
    return job


def answers(job) -> dict[str, str]:
    """custom_id -> the answer's text, from the job's exported results; a custom_id twice fails the test."""
    from jobs import export

    out = {}
    for line in "".join(export.results_jsonl(job)).splitlines():
        record = json.loads(line)
        assert record["custom_id"] not in out, "a custom_id appears twice in the output"
        out[record["custom_id"]] = record["response"]["body"]["choices"][0]["message"]["content"]
    return out


def seed_prices():
    """Transactional tests flush the price rows a data migration made; put them back."""
    import importlib

    from django.apps import apps

    importlib.import_module("jobs.migrations.0003_default_prices").add_prices(apps, None)


def api_headers(user) -> dict:
    """Headers with a new personal API token of `user`, for Django's test client."""
    from jobs.models import ApiToken

    _, plaintext = ApiToken.create_for(user, "test")
    return {"Authorization": f"Bearer {plaintext}"}


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
