import json
import logging
import time
from collections.abc import Callable
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx2
from django.conf import settings
from django.contrib import messages
from django.contrib.auth import get_user_model
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.db import connection, transaction
from django.db.models import Count, Sum
from django.db.models.functions import TruncDate, TruncMonth
from django.http import (
    Http404,
    HttpResponse,
    HttpResponseBadRequest,
    StreamingHttpResponse,
)
from django.shortcuts import get_object_or_404, redirect, render
from django.template.loader import render_to_string
from django.utils import timezone
from django.views.decorators.debug import sensitive_post_parameters
from django.views.decorators.http import require_GET, require_http_methods, require_POST
from django_htmx.http import HttpResponseClientRedirect, HttpResponseStopPolling

from jobs import egress, export, ingest, presets, storage, timeline
from jobs.models import (
    INLINE_ROWS,
    CachedAnswer,
    Endpoint,
    InvalidTransition,
    Item,
    Job,
    NotificationSettings,
    QuotaExceeded,
    RemoteBatch,
    SpendingLimit,
)
from jobs.pricing import estimate
from jobs.web.decorators import staff_required
from jobs.web.forms import CostCapForm, EndpointForm, JobForm, UploadForm
from jobs.web.requests import AuthenticatedHttpRequest

log = logging.getLogger(__name__)

DOWNLOADS = {
    "results": (export.results_jsonl, "application/jsonl", "{name}-results.jsonl"),
    "errors": (export.errors_jsonl, "application/jsonl", "{name}-errors.jsonl"),
    "csv": (export.results_csv, "text/csv", "{name}-results.csv"),
}
JOBS_PER_PAGE = 25
ITEMS_PER_PAGE = 50


def _get_job(request: AuthenticatedHttpRequest, pk: int, write: bool = False) -> Job:
    """The job, if the user may see it (write: change it); 404 or 403 otherwise. Every job view calls this."""
    job = get_object_or_404(Job.objects.select_related("owner", "endpoint"), pk=pk)
    if not job.can_view(request.user):
        raise Http404("No such job.")
    if write and not job.can_control(request.user):
        raise PermissionDenied("Only the job's owner or staff can do that.")
    return job


# Job list


def _filtered_jobs(request: AuthenticatedHttpRequest):
    jobs = Job.objects.select_related("owner").order_by("-created_at", "-id")
    filters = {
        "scope": request.GET.get("scope", "all"),
        "status": request.GET.get("status", ""),
        "model": request.GET.get("model", ""),
        "q": request.GET.get("q", "").strip(),
    }
    if filters["scope"] == "mine":
        jobs = jobs.filter(owner=request.user)
    if filters["status"] in Job.Status.values:
        jobs = jobs.filter(status=filters["status"])
    if filters["model"]:
        jobs = jobs.filter(model=filters["model"])
    if filters["q"]:
        jobs = jobs.filter(name__icontains=filters["q"])
    return jobs, filters


@require_GET
@login_required
def home(request: AuthenticatedHttpRequest) -> HttpResponse:
    jobs, filters = _filtered_jobs(request)
    page = Paginator(jobs, JOBS_PER_PAGE).get_page(request.GET.get("page"))
    active = any(job.status in Job.ACTIVE for job in page)
    context = {
        "page": page,
        "filters": filters,
        "active": active,
        "statuses": Job.Status.choices,
        "models": Job.objects.order_by().values_list("model", flat=True).distinct()[:50],
        "query": request.GET.urlencode(),
    }
    if request.htmx and request.htmx.target == "job-table":
        if not active:
            return HttpResponseStopPolling(render(request, "jobs/_job_table.html", context).content)
        return render(request, "jobs/_job_table.html", context)
    return render(request, "jobs/home.html", context)


# New job: upload -> review (template, errors, preview, estimate) -> launch


def _uploads(request: AuthenticatedHttpRequest) -> dict:
    return request.session.setdefault("uploads", {})


