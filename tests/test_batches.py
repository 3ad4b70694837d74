"""The OpenAI Batch API end to end: the official SDK, validation, sharding, cancel, crash."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import openai
import pytest
from sqlalchemy import func, select, text

from common.db import engine_for, session_factory
from common.models import Item, Job
from tests.conftest import ROOT, own_stack, train_lstm, wait_for

PROMPTS = ["The ", "def ", "import ", "class ", "A ", "In ", "For ", "x = "]


def sdk(stack) -> openai.OpenAI:  # type: ignore[no-untyped-def]
    return openai.OpenAI(base_url=f"{stack.api_url}/v1", api_key=stack.api_key, max_retries=0)


def lines_for(model: str | None, n: int, *, endpoint: str = "/v1/completions",
              max_tokens: int = 6) -> list[dict]:
    rows = []
    for i in range(n):
        prompt = PROMPTS[i % len(PROMPTS)]
        body: dict = {"max_tokens": max_tokens, "temperature": 0.8, "seed": i}
        if model:
            body["model"] = model
        if endpoint == "/v1/chat/completions":
            body["messages"] = [{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        rows.append({"custom_id": f"req-{i}", "method": "POST", "url": endpoint, "body": body})
    return rows


def jsonl(rows: list) -> bytes:
    return b"".join((r if isinstance(r, str) else json.dumps(r)).encode() + b"\n" for r in rows)


def run_batch(client: openai.OpenAI, rows: list, endpoint: str, timeout: float = 90):  # type: ignore[no-untyped-def]
    upload = client.files.create(file=("in.jsonl", io.BytesIO(jsonl(rows))), purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint=endpoint,  # type: ignore[arg-type]
                                  completion_window="24h", metadata={"test": "yes"})
    deadline = time.monotonic() + timeout
    while batch.status not in ("completed", "failed", "cancelled", "expired"):
        assert time.monotonic() < deadline, batch
        time.sleep(0.3)
        batch = client.batches.retrieve(batch.id)
    return batch


def read_jsonl(client: openai.OpenAI, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    text = client.files.content(file_id).text
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def session_of(stack):  # type: ignore[no-untyped-def]
    return session_factory(engine_for(stack.env["GENQ_DATABASE_URL"]))()


@pytest.mark.parametrize("endpoint", ["/v1/completions", "/v1/chat/completions"])
def test_openai_sdk_runs_a_batch(stack, trained_lstm, endpoint):
    client = sdk(stack)
    model = trained_lstm["result"]["model"]
    rows = lines_for(model, 6, endpoint=endpoint)
    batch = run_batch(client, rows, endpoint)
    assert batch.status == "completed", batch
    assert batch.request_counts is not None
    assert (batch.request_counts.total, batch.request_counts.completed) == (6, 6)
    assert batch.metadata == {"test": "yes"} and batch.completed_at and batch.error_file_id is None
    out = read_jsonl(client, batch.output_file_id)
    assert sorted(o["custom_id"] for o in out) == sorted(r["custom_id"] for r in rows)
    chat = endpoint == "/v1/chat/completions"
    shape = openai.types.chat.ChatCompletion if chat else openai.types.Completion
    for line in out:
        assert line["id"].startswith("batch_req_") and line["error"] is None
        assert line["response"]["status_code"] == 200
        body = shape.model_validate(line["response"]["body"])
        assert body.model == model and len(body.choices) == 1
        assert body.usage is not None and body.usage.completion_tokens > 0
    job = stack.client().get_job(batch.id)
    assert job["type"] == "batch" and job["status"] == "succeeded"
    assert job["progress"]["done"] == job["progress"]["total"] == 6
    assert client.files.retrieve(batch.output_file_id).purpose == "batch_output"
    assert batch.id in [b.id for b in client.batches.list(limit=5).data]


def test_bad_file_fails_with_line_errors_and_queues_nothing(stack, trained_lstm):
    client = sdk(stack)
    model = trained_lstm["result"]["model"]
    good = lines_for(model, 2)
    rows = [
        good[0],                                                    # 1 ok
        "{not json",                                                # 2
        {"method": "POST", "url": "/v1/completions", "body": {"model": model, "prompt": "a"}},  # 3
        {**good[1], "custom_id": "req-0"},                          # 4 duplicate
        {**good[1], "custom_id": "u", "url": "/v1/chat/completions"},  # 5 wrong url
        {**good[1], "custom_id": "m", "body": {"model": "nope", "prompt": "a"}},  # 6
        {**good[1], "custom_id": "t", "body": {"model": model, "prompt": "a", "max_tokens": 0}},
    ]
    upload = client.files.create(file=("bad.jsonl", io.BytesIO(jsonl(rows))), purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/completions",
                                  completion_window="24h")
    assert batch.status == "validating"  # a worker reads the file, as OpenAI's batches do
    batch = wait_for(lambda: (b := client.batches.retrieve(batch.id)).status != "validating"
                     and b, timeout=120)
    assert batch.status == "failed" and batch.failed_at
    assert batch.errors is not None and batch.errors.data is not None
    by_line = {e.line: e.code for e in batch.errors.data}
    assert by_line == {2: "invalid_json", 3: "missing_required_parameter",
                       4: "duplicate_custom_id", 5: "mismatched_endpoint",
                       6: "model_not_found", 7: "invalid_value"}, batch.errors
    with session_of(stack) as s:
        assert s.scalars(select(Job).where(Job.parent_id == batch.id,
                                           Job.type == "shard")).all() == []
    assert client.batches.retrieve(batch.id).status == "failed"


def test_files_api(stack):
    client = sdk(stack)
    up = client.files.create(file=("data.txt", io.BytesIO(b"hello world\n")), purpose="dataset")
    assert (up.object, up.bytes, up.filename, up.status) == ("file", 12, "data.txt", "processed")
    assert client.files.retrieve(up.id).id == up.id
    assert client.files.content(up.id).content == b"hello world\n"
    assert up.id in [f.id for f in client.files.list()]
    assert client.files.delete(up.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(up.id)
    with pytest.raises(openai.UnprocessableEntityError):
        client.files.create(file=("x.exe", io.BytesIO(b"x")), purpose="batch")


def test_cli_batch_submit_waits_for_output(stack, trained_lstm, tmp_path):
    path = tmp_path / "reqs.jsonl"
    path.write_bytes(jsonl(lines_for(None, 3)))
    env = {**stack.env, "GENQ_API_KEY": stack.api_key}
    proc = subprocess.run(
        [sys.executable, "-m", "api.cli", "batch", "submit", str(path), "--model",
         trained_lstm["result"]["model"], "--wait", "--out", str(tmp_path / "out.jsonl")],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    batch_id = proc.stdout.split("submitted batch ")[1].split()[0]
    assert batch_id.startswith("job_")
    assert "completed" in proc.stdout
    assert str(tmp_path / "out.jsonl") in proc.stdout.replace("\n", "")
    out = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert sorted(o["custom_id"] for o in out) == ["req-0", "req-1", "req-2"]


# ------------------------------------------------------------------ sharded, two workers


@pytest.fixture(scope="module")
def shard_stack(stack, redis_server):  # type: ignore[no-untyped-def]
    """An API and two workers, shards of 4 requests, on a database and a Redis db of their
    own: no other stack's reaper or release sends their jobs to its own workers."""
    backend = "sqlite" if stack.env["GENQ_DATABASE_URL"].startswith("sqlite") else "postgresql"
    with own_stack(redis_server, 5, backend, env_extra={
        "GENQ_SHARD_SIZE": "4",
        "GENQ_TOKEN_BUDGET": "64",
        "GENQ_ITEM_CHUNK": "1",
    }) as s:
        s.start_worker("b1")
        s.start_worker("b2")
        yield s


