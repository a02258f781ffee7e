"""The Batch API conversation: OpenAI's Files and Batches calls, and no database.

Each call turns what the SDK raises into a CallFailed carrying a verdict, read with the knowledge of which
call it was: a 404 to files.create means the endpoint has no Batch API, to batches.create that it lost the
uploaded file, to a lookup that it does not know the batch (yet: a lookup's 404 is no proof). The steps
(steps.py) act on the verdict, never on the SDK's exceptions."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Any, TypeVar

import httpx2
import openai
from django.conf import settings
from openai.types import Batch, FileObject

from jobs import egress
from jobs.engine import upstream, wire
from jobs.models import Endpoint

log = logging.getLogger(__name__)

# Calls that only look or decide (retrieve, cancel, create, list) get a short timeout, so that a poller killed
# while it holds a chunk for one of them holds it for a minute and a half, not the 12 minutes an upload may
# need (claims.py). An upload or a result file has the request timeout.
CONTROL_TIMEOUT = 30.0
LIST_PAGES = 20  # pages of the endpoint's batches (or files) searched when recovering a chunk
NO_BATCH_API = (404, 405, 501)  # answers to files.create / batches.create from a server without them
# "The input file ... is in 'pending' state. Only files with status 'Processed' are accepted" (Azure OpenAI).
FILE_NOT_READY = re.compile(r"'?pending'? state|not (?:yet )?processed|only files with status", re.IGNORECASE)

# Verdicts
AGAIN = "again"  # a flaky network, a 5xx, a 429: look again later, backing off
KEY_REFUSED = "key_refused"  # 401, 403: the job pauses until the key is fixed
REDIRECTED = "redirected"  # a 3xx: not followed; the job pauses
ADDRESS_REFUSED = "address_refused"  # the endpoint's name resolves to an address egress refuses; the job pauses
NO_BATCH_API_HERE = "no_batch_api"  # files.create answered 404/405/501
FILE_LOST = "file_lost"  # batches.create answered 404: the uploaded file is gone (or no Batches API)
FILE_NOT_READY_YET = "file_not_ready"  # batches.create answered 400 for a file still being processed (Azure)
REFUSED = "refused"  # files.create or batches.create refused the file or the batch itself (400, 413, 422)
NOT_FOUND = "not_found"  # a lookup answered 404

UPLOAD, CREATE, LOOKUP = "files.create", "batches.create", "lookup"


@dataclass
class CallFailed(Exception):
    verdict: str
    text: str  # for people, and the chunk's last_error: "404: No such file", "Could not reach the endpoint: ..."
    status: int | None = None
    why: str = ""  # KEY_REFUSED, REDIRECTED, ADDRESS_REFUSED: the pause's reason

    def __str__(self) -> str:
        return self.text


def verdict(call: str, error: Exception) -> CallFailed:
    """What `error`, raised by `call` (UPLOAD, CREATE or LOOKUP), means for the chunk."""
    if isinstance(error, openai.APIStatusError):
        status, text = error.status_code, f"{error.status_code}: {error.message}"
        if status in (401, 403):
            why = f"The endpoint refused the key ({status}). Fix the key on the Endpoints page, then resume."
            return CallFailed(KEY_REFUSED, text, status, why)
        if 300 <= status < 400:
            why = upstream.redirect_refused(status, error.response.headers) + " Then resume the job."
            return CallFailed(REDIRECTED, text, status, why)
        if call == UPLOAD and status in NO_BATCH_API:
            return CallFailed(NO_BATCH_API_HERE, text, status)
        if call == CREATE and status == 404:
            return CallFailed(FILE_LOST, text, status)
        if call == CREATE and status == 400 and FILE_NOT_READY.search(text[:2000]):
            return CallFailed(FILE_NOT_READY_YET, text, status)
        if call in (UPLOAD, CREATE) and status in (400, 413, 422):
            return CallFailed(REFUSED, text, status)
        return CallFailed(NOT_FOUND if status == 404 else AGAIN, text, status)
    text = f"Could not reach the endpoint: {error}"
    if refused := egress.refusal(error):
        why = f"The endpoint's address is refused: {refused} Fix it on the Endpoints page, then resume."
        return CallFailed(ADDRESS_REFUSED, text, why=why)
    return CallFailed(AGAIN, text)


# What a call raises when the endpoint answers badly or not at all. Anything else (an answer of a shape nobody
# expected) is not the endpoint's word on the call, and reaches the step as it is.
SDK_ERRORS = (openai.APIStatusError, openai.APIConnectionError, httpx2.HTTPError)
BEST_EFFORT = (openai.APIError, httpx2.HTTPError)


def client_for(endpoint: Endpoint) -> openai.OpenAI:
    # No SDK retries: a create retried after a timeout could make a second batch. Failed calls are tried
    # again on a later round, after looking for what the first call may have made.
    timeout = httpx2.Timeout(settings.BATCHSITE_REQUEST_TIMEOUT, connect=15.0)
    return openai.OpenAI(
        api_key=endpoint.api_key or "none",
        base_url=endpoint.base_url,
        max_retries=0,
        timeout=timeout,
        # The SDK's clients follow redirects: a 3xx pauses the job instead (verdict REDIRECTED). Each connection
        # goes only to an address egress allows, checked as it is made (DNS rebinding).
        http_client=openai.DefaultHttpxClient(
            timeout=timeout,
            follow_redirects=False,
            transport=egress.checked_transport(),  # which also reads no answer past a bound
            trust_env=False,
        ),
    )


def upload(client: openai.OpenAI, filename: str, file: IO[bytes]) -> str:
    """The chunk's input file (a batch JSONL); returns its id."""
    try:
        return client.files.create(file=(filename, file, "application/jsonl"), purpose="batch").id
    except SDK_ERRORS as e:
        raise verdict(UPLOAD, e) from e


