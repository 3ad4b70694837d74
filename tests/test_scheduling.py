"""Issue 22: scheduling on the broker — priorities reach Redis, on real workers."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import BACKENDS, Stack, own_stack, wait_for
from tests.test_cli import TINY_LSTM, genq


@contextmanager
def one_worker_stack(redis_server: str, redis_db: int, worker: str, env: dict[str, str],
                     backend: str = "sqlite") -> Iterator[tuple[Stack, str]]:
    """An API and one worker on the cpu queue, on a database and a Redis db of their own
    (conftest's own_stack)."""
    with own_stack(redis_server, redis_db, backend, env) as stack:
        stack.start_worker(worker, queues="cpu")
        yield stack, stack.env["GENQ_DATABASE_URL"]


LONG = {**TINY_LSTM, "steps": 100_000, "checkpoint_every": 1000, "log_every": 10}


def metric(stack, name: str, **labels: str) -> float:  # type: ignore[no-untyped-def]
    """One sample of the stack's /metrics."""
    r = httpx.get(f"{stack.api_url}/metrics",
                  headers={"Authorization": f"Bearer {stack.api_key}"}, timeout=10)
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    raise AssertionError(f"no {name} {labels} in\n{r.text}")


def queue_depth(stack, queue: str) -> float:  # type: ignore[no-untyped-def]
    return metric(stack, "genq_queue_depth", queue=queue)


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_urgent_job_is_the_next_one_a_busy_worker_takes(redis_server, backend):
    """One worker busy; five priority-0 jobs, then one priority-9 job: the urgent one runs
    next, and the others in the order they came."""
    with one_worker_stack(redis_server, 10, "p1", {"GENQ_CANCEL_GRACE_S": "1"},
                          backend) as (stack, db):
        c = stack.client()
        busy = c.create_job({**LONG, "queue": "cpu"})
        wait_for(lambda: c.get_job(busy["id"])["status"] == "running", timeout=60)
        waiting = [c.create_job({**TINY_LSTM, "queue": "cpu", "priority": 0})
                   for _ in range(5)]
        # the urgent one from the CLI, as a user would send it
        cli = {**stack.env, "GENQ_API_URL": stack.api_url, "GENQ_API_KEY": stack.api_key}
        sent = genq("train", "lstm", "--steps", "10", "--batch-size", "4", "--queue", "cpu",
                    "--config", json.dumps(TINY_LSTM["config"]), "--priority", "9",
                    env=cli)
        assert sent.returncode == 0, sent.stderr
        urgent = c.get_job(sent.stdout.split()[1])
        assert urgent["priority"] == 9
        # every message waits in Redis, across the priority lists of the queue
        assert queue_depth(stack, "cpu") == 6
        # and each says why it waits, with its place in the queue
        assert c.get_job(urgent["id"])["waiting"] == {"reason": "priority", "position": 1}
        assert c.get_job(waiting[-1]["id"])["waiting"]["position"] == 6
        stranded = c.create_job({**TINY_LSTM, "queue": "gpu"})  # no GPU worker here
        assert c.get_job(stranded["id"])["waiting"]["reason"] == "no_worker"
        c.cancel(stranded["id"])
        listed = genq("jobs", "--status", "queued", env=cli)
        assert "(#1 in queue)" in listed.stdout and "(#6 in queue)" in listed.stdout, (
            listed.stdout)
        c.cancel(busy["id"])
        done = {j["id"]: c.wait(j["id"], timeout=180) for j in [*waiting, urgent]}
        assert all(j["status"] == "succeeded" for j in done.values()), done
        order = sorted(done, key=lambda job_id: done[job_id]["started_at"])
        assert order == [urgent["id"], *(j["id"] for j in waiting)], order


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_later_small_batch_of_another_owner_is_not_stuck_behind_a_big_one(redis_server,
                                                                             backend):
    """Owner A's 15-shard batch, then owner B's 1-shard batch, on one worker: B's completes
    while A's still has most of its shards to go, and A's output has every custom_id once."""
    import io

    from sqlalchemy import select

    from common.auth import create_key
    from common.db import engine_for, session_factory
    from common.models import Job
    from tests.test_batches import jsonl, lines_for, read_jsonl, sdk

    with one_worker_stack(redis_server, 11, "s1", {"GENQ_SHARD_SIZE": "4"},
                          backend) as (stack, db):
        with session_factory(engine_for(db))() as s:
            _, key_b = create_key(s, owner="owner-b")
        clients = {}
        for owner, key in (("a", stack.api_key), ("b", key_b)):
            c = stack.client(key)
            model = c.wait(c.create_job({**TINY_LSTM, "queue": "cpu"})["id"],
                           timeout=120)["result"]["model"]
            clients[owner] = (c, model)

        def submit(owner: str, n: int):  # type: ignore[no-untyped-def]
            c, model = clients[owner]
            openai_client = sdk(stack)
            openai_client.api_key = c.api_key
            rows = lines_for(model, n, max_tokens=300)  # seeded: one by one, ~0.1 s each
            upload = openai_client.files.create(file=("in.jsonl", io.BytesIO(jsonl(rows))),
                                                purpose="batch")
            batch = openai_client.batches.create(
                input_file_id=upload.id, endpoint="/v1/completions",
                completion_window="24h")
            return openai_client, batch, rows

        client_a, big, rows_a = submit("a", 60)
        client_b, small, _ = submit("b", 4)

        def shards_done(batch_id: str) -> int:
            with session_factory(engine_for(db))() as s:
                return len(list(s.scalars(select(Job.id).where(
                    Job.parent_id == batch_id, Job.type == "shard", Job.status == "succeeded"))))

        done_b = wait_for(lambda: (b := client_b.batches.retrieve(small.id)).status
                          in ("completed", "failed") and b, timeout=120)
        assert done_b.status == "completed", done_b
        assert shards_done(big.id) <= 7, "B waited for most of A's batch"
        done_a = wait_for(lambda: (b := client_a.batches.retrieve(big.id)).status
                          in ("completed", "failed") and b, timeout=300)
        assert done_a.status == "completed", done_a
        ids = [o["custom_id"] for o in read_jsonl(client_a, done_a.output_file_id)]
        assert sorted(ids) == sorted(r["custom_id"] for r in rows_a)
        assert shards_done(big.id) == 15


# As long as needed for the urgent job to land mid-run (seconds on two cores)
PREEMPTED = {"type": "train", "family": "lstm", "steps": 2000, "batch_size": 8, "seq_len": 32,
             "checkpoint_every": 50, "log_every": 50, "seed": 11,
             "data": {"builtin": "python-docs"}, "queue": "cpu"}


def at(value: str | datetime) -> datetime:
    """A time from the API (ISO text) or from SQL, as an aware datetime to compare."""
    moment = datetime.fromisoformat(value) if isinstance(value, str) else value
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


@pytest.mark.timeout(900)  # two runs of PREEMPTED (the queue's, the reference) on 2 loaded cores
@pytest.mark.parametrize("backend", BACKENDS)
def test_an_urgent_job_preempts_a_long_low_priority_run_which_resumes_exactly(
        redis_server, tmp_path, backend):
    """A long priority-3 training run on the only worker, then a priority-1 job and a
    priority-9 one: after GENQ_PREEMPT_AFTER_S the run checkpoints and steps aside (without
    spending an attempt), the urgent job runs, then the run, re-queued at its own priority,
    before the priority-1 job that came first; it resumes to weights bit-equal to an
    uninterrupted one."""
    from common.ml.checkpoint import load_model
    from common.ml.train import TrainHooks, run_training
    from common.schemas import TrainJobSpec
    from tests.test_reliability import assert_same_weights, final_weights, workers_thread_count

    after_s = 1.0
    with one_worker_stack(redis_server, 12, "e1", {"GENQ_PREEMPT_AFTER_S": str(after_s)},
                          backend) as (stack, db):
        c = stack.client()
        long = c.create_job({**PREEMPTED, "priority": 3})
        wait_for(lambda: c.get_job(long["id"])["progress"]["done"] >= 50, timeout=120)
        # waits behind the run (priority 3 >= 1: no preemption for it), sent before the
        # run is re-queued: only the run's own priority puts the run back ahead of it
        behind = c.create_job({**TINY_LSTM, "queue": "cpu", "priority": 1})
        kept = c.create_job({**TINY_LSTM, "queue": "cpu", "priority": 9,
                             "preemptible": False})
        done_urgent = c.wait(kept["id"], timeout=120)
        assert done_urgent["status"] == "succeeded", done_urgent
        done = c.wait(long["id"], timeout=300)
        assert done["status"] == "succeeded", done
        done_behind = c.wait(behind["id"], timeout=120)
        assert done_behind["status"] == "succeeded", done_behind
        assert [a["error"]["code"] for a in done["attempts"]] == ["preempted"]
        assert done["priority"] == 3 and done["attempt"] == 2
        assert metric(stack, "genq_preemptions_total") == 1

        # the order of events, from the job's log lines (not from how long anything took):
        # the run starts, checkpoints for the urgent job, the urgent job starts and ends,
        # the run resumes from that checkpoint, and only then the priority-1 job starts
        preempt_ckpt = done["attempts"][0]["error"]["checkpoint_id"]
        lines = c.logs(long["id"])
        saved = [(line["message"].split()[1], at(line["at"])) for line in lines
                 if line["message"].startswith("checkpoint ")]  # "checkpoint ID at step N"
        resumed = [at(line["at"]) for line in lines
                   if line["message"].startswith(f"resuming from checkpoint {preempt_ckpt} ")]
        assert len(resumed) == 1, lines
        assert at(done["started_at"]) < dict(saved)[preempt_ckpt] <= at(
            done_urgent["started_at"])
        assert at(done_urgent["finished_at"]) <= resumed[0] < at(done_behind["started_at"])

        # how long the urgent job waited, bounded by what the issue allows (after_s, then a
        # step and a checkpoint of the run: at most one checkpoint interval of it), the
        # reaper's round, and minutes of margin for a loaded machine, never a tight figure
        interval = max((b - a).total_seconds() for (ckpt, a), (_, b)
                       in zip(saved, saved[1:], strict=False)
                       if ckpt != preempt_ckpt)  # not the pause the urgent job took
        waited = (at(done_urgent["started_at"]) - at(kept["created_at"])).total_seconds()
        assert waited <= after_s + 1 + interval + 120, (waited, interval)

        with workers_thread_count():
            spec = TrainJobSpec.model_validate(PREEMPTED)
            out = run_training(spec, tmp_path / "ref", hooks=TrainHooks())
        reference = load_model(out.checkpoint).model.state_dict()
        assert_same_weights(final_weights(stack, done["result"]["checkpoint_id"]), reference)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("backend", BACKENDS)
def test_an_urgent_job_preempts_a_batch_shard_which_keeps_its_items(redis_server, backend):
    """A long batch shard (priority 0) on the only worker, then a priority-9 job: the shard
    yields at its next item chunk (its finished items kept), goes back to `queued` without
    spending an attempt, the urgent job runs, and the batch still completes with every
    custom_id exactly once."""
    import io

    from sqlalchemy import func, select

    from common.db import engine_for, session_factory
    from common.models import Item, Job
    from tests.test_batches import jsonl, lines_for, read_jsonl, sdk

    env = {"GENQ_PREEMPT_AFTER_S": "1", "GENQ_SHARD_SIZE": "1000", "GENQ_ITEM_CHUNK": "4"}
    with one_worker_stack(redis_server, 20, "g1", env, backend) as (stack, db):
        c = stack.client()
        model = c.wait(c.create_job({**TINY_LSTM, "queue": "cpu"})["id"],
                       timeout=120)["result"]["model"]
        client = sdk(stack)
        rows = lines_for(model, 200, max_tokens=300)  # seeded: one by one, ~0.1 s each
        upload = client.files.create(file=("in.jsonl", io.BytesIO(jsonl(rows))),
                                     purpose="batch")
        batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/completions",
                                      completion_window="24h")
        sessions = session_factory(engine_for(db))

        def running_shard() -> str | None:
            """The batch's shard under way with items written (a shard is about 1,000)."""
            with sessions() as s:
                return s.scalar(select(Job.id).where(
                    Job.parent_id == batch.id, Job.type == "shard", Job.status == "running",
                    Job.progress_done > 0))

        shard_id = wait_for(running_shard, timeout=120)
        urgent = c.create_job({**TINY_LSTM, "queue": "cpu", "priority": 9})
        done_urgent = c.wait(urgent["id"], timeout=180)
        assert done_urgent["status"] == "succeeded", done_urgent
        done = wait_for(lambda: (b := client.batches.retrieve(batch.id)).status
                        in ("completed", "failed") and b, timeout=420, interval=1)
        assert done.status == "completed", done
        ids = [o["custom_id"] for o in read_jsonl(client, done.output_file_id)]
        assert sorted(ids) == sorted(r["custom_id"] for r in rows)  # each exactly once
        with sessions() as s:
            shard = s.get(Job, shard_id)
            assert shard is not None
            items = s.scalar(select(func.count()).select_from(Item)
                             .where(Item.job_id == shard_id))
            (attempt,) = shard.attempts_log
            assert (shard.status, shard.attempt, shard.failures) == ("succeeded", 2, 0)
            assert shard.priority == 0  # re-queued at its own priority
            assert shard.finished_at is not None
            shard_finished = shard.finished_at
        assert attempt["error"]["code"] == "preempted"
        assert 0 < attempt["progress"] < len(rows), attempt  # yielded with items kept
        assert items == len(rows)
        assert at(done_urgent["finished_at"]) < at(shard_finished)
        assert metric(stack, "genq_preemptions_total") == 1


