"""Endpoint: an OpenAI-compatible server that jobs run against, its key encrypted at rest."""

import os
from decimal import Decimal
from typing import Any

from django.db import models, transaction
from django.db.models import Q

from jobs import crypto


class Endpoint(models.Model):
    """An OpenAI-compatible server that jobs run against (OpenAI, Azure, vLLM, Ollama, LiteLLM...)."""

    name = models.CharField(max_length=100, unique=True)
    base_url = models.URLField(max_length=500, help_text="Up to and including /v1, e.g. https://api.openai.com/v1")
    api_key_encrypted = models.TextField(blank=True, editable=False)
    key_hint = models.CharField(max_length=12, blank=True, editable=False)
    concurrency = models.PositiveIntegerField(default=100, help_text="Requests in flight at once")
    rpm = models.PositiveIntegerField(null=True, blank=True, help_text="Requests per minute; empty: learned")
    tpm = models.PositiveIntegerField(null=True, blank=True, help_text="Tokens per minute; empty: learned")
    learned_rpm = models.PositiveIntegerField(null=True, blank=True, editable=False)
    learned_tpm = models.PositiveIntegerField(null=True, blank=True, editable=False)
    # What the endpoint charges against its token budget for a token of our estimate (tokens.rate_charge),
    # learned from its rate-limit headers (jobs/engine/ratelimit.py); None: not learned yet (1.0).
    learned_token_ratio = models.FloatField(null=True, blank=True, editable=False)
    cooldown_until = models.DateTimeField(null=True, blank=True, editable=False)
    # The Batch API (remote and hybrid jobs): what one batch may hold, the per-model enqueued-token budget
    # (OpenAI's varies by model and tier), its discount, and how long a cancel takes to settle.
    batch_max_requests = models.PositiveIntegerField(default=50_000, help_text="Requests per remote batch")
    batch_max_bytes = models.PositiveBigIntegerField(default=200 * 1024 * 1024, help_text="Bytes per batch file")
    batch_token_limit = models.PositiveBigIntegerField(
        null=True, blank=True, help_text="Enqueued tokens per model (input + max output); empty: no limit"
    )
    batch_discount = models.DecimalField(
        max_digits=4,
        decimal_places=3,
        default=Decimal("0.5"),
        help_text="Price cut of the Batch API: 0.5 is half price",
    )
    batch_cancel_seconds = models.PositiveIntegerField(
        default=600, help_text="How long a batch cancel may take to settle (hybrid plans with it until one is seen)"
    )
    learned_cancel_seconds = models.PositiveIntegerField(null=True, blank=True, editable=False)
    # The median time of a successful live request in the last slice: how fast the rest of a hybrid job runs live.
    learned_latency_ms = models.PositiveIntegerField(null=True, blank=True, editable=False)
    # 429s (rate_limit_exceeded) the endpoint has answered live requests with, for /metrics: added after each slice.
    rate_limited_total = models.PositiveBigIntegerField(default=0, editable=False)
    # {model: enqueued tokens}, lowered each time the endpoint refuses a batch of that model with
    # token_limit_exceeded (its count and ours differ; each model has its own budget).
    learned_token_limits = models.JSONField(default=dict, blank=True, editable=False)
    is_default = models.BooleanField(default=False)
    from_env = models.BooleanField(default=False, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    ENV_NAME = "Default (from environment)"

    class Meta:
        ordering = ["-is_default", "name"]
        constraints = [
            models.UniqueConstraint(fields=["is_default"], condition=Q(is_default=True), name="one_default_endpoint"),
        ]

    def __str__(self) -> str:
        return self.name

    @property
    def api_key(self) -> str:
        return crypto.decrypt(self.api_key_encrypted)

    def set_api_key(self, key: str) -> None:
        self.api_key_encrypted = crypto.encrypt(key)
        self.key_hint = key[-4:] if len(key) >= 12 else ""

    @property
    def masked_key(self) -> str:
        if not self.api_key_encrypted:
            return "(none)"
        return f"…{self.key_hint}" if self.key_hint else "••••"

    @property
    def effective_rpm(self) -> int | None:
        return self.rpm or self.learned_rpm

    @property
    def effective_tpm(self) -> int | None:
        return self.tpm or self.learned_tpm

    def token_limit(self, model: str) -> int | None:
        """The enqueued-token budget a batch of `model` plans with: the setting, or less if the endpoint taught so."""
        limits = [n for n in (self.batch_token_limit, (self.learned_token_limits or {}).get(model)) if n]
        return min(limits) if limits else None

    @property
    def latency_seconds(self) -> float | None:
        return self.learned_latency_ms / 1000 if self.learned_latency_ms else None

    @property
    def effective_cancel_seconds(self) -> int:
        return self.learned_cancel_seconds or self.batch_cancel_seconds

    @classmethod
    def sync_from_env(cls) -> "Endpoint | None":
        """Create or update the endpoint described by OPENAI_API_KEY/OPENAI_BASE_URL and friends.

        The environment owns that one endpoint: editing it on the page is overwritten at the
        next start, which is what an operator who set the variables expects.
        """
        key = os.environ.get("OPENAI_API_KEY", "")
        base_url = (os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1").rstrip("/")
        if not key and not os.environ.get("OPENAI_BASE_URL"):
            return None

        def envint(name: str) -> int | None:
            value = os.environ.get(name, "").strip()
            return int(value) if value else None

        endpoint = cls.objects.filter(from_env=True).first() or cls(name=cls.ENV_NAME, from_env=True)
        if not endpoint.pk and cls.objects.filter(name=cls.ENV_NAME).exists():
            endpoint = cls.objects.get(name=cls.ENV_NAME)
            endpoint.from_env = True
        before = endpoint._values()
        changed_url = endpoint.base_url != base_url
        endpoint.base_url = base_url
        try:
            same_key = endpoint.api_key == key
        except ValueError:  # encrypted under an older SECRET_KEY: the environment's key replaces it
            same_key = False
        if not same_key or not endpoint.api_key_encrypted:
            endpoint.set_api_key(key)
        endpoint.concurrency = envint("OPENAI_CONCURRENCY") or 100
        endpoint.rpm = envint("OPENAI_RPM")
        endpoint.tpm = envint("OPENAI_TPM")
        if changed_url:  # limits learned from another server mean nothing here
            endpoint.learned_rpm = endpoint.learned_tpm = endpoint.learned_token_ratio = None
            endpoint.cooldown_until = None
        if not cls.objects.filter(is_default=True).exclude(pk=endpoint.pk).exists():
            endpoint.is_default = True
        # Pages call this: write (and, on SQLite, take the write lock) only when the environment
        # really changed something.
        if endpoint.pk is None or endpoint._values() != before:
            with transaction.atomic():
                endpoint.save()
        return endpoint

    def _values(self) -> dict[str, Any]:
        return {f.attname: getattr(self, f.attname) for f in self._meta.concrete_fields if f.name != "updated_at"}

    @classmethod
    def default(cls) -> "Endpoint | None":
        cls.sync_from_env()
        return cls.objects.filter(is_default=True).first() or cls.objects.first()

    def make_default(self) -> None:
        with transaction.atomic():
            Endpoint.objects.filter(is_default=True).exclude(pk=self.pk).update(is_default=False)
            Endpoint.objects.filter(pk=self.pk).update(is_default=True)
        self.is_default = True
