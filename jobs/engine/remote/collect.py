"""Collection: once a batch is final, its output and error files are streamed line by line and joined to the
chunk's items by custom_id, through the ledger (only items the chunk still holds change, so collecting twice
changes nothing); what the files do not mention is settled by the batch's final status (finish)."""

from __future__ import annotations

import json
import logging
from typing import Any

import openai
from django.conf import settings
from django.db.models import Q

from jobs.engine import schemacheck, wire
from jobs.engine.remote import batchapi, budgets, claims
from jobs.engine.remote.claims import LONG_CLAIM_SECONDS
from jobs.engine.remote.rounds import Round
from jobs.engine.upstream import QUOTA_CODES, one_line, usage_of
from jobs.models import Item, Job, RemoteBatch, ledger
from jobs.models.outcome import Result

log = logging.getLogger(__name__)

RB = RemoteBatch.Status
JOIN_LINES = 1000  # result lines joined per transaction
JOIN_BYTES = 32 * 1024 * 1024  # or fewer, when they hold this much text


def error_entry(message: str) -> dict[str, Any]:
    """An entry of a chunk's errors, in the shape of a batch's errors.data."""
    return {"code": "batch_failed", "line": None, "message": message[:2000]}


def collect(rnd: Round, chunk: RemoteBatch, client: openai.OpenAI) -> int:
    """Join the final chunk's result files, then settle the rest; returns the items handed back to pending."""
    reported = (chunk.n_completed, chunk.n_failed)  # the chunk table shows them again once it is collected
    # The chunk's latest request_counts count as progress until its lines are joined: each join moves them from
    # the remote counts to the items' own, so progress never dips (and never counts a line twice).
    ledger.show_remote_counts(rnd.job.pk)
    released = 0
    for file_id in (chunk.output_file_id, chunk.error_file_id):
        if file_id:
            released += join_file(rnd, chunk, client, file_id)
            claims.renew(chunk)  # joined: a short claim again
    released += finish(rnd, chunk, client, chunk.status, errors=chunk.errors)
    if chunk.batch_id:
        # The endpoint's own counts for the chunk table: those read before a collection that was cut short and
        # resumed had already been lowered by the lines it joined.
        reported = batchapi.request_counts(client, chunk.batch_id) or reported
    chunk.n_completed, chunk.n_failed = reported
    RemoteBatch.objects.filter(pk=chunk.pk).update(n_completed=chunk.n_completed, n_failed=chunk.n_failed)
    return released


def join_file(rnd: Round, chunk: RemoteBatch, client: openai.OpenAI, file_id: str) -> int:
    """Stream a result file and join its lines to the chunk's items, JOIN_LINES per transaction."""
    claims.renew(chunk, LONG_CLAIM_SECONDS)
    released = 0
    with batchapi.result_lines(client, file_id) as lines:
        records: list[dict[str, Any]] = []
        held = 0  # bytes of the lines in `records`
        for raw in lines:
            if isinstance(raw, wire.LongLine):
                record = too_large(raw)
                if record is None:
                    log.warning("job %s chunk %s: a result line too long to read names no request", *_who(chunk))
                    continue
                records.append(record)
            elif not raw.strip():
                continue
            else:
                try:
                    record = json.loads(raw)
                except (ValueError, RecursionError):
                    log.warning("job %s chunk %s: a result line is not JSON", *_who(chunk))
                    continue
                if isinstance(record, dict) and isinstance(record.get("custom_id"), str):
                    records.append(record)
                    held += len(raw)
            if len(records) >= JOIN_LINES or held > JOIN_BYTES:  # a thousand small lines, or fewer big ones
                released += join(rnd, chunk, records)
                records, held = [], 0
        released += join(rnd, chunk, records)
    return released


def _who(chunk: RemoteBatch) -> tuple[int, int]:
    return chunk.job_id, chunk.number


def too_large(line: wire.LongLine) -> dict[str, Any] | None:
    """A result line over the limit, as an error line for the request its head names (if it names one)."""
    custom_id = line.custom_id()
    if custom_id is None:
        return None
    message = str(wire.AnswerTooLarge(wire.max_answer_bytes()))
    return {"custom_id": custom_id, "response": None, "error": {"code": "answer_too_large", "message": message}}