@pytest.fixture(scope="module")
def shard_model(shard_stack) -> str:  # type: ignore[no-untyped-def]
    """A tiny LSTM trained on shard_stack, as the session's trained_lstm is on its stack."""
    return train_lstm(shard_stack, worker="b1")["result"]["model"]


def shards_of(stack, batch_id: str) -> list[Job]:  # type: ignore[no-untyped-def]
    with session_of(stack) as s:
        return list(s.scalars(select(Job).where(Job.parent_id == batch_id, Job.type == "shard")))


def test_two_workers_share_the_shards(shard_stack, shard_model):
    client = sdk(shard_stack)
    rows = lines_for(shard_model, 16, max_tokens=8)
    batch = run_batch(client, rows, "/v1/completions")
    assert batch.status == "completed", batch
    out = read_jsonl(client, batch.output_file_id)
    assert sorted(o["custom_id"] for o in out) == sorted(r["custom_id"] for r in rows)
    shards = shards_of(shard_stack, batch.id)
    assert len(shards) == 4 and all(s.status == "succeeded" for s in shards)
    hosts = {(s.worker or "").split("@")[0] for s in shards}
    assert hosts == {"b1", "b2"}, hosts


def test_cancel_keeps_finished_items_once(shard_stack, shard_model):
    client = sdk(shard_stack)
    rows = lines_for(shard_model, 24, max_tokens=300)  # seconds of work
    upload = client.files.create(file=("in.jsonl", io.BytesIO(jsonl(rows))), purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/completions",
                                  completion_window="24h")
    wait_for(lambda: client.batches.retrieve(batch.id).request_counts.completed >= 2,  # type: ignore[union-attr]
             timeout=60, interval=0.05)
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled")
    batch = wait_for(lambda: (b := client.batches.retrieve(batch.id)).status == "cancelled" and b,
                     timeout=60)
    out = read_jsonl(client, batch.output_file_id)
    errors = read_jsonl(client, batch.error_file_id)
    done_ids = [o["custom_id"] for o in out]
    assert 2 <= len(done_ids) < 24 and len(set(done_ids)) == len(done_ids)
    with session_of(shard_stack) as s:
        finished = set(s.scalars(select(Item.custom_id).join(Job, Item.job_id == Job.id)
                                 .where(Job.parent_id == batch.id, Item.status == "succeeded")))
    assert set(done_ids) == finished
    every = sorted(done_ids + [e["custom_id"] for e in errors])
    assert every == sorted(r["custom_id"] for r in rows)
    assert all(e["error"]["code"] == "batch_cancelled" for e in errors)
    assert batch.request_counts.completed == len(done_ids)  # type: ignore[union-attr]


