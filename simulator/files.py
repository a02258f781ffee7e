"""The Files API (/v1/files): uploads and batch output files, kept in memory for the simulator's
lifetime, and OpenAI's cursor pages (`page`), which the Batches API lists with too."""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from simulator.answers import new_id
from simulator.errors import ApiError, json_response

MAX_FILE_BYTES = 200 * 1024 * 1024


def page(items: list[dict], query, default_limit: int) -> dict:
    """OpenAI's cursor page: `after` is the id of the last item of the previous page."""
    if query.get("after"):
        ids = [item["id"] for item in items]
        items = items[ids.index(query["after"]) + 1 :] if query["after"] in ids else []
    limit = int(query.get("limit", default_limit))
    data = items[:limit]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": len(items) > limit,
    }


class Files:
    """The stored files; its async methods are the /v1/files handlers."""

    def __init__(self):
        self.by_id: dict[str, dict] = {}  # id -> {"meta": file object, "data": bytes}, in upload order

    def store(self, filename: str, purpose: str, data: bytes) -> dict:
        """Keep `data` as a new file; returns its file object."""
        meta: dict[str, Any] = {
            "id": new_id("file-"),
            "object": "file",
            "bytes": len(data),
            "created_at": int(time.time()),
            "filename": filename,
            "purpose": purpose,
            "status": "processed",
            "expires_at": None,
            "status_details": None,
        }
        self.by_id[meta["id"]] = {"meta": meta, "data": data}
        return meta

    def find(self, file_id: str, param: str = "id") -> dict:
        """{"meta": file object, "data": bytes}, or a 404 naming `param` as the parameter at fault."""
        if file_id not in self.by_id:
            raise ApiError(404, f"No such File object: {file_id}", param=param)
        return self.by_id[file_id]

    async def create_file(self, request: web.Request) -> web.Response:
        form = await request.post()
        upload, purpose = form.get("file"), form.get("purpose")
        if not isinstance(purpose, str) or not purpose:
            raise ApiError(
                400, "Missing required parameter: 'purpose'.", code="missing_required_parameter", param="purpose"
            )
        if not isinstance(upload, web.FileField):
            raise ApiError(400, "Missing required parameter: 'file'.", code="missing_required_parameter", param="file")
        return json_response(200, self.store(upload.filename or "upload", purpose, upload.file.read()))

    async def list_files(self, request: web.Request) -> web.Response:
        files = [f["meta"] for f in reversed(self.by_id.values())]
        if request.query.get("order") == "asc":
            files.reverse()
        if request.query.get("purpose"):
            files = [f for f in files if f["purpose"] == request.query["purpose"]]
        return json_response(200, page(files, request.query, default_limit=10000))

    async def get_file(self, request: web.Request) -> web.Response:
        return json_response(200, self.find(request.match_info["file_id"])["meta"])

    async def file_content(self, request: web.Request) -> web.Response:
        return web.Response(
            body=self.find(request.match_info["file_id"])["data"], content_type="application/octet-stream"
        )

    async def delete_file(self, request: web.Request) -> web.Response:
        file_id = self.find(request.match_info["file_id"])["meta"]["id"]
        del self.by_id[file_id]
        return json_response(200, {"id": file_id, "object": "file", "deleted": True})
