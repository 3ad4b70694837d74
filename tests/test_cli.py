"""The `genq` command as people run it: subprocesses against a real stack, and `genq up`."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import IO

import httpx
import pytest

from tests.conftest import _free_port, wait_for

TINY_LSTM = {"type": "train", "family": "lstm", "steps": 10, "batch_size": 4, "seq_len": 16,
             "log_every": 2, "checkpoint_every": 10,
             "config": {"hidden": 16, "n_embd": 8, "n_layer": 1}}


def genq(*args: str, env: dict[str, str], cwd: Path | None = None,
         timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "api.cli", *args], env={**env, "COLUMNS": "200"},
                          cwd=cwd, capture_output=True, text=True, timeout=timeout)


def start_up(folder: Path, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], IO[str]]:
    """`genq up --no-flower` in folder, its output in folder/up.log (returned open)."""
    log = open(folder / "up.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "api.cli", "up", "--no-flower"],
                            cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT)
    return proc, log


def up_ready(proc: subprocess.Popen[bytes], api: int, folder: Path) -> bool:
    """Whether `genq up` in folder answers /healthz and has written its API key."""
    assert proc.poll() is None, (folder / "up.log").read_text()
    try:
        healthy = httpx.get(f"http://127.0.0.1:{api}/healthz", timeout=1).is_success
    except httpx.HTTPError:
        return False
    return healthy and (folder / ".genq" / "api_key").exists()


@pytest.fixture
def cli_env(stack) -> dict[str, str]:
    return {**stack.env, "GENQ_API_URL": stack.api_url, "GENQ_API_KEY": stack.api_key}


def test_jobs_watch_results_metrics_logs(stack, trained_lstm, cli_env, tmp_path):
    job_id = trained_lstm["id"]
    c = stack.client()  # the newest job: the list shows the latest 20, whatever ran before
    newest = c.wait(c.create_job({"type": "generate", "model": trained_lstm["result"]["model"],
                                  "prompts": ["a"], "max_tokens": 2})["id"], timeout=120)
    listed = genq("jobs", env=cli_env)
    assert listed.returncode == 0 and newest["id"] in listed.stdout
    assert "succeeded" in listed.stdout

    watched = genq("watch", job_id, env=cli_env)
    assert watched.returncode == 0
    assert watched.stdout.strip().splitlines()[-1].startswith("succeeded")

    out = tmp_path / "out"
    shown = genq("results", job_id, "--out", str(out), env=cli_env)
    assert shown.returncode == 0, shown.stderr
    pngs = sorted(out.glob("*.png"))
    assert any("loss" in p.name for p in pngs), shown.stdout
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in pngs)

    curves = genq("metrics", job_id, "--name", "loss", env=cli_env)
    assert curves.returncode == 0 and "loss" in curves.stdout and "▁" in curves.stdout

    lines = genq("logs", job_id, env=cli_env)
    assert lines.returncode == 0 and "registered model" in lines.stdout


def test_generate_prints_texts(stack, trained_lstm, cli_env, tmp_path):
    model = trained_lstm["result"]["model"]
    done = genq("generate", model, "The ", "def ", "--max-tokens", "8", "--seed", "1",
                "--out", str(tmp_path), env=cli_env)
    assert done.returncode == 0, done.stderr
    assert "submitted job_" in done.stdout
    assert "0 The " in done.stdout and "1 def " in done.stdout


def newest_job(stack) -> str:  # type: ignore[no-untyped-def]
    return stack.client().list_jobs(limit=1)["data"][0]["id"]


def test_generate_one_label_conditions_every_image(stack, cli_env, tmp_path):
    """Issue 24: `--n 4 --label 7` asks for four 7s (not one 7 and three of anything);
    labels that match neither one nor n are refused by name before anything is sent."""
    from tests.test_families import train

    model = train(stack, "gan", 5)["result"]["model"]  # on labelled digits: conditional
    done = genq("generate", model, "--n", "4", "--label", "7", "--seed", "1",
                "--out", str(tmp_path), env=cli_env, timeout=180)
    assert done.returncode == 0, done.stderr
    job_id = done.stdout.split("submitted ", 1)[1].split()[0]
    items = list(stack.client().items(job_id))
    assert [item["request"]["gen"]["label"] for item in items] == [7, 7, 7, 7]
    assert [item["status"] for item in items] == ["succeeded"] * 4
    assert len(list(tmp_path.glob("*.png"))) == 4

    before = newest_job(stack)
    wrong = genq("generate", model, "--n", "4", "--label", "1", "--label", "2", env=cli_env)
    assert wrong.returncode == 2, wrong.stdout + wrong.stderr
    assert "--label" in wrong.stderr and "Traceback" not in wrong.stderr + wrong.stdout
    assert "submitted" not in wrong.stdout
    assert newest_job(stack) == before  # nothing reached the API


def test_generate_says_how_many_items_failed_and_why(stack, cli_env, tmp_path):
    """Issue 24: items a model cannot serve end the CLI's output with one summary line and
    one line per distinct reason (with its count), not the raw message of each item."""
    from tests.test_families import train

    unconditional = train(stack, "gan", 5, config={"hidden": 32, "latent": 8,
                                                   "conditional": False})["result"]["model"]
    done = genq("generate", unconditional, "--n", "3", "--label", "3", "--out", str(tmp_path),
                env=cli_env, timeout=180)
    assert "Traceback" not in done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines == ["3 of 3 item(s) failed:",
                     "  3 × label: the model is unconditional (trained without labels)"], (
        done.stderr)

    conditional = train(stack, "gan", 5)["result"]["model"]  # ten classes: labels 0-9
    some = genq("generate", conditional, "--n", "3", "--label", "7", "--label", "12",
                "--label", "40", "--out", str(tmp_path), env=cli_env, timeout=180)
    lines = some.stderr.strip().splitlines()
    assert lines == ["2 of 3 item(s) failed:", "  2 × label: must be in [0, 9]"], some.stderr
    assert "saved 1 file(s)" in some.stdout, some.stdout  # the 7 was drawn all the same


def test_watch_follows_a_running_job_to_the_end(stack, cli_env):
    c = stack.client()
    job = c.create_job({**TINY_LSTM, "steps": 300, "checkpoint_every": 300, "log_every": 10})
    watched = genq("watch", job["id"], env=cli_env, timeout=120)
    assert watched.returncode == 0, watched.stderr
    lines = watched.stdout.strip().splitlines()
    assert lines[-1].startswith("succeeded") and "300/300" in watched.stdout
    assert "loss " in watched.stdout
    assert c.get_job(job["id"])["progress"]["done"] == 300


def test_workers_and_cancel(stack, cli_env):
    shown = genq("workers", env=cli_env)
    assert shown.returncode == 0 and "w1@" in shown.stdout and "cpu,gpu" in shown.stdout

    c = stack.client()
    job = c.create_job({**TINY_LSTM, "steps": 5000})
    wait_for(lambda: c.get_job(job["id"])["status"] == "running", timeout=30)
    cancelled = genq("cancel", job["id"], env=cli_env)
    assert cancelled.returncode == 0 and "cancel requested" in cancelled.stdout
    assert c.wait(job["id"], timeout=60)["status"] == "cancelled"


def test_friendly_errors(stack, cli_env, tmp_path):
    wrong = genq("watch", "job_nope", env=cli_env)
    assert wrong.returncode == 1 and "no job 'job_nope'" in wrong.stderr
    assert "Traceback" not in wrong.stderr + wrong.stdout

    bad_key = genq("jobs", env={**cli_env, "GENQ_API_KEY": "sk-wrong"})
    assert bad_key.returncode == 1 and "HTTP 401" in bad_key.stderr

    no_key = {**cli_env, "GENQ_API_KEY": "", "GENQ_HOME": str(tmp_path / "empty")}
    missing = genq("jobs", env=no_key, cwd=tmp_path)
    assert missing.returncode == 1 and "no API key" in missing.stderr

    down = genq("jobs", env={**cli_env, "GENQ_API_URL": f"http://127.0.0.1:{_free_port()}"})
    assert down.returncode == 1 and "cannot reach genq" in down.stderr
    for r in (missing, down, bad_key):
        assert "Traceback" not in r.stderr + r.stdout


# ------------------------------------------------------------------ genq up


def up_env(**ports: int) -> dict[str, str]:
    """This environment without the test session's GENQ_* settings, plus the ports."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GENQ_")}
    env.update({f"GENQ_{name.upper()}_PORT": str(port) for name, port in ports.items()})
    env["GENQ_HEARTBEAT_S"] = "0.5"
    return env


