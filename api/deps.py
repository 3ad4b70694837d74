"""Request dependencies: a database session and the caller's owner (API key + rate limit)."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from api.errors import json_type
from common.auth import hash_key, owner_of
from common.config import get_settings
from common.db import session_factory
from common.errors import RateLimited, TooLarge, Unauthorized


def get_session() -> Iterator[Session]:
    session = session_factory()()
    try:
        yield session
    finally:
        session.close()


SessionDep = Annotated[Session, Depends(get_session)]


class RateLimiter:
    """A per-key token bucket (per API process)."""

    def __init__(self) -> None:
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, key: str, per_minute: int) -> bool:
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(key, (float(per_minute), now))
            tokens = min(float(per_minute), tokens + (now - last) * per_minute / 60.0)
            if tokens < 1:
                self._buckets[key] = (tokens, now)
                return False
            self._buckets[key] = (tokens - 1, now)
            return True


limiter = RateLimiter()


def get_owner(request: Request, session: SessionDep) -> str:
    """The owner of the Bearer key; 401 without one, 429 past the rate limit."""
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Unauthorized("missing API key: send Authorization: Bearer <key>")
    owner = owner_of(session, key.strip())
    per_minute = get_settings().rate_limit_per_minute
    if per_minute and not limiter.take(hash_key(key.strip()), per_minute):
        raise RateLimited(f"more than {per_minute} requests a minute for this key",
                          retry_after_s=math.ceil(60 / per_minute))
    return owner


OwnerDep = Annotated[str, Depends(get_owner)]


def limit_json_body(request: Request) -> None:
    """413 for a JSON body over GENQ_MAX_JSON_BYTES, before it is read (uploads are streamed)."""
    if not json_type(request.headers.get("content-type", "")):
        return  # uploads stream under their own cap; any other body is capped as it is read
    size = request.headers.get("content-length")
    cap = get_settings().max_json_bytes
    if size and size.isdigit() and int(size) > cap:
        raise TooLarge(f"request body is {int(size)} bytes; the limit is {cap}", param="body")
