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

    def cost(self, model: str, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0, discount: Decimal = ZERO) -> Decimal:
        price = self.price(model)
        if price is None:
            return ZERO
        cost = price.cost(prompt_tokens, completion_tokens, cached_tokens)
        return cost * (1 - discount) if discount else cost
