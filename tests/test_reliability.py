"""Issue 6: nothing is lost under kill -9, SIGTERM, Redis restarts, cancels and timeouts.

Each test does the real thing to real processes: its own Redis (appendonly, restartable),
its own SQLite database, an API and two workers with a 4 s lease.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
import torch
from sqlalchemy import func, select

from common.schemas import TrainJobSpec
from common.train_spec import DataSpec
from tests.conftest import (
    _TMP,
    BACKENDS,
    ROOT,
    Stack,
    _free_port,
    finish,
    fresh_database,
    own_stack,
    spawn_api,
    start_stack,
    wait_for,
)

# Long enough (2-4 s on two cores) that a signal sent once it runs lands before it finishes.
SPEC = {"type": "train", "family": "lstm", "steps": 800, "batch_size": 8, "seq_len": 32,
        "checkpoint_every": 10, "log_every": 10, "seed": 7, "data": {"builtin": "python-docs"}}


class RedisServer:
    """A redis-server with appendonly on, which a test may stop and start again."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.dir = _TMP / f"redis-aof-{uuid.uuid4().hex[:6]}"
        self.dir.mkdir(parents=True)
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        import redis

        from api.stack import redis_binary

        self.proc = subprocess.Popen(
            [redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.dir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port)
        wait_for(lambda: _ping(client), timeout=20, interval=0.05)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def _ping(client) -> bool:  # type: ignore[no-untyped-def]
    try:
        return bool(client.ping())
    except Exception:
        return False


@pytest.fixture(scope="module")
def aof_redis() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module", params=BACKENDS)
def rstack(request: pytest.FixtureRequest, aof_redis: RedisServer) -> Iterator[Stack]:
    """API + workers a and b on their own Redis and database, with a short lease."""
    with fresh_database(request.param) as db:
        yield from _reliability_stack(db, aof_redis)


def _reliability_stack(db: str, aof_redis: RedisServer) -> Iterator[Stack]:
    stack = start_stack(db, aof_redis.url, env_extra={
        "GENQ_LEASE_S": "4", "GENQ_ITEM_CHUNK": "4", "GENQ_CANCEL_GRACE_S": "1",
        "GENQ_TOKEN_BUDGET": "256",  # small generation batches: a kill lands mid-job
        "GENQ_QUEUES": "gpu,cpu,strand",  # strand: no worker until a test starts one
    })
    for name in ("a", "b"):
        spawn_worker(stack, name)
    for name in ("a", "b"):
        stack.wait_worker(name)
    yield stack
    stack.stop_all()


def spawn_worker(stack: Stack, name: str) -> None:
    stack.spawn(name, [sys.executable, "-m", "api.cli", "worker", "--queues", "cpu",
                       "--name", name])


def ensure_two_workers(stack: Stack) -> None:
    """Replace workers a test killed (under fresh names: a dead one's row lingers)."""
    alive = [n for n, p in stack.procs.items() if n != "api" and p.poll() is None]
    for _ in range(2 - len(alive)):
        name = f"w{uuid.uuid4().hex[:4]}"
        spawn_worker(stack, name)
        stack.wait_worker(name)


def row(stack: Stack, job_id: str):  # type: ignore[no-untyped-def]
    from common.db import engine_for, session_factory
    from common.models import Job

    with session_factory(engine_for(stack.env["GENQ_DATABASE_URL"]))() as s:
        job = s.get(Job, job_id)
        s.expunge(job)
        return job


def running_at(stack: Stack, job_id: str, step: int, timeout: float = 60):  # type: ignore[no-untyped-def]
    """Wait until the job runs at or past `step`; returns its row."""
    def ready():  # type: ignore[no-untyped-def]
        job = row(stack, job_id)
        assert job.status in ("queued", "running"), (job.status, job.error)
        return job if job.status == "running" and job.progress_done >= step else None
    return wait_for(ready, timeout=timeout, interval=0.1)


def freeze(stack: Stack, pid: int, job_id: str) -> None:
    """SIGSTOP the child `pid` running `job_id` at a moment it holds no lock that a write of
    the job's row needs. Frozen inside one of its short write transactions (a log line every
    10 steps), it would hold the whole database (SQLite) or the job's row (PostgreSQL)
    until continued, and every write to the job, a cancel included, would wait for it: a
    child stuck in its computation, what the callers test, holds none."""
    for _ in range(100):
        os.kill(pid, signal.SIGSTOP)
        if _job_row_writable(stack.env["GENQ_DATABASE_URL"], job_id):
            return
        os.kill(pid, signal.SIGCONT)
        time.sleep(0.02)
    raise AssertionError(f"child {pid} held a lock on job {job_id} at each of 100 stops")


def _job_row_writable(url: str, job_id: str) -> bool:
    """Whether the job's row could be written now, tried with a lock wait of 0.2 s."""
    import sqlite3

    from sqlalchemy import text
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import OperationalError

    from common.db import engine_for
    from common.models import Job

    if url.startswith("sqlite"):  # the engine's connections wait 30 s for a lock: not one
        conn = sqlite3.connect(str(make_url(url).database), timeout=0.2, isolation_level=None)
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("ROLLBACK")
            return True
        except sqlite3.OperationalError:  # database is locked
            return False
        finally:
            conn.close()
    with engine_for(url).connect() as conn:
        conn.execute(text("SET LOCAL lock_timeout = '200ms'"))  # this transaction's only
        try:
            conn.execute(select(Job.id).where(Job.id == job_id).with_for_update())
            return True
        except OperationalError:  # lock_timeout: the row is locked
            return False
        finally:
            conn.rollback()


def node_of(job) -> str:  # type: ignore[no-untyped-def]
    return job.worker.split("@", 1)[0]


def final_weights(stack: Stack, checkpoint_id: str) -> dict[str, torch.Tensor]:
    from common.db import engine_for, session_factory
    from common.ml.checkpoint import load_model
    from common.models import Checkpoint

    with session_factory(engine_for(stack.env["GENQ_DATABASE_URL"]))() as s:
        uri = s.get(Checkpoint, checkpoint_id).uri
    return load_model(Path(uri.removeprefix("file://"))).model.state_dict()


@contextlib.contextmanager
def workers_thread_count() -> Iterator[None]:
    """The thread count workers run torch with (GENQ_TORCH_THREADS, else torch's default):
    other tests may have changed this process's, and float sums depend on it."""
    from common.config import Settings

    default = Settings().torch_threads
    if not default:
        probe = "import torch; print(torch.get_num_threads())"
        default = int(subprocess.check_output([sys.executable, "-c", probe], text=True))
    before = torch.get_num_threads()
    torch.set_num_threads(default)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """The weights of an uninterrupted run of SPEC, in this process."""
    from common.ml.checkpoint import load_model
    from common.ml.train import TrainHooks, run_training

    with workers_thread_count():
        spec = TrainJobSpec.model_validate(SPEC)  # as the worker parses the job's spec
        out = run_training(spec, tmp_path_factory.mktemp("ref"), hooks=TrainHooks())
    return load_model(out.checkpoint).model.state_dict()


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def send_in_stack(stack: Stack, job_id: str, attempt: int, job_type: str = "train",
                  queue: str = "cpu") -> None:
    """Publish one more message for (job_id, attempt) with the stack's own settings."""
    code = ("import sys; from common.celery_app import send_job; "
            "send_job(sys.argv[1], int(sys.argv[2]), job_type=sys.argv[3], queue=sys.argv[4], "
            "kwargs={})")
    subprocess.run([sys.executable, "-c", code, job_id, str(attempt), job_type, queue],
                   env=stack.env, cwd=ROOT, check=True)


def job_logs(stack: Stack, job_id: str) -> list[str]:
    from common.db import engine_for, session_factory
    from common.models import JobLog

    with session_factory(engine_for(stack.env["GENQ_DATABASE_URL"]))() as s:
        return list(s.scalars(select(JobLog.message).where(JobLog.job_id == job_id)))


# ---------------------------------------------------------------- kill -9


def test_kill9_pool_child_resumes_from_checkpoint(rstack, reference):
    c = rstack.client()
    job = c.create_job(SPEC)
    # past step 12 the step-10 checkpoint is written (the loop saves before it steps on):
    # a kill at step 8 or 9 found no checkpoint to resume from on a fast day
    pid = running_at(rstack, job["id"], 12).worker_pid
    os.kill(pid, signal.SIGKILL)
    done = finish(c, job["id"])
    assert done["status"] == "succeeded", done
    assert done["attempt"] >= 2
    assert done["attempts"][0]["error"]["code"] == "worker_lost"
    assert row(rstack, job["id"]).worker_pid != pid
    assert any("resuming from checkpoint" in m for m in job_logs(rstack, job["id"]))
    assert_same_weights(final_weights(rstack, done["result"]["checkpoint_id"]), reference)


@pytest.mark.timeout(900)  # minutes on a loaded machine: it waits on progress
def test_a_pool_child_killed_under_a_backlog_is_queued_again_at_once(aof_redis, reference):
    """Issue 25 hole 2: the worker's main process re-queues its dead child's job itself.
    Celery's rejected message went to the back of the queue, so under a backlog the job
    sat `running` under a dead pid until the reaper's lease (here 10 minutes) came first;
    and after one takeover the redelivered message was stale. Two kills, each recovered at
    once, and the weights still equal an uninterrupted run's."""
    broker = aof_redis.url.rsplit("/", 1)[0] + "/3"  # rstack's workers listen on db 0
    with fresh_database("sqlite") as db:
        stack = start_stack(db, broker, env_extra={"GENQ_LEASE_S": "600",
                                                   "GENQ_CANCEL_GRACE_S": "1"})
        try:
            spawn_worker(stack, "solo")
            stack.wait_worker("solo")
            c = stack.client()
            job = c.create_job(SPEC)
            first = running_at(stack, job["id"], 12).worker_pid
            backlog = c.create_job({**SPEC, "steps": 100_000, "checkpoint_every": 1000})
            os.kill(first, signal.SIGKILL)
            # the backlog job takes the worker; the killed job waits queued as attempt 2
            wait_for(lambda: row(stack, backlog["id"]).status == "running", timeout=60)
            again = row(stack, job["id"])
            assert (again.status, again.attempt) == ("queued", 2), (again.status, again.error)
            assert again.attempts_log[0]["error"]["message"] == f"pool process {first} died"
            c.cancel(backlog["id"])
            second = running_at(stack, job["id"], again.progress_done + 5).worker_pid
            os.kill(second, signal.SIGKILL)
            done = finish(c, job["id"])
            assert done["status"] == "succeeded", done
            assert [a["error"]["message"] for a in done["attempts"]] == [
                f"pool process {first} died", f"pool process {second} died"]
            assert done["attempt"] == 3
            assert_same_weights(final_weights(stack, done["result"]["checkpoint_id"]), reference)
            assert c.get_job(backlog["id"])["status"] == "cancelled"
        finally:
            stack.stop_all()


def run_past_a_dead_worker(rstack: Stack, sig: int) -> dict:
    """SPEC on one of two workers, whose whole process group gets `sig` mid-run: the job as
    it finished, which must have succeeded on the other worker."""
    ensure_two_workers(rstack)
    c = rstack.client()
    job = c.create_job(SPEC)
    victim = node_of(running_at(rstack, job["id"], 8))
    rstack.stop(victim, sig=sig)
    done = finish(c, job["id"])
    assert done["status"] == "succeeded", done
    assert node_of(row(rstack, job["id"])) != victim
    return done


def test_kill9_whole_worker_resumes_on_another(rstack, reference):
    done = run_past_a_dead_worker(rstack, signal.SIGKILL)
    assert done["attempts"][0]["error"]["code"] == "worker_lost"
    assert_same_weights(final_weights(rstack, done["result"]["checkpoint_id"]), reference)


# As long as SPEC (at 80 steps a fast machine finished the run before the poll saw step 12)
CHAT_SPEC = {"type": "train", "family": "gpt", "steps": 800, "batch_size": 8, "seq_len": 48,
             "checkpoint_every": 10, "log_every": 10, "seed": 3, "config": {
                 "vocab_size": 300, "n_positions": 64, "n_embd": 32, "n_layer": 1,
                 "n_head": 2, "dropout": 0.1}}


def test_kill9_pool_child_resumes_a_chat_run_exactly(rstack, tmp_path):
    """Chat examples (one a sequence, loss on the answers) resume bit-for-bit after a kill."""
    import json

    from common.ml.checkpoint import load_model
    from common.ml.train import TrainHooks, run_training

    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"What follows {i}?"},
        {"role": "assistant", "content": f"{i + 1}."}]}) + "\n" for i in range(50)))
    with workers_thread_count():
        spec = TrainJobSpec.model_validate(CHAT_SPEC).model_copy(  # as the worker resolves
            update={"data": DataSpec(path=str(path))})                 # an uploaded file
        out = run_training(spec, tmp_path / "ref", hooks=TrainHooks())
    ensure_two_workers(rstack)
    c = rstack.client()
    file_id = c.upload_file(path, purpose="dataset")["id"]
    job = c.create_job({**CHAT_SPEC, "data": {"file_id": file_id}})
    pid = running_at(rstack, job["id"], 12).worker_pid  # past the step-10 checkpoint
    os.kill(pid, signal.SIGKILL)
    done = finish(c, job["id"])
    assert done["status"] == "succeeded" and done["attempt"] >= 2, done
    assert any("resuming from checkpoint" in m for m in job_logs(rstack, job["id"]))
    assert_same_weights(final_weights(rstack, done["result"]["checkpoint_id"]),
                        load_model(out.checkpoint).model.state_dict())


