"""Request and token budgets per endpoint, shared by every process that sends to it.

The schedule is GCRA (a leaky bucket kept as one timestamp per budget): each send reserves
its slot by pushing a "theoretical arrival time" forward by 60/RPM seconds (and 60/TPM per
token), and sleeps until its slot comes. A reservation is one small atomic step in a shared
store, so N processes together keep to the limit without talking to each other:

- FileStore: a 24-byte file per endpoint under the data dir, guarded by flock (processes on
  one machine; the default);
- RedisStore: the same arithmetic in a Lua script (many machines; when REDIS_URL is set).

A 429 that shows the budget is spent sets a cool-down in the same store, so it pauses every sender.
A one-off 429 (budget left) costs only its own request's wait; when they come thick and fast, the
send rate is cut in half (multiplicative decrease, at most once a second) and climbs back by a
twentieth of the full rate a second (additive increase): AIMD, kept in the same store so every
process sends at the same reduced rate.
"""

from __future__ import annotations

import fcntl
import math
import os
import re
import struct
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, TypeVar, overload

# How far ahead of the steady pace a sender may run: enough to absorb scheduling jitter, small because
# a server whose budget was just spent (by another client, or by us before an idle spell it did not
# see) answers every request of a burst above its refill rate with a 429.
BURST_SECONDS = 0.2
# AIMD of the send rate after one-off 429s: a cut halves it (not more often than once a second), and it
# climbs back by this share of the full rate per second; never below a twentieth of it.
DECREASE_FACTOR, DECREASE_INTERVAL, INCREASE_PER_SECOND, MIN_FACTOR = 0.5, 1.0, 0.05, 0.05
# request TAT, token TAT, cool-down until, rate cut, when it was cut (unix seconds), tokens booked ever (as charged)
_STATE = struct.Struct("dddddd")

T = TypeVar("T")


def _factor(state: Sequence[float], now: float) -> float:
    """The share of the full send rate allowed now: 1 minus the last cut, less what it has climbed back since."""
    return 1.0 - max(0.0, state[3] - INCREASE_PER_SECOND * (now - state[4]))


def _slow_down(state: list[float], now: float) -> None:
    if now - state[4] >= DECREASE_INTERVAL:
        state[3] = 1.0 - max(MIN_FACTOR, _factor(state, now) * DECREASE_FACTOR)
        state[4] = now


class Store(Protocol):
    """What a Limiter keeps its budgets in: FileStore or RedisStore (or a test's own)."""

    def reserve(
        self, key: str, request_interval: float, token_interval: float, tokens: int, latest: float
    ) -> float: ...
    def cool_down(self, key: str, until: float) -> None: ...
    def cooldown_until(self, key: str) -> float: ...
    def peek(self, key: str) -> tuple[float, float, float, float]: ...
    def slow_down(self, key: str) -> None: ...
    def booked(self, key: str) -> tuple[float, float, float]: ...
    def unbook(self, key: str, tokens: int) -> None: ...


class FileStore:
    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._fds: dict[str, int] = {}

    def _fd(self, key: str) -> int:
        if key not in self._fds:
            self._fds[key] = os.open(self.folder / f"{key}.bin", os.O_RDWR | os.O_CREAT, 0o600)
        return self._fds[key]

    def _update(self, key: str, change: Callable[[list[float], float], T]) -> T:
        fd = self._fd(key)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            raw = os.pread(fd, _STATE.size, 0)  # a shorter file (an older layout) reads as zeros after its end
            state = list(_STATE.unpack(raw.ljust(_STATE.size, b"\0")))
            result = change(state, time.time())
            os.pwrite(fd, _STATE.pack(*state), 0)
            return result
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    def reserve(self, key: str, request_interval: float, token_interval: float, tokens: int, latest: float) -> float:
        return self._update(key, lambda s, now: _reserve(s, now, request_interval, token_interval, tokens, latest))

    def cool_down(self, key: str, until: float) -> None:
        def change(state: list[float], now: float) -> None:
            state[2] = max(state[2], until)

        self._update(key, change)

    def cooldown_until(self, key: str) -> float:
        return self._update(key, lambda s, now: s[2])

    def peek(self, key: str) -> tuple[float, float, float, float]:
        """(latest reserved slot of requests or tokens, cool-down until, rate factor, now)."""
        return self._update(key, lambda s, now: (max(s[0], s[1]), s[2], _factor(s, now), now))

    def slow_down(self, key: str) -> None:
        self._update(key, _slow_down)

    def booked(self, key: str) -> tuple[float, float, float]:
        """(tokens booked by every sender ever, as charged; the token schedule's latest slot; now)."""
        return self._update(key, lambda s, now: (s[5], s[1], now))

    def unbook(self, key: str, tokens: int) -> None:
        """Tokens booked for a request the endpoint refused (429): it charged nothing for it."""

        def change(state: list[float], now: float) -> None:
            state[5] -= tokens

        self._update(key, change)


