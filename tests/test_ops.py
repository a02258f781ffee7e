"""/healthz for load balancers, /metrics for Prometheus, and JSON logs (issue 13, Operations)."""

import json
import logging
import os
import subprocess
import sys
import uuid
from datetime import timedelta
from pathlib import Path
from unittest import mock

import pytest
from django.db import OperationalError
from django.db.backends.utils import CursorWrapper
from django.utils import timezone
from django_q.brokers import get_broker
from django_q.conf import Conf
from django_q.models import OrmQ
from django_q.signing import SignedPackage
from django_q.status import Stat, Status
from prometheus_client.parser import text_string_to_metric_families

from batchsite.jsonlog import JsonFormatter
from jobs.models import Endpoint, Job, JobTick, RemoteBatch
from tests.factories import make_endpoint, make_job
from tests.servers import wait_until

pytestmark = pytest.mark.django_db
ROOT = Path(__file__).resolve().parent.parent
ELSEWHERE = "203.0.113.7"  # TEST-NET-3: an address that is not this machine


@pytest.fixture
def heartbeat(monkeypatch):
    """heartbeat(workers, age): a cluster Stat saved the way a qcluster saves it, under a key of this test's
    own, so that no real cluster on the machine answers for the test."""
    monkeypatch.setattr(Conf, "Q_STAT", f"django_q:ops-test-{uuid.uuid4().hex}:cluster")
    broker = get_broker()

    def save(workers: int = 2, age: float = 0.0) -> None:
        stat = Status(pid=os.getpid(), cluster_id=uuid.uuid4())
        stat.workers = list(range(1000, 1000 + workers))
        stat.timestamp = timezone.now() - timedelta(seconds=age)
        broker.set_stat(Stat.get_key(stat.cluster_id), SignedPackage.dumps(stat, True), 30)

    yield save
    if broker.cache:  # the list of cluster keys the database broker keeps in the cache (Redis lists them itself)
        broker.cache.delete(Conf.Q_STAT)


def test_healthz_is_200_with_database_broker_and_a_live_cluster_and_needs_no_login(client, heartbeat):
    heartbeat(workers=2)
    response = client.get("/healthz")
    assert response.status_code == 200
    body = response.json()
    assert body["database"] == "ok" and body["broker"] == "ok"
    assert body["cluster"]["workers"] == 2 and 0 <= body["cluster"]["heartbeat_age_seconds"] < 5


def test_healthz_is_503_when_no_cluster_is_heard_from(client, heartbeat):
    response = client.get("/healthz")
    assert response.status_code == 503
    assert response.json() == {
        "database": "ok",
        "broker": "ok",
        "cluster": {"heartbeat_age_seconds": None, "workers": 0},
    }


def test_a_heartbeat_older_than_the_limit_counts_no_workers(client, heartbeat, settings):
    settings.BATCHSITE_HEALTH_MAX_HEARTBEAT_AGE = 60
    heartbeat(workers=2, age=120)
    response = client.get("/healthz")
    assert response.status_code == 503
    assert response.json()["cluster"]["workers"] == 0
    assert response.json()["cluster"]["heartbeat_age_seconds"] == pytest.approx(120, abs=5)


def test_healthz_is_503_when_the_database_fails_and_says_no_more_than_error(client, heartbeat):
    heartbeat(workers=2)
    with mock.patch.object(CursorWrapper, "execute", side_effect=OperationalError("password=hunter2 refused")):
        response = client.get("/healthz")
    assert response.status_code == 503
    body = response.json()
    assert body["database"] == "error"
    assert body["broker"] == ("error" if Conf.ORM else "ok")  # the database broker is the database
    assert "hunter2" not in response.content.decode()


def test_healthz_costs_two_queries_at_most(client, heartbeat, django_assert_max_num_queries):
    heartbeat(workers=1)
    with django_assert_max_num_queries(2):
        assert client.get("/healthz").status_code == 200


@pytest.mark.slow
def test_healthz_sees_a_real_qcluster(cluster, client):
    # A cluster an earlier test stopped is heard of for up to 3 s more.
    wait_until(lambda: client.get("/healthz").status_code == 503, 10, 0.5, "earlier clusters to fall silent")
    c = cluster()
    wait_until(lambda: client.get("/healthz").status_code == 200 or c.proc.poll() is not None, 60, 0.5, "a heartbeat")
    assert c.proc.poll() is None, c.output()
    assert client.get("/healthz").json()["cluster"]["workers"] == 2  # BATCHSITE_WORKERS of tests.servers.Cluster


def test_metrics_are_served_to_this_machine(client):
    response = client.get("/metrics")  # the test client's REMOTE_ADDR is 127.0.0.1
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain; version=0.0.4")
    assert b"# TYPE batchsite_jobs gauge" in response.content


@pytest.mark.parametrize(
    "where",
    [{"REMOTE_ADDR": ELSEWHERE}, {"REMOTE_ADDR": "127.0.0.1", "HTTP_X_FORWARDED_FOR": ELSEWHERE}],
    ids=["another-machine", "through-a-local-proxy"],
)
def test_metrics_are_refused_elsewhere_without_a_token(client, where):
    assert client.get("/metrics", **where).status_code == 403


