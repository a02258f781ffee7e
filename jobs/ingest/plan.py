"""The first pass: a file on disk -> a Plan (errors with line numbers, or counts, a preview and a token
estimate), and the Plan remembered next to its upload so the review page need not read the file again.
"""

from __future__ import annotations

import json
import uuid
from array import array
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from hashlib import blake2b
from pathlib import Path

from jobs import tokens
from jobs.ingest.jsonl import jsonl_requests
from jobs.ingest.lines import Errors, Limits, LineError, Request
from jobs.ingest.table import csv_requests
from jobs.ingest.template import Template
from jobs.models import Job

PREVIEW_SIZE = 5
PROGRESS_EVERY = 20_000  # requests between two calls of validate()'s `progress`: about half a second


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

    def error_list(self) -> list[dict]:
        """The errors as a failed OpenAI batch lists them (`errors.data`), the ones not kept counted last."""
        errors = [error.as_dict() for error in self.errors]
        if self.error_count > len(errors):
            more = self.error_count - len(errors)
            errors.append(
                {
                    "code": "too_many_errors",
                    "line": None,
                    "param": None,
                    "message": f"{more:,} more errors are not listed.",
                }
            )
        return errors

    def failure(self) -> str:
        """Why a job of this file failed, in a sentence: the count of errors and the first one."""
        first = self.errors[0].message if self.errors else ""
        return f"The input file has {self.error_count:,} error{'s' if self.error_count != 1 else ''}: {first}"

    def requests(self) -> Iterator[Request]:
        """The requests again, read from the file; only for a plan without errors."""
        errors = Errors()
        if self.format == Job.Format.CSV:
            assert self.template is not None  # validate() gives a CSV file without a template an error
            yield from csv_requests(self.path, self.template, Limits.from_settings(), errors, [])
        else:
            yield from jsonl_requests(self.path, Limits.from_settings(), errors, self.url)
        if errors:
            raise ValueError(f"{self.path} changed since it was validated")


def detect_format(name: str, path: Path) -> str:
    """CSV by extension, else JSONL if the first non-blank character opens a JSON object."""
    suffix = Path(name).suffix.lower()
    if suffix in (".csv", ".tsv"):
        return Job.Format.CSV
    if suffix in (".jsonl", ".json", ".ndjson"):
        return Job.Format.JSONL
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return Job.Format.JSONL if head.startswith(b"{") else Job.Format.CSV


def validate(
    path: Path,
    *,
    format: str = Job.Format.JSONL,
    template: Template | None = None,
    source_name: str = "",
    expected_url: str | None = None,
    single_model: bool = False,
    limits: Limits | None = None,
    progress: Callable[[int], object] | None = None,
) -> Plan:
    """Check every line; the Plan holds either errors or what a job from this file would be.

    `progress` is called with the count of requests read so far every PROGRESS_EVERY requests: a worker
    validating a big file shows it is alive, and may stop by raising."""
    limits = limits or Limits.from_settings()
    path = Path(path)
    plan = Plan(path=path, format=format, source_name=source_name or path.name, template=template)
    errors = Errors()
    if path.stat().st_size > limits.max_file_bytes:
        mb = limits.max_file_bytes // (1024 * 1024)
        errors.add(None, "file_too_large", f"The file is larger than the {mb} MB limit.")
    elif format == Job.Format.CSV:
        if template is None:
            errors.add(None, "missing_template", "A CSV file needs a prompt template.")
        else:
            plan.url = template.url
            _consume(plan, csv_requests(path, template, limits, errors, plan.columns), progress)
    else:
        plan.url = expected_url or ""
        _consume(plan, jsonl_requests(path, limits, errors, expected_url, plan), progress)

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


def check_key(format: str, template: Template | None = None, source_name: str = "") -> str:
    """What checked() remembers a result for: the file's format, the template, the name and the limits."""
    limits = Limits.from_settings()
    return blake2b(
        json.dumps([format, template.as_dict() if template else None, source_name, asdict(limits)]).encode()
    ).hexdigest()


def checked(
    path: Path,
    *,
    format: str,
    template: Template | None = None,
    source_name: str = "",
    progress: Callable[[int], object] | None = None,
) -> Plan:
    """validate(), remembered next to the upload for the same template: the review page shows the
    result on every visit, and reading a big file again each time would hold a web worker for a
    minute. The Plan has no per-request estimates (`est_tokens`): launching validates again."""
    plan = remembered(path, format=format, template=template, source_name=source_name)
    if plan is None:
        plan = validate(path, format=format, template=template, source_name=source_name, progress=progress)
        remember(path, record(plan, source_name))
    return plan


def remembered(path: Path, *, format: str, template: Template | None = None, source_name: str = "") -> Plan | None:
    """checked()'s result for this file and template, without reading the file; None if it has none."""
    path = Path(path)
    try:
        saved = json.loads((path.parent / CHECKED_NAME).read_text())
        if saved["key"] == check_key(format, template, source_name):
            return _restore(path, saved["plan"], template)
    except (OSError, ValueError, KeyError, TypeError):
        pass  # none yet, or for another template
    return None


def record(plan: Plan, source_name: str = "") -> dict:
    """What checked() keeps of a plan: small (the first errors, a preview), and JSON."""
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
    return {"key": check_key(plan.format, plan.template, source_name), "plan": summary}


def remember(path: Path, saved: dict) -> None:
    """Keep a record() next to the upload at `path`, where remembered() finds it."""
    cache = Path(path).parent / CHECKED_NAME
    tmp = cache.with_name(f"{CHECKED_NAME}.{uuid.uuid4().hex}")
    try:
        tmp.write_text(json.dumps(saved, ensure_ascii=False))
        tmp.replace(cache)  # atomic: a visit at the same time reads the old result or the new, never half
    except OSError:  # a full disk costs the next visit a validation, not this one its page
        tmp.unlink(missing_ok=True)


def _restore(path: Path, summary: dict, template: Template | None) -> Plan:
    plan = Plan(path=path, template=template, **summary)
    plan.models = Counter(summary["models"])
    plan.errors = [LineError(**e) for e in summary["errors"]]
    return plan


def _consume(plan: Plan, requests: Iterator[Request], progress: Callable[[int], object] | None) -> None:
    for request in requests:
        plan.count += 1
        if progress is not None and plan.count % PROGRESS_EVERY == 0:
            progress(plan.count)
        plan.models[request.body.get("model", "")] += 1
        est = tokens.estimate_request(plan.url, request.body)
        plan.est_tokens.append(min(est, 2**32 - 1))
        plan.est_input_tokens += est
        plan.max_output_tokens += tokens.most_output_tokens(plan.url, request.body)
        if len(plan.preview) < PREVIEW_SIZE:
            plan.preview.append(request.as_batch_line(plan.url))
