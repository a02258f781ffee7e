"""Cost of a request from the editable price table (the longest matching model prefix wins)."""

from decimal import Decimal

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


def estimate(plan, endpoint) -> dict:
    """Tokens, cost and time a validated plan will take at the endpoint's limits."""
    book = PriceBook.load()
    model = plan.models.most_common(1)[0][0] if plan.models else ""
    price = book.price(model)
    input_cost = book.cost(model, plan.est_input_tokens, 0)
    max_cost = book.cost(model, plan.est_input_tokens, plan.max_output_tokens) if plan.max_output_tokens else None
    minutes, basis = None, "limits not known yet: they are learned from the first answers"
    rpm = endpoint.effective_rpm if endpoint else None
    tpm = endpoint.effective_tpm if endpoint else None
    if rpm or tpm:
        by_requests = plan.count / rpm if rpm else 0
        by_tokens = (plan.est_input_tokens + plan.max_output_tokens) / tpm if tpm else 0
        minutes = max(by_requests, by_tokens)
        basis = f"at {rpm:,} requests/min" if by_requests >= by_tokens else f"at {tpm:,} tokens/min"
    return {
        "input_tokens": plan.est_input_tokens,
        "max_output_tokens": plan.max_output_tokens,
        "priced": price is not None,
        "model": model,
        "input_cost": input_cost,
        "max_cost": max_cost,
        "minutes": minutes,
        "basis": basis,
    }
