"""Items -> downloadable files, streamed in input order.

- results JSONL: OpenAI's batch output-file format, one line per succeeded item;
- errors JSONL: OpenAI's error-file format: an HTTP error keeps its status code and body under
  `response`, a request that never got an answer (expired, cancelled, out of attempts) has
  `response: null` and an `error` object;
- CSV: the input columns (CSV jobs) or custom_id, then the output text, the fields of a structured
  output, status, error and tokens;
- a /v1 File's content: an upload's bytes, or a job's results or errors JSONL exported when downloaded.

Stored response bodies are normally compact JSON, so the results writer splices the text in rather
than parse and re-encode it: that is most of its speed. A record must still stay on one line
whatever was stored, so a body spread over several lines (pretty-printed, as OpenAI sends its
answers and errors) is re-encoded.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from collections.abc import Iterable, Iterator

from jobs import storage
from jobs.models import File, Item, Job

FLUSH_BYTES = 64 * 1024
ERROR_STATUSES = (Item.Status.FAILED, Item.Status.EXPIRED, Item.Status.CANCELLED)
# What OpenAI's error file says for a request that never ran.
NOT_RUN = {
    Item.Status.EXPIRED: ("batch_expired", "This request could not be executed before the completion window expired."),
    Item.Status.CANCELLED: ("batch_cancelled", "This request was not executed because the batch was cancelled."),
}


def request_id(job_id: int, item_id: int) -> str:
    return "batch_req_" + hashlib.md5(f"{job_id}:{item_id}".encode()).hexdigest()


def _buffered(pieces: Iterable[str]) -> Iterator[str]:
    buffer, size = [], 0
    for piece in pieces:
        buffer.append(piece)
        size += len(piece)
        if size >= FLUSH_BYTES:
            yield "".join(buffer)
            buffer, size = [], 0
    if buffer:
        yield "".join(buffer)


def _items(job: Job, statuses, fields: tuple[str, ...]):
    qs = Item.objects.filter(job=job)
    if statuses:
        qs = qs.filter(status__in=statuses)
    return qs.order_by("line").values_list(*fields).iterator(chunk_size=2000)


def _compact(text: str) -> str | None:
    """A stored JSON object re-encoded on one line; None if the text is not one."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")) if isinstance(value, dict) else None


def _result_body(text: str) -> str:
    # A line break can only be whitespace between JSON tokens (inside strings it is escaped), so a
    # body without one is already a single line and is spliced as it is: the fast, usual path.
    if text.startswith("{") and "\n" not in text and "\r" not in text:
        return text
    return _compact(text) or "{}"


def results_jsonl(job: Job) -> Iterator[str]:
    dumps = json.dumps
    fields = ("id", "custom_id", "http_status", "request_id", "response")

    def lines():
        for pk, custom_id, status, upstream_id, body in _items(job, [Item.Status.SUCCEEDED], fields):
            yield (
                f'{{"id":"{request_id(job.pk, pk)}","custom_id":{dumps(custom_id, ensure_ascii=False)},'
                f'"response":{{"status_code":{status or 200},"request_id":{dumps(upstream_id)},'
                f'"body":{_result_body(body)}}},"error":null}}\n'
            )

    return _buffered(lines())


def _error_body(text: str, status: int) -> str:
    """An HTTP error body as one line of JSON, wrapping what was not a JSON object (an HTML 502 page, say).

    Always re-encoded, never spliced: servers send errors pretty-printed over several lines, and
    error files are small.
    """
    compact = _compact(text)
    if compact is not None:
        return compact
    error = {"message": text[:2000] or f"HTTP {status}", "type": "server_error", "param": None, "code": None}
    return json.dumps({"error": error}, ensure_ascii=False, separators=(",", ":"))


def errors_jsonl(job: Job) -> Iterator[str]:
    dumps = json.dumps
    fields = ("id", "custom_id", "status", "http_status", "request_id", "response", "error_code", "error_message")

    def lines():
        for pk, custom_id, status, http_status, upstream_id, body, code, message in _items(job, ERROR_STATUSES, fields):
            head = f'{{"id":"{request_id(job.pk, pk)}","custom_id":{dumps(custom_id, ensure_ascii=False)},'
            if status == Item.Status.FAILED and code == "invalid_output":
                # The endpoint answered 200 with what its schema forbids: the answer, and why it was refused.
                error = {"code": code, "message": message}
                yield (
                    f'{head}"response":{{"status_code":{http_status or 200},"request_id":{dumps(upstream_id)},'
                    f'"body":{_error_body(body, http_status or 200)}}},"error":{dumps(error, ensure_ascii=False)}}}\n'
                )
            elif status == Item.Status.FAILED and http_status:
                yield (
                    f'{head}"response":{{"status_code":{http_status},"request_id":{dumps(upstream_id)},'
                    f'"body":{_error_body(body, http_status)}}},"error":null}}\n'
                )
            else:
                default_code, default_message = NOT_RUN.get(status, ("request_failed", "The request failed."))
                error = {"code": code or default_code, "message": message or default_message}
                yield f'{head}"response":null,"error":{dumps(error, ensure_ascii=False)}}}\n'

    return _buffered(lines())


def file_chunks(file: File) -> Iterator[str] | Iterator[bytes]:
    """A /v1 File's content: the upload's bytes from storage, or text exported from the job."""
    if file.job is not None:
        return _job_file(file.job, file.kind)
    return storage.read_chunks(file.path)


