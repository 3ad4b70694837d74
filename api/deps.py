"""Request dependencies: a database session and the caller's owner (API key + rate limit)."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import AsyncIterator
from typing import Annotated

import anyio.to_thread
from anyio import CancelScope, CapacityLimiter
from fastapi import Depends, Request
from limits import RateLimitItemPerMinute
from limits.storage import RedisStorage
from limits.strategies import SlidingWindowCounterRateLimiter
from sqlalchemy.orm import Session

from api.errors import json_type
from common.auth import hash_key, owner_of
from common.config import get_settings
from common.db import session_factory
from common.errors import RateLimited, TooLarge, Unauthorized

log = logging.getLogger(__name__)


async def get_session() -> AsyncIterator[Session]:
    """A session for the request. Async so that it costs no thread hand-offs of its own
    (FastAPI runs a sync dependency's start and end each on its threadpool): making one
    touches no database, and closing one does only while a transaction is still open.

    That close runs on a thread as FastAPI runs a sync dependency's exit: shielded from the
    request's cancellation, and outside the threadpool's shared limit, because a close
    that waited for a thread while every thread waits for a pooled connection (the one this
    close would give back) would never run."""
    session = session_factory()()
    try:
        yield session
    finally:
        if session.in_transaction():
            with CancelScope(shield=True):
                await anyio.to_thread.run_sync(session.close, limiter=CapacityLimiter(1))
        else:
            session.close()


SessionDep = Annotated[Session, Depends(get_session)]


class RateLimiter:
    """Requests per key per minute, counted in Redis by the `limits` library (a sliding
    window), so every API process and a restarted one share one count. While Redis is
    unreachable nothing is limited: the broker check answers 503 for submissions anyway."""

    def __init__(self) -> None:
        self._strategy: SlidingWindowCounterRateLimiter | None = None
        self._lock = threading.Lock()

    def strategy(self) -> SlidingWindowCounterRateLimiter:
        with self._lock:
            if self._strategy is None:
                store = RedisStorage(get_settings().broker_url, socket_timeout=1,
                                     socket_connect_timeout=1)
                self._strategy = SlidingWindowCounterRateLimiter(store)
            return self._strategy

    def take(self, key: str, per_minute: int) -> float | None:
        """None if the request may go ahead; else seconds until the key may send again."""
        item = RateLimitItemPerMinute(per_minute)
        try:
            strategy = self.strategy()
            if strategy.hit(item, "genq-key", key):
                return None
            reset = strategy.get_window_stats(item, "genq-key", key).reset_time
        except Exception as exc:  # Redis away: serve, and say so once per failure
            log.warning("rate limit not counted (Redis unreachable): %s", exc)
            return None
        return max(1.0, reset - time.time())


limiter = RateLimiter()


def get_owner(request: Request, session: SessionDep) -> str:
    """The owner of the Bearer key; 401 without one, 429 past the rate limit.

    A key is counted before it is looked up, so a flood of one bad key is limited like a
    good one; missing and unknown keys also count against the client's address, so a
    flood of made-up keys is limited too (a valid key never counts there)."""
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        _limit_address(request)
        raise Unauthorized("missing API key: send Authorization: Bearer <key>")
    _limit(hash_key(key), "for this key")
    try:
        owner = owner_of(session, key)
    except Unauthorized:
        _limit_address(request)
        raise
    # end the read: the connection goes back to the pool now, not when the route next
    # needs a thread (held requests waiting on the pool for threads that wait on the pool
    # deadlocked a process under a few hundred of them)
    session.commit()
    return owner


def _limit(counted: str, whose: str) -> None:
    """429 with Retry-After once `counted` is past GENQ_RATE_LIMIT_PER_MINUTE."""
    per_minute = get_settings().rate_limit_per_minute
    wait_s = limiter.take(counted, per_minute) if per_minute else None
    if wait_s is not None:
        raise RateLimited(f"more than {per_minute} requests a minute {whose}",
                          retry_after_s=math.ceil(wait_s))


def _limit_address(request: Request) -> None:
    address = request.client.host if request.client else "unknown"
    _limit(f"address:{address}", "with a missing or unknown key from this address")


OwnerDep = Annotated[str, Depends(get_owner)]


async def limit_json_body(request: Request) -> None:
    """413 for a JSON body over GENQ_MAX_JSON_BYTES, before it is read (uploads are streamed)."""
    if not json_type(request.headers.get("content-type", "")):
        return  # uploads stream under their own cap; any other body is capped as it is read
    size = request.headers.get("content-length")
    cap = get_settings().max_json_bytes
    if size and size.isdigit() and int(size) > cap:
        raise TooLarge(f"request body is {int(size)} bytes; the limit is {cap}", param="body")
