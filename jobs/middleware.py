from django.conf import settings
from django.core.exceptions import SuspiciousOperation
from django.core.files.uploadhandler import FileUploadHandler, StopUpload
from django.http import HttpRequest, HttpResponse

from jobs.errors import ApiError


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


MB = 1024 * 1024
ANONYMOUS_BODY_BYTES = 64 * 1024  # a sign-in form is well under a kilobyte
MULTIPART_OVERHEAD = MB  # boundaries and the other fields around an upload's file
UPLOAD_PATHS = ("/jobs/new/", "/v1/files")


def _is_upload(request) -> bool:
    return request.method == "POST" and request.path in UPLOAD_PATHS


def _trusted(request) -> bool:
    """Whose body may be read at all: a signed-in member, or a /v1 call (its view checks the token before reading)."""
    return request.path.startswith("/v1/") or request.user.is_authenticated


def file_limit(request) -> int:
    """The most file data a request may carry."""
    return settings.BATCHSITE_MAX_UPLOAD_MB * MB if _is_upload(request) and _trusted(request) else ANONYMOUS_BODY_BYTES


def _too_large(request, limit: int):
    if _is_upload(request) and _trusted(request):
        message = f"The file is larger than the {settings.BATCHSITE_MAX_UPLOAD_MB} MB limit."
        code = "file_too_large"
    else:
        message = f"The request body is larger than this server accepts here ({limit // 1024:,} KB)."
        code = "request_too_large"
    if request.path.startswith("/v1/"):
        return ApiError(413, message, param="file" if code == "file_too_large" else None, code=code).response()
    return HttpResponse(message + "\n", status=413, content_type="text/plain; charset=utf-8")


class LimitRequestBody:
    """Refuse a body over its limit before anything reads it.

    Django spools the files of a multipart body to disk as soon as anything reads request.POST, and
    CsrfViewMiddleware does that before `login_required` runs: without this, anyone could make the
    server store gigabytes with a POST to /login/. Its __call__ runs before any middleware's
    process_view (CSRF's included), so it sits after AuthenticationMiddleware to know who is asking.
    Anonymous clients get a few kilobytes; members a form's worth; uploads BATCHSITE_MAX_UPLOAD_MB.
    BodyLimitHandler stops file data at the same limits while it streams in.
    """

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        raw = request.META.get("CONTENT_LENGTH") or ""
        if not raw:
            if "chunked" in request.META.get("HTTP_TRANSFER_ENCODING", "").lower():
                # Django reads no body without a length: say so instead of acting on an empty one.
                message = "A request body needs a Content-Length header."
                if request.path.startswith("/v1/"):
                    return ApiError(411, message, code="length_required").response()
                return HttpResponse(message + "\n", status=411, content_type="text/plain; charset=utf-8")
            return self.get_response(request)
        try:
            length = int(raw)
        except ValueError:
            length = -1
        if length < 0:
            return HttpResponse("Invalid Content-Length.\n", status=400, content_type="text/plain; charset=utf-8")
        if length > ANONYMOUS_BODY_BYTES:  # only then is it worth looking up the session
            if _is_upload(request) and _trusted(request):
                limit = file_limit(request) + MULTIPART_OVERHEAD
            else:
                limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE if _trusted(request) else ANONYMOUS_BODY_BYTES
            if length > limit:
                return _too_large(request, limit)
        response = self.get_response(request)
        if getattr(request, "body_too_large", False):  # BodyLimitHandler cut an upload short
            return _too_large(request, file_limit(request))
        return response


class UploadRequest(HttpRequest):
    body_too_large: bool  # set when BodyLimitHandler cut an upload short


class BodyLimitHandler(FileUploadHandler):
    """First upload handler: stops a multipart file at the request's limit, so no more of it is spooled.

    The temporary file written so far is deleted when the upload stops; LimitRequestBody answers 413.
    """

    request: UploadRequest  # Django always makes its upload handlers with the request

    def handle_raw_input(self, input_data, META, content_length, boundary, encoding=None):
        self.limit = file_limit(self.request)
        self.received = 0

    def receive_data_chunk(self, raw_data, start):
        self.received += len(raw_data)
        if self.received > self.limit:
            self.request.body_too_large = True
            raise StopUpload(connection_reset=True)
        return raw_data

    def file_complete(self, file_size):
        return None
