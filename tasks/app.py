"""The Celery app: JSON only, acks late with bounded redeliveries, prefork with one child."""

from __future__ import annotations

from celery import Celery
from kombu import Queue

from qwen_deploy.config import Settings, get_settings
from qwen_deploy.connections import is_sentinel, sentinel_options
from qwen_deploy.keys import kombu_keyprefix
from qwen_deploy.queues import (
    BATCH_CHUNK_TASK,
    CONVERT,
    DOWNLOAD_TASK,
    EXPORT_TASK,
    GENERATE_TASK,
    WEBHOOKS,
    WEBHOOKS_TASK,
    Lane,
)
from tasks.process_hooks import PromptRespawn


def celery_config(settings: Settings) -> dict[str, object]:
    lim = settings.limits
    transport = {
        "visibility_timeout": settings.visibility_timeout,
        "queue_order_strategy": "priority",  # interactive before bulk, always
        "global_keyprefix": kombu_keyprefix(settings.key_prefix),  # queues and unacked under key_prefix
        "socket_connect_timeout": 5,
    }
    if is_sentinel(settings.redis_url):  # kombu's sentinel:// transport asks the sentinels for the master
        transport |= {
            "master_name": settings.redis_master_name,
            "socket_timeout": 10,
            "sentinel_kwargs": sentinel_options(),
        }
    return {
        "broker_url": settings.redis_url,
        "broker_transport_options": transport,
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        "result_backend": None,
        "task_ignore_result": True,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,
        "task_time_limit": lim.hard_time_limit,
        "task_soft_time_limit": lim.soft_time_limit,
        "task_queues": [Queue(lane.queue, routing_key=lane.queue) for lane in Lane],
        "task_default_queue": Lane.INTERACTIVE.queue,
        "task_create_missing_queues": True,
        "task_routes": {
            GENERATE_TASK: {"queue": Lane.INTERACTIVE.queue},
            BATCH_CHUNK_TASK: {"queue": Lane.BULK.queue},
            DOWNLOAD_TASK: {"queue": CONVERT},
            EXPORT_TASK: {"queue": CONVERT},
            WEBHOOKS_TASK: {"queue": WEBHOOKS},
        },
        "worker_concurrency": 1,
        "worker_pool": "prefork",
        "worker_prefetch_multiplier": 1,
        "worker_proc_alive_timeout": settings.worker.proc_alive_timeout,
        "worker_send_task_events": False,
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "worker_hijack_root_logger": True,
    }


def create_celery(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    app = Celery(
        "qwen_deploy",
        include=["tasks.generation", "tasks.batches", "tasks.conversion", "tasks.process_hooks", "tasks.webhooks"],
    )
    app.conf.update(celery_config(settings))
    app.steps["worker"].add(PromptRespawn)
    return app


app = create_celery()
