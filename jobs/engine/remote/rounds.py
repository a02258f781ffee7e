"""A round: one pass of the poller over one job, and what it reads once for all the job's chunks (the job, its
endpoint, an SDK client per endpoint, the price book)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal

import openai

from jobs import clock, egress
from jobs.engine.remote import batchapi
from jobs.models import Endpoint, Job
from jobs.pricing import PriceBook


@dataclass
class Round:
    job: Job
    endpoint: Endpoint
    now: datetime = field(default_factory=clock.now)
    clients: dict[int, openai.OpenAI] = field(default_factory=dict)
    book: PriceBook | None = None

    def client(self, endpoint: Endpoint | None = None) -> openai.OpenAI:
        """The SDK client of `endpoint` (the job's by default), made once a round."""
        endpoint = endpoint or self.endpoint
        if endpoint.pk not in self.clients:
            self.clients[endpoint.pk] = batchapi.client_for(endpoint)
        return self.clients[endpoint.pk]

    def prices(self) -> PriceBook:
        if self.book is None:
            self.book = PriceBook.load()
        return self.book

    @property
    def discount(self) -> Decimal:
        """The Batch API's discount at the job's endpoint."""
        return Decimal(self.endpoint.batch_discount)

    @property
    def cancel_wanted(self) -> bool:
        """The job's batches are to be cancelled: the job is being cancelled, or a hybrid job went live."""
        return self.job.status == Job.Status.CANCELLING or self.job.switched_at is not None


def unusable(endpoint: Endpoint | None) -> str:
    """Why the endpoint cannot be used now ("" if it can): none configured, a key that cannot be read (a changed
    SECRET_KEY), or an address egress refuses."""
    if endpoint is None:
        return "No endpoint is configured. Add one on the Endpoints page (or set OPENAI_API_KEY), then resume."
    try:
        endpoint.api_key  # noqa: B018 - decrypting now turns a changed SECRET_KEY into a clear pause
        egress.check_base_url(endpoint.base_url)
    except (ValueError, egress.UnsafeURL) as e:
        return f"The endpoint cannot be used: {e}"
    return ""
