"""Bearer-token authentication and OpenAI's error shape for every /v1 view."""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable

from django.contrib.auth.models import User
from django.core.exceptions import SuspiciousOperation
from django.http import HttpRequest, HttpResponseBase, JsonResponse
from django.views.decorators.csrf import csrf_exempt

from jobs import lockout
from jobs.errors import ApiError
from jobs.models import ApiToken

log = logging.getLogger(__name__)

View = Callable[..., HttpResponseBase]

NO_KEY = (
    "You didn't provide an API key. You need to provide your API key in an Authorization header using Bearer "
    "auth (i.e. Authorization: Bearer YOUR_KEY). Create a personal API token on the Batchsite page "
    "/account/tokens/ or with `manage.py create_api_token USERNAME`."
)


class ApiRequest(HttpRequest):
    """A request inside an `api_view`: the token it came with, and that token's owner as its user."""

    api_token: ApiToken
    user: User


def _masked(key: str) -> str:
    return f"{key[:6]}{'*' * 10}{key[-4:]}" if len(key) > 12 else "*" * len(key)


def authenticate(request: HttpRequest) -> ApiToken:
    """The active token in the Authorization header, or ApiError(401) as OpenAI words it."""
    header = request.headers.get("Authorization", "")
    scheme, _, key = header.partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        raise ApiError(401, NO_KEY)
    token = ApiToken.authenticate(key)
    if token is None:
        # Guessing is throttled per address (jobs/lockout.py). A right token is let through even
        # then: 256 random bits cannot be guessed, and a teammate behind the same address keeps working.
        retry_after = lockout.token_retry_after(request)
        if retry_after:
            raise ApiError(
                429,
                f"Too many wrong API keys from your address: try again in {retry_after // 60 or 1} minutes.",
                type="requests",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(retry_after)},
            )
        lockout.token_failed(request)
        raise ApiError(
            401,
            f"Incorrect API key provided: {_masked(key)}. Check the token, or create a new "
            "one on the Batchsite page /account/tokens/.",
            code="invalid_api_key",
        )
    if token.revoked_at is not None:
        raise ApiError(
            401,
            f"The API token {token.prefix}… was revoked. Create a new one on /account/tokens/.",
            code="invalid_api_key",
        )
    if not token.user.is_active:
        raise ApiError(401, "The account of this API token is deactivated.", code="invalid_api_key")
    return token


def api_view(*methods: str) -> Callable[[View], View]:
    """A /v1 view: only `methods` (else 405), a valid Bearer token, every failure in OpenAI's shape.

    The view gets `request.user` set to the token's owner. No session and no CSRF: a token in a
    header is not sent by browsers on their own, so cross-site requests cannot use it.
    """

    def decorate(view: View) -> View:
        @csrf_exempt
        @functools.wraps(view)
        def wrapper(request: ApiRequest, *args, **kwargs) -> HttpResponseBase:
            try:
                if request.method not in methods:
                    allowed = ", ".join(methods)
                    response = ApiError(
                        405,
                        f"{request.method} is not allowed on {request.path}; use {allowed}.",
                        code="method_not_allowed",
                    ).response()
                    response["Allow"] = allowed
                    return response
                request.api_token = authenticate(request)
                request.user = request.api_token.user
                return view(request, *args, **kwargs)
            except ApiError as e:
                return e.response()
            except SuspiciousOperation as e:  # a body over Django's limits, too many fields...
                return ApiError(400, f"The request could not be read: {e}").response()
            except Exception:
                log.exception("API error on %s %s", request.method, request.path)
                return ApiError(
                    500, "The server had an error while processing your request. Sorry about that!", "server_error"
                ).response()

        return wrapper

    return decorate


@csrf_exempt
def not_found(request: HttpRequest, rest: str = "") -> JsonResponse:
    """Any other /v1 path: OpenAI's 'Invalid URL' 404, not an HTML page."""
    return ApiError(404, f"Invalid URL ({request.method} {request.path})").response()


def json_body(request: HttpRequest) -> dict:
    """The request's JSON object, or ApiError(400)."""
    try:
        body = json.loads(request.body or b"{}")
    except ValueError:
        raise ApiError(
            400, "We could not parse the JSON body of your request. The body must be a JSON object."
        ) from None
    if not isinstance(body, dict):
        raise ApiError(400, "The body of your request must be a JSON object.")
    return body