@require_http_methods(["GET", "POST"])
@login_required
def job_new(request: AuthenticatedHttpRequest) -> HttpResponse:
    form = UploadForm(request.POST or None, request.FILES or None)
    if request.method == "POST" and form.is_valid():
        upload = form.cleaned_data["file"]
        path, error = ingest.store_upload(upload.chunks(), upload.name)
        if error:
            form.add_error("file", error.message)
        else:
            assert path is not None  # store_upload gives a path whenever it gives no error
            token = path.parent.name
            fmt = ingest.detect_format(upload.name, path)
            # The name under the data dir, not this node's path: the review may be served by another web node.
            _uploads(request)[token] = {"file": storage.name_of(path), "name": upload.name, "format": fmt}
            request.session.modified = True
            return redirect("job_review", token=token)
    limit = settings.BATCHSITE_MAX_UPLOAD_MB
    return render(request, "jobs/new.html", {"form": form, "max_mb": limit})


def _csv_header(path: Path) -> list[str]:
    """The column names, read the way validation reads them (a tiny template with no placeholders)."""
    plan = ingest.validate(
        path,
        format=Job.Format.CSV,
        template=ingest.Template(model="x", user_prompt="x"),
        limits=ingest.Limits(max_lines=2, max_line_bytes=10**7, max_file_bytes=10**12),
    )
    return plan.columns


@require_http_methods(["GET", "POST"])
@login_required
def job_review(request: AuthenticatedHttpRequest, token: str) -> HttpResponse:
    upload = _uploads(request).get(token)
    if upload is None:
        messages.error(request, "That upload has expired. Please upload the file again.")
        return redirect("job_new")
    fmt = upload["format"]
    try:
        path = storage.local_path(upload.get("file") or storage.name_of(Path(upload["path"])))
        if not path.exists():
            raise FileNotFoundError(path)
    except Exception:  # cleaned up after a day, the data dir reset, or the bucket unreachable
        log.warning("upload %s could not be read", token, exc_info=True)
        _uploads(request).pop(token, None)
        request.session.modified = True
        messages.error(request, f"The upload of {upload['name']} is no longer on the server. Please upload it again.")
        return redirect("job_new")
    if fmt == Job.Format.CSV and "columns" not in upload:  # read once: the file may be huge
        upload["columns"] = _csv_header(path)
        request.session.modified = True
    columns = upload.get("columns", [])
    initial = {
        "name": Path(upload["name"]).stem,
        "endpoint": Endpoint.default(),
        "notify": NotificationSettings.email_default(request.user),
    }
    form = JobForm(request.POST or None, initial=initial, csv_columns=columns)
    plan: ingest.Plan | None = None
    checking: dict = {}  # while a worker checks the file: how far it has got (_check)
    if request.method == "POST" and form.is_valid():
        template = form.template() if fmt == Job.Format.CSV else None
        launch = request.POST.get("action") == "launch"
        if launch and path.stat().st_size > settings.BATCHSITE_INLINE_VALIDATION_BYTES:
            return _launch_later(request, token, upload, path, form, template)
        # Checking shows the remembered result when file and template are unchanged; launching
        # validates afresh, as creating the job needs every request's estimate.
        if launch:
            plan = ingest.validate(path, format=fmt, template=template, source_name=upload["name"])
        else:
            plan, checking = _check(request, upload, path, template)
        if plan and plan.ok and launch:
            endpoint = form.cleaned_data["endpoint"] or Endpoint.default()
            try:
                job = ingest.create_job(
                    plan,
                    owner=request.user,
                    name=form.cleaned_data["name"],
                    endpoint=endpoint,
                    options=form.run_options(),
                )
            except QuotaExceeded as e:
                return _refused_launch(request, str(e))
            job.start()
            _uploads(request).pop(token, None)
            request.session.modified = True
            messages.success(request, f"Job started: {job.total:,} requests.")
            if request.htmx:
                return HttpResponseClientRedirect(job.get_absolute_url())
            return redirect(job)
    elif request.method == "GET" and fmt == Job.Format.JSONL:
        plan, checking = _check(request, upload, path, None)
    endpoint = (form.cleaned_data.get("endpoint") if form.is_bound and form.is_valid() else None) or Endpoint.default()
    context = {
        "form": form,
        "upload": upload,
        "token": token,
        "columns": columns,
        **_check_context(plan, checking, endpoint),
        "presets": presets.load(),
        "is_csv": fmt == Job.Format.CSV,
        "time_zone": timezone.get_current_timezone_name(),
    }
    if request.htmx:
        return render(request, "jobs/_review.html", context)
    return render(request, "jobs/review.html", context)