def _reserve(
    state: list[float], now: float, request_interval: float, token_interval: float, tokens: int, latest: float
) -> float:
    """Take the next free slot; return how long to wait for it (inf, taking nothing, if it comes after `latest`).
    The intervals stretch by the AIMD factor: a cut rate spaces the slots out.

    A request goes once the budget holds all of its tokens, as a server's bucket admits it: its slot ends where
    its tokens have come in (less the burst allowance), not where the requests before it ended. For small
    requests the two are the same; a request of a few seconds' tokens sent at the earlier moment meets an empty
    bucket."""
    request_tat, token_tat, cooldown = state[:3]
    factor = _factor(state, now)
    request_interval, token_interval = request_interval / factor, token_interval / factor
    send_at = max(now, cooldown, request_tat - BURST_SECONDS)
    token_end = max(token_tat, send_at) + token_interval * tokens
    if token_interval:
        send_at = max(send_at, token_end - BURST_SECONDS)
    if send_at > latest:
        return math.inf
    if request_interval:
        state[0] = max(request_tat, send_at) + request_interval
    if token_interval:
        state[1] = token_end
        state[5] += tokens
    return send_at - now


class RedisStore:
    _SCRIPT = """
    local t = redis.call('TIME')
    local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
    local s = redis.call('HMGET', KEYS[1], 'r', 't', 'c', 'x', 'y', 'z')
    local r, k, c = tonumber(s[1]) or 0, tonumber(s[2]) or 0, tonumber(s[3]) or 0
    local x, y, z = tonumber(s[4]) or 0, tonumber(s[5]) or 0, tonumber(s[6]) or 0
    local op, a, b, n, burst, latest = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]),
                                       tonumber(ARGV[5]), tonumber(ARGV[6])
    local md, interval, ai, floor = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10])
    local f = 1 - math.max(0, x - ai * (now - y))
    local out = 0
    if op == 'reserve' then
      a, b = a / f, b / f
      local send_at = math.max(now, c, r - burst)
      local token_end = math.max(k, send_at) + b * n
      if b > 0 then send_at = math.max(send_at, token_end - burst) end
      if send_at > latest then return 'inf' end
      if a > 0 then r = math.max(r, send_at) + a end
      if b > 0 then k, z = token_end, z + n end
      out = send_at - now
    elseif op == 'unbook' then
      z = z - n
    elseif op == 'cool_down' then
      c = math.max(c, a)
    elseif op == 'slow_down' then
      if now - y >= interval then
        x, y = 1 - math.max(floor, f * md), now
      end
    end
    redis.call('HSET', KEYS[1], 'r', r, 't', k, 'c', c, 'x', x, 'y', y, 'z', z)
    redis.call('EXPIRE', KEYS[1], 86400)
    if op == 'cooldown_until' then return tostring(c) end
    if op == 'peek' then return tostring(math.max(r, k)) .. ' ' .. tostring(c) .. ' ' .. tostring(f) .. ' ' .. tostring(now) end
    if op == 'booked' then return tostring(z) .. ' ' .. tostring(k) .. ' ' .. tostring(now) end
    return tostring(out)
    """

    def __init__(self, url: str) -> None:
        import redis

        self.redis = redis.Redis.from_url(url)
        self.script = self.redis.register_script(self._SCRIPT)

    @overload
    def _call(self, key: str, op: Literal["peek"]) -> tuple[float, float, float, float]: ...
    @overload
    def _call(self, key: str, op: Literal["booked"]) -> tuple[float, float, float]: ...
    @overload
    def _call(
        self,
        key: str,
        op: Literal["reserve", "cool_down", "cooldown_until", "slow_down", "unbook"],
        a: float = ...,
        b: float = ...,
        n: int = ...,
        latest: float = ...,
    ) -> float: ...
    def _call(
        self, key: str, op: str, a: float = 0.0, b: float = 0.0, n: int = 0, latest: float = math.inf
    ) -> float | tuple[float, ...]:
        args: list[str | float] = [
            op,
            a,
            b,
            n,
            BURST_SECONDS,
            min(latest, 1e18),  # Lua's tonumber() may not read "inf"
            DECREASE_FACTOR,
            DECREASE_INTERVAL,
            INCREASE_PER_SECOND,
            MIN_FACTOR,
        ]
        out = self.script(keys=[f"batchsite:ratelimit:{key}"], args=args)
        return tuple(float(v) for v in out.split()) if op in ("peek", "booked") else float(out)

    def reserve(self, key: str, request_interval: float, token_interval: float, tokens: int, latest: float) -> float:
        return self._call(key, "reserve", request_interval, token_interval, tokens, latest)

    def cool_down(self, key: str, until: float) -> None:
        self._call(key, "cool_down", until)

    def cooldown_until(self, key: str) -> float:
        return self._call(key, "cooldown_until")

    def peek(self, key: str) -> tuple[float, float, float, float]:
        return self._call(key, "peek")

    def slow_down(self, key: str) -> None:
        self._call(key, "slow_down")

    def booked(self, key: str) -> tuple[float, float, float]:
        return self._call(key, "booked")

    def unbook(self, key: str, tokens: int) -> None:
        self._call(key, "unbook", n=tokens)