def join(rnd: Round, chunk: RemoteBatch, records: list[dict[str, Any]]) -> int:
    """Result lines to the chunk's items, in one transaction that also renews the claim (a collection of many
    lines outlasts any claim); returns the items handed back to pending."""
    if not records:
        return 0
    wants = structured(rnd, chunk, records)
    results = []
    for record in records:
        fields = result_fields(rnd, chunk, record, wants.get(record["custom_id"]))
        results.append(Result(record["custom_id"], fields, transient(fields)))
    job = rnd.job
    with ledger.open(job.pk) as books:
        changed = books.join(chunk, results, max_attempts=job.max_attempts, hybrid=job.mode == Job.Mode.HYBRID)
        # The lines joined leave the chunk's remote counts (ledger.show_remote_counts), in the same transaction as
        # they reach the items' own: answers its `completed`, the rest its `failed`, each spilling over to the
        # other (the endpoint counts an answer that breaks its schema as completed, say).
        succeeded = changed["n_succeeded"]
        others = sum(changed.values()) - succeeded
        completed, failed = min(chunk.n_completed, succeeded), min(chunk.n_failed, others)
        rest = succeeded + others - completed - failed
        spill = min(chunk.n_completed - completed, rest)
        completed, failed = completed + spill, failed + min(chunk.n_failed - failed, rest - spill)
        books.count(remote_completed=-completed, remote_failed=-failed)
        left = {"n_completed": chunk.n_completed - completed, "n_failed": chunk.n_failed - failed}
        claims.renew(chunk, LONG_CLAIM_SECONDS, **left)  # LostClaim: another poller collects it; all undone
    chunk.n_completed, chunk.n_failed = left["n_completed"], left["n_failed"]
    return books.released


def structured(rnd: Round, chunk: RemoteBatch, records: list[dict[str, Any]]) -> dict[str, schemacheck.Wanted]:
    """custom_id -> the structured output its request asks for, for the records' requests that ask for one (one
    query; bodies without a JSON response format are not even read)."""
    ids = [r["custom_id"] for r in records if isinstance(r.get("custom_id"), str)]
    asking = Q(body__contains='"json_schema"') | Q(body__contains='"json_object"')
    rows = Item.objects.filter(asking, job_id=rnd.job.pk, remote_batch=chunk, custom_id__in=ids)
    wants = {}
    for custom_id, body in rows.values_list("custom_id", "body"):
        want = schemacheck.wanted(rnd.job.url, json.loads(body))
        if want is not None:
            wants[custom_id] = want
    return wants


def result_fields(
    rnd: Round, chunk: RemoteBatch, record: dict[str, Any], want: schemacheck.Wanted | None = None
) -> dict[str, Any]:
    """An output or error line as the item's result. A 4xx or 5xx `response.status_code` is a failure even when
    `error` is null (OpenAI puts such answers in the output file); a 5xx or 429 one is sent again while it has
    attempts left (transient). An answer that is not the JSON its request asked for fails as invalid_output,
    paid for (the Batch API cannot be asked again here: "retry failed" sends it again)."""
    response = record.get("response") if isinstance(record.get("response"), dict) else None
    error = record.get("error") if isinstance(record.get("error"), dict) else None
    status_code = response.get("status_code") if response else None
    body = response.get("body") if response else None
    request_id = str((response or {}).get("request_id") or "")[:200]
    text = one_line(json.dumps(body, ensure_ascii=False)) if body is not None else ""
    fields: dict[str, Any] = {"attempts": 1, "http_status": status_code if isinstance(status_code, int) else None}
    fields.update(request_id=request_id, response=text.replace("\x00", "\ufffd"))
    url = rnd.job.url
    if error is None and isinstance(status_code, int) and 200 <= status_code < 300 and isinstance(body, dict):
        prompt, completion, cached = usage_of(url, body)
        model = body["model"] if isinstance(body.get("model"), str) else chunk.model
        fields.update(
            status=Item.Status.SUCCEEDED,
            error_code="",
            error_message="",
            prompt_tokens=prompt,
            completion_tokens=completion,
            cached_tokens=cached,
            cost=rnd.prices().cost(model, prompt, completion, cached, discount=rnd.discount),
        )
        why = schemacheck.problem(want, url, body) if want is not None else None
        if why is not None:
            fields.update(status=Item.Status.FAILED, error_code=schemacheck.INVALID_OUTPUT, error_message=why)
        return fields
    detail = error or ((body or {}).get("error") if isinstance(body, dict) else None) or {}
    if not isinstance(detail, dict):
        detail = {"message": str(detail)}
    code = str(detail.get("code") or (f"http_{status_code}" if status_code else "batch_error"))[:100]
    message = str(detail.get("message") or "The batch reported this request as failed.")[:2000]
    expired = code == "batch_expired"
    fields.update(status=Item.Status.EXPIRED if expired else Item.Status.FAILED, error_code=code, error_message=message)
    return fields


