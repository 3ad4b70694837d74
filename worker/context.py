"""What a running job sees of the queue: its row, a heartbeat thread, progress and stop flags."""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from sqlalchemy import insert
from sqlalchemy.orm import Session

from common import jobs
from common.config import get_settings
from common.db import session_factory
from common.errors import StopReason
from common.models import Job, JobLog, Metric, utcnow
from common.storage import Storage, get_storage

log = logging.getLogger(__name__)
FLAG_POLL_S = 0.2  # how stale a cancel / shutdown flag may be when a step reads it


class Watcher:
    """The pool process's side thread, with a session of its own: it reads the running job's
    stop flags every FLAG_POLL_S and refreshes its lease every heartbeat_s, so a step only
    reads a variable and watching costs the training loop nothing.

    One thread serves every job the process runs, started with its first: a thread and a
    session a job cost a small job more than its own work. A job that ends before its
    first look (FLAG_POLL_S) costs the watcher nothing: no statement (its final progress
    lands with its status) and, in a stream of jobs, not even a wake-up, since the thread
    is woken only from idle and otherwise wakes when its current job's next look is due."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._busy = threading.Lock()  # held while a look at the current job runs
        self._ctx: JobContext | None = None
        self._idle = False  # waiting for a job, with no timeout
        self._thread: threading.Thread | None = None

    def watch(self, ctx: JobContext) -> None:
        with self._changed:
            self._ctx = ctx
            if self._idle:
                self._changed.notify()
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="job-watcher", daemon=True)
            self._thread.start()

    def release(self, ctx: JobContext) -> None:
        """Stop watching ctx; returns once no look at it is under way."""
        with self._busy, self._changed:
            if self._ctx is ctx:
                self._ctx = None

    def _run(self) -> None:
        with session_factory()() as session:
            while True:
                with self._changed:
                    while self._ctx is None:
                        self._idle = True
                        self._changed.wait()
                    self._idle = False
                    ctx = self._ctx
                    due = ctx.next_look - time.monotonic()
                    if due > 0:
                        self._changed.wait(due)
                        continue  # the job may have ended, or another begun, meanwhile
                with self._busy:
                    if self._ctx is ctx:  # not released while this thread waited for _busy
                        try:
                            ctx.look(session)
                        except Exception as exc:  # the thread serves every later job too
                            log.warning("job %s: watcher: %s", ctx.job.id, exc)


_watchers: dict[int, Watcher] = {}  # by pid: a forked process starts a watcher of its own


def watcher() -> Watcher:
    pid = os.getpid()
    if pid not in _watchers:
        _watchers[pid] = Watcher()
    return _watchers[pid]


@dataclass
class JobContext:
    """One attempt of one job inside a worker process; `session` is the task's own."""

    job: Job
    task: Any  # the bound Celery task, for Flower events
    session: Session
    _done: int = 0
    _total: int = 0
    _metrics: dict[str, Any] = field(default_factory=dict)
    _signals: jobs.Signals = field(default_factory=jobs.Signals)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _started: float = field(default_factory=time.monotonic)
    _last_event: float = 0.0
    _next_beat: float = 0.0
    _watched: bool = False
    next_look: float = 0.0  # when the watcher next reads the flags or beats (monotonic)

    def __post_init__(self) -> None:
        self._total = self.job.progress_total
        self._done = self.job.progress_done
        self._last_event = self._started
        self._next_beat = self._started + get_settings().heartbeat_s
        self.next_look = self._started + self._look_every()

    @property
    def settings(self):  # type: ignore[no-untyped-def]
        return get_settings()

    @cached_property
    def storage(self) -> Storage:
        return get_storage()

    @property
    def workdir(self) -> Path:
        path = get_settings().home_dir / "work" / self.job.id / f"attempt-{self.job.attempt}"
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def cache_dir(self) -> Path:
        return get_settings().home_dir / "cache"

    def __enter__(self) -> JobContext:
        watcher().watch(self)
        self._watched = True
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_heartbeat()

    def release_connection(self) -> None:
        """End the session's read transaction before long work without SQL (building and
        training a model, loading one): its connection goes back to the pool, and the next
        statement takes one afresh, pinged first. A connection held idle through the work is
        one a database restart or outage (or PostgreSQL's idle_in_transaction_session_timeout)
        cuts, and the job's next write failed on it, as `internal_error`, with the database
        long back. Every write of a job commits at once, so only reads are ended here."""
        self.session.commit()

    def stop_heartbeat(self) -> None:
        """Stop watching the job; no beat follows. The final progress goes with the job's
        next transition (final_progress) or, on the way out of a failure, save_progress."""
        if self._watched:
            self._watched = False
            watcher().release(self)

    def final_progress(self) -> dict[str, Any]:
        """The progress columns as the last beat would write them."""
        with self._lock:
            return {"progress_done": self._done, "progress_total": self._total,
                    "metrics": dict(self._metrics)}

    def save_progress(self) -> None:
        """Write the last progress while the attempt still owns the row (a failure's way out:
        the transition after it is not a plain finish)."""
        self._beat(self.session)

    # -- on the watcher's thread, with its session
    @staticmethod
    def _look_every() -> float:
        return min(FLAG_POLL_S, get_settings().heartbeat_s)

    def look(self, session: Session) -> None:
        """The watcher's turn: a heartbeat when one is due, else a read of the stop flags."""
        now = time.monotonic()
        self.next_look = now + self._look_every()
        if now >= self._next_beat:
            self._next_beat = now + get_settings().heartbeat_s
            self._beat(session)
            return
        try:
            self._signals = jobs.read_signals(session, self.job)
        except Exception as exc:  # a database blip: the last flags still stand
            session.rollback()
            log.debug("job %s: flag poll failed: %s", self.job.id, exc)

    def _beat(self, session: Session) -> None:
        progress = self.final_progress()
        try:
            signals = jobs.heartbeat(session, self.job, done=progress["progress_done"],
                                     total=progress["progress_total"],
                                     metrics=progress["metrics"])
        except Exception as exc:  # a database blip must not kill the job; the lease covers it
            session.rollback()
            log.warning("job %s: heartbeat failed: %s", self.job.id, exc)
            return
        self._signals = signals

    def should_stop(self) -> StopReason | None:
        """Why the job must stop now: cancel, shutdown, timeout, lost; None to go on.

        Called every step / batch; the flags it reads are at most FLAG_POLL_S old, so a
        cancel lands within that plus one step.
        """
        s = self._signals
        if s.lost:
            return StopReason.lost
        if s.cancel:
            return StopReason.cancel
        if s.shutdown or s.preempt:
            return StopReason.shutdown
        timeout = self.job.spec.get("timeout_s")
        if timeout and time.monotonic() - self._started > timeout:
            return StopReason.timeout
        return None

    @property
    def preempted(self) -> bool:
        """Whether the stop asked for is a preemption (an urgent job wants the worker)."""
        return self._signals.preempt and not self._signals.shutdown

    def progress(self, done: int, total: int, metrics: dict[str, Any] | None = None) -> None:
        """Record progress (written by the heartbeat) and tell Flower about once a second,
        from the job's first second on: the result of a job that ends sooner replaces any
        progress in Flower at once, so it sends none."""
        with self._lock:
            self._done, self._total = done, total
            if metrics:
                self._metrics = {k: round(float(v), 6) for k, v in metrics.items()}
        now = time.monotonic()
        if now - self._last_event >= 1.0 or (done == total and self._last_event > self._started):
            self._last_event = now
            self._send_progress_event(done, total, metrics or {})

    def _send_progress_event(self, done: int, total: int, metrics: dict[str, Any]) -> None:
        unit = self.job.progress_unit + "s"
        text = f"{done}/{total} {unit}"
        if "loss" in metrics:
            text += f", loss {float(metrics['loss']):.4f}"
        if "items_per_s" in metrics:
            text += f", {float(metrics['items_per_s']):.1f} items/s"
        try:
            self.task.send_event("task-progress", result=text, done=done, total=total)
        except Exception as exc:  # Flower is a view; never fail a job for it
            log.debug("progress event not sent: %s", exc)

    def write_metrics(self, step: int, values: dict[str, float]) -> None:
        rows = [
            {"job_id": self.job.id, "step": step, "name": k, "value": float(v), "at": utcnow()}
            for k, v in values.items()
        ]
        if rows:
            self.session.execute(insert(Metric), rows)
            self.session.commit()

    def log(self, message: str, level: str = "INFO") -> None:
        """A line in the job's log (GET /v1/jobs/{id}/logs) and in the worker's."""
        log.log(logging.getLevelName(level), "job %s: %s", self.job.id, message)
        self.session.add(JobLog(job_id=self.job.id, level=level, message=message))
        self.session.commit()
