"""An OpenAI batch file (JSONL, one request a line) -> requests, or errors that name their line.

Each line is checked as OpenAI's Batch API would check it (custom_id, method, url, the body's
required fields), and for what Batchsite's storage cannot hold (deep nesting, lone surrogates, NUL).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from jobs.ingest.lines import Errors, Limits, Request, SeenIds, read_lines, short
from jobs.models import SUPPORTED_URLS

if TYPE_CHECKING:
    from jobs.ingest.plan import Plan

# Deeper JSON than this is refused: json and every recursive walk of a body (token counts, pages,
# the worker) would otherwise hit Python's recursion limit somewhere down the line. OpenAI's own
# structured outputs stop at 10 levels of schema, about 25 of JSON.
MAX_DEPTH = 100

# Fields each endpoint cannot do without, checked so that a typo fails at upload, not at line 40,000.
REQUIRED_BODY: dict[str, tuple[str, type | tuple[type, ...]]] = {
    "/v1/chat/completions": ("messages", list),
    "/v1/embeddings": ("input", (str, list)),
    "/v1/completions": ("prompt", (str, list)),
    "/v1/responses": ("input", (str, list)),
}


def jsonl_requests(
    path: Path, limits: Limits, errors: Errors, expected_url: str | None, plan: Plan | None = None
) -> Iterator[Request]:
    seen = SeenIds()
    url = expected_url
    url_line = None
    for number, text in read_lines(path, limits, errors):
        if not text.strip():
            continue  # blank lines (a trailing one above all) carry no request
        try:
            obj = json.loads(text)
            too_deep = is_too_deep(text, obj)
        except json.JSONDecodeError as e:
            errors.add(number, "invalid_json_line", f"Line {number} is not valid JSON: {e.msg} (column {e.colno}).")
            continue
        except ValueError as e:  # a number of over 4,300 digits
            errors.add(number, "invalid_json_line", f"Line {number} is not valid JSON: {e}.")
            continue
        except RecursionError:
            too_deep = True
        if too_deep:
            errors.add(number, "invalid_json_line", f"Line {number} nests JSON more than {MAX_DEPTH} levels deep.")
            continue
        if not isinstance(obj, dict):
            errors.add(number, "invalid_json_line", f"Line {number} must be a JSON object, not {_kind(obj)}.")
            continue
        if has_lone_surrogate(text, obj):
            errors.add(
                number,
                "invalid_json_line",
                f"Line {number} has a \\u escape of half a character (a lone UTF-16 surrogate), which is not text.",
            )
            continue
        ok = True
        for name, kind in (("custom_id", str), ("method", str), ("url", str), ("body", dict)):
            if name not in obj or obj[name] is None:
                errors.add(number, "missing_required_parameter", f"Line {number} has no '{name}'.", name)
                ok = False
            elif not isinstance(obj[name], kind):
                expected = "an object" if kind is dict else "a string"
                errors.add(
                    number, "invalid_type", f"Line {number}: '{name}' must be {expected}, not {_kind(obj[name])}.", name
                )
                ok = False
        if not ok:
            continue
        custom_id, line_url, body = obj["custom_id"], obj["url"], obj["body"]
        if obj["method"].upper() != "POST":
            errors.add(
                number, "invalid_method", f"Line {number}: method must be POST, not {short(obj['method'])}.", "method"
            )
            ok = False
        if not custom_id:
            errors.add(number, "invalid_custom_id", f"Line {number}: 'custom_id' is empty.", "custom_id")
            ok = False
        elif len(custom_id.encode()) > 1024:
            errors.add(
                number, "invalid_custom_id", f"Line {number}: 'custom_id' is longer than 1,024 bytes.", "custom_id"
            )
            ok = False
        elif "\x00" in custom_id:  # stored as it is, and Postgres takes no NUL in text
            errors.add(number, "invalid_custom_id", f"Line {number}: 'custom_id' holds a NUL character.", "custom_id")
            ok = False
        elif earlier := seen.first_line(custom_id, number):
            errors.add(
                number,
                "duplicate_custom_id",
                f"Line {number}: custom_id {custom_id!r} is already used on line {earlier}.",
                "custom_id",
            )
            ok = False
        if line_url not in SUPPORTED_URLS:
            errors.add(
                number,
                "invalid_url",
                f"Line {number}: url {short(line_url)} is not supported; use one of {', '.join(SUPPORTED_URLS)}.",
                "url",
            )
            continue
        if url is None:
            url, url_line = line_url, number
            if plan is not None:
                plan.url = url
        elif line_url != url:
            where = f"line {url_line}" if url_line else "the batch"
            errors.add(
                number,
                "mismatched_url",
                f"Line {number}: url {line_url} differs from {url} on {where}; one file goes to one endpoint.",
                "url",
            )
            continue
        if not _check_body(number, line_url, body, errors) or not ok:
            continue
        yield Request(number, custom_id, body)


def is_too_deep(text: str | None, value) -> bool:
    """Whether the JSON `value` (parsed from `text`) nests arrays and objects deeper than MAX_DEPTH."""
    if text is not None and text.count("[") + text.count("{") <= MAX_DEPTH:  # the cheap test: too few brackets
        return False
    stack = [(value, 1)] if isinstance(value, (dict, list)) else []
    while stack:  # a loop, not recursion: recursion is what the limit protects
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            return True
        children = value.values() if isinstance(value, dict) else value
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


def has_lone_surrogate(text: str, obj) -> bool:
    """JSON may spell half of a UTF-16 pair ("\\ud800"); no database or UTF-8 file can store it."""
    if "\\ud" not in text and "\\uD" not in text:  # the cheap test: only such an escape can make one
        return False
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


MAX_MODEL_CHARS = 200


def _check_body(number: int, url: str, body: dict, errors: Errors) -> bool:
    ok = True
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        errors.add(number, "missing_model", f"Line {number}: body has no 'model'.", "body.model")
        ok = False
    elif "\x00" in model:  # the job's model column holds it as it is
        errors.add(number, "invalid_value", f"Line {number}: body.model holds a NUL character.", "body.model")
        ok = False
    elif len(model) > MAX_MODEL_CHARS:  # the job's and its chunks' model columns hold 200
        errors.add(
            number,
            "invalid_value",
            f"Line {number}: body.model is {len(model):,} characters; a model name has at most {MAX_MODEL_CHARS}.",
            "body.model",
        )
        ok = False
    name, kind = REQUIRED_BODY[url]
    value = body.get(name)
    if value is None:
        errors.add(number, "missing_required_parameter", f"Line {number}: body has no '{name}'.", f"body.{name}")
        ok = False
    elif not isinstance(value, kind) or (isinstance(value, (list, str)) and not value):
        errors.add(
            number, "invalid_type", f"Line {number}: body.{name} must be a non-empty {_kinds(kind)}.", f"body.{name}"
        )
        ok = False
    if body.get("stream"):
        errors.add(number, "invalid_value", f"Line {number}: streaming is not supported in a batch.", "body.stream")
        ok = False
    return ok


def _kind(value) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )


def _kinds(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names: dict[type, str] = {list: "array", str: "string", dict: "object"}
    return " or ".join(names[k] for k in kinds)
