"""Sending what jobs/models/notify.py records: the owner's email, and each webhook's delivery of OpenAI's event,
signed as Standard Webhooks sign (webhook-id, webhook-timestamp, webhook-signature: v1,<base64 HMAC-SHA256
of "id.timestamp.body" under the secret's bytes>).

Off the workers' main threads: the task (tasks.send_notifications) hands the work to its worker process's outbox
thread and returns at once, so a slow or hostile receiver or mail server never holds a worker a job's slices
need (send_in_background). Up to four rounds run side by side in each worker process.

At least once: an attempt is claimed (compare-and-set on its count, which also sets the next try) before
it is made, so two workers never make the same one, and a worker killed mid-send leaves it to be tried
again. Receivers tell repeats apart by webhook-id, as the standard says.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import threading
import time
from datetime import datetime, timedelta

import aiohttp
from django.conf import settings
from django.core.mail import send_mail
from django.db import connections
from django.utils import timezone

from jobs import egress
from jobs.engine import wire
from jobs.models import Batch, JobEvent, WebhookDelivery

log = logging.getLogger(__name__)

# Seconds before each next try: about a day in all, as Standard Webhooks suggests.
BACKOFF = (5, 30, 120, 600, 1800, 3600, 3 * 3600, 6 * 3600, 12 * 3600)
MAX_ATTEMPTS = len(BACKOFF) + 1
# A whole delivery, from connecting to the receiver's status line and headers, takes at most DEADLINE seconds,
# however slowly the receiver sends: a slow or hostile receiver cannot hold a worker. Of its answer only the
# status matters: the body is never read.
DEADLINE = 15.0
BATCH = 100  # of each kind per call; the next call (at once, or the schedule's) does the rest

SUBJECTS = {
    "batch.completed": "completed",
    "batch.failed": "failed",
    "batch.cancelled": "was cancelled",
    "batch.paused": "paused and needs you",
}


class _Outbox:
    """Threads of this worker process that run send_due rounds, up to ROUNDS at once, so a delivery due now does
    not wait for one held by a slow receiver (each round claims its own deliveries). A round asked for while
    all are busy is remembered: the next round to end runs again and takes it."""

    ROUNDS = 4

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running = 0
        self.wanted = False
        self.rounds = 0

    def start(self) -> bool:
        with self.lock:
            if self.running >= self.ROUNDS:
                self.wanted = True
                return False
            self.running += 1
        threading.Thread(target=self._round, name="batchsite-outbox", daemon=True).start()
        return True

    def _round(self) -> None:
        while True:
            try:
                counts = send_due()
                if any(counts.values()):
                    log.info("notifications %s", counts)
            except Exception:
                log.exception("sending notifications failed")  # claimed ones are tried again after their backoff
            finally:
                connections.close_all()  # this thread's connections only
            with self.lock:
                self.rounds += 1
                if not self.wanted:
                    self.running -= 1
                    return
                self.wanted = False  # asked for while every round was busy: this one goes again

    def wait(self, timeout: float) -> bool:
        """Until no round runs (tests)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with self.lock:
                if not self.running:
                    return True
            time.sleep(0.02)
        return False


outbox = _Outbox()


def send_in_background() -> bool:
    """Start a round on an outbox thread of this process; False if all are busy (one runs again when it ends)."""
    return outbox.start()


def send_due(now: datetime | None = None) -> dict[str, int]:
    now = now or timezone.now()
    counts = {"emailed": 0, "email_failed": 0, "delivered": 0, "delivery_failed": 0}
    for event in JobEvent.objects.filter(email=JobEvent.Email.PENDING, next_attempt_at__lte=now).select_related(
        "job", "job__owner"
    )[:BATCH]:
        claimed = JobEvent.objects.filter(
            pk=event.pk, email_attempts=event.email_attempts, email=JobEvent.Email.PENDING
        )
        if not claimed.update(
            email_attempts=event.email_attempts + 1, next_attempt_at=now + _backoff(event.email_attempts)
        ):
            continue  # another worker has it
        counts["emailed" if _email(event) else "email_failed"] += 1
    mine = []
    for delivery in WebhookDelivery.objects.filter(
        status=WebhookDelivery.Status.PENDING, next_attempt_at__lte=now, webhook__active=True
    ).select_related("webhook", "event", "event__job")[:BATCH]:
        claim = WebhookDelivery.objects.filter(
            pk=delivery.pk, attempts=delivery.attempts, status=WebhookDelivery.Status.PENDING
        )
        if claim.update(attempts=delivery.attempts + 1, next_attempt_at=now + _backoff(delivery.attempts)):
            delivery.attempts += 1
            mine.append(delivery)
    # All at once: however many receivers are slow, the call holds its worker for one DEADLINE at most.
    answers = asyncio.run(_deliver_all([_signed(d) for d in mine])) if mine else []
    for delivery, (status, error) in zip(mine, answers, strict=True):
        counts["delivered" if _record(delivery, status, error) else "delivery_failed"] += 1
    return counts


def _backoff(attempts_before: int) -> timedelta:
    return timedelta(seconds=BACKOFF[min(attempts_before, len(BACKOFF) - 1)])