def _check(request, upload: dict, path: Path, template) -> tuple[ingest.Plan | None, dict]:
    """The review's check of the file: in the request for a small file; a big one (a million lines take half a
    minute) by a worker, while the page polls job_review_check. (result, {}) or (None, how the worker does)."""
    kw = {"format": upload["format"], "template": template, "source_name": upload["name"]}
    if path.stat().st_size <= settings.BATCHSITE_INLINE_VALIDATION_BYTES:
        return ingest.checked(path, **kw), {}
    # The poll is a GET: it finds the template being checked in the session, as it finds the upload.
    upload["checking"] = template.as_dict() if template else None
    request.session.modified = True
    return ingest.check_in_background(upload.get("file") or storage.name_of(path), path, **kw)


def _check_context(plan: ingest.Plan | None, checking: dict, endpoint: Endpoint | None) -> dict:
    total = checking.get("total")
    return {
        "plan": plan,
        "checking": checking,
        "checking_percent": 100 * min(checking["lines"] / total, 1) if total else 0,
        "estimate": estimate(plan, endpoint or Endpoint.default()) if plan and plan.ok else None,
        "preview": [json.dumps(line, indent=2, ensure_ascii=False) for line in plan.preview[:3]] if plan else [],
    }


@require_GET
@login_required
def job_review_check(request: AuthenticatedHttpRequest, token: str) -> HttpResponse:
    """Polled every second by a review page whose file a worker checks: its progress, then its result."""
    upload = _uploads(request).get(token)  # the session's: nobody else's upload
    if upload is None or "checking" not in upload:
        raise Http404("No such upload is being checked.")
    template = ingest.Template.from_dict(upload["checking"]) if upload["checking"] else None
    name = upload.get("file") or storage.name_of(Path(upload["path"]))
    try:
        path = storage.local_path(name)
    except Exception:  # cleaned up, or the bucket unreachable: the page says so on its next full load
        log.warning("upload %s could not be read", token, exc_info=True)
        raise Http404("That upload is no longer on the server.")
    plan, checking = ingest.check_in_background(
        name, path, format=upload["format"], template=template, source_name=upload["name"]
    )
    context = {
        "token": token,
        "is_csv": upload["format"] == Job.Format.CSV,
        "polled": True,
        "time_zone": timezone.get_current_timezone_name(),
        **_check_context(plan, checking, None),
    }
    response = render(request, "jobs/_check.html", context)
    if checking and "failed" not in checking:
        return response
    return HttpResponseStopPolling(response.content)


def _refused_launch(request, message: str) -> HttpResponse:
    """Back to the review page, which keeps the upload and its settings, saying why nothing was launched."""
    messages.error(request, message)
    if request.htmx:
        return HttpResponseClientRedirect(request.get_full_path())
    return redirect(request.get_full_path())


def _launch_later(request, token: str, upload: dict, path: Path, form: JobForm, template) -> HttpResponse:
    """Launch a big file without reading it in the request (a million lines take a minute to check and
    insert): the job starts `validating`, a worker checks the file again and creates the items, and the
    job page shows how far it has got. The review page has shown this file's check already; a file that
    fails now fails the job with its line errors."""
    fmt = upload["format"]
    url = template.url if template is not None else (ingest.checked(path, format=fmt, source_name=upload["name"]).url)
    try:
        Job.check_room(request.user)
    except QuotaExceeded as e:
        return _refused_launch(request, str(e))
    with transaction.atomic():
        job = ingest.create_job_to_validate(
            path,
            owner=request.user,
            name=form.cleaned_data["name"] or Path(upload["name"]).stem,
            url=url,
            source_name=upload["name"],
            endpoint=form.cleaned_data["endpoint"] or Endpoint.default(),
            format=fmt,
            template=template,
            options=form.run_options(),
        )
        Job.validate_later(job.pk)
    _uploads(request).pop(token, None)
    request.session.modified = True
    messages.success(request, "Job created: a worker is checking the file and adding its requests.")
    if request.htmx:
        return HttpResponseClientRedirect(job.get_absolute_url())
    return redirect(job)


