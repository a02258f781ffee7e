"""What the dashboard's views may rely on in a request, for type checking (django-htmx's example app)."""

from django.contrib.auth.models import User
from django.http import HttpRequest
from django_htmx.middleware import HtmxDetails


class HtmxHttpRequest(HttpRequest):
    htmx: HtmxDetails  # set by django-htmx's middleware on every request


class AuthenticatedHttpRequest(HtmxHttpRequest):
    """A request that passed `login_required`: its user is signed in."""

    user: User
