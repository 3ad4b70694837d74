"""A quick broker check so a create can answer 503 before accepting work it cannot queue."""

from __future__ import annotations

from functools import lru_cache

import redis

from common.config import get_settings
from common.errors import Unavailable


@lru_cache
def _client() -> redis.Redis:
    return redis.Redis.from_url(
        get_settings().broker_url, socket_timeout=2, socket_connect_timeout=2
    )


def broker_ok() -> bool:
    try:
        return bool(_client().ping())
    except Exception:
        return False


def require_broker() -> None:
    """Raise 503 while the broker is unreachable; nothing is written."""
    if not broker_ok():
        raise Unavailable(
            "the job broker (Redis) is unreachable; nothing was queued, try again shortly",
            code="broker_unavailable",
        )
