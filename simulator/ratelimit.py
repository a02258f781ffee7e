"""Rate limits as OpenAI enforces and reports them: per-minute token buckets for requests (RPM) and
tokens (TPM), 429s with Retry-After, the x-ratelimit-* headers on every answer, and an audit of
whether clients wait as long as a 429 told them to."""

from __future__ import annotations

import hashlib
import math
import time

from simulator.errors import ApiError


def go_duration(seconds: float) -> str:
    """Format like Go's time.Duration, as OpenAI's x-ratelimit-reset-* headers do: 12ms, 1.5s, 6m0s."""
    ms = math.ceil(seconds * 1000)
    if ms <= 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs = f"{rest / 1000:.3f}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{hours}h{minutes}m{secs}"
    return f"{minutes}m{secs}" if minutes else secs


class _Bucket:
    """A token bucket refilled continuously: capacity = the per-minute limit, limit/60 per second."""

    __slots__ = ("limit", "rate", "level", "stamp")

    def __init__(self, limit: int, empty: bool = False):
        self.limit, self.rate, self.level = limit, limit / 60.0, float(limit)
        self.stamp = None if empty else time.monotonic()  # empty: the refill starts with the first request

    def refill(self, now: float) -> None:
        if self.stamp is None:
            self.level = 0.0
        else:
            self.level = min(self.limit, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def wait_for(self, cost: float) -> float:
        """Seconds until `cost` fits (inf if it never can)."""
        if cost > self.limit:
            return math.inf
        return max(0.0, (cost - self.level) / self.rate)

    def headers(self, headers: dict, suffix: str) -> None:
        headers["x-ratelimit-limit-" + suffix] = str(self.limit)
        headers["x-ratelimit-remaining-" + suffix] = str(max(0, int(self.level)))
        headers["x-ratelimit-reset-" + suffix] = go_duration((self.limit - self.level) / self.rate)


class RateLimited(ApiError):
    """A 429 for a request the buckets cannot admit yet (wait: seconds until they can, inf if never)."""

    def __init__(self, message, type, wait: float, headers: dict):
        super().__init__(429, message, type, "rate_limit_exceeded")
        self.wait, self.headers = wait, headers


class Limiter:
    """The RPM and TPM buckets (either may be off) that every inference request must pass."""

    def __init__(self, rpm: int | None, tpm: int | None, empty: bool = False):
        self.requests = _Bucket(rpm, empty) if rpm else None
        self.tokens = _Bucket(tpm, empty) if tpm else None

    def take(self, tokens: int, model: str) -> dict:
        """Admit one request costing `tokens`, or raise RateLimited without consuming anything.

        Returns the x-ratelimit-* headers for the answer."""
        now = time.monotonic()
        checks = [
            (b, cost, unit)
            for b, cost, unit in ((self.requests, 1, "requests"), (self.tokens, tokens, "tokens"))
            if b is not None
        ]
        if not checks:  # no limits set
            return {}
        for bucket, _, _ in checks:
            bucket.refill(now)
        wait, bucket, cost, unit = max(((b.wait_for(c), b, c, u) for b, c, u in checks), key=lambda w: w[0])
        if wait == 0:
            for b, c, _ in checks:
                b.level -= c
        headers: dict = {}
        for b, _, u in checks:
            b.headers(headers, u)
        if wait == 0:
            return headers
        where = f"{model} in organization org-simulator on {unit} per min ({'RPM' if unit == 'requests' else 'TPM'})"
        if math.isinf(wait):
            message = (
                f"Request too large for {where}: Limit {bucket.limit}, Requested {cost}. "
                "The input or output tokens must be reduced in order to run successfully."
            )
        else:
            message = (
                f"Rate limit reached for {where}: Limit {bucket.limit}, Used {bucket.limit - int(bucket.level)}, "
                f"Requested {cost}. Please try again in {go_duration(wait)}."
            )
            headers["retry-after"] = str(max(1, math.ceil(wait)))
            headers["retry-after-ms"] = str(math.ceil(wait * 1000))
        raise RateLimited(message, unit, wait, headers)


class RetryAudit:
    """Checks that a request answered 429 came back no sooner than its Retry-After, measured from when
    the 429 was answered to when the retry arrived (counted and listed in /_sim/stats).

    Requests are told apart by a hash of their body (a retry sends the same bytes), so identical bodies
    count as one request."""

    def __init__(self):
        # fingerprint -> when its last 429 was answered and the wait that 429 asked for
        self._asked_to_wait: dict[str, tuple[float, float]] = {}
        self.checked = 0
        self.violations: list[dict] = []

    def record(self, body: bytes, arrived: float, status: int, marker: str | None, retry_after_ms: int | None) -> None:
        """One inference request answered `status` (retry_after_ms: the wait a 429 asked for, if any)."""
        fingerprint = hashlib.sha1(body).hexdigest()
        asked = self._asked_to_wait.pop(fingerprint, None)
        if asked is not None:
            answered_at, wait = asked
            self.checked += 1
            if arrived - answered_at < wait and len(self.violations) < 1000:
                self.violations.append(
                    {
                        "fingerprint": fingerprint,
                        "marker": marker,
                        "gap_ms": round((arrived - answered_at) * 1000, 1),
                        "retry_after_ms": round(wait * 1000),
                        "at": time.time(),
                    }
                )
        if status == 429 and retry_after_ms is not None:
            self._asked_to_wait[fingerprint] = (time.monotonic(), retry_after_ms / 1000)
