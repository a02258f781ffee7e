"""For operators: /healthz for load balancers and /metrics for Prometheus. Neither needs a login."""

import functools
import hmac
import ipaddress
import logging
from collections.abc import Iterator
from datetime import timedelta

from django.conf import settings
from django.db import connection
from django.db.models import Count, Min, Q, Sum
from django.http import HttpRequest, HttpResponse, HttpResponseForbidden, JsonResponse
from django.utils import timezone
from django.views.decorators.http import require_GET
from django_q.brokers import Broker, get_broker
from django_q.conf import Conf
from django_q.models import OrmQ
from django_q.status import Stat
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from jobs.models import Endpoint, Item, Job, JobTick, RemoteBatch

log = logging.getLogger(__name__)

# Headers a reverse proxy adds: a request carrying one came through a proxy, whatever its REMOTE_ADDR says.
FORWARDING_HEADERS = ("HTTP_X_FORWARDED_FOR", "HTTP_FORWARDED", "HTTP_X_REAL_IP")


@functools.cache
def _broker() -> Broker:
    """django-q2's broker, made once per process (for Redis, one connection pool instead of one per request)."""
    return get_broker()


def _database_ok() -> bool:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        return True
    except Exception:  # a health check reports what is wrong, it does not raise it
        log.warning("healthz: the database does not answer", exc_info=True)
        return False


def _broker_ok(broker: Broker) -> bool:
    try:
        if Conf.ORM:  # the queue is a table: readable or not
            OrmQ.objects.using(Conf.ORM).exists()
            return True
        return bool(broker.ping())
    except Exception:
        log.warning("healthz: the broker does not answer", exc_info=True)
        return False


def _cluster_heartbeat(broker: Broker) -> tuple[float | None, int]:
    """Seconds since the newest qcluster heartbeat (None: no cluster heard from), and the worker processes of
    the clusters heard from within BATCHSITE_HEALTH_MAX_HEARTBEAT_AGE.

    Each cluster saves its Stat every guard cycle (0.5 s) in the cache (Redis: the broker) and django-q2 lets
    it expire 3 s later, so a stopped cluster disappears within seconds; the age limit also refuses a Stat
    whose clock is far behind."""
    try:
        stats = Stat.get_all(broker=broker)
    except Exception:
        log.warning("healthz: cannot read the clusters' heartbeats", exc_info=True)
        return None, 0
    now = timezone.now()
    ages = [(max(0.0, (now - stat.timestamp).total_seconds()), len(stat.workers)) for stat in stats]
    newest = min((age for age, _ in ages), default=None)
    workers = sum(n for age, n in ages if age <= settings.BATCHSITE_HEALTH_MAX_HEARTBEAT_AGE)
    return newest, workers


@require_GET
def healthz(request: HttpRequest) -> JsonResponse:
    """200 when the database and the broker answer and some qcluster worker is alive; 503 otherwise.
    Two queries (ORM broker; one with Redis) and a read of the cluster heartbeats."""
    broker = _broker()
    database = _database_ok()
    broker_up = _broker_ok(broker)
    age, workers = _cluster_heartbeat(broker)
    body = {
        "database": "ok" if database else "error",
        "broker": "ok" if broker_up else "error",
        "cluster": {"heartbeat_age_seconds": None if age is None else round(age, 3), "workers": workers},
    }
    return JsonResponse(body, status=200 if database and broker_up and workers else 503)


