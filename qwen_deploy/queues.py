"""Queue and task names, and the Celery message envelope for a direct push onto a Redis queue.

Submitting a job is one Redis round trip: a Lua script writes the job record and pushes the
message built here onto the queue list that the Celery worker pops (kombu's Redis transport,
Celery task protocol 2, JSON body). The web process therefore needs neither Celery nor kombu.
"""

from __future__ import annotations

import binascii
import functools
import json
import os
import re
import socket
import uuid
from enum import IntEnum
from typing import Any


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
    """The JSON string kombu's Redis transport stores for one Celery task message (every submit builds
    one: the envelope is rendered once per task and queue, then filled in)."""
    if args == [task_id] and _PLAIN(task_id):  # a job id: json.dumps and repr would write it as it is
        body = '[["' + task_id + '"]' + _BODY_TAIL
        quoted, argsrepr = task_id, "['" + task_id + "']"
    else:
        body = "[" + json.dumps(args) + _BODY_TAIL  # [args, kwargs, embed], as json.dumps would write it
        quoted, argsrepr = _json_str(task_id), _json_str(repr(args))
    fill = {
        "@@body@@": binascii.b2a_base64(body.encode(), newline=False).decode(),
        "@@id@@": quoted,
        "@@argsrepr@@": argsrepr,
        "@@tag@@": _uuid4(),
    }
    head, *parts = _envelope(task, queue, time_limit, soft_time_limit)
    return head + "".join(fill[name] + text for name, text in parts)


_PLAIN = re.compile(r"[A-Za-z0-9_.:-]+").fullmatch  # written the same by json.dumps, repr and as text
_BODY_TAIL = ', {}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]'


def _uuid4() -> str:
    """str(uuid.uuid4()) without the UUID object: random bits with version 4 and the RFC 4122 variant."""
    bits = (int.from_bytes(os.urandom(16)) & ~(0xF000 << 64) & ~(0xC000 << 48)) | (0x4000 << 64) | (0x8000 << 48)
    h = f"{bits:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _json_str(text: str) -> str:
    return json.dumps(text)[1:-1]


@functools.lru_cache(maxsize=256)
def _envelope(task: str, queue: str, time_limit: float | None, soft_time_limit: float | None) -> list[Any]:
    """The message with @@name@@ holes, split as [text, (name, text), ...]."""
    headers = {
        "lang": "py",
        "task": task,
        "id": "@@id@@",
        "shadow": None,
        "eta": None,
        "expires": None,
        "group": None,
        "group_index": None,
        "retries": 0,
        "timelimit": [time_limit, soft_time_limit],
        "root_id": "@@id@@",
        "parent_id": None,
        "argsrepr": "@@argsrepr@@",
        "kwargsrepr": "{}",
        "origin": _ORIGIN,
        "ignore_result": True,
    }
    message = {
        "body": "@@body@@",
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": headers,
        "properties": {
            "correlation_id": "@@id@@",
            "reply_to": "",
            "delivery_mode": 2,
            "delivery_info": {"exchange": queue, "routing_key": queue},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": "@@tag@@",
        },
    }
    pieces = re.split(r"(@@[a-z]+@@)", json.dumps(message))
    return [pieces[0], *zip(pieces[1::2], pieces[2::2])]


def push_drive(client: Any, prefix: str, node: str) -> bool:
    """Put a `drive` task on a generation worker's own queue unless one waits there already; whether it did."""
    from qwen_deploy.keys import queue_key

    key = queue_key(prefix, engine_queue(prefix, node))
    if client.llen(key):
        return False
    client.lpush(key, task_message(DRIVE_TASK, f"drive-{uuid.uuid4().hex}", engine_queue(prefix, node), []))
    return True
