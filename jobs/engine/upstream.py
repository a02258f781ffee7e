"""What an upstream answer means: pure rules, no database.

Retries, backoff and the classification of failures are ours, not the OpenAI SDK's (the client runs
with max_retries=0): its rules (give up on a Retry-After over 120 s, retry every 429 including
insufficient_quota) are wrong for a batch. Every failed attempt becomes an UpstreamError that says what
it means: try the item again, fail it for good, or stop the whole job. See the README's "Failures and
retries".
"""

from __future__ import annotations

import email.utils
import json
import math
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp
import openai

RETRY, PERMANENT, STOP = "retry", "permanent", "stop"
QUOTA_CODES = {"insufficient_quota", "credit_balance_exhausted", "billing_hard_limit_reached"}
BACKOFF_BASE = 0.25
BACKOFF_CAP = 60.0
MAX_RETRY_AFTER = 86_400.0  # a day: a longer wait is a broken header, not advice


@dataclass
class UpstreamError(Exception):
    """A failed attempt, and what it means: retry the item, fail it for good, or stop the whole job."""

    kind: str  # RETRY, PERMANENT or STOP
    message: str
    http_status: int | None = None
    body: str = ""
    code: str = ""
    retry_after: float | None = None
    request_id: str = ""

    @property
    def rate_limited(self) -> bool:
        return self.http_status == 429

    def retry_delay(self, tries: int) -> float:
        """The server's Retry-After if it gave one, else our backoff after `tries` failed tries."""
        return self.retry_after if self.retry_after is not None else backoff(tries)


def classify(status: int, text: str, headers: Mapping[str, str]) -> UpstreamError:
    code, kind, message = _error_fields(text)
    request_id = headers.get("x-request-id", "")
    common: dict[str, Any] = dict(http_status=status, body=one_line(text), request_id=request_id)
    if status == 429 and (code in QUOTA_CODES or kind in QUOTA_CODES):
        return UpstreamError(
            STOP,
            "The API account has run out of quota (insufficient_quota). Add credit or raise the usage "
            "limit, then resume the job.",
            code=code or kind,
            **common,
        )
    if status == 401:
        return UpstreamError(
            STOP,
            "The endpoint rejected the API key (401 Unauthorized). Fix the key on the Endpoints page, "
            "then resume the job.",
            code=code or "invalid_api_key",
            **common,
        )
    if status == 403:
        detail = f": {message}" if message else ""
        return UpstreamError(
            STOP,
            f"The endpoint refused access (403 Forbidden){detail}. Check the key's permissions, then resume the job.",
            code=code or "forbidden",
            **common,
        )
    if 300 <= status < 400:
        return UpstreamError(PERMANENT, redirect_refused(status, headers), code="redirect_refused", **common)
    if status in (408, 409, 429) or status >= 500:
        return UpstreamError(
            RETRY,
            message or f"HTTP {status}",
            code=code or f"http_{status}",
            retry_after=retry_after_seconds(headers),
            **common,
        )
    return UpstreamError(PERMANENT, message or f"HTTP {status}", code=code or f"http_{status}", **common)


def redirect_refused(status: int, headers: Mapping[str, str]) -> str:
    """Why a 3xx is not followed. Every client that talks to an endpoint refuses redirects: one could send the
    request, and its API key, to another server (an internal address, a cloud's metadata service), and its
    answer would be stored as the request's."""
    location = " ".join(headers.get("location", "").split())[:300] or "nowhere"  # the server's words, on one line
    return (
        f"The endpoint answered {status} and pointed to {location}: Batchsite does not follow redirects. "
        "Set the endpoint's URL to where it is served."
    )


def timeout_or_refused(error: openai.APITimeoutError) -> UpstreamError:
    """The aiohttp transport reports a refused connection as a connect timeout: say which it was."""
    cause = error.__cause__
    while cause is not None and not isinstance(cause, aiohttp.ClientConnectorError):
        cause = cause.__cause__
    if cause is not None:
        return UpstreamError(RETRY, f"Could not connect: {cause}", code="connection_error")
    return UpstreamError(RETRY, "The request timed out.", code="timeout")


def connection_lost(error: openai.APIConnectionError) -> UpstreamError:
    return UpstreamError(RETRY, f"Could not connect: {error.__cause__ or error}", code="connection_error")


