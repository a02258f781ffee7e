"""The second pass: a Plan without errors -> the Job and all its Items, in one transaction; or, for a job
made before its file was validated (an API batch, `validating`), its Items.

The file is read again rather than kept in memory, and the items go in by chunks of raw
executemany INSERTs rather than bulk_create (see _insert_items).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from pathlib import Path

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from jobs.ingest.plan import Plan
from jobs.ingest.template import Template
from jobs.models import Item, Job, ledger

CHUNK = 5000


@dataclass(frozen=True)
class RunOptions:
    """How a job runs, whichever way it was launched (review page, /v1 batch, a test): declared once here, so
    a new option is a field below and a line where the form or the API reads it."""

    mode: str = Job.Mode.LIVE
    deadline: datetime | None = None  # hybrid only
    metadata: dict = field(default_factory=dict)
    max_attempts: int = 5
    output_retries: int = 2
    use_cache: bool = False
    notify: bool = True
    cost_cap: Decimal | None = None

    def job_fields(self) -> dict:
        """The Job fields these options set."""
        return dict(
            mode=self.mode,
            deadline=self.deadline,
            metadata=dict(self.metadata),  # a copy: the default RunOptions() is one shared instance
            max_attempts=self.max_attempts,
            output_retries=self.output_retries,
            use_cache=self.use_cache,
            notify=self.notify,
            cost_cap=self.cost_cap,
        )


def create_job(plan: Plan, *, owner, name: str = "", endpoint=None, options: RunOptions = RunOptions()) -> Job:
    """One transaction: the Job and all its Items, or nothing."""
    if not plan.ok:
        raise ValueError("A plan with errors cannot become a job.")
    Job.check_room(owner)
    with transaction.atomic():
        job = Job.objects.create(
            owner=owner,
            name=(name or Path(plan.source_name).stem or "Untitled job")[:200],
            url=plan.url,
            endpoint=endpoint,
            source_name=plan.source_name[:255],
            source_format=plan.format,
            source_file=str(_relative(plan.path)),
            template=_stored(plan.template),
            created_at=timezone.now(),
            **options.job_fields(),
            **_counts(plan),
        )
        _insert_items(job.pk, plan)
    return job


def _stored(template: Template | None) -> dict:
    """The template as the job keeps it, its JSON schema parsed (a form gives it as text)."""
    if template is not None and isinstance(template.json_schema, str) and template.json_schema.strip():
        template = Template.from_dict({**template.as_dict(), "json_schema": json.loads(template.json_schema)})
    return template.as_dict() if template else {}


def create_job_to_validate(
    path: Path,
    *,
    owner,
    name: str,
    url: str,
    source_name: str,
    endpoint=None,
    format: str = Job.Format.JSONL,
    template: Template | None = None,
    options: RunOptions = RunOptions(),
) -> Job:
    """A job whose file a worker validates later (Job.validate_later): `validating`, with no items yet. A CSV
    job keeps its template, which the validation renders each row with."""
    Job.check_room(owner)
    return Job.objects.create(
        owner=owner,
        name=name[:200],
        url=url,
        endpoint=endpoint,
        status=Job.Status.VALIDATING,
        source_name=source_name[:255],
        source_format=format,
        source_file=str(_relative(path)),
        template=_stored(template),
        created_at=timezone.now(),
        **options.job_fields(),
    )


def add_items(job: Job, plan: Plan, progress: Callable[[int], object] | None = None) -> None:
    """The Items of a job made before its file was validated, and the counts and model they give it: all in
    one transaction, so a crash leaves the job without any."""
    if not plan.ok:
        raise ValueError("A plan with errors cannot fill a job.")
    fields = dict(model=plan.model, columns=plan.columns, est_input_tokens=plan.est_input_tokens)
    with ledger.open(job.pk) as books:  # its books open with every item pending
        Job.objects.filter(pk=job.pk).update(**fields)
        _insert_items(job.pk, plan, progress)
        books.count(total=plan.count, n_pending=plan.count)
    for name, value in {**fields, "total": job.total + plan.count, "n_pending": job.n_pending + plan.count}.items():
        setattr(job, name, value)


def _counts(plan: Plan) -> dict:
    """The fields of a new Job that come from its validated requests: its books open with every item pending."""
    return dict(
        model=plan.model,
        columns=plan.columns,
        total=plan.count,
        n_pending=plan.count,
        est_input_tokens=plan.est_input_tokens,
    )


def _insert_items(job_id: int, plan: Plan, progress: Callable[[int], object] | None = None) -> None:
    """INSERT the plan's requests as the job's items: in chunks with executemany, or on Postgres with COPY.

    bulk_create spends ~90% of its time turning each value into SQL parameters one field at a
    time; the values here are plain strings and ints, and every other column takes its default.
    On Postgres executemany still sends one INSERT a row (90 s for a million items, against 24 s
    on SQLite); COPY streams the rows.
    """
    given = ("job_id", "line", "custom_id", "body", "input_row", "est_tokens")
    defaults = Item.column_defaults(given)
    columns = [*given, *defaults]
    constants = tuple(defaults.values())
    quote = connection.ops.quote_name
    dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
    estimates = plan.est_tokens
    rows = (
        (
            job_id,
            request.line,
            request.custom_id,
            dumps(request.body),
            dumps(request.input_row) if request.input_row is not None else "",
            estimates[i] if i < len(estimates) else 0,
        )
        for i, request in enumerate(plan.requests())
    )
    table, names = quote(Item._meta.db_table), ", ".join(quote(c) for c in columns)
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            with cursor.cursor.copy(f"COPY {table} ({names}) FROM STDIN") as copy:
                for n, row in enumerate(rows, start=1):
                    copy.write_row(row + constants)
                    if progress is not None and n % CHUNK == 0:
                        progress(n)
            return
        sql = f"INSERT INTO {table} ({names}) VALUES ({', '.join(['%s'] * len(columns))})"
        done = 0
        while chunk := list(itertools.islice(rows, CHUNK)):
            cursor.executemany(sql, [row + constants for row in chunk])
            done += len(chunk)
            if progress is not None:
                progress(done)


def _relative(path: Path) -> Path:
    try:
        return Path(path).resolve().relative_to(settings.DATA_DIR)
    except ValueError:
        return Path(path)
