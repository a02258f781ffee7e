"""The raw queries behind what clients poll (a job page's progress, GET /v1/batches): compiling the ORM's
select_related query would cost such a poll more CPU than all the rest of its answer (bench/polling.py)."""

from collections.abc import Collection, Sequence
from functools import cache
from typing import Any, TypeVar

from django.db import connection
from django.db.models import ForeignKey, Model

M = TypeVar("M", bound=Model)


def columns(model: type[Model], skip: Collection[str] = (), table: str = "") -> str:
    """The model's columns as a SELECT list, without the fields named in `skip` (they load if ever read)."""
    q = connection.ops.quote_name
    prefix = f"{table}." if table else ""
    return ", ".join(f"{prefix}{q(f.column)}" for f in model._meta.concrete_fields if f.name not in skip)


def with_parent(
    model: type[M],
    field: str,
    values: Sequence,
    parent: str,
    parent_fields: tuple[str, ...],
    skip: tuple[str, ...] = (),
) -> list[M]:
    """The rows of `model` whose `field` is one of `values`, each with its foreign key `parent` set to an
    instance holding only its key and `parent_fields`: one query, joined."""
    if not values:
        return []
    select, fk = _select(model, field, parent, parent_fields, skip)
    marks = ", ".join(["%s"] * len(values))
    rows = list(model._default_manager.raw(f"{select} IN ({marks})", list(values)))
    parent_model, key = fk.target_field.model, fk.target_field.attname
    for row in rows:
        known: dict[str, Any] = {key: getattr(row, fk.attname)}
        known.update((name, getattr(row, f"{parent}__{name}")) for name in parent_fields)
        names = [f.attname for f in parent_model._meta.concrete_fields if f.attname in known]  # from_db's order
        setattr(row, parent, parent_model.from_db(row._state.db, names, [known[n] for n in names]))
    return rows


@cache
def _select(
    model: type[Model], field: str, parent: str, parent_fields: tuple[str, ...], skip: tuple[str, ...]
) -> tuple[str, ForeignKey]:
    """The query up to its list of values, made once per process: the table is `m`, the parent's `p`."""
    q = connection.ops.quote_name
    own = {f.name: f for f in model._meta.concrete_fields}
    fk = own[parent]
    assert isinstance(fk, ForeignKey)  # a OneToOneField is one too
    other = fk.target_field.model._meta
    theirs = {f.name: f for f in other.concrete_fields}
    taken = ", ".join(f"p.{q(theirs[n].column)} AS {q(f'{parent}__{n}')}" for n in parent_fields)
    select = (
        f"SELECT {columns(model, skip, 'm')}, {taken} FROM {q(model._meta.db_table)} m "
        f"JOIN {q(other.db_table)} p ON p.{q(fk.target_field.column)} = m.{q(fk.column)} "
        f"WHERE m.{q(own[field].column)}"
    )
    return select, fk