def success_body(text: str) -> tuple[dict[str, Any], str]:
    """A 200 answer's body parsed, and as the text to store: on one line, since the JSONL exports splice
    stored bodies in as they are. A body that is not a JSON object is worth another try."""
    try:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("not an object")
    except ValueError:
        raise UpstreamError(
            RETRY, "The endpoint answered 200 with a body that is not JSON.", code="invalid_response"
        ) from None
    if "\n" in text or "\r" in text:
        text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return data, text


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    """retry-after-ms, then retry-after (seconds or an HTTP date), whatever their size up to a day."""
    seconds = None
    if value := headers.get("retry-after-ms"):
        seconds = _number(value, scale=1000.0)
    if seconds is None and (value := headers.get("retry-after")):
        seconds = _number(value)
        if seconds is None:
            try:
                seconds = (email.utils.parsedate_to_datetime(value) - datetime.now(UTC)).total_seconds()
            except (TypeError, ValueError):
                return None
    if seconds is None or math.isnan(seconds):
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


def _number(text: str, scale: float = 1.0) -> float | None:
    try:
        return float(text) / scale
    except ValueError:
        return None


def backoff(attempt: int) -> float:
    """Exponential with jitter: 0.25, 0.5, 1 ... 60 s, each shortened by up to half at random."""
    delay: float = min(BACKOFF_CAP, BACKOFF_BASE * 2 ** max(attempt - 1, 0))  # int ** int is Any to mypy
    return delay * random.uniform(0.5, 1.0)


def usage_of(url: str, body: dict[str, Any]) -> tuple[int, int, int]:
    """(prompt, completion, cached) tokens from a response's usage block, for every endpoint shape. The server's
    word: a count that is not a whole number from 0 to 2**31 - 1 counts as 0 (a negative one would lower
    the spending recorded, a huge one break the counters)."""
    usage = _dict(body.get("usage"))
    if url == "/v1/responses":
        details = _dict(usage.get("input_tokens_details"))
        return (
            _count(usage.get("input_tokens")),
            _count(usage.get("output_tokens")),
            _count(details.get("cached_tokens")),
        )
    details = _dict(usage.get("prompt_tokens_details"))
    return (
        _count(usage.get("prompt_tokens")),
        _count(usage.get("completion_tokens")),
        _count(details.get("cached_tokens")),
    )


def _dict(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _count(value: object) -> int:
    if isinstance(value, float) and value.is_integer():  # 12.0: some servers write counts as floats
        value = int(value)
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**31 else 0


def _error_fields(text: str) -> tuple[str, str, str]:
    """(code, type, message) of an OpenAI-shaped error body; empty strings when it is not one."""
    try:
        error = json.loads(text).get("error")
    except ValueError:
        return _cut_error_fields(text)
    except AttributeError:
        return "", "", text[:500]
    if isinstance(error, str):
        return "", "", error
    if not isinstance(error, dict):
        return "", "", text[:500]
    return str(error.get("code") or ""), str(error.get("type") or ""), str(error.get("message") or "")


_FIELD = re.compile(r'"(code|type|message)"\s*:\s*"((?:[^"\\]|\\.){0,2000})"')  # bounded: no backtracking blow-up


def _cut_error_fields(text: str) -> tuple[str, str, str]:
    """(code, type, message) of an error body that is not whole JSON: one cut at wire.ERROR_BYTES, say. Its
    fields come first in an OpenAI-shaped error, so they are read from its beginning."""
    found: dict[str, str] = {}
    for match in _FIELD.finditer(text[:8192]):
        try:
            found.setdefault(match[1], json.loads(f'"{match[2]}"'))
        except ValueError:
            continue
    if "message" not in found:
        return found.get("code", ""), found.get("type", ""), text[:500]
    return found.get("code", ""), found.get("type", ""), found["message"]


def one_line(text: str) -> str:
    """A JSON body re-encoded compactly, on one line. Servers pretty-print errors (OpenAI does), and the
    JSONL exports need one record per line. Text that is not JSON stays as it is: the export wraps it
    in an error object as a JSON string."""
    try:
        return json.dumps(json.loads(text), ensure_ascii=False, separators=(",", ":"))
    except ValueError:
        return text
