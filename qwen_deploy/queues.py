"""Queue and task names, and the Celery message envelope for a direct push onto a Redis queue.

Submitting a job is one Redis round trip: a Lua script writes the job record and pushes the
message built here onto the queue list that the Celery worker pops (kombu's Redis transport,
Celery task protocol 2, JSON body). The web process therefore needs neither Celery nor kombu.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import uuid

INTERACTIVE = "interactive"
BULK = "bulk"
CONVERT = "convert"
WEBHOOKS = "webhooks"
GENERATION_QUEUES = (INTERACTIVE, BULK)
CONVERT_WORKER_QUEUES = (CONVERT, WEBHOOKS)  # the convert worker also sends webhooks

GENERATE_TASK = "qwen_deploy.generate"
BATCH_CHUNK_TASK = "qwen_deploy.batch_chunk"
DOWNLOAD_TASK = "qwen_deploy.download"
EXPORT_TASK = "qwen_deploy.export"
DRIVE_TASK = "qwen_deploy.drive"
WEBHOOKS_TASK = "qwen_deploy.webhooks_dispatch"

_ORIGIN = f"{os.getpid()}@{socket.gethostname()}"


def model_queues(alias: str, default: bool) -> tuple[str, str]:
    """A model's (interactive, bulk) queues: the default model keeps the plain names, another
    `interactive.{alias}` and `bulk.{alias}`."""
    return GENERATION_QUEUES if default else (f"{INTERACTIVE}.{alias}", f"{BULK}.{alias}")


def engine_queue(prefix: str, node: str) -> str:
    """The queue only this generation worker consumes: hand-offs that keep its engine driven."""
    return f"{prefix}.engine.{node}"


def convert_task(kind: str) -> str:
    return {"download": DOWNLOAD_TASK, "export": EXPORT_TASK}[kind]


def task_message(task: str, task_id: str, queue: str, args: list[object],
                 time_limit: float | None = None, soft_time_limit: float | None = None) -> str:
    """The JSON string kombu's Redis transport stores for one Celery task message."""
    body = json.dumps([args, {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}])
    headers = {
        "lang": "py", "task": task, "id": task_id, "shadow": None, "eta": None, "expires": None,
        "group": None, "group_index": None, "retries": 0,
        "timelimit": [time_limit, soft_time_limit], "root_id": task_id, "parent_id": None,
        "argsrepr": repr(args), "kwargsrepr": "{}", "origin": _ORIGIN, "ignore_result": True,
    }
    message = {
        "body": base64.b64encode(body.encode()).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": headers,
        "properties": {
            "correlation_id": task_id,
            "reply_to": "",
            "delivery_mode": 2,
            "delivery_info": {"exchange": queue, "routing_key": queue},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }
    return json.dumps(message)
