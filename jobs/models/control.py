"""What people do to a job, from the dashboard or /v1: pause, resume, cancel, retry its failed items, duplicate.

Each is safe to call twice and from any state: one the state diagram (Job.TRANSITIONS) does not allow raises
InvalidTransition with a message for the person who clicked. What they do to items goes through the ledger."""

from __future__ import annotations

from typing import TYPE_CHECKING

from django.db import connection, transaction

from jobs import clock, queue
from jobs.models import ledger
from jobs.models.item import Item
from jobs.models.job import INLINE_ROWS, InvalidTransition, Job
from jobs.models.remote import RemoteBatch

if TYPE_CHECKING:
    from django.contrib.auth.models import User  # settings.AUTH_USER_MODEL, as django-stubs resolves it


def pause(job: Job) -> None:
    if job.status == Job.Status.PAUSED:
        return
    if job.status not in (Job.Status.QUEUED, Job.Status.RUNNING):
        raise InvalidTransition(f"A {job.status} job cannot be paused.")
    job.transition(Job.Status.PAUSED, reason="")


def resume(job: Job) -> None:
    if job.status in (Job.Status.QUEUED, Job.Status.RUNNING):
        return
    if job.status != Job.Status.PAUSED:
        raise InvalidTransition(f"A {job.status} job cannot be resumed.")
    with transaction.atomic():
        job.transition(Job.Status.QUEUED, reason="")
        job.start()


def cancel(job: Job) -> None:
    """Cancel pending items now; items in flight finish, then the job is cancelled."""
    if job.status in (Job.Status.CANCELLING, Job.Status.CANCELLED):
        return
    if job.status in (Job.Status.COMPLETED, Job.Status.FAILED):
        raise InvalidTransition(f"A {job.status} job cannot be cancelled.")
    with ledger.open(job.pk) as books:
        job.transition(Job.Status.CANCELLING, reason="")
        books.status = Job.Status.CANCELLING
        books.cancel_pending()
        unsettled = RemoteBatch.objects.filter(job_id=job.pk, collected_at__isnull=True)
        if unsettled.update(next_poll_at=clock.now()):
            # The poller cancels the remote batches at once, keeping what they finished.
            queue.poll_remote_on_commit(job.pk)
    ledger.finalize_if_done(job.pk)
    job.refresh_from_db()


def retry_failed(job: Job, mode: str | None = None) -> int:
    """Failed and expired items back to pending with fresh attempts; returns how many. `mode`: run them live or
    at the Batch API this time (the job's mode changes)."""
    with ledger.open(job.pk) as books:
        # The job's status as of its lock: a slice may have just completed the job.
        if books.status is None:
            raise InvalidTransition("This job was deleted.")
        job.status = books.status
        if job.status == Job.Status.CANCELLING:
            raise InvalidTransition("Wait until the job is cancelled, then retry its failed items.")
        n = books.reopen_failed()
        if not n:
            raise InvalidTransition("This job has no failed items to retry.")
        if job.status in Job.FINISHED:
            Job.check_room(job.owner)  # it runs again: in flight once more
        if mode and mode != job.mode:
            if mode not in (Job.Mode.LIVE, Job.Mode.REMOTE):
                raise InvalidTransition("Failed items are retried live or at the Batch API.")
            if job.status not in Job.FINISHED:
                raise InvalidTransition("The mode of a retry can change only once the job has finished.")
            # A hybrid retry starts remotely again, with a new switch plan.
            job.mode, job.switched_at, job.switch_at = mode, None, None
            Job.objects.filter(pk=job.pk).update(mode=mode, switched_at=None, switch_at=None)
        if job.status in Job.FINISHED:
            job.transition(Job.Status.QUEUED, reason="", finished_at=None)
            job.start()
        # A queued or running job's slices take the items up (a slice never ends its chain while items are
        # pending), a paused job's on resume: more slices would only add chains.
    return n


def retry_later(job: Job, mode: str | None = None) -> int:
    """retry_failed, by a worker when there are more than INLINE_ROWS items to queue again (updating a million
    rows would hold the request and SQLite's write lock); returns how many will be."""
    n = job.n_failed + job.n_expired
    if n <= INLINE_ROWS:
        return retry_failed(job, mode)
    if job.status == Job.Status.CANCELLING:
        raise InvalidTransition("Wait until the job is cancelled, then retry its failed items.")
    if job.status in Job.FINISHED:
        Job.check_room(job.owner)
    queue.retry_failed_on_commit(job.pk, mode)
    return n


COPIED = (
    "url",
    "model",
    "mode",
    "deadline",
    "endpoint",
    "source_name",
    "source_format",
    "source_file",
    "columns",
    "template",
    "metadata",
    "max_attempts",
    "output_retries",
    "use_cache",
    "notify",
    "cost_cap",
)


def duplicate(job: Job, owner: User) -> Job:
    """A new job with the same requests, owned by `owner`, started. A big one (over INLINE_ROWS requests) is made
    `validating` and a worker reads its source file again to make its items, as a big upload is: a million-row
    copy inside the request would hold SQLite's write lock (and a web thread) for many seconds."""
    if job.status == Job.Status.VALIDATING:
        raise InvalidTransition("Its file is still being checked: duplicate it once it has its requests.")
    Job.check_room(owner)
    copied = {f: getattr(job, f) for f in COPIED}
    name = f"Copy of {job.name}"[:200]
    if job.total > INLINE_ROWS:
        with transaction.atomic():
            copy = Job.objects.create(owner=owner, name=name, status=Job.Status.VALIDATING, **copied)
            Job.validate_later(copy.pk)
        return copy
    with transaction.atomic():
        # Its books open with every item pending, as ingest's do.
        copy = Job.objects.create(
            owner=owner,
            name=name,
            n_pending=job.total,
            total=job.total,
            est_input_tokens=job.est_input_tokens,
            **copied,
        )
        table, quote = Item._meta.db_table, connection.ops.quote_name
        columns_copied = ["line", "custom_id", "body", "input_row", "est_tokens"]
        defaults = Item.column_defaults(["job_id", *columns_copied])
        columns = ", ".join(quote(c) for c in ["job_id", *columns_copied, *defaults])
        placeholders = ", ".join(["%s"] * len(defaults))
        with connection.cursor() as cursor:
            cursor.execute(
                f"INSERT INTO {table} ({columns}) SELECT %s, {', '.join(quote(c) for c in columns_copied)}, "
                f"{placeholders} FROM {table} WHERE job_id = %s ORDER BY line",
                [copy.pk, *defaults.values(), job.pk],
            )
        copy.start()
    return copy
