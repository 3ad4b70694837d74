"""Worker start-up: registration, the reaper thread, soft shutdown and fork hygiene."""

from __future__ import annotations

import gc
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from billiard.einfo import ExceptionWithTraceback
from billiard.exceptions import WorkerLostError
from celery import signals
from celery.worker.request import Request
from celery.worker.state import task_ready
from sqlalchemy.orm import Session

from common import fleet, jobs
from common.batches.finalize import finalize_stalled
from common.celery_app import fetched_unacked, get_celery, messages_waiting
from common.config import get_settings
from common.db import get_engine, session_factory
from common.dispatch import release_held, release_shards
from common.errors import Conflict
from common.jobs import pid_alive
from common.models import Worker
from common.storage import get_storage
from worker.malloc import tune_malloc

log = logging.getLogger(__name__)

VERSION = "0.1.0"
_state: dict[str, Any] = {"stop": threading.Event()}

# The main process forks pool children while its housekeeping thread may be inside SQLite
# (or libpq); a child forked then inherits a locked mutex and hangs at its first query
# (observed: pthread_mutex_lock in sqlite3Malloc after a kill -9 of the child). So the
# main process's SQL work holds this lock, a fork waits for it, and no connection stays open.
_SQL_GUARD = threading.RLock()  # reentrant: a signal handler may run inside a session


@contextmanager
def main_session() -> Iterator[Session]:
    """A session for the worker's main process that no fork can interrupt."""
    with _SQL_GUARD:
        try:
            with session_factory()() as session:
                yield session
        finally:
            get_engine().dispose()  # a forked child must not inherit open database files


def _guard_forks() -> None:
    os.register_at_fork(
        before=_SQL_GUARD.acquire,
        after_in_parent=_SQL_GUARD.release,
        after_in_child=_SQL_GUARD.release,
    )


def node_name(*, queues: list[str], gpu: int | None, name: str | None) -> str:
    """The Celery node name: `--name`, else the queues and this pid, so that two workers on a
    host (`genq up`'s and a `genq worker --queues cpu` beside it) never share one: jobs, the
    workers row and a SIGTERM's re-queue are all keyed by it. A taken `--name` is refused."""
    host = socket.gethostname()
    if name is None:
        return f"{f'gpu{gpu}' if gpu is not None else '-'.join(queues)}-{os.getpid()}@{host}"
    node = f"{name}@{host}"
    with main_session() as session:
        row = session.get(Worker, node)
        if row is not None and row.pid != os.getpid() and pid_alive(row.pid):
            raise Conflict(f"worker name {node!r} is taken by the running worker with pid "
                           f"{row.pid}: choose another --name, or leave it out", param="name")
    return node


def start_worker(
    *, queues: list[str], gpu: int | None = None, name: str | None = None, loglevel: str = "INFO"
) -> None:
    """Run a Celery worker (prefork, concurrency 1) on the given queues; blocks until it exits."""
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)
    else:
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    node = node_name(queues=queues, gpu=gpu, name=name)
    _state.update(queues=queues, gpu=gpu)
    _guard_forks()
    app = get_celery()
    app.worker_main(
        [
            "worker",
            "--queues",
            ",".join(queues),
            "--concurrency",
            "1",
            "--pool",
            "prefork",
            "--hostname",
            node,
            "--loglevel",
            loglevel,
            "--task-events",
            "--without-gossip",
            "--without-mingle",
        ]
    )


@signals.worker_ready.connect
def _on_ready(sender: Any = None, **_: Any) -> None:
    hostname = sender.hostname if sender is not None else socket.gethostname()
    _state["hostname"] = hostname
    from worker.device import describe_device

    with main_session() as session:
        fleet.register_worker(
            session,
            hostname=hostname,
            queues=_state.get("queues", []),
            device=describe_device(_state.get("gpu")),
            pid=os.getpid(),
            version=VERSION,
        )
    thread = threading.Thread(target=_housekeeping, args=(hostname,), daemon=True)
    thread.start()
    log.info("worker %s ready on queues %s", hostname, _state.get("queues"))


