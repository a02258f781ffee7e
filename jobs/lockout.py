"""Password and token guessing: django-axes' hooks, and the same limit for wrong API tokens.

Sign-in (ours and the admin's) goes through Django's authenticate(), which django-axes watches. A wrong
API token is reported to axes as a failed sign-in of the pseudo-user API_TOKEN from the caller's
address, so one count per address covers both, lives in the database and can be cleared in the admin.
"""

import ipaddress
from datetime import timedelta

from axes.handlers.proxy import AxesProxyHandler
from axes.helpers import get_cool_off
from django.conf import settings
from django.contrib.auth.signals import user_login_failed
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

API_TOKEN = "(API token)"  # parentheses and a space: never a real username


def client_ip(request: HttpRequest) -> str:
    """The caller's address (REMOTE_ADDR, or the address a trusted proxy in FORWARDED_ALLOW_IPS appended last),
    as guessing is counted: an IPv6 address by its /64, which one host or household gets whole, so cycling
    through it neither dodges the limit nor makes a record per address."""
    remote = request.META.get("REMOTE_ADDR", "")
    trusted = settings.FORWARDED_ALLOW_IPS
    forwarded = request.META.get("HTTP_X_FORWARDED_FOR", "")
    if forwarded and ("*" in trusted or remote in trusted):
        candidate = forwarded.rsplit(",", 1)[-1].strip()
        try:
            return _counted(ipaddress.ip_address(candidate))
        except ValueError:
            pass
    try:
        return _counted(ipaddress.ip_address(remote))
    except ValueError:
        return remote


def _counted(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False).network_address)
    return str(ip)


def lockout_parameters(request, credentials) -> list:
    """Sign-in failures count per username and per address; wrong API tokens per address only."""
    if (credentials or {}).get("username") == API_TOKEN:
        return ["ip_address"]
    return ["username", "ip_address"]


def _minutes(delta: timedelta | None) -> int:
    return max(1, round(delta.total_seconds() / 60)) if delta else 0


def locked_out(request, original_response=None, credentials=None) -> HttpResponse:
    """The sign-in page's answer while locked out: a page that says why and for how long, status 429."""
    cool_off = get_cool_off(request)
    response = render(request, "registration/locked_out.html", {"minutes": _minutes(cool_off)}, status=429)
    if cool_off:
        response["Retry-After"] = str(int(cool_off.total_seconds()))
    return response


def _probe(request: HttpRequest) -> HttpRequest:
    """A copy of the request's address and path, without its body: axes records a failure's form fields, and
    the body of a /v1 call with a wrong token (maybe a big upload) should never be read. Without its user agent
    too: axes keeps a record per address and agent, and a guesser changing agents would make one each."""
    probe = HttpRequest()
    probe.method, probe.path, probe.path_info = request.method, request.path, request.path_info
    kept = ("REMOTE_ADDR", "HTTP_X_FORWARDED_FOR", "HTTP_ACCEPT")
    probe.META = {k: v for k, v in request.META.items() if k in kept}
    return probe


def token_retry_after(request: HttpRequest) -> int | None:
    """The cooling period (seconds) if this address made too many wrong API token tries, else None."""
    if not settings.AXES_ENABLED:
        return None
    if not AxesProxyHandler.is_locked(_probe(request), {"username": API_TOKEN}):
        return None
    return int(get_cool_off(request).total_seconds())


def token_failed(request: HttpRequest) -> None:
    user_login_failed.send(sender=__name__, credentials={"username": API_TOKEN}, request=_probe(request))
