"""Uploaded file -> validated requests -> a Job with its Items.

Two passes over a file kept on disk, both streaming: `validate()` checks every line and returns
a Plan (errors with line numbers, or counts, a preview and a token estimate); `create_job()`
reads the file again and writes the Job and its Items in one transaction. Memory stays flat
whatever the file size, apart from ~30 bytes a request to find duplicate custom_ids and 4 for
its token estimate.
"""

from __future__ import annotations

import csv
import itertools
import json
import re
import shutil
import struct
import time
import uuid
from array import array
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from hashlib import blake2b
from pathlib import Path

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from jobs import tokens
from jobs.models import SUPPORTED_URLS, Item, Job

MAX_ERRORS = 100
PREVIEW_SIZE = 5
CHUNK = 5000
SKIP_CHUNK = 1024 * 1024  # the rest of an over-long line is read and dropped this much at a time
# Deeper JSON than this is refused: json and every recursive walk of a body (token counts, pages,
# the worker) would otherwise hit Python's recursion limit somewhere down the line. OpenAI's own
# structured outputs stop at 10 levels of schema, about 25 of JSON.
MAX_DEPTH = 100
MAX_COLUMNS = 16_384  # Excel's limit; a header line of commas would otherwise name millions
# A prompt template is a few pages, not a book: longer ones are refused before they are rendered
# into every row.
MAX_PROMPT_CHARS = 200_000
MAX_SCHEMA_CHARS = 100_000
TEMPLATE_TEXTS = (
    ("system_prompt", "The system prompt", MAX_PROMPT_CHARS),
    ("user_prompt", "The user prompt", MAX_PROMPT_CHARS),
    ("json_schema", "The JSON schema", MAX_SCHEMA_CHARS),
)

# Fields each endpoint cannot do without, checked so that a typo fails at upload, not at line 40,000.
REQUIRED_BODY = {
    "/v1/chat/completions": ("messages", list),
    "/v1/embeddings": ("input", (str, list)),
    "/v1/completions": ("prompt", (str, list)),
    "/v1/responses": ("input", (str, list)),
}


@dataclass
class LineError:
    line: int | None
    code: str
    message: str
    param: str | None = None

    def as_dict(self) -> dict:
        return {"code": self.code, "line": self.line, "message": self.message, "param": self.param}


@dataclass
class Limits:
    max_lines: int
    max_line_bytes: int
    max_file_bytes: int

    @classmethod
    def from_settings(cls) -> Limits:
        return cls(
            max_lines=settings.BATCHSITE_MAX_LINES,
            max_line_bytes=settings.BATCHSITE_MAX_LINE_KB * 1024,
            max_file_bytes=settings.BATCHSITE_MAX_UPLOAD_MB * 1024 * 1024,
        )


@dataclass
class Template:
    """How a CSV row becomes a request: `{{ column }}` placeholders in the prompts, and parameters."""

    model: str = ""
    user_prompt: str = ""
    system_prompt: str = ""
    url: str = "/v1/chat/completions"
    temperature: float | None = None
    max_tokens: int | None = None
    json_schema: dict | str | None = None
    custom_id_column: str = ""
    input_column: str = ""  # embeddings: the column to embed
    extra: dict = field(default_factory=dict)  # more body parameters, sent as they are
    delimiter: str = ""  # empty: detected from the header line

    @classmethod
    def from_dict(cls, data: dict) -> Template:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})

    def as_dict(self) -> dict:
        return asdict(self)


# {{ column }}: the name is everything between the braces, stripped. Written without lazy or
# overlapping repeats so that matching is linear: `\{\{\s*(.*?)\s*\}\}` took minutes on `{{` and a
# few thousand spaces.
PLACEHOLDER = re.compile(r"\{\{([^{}]*)\}\}")


def _placeholder_name(match: re.Match) -> str | None:
    name = match.group(1).strip()
    return None if "\n" in name else name  # a name never spans lines


@dataclass
class Request:
    line: int
    custom_id: str
    body: dict
    input_row: list[str] | None = None

    def as_batch_line(self, url: str) -> dict:
        return {"custom_id": self.custom_id, "method": "POST", "url": url, "body": self.body}


class TooManyErrors(Exception):
    pass