def create(client: openai.OpenAI, input_file_id: str, url: str, metadata: dict[str, str]) -> Batch:
    try:
        return client.batches.create(
            timeout=CONTROL_TIMEOUT,
            input_file_id=input_file_id,
            endpoint=url,  # type: ignore[arg-type]
            completion_window="24h",
            metadata=metadata,
        )
    except SDK_ERRORS as e:
        raise verdict(CREATE, e) from e


def retrieve(client: openai.OpenAI, batch_id: str) -> Batch:
    try:
        return client.batches.retrieve(batch_id, timeout=CONTROL_TIMEOUT)
    except SDK_ERRORS as e:
        raise verdict(LOOKUP, e) from e


def cancel(client: openai.OpenAI, batch_id: str) -> Batch | None:
    """The batch, cancelling; None if it ended meanwhile (a batch that finished cannot be cancelled: 400, 409)."""
    try:
        return client.batches.cancel(batch_id, timeout=CONTROL_TIMEOUT)
    except openai.APIStatusError as e:
        if e.status_code in (400, 409):
            return None
        raise verdict(LOOKUP, e) from e
    except SDK_ERRORS as e:
        raise verdict(LOOKUP, e) from e


def find_upload(client: openai.OpenAI, filename: str, since: float, on_page: Callable[[], None]) -> str | None:
    """The file an interrupted upload may have made, found by its name among the endpoint's batch files, newest
    first, back to `since` (unix time); `on_page` is called after each page."""
    files = client.files.list(purpose="batch", order="desc", limit=1000, timeout=CONTROL_TIMEOUT)
    found = _newest_first(files, 1000, since, on_page, lambda f: f.filename == filename)
    return found.id if found is not None else None


def find_batch(
    client: openai.OpenAI, key: str, input_file_id: str, since: float, on_page: Callable[[], None]
) -> Batch | None:
    """The batch an interrupted create may have made: by the chunk's key in its metadata, or by its input file
    (a proxy may drop metadata), both the chunk's own; newest first, back to `since`."""

    def mine(batch: Batch) -> bool:
        by_key = (batch.metadata or {}).get("batchsite_chunk") == key
        return by_key or bool(input_file_id and batch.input_file_id == input_file_id)

    return _newest_first(client.batches.list(limit=100, timeout=CONTROL_TIMEOUT), 100, since, on_page, mine)


T = TypeVar("T", FileObject, Batch)


def _newest_first(
    listing: Iterable[T], page: int, since: float, on_page: Callable[[], None], wanted: Callable[[T], bool]
) -> T | None:
    """The first of a listing (newest first, `page` a page) that is `wanted`, searched up to LIST_PAGES pages and
    back to `since` (unix time); `on_page` after each page (the caller renews its claim)."""
    seen = 0
    try:
        for item in listing:
            if wanted(item):
                return item
            seen += 1
            if seen % page == 0:
                on_page()
            if seen >= LIST_PAGES * page or item.created_at < since:
                break
    except SDK_ERRORS as e:
        raise verdict(LOOKUP, e) from e
    return None


@contextmanager
def result_lines(client: openai.OpenAI, file_id: str) -> Iterator[Iterator[bytes | wire.LongLine]]:
    """A result file's lines as they stream in, each read up to BATCHSITE_MAX_ANSWER_MB (a longer one comes as a
    wire.LongLine, unread)."""
    try:
        with client.files.with_streaming_response.content(file_id) as response:
            yield wire.bounded_lines(response.iter_bytes(), wire.max_answer_bytes())
    except SDK_ERRORS as e:
        raise verdict(LOOKUP, e) from e


def request_counts(client: openai.OpenAI, batch_id: str) -> tuple[int, int] | None:
    """The batch's (completed, failed) as the endpoint counts them now, or None if it cannot say."""
    try:
        counts = client.batches.retrieve(batch_id, timeout=CONTROL_TIMEOUT).request_counts
    except BEST_EFFORT:
        return None
    return (counts.completed, counts.failed) if counts is not None else None


def delete_files(client: openai.OpenAI, file_ids: list[str]) -> list[tuple[str, Exception]]:
    """Delete files at the endpoint, best effort; returns those that could not be, with why."""
    kept: list[tuple[str, Exception]] = []
    for file_id in dict.fromkeys(f for f in file_ids if f):
        try:
            client.files.delete(file_id, timeout=CONTROL_TIMEOUT)
        except BEST_EFFORT as e:
            kept.append((file_id, e))
    return kept


def errors_of(batch: Batch) -> list[dict[str, Any]]:
    return [e.model_dump() for e in batch.errors.data or []] if batch.errors else []