@pytest.fixture
def own_broker(redis_server, monkeypatch):  # type: ignore[no-untyped-def]
    """This process sends to an empty Redis db of its own, which no worker consumes."""
    import redis

    from common.celery_app import get_celery
    from common.config import get_settings

    broker = f"{redis_server.rsplit('/', 1)[0]}/21"
    redis.Redis.from_url(broker).flushdb()
    monkeypatch.setenv("GENQ_BROKER_URL", broker)
    get_settings.cache_clear()
    get_celery.cache_clear()
    yield broker
    monkeypatch.undo()
    get_settings.cache_clear()
    get_celery.cache_clear()


def test_release_shards_takes_owners_in_turn_by_priority_in_slots(own_broker, session):  # type: ignore[no-untyped-def]
    """SQL level, on SQLite and PostgreSQL (its window function): each round sends only as
    many held shards as the queue's live workers have slots (two each), the most urgent
    first, then the owner with the fewest shards under way, then the oldest."""
    import uuid
    from datetime import timedelta

    from sqlalchemy import select

    from common.celery_app import messages_waiting
    from common.dispatch import release_shards
    from common.models import Job, Worker, utcnow

    now = utcnow()
    session.add(Worker(hostname="f@h", queues="cpu", pid=1, version="t", heartbeat_at=now))
    created = iter(range(100))

    def shard(owner: str, priority: int = 0) -> str:
        n = next(created)  # each shard a second newer than the one before
        row = Job(id=f"job_{owner}{n:02d}{uuid.uuid4().hex[:4]}", owner=owner, type="shard",
                  queue="cpu", priority=priority, spec={},
                  created_at=now - timedelta(seconds=100 - n))
        session.add(row)
        return row.id

    a = [shard("a") for _ in range(4)]  # the oldest batch
    b = [shard("b") for _ in range(3)]
    (c,) = [shard("c", priority=5)]  # the newest, but urgent
    session.commit()

    def sent() -> set[str]:
        session.expire_all()
        return set(session.scalars(select(Job.id).where(
            Job.enqueued_at.is_not(None), Job.status == "queued")))

    def finish(*ids: str, status: str = "succeeded") -> None:
        for job_id in ids:
            session.get(Job, job_id).status = status
        session.commit()

    assert release_shards(session, "cpu") == 2  # one worker: two slots
    assert sent() == {c, a[0]}  # priority first, then the oldest of equals
    assert messages_waiting("cpu") == 2  # on the broker, not only marked in SQL
    assert release_shards(session) == 0  # every slot taken (all queues with held shards)
    finish(c, a[0])
    assert release_shards(session, "cpu") == 2
    assert sent() == {a[1], b[0]}  # a and b in turn, not a's whole batch first
    finish(b[0])
    finish(a[1], status="running")  # still under way: counts against a
    assert release_shards(session, "cpu") == 1
    assert sent() == {b[1]}  # b has none under way, a has one
    session.add(Worker(hostname="g@h", queues="cpu", pid=2, version="t", heartbeat_at=now))
    session.commit()
    assert release_shards(session, "cpu") == 2  # a second worker: two more slots
    assert sent() == {b[1], a[2], b[2]}
    assert release_shards(session) == 0
    assert messages_waiting("cpu") == 7  # every shard sent once