class _Errors:
    """Collects up to MAX_ERRORS errors and counts the rest."""

    def __init__(self):
        self.items: list[LineError] = []
        self.count = 0

    def add(self, line: int | None, code: str, message: str, param: str | None = None) -> None:
        self.count += 1
        if len(self.items) < MAX_ERRORS:
            # Messages quote the file; a 10 MB cell must not make a 10 MB message a hundred times over.
            if len(message) > 1000:
                message = message[:1000] + "…"
            self.items.append(LineError(line, code, message, param))

    def __bool__(self) -> bool:
        return self.count > 0


_TWO_WORDS = struct.Struct("<QQ")


class _SeenIds:
    """The custom_ids met so far, each with the line it was first met on, in ~30 bytes an id.

    A dict of the ids themselves costs ~120 bytes a line plus the id (a 1M-line file: 120+ MB, and
    ids may be 1 KB each). Here an id is its 128-bit blake2b digest (the odds of two of a million
    ids colliding are ~1e-27), kept in flat arrays in insertion order and found through an
    open-addressing table of entry numbers: the layout of CPython's own dict, without the objects.
    """

    def __init__(self):
        self._digests = array("Q")  # two words per id
        self._lines = array("I")
        self._slots = array("I", [0]) * 1024  # entry number + 1, or 0 for an empty slot
        self._mask = len(self._slots) - 1

    def first_line(self, custom_id: str, line: int) -> int | None:
        """The line custom_id was first met on; None if it is new (it is then recorded at `line`)."""
        high, low = _TWO_WORDS.unpack(blake2b(custom_id.encode(), digest_size=16).digest())
        slots, digests, mask = self._slots, self._digests, self._mask
        i = low & mask
        while entry := slots[i]:
            if digests[2 * entry - 1] == low and digests[2 * entry - 2] == high:
                return self._lines[entry - 1]
            i = (i + 1) & mask
        digests.append(high)
        digests.append(low)
        self._lines.append(line)
        slots[i] = len(self._lines)
        if 2 * len(self._lines) > len(slots):  # linear probing stays short below half full
            self._grow()
        return None

    def _grow(self) -> None:
        slots = self._slots = array("I", [0]) * (2 * len(self._slots))
        mask = self._mask = len(slots) - 1
        for entry, low in enumerate(self._digests[1::2], start=1):
            i = low & mask
            while slots[i]:
                i = (i + 1) & mask
            slots[i] = entry


@dataclass
class Plan:
    path: Path
    format: str
    source_name: str = ""
    url: str = ""
    count: int = 0
    models: Counter = field(default_factory=Counter)
    est_input_tokens: int = 0
    max_output_tokens: int = 0
    errors: list[LineError] = field(default_factory=list)
    error_count: int = 0
    preview: list[dict] = field(default_factory=list)
    columns: list[str] = field(default_factory=list)
    template: Template | None = None
    est_tokens: array = field(default_factory=lambda: array("I"), repr=False)

    @property
    def ok(self) -> bool:
        return self.error_count == 0

    @property
    def model(self) -> str:
        return ", ".join(m for m, _ in self.models.most_common())[:200]

    def requests(self) -> Iterator[Request]:
        """The requests again, read from the file; only for a plan without errors."""
        errors = _Errors()
        if self.format == Job.CSV:
            yield from _csv_requests(self.path, self.template, Limits.from_settings(), errors, [])
        else:
            yield from _jsonl_requests(self.path, Limits.from_settings(), errors, self.url)
        if errors:
            raise ValueError(f"{self.path} changed since it was validated")


def store_upload(chunks, name: str, limits: Limits | None = None) -> tuple[Path | None, LineError | None]:
    """Write an uploaded file (an iterable of byte chunks) under the data dir, enforcing the size limit."""
    limits = limits or Limits.from_settings()
    folder = settings.DATA_DIR / "uploads" / uuid.uuid4().hex
    folder.mkdir(parents=True)
    safe = re.sub(r"[^\w.\-]+", "_", Path(name or "upload").name)[:100] or "upload"
    path = folder / safe
    size = 0
    with open(path, "wb") as out:
        for chunk in chunks:
            size += len(chunk)
            if size > limits.max_file_bytes:
                out.close()
                shutil.rmtree(folder, ignore_errors=True)
                mb = limits.max_file_bytes // (1024 * 1024)
                return None, LineError(None, "file_too_large", f"The file is larger than the {mb} MB limit.")
            out.write(chunk)
    return path, None