def test_killed_shard_resumes_without_losing_or_doubling(shard_stack, shard_model):
    client = sdk(shard_stack)
    # Seeded lines run one by one and GENQ_ITEM_CHUNK=1 commits each: ~0.3 s per line keeps
    # a shard half done for a second or more, even on a loaded 2-core machine.
    rows = lines_for(shard_model, 8, max_tokens=600)
    upload = client.files.create(file=("in.jsonl", io.BytesIO(jsonl(rows))), purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/completions",
                                  completion_window="24h")

    def half_done_shard() -> Job | None:
        with session_of(shard_stack) as s:
            for shard in s.scalars(select(Job).where(Job.parent_id == batch.id,
                                                     Job.status == "running")):
                statuses = list(s.scalars(select(Item.status).where(Item.job_id == shard.id)))
                if "pending" in statuses and len(set(statuses)) > 1:
                    return shard
        return None

    victim = wait_for(half_done_shard, timeout=60, interval=0.02)
    os.kill(victim.worker_pid, signal.SIGKILL)
    batch = wait_for(lambda: (b := client.batches.retrieve(batch.id)).status == "completed" and b,
                     timeout=90)
    out = read_jsonl(client, batch.output_file_id)
    ids = [o["custom_id"] for o in out]
    assert sorted(ids) == sorted(r["custom_id"] for r in rows), ids
    with session_of(shard_stack) as s:
        again = s.get(Job, victim.id)
        assert again is not None and again.attempt > victim.attempt
        assert again.attempts_log and again.attempts_log[-1]["error"]["code"] == "worker_lost"


def test_attempts_that_commit_items_do_not_spend_max_attempts(shard_stack, shard_model):
    """Two pool-child kills of a max_attempts=1 job, each after it committed items: random
    infrastructure faults lose nothing, and the job still succeeds."""
    c = shard_stack.client()
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(8)]
    job = c.create_job({"type": "generate", "model": shard_model,
                        "prompts": prompts, "max_tokens": 600, "seed": 1, "max_attempts": 1})

    def running_past(done: int) -> Job | None:
        with session_of(shard_stack) as s:
            row = s.get(Job, job["id"])
            committed = s.scalar(select(func.count()).select_from(Item).where(
                Item.job_id == job["id"], Item.status != "pending"))
            return row if row.status == "running" and committed > done else None

    first = wait_for(lambda: running_past(0), timeout=60, interval=0.02)
    os.kill(first.worker_pid, signal.SIGKILL)
    second = wait_for(lambda: (r := running_past(first.progress_done + 1))
                      and r.attempt > first.attempt and r, timeout=90, interval=0.02)
    os.kill(second.worker_pid, signal.SIGKILL)
    done = c.wait(job["id"], timeout=120)
    assert done["status"] == "succeeded", done
    assert done["attempt"] >= 3 and [a["error"]["code"] for a in done["attempts"]][:2] == [
        "worker_lost", "worker_lost"]
    items = list(c.items(job["id"]))
    assert len(items) == 8 and all(i["status"] == "succeeded" for i in items)


