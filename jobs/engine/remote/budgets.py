"""What may be sent: the endpoint's enqueued-token limit per model (shared by every job's batches there), and
money (the job's cost cap, its owner's and its endpoint's monthly limits, jobs/engine/budgets.py)."""

from __future__ import annotations

import json
import logging
import re
from collections import defaultdict
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.core.cache import cache
from django.db import transaction
from django.db.models import F, Q, Sum

from jobs import remoteplan
from jobs.engine import budgets
from jobs.engine.remote.plan import PLAN_ROWS
from jobs.engine.remote.rounds import Round
from jobs.models import Endpoint, Item, Job, RemoteBatch, ledger

log = logging.getLogger(__name__)

RB = RemoteBatch.Status
BACKOFF_CAP = 600.0
# OpenAI's refusal states the limit: "... Limit: 90,000 enqueued tokens. Please try submitting fewer tokens ..."
STATED_LIMIT = re.compile(r"Limit: ?([0-9,]{1,20}) enqueued tokens")


def token_wait_key(endpoint_id: int, model: str) -> str:
    return f"batchsite-token-wait:{endpoint_id}:{model}"


def enqueued_tokens(chunk: RemoteBatch) -> int:
    """Tokens of the same model's other batches at this endpoint that are not finished (any job's)."""
    active = [RB.CREATING, *RemoteBatch.REMOTE_ACTIVE]
    others = RemoteBatch.objects.filter(endpoint=chunk.endpoint_id, model=chunk.model, status__in=active)
    n: int = others.exclude(pk=chunk.pk).aggregate(n=Sum("est_tokens"))["n"] or 0
    return n


def tokens_allow(endpoint: Endpoint, chunk: RemoteBatch) -> bool:
    """Whether the chunk fits under the model's enqueued-token limit at the endpoint, now."""
    if cache.get(token_wait_key(endpoint.pk, chunk.model)):
        return False  # pausing after a refusal (wait_for_room)
    limit = endpoint.token_limit(chunk.model)
    if not limit:
        return True
    enqueued = enqueued_tokens(chunk)
    # A chunk over the limit by itself still goes when nothing else is enqueued: the endpoint then says why.
    return enqueued == 0 or enqueued + chunk.est_tokens <= limit


def refused_for_tokens(errors: list[dict[str, Any]]) -> bool:
    return bool(errors) and all(e.get("code") == "token_limit_exceeded" for e in errors)


def stated_limit(errors: list[dict[str, Any]]) -> int | None:
    for error in errors:
        if match := STATED_LIMIT.search(str(error.get("message") or "")[:2000]):
            return int(match.group(1).replace(",", "")) or None
    return None


def sent_accepted(endpoint: Endpoint, chunk: RemoteBatch) -> None:
    """A batch was accepted: refusals for its model start over."""
    cache.delete(token_wait_key(endpoint.pk, chunk.model) + ":n")


def wait_for_room(endpoint: Endpoint, chunk: RemoteBatch, errors: list[dict[str, Any]]) -> bool:
    """A batch refused for the model's enqueued-token limit ("try again once some in_progress batches have been
    completed"). True: its requests wait for a new chunk, planned under a lower budget (90% of what was refused,
    and of the limit the endpoint states, never below the chunk's largest request), after a pause that doubles
    with each refusal. False: one request, with nothing else of ours enqueued, is refused on its own: it fails
    saying why (waiting would never end)."""
    others = enqueued_tokens(chunk)
    if chunk.n_items <= 1 and others == 0:
        return False
    model = chunk.model
    refused_at = others + chunk.est_tokens
    ceiling = min(n for n in (refused_at, endpoint.token_limit(model), stated_limit(errors)) if n)
    limit = max(int(ceiling * 0.9), largest_request(chunk), 1)
    with transaction.atomic():
        learned = Endpoint.objects.select_for_update().values_list("learned_token_limits", flat=True)
        limits = dict(learned.get(pk=endpoint.pk) or {})
        limits[model] = min(limit, limits.get(model) or limit)
        Endpoint.objects.filter(pk=endpoint.pk).update(learned_token_limits=limits)
    endpoint.learned_token_limits = limits
    key = token_wait_key(endpoint.pk, model)
    refusals = (cache.get(key + ":n") or 0) + 1
    cache.set(key + ":n", refusals, timeout=3600)
    wait = min(max(settings.BATCHSITE_REMOTE_POLL_SECONDS, 1) * 2 ** (refusals - 1), BACKOFF_CAP)
    cache.set(key, True, timeout=max(1, int(wait)))
    log.info(
        "endpoint %s: enqueued-token limit for %s now taken as %s; next batch in %.0f s",
        endpoint.pk,
        model,
        limits[model],
        wait,
    )
    return True


def largest_request(chunk: RemoteBatch) -> int:
    rows = Item.objects.filter(remote_batch=chunk).values_list("body", "est_tokens").iterator(PLAN_ROWS)
    return max((remoteplan.request_tokens(json.loads(body), est) for body, est in rows), default=0)


def money_allows(rnd: Round, chunk: RemoteBatch) -> bool:
    """Whether the chunk fits under the job's cost cap and its owner's and endpoint's monthly limits, each of its
    requests at its most possible cost at the Batch API's price, on top of what is spent and in flight (as a
    live claim counts it). If not, the job pauses before sending it, saying why; if so, its items hold that
    cost as in flight until they are collected. A chunk not yet uploaded sends the lines that fit, as a live
    job runs up to its cap: the rest go back to pending, and the next batch made of them pauses the job."""
    with ledger.open(rnd.job.pk) as books:
        if books.status != Job.Status.RUNNING:
            return False
        job = Job.objects.only(*budgets.BUDGET_FIELDS).get(pk=rnd.job.pk)
        found = budgets.budgets(job, Q(remote_batch=chunk))
        if not found:
            return True
        rows = Item.objects.filter(remote_batch=chunk, status=Item.Status.RUNNING, lease_token__isnull=True)
        room = min(b.cap - b.committed for b in found)
        by_cost: dict[Decimal, list[int]] = defaultdict(list)  # a few distinct costs: a few updates
        lines: list[int] = []
        most, fits, over_ids = Decimal(0), Decimal(0), list[int]()
        fields = ("id", "line", "body", "est_tokens")
        for item_id, line, body, est in rows.order_by("line").values_list(*fields).iterator(PLAN_ROWS):
            request = json.loads(body)
            cost = budgets.most_cost(rnd.prices(), job.url, request, est, job.model, rnd.discount)
            if why := budgets.unpriced(rnd.prices(), str(request.get("model") or job.model), found):
                job.pause_itself(why)
                rnd.job.status = Job.Status.PAUSED
                return False
            most += cost
            lines.append(line)
            if not over_ids and fits + cost <= room:
                fits += cost
                by_cost[cost].append(item_id)
            else:
                over_ids.append(item_id)
        if over_ids and by_cost and chunk.status == RB.PLANNED:
            n = books.give_back(chunk, over_ids)
            RemoteBatch.objects.filter(pk=chunk.pk).update(n_items=F("n_items") - n)
            chunk.n_items -= n
        elif over_ids and lines:
            over = next((b for b in found if b.committed + most > b.cap), found[0])
            job.pause_itself(over.pause_reason(f"the next batch (lines {min(lines)}–{max(lines)})", most))
            rnd.job.status = Job.Status.PAUSED  # the job's other chunks wait too
            return False
        books.hold_cost(by_cost)
    return True
