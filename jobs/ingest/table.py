"""A CSV (or TSV) file + a prompt template -> requests, one a row, or errors that name their line.

The header names the columns the template's `{{ }}` placeholders fill from; rows may span lines
(quoted cells), so each row is numbered by the file line it starts on.
"""

from __future__ import annotations

import csv
import itertools
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from jobs.ingest.lines import Errors, Limits, Request, SeenIds, read_lines
from jobs.ingest.template import (
    Template,
    _render,
    check_template,
    placeholder_uses,
    rendered_bytes,
    template_body_base,
)

MAX_COLUMNS = 16_384  # Excel's limit; a header line of commas would otherwise name millions


def _sniff_delimiter(header: str) -> str:
    counts = {d: header.count(d) for d in (",", ";", "\t", "|")}
    best = max(counts, key=counts.__getitem__)
    return best if counts[best] else ","


class _RowStarts:
    """The text lines for csv.reader, noting the file line each row starts on.

    reader.line_num counts the lines the reader was given, so it falls behind the file after a
    line that read_lines() skipped (bad UTF-8, too long); the numbers have to come from read_lines().
    """

    def __init__(self, numbered: Iterator[tuple[int, str]], limit: int):
        self._numbered = numbered
        self.start: int | None = None  # set by the first line of the next row
        # A row may be as long as a line: csv limits each cell, not how many quoted cells spread
        # over lines one row holds.
        self._limit = limit
        self._size = 0

    def __iter__(self):
        return self

    def __next__(self) -> str:
        number, text = next(self._numbered)
        if self.start is None:
            self.start, self._size = number, 0
        self._size += len(text)
        if self._size > self._limit:
            raise csv.Error(f"the row is longer than {self._limit:,} characters, the line limit")
        return text

    def read_row(self, reader) -> tuple[int, list[str]] | None:
        """(first line, cells) of the next row, None at the end; raises csv.Error."""
        self.start = None
        row = next(reader, None)
        if row is None:
            return None
        assert self.start is not None  # the reader took at least one line for the row
        return self.start, row


def csv_requests(
    path: Path, template: Template, limits: Limits, errors: Errors, columns_out: list
) -> Iterator[Request]:
    # A cell may be as long as a line may be, where csv's default stops it at 128 KB. The limit is
    # process-wide, but every caller sets it from the same settings; it still stops a stray quote
    # from reading the rest of the file into one cell.
    csv.field_size_limit(limits.max_line_bytes)
    numbered = read_lines(path, limits, errors)
    first = next(numbered, None)
    if first is None:
        return
    delimiter = template.delimiter or _sniff_delimiter(first[1])
    source = _RowStarts(itertools.chain([first], numbered), limits.max_line_bytes)
    reader = csv.reader(source, delimiter=delimiter)
    try:
        header_line, header = source.read_row(reader) or (first[0], [])
    except csv.Error as e:
        errors.add(source.start, "invalid_csv", f"Line {source.start}: {e}.")
        return
    if len(header) > MAX_COLUMNS:
        message = f"Line {header_line} has {len(header):,} columns; the limit is {MAX_COLUMNS:,}."
        errors.add(header_line, "too_many_columns", message)
        return
    columns = [h.strip() or f"column_{i + 1}" for i, h in enumerate(header)]
    columns_out[:] = columns
    dupes = sorted(c for c, n in Counter(columns).items() if n > 1)
    if dupes:
        errors.add(
            header_line,
            "duplicate_column",
            f"Line {header_line}: the header repeats {', '.join(dupes)}; column names must be unique.",
        )
    if not check_template(template, columns, errors):
        return
    body_base = template_body_base(template)
    seen = SeenIds()
    row_number = 0
    # What each row fills in, counted once: a row's requests are sized before they are made (rendered_bytes).
    system = template.system_prompt if template.system_prompt.strip() else ""
    uses = {"user": placeholder_uses(template.user_prompt), "system": placeholder_uses(system)}
    used = set(uses["user"]) | set(uses["system"])
    rendered_total = 0
    while True:
        try:
            numbered_row = source.read_row(reader)
        except csv.Error as e:
            errors.add(source.start, "invalid_csv", f"Line {source.start}: {e}.")
            break
        if numbered_row is None:
            break
        number, row = numbered_row
        if not any(cell.strip() for cell in row):
            continue
        row_number += 1
        if len(row) > len(columns):
            errors.add(
                number,
                "too_many_cells",
                f"Line {number} has {len(row)} cells but the header has {len(columns)}. Check the delimiter and quotes.",
            )
            continue
        row = row + [""] * (len(columns) - len(row))  # missing trailing cells are empty
        cells = dict(zip(columns, row))
        if template.custom_id_column:
            custom_id = cells[template.custom_id_column].strip()
            if not custom_id:
                errors.add(
                    number, "invalid_custom_id", f"Line {number}: column {template.custom_id_column!r} is empty."
                )
                continue
            if len(custom_id.encode()) > 1024:
                errors.add(number, "invalid_custom_id", f"Line {number}: the custom_id is longer than 1,024 bytes.")
                continue
        else:
            custom_id = f"row-{row_number}"
        if earlier := seen.first_line(custom_id, number):
            errors.add(
                number,
                "duplicate_custom_id",
                f"Line {number}: custom_id {custom_id!r} is already used on line {earlier}.",
            )
            continue
        # The model and the prompt first, then the settings: the previews and item pages show the
        # filled-in prompt at the top, not below a long JSON schema.
        body = {"model": body_base["model"]}
        if template.url == "/v1/embeddings":
            text = cells[template.input_column]
            if not text.strip():
                errors.add(number, "empty_input", f"Line {number}: column {template.input_column!r} is empty.")
                continue
            body["input"] = text
        else:
            sizes = {name: len(cells[name].encode()) for name in used if name in cells}
            size = rendered_bytes(template.user_prompt, uses["user"], sizes) + rendered_bytes(
                system, uses["system"], sizes
            )
            if size > limits.max_line_bytes:
                errors.add(
                    number,
                    "request_too_large",
                    f"Line {number}: the prompt filled in with this row would take {size:,} bytes; the limit is "
                    f"{limits.max_line_bytes:,} (BATCHSITE_MAX_LINE_KB). Use each column fewer times.",
                )
                continue
            rendered_total += size
            if rendered_total > limits.max_file_bytes:
                errors.add(
                    number,
                    "job_too_large",
                    f"Line {number}: the prompts filled in up to this row take more than {limits.max_file_bytes:,} "
                    "bytes, the most one job may hold (BATCHSITE_MAX_UPLOAD_MB). Split the file.",
                )
                break
            user = _render(template.user_prompt, cells)
            if not user.strip():
                errors.add(number, "empty_prompt", f"Line {number}: the prompt is empty for this row.")
                continue
            messages = []
            if system:
                messages.append({"role": "system", "content": _render(system, cells)})
            messages.append({"role": "user", "content": user})
            body["messages"] = messages
        body.update((key, value) for key, value in body_base.items() if key not in body)
        yield Request(number, custom_id, body, row)
