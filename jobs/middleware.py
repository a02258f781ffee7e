from django.core.exceptions import SuspiciousOperation

from jobs.api.auth import ApiError


class RejectNulBytes:
    """A NUL in the path or query string becomes a 400 here, not a 500 deep inside Postgres.

    psycopg refuses strings holding NUL; SQLite takes them. Rejecting them at the door keeps every
    filter, search box and /v1 id safe on both, without a check in each view.
    """

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        if "\x00" in request.path or any("\x00" in "".join([k, *vs]) for k, vs in request.GET.lists()):
            if request.path.startswith("/v1/"):
                return ApiError(400, "The request contains a NUL character.").response()
            raise SuspiciousOperation("NUL character in the request")
        return self.get_response(request)