# Job detail and control


def _error_groups(job: Job) -> list[dict]:
    """Failures grouped by kind, biggest first, each with one example item."""
    if not (job.n_failed or job.n_expired):
        return []
    failed = job.items.filter(status__in=[Item.Status.FAILED, Item.Status.EXPIRED])
    kinds = failed.values("error_code", "http_status").annotate(n=Count("id")).order_by("-n")[:8]
    return [
        {
            **kind,
            "example": failed.filter(error_code=kind["error_code"], http_status=kind["http_status"])
            .only("id", "custom_id", "error_message")
            .first(),
        }
        for kind in kinds
    ]


# Every open job page polls the progress partial every 2 s, and a day-long run's chart costs far more
# than the rest of it. So each process keeps the chart (drawn) and the errors by kind for a few seconds
# (the chart's bars are 10-second ticks); a status change or a new failure draws them again at once, and
# the counts above them are always fresh.
CHART_REUSE_SECONDS = 5
POLL_UNUSED = [
    "template",
    "columns",
    "metadata",
    "source_file",
    "source_name",
    "slice_gen",
    "slice_enqueued_at",
    "slice_picked_at",
    "owner__password",
    "owner__email",
    "owner__first_name",
    "owner__last_name",
]
_reused: dict = {}


def _poll_job(pk: int) -> Job:
    """The job with only the columns the progress partial shows, and its owner's name, in one raw query:
    compiling the ORM's select_related query would cost this poll more CPU than the rest of it."""
    q = connection.ops.quote_name
    user_model = get_user_model()
    columns = ", ".join(f"j.{q(f.column)}" for f in Job._meta.concrete_fields if f.name not in POLL_UNUSED)
    sql = (
        f"SELECT {columns}, u.{q(user_model.USERNAME_FIELD)} AS owner_name FROM {q(Job._meta.db_table)} j "
        f"JOIN {q(user_model._meta.db_table)} u ON u.{q(user_model._meta.pk.column)} = j.{q('owner_id')} WHERE j.id = %s"
    )
    job = next(iter(Job.objects.raw(sql, [pk])), None)
    if job is None:
        raise Http404("No such job.")
    known = {user_model._meta.pk.attname: job.owner_id, user_model.USERNAME_FIELD: job.owner_name}
    names = [f.attname for f in user_model._meta.concrete_fields if f.attname in known]  # from_db's order
    job.owner = user_model.from_db(job._state.db, names, [known[n] for n in names])
    return job


def _reuse(key, compute):
    now = time.monotonic()
    hit = _reused.get(key)
    if hit is None or hit[0] < now:
        if len(_reused) > 1000:
            _reused.clear()
        hit = _reused[key] = (now + CHART_REUSE_SECONDS, compute())
    return hit[1]


def _progress_context(job: Job) -> dict:
    def chart():
        line = timeline.for_job(job)
        return line, render_to_string("jobs/_chart.html", {"timeline": line})

    line, drawn = _reuse(("chart", job.pk, job.created_at, job.status), chart)
    groups = _reuse(("errors", job.pk, job.created_at, job.n_failed, job.n_expired), lambda: _error_groups(job))
    checking = ingest.validation_progress(job.pk) if job.status == Job.Status.VALIDATING else None
    return {
        "job": job,
        "timeline": line,
        "chart": drawn,
        "error_groups": groups,
        "chunks": _chunks(job),
        "checking": None if checking is None else 100 * checking,
    }


def _chunks(job: Job) -> list[RemoteBatch]:
    """The job's remote batches as the chunk table shows them, in one query (none for a live job)."""
    if job.mode == Job.Mode.LIVE:
        return []
    return list(RemoteBatch.objects.filter(job=job).order_by("number"))


@require_GET
@login_required
def job_detail(request: AuthenticatedHttpRequest, pk: int) -> HttpResponse:
    job = _get_job(request, pk)
    context = {**_progress_context(job), "can_control": job.can_control(request.user)}
    return render(request, "jobs/job_detail.html", context)