def test_priority_9_and_non_preemptible_jobs_are_never_preempted(session):  # type: ignore[no-untyped-def]
    """SQL level: who the reaper's preemption picks, and when it holds back."""
    from datetime import timedelta

    from common import jobs
    from common.models import Job, Worker, utcnow

    now = utcnow()
    session.add(Worker(hostname="x@h", queues="cpu", pid=1, version="t", heartbeat_at=now))
    old = now - timedelta(seconds=60)

    def job(**values):  # type: ignore[no-untyped-def]
        row = Job(id=f"job_{len(session.new)}{values.get('priority', 0)}x", owner="o",
                  type="train", queue="cpu", spec={}, **values)
        session.add(row)
        return row

    runner = job(status="running", worker="x@h", priority=9, started_at=old, heartbeat_at=now)
    job(status="queued", priority=9, enqueued_at=old)
    session.commit()
    assert jobs.preempt_for_urgent(session, after_s=1) == []  # as urgent: it waits its turn
    runner.priority, runner.spec = 3, {"preemptible": False}
    session.commit()
    assert jobs.preempt_for_urgent(session, after_s=1) == []  # its spec forbids it
    runner.spec = {}
    session.commit()
    assert jobs.preempt_for_urgent(session, after_s=100) == []  # not waiting long enough
    assert jobs.preempt_for_urgent(session, after_s=1) == [runner.id]
    assert jobs.preempt_for_urgent(session, after_s=1) == []  # one at a time


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_quota_holds_an_owners_jobs_until_it_is_under_it_again(redis_server, backend):
    """A quota of one job in flight on cpu (set with `genq keys update`): the second job is
    accepted, waits in SQL with reason `quota` (no broker message), and runs by itself
    once the first ends. A GPU-seconds quota used up holds a gpu job the same way, until
    `--no-limits` lets the reaper send it."""
    from datetime import timedelta

    from common.auth import owner_of
    from common.db import engine_for, session_factory
    from common.models import Job, new_id, utcnow

    with one_worker_stack(redis_server, 13, "q1", {"GENQ_REAPER_INTERVAL_S": "1"},
                          backend) as (stack, db):
        c = stack.client()
        with session_factory(engine_for(db))() as s:
            owner = owner_of(s, stack.api_key)
        cli = {**stack.env, "GENQ_API_URL": stack.api_url, "GENQ_API_KEY": stack.api_key}
        bad = genq("keys", "update", owner, "--max-running", "cpu=0", env=cli)
        assert bad.returncode == 2 and "--max-running" in bad.stderr, bad.stderr
        assert "Traceback" not in bad.stderr
        set_ = genq("keys", "update", owner, "--max-running", "cpu=1", env=cli)
        assert set_.returncode == 0 and "cpu: 1 in flight" in set_.stdout, set_.stderr
        assert "cpu: 1 in flight" in genq("keys", "list", env=cli).stdout

        first = c.create_job({**LONG, "queue": "cpu"})
        wait_for(lambda: c.get_job(first["id"])["status"] == "running", timeout=60)
        second = c.create_job({**TINY_LSTM, "queue": "cpu"})
        assert c.get_job(second["id"])["waiting"] == {
            "reason": "quota", "limit": "max_running", "queue": "cpu", "in_flight": 1, "max": 1}
        with httpx.stream("GET", f"{stack.api_url}/v1/jobs/{second['id']}/events",
                          headers={"Authorization": f"Bearer {stack.api_key}"},
                          timeout=30) as stream:  # the live stream says it too
            first_event = next(line for line in stream.iter_lines() if line.startswith("data:"))
        assert json.loads(first_event[5:])["waiting"]["reason"] == "quota"
        assert queue_depth(stack, "cpu") == 0  # held in SQL, not on the broker
        assert metric(stack, "genq_jobs_waiting_for_quota", queue="cpu") == 1
        assert metric(stack, "genq_jobs_queued_by_priority", queue="cpu", priority="0") == 1
        assert metric(stack, "genq_queued_owners", queue="cpu") == 1
        assert "(over quota)" in genq("jobs", "--status", "queued", env=cli).stdout
        c.cancel(first["id"])
        done = c.wait(second["id"], timeout=180)
        assert done["status"] == "succeeded", done

        # GPU-seconds: 20 s ran on gpu an hour ago; the quota is 10 s a day
        with session_factory(engine_for(db))() as s:
            ago = utcnow() - timedelta(hours=1)
            s.add(Job(id=new_id("job_"), owner=owner, type="train", family="lstm", spec={},
                      queue="gpu", status="succeeded", started_at=ago - timedelta(seconds=20),
                      finished_at=ago))
            s.commit()
        assert genq("keys", "update", owner, "--gpu-seconds-per-day", "10",
                    env=cli).returncode == 0
        gpu_job = c.create_job({**TINY_LSTM, "queue": "gpu"})
        waiting = c.get_job(gpu_job["id"])["waiting"]
        assert (waiting["reason"], waiting["limit"], waiting["used"], waiting["max"]) == (
            "quota", "gpu_seconds_per_day", 20.0, 10.0), waiting
        cleared = genq("keys", "update", owner, "--no-limits", env=cli)
        assert cleared.returncode == 0 and "no limits" in cleared.stdout
        # the reaper's outbox sweep sends it now; no GPU worker listens here to take it
        wait_for(lambda: queue_depth(stack, "gpu") == 1, timeout=60)
        assert c.get_job(gpu_job["id"])["waiting"]["reason"] == "no_worker"
        c.cancel(gpu_job["id"])


