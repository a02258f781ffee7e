"""OpenAI's cursor lists: newest first, `after` = the id of the last object of the previous page."""

from __future__ import annotations

from django.db.models import QuerySet
from django.http import HttpRequest

from jobs.errors import ApiError


def limit_param(request: HttpRequest, default: int, maximum: int) -> int:
    raw = request.GET.get("limit", "")
    if raw == "":
        return default
    try:
        limit = int(raw)
    except ValueError:
        limit = 0
    if not 1 <= limit <= maximum:
        raise ApiError(
            400,
            f"Invalid 'limit': {raw!r}. Expected an integer from 1 to {maximum}.",
            param="limit",
            code="invalid_value",
        )
    return limit


def cursor_page(request: HttpRequest, objects: QuerySet, serialize, default: int, maximum: int, load=None) -> dict:
    """One page of `objects` (a queryset with a unique `public_id`), ordered by id, newest first unless order=asc.

    `load`, if given, turns the page's rows into the objects `serialize` takes, all at once (a page of
    ids into full objects in a few queries)."""
    limit = limit_param(request, default, maximum)
    order = request.GET.get("order", "desc")
    if order not in ("asc", "desc"):
        raise ApiError(
            400, f"Invalid 'order': {order!r}. Expected 'asc' or 'desc'.", param="order", code="invalid_value"
        )
    after = request.GET.get("after", "")
    if after:
        # Looked up among all objects, so a page still follows an object deleted since it was listed.
        cursor = objects.model.objects.filter(public_id=after).values_list("pk", flat=True).first()
        if cursor is None:
            raise ApiError(404, f"No object found with id {after!r} (the 'after' cursor).", param="after")
        objects = objects.filter(pk__gt=cursor) if order == "asc" else objects.filter(pk__lt=cursor)
    rows = list(objects.order_by("pk" if order == "asc" else "-pk")[: limit + 1])
    page = [serialize(row) for row in (load(rows[:limit]) if load else rows[:limit])]
    return {
        "object": "list",
        "data": page,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
        "has_more": len(rows) > limit,
    }
