"""The stuck-job check: jobs whose worker vanished, or whose queue message was lost, are re-queued
(same id, bounded by `max_deliveries`) or failed with a clear error. Never left queued or running.

Every non-terminal job sits in the `{prefix}:active` sorted set, scored by when to look at it:
`reap_after` after submit, and `hard limit + reap_grace` after each start. A job found there past
its time is:

- queued, with its message still in the queue or held unacked by a live consumer: left alone;
- queued, with its message nowhere (popped by a consumer that died): its message is pushed again;
- running past its time limit (its worker died with the message, e.g. parent and child killed):
  the broker's unacked copy is dropped and the message pushed again, or, after `max_deliveries`
  runs, the job fails with `worker_lost`.

Jobs past their deadline are swept first (see qwen_deploy/lifecycle.py).

Workers run `reap()` from their heartbeat thread; a short Redis lock lets one run at a time.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import redis

from qwen_deploy.job_records import as_text
from qwen_deploy.jobs import TERMINAL, JobStore
from qwen_deploy.keys import unacked_index_key, unacked_key
from qwen_deploy.lifecycle import sweep_deadlines
from qwen_deploy.logs import event
from qwen_deploy.states import ErrorCode, error, worker_lost

log = logging.getLogger(__name__)


def unacked_tags(client: redis.Redis, prefix: str, job_id: str) -> list[str]:
    """Delivery tags of unacked copies of this job's message (held by a Celery consumer)."""
    needle = f'"id": "{job_id}"'
    unacked = {as_text(tag): as_text(raw) for tag, raw in client.hgetall(unacked_key(prefix)).items()}
    return [tag for tag, raw in unacked.items() if needle in raw or f'"id":"{job_id}"' in raw]


def reap(store: JobStore, max_deliveries: int, running_for: float, limit: int = 100) -> dict[str, int]:
    """One pass over the jobs due for a look; returns counts by outcome."""
    client, now = store.client, time.time()
    due = client.zrangebyscore(store.active_key(), "-inf", now, start=0, num=limit)
    counts = {"requeued": 0, "failed": 0, "waiting": 0, "done": 0}
    for job_id in map(as_text, due):
        try:
            counts[_reap_one(store, job_id, now, max_deliveries, running_for)] += 1
        except Exception as exc:  # one bad entry must not stop the pass
            log.warning("reaper: could not check %s: %s", job_id, exc)
    return counts


def _reap_one(store: JobStore, job_id: str, now: float, max_deliveries: int, running_for: float) -> str:
    client = store.client
    record = store.get(job_id)
    if record is None or record.get("status") in TERMINAL:
        client.zrem(store.active_key(), job_id)
        return "done"
    queue, message = record.get("queue", ""), record.get("message", "")
    if record["status"] == "running" and record.get("lease_until"):  # an engine's claim
        lease = float(record["lease_until"])
        if lease > now:  # renewed meanwhile
            client.zadd(store.active_key(), {job_id: lease})
            return "waiting"
        # a copy held by a consumer that is gone
        drop_unacked(client, store.prefix, unacked_tags(client, store.prefix, job_id))
        return _wake(store, job_id, record, now, max_deliveries, store.reap_after)
    tags = unacked_tags(client, store.prefix, job_id)
    if record["status"] == "queued":
        if tags or (message and client.lpos(store.queue_key(queue), message) is not None):
            client.zadd(store.active_key(), {job_id: now + store.reap_after})
            return "waiting"
    else:  # running past its limit: the consumer holding this copy is gone
        drop_unacked(client, store.prefix, tags)
    return _wake(store, job_id, record, now, max_deliveries, running_for + store.reap_after)


def drop_unacked(client: redis.Redis, prefix: str, tags: list[str]) -> None:
    """Forget unacked copies whose consumer is gone (else kombu would restore them hours later)."""
    if tags:
        pipe = client.pipeline()
        pipe.hdel(unacked_key(prefix), *tags)
        pipe.zrem(unacked_index_key(prefix), *tags)
        pipe.execute()


def _wake(
    store: JobStore, job_id: str, record: dict[str, str], now: float, max_deliveries: int, look_again: float
) -> str:
    """Push the job's message again (a worker's claim then runs or resumes it), or fail it when its
    runs are used up."""
    client = store.client
    queue, message = record.get("queue", ""), record.get("message", "")
    if int(record.get("deliveries") or 0) - int(record.get("handbacks") or 0) >= max_deliveries:  # hand-backs: reloads
        store.finish(job_id, "failed", {"error": worker_lost(max_deliveries)})
        event(log, "job.reaped", logging.WARNING, id=job_id, outcome="failed", status=record["status"])
        return "failed"
    if not message:
        store.finish(job_id, "failed", {"error": error(ErrorCode.LOST, "the job's queue message was lost")})
        return "failed"
    pipe = client.pipeline()
    pipe.zadd(store.active_key(), {job_id: now + look_again})
    pipe.lpush(store.queue_key(queue), _fresh_tag(message))
    pipe.execute()
    event(log, "job.reaped", logging.WARNING, id=job_id, outcome="requeued", status=record["status"])
    return "requeued"


def _fresh_tag(message: str) -> str:
    """The same message with a new delivery tag, so it cannot collide with a dropped unacked copy."""
    import uuid

    data: dict[str, Any] = json.loads(message)
    data["properties"]["delivery_tag"] = str(uuid.uuid4())
    return json.dumps(data)


def reap_if_due(store: JobStore, interval: float, max_deliveries: int, running_for: float) -> dict[str, int] | None:
    """Sweep the jobs past their deadline (every call: one cheap script), then run `reap` unless another
    process ran it within `interval` seconds."""
    sweep_deadlines(store)
    if not store.client.set(store.reaper_lock_key(), "1", nx=True, px=max(1, int(interval * 1000))):
        return None
    return reap(store, max_deliveries, running_for)
