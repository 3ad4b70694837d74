"""Long-polls: a read held until the job it shows has finished, woken by finish notices.

One thread per API process subscribes to the notices (common/notices.py) and wakes the
requests waiting on that job. Another re-reads SQL every RECHECK_S seconds, one query for
every job waited on in this process, and wakes the waiters of those that finished, so a
lost notice or an unreachable Redis delays a waiter by that much at most. A waiting
request holds no database connection and no thread: it reads when it starts and once
more when woken or at its deadline, however many requests wait.

Held requests and event streams are capped per owner (GENQ_MAX_HELD_PER_OWNER, in each
API process): one key holder's hundreds of waits get a 429, not every thread and
connection of the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Annotated, TypeVar

from fastapi import Query
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from common.config import get_settings
from common.db import session_factory
from common.errors import RateLimited
from common.models import FINISHED, Job
from common.notices import CHANNEL, RECHECK_S, redis_client

log = logging.getLogger(__name__)

T = TypeVar("T")
MAX_WAIT_S = 60.0

WaitSeconds = Annotated[float, Query(
    ge=0, le=MAX_WAIT_S,
    description="Long-poll: hold the answer until the job has finished, at most this many "
                "seconds (0: answer at once).",
)]


class FinishWaiters:
    """The requests of this API process waiting on jobs, by job id."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: dict[str, set[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = {}
        self._listener: threading.Thread | None = None

    @contextlib.contextmanager
    def watch(self, job_id: str) -> Iterator[asyncio.Event]:
        """An event set when job_id's finish notice arrives while the block runs."""
        entry = (asyncio.get_running_loop(), asyncio.Event())
        with self._lock:
            self._waiting.setdefault(job_id, set()).add(entry)
            if self._listener is None:
                self._listener = threading.Thread(target=self._listen, name="finish-notices",
                                                  daemon=True)
                self._listener.start()
                threading.Thread(target=self._recheck, name="finish-recheck",
                                 daemon=True).start()
        try:
            yield entry[1]
        finally:
            with self._lock:
                entries = self._waiting.get(job_id, set())
                entries.discard(entry)
                if not entries:
                    self._waiting.pop(job_id, None)

    def _listen(self) -> None:
        while True:
            pubsub = redis_client().pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(CHANNEL)
                while True:
                    message = pubsub.get_message(timeout=RECHECK_S)
                    if message is not None:
                        self._wake(message["data"].decode())
            except Exception as exc:  # Redis away: waiters re-read SQL meanwhile
                log.debug("finish notices: %s; subscribing again", exc)
                time.sleep(RECHECK_S)
            finally:
                pubsub.close()

    def _recheck(self) -> None:
        """Every RECHECK_S, one SQL read of which waited-on jobs have finished."""
        while True:
            time.sleep(RECHECK_S)
            with self._lock:
                ids = list(self._waiting)
            if not ids:
                continue
            try:
                with session_factory()() as session:
                    done = list(session.scalars(select(Job.id).where(
                        Job.id.in_(ids), Job.status.in_(FINISHED))))
            except Exception as exc:  # database blip: the waiters' deadlines still hold
                log.debug("finish recheck: %s", exc)
                continue
            for job_id in done:
                self._wake(job_id)

    def _wake(self, job_id: str) -> None:
        with self._lock:
            entries = list(self._waiting.get(job_id, ()))
        for loop, event in entries:
            with contextlib.suppress(RuntimeError):  # its loop has closed
                loop.call_soon_threadsafe(event.set)


waiters = FinishWaiters()


async def until_event(event: asyncio.Event, seconds: float) -> None:
    """Return when the event is set or after `seconds`, whichever comes first; clear it."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), timeout=seconds)
    event.clear()


async def read_when_finished(job_id: str, read: Callable[[], T], finished: Callable[[T], bool],
                             wait_s: float, *, owner: str, session: Session | None = None) -> T:
    """read() (a blocking database read) now, or once it shows the job finished, or after
    wait_s seconds, whichever comes first. `session`, the one read() uses, is closed after
    each read: no connection is held while the poll waits. A wait counts against owner's
    cap of held requests."""
    if session is not None:
        read = _closing(session, read)
    if wait_s <= 0:
        return await run_in_threadpool(read)
    with held.hold(owner):
        return await _held_read(job_id, read, finished, wait_s)


async def _held_read(job_id: str, read: Callable[[], T], finished: Callable[[T], bool],
                     wait_s: float) -> T:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    with waiters.watch(job_id) as notice:  # watching before the first read: no notice missed
        out = await run_in_threadpool(read)
        while not finished(out) and (left := deadline - loop.time()) > 0:
            await until_event(notice, left)  # a notice, the shared recheck or the deadline
            out = await run_in_threadpool(read)
    return out


class HeldRequests:
    """How many held requests and event streams each owner has open in this process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: Counter[str] = Counter()

    def take(self, owner: str) -> Callable[[], None]:
        """Count one more for owner, or 429 past the cap; returns its release (idempotent)."""
        cap = get_settings().max_held_per_owner
        with self._lock:
            if cap and self._open[owner] >= cap:
                raise RateLimited(
                    f"{cap} held requests (?wait=) and event streams are open for this key "
                    "holder already; wait for one to end, or read without ?wait=",
                    retry_after_s=int(RECHECK_S) or 1)
            self._open[owner] += 1
        released = threading.Event()

        def release() -> None:
            if not released.is_set():
                released.set()
                with self._lock:
                    self._open[owner] -= 1
                    if self._open[owner] <= 0:
                        del self._open[owner]

        return release

    @contextlib.contextmanager
    def hold(self, owner: str) -> Iterator[None]:
        release = self.take(owner)
        try:
            yield
        finally:
            release()


held = HeldRequests()


def _closing(session: Session, read: Callable[[], T]) -> Callable[[], T]:
    def read_then_close() -> T:
        try:
            return read()
        finally:
            session.close()

    return read_then_close