def quick_lines(model: str, n: int) -> list[dict]:
    """n greedy one-token lines: they batch together and take next to no time."""
    return [{"custom_id": f"q-{i}", "method": "POST", "url": "/v1/completions",
             "body": {"model": model, "prompt": PROMPTS[i % len(PROMPTS)][: 3 + i % 20],
                      "max_tokens": 1, "temperature": 0}} for i in range(n)]


def prepare_job(stack, batch_id: str) -> Job | None:  # type: ignore[no-untyped-def]
    with session_of(stack) as s:
        return s.scalar(select(Job).where(Job.parent_id == batch_id, Job.type == "prepare"))


def check_sharded(stack, batch_id: str, rows: list[dict]) -> list[Job]:  # type: ignore[no-untyped-def]
    """Each line is one item, at its line's index, and the shards are numbered 0..n-1."""
    shards = shards_of(stack, batch_id)
    with session_of(stack) as s:
        items = s.execute(select(Item.index, Item.custom_id).join(Job, Item.job_id == Job.id)
                          .where(Job.parent_id == batch_id)).all()
    assert sorted(items) == [(i, r["custom_id"]) for i, r in enumerate(rows)]
    assert sorted(shard.spec["shard"] for shard in shards) == list(range(len(shards)))
    return shards


def test_a_file_longer_than_a_window_is_written_window_by_window(shard_stack, shard_model):
    """With shards of 4, a window is 64 lines: 128 lines are read in two windows (and an
    empty third), each sharded and released as it is written; the batch reads as one."""
    client = sdk(shard_stack)
    rows = quick_lines(shard_model, 128)
    batch = run_batch(client, rows, "/v1/completions", timeout=180)
    assert batch.status == "completed", batch
    assert batch.request_counts.total == batch.request_counts.completed == 128  # type: ignore[union-attr]
    out = read_jsonl(client, batch.output_file_id)
    assert sorted(o["custom_id"] for o in out) == sorted(r["custom_id"] for r in rows)
    shards = check_sharded(shard_stack, batch.id, rows)
    assert 128 / 4 / 2 <= len(shards) <= 128 / 4 * 2
    prepare = prepare_job(shard_stack, batch.id)
    assert prepare is not None and prepare.status == "succeeded"
    assert prepare.result["shards"] == len(shards) and prepare.result["requests"] == 128
    with session_of(shard_stack) as s:
        parent = s.get(Job, batch.id)
        assert (parent.shards_total, parent.shards_done) == (len(shards), len(shards))


def test_a_preparing_job_killed_mid_file_goes_on_after_its_last_window(shard_stack,
                                                                      shard_model):
    """kill -9 of the pool child while it shards the file: the next attempt starts after the
    last window it committed, so no line is written twice or skipped."""
    client = sdk(shard_stack)
    rows = quick_lines(shard_model, 2000)
    upload = client.files.create(file=("in.jsonl", io.BytesIO(jsonl(rows))), purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/completions",
                                  completion_window="24h")

    def sharding() -> Job | None:
        job = prepare_job(shard_stack, batch.id)
        if job is not None and job.status == "running" and job.attempt == 1 and 0 < (
                (job.result or {}).get("lines_done", 0)) < 1500:
            return job
        return None

    victim = wait_for(sharding, timeout=120, interval=0.005)
    os.kill(victim.worker_pid, signal.SIGKILL)
    done = wait_for(lambda: (b := client.batches.retrieve(batch.id)).status
                    in ("completed", "failed", "cancelled") and b, timeout=600, interval=0.5)
    assert done.status == "completed", done
    out = read_jsonl(client, done.output_file_id)
    assert sorted(o["custom_id"] for o in out) == sorted(r["custom_id"] for r in rows)
    check_sharded(shard_stack, batch.id, rows)
    prepare = prepare_job(shard_stack, batch.id)
    assert prepare is not None and prepare.status == "succeeded" and prepare.attempt >= 2
    lost = prepare.attempts_log[0]
    assert lost["error"]["code"] == "worker_lost" and lost["progress"] > 0, lost


