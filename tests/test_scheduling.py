"""Issue 22: scheduling on the broker — priorities reach Redis, on real workers."""

from __future__ import annotations

import json

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import fresh_database, start_stack, wait_for
from tests.test_cli import TINY_LSTM, genq

LONG = {**TINY_LSTM, "steps": 100_000, "checkpoint_every": 1000, "log_every": 10}


def queue_depth(stack, queue: str) -> float:  # type: ignore[no-untyped-def]
    r = httpx.get(f"{stack.api_url}/metrics",
                  headers={"Authorization": f"Bearer {stack.api_key}"}, timeout=10)
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            if sample.name == "genq_queue_depth" and sample.labels == {"queue": queue}:
                return sample.value
    raise AssertionError(f"no genq_queue_depth for {queue}")


def test_an_urgent_job_is_the_next_one_a_busy_worker_takes(redis_server):
    """One worker busy; five priority-0 jobs, then one priority-9 job: the urgent one runs
    next, and the others in the order they came."""
    with fresh_database("sqlite") as db:
        stack = start_stack(db, redis_server.rsplit("/", 1)[0] + "/10",
                            env_extra={"GENQ_CANCEL_GRACE_S": "1"})
        try:
            stack.start_worker("p1", queues="cpu")
            c = stack.client()
            busy = c.create_job({**LONG, "queue": "cpu"})
            wait_for(lambda: c.get_job(busy["id"])["status"] == "running", timeout=60)
            waiting = [c.create_job({**TINY_LSTM, "queue": "cpu", "priority": 0})
                       for _ in range(5)]
            # the urgent one from the CLI, as a user would send it
            sent = genq("train", "lstm", "--steps", "10", "--batch-size", "4", "--queue", "cpu",
                        "--config", json.dumps(TINY_LSTM["config"]), "--priority", "9",
                        env={**stack.env, "GENQ_API_URL": stack.api_url,
                             "GENQ_API_KEY": stack.api_key})
            assert sent.returncode == 0, sent.stderr
            urgent = c.get_job(sent.stdout.split()[1])
            assert urgent["priority"] == 9
            # every message waits in Redis, across the priority lists of the queue
            assert queue_depth(stack, "cpu") == 6
            c.cancel(busy["id"])
            done = {j["id"]: c.wait(j["id"], timeout=180) for j in [*waiting, urgent]}
            assert all(j["status"] == "succeeded" for j in done.values()), done
            order = sorted(done, key=lambda job_id: done[job_id]["started_at"])
            assert order == [urgent["id"], *(j["id"] for j in waiting)], order
        finally:
            stack.stop_all()
