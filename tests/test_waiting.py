"""Held reads (`?wait=`) and finish notices, on real processes and a real Redis."""

from __future__ import annotations

import asyncio
import io
import threading
import time

import httpx
import openai
import pytest
import redis

from tests.conftest import _free_port
from tests.test_batches import jsonl, lines_for
from tests.test_monitoring import SHORT_TRAIN


def test_held_read_answers_with_the_finished_job(stack, trained_lstm):
    c = stack.client()
    job = c.create_job({**SHORT_TRAIN, "steps": 200, "checkpoint_every": 200})
    held = c.request("GET", f"/v1/jobs/{job['id']}", params={"wait": 60}, timeout=90)
    assert held["status"] == "succeeded" and held["progress"]["done"] == 200, held


def test_openai_sdk_holds_a_batch_retrieve_until_it_completes(stack, trained_lstm):
    sdk = openai.OpenAI(base_url=f"{stack.api_url}/v1", api_key=stack.api_key, max_retries=0)
    upload = sdk.files.create(file=("in.jsonl", io.BytesIO(
        jsonl(lines_for(trained_lstm["result"]["model"], 6)))), purpose="batch")
    batch = sdk.batches.create(input_file_id=upload.id, endpoint="/v1/completions",
                               completion_window="24h")
    held = sdk.batches.retrieve(batch.id, extra_query={"wait": 60}, timeout=90)
    assert held.status == "completed" and held.request_counts.completed == 6, held
    assert held.output_file_id


def test_held_read_gives_up_after_wait_seconds(stack):
    c = stack.client()
    job = c.create_job({**SHORT_TRAIN, "steps": 100_000, "checkpoint_every": 100_000})
    try:
        start = time.monotonic()
        held = c.get_job(job["id"], wait=1.5)
        assert time.monotonic() - start >= 1.5
        assert held["status"] in ("queued", "running"), held
    finally:
        c.cancel(job["id"])
    assert c.wait(job["id"], timeout=60)["status"] == "cancelled"


@pytest.mark.parametrize("wait", ["-1", "61", "soon"])
def test_bad_wait_is_a_422_naming_it(stack, wait):
    r = httpx.get(f"{stack.api_url}/v1/jobs/job_x", params={"wait": wait},
                  headers={"Authorization": f"Bearer {stack.api_key}"})
    assert r.status_code == 422 and r.json()["error"]["param"] == "wait", r.text


def test_finished_jobs_and_batches_announce_themselves(stack, trained_lstm, redis_server,
                                                      tmp_path):
    heard: list[str] = []
    stop = threading.Event()
    pubsub = redis.Redis.from_url(redis_server).pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe("genq:finished")

    def listen() -> None:
        while not stop.is_set():
            message = pubsub.get_message(timeout=0.2)
            if message:
                heard.append(message["data"].decode())

    listener = threading.Thread(target=listen)
    listener.start()
    try:
        c = stack.client()
        job = c.create_job({**SHORT_TRAIN, "steps": 4})
        assert c.wait(job["id"], timeout=90)["status"] == "succeeded"
        path = tmp_path / "in.jsonl"
        path.write_bytes(jsonl(lines_for(trained_lstm["result"]["model"], 3)))
        batch = c.create_batch(c.upload_file(path)["id"])
        assert c.wait_batch(batch["id"], timeout=90)["status"] == "completed"
        deadline = time.monotonic() + 10  # a notice follows its commit: a reader may see it first
        while not {job["id"], batch["id"]} <= set(heard) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        stop.set()
        listener.join()
        pubsub.close()
    assert {job["id"], batch["id"]} <= set(heard), heard


def test_held_read_falls_back_to_sql_without_redis(monkeypatch):
    """Redis unreachable: no notice ever comes, and the held read still sees the finish,
    through the one SQL re-check the API process makes for every job waited on."""
    import threading

    from sqlalchemy import update

    from api import waiting
    from common import notices
    from common.config import get_settings
    from common.db import engine_for, session_factory
    from common.models import Job, new_id
    from tests.conftest import fresh_database

    with fresh_database("sqlite") as db:
        monkeypatch.setenv("GENQ_BROKER_URL", f"redis://127.0.0.1:{_free_port()}/0")
        monkeypatch.setenv("GENQ_DATABASE_URL", db)
        get_settings.cache_clear()
        notices.redis_client.cache_clear()
        job_id = new_id("job_")
        sessions = session_factory(engine_for(db))
        with sessions() as s:
            s.add(Job(id=job_id, owner="waiter", type="train", spec={}, status="running"))
            s.commit()
        reads: list[str] = []

        def read() -> str:
            with sessions() as s:
                reads.append(str(s.get(Job, job_id).status))
            return reads[-1]

        def finish_later() -> None:
            time.sleep(1.5)
            with sessions() as s:
                s.execute(update(Job).where(Job.id == job_id).values(status="succeeded"))
                s.commit()

        async def held() -> tuple[str, float]:
            start = time.monotonic()
            out = await waiting.read_when_finished(job_id, read, lambda st: st == "succeeded",
                                                   30, owner="waiter")
            return out, time.monotonic() - start

        finisher = threading.Thread(target=finish_later)
        finisher.start()
        try:
            out, took = asyncio.run(held())
        finally:
            finisher.join()
            monkeypatch.undo()
            get_settings.cache_clear()
            notices.redis_client.cache_clear()
    assert out == "succeeded" and reads[0] == "running"
    assert len(reads) <= 3  # no read a second: the shared re-check woke it
    assert took < 30  # found long before the wait ran out