def remove_stale_uploads(max_age_hours: float = 24) -> int:
    """Delete uploads nobody launched (or whose job was deleted) after a day; returns how many.

    An upload lives in its own folder under uploads/; a job or a /v1 file that still points into a
    folder keeps it, whatever its age.
    """
    from jobs.models import File

    root = settings.DATA_DIR / "uploads"
    if not root.is_dir():
        return 0
    cutoff = time.time() - max_age_hours * 3600
    old = [folder for folder in root.iterdir() if folder.is_dir() and folder.stat().st_mtime < cutoff]
    if not old:
        return 0
    kept = {
        Path(p).parts[1]
        for p in Job.objects.filter(source_file__startswith="uploads/").values_list("source_file", flat=True)
    }
    kept |= {
        Path(p).parts[1]
        for p in File.objects.filter(path__startswith="uploads/", deleted_at=None).values_list("path", flat=True)
    }
    removed = 0
    for folder in old:
        if folder.name not in kept:
            shutil.rmtree(folder, ignore_errors=True)
            removed += 1
    return removed


def detect_format(name: str, path: Path) -> str:
    """CSV by extension, else JSONL if the first non-blank character opens a JSON object."""
    suffix = Path(name).suffix.lower()
    if suffix in (".csv", ".tsv"):
        return Job.CSV
    if suffix in (".jsonl", ".json", ".ndjson"):
        return Job.JSONL
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return Job.JSONL if head.startswith(b"{") else Job.CSV


def validate(
    path: Path,
    *,
    format: str = Job.JSONL,
    template: Template | None = None,
    source_name: str = "",
    expected_url: str | None = None,
    single_model: bool = False,
    limits: Limits | None = None,
) -> Plan:
    """Check every line; the Plan holds either errors or what a job from this file would be."""
    limits = limits or Limits.from_settings()
    path = Path(path)
    plan = Plan(path=path, format=format, source_name=source_name or path.name, template=template)
    errors = _Errors()
    if path.stat().st_size > limits.max_file_bytes:
        mb = limits.max_file_bytes // (1024 * 1024)
        errors.add(None, "file_too_large", f"The file is larger than the {mb} MB limit.")
    elif format == Job.CSV:
        if template is None:
            errors.add(None, "missing_template", "A CSV file needs a prompt template.")
        else:
            plan.url = template.url
            _consume(plan, _csv_requests(path, template, limits, errors, plan.columns))
    else:
        plan.url = expected_url or ""
        _consume(plan, _jsonl_requests(path, limits, errors, expected_url, plan))

    if not errors and plan.count == 0:
        errors.add(None, "empty_file", "The file has no requests.")
    if single_model and len(plan.models) > 1:
        errors.add(
            None,
            "mismatched_model",
            f"The OpenAI Batch API takes one model per file; this file uses {len(plan.models)}: {plan.model}.",
            "body.model",
        )
    plan.errors, plan.error_count = errors.items, errors.count
    if errors:
        plan.est_tokens = array("I")
    return plan


# Next to each upload: the last validation of it. '#' never survives store_upload's cleaning of
# file names, so no upload can be called this.
CHECKED_NAME = "#checked.json"


def checked(path: Path, *, format: str, template: Template | None = None, source_name: str = "") -> Plan:
    """validate(), remembered next to the upload for the same template: the review page shows the
    result on every visit, and reading a big file again each time would hold a web worker for a
    minute. The Plan has no per-request estimates (`est_tokens`): launching validates again."""
    path = Path(path)
    limits = Limits.from_settings()
    key = blake2b(
        json.dumps([format, template.as_dict() if template else None, source_name, asdict(limits)]).encode()
    ).hexdigest()
    cache = path.parent / CHECKED_NAME
    try:
        saved = json.loads(cache.read_text())
        if saved["key"] == key:
            return _restore(path, saved["plan"], template)
    except (OSError, ValueError, KeyError, TypeError):
        pass  # none yet, or for another template
    plan = validate(path, format=format, template=template, source_name=source_name, limits=limits)
    summary = {
        "format": plan.format,
        "source_name": plan.source_name,
        "url": plan.url,
        "count": plan.count,
        "models": dict(plan.models),
        "est_input_tokens": plan.est_input_tokens,
        "max_output_tokens": plan.max_output_tokens,
        "errors": [asdict(e) for e in plan.errors],
        "error_count": plan.error_count,
        "preview": plan.preview,
        "columns": plan.columns,
    }
    tmp = cache.with_name(f"{CHECKED_NAME}.{uuid.uuid4().hex}")
    try:
        tmp.write_text(json.dumps({"key": key, "plan": summary}, ensure_ascii=False))
        tmp.replace(cache)  # atomic: a visit at the same time reads the old result or the new, never half
    except OSError:  # a full disk costs the next visit a validation, not this one its page
        tmp.unlink(missing_ok=True)
    return plan


