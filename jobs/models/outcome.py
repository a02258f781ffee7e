"""What the ledger is asked to write: an Outcome of a live send, a Result line of a chunk."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, Protocol

from jobs import clock
from jobs.models.item import Item


class Failure(Protocol):
    """A failed attempt as the ledger stores it (jobs.engine.upstream.UpstreamError is one)."""

    http_status: int | None
    body: str
    request_id: str
    code: str
    message: str


@dataclass
class Outcome:
    """What became of a leased item: a final result, or back to pending for a later attempt."""

    item_id: int
    status: str  # Item.Status.SUCCEEDED, Item.Status.FAILED, or Item.Status.PENDING (retry later / released)
    attempts: int
    http_status: int | None = None
    response: str = ""
    request_id: str = ""
    error_code: str = ""
    error_message: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    cost: Decimal = Decimal(0)
    latency_ms: int | None = None
    next_attempt_at: datetime | None = None
    retries: int = 0  # failed attempts to be tried again, decided during this lease (the timeline's "retried")
    cache_key: str = ""  # the answer goes into the answer cache (answercache.sort_out)
    from_cache: bool = False  # answered from the answer cache: not sent
    saved: Decimal = Decimal(0)  # with from_cache: what the answer cost when it was sent

    @classmethod
    def succeeded(
        cls,
        item_id: int,
        attempts: int,
        retries: int,
        *,
        http_status: int,
        response: str,
        request_id: str,
        usage: tuple[int, int, int],
        cost: Decimal,
        latency_ms: int,
    ) -> Outcome:
        prompt, completion, cached = usage
        return cls(
            item_id,
            Item.Status.SUCCEEDED,
            attempts,
            http_status=http_status,
            response=response,
            request_id=request_id,
            prompt_tokens=prompt,
            completion_tokens=completion,
            cached_tokens=cached,
            cost=cost,
            latency_ms=latency_ms,
            retries=retries,
        )

    @classmethod
    def failed(
        cls, item_id: int, attempts: int, error: Failure, retries: int = 0, latency_ms: int | None = None
    ) -> Outcome:
        return cls(
            item_id,
            Item.Status.FAILED,
            attempts,
            http_status=error.http_status,
            response=error.body,
            request_id=error.request_id,
            error_code=error.code,
            error_message=error.message,
            latency_ms=latency_ms,
            retries=retries,
        )

    @classmethod
    def retry_later(cls, item_id: int, attempts: int, retries: int, error: Failure | None, wait: float) -> Outcome:
        """Back to pending, to be tried again `wait` seconds from now (at once if that is past)."""
        return cls(
            item_id,
            Item.Status.PENDING,
            attempts,
            http_status=error.http_status if error else None,
            error_code=error.code if error else "",
            error_message=error.message if error else "",
            next_attempt_at=clock.now() + timedelta(seconds=wait) if wait > 0 else None,
            retries=retries,
        )

    @classmethod
    def released(cls, item_id: int, attempts: int, retries: int = 0, error: Failure | None = None) -> Outcome:
        """Back to pending, due at once: not sent (pause, shutdown), or not the item's fault."""
        return cls.retry_later(item_id, attempts, retries, error, wait=0)


@dataclass
class Result:
    """A result line of a chunk, read (jobs/engine/remote/collect.py): the item's new fields, and whether it
    failed through no fault of its request (a 5xx or a 429: sent again while it has attempts left)."""

    custom_id: str
    fields: dict[str, Any]
    transient: bool = False