@pytest.fixture(scope="module")
def model_name(rstack) -> str:
    c = rstack.client()
    name = f"lstm-{uuid.uuid4().hex[:6]}"
    job = c.create_job({**SPEC, "steps": 10, "name": name})
    assert finish(c, job["id"])["status"] == "succeeded"
    return name


def test_kill9_mid_generation_every_item_exactly_once(rstack, model_name):
    ensure_two_workers(rstack)
    c = rstack.client()
    prompts = [f"line {i}: " for i in range(120)]
    job = c.create_job({"type": "generate", "model": model_name, "prompts": prompts,
                        "max_tokens": 160, "seed": 1})  # seconds of work
    first = running_at(rstack, job["id"], 8)
    os.kill(first.worker_pid, signal.SIGKILL)
    before_kill = finished_items(rstack, job["id"])
    done = finish(c, job["id"])
    assert done["status"] == "succeeded", done
    assert done["attempt"] >= 2
    items = list(c.items(job["id"]))
    ids = [i["custom_id"] for i in items]
    assert sorted(ids, key=int) == [str(i) for i in range(120)] and len(set(ids)) == 120
    assert all(i["status"] == "succeeded" and len(i["response"]["texts"]) == 1 for i in items)
    # items finished before the kill were kept, not generated again
    after = finished_items(rstack, job["id"])
    assert len(after) == 120 and len(before_kill) >= 8
    assert all(after[i] == before_kill[i] for i in before_kill)


def finished_items(stack: Stack, job_id: str) -> dict[int, tuple]:
    """id -> (finished_at, response) of the job's finished items."""
    from common.db import engine_for, session_factory
    from common.models import Item

    with session_factory(engine_for(stack.env["GENQ_DATABASE_URL"]))() as s:
        rows = s.execute(select(Item.id, Item.finished_at, Item.response).where(
            Item.job_id == job_id, Item.status != "pending")).all()
    return {r.id: (r.finished_at, r.response) for r in rows}


# ---------------------------------------------------------------- soft shutdown


def test_sigterm_checkpoints_and_requeues_without_spending_an_attempt(rstack, reference):
    ensure_two_workers(rstack)
    c = rstack.client()
    job = c.create_job(SPEC)
    victim = node_of(running_at(rstack, job["id"], 8))
    proc = rstack.procs[victim]
    os.kill(proc.pid, signal.SIGTERM)  # the main process only, as docker stop does
    proc.wait(60)
    rstack.procs.pop(victim)
    done = finish(c, job["id"])
    assert done["status"] == "succeeded", done
    final = row(rstack, job["id"])
    assert final.failures == 0 and node_of(final) != victim
    assert [a["error"]["code"] for a in done["attempts"]] == ["shutdown"]
    assert done["attempts"][0]["error"]["checkpoint_id"]
    assert_same_weights(final_weights(rstack, done["result"]["checkpoint_id"]), reference)


def test_sigterm_to_the_process_group_loses_nothing(rstack, reference):
    """systemd's default stop signals every process of the worker; the job still finishes."""
    done = run_past_a_dead_worker(rstack, signal.SIGTERM)
    assert {a["error"]["code"] for a in done["attempts"]} <= {"shutdown", "worker_lost"}
    assert_same_weights(final_weights(rstack, done["result"]["checkpoint_id"]), reference)


