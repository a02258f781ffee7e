"""Money before it is spent: a request runs only if its most possible cost fits under every budget that applies
(the job's cost cap, its owner's and its endpoint's monthly limits), on top of what is spent and what requests
in flight may still cost. Live leases (leases.claim) and chunks for the Batch API (remote/budgets.py) weigh
them here; what fits holds its most cost as in flight (the ledger's hold_cost) until it is settled."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from django.db.models import Q, Sum

from jobs import tokens
from jobs.models import Item, Job, RemoteBatch, SpendingLimit
from jobs.pricing import PriceBook

# What a budget check reads of the job.
BUDGET_FIELDS = ("cost_cap", "cost", "model", "url", "owner_id", "endpoint_id")


@dataclass
class Budget:
    cap: Decimal
    committed: Decimal  # spent, plus the most the running requests in its scope may still cost
    spent: Decimal
    says: str  # "The job's cost cap", "alice's monthly spending limit"...
    fix: str

    def pause_reason(self, next_one: str, most: Decimal) -> str:
        """Why the job pauses before `next_one` ("the next one (line 5)"), which may cost up to `most`."""
        return (
            f"{self.says} is ${self.cap:,.4f}: ${self.spent:,.4f} is spent, requests in flight may cost up to "
            f"${self.committed - self.spent:,.4f} more, and {next_one} up to ${most:,.4f}. {self.fix}, then resume."
        )


def most_cost(
    book: PriceBook, url: str, body: dict[str, Any], est_tokens: int, model: str, discount: Decimal = Decimal(0)
) -> Decimal:
    """A request's most possible cost: its input plus all the output it may be billed for, every choice at its
    max tokens or its model's most (tokens.most_output_tokens), at the Batch API's discount for a batch."""
    output = tokens.most_output_tokens(url, body)
    return book.cost(body.get("model") or model, est_tokens, output, discount=discount)


def budgets(job: Job, weighed: Q) -> list[Budget]:
    """The job's cost cap and the monthly limits of its owner and its endpoint, each with what is committed:
    spent, plus the est_cost of running items other than the `weighed` ones (live claims, and the chunks sent
    to the Batch API and not yet collected; a chunk only planned holds no money yet, and its items' est_cost
    may be left from an earlier run). Call under the job's lock (the ledger's books)."""
    planned = RemoteBatch.objects.filter(status=RemoteBatch.Status.PLANNED)
    running = Item.objects.filter(status=Item.Status.RUNNING).exclude(weighed).exclude(remote_batch__in=planned)
    found = []
    if job.cost_cap is not None:
        flying = running.filter(job_id=job.pk).aggregate(s=Sum("est_cost"))["s"] or Decimal(0)
        found.append(
            Budget(job.cost_cap, job.cost + flying, job.cost, "The job's cost cap", "Raise the cap (or remove it)")
        )
    scope = Q(user_id=job.owner_id) | Q(endpoint_id=job.endpoint_id) if job.endpoint_id else Q(user_id=job.owner_id)
    for limit in SpendingLimit.objects.filter(scope).select_related("user", "endpoint").order_by("pk"):
        limit.lock()  # in pk order, after the job's row: claims against one limit are weighed one at a time
        spent = limit.spent()
        flying = running.filter(job__in=limit.jobs()).aggregate(s=Sum("est_cost"))["s"] or Decimal(0)
        found.append(
            Budget(
                limit.monthly_usd,
                spent + flying,
                spent,
                f"{limit.label[0].upper()}{limit.label[1:]} monthly spending limit",
                "Staff can raise it on the Usage page",
            )
        )
    return found


def unpriced(book: PriceBook, model: str, found: list[Budget]) -> str:
    """Why a request of `model` may not run under the budgets `found`, or "": a model with no price would cost
    $0 as far as any limit could tell, so it could run past every one."""
    if not found or book.price(model) is not None:
        return ""
    return (
        f"No price is known for the model “{model[:200]}”, and {found[0].says[0].lower()}{found[0].says[1:]} applies "
        "to this job: without a price it cannot be kept. Staff can add the model's price (Admin → Prices), "
        "then resume."
    )
