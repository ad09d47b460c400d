"""A job record as stored: its id, its fields as Redis hash strings, the reads of records and event
streams (`JobRecords`, the base of `JobStore`), and the job object of the HTTP API (`public_job`).
The state transitions are in `qwen_deploy/jobs.py`."""

from __future__ import annotations

import json
import re
import secrets
import time
from typing import Any, cast

import redis
from redis.typing import EncodableT

from qwen_deploy.keys import JobKeys

JOB_ID_PREFIX = "job_"
ID_RE = re.compile(r"[a-z]+_[0-9a-f]{28}")


def valid_id(any_id: str, prefix: str = JOB_ID_PREFIX) -> bool:
    """Whether `any_id` has the shape of an id this service makes (prefix + 28 lowercase hex digits)."""
    return any_id.startswith(prefix) and ID_RE.fullmatch(any_id) is not None


def new_id(prefix: str = JOB_ID_PREFIX) -> str:
    """A sortable id whose first 12 hex digits after the prefix are the creation time in ms."""
    return f"{prefix}{int(time.time() * 1000):012x}{secrets.token_hex(8)}"


def new_job_id() -> str:
    return new_id(JOB_ID_PREFIX)


def id_time(any_id: str, prefix: str = JOB_ID_PREFIX) -> float | None:
    """Creation time encoded in a well-formed id, else None."""
    body = any_id.removeprefix(prefix)
    if not any_id.startswith(prefix) or len(body) != 28:
        return None
    try:
        int(body, 16)
    except ValueError:
        return None
    return int(body[:12], 16) / 1000


def strings(fields: dict[str, Any]) -> dict[str, str]:
    """Hash fields as strings: None dropped, non-strings as JSON."""
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in fields.items() if v is not None}


def mapping(fields: dict[str, Any]) -> dict[EncodableT, EncodableT]:
    """`strings(fields)` as the type HSET's `mapping` takes (redis-py's Mapping key type is invariant)."""
    return {k: v for k, v in strings(fields).items()}


def as_text(value: Any) -> str:
    """A Redis reply as text: bytes decoded, None as "", anything else by str()."""
    return value.decode() if isinstance(value, bytes) else ("" if value is None else str(value))


class JobRecords(JobKeys):
    """Reads job records and their event streams, and keeps their queues and owner index; every method is one
    Redis round trip. `client` is the Redis the records live in: the record layer's own modules
    (`reaper`, `lifecycle`, `model_load`, `stats_history`) run their scripts on it; the layers above call
    the methods."""

    def __init__(self, client: redis.Redis, prefix: str = "qd", default_model: str = "") -> None:
        super().__init__(prefix, default_model)
        self.client = client

    def queue_length(self, queue: str) -> int:
        """Messages waiting on a Celery queue."""
        return int(self.client.llen(self.queue_key(queue)))

    def push_message(self, queue: str, message: str) -> None:
        """Put a job's message back at the end of its queue (the worker pops the other end)."""
        self.client.lpush(self.queue_key(queue), message)

    def forget_owned(self, owner: str, job_ids: list[str]) -> None:
        """Drop ids of expired records from the owner's job index."""
        if job_ids:
            self.client.zrem(self.index_key(owner), *job_ids)

    def owned_ids(self, owner: str, after: str | None, count: int) -> list[str]:
        """Up to `count` of the owner's job ids, newest first, older than `after` when given."""
        top = f"({after}" if after else "+"
        return [as_text(i) for i in self.client.zrevrangebylex(self.index_key(owner), top, "-", 0, count)]

    def get_many(self, job_ids: list[str]) -> list[dict[str, str] | None]:
        pipe = self.client.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hgetall(self.key(job_id))
        return [{as_text(k): as_text(v) for k, v in raw.items()} or None for raw in pipe.execute()]

    def get(self, job_id: str) -> dict[str, str] | None:
        raw = self.client.hgetall(self.key(job_id))
        return {as_text(k): as_text(v) for k, v in raw.items()} or None

    def read_events(self, job_id: str, last_id: str, block_ms: int) -> list[tuple[str, dict[str, str]]]:
        """Events after last_id, waiting up to block_ms for the first one."""
        reply = cast(
            list[tuple[str, list[tuple[str, dict[str, str]]]]] | None,  # XREAD: [(stream, entries)]
            self.client.xread({self.events_key(job_id): last_id}, block=max(block_ms, 1), count=256),
        )
        if not reply:
            return []
        return [(as_text(i), {as_text(k): as_text(v) for k, v in f.items()}) for i, f in reply[0][1]]


def public_job(record: dict[str, str]) -> dict[str, Any]:
    """The job object of the HTTP API, from a stored record."""

    def num(name: str) -> float | None:
        return float(record[name]) if record.get(name) else None

    def obj(name: str) -> Any:
        return json.loads(record[name]) if record.get(name) else None

    status = record.get("status", "queued")
    kind = record.get("type", "generation")
    lifecycle = {
        "priority": record.get("priority", "normal"),
        "deadline": num("deadline"),
        "retry_of": record.get("retry_of") or None,
        "queue_position": None,
        "estimated_start_seconds": None,
    }
    if kind == "generation":
        progress = {"tokens": int(record.get("tokens") or 0), "max_new_tokens": int(record.get("max_new_tokens") or 0)}
        output = None
        if status != "queued" or record.get("text"):
            output = {
                "text": record.get("text", ""),
                "finish_reason": record.get("finish_reason") or None,
                "usage": obj("usage"),
            }
            if record.get("stop_sequence"):  # finish_reason stop at one of the request's stop strings
                output["stop_sequence"] = record["stop_sequence"]
            if record.get("choices"):  # n samples and/or logprobs: one entry per sample, set at the end
                output["choices"] = obj("choices")
    else:
        progress, output = obj("progress") or {}, obj("result")
    return {
        "id": record["id"],
        "object": "job",
        "type": kind,
        "status": status,
        "queue": record.get("queue"),
        **({"model": record["model"]} if record.get("model") else {}),
        "created_at": num("created_at"),
        "started_at": num("started_at"),
        "completed_at": num("completed_at"),
        "attempts": int(record.get("deliveries") or 0),
        "progress": progress,
        "output": output,
        "error": obj("error"),
        **lifecycle,
    }
