"""Pure rules for remote and hybrid jobs: how a job is cut into remote batches, and when a hybrid job must
stop waiting for the Batch API and run the rest live. No database, no network: the engine
(jobs/engine/remote.py) and the form's estimate call these with numbers.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta

# When the endpoint's latency is not known yet: seconds one live request is assumed to take (a slow
# chat answer), so a plan errs on the side of switching early.
ASSUMED_LATENCY_SECONDS = 5.0


@dataclass(frozen=True)
class Limits:
    """What one remote batch may hold (OpenAI: 50,000 requests, 200 MB, and a per-model enqueued-token budget)."""

    requests: int = 50_000
    bytes: int = 200 * 1024 * 1024
    tokens: int | None = None  # None: no budget known


@dataclass(frozen=True, slots=True)  # a job may have a million: slots keep each small
class Request:
    """One item as the splitter sees it: its model, its line's size in the input file, and its tokens
    (estimated input plus the most it may generate: what OpenAI counts against the enqueued budget)."""

    id: int
    model: str
    bytes: int
    tokens: int


def split(requests: Iterable[Request], limits: Limits) -> Iterator[list[Request]]:
    """Chunks of requests in input order, one model per chunk, each within `limits`.

    A request that alone passes a limit gets a chunk of its own: the endpoint's validation says what is
    wrong with it, rather than the job being stuck."""
    open_chunks: dict[str, tuple[list[Request], int, int]] = {}  # model -> (requests, bytes, tokens)
    for request in requests:
        chunk, size, tokens = open_chunks.get(request.model, ([], 0, 0))
        full = chunk and (
            len(chunk) >= limits.requests
            or size + request.bytes > limits.bytes
            or (limits.tokens is not None and tokens + request.tokens > limits.tokens)
        )
        if full:
            yield chunk
            chunk, size, tokens = [], 0, 0
        chunk.append(request)
        open_chunks[request.model] = (chunk, size + request.bytes, tokens + request.tokens)
    for chunk, _, _ in open_chunks.values():
        if chunk:
            yield chunk


def request_tokens(body: dict, est_input_tokens: int) -> int:
    """Input tokens plus the most the request may generate, as the Batch API counts a request against the
    enqueued-token budget. A request that sets no maximum counts its input only."""
    most = 0
    for key in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            most = value
            break
    n = body.get("n")
    choices = n if isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= 128 else 1
    return est_input_tokens + most * choices


def live_rate(
    concurrency: int,
    rpm: int | None = None,
    tpm: int | None = None,
    tokens_per_request: float = 0.0,
    latency_seconds: float | None = None,
) -> tuple[float, str]:
    """Requests per second a live run can keep up, and what bounds it: the tightest of the endpoint's
    requests per minute, tokens per minute, and concurrency over latency."""
    latency = latency_seconds if latency_seconds and latency_seconds > 0 else ASSUMED_LATENCY_SECONDS
    bounds = [(max(concurrency, 1) / latency, f"{concurrency} in flight at {latency:g} s each")]
    if rpm:
        bounds.append((rpm / 60.0, f"{rpm:,} requests/min"))
    if tpm and tokens_per_request > 0:
        bounds.append((tpm / 60.0 / tokens_per_request, f"{tpm:,} tokens/min"))
    return min(bounds, key=lambda b: b[0])


@dataclass(frozen=True)
class SwitchPlan:
    at: datetime  # the last safe moment to cancel the remote part and run the rest live
    live_seconds: float  # how long the rest takes live
    reason: str  # plain words for the job page


def switch_time(
    deadline: datetime,
    remaining: int,
    rate: float,
    cancel_seconds: float,
    margin_seconds: float,
    basis: str = "",
) -> SwitchPlan:
    """The last moment at which cancelling the remote batches and running `remaining` requests live at
    `rate` per second still ends by `deadline`: the deadline, less the time a remote cancel takes to settle,
    less the live run, less a margin."""
    live = remaining / rate if rate > 0 else float("inf")
    if live == float("inf"):
        return SwitchPlan(deadline, live, "The live rate is not known: the job keeps waiting for the Batch API.")
    at = deadline - timedelta(seconds=cancel_seconds + live + margin_seconds)
    why = (
        f"{remaining:,} requests left take {_duration(live)} live"
        + (f" ({basis})" if basis else "")
        + f", a remote cancel takes up to {_duration(cancel_seconds)} to settle, plus a {_duration(margin_seconds)} margin."
    )
    return SwitchPlan(at, live, why)


def margin_for(live_seconds: float, minimum: float) -> float:
    """The safety margin: a fifth of the live run (rates wobble), at least `minimum` seconds."""
    return max(minimum, 0.2 * live_seconds)


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 120:
        return f"{seconds} s"
    minutes = round(seconds / 60)
    if minutes < 120:
        return f"{minutes} min"
    return f"{minutes / 60:.1f} h"
