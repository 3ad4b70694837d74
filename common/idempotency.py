"""Idempotency-Key: a create sent again with its key answers the first object, never a second."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from common.errors import Conflict
from common.models import Job

T = TypeVar("T")


def earlier_create(session: Session, *, owner: str, key: str, spec: dict[str, Any]) -> Job | None:
    """The job this owner created with `key`, if any; 409 if it was for another request."""
    existing = session.scalar(select(Job).where(Job.owner == owner, Job.idempotency_key == key))
    if existing is not None and existing.spec != spec:
        raise Conflict("Idempotency-Key was used with a different request",
                       code="idempotency_conflict", param="Idempotency-Key")
    return existing


def create_once(
    session: Session,
    *,
    owner: str,
    key: str | None,
    spec: dict[str, Any],
    create: Callable[[], T],
    replay: Callable[[Job], T],
) -> T:
    """`create()` unless `key` was seen; a racing create with the same key loses at the unique
    (owner, idempotency_key) index and answers what the winner created."""
    if key is None:
        return create()
    existing = earlier_create(session, owner=owner, key=key, spec=spec)
    if existing is not None:
        return replay(existing)
    try:
        return create()
    except IntegrityError:
        session.rollback()
        existing = earlier_create(session, owner=owner, key=key, spec=spec)
        if existing is None:
            raise
        return replay(existing)