def file_size(file: File) -> int:
    """Bytes of a File's content; an output or error file is exported once to measure it, then remembered."""
    if file.bytes is None:
        assert file.job is not None  # an upload's size is known when it is stored
        file.bytes = sum(len(chunk.encode()) for chunk in _job_file(file.job, file.kind))
        File.objects.filter(pk=file.pk, bytes=None).update(bytes=file.bytes)
    return file.bytes


def _job_file(job: Job, kind: str) -> Iterator[str]:
    return results_jsonl(job) if kind == File.RESULTS else errors_jsonl(job)


def output_text(url: str, response: dict) -> str:
    """The text a person wants from a response body: the message, the completion, or the embedding."""
    try:
        if url == "/v1/chat/completions":
            message = response["choices"][0]["message"]
            if message.get("content") is not None:
                return message["content"]
            if message.get("tool_calls"):
                return json.dumps(message["tool_calls"], ensure_ascii=False)
            return message.get("refusal") or ""
        if url == "/v1/completions":
            return response["choices"][0]["text"]
        if url == "/v1/embeddings":
            return json.dumps(response["data"][0]["embedding"])
        if url == "/v1/responses":
            if isinstance(response.get("output_text"), str):
                return response["output_text"]
            return "".join(
                part.get("text", "")
                for block in response.get("output") or []
                if block.get("type") == "message"
                for part in block.get("content") or []
                if part.get("type") == "output_text"
            )
    except (KeyError, IndexError, TypeError, AttributeError):
        pass
    return ""


def schema_fields(job: Job) -> list[str]:
    """Top-level properties of the structured output the job asks for, if it asks for one."""
    schema = job.template.get("json_schema") if job.template else None
    if not schema:
        first = Item.objects.filter(job=job).order_by("line").values_list("body", flat=True).first()
        try:
            response_format = json.loads(first or "{}").get("response_format") or {}
            schema = response_format.get("json_schema") or {}
        except (ValueError, AttributeError):
            return []
    if isinstance(schema, dict) and isinstance(schema.get("schema"), dict):
        schema = schema["schema"]
    properties = schema.get("properties") if isinstance(schema, dict) else None
    return list(properties) if isinstance(properties, dict) else []


# What a spreadsheet may read as the start of a formula: the ASCII signs, their full-width and small forms
# (some spreadsheets fold them to ASCII), and tab and carriage return. Looked for after any leading spaces,
# which some spreadsheets drop on import.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "＝", "＋", "－", "＠", "﹦", "﹢", "﹣", "﹫")


_PLAIN_NUMBER = re.compile(r"-\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")


def _safe_cell(value: str) -> str:
    """Neutralise text that a spreadsheet would run as a formula, as OWASP advises: a leading quote.

    Every cell and header that holds someone else's text goes through here (input cells,
    custom_ids, column names, answers, structured fields, errors). A plain negative number ("-42",
    "-0.5e3") stays as it is: a spreadsheet reads it as a number, never as a formula, and quoting it
    would turn every negative figure in an answer into text. "-1+2" is a formula and is quoted, and so are
    " =1+2" and "＝1+2".
    """
    start = value.lstrip(" \u00a0\u3000")  # space, no-break space, ideographic space
    if start.startswith(_FORMULA_START) and not _PLAIN_NUMBER.fullmatch(start):
        return "'" + value
    return value


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, bool):
        return "true" if value else "false"
    return _safe_cell(str(value))


def results_csv(job: Job) -> Iterator[str]:
    input_columns = list(job.columns) if job.source_format == Job.Format.CSV else []
    has_id_column = bool(job.template.get("custom_id_column")) if job.template else False
    fields = schema_fields(job)
    taken = set()

    def name(wanted: str) -> str:
        wanted = _safe_cell(wanted)
        while wanted in taken:
            wanted = f"{wanted}_result"
        taken.add(wanted)
        return wanted

    header = [name(c) for c in input_columns]
    if not has_id_column:
        header.append(name("custom_id"))
    output_name = "embedding" if job.url == "/v1/embeddings" else "output"
    header.append(name(output_name))
    header += [name(f) for f in fields]
    header += [name(n) for n in ("status", "error", "prompt_tokens", "completion_tokens", "latency_ms")]

    buffer = io.StringIO()
    writer = csv.writer(buffer)

    def rows():
        writer.writerow(header)
        item_fields = (
            "custom_id",
            "input_row",
            "status",
            "response",
            "error_code",
            "error_message",
            "http_status",
            "prompt_tokens",
            "completion_tokens",
            "latency_ms",
        )
        for custom_id, input_row, status, body, code, message, http_status, p, c, latency in _items(
            job, None, item_fields
        ):
            row = []
            if input_columns:
                cells = json.loads(input_row) if input_row else []
                row += [_safe_cell(cell) for cell in cells] + [""] * (len(input_columns) - len(cells))
            if not has_id_column:
                row.append(_safe_cell(custom_id))
            text, parsed = "", {}
            if status == Item.Status.SUCCEEDED and body:
                text = output_text(job.url, json.loads(body))
                if fields:
                    try:
                        value = json.loads(text)
                        parsed = value if isinstance(value, dict) else {}
                    except ValueError:
                        parsed = {}
            row.append(_safe_cell(text))
            row += [_cell(parsed.get(f)) for f in fields]
            error = ""
            if status in ERROR_STATUSES:
                error = message or code or NOT_RUN.get(status, ("", ""))[1]
                if http_status and code != "invalid_output":  # a 200 whose answer broke its schema
                    error = f"HTTP {http_status}: {error}"
            row += [status, _safe_cell(error), p, c, "" if latency is None else latency]
            writer.writerow(row)
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()

    return _buffered(rows())
