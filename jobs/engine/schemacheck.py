"""Answers checked against the JSON schema their request asked for (issue 14): pure rules, no Django.

A request asks for structured output with chat's `response_format` ({"type": "json_schema", "json_schema":
{"schema": ...}}, or {"type": "json_object"}) or the Responses API's `text.format` ({"type": "json_schema",
"schema": ...}); a CSV template's schema becomes the former. Every answer of such a request (each of chat's
`n` choices, each output_text of a response) must parse as JSON and, given a schema, validate against it.
A servers' "strict" mode promises this; many OpenAI-compatible servers do not keep the promise, and a
truncated answer (finish_reason "length") breaks it anyway.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, NoReturn

import jsonschema_rs

INVALID_OUTPUT = "invalid_output"


@dataclass(frozen=True)
class Wanted:
    """What a request asked its answers to be: a JSON object (json_object), or valid under a schema."""

    schema_text: str | None  # canonical JSON of the schema, the compiled validator's key; None: json_object


def wanted(url: str, body: dict[str, Any]) -> Wanted | None:
    """The structured output a request asks for, or None when it asks for free text."""
    if url.endswith("/responses"):
        text = body.get("text")
        fmt = text.get("format") if isinstance(text, dict) else None
        schema = fmt.get("schema") if isinstance(fmt, dict) else None
    else:
        fmt = body.get("response_format")
        block = fmt.get("json_schema") if isinstance(fmt, dict) else None
        schema = block.get("schema") if isinstance(block, dict) else None
    if not isinstance(fmt, dict):
        return None
    if fmt.get("type") == "json_object":
        return Wanted(None)
    if fmt.get("type") == "json_schema" and isinstance(schema, dict):
        return Wanted(json.dumps(schema, sort_keys=True, separators=(",", ":")))
    return None


def _list(value: object) -> list[Any]:
    return value if isinstance(value, list) else []


def answers(url: str, data: object) -> list[str | None]:
    """The answer texts of a response (None for a choice without text: a refusal, a tool call, a body of
    another shape: the server's JSON is not trusted to have the documented one)."""
    if not isinstance(data, dict):
        return [None]
    if url.endswith("/responses"):
        texts: list[str | None] = []
        for item in _list(data.get("output")):
            if isinstance(item, dict) and item.get("type") == "message":
                for part in _list(item.get("content")):
                    if isinstance(part, dict) and part.get("type") == "output_text":
                        texts.append(part.get("text"))
                    elif isinstance(part, dict) and part.get("type") == "refusal":
                        texts.append(None)
        return texts or [None]
    found: list[str | None] = []
    for choice in _list(data.get("choices")):
        message = choice.get("message") if isinstance(choice, dict) else None
        found.append(message.get("content") if isinstance(message, dict) else None)
    return found or [None]


def problem(want: Wanted, url: str, data: object) -> str | None:
    """Why the response's answers are not what the request asked for, in plain words; None when they are.
    Never raises: whatever the server sent, the answer is judged."""
    try:
        return _problem(want, url, data)
    except (ValueError, TypeError, RecursionError) as e:  # the validator on a value nested past its limits
        return f"The answer could not be checked against its schema ({type(e).__name__}: {_short(str(e))})."


def _problem(want: Wanted, url: str, data: object) -> str | None:
    for n, text in enumerate(answers(url, data)):
        where = f"Answer {n + 1}" if n else "The answer"
        if not isinstance(text, str):
            return f"{where} has no text (a refusal or a tool call), not the JSON asked for."
        try:
            value = json.loads(text, parse_constant=_not_json)
        except json.JSONDecodeError as e:
            return f"{where} is not valid JSON ({e.msg} at character {e.pos})."
        except ValueError as e:  # NaN or Infinity, or an integer of more digits than Python reads
            return f"{where} is not valid JSON ({e})."
        except RecursionError:
            return f"{where} is JSON nested too deeply to check."
        if want.schema_text is None:
            if not isinstance(value, dict):
                return f"{where} is JSON but not an object."
            continue
        compiled = _validator(want.schema_text)
        if compiled is None:
            return None  # a schema we cannot compile (or too big to): the server judged it; nothing to check against
        validator, branching = compiled
        if branching > 1 and branching ** _depth(value) > MAX_PATHS:
            # Combinators (anyOf, oneOf, allOf) over a recursive schema cost branching ** depth to check: a
            # hostile schema and answer would hold the worker for hours. OpenAI nests structured output 10 deep.
            return f"{where} is nested too deeply for its schema's anyOf/oneOf/allOf to be checked in time."
        try:
            validator.validate(value)  # stops at the first error (iter_errors would find every one first)
        except jsonschema_rs.ValidationError as error:
            path = "/" + "/".join(str(p) for p in error.instance_path)
            return f"{where} breaks the schema at {path}: {_short(error.message)}"
    return None


MAX_PATHS = 200_000  # branching ** depth: about 0.1 s of checking at worst
MAX_SCHEMA_TEXT = 100_000  # characters, as a CSV template's schema may have (ingest.MAX_SCHEMA_CHARS)


def _depth(value: object, limit: int = 200) -> int:
    """How deeply `value` nests arrays and objects (iteratively: no recursion to blow)."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        children: Iterable[object]
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        depth += 1
        deepest = max(deepest, depth)
        if deepest >= limit:
            return deepest
        stack.extend((child, depth) for child in children if isinstance(child, dict | list))
    return deepest


def _branching(schema: object) -> int:
    """The most subschemas one schema object makes a value be checked against (anyOf + oneOf + allOf), at
    least 1."""
    most, stack = 1, [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            branches = sum(len(node[k]) for k in ("anyOf", "oneOf", "allOf") if isinstance(node.get(k), list))
            most = max(most, branches)
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return most


@functools.lru_cache(maxsize=256)
def _validator(schema_text: str) -> tuple[jsonschema_rs.Validator, int] | None:
    """(validator, branching) of a schema, or None. A schema comes from the user's file: none over
    MAX_SCHEMA_TEXT (256 of them are kept compiled), no fetching of remote $refs (this machine's network is
    not theirs to probe), and patterns in a linear-time regex engine (no catastrophic backtracking)."""
    if len(schema_text) > MAX_SCHEMA_TEXT:
        return None
    try:
        schema = json.loads(schema_text)
        validator = jsonschema_rs.validator_for(
            schema, retriever=_no_remote_refs, pattern_options=jsonschema_rs.RegexOptions()
        )
    except (ValueError, RecursionError, jsonschema_rs.ValidationError):
        return None
    return validator, _branching(schema)


def _no_remote_refs(uri: str) -> NoReturn:
    raise ValueError(f"remote $ref {uri} is not fetched")


def _not_json(constant: str) -> NoReturn:
    raise ValueError(f"{constant} is not a JSON value")


def _short(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
