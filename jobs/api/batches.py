"""/v1/batches: a batch is a Job run live by the cluster, described the way OpenAI describes batches.

OpenAI's statuses from a Job's: `validating` while a worker checks the input file and creates the
job's items (POST answers before that, whatever the file's size), and until a worker first takes the
job up; running or paused is `in_progress` (the API has no paused; `batchsite.status` tells), then
`cancelling`, `cancelled`, `completed`, or `failed` for an input file with errors (listed with their
lines in `errors`). Batchsite never expires a batch.

Metadata picks how the job runs: `batchsite_mode` live (the default), remote (the endpoint's own Batch
API) or hybrid (remote until the last safe moment before `batchsite_deadline`, then live). The Batch
object reads the same in every mode; `batchsite` tells the mode and, for hybrid, the switch.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

from django.conf import settings
from django.db import connection, transaction
from django.db.models import prefetch_related_objects
from django.http import JsonResponse
from django.utils import timezone
from django.views.decorators.http import conditional_page

from jobs import ingest, polls, runoptions, storage
from jobs.api.auth import ApiRequest, api_view, json_body
from jobs.api.files import get_file
from jobs.api.pagination import cursor_page
from jobs.errors import ApiError
from jobs.models import (
    SUPPORTED_URLS,
    Batch,
    Endpoint,
    File,
    InvalidTransition,
    Job,
    NotificationSettings,
    QuotaExceeded,
    control,
)

COMPLETION_WINDOW = "24h"
LIST_DEFAULT, LIST_MAX = 20, 100
ENDPOINT_KEY = "batchsite_endpoint"  # metadata key that picks an endpoint by name
MODE_KEY, DEADLINE_KEY = "batchsite_mode", "batchsite_deadline"  # how the job runs; hybrid's deadline
OUTPUT_RETRIES_KEY = "batchsite_output_retries"  # sends more for an answer that breaks its JSON schema
NOTIFY_KEY = "batchsite_notify"  # email the owner when the batch ends (default: their setting)
COST_CAP_KEY = "batchsite_cost_cap"  # dollars: the job pauses before passing it
CACHE_KEY = "batchsite_cache"  # "true": answers from the team's answer cache, duplicates sent once
METADATA_PAIRS, METADATA_KEY_CHARS, METADATA_VALUE_CHARS = 16, 64, 512

STATUS: dict[str, str] = {
    Job.Status.VALIDATING: "validating",
    Job.Status.QUEUED: "in_progress",
    Job.Status.RUNNING: "in_progress",
    Job.Status.PAUSED: "in_progress",
    Job.Status.CANCELLING: "cancelling",
    Job.Status.CANCELLED: "cancelled",
    Job.Status.COMPLETED: "completed",
    Job.Status.FAILED: "failed",
}


def _ts(moment: datetime | None) -> int | None:
    return int(moment.timestamp()) if moment else None


def openai_status(job: Job) -> str:
    if job.status == Job.Status.QUEUED and job.started_at is None:
        return "validating"
    return STATUS[job.status]


def batch_object(request: ApiRequest, batch: Batch) -> dict:
    job = batch.job
    status = openai_status(job)
    finished = _ts(job.finished_at)
    output = errors_file = None
    if job.status in (Job.Status.COMPLETED, Job.Status.CANCELLED):
        output, errors_file = File.of_job(job, File.RESULTS), File.of_job(job, File.ERRORS)
    cancelling = batch.cancelling_at or (job.finished_at if job.status == Job.Status.CANCELLED else None)
    return {
        "id": batch.public_id,
        "object": "batch",
        "endpoint": job.url,
        "model": job.model or None,
        "errors": {"object": "list", "data": job.errors} if job.errors else None,
        "input_file_id": batch.input_file.public_id,
        "completion_window": batch.completion_window,
        "status": status,
        "output_file_id": output.public_id if output else None,
        "error_file_id": errors_file.public_id if errors_file else None,
        "created_at": _ts(job.created_at),
        "in_progress_at": _ts(job.started_at),
        "expires_at": _ts(job.created_at + timedelta(hours=24)),
        # Results are written as they arrive, so finalizing takes no time.
        "finalizing_at": finished if status == "completed" else None,
        "completed_at": finished if status == "completed" else None,
        "failed_at": finished if status == "failed" else None,
        "expired_at": None,
        "cancelling_at": _ts(cancelling),
        "cancelled_at": finished if status == "cancelled" else None,
        # Like OpenAI's: requests never sent because of a cancel count as neither. The remote counts are
        # what the endpoint reports done in remote batches whose results are not joined to the items yet.
        "request_counts": {
            "total": job.total,
            "completed": job.n_succeeded + job.remote_completed,
            "failed": job.n_failed + job.n_expired + job.remote_failed,
        },
        "usage": {
            "input_tokens": job.prompt_tokens,
            "input_tokens_details": {"cached_tokens": job.cached_tokens},
            "output_tokens": job.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": job.prompt_tokens + job.completion_tokens,
        },
        "metadata": job.metadata or None,
        # Not OpenAI's: what the dashboard shows (a paused job is in_progress above). The SDK keeps it
        # as an extra attribute, `batch.batchsite`.
        "batchsite": {
            "job_id": job.pk,
            "status": job.status,
            "status_reason": job.status_reason,
            "url": request.build_absolute_uri(job.get_absolute_url()),
            "mode": job.mode,
            "deadline": _ts(job.deadline),
            # Hybrid: when the rest is planned to go live (moves as the job goes), and when it did.
            "switch_at": _ts(job.switch_at),
            "switched_at": _ts(job.switched_at),
        },
    }


# What a batch object never reads: left in the database, so a poll loads and decodes less.
UNUSED = [
    "template",
    "columns",
    "source_file",
    "est_input_tokens",
    "cost",
    "heartbeat_at",
    "slice_gen",
    "slice_enqueued_at",
    "slice_picked_at",
    "switch_note",
]


def _batches(field: str, values: list) -> list[Batch]:
    """The batches whose `field` is one of `values`, each with its input file's public id and its job, in two
    queries, and the output files of finished jobs in one after that.

    Raw queries: clients poll batches (the SDK's examples every few seconds, scripts far more often), and
    compiling the equivalent select_related query costs more CPU than everything else in the answer."""
    batches = polls.with_parent(Batch, field, values, "input_file", ("public_id",))
    if not batches:
        return []
    q = connection.ops.quote_name
    marks = ", ".join(["%s"] * len(batches))
    jobs = {
        job.pk: job
        for job in Job.objects.raw(
            f"SELECT {_JOB_COLUMNS} FROM {q(Job._meta.db_table)} WHERE id IN ({marks})", [b.job_id for b in batches]
        )
    }
    for batch in batches:
        batch.job = jobs[batch.job_id]
    finished = [job for job in jobs.values() if job.status in (Job.Status.COMPLETED, Job.Status.CANCELLED)]
    prefetch_related_objects(finished, "api_files")  # for File.of_job; a running batch has no output file yet
    return batches


def get_batch(request: ApiRequest, batch_id: str) -> Batch:
    """A user's own batch, or anyone's for staff; 404 otherwise, as if it did not exist."""
    batch = next(iter(_batches("public_id", [batch_id])), None)
    if batch is None or not batch.job.can_control(request.user):
        raise ApiError(404, f"No batch found with id '{batch_id}'.", param="batch_id")
    return batch


def _page_of_batches(ids: list[int]) -> list[Batch]:
    """The full batches of a page of ids (cursor_page pages over ids only), in the page's order."""
    by_id = {b.pk: b for b in _batches("id", ids)}
    return [by_id[pk] for pk in ids]


_JOB_COLUMNS = polls.columns(Job, UNUSED)


@api_view("GET", "POST")
def collection(request: ApiRequest) -> JsonResponse:
    if request.method == "POST":
        return _create(request)
    mine = Batch.objects.filter(job__owner=request.user).values_list("pk", flat=True)
    page = cursor_page(request, mine, lambda b: batch_object(request, b), LIST_DEFAULT, LIST_MAX, load=_page_of_batches)
    return JsonResponse(page)


@conditional_page  # If-None-Match: an unchanged batch answers 304 with no body
@api_view("GET")
def detail(request: ApiRequest, batch_id: str) -> JsonResponse:
    return JsonResponse(batch_object(request, get_batch(request, batch_id)))


@api_view("POST")
def cancel(request: ApiRequest, batch_id: str) -> JsonResponse:
    batch = get_batch(request, batch_id)
    job = batch.job
    if job.status in (Job.Status.COMPLETED, Job.Status.FAILED):
        raise _conflict(f"Cannot cancel a batch with status '{openai_status(job)}'.")
    asked = timezone.now()
    try:
        control.cancel(job)
    except InvalidTransition as e:
        raise _conflict(str(e)) from None
    Batch.objects.filter(pk=batch.pk, cancelling_at__isnull=True).update(cancelling_at=asked)
    return JsonResponse(batch_object(request, get_batch(request, batch_id)))


def _conflict(message: str) -> ApiError:
    # The SDK retries every 409 unless told not to; this one will not change by waiting.
    return ApiError(409, message, headers={"x-should-retry": "false"})


def _required(body: dict, name: str) -> str:
    value = body.get(name)
    if value is None or value == "":
        raise ApiError(400, f"Missing required parameter: '{name}'.", param=name, code="missing_required_parameter")
    if not isinstance(value, str):
        raise ApiError(400, f"Invalid type for '{name}': expected a string.", param=name, code="invalid_type")
    return value


def _metadata(value) -> dict:
    """OpenAI's rules: up to 16 string pairs, keys up to 64 characters, values up to 512."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ApiError(400, "Invalid type for 'metadata': expected an object.", param="metadata", code="invalid_type")
    if len(value) > METADATA_PAIRS:
        raise ApiError(
            400,
            f"Invalid 'metadata': at most {METADATA_PAIRS} pairs are allowed.",
            param="metadata",
            code="invalid_value",
        )
    for key, item in value.items():
        if len(key) > METADATA_KEY_CHARS or not isinstance(item, str) or len(item) > METADATA_VALUE_CHARS:
            raise ApiError(
                400,
                f"Invalid 'metadata.{key[:METADATA_KEY_CHARS]}': keys are strings of up to {METADATA_KEY_CHARS} "
                f"characters, values strings of up to {METADATA_VALUE_CHARS}.",
                param=f"metadata.{key[:METADATA_KEY_CHARS]}",
                code="invalid_value",
            )
    return value


def _upstream(metadata: dict) -> Endpoint | None:
    name = metadata.get(ENDPOINT_KEY)
    if not name:
        return Endpoint.default()
    endpoint = Endpoint.objects.filter(name=name).first()
    if endpoint is None:
        known = ", ".join(repr(n) for n in Endpoint.objects.values_list("name", flat=True)) or "none"
        raise ApiError(
            400,
            f"No endpoint named {name!r}. Endpoints: {known}.",
            param=f"metadata.{ENDPOINT_KEY}",
            code="invalid_value",
        )
    return endpoint


# RunOptions' fields as the metadata names them.
OPTION_KEYS = {
    "mode": MODE_KEY,
    "deadline": DEADLINE_KEY,
    "output_retries": OUTPUT_RETRIES_KEY,
    "use_cache": CACHE_KEY,
    "cost_cap": COST_CAP_KEY,
    "notify": NOTIFY_KEY,
}


def _run_options(request: ApiRequest, metadata: dict) -> ingest.RunOptions:
    given = {option: metadata.get(key) for option, key in OPTION_KEYS.items()}
    try:
        return runoptions.read({**given, "metadata": metadata}, notify=NotificationSettings.email_default(request.user))
    except runoptions.InvalidOption as e:
        raise _refused(e, metadata) from None


def _refused(e: runoptions.InvalidOption, metadata: dict) -> ApiError:
    """The refusal in the API's words: they name the metadata keys, and a deadline's formats."""
    key = OPTION_KEYS[e.option]
    code = "invalid_value"
    if e.problem == "hybrid_only":
        mode = metadata.get(MODE_KEY) or Job.Mode.LIVE.value
        message = (
            f"'metadata.{key}' applies to hybrid mode only, and this batch's mode is {mode!r}: "
            f"set 'metadata.{MODE_KEY}' to 'hybrid' or leave the deadline out."
        )
    elif e.problem == "missing":
        message = (
            f"Hybrid mode needs 'metadata.{key}': the time by which every request must be answered, "
            "as an ISO 8601 time (UTC unless it has an offset) or Unix seconds."
        )
        code = "missing_required_parameter"
    elif e.problem == "passed":
        message = (
            f"'metadata.{key}' is {e.value:%Y-%m-%d %H:%M:%S} UTC, which has passed: "
            "a hybrid deadline must be in the future."
        )
    else:
        message = f"Invalid value for 'metadata.{key}': {e.value!r}. {e}"
    return ApiError(400, message, param=f"metadata.{key}", code=code)


def _create(request: ApiRequest) -> JsonResponse:
    body = json_body(request)
    input_file_id = _required(body, "input_file_id")
    url = _required(body, "endpoint")
    if url not in SUPPORTED_URLS:
        raise ApiError(
            400,
            f"Invalid value for 'endpoint': {url!r}. Supported values are: {', '.join(SUPPORTED_URLS)}.",
            param="endpoint",
            code="invalid_value",
        )
    if _required(body, "completion_window") != COMPLETION_WINDOW:
        raise ApiError(
            400,
            "Invalid value for 'completion_window': only '24h' is supported.",
            param="completion_window",
            code="invalid_value",
        )
    metadata = _metadata(body.get("metadata"))
    endpoint = _upstream(metadata)
    options = _run_options(request, metadata)
    file = get_file(request, input_file_id, param="input_file_id")
    if file.purpose != File.BATCH:
        raise ApiError(
            400,
            f"The file {input_file_id} has purpose '{file.purpose}'; a batch needs a 'batch' file.",
            param="input_file_id",
            code="invalid_value",
        )
    if not storage.exists(file.path):
        raise ApiError(
            400, f"The content of {input_file_id} is no longer stored; upload it again.", param="input_file_id"
        )

    # Validation reads the whole file (about 30 s for a million lines): a worker does it (validate_batch),
    # and a file with errors gives a batch that fails then, with every error and its line. A small file is
    # checked here at once (5,000 lines, 2 MB, take ~0.2 s): a worker's turn would only delay its first request.
    inline = file.bytes is not None and file.bytes <= settings.BATCHSITE_INLINE_VALIDATION_BYTES
    name = metadata.get("description") or Path(file.filename).stem or "API batch"
    try:
        Job.check_room(request.user)
    except QuotaExceeded as e:
        raise ApiError(429, str(e), code="too_many_active_batches") from None
    with transaction.atomic():
        job = ingest.create_job_to_validate(
            file.full_path,
            owner=request.user,
            name=name,
            url=url,
            source_name=file.filename,
            endpoint=endpoint,
            options=options,
        )
        batch = Batch.objects.create(job=job, input_file=file, completion_window=COMPLETION_WINDOW)
        if not inline:
            Job.validate_later(job.pk)
    if inline:
        ingest.validate_job(job.pk)
    return JsonResponse(batch_object(request, get_batch(request, batch.public_id)))
