"""The Celery app: queues, routing and the reliability settings of DESIGN.md §4."""

from __future__ import annotations

from functools import lru_cache

from celery import Celery
from kombu import Queue

from common.config import get_settings

TASK_FOR_TYPE = {"train": "genq.train", "generate": "genq.generate", "shard": "genq.batch_shard",
                 "prepare": "genq.prepare_batch"}
# A job's priority is 0-9 with 9 the most urgent; on Redis priority 0 is served first.
LOWEST_BROKER_PRIORITY = 9


def broker_priority(priority: int) -> int:
    """The Redis priority step of a job priority (9 most urgent -> 0, served first)."""
    return LOWEST_BROKER_PRIORITY - max(0, min(9, priority))


@lru_cache
def get_celery() -> Celery:
    """The process-wide Celery app (producer in the API, consumer in workers)."""
    settings = get_settings()
    app = Celery("genq", broker=settings.broker_url, include=["worker.tasks"])
    transport = {
        "visibility_timeout": settings.visibility_timeout_s,
        "socket_connect_timeout": 5,
        "socket_timeout": 10,
        # one Redis list per priority (kombu's default steps 0, 3, 6, 9 would merge them);
        # a worker pops the lists in priority order, across all its queues
        "priority_steps": list(range(LOWEST_BROKER_PRIORITY + 1)),
    }
    app.conf.update(
        task_queues=[Queue(name, routing_key=name) for name in settings.queue_names],
        task_default_queue="cpu",
        task_create_missing_queues=False,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # a new pool child has this long to report itself up (billiard's default, 4 s, was
        # overrun on a loaded two-core machine: every replacement child was killed as it
        # started, "Timed out waiting for UP message", and the worker ran nothing for minutes)
        worker_proc_alive_timeout=120,
        # a message without a priority (a raw Celery task) must not jump the queue: kombu
        # puts it on the priority-0 list, the first one served
        task_default_priority=LOWEST_BROKER_PRIORITY,
        broker_transport_options=transport,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=5,
        task_publish_retry=True,
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5},
        worker_send_task_events=True,
        task_send_sent_event=True,
        task_track_started=True,
        task_ignore_result=True,
        result_backend=None,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        event_serializer="json",
        worker_max_tasks_per_child=settings.worker_max_tasks_per_child or None,
        worker_max_memory_per_child=settings.worker_max_memory_per_child_kb or None,
        worker_hijack_root_logger=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        timezone="UTC",
    )
    return app


def send_job(job_id: str, attempt: int, *, job_type: str, queue: str, kwargs: dict,
             priority: int = 0) -> str:
    """Publish the message for one attempt of a job at its priority (0-9, 9 most urgent);
    returns the Celery task id."""
    result = get_celery().send_task(
        TASK_FOR_TYPE[job_type], args=[job_id, attempt], kwargs=kwargs, queue=queue,
        priority=broker_priority(priority),
    )
    return str(result.id)


def __getattr__(name: str) -> Celery:
    """`celery -A common.celery_app …` (Flower) finds the app as `app`."""
    if name in ("app", "celery"):
        return get_celery()
    raise AttributeError(name)


def redis_lists(queue: str) -> list[str]:
    """The Redis lists that hold a queue's messages, one per priority step (kombu names the
    priority-0 list after the queue and the others `queue<sep>step`)."""
    from kombu.transport.redis import Channel

    return [queue, *(f"{queue}{Channel.sep}{step}"
                     for step in range(1, LOWEST_BROKER_PRIORITY + 1))]


def messages_waiting(queue: str) -> int:
    """Messages in the broker's queue not yet delivered to any worker."""
    from kombu.exceptions import ChannelError

    with get_celery().connection_for_write() as conn:
        try:
            return int(conn.default_channel.queue_declare(queue=queue, passive=True)
                       .message_count)
        except ChannelError:  # Redis: a queue with no message has no list, "not found"
            return 0


def fetched_unacked(older_than_s: float) -> set[str]:
    """Task ids of the messages a worker fetched more than older_than_s ago and has not
    acknowledged: kombu's Redis transport keeps each in its `unacked` hash, indexed by the
    time of delivery, until the ack (a running job's message, with acks_late) or the
    visibility timeout (a worker that died before its pool child claimed the job)."""
    import json
    import time

    with get_celery().connection_for_write() as conn:
        channel = conn.default_channel
        client = channel.client
        tags = client.zrangebyscore(channel.unacked_index_key, 0, time.time() - older_than_s)
        raw = client.hmget(channel.unacked_key, tags) if tags else []
    ids = set()
    for value in raw:
        if value:  # acked between the two reads
            headers = json.loads(value)[0].get("headers") or {}
            if headers.get("id"):
                ids.add(str(headers["id"]))
    return ids
