"""Watching jobs: metrics, logs, server-sent events, Prometheus and Flower, on real processes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ROOT, _free_port, wait_for

SHORT_TRAIN = {"type": "train", "family": "lstm", "steps": 12, "batch_size": 4, "seq_len": 16,
               "log_every": 2, "checkpoint_every": 12,
               "config": {"hidden": 16, "n_embd": 8, "n_layer": 1}}


def read_events(stack, job_id: str, timeout: float = 90) -> list[tuple[str, dict]]:
    """Every (event, data) of a job's stream, until the server ends it."""
    events: list[tuple[str, dict]] = []
    headers = {"Authorization": f"Bearer {stack.api_key}"}
    with httpx.stream("GET", f"{stack.api_url}/v1/jobs/{job_id}/events", headers=headers,
                      timeout=timeout) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        kind = ""
        for line in resp.iter_lines():
            if line.startswith("event:"):
                kind = line.split(":", 1)[1].strip()
            elif line.startswith("data:"):
                events.append((kind, json.loads(line.split(":", 1)[1])))
    return events


def test_metrics_logs_and_artifact_links(stack, trained_lstm):
    c = stack.client()
    job_id = trained_lstm["id"]
    body = c.request("GET", f"/v1/jobs/{job_id}/metrics", params={"name": "loss"})
    assert body["names"] == ["loss"]
    steps = [p["step"] for p in body["data"]]
    assert steps == sorted(steps) and steps[-1] <= 30 and len(steps) >= 5
    assert all(p["value"] > 0 for p in body["data"])
    assert "loss" in c.request("GET", f"/v1/jobs/{job_id}/metrics")["names"]

    lines = c.logs(job_id)
    assert any("registered model" in line["message"] for line in lines)
    assert any(line["message"].startswith("step 30: loss ") for line in lines), lines
    assert c.logs(job_id, after=lines[-1]["id"]) == []

    links = c.get_job(job_id)["result"]["artifacts"]
    plot = next(a for a in links if a["kind"] == "loss_plot")
    png = c.request("GET", plot["url"])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"

    other = stack.client(key="wrong")
    with pytest.raises(Exception, match="key"):
        other.request("GET", f"/v1/jobs/{job_id}/logs")


def test_events_stream_status_and_progress_until_the_end(stack):
    c = stack.client()
    # long enough (a few seconds) for the 0.5 s poll to see it running
    job = c.create_job({**SHORT_TRAIN, "steps": 2000, "checkpoint_every": 2000})
    events = read_events(stack, job["id"])
    kinds = [k for k, _ in events]
    assert kinds[0] == "status" and events[0][1]["status"] in ("queued", "running")
    assert events[-1] == ("status", events[-1][1]) and events[-1][1]["status"] == "succeeded"
    assert "progress" in kinds
    done = [d["progress"]["done"] for _, d in events]
    assert done == sorted(done) and done[-1] == 2000, done  # one attempt: never backwards
    statuses = [d["status"] for k, d in events if k == "status"]
    order = ["queued", "running", "succeeded"]
    assert statuses == sorted(statuses, key=order.index) and len(set(statuses)) == len(statuses)
    # a finished job: one event, then the stream ends
    again = read_events(stack, job["id"], timeout=10)
    assert [(k, d["status"]) for k, d in again] == [("status", "succeeded")]
    r = httpx.get(f"{stack.api_url}/v1/jobs/{job['id']}/events")
    assert r.status_code == 401


