"""Uploaded file -> validated requests -> a Job with its Items.

Two passes over a file kept on disk, both streaming: `validate()` checks every line and returns
a Plan (errors with line numbers, or counts, a preview and a token estimate); `create_job()`
reads the file again and writes the Job and its Items in one transaction. An API batch answers
before either pass: `create_job_to_validate()` makes its Job, and a worker validates the file and
writes the Items into that Job with `add_items()`; both creators take how the job runs as one
`RunOptions`. Memory stays flat whatever the file size, apart from ~30 bytes a request to find
duplicate custom_ids and 4 for its token estimate.

The rooms: `lines` (reading a file line by line, limits, errors), `jsonl` (OpenAI batch files),
`table` (CSV + `template`), `plan` (the first pass), `create` (the second), `uploads` (files on disk).
Callers use the names below, from `jobs.ingest`.
"""

from jobs.ingest.create import RunOptions, add_items, create_job, create_job_to_validate
from jobs.ingest.jsonl import MAX_DEPTH
from jobs.ingest.lines import MAX_ERRORS, Limits, LineError, Request
from jobs.ingest.plan import CHECKED_NAME, Plan, checked, detect_format, validate
from jobs.ingest.template import MAX_PROMPT_CHARS, MAX_SCHEMA_CHARS, Template, _render, schema_format, template_columns
from jobs.ingest.uploads import STORAGE_UNAVAILABLE, remove_stale_uploads, store_upload
from jobs.ingest.validating import VALIDATION_QUIET, check_in_background, validate_job, validation_progress

__all__ = [
    "CHECKED_NAME",
    "STORAGE_UNAVAILABLE",
    "VALIDATION_QUIET",
    "MAX_DEPTH",
    "MAX_ERRORS",
    "MAX_PROMPT_CHARS",
    "MAX_SCHEMA_CHARS",
    "LineError",
    "Limits",
    "Plan",
    "Request",
    "RunOptions",
    "Template",
    "_render",
    "add_items",
    "check_in_background",
    "checked",
    "create_job",
    "create_job_to_validate",
    "detect_format",
    "validate_job",
    "validation_progress",
    "remove_stale_uploads",
    "schema_format",
    "store_upload",
    "template_columns",
    "validate",
]
