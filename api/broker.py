"""A quick broker check so a create can answer 503 before accepting work it cannot queue."""

from __future__ import annotations

from common.errors import Unavailable
from common.notices import redis_client


def broker_ok() -> bool:
    try:
        return bool(redis_client().ping())
    except Exception:
        return False


def require_broker() -> None:
    """Raise 503 while the broker is unreachable; nothing is written."""
    if not broker_ok():
        raise Unavailable(
            "the job broker (Redis) is unreachable; nothing was queued, try again shortly",
            code="broker_unavailable",
        )
