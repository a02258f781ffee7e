"""Uploaded files where every node can read them: Django's "uploads" storage (settings.STORAGES).

By default that storage is the data dir itself, and nothing here copies anything. With an S3-compatible
bucket configured (BATCHSITE_S3_BUCKET), an upload is written to the receiving node's data dir as before
(streamed, size-checked), then copied to the bucket under the same name; any other node that needs it
(a worker validating it, a web node serving its content) fetches it once into its own data dir, which
acts as a cache. Names are the paths relative to the data dir ("uploads/<uuid>/<name>"), as the database
stores them, so both set-ups read the same rows. Without BATCHSITE_S3_PREFIX the bucket is written
through jobs/bucket.py, under a folder of this installation's own.
"""

from __future__ import annotations

import logging
import os
import re
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

from django.conf import settings
from django.core.files import File as DjangoFile
from django.core.files.storage import FileSystemStorage, Storage, storages

log = logging.getLogger(__name__)

CHUNK = 1024 * 1024
UPLOAD_FOLDER = re.compile(r"[0-9a-f]{32}")


def uploads() -> Storage:
    return storages["uploads"]


def is_shared() -> bool:
    """Whether uploads live somewhere other than this node's data dir (a bucket): then they are copied. The
    default storage is the data dir (settings.STORAGES), however the data dir is set."""
    return not isinstance(uploads(), FileSystemStorage)


def name_of(path: Path) -> str:
    return Path(path).resolve().relative_to(settings.DATA_DIR).as_posix()


def publish(path: Path) -> None:
    """Make a file just written under the data dir readable by every node. Raises when the bucket refuses:
    an upload the other nodes cannot read must not be accepted."""
    if not is_shared():
        return
    name = name_of(path)
    with open(path, "rb") as f:
        saved = uploads().save(name, DjangoFile(f, name=name))
    if saved != name:  # the names are unique folders; a renamed copy would be one nobody finds
        uploads().delete(saved)
        raise OSError(f"the storage stored {name} as {saved}")


def local_path(name: str) -> Path:
    """The file's path on this node, fetched from the bucket first if this node does not have it.
    FileNotFoundError when it is stored nowhere."""
    path = settings.DATA_DIR / name
    if path.exists() or not is_shared():
        return path
    store = uploads()
    if not store.exists(name):
        raise FileNotFoundError(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.part")  # never a half file under the real name
    try:
        with store.open(name, "rb") as source, open(tmp, "wb") as out:
            while chunk := source.read(CHUNK):
                out.write(chunk)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("fetched %s from the uploads storage", name)
    return path


def exists(name: str) -> bool:
    return (settings.DATA_DIR / name).exists() or (is_shared() and uploads().exists(name))


def read_chunks(name: str, size: int = 64 * 1024) -> Iterator[bytes]:
    """The content, from this node's copy, or streamed from the bucket without keeping one."""
    path = settings.DATA_DIR / name
    if path.exists() or not is_shared():
        with open(path, "rb") as f:
            while chunk := f.read(size):
                yield chunk
        return
    with uploads().open(name, "rb") as f:
        while chunk := f.read(size):
            yield chunk


def remove(name: str) -> None:
    """Delete an upload (its folder here, its copy in the bucket). Other nodes' cached copies go with
    their own stale-upload sweep."""
    import shutil

    folder = (settings.DATA_DIR / name).resolve().parent
    if folder.parent != (settings.DATA_DIR / "uploads").resolve():  # only ever an upload's own folder
        raise ValueError(f"{name!r} is not an upload's name")
    shutil.rmtree(folder, ignore_errors=True)
    if is_shared():
        try:
            uploads().delete(name)
        except Exception:  # the bucket's sweep (shared_folders) tries again later
            log.warning("could not delete %s from the uploads storage", name, exc_info=True)


def shared_uploads() -> Iterator[tuple[str, datetime]]:
    """(name, modified) of every upload in the bucket; nothing when uploads are local."""
    if not is_shared():
        return
    store = uploads()
    try:
        folders, _ = store.listdir("uploads")
    except FileNotFoundError:
        return
    for folder in folders:
        if not UPLOAD_FOLDER.fullmatch(folder):  # ours are uuid4 hex; anything else in the bucket is not
            continue
        for filename in store.listdir(f"uploads/{folder}")[1]:
            name = f"uploads/{folder}/{filename}"
            yield name, store.get_modified_time(name)
