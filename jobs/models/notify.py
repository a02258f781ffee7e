"""Notifications (issue 14): when a job ends, or pauses by itself, its owner gets an email and the team's
webhooks get OpenAI's event (batch.completed, batch.failed, batch.cancelled), signed as Standard Webhooks
sign them. An outbox: the event and its deliveries are rows written with the status change, sent by a
worker task (jobs/engine/notify.py) and retried with backoff, so a crash or a receiver's outage loses none."""

from __future__ import annotations

import base64
import secrets
import uuid
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from django.conf import settings
from django.contrib.auth.base_user import AbstractBaseUser
from django.db import models
from django.utils import timezone

from jobs import crypto, queue

if TYPE_CHECKING:
    from jobs.models.job import Job

# Job status -> OpenAI's webhook event. A job that pauses itself (quota, a refused key) emails its owner
# only: OpenAI's Batch API has no such event.
EVENTS = {"completed": "batch.completed", "failed": "batch.failed", "cancelled": "batch.cancelled"}
PAUSED = "batch.paused"


class NotificationSettings(models.Model):
    """A person's defaults: new jobs email them when they end unless the launch form says otherwise."""

    user = models.OneToOneField(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="notifications")
    email_when_done = models.BooleanField(default=True)

    def __str__(self) -> str:
        return f"notifications of {self.user}"

    @classmethod
    def email_default(cls, user: AbstractBaseUser) -> bool:
        found = cls.objects.filter(user=user).values_list("email_when_done", flat=True).first()
        return True if found is None else found


class Webhook(models.Model):
    name = models.CharField(max_length=100)
    url = models.URLField(max_length=500)
    secret_encrypted = models.TextField(editable=False)
    active = models.BooleanField(default=True)
    created_at = models.DateTimeField(default=timezone.now)

    def __str__(self) -> str:
        return self.name

    @property
    def secret(self) -> str:
        return crypto.decrypt(self.secret_encrypted)

    def new_secret(self) -> str:
        """A fresh signing secret in Standard Webhooks' form (whsec_ + base64 of 24 random bytes), stored
        encrypted; returned once, for the receiver's configuration."""
        secret = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
        self.secret_encrypted = crypto.encrypt(secret)
        return secret


class JobEvent(models.Model):
    """A job ended or paused itself: what its owner is emailed about, and what the webhooks are sent."""

    class Email(models.TextChoices):
        PENDING = "pending"
        SENT = "sent"
        SKIPPED = "skipped"  # not asked for, or no address
        FAILED = "failed"

    job = models.ForeignKey("jobs.Job", on_delete=models.CASCADE, related_name="events")
    event = models.CharField(max_length=40)
    event_id = models.CharField(max_length=40, unique=True, default="")
    created_at = models.DateTimeField(default=timezone.now)
    email = models.CharField(max_length=10, choices=Email.choices, default=Email.PENDING)
    email_attempts = models.PositiveSmallIntegerField(default=0)
    email_error = models.CharField(max_length=500, blank=True)
    next_attempt_at = models.DateTimeField(default=timezone.now, db_index=True)

    def __str__(self) -> str:
        return f"{self.event} of job {self.job_id}"

    @classmethod
    def prune(cls, now: datetime | None = None) -> int:
        """Events older than BATCHSITE_EVENT_RETENTION_DAYS go, with their deliveries, once nothing of theirs
        is still to be sent (an email or a delivery being retried stays until it ends). How many went."""
        since = (now or timezone.now()) - timedelta(days=settings.BATCHSITE_EVENT_RETENTION_DAYS)
        done = cls.objects.filter(created_at__lt=since).exclude(email=cls.Email.PENDING)
        done = done.exclude(deliveries__status=WebhookDelivery.Status.PENDING)
        return (
            cls.objects.filter(pk__in=list(done.values_list("pk", flat=True)[:10_000]))
            .delete()[1]
            .get(cls._meta.label, 0)
        )

    @classmethod
    def record(cls, job: Job, event: str) -> None:
        """With the status change (same transaction when there is one): the event, its deliveries to every
        active webhook (OpenAI's events only), and a worker task to send them once committed."""
        ev = cls.objects.create(
            job=job,
            event=event,
            event_id=f"evt_{uuid.uuid4().hex}",
            email=cls.Email.PENDING if job.notify else cls.Email.SKIPPED,
        )
        if event in EVENTS.values():
            WebhookDelivery.objects.bulk_create(
                WebhookDelivery(webhook=hook, event=ev) for hook in Webhook.objects.filter(active=True)
            )
        queue.send_notifications_on_commit(job.pk)


class WebhookDelivery(models.Model):
    class Status(models.TextChoices):
        PENDING = "pending"
        DELIVERED = "delivered"
        FAILED = "failed"  # out of attempts

    webhook = models.ForeignKey(Webhook, on_delete=models.CASCADE, related_name="deliveries")
    event = models.ForeignKey(JobEvent, on_delete=models.CASCADE, related_name="deliveries")
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.PENDING)
    attempts = models.PositiveSmallIntegerField(default=0)
    next_attempt_at = models.DateTimeField(default=timezone.now, db_index=True)
    last_status_code = models.PositiveSmallIntegerField(null=True, blank=True)
    last_error = models.CharField(max_length=500, blank=True)
    delivered_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name_plural = "webhook deliveries"

    def __str__(self) -> str:
        return f"{self.event} to {self.webhook}"