@contextlib.contextmanager
def writes_held(stack, batch_id: str) -> Iterator[Callable[[], bool]]:  # type: ignore[no-untyped-def]
    """Hold what a window's write and a cancel must both lock: the batch's row on PostgreSQL
    (FOR NO KEY UPDATE, as an UPDATE takes it: the shards' foreign keys still go in), the
    whole database on SQLite (BEGIN IMMEDIATE). Yields whether both wait on it: PostgreSQL
    shows it (the window's transaction has written items, the cancel's has not read them,
    a finishing shard's has); SQLite does not, so there after a moment."""
    url = stack.env["GENQ_DATABASE_URL"]
    if url.startswith("sqlite"):
        from sqlalchemy.engine import make_url

        conn = sqlite3.connect(make_url(url).database or "", timeout=30, isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")
        since = time.monotonic()
        try:
            yield lambda: time.monotonic() - since > 1.0
        finally:
            conn.execute("ROLLBACK")
            conn.close()
        return
    with session_of(stack) as holder, session_of(stack) as watcher:
        holder.execute(select(Job.id).where(Job.id == batch_id).with_for_update(key_share=True))
        blocked = text(
            "select array(select l.mode from pg_locks l join pg_class c on c.oid = l.relation"
            "             where l.pid = a.pid and c.relname = 'items')"
            " from pg_stat_activity a where :holder = any(pg_blocking_pids(a.pid))")
        pid = holder.scalar(text("select pg_backend_pid()"))

        def both_waiting() -> bool:
            on_items = [set(modes) for modes in watcher.scalars(blocked, {"holder": pid})]
            watcher.commit()
            return any("RowExclusiveLock" in m for m in on_items) and set() in on_items

        try:
            yield both_waiting
        finally:
            holder.rollback()


def test_a_cancel_while_a_window_is_written_releases_none_of_its_shards(shard_stack,
                                                                       shard_model):
    """A cancel that comes while the preparing job writes a window of shards: that window
    either commits before the cancel reads the batch's shards, and is cancelled with them, or
    finds the batch flagged and writes nothing; the preparing job stops there. Made to
    happen by holding the lock both need while each waits on it, so the cancel reads the
    shards before the window commits; no shard starts after the cancel has answered."""
    from common.models import utcnow

    client = sdk(shard_stack)
    rows = quick_lines(shard_model, 20000)  # 313 windows of 64 lines (shards of 4)
    upload = client.files.create(file=("in.jsonl", io.BytesIO(jsonl(rows))), purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/completions",
                                  completion_window="24h")
    wait_for(lambda: shards_of(shard_stack, batch.id), timeout=120, interval=0.005)
    answered: list[object] = []
    with writes_held(shard_stack, batch.id) as both_waiting:
        cancel = threading.Thread(target=lambda: answered.append(client.batches.cancel(batch.id)))
        cancel.start()
        wait_for(both_waiting, timeout=60, interval=0.05)
    cancel.join(60)
    assert answered and answered[0].status in ("cancelling", "cancelled"), answered  # type: ignore[attr-defined]
    cancelled_at = utcnow()
    done = wait_for(lambda: (b := client.batches.retrieve(batch.id)).status
                    in ("completed", "failed", "cancelled") and b, timeout=120, interval=0.2)
    assert done.status == "cancelled", done
    shards = shards_of(shard_stack, batch.id)
    late = [(s.spec["shard"], s.status, s.started_at) for s in shards
            if s.started_at is not None and s.started_at.replace(tzinfo=None)
            > cancelled_at.replace(tzinfo=None)]
    assert late == [], late  # the window being written was released unflagged
    assert all(s.status in ("succeeded", "cancelled") for s in shards), [
        (s.spec["shard"], s.status) for s in shards]
    assert sorted(s.spec["shard"] for s in shards) == list(range(len(shards)))
    prepare = prepare_job(shard_stack, batch.id)
    assert prepare is not None and prepare.status == "cancelled", prepare
    assert prepare.result["shards"] == len(shards) < len(rows) / 4, (prepare.result, len(shards))
    with session_of(shard_stack) as s:
        parent = s.get(Job, batch.id)
        assert (parent.shards_total, parent.shards_done) == (len(shards), len(shards))
        items = sorted(s.execute(select(Item.index, Item.custom_id).join(
            Job, Item.job_id == Job.id).where(Job.parent_id == batch.id)).all())
    # whole windows, the file's first lines, each line once
    assert len(items) % 64 == 0 and items == [(i, r["custom_id"]) for i, r in
                                              enumerate(rows[:len(items)])]
    out = read_jsonl(client, done.output_file_id)
    errors = read_jsonl(client, done.error_file_id)
    assert sorted(o["custom_id"] for o in out + errors) == sorted(c for _, c in items)
    assert all(e["error"]["code"] == "batch_cancelled" for e in errors)
    counts = done.request_counts
    assert counts is not None and (counts.total, counts.completed, counts.failed) == (
        len(rows), len(out), len(errors))


def test_unknown_batch_is_404(stack):
    with pytest.raises(openai.NotFoundError):
        sdk(stack).batches.retrieve("job_nope")


# ---------------------------------------------------------------- output lines (SQL level)


def test_output_and_error_lines_on_every_backend(session, tmp_path):  # type: ignore[no-untyped-def]
    """A finished line, a failed one with its error, and one its failed shard never ran."""
    import uuid
    from pathlib import Path

    from common.batches.finalize import _write_lines
    from common.results import insert_items, write_items

    parent = Job(id=f"job_{uuid.uuid4().hex}", owner="lines-test", type="batch", spec={},
                 queue="cpu", status="running")
    shard = Job(id=f"job_{uuid.uuid4().hex}", owner="lines-test", type="shard", spec={},
                queue="cpu", status="failed", parent_id=parent.id,
                error={"code": "worker_lost", "message": "gone"})
    session.add_all([parent, shard])
    session.flush()
    request = {"model_id": "m", "model": "tiny", "url": "/v1/completions", "body": {}}
    insert_items(session, shard.id, [request] * 3, ["ok", "bad", "never"], [0, 1, 2])
    rows = session.execute(select(Item.custom_id, Item.id).where(Item.job_id == shard.id))
    ids = dict(rows.all())
    write_items(session, [
        {"id": ids["ok"], "status": "succeeded", "tokens_in": 2, "tokens_out": 3,
         "response": {"texts": ["hi\u2028there"], "finish_reasons": ["length"]}},
        {"id": ids["bad"], "status": "failed",
         "error": {"code": "invalid_request", "message": "prompt too long"}},
    ])
    session.commit()
    out, err = Path(tmp_path) / "out.jsonl", Path(tmp_path) / "err.jsonl"
    assert _write_lines(session, parent, [shard], out, err) == (1, 2)
    # str.splitlines() splits at a raw U+2028 too: the line separator in the text is escaped
    [line] = [json.loads(x) for x in out.read_text().splitlines()]
    assert line["custom_id"] == "ok" and line["error"] is None
    body = line["response"]["body"]
    assert body["choices"][0]["text"] == "hi\u2028there" and body["model"] == "tiny"
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}
    finished_at = session.scalar(select(Item.finished_at).where(Item.id == ids["ok"]))
    assert body["created"] == int(finished_at.timestamp())  # UTC, whatever the driver returns
    errors = {row["custom_id"]: row["error"]
              for row in map(json.loads, err.read_text().splitlines())}
    assert errors["bad"] == {"code": "invalid_request", "message": "prompt too long"}
    assert errors["never"]["code"] == "worker_lost" and shard.id in errors["never"]["message"]


