"""Usage: tokens and cost per person, model, month and day; and the monthly spending limits (set by staff)."""

from datetime import timedelta
from decimal import Decimal
from typing import Any

from django.contrib import messages
from django.contrib.auth import get_user_model
from django.contrib.auth.decorators import login_required
from django.db.models import Count, Sum
from django.db.models.functions import TruncDate, TruncMonth
from django.http import HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.utils import timezone
from django.views.decorators.http import require_GET, require_POST

from jobs import timeline
from jobs.models import Endpoint, Job, SpendingLimit
from jobs.web.decorators import staff_required
from jobs.web.requests import AuthenticatedHttpRequest


@require_GET
@login_required
def usage(request: AuthenticatedHttpRequest) -> HttpResponse:
    sums = dict(
        jobs=Count("id"),
        requests=Sum("n_succeeded"),
        prompt=Sum("prompt_tokens"),
        completion=Sum("completion_tokens"),
        cost=Sum("cost"),
    )
    context = {
        "days": _last_days(sums),  # {"bars", "bar_width"}
        "by_user": Job.objects.values("owner__username").annotate(**sums).order_by("-cost", "owner__username"),
        "by_model": Job.objects.values("model").annotate(**sums).order_by("-cost", "model"),
        "by_month": Job.objects.annotate(month=TruncMonth("created_at"))
        .values("month")
        .annotate(**sums)
        .order_by("-month"),
        "total": Job.objects.aggregate(**sums),
        "limits": _limits(),
        "people": get_user_model().objects.filter(is_active=True).order_by("username"),
        "endpoints": Endpoint.objects.order_by("name"),
    }
    return render(request, "jobs/usage.html", context)


def _limits() -> list[dict]:
    rows = []
    for limit in SpendingLimit.objects.select_related("user", "endpoint"):
        spent = limit.spent()
        rows.append(
            {
                "limit": limit,
                "who": limit.user.get_username() if limit.user else f"Endpoint: {limit.endpoint}",
                "spent": spent,
                "left": max(limit.monthly_usd - spent, Decimal(0)),
                "percent": min(100, float(100 * spent / limit.monthly_usd)) if limit.monthly_usd else 100,
            }
        )
    return rows


@require_POST
@login_required
@staff_required
def spending_limit(request: AuthenticatedHttpRequest) -> HttpResponse:
    """Set or remove (empty amount) the monthly limit of one person or one endpoint."""
    target = request.POST.get("target", "")
    kind, _, pk = target.partition(":")
    amount = request.POST.get("monthly_usd", "").strip()
    try:
        value = Decimal(amount) if amount else None
        if value is not None and (not value.is_finite() or value < 0 or value >= Decimal("1e10")):
            raise ArithmeticError
    except ArithmeticError:
        messages.error(request, "The limit must be an amount in dollars, or empty to remove it.")
        return redirect("usage")
    if kind == "user":
        scope: dict[str, Any] = {"user": get_object_or_404(get_user_model(), pk=int(pk) if pk.isdigit() else 0)}
    elif kind == "endpoint":
        scope = {"endpoint": get_object_or_404(Endpoint, pk=int(pk) if pk.isdigit() else 0)}
    else:
        messages.error(request, "Choose a person or an endpoint.")
        return redirect("usage")
    if value is None:
        SpendingLimit.objects.filter(**scope).delete()
        messages.success(request, "Monthly limit removed.")
    else:
        SpendingLimit.objects.update_or_create(defaults={"monthly_usd": value.quantize(Decimal("0.01"))}, **scope)
        messages.success(request, f"Monthly limit set to ${value:,.2f}.")
    return redirect("usage")


def _last_days(sums: dict, n: int = 30) -> dict:
    """Tokens and cost per day over the last `n` days as chart bars (days without jobs included);
    no bars when there were no tokens at all."""
    since = timezone.localdate() - timedelta(days=n - 1)
    rows = (
        Job.objects.filter(created_at__date__gte=since)
        .annotate(day=TruncDate("created_at"))
        .values("day")
        .annotate(**sums)
        .order_by("day")
    )
    by_day = {r["day"]: r for r in rows}
    days = [by_day.get(since + timedelta(days=i), {"day": since + timedelta(days=i)}) for i in range(n)]
    for d in days:
        d["tokens"] = (d.get("prompt") or 0) + (d.get("completion") or 0)
    if not any(d["tokens"] for d in days):
        return {"bars": [], "bar_width": 0}
    return {"bars": days, "bar_width": timeline.place_bars(days, "tokens", slots=n)}