# ---------------------------------------------------------------- cancel


def test_cancel_running_training_within_a_step(rstack):
    ensure_two_workers(rstack)
    c = rstack.client()
    slow = {"steps": 2000, "batch_size": 64, "seq_len": 128}  # steps of tens of ms
    job = c.create_job({**SPEC, **slow})
    at = running_at(rstack, job["id"], 8).progress_done
    t0 = time.monotonic()
    c.cancel(job["id"])
    done = c.wait(job["id"], timeout=30)
    assert done["status"] == "cancelled", done
    assert time.monotonic() - t0 < 5
    ckpt = c.request("GET", f"/v1/checkpoints/{done['result']['checkpoint_id']}")
    assert at <= ckpt["step"] <= at + 25, (at, ckpt["step"])


def test_cancel_queued_job_is_immediate(rstack):
    c = rstack.client()
    job = c.create_job({**SPEC, "queue": "gpu"})  # no worker serves gpu here
    cancelled = c.cancel(job["id"])
    assert cancelled["status"] == "cancelled"


def test_force_cancel_revokes_a_stuck_task(rstack):
    """A frozen child cannot notice the flag: after the grace period the reaper revokes it,
    even though the API process that took the cancel was killed at once (the forced cancel
    is kept in SQL, not in that process)."""
    ensure_two_workers(rstack)
    c = rstack.client()
    replica = spawn_api(rstack)  # first: while the child is stopped its lease runs out
    job = c.create_job({**SPEC, "steps": 2000})
    running = running_at(rstack, job["id"], 5)
    freeze(rstack, running.worker_pid, job["id"])
    try:
        resp = replica.client().request("POST", f"/v1/jobs/{job['id']}/cancel",
                                        params={"force": "true"})
        assert resp["status"] == "running"  # cooperative first
        replica.stop("api", sig=signal.SIGKILL)
        done = c.wait(job["id"], timeout=20)
    finally:
        os.kill(running.worker_pid, signal.SIGCONT)
    assert done["status"] == "cancelled" and done["result"]["forced"] is True
    wait_for(lambda: not _alive(running.worker_pid), timeout=20)  # terminated, not resumed
    after = c.create_job({**SPEC, "steps": 2})
    assert finish(c, after["id"])["status"] == "succeeded"
    assert c.get_job(job["id"])["status"] == "cancelled"


def test_an_error_while_a_sigterm_unwinds_the_body_still_exits_the_child(monkeypatch):
    """A cleanup that raises while billiard's SIGTERM SystemExit unwinds a job must not be
    recorded as the job's failure: the child has to exit, as the revoke asked."""
    from billiard import common

    from worker.tasks import run_body

    class Session:
        def rollback(self) -> None:
            pass

    class Context:
        stopped = saved = 0
        session = Session()

        def stop_heartbeat(self) -> None:
            self.stopped += 1

        def save_progress(self) -> None:
            self.saved += 1

    def body(ctx):  # type: ignore[no-untyped-def]
        try:
            raise SystemExit(-241)  # what billiard's SIGTERM handler raises
        finally:
            raise RuntimeError("can't change 'autocommit' now")  # the cleanup's own error

    ctx = Context()
    with pytest.raises(RuntimeError):  # no SIGTERM handled: the error is the job's own
        run_body(ctx, body)  # type: ignore[arg-type]
    monkeypatch.setattr(common, "_should_have_exited", [True])  # billiard's handler fired
    with pytest.raises(SystemExit):
        run_body(ctx, body)  # type: ignore[arg-type]
    assert ctx.stopped == 2  # the heartbeat is stopped either way
    assert ctx.saved == 1  # progress is saved for the job's own error, not under a SIGTERM


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] != "Z"


# ---------------------------------------------------------------- duplicates, retries, limits


def test_duplicate_message_runs_once_and_stale_attempt_is_dropped(rstack):
    ensure_two_workers(rstack)
    c = rstack.client()
    job = c.create_job({**SPEC, "steps": 20})
    send_in_stack(rstack, job["id"], 1)  # the same (job, attempt) again: both workers race
    done = finish(c, job["id"])
    assert done["status"] == "succeeded" and done["attempt"] == 1 and done["attempts"] == []
    assert sum("registered model" in m for m in job_logs(rstack, job["id"])) == 1
    send_in_stack(rstack, job["id"], 0)  # an attempt that is long gone
    wait_for(lambda: sum(rstack.log(n).count(f"job {job['id']} attempt") for n in rstack.procs
                         if n != "api") >= 3, timeout=300)  # two idle workers: seconds,
    # unless a loaded machine holds the worker that took the message
    text = "".join(rstack.log(n) for n in rstack.procs if n != "api")
    assert text.count("message dropped") >= 2
    assert c.get_job(job["id"])["status"] == "succeeded"


def test_a_job_whose_every_attempt_dies_before_it_commits_anything_fails_worker_lost(rstack):
    """Hole 7's poison job, with real processes: each attempt is killed -9 before its first
    checkpoint, so none made progress and each spends one of max_attempts (3): two pool
    children (the worker's main process re-queues the job) and then a whole worker (the
    reaper's lease), after which the job fails `worker_lost`. A job that commits work between
    kills carries on: the fault-injection test below kills only such shards and none fails."""
    ensure_two_workers(rstack)
    c = rstack.client()
    job = c.create_job({**SPEC, "steps": 1_000_000, "checkpoint_every": 100_000,
                        "max_attempts": 3})
    killed = []
    for attempt, how in enumerate(["pool child", "pool child", "worker"], start=1):
        def running(attempt: int = attempt):  # type: ignore[no-untyped-def]
            now = row(rstack, job["id"])
            assert now.status in ("queued", "running"), (now.status, now.error)
            return now if (now.status, now.attempt) == ("running", attempt) and (
                now.progress_done >= 1) else None

        victim = wait_for(running, timeout=180, interval=0.1)
        killed.append(victim.worker_pid)
        if how == "pool child":
            os.kill(victim.worker_pid, signal.SIGKILL)
        else:
            rstack.stop(node_of(victim), sig=signal.SIGKILL)
    done = finish(c, job["id"])
    ensure_two_workers(rstack)
    assert done["status"] == "failed" and done["error"]["code"] == "worker_lost", done
    assert [(a["attempt"], a["error"]["code"], a["progress"]) for a in done["attempts"]] == [
        (1, "worker_lost", 0), (2, "worker_lost", 0), (3, "worker_lost", 0)]
    # the worker's main process or, should the 4 s lease run out first, the reaper
    for attempt, pid in zip(done["attempts"][:2], killed, strict=False):
        message = attempt["error"]["message"]
        assert message == f"pool process {pid} died" or (
            message.startswith("no heartbeat from") and f" pid {pid} " in message), attempt
    assert done["attempts"][2]["error"]["message"].startswith("no heartbeat from")
    assert row(rstack, job["id"]).failures == 3


def test_a_claim_that_cannot_reach_the_database_is_retried(rstack):
    """A pool child whose claim fails on the database (here SQLite locked past its 30 s busy
    timeout by another connection) neither runs the job nor acknowledges the message away:
    the task is sent again 5 s later, and once the database answers the job runs as the
    same attempt. SQLite only: a lock the test can hold that makes the claim fail."""
    import sqlite3

    if not rstack.env["GENQ_DATABASE_URL"].startswith("sqlite"):
        pytest.skip("a held SQLite write lock is how this test makes the database fail")
    c = rstack.client()
    job = c.create_job({**SPEC, "steps": 3, "queue": "gpu"})  # parked: nobody serves gpu
    name = f"claim{uuid.uuid4().hex[:4]}"
    spawn_worker_on(rstack, name, "strand")
    lock = sqlite3.connect(rstack.env["GENQ_DATABASE_URL"].removeprefix("sqlite:///"),
                           isolation_level=None)
    try:
        lock.execute("BEGIN EXCLUSIVE")  # every writer now waits, then fails
        send_in_stack(rstack, job["id"], 1, queue="strand")
        wait_for(lambda: "claim failed (OperationalError); retrying in 5s" in rstack.log(name),
                 timeout=300)
        assert row(rstack, job["id"]).status == "queued"
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    done = finish(c, job["id"])
    assert done["status"] == "succeeded" and done["attempt"] == 1, done
    assert done["attempts"] == []
    assert f"job {job['id']} attempt 1: claimed" in rstack.log(name)
    rstack.stop(name)


