"""Worker registrations: each generation worker child publishes its state and model info.

A record is a key that expires `ttl` after its last refresh, listed in one sorted set
(`{prefix}:workers`) scored by that expiry: readers prune lapsed entries by score and never scan
the keyspace. A record names the model alias the worker serves (`alias`); the worker is also listed,
by the same expiry, in its model's set `{prefix}:model:{alias}:workers`, which SUBMIT reads to know
whether any live worker serves a job's model.
"""

from __future__ import annotations

import json
import time
from typing import Any

import redis

from qwen_deploy.keys import model_workers_key, worker_key, workers_key


def publish(client: redis.Redis, prefix: str, name: str, info: dict[str, Any], ttl: float) -> None:
    """Write (or refresh) this worker's record; it vanishes ttl seconds after the last refresh."""
    now = time.time()
    info = {**info, "name": name, "seen_at": now}
    pipe = client.pipeline(transaction=True)
    pipe.set(worker_key(prefix, name), json.dumps(info), px=int(ttl * 1000))
    pipe.zadd(workers_key(prefix), {name: now + ttl})
    if info.get("alias"):
        pipe.zadd(model_workers_key(prefix, info["alias"]), {name: now + ttl})
        pipe.zremrangebyscore(model_workers_key(prefix, info["alias"]), "-inf", now)
    pipe.execute()


def remove(client: redis.Redis, prefix: str, name: str, alias: str | None = None) -> None:
    pipe = client.pipeline(transaction=True)
    pipe.delete(worker_key(prefix, name))
    pipe.zrem(workers_key(prefix), name)
    if alias:
        pipe.zrem(model_workers_key(prefix, alias), name)
    pipe.execute()


def workers(client: redis.Redis, prefix: str) -> list[dict[str, Any]]:
    """Live worker records, newest model load first."""
    pipe = client.pipeline(transaction=True)
    pipe.zremrangebyscore(workers_key(prefix), "-inf", time.time())
    pipe.zrange(workers_key(prefix), 0, -1)
    names = [n.decode() if isinstance(n, bytes) else n for n in pipe.execute()[1]]
    values = client.mget([worker_key(prefix, n) for n in names]) if names else []
    found = [json.loads(v) for v in values if v]
    return sorted(found, key=lambda w: w.get("model", {}).get("loaded_at") or 0, reverse=True)


def by_model(found: list[dict[str, Any]], alias: str, default: bool) -> list[dict[str, Any]]:
    """The records of workers serving `alias` (a record without an alias is the default model's)."""
    return [w for w in found if w.get("alias") == alias or (default and not w.get("alias"))]


def load_failure(found: list[dict[str, Any]], alias: str, default: bool) -> str | None:
    """Why `alias` cannot serve: the reason its workers' model load failed, when every live worker of it
    failed (None while one is ready or loading, or none runs)."""
    mine = by_model(found, alias, default)
    failed = [w for w in mine if w.get("state") == "load_failed"]
    if not failed or len(failed) < len(mine):
        return None
    return load_reason(failed[0])


def load_reason(record: dict[str, Any]) -> str:
    """The load failure a `load_failed` worker record gives."""
    return str((record.get("error") or {}).get("message") or "the model could not be loaded")
