"""A slow or hostile webhook receiver (issue 21, item 5: the part on one delivery). A delivery ends within its
deadline however slowly the receiver sends its headers, never reads the answer's body (only its status
counts), and never follows a redirect."""

import socket
import threading
import time
from datetime import timedelta

import pytest
from django.utils import timezone

from jobs.engine import notify
from jobs.models import JobEvent, Webhook, WebhookDelivery
from tests.factories import make_endpoint, make_job

pytestmark = pytest.mark.django_db


class RawReceiver:
    """A TCP server that answers every connection with `reply(conn)`, in a thread per connection."""

    def __init__(self, reply):
        self.reply, self.hits = reply, 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/hook"
        self.stopped = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while not self.stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.hits += 1
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn):
        try:
            conn.recv(65536)  # the request (small)
            self.reply(conn, self.stopped)
        except OSError:  # the client gave up on us: as it should
            pass
        finally:
            conn.close()

    def close(self):
        self.stopped.set()
        self.sock.close()


def drip(head: bytes, every: float = 0.2):
    """A reply that sends `head` at once, then a byte every `every` seconds for a minute."""

    def reply(conn, stopped):
        conn.sendall(head)
        for _ in range(int(60 / every)):
            if stopped.wait(every):
                return
            conn.sendall(b"x")

    return reply


