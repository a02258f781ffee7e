"""An OpenAI-compatible server for demos, tests and benchmarks.

Answers are deterministic echoes of the request ("Echo: " + last user message), so a test can
check that each answer reached the item that asked for it. Rate limits, injected errors, quota
exhaustion, latency and the Files/Batches API behave like OpenAI's, closely enough for the
`openai` SDK to parse every object and for Batchsite's backoff to be tested against real headers.

For tests:
- a model named "bad-model" gets 404 model_not_found; a prompt containing SIMULATE_400 or
  SIMULATE_500 gets that status (live and in batches), so single items can fail on purpose;
- GET /_sim/stats, GET /_sim/log (?limit=N), GET|POST /_sim/config, POST /_sim/reset;
- every retry of a request answered 429 is audited: /_sim/stats counts `retries_checked` and lists
  `retry_after_violations` (a retry that arrived before the Retry-After it was given had passed,
  measured from the 429's answer to the retry's arrival; requests are told apart by a hash of
  their body, so identical bodies count as one request).

No Django here: the module runs standalone, in a thread for tests (`serve_in_thread`) or from the
`simulate_openai` management command.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import random
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from aiohttp import web

INFERENCE_ROUTES = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completions",
    "/v1/embeddings": "embeddings",
    "/v1/responses": "responses",
}
MODELS = ("gpt-4o-mini", "gpt-4o", "gpt-4.1-mini", "text-embedding-3-small", "text-embedding-3-large")
BAD_MODEL = "bad-model"
EMBEDDING_DIMENSIONS = 8
MAX_FILE_BYTES = 200 * 1024 * 1024
MAX_BATCH_LINES = 50_000
LOG_ENTRIES = 200_000
_JSON = "application/json"
_EXPIRED_ERROR = {
    "code": "batch_expired",
    "message": "This request could not be executed before the completion window expired.",
}


@dataclass
class SimConfig:
    latency_ms: float = 0
    jitter_ms: float = 0
    rpm: int | None = None
    tpm: int | None = None
    # Rate-limit buckets are empty when the first request arrives, instead of full (as if another client
    # had just spent the budget): a client faster than its limit gets 429s from the first second, not
    # only once it has used up a whole minute's budget.
    start_empty: bool = False
    # status -> fraction of inference requests answered with that status instead
    error_rates: dict[int, float] = field(default_factory=dict)
    retry_after_ms: int = 1000  # advertised by injected 429s
    insufficient_quota: bool = False
    api_key: str | None = None
    batch_seconds: float = 2.0
    batch_fail_rate: float = 0.0
    batch_expire: bool = False
    seed: int = 0  # injected errors, jitter and batch failures repeat exactly for a given seed
    log_path: str | None = None


# Keys POST /_sim/config may change, with the type each value is coerced to.
_RUNTIME_KEYS = {
    "latency_ms": float,
    "jitter_ms": float,
    "rpm": int,
    "tpm": int,
    "start_empty": bool,
    "retry_after_ms": int,
    "insufficient_quota": bool,
    "api_key": str,
    "batch_seconds": float,
    "batch_fail_rate": float,
    "batch_expire": bool,
}


class ApiError(Exception):
    """An error answered with OpenAI's error body."""

    def __init__(self, status, message, type="invalid_request_error", code=None, param=None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _injected_error(status: int) -> ApiError:
    if status == 429:
        return ApiError(
            429, "Rate limit reached (simulated). Please try again later.", "requests", "rate_limit_exceeded"
        )
    if status == 503:
        return ApiError(503, "The engine is currently overloaded, please try again later.", "server_error")
    if status >= 500:
        return ApiError(
            status, "The server had an error while processing your request. Sorry about that!", "server_error"
        )
    return ApiError(status, f"Simulated error {status}.")


def _json_response(status: int, payload, headers: dict | None = None) -> web.Response:
    return web.Response(status=status, body=json.dumps(payload).encode(), content_type=_JSON, headers=headers)


def _new_id(prefix: str) -> str:
    return prefix + os.urandom(12).hex()


def _tokens(text: str) -> int:
    """Deterministic stand-in for a tokenizer (about four characters per token)."""
    return len(text) // 4 + 1


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


# --- Answers: shared by the live routes and batch processing ---------------------------------


@dataclass(slots=True)
class Prepared:
    """What a validated request asks for, known before it is answered."""

    echo: str  # the text the answer echoes
    inputs: list[str]  # every prompt of a completions request, every input of an embeddings one
    prompt_tokens: int
    max_tokens: int  # requested output budget; counts against the TPM limit
    marker: str  # shown in the request log


def _content_text(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def _messages_text(messages, param: str) -> tuple[str, str]:
    """(last user text, all texts joined) of a chat/responses message list."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, f"Missing required parameter: '{param}'.", code="missing_required_parameter", param=param)
    texts, last_user = [], None
    for message in messages:
        if not isinstance(message, dict):
            raise ApiError(
                400, f"Invalid type for '{param}': expected a list of objects.", code="invalid_type", param=param
            )
        text = _content_text(message.get("content"))
        texts.append(text)
        if message.get("role") == "user":
            last_user = text
    return (texts[-1] if last_user is None else last_user), "\n".join(texts)


def _inputs(raw, param: str) -> list[str]:
    """The prompts or inputs of a completions/embeddings request: text, or token arrays as JSON."""
    if isinstance(raw, str):
        return [raw]
    if not isinstance(raw, list) or not raw:
        raise ApiError(400, f"Missing required parameter: '{param}'.", code="missing_required_parameter", param=param)
    if isinstance(raw[0], int):  # one token array
        return [json.dumps(raw)]
    return [s if isinstance(s, str) else json.dumps(s) for s in raw]


def prepare(kind: str, body: dict) -> Prepared:
    """Validate a request body like OpenAI does; raise ApiError for a bad one."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "you must provide a model parameter")
    if model == BAD_MODEL:
        raise ApiError(
            404, f"The model `{model}` does not exist or you do not have access to it.", code="model_not_found"
        )
    if body.get("stream"):
        raise ApiError(400, "The simulator does not support streaming.", code="unsupported_value", param="stream")
    inputs: list[str] = []
    if kind == "chat":
        echo, prompt = _messages_text(body.get("messages"), "messages")
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
    elif kind == "responses":
        raw = body.get("input")
        echo, prompt = (raw, raw) if isinstance(raw, str) else _messages_text(raw, "input")
        if isinstance(body.get("instructions"), str):
            prompt = body["instructions"] + "\n" + prompt
        max_tokens = body.get("max_output_tokens")
    else:
        param = "prompt" if kind == "completions" else "input"
        inputs = _inputs(body.get(param), param)
        echo, prompt = inputs[0], "\n".join(inputs)
        max_tokens = body.get("max_tokens") if kind == "completions" else 0
        dimensions = body.get("dimensions", EMBEDDING_DIMENSIONS)
        if kind == "embeddings" and not (isinstance(dimensions, int) and 0 < dimensions <= 4096):
            raise ApiError(
                400,
                "Invalid value for 'dimensions': expected an integer from 1 to 4096.",
                code="invalid_value",
                param="dimensions",
            )
    return Prepared(echo, inputs, _tokens(prompt), max_tokens if isinstance(max_tokens, int) else 0, echo[:100])


def _magic_error(echo: str) -> ApiError | None:
    """Per-item failures a test can ask for by putting SIMULATE_400 / SIMULATE_500 in its prompt."""
    if "SIMULATE_400" in echo:
        return ApiError(400, "Simulated invalid request (SIMULATE_400 in prompt).")
    if "SIMULATE_500" in echo:
        return ApiError(500, "Simulated server error (SIMULATE_500 in prompt).", "server_error")
    return None


_STRING_FORMATS = {
    "date-time": "2024-01-01T00:00:00Z",
    "date": "2024-01-01",
    "time": "00:00:00",
    "email": "echo@example.com",
    "uri": "https://example.com/echo",
    "uuid": "00000000-0000-4000-8000-000000000000",
}


def schema_example(schema: dict, text: str, root: dict | None = None, depth: int = 0):
    """A value valid for a JSON schema (the subset structured outputs use), strings set to `text`."""
    root = schema if root is None else root
    if depth > 32:  # a recursive schema: stop at a null leaf
        return None
    if "$ref" in schema:
        target = root
        for part in schema["$ref"].lstrip("#/").split("/"):
            if part:
                target = target[part]
        return schema_example(target, text, root, depth + 1)
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    for key in ("anyOf", "oneOf", "allOf"):
        if schema.get(key):
            options = [o for o in schema[key] if o.get("type") != "null"] or schema[key]
            return schema_example(options[0], text, root, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind is None:
        kind = "object" if "properties" in schema else "array" if "items" in schema else "string"
    if kind == "object":
        props = schema.get("properties", {})
        return {name: schema_example(sub, text, root, depth + 1) for name, sub in props.items()}
    if kind == "array":
        item = schema_example(schema.get("items", {}), text, root, depth + 1)
        return [item] * max(1, schema.get("minItems", 1))
    if kind in ("integer", "number"):
        value = max(schema.get("minimum", 1), min(schema.get("maximum", 1), 1))
        return int(value) if kind == "integer" else float(value)
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    return _STRING_FORMATS.get(schema.get("format"), text)


def _structured_text(fmt, echo: str) -> str:
    """The answer text for a chat response_format / responses text.format."""
    if not isinstance(fmt, dict):
        return echo
    if fmt.get("type") == "json_schema":
        # chat nests the schema under "json_schema"; the Responses API puts it on the format itself
        schema = (fmt.get("json_schema") or fmt).get("schema") or {}
        return json.dumps(schema_example(schema, echo))
    if fmt.get("type") == "json_object":
        return json.dumps({"echo": echo})
    return echo


def _embedding(text: str, dims: int, as_base64: bool):
    raw = struct.unpack(f"<{dims}h", hashlib.shake_256(text.encode()).digest(2 * dims))
    norm = math.sqrt(sum(v * v for v in raw)) or 1.0
    vector = [v / norm for v in raw]
    if as_base64:
        return base64.b64encode(struct.pack(f"<{dims}f", *vector)).decode()
    return vector


def respond(kind: str, body: dict, prep: Prepared) -> tuple[int, dict]:
    """The answer to a validated request: (status, JSON body)."""
    error = _magic_error(prep.echo)
    if error:
        return error.status, error.body()
    now, model, echo = int(time.time()), body["model"], "Echo: " + prep.echo
    if kind == "embeddings":
        dims = body.get("dimensions", EMBEDDING_DIMENSIONS)
        as_base64 = body.get("encoding_format") == "base64"
        data = [
            {"object": "embedding", "index": i, "embedding": _embedding(text, dims, as_base64)}
            for i, text in enumerate(prep.inputs)
        ]
        usage = {"prompt_tokens": prep.prompt_tokens, "total_tokens": prep.prompt_tokens}
        return 200, {"object": "list", "data": data, "model": model, "usage": usage}
    if kind == "completions":
        choices = [
            {"text": "Echo: " + prompt, "index": i, "logprobs": None, "finish_reason": "stop"}
            for i, prompt in enumerate(prep.inputs)
        ]
        out = sum(_tokens(c["text"]) for c in choices)
        usage = {
            "prompt_tokens": prep.prompt_tokens,
            "completion_tokens": out,
            "total_tokens": prep.prompt_tokens + out,
        }
        return 200, {
            "id": _new_id("cmpl-"),
            "object": "text_completion",
            "created": now,
            "model": model,
            "choices": choices,
            "usage": usage,
            "system_fingerprint": "fp_simulator",
        }
    if kind == "chat":
        content = _structured_text(body.get("response_format"), echo)
        out = _tokens(content)
        usage = {
            "prompt_tokens": prep.prompt_tokens,
            "completion_tokens": out,
            "total_tokens": prep.prompt_tokens + out,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 0,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        }
        message = {"role": "assistant", "content": content, "refusal": None, "annotations": []}
        return 200, {
            "id": _new_id("chatcmpl-"),
            "object": "chat.completion",
            "created": now,
            "model": model,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}],
            "usage": usage,
            "service_tier": "default",
            "system_fingerprint": "fp_simulator",
        }
    text_config = body.get("text") if isinstance(body.get("text"), dict) else {}
    content = _structured_text(text_config.get("format"), echo)
    out = _tokens(content)
    output = [
        {
            "id": _new_id("msg_"),
            "type": "message",
            "status": "completed",
            "role": "assistant",
            "content": [{"type": "output_text", "text": content, "annotations": [], "logprobs": []}],
        }
    ]
    usage = {
        "input_tokens": prep.prompt_tokens,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": out,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prep.prompt_tokens + out,
    }
    return 200, {
        "id": _new_id("resp_"),
        "object": "response",
        "created_at": now,
        "completed_at": now,
        "status": "completed",
        "error": None,
        "incomplete_details": None,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "model": model,
        "output": output,
        "parallel_tool_calls": True,
        "previous_response_id": None,
        "temperature": 1.0,
        "tool_choice": "auto",
        "tools": [],
        "top_p": 1.0,
        "text": {"format": text_config.get("format") or {"type": "text"}},
        "truncation": "disabled",
        "usage": usage,
        "metadata": body.get("metadata") or {},
    }


def answer(kind: str, body) -> tuple[int, dict]:
    """Validate and answer one request, without rate limits or injected errors (batch lines)."""
    try:
        if not isinstance(body, dict):
            raise ApiError(400, "The request body must be a JSON object.")
        prep = prepare(kind, body)
    except ApiError as e:
        return e.status, e.body()
    return respond(kind, body, prep)


# --- Rate limits ------------------------------------------------------------------------------


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
    def __init__(self, message, type, wait: float, headers: dict):
        super().__init__(429, message, type, "rate_limit_exceeded")
        self.wait, self.headers = wait, headers


class _Limiter:
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
        for bucket, _, _ in checks:
            bucket.refill(now)
        wait, bucket, cost, unit = max(
            ((b.wait_for(c), b, c, u) for b, c, u in checks), key=lambda w: w[0], default=(0.0, None, 0, "")
        )
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


# --- The server -------------------------------------------------------------------------------

# What an inference handler tells the middleware to put in the request log.
MARKER = web.RequestKey("marker", str)
RETRY_AFTER_MS = web.RequestKey("retry_after_ms", int)


class Simulator:
    """All of the server's state; its methods are the aiohttp handlers."""

    def __init__(self, config: SimConfig):
        self.config = config
        self.files: dict[str, dict] = {}  # id -> {"meta": file object, "data": bytes}
        self.batches: dict[str, dict] = {}  # id -> batch object, in creation order
        self._tasks: set[asyncio.Task] = set()
        self._log_file = open(config.log_path, "a", buffering=1) if config.log_path else None
        self.in_flight = 0
        self.reset()

    def reset(self) -> None:
        cfg = self.config
        self.reset_limits()
        self._jitter_rng = random.Random(f"{cfg.seed}:jitter")
        self._batch_rng = random.Random(f"{cfg.seed}:batch")
        self.total = self.rate_limited = 0
        self.first_arrival: float | None = None  # unix time the first inference request arrived (start-up benches)
        self.max_in_flight = self.in_flight
        self.by_path: collections.Counter = collections.Counter()
        self.by_status: collections.Counter = collections.Counter()
        self.log: collections.deque = collections.deque(maxlen=LOG_ENTRIES)
        # Retry-After audit, per request fingerprint (a hash of the body: a retry sends the same bytes):
        # when its last 429 was answered and the wait that 429 asked for.
        self._asked_to_wait: dict[str, tuple[float, float]] = {}
        self.retries_checked = 0
        self.retry_after_violations: list[dict] = []

    async def close(self) -> None:
        """Stop batches still running and close the log file."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._log_file:
            self._log_file.close()

    @web.middleware
    async def middleware(self, request: web.Request, handler) -> web.StreamResponse:
        """Auth, stats, the request log and x-request-id for every /v1 route."""
        if request.path.startswith("/_sim/"):
            return await handler(request)
        arrived = time.monotonic()
        if self.first_arrival is None and request.path in INFERENCE_ROUTES:
            self.first_arrival = time.time()
        self.in_flight += 1
        if self.in_flight > self.max_in_flight:
            self.max_in_flight = self.in_flight
        try:
            key = self.config.api_key
            if key and request.headers.get("Authorization") != "Bearer " + key:
                response = _json_response(
                    401, ApiError(401, "Incorrect API key provided.", code="invalid_api_key").body()
                )
            else:
                response = await handler(request)
        except web.HTTPException as e:  # the router's 404/405
            response = _json_response(
                e.status, ApiError(e.status, f"{e.reason}: {request.method} {request.path}").body()
            )
        finally:
            self.in_flight -= 1
        resource = request.match_info.route.resource
        path = resource.canonical if resource is not None else "(unmatched)"
        status = response.status
        self.total += 1
        self.by_path[path] += 1
        self.by_status[status] += 1
        if status == 429:
            self.rate_limited += 1
        if request.path in INFERENCE_ROUTES:
            self._audit_retry(hashlib.sha1(await request.read()).hexdigest(), arrived, request, status)
        entry = {
            "t": time.time(),
            "path": path,
            "status": status,
            "marker": request.get(MARKER),
            "retry_after_ms": request.get(RETRY_AFTER_MS),
        }
        self.log.append(entry)
        if self._log_file:
            self._log_file.write(json.dumps(entry) + "\n")
        response.headers["x-request-id"] = _new_id("req_")
        return response

    def _audit_retry(self, fingerprint: str, arrived: float, request: web.Request, status: int) -> None:
        """Check that a request answered 429 came back no sooner than its Retry-After, measured from
        when the 429 was answered to when the retry arrived (violations in /_sim/stats)."""
        asked = self._asked_to_wait.pop(fingerprint, None)
        if asked is not None:
            answered_at, wait = asked
            self.retries_checked += 1
            if arrived - answered_at < wait and len(self.retry_after_violations) < 1000:
                self.retry_after_violations.append(
                    {
                        "fingerprint": fingerprint,
                        "marker": request.get(MARKER),
                        "gap_ms": round((arrived - answered_at) * 1000, 1),
                        "retry_after_ms": round(wait * 1000),
                        "at": time.time(),
                    }
                )
        if status == 429 and request.get(RETRY_AFTER_MS) is not None:
            self._asked_to_wait[fingerprint] = (time.monotonic(), request[RETRY_AFTER_MS] / 1000)

    def _draw_error(self) -> int | None:
        hit = None
        for status, rate, rng in self._error_rngs:
            if rng.random() < rate and hit is None:
                hit = status
        return hit

    async def inference(self, kind: str, request: web.Request) -> web.Response:
        cfg = self.config
        try:
            try:
                body = json.loads(await request.read())
            except ValueError:
                raise ApiError(
                    400, "We could not parse the JSON body of your request. The OpenAI API expects a JSON payload."
                ) from None
            if not isinstance(body, dict):
                raise ApiError(400, "The request body must be a JSON object.")
            prep = prepare(kind, body)
            request[MARKER] = prep.marker
            if cfg.insufficient_quota:
                raise ApiError(
                    429,
                    "You exceeded your current quota, please check your plan and billing details.",
                    "insufficient_quota",
                    "insufficient_quota",
                )
            injected = self._draw_error()
            if injected == 429:
                request[RETRY_AFTER_MS] = cfg.retry_after_ms
                seconds = str(max(1, math.ceil(cfg.retry_after_ms / 1000)))
                return _json_response(
                    429,
                    _injected_error(429).body(),
                    {"retry-after": seconds, "retry-after-ms": str(cfg.retry_after_ms)},
                )
            headers = self.limiter.take(prep.prompt_tokens + prep.max_tokens, body["model"])
        except RateLimited as e:
            if not math.isinf(e.wait):
                request[RETRY_AFTER_MS] = math.ceil(e.wait * 1000)
            return _json_response(429, e.body(), e.headers)
        except ApiError as e:
            return _json_response(e.status, e.body())
        delay = cfg.latency_ms + (self._jitter_rng.uniform(0, cfg.jitter_ms) if cfg.jitter_ms else 0)
        if delay > 0:
            await asyncio.sleep(delay / 1000)
        if injected is not None:
            return _json_response(injected, _injected_error(injected).body(), headers)
        status, payload = respond(kind, body, prep)
        return _json_response(status, payload, headers)

    async def models(self, request: web.Request) -> web.Response:
        data = [{"id": m, "object": "model", "created": 1700000000, "owned_by": "batchsite-simulator"} for m in MODELS]
        return _json_response(200, {"object": "list", "data": data})

    # Files

    def _store_file(self, filename: str, purpose: str, data: bytes) -> dict:
        meta = {
            "id": _new_id("file-"),
            "object": "file",
            "bytes": len(data),
            "created_at": int(time.time()),
            "filename": filename,
            "purpose": purpose,
            "status": "processed",
            "expires_at": None,
            "status_details": None,
        }
        self.files[meta["id"]] = {"meta": meta, "data": data}
        return meta

    def _file(self, request: web.Request) -> dict:
        file_id = request.match_info["file_id"]
        if file_id not in self.files:
            raise ApiError(404, f"No such File object: {file_id}", param="id")
        return self.files[file_id]

    async def create_file(self, request: web.Request) -> web.Response:
        form = await request.post()
        upload, purpose = form.get("file"), form.get("purpose")
        if not isinstance(purpose, str) or not purpose:
            raise ApiError(
                400, "Missing required parameter: 'purpose'.", code="missing_required_parameter", param="purpose"
            )
        if not isinstance(upload, web.FileField):
            raise ApiError(400, "Missing required parameter: 'file'.", code="missing_required_parameter", param="file")
        return _json_response(200, self._store_file(upload.filename or "upload", purpose, upload.file.read()))

    async def list_files(self, request: web.Request) -> web.Response:
        files = [f["meta"] for f in reversed(self.files.values())]
        if request.query.get("order") == "asc":
            files.reverse()
        if request.query.get("purpose"):
            files = [f for f in files if f["purpose"] == request.query["purpose"]]
        return _json_response(200, _page(files, request.query, default_limit=10000))

    async def get_file(self, request: web.Request) -> web.Response:
        return _json_response(200, self._file(request)["meta"])

    async def file_content(self, request: web.Request) -> web.Response:
        return web.Response(body=self._file(request)["data"], content_type="application/octet-stream")

    async def delete_file(self, request: web.Request) -> web.Response:
        file_id = self._file(request)["meta"]["id"]
        del self.files[file_id]
        return _json_response(200, {"id": file_id, "object": "file", "deleted": True})

    # Batches

    def _batch(self, request: web.Request) -> dict:
        batch_id = request.match_info["batch_id"]
        if batch_id not in self.batches:
            raise ApiError(404, f"No batch found with id '{batch_id}'.")
        return self.batches[batch_id]

    async def create_batch(self, request: web.Request) -> web.Response:
        try:
            body = json.loads(await request.read())
        except ValueError:
            raise ApiError(400, "We could not parse the JSON body of your request.") from None
        input_file_id, endpoint = body.get("input_file_id"), body.get("endpoint")
        if not input_file_id:
            raise ApiError(
                400,
                "Missing required parameter: 'input_file_id'.",
                code="missing_required_parameter",
                param="input_file_id",
            )
        if input_file_id not in self.files:
            raise ApiError(404, f"No such File object: {input_file_id}", param="input_file_id")
        if endpoint not in INFERENCE_ROUTES:
            raise ApiError(
                400,
                f"Invalid value for 'endpoint': {endpoint!r}. Supported values are: "
                + ", ".join(INFERENCE_ROUTES)
                + ".",
                code="invalid_value",
                param="endpoint",
            )
        if body.get("completion_window") != "24h":
            raise ApiError(
                400,
                "Invalid value for 'completion_window': only '24h' is supported.",
                code="invalid_value",
                param="completion_window",
            )
        now = int(time.time())
        batch = {
            "id": _new_id("batch_"),
            "object": "batch",
            "endpoint": endpoint,
            "model": None,
            "errors": None,
            "input_file_id": input_file_id,
            "completion_window": "24h",
            "status": "validating",
            "output_file_id": None,
            "error_file_id": None,
            "created_at": now,
            "in_progress_at": None,
            "expires_at": now + 86400,
            "finalizing_at": None,
            "completed_at": None,
            "failed_at": None,
            "expired_at": None,
            "cancelling_at": None,
            "cancelled_at": None,
            "request_counts": {"total": 0, "completed": 0, "failed": 0},
            "usage": None,
            "metadata": body.get("metadata"),
        }
        self.batches[batch["id"]] = batch
        data = self.files[input_file_id]["data"]
        task = asyncio.get_running_loop().create_task(self._run_batch(batch, data))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return _json_response(200, batch)

    async def get_batch(self, request: web.Request) -> web.Response:
        return _json_response(200, self._batch(request))

    async def list_batches(self, request: web.Request) -> web.Response:
        return _json_response(200, _page(list(reversed(self.batches.values())), request.query, default_limit=20))

    async def cancel_batch(self, request: web.Request) -> web.Response:
        batch = self._batch(request)
        if batch["status"] in ("validating", "in_progress", "finalizing"):
            batch["status"], batch["cancelling_at"] = "cancelling", int(time.time())
        elif batch["status"] not in ("cancelling", "cancelled"):
            raise ApiError(409, f"Cannot cancel a batch with status '{batch['status']}'.")
        return _json_response(200, batch)

    async def _run_batch(self, batch: dict, data: bytes) -> None:
        """validating -> in_progress -> finalizing -> completed (or failed/expired/cancelled) over batch_seconds."""
        cfg = self.config
        step = cfg.batch_seconds / 10  # one step validating, eight processing, one finalizing
        await asyncio.sleep(step)
        if batch["status"] == "cancelling":
            batch["status"], batch["cancelled_at"] = "cancelled", int(time.time())
            return
        lines, errors = validate_batch_file(data, batch["endpoint"])
        if errors:
            batch.update(status="failed", failed_at=int(time.time()), errors={"object": "list", "data": errors})
            return
        counts = batch["request_counts"]
        counts["total"] = len(lines)
        batch.update(status="in_progress", in_progress_at=int(time.time()), model=lines[0]["body"]["model"])
        kind = INFERENCE_ROUTES[batch["endpoint"]]
        todo = len(lines) // 2 if cfg.batch_expire else len(lines)
        # Small chunks keep the event loop (and live traffic) responsive; the pauses between them
        # add up to eight steps.
        chunk = min(500, max(1, math.ceil(todo / 8)))
        pause = 8 * step / max(1, math.ceil(todo / chunk))
        outputs, failures, usage = [], [], collections.Counter()
        done = 0
        while done < todo and batch["status"] != "cancelling":
            for line in lines[done : min(todo, done + chunk)]:
                if self._batch_rng.random() < cfg.batch_fail_rate:
                    status, payload = 500, _injected_error(500).body()
                else:
                    status, payload = answer(kind, line["body"])
                result = {
                    "id": _new_id("batch_req_"),
                    "custom_id": line["custom_id"],
                    "response": {"status_code": status, "request_id": _new_id("req_"), "body": payload},
                    "error": None,
                }
                if status == 200:
                    outputs.append(result)
                    counts["completed"] += 1
                    for key in _USAGE_KEYS:
                        usage[key] += payload["usage"].get(key, 0)
                else:
                    failures.append(result)
                    counts["failed"] += 1
            done = min(todo, done + chunk)
            await asyncio.sleep(pause)
        if batch["status"] != "cancelling" and not cfg.batch_expire:
            batch.update(status="finalizing", finalizing_at=int(time.time()))
            await asyncio.sleep(step)
        if batch["status"] == "cancelling":
            final = "cancelled"
        elif cfg.batch_expire:
            final = "expired"
            for line in lines[todo:]:
                failures.append(
                    {
                        "id": _new_id("batch_req_"),
                        "custom_id": line["custom_id"],
                        "response": None,
                        "error": _EXPIRED_ERROR,
                    }
                )
            counts["failed"] += len(lines) - todo
        else:
            final = "completed"
        # OpenAI does not keep input order in its output files: shuffle so clients join on custom_id.
        self._batch_rng.shuffle(outputs)
        self._batch_rng.shuffle(failures)
        for key, results, suffix in (("output_file_id", outputs, "output"), ("error_file_id", failures, "error")):
            if results:
                content = "".join(json.dumps(r) + "\n" for r in results).encode()
                batch[key] = self._store_file(f"batch_{batch['id']}_{suffix}.jsonl", "batch_output", content)["id"]
        batch["usage"] = _batch_usage(usage)
        batch["status"] = final
        batch[{"cancelled": "cancelled_at", "expired": "expired_at", "completed": "completed_at"}[final]] = int(
            time.time()
        )

    async def get_config(self, request: web.Request) -> web.Response:
        return _json_response(200, dataclasses.asdict(self.config))

    async def set_config(self, request: web.Request) -> web.Response:
        """Change settings at runtime; rate-limit windows and error generators restart."""
        try:
            changes = json.loads(await request.read())
        except ValueError:
            raise ApiError(400, "The body must be a JSON object.") from None
        for key, value in changes.items():
            if key == "error_rates":
                self.config.error_rates = {int(k): float(v) for k, v in value.items()}
            elif key in _RUNTIME_KEYS:
                setattr(self.config, key, None if value is None else _RUNTIME_KEYS[key](value))
            else:
                raise ApiError(400, f"Unknown setting {key!r}.", param=key)
        self.reset_limits()
        return _json_response(200, dataclasses.asdict(self.config))

    def reset_limits(self) -> None:
        """Rate-limit buckets full again (empty with start_empty); error generators back at the start of
        their seeded sequence."""
        cfg = self.config
        self.limiter = _Limiter(cfg.rpm, cfg.tpm, cfg.start_empty)
        # One generator per status, seeded from (seed, status), drawn once per request each: the
        # number of injected errors per status is then fixed by the seed and the request count,
        # whatever order concurrent requests arrive in.
        self._error_rngs = sorted(
            (status, rate, random.Random(f"{cfg.seed}:{status}")) for status, rate in cfg.error_rates.items()
        )

    async def reset_route(self, request: web.Request) -> web.Response:
        self.reset()
        return _json_response(200, {"reset": True})

    async def stats(self, request: web.Request) -> web.Response:
        return _json_response(
            200,
            {
                "total": self.total,
                "by_path": dict(self.by_path),
                "by_status": {str(k): v for k, v in self.by_status.items()},
                "rate_limited": self.rate_limited,
                "in_flight": self.in_flight,
                "max_in_flight": self.max_in_flight,
                "first_arrival": self.first_arrival,
                "retries_checked": self.retries_checked,
                "retry_after_violations": len(self.retry_after_violations),
                "retry_after_violation_details": self.retry_after_violations[:20],
            },
        )

    async def log_route(self, request: web.Request) -> web.Response:
        entries = list(self.log)
        if "limit" in request.query:
            entries = entries[-int(request.query["limit"]) :]
        return _json_response(200, entries)


def _page(items: list[dict], query, default_limit: int) -> dict:
    """OpenAI's cursor page: `after` is the id of the last item of the previous page."""
    if query.get("after"):
        ids = [item["id"] for item in items]
        items = items[ids.index(query["after"]) + 1 :] if query["after"] in ids else []
    limit = int(query.get("limit", default_limit))
    page = items[:limit]
    return {
        "object": "list",
        "data": page,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
        "has_more": len(items) > limit,
    }


_USAGE_KEYS = ("prompt_tokens", "completion_tokens", "input_tokens", "output_tokens")


def _batch_usage(usage: collections.Counter) -> dict:
    input_tokens = usage["prompt_tokens"] + usage["input_tokens"]
    output_tokens = usage["completion_tokens"] + usage["output_tokens"]
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": input_tokens + output_tokens,
    }


