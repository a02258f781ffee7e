"""What both file formats share: the limits, errors that name their line, reading a file line by line,
and spotting a custom_id used twice.

JSONL and CSV files are read the same way (streaming, one line at a time, never more than a line in
memory), so the reading and the bookkeeping live here, once.
"""

from __future__ import annotations

import itertools
import struct
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from hashlib import blake2b
from pathlib import Path

from django.conf import settings

MAX_ERRORS = 100
SKIP_CHUNK = 1024 * 1024  # the rest of an over-long line is read and dropped this much at a time


@dataclass
class LineError:
    line: int | None
    code: str
    message: str
    param: str | None = None

    def as_dict(self) -> dict:
        return {"code": self.code, "line": self.line, "message": self.message, "param": self.param}


@dataclass
class Limits:
    max_lines: int
    max_line_bytes: int
    max_file_bytes: int

    @classmethod
    def from_settings(cls) -> Limits:
        return cls(
            max_lines=settings.BATCHSITE_MAX_LINES,
            max_line_bytes=settings.BATCHSITE_MAX_LINE_KB * 1024,
            max_file_bytes=settings.BATCHSITE_MAX_UPLOAD_MB * 1024 * 1024,
        )


@dataclass
class Request:
    line: int
    custom_id: str
    body: dict
    input_row: list[str] | None = None

    def as_batch_line(self, url: str) -> dict:
        return {"custom_id": self.custom_id, "method": "POST", "url": url, "body": self.body}


class Errors:
    """Collects up to MAX_ERRORS errors and counts the rest."""

    def __init__(self) -> None:
        self.items: list[LineError] = []
        self.count = 0

    def add(self, line: int | None, code: str, message: str, param: str | None = None) -> None:
        self.count += 1
        if len(self.items) < MAX_ERRORS:
            # Messages quote the file; a 10 MB cell must not make a 10 MB message a hundred times over.
            if len(message) > 1000:
                message = message[:1000] + "…"
            self.items.append(LineError(line, code, message, param))

    def __bool__(self) -> bool:
        return self.count > 0


def short(text: str, limit: int = 100) -> str:
    """A value quoted in a message, cut to a length a person reads."""
    return repr(text if len(text) <= limit else text[:limit] + "…")


_TWO_WORDS = struct.Struct("<QQ")


class SeenIds:
    """The custom_ids met so far, each with the line it was first met on, in ~30 bytes an id.

    A dict of the ids themselves costs ~120 bytes a line plus the id (a 1M-line file: 120+ MB, and
    ids may be 1 KB each). Here an id is its 128-bit blake2b digest (the odds of two of a million
    ids colliding are ~1e-27), kept in flat arrays in insertion order and found through an
    open-addressing table of entry numbers: the layout of CPython's own dict, without the objects.
    """

    def __init__(self) -> None:
        self._digests = array("Q")  # two words per id
        self._lines = array("I")
        self._slots = array("I", [0]) * 1024  # entry number + 1, or 0 for an empty slot
        self._mask = len(self._slots) - 1

    def first_line(self, custom_id: str, line: int) -> int | None:
        """The line custom_id was first met on; None if it is new (it is then recorded at `line`)."""
        high, low = _TWO_WORDS.unpack(blake2b(custom_id.encode(), digest_size=16).digest())
        slots, digests, mask = self._slots, self._digests, self._mask
        i = low & mask
        while entry := slots[i]:
            if digests[2 * entry - 1] == low and digests[2 * entry - 2] == high:
                return self._lines[entry - 1]
            i = (i + 1) & mask
        digests.append(high)
        digests.append(low)
        self._lines.append(line)
        slots[i] = len(self._lines)
        if 2 * len(self._lines) > len(slots):  # linear probing stays short below half full
            self._grow()
        return None

    def _grow(self) -> None:
        slots = self._slots = array("I", [0]) * (2 * len(self._slots))
        mask = self._mask = len(slots) - 1
        for entry, low in enumerate(self._digests[1::2], start=1):
            i = low & mask
            while slots[i]:
                i = (i + 1) & mask
            slots[i] = entry


def read_lines(path: Path, limits: Limits, errors: Errors) -> Iterator[tuple[int, str]]:
    """(line number, decoded text) for each line, checking encoding, line size and line count.

    A line is read up to the limit and no further: the rest of an over-long one (a 500 MB file
    without a newline, say) is skipped a chunk at a time, never held in memory.
    """
    with open(path, "rb") as f:
        if f.read(3) != b"\xef\xbb\xbf":
            f.seek(0)
        for number in itertools.count(1):
            raw = f.readline(limits.max_line_bytes + 1)
            if not raw:
                return
            if number > limits.max_lines:
                errors.add(
                    number,
                    "too_many_lines",
                    f"The file has more than {limits.max_lines:,} lines, the limit of this installation.",
                )
                return
            if len(raw) > limits.max_line_bytes:
                size = len(raw)
                while not raw.endswith(b"\n") and (raw := f.readline(SKIP_CHUNK)):
                    size += len(raw)
                errors.add(
                    number, "line_too_long", f"Line {number} is {size:,} bytes; the limit is {limits.max_line_bytes:,}."
                )
                continue
            if b"\x00" in raw:  # binary, not text; and Postgres stores no NUL (a CSV header becomes Job.columns)
                errors.add(number, "invalid_encoding", f"Line {number} holds a NUL byte: this is not a text file.")
                continue
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                errors.add(
                    number,
                    "invalid_encoding",
                    f"Line {number} is not valid UTF-8 (byte {e.start + 1}). Save the file as UTF-8.",
                )
