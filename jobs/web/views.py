"""The jobs: their list, a job's page and the progress it polls, its downloads."""

import time

from django.contrib.auth import get_user_model
from django.contrib.auth.decorators import login_required
from django.core.paginator import Paginator
from django.db.models import Count
from django.http import Http404, HttpResponse, StreamingHttpResponse
from django.shortcuts import render
from django.template.loader import render_to_string
from django.views.decorators.http import require_GET
from django_htmx.http import HttpResponseStopPolling

from jobs import export, ingest, polls, timeline
from jobs.models import Item, Job, RemoteBatch
from jobs.web.access import get_job
from jobs.web.requests import AuthenticatedHttpRequest

DOWNLOADS = {
    "results": (export.results_jsonl, "application/jsonl", "{name}-results.jsonl"),
    "errors": (export.errors_jsonl, "application/jsonl", "{name}-errors.jsonl"),
    "csv": (export.results_csv, "text/csv", "{name}-results.csv"),
}
JOBS_PER_PAGE = 25


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
POLL_UNUSED = (
    "template",
    "columns",
    "metadata",
    "source_file",
    "source_name",
    "slice_gen",
    "slice_enqueued_at",
    "slice_picked_at",
)
_reused: dict = {}


def _poll_job(pk: int) -> Job:
    """The job with only the columns the progress partial shows, and its owner's name, in one query."""
    username = get_user_model().USERNAME_FIELD
    job = next(iter(polls.with_parent(Job, "id", [pk], "owner", (username,), skip=POLL_UNUSED)), None)
    if job is None:
        raise Http404("No such job.")
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
    job = get_job(request, pk)
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


@require_GET
@login_required
def download(request: AuthenticatedHttpRequest, pk: int, kind: str) -> StreamingHttpResponse:
    job = get_job(request, pk)
    if kind not in DOWNLOADS:
        raise Http404("No such download.")
    writer, content_type, filename = DOWNLOADS[kind]
    response = StreamingHttpResponse(writer(job), content_type=f"{content_type}; charset=utf-8")
    safe_name = "".join(c if c.isalnum() or c in "-_" else "-" for c in job.name)[:80] or f"job-{job.pk}"
    response["Content-Disposition"] = f'attachment; filename="{filename.format(name=safe_name)}"'
    return response