def validate_batch_file(data: bytes, endpoint: str) -> tuple[list[dict], list[dict]]:
    """Parse a batch input file as OpenAI validates it: (requests, errors with 1-based line numbers)."""
    lines, errors, seen, model = [], [], set(), None

    def error(code, message, line, param=None):
        errors.append({"code": code, "line": line, "message": message, "param": param})

    for number, raw in enumerate(data.decode("utf-8", "replace").splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            request = json.loads(raw)
        except ValueError:
            request = None
        if not isinstance(request, dict):
            error("invalid_json_line", "This line is not parseable as valid JSON.", number)
            continue
        body = request.get("body")
        for param in ("custom_id", "method", "url", "body"):
            if param not in request:
                error("missing_required_parameter", f"Missing required parameter: '{param}'.", number, param)
        if request.get("method", "POST") != "POST":
            error("invalid_method", "The method for this request must be POST.", number, "method")
        if "url" in request and request["url"] != endpoint:
            error("invalid_url", "The URL provided for this request does not match the batch endpoint.", number, "url")
        custom_id = request.get("custom_id")
        if "custom_id" in request and not isinstance(custom_id, str):
            error("invalid_type", "The custom_id for this request must be a string.", number, "custom_id")
        elif custom_id is not None:
            if custom_id in seen:
                error(
                    "duplicate_custom_id",
                    "The custom_id for this request is a duplicate of another request. "
                    "The custom_id parameter must be unique for each request in a batch.",
                    number,
                    "custom_id",
                )
            seen.add(custom_id)
        if isinstance(body, dict):
            if not body.get("model"):
                error("missing_required_parameter", "Missing required parameter: 'body.model'.", number, "body.model")
            elif model is None:
                model = body["model"]
            elif body["model"] != model:
                error(
                    "mismatched_model",
                    "The provided model does not match the model in other requests in the "
                    "batch. Each batch file must contain requests for one model only.",
                    number,
                    "body.model",
                )
        elif "body" in request:
            error("invalid_body", "The body of this request must be a JSON object.", number, "body")
        lines.append(request)
    if not lines and not errors:
        error("empty_file", "The batch input file is empty.", None)
    elif len(lines) > MAX_BATCH_LINES:
        error("too_many_tasks", f"The batch input file has more than {MAX_BATCH_LINES} requests.", None)
    return lines, errors


@web.middleware
async def _api_errors(request: web.Request, handler) -> web.StreamResponse:
    """Let handlers raise ApiError instead of building error responses."""
    try:
        return await handler(request)
    except ApiError as e:
        return _json_response(e.status, e.body())


SIMULATOR = web.AppKey("simulator", Simulator)


def make_app(config: SimConfig | None = None) -> web.Application:
    sim = Simulator(config or SimConfig())
    app = web.Application(middlewares=[sim.middleware, _api_errors], client_max_size=MAX_FILE_BYTES + 1024 * 1024)
    app[SIMULATOR] = sim
    add = app.router.add_route
    for path, kind in INFERENCE_ROUTES.items():
        add("POST", path, functools.partial(sim.inference, kind))
    add("GET", "/v1/models", sim.models)
    add("POST", "/v1/files", sim.create_file)
    add("GET", "/v1/files", sim.list_files)
    add("GET", "/v1/files/{file_id}", sim.get_file)
    add("GET", "/v1/files/{file_id}/content", sim.file_content)
    add("DELETE", "/v1/files/{file_id}", sim.delete_file)
    add("POST", "/v1/batches", sim.create_batch)
    add("GET", "/v1/batches", sim.list_batches)
    add("GET", "/v1/batches/{batch_id}", sim.get_batch)
    add("POST", "/v1/batches/{batch_id}/cancel", sim.cancel_batch)
    add("GET", "/_sim/stats", sim.stats)
    add("GET", "/_sim/log", sim.log_route)
    add("GET", "/_sim/config", sim.get_config)
    add("POST", "/_sim/config", sim.set_config)
    add("POST", "/_sim/reset", sim.reset_route)

    app.on_cleanup.append(lambda app: sim.close())
    return app


def run(config: SimConfig, host: str = "127.0.0.1", port: int = 8100) -> None:
    """Serve in the foreground until interrupted."""
    web.run_app(make_app(config), host=host, port=port, access_log=None, print=None)


@contextlib.contextmanager
def serve_in_thread(config: SimConfig | None = None, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Run the simulator on its own event loop in a daemon thread; yields its base URL (".../v1")."""
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(make_app(config), access_log=None)
    ready = threading.Event()
    started: dict = {}

    def main() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(runner.setup())
            loop.run_until_complete(web.TCPSite(runner, host, port).start())
            started["port"] = runner.addresses[0][1]
        except BaseException as e:  # reported to the caller's thread below
            started["error"] = e
            ready.set()
            loop.close()
            return
        ready.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())
        loop.close()

    thread = threading.Thread(target=main, name="openai-simulator", daemon=True)
    thread.start()
    ready.wait(30)
    if "port" not in started:
        raise RuntimeError("simulator did not start") from started.get("error")
    try:
        yield f"http://{host}:{started['port']}/v1"
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
