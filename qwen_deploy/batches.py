"""Batch records in Redis: the batch hash, its request lines, its output lines (JSONL) and chunk markers.

A batch is cut into chunks (micro-batches) of request lines; each chunk is one task on the bulk
queue. `CHUNK_DONE` appends a chunk's output lines and counts them once (a re-run chunk is a no-op)
and finalizes the batch when the last chunk is in.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, cast

import redis

from qwen_deploy.job_records import as_text, mapping
from qwen_deploy.keys import BatchKeys, WebhookKeys, queue_key, stats_key
from qwen_deploy.lua import script
from qwen_deploy.states import BATCH_TERMINAL, ErrorCode

BATCH_ID_PREFIX = "batch_"
TERMINAL = BATCH_TERMINAL
EXPIRED_CODE = (
    ErrorCode.BATCH_EXPIRED.value
)  # a line its batch's completion_window ended (the batch then ends `expired`)
OUTPUT_FILE, ERROR_FILE = "file-out-", "file-err-"  # + the batch id's hex: virtual files of its lines


CAPS_TRIES = 20  # WATCH rounds before a create under caps gives up ("busy")


@dataclass(frozen=True)
class BatchCaps:
    """What a new batch is checked against: its bulk queue's depth, its owner's open batches."""

    queue: str  # the bulk queue its micro-batches go to
    max_depth: int
    open_key: str  # the owner's batches that may still be running (`BatchKeys.open_key`)
    max_open: int
    open_ttl: int


def batch_file_id(batch_id: str, prefix: str) -> str:
    return prefix + batch_id.removeprefix(BATCH_ID_PREFIX)


class BatchStore:
    def __init__(self, client: redis.Redis, prefix: str = "qd", ttl: int = 86400) -> None:
        self.r, self.prefix, self.ttl = client, prefix, ttl
        self.names, self.webhook_keys = BatchKeys(prefix), WebhookKeys(prefix)
        self._chunk_done = client.register_script(script("chunk_done"))
        self._cancel = client.register_script(script("batch_cancel"))
        self._webhook = client.register_script(script("webhook_enqueue"))

    def key(self, batch_id: str) -> str:
        return self.names.key(batch_id)

    def index(self, owner: str) -> str:
        """An owner's batch ids by creation time (for listing without a keyspace scan)."""
        return self.names.index_key(owner)

    def page(self, owner: str, after: str | None, limit: int) -> tuple[list[str], bool] | None:
        """Up to `limit` of the owner's ids after the id `after`, newest first, and whether more follow
        (None: unknown `after`)."""
        index = self.index(owner)
        self.r.zremrangebyscore(index, "-inf", time.time() - self.ttl)
        start = 0
        if after:
            rank = self.r.zrevrank(index, after)
            if rank is None:
                return None
            start = int(cast(int, rank)) + 1  # ZREVRANK without WITHSCORE: an int
        ids = [as_text(i) for i in self.r.zrevrange(index, start, start + limit)]
        return ids[:limit], len(ids) > limit

    def keys(self, batch_id: str) -> tuple[str, str, str, str]:
        """(record, request lines, output lines, chunks done)."""
        n = self.names
        return n.key(batch_id), n.requests_key(batch_id), n.outputs_key(batch_id), n.chunks_key(batch_id)

    def create(
        self,
        batch_id: str,
        fields: dict[str, Any],
        requests: list[str],
        errors: list[str],
        messages: list[tuple[str, str]],
        caps: BatchCaps | None = None,
    ) -> tuple[str, int]:
        """Record, request lines, up-front error lines and chunk messages, in one transaction; with `caps`,
        checked against them in the same step (WATCH), the batch then counted among the owner's open ones.
        ("ok", 0), or the refusal: ("queue_full", depth), ("too_many", open batches), ("busy", 0)."""
        if caps is None:
            with self.r.pipeline(transaction=True) as pipe:
                self._write(pipe, batch_id, fields, requests, errors, messages)
                pipe.execute()
            return "ok", 0
        watched = (queue_key(self.prefix, caps.queue), caps.open_key)
        for _ in range(CAPS_TRIES):
            with self.r.pipeline(transaction=True) as pipe:
                try:
                    pipe.watch(*watched)
                    refused, done = self._over(pipe, caps, len(messages))
                    if refused[0] != "ok":
                        return refused
                    pipe.multi()
                    if done:
                        pipe.zrem(caps.open_key, *done)
                    self._write(pipe, batch_id, fields, requests, errors, messages)
                    if messages:
                        pipe.zadd(caps.open_key, {batch_id: 0})
                        pipe.expire(caps.open_key, caps.open_ttl)
                    pipe.execute()
                    return "ok", 0
                except redis.WatchError:
                    continue  # a worker took a message or another create came first: check again
        return "busy", 0

    def _over(self, pipe: Any, caps: BatchCaps, new_tasks: int) -> tuple[tuple[str, int], list[str]]:
        """(the refusal or ("ok", 0), the owner's open batches that have ended), read under WATCH."""
        depth = int(pipe.llen(queue_key(self.prefix, caps.queue)))
        if new_tasks and depth + new_tasks > caps.max_depth:
            return ("queue_full", depth), []
        open_ids = [as_text(i) for i in pipe.zrange(caps.open_key, 0, -1)]
        if len(open_ids) < caps.max_open:
            return ("ok", 0), []
        statuses = [as_text(pipe.hget(self.key(i), "status")) for i in open_ids]
        done = [i for i, st in zip(open_ids, statuses) if not st or st in TERMINAL]
        if len(open_ids) - len(done) >= caps.max_open:
            return ("too_many", len(open_ids) - len(done)), []
        return ("ok", 0), done

    def _write(
        self,
        pipe: Any,
        batch_id: str,
        fields: dict[str, Any],
        requests: list[str],
        errors: list[str],
        messages: list[tuple[str, str]],
    ) -> None:
        record, req, out, _ = self.keys(batch_id)
        pipe.hset(record, mapping=mapping(fields))
        pipe.expire(record, self.ttl)
        if requests:
            pipe.rpush(req, *requests)
            pipe.expire(req, self.ttl)
        if errors:
            pipe.rpush(out, *errors)
            pipe.expire(out, self.ttl)
        index = self.index(fields.get("owner") or "anonymous")
        pipe.zadd(index, {batch_id: float(fields["created_at"])})
        pipe.expire(index, self.ttl)
        for queue, message in messages:
            pipe.lpush(queue_key(self.prefix, queue), message)

    def get(self, batch_id: str) -> dict[str, str] | None:
        raw = self.r.hgetall(self.key(batch_id))
        return {as_text(k): as_text(v) for k, v in raw.items()} or None

    def requests(self, batch_id: str, start: int, end: int) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.r.lrange(self.keys(batch_id)[1], start, end - 1)]

    def results(self, batch_id: str, after: int, limit: int | None = None) -> list[str]:
        end = -1 if limit is None else after + limit - 1
        return [as_text(line) for line in self.r.lrange(self.keys(batch_id)[2], after, end)]

    def status(self, batch_id: str) -> str:
        return as_text(self.r.hget(self.key(batch_id), "status"))

    def cancel(self, batch_id: str, owner: str = "") -> str:
        """The status before the call ('missing' also for a batch of another owner than `owner`, when given)."""
        return as_text(self._cancel(keys=[self.key(batch_id)], args=[repr(time.time()), owner]))

    def chunk_recorded(self, batch_id: str, start: int) -> bool:
        """Whether this micro-batch's lines are already in (a redelivered message is then skipped)."""
        return bool(self.r.sismember(self.keys(batch_id)[3], str(start)))

    def chunk_tries(self, batch_id: str, start: int) -> int:
        """Count a run of the micro-batch; the counts expire with the batch's other keys."""
        pipe = self.r.pipeline(transaction=True)
        pipe.hincrby(self.names.tries_key(batch_id), str(start), 1)
        pipe.expire(self.names.tries_key(batch_id), self.ttl)
        return int(pipe.execute()[0])

    def chunk_done(self, batch_id: str, start: int, lines: list[dict[str, Any]]) -> bool:
        """Append a chunk's output lines and count them, once; finalize the batch after the last chunk."""
        completed = sum(1 for line in lines if line.get("error") is None)
        expired = sum(1 for line in lines if (line.get("error") or {}).get("code") == EXPIRED_CODE)
        keys = list(self.keys(batch_id))
        keys = [keys[0], keys[2], keys[3], stats_key(self.prefix)]
        done = self._chunk_done(
            keys=keys,
            args=[
                start,
                repr(time.time()),
                self.ttl,
                completed,
                len(lines) - completed,
                expired,
                *[json.dumps(x) for x in lines],
            ],
        )
        self.notify(batch_id)  # also on a re-run: the first run may have died before this line
        return bool(done)

    def notify(self, batch_id: str) -> bool:
        """Add the batch.completed webhook delivery once the batch has ended (once per batch)."""
        msg_id = f"msg_{batch_id}_completed"
        return bool(
            self._webhook(
                keys=[self.key(batch_id), self.webhook_keys.due_key(), self.webhook_keys.delivery_key(msg_id)],
                args=[repr(time.time()), "batch", "completed", msg_id],
            )
        )