def _housekeeping(hostname: str) -> None:
    """Worker heartbeat, plus reaper and outbox sweep while this worker holds the lease."""
    settings = get_settings()
    stop: threading.Event = _state["stop"]
    uploads_checked = 0.0
    while not stop.wait(settings.reaper_interval_s):
        try:
            with main_session() as session:
                fleet.worker_heartbeat(session, hostname=hostname)
                if jobs.take_lease(session, "reaper", hostname, settings.reaper_interval_s * 3):
                    jobs.force_overdue(session)  # before reap: a frozen child is terminated
                    jobs.reap(session, lease_s=settings.lease_s)
                    finalize_stalled(session)
                    jobs.sweep_outbox(session)
                    release_held(session)
                    release_shards(session)
                    jobs.preempt_for_urgent(session, after_s=settings.preempt_after_s)
                    jobs.resend_stranded(
                        session, lease_s=settings.lease_s, waiting=messages_waiting,
                        fetched=lambda: fetched_unacked(settings.lease_s))
                    if time.monotonic() - uploads_checked >= min(60.0, settings.stale_upload_s):
                        uploads_checked = time.monotonic()
                        removed = get_storage().remove_stale_parts(
                            "files", older_than_s=settings.stale_upload_s)
                        if removed:
                            log.info("removed %d partial upload(s) left by a killed API", removed)
        except Exception as exc:  # database or broker blip: try again next round
            log.warning("housekeeping failed: %s", exc)


@signals.worker_shutting_down.connect
def _on_shutting_down(sig: str = "", how: str = "", **_: Any) -> None:
    """SIGTERM: tell this worker's running jobs to checkpoint and re-queue at their next step."""
    hostname = _state.get("hostname")
    if not hostname:
        return
    try:
        with main_session() as session:
            n = jobs.request_shutdown(session, worker=hostname)
        log.info(
            "shutdown (%s %s): asked %d running job(s) to checkpoint and re-queue", sig, how, n
        )
    except Exception as exc:
        log.warning("could not flag running jobs for shutdown: %s", exc)


@signals.worker_shutdown.connect
def _on_shutdown(**_: Any) -> None:
    _state["stop"].set()
    hostname = _state.get("hostname")
    if hostname:
        try:
            with main_session() as session:
                fleet.unregister_worker(session, hostname=hostname)
        except Exception as exc:
            log.warning("could not unregister worker: %s", exc)


@signals.worker_process_init.connect
def _on_child_start(**_: Any) -> None:
    """A forked pool child must not reuse the parent's database connections."""
    get_engine().dispose(close=False)
    threads = get_settings().torch_threads
    if threads:
        import torch

        torch.set_num_threads(threads)
    tune_malloc()  # the child runs the models: their tensors stay in the heap (worker/malloc.py)
    # Everything imported so far (Celery, torch, transformers) lives as long as the child:
    # keep it out of the cyclic collector, whose full passes otherwise walk it all.
    gc.freeze()


class LostChildRequest(Request):
    """A task request whose pool child died mid-job (kill -9, the OOM killer): the main
    process fails that attempt as worker_lost in SQL and acknowledges the message, so the
    job is queued again at once. Celery's own handling rejects the message to the back of
    the queue, where under a backlog the reaper's lease came first and, after a takeover,
    the redelivered message was stale."""

    def on_failure(self, exc_info: Any, send_failed_event: bool = True,
                   return_ok: bool = False) -> None:
        exc = exc_info.exception
        if isinstance(exc, ExceptionWithTraceback):
            exc = exc.exc
        if isinstance(exc, WorkerLostError) and len(self.args) >= 2:
            job_id, attempt = self.args[0], self.args[1]
            try:
                with main_session() as session:
                    outcome = jobs.recover_lost_child(session, job_id, int(attempt),
                                                      worker=self.hostname)
            except Exception as err:  # the database is down: the reaper recovers it
                log.warning("job %s: could not re-queue after its pool child died: %s",
                            job_id, err)
                outcome = None
            if outcome is not None:
                log.warning("job %s attempt %s: pool child died (%s); %s", job_id, attempt,
                            exc, outcome)
                task_ready(self)
                self.acknowledge()
                self.send_event("task-failed", exception=repr(exc))
                return
        super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)
