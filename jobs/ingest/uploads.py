"""Uploaded files on disk: each stored in its own folder under the data dir within the size limit,
and removed a day later if no job or /v1 file came to point at it.
"""

from __future__ import annotations

import re
import shutil
import time
import uuid
from collections.abc import Iterable
from pathlib import Path

from django.conf import settings

from jobs.ingest.lines import Limits, LineError
from jobs.models import File, Job


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
    return path, None


def remove_stale_uploads(max_age_hours: float = 24) -> int:
    """Delete uploads nobody launched (or whose job was deleted) after a day; returns how many.

    An upload lives in its own folder under uploads/; a job or a /v1 file that still points into a
    folder keeps it, whatever its age.
    """
    root = settings.DATA_DIR / "uploads"
    if not root.is_dir():
        return 0
    cutoff = time.time() - max_age_hours * 3600
    old = [folder for folder in root.iterdir() if folder.is_dir() and folder.stat().st_mtime < cutoff]
    if not old:
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
    for folder in old:
        if folder.name not in kept:
            shutil.rmtree(folder, ignore_errors=True)
            removed += 1
    return removed