def _restore(path: Path, summary: dict, template: Template | None) -> Plan:
    plan = Plan(path=path, template=template, **summary)
    plan.models = Counter(plan.models)
    plan.errors = [LineError(**e) for e in plan.errors]
    return plan


def _consume(plan: Plan, requests: Iterator[Request]) -> None:
    for request in requests:
        plan.count += 1
        plan.models[request.body.get("model", "")] += 1
        est = tokens.estimate_request(plan.url, request.body)
        plan.est_tokens.append(min(est, 2**32 - 1))
        plan.est_input_tokens += est
        plan.max_output_tokens += tokens.max_output_tokens(request.body)
        if len(plan.preview) < PREVIEW_SIZE:
            plan.preview.append(request.as_batch_line(plan.url))


def _lines(path: Path, limits: Limits, errors: _Errors) -> Iterator[tuple[int, str]]:
    """(line number, decoded text) for each line, checking encoding, line size and line count.

    A line is read up to the limit and no further: the rest of an over-long one (a 500 MB file
    without a newline, say) is skipped a chunk at a time, never held in memory.
    """
    with open(path, "rb") as f:
        if f.read(3) != b"\xef\xbb\xbf":
            f.seek(0)
        for number in itertools.count(1):
            raw = f.readline(limits.max_line_bytes + 1)
            if not raw:
                return
            if number > limits.max_lines:
                errors.add(
                    number,
                    "too_many_lines",
                    f"The file has more than {limits.max_lines:,} lines, the limit of this installation.",
                )
                return
            if len(raw) > limits.max_line_bytes:
                size = len(raw)
                while not raw.endswith(b"\n") and (raw := f.readline(SKIP_CHUNK)):
                    size += len(raw)
                errors.add(
                    number, "line_too_long", f"Line {number} is {size:,} bytes; the limit is {limits.max_line_bytes:,}."
                )
                continue
            if b"\x00" in raw:  # binary, not text; and Postgres stores no NUL (a CSV header becomes Job.columns)
                errors.add(number, "invalid_encoding", f"Line {number} holds a NUL byte: this is not a text file.")
                continue
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                errors.add(
                    number,
                    "invalid_encoding",
                    f"Line {number} is not valid UTF-8 (byte {e.start + 1}). Save the file as UTF-8.",
                )


def _jsonl_requests(
    path: Path, limits: Limits, errors: _Errors, expected_url: str | None, plan: Plan | None = None
) -> Iterator[Request]:
    seen = _SeenIds()
    url = expected_url
    url_line = None
    for number, text in _lines(path, limits, errors):
        if not text.strip():
            continue  # blank lines (a trailing one above all) carry no request
        try:
            obj = json.loads(text)
            too_deep = _too_deep(text, obj)
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
        if _has_lone_surrogate(text, obj):
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
                number, "invalid_method", f"Line {number}: method must be POST, not {_short(obj['method'])}.", "method"
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
                f"Line {number}: url {_short(line_url)} is not supported; use one of {', '.join(SUPPORTED_URLS)}.",
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


def _too_deep(text: str | None, value) -> bool:
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


def _has_lone_surrogate(text: str, obj) -> bool:
    """JSON may spell half of a UTF-16 pair ("\\ud800"); no database or UTF-8 file can store it."""
    if "\\ud" not in text and "\\uD" not in text:  # the cheap test: only such an escape can make one
        return False
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _check_body(number: int, url: str, body: dict, errors: _Errors) -> bool:
    ok = True
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        errors.add(number, "missing_model", f"Line {number}: body has no 'model'.", "body.model")
        ok = False
    elif "\x00" in model:  # the job's model column holds it as it is
        errors.add(number, "invalid_value", f"Line {number}: body.model holds a NUL character.", "body.model")
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