def test_prometheus_metrics_from_sql_and_redis(stack, trained_lstm):
    assert httpx.get(f"{stack.api_url}/metrics").status_code == 401
    c = stack.client()
    gen = c.create_job({"type": "generate", "model": trained_lstm["result"]["model"],
                        "prompts": ["a", "b"], "max_tokens": 3})
    assert c.wait(gen["id"], timeout=60)["status"] == "succeeded"
    r = httpx.get(f"{stack.api_url}/metrics", headers={"Authorization": f"Bearer {stack.api_key}"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            assert key not in samples, f"{key} twice in the exposition"  # Prometheus keeps one
            samples[key] = s.value
    assert samples[("genq_jobs", (("status", "succeeded"), ("type", "train")))] >= 1
    assert ("genq_queue_depth", (("queue", "cpu"),)) in samples
    assert samples[("genq_broker_up", ())] == 1
    assert samples[("genq_workers", (("queue", "cpu"),))] >= 1
    assert samples[("genq_job_duration_seconds_count", (("status", "succeeded"),
                                                        ("type", "train")))] >= 1
    assert samples[("genq_items_generated_total", ())] >= 2
    assert samples[("genq_tokens_total", (("direction", "out"),))] >= 2


def test_queued_jobs_are_one_sample_per_queue(session):
    """A queue with jobs waiting reads its count once, not a 0 and then the count."""
    import uuid

    from prometheus_client import CollectorRegistry, generate_latest

    from api import prometheus
    from common.models import Job

    session.add_all(Job(id=f"job_{uuid.uuid4().hex}", owner="metrics-test", type="train",
                        family="lstm", spec={}, queue="gpu", status="queued") for _ in range(2))
    session.commit()

    class Jobs:
        def collect(self):  # type: ignore[no-untyped-def]
            return prometheus.jobs_by_status(session, {})

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Jobs())  # type: ignore[arg-type]
    text = generate_latest(registry).decode()
    [queued] = [f for f in text_string_to_metric_families(text) if f.name == "genq_jobs_queued"]
    by_queue = [(s.labels["queue"], s.value) for s in queued.samples]
    assert sorted(by_queue) == [("cpu", 0.0), ("gpu", 2.0)]


def scrape(session) -> dict[tuple[str, tuple], float]:  # type: ignore[no-untyped-def]
    from prometheus_client import CollectorRegistry, generate_latest

    from api import prometheus

    class Sql:
        def collect(self):  # type: ignore[no-untyped-def]
            return prometheus.sql_metrics(session)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Sql())  # type: ignore[arg-type]
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(generate_latest(registry).decode())
            for s in f.samples}


def test_a_scrape_does_not_read_the_history_again(session):
    """Issue 24: jobs finished a while ago are folded into the rollups once; later scrapes
    read the rollups and the jobs not folded yet, so their cost does not grow with history.
    Proof: after the first scrape the old rows are changed behind its back (run times
    stretched, items deleted), and the next scrape still reads the same totals."""
    import uuid
    from datetime import timedelta

    from sqlalchemy import delete, update

    from common.models import Item, Job, utcnow

    long_ago, now = utcnow() - timedelta(hours=2), utcnow()

    def finished(jtype: str, seconds: float, at=long_ago) -> str:  # type: ignore[no-untyped-def]
        jid = f"job_{uuid.uuid4().hex}"
        session.add(Job(id=jid, owner="rollup-test", type=jtype, spec={}, status="succeeded",
                        started_at=at - timedelta(seconds=seconds), finished_at=at))
        return jid

    old = [finished("train", 10) for _ in range(30)]
    gen = finished("generate", 2)
    session.flush()
    session.add_all(Item(job_id=gen, index=i, custom_id=str(i), request={}, status="succeeded",
                         tokens_in=3, tokens_out=5) for i in range(4))
    recent = finished("train", 1, at=now)  # finished just now: still read live
    session.add(Job(id=f"job_{uuid.uuid4().hex}", owner="rollup-test", type="train", spec={},
                    status="queued"))
    session.commit()

    jobs = ("genq_jobs", (("status", "succeeded"), ("type", "train")))
    count = ("genq_job_duration_seconds_count", (("status", "succeeded"), ("type", "train")))
    total = ("genq_job_duration_seconds_sum", (("status", "succeeded"), ("type", "train")))
    under_15 = ("genq_job_duration_seconds_bucket",
                (("le", "15.0"), ("status", "succeeded"), ("type", "train")))
    items, out = ("genq_items_generated_total", ()), ("genq_tokens_total", (("direction", "out"),))
    queued = ("genq_jobs", (("status", "queued"), ("type", "train")))
    first = scrape(session)
    assert (first[jobs], first[count], first[under_15], first[total]) == (31, 31, 31, 301)
    assert (first[items], first[out], first[queued]) == (4, 20, 1)
    assert session.get(Job, old[0]).rolled_up and not session.get(Job, recent).rolled_up

    stretched = long_ago - timedelta(days=9)
    session.execute(update(Job).where(Job.id.in_(old)).values(started_at=stretched))
    session.execute(delete(Item).where(Item.job_id == gen))
    session.commit()
    again = scrape(session)
    assert {k: again[k] for k in first} == first  # the folded rows were not read again

    finished("train", 100)
    session.commit()
    more = scrape(session)
    assert (more[jobs], more[count], more[under_15], more[total]) == (32, 32, 31, 401)