def default_store() -> Store:
    from django.conf import settings

    if settings.REDIS_URL:
        return RedisStore(settings.REDIS_URL)
    return FileStore(settings.DATA_DIR / "ratelimit")


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|us|µs|ns|h|m|s)")
_UNITS = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


def parse_duration(text: str | None) -> float | None:
    """Go durations as OpenAI sends them in x-ratelimit-reset-*: '12ms', '1s', '6m0s', '1h2m3.5s'."""
    if not text:
        return None
    text = text.strip()
    try:
        return float(text)  # some servers send plain seconds
    except ValueError:
        pass
    if len(text) > 64:  # no real duration is this long, and findall is quadratic on a run of digits
        return None
    parts = _DURATION.findall(text)
    if not parts:
        return None
    return sum(float(n) * _UNITS[unit] for n, unit in parts)


def _bounded(ratio: float) -> float:
    return min(max(ratio, RATIO_BOUNDS[0]), RATIO_BOUNDS[1])


def _int_header(headers: Mapping[str, str], name: str) -> int | None:
    try:
        value = int(float(headers.get(name, "")))
    except (TypeError, ValueError):
        return None
    return value if value > 0 else None  # "-1" and "0" limits mean "not limited" on some servers


@dataclass
class Learned:
    rpm: int | None = None
    tpm: int | None = None
    token_ratio: float | None = None


# How what an endpoint charges a request against its token budget is learned, as the ratio of its charge to our
# estimate (tokens.rate_charge). Each CALIBRATE_SECONDS at least, the drop in x-ratelimit-remaining-tokens (plus
# what the budget refilled meanwhile) is what the endpoint charged every sender; the store's count of tokens booked
# is what we charged; the ratio moves toward theirs / ours, a step at most RATIO_STEP, within RATIO_BOUNDS. A
# 429 that states what the request needed ("Requested 1234") teaches the ratio at once.
CALIBRATE_SECONDS = 4.0
RATIO_BOUNDS = (0.25, 4.0)
RATIO_STEP = 1.5
FULL = 0.9  # a budget this full may have stopped refilling: its drop says nothing
# Charges are kept this much above what the endpoint is measured to charge: at the limit, its bucket is all but
# empty, and a pace even slightly too fast is answered with 429s.
MARGIN = 1.0
REQUESTED = re.compile(r"on tokens per min.{0,200}?Requested:? ?([0-9,]{1,12})", re.IGNORECASE | re.DOTALL)