def descendants(root: int) -> set[int]:
    """Every live process below root (read from /proc, no psutil)."""
    parent: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parent[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, ppid in parent.items() if ppid in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (ProcessLookupError, FileNotFoundError):
        return False
    return state != "Z"


def test_genq_up_end_to_end_and_clean_stop(tmp_path):
    api, redis, flower = _free_port(), _free_port(), _free_port()
    env = up_env(api=api, redis=redis, flower=flower)
    log = open(tmp_path / "up.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "api.cli", "up"], cwd=tmp_path, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    children: set[int] = set()
    try:
        def api_key() -> str:
            children.update(descendants(proc.pid))
            assert proc.poll() is None, (tmp_path / "up.log").read_text()
            path = tmp_path / ".genq" / "api_key"
            try:
                healthy = httpx.get(f"http://127.0.0.1:{api}/healthz", timeout=1).is_success
            except httpx.HTTPError:
                return ""
            return path.read_text().strip() if healthy and path.exists() else ""

        key = wait_for(api_key, timeout=60, interval=0.3)
        assert (tmp_path / ".genq" / "api_key").stat().st_mode & 0o777 == 0o600
        from api.client import Client

        c = Client(f"http://127.0.0.1:{api}", api_key=key)
        train = c.create_job({**TINY_LSTM, "name": "up-lstm"})
        assert c.wait(train["id"], timeout=90)["status"] == "succeeded"
        gen = c.create_job({"type": "generate", "model": "up-lstm", "prompts": ["a"],
                            "max_tokens": 4})
        assert c.wait(gen["id"], timeout=30)["status"] == "succeeded"

        password = (tmp_path / ".genq" / "flower_password").read_text().strip()

        def flower_tasks() -> dict[str, str]:
            tasks = httpx.get(f"http://127.0.0.1:{flower}/api/tasks", auth=("genq", password),
                              timeout=5).json()
            seen = {t["name"]: str(t["args"]) for t in tasks.values()}
            ok = train["id"] in seen.get("genq.train", "") and gen["id"] in seen.get(
                "genq.generate", "")
            return seen if ok else {}

        wait_for(flower_tasks, timeout=20, interval=0.5)
        children.update(descendants(proc.pid))
        home = tmp_path / ".genq"  # the database, logs, storage and Redis files: private
        shared = [str(p) for p in [home, *home.rglob("*")]
                  if p.stat().st_mode & 0o077 and not p.is_symlink()]
        assert shared == [], shared
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(60)
    output = (tmp_path / "up.log").read_text()
    assert code == 0, output
    assert "Traceback" not in output and "stopped." in output
    assert len(children) >= 4  # redis, api, worker (+ its pool child), flower
    wait_for(lambda: not any(alive(pid) for pid in children), timeout=10)


def child_running(root: int, marker: str) -> int:
    """The pid of root's live child whose command line holds marker (not a grandchild:
    a worker's pool child has its command line too)."""
    def find() -> int:
        for pid in descendants(root):
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            if ppid == root and marker in argv and alive(pid):
                return pid
        return 0
    return wait_for(find, timeout=60, interval=0.2)


def test_genq_up_restarts_a_crashed_child_and_gives_up_on_repeated_crashes(tmp_path):
    """Issue 25 hole 6: `genq up` supervises. A worker killed (with its pool child) while it
    runs a job, Redis killed and the API killed all come back (with a line saying so); the
    worker's job is recovered by the restarted worker's reaper and resumes from its
    checkpoint, and the stack still runs jobs; a child that keeps dying stops the stack with
    one message instead of restarting it for ever."""
    api, redis = _free_port(), _free_port()
    env = {**up_env(api=api, redis=redis, flower=_free_port()), "GENQ_UP_MAX_RESTARTS": "3",
           "GENQ_LEASE_S": "4", "GENQ_REAPER_INTERVAL_S": "1"}  # the reaper acts in seconds
    proc, log = start_up(tmp_path, env)
    children: set[int] = set()

    try:
        wait_for(lambda: up_ready(proc, api, tmp_path), timeout=90, interval=0.3)
        from api.client import Client

        key = (tmp_path / ".genq" / "api_key").read_text().strip()
        c = Client(f"http://127.0.0.1:{api}", api_key=key)
        running = c.create_job({**TINY_LSTM, "steps": 1000, "checkpoint_every": 10})

        def past_a_checkpoint() -> bool:
            job = c.get_job(running["id"])
            assert job["status"] in ("queued", "running"), job
            return job["status"] == "running" and job["progress"]["done"] >= 12

        wait_for(past_a_checkpoint, timeout=120, interval=0.2)
        worker = child_running(proc.pid, "api.cli worker")
        children.update(descendants(proc.pid))
        os.killpg(worker, signal.SIGKILL)  # its pool child too: the job's process is gone
        first_redis = child_running(proc.pid, f"redis-server 127.0.0.1:{redis}")
        os.kill(first_redis, signal.SIGKILL)
        first_api = child_running(proc.pid, "uvicorn")
        os.kill(first_api, signal.SIGKILL)
        wait_for(lambda: child_running(proc.pid, "uvicorn") != first_api
                 and up_ready(proc, api, tmp_path), timeout=90, interval=0.3)
        assert child_running(proc.pid, "api.cli worker") != worker
        assert child_running(proc.pid, f"redis-server 127.0.0.1:{redis}") != first_redis
        recovered = c.wait(running["id"], timeout=600)
        assert recovered["status"] == "succeeded", recovered
        assert recovered["attempts"][0]["error"]["code"] == "worker_lost", recovered
        assert recovered["attempts"][0]["progress"] >= 10  # it resumed from a checkpoint
        job = c.create_job({**TINY_LSTM, "name": "after-restarts"})
        assert c.wait(job["id"], timeout=120)["status"] == "succeeded"
        output = (tmp_path / "up.log").read_text()
        assert "api exited with code -9; restarting it in 1 s" in output, output
        assert "worker-cpu exited with code -9; restarting it in 1 s" in output, output
        assert "redis exited with code -9; restarting it in 1 s" in output, output
        # the API's second and third exits within the window stop everything
        for _ in range(2):
            pid = child_running(proc.pid, "uvicorn")
            children.update(descendants(proc.pid))
            os.kill(pid, signal.SIGKILL)
            wait_for(lambda pid=pid: not alive(pid), timeout=10)
        code = proc.wait(120)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.wait(60)
    output = (tmp_path / "up.log").read_text()
    assert code == 1, output
    assert "api restarted" in output and "restarting it in 2 s" in output, output
    assert "api exited 3 times within 5 minutes (last code -9); stopping the stack" in output
    assert "Traceback" not in output and "stopped." in output
    wait_for(lambda: not any(alive(pid) for pid in children), timeout=10)


def test_genq_up_stops_on_sigterm_as_on_ctrl_c(tmp_path):
    """Issue 24: SIGTERM (a CI runner, `timeout`, systemd's stop) stops `genq up` as Ctrl-C
    does: every child it started is gone, and it exits 0 after saying "stopped."."""
    api = _free_port()
    env = up_env(api=api, redis=_free_port(), flower=_free_port())
    proc, log = start_up(tmp_path, env)
    children: set[int] = set()

    try:
        wait_for(lambda: up_ready(proc, api, tmp_path), timeout=90, interval=0.3)
        worker = child_running(proc.pid, "api.cli worker")
        wait_for(lambda: descendants(worker), timeout=60)  # its pool child too
        children.update(descendants(proc.pid))
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(120)
        output = (tmp_path / "up.log").read_text()
        assert code == 0, output
        assert "Traceback" not in output and "stopped." in output, output
        assert len(children) >= 4, children  # redis, api, worker and its pool child
        wait_for(lambda: not any(alive(pid) for pid in children), timeout=30)
    finally:  # a failure leaves nothing of the stack running beside the rest of the suite
        if proc.poll() is None:
            children.update(descendants(proc.pid))
        for pid in [*children, proc.pid]:
            if alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def test_genq_up_busy_port_is_one_line(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = up_env(api=port, redis=_free_port(), flower=_free_port())
        r = subprocess.run([sys.executable, "-m", "api.cli", "up"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert f"port {port} for the API is busy" in r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_genq_demo_on_a_fresh_folder(tmp_path):
    """`make demo`'s command: trains, bulk-generates, prints texts, stops its own stack."""
    ports = {"api": _free_port(), "redis": _free_port(), "flower": _free_port()}
    env = up_env(**ports)
    done = genq("demo", "--steps", "40", "--digit-steps", "100", env=env, cwd=tmp_path,
                timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "Traceback" not in output
    shown = [line for line in done.stdout.splitlines() if line.startswith("  ") and "'" in line]
    assert len(shown) >= 5 and all(not line.rstrip().endswith("''") for line in shown[:5])
    from PIL import Image

    grid = tmp_path / "genq-demo" / "digits.png"  # ten columns of four 64x64 draws, 4 apart
    assert f"saved {grid}" in " ".join(done.stdout.split()), done.stdout
    assert Image.open(grid).size == (10 * 68 + 4, 4 * 68 + 4)
    assert "Flower" in done.stdout and "genq up" in done.stdout
    from api.stack import port_free

    assert all(port_free(port) for port in ports.values())  # its stack is stopped
    import sqlite3

    with sqlite3.connect(tmp_path / ".genq" / "genq.db") as db:
        (uri,) = db.execute("SELECT c.uri FROM models m JOIN checkpoints c "
                            "ON c.id = m.checkpoint_id").fetchone()
    assert (Path(uri.removeprefix("file://")) / "model.safetensors").is_file()
