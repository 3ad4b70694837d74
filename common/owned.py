"""Rows as their owner sees them: another owner's row is as missing as no row at all."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from sqlalchemy import ColumnElement, or_, select
from sqlalchemy.orm import InstrumentedAttribute, Session

from common.errors import NotFound
from common.models import Artifact, Checkpoint, File, Job, Model

Owned = TypeVar("Owned", Job, File, Model, Checkpoint, Artifact)


def get_owned(
    session: Session,
    entity: type[Owned],
    key: str,
    *,
    owner: str | None,
    what: str,
    param: str,
    by: Sequence[InstrumentedAttribute[str]] = (),
    where: Sequence[ColumnElement[bool]] = (),
    code: str | None = None,
) -> Owned:
    """The `entity` row whose id (or any column of `by`) is `key`, that `owner` owns (None:
    whoever does) and that meets `where`, else NotFound `no {what} {key!r}` naming `param`.

    Checkpoints and artifacts belong to the owner of their job.
    """
    columns = by or [entity.id]
    query = select(entity).where(or_(*(column == key for column in columns)), *where)
    if owner is not None:
        if issubclass(entity, Checkpoint | Artifact):
            query = query.join(Job, Job.id == entity.job_id).where(Job.owner == owner)
        else:
            query = query.where(entity.owner == owner)
    row = session.scalar(query)
    if row is None:
        raise NotFound(f"no {what} {key!r}", param=param, code=code)
    return row