def transient(fields: dict[str, Any]) -> bool:
    """Whether a result line (as result_fields reads it) failed through no fault of its request: a server error
    or a rate limit, which another send may well not meet (OpenAI's error files routinely hold 500s and 503s).
    A spent quota is not worth another send."""
    status, code = fields["http_status"], fields.get("error_code")
    if fields["status"] != Item.Status.FAILED or code in QUOTA_CODES:
        return False
    if status is None:
        return code in ("server_error", "rate_limit_exceeded")
    return bool(status == 429 or status >= 500)


def finish(
    rnd: Round,
    chunk: RemoteBatch,
    client: openai.OpenAI | None,
    status: str,
    errors: list[dict[str, Any]] | None = None,
    gone: bool = False,
) -> int:
    """Settle the items no result line mentioned, by the batch's final status, and mark the chunk collected;
    returns the items handed back to pending. `gone`: the endpoint lost track of the batch (its requests may
    have run there, and would be paid twice if sent again). `client`: the chunk's, to delete its files."""
    errors = errors or []
    # Before the job's lock: a refusal's lesson reads every request of the chunk.
    wait = (
        status == RB.FAILED
        and not gone
        and budgets.refused_for_tokens(errors)
        and budgets.wait_for_room(rnd.endpoint, chunk, errors)
    )
    job = rnd.job
    with ledger.open(job.pk) as books:
        switched = Job.objects.filter(pk=job.pk, switched_at__isnull=False).exists()
        # Requests the Batch API did not answer and that are still wanted go back to pending: live slices take
        # them (a switched hybrid job), or a new chunk does.
        again = (
            books.status != Job.Status.CANCELLING
            and not gone
            and (switched or wait or (status == RB.EXPIRED and job.mode == Job.Mode.HYBRID))
        )
        if gone:
            message = str(errors[0].get("message") if errors else "") or "The endpoint lost the batch."
            books.settle_rest(chunk, Item.Status.FAILED, error_code="batch_gone", error_message=message[:2000])
        elif again:
            books.settle_rest(chunk, Item.Status.PENDING)
        elif status == RB.CANCELLED or books.status == Job.Status.CANCELLING:
            books.settle_rest(chunk, Item.Status.CANCELLED)
        elif status == RB.EXPIRED:
            message = "This request could not be executed before the completion window expired."
            books.settle_rest(chunk, Item.Status.EXPIRED, error_code="batch_expired", error_message=message)
        elif status == RB.FAILED:
            _fail_by_line(books, chunk, errors)
        else:
            message = "The batch ended without a result for this request."
            books.settle_rest(chunk, Item.Status.FAILED, error_code="missing_result", error_message=message)
        RemoteBatch.objects.filter(pk=chunk.pk).update(status=status, collected_at=books.now, errors=errors)
        ledger.show_remote_counts(job.pk)  # what is left of its request_counts no longer counts: all settled
    chunk.collected_at = books.now
    log.info("job %s chunk %s: %s, collected", job.pk, chunk.number, status)
    if settings.BATCHSITE_REMOTE_DELETE_FILES and not gone and client is not None:
        # Best effort: a file left behind costs the endpoint's storage, not a result.
        files = [chunk.input_file_id, chunk.output_file_id, chunk.error_file_id]
        for file_id, e in batchapi.delete_files(client, files):
            log.info("job %s chunk %s: file %s not deleted at the endpoint: %s", job.pk, chunk.number, file_id, e)
    return books.released


def _fail_by_line(books: ledger.Books, chunk: RemoteBatch, errors: list[dict[str, Any]]) -> None:
    """A batch that failed validation: each item fails with the error naming its line of the chunk's file, or
    with the batch's general error (a token limit, say)."""

    def said(error: dict[str, Any]) -> dict[str, Any]:
        if not error.get("line"):
            return error
        return {
            **error,
            "message": f"Line {error['line']} of batch {chunk.batch_id or chunk.number}: {error.get('message') or ''}",
        }

    general = [e for e in errors if not e.get("line")]
    fallback = (
        general[0] if general else (errors[0] if errors else {"code": "batch_failed", "message": "The batch failed."})
    )
    by_line = {e["line"]: said(e) for e in errors if isinstance(e.get("line"), int)}
    books.fail_by_line(chunk, by_line, said(fallback))
