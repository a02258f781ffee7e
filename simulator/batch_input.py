"""What OpenAI accepts in a batch input file: one JSON request a line, each with a unique custom_id,
POST to the batch's endpoint, all for one model. `validate_batch_file` reports every broken line the
way a failed batch's `errors` list does; `rejection_errors` names lines of a batch rejected on purpose."""

from __future__ import annotations

import json

MAX_BATCH_LINES = 50_000


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


def rejection_errors(data: bytes) -> list[dict]:
    """Line errors for a batch rejected on purpose (SimConfig.batch_reject): its first and last requests."""
    numbers = [n for n, raw in enumerate(data.decode("utf-8", "replace").splitlines(), start=1) if raw.strip()]
    return [
        {
            "code": "invalid_request",
            "line": number,
            "message": "This line contains an invalid request (simulated rejection).",
            "param": None,
        }
        for number in sorted({numbers[0], numbers[-1]})
    ]
