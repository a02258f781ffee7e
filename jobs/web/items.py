"""A job's requests: the list, filtered by status or custom_id, and one request with its answer."""

import json

from django.contrib.auth.decorators import login_required
from django.core.paginator import Paginator
from django.http import HttpResponse
from django.shortcuts import get_object_or_404, render
from django.views.decorators.http import require_GET

from jobs import export
from jobs.models import Item
from jobs.web.access import get_job
from jobs.web.requests import AuthenticatedHttpRequest

ITEMS_PER_PAGE = 50


@require_GET
@login_required
def item_list(request: AuthenticatedHttpRequest, pk: int) -> HttpResponse:
    job = get_job(request, pk)
    items = job.items.only(
        "id",
        "job_id",
        "line",
        "custom_id",
        "status",
        "attempts",
        "http_status",
        "error_message",
        "latency_ms",
        "prompt_tokens",
        "completion_tokens",
        "from_cache",
    ).order_by("line")
    status = request.GET.get("status", "")
    q = request.GET.get("q", "").strip()
    if status in Item.Status.values:
        items = items.filter(status=status)
    if q:
        items = items.filter(custom_id__startswith=q)
    # Counting 50,000 rows on every page costs more than the page: the job row already has the counts.
    count = job.counts().get(status, 0) if status in Item.Status.values and not q else (job.total if not q else None)
    paginator = Paginator(items, ITEMS_PER_PAGE)
    if count is not None:
        paginator.count = count
    page = paginator.get_page(request.GET.get("page"))
    context = {"job": job, "page": page, "status": status, "q": q, "statuses": Item.Status.values}
    return render(request, "jobs/items.html", context)


SHOWN_CHARS = 256 * 1024  # of a request, an answer or its text on the item page: an answer may be 16 MB


def _pretty(text: str) -> str:
    if len(text) > SHOWN_CHARS:
        return _shown(text)  # indenting 16 MB of JSON would make it several times that, on every load
    try:
        return _shown(json.dumps(json.loads(text), indent=2, ensure_ascii=False))
    except (ValueError, TypeError, RecursionError):
        return text


def _shown(text: str) -> str:
    if len(text) <= SHOWN_CHARS:
        return text
    return text[:SHOWN_CHARS] + f"\n… ({len(text) - SHOWN_CHARS:,} more characters: download the results for all of it)"


@require_GET
@login_required
def item_detail(request: AuthenticatedHttpRequest, pk: int, item_pk: int) -> HttpResponse:
    job = get_job(request, pk)
    item = get_object_or_404(Item, pk=item_pk, job=job)
    request_line = {"custom_id": item.custom_id, "method": "POST", "url": job.url, "body": json.loads(item.body)}
    output = ""
    if item.status == Item.Status.SUCCEEDED:
        try:
            output = _shown(export.output_text(job.url, json.loads(item.response)))
        except (ValueError, RecursionError):
            output = ""
    context = {
        "job": job,
        "item": item,
        "request_json": _shown(json.dumps(request_line, indent=2, ensure_ascii=False)),
        "response_json": _pretty(item.response) if item.response else "",
        "output": output,
    }
    return render(request, "jobs/item_detail.html", context)