def _email(event: JobEvent) -> bool:
    job = event.job
    address = (job.owner.email or "").strip()
    if not address:
        JobEvent.objects.filter(pk=event.pk).update(
            email=JobEvent.Email.SKIPPED, email_error="The owner has no address."
        )
        return False
    name = " ".join(job.name.split())[:80]  # one line: a subject is a header
    subject = f"Batchsite: job “{name}” {SUBJECTS.get(event.event, event.event)}"
    url = f"{settings.BATCHSITE_BASE_URL}{job.get_absolute_url()}"
    lines = [
        f"Job “{name}” {SUBJECTS.get(event.event, event.event)}.",
        "",
        f"{job.n_succeeded:,} succeeded, {job.n_failed:,} failed, {job.n_cancelled:,} cancelled, "
        f"{job.n_expired:,} expired, of {job.total:,} requests.",
        f"Tokens: {job.prompt_tokens:,} in, {job.completion_tokens:,} out. Cost: ${job.cost:.4f}.",
    ]
    if job.status_reason:
        lines += ["", job.status_reason]
    lines += ["", f"The job: {url}", f"Results: {url}download/results", f"Errors: {url}download/errors"]
    try:
        send_mail(subject, "\n".join(lines), None, [address])
    except Exception as e:  # SMTP down, refused: tried again later, up to MAX_ATTEMPTS
        final = event.email_attempts + 1 >= MAX_ATTEMPTS
        JobEvent.objects.filter(pk=event.pk).update(
            email=JobEvent.Email.FAILED if final else JobEvent.Email.PENDING,
            email_error=f"{type(e).__name__}: {e}"[:500],
        )
        log.warning("job %s: email to its owner failed: %s", job.pk, e)
        return False
    JobEvent.objects.filter(pk=event.pk).update(email=JobEvent.Email.SENT, email_error="")
    return True


def payload(event: JobEvent) -> bytes:
    """OpenAI's webhook event (object, id, type, created_at, data.id: the batch's id), and Batchsite's view of
    the job beside it."""
    job = event.job
    batch_id = Batch.objects.filter(job=job).values_list("public_id", flat=True).first() or f"job_{job.pk}"
    body = {
        "object": "event",
        "id": event.event_id,
        "type": event.event,
        "created_at": int(event.created_at.timestamp()),
        "data": {"id": batch_id},
        "batchsite": {
            "job": job.pk,
            "name": job.name,
            "status": job.status,
            "url": f"{settings.BATCHSITE_BASE_URL}{job.get_absolute_url()}",
            "request_counts": {"total": job.total, "completed": job.n_succeeded, "failed": job.n_failed},
            "cost": str(job.cost),
        },
    }
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


def sign(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    key = base64.b64decode(secret.removeprefix("whsec_"))
    digest = hmac.new(key, f"{message_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def _signed(delivery: WebhookDelivery) -> tuple[str, bytes, dict[str, str]]:
    """(url, body, headers) of a delivery: its event, signed now."""
    hook, event = delivery.webhook, delivery.event
    body = payload(event)
    timestamp = int(time.time())
    headers = {
        "content-type": "application/json",
        "user-agent": "Batchsite-Webhooks/1",
        "webhook-id": event.event_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(hook.secret, event.event_id, timestamp, body),
    }
    return hook.url, body, headers


async def _deliver_all(posts: list[tuple[str, bytes, dict[str, str]]]) -> list[tuple[int | None, str]]:
    """(status, error) of each signed delivery, made side by side over one session."""
    timeout = aiohttp.ClientTimeout(total=DEADLINE)
    # Connections go only to allowed addresses, checked as they are made (wire.CheckedResolver).
    connector = aiohttp.TCPConnector(resolver=wire.CheckedResolver(), ssl=wire.tls_context())
    async with aiohttp.ClientSession(timeout=timeout, connector=connector, trust_env=False) as session:
        return await asyncio.gather(*(_deliver(session, *post) for post in posts))


async def _deliver(
    session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str]
) -> tuple[int | None, str]:
    """POST one event: the receiver's status, or why there is none. aiohttp's total timeout bounds the whole
    exchange (httpx's timeouts are per read: a receiver sending a byte every few seconds never times out)."""
    try:
        egress.check_webhook_url(url)  # again now: the name may resolve elsewhere than when it was saved
        async with session.post(url, data=body, headers=headers, allow_redirects=False) as response:
            transport = response.connection.transport if response.connection else None
            peer = transport.get_extra_info("peername") if transport else None
            if peer:
                egress.check_address(str(peer[0]))  # where the connection really went (DNS rebinding)
            return response.status, ""
    except Exception as e:  # refused, unreachable, timed out, past the deadline: tried again later
        return None, f"{type(e).__name__}: {e}"[:500]


def _record(delivery: WebhookDelivery, status: int | None, error: str) -> bool:
    ok = status is not None and 200 <= status < 300
    fields: dict[str, object] = {"last_status_code": status, "last_error": error if not ok else ""}
    if ok:
        fields.update(status=WebhookDelivery.Status.DELIVERED, delivered_at=timezone.now())
    elif delivery.attempts >= MAX_ATTEMPTS:
        fields.update(status=WebhookDelivery.Status.FAILED)
    if not ok and status is not None:
        fields["last_error"] = f"HTTP {status}"
    WebhookDelivery.objects.filter(pk=delivery.pk).update(**fields)
    return ok