# ---------------------------------------------------------------- database outage

needs_postgres = pytest.mark.skipif(
    not os.environ.get("GENQ_TEST_POSTGRES_URL"),
    reason="the database is taken away by cutting a worker's TCP connections to it, which "
           "SQLite (a file) has none of: set GENQ_TEST_POSTGRES_URL")


class DatabaseProxy:
    """A TCP proxy in this process between a worker and the PostgreSQL server of `url`.
    `down()` is the database gone: the listener and every connection through it closed, so
    open connections break and new ones are refused; `up()` listens again on the same port."""

    def __init__(self, url: str) -> None:
        from sqlalchemy.engine import make_url

        target = make_url(url)
        self.target = (target.host or "127.0.0.1", target.port or 5432)
        self.port = _free_port()
        self.url = target.set(host="127.0.0.1", port=self.port).render_as_string(
            hide_password=False)
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._acceptor: threading.Thread | None = None
        self.up()

    def up(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        self._acceptor = threading.Thread(target=self._accept, args=(listener,), daemon=True)
        self._acceptor.start()

    def close(self) -> None:
        if self._listener is not None:
            self.down()

    def down(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            connections, self._open = self._open, set()
        assert listener is not None and self._acceptor is not None
        with contextlib.suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)  # wakes the acceptor; the port stops listening
        listener.close()
        self._acceptor.join(10)
        for sock in connections:  # each pump sees its end and closes its socket
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        with pytest.raises(ConnectionRefusedError), socket.create_connection(
                ("127.0.0.1", self.port), timeout=5):
            pass

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # shut down
                return
            try:
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            client.settimeout(None)
            upstream.settimeout(None)
            with self._lock:
                if self._listener is not listener:  # went down meanwhile
                    client.close()
                    upstream.close()
                    return
                self._open |= {client, upstream}
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        with self._lock:
            self._open.discard(src)
        src.close()


@contextlib.contextmanager
def stack_behind_a_proxy(redis_server: str, redis_db: int,
                         env: dict[str, str]) -> Iterator[tuple[Stack, DatabaseProxy]]:
    """An API straight on a PostgreSQL database of its own (and a Redis db: conftest's
    own_stack), and a proxy to that database for the test's worker."""
    with own_stack(redis_server, redis_db, "postgresql", env_extra=env) as stack:
        proxy = DatabaseProxy(stack.env["GENQ_DATABASE_URL"])
        try:
            yield stack, proxy
        finally:
            stack.stop_all()
            proxy.close()


def worker_row(stack: Stack, name: str):  # type: ignore[no-untyped-def]
    from common.db import engine_for, session_factory
    from common.models import Worker

    with session_factory(engine_for(stack.env["GENQ_DATABASE_URL"]))() as s:
        return s.scalar(select(Worker).where(Worker.hostname.like(f"{name}@%")))


# Steps of tens of ms: the run (a minute on two busy cores) outlasts an outage of a few
# heartbeats (seconds) by far, and it writes nothing to the database before its end (one
# log interval, no checkpoint before the last), so the heartbeats are all the outage meets.
QUIET_STEPS = 2000
QUIET_SPEC = {**SPEC, "steps": QUIET_STEPS, "batch_size": 64, "seq_len": 128,
              "checkpoint_every": QUIET_STEPS, "log_every": QUIET_STEPS}


@needs_postgres
@pytest.mark.timeout(900)  # minutes on a loaded machine: it waits on progress
def test_a_running_job_rides_out_a_database_outage_of_a_few_heartbeats(redis_server):
    """README, database down: while the database is unreachable a running job's heartbeats
    (every 0.5 s here) fail and are logged, the lease (60 s) covers the gap, and once it is
    back they go on: the job finishes in its first attempt, taken over by no one. The
    worker's own heartbeat (its housekeeping round) skips those rounds and goes on too."""
    from common.models import utcnow

    with stack_behind_a_proxy(redis_server, 1, {"GENQ_LEASE_S": "60"}) as (stack, proxy):
        stack.start_worker("hb", queues="cpu", env={"GENQ_DATABASE_URL": proxy.url})
        c = stack.client()
        job = c.create_job(QUIET_SPEC)
        running_at(stack, job["id"], 1)
        failed = f"job {job['id']}: heartbeat failed"
        proxy.down()
        try:
            wait_for(lambda: stack.log("hb").count(failed) >= 3, timeout=120)
            wait_for(lambda: "housekeeping failed" in stack.log("hb"), timeout=120)
        finally:
            proxy.up()
        back = utcnow()

        def beating_again():  # type: ignore[no-untyped-def]
            now = row(stack, job["id"])
            assert (now.status, now.attempt) == ("running", 1), (now.status, now.attempts_log)
            return now.heartbeat_at > back and now.progress_done < QUIET_STEPS

        wait_for(beating_again, timeout=120)  # the thread outlived its failed beats
        wait_for(lambda: worker_row(stack, "hb").heartbeat_at > back, timeout=120)
        done = finish(c, job["id"])
        assert done["status"] == "succeeded", (done, stack.log("hb")[-3000:])
        assert done["attempt"] == 1 and done["attempts"] == [], done


@needs_postgres
@pytest.mark.timeout(900)  # minutes on a loaded machine: it waits on progress
def test_a_pool_child_killed_while_the_database_is_down_is_taken_over_once_it_is_back(
        redis_server, reference):
    """README, kill -9 of a pool child: when the worker's main process sees its child die
    while the database is unreachable it cannot fail the attempt in SQL, so the message goes
    back to the queue; the next pool child that gets it retries its claim every 5 s and,
    once the database is back, takes the job over and resumes it from its last checkpoint.
    The lease (600 s) keeps the reaper out of it."""
    with stack_behind_a_proxy(redis_server, 2, {"GENQ_LEASE_S": "600"}) as (stack, proxy):
        stack.start_worker("lost", queues="cpu", env={"GENQ_DATABASE_URL": proxy.url})
        c = stack.client()
        job = c.create_job(SPEC)
        pid = running_at(stack, job["id"], 12).worker_pid  # past the step-10 checkpoint
        # stopped first: a child left running through the outage would fail its own next
        # write (a log line every 10 steps), which is not what this test is about
        os.kill(pid, signal.SIGSTOP)
        proxy.down()
        try:
            os.kill(pid, signal.SIGKILL)
            wait_for(lambda: f"job {job['id']}: could not re-queue after its pool child died"
                     in stack.log("lost"), timeout=120)
            wait_for(lambda: f"job {job['id']} attempt 1: claim failed" in stack.log("lost"),
                     timeout=300)  # the message came back, to a new child
        finally:
            proxy.up()
        done = finish(c, job["id"])
        assert done["status"] == "succeeded", (done, stack.log("lost")[-3000:])
        assert done["attempt"] == 2
        assert [(a["attempt"], a["error"]["code"], a["error"]["message"])
                for a in done["attempts"]] == [(1, "worker_lost", f"process {pid} died")]
        assert f"job {job['id']} attempt 2: taken_over" in stack.log("lost")
        assert any("resuming from checkpoint" in m for m in job_logs(stack, job["id"]))
        assert_same_weights(final_weights(stack, done["result"]["checkpoint_id"]), reference)


@needs_postgres
@pytest.mark.timeout(900)  # minutes on a loaded machine: it waits on progress
def test_a_job_that_must_write_while_the_database_is_down_resumes_after_the_lease(
        redis_server, reference):
    """README, database down: a job whose next write (a log line every 10 steps here) comes
    while the database is unreachable loses that attempt; recording the failure fails too,
    so the job stays `running` with no heartbeat, and once the database is back the reaper
    re-queues it after the lease (4 s) and it resumes from its last checkpoint."""
    with stack_behind_a_proxy(redis_server, 3, {"GENQ_LEASE_S": "4"}) as (stack, proxy):
        stack.start_worker("wr", queues="cpu", env={"GENQ_DATABASE_URL": proxy.url})
        c = stack.client()
        job = c.create_job(SPEC)
        running_at(stack, job["id"], 12)  # past the step-10 checkpoint
        proxy.down()
        try:  # the task has ended: its write and the record of its failure both failed
            wait_for(lambda: "Task genq.train[" in stack.log("wr")
                     and "raised unexpected: OperationalError" in stack.log("wr"), timeout=300)
        finally:
            proxy.up()
        done = finish(c, job["id"])
        assert done["status"] == "succeeded", (done, stack.log("wr")[-3000:])
        assert done["attempt"] == 2
        [lost] = done["attempts"]
        assert lost["error"]["code"] == "worker_lost", lost
        assert lost["error"]["message"].startswith("no heartbeat from"), lost
        assert any("resuming from checkpoint" in m for m in job_logs(stack, job["id"]))
        assert_same_weights(final_weights(stack, done["result"]["checkpoint_id"]), reference)


def test_a_database_error_is_recorded_as_retryable_never_internal_error(tmp_path):
    """A job body whose SQL failed on a connection the database refused or dropped (a
    restart), or on a database that stayed locked, is re-queued while attempts remain when
    its failure is recorded, the database back by then: `database_unavailable`, retryable,
    never a permanent `internal_error`. The errors are real ones: a SQLite database that
    cannot be opened, and (on PostgreSQL) a refused connection and one cut mid-transaction."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import OperationalError

    from common.db import normalize_url
    from worker.tasks import failure_of

    def failure(engine) -> dict:  # type: ignore[no-untyped-def]
        with pytest.raises(OperationalError) as raised, engine.connect() as conn:
            conn.execute(text("select 1"))
        return failure_of(raised.value)

    errors = [failure(create_engine(f"sqlite:///{tmp_path / 'gone' / 'genq.db'}"))]
    if os.environ.get("GENQ_TEST_POSTGRES_URL"):
        proxy = DatabaseProxy(os.environ["GENQ_TEST_POSTGRES_URL"])
        try:
            engine = create_engine(normalize_url(proxy.url), pool_pre_ping=True)
            with engine.connect() as conn:
                conn.execute(text("select 1"))  # a transaction open on the connection
                proxy.down()
                with pytest.raises(OperationalError) as cut:
                    conn.execute(text("select 1"))
            errors.append(failure_of(cut.value))
            errors.append(failure(engine))  # refused while the proxy is down
            engine.dispose()
        finally:
            proxy.close()
    for error in errors:
        assert error["code"] == "database_unavailable" and error["retryable"] is True, error
        assert "OperationalError" in error["message"]
    assert failure_of(RuntimeError("a bug")) == {"code": "internal_error",
                                                 "message": "RuntimeError('a bug')"}


def test_deterministic_error_fails_at_once(rstack):
    """A checkpoint to resume from whose files are gone fails at once: retrying cannot help."""
    from common.db import engine_for, session_factory
    from common.models import Checkpoint

    c = rstack.client()
    base = finish(c, c.create_job({**SPEC, "steps": 2})["id"])
    with session_factory(engine_for(rstack.env["GENQ_DATABASE_URL"]))() as s:
        uri = s.get(Checkpoint, base["result"]["checkpoint_id"]).uri
    (Path(uri.removeprefix("file://")) / "config.json").unlink()
    job = c.create_job({**SPEC, "steps": 4, "resume_from": base["result"]["checkpoint_id"],
                        "max_attempts": 3})
    done = finish(c, job["id"])
    assert done["status"] == "failed" and done["error"]["retryable"] is False, done
    assert done["error"]["code"] == "checkpoint_unreadable"
    assert done["attempt"] == 1 and row(rstack, job["id"]).failures == 1
    assert [a["error"]["code"] for a in done["attempts"]] == [done["error"]["code"]]


def test_transient_error_retries_with_backoff_then_fails(rstack):
    """Storage that cannot take the checkpoint (a file where its folder goes) is transient."""
    c = rstack.client()
    job = c.create_job({**SPEC, "queue": "gpu", "max_attempts": 3})  # parked: nobody serves gpu
    blocker = rstack.home / "storage" / "checkpoints" / job["id"]
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("not a folder")
    from common.db import engine_for, session_factory
    from common.models import Job

    with session_factory(engine_for(rstack.env["GENQ_DATABASE_URL"]))() as s:
        s.get(Job, job["id"]).queue = "cpu"
        s.get(Job, job["id"]).enqueued_at = None  # the outbox sweep sends it to cpu
        s.commit()
    done = finish(c, job["id"])
    assert done["status"] == "failed", done
    codes = [a["error"]["code"] for a in done["attempts"]]
    assert len(codes) == 3 and len(set(codes)) == 1 and done["attempts"][0]["error"]["retryable"]
    assert row(rstack, job["id"]).failures == 3


def test_timeout_checkpoints_then_fails(rstack):
    c = rstack.client()
    job = c.create_job({**SPEC, "steps": 5000, "timeout_s": 3})
    done = finish(c, job["id"])
    assert done["status"] == "failed" and done["error"]["code"] == "timeout", done
    assert done["result"]["checkpoint_id"]
    c.request("GET", f"/v1/checkpoints/{done['result']['checkpoint_id']}")


# ---------------------------------------------------------------- broker outage


def test_redis_restart_loses_nothing(rstack, aof_redis):
    """Queued messages survive a Redis restart (appendonly); submits while down get 503."""
    c = rstack.client()
    parked = [c.create_job({**SPEC, "steps": 3, "queue": "gpu"}) for _ in range(2)]
    aof_redis.stop()
    try:
        resp = httpx.post(f"{rstack.api_url}/v1/jobs", json={**SPEC, "steps": 3},
                          headers={"Authorization": f"Bearer {rstack.api_key}"}, timeout=30)
        assert resp.status_code == 503, resp.text
        assert resp.json()["error"]["code"] == "broker_unavailable"
        assert c.list_jobs(limit=100)["data"][0]["id"] == parked[-1]["id"]  # nothing written
    finally:
        aof_redis.start()
    # the parked messages are still in Redis: a gpu worker now takes them
    spawn_worker_on(rstack, "g1", "gpu")
    for job in parked:
        assert finish(c, job["id"])["status"] == "succeeded"
    rstack.stop("g1")


def test_redis_restart_mid_training_loses_nothing(rstack, aof_redis, reference):
    """A job running while Redis goes away and comes back finishes with the same weights,
    and the workers take new jobs afterwards."""
    ensure_two_workers(rstack)
    c = rstack.client()
    job = c.create_job(SPEC)
    running_at(rstack, job["id"], 8)
    aof_redis.stop()
    time.sleep(2)
    aof_redis.start()
    done = finish(c, job["id"])
    assert done["status"] == "succeeded", done
    assert_same_weights(final_weights(rstack, done["result"]["checkpoint_id"]), reference)
    after = c.create_job({**SPEC, "steps": 3})
    assert finish(c, after["id"])["status"] == "succeeded"


def spawn_worker_on(stack: Stack, name: str, queues: str) -> None:
    stack.spawn(name, [sys.executable, "-m", "api.cli", "worker", "--queues", queues,
                       "--name", name])
    stack.wait_worker(name)


def test_outbox_sweep_sends_a_job_that_never_reached_the_broker(rstack):
    from common.auth import owner_of
    from common.db import engine_for, session_factory
    from common.models import Job, utcnow

    ensure_two_workers(rstack)
    with session_factory(engine_for(rstack.env["GENQ_DATABASE_URL"]))() as s:
        owner = owner_of(s, rstack.api_key)
        job = Job(id=f"job_{uuid.uuid4().hex}", owner=owner, type="train", family="lstm",
                  spec={**SPEC, "steps": 3}, queue="cpu", progress_unit="step",
                  progress_total=3, max_attempts=3,
                  created_at=utcnow() - timedelta(seconds=60))
        s.add(job)
        s.commit()
        job_id = job.id
    assert row(rstack, job_id).enqueued_at is None
    done = finish(rstack.client(), job_id)
    assert done["status"] == "succeeded", done


THIEF = """
import sys, time
from common.celery_app import get_celery

with get_celery().connection_for_read() as conn:
    queue = conn.SimpleQueue(sys.argv[1], no_ack=False)
    message = queue.get(timeout=60)  # delivered, so in Redis's unacked hash; never acked
    print("fetched", message.payload[0][0], flush=True)
    time.sleep(600)
"""


def test_a_message_fetched_by_a_worker_killed_before_the_claim_is_sent_again(rstack):
    """Hole 1: a worker killed after its main process fetched a message but before a pool
    child claimed the job left it queued until the 12 h visibility timeout. It is sent again
    a lease after the fetch even while other messages wait on its queue (a batch's shards
    always keep some waiting): the new worker is busy on a long job with another queued
    behind it when the stranded one is sent again."""
    ensure_two_workers(rstack)  # they run the reaper; neither consumes the strand queue
    import redis

    from common.celery_app import redis_lists

    # a message left on the strand queue by an earlier run on this Redis (the other
    # database backend's) would be the one the thief takes, and this job's would wait
    redis.Redis.from_url(rstack.env["GENQ_BROKER_URL"]).delete(*redis_lists("strand"))
    thief = subprocess.Popen([sys.executable, "-c", THIEF, "strand"], env=rstack.env, cwd=ROOT,
                             stdout=subprocess.PIPE, text=True)
    try:
        c = rstack.client()
        job = c.create_job({**SPEC, "steps": 3, "queue": "strand"})
        assert thief.stdout is not None
        assert thief.stdout.readline().split() == ["fetched", job["id"]]
        long = c.create_job({**SPEC, "steps": 1_000_000, "checkpoint_every": 1000,
                             "queue": "strand"})
        behind = c.create_job({**SPEC, "steps": 3, "queue": "strand"})
        thief.kill()
        thief.wait(10)
        assert row(rstack, job["id"]).status == "queued"
        name = f"strand{uuid.uuid4().hex[:4]}"
        rstack.spawn(name, [sys.executable, "-m", "api.cli", "worker", "--queues", "strand",
                            "--name", name])
        rstack.wait_worker(name)
        running_at(rstack, long["id"], 1)
        logs = lambda: "".join(rstack.log(n) for n in rstack.procs if n != "api")  # noqa: E731
        # the lease is 4 s; the visibility timeout 12 h; `behind` waits on the queue throughout
        wait_for(lambda: f"job {job['id']}: queued" in logs(), timeout=120)
        assert "never claimed; sent again" in logs()
        assert f"job {behind['id']}: queued" not in logs()  # a waiting message: not sent twice
        assert row(rstack, behind["id"]).status == "queued"
        c.cancel(long["id"])
        assert finish(c, long["id"])["status"] == "cancelled"
        for waited in (behind, job):
            done = finish(c, waited["id"])
            assert done["status"] == "succeeded" and done["attempt"] == 1, done
        rstack.stop(name)
    finally:
        if thief.poll() is None:
            thief.kill()


# ---------------------------------------------------------------- reaper and back-off (SQL level)


def _running_job(session, **values):  # type: ignore[no-untyped-def]
    from common.models import Job, utcnow

    values = {"heartbeat_at": utcnow(), "max_attempts": 3, **values}
    job = Job(id=f"job_{uuid.uuid4().hex}", owner="reaper-test", type="train", family="lstm",
              spec={}, queue="cpu", status="running", worker="x@nowhere", worker_pid=1, **values)
    session.add(job)
    session.commit()
    return job


def test_only_one_reaper_holds_the_lease(session):
    from concurrent.futures import ThreadPoolExecutor

    from common import jobs
    from common.db import session_factory

    name = f"reaper-{uuid.uuid4().hex[:6]}"
    factory = session_factory(session.get_bind())

    def attempt(holder: str) -> bool:
        with factory() as s:
            return jobs.take_lease(s, name, holder, ttl_s=30)

    with ThreadPoolExecutor(4) as pool:
        won = list(pool.map(attempt, [f"w{i}" for i in range(4)]))
    assert sum(won) == 1
    winner = f"w{won.index(True)}"
    assert attempt(winner) and not attempt("late")
    with factory() as s:  # an expired lease passes on
        assert jobs.take_lease(s, name, winner, ttl_s=-1)
    assert attempt("late")


def test_only_old_unclaimed_jobs_of_idle_queues_are_sent_again(session, redis_server):
    """resend_stranded asks the broker about a queue only for a job queued a lease ago, and
    sends nothing where messages still wait (a backlog is not a stranded message), unless
    the job's own message was fetched a lease ago and never acknowledged: that one is
    stranded whatever waits behind it."""
    from common import jobs
    from common.models import Job, utcnow

    def queued(queue: str, age_s: float, **values):  # type: ignore[no-untyped-def]
        job = Job(id=f"job_{uuid.uuid4().hex}", owner="strand-test", type="train",
                  family="lstm", spec={}, queue=queue, status="queued", max_attempts=3,
                  enqueued_at=utcnow() - timedelta(seconds=age_s), **values)
        session.add(job)
        session.commit()
        return job

    queued("q-old", 300)
    queued("q-young", 5)
    queued("q-cancelled", 300, cancel_requested=True)
    queued("q-later", 300, not_before=utcnow() + timedelta(seconds=60))
    # a real queue: this one is sent (to a Redis where no worker knows the job: dropped)
    stranded = queued("gpu", 300, celery_task_id="task-fetched-by-the-dead")
    queued("gpu", 300, celery_task_id="task-waiting-behind-it")
    asked: list[str] = []

    def waiting(queue: str) -> int:
        asked.append(queue)
        return 3  # a backlog: nothing is sent

    def fetched() -> set[str]:
        return {"task-fetched-by-the-dead", "task-of-a-running-job"}

    assert jobs.resend_stranded(session, lease_s=120, waiting=waiting, fetched=fetched) == [
        stranded.id]
    assert sorted(q for q in asked if q.startswith("q-") or q == "gpu") == ["gpu", "q-old"]
    session.refresh(stranded)
    assert stranded.celery_task_id != "task-fetched-by-the-dead"  # a new message
    assert stranded.enqueued_at > utcnow() - timedelta(seconds=60)


def test_reaper_requeues_then_fails_worker_lost(session):
    from common import jobs
    from common.models import Job, utcnow

    fresh = _running_job(session)
    stale = _running_job(session, heartbeat_at=utcnow() - timedelta(seconds=300))
    last = _running_job(session, heartbeat_at=utcnow() - timedelta(seconds=300), failures=2)
    reaped = jobs.reap(session, lease_s=120)
    assert fresh.id not in reaped and {stale.id, last.id} <= set(reaped)
    session.expire_all()
    stale, last = session.get(Job, stale.id), session.get(Job, last.id)
    assert (stale.status, stale.attempt, stale.failures) == ("queued", 2, 1)
    assert stale.not_before is not None and stale.not_before > utcnow()
    assert stale.attempts_log[-1]["error"]["code"] == "worker_lost"
    assert last.status == "failed" and last.error["code"] == "worker_lost"
    assert session.get(Job, fresh.id).status == "running"


def test_only_attempts_without_progress_spend_max_attempts(session):
    """A training attempt that leaves a newer checkpoint is no evidence of a poison job: it
    is re-queued without spending an attempt; one that leaves nothing new spends one."""
    from common import jobs
    from common.models import Checkpoint, Job, new_id

    job = _running_job(session, max_attempts=2)
    lost = {"code": "worker_lost", "message": "x", "retryable": True}

    def checkpoint(step: int) -> None:
        session.add(Checkpoint(id=new_id("ckpt_"), job_id=job.id, step=step, uri="file:///x",
                               bytes=1, metrics={}))
        session.commit()

    def run_again() -> None:
        session.execute(Job.__table__.update().where(Job.id == job.id).values(status="running"))
        session.commit()
        session.refresh(job)

    checkpoint(10)
    assert jobs.fail_job(session, job, lost) == "queued"
    session.refresh(job)
    assert (job.attempt, job.failures, job.attempts_log[-1]["progress"]) == (2, 0, 10)
    run_again()
    checkpoint(20)
    assert jobs.fail_job(session, job, lost) == "queued"
    session.refresh(job)
    assert (job.attempt, job.failures) == (3, 0)
    run_again()  # this attempt crashes before its next checkpoint: it spends one
    assert jobs.fail_job(session, job, lost) == "queued"
    session.refresh(job)
    assert (job.attempt, job.failures) == (4, 1)
    run_again()  # and again: max_attempts=2 attempts without progress, so it fails
    assert jobs.fail_job(session, job, lost) == "failed"
    session.refresh(job)
    assert (job.status, job.failures) == ("failed", 2)


def test_retry_backoff_doubles(session):
    from common import jobs
    from common.config import get_settings
    from common.models import Job, utcnow

    base = get_settings().retry_backoff_s
    job = _running_job(session, max_attempts=5)
    delays = []
    for _ in range(3):
        before = utcnow()
        assert jobs.fail_job(session, job, {"code": "transient", "message": "x",
                                            "retryable": True}) == "queued"
        session.refresh(job)
        delays.append((job.not_before - before).total_seconds())
        session.execute(Job.__table__.update().where(Job.id == job.id).values(status="running"))
        session.commit()
        session.refresh(job)
    assert [round(d / base) for d in delays] == [1, 2, 4], delays


@pytest.mark.timeout(1800)  # eight kills and takeovers, each minutes at worst when loaded
def test_pool_child_forked_during_housekeeping_is_not_stuck(redis_server):
    """The worker's main process does its SQL (reaper, heartbeats) while it forks new pool
    children; a child forked mid-query once inherited a locked SQLite mutex and hung forever.
    With housekeeping nearly always in SQL, every replaced child must still take jobs."""
    with fresh_database("sqlite") as db:
        stack = start_stack(db, redis_server.rsplit("/", 1)[0] + "/8",
                            env_extra={"GENQ_REAPER_INTERVAL_S": "0.02", "GENQ_LEASE_S": "4"})
        try:
            stack.start_worker("f1", queues="cpu")
            c = stack.client()
            # Each round kills the job's pool child and waits for a replacement child to take
            # it again; the job is long enough never to end on its own, so no speed matters.
            spec = {**SPEC, "steps": 1_000_000, "checkpoint_every": 20}
            for _ in range(8):
                job = c.create_job(spec)
                killed = running_at(stack, job["id"], 1).worker_pid
                os.kill(killed, signal.SIGKILL)
                def taken_again(job_id: str = job["id"], killed: int = killed) -> bool:
                    again = row(stack, job_id)
                    return again.status == "running" and again.worker_pid not in (None, killed)

                # a hang (the bug) never ends; a retry back-off on a loaded machine does
                wait_for(taken_again, timeout=400, interval=0.1)
                c.cancel(job["id"])
                done = finish(c, job["id"], stalled_s=30)
                assert done["status"] == "cancelled", (done, stack.log("f1")[-2000:])
        finally:
            stack.stop_all()


def test_reaper_removes_a_partial_upload_left_by_a_killed_api(redis_server):
    """kill -9 of the API mid-upload leaves files/file-….tmp with no row; once it has gone
    unwritten for GENQ_STALE_UPLOAD_S the reaper removes it, and a fresher one stays."""
    with fresh_database("sqlite") as db:
        stack = start_stack(db, redis_server.rsplit("/", 1)[0] + "/9",
                            env_extra={"GENQ_STALE_UPLOAD_S": "600"})
        try:
            files = stack.home / "storage" / "files"
            files.mkdir(parents=True, exist_ok=True)
            old, fresh = files / "file-killed.tmp", files / "file-writing.tmp"
            old.write_bytes(b"x" * 1000)
            fresh.write_bytes(b"y" * 1000)
            os.utime(old, (time.time() - 3600, time.time() - 3600))
            stack.start_worker("u1", queues="cpu")
            wait_for(lambda: not old.exists(), timeout=60)
            assert fresh.exists()
        finally:
            stack.stop_all()


def test_worker_names_are_unique_per_process(redis_server):
    """Two `genq worker --queues cpu` on one host get two node names; a --name in use is
    refused with one line. A SIGTERM to one of the two must only touch its own jobs: the
    other's running job goes on in the same attempt, and its /v1/workers row stays."""
    from common.db import engine_for, session_factory
    from common.models import Worker

    with fresh_database("sqlite") as db:
        stack = start_stack(db, redis_server.rsplit("/", 1)[0] + "/10")
        try:
            stack.start_worker("named", queues="cpu")
            argv = [sys.executable, "-m", "api.cli", "worker", "--queues", "cpu"]
            first, second = stack.spawn("d1", argv), stack.spawn("d2", argv)

            def rows() -> list[Worker]:
                with session_factory(engine_for(db))() as s:
                    return list(s.query(Worker).filter(Worker.hostname.like("cpu-%")))

            found = wait_for(lambda: len(rows()) == 2 and rows(), timeout=90)
            assert {w.hostname.split("@")[0] for w in found} == {
                f"cpu-{first.pid}", f"cpu-{second.pid}"}
            taken = subprocess.run([*argv, "--name", "named"], env=stack.env, cwd=ROOT,
                                   capture_output=True, text=True, timeout=60)
            assert taken.returncode == 1 and "Traceback" not in taken.stderr
            assert "--name" in taken.stderr and "is taken" in taken.stderr, taken.stderr

            stack.stop("named")  # the job must land on one of the two unnamed workers
            c = stack.client()
            job = c.create_job({**SPEC, "steps": 1_000_000, "checkpoint_every": 1000})
            runner = running_at(stack, job["id"], 1)
            other = "d2" if runner.worker.startswith(f"cpu-{first.pid}@") else "d1"
            survivor = "d1" if other == "d2" else "d2"
            assert runner.worker.startswith(f"cpu-{stack.procs[survivor].pid}@")
            os.kill(stack.procs[other].pid, signal.SIGTERM)  # its main process, as docker stop
            assert stack.procs.pop(other).wait(120) == 0
            after = running_at(stack, job["id"], runner.progress_done + 5)
            assert (after.attempt, after.worker, after.worker_pid) == (
                1, runner.worker, runner.worker_pid)
            assert not after.shutdown_requested and after.attempts_log == []
            listed = {w["hostname"]: w for w in c.workers()}
            assert runner.worker in listed, listed
            assert listed[runner.worker]["current_job"] == job["id"]
            assert all(name.startswith(f"cpu-{stack.procs[survivor].pid}@") for name in listed)
            c.cancel(job["id"])
            assert finish(c, job["id"])["status"] == "cancelled"
        finally:
            stack.stop_all()


LORA_SPEC = {"type": "train", "family": "lm", "steps": 150, "batch_size": 8, "seq_len": 32,
             "checkpoint_every": 10, "log_every": 10, "seed": 5,
             "config": {"arch": "llama", "vocab_size": 300, "hidden_size": 32,
                        "num_hidden_layers": 2, "num_attention_heads": 2,
                        "intermediate_size": 64, "max_position_embeddings": 64},
             "adapter": {"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": "all-linear"}}


def test_kill9_pool_child_resumes_a_lora_run_exactly(rstack, tmp_path):
    """A LoRA run over a from-config base resumes bit-for-bit after a kill: the resumed
    attempt reloads the stored base and the checkpoint's adapter and optimizer state."""
    from common.db import engine_for, session_factory
    from common.ml.checkpoint import load_model
    from common.ml.train import TrainHooks, run_training
    from common.models import Checkpoint

    with workers_thread_count():
        out = run_training(TrainJobSpec.model_validate(LORA_SPEC), tmp_path / "ref",
                           hooks=TrainHooks())
    ensure_two_workers(rstack)
    c = rstack.client()
    job = c.create_job(LORA_SPEC)
    pid = running_at(rstack, job["id"], 12).worker_pid  # past the step-10 checkpoint
    os.kill(pid, signal.SIGKILL)
    done = finish(c, job["id"])
    assert done["status"] == "succeeded" and done["attempt"] >= 2, done
    assert any("resuming from checkpoint" in m for m in job_logs(rstack, job["id"]))
    with session_factory(engine_for(rstack.env["GENQ_DATABASE_URL"]))() as s:
        uri = s.get(Checkpoint, done["result"]["checkpoint_id"]).uri
    resumed = load_model(Path(uri.removeprefix("file://")),
                         locate=lambda base: Path(base.removeprefix("file://")))
    assert_same_weights(resumed.model.state_dict(), load_model(out.checkpoint).model.state_dict())


# ---------------------------------------------------------------- fault injection


# How long the fault-injection test lets a job be left behind, by SQL timestamps: the lease
# (GENQ_LEASE_S, 4 s there), the reaper's own SQL lease passing on when its holder was the
# worker killed (3 rounds of GENQ_REAPER_INTERVAL_S, 1 s there), the round that then acts,
# and a margin. The retry back-off (GENQ_RETRY_BACKOFF_S) is not in it: a re-queued shard
# waits it out unsent, and the clock of a sent one starts when it is sent. The margin is
# for a loaded two-core machine, where a round's SQL waits behind the shards' item commits
# on SQLite and the workers' main processes get little CPU: 30 s is dozens of rounds. What
# the test is there to catch waits far longer: a stranded message until the visibility
# timeout (12 h) or until its queue drains (the batch's end, minutes), a dead process's
# job missed by the reaper for ever.
LEFT_BEHIND_MARGIN_S = 30.0


def waiting_task_ids(broker_url: str, queue: str) -> set[str]:
    """Task ids of the messages on the queue's Redis lists: sent, not yet fetched."""
    import json

    import redis

    from common.celery_app import redis_lists

    client = redis.Redis.from_url(broker_url)
    return {json.loads(message)["headers"]["id"]
            for key in redis_lists(queue) for message in client.lrange(key, 0, -1)}


class LeftBehind:
    """The longest each shard was seen left behind, in seconds by SQL timestamps (the
    workers' clock, which is this machine's): `running` under a dead process since its last
    heartbeat, or `queued` with its message fetched from the broker's list but unclaimed
    since the later of its enqueued_at and the first look that found the message gone."""

    DEAD = "running under a dead process"
    FETCHED = "queued, fetched and unclaimed"

    def __init__(self) -> None:
        self.fetched_since: dict[tuple[str, str | None], object] = {}
        self.longest = {self.DEAD: 0.0, self.FETCHED: 0.0}

    def look(self, shards: list, waiting: set[str]) -> None:  # type: ignore[type-arg]
        from common.models import utcnow

        now = utcnow()
        for shard in shards:
            if shard.status == "running" and shard.worker_pid and not _alive(shard.worker_pid):
                self._note(self.DEAD, now - shard.heartbeat_at)
            elif (shard.status == "queued" and shard.enqueued_at is not None
                  and shard.celery_task_id not in waiting):
                since = self.fetched_since.setdefault((shard.id, shard.celery_task_id), now)
                self._note(self.FETCHED, now - max(since, shard.enqueued_at))  # type: ignore[type-var]

    def _note(self, state: str, age: timedelta) -> None:
        self.longest[state] = max(self.longest[state], age.total_seconds())


class Thief:
    """A consumer that fetches one message from a queue and is killed -9 before any claim:
    a worker killed between its main process's fetch and its pool child's claim."""

    def __init__(self, stack: Stack, queue: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", THIEF, queue], env=stack.env,
                                     cwd=ROOT, stdout=subprocess.PIPE, text=True)

    def fetched(self) -> bool:
        """Kill it once it has fetched (True then); False while it waits."""
        import select as io_select

        assert self.proc.stdout is not None
        if not io_select.select([self.proc.stdout], [], [], 0)[0]:
            return False
        line = self.proc.stdout.readline()
        self.kill()
        assert line.startswith("fetched "), f"the thief fetched nothing: {line!r}"
        return True

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


# Items committed (across the batch) from one kill to the next: a shard of 10 or less apart.
KILL_EVERY = (4, 12)


@pytest.mark.timeout(900)  # minutes on a loaded machine: it waits on progress
def test_random_kills_during_a_multi_shard_batch_lose_and_double_nothing(aof_redis):
    """Issue 25: pool children and whole workers killed at random while two workers run a
    batch of many shards, and a consumer killed after it fetched a shard's message (a
    worker killed before its pool child claimed it). Every custom_id comes out exactly
    once, nothing fails, and no shard is left behind, `running` under a dead process or
    `queued` with its message fetched but unclaimed, for longer than the lease and the
    reaper's rounds (LEFT_BEHIND_MARGIN_S). A victim is always a shard that committed items
    in its current attempt: attempts that made no progress may legitimately spend
    max_attempts (a poison job). The kills are paced by the batch's progress, not the clock:
    each is due once a few more items are committed since the last, so all seven land in
    about the first half of the batch on a machine of any speed."""
    import io
    import random

    from common.db import engine_for, session_factory
    from common.models import Item, Job
    from tests.test_batches import jsonl, lines_for, read_jsonl, sdk

    lease_s, interval_s = 4, 1
    broker = aof_redis.url.rsplit("/", 1)[0] + "/4"
    with fresh_database("sqlite") as db:
        stack = start_stack(db, broker, env_extra={
            "GENQ_LEASE_S": str(lease_s), "GENQ_REAPER_INTERVAL_S": str(interval_s),
            "GENQ_RETRY_BACKOFF_S": "0.5", "GENQ_SHARD_SIZE": "10", "GENQ_ITEM_CHUNK": "1",
            "GENQ_TOKEN_BUDGET": "64"})
        thief: Thief | None = None
        try:
            for name in ("f0", "f1"):
                spawn_worker(stack, name)
            for name in ("f0", "f1"):
                stack.wait_worker(name)
            c = stack.client()
            trained = finish(c, c.create_job({**SPEC, "steps": 10})["id"])
            # Seeded lines run one by one, 600 tokens keep a shard of 10 running for a couple
            # of seconds (victims with items committed in their attempt); the kills are due at
            # most 7 x KILL_EVERY[1] = 84 items (and a few waits for a victim) into 320.
            rows = lines_for(trained["result"]["model"], 320, max_tokens=600)
            client = sdk(stack)
            upload = client.files.create(file=("in.jsonl", io.BytesIO(jsonl(rows))),
                                         purpose="batch")
            batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/completions",
                                          completion_window="24h")
            rng = random.Random(25)
            kills = ["pool child", "pool child", "pool child", "worker", "worker", "worker",
                     "fetched"]
            rng.shuffle(kills)
            done_kills: list[str] = []
            landed: list[int] = []  # items committed when each kill landed
            left_behind = LeftBehind()
            next_kill = rng.randint(*KILL_EVERY)  # due once this many items are committed
            factory = session_factory(engine_for(stack.env["GENQ_DATABASE_URL"]))
            deadline = time.monotonic() + 800
            while client.batches.retrieve(batch.id).status not in ("completed", "failed"):
                assert time.monotonic() < deadline, "the batch did not finish"
                with factory() as s:
                    shards = list(s.scalars(select(Job).where(
                        Job.parent_id == batch.id, Job.status.in_(["queued", "running"]))))
                    committed = {shard.id: s.scalar(
                        select(func.count()).select_from(Item).where(
                            Item.job_id == shard.id, Item.status != "pending"))
                        for shard in shards if shard.status == "running"}
                    progress = s.scalar(select(func.count()).select_from(Item).join(
                        Job, Item.job_id == Job.id).where(
                        Job.parent_id == batch.id, Item.status != "pending"))
                left_behind.look(shards, waiting_task_ids(broker, "cpu"))
                if thief is not None and thief.fetched():
                    thief, next_kill = None, progress + rng.randint(*KILL_EVERY)
                    done_kills.append("fetched")
                    landed.append(progress)
                victims = [shard for shard in shards if shard.status == "running"
                           and shard.worker_pid and _alive(shard.worker_pid)
                           and committed[shard.id]
                           > max([e.get("progress", 0) for e in shard.attempts_log] or [0])]
                if kills and thief is None and progress >= next_kill and (
                        victims or kills[-1] == "fetched"):
                    how = kills.pop()
                    if how == "fetched":
                        thief = Thief(stack, "cpu")
                        continue
                    shard = rng.choice(victims)
                    if how == "pool child":
                        os.kill(shard.worker_pid, signal.SIGKILL)
                    else:
                        stack.stop(node_of(shard), sig=signal.SIGKILL)
                        spawn_worker(stack, f"f{len(done_kills) + 2}")
                    done_kills.append(how)
                    landed.append(progress)
                    next_kill = progress + rng.randint(*KILL_EVERY)
                time.sleep(0.1)
            final = client.batches.retrieve(batch.id)
            assert final.status == "completed", final
            assert sorted(done_kills) == sorted(["pool child"] * 3 + ["worker"] * 3 + [
                "fetched"]), (done_kills, landed, "the batch finished before every kill landed")
            out = read_jsonl(client, final.output_file_id)
            ids = [o["custom_id"] for o in out]
            assert sorted(ids) == sorted(r["custom_id"] for r in rows)  # each exactly once
            assert read_jsonl(client, final.error_file_id) == []
            assert final.request_counts.completed == len(rows)  # type: ignore[union-attr]
            with factory() as s:
                left = list(s.scalars(select(Job.status).where(
                    Job.status.in_(["queued", "running"]))))
                retried = s.scalar(select(func.count()).select_from(Job).where(
                    Job.parent_id == batch.id, Job.attempt > 1))
            assert left == [] and retried >= 1
            bound = lease_s + 3 * interval_s + interval_s + LEFT_BEHIND_MARGIN_S
            assert max(left_behind.longest.values()) < bound, left_behind.longest
            # the fetched shard was sent again (by whichever worker held the reaper's lease)
            logs = "".join(p.read_text(errors="replace") for p in stack.home.glob("f*.log"))
            assert "never claimed; sent again" in logs
        finally:
            if thief is not None:
                thief.kill()
            stack.stop_all()