def _short(text: str, limit: int = 100) -> str:
    """A value quoted in a message, cut to a length a person reads."""
    return repr(text if len(text) <= limit else text[:limit] + "…")


def _kind(value) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )


def _kinds(kind) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join({list: "array", str: "string", dict: "object"}[k] for k in kinds)


def _sniff_delimiter(header: str) -> str:
    counts = {d: header.count(d) for d in (",", ";", "\t", "|")}
    best = max(counts, key=counts.get)
    return best if counts[best] else ","


class _RowStarts:
    """The text lines for csv.reader, noting the file line each row starts on.

    reader.line_num counts the lines the reader was given, so it falls behind the file after a
    line that _lines() skipped (bad UTF-8, too long); the numbers have to come from _lines().
    """

    def __init__(self, numbered: Iterator[tuple[int, str]], limit: int):
        self._numbered = numbered
        self.start: int | None = None  # set by the first line of the next row
        # A row may be as long as a line: csv limits each cell, not how many quoted cells spread
        # over lines one row holds.
        self._limit = limit
        self._size = 0

    def __iter__(self):
        return self

    def __next__(self) -> str:
        number, text = next(self._numbered)
        if self.start is None:
            self.start, self._size = number, 0
        self._size += len(text)
        if self._size > self._limit:
            raise csv.Error(f"the row is longer than {self._limit:,} characters, the line limit")
        return text

    def read_row(self, reader) -> tuple[int, list[str]] | None:
        """(first line, cells) of the next row, None at the end; raises csv.Error."""
        self.start = None
        row = next(reader, None)
        return None if row is None else (self.start, row)


def _csv_requests(
    path: Path, template: Template, limits: Limits, errors: _Errors, columns_out: list
) -> Iterator[Request]:
    # A cell may be as long as a line may be, where csv's default stops it at 128 KB. The limit is
    # process-wide, but every caller sets it from the same settings; it still stops a stray quote
    # from reading the rest of the file into one cell.
    csv.field_size_limit(limits.max_line_bytes)
    numbered = _lines(path, limits, errors)
    first = next(numbered, None)
    if first is None:
        return
    delimiter = template.delimiter or _sniff_delimiter(first[1])
    source = _RowStarts(itertools.chain([first], numbered), limits.max_line_bytes)
    reader = csv.reader(source, delimiter=delimiter)
    try:
        header_line, header = source.read_row(reader) or (first[0], [])
    except csv.Error as e:
        errors.add(source.start, "invalid_csv", f"Line {source.start}: {e}.")
        return
    if len(header) > MAX_COLUMNS:
        message = f"Line {header_line} has {len(header):,} columns; the limit is {MAX_COLUMNS:,}."
        errors.add(header_line, "too_many_columns", message)
        return
    columns = [h.strip() or f"column_{i + 1}" for i, h in enumerate(header)]
    columns_out[:] = columns
    dupes = sorted(c for c, n in Counter(columns).items() if n > 1)
    if dupes:
        errors.add(
            header_line,
            "duplicate_column",
            f"Line {header_line}: the header repeats {', '.join(dupes)}; column names must be unique.",
        )
    if not _check_template(template, columns, errors):
        return
    body_base = _template_body_base(template)
    seen = _SeenIds()
    row_number = 0
    while True:
        try:
            numbered_row = source.read_row(reader)
        except csv.Error as e:
            errors.add(source.start, "invalid_csv", f"Line {source.start}: {e}.")
            break
        if numbered_row is None:
            break
        number, row = numbered_row
        if not any(cell.strip() for cell in row):
            continue
        row_number += 1
        if len(row) > len(columns):
            errors.add(
                number,
                "too_many_cells",
                f"Line {number} has {len(row)} cells but the header has {len(columns)}. Check the delimiter and quotes.",
            )
            continue
        row = row + [""] * (len(columns) - len(row))  # missing trailing cells are empty
        cells = dict(zip(columns, row))
        if template.custom_id_column:
            custom_id = cells[template.custom_id_column].strip()
            if not custom_id:
                errors.add(
                    number, "invalid_custom_id", f"Line {number}: column {template.custom_id_column!r} is empty."
                )
                continue
            if len(custom_id.encode()) > 1024:
                errors.add(number, "invalid_custom_id", f"Line {number}: the custom_id is longer than 1,024 bytes.")
                continue
        else:
            custom_id = f"row-{row_number}"
        if earlier := seen.first_line(custom_id, number):
            errors.add(
                number,
                "duplicate_custom_id",
                f"Line {number}: custom_id {custom_id!r} is already used on line {earlier}.",
            )
            continue
        # The model and the prompt first, then the settings: the previews and item pages show the
        # filled-in prompt at the top, not below a long JSON schema.
        body = {"model": body_base["model"]}
        if template.url == "/v1/embeddings":
            text = cells[template.input_column]
            if not text.strip():
                errors.add(number, "empty_input", f"Line {number}: column {template.input_column!r} is empty.")
                continue
            body["input"] = text
        else:
            user = _render(template.user_prompt, cells)
            if not user.strip():
                errors.add(number, "empty_prompt", f"Line {number}: the prompt is empty for this row.")
                continue
            messages = []
            if template.system_prompt.strip():
                messages.append({"role": "system", "content": _render(template.system_prompt, cells)})
            messages.append({"role": "user", "content": user})
            body["messages"] = messages
        body.update((key, value) for key, value in body_base.items() if key not in body)
        yield Request(number, custom_id, body, row)