def test_metrics_token_lets_another_machine_in_and_a_wrong_one_does_not(client, settings):
    assert client.get("/metrics", REMOTE_ADDR=ELSEWHERE, HTTP_AUTHORIZATION="Bearer anything").status_code == 403
    settings.BATCHSITE_METRICS_TOKEN = "metrics-token-0123456789"
    right = client.get("/metrics", REMOTE_ADDR=ELSEWHERE, HTTP_AUTHORIZATION="Bearer metrics-token-0123456789")
    assert right.status_code == 200
    for wrong in ["Bearer metrics-token-012345678", "Bearer ", "Basic metrics-token-0123456789", ""]:
        assert client.get("/metrics", REMOTE_ADDR=ELSEWHERE, HTTP_AUTHORIZATION=wrong).status_code == 403


def _samples(response) -> dict[tuple[str, tuple], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.content.decode())
        for sample in family.samples
    }


def test_metric_values_match_the_jobs_in_the_database(client, owner, write, heartbeat, django_assert_max_num_queries):
    fast = make_endpoint("http://127.0.0.1:9/v1")
    Endpoint.objects.filter(pk=fast.pk).update(name="fast")
    slow = Endpoint.objects.create(name="slow", base_url="http://127.0.0.1:10/v1")
    running = make_job(write, owner, fast, 5, start=False)
    Job.objects.filter(pk=running.pk).update(
        status=Job.Status.RUNNING, n_pending=1, n_running=1, n_succeeded=2, n_failed=1, heartbeat_at=timezone.now()
    )
    done = make_job(write, owner, slow, 3, start=False)
    Job.objects.filter(pk=done.pk).update(status=Job.Status.COMPLETED, n_pending=0, n_succeeded=3)
    make_job(write, owner, fast, 4, start=False)  # queued: 4 pending
    now = timezone.now().replace(microsecond=0)
    JobTick.objects.create(job=running, at=now - timedelta(seconds=10), succeeded=1, failed=1, retried=4)
    JobTick.objects.create(job=running, at=now, succeeded=1, retried=2)
    JobTick.objects.create(job=done, at=now, succeeded=3, failed=0, retried=1)
    RemoteBatch.objects.create(job=done, number=1, status=RemoteBatch.Status.COMPLETED)
    RemoteBatch.objects.create(job=done, number=2, status=RemoteBatch.Status.IN_PROGRESS)
    waiting_since = timezone.now() - timedelta(seconds=30)
    if Conf.ORM:
        OrmQ.objects.create(key=get_broker().list_key, payload="-", lock=waiting_since)
        OrmQ.objects.create(key=get_broker().list_key, payload="-", lock=timezone.now() + timedelta(hours=1))  # taken
    heartbeat(workers=3)
    Endpoint.objects.filter(pk=fast.pk).update(rate_limited_total=7)

    with django_assert_max_num_queries(5):
        response = client.get("/metrics")
    metrics = _samples(response)

    def value(name, **labels):
        return metrics[(name, tuple(sorted(labels.items())))]

    assert [value("batchsite_jobs", status=s) for s in ("queued", "running", "completed", "failed")] == [1, 1, 1, 0]
    assert [value("batchsite_items", status=s) for s in ("pending", "running", "succeeded", "failed")] == [5, 1, 5, 1]
    assert value("batchsite_requests_total", endpoint="fast", outcome="succeeded") == 2
    assert value("batchsite_requests_total", endpoint="fast", outcome="failed") == 1
    assert value("batchsite_requests_total", endpoint="slow", outcome="succeeded") == 3
    assert value("batchsite_retries_total", endpoint="fast") == 6
    assert value("batchsite_retries_total", endpoint="slow") == 1
    assert value("batchsite_rate_limited_total", endpoint="fast") == 7
    assert value("batchsite_rate_limited_total", endpoint="slow") == 0
    assert value("batchsite_remote_batches", status="in_progress") == 1
    assert value("batchsite_remote_batches", status="planned") == 0
    assert value("batchsite_jobs_with_live_slices") == 1
    assert value("batchsite_cluster_workers") == 3
    assert 0 <= value("batchsite_cluster_heartbeat_age_seconds") < 5
    if Conf.ORM:
        assert value("batchsite_queue_tasks") == 1
        assert value("batchsite_queue_lag_seconds") == pytest.approx(30, abs=5)


def test_json_log_lines_parse_with_time_level_logger_message_and_exception():
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("jobs.engine", logging.ERROR, __file__, 1, "slice %s failed", (7,), sys.exc_info())
    line = JsonFormatter().format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["level"] == "ERROR" and entry["logger"] == "jobs.engine" and entry["message"] == "slice 7 failed"
    assert entry["time"].endswith("+00:00") and "ValueError: boom" in entry["exception"]


def _log_one_line(tmp_path: Path, log_format: str) -> subprocess.CompletedProcess:
    """A fresh process with BATCHSITE_LOG_FORMAT set logs one warning through the settings' LOGGING."""
    code = (
        "import django, logging, os; os.environ.setdefault('DJANGO_SETTINGS_MODULE', 'batchsite.settings'); "
        "django.setup(); logging.getLogger('jobs.ops').warning('hello %s', 'there')"
    )
    env = {**os.environ, "BATCHSITE_DATA_DIR": str(tmp_path), "BATCHSITE_LOG_FORMAT": log_format}
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_log_format_json_switches_the_console_to_json_and_a_typo_stops_the_start(tmp_path):
    result = _log_one_line(tmp_path, "JSON")
    assert result.returncode == 0, result.stderr
    entry = json.loads(result.stderr.strip().splitlines()[-1])
    assert (entry["level"], entry["logger"], entry["message"]) == ("WARNING", "jobs.ops", "hello there")
    result = _log_one_line(tmp_path, "jsn")
    assert result.returncode != 0 and "BATCHSITE_LOG_FORMAT='jsn'" in result.stderr