@require_GET
@login_required
def job_progress(request: AuthenticatedHttpRequest, pk: int) -> HttpResponse:
    # Polled every 2 s by every open job page: only the columns the partial shows.
    job = _poll_job(pk)
    context = {**_progress_context(job), "can_control": job.can_control(request.user)}
    response = render(request, "jobs/_progress.html", context)
    if job.is_finished and request.htmx:
        return HttpResponseStopPolling(response.content)
    return response


@require_POST
@login_required
def job_cost_cap(request: AuthenticatedHttpRequest, pk: int) -> HttpResponse:
    """Set, raise or remove a job's cost cap (then resume a job the cap paused)."""
    job = _get_job(request, pk, write=True)
    form = CostCapForm(request.POST)
    if not form.is_valid():
        messages.error(request, "The cost cap must be an amount in dollars, or empty for none.")
        return redirect(job)
    cap = form.cleaned_data["cost_cap"]
    Job.objects.filter(pk=job.pk).update(cost_cap=cap)
    messages.success(request, f"Cost cap set to ${cap:,.4f}." if cap is not None else "Cost cap removed.")
    return redirect(job)


def _control(
    request: AuthenticatedHttpRequest, pk: int, action: Callable[[Job], Any], done: Callable[[Any], str]
) -> HttpResponse:
    """Run a control action on the job the user may change; say how it went (done(result), or why not)."""
    job = _get_job(request, pk, write=True)
    try:
        messages.success(request, done(action(job)))
    except InvalidTransition as e:
        messages.error(request, str(e))
    return redirect(job)


@require_POST
@login_required
def job_pause(request: AuthenticatedHttpRequest, pk: int) -> HttpResponse:
    return _control(
        request, pk, Job.pause, lambda _: "Paused. Requests already sent will finish; the rest wait until you resume."
    )


@require_POST
@login_required
def job_resume(request: AuthenticatedHttpRequest, pk: int) -> HttpResponse:
    return _control(request, pk, Job.resume, lambda _: "Resumed.")


@require_POST
@login_required
def job_cancel(request: AuthenticatedHttpRequest, pk: int) -> HttpResponse:
    return _control(request, pk, Job.cancel, lambda _: "Cancelled. Finished results are kept.")


@require_POST
@login_required
def job_retry(request: AuthenticatedHttpRequest, pk: int) -> HttpResponse:
    # A finished remote or hybrid job's failed items may run live or at the Batch API this time.
    mode = request.POST.get("mode") or None
    if mode is not None and mode not in Job.Mode.values:
        return HttpResponseBadRequest("No such mode.")
    where = {Job.Mode.LIVE.value: " to run live", Job.Mode.REMOTE.value: " for the Batch API"}.get(mode or "", "")
    return _control(
        request,
        pk,
        lambda job: job.retry_later(mode=mode),
        lambda n: (
            f"{n:,} failed items are queued again{where}."
            if n <= INLINE_ROWS
            else f"{n:,} failed items are being queued again{where} by a worker: the page shows them as it does."
        ),
    )


@require_POST
@login_required
def job_duplicate(request: AuthenticatedHttpRequest, pk: int) -> HttpResponse:
    job = _get_job(request, pk)  # anyone who sees a job may run it again as their own
    try:
        copy = job.duplicate(request.user)
    except InvalidTransition as e:
        messages.error(request, str(e))
        return redirect(job)
    if copy.status == Job.Status.VALIDATING:
        messages.success(request, f"Copying “{job.name}”: a worker is reading its {job.total:,} requests again.")
    else:
        messages.success(request, f"Started a copy of “{job.name}”.")
    return redirect(copy)


@require_POST
@login_required
def job_delete(request: AuthenticatedHttpRequest, pk: int) -> HttpResponse:
    job = _get_job(request, pk, write=True)
    if not job.deletable():
        if job.status in Job.ACTIVE:
            messages.error(
                request,
                "Cancel the job before deleting it."
                if job.status == Job.Status.VALIDATING
                else "Cancel or pause the job before deleting it.",
            )
        else:
            messages.error(request, "Cancel the job before deleting it: its batches still run at the endpoint.")
        return redirect(job)
    job.delete()
    messages.success(request, f"Deleted “{job.name}”.")
    return redirect("home")


