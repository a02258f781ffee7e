"""/v1/files: upload batch input files, read them back, and download batch output and error files."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from django.conf import settings
from django.db.models import QuerySet, Sum
from django.http import FileResponse, JsonResponse, StreamingHttpResponse
from django.utils import timezone
from django.utils.http import content_disposition_header

from jobs import export, ingest, storage
from jobs.api.auth import ApiRequest, api_view
from jobs.api.pagination import cursor_page
from jobs.errors import ApiError
from jobs.models import File

LIST_DEFAULT = LIST_MAX = 10_000  # OpenAI's defaults for GET /v1/files
EXPIRY_SECONDS = (3600, 2_592_000)  # OpenAI's bounds for expires_after[seconds]: an hour to 30 days


def file_object(file: File) -> dict:
    return {
        "id": file.public_id,
        "object": "file",
        "bytes": export.file_size(file),
        "created_at": int(file.created_at.timestamp()),
        "filename": file.filename,
        "purpose": file.purpose,
        "status": "processed",
        "expires_at": int(file.expires_at.timestamp()) if file.expires_at else None,
        "status_details": None,
    }


def visible_files(request: ApiRequest) -> QuerySet:
    """A user's own files; staff reach everyone's by id (lists stay per user, like an OpenAI key)."""
    files = File.objects.filter(deleted_at__isnull=True).select_related("job")
    return files if request.user.is_staff else files.filter(owner=request.user)


def get_file(request: ApiRequest, file_id: str, param: str = "id") -> File:
    file = visible_files(request).filter(public_id=file_id).first()
    if file is None:
        raise ApiError(404, f"No such File object: {file_id}", param=param)
    return file


@api_view("GET", "POST")
def collection(request: ApiRequest) -> JsonResponse:
    if request.method == "POST":
        return _upload(request)
    files = File.objects.filter(deleted_at__isnull=True, owner=request.user)
    if request.GET.get("purpose"):
        files = files.filter(purpose=request.GET["purpose"])
    return JsonResponse(cursor_page(request, files, file_object, LIST_DEFAULT, LIST_MAX))


def _upload(request: ApiRequest) -> JsonResponse:
    purpose = request.POST.get("purpose", "")
    upload = request.FILES.get("file")
    if not purpose:
        raise ApiError(
            400, "Missing required parameter: 'purpose'.", param="purpose", code="missing_required_parameter"
        )
    if purpose != File.BATCH:
        raise ApiError(
            400,
            f"Invalid value for 'purpose': {purpose!r}. Batchsite accepts only 'batch' files.",
            param="purpose",
            code="invalid_value",
        )
    if upload is None:
        raise ApiError(400, "Missing required parameter: 'file'.", param="file", code="missing_required_parameter")
    lifetime = _expires_after(request)
    _check_room(request, 0)  # already full: refused before a byte is stored
    path, error = ingest.store_upload(upload.chunks(), upload.name or "")
    if error and error.code == ingest.STORAGE_UNAVAILABLE:
        raise ApiError(503, error.message, code=error.code)  # the SDK retries a 503
    if error:
        raise ApiError(400, error.message, param="file", code=error.code)
    assert path is not None  # store_upload gives a path whenever it gives no error
    try:
        _check_room(request, path.stat().st_size)
    except ApiError:
        path.unlink(missing_ok=True)
        raise
    now = timezone.now()
    file = File.objects.create(
        owner=request.user,
        filename=Path(upload.name or "upload.jsonl").name[:255],
        purpose=File.BATCH,
        bytes=path.stat().st_size,
        path=str(path.relative_to(settings.DATA_DIR)),
        created_at=now,
        expires_at=now + lifetime if lifetime else None,
    )
    return JsonResponse(file_object(file))


def _check_room(request: ApiRequest, adding: int) -> None:
    """A member's stored /v1 files may add up to BATCHSITE_MAX_STORED_MB: one member's uploads cannot fill the
    disk (or bucket) that every job's results need. Deleted and expired files do not count."""
    limit = settings.BATCHSITE_MAX_STORED_MB * 1024 * 1024
    if not limit:
        return
    mine = File.objects.filter(owner=request.user, deleted_at__isnull=True, path__gt="")
    stored = mine.aggregate(s=Sum("bytes"))["s"] or 0
    if stored + adding > limit or (not adding and stored >= limit):
        raise ApiError(
            400,
            f"Your stored files take {stored / 2**20:,.1f} MB; with this one they would pass the "
            f"{settings.BATCHSITE_MAX_STORED_MB:,} MB a member may keep (BATCHSITE_MAX_STORED_MB). Delete files "
            "you no longer need (DELETE /v1/files/{file_id}), then upload again.",
            param="file",
            code="storage_limit_exceeded",
        )


def _expires_after(request: ApiRequest) -> timedelta | None:
    """OpenAI's `expires_after` (multipart fields expires_after[anchor], expires_after[seconds]), else the default."""
    anchor, seconds = request.POST.get("expires_after[anchor]"), request.POST.get("expires_after[seconds]")
    if anchor is None and seconds is None:
        days = settings.BATCHSITE_FILE_EXPIRY_DAYS
        return timedelta(days=days) if days else None
    if anchor != "created_at":
        raise ApiError(
            400,
            f"Invalid value for 'expires_after.anchor': {anchor!r}. Supported values are: 'created_at'.",
            param="expires_after.anchor",
            code="invalid_value",
        )
    low, high = EXPIRY_SECONDS
    try:
        value = int(seconds or "")
    except ValueError:
        value = 0
    if not low <= value <= high:
        raise ApiError(
            400,
            f"Invalid value for 'expires_after.seconds': {seconds!r}. Expected an integer from {low} to {high}.",
            param="expires_after.seconds",
            code="invalid_value",
        )
    return timedelta(seconds=value)


@api_view("GET", "DELETE")
def detail(request: ApiRequest, file_id: str) -> JsonResponse:
    file = get_file(request, file_id)
    if request.method == "DELETE":
        file.delete_content()
        return JsonResponse({"id": file.public_id, "object": "file", "deleted": True})
    return JsonResponse(file_object(file))


@api_view("GET")
def content(request: ApiRequest, file_id: str) -> StreamingHttpResponse:
    file = get_file(request, file_id)
    response: StreamingHttpResponse
    if file.job_id is None:
        if file.full_path.exists():
            response = FileResponse(open(file.full_path, "rb"), content_type="application/octet-stream")
        elif storage.exists(file.path):  # uploaded through another node: streamed from the shared bucket
            response = StreamingHttpResponse(export.file_chunks(file), content_type="application/octet-stream")
            if file.bytes is not None:
                response["Content-Length"] = str(file.bytes)
        else:
            raise ApiError(404, f"The content of {file_id} is no longer stored.", param="id")
    else:
        response = StreamingHttpResponse(export.file_chunks(file), content_type="application/octet-stream")
    # The stubs say str | None; None only comes without as_attachment and without a filename.
    response["Content-Disposition"] = content_disposition_header(True, file.filename)  # type: ignore[assignment]
    return response
