"""Queue and task names, and the Celery message envelope for a direct push onto a Redis queue.

Submitting a job is one Redis round trip: a Lua script writes the job record and pushes the
message built here onto the queue list that the Celery worker pops (kombu's Redis transport,
Celery task protocol 2, JSON body). The web process therefore needs neither Celery nor kombu.
"""

from __future__ import annotations

import base64
import os
import socket
import uuid
from enum import IntEnum
from typing import Any

from qwen_deploy.jsontext import dumpb, dumps


class Lane(IntEnum):
    """A generation job's class: its queue, and its lane in a worker's engine (each lane has its own
    waiting sequences, rows and KV batch; bulk rows get one step in `engine.bulk_every` while interactive
    rows run)."""

    INTERACTIVE = 0  # single jobs: the engine's pending set and the `interactive` wake-up queue
    BULK = 1  # batch micro-batches: the `bulk` queue

    @property
    def queue(self) -> str:
        """The default model's queue of this lane (another model's: `{queue}.{alias}`)."""
        return self.name.lower()


CONVERT = "convert"
WEBHOOKS = "webhooks"
GENERATION_QUEUES = (Lane.INTERACTIVE.queue, Lane.BULK.queue)
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
    return GENERATION_QUEUES if default else (f"{Lane.INTERACTIVE.queue}.{alias}", f"{Lane.BULK.queue}.{alias}")


def engine_queue(prefix: str, node: str) -> str:
    """The queue only this generation worker consumes: hand-offs that keep its engine driven."""
    return f"{prefix}.engine.{node}"


def convert_task(kind: str) -> str:
    return {"download": DOWNLOAD_TASK, "export": EXPORT_TASK}[kind]


def task_message(
    task: str,
    task_id: str,
    queue: str,
    args: list[object],
    time_limit: float | None = None,
    soft_time_limit: float | None = None,
) -> str:
    """The JSON string kombu's Redis transport stores for one Celery task message."""
    body = dumpb([args, {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}])
    headers = {
        "lang": "py",
        "task": task,
        "id": task_id,
        "shadow": None,
        "eta": None,
        "expires": None,
        "group": None,
        "group_index": None,
        "retries": 0,
        "timelimit": [time_limit, soft_time_limit],
        "root_id": task_id,
        "parent_id": None,
        "argsrepr": repr(args),
        "kwargsrepr": "{}",
        "origin": _ORIGIN,
        "ignore_result": True,
    }
    return dumps(
        {
            "body": base64.b64encode(body).decode(),
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
    )


def push_drive(client: Any, prefix: str, node: str) -> bool:
    """Put a `drive` task on a generation worker's own queue unless one waits there already; whether it did."""
    from qwen_deploy.keys import queue_key

    key = queue_key(prefix, engine_queue(prefix, node))
    if client.llen(key):
        return False
    client.lpush(key, task_message(DRIVE_TASK, f"drive-{uuid.uuid4().hex}", engine_queue(prefix, node), []))
    return True