def _render(text: str, cells: dict[str, str]) -> str:
    return PLACEHOLDER.sub(lambda m: cells.get(_placeholder_name(m), m.group(0)), text)


def template_columns(text: str) -> list[str]:
    names = (_placeholder_name(m) for m in PLACEHOLDER.finditer(text or ""))
    return [name for name in names if name is not None]


def _check_template(template: Template, columns: list[str], errors: _Errors) -> bool:
    ok = True

    def fail(code, message, param):
        nonlocal ok
        errors.add(None, code, message, param)
        ok = False

    if template.url not in ("/v1/chat/completions", "/v1/embeddings"):
        fail("invalid_url", "A CSV template makes chat completions or embeddings.", "url")
        return False
    if not template.model.strip():
        fail("missing_model", "Choose a model.", "model")
    too_long = False
    for param, label, limit in TEMPLATE_TEXTS:
        if isinstance(value := getattr(template, param), str) and len(value) > limit:
            fail("invalid_value", f"{label} is longer than {limit:,} characters.", param)
            too_long = True
    if too_long:
        return False  # not worth scanning for placeholders
    for param in ("model", "system_prompt", "user_prompt", "custom_id_column", "input_column"):
        if "\x00" in getattr(template, param):  # the job stores its template, and Postgres no NUL
            fail("invalid_value", "The template holds a NUL character.", param)
    known = ", ".join(columns)
    column_set = set(columns)
    if template.url == "/v1/embeddings":
        if not template.input_column:
            fail("missing_required_parameter", "Choose the column to embed.", "input_column")
        elif template.input_column not in column_set:
            fail("unknown_column", f"There is no column {template.input_column!r}. Columns: {known}.", "input_column")
    else:
        if not template.user_prompt.strip():
            fail("missing_required_parameter", "Write a user prompt.", "user_prompt")
        for param in ("system_prompt", "user_prompt"):
            for name in dict.fromkeys(template_columns(getattr(template, param))):
                if name not in column_set:
                    fail(
                        "unknown_column",
                        f"The template uses {{{{ {name[:100]} }}}}, but the file has no column {_short(name)}. Columns: {known}.",
                        param,
                    )
    if template.custom_id_column and template.custom_id_column not in column_set:
        fail(
            "unknown_column", f"There is no column {template.custom_id_column!r}. Columns: {known}.", "custom_id_column"
        )
    if template.temperature is not None and not (0 <= template.temperature <= 2):
        fail("invalid_value", "Temperature must be between 0 and 2.", "temperature")
    if template.max_tokens is not None and template.max_tokens < 1:
        fail("invalid_value", "Max tokens must be a positive number.", "max_tokens")
    if template.json_schema not in (None, "", {}):
        try:
            schema_format(template.json_schema)
        except ValueError as e:
            fail("invalid_json_schema", str(e), "json_schema")
    if not isinstance(template.extra, dict):
        fail("invalid_type", "Extra parameters must be a JSON object.", "extra")
    return ok