def test_metrics_can_be_public(db_url, redis_server):
    from tests.conftest import start_stack

    public = start_stack(db_url, redis_server, {"GENQ_METRICS_PUBLIC": "true"})
    try:
        r = httpx.get(f"{public.api_url}/metrics")
        assert r.status_code == 200 and "genq_jobs{" in r.text
        assert httpx.get(f"{public.api_url}/v1/jobs").status_code == 401
    finally:
        public.stop_all()


def test_queue_depth_tolerates_redis_down(monkeypatch):
    from api import prometheus
    from common import notices
    from common.config import get_settings

    monkeypatch.setenv("GENQ_BROKER_URL", f"redis://127.0.0.1:{_free_port()}/0")
    get_settings.cache_clear()
    notices.redis_client.cache_clear()
    try:
        names = [m.name for m in prometheus.queue_depths()]
        up = next(m for m in prometheus.queue_depths() if m.name == "genq_broker_up")
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
        notices.redis_client.cache_clear()
    assert names == ["genq_broker_up"] and up.samples[0].value == 0


@pytest.fixture(scope="module")
def flower(stack, redis_server):
    """Flower with basic auth on this session's Redis."""
    port = _free_port()
    log = open(stack.home / "flower.log", "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "common.celery_app", "--broker", redis_server,
         "flower", "--address=127.0.0.1", f"--port={port}", "--basic_auth=u:p"],
        cwd=ROOT, env=stack.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(f"{url}/healthcheck", timeout=1).status_code == 200
        except httpx.HTTPError:
            return proc.poll() is not None and pytest.fail(stack.log("flower"))

    wait_for(up, timeout=60)
    time.sleep(1.0)  # its event consumer connects just after the HTTP server
    yield url
    os.killpg(proc.pid, 15)
    proc.wait(20)


def test_flower_shows_tasks_progress_and_worker_queues(stack, flower):
    auth = ("u", "p")
    assert httpx.get(f"{flower}/api/tasks").status_code == 401
    c = stack.client()
    job = c.create_job({**SHORT_TRAIN, "priority": 7})
    assert c.wait(job["id"], timeout=90)["status"] == "succeeded"

    def task_of_job():
        tasks = httpx.get(f"{flower}/api/tasks", auth=auth, timeout=5).json()
        return next((t for t in tasks.values()
                     if t["name"] == "genq.train" and job["id"] in str(t["args"])
                     and t["state"] == "SUCCESS"), None)

    task = wait_for(task_of_job, timeout=30, interval=0.5)
    assert "'lstm'" in str(task["kwargs"]) and "succeeded: model=" in str(task["result"])
    assert "'priority': 7" in str(task["kwargs"])  # each task's priority, in Flower

    long = c.create_job({**SHORT_TRAIN, "steps": 5000})

    def progress_text():
        tasks = httpx.get(f"{flower}/api/tasks", auth=auth, timeout=5).json()
        return next((t["result"] for t in tasks.values()
                     if long["id"] in str(t["args"]) and t["state"] == "PROGRESS"), None)

    text = wait_for(progress_text, timeout=60, interval=0.3)
    assert re.fullmatch(r"\d+/5000 steps, loss \d+\.\d+", text), text
    c.cancel(long["id"])
    assert c.wait(long["id"], timeout=60)["status"] == "cancelled"
    workers = httpx.get(f"{flower}/api/workers", params={"refresh": 1}, auth=auth,
                        timeout=20).json()
    name = next(n for n in workers if n.startswith("w1@"))
    queues = {q["name"] for q in workers[name]["active_queues"]}
    assert queues == {"cpu", "gpu"}