class Limiter:
    """One process's handle on an endpoint's budgets."""

    def __init__(
        self,
        key: str,
        rpm: int | None,
        tpm: int | None,
        learned_rpm: int | None = None,
        learned_tpm: int | None = None,
        store: Store | None = None,
        token_ratio: float | None = None,
    ) -> None:
        self.key = key
        self.store = store or default_store()
        self.configured_rpm, self.configured_tpm = rpm, tpm
        self.rpm, self.tpm = rpm or learned_rpm, tpm or learned_tpm
        self.learned = Learned()
        self.ratio = _bounded(token_ratio or 1.0)  # what the endpoint charges for a token of our estimate
        self._mark: tuple[float, float, float] | None = None  # (when, remaining tokens, tokens booked) at the last look
        self._charged = self._output = 0  # since the last look, this process's charges, and their output part
        self._settled_at = 0.0  # a new ratio shows in the sends from then on (the senders booked that far ahead)
        self._factor, self._factor_read = 1.0, -math.inf

    @property
    def request_interval(self) -> float:
        return 60.0 / self.rpm if self.rpm else 0.0

    @property
    def token_interval(self) -> float:
        return 60.0 / self.tpm if self.tpm else 0.0

    @property
    def paced(self) -> bool:
        return bool(self.request_interval or self.token_interval)

    def reserve(self, tokens: int, latest: float = math.inf) -> float:
        """Take the next slot for a request of `tokens` tokens; return the seconds to wait for it.

        `tokens` is what the server charges when the request arrives: the prompt and the whole
        max_tokens budget. Nothing is given back when the answer is shorter, because the server
        does not give it back either.

        A slot after `latest` (unix time) is not taken: the wait is inf and nothing is reserved, so
        a sender that is about to stop never holds budget it cannot use.

        Unpaced (no limit known yet), nothing is reserved and the wait is any cool-down left,
        so the caller should ask again after waiting: a cool-down may have been extended.
        """
        if self.paced:
            return self.store.reserve(self.key, self.request_interval, self.token_interval, tokens, latest)
        _, cooldown, self._factor, now = self.store.peek(self.key)
        self._factor_read = time.monotonic()
        wait = max(0.0, cooldown - now)
        return math.inf if now + wait > latest else wait

    def cool_down(self, seconds: float) -> None:
        self.store.cool_down(self.key, time.time() + seconds)

    def charge(self, estimate: int, output: int = 0) -> int:
        """What the endpoint will charge against its token budget for a request we estimate at `estimate`, of which
        `output` is its output budget: servers differ in how they count a prompt, not in that."""
        charged = max(1, math.ceil((estimate - output) * self.ratio) + output)
        self._charged += charged
        self._output += output
        return charged

    def _learn_ratio(self, ratio: float, ahead: float = 0.0) -> None:
        """A new ratio. `ahead`: how far ahead the senders' slots are booked, at the old ratio; the next look
        waits for them, or it would see the old ratio's sends and correct it again (and the ratio would swing)."""
        low, high = self.ratio / RATIO_STEP, self.ratio * RATIO_STEP
        self.ratio = self.learned.token_ratio = _bounded(min(max(ratio, low), high))
        self._settled_at = time.time() + ahead

    def refused(self, text: str, estimate: int, cost: int, output: int = 0) -> None:
        """A 429: the tokens booked for it were not charged (the calibration must not count them), and one for
        tokens that states what the request needed teaches the ratio at once."""
        if self.token_interval:
            self.store.unbook(self.key, cost)
        match = REQUESTED.search(text[:4000])
        if match and estimate > 0:
            requested = int(match.group(1).replace(",", "") or 0)
            # Only ever up: a request charged below the ratio was refused for its timing, not its size.
            prompt, asked = estimate - output, requested - output
            if prompt > 0 and asked > prompt * self.ratio:
                self._learn_ratio(asked / prompt)

    def _calibrate(self, limit: int, remaining: int) -> None:
        """The ratio, from the drop in the endpoint's remaining tokens against the tokens every sender booked."""
        booked, tat, now = self.store.booked(self.key)
        # Booked, less what is booked for later: senders waiting for their slots hold seconds of budget ahead.
        ahead = max(0.0, tat - now)
        due = booked - ahead * limit / 60.0
        if now < self._settled_at:
            self._mark = None  # the sends still go at the old ratio: look once they go at the new one
            return
        if self._mark is None:
            self._mark = (now, remaining, due)
            return
        then, before, due_before = self._mark
        if now - then < CALIBRATE_SECONDS:
            return
        self._mark = (now, remaining, due)
        ours = due - due_before
        # The output budgets in what was booked (as this process's share of them), charged alike by any server:
        # the ratio is learned on the prompts alone.
        share = self._output / self._charged if self._charged else 0.0
        self._charged = self._output = 0
        if ours < limit * 0.01:
            return  # too little sent to tell
        if before >= FULL * limit and remaining >= FULL * limit:
            # The budget stayed full while we booked: it charges less than we do. When our own schedule is what
            # holds the senders back (booked ahead of now), charge less, so they go faster.
            if tat > now:
                self._learn_ratio(self.ratio / 1.1, ahead)
            return
        if before >= FULL * limit or remaining >= FULL * limit:
            return
        theirs = before - remaining + limit / 60.0 * (now - then) - share * ours
        ours -= share * ours
        if theirs > 0 and ours > limit * 0.005:
            # All the way the first time, three quarters after: the drop and the bookings are read moments apart,
            # and a few requests sent in between land on one side only.
            power = 1.0 if self.learned.token_ratio is None else 0.75
            self._learn_ratio(self.ratio * (MARGIN * theirs / ours) ** power, ahead)

    def factor(self) -> float:
        """The share of the full send rate that AIMD allows now (read from the store at most every 0.25 s:
        senders ask on every free slot). Paced senders get it applied to their slots; unpaced ones apply
        it to their concurrency."""
        if time.monotonic() - self._factor_read > 0.25:
            self._factor = self.store.peek(self.key)[2]
            self._factor_read = time.monotonic()
        return self._factor

    def slow_down(self) -> None:
        """Multiplicative decrease after one-off 429s came thick and fast (once a second at most, for every sender)."""
        self.store.slow_down(self.key)
        self._factor_read = -math.inf

    def spent(self, headers: Mapping[str, str], cost: int) -> bool:
        """Whether a 429 means the endpoint's budget is spent (every sender must wait), not a one-off.

        Spent: the rate headers say no request (or not this request's tokens) is left; or, with no
        such headers, our own sending is at the limit we know (the schedule is booked up to now).
        A one-off: budget left, or no headers while we send below the known limit (or know none)."""
        told = False
        for kind, need in (("requests", 1), ("tokens", cost)):
            try:
                remaining = float(headers.get(f"x-ratelimit-remaining-{kind}", ""))
            except ValueError:
                continue
            if remaining < 0:  # "-1": not limited, on some servers
                continue
            told = True
            if remaining < need:
                return True
        if told or not self.paced:
            return False
        booked_until, _, _, now = self.store.peek(self.key)
        return booked_until >= now

    def observe(self, headers: Mapping[str, str]) -> None:
        """Learn limits from x-ratelimit-* headers, and stop early when the server says we are at zero."""
        limit_requests = _int_header(headers, "x-ratelimit-limit-requests")
        limit_tokens = _int_header(headers, "x-ratelimit-limit-tokens")
        if limit_requests and not self.configured_rpm:
            self.rpm = self.learned.rpm = limit_requests
        if limit_tokens and not self.configured_tpm:
            self.tpm = self.learned.tpm = limit_tokens
        remaining_tokens = headers.get("x-ratelimit-remaining-tokens")
        if limit_tokens and self.tpm and remaining_tokens is not None:
            try:
                self._calibrate(limit_tokens, int(float(remaining_tokens)))
            except ValueError:
                pass
        for kind, limit in (("requests", limit_requests), ("tokens", limit_tokens)):
            remaining = headers.get(f"x-ratelimit-remaining-{kind}")
            if remaining is not None and remaining.strip() == "0":
                reset = parse_duration(headers.get(f"x-ratelimit-reset-{kind}"))
                if reset:
                    # The reset is when the whole budget is back; room for one more request (or token) comes
                    # after a 1/limit share of it, and the pacing spaces the rest. Waiting for all of it
                    # would stall every sender for up to a minute whenever the budget runs dry.
                    self.cool_down(min(reset / limit if limit else reset, 60.0))
