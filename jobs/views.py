from django.contrib.auth.decorators import login_required
from django.db import connection
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.shortcuts import get_object_or_404, render
from django.views.decorators.http import require_GET

from jobs import export
from jobs.models import Job

DOWNLOADS = {
    "results": (export.results_jsonl, "application/jsonl", "{name}-results.jsonl"),
    "errors": (export.errors_jsonl, "application/jsonl", "{name}-errors.jsonl"),
    "csv": (export.results_csv, "text/csv", "{name}-results.csv"),
}


@require_GET
def healthz(request: HttpRequest) -> JsonResponse:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        database = "ok"
    except Exception as e:  # the point of a health check is to report, not to raise
        database = f"error: {type(e).__name__}"
    try:
        from django_q.status import Stat

        workers = sum(len(stat.workers) for stat in Stat.get_all())
    except Exception:
        workers = 0
    status = 200 if database == "ok" else 503
    return JsonResponse({"database": database, "workers": workers}, status=status)


@require_GET
@login_required
def home(request: HttpRequest) -> HttpResponse:
    jobs = Job.objects.select_related("owner").order_by("-created_at", "-id")[:50]
    return render(request, "jobs/home.html", {"jobs": jobs})


def _get_job_for_user(request: HttpRequest, pk: int) -> Job:
    # Every signed-in team member may view any job; write access is checked by the actions.
    return get_object_or_404(Job.objects.select_related("owner", "endpoint"), pk=pk)


@require_GET
@login_required
def job_detail(request: HttpRequest, pk: int) -> HttpResponse:
    job = _get_job_for_user(request, pk)
    return render(request, "jobs/job_detail.html", {"job": job})


@require_GET
@login_required
def download(request: HttpRequest, pk: int, kind: str) -> StreamingHttpResponse:
    job = _get_job_for_user(request, pk)
    if kind not in DOWNLOADS:
        raise Http404("No such download.")
    writer, content_type, filename = DOWNLOADS[kind]
    response = StreamingHttpResponse(writer(job), content_type=f"{content_type}; charset=utf-8")
    safe_name = "".join(c if c.isalnum() or c in "-_" else "-" for c in job.name)[:80] or f"job-{job.pk}"
    response["Content-Disposition"] = f'attachment; filename="{filename.format(name=safe_name)}"'
    return response
