"""Finish notices over Redis pub/sub, so whoever waits on a job (a long-poll, an event
stream) wakes the moment it ends instead of at its next poll.

Best effort by design: job state lives in SQL, and a waiter re-reads SQL every
RECHECK_S seconds, so a notice lost to a Redis blip costs a waiter at most that long.
"""

from __future__ import annotations

import logging
from functools import lru_cache

import redis

from common.config import get_settings

log = logging.getLogger(__name__)

CHANNEL = "genq:finished"  # message: the id of a job (or batch) that has just finished
RECHECK_S = 1.0  # how stale a waiter's view may get when notices are lost


@lru_cache
def redis_client() -> redis.Redis:
    """This process's client of the broker's Redis (redis-py reconnects after a fork)."""
    return redis.Redis.from_url(
        get_settings().broker_url, socket_timeout=2, socket_connect_timeout=2
    )


def announce_finished(job_id: str) -> None:
    """Tell waiters that job_id has reached a final status (already committed in SQL)."""
    try:
        redis_client().publish(CHANNEL, job_id)
    except Exception as exc:  # waiters fall back to their SQL re-check
        log.debug("finish notice for %s not sent: %s", job_id, exc)