def public_batch(record: dict[str, str]) -> dict[str, Any]:
    def num(name: str) -> float | None:
        return float(record[name]) if record.get(name) else None

    def stamp(name: str) -> int | None:
        return int(float(record[name])) if record.get(name) else None

    status = record.get("status")
    ended = status in TERMINAL
    created = stamp("created_at")
    return {
        "id": record["id"],
        "object": "batch",
        "endpoint": record.get("endpoint") or "/v1/jobs",
        "model": record.get("model"),
        "input_file_id": record.get("input_file_id"),
        "completion_window": record.get("completion_window") or "24h",
        "output_file_id": batch_file_id(record["id"], OUTPUT_FILE) if ended else None,
        "error_file_id": batch_file_id(record["id"], ERROR_FILE) if ended and int(record.get("failed") or 0) else None,
        "errors": None,
        "expires_at": stamp("expires_at") or (created + 86400 if created is not None else None),
        "finalizing_at": None,
        "failed_at": stamp("completed_at") if status == "failed" else None,
        "expired_at": stamp("expired_at"),
        "status": record.get("status"),
        "created_at": num("created_at"),
        "in_progress_at": num("created_at"),
        "completed_at": num("completed_at"),
        "cancelling_at": num("cancelling_at"),
        "cancelled_at": num("cancelled_at"),
        "request_counts": {
            "total": int(record.get("total") or 0),
            "completed": int(record.get("completed") or 0),
            "failed": int(record.get("failed") or 0),
        },
        "micro_batches": int(record.get("chunks") or 0),
        "metadata": json.loads(record["metadata"]) if record.get("metadata") else None,
    }
