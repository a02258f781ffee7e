"""Decorators the web views share."""

from collections.abc import Callable
from functools import wraps

from django.core.exceptions import PermissionDenied
from django.http import HttpResponse

from jobs.web.requests import AuthenticatedHttpRequest


def staff_required(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    """403 for signed-in non-staff (user_passes_test would send them to the login page, which sends them back)."""

    @wraps(view)
    def wrapper(request: AuthenticatedHttpRequest, *args, **kwargs) -> HttpResponse:
        if not request.user.is_staff:
            raise PermissionDenied("Only staff can manage this.")
        return view(request, *args, **kwargs)

    return wrapper
