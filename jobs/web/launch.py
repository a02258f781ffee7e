"""A new job: upload -> review (template, errors, preview, estimate) -> launch."""

import json
import logging
from pathlib import Path

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.db import transaction
from django.http import Http404, HttpResponse
from django.shortcuts import redirect, render
from django.utils import timezone
from django.views.decorators.http import require_GET, require_http_methods
from django_htmx.http import HttpResponseClientRedirect, HttpResponseStopPolling

from jobs import ingest, presets, storage
from jobs.models import Endpoint, Job, NotificationSettings, QuotaExceeded
from jobs.pricing import estimate
from jobs.web.forms import JobForm, UploadForm
from jobs.web.requests import AuthenticatedHttpRequest

log = logging.getLogger(__name__)


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
