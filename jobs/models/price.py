"""Price: what a model costs per million tokens."""

from decimal import Decimal

from django.db import models


class Price(models.Model):
    """USD per million tokens, for a model and its snapshots, or for a prefix* (jobs/pricing.py). Editable in the admin."""

    model = models.CharField(
        max_length=100,
        unique=True,
        help_text="Model name, e.g. gpt-4o-mini (its dated snapshots and :tags share its price), or a prefix ending in *, e.g. llama3*",
    )
    input_per_mtok = models.DecimalField(max_digits=10, decimal_places=4)
    cached_input_per_mtok = models.DecimalField(max_digits=10, decimal_places=4, null=True, blank=True)
    output_per_mtok = models.DecimalField(max_digits=10, decimal_places=4, default=Decimal(0))

    class Meta:
        ordering = ["model"]

    def __str__(self) -> str:
        return self.model

    def cost(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> Decimal:
        cached_rate = self.cached_input_per_mtok if self.cached_input_per_mtok is not None else self.input_per_mtok
        uncached = max(prompt_tokens - cached_tokens, 0)
        total = uncached * self.input_per_mtok + cached_tokens * cached_rate + completion_tokens * self.output_per_mtok
        return (total / Decimal(1_000_000)).quantize(Decimal("0.00000001"))
