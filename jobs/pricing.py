"""Cost of a request from the editable price table (the longest matching model prefix wins)."""

from datetime import datetime, timedelta
from decimal import Decimal

from django.conf import settings
from django.utils import timezone

from jobs import remoteplan
from jobs.models import Price

ZERO = Decimal(0)


class PriceBook:
    def __init__(self, prices: list[Price]):
        # Longest prefix first, so "gpt-4o-mini-2024-07-18" finds gpt-4o-mini before gpt-4o.
        self.prices = sorted(prices, key=lambda p: len(p.model), reverse=True)
        self._by_model: dict[str, Price | None] = {}

    @classmethod
    def load(cls) -> "PriceBook":
        return cls(list(Price.objects.all()))

    def price(self, model: str) -> Price | None:
        if model not in self._by_model:
            name = (model or "").lower()
            self._by_model[model] = next((p for p in self.prices if name.startswith(p.model.lower())), None)
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
