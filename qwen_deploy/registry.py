"""Worker registrations: each generation worker child publishes its state and model info."""

from __future__ import annotations

import json
import time
from typing import Any

import redis


def worker_key(prefix: str, name: str) -> str:
    return f"{prefix}:worker:{name}"


def loads_key(prefix: str) -> str:
    return f"{prefix}:stats:model_loads"


def publish(client: redis.Redis, prefix: str, name: str, info: dict[str, Any], ttl: float) -> None:
    """Write (or refresh) this worker's record; it vanishes ttl seconds after the last refresh."""
    info = {**info, "name": name, "seen_at": time.time()}
    client.set(worker_key(prefix, name), json.dumps(info), px=int(ttl * 1000))


def remove(client: redis.Redis, prefix: str, name: str) -> None:
    client.delete(worker_key(prefix, name))


def workers(client: redis.Redis, prefix: str) -> list[dict[str, Any]]:
    """Live worker records, newest model load first."""
    keys = list(client.scan_iter(match=worker_key(prefix, "*"), count=200))
    values = client.mget(keys) if keys else []
    found = [json.loads(v) for v in values if v]
    return sorted(found, key=lambda w: w.get("model", {}).get("loaded_at") or 0, reverse=True)
