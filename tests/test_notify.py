"""Notifications (issue 14): the owner's email and the team's signed webhooks when a job ends or pauses by
itself. Jobs run in this process against the simulator over HTTP; the webhook receiver is a real HTTP server
that checks each signature with the Standard Webhooks reference library."""

import threading
import time
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from django.core import mail
from django.utils import timezone
from standardwebhooks import Webhook as Verifier

from jobs.engine import notify, runner
from jobs.models import Job, JobEvent, NotificationSettings, Webhook, WebhookDelivery, control
from simulator import SimConfig, serve_in_thread
from tests.factories import make_endpoint, make_job

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def in_this_process(monkeypatch):
    """Slices and notification tasks run here, when the test says, not in a cluster."""
    monkeypatch.setattr("jobs.queue.async_task", lambda *a, **k: None)
    monkeypatch.setattr("jobs.queue.send_notifications_on_commit", lambda *a, **k: None)


@pytest.fixture
def sim():
    with serve_in_thread(SimConfig(latency_ms=5, seed=1)) as base_url:
        yield base_url


class Receiver:
    """A webhook receiver: answers with the next status of `answers` (then 200), verifying every signature."""

    def __init__(self, secret: str, answers=()):
        self.verifier = Verifier(secret)
        self.answers = list(answers)
        self.received: list[dict] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["content-length"]))
                headers = {k.lower(): v for k, v in self.headers.items()}
                verified = receiver.verifier.verify(body, headers)  # raises on a bad signature
                receiver.received.append({"headers": headers, "payload": verified})
                self.send_response(receiver.answers.pop(0) if receiver.answers else 200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks/batchsite?team=ml"

    def close(self):
        self.server.shutdown()


def hook_to(receiver_factory, answers=()):
    hook = Webhook(name="ops")
    secret = hook.new_secret()
    receiver = receiver_factory(secret, answers)
    hook.url = receiver.url
    hook.save()
    return hook, receiver


@pytest.fixture
def receivers():
    made = []

    def make(secret, answers=()):
        made.append(Receiver(secret, answers))
        return made[-1]

    yield make
    for r in made:
        r.close()


def run_to_the_end(job: Job) -> Job:
    Job.start_slices(job.pk)
    end = time.monotonic() + 60
    while time.monotonic() < end:
        runner.run(job.pk, budget=2)
        job.refresh_from_db()
        if job.is_finished:
            return job
    raise AssertionError(job.counts())


def test_a_finished_job_emails_its_owner_and_signs_its_webhook(sim, write, owner, receivers, settings):
    settings.BATCHSITE_BASE_URL = "https://batch.example.com"
    owner.email = "ada@example.com"
    owner.save()
    hook, receiver = hook_to(receivers)
    job = make_job(write, owner, make_endpoint(sim), 12, text=lambda i: f"Q{i} SIMULATE_400" if i == 3 else f"Q{i}")

    job = run_to_the_end(job)
    assert job.status == Job.Status.COMPLETED
    event = JobEvent.objects.get(job=job)
    assert event.event == "batch.completed" and event.event_id.startswith("evt_")

    assert notify.send_due() == {"emailed": 1, "email_failed": 0, "delivered": 1, "delivery_failed": 0}
    assert notify.send_due() == {"emailed": 0, "email_failed": 0, "delivered": 0, "delivery_failed": 0}  # once
    [email] = mail.outbox
    assert email.to == ["ada@example.com"] and "completed" in email.subject and job.name in email.subject
    assert "11 succeeded, 1 failed" in email.body and f"${job.cost:.4f}" in email.body
    assert f"https://batch.example.com/jobs/{job.pk}/" in email.body

    [got] = receiver.received
    assert got["headers"]["webhook-id"] == event.event_id
    payload = got["payload"]
    assert (payload["object"], payload["type"], payload["id"]) == ("event", "batch.completed", event.event_id)
    assert payload["data"]["id"] == f"job_{job.pk}" and payload["batchsite"]["request_counts"]["failed"] == 1
    delivery = WebhookDelivery.objects.get()
    assert (delivery.status, delivery.attempts, delivery.last_status_code) == ("delivered", 1, 200)
    assert secret_not_stored_plainly(hook)


def secret_not_stored_plainly(hook) -> bool:
    raw = Webhook.objects.filter(pk=hook.pk).values_list("secret_encrypted", flat=True).get()
    return hook.secret.startswith("whsec_") and hook.secret not in raw


def test_a_failing_receiver_is_tried_again_with_the_same_id_and_a_bad_signature_is_refused(
    sim, write, owner, receivers
):
    hook, receiver = hook_to(receivers, answers=[500, 503])
    job = make_job(write, owner, make_endpoint(sim), 3, start=False)
    control.cancel(job)  # a cancelled job is an event too
    assert JobEvent.objects.get(job=job).event == "batch.cancelled"

    assert notify.send_due()["delivery_failed"] == 1
    delivery = WebhookDelivery.objects.get()
    assert (delivery.status, delivery.attempts, delivery.last_error) == ("pending", 1, "HTTP 500")
    assert notify.send_due()["delivery_failed"] == 0  # not due yet: backoff
    later = timezone.now() + timedelta(seconds=notify.BACKOFF[0] + 1)
    assert notify.send_due(now=later)["delivery_failed"] == 1
    assert notify.send_due(now=later + timedelta(seconds=notify.BACKOFF[1] + 1))["delivered"] == 1
    delivery.refresh_from_db()
    assert (delivery.status, delivery.attempts) == ("delivered", 3)
    ids = {r["headers"]["webhook-id"] for r in receiver.received}
    assert len(receiver.received) == 3 and len(ids) == 1  # one message, delivered at least once

    # The receiver's check is real: a body changed on the way fails it.
    body = notify.payload(JobEvent.objects.get(job=job))
    ts = int(time.time())
    headers = {
        "webhook-id": "evt_x",
        "webhook-timestamp": str(ts),
        "webhook-signature": notify.sign(hook.secret, "evt_x", ts, body),
    }
    receiver.verifier.verify(body, headers)
    with pytest.raises(Exception, match="match"):
        receiver.verifier.verify(body.replace(b"cancelled", b"completed"), headers)


def test_pausing_itself_emails_but_sends_no_webhook_and_a_job_without_notify_sends_no_email(
    sim, write, owner, receivers
):
    owner.email = "ada@example.com"
    owner.save()
    hook_to(receivers)
    endpoint = make_endpoint(sim)
    job = make_job(write, owner, endpoint, 2, start=False)
    Job.objects.filter(pk=job.pk).update(status=Job.Status.RUNNING)
    job.refresh_from_db()
    job.pause_itself("The API account has run out of quota.")
    assert notify.send_due() == {"emailed": 1, "email_failed": 0, "delivered": 0, "delivery_failed": 0}
    assert "paused" in mail.outbox[0].subject and "run out of quota" in mail.outbox[0].body

    quiet = make_job(write, owner, endpoint, 2, start=False)
    Job.objects.filter(pk=quiet.pk).update(notify=False)
    quiet.refresh_from_db()
    control.cancel(quiet)
    assert notify.send_due()["emailed"] == 0 and len(mail.outbox) == 1
    assert JobEvent.objects.get(job=quiet).email == JobEvent.Email.SKIPPED
    assert WebhookDelivery.objects.filter(event__job=quiet).count() == 1  # the team's webhooks are told anyway


def test_an_owner_without_an_address_is_skipped_and_a_refusing_mail_server_is_retried(
    sim, write, owner, settings, monkeypatch
):
    endpoint = make_endpoint(sim)
    job = make_job(write, owner, endpoint, 2, start=False)
    control.cancel(job)
    notify.send_due()
    assert JobEvent.objects.get(job=job).email == JobEvent.Email.SKIPPED and not mail.outbox

    owner.email = "ada@example.com"
    owner.save()
    second = make_job(write, owner, endpoint, 2, start=False)
    control.cancel(second)

    def refuse(*args, **kwargs):
        raise ConnectionRefusedError("SMTP is down")

    monkeypatch.setattr("jobs.engine.notify.send_mail", refuse)
    assert notify.send_due()["email_failed"] == 1
    event = JobEvent.objects.get(job=second)
    assert event.email == JobEvent.Email.PENDING and "SMTP is down" in event.email_error
    monkeypatch.undo()
    monkeypatch.setattr("jobs.queue.send_notifications_on_commit", lambda *a, **k: None)
    assert notify.send_due(now=timezone.now() + timedelta(minutes=1))["emailed"] == 1
    assert len(mail.outbox) == 1


def test_settings_pages_and_staff_only_webhooks(client, owner, staff):
    client.force_login(owner)
    page = client.get("/account/notifications/")
    assert page.status_code == 200 and "Email me when my jobs end" in page.content.decode()
    client.post("/account/notifications/", {"email": "ada@example.com"})  # box unticked
    owner.refresh_from_db()
    assert owner.email == "ada@example.com" and NotificationSettings.email_default(owner) is False
    assert client.get("/team/webhooks/").status_code == 403
    assert client.post("/team/webhooks/", {"name": "x", "url": "http://127.0.0.1:9/"}).status_code == 403

    client.force_login(staff)
    refused = client.post("/team/webhooks/", {"name": "meta", "url": "http://169.254.169.254/latest/"})
    assert "metadata" in refused.content.decode() and not Webhook.objects.exists()
    created = client.post("/team/webhooks/", {"name": "ops", "url": "http://127.0.0.1:9/hook?token=abc"})
    hook = Webhook.objects.get()
    assert hook.secret in created.content.decode() and created["Cache-Control"] == "no-store"
    assert hook.secret not in client.get("/team/webhooks/").content.decode()  # shown once
    client.post(f"/team/webhooks/{hook.pk}/toggle")
    hook.refresh_from_db()
    assert hook.active is False


def test_the_form_and_v1_choose_the_email_per_job(client, owner, data_dir):
    from django.core.files.uploadedfile import SimpleUploadedFile

    from tests.factories import api_headers, chat_line, jsonl

    NotificationSettings.objects.create(user=owner, email_when_done=False)
    endpoint = make_endpoint("http://127.0.0.1:9/v1")
    client.force_login(owner)
    url = client.post("/jobs/new/", {"file": SimpleUploadedFile("in.jsonl", jsonl([chat_line("a")]))}).url
    assert 'name="notify" id="id_notify" checked' not in client.get(url).content.decode()  # their default: off
    client.post(url, {"endpoint": endpoint.pk, "max_attempts": 5, "action": "launch", "mode": "live", "notify": "on"})
    assert Job.objects.get().notify is True

    headers = api_headers(owner)
    for metadata, expected in (({}, False), ({"batchsite_notify": "true"}, True)):
        file = client.post(
            "/v1/files",
            {"file": SimpleUploadedFile("in.jsonl", jsonl([chat_line("a")])), "purpose": "batch"},
            headers=headers,
        ).json()
        body = {
            "input_file_id": file["id"],
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
            "metadata": metadata,
        }
        assert client.post("/v1/batches", body, content_type="application/json", headers=headers).status_code == 200
        assert Job.objects.latest("pk").notify is expected
