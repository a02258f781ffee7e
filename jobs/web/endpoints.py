"""The team's endpoints (staff): list, edit, test the connection; and the answer cache they share."""

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.db.models import Count, Sum
from django.http import HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.debug import sensitive_post_parameters
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from jobs import probe
from jobs.models import CachedAnswer, Endpoint
from jobs.web.decorators import staff_required
from jobs.web.forms import EndpointForm
from jobs.web.requests import AuthenticatedHttpRequest


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
    """ "Test connection": the verdict on the endpoint's server (its URL, key and Batch API), as a partial."""
    endpoint = get_object_or_404(Endpoint, pk=pk)
    ok, text = probe.check(endpoint)
    return render(request, "jobs/_endpoint_test.html", {"ok": ok, "text": text})