def test_a_batch_whose_file_fails_part_way_ends_failed_with_what_ran(session):  # type: ignore[no-untyped-def]
    """The preparing job fails after writing some shards (a model deleted between the two
    reads of the file): the shards not started are cancelled, the batch stops at the shards
    written and ends `failed`, its output holding what ran and its errors the rest."""
    import uuid

    from common.batches.finalize import prepare_ended
    from common.results import insert_items, write_items

    def new(**fields) -> Job:  # type: ignore[no-untyped-def]
        job = Job(id=f"job_{uuid.uuid4().hex}", owner="part-test", queue="cpu", **fields)
        session.add(job)
        session.flush()
        return job

    parent = new(type="batch", spec={}, status="running", shards_total=3, shards_done=1)
    ran = new(type="shard", spec={"shard": 0}, status="succeeded", parent_id=parent.id)
    waiting = new(type="shard", spec={"shard": 1}, status="queued", parent_id=parent.id)
    prepare = new(type="prepare", spec={}, status="failed", parent_id=parent.id,
                  result={"shards": 2, "lines_done": 2},
                  error={"code": "invalid_spec", "message": "line 9: no model named 'x'"})
    request = {"model_id": "m", "model": "tiny", "url": "/v1/completions", "body": {}}
    insert_items(session, ran.id, [request], ["a"], [0])
    insert_items(session, waiting.id, [request], ["b"], [1])
    item = session.scalar(select(Item.id).where(Item.job_id == ran.id))
    write_items(session, [{"id": item, "status": "succeeded", "tokens_in": 1, "tokens_out": 1,
                           "response": {"texts": ["x"], "finish_reasons": ["stop"]}}])
    ran.result = {"item_counts": {"succeeded": 1, "failed": 0}}
    session.commit()
    prepare_ended(session, prepare)
    session.expire_all()
    assert session.get(Job, waiting.id).status == "cancelled"
    done = session.get(Job, parent.id)
    assert done.status == "failed" and done.error["code"] == "preparation_failed", done.error
    assert "no model named 'x'" in done.error["message"]
    assert (done.shards_total, done.shards_done) == (2, 2)
    assert (done.result["completed"], done.result["failed"]) == (1, 1)


