"""Which job a user may see or change."""

from django.core.exceptions import PermissionDenied
from django.http import Http404
from django.shortcuts import get_object_or_404

from jobs.models import Job
from jobs.web.requests import AuthenticatedHttpRequest


def get_job(request: AuthenticatedHttpRequest, pk: int, write: bool = False) -> Job:
    """The job, if the user may see it (write: change it); 404 or 403 otherwise. Every job view calls this."""
    job = get_object_or_404(Job.objects.select_related("owner", "endpoint"), pk=pk)
    if not job.can_view(request.user):
        raise Http404("No such job.")
    if write and not job.can_control(request.user):
        raise PermissionDenied("Only the job's owner or staff can do that.")
    return job
