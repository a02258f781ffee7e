"""What the owner (or staff) does to a job: pause, resume, cancel, retry its failures, cap its cost, delete it;
and what anyone who sees it may do: run a copy."""

from collections.abc import Callable
from typing import Any

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import HttpResponse, HttpResponseBadRequest
from django.shortcuts import redirect
from django.views.decorators.http import require_POST

from jobs.models import INLINE_ROWS, InvalidTransition, Job, control
from jobs.web.access import get_job
from jobs.web.forms import CostCapForm
from jobs.web.requests import AuthenticatedHttpRequest


@require_POST
@login_required
def job_cost_cap(request: AuthenticatedHttpRequest, pk: int) -> HttpResponse:
    """Set, raise or remove a job's cost cap (then resume a job the cap paused)."""
    job = get_job(request, pk, write=True)
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
    job = get_job(request, pk, write=True)
    try:
        messages.success(request, done(action(job)))
    except InvalidTransition as e:
        messages.error(request, str(e))
    return redirect(job)


@require_POST
@login_required
def job_pause(request: AuthenticatedHttpRequest, pk: int) -> HttpResponse:
    return _control(
        request,
        pk,
        control.pause,
        lambda _: "Paused. Requests already sent will finish; the rest wait until you resume.",
    )


@require_POST
@login_required
def job_resume(request: AuthenticatedHttpRequest, pk: int) -> HttpResponse:
    return _control(request, pk, control.resume, lambda _: "Resumed.")


@require_POST
@login_required
def job_cancel(request: AuthenticatedHttpRequest, pk: int) -> HttpResponse:
    return _control(request, pk, control.cancel, lambda _: "Cancelled. Finished results are kept.")


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
        lambda job: control.retry_later(job, mode=mode),
        lambda n: (
            f"{n:,} failed items are queued again{where}."
            if n <= INLINE_ROWS
            else f"{n:,} failed items are being queued again{where} by a worker: the page shows them as it does."
        ),
    )


@require_POST
@login_required
def job_duplicate(request: AuthenticatedHttpRequest, pk: int) -> HttpResponse:
    job = get_job(request, pk)  # anyone who sees a job may run it again as their own
    try:
        copy = control.duplicate(job, request.user)
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
    job = get_job(request, pk, write=True)
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
