"""A job whose file is still to be checked (an API batch: Job.Status.VALIDATING): the check and the items,
done by a worker (jobs.engine.tasks.validate_batch) or, for a small file, in the request itself.

Also the review page's check of a big upload (check_in_background), by a worker for the same reason."""

import logging
from datetime import timedelta
from hashlib import blake2b
from pathlib import Path

from django.conf import settings
from django.core.cache import cache
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from jobs import queue, storage
from jobs.ingest.create import add_items
from jobs.ingest.lines import LineError
from jobs.ingest.plan import Plan, check_key, checked, record, remember, remembered, validate
from jobs.ingest.template import Template
from jobs.models import Job

log = logging.getLogger(__name__)

# A validation shows life (Job.heartbeat_at) every PROGRESS_EVERY requests it reads, and holds the job's
# lock while it writes the items: one quiet this long, and not enqueued again this long ago, is lost.
VALIDATION_QUIET = timedelta(seconds=60)


class _NoLongerValidating(Exception):
    """Cancelled (or deleted) while its file was being read: the rest is not worth reading."""


def validate_job(job_id: int) -> dict:
    """A validating job's file checked off the request path (Job.validate_later): its items created and the
    job started, or the job failed with the file's line errors, in one transaction with the job's lock.

    Safe to enqueue twice: one run at a time claims the job (compare-and-set on its heartbeat), and only a
    job still validating and without items is written. A cancel meanwhile leaves the job as it is."""
    now = timezone.now()
    validating = Job.objects.filter(pk=job_id, status=Job.Status.VALIDATING)
    quiet = Q(heartbeat_at__isnull=True) | Q(heartbeat_at__lt=now - VALIDATION_QUIET)
    if not validating.filter(quiet).update(heartbeat_at=now):
        return {"job": job_id, "skipped": "not validating, or another worker validates it"}
    job = Job.objects.get(pk=job_id)

    path = settings.DATA_DIR / job.source_file
    lines = 0

    def alive(count: int) -> None:
        if not validating.update(heartbeat_at=timezone.now()):
            raise _NoLongerValidating
        _show_progress(job_id, 0.5 * min(count / lines, 1.0) if lines else 0.0)

    try:
        path = storage.local_path(job.source_file)  # fetched from the shared bucket if another node took it
        lines = _count_lines(path)  # ~0.1 s for 200 MB: a percentage for the job page
        _show_progress(job_id, 0.0)
        template = Template.from_dict(job.template) if job.template else None
        plan = validate(
            path,
            format=job.source_format,
            template=template,
            expected_url=job.url,
            source_name=job.source_name,
            progress=alive,
        )
    except _NoLongerValidating:
        return {"job": job_id, "skipped": "cancelled while validating"}
    except FileNotFoundError:  # kept while a job names it as its source, unless removed by hand
        missing = LineError(None, "file_not_found", "The input file is no longer stored; upload it again.")
        plan = Plan(path=path, format=job.source_format, errors=[missing], error_count=1)
    with transaction.atomic():
        if Job.lock(job_id) != Job.Status.VALIDATING or job.items.exists():
            return {"job": job_id, "skipped": "cancelled or validated meanwhile"}
        if plan.ok:
            # The second half of the work: reading the file again and inserting its items.
            add_items(job, plan, progress=lambda n: _show_progress(job_id, 0.5 + 0.5 * n / max(plan.count, 1)))
            job.transition(Job.Status.QUEUED, heartbeat_at=None)  # the heartbeat is the slices' from now on
            job.start()
        else:
            job.transition(
                Job.Status.FAILED, reason=plan.failure(), errors=plan.error_list(), model=plan.model, heartbeat_at=None
            )
    cache.delete(_progress_key(job_id))
    return {"job": job_id, "requests": plan.count, "errors": plan.error_count, "status": job.status}


def validation_progress(job_id: int) -> float | None:
    """How far the check of a validating job's file has got, 0 to 1; None before a worker has begun it."""
    return cache.get(_progress_key(job_id))


def _progress_key(job_id: int) -> str:
    return f"batchsite-validation-{job_id}"


def _show_progress(job_id: int, fraction: float) -> None:
    # The cache, not the job's row: the items go in within a transaction that holds the job's lock.
    cache.set(_progress_key(job_id), round(fraction, 3), timeout=int(VALIDATION_QUIET.total_seconds()) * 10)


# A worker checking an upload says how far it has got about every half a second (PROGRESS_EVERY requests);
# quiet this long, it is lost (killed), and the next look at the page enqueues the check again.
CHECK_QUIET = VALIDATION_QUIET
CHECK_KEPT = 10 * int(VALIDATION_QUIET.total_seconds())  # waiting in the queue, or the outcome


def check_in_background(
    name: str, path: Path, *, format: str, template: Template | None = None, source_name: str = ""
) -> tuple[Plan | None, dict]:
    """The review page's check of an upload too big to read in a request: (its result, {}) once a worker
    has made it, else (None, how it goes): {"lines": read, "total": lines} ("total" None while it waits
    for a worker) or {"failed": why}. Enqueues the check when no worker has it, once however many look."""
    plan = remembered(path, format=format, template=template, source_name=source_name)
    if plan is not None:
        return plan, {}
    key = _check_state_key(name, format, template, source_name)
    state = cache.get(key)
    if state is None and cache.add(key, {"lines": 0, "total": None}, timeout=CHECK_KEPT):
        queue.check_upload(name, format, template.as_dict() if template else None, source_name, key)
    state = state or cache.get(key) or {"lines": 0, "total": None}
    if "done" in state:  # checked by a worker on another node: its record, kept here too
        remember(path, state["done"])
        plan = remembered(path, format=format, template=template, source_name=source_name)
        return (plan, {}) if plan else (None, {"failed": "The result of the check could not be stored."})
    return None, state


def check_upload(name: str, format: str, template: dict | None, source_name: str) -> dict:
    """The task of check_in_background: ingest.checked() on a worker, its progress and outcome in the cache."""
    key = _check_state_key(name, format, Template.from_dict(template) if template else None, source_name)
    try:
        path = storage.local_path(name)  # fetched from the shared bucket if another node took it
        total = _count_lines(path)

        def show(lines: int) -> None:
            cache.set(key, {"lines": lines, "total": total}, timeout=int(CHECK_QUIET.total_seconds()))

        show(0)
        tmpl = Template.from_dict(template) if template else None
        plan = checked(path, format=format, template=tmpl, source_name=source_name, progress=show)
    except Exception as e:  # the page says so rather than waiting for ever
        log.exception("checking upload %s failed", name)
        if isinstance(e, FileNotFoundError):
            failed = "The file is no longer stored; upload it again."
        else:
            failed = f"The check stopped with an error ({type(e).__name__}); upload the file again or try later."
        cache.set(key, {"failed": failed}, timeout=CHECK_KEPT)
        return {"upload": name, "failed": failed}
    cache.set(key, {"done": record(plan, source_name)}, timeout=CHECK_KEPT)
    return {"upload": name, "requests": plan.count, "errors": plan.error_count}


def _check_state_key(name: str, format: str, template: Template | None, source_name: str) -> str:
    upload = blake2b(name.encode(), digest_size=16).hexdigest()
    return f"batchsite-check-{upload}-{check_key(format, template, source_name)}"


def _count_lines(path, chunk: int = 1024 * 1024) -> int:
    count, last = 0, b"\n"
    with open(path, "rb") as f:
        while block := f.read(chunk):
            count += block.count(b"\n")
            last = block[-1:]
    return count + (last != b"\n")