def test_quota_counts_on_every_backend(session):  # type: ignore[no-untyped-def]
    """What a quota counts, in SQL on SQLite and PostgreSQL: jobs on the broker or running
    on that queue (not held ones, not batch parents), and GPU run time within the last
    24 hours (a run that began 30 hours ago counts from 24 hours ago; running ones to now)."""
    from datetime import timedelta

    from common.dispatch import why_waiting
    from common.models import Job, new_id, utcnow
    from common.quotas import gpu_seconds, held_by_quota, set_quota

    now = utcnow()

    def job(queue: str, status: str, sent: bool = True, type: str = "train",
            started: float | None = None, ended: float | None = None) -> Job:
        row = Job(id=new_id("job_"), owner="quota-owner", type=type, spec={}, queue=queue,
                  status=status, enqueued_at=now if sent else None,
                  started_at=None if started is None else now - timedelta(hours=started),
                  finished_at=None if ended is None else now - timedelta(hours=ended))
        session.add(row)
        return row

    job("cpu", "running", started=0.5)
    job("cpu", "queued")
    job("cpu", "running", type="batch")
    held = job("cpu", "queued", sent=False)
    job("gpu", "succeeded", started=30, ended=20)  # 4 of its 10 hours in the last day
    job("gpu", "running", started=1)
    job("gpu", "succeeded", started=50, ended=40)  # a day ago and more: not counted
    session.commit()
    assert held_by_quota(session, held) is None  # no quota row: no limits
    set_quota(session, "quota-owner", max_running={"cpu": 2})
    assert held_by_quota(session, held) == {"reason": "quota", "limit": "max_running",
                                            "queue": "cpu", "in_flight": 2, "max": 2}
    assert why_waiting(session, held) == held_by_quota(session, held, lock=False)
    set_quota(session, "quota-owner", max_running={"cpu": 3})
    assert held_by_quota(session, held) is None
    assert abs(gpu_seconds(session, "quota-owner", now) - 5 * 3600) < 1
    gpu_held = job("gpu", "queued", sent=False)
    set_quota(session, "quota-owner", gpu_seconds_per_day=5 * 3600 + 60)
    assert held_by_quota(session, gpu_held) is None
    set_quota(session, "quota-owner", gpu_seconds_per_day=3600)
    assert held_by_quota(session, gpu_held)["limit"] == "gpu_seconds_per_day"
    assert set_quota(session, "quota-owner", clear=True) is None
    assert held_by_quota(session, gpu_held) is None