def huge(conn, stopped):
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 200000000\r\n\r\n")
    chunk = b"0" * 65536
    for _ in range(200_000_000 // len(chunk)):
        if stopped.is_set():
            return
        conn.sendall(chunk)


@pytest.fixture
def delivery_to(write, owner, monkeypatch):
    """delivery_to(url) -> a due delivery of a job's batch.completed event to a webhook at `url`."""
    monkeypatch.setattr("jobs.queue.send_notifications_on_commit", lambda *a, **k: None)
    monkeypatch.setattr("jobs.queue.async_task", lambda *a, **k: None)

    def make(url):
        hook = Webhook(name="ops", url=url)
        hook.new_secret()
        hook.save()
        job = make_job(write, owner, make_endpoint("http://127.0.0.1:9/v1"), 1, start=False)
        JobEvent.record(job, "batch.completed")
        return WebhookDelivery.objects.get(webhook=hook)

    return make


def deliver_to(delivery_to, reply) -> tuple[WebhookDelivery, float]:
    """A delivery to a receiver that answers with `reply`, and the seconds notify.send_due took to make it."""
    receiver = RawReceiver(reply)
    try:
        delivery = delivery_to(receiver.url)
        started = time.monotonic()
        notify.send_due()
        return delivery, time.monotonic() - started
    finally:
        receiver.close()


def test_a_receiver_that_drips_its_headers_holds_a_delivery_no_longer_than_its_deadline(delivery_to, monkeypatch):
    monkeypatch.setattr(notify, "DEADLINE", 1.5)
    delivery, took = deliver_to(delivery_to, drip(b"HTTP/1.1 200 OK\r\nX-Slow: "))  # a byte every 0.2 s, no end

    assert took < 1.5 + 1.0, took  # the deadline, and what the bookkeeping takes
    delivery.refresh_from_db()
    assert delivery.status == WebhookDelivery.Status.PENDING and delivery.attempts == 1  # tried again later
    assert "Timeout" in delivery.last_error


@pytest.mark.parametrize(
    "reply",
    [drip(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"), huge],
    ids=["dripping-body", "200-MB-body"],
)
def test_the_answers_body_is_never_read_and_the_delivery_counts(delivery_to, reply):
    delivery, took = deliver_to(delivery_to, reply)

    delivery.refresh_from_db()
    assert (delivery.status, delivery.last_status_code) == (WebhookDelivery.Status.DELIVERED, 200)
    assert took < 2  # the status line and headers, nothing more


def test_a_receiver_that_redirects_is_not_followed(delivery_to):
    internal = RawReceiver(lambda conn, stopped: conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"))
    hostile = RawReceiver(
        lambda conn, stopped: conn.sendall(
            f"HTTP/1.1 307 Temporary Redirect\r\nLocation: {internal.url}\r\nContent-Length: 0\r\n\r\n".encode()
        )
    )
    try:
        delivery = delivery_to(hostile.url)
        notify.send_due()
    finally:
        hostile.close()
        internal.close()

    delivery.refresh_from_db()
    assert internal.hits == 0 and hostile.hits == 1
    assert delivery.status == WebhookDelivery.Status.PENDING and delivery.last_status_code == 307


def test_many_dripping_receivers_hold_the_call_for_one_deadline_not_one_each(write, owner, monkeypatch):
    """Deliveries are made side by side: five receivers that never finish their headers cost one deadline."""
    monkeypatch.setattr("jobs.queue.send_notifications_on_commit", lambda *a, **k: None)
    monkeypatch.setattr(notify, "DEADLINE", 1.5)
    receivers = [RawReceiver(drip(b"HTTP/1.1 200 OK\r\nX-Slow: ")) for _ in range(5)]
    good = RawReceiver(lambda conn, stopped: conn.sendall(b"HTTP/1.1 204 No Content\r\n\r\n"))
    try:
        for n, receiver in enumerate([*receivers, good]):
            hook = Webhook(name=f"hook {n}", url=receiver.url)
            hook.new_secret()
            hook.save()
        job = make_job(write, owner, make_endpoint("http://127.0.0.1:9/v1"), 1, start=False)
        JobEvent.record(job, "batch.completed")
        started = time.monotonic()
        counts = notify.send_due()
        took = time.monotonic() - started
    finally:
        for receiver in [*receivers, good]:
            receiver.close()

    assert (counts["delivered"], counts["delivery_failed"]) == (1, 5)
    assert took < 1.5 + 1.0, took  # five slow receivers at once, not one after another (7.5 s)


def test_old_events_and_their_deliveries_are_pruned_once_nothing_is_left_to_send(write, owner, monkeypatch, settings):
    monkeypatch.setattr("jobs.queue.send_notifications_on_commit", lambda *a, **k: None)
    settings.BATCHSITE_EVENT_RETENTION_DAYS = 30
    hook = Webhook(name="ops", url="http://127.0.0.1:9/hook")
    hook.new_secret()
    hook.save()
    job = make_job(write, owner, make_endpoint("http://127.0.0.1:9/v1"), 1, start=False)
    for _ in range(3):
        JobEvent.record(job, "batch.completed")
    old, retried, recent = JobEvent.objects.order_by("pk")
    JobEvent.objects.filter(pk__in=[old.pk, retried.pk]).update(
        created_at=timezone.now() - timedelta(days=31), email=JobEvent.Email.SENT
    )
    JobEvent.objects.filter(pk=recent.pk).update(email=JobEvent.Email.SENT)
    WebhookDelivery.objects.exclude(event=retried).update(status=WebhookDelivery.Status.DELIVERED)

    assert JobEvent.prune() == 1

    assert list(JobEvent.objects.order_by("pk")) == [retried, recent]  # a delivery of `retried` is still pending
    assert not WebhookDelivery.objects.filter(event_id=old.pk).exists()


def job_seconds(job) -> float:
    job.refresh_from_db()
    return (job.finished_at - job.created_at).total_seconds()  # from the click: waiting for a worker counts


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_jobs_run_as_fast_while_three_deliveries_drip(cluster, simulator, write, owner):
    """The attack: a receiver that answers 200 and then drips (each delivery held to its 15 s deadline) while jobs
    end one after another, each delivery made by its own notification task. Deliveries run on the workers'
    outbox threads, so the jobs that follow have the workers they had before: held by deliveries, the third
    small job would wait for a worker for up to 15 s, and the big one after it too."""
    from tests.test_engine_cluster import wait_status

    sim = simulator("--latency-ms", "100")
    endpoint = make_endpoint(sim.base_url, concurrency=50)
    cluster()
    before = make_job(write, owner, endpoint, 600)
    wait_status(before, "completed", 120)
    baseline = job_seconds(before)

    receiver = RawReceiver(drip(b"HTTP/1.1 200 OK\r\nX-Slow: ", every=2.0))
    try:
        hook = Webhook(name="dripping", url=receiver.url)
        hook.new_secret()
        hook.save()
        small = []
        for n in range(1, 4):
            job = make_job(write, owner, endpoint, 1)
            wait_status(job, "completed", 60)
            small.append(job_seconds(job))
            end = time.monotonic() + 30
            while receiver.hits < n and time.monotonic() < end:  # its delivery is being held by the receiver
                time.sleep(0.05)
            assert receiver.hits >= n, "the delivery never reached the receiver"
        after = make_job(write, owner, endpoint, 600)  # while the three deliveries are held
        wait_status(after, "completed", 120)
        took = job_seconds(after)
        held = WebhookDelivery.objects.filter(webhook=hook, last_status_code__isnull=True).count()
    finally:
        receiver.close()
    assert held >= 3  # the deliveries were still being held when the last job ended
    assert max(small) < 3.0, f"small jobs took {small} s from launch: they waited for a worker"
    assert took < baseline * 1.5 + 1.0, f"{took:.1f} s with deliveries in flight, {baseline:.1f} s before"


def test_the_outbox_runs_rounds_side_by_side_and_again_when_asked_while_full(monkeypatch):
    """Up to ROUNDS rounds at once; one asked for while all are busy is not lost: a round that ends runs again."""
    release, calls = threading.Event(), []

    def send_due():
        calls.append(1)
        release.wait(5)
        return {}

    monkeypatch.setattr(notify, "send_due", send_due)
    outbox = notify._Outbox()
    assert all(outbox.start() for _ in range(outbox.ROUNDS))
    assert not outbox.start()  # full: remembered
    time.sleep(0.1)
    assert len(calls) == outbox.ROUNDS
    release.set()
    assert outbox.wait(5)
    assert len(calls) == outbox.ROUNDS + 1 and outbox.rounds == outbox.ROUNDS + 1
