"""Long-polls: a read held until the job it shows has finished, woken by finish notices.

One thread per API process subscribes to the notices (common/notices.py) and wakes the
requests waiting on that job. A waiter also re-reads SQL every RECHECK_S seconds, so a
lost notice or an unreachable Redis delays it by that much at most, never past its wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Annotated, TypeVar

from fastapi import Query
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

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
                             wait_s: float, *, session: Session | None = None) -> T:
    """read() (a blocking database read) now, or once it shows the job finished, or after
    wait_s seconds, whichever comes first. `session`, the one read() uses, is closed after
    each read: no connection is held while the poll waits."""
    if session is not None:
        read = _closing(session, read)
    if wait_s <= 0:
        return await run_in_threadpool(read)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    with waiters.watch(job_id) as notice:  # watching before the first read: no notice missed
        out = await run_in_threadpool(read)
        while not finished(out) and (left := deadline - loop.time()) > 0:
            await until_event(notice, min(left, RECHECK_S))
            out = await run_in_threadpool(read)
    return out


def _closing(session: Session, read: Callable[[], T]) -> Callable[[], T]:
    def read_then_close() -> T:
        try:
            return read()
        finally:
            session.close()

    return read_then_close
