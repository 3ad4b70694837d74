"""API keys: random secrets shown once, stored as SHA-256 hashes."""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from common.db import rows_changed
from common.errors import NotFound, Unauthorized
from common.models import ApiKey, new_id, utcnow

KEY_PREFIX = "gq-"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(session: Session, *, owner: str, name: str = "") -> tuple[ApiKey, str]:
    """A new key for owner; the plain key is returned once and never stored."""
    plain = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(id=new_id("key_"), key_hash=hash_key(plain), owner=owner, name=name)
    session.add(row)
    session.commit()
    return row, plain


def owner_of(session: Session, key: str) -> str:
    """The owner a live key belongs to, else Unauthorized."""
    # two columns, not the ORM row: every request asks
    row = session.execute(select(ApiKey.owner, ApiKey.revoked_at)
                          .where(ApiKey.key_hash == hash_key(key))).first()
    if row is None or row.revoked_at is not None:
        raise Unauthorized("invalid or revoked API key")
    return str(row.owner)


def revoke_key(session: Session, *, key_id: str) -> None:
    n = rows_changed(
        session,
        update(ApiKey).where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None)).values(
            revoked_at=utcnow()
        ),
    )
    session.commit()
    if n == 0:
        raise NotFound(f"no live key {key_id!r}", param="key_id")


def list_keys(session: Session) -> list[ApiKey]:
    return list(session.scalars(select(ApiKey).order_by(ApiKey.created_at)))