@require_GET
@login_required
def download(request: AuthenticatedHttpRequest, pk: int, kind: str) -> StreamingHttpResponse:
    job = _get_job(request, pk)
    if kind not in DOWNLOADS:
        raise Http404("No such download.")
    writer, content_type, filename = DOWNLOADS[kind]
    response = StreamingHttpResponse(writer(job), content_type=f"{content_type}; charset=utf-8")
    safe_name = "".join(c if c.isalnum() or c in "-_" else "-" for c in job.name)[:80] or f"job-{job.pk}"
    response["Content-Disposition"] = f'attachment; filename="{filename.format(name=safe_name)}"'
    return response


# Items


@require_GET
@login_required
def item_list(request: AuthenticatedHttpRequest, pk: int) -> HttpResponse:
    job = _get_job(request, pk)
    items = job.items.only(
        "id",
        "job_id",
        "line",
        "custom_id",
        "status",
        "attempts",
        "http_status",
        "error_message",
        "latency_ms",
        "prompt_tokens",
        "completion_tokens",
        "from_cache",
    ).order_by("line")
    status = request.GET.get("status", "")
    q = request.GET.get("q", "").strip()
    if status in Item.Status.values:
        items = items.filter(status=status)
    if q:
        items = items.filter(custom_id__startswith=q)
    # Counting 50,000 rows on every page costs more than the page: the job row already has the counts.
    count = job.counts().get(status, 0) if status in Item.Status.values and not q else (job.total if not q else None)
    paginator = Paginator(items, ITEMS_PER_PAGE)
    if count is not None:
        paginator.count = count
    page = paginator.get_page(request.GET.get("page"))
    context = {"job": job, "page": page, "status": status, "q": q, "statuses": Item.Status.values}
    return render(request, "jobs/items.html", context)


SHOWN_CHARS = 256 * 1024  # of a request, an answer or its text on the item page: an answer may be 16 MB


def _pretty(text: str) -> str:
    if len(text) > SHOWN_CHARS:
        return _shown(text)  # indenting 16 MB of JSON would make it several times that, on every load
    try:
        return _shown(json.dumps(json.loads(text), indent=2, ensure_ascii=False))
    except (ValueError, TypeError, RecursionError):
        return text


def _shown(text: str) -> str:
    if len(text) <= SHOWN_CHARS:
        return text
    return text[:SHOWN_CHARS] + f"\n… ({len(text) - SHOWN_CHARS:,} more characters: download the results for all of it)"


@require_GET
@login_required
def item_detail(request: AuthenticatedHttpRequest, pk: int, item_pk: int) -> HttpResponse:
    job = _get_job(request, pk)
    item = get_object_or_404(Item, pk=item_pk, job=job)
    request_line = {"custom_id": item.custom_id, "method": "POST", "url": job.url, "body": json.loads(item.body)}
    output = ""
    if item.status == Item.Status.SUCCEEDED:
        try:
            output = _shown(export.output_text(job.url, json.loads(item.response)))
        except (ValueError, RecursionError):
            output = ""
    context = {
        "job": job,
        "item": item,
        "request_json": _shown(json.dumps(request_line, indent=2, ensure_ascii=False)),
        "response_json": _pretty(item.response) if item.response else "",
        "output": output,
    }
    return render(request, "jobs/item_detail.html", context)


# Endpoints (staff)


@require_GET
@login_required
@staff_required
def endpoint_list(request: AuthenticatedHttpRequest) -> HttpResponse:
    Endpoint.sync_from_env()
    cache = CachedAnswer.objects.exclude(answered_at=None).aggregate(n=Count("id"), hits=Sum("hits"))
    hours = settings.BATCHSITE_CACHE_MAX_AGE_HOURS
    age = f"{hours // 24} days" if hours % 24 == 0 and hours >= 48 else f"{hours} hours"
    context = {"endpoints": Endpoint.objects.all(), "cache": cache, "cache_max_age": age}
    return render(request, "jobs/endpoints.html", context)


@require_POST
@login_required
@staff_required
def cache_clear(request: AuthenticatedHttpRequest) -> HttpResponse:
    """Empty the team's answer cache: jobs that ask for it send their requests again."""
    removed = CachedAnswer.objects.filter(sending_lease=None).delete()[0]  # not the answers being fetched now
    messages.success(request, f"Cleared the answer cache: {removed:,} answer{'' if removed == 1 else 's'} removed.")
    return redirect("endpoint_list")


