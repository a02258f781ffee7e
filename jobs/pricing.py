"""Cost of a request from the editable price table: a model's own price, or that of the model it is a dated
snapshot (gpt-4o-mini-2024-07-18) or a tag (llama3:8b) of, or that of the longest prefix staff wrote with a
trailing * (llama3*). A plain name is never a prefix: o3-pro is not priced as o3."""

import re
from datetime import datetime, timedelta
from decimal import Decimal

from django.conf import settings
from django.utils import timezone

from jobs import remoteplan
from jobs.models import Price

ZERO = Decimal(0)
# What may follow a priced name in a snapshot's name: a date (-2024-07-18) or a four-digit version (-0125).
# Anything else is another model: o3-pro is not o3, gpt-4o-mini is not gpt-4o.
SNAPSHOT = re.compile(r"-(\d{4}-\d{2}-\d{2}|\d{4})")


class PriceBook:
    def __init__(self, prices: list[Price]):
        self.prices = {p.model.lower(): p for p in prices if not p.model.endswith("*")}
        # Longest first, so "llama3.1*" wins over "llama3*".
        self.prefixes = sorted(
            ((p.model.lower().rstrip("*"), p) for p in prices if p.model.endswith("*")), key=lambda e: -len(e[0])
        )
        self._by_model: dict[str, Price | None] = {}

    @classmethod
    def load(cls) -> "PriceBook":
        return cls(list(Price.objects.all()))

    def price(self, model: str) -> Price | None:
        """The model's price, else its base model's (a dated snapshot, a tag), else the longest prefix* it
        starts with; None if there is none."""
        if model not in self._by_model:
            name = (model or "").lower()
            snapshot = SNAPSHOT.search(name)
            base = name[: snapshot.start()] if snapshot and snapshot.end() == len(name) else name.partition(":")[0]
            found = self.prices.get(name) or self.prices.get(base)
            if found is None:
                found = next((p for prefix, p in self.prefixes if name.startswith(prefix)), None)
            self._by_model[model] = found
        return self._by_model[model]

    def cost(
        self, model: str, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0, discount: Decimal = ZERO
    ) -> Decimal:
        price = self.price(model)
        if price is None:
            return ZERO
        cost = price.cost(prompt_tokens, completion_tokens, cached_tokens)
        return cost * (1 - discount) if discount else cost


def estimate(plan, endpoint, now: datetime | None = None) -> dict:
    """Tokens, cost and time a validated plan will take at the endpoint: live, at the Batch API, and the
    earliest hybrid deadline that still leaves the Batch API part of the work."""
    book = PriceBook.load()
    model = plan.models.most_common(1)[0][0] if plan.models else ""
    price = book.price(model)
    input_cost = book.cost(model, plan.est_input_tokens, 0)
    max_cost = book.cost(model, plan.est_input_tokens, plan.max_output_tokens) if plan.max_output_tokens else None
    result = {
        "input_tokens": plan.est_input_tokens,
        "max_output_tokens": plan.max_output_tokens,
        "priced": price is not None,
        "model": model,
        "input_cost": input_cost,
        "max_cost": max_cost,
        "basis": "not known: no endpoint to run it on",
        "live_seconds": None,
        "remote_discount": None,
        "remote_input_cost": None,
        "remote_max_cost": None,
        "hybrid_earliest": None,
        "hybrid_cancel_seconds": None,
        "hybrid_margin_seconds": None,
    }
    if endpoint is None:
        return result
    # The live run time by the rule a hybrid job plans its switch with (remoteplan.live_rate); against a
    # tokens-per-minute limit a request weighs its input plus its most output (max_tokens counts at OpenAI).
    per_request = (plan.est_input_tokens + plan.max_output_tokens) / plan.count if plan.count else 0.0
    rate, basis = remoteplan.live_rate(
        endpoint.concurrency, endpoint.effective_rpm, endpoint.effective_tpm, per_request, endpoint.latency_seconds
    )
    if not (endpoint.effective_rpm or endpoint.effective_tpm):
        basis += " (limits and latency are learned from the first answers)"
    live_seconds = plan.count / rate
    cancel_seconds = endpoint.effective_cancel_seconds
    margin = remoteplan.margin_for(live_seconds, settings.BATCHSITE_HYBRID_MARGIN_SECONDS)
    discount = Decimal(endpoint.batch_discount)
    result.update(
        live_seconds=live_seconds,
        basis=f"at {basis}",
        remote_discount=discount,
        remote_input_cost=input_cost * (1 - discount),
        remote_max_cost=max_cost * (1 - discount) if max_cost is not None else None,
        # With an earlier deadline a hybrid job's last safe moment to switch to live has passed at its start.
        hybrid_earliest=(now or timezone.now()) + timedelta(seconds=live_seconds + cancel_seconds + margin),
        hybrid_cancel_seconds=cancel_seconds,
        hybrid_margin_seconds=margin,
    )
    return result