class TableCollector:
    """Batchsite's gauges and counters, read from its own tables at each scrape: five aggregate queries
    (four with Redis), whatever the number of jobs."""

    def collect(self) -> Iterator[Metric]:
        yield from self._jobs_and_items()
        yield from self._requests()
        yield self._remote_batches()
        yield from self._queue()
        age, workers = _cluster_heartbeat(_broker())
        yield GaugeMetricFamily("batchsite_cluster_workers", "qcluster worker processes alive", value=workers)
        if age is not None:  # absent, not a made-up number, when no cluster is heard from
            yield GaugeMetricFamily(
                "batchsite_cluster_heartbeat_age_seconds", "Seconds since the newest qcluster heartbeat", value=age
            )

    def _jobs_and_items(self) -> Iterator[Metric]:
        item_statuses = [s.value for s in Item.Status]
        live_since = timezone.now() - timedelta(seconds=settings.BATCHSITE_LEASE_SECONDS)
        rows = (
            Job.objects.order_by()
            .values("status")
            .annotate(
                jobs=Count("id"),
                live=Count("id", filter=Q(heartbeat_at__gte=live_since)),
                **{s: Sum(f"n_{s}") for s in item_statuses},
            )
        )
        jobs = {s.value: 0 for s in Job.Status}
        items = dict.fromkeys(item_statuses, 0)
        live = 0
        for row in rows:
            jobs[row["status"]] = row["jobs"]
            live += row["live"]
            for s in item_statuses:
                items[s] += row[s] or 0
        yield _by_label("batchsite_jobs", "Jobs by status", "status", jobs)
        yield _by_label("batchsite_items", "Requests of all jobs by status (the jobs' own counters)", "status", items)
        yield GaugeMetricFamily(
            "batchsite_jobs_with_live_slices",
            "Jobs whose slices showed life within the lease period (BATCHSITE_LEASE_SECONDS)",
            value=live,
        )

    def _requests(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "batchsite_requests",
            "Requests finished per endpoint, live and through the Batch API (falls when a job is deleted)",
            labels=["endpoint", "outcome"],
        )
        retries = CounterMetricFamily(
            "batchsite_retries",
            "Live sends to be tried again (after a 429, a 5xx, a timeout or a lost connection) per endpoint",
            labels=["endpoint"],
        )
        rows = (
            JobTick.objects.order_by()
            .values("job__endpoint__name")
            .annotate(succeeded=Sum("succeeded"), failed=Sum("failed"), retried=Sum("retried"))
        )
        for row in rows:
            endpoint = row["job__endpoint__name"] or "(none)"  # its endpoint was deleted
            requests.add_metric([endpoint, "succeeded"], row["succeeded"] or 0)
            requests.add_metric([endpoint, "failed"], row["failed"] or 0)
            retries.add_metric([endpoint], row["retried"] or 0)
        yield requests
        yield retries
        limited = CounterMetricFamily(
            "batchsite_rate_limited",
            "429 rate_limit_exceeded answers to live requests per endpoint (counted as each slice ends)",
            labels=["endpoint"],
        )
        for name, total in Endpoint.objects.values_list("name", "rate_limited_total"):
            limited.add_metric([name], total)
        yield limited

    def _remote_batches(self) -> Metric:
        counts = {s.value: 0 for s in RemoteBatch.Status}
        for row in RemoteBatch.objects.order_by().values("status").annotate(n=Count("id")):
            counts[row["status"]] = row["n"]
        return _by_label("batchsite_remote_batches", "Chunks of remote and hybrid jobs by status", "status", counts)

    def _queue(self) -> Iterator[Metric]:
        """Tasks waiting in the broker for a cluster to take them; with the database broker, also how long
        the oldest has waited (a Redis list does not say)."""
        broker = _broker()
        if not Conf.ORM:
            yield GaugeMetricFamily("batchsite_queue_tasks", "django-q2 tasks waiting", value=broker.queue_size())
            return
        now = timezone.now()
        waiting = (
            OrmQ.objects.using(Conf.ORM)
            .filter(key=broker.list_key, lock__lte=now)  # a task a cluster took is locked into the future
            .aggregate(n=Count("id"), oldest=Min("lock"))
        )
        yield GaugeMetricFamily("batchsite_queue_tasks", "django-q2 tasks waiting", value=waiting["n"])
        lag = (now - waiting["oldest"]).total_seconds() if waiting["oldest"] else 0.0
        yield GaugeMetricFamily(
            "batchsite_queue_lag_seconds", "How long the oldest waiting django-q2 task has waited", value=lag
        )


def _by_label(name: str, documentation: str, label: str, values: dict[str, int]) -> GaugeMetricFamily:
    gauge = GaugeMetricFamily(name, documentation, labels=[label])
    for key, value in values.items():
        gauge.add_metric([key], value)
    return gauge


def _from_this_machine(request: HttpRequest) -> bool:
    """A loopback caller that no proxy forwarded: a proxy on this machine would make every visitor look local."""
    if any(header in request.META for header in FORWARDING_HEADERS):
        return False
    try:
        address = ipaddress.ip_address(request.META.get("REMOTE_ADDR", ""))
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:  # ::ffff:127.0.0.1
        address = address.ipv4_mapped
    return address.is_loopback


def _has_metrics_token(request: HttpRequest) -> bool:
    token = settings.BATCHSITE_METRICS_TOKEN
    if not token:
        return False
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.encode(), token.encode())


@require_GET
def metrics(request: HttpRequest) -> HttpResponse:
    """Prometheus' text format, for this machine or for whoever shows BATCHSITE_METRICS_TOKEN."""
    if not (_from_this_machine(request) or _has_metrics_token(request)):
        return HttpResponseForbidden("Metrics are served to this machine, or with BATCHSITE_METRICS_TOKEN.\n")
    return HttpResponse(generate_latest(TableCollector()), content_type=CONTENT_TYPE_PLAIN_0_0_4)