@require_http_methods(["GET", "POST"])
@login_required
@staff_required
@sensitive_post_parameters("api_key")
def endpoint_edit(request: AuthenticatedHttpRequest, pk: int | None = None) -> HttpResponse:
    endpoint = get_object_or_404(Endpoint, pk=pk) if pk else None
    form = EndpointForm(request.POST or None, instance=endpoint)
    if endpoint and endpoint.from_env:  # the environment owns it: shown, not edited
        if request.method == "POST":
            raise PermissionDenied("This endpoint is set by the OPENAI_* environment variables; change them instead.")
        for field in form.fields.values():
            field.disabled = True
    if request.method == "POST" and form.is_valid():
        saved = form.save()
        messages.success(request, f"Saved endpoint “{saved.name}”.")
        return redirect("endpoint_list")
    return render(request, "jobs/endpoint_form.html", {"form": form, "endpoint": endpoint})


@require_POST
@login_required
@staff_required
def endpoint_test(request: AuthenticatedHttpRequest, pk: int) -> HttpResponse:
    """Ask the server for its model list, which proves the URL, the key and the network in one request, then
    whether it has the Batch API that remote and hybrid jobs need (llama.cpp, vLLM and Ollama have none).

    The answer shown is a status and model names, never the body: the URL could be any server's.
    """
    endpoint = get_object_or_404(Endpoint, pk=pk)
    started = time.perf_counter()
    try:
        egress.check_base_url(endpoint.base_url)  # again now: the name may resolve elsewhere than when saved
        headers = {"Authorization": f"Bearer {endpoint.api_key}"} if endpoint.api_key_encrypted else {}
        base = endpoint.base_url.rstrip("/")
        transport = egress.checked_transport()  # connects only to allowed addresses, checked as it connects
        with httpx2.Client(timeout=10, follow_redirects=False, headers=headers, transport=transport) as client:
            status, body = _probe(client, base + "/models")
            ms = int((time.perf_counter() - started) * 1000)
            batches: int | str | None = None
            if status == 200:
                try:
                    batches = _probe(client, base + "/batches?limit=1")[0]
                except httpx2.HTTPError as e:  # the server is there: say what its Batch API did
                    batches = type(e).__name__
        if status == 200:
            try:
                models = [str(m.get("id"))[:80] for m in json.loads(body).get("data", [])][:8]
            except (ValueError, AttributeError, TypeError):
                models = []
            ok, text = True, f"Connected in {ms} ms." + (f" Models include: {', '.join(models)}." if models else "")
            text += " " + _batch_api_says(batches)
        elif status in (401, 403):
            ok, text = False, f"The server refused the API key (HTTP {status})."
        else:
            ok, text = False, f"The server answered HTTP {status}."
    except egress.UnsafeURL as e:
        ok, text = False, str(e)
    except ValueError as e:  # the stored key cannot be decrypted
        ok, text = False, str(e)
    except (httpx2.HTTPError, httpx2.InvalidURL) as e:
        ok, text = False, egress.refusal(e) or f"Could not reach {endpoint.base_url}: {type(e).__name__}."
    return render(request, "jobs/_endpoint_test.html", {"ok": ok, "text": text})


def _probe(client: httpx2.Client, url: str) -> tuple[int, bytes]:
    """GET url: its status, and up to 1 MB of a 200's body, read only once the peer's address is checked."""
    with client.stream("GET", url) as response:
        egress.check_peer(response)  # where the connection really went (DNS rebinding)
        body = bytearray()
        if response.status_code == 200:
            for chunk in response.iter_bytes():
                body += chunk
                if len(body) > 1_000_000:
                    break
    return response.status_code, bytes(body)


def _batch_api_says(status: int | str | None) -> str:
    if isinstance(status, str):
        return f"Its Batch API did not answer ({status}): remote and hybrid jobs may not run here."
    if status == 200:
        return "Its Batch API answers: remote and hybrid jobs can run here."
    if status in (404, 405, 501):
        return f"It has no Batch API (HTTP {status}): run jobs live here; remote and hybrid jobs need one."
    if status in (401, 403):
        return f"Its Batch API refused the key (HTTP {status}): remote and hybrid jobs would pause."
    return f"Its Batch API answered HTTP {status}."