def test_json_columns_store_what_json_can_hold(session):  # type: ignore[no-untyped-def]
    """Item requests go through orjson; what it refuses still goes through json: NaN and
    infinity become null, int keys become strings, integers past 64 bits stay exact."""
    import uuid

    spec = {"nan": float("nan"), "inf": [float("-inf")], 7: "int key", "text": "ünï 🙂"}
    big = {"seed": 2**70, "nan": float("nan")}
    jobs = [Job(id=f"job_{uuid.uuid4().hex}", owner="json-test", type="generate", spec=s,
                queue="cpu") for s in (spec, big)]
    session.add_all(jobs)
    session.commit()
    session.expire_all()
    stored = [session.get(Job, job.id).spec for job in jobs]
    assert stored[0] == {"nan": None, "inf": [None], "7": "int key", "text": "ünï 🙂"}
    assert stored[1] == {"seed": 2**70, "nan": None}


def test_request_counts_read_finished_shards_from_their_result(session):  # type: ignore[no-untyped-def]
    """A finished shard keeps its item counts; only shards under way are counted row by row,
    and a shard never started counts nothing. Together they match a live count of every row."""
    import uuid

    from common.batches.finalize import shard_finished
    from common.batches.views import count_items, item_counts
    from common.models import utcnow
    from common.results import insert_items, write_items

    parent = Job(id=f"job_{uuid.uuid4().hex}", owner="counts-test", type="batch", spec={},
                 queue="cpu", status="running", shards_total=3)
    shards = [Job(id=f"job_{uuid.uuid4().hex}", owner="counts-test", type="shard", spec={},
                  queue="cpu", status=status, parent_id=parent.id, started_at=started)
              for status, started in [("succeeded", utcnow()), ("running", utcnow()),
                                      ("queued", None)]]
    session.add_all([parent, *shards])
    session.flush()
    request = {"model_id": "m", "model": "tiny", "url": "/v1/completions", "body": {}}
    for shard in shards:
        insert_items(session, shard.id, [request] * 3, ["a", "b", "c"], [0, 1, 2])
    rows = session.execute(select(Item.job_id, Item.custom_id, Item.id)
                           .where(Item.job_id.in_([s.id for s in shards])))
    ids = {(job_id, cid): item_id for job_id, cid, item_id in rows}
    done, running, _ = shards
    ok = {"status": "succeeded", "response": {"texts": ["x"]}, "tokens_out": 1}
    write_items(session, [{**ok, "id": ids[done.id, "a"]}, {**ok, "id": ids[done.id, "b"]},
                          {"id": ids[done.id, "c"], "status": "failed",
                           "error": {"code": "invalid_request", "message": "too long"}},
                          {**ok, "id": ids[running.id, "a"]}])
    shard_finished(session, done)

    session.refresh(done)
    assert done.result["item_counts"] == {"succeeded": 2, "failed": 1}
    assert session.get(Job, parent.id).shards_done == 1
    assert item_counts(session, batch_id=parent.id) == (3, 1)
    assert count_items(session, [s.id for s in shards]) == (3, 1)


