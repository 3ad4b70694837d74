"""What a running job sees of the queue: its row, a heartbeat thread, progress and stop flags."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
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


@dataclass
class JobContext:
    """One attempt of one job inside a worker process."""

    job: Job
    task: Any  # the bound Celery task, for Flower events
    session: Session = field(init=False)
    storage: Storage = field(init=False)
    _done: int = 0
    _total: int = 0
    _metrics: dict[str, Any] = field(default_factory=dict)
    _signals: jobs.Signals = field(default_factory=jobs.Signals)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _last_event: float = 0.0
    _started: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.session = session_factory()()
        self.storage = get_storage()
        self._total = self.job.progress_total
        self._done = self.job.progress_done
        self._thread = threading.Thread(target=self._watch, name=f"hb-{self.job.id}", daemon=True)

    @property
    def settings(self):  # type: ignore[no-untyped-def]
        return get_settings()

    @property
    def workdir(self) -> Path:
        path = get_settings().home_dir / "work" / self.job.id / f"attempt-{self.job.attempt}"
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def cache_dir(self) -> Path:
        return get_settings().home_dir / "cache"

    def __enter__(self) -> JobContext:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_heartbeat()
        self.session.close()

    def release_connection(self) -> None:
        """End the session's read transaction before long work without SQL (building and
        training a model, loading one): its connection goes back to the pool, and the next
        statement takes one afresh, pinged first. A connection held idle through the work is
        one a database restart or outage (or PostgreSQL's idle_in_transaction_session_timeout)
        cuts, and the job's next write failed on it, as `internal_error`, with the database
        long back. Every write of a job commits at once, so only reads are ended here."""
        self.session.commit()

    def stop_heartbeat(self) -> None:
        """Stop the side thread and write the last progress while the attempt still owns the row."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(timeout=10)
        self._beat_once()

    # -- side thread, with its own session: flags every FLAG_POLL_S, heartbeat every heartbeat_s.
    # The step itself only reads a variable, so watching costs the training loop nothing.
    def _watch(self) -> None:
        beat_every = get_settings().heartbeat_s
        next_beat = time.monotonic() + beat_every
        with session_factory()() as session:
            self._side_session = session
            while not self._stop.wait(min(FLAG_POLL_S, beat_every)):
                if time.monotonic() >= next_beat:
                    next_beat = time.monotonic() + beat_every
                    self._beat_once()
                else:
                    self._poll_flags()

    def _beat_once(self) -> None:
        session = getattr(self, "_side_session", None) or self.session
        with self._lock:
            done, total, metrics = self._done, self._total, dict(self._metrics)
        try:
            signals = jobs.heartbeat(session, self.job, done=done, total=total, metrics=metrics)
        except Exception as exc:  # a database blip must not kill the job; the lease covers it
            session.rollback()
            log.warning("job %s: heartbeat failed: %s", self.job.id, exc)
            return
        self._signals = signals

    def _poll_flags(self) -> None:
        session = self._side_session
        try:
            self._signals = jobs.read_signals(session, self.job)
        except Exception as exc:  # a database blip: the last flags still stand
            session.rollback()
            log.debug("job %s: flag poll failed: %s", self.job.id, exc)

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
        """Record progress (written by the heartbeat) and tell Flower about once a second."""
        with self._lock:
            self._done, self._total = done, total
            if metrics:
                self._metrics = {k: round(float(v), 6) for k, v in metrics.items()}
        now = time.monotonic()
        if now - self._last_event >= 1.0 or done == total:
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