# Usage


@require_GET
@login_required
def usage(request: AuthenticatedHttpRequest) -> HttpResponse:
    sums = dict(
        jobs=Count("id"),
        requests=Sum("n_succeeded"),
        prompt=Sum("prompt_tokens"),
        completion=Sum("completion_tokens"),
        cost=Sum("cost"),
    )
    context = {
        "days": _last_days(sums),  # {"bars", "bar_width"}
        "by_user": Job.objects.values("owner__username").annotate(**sums).order_by("-cost", "owner__username"),
        "by_model": Job.objects.values("model").annotate(**sums).order_by("-cost", "model"),
        "by_month": Job.objects.annotate(month=TruncMonth("created_at"))
        .values("month")
        .annotate(**sums)
        .order_by("-month"),
        "total": Job.objects.aggregate(**sums),
        "limits": _limits(),
        "people": get_user_model().objects.filter(is_active=True).order_by("username"),
        "endpoints": Endpoint.objects.order_by("name"),
    }
    return render(request, "jobs/usage.html", context)


def _limits() -> list[dict]:
    rows = []
    for limit in SpendingLimit.objects.select_related("user", "endpoint"):
        spent = limit.spent()
        rows.append(
            {
                "limit": limit,
                "who": limit.user.get_username() if limit.user else f"Endpoint: {limit.endpoint}",
                "spent": spent,
                "left": max(limit.monthly_usd - spent, Decimal(0)),
                "percent": min(100, float(100 * spent / limit.monthly_usd)) if limit.monthly_usd else 100,
            }
        )
    return rows


@require_POST
@login_required
@staff_required
def spending_limit(request: AuthenticatedHttpRequest) -> HttpResponse:
    """Set or remove (empty amount) the monthly limit of one person or one endpoint."""
    target = request.POST.get("target", "")
    kind, _, pk = target.partition(":")
    amount = request.POST.get("monthly_usd", "").strip()
    try:
        value = Decimal(amount) if amount else None
        if value is not None and (not value.is_finite() or value < 0 or value >= Decimal("1e10")):
            raise ArithmeticError
    except ArithmeticError:
        messages.error(request, "The limit must be an amount in dollars, or empty to remove it.")
        return redirect("usage")
    if kind == "user":
        scope: dict[str, Any] = {"user": get_object_or_404(get_user_model(), pk=int(pk) if pk.isdigit() else 0)}
    elif kind == "endpoint":
        scope = {"endpoint": get_object_or_404(Endpoint, pk=int(pk) if pk.isdigit() else 0)}
    else:
        messages.error(request, "Choose a person or an endpoint.")
        return redirect("usage")
    if value is None:
        SpendingLimit.objects.filter(**scope).delete()
        messages.success(request, "Monthly limit removed.")
    else:
        SpendingLimit.objects.update_or_create(defaults={"monthly_usd": value.quantize(Decimal("0.01"))}, **scope)
        messages.success(request, f"Monthly limit set to ${value:,.2f}.")
    return redirect("usage")


def _last_days(sums: dict, n: int = 30) -> dict:
    """Tokens and cost per day over the last `n` days as chart bars (days without jobs included);
    no bars when there were no tokens at all."""
    since = timezone.localdate() - timedelta(days=n - 1)
    rows = (
        Job.objects.filter(created_at__date__gte=since)
        .annotate(day=TruncDate("created_at"))
        .values("day")
        .annotate(**sums)
        .order_by("day")
    )
    by_day = {r["day"]: r for r in rows}
    days = [by_day.get(since + timedelta(days=i), {"day": since + timedelta(days=i)}) for i in range(n)]
    for d in days:
        d["tokens"] = (d.get("prompt") or 0) + (d.get("completion") or 0)
    if not any(d["tokens"] for d in days):
        return {"bars": [], "bar_width": 0}
    return {"bars": days, "bar_width": timeline.place_bars(days, "tokens", slots=n)}