def test_every_bad_envelope_field_is_reported(session):  # type: ignore[no-untyped-def]
    """The line envelope (custom_id, method, url, body) is one pydantic model: each bad
    field of a line gets its own OpenAI error code, and unknown keys are ignored."""
    from common.batches.input_file import Checker, validate_file

    rows = [
        {"custom_id": "", "method": "GET", "url": "/v1/completions", "body": {}},
        {"custom_id": "b", "url": "/v1/completions", "body": "not an object", "extra": 1},
        {"custom_id": "c", "url": "/v1/images/generations", "body": {"model": "m"}},
        {"custom_id": "d", "url": "/v1/completions", "body": {"model": "no-such-model"}},
        {"custom_id": "b", "url": "/v1/completions", "body": {"model": "no-such-model"}},
    ]
    checker = Checker(session, owner="o", endpoint="/v1/completions", default_model=None)
    validated = validate_file(checker, lambda: iter(json.dumps(r).encode() for r in rows),
                              cap=100)
    found = [(e.line, e.code, e.param) for e in validated.errors]
    assert found == [(1, "missing_required_parameter", "custom_id"),
                     (1, "invalid_method", "method"),
                     (2, "missing_required_parameter", "body"),
                     (3, "mismatched_endpoint", "url"),
                     (4, "model_not_found", "body.model"),
                     (5, "model_not_found", "body.model")]
    assert validated.requests == 5 and validated.first_model is None


def test_a_repeated_custom_id_is_named_at_each_line_that_repeats_it(session):  # type: ignore[no-untyped-def]
    """Duplicates are found from 8-byte digests of the custom_ids, then named by a second
    read of only the lines whose digest repeats."""
    from common.batches.input_file import (
        Checker,
        _digest,
        repeated_digests,
        report_duplicates,
    )

    ids = ["a", "b", "a", "c", "b", "a"]
    lines = [json.dumps({"custom_id": i}).encode() for i in ids]
    checker = Checker(session, owner="o", endpoint="/v1/completions", default_model=None)
    repeated = repeated_digests(b"".join(_digest(i) for i in ids))
    assert repeated == {_digest("a"), _digest("b")}
    report_duplicates(checker, iter(lines), repeated)
    assert [(e.line, e.code) for e in checker.errors] == [
        (3, "duplicate_custom_id"), (5, "duplicate_custom_id"), (6, "duplicate_custom_id")]


def test_a_file_of_one_window_comes_back_whole_from_its_check(session):  # type: ignore[no-untyped-def]
    """The prepare job writes a file of at most one window straight from its check: the
    check keeps every line's request, in line order, only while the file stays valid and
    within `keep` requests."""
    from common.batches.input_file import Checker, validate_file
    from common.models import Checkpoint, Model, new_id

    trainer = Job(id=new_id("job_"), owner="o", type="train", spec={}, queue="cpu")
    session.add(trainer)
    session.flush()
    checkpoint = Checkpoint(id=new_id("ckpt_"), job_id=trainer.id, step=1, uri="file:///x")
    session.add(checkpoint)
    session.flush()
    session.add(Model(id=new_id("model_"), owner="o", name="m", family="lstm",
                      checkpoint_id=checkpoint.id))
    session.commit()

    def check(rows: list[dict | None], keep: int) -> Any:
        lines = [b"\n" if r is None else json.dumps(r).encode() for r in rows]
        checker = Checker(session, owner="o", endpoint="/v1/completions", default_model=None)
        return validate_file(checker, lambda: iter(lines), cap=100, keep=keep)

    rows = [{"custom_id": f"c{i}", "url": "/v1/completions",
             "body": {"model": "m", "prompt": f"p{i}", "max_tokens": 2}} for i in range(3)]
    whole = check([rows[0], None, rows[1], rows[2]], keep=3)
    assert not whole.errors and whole.requests == 3 and whole.last_line == 4
    assert [custom_id for custom_id, _ in whole.whole] == ["c0", "c1", "c2"]
    assert [request["gen"]["prompt"] for _, request in whole.whole] == ["p0", "p1", "p2"]
    assert check(rows, keep=2).whole is None  # longer than a window: read again
    bad = check([rows[0], {**rows[1], "url": "/v1/embeddings"}, rows[2]], keep=3)
    assert bad.errors and bad.whole is None
