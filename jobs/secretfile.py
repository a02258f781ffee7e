"""Secrets kept in the data dir (the generated SECRET_KEY, the demo password): private from the first byte."""

import os
import time
from collections.abc import Callable
from pathlib import Path


def read_or_create(path: Path, generate: Callable[[], str]) -> str:
    """The secret in `path`, created with mode 0600 if it does not exist yet.

    O_CREAT|O_EXCL creates the file with its final mode whatever the umask, never briefly readable by
    others, and makes one of two processes starting at once the writer; the other reads the winner's.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        if path.stat().st_mode & 0o077:  # written by an older version, before this rule
            path.chmod(0o600)
        for _ in range(50):  # the winner may not have written yet
            value = path.read_text().strip()
            if value:
                return value
            time.sleep(0.02)
        raise RuntimeError(f"{path} exists but is empty: delete it to have a new secret made.") from None
    value = generate()
    with os.fdopen(fd, "w") as f:
        f.write(value)
    return value