def schema_format(schema: dict | str) -> dict:
    """A JSON schema (or a full json_schema block) -> the chat response_format that asks for it."""
    too_deep = ValueError(f"The JSON schema nests more than {MAX_DEPTH} levels deep.")
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise ValueError(f"The JSON schema is not valid JSON: {e}.") from None
        except RecursionError:
            raise too_deep from None
    if _too_deep(None, schema):
        raise too_deep
    if not isinstance(schema, dict):
        raise ValueError("The JSON schema must be a JSON object.")
    text = json.dumps(schema)
    if _has_lone_surrogate(text, schema):
        raise ValueError("The JSON schema has a \\u escape of half a character (a lone UTF-16 surrogate).")
    if "\\u0000" in text:  # the job keeps its template as JSON, and Postgres's jsonb takes no NUL
        raise ValueError("The JSON schema holds a NUL character (\\u0000).")
    if "schema" in schema and isinstance(schema["schema"], dict):
        block = {"name": "output", **schema}
    else:
        block = {"name": "output", "strict": True, "schema": schema}
    return {"type": "json_schema", "json_schema": block}


def _template_body_base(template: Template) -> dict:
    body: dict = {"model": template.model.strip()}
    if template.url == "/v1/chat/completions":
        if template.temperature is not None:
            body["temperature"] = template.temperature
        if template.max_tokens:
            body["max_tokens"] = template.max_tokens
        if template.json_schema not in (None, "", {}):
            body["response_format"] = schema_format(template.json_schema)
    body.update(template.extra or {})
    return body


def create_job(
    plan: Plan,
    *,
    owner,
    name: str = "",
    endpoint=None,
    mode: str = Job.LIVE,
    metadata: dict | None = None,
    max_attempts: int = 5,
) -> Job:
    """One transaction: the Job and all its Items, or nothing."""
    if not plan.ok:
        raise ValueError("A plan with errors cannot become a job.")
    template = plan.template
    if template is not None and isinstance(template.json_schema, str) and template.json_schema.strip():
        template = Template.from_dict({**template.as_dict(), "json_schema": json.loads(template.json_schema)})
    with transaction.atomic():
        job = Job.objects.create(
            owner=owner,
            name=(name or Path(plan.source_name).stem or "Untitled job")[:200],
            url=plan.url,
            model=plan.model,
            mode=mode,
            endpoint=endpoint,
            source_name=plan.source_name[:255],
            source_format=plan.format,
            source_file=str(_relative(plan.path)),
            columns=plan.columns,
            template=template.as_dict() if template else {},
            metadata=metadata or {},
            max_attempts=max_attempts,
            total=plan.count,
            n_pending=plan.count,
            est_input_tokens=plan.est_input_tokens,
            created_at=timezone.now(),
        )
        dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
        estimates = plan.est_tokens
        rows = (
            (
                job.pk,
                request.line,
                request.custom_id,
                dumps(request.body),
                dumps(request.input_row) if request.input_row is not None else "",
                estimates[i] if i < len(estimates) else 0,
            )
            for i, request in enumerate(plan.requests())
        )
        _insert_items(rows)
    return job


def _insert_items(rows: Iterator[tuple]) -> None:
    """INSERT items in chunks with executemany.

    bulk_create spends ~90% of its time turning each value into SQL parameters one field at a
    time; the values here are plain strings and ints, and every other column takes its default.
    """
    given = ("job_id", "line", "custom_id", "body", "input_row", "est_tokens")
    defaults = Item.column_defaults(given)
    columns = [*given, *defaults]
    constants = tuple(defaults.values())
    quote = connection.ops.quote_name
    sql = "INSERT INTO {} ({}) VALUES ({})".format(
        quote(Item._meta.db_table), ", ".join(quote(c) for c in columns), ", ".join(["%s"] * len(columns))
    )
    with connection.cursor() as cursor:
        while chunk := list(itertools.islice(rows, CHUNK)):
            cursor.executemany(sql, [row + constants for row in chunk])


def _relative(path: Path) -> Path:
    try:
        return Path(path).resolve().relative_to(settings.DATA_DIR)
    except ValueError:
        return Path(path)
