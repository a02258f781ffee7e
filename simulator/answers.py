"""The answers: validate a chat, completions, responses or embeddings request as OpenAI does
(`prepare`) and answer it (`respond`), the same way for the live routes and for batch lines (`answer`).

Answers are deterministic echoes of the request ("Echo: " + last user message), so a test can check
that each answer reached the item that asked for it; structured outputs get a value valid for their
JSON schema (but for the fraction SimConfig.bad_output_rate, broken by `BadOutputs`), embeddings a unit
vector hashed from the input.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import random
import struct
import time
from dataclasses import dataclass
from typing import Any

from simulator.config import SimConfig
from simulator.errors import ApiError, prompt_error
from simulator.tokenizer import count_tokens

# path -> the kind of request it answers
INFERENCE_ROUTES = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completions",
    "/v1/embeddings": "embeddings",
    "/v1/responses": "responses",
}
MODELS = ("gpt-4o-mini", "gpt-4o", "gpt-4.1-mini", "text-embedding-3-small", "text-embedding-3-large")
BAD_MODEL = "bad-model"
EMBEDDING_DIMENSIONS = 8


def new_id(prefix: str) -> str:
    """An OpenAI-style object id: the prefix, then 24 random hex digits."""
    return prefix + os.urandom(12).hex()


def _tokens(text: str) -> int:
    """Deterministic stand-in for a tokenizer (about four characters per token)."""
    return len(text) // 4 + 1


@dataclass(slots=True)
class Prepared:
    """What a validated request asks for, known before it is answered."""

    echo: str  # the text the answer echoes
    inputs: list[str]  # every prompt of a completions request, every input of an embeddings one
    prompt_tokens: int
    max_tokens: int  # requested output budget, for each of the `answers` it asks for; counts against the TPM limit
    marker: str  # shown in the request log
    prompt: str = ""  # every text of the prompt, joined
    answers: int = 1  # n choices

    def rate_charge(self, token_count: str) -> int:
        """What the TPM budget is charged when the request arrives (SimConfig.token_count)."""
        prompt = count_tokens(self.prompt) if token_count == "tokenizer" else -(-len(self.prompt) // 4)
        return prompt + self.max_tokens * self.answers


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
    n = body.get("n")
    answers = n if isinstance(n, int) and not isinstance(n, bool) and 0 < n <= 128 else 1
    max_tokens = max_tokens if isinstance(max_tokens, int) else 0
    return Prepared(echo, inputs, _tokens(prompt), max_tokens, echo[:100], prompt, answers)


_STRING_FORMATS: dict[Any, str] = {
    "date-time": "2024-01-01T00:00:00Z",
    "date": "2024-01-01",
    "time": "00:00:00",
    "email": "echo@example.com",
    "uri": "https://example.com/echo",
    "uuid": "00000000-0000-4000-8000-000000000000",
}


def _ref_target(ref: str, root: dict) -> dict:
    target = root
    for part in ref.lstrip("#/").split("/"):
        if part:
            target = target[part]
    return target


def schema_example(schema: dict, text: str, root: dict | None = None, depth: int = 0):
    """A value valid for a JSON schema (the subset structured outputs use), strings set to `text`."""
    root = schema if root is None else root
    if depth > 32:  # a recursive schema: stop at a null leaf
        return None
    if "$ref" in schema:
        return schema_example(_ref_target(schema["$ref"], root), text, root, depth + 1)
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


class BadOutputs:
    """Decides which structured answers are broken (SimConfig.bad_output_rate), and counts them for /_sim/stats.

    One draw per structured answer from a generator seeded from SimConfig.seed, so a seed breaks the same
    number of answers for the same number of requests. Broken answers alternate between invalid JSON and
    valid JSON that breaks the schema, so a test sees both after two."""

    def __init__(self, config: SimConfig):
        self.config = config
        self.count = 0
        self.restart()

    def restart(self) -> None:
        """Back to the start of the seeded sequence (the count is kept)."""
        self._rng = random.Random(f"{self.config.seed}:bad_output")
        self._broken = 0

    def draw(self) -> str | None:
        """How to break the next structured answer: "truncated", "off_schema", or None to leave it valid."""
        rate = self.config.bad_output_rate
        if rate <= 0 or self._rng.random() >= rate:
            return None
        self.count += 1
        self._broken += 1
        return "truncated" if self._broken % 2 else "off_schema"


def _off_schema(schema: dict | None, value):
    """`value` changed into valid JSON its schema rejects (None: json_object, which wants any object), or
    None if no simple change does."""
    if schema is None:
        return [value]
    target, hops = schema, 0
    while isinstance(target.get("$ref"), str) and hops < 8:
        target, hops = _ref_target(target["$ref"], schema), hops + 1
    required = target.get("required")
    if isinstance(value, dict) and isinstance(required, list):
        for name in required:
            if name in value:  # the usual strict-mode miss: a required property left out
                return {k: v for k, v in value.items() if k != name}
    if target.get("type") == "object":
        return [value]
    return None


def _truncated(text: str) -> str:
    """The text cut half-way, as a max_tokens limit cuts it: never valid JSON."""
    cut = text[: len(text) // 2]
    try:
        json.loads(cut)  # a prefix of a number ("12" -> "1") can still parse
    except ValueError:
        return cut
    return ""


def _structured_text(fmt, echo: str, bad: BadOutputs | None = None) -> tuple[str, bool]:
    """The answer text for a chat response_format / responses text.format, and whether it was cut short."""
    if not isinstance(fmt, dict) or fmt.get("type") not in ("json_schema", "json_object"):
        return echo, False
    schema: dict | None = None
    if fmt["type"] == "json_schema":
        # chat nests the schema under "json_schema"; the Responses API puts it on the format itself
        schema = (fmt.get("json_schema") or fmt).get("schema") or {}
        value = schema_example(schema, echo)
    else:
        value = {"echo": echo}
    fault = bad.draw() if bad else None
    if fault == "off_schema":
        broken = _off_schema(schema, value)
        if broken is not None:
            return json.dumps(broken), False
        fault = "truncated"  # nothing simple breaks this schema: break the JSON instead
    text = json.dumps(value)
    if fault == "truncated":
        return _truncated(text), True
    return text, False


def _embedding(text: str, dims: int, as_base64: bool):
    raw = struct.unpack(f"<{dims}h", hashlib.shake_256(text.encode()).digest(2 * dims))
    norm = math.sqrt(sum(v * v for v in raw)) or 1.0
    vector = [v / norm for v in raw]
    if as_base64:
        return base64.b64encode(struct.pack(f"<{dims}f", *vector)).decode()
    return vector


def respond(kind: str, body: dict, prep: Prepared, bad: BadOutputs | None = None) -> tuple[int, dict]:
    """The answer to a validated request: (status, JSON body); `bad` breaks a fraction of structured ones."""
    error = prompt_error(prep.echo)
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
        usage: dict[str, Any] = {"prompt_tokens": prep.prompt_tokens, "total_tokens": prep.prompt_tokens}
        return 200, {"object": "list", "data": data, "model": model, "usage": usage}
    if kind == "completions":
        choices: list[dict[str, Any]] = [
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
            "id": new_id("cmpl-"),
            "object": "text_completion",
            "created": now,
            "model": model,
            "choices": choices,
            "usage": usage,
            "system_fingerprint": "fp_simulator",
        }
    if kind == "chat":
        content, cut = _structured_text(body.get("response_format"), echo, bad)
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
        message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None, "annotations": []}
        return 200, {
            "id": new_id("chatcmpl-"),
            "object": "chat.completion",
            "created": now,
            "model": model,
            "choices": [
                {"index": 0, "message": message, "logprobs": None, "finish_reason": "length" if cut else "stop"}
            ],
            "usage": usage,
            "service_tier": "default",
            "system_fingerprint": "fp_simulator",
        }
    text_config = body["text"] if isinstance(body.get("text"), dict) else {}
    # A cut answer stays "completed" here: the Responses API would say "incomplete", but the point is an
    # answer that claims success and is not valid JSON.
    content, _ = _structured_text(text_config.get("format"), echo, bad)
    out = _tokens(content)
    output = [
        {
            "id": new_id("msg_"),
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
        "id": new_id("resp_"),
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


def answer(kind: str, body, bad: BadOutputs | None = None) -> tuple[int, dict]:
    """Validate and answer one request, without rate limits or injected errors (batch lines)."""
    try:
        if not isinstance(body, dict):
            raise ApiError(400, "The request body must be a JSON object.")
        prep = prepare(kind, body)
    except ApiError as e:
        return e.status, e.body()
    return respond(kind, body, prep, bad)
