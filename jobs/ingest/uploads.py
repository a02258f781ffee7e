"""Uploaded files on disk: each stored in its own folder under the data dir within the size limit,
and removed a day later if no job or /v1 file came to point at it.
"""

from __future__ import annotations

import logging
import re
import shutil
import time
import uuid
from collections.abc import Iterable
from pathlib import Path

from django.conf import settings

from jobs import storage
from jobs.ingest.lines import Limits, LineError
from jobs.models import File, Job

log = logging.getLogger(__name__)

STORAGE_UNAVAILABLE = "storage_unavailable"


def store_upload(
    chunks: Iterable[bytes], name: str, limits: Limits | None = None
) -> tuple[Path | None, LineError | None]:
    """Write an uploaded file (an iterable of byte chunks) under the data dir, enforcing the size limit."""
    limits = limits or Limits.from_settings()
    folder = settings.DATA_DIR / "uploads" / uuid.uuid4().hex
    folder.mkdir(parents=True)
    safe = re.sub(r"[^\w.\-]+", "_", Path(name or "upload").name)[:100] or "upload"
    path = folder / safe
    size = 0
    with open(path, "wb") as out:
        for chunk in chunks:
            size += len(chunk)
            if size > limits.max_file_bytes:
                out.close()
                shutil.rmtree(folder, ignore_errors=True)
                mb = limits.max_file_bytes // (1024 * 1024)
                return None, LineError(None, "file_too_large", f"The file is larger than the {mb} MB limit.")
            out.write(chunk)
    try:
        storage.publish(path)  # every node reads it from the shared bucket, when there is one
    except Exception:
        log.exception("could not store upload %s in the uploads storage", path)
        shutil.rmtree(folder, ignore_errors=True)
        return None, LineError(
            None, STORAGE_UNAVAILABLE, "The file could not be stored (the uploads storage failed); try again."
        )
    return path, None


def remove_stale_uploads(max_age_hours: float = 24) -> int:
    """Delete uploads nobody launched (or whose job was deleted) after a day; returns how many.

    An upload lives in its own folder under uploads/; a job or a /v1 file that still points into a
    folder keeps it, whatever its age.
    """
    root = settings.DATA_DIR / "uploads"
    cutoff = time.time() - max_age_hours * 3600
    old = (
        [folder for folder in root.iterdir() if folder.is_dir() and folder.stat().st_mtime < cutoff]
        if root.is_dir()
        else []
    )
    shared = [name for name, modified in storage.shared_uploads() if modified.timestamp() < cutoff]
    if not old and not shared:
        return 0
    kept = {
        Path(p).parts[1]
        for p in Job.objects.filter(source_file__startswith="uploads/").values_list("source_file", flat=True)
    }
    kept |= {
        Path(p).parts[1]
        for p in File.objects.filter(path__startswith="uploads/", deleted_at=None).values_list("path", flat=True)
    }
    removed = 0
    for folder in old:  # this node's uploads, or its copies of the bucket's
        if folder.name not in kept:
            shutil.rmtree(folder, ignore_errors=True)
            removed += 1
    for name in shared:
        if Path(name).parts[1] not in kept:
            storage.remove(name)
            removed += 1
    return removed
