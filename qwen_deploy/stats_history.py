"""The last 15 minutes of activity, for the console's charts.

A worker's heartbeat takes a sample at most every `worker.stats_interval` seconds across the cluster (a
Redis lock of that length): the `{prefix}:stats` counters the Lua transitions keep (tokens, finished
jobs, the queue-wait and run-time histograms) and the queue depths, pushed onto a capped list. `series`
turns consecutive samples into rates and medians: tokens/s, jobs finished per minute, depth per queue,
p50 queue wait and run time (interpolated within the histogram bucket, as Prometheus'
`histogram_quantile` does).
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

from qwen_deploy.jobs import JobStore
from qwen_deploy.lua import HISTOGRAM_BUCKETS
from qwen_deploy.queues import CONVERT, Lane

WINDOW_SECONDS = 15 * 60
HISTOGRAMS = ("queue_seconds", "run_seconds")


def record_if_due(store: JobStore, interval: float, queues: dict[str, str]) -> bool:
    """Take a sample unless another process took one within `interval` seconds. `queues`: a chart name
    for each queue key (interactive: the default model's pending set; the others: Celery lists)."""
    client = store.client
    if not client.set(store.stats_history_lock_key(), "1", nx=True, px=max(1, int(interval * 1000))):
        return False
    pipe = client.pipeline(transaction=False)
    pipe.hgetall(store.stats_key())
    for key in queues.values():
        pipe.type(key)
    stats, *kinds = pipe.execute()
    pipe = client.pipeline(transaction=False)
    for key, kind in zip(queues.values(), kinds):
        pipe.zcard(key) if _text(kind) == "zset" else pipe.llen(key)
    depths = pipe.execute()
    sample = {"t": round(time.time(), 6), **_counters(stats), "depth": dict(zip(queues, depths))}
    keep = math.ceil(WINDOW_SECONDS / interval) + 1
    pipe = client.pipeline(transaction=False)
    pipe.lpush(store.stats_history_key(), json.dumps(sample))
    pipe.ltrim(store.stats_history_key(), 0, keep - 1)
    pipe.expire(store.stats_history_key(), WINDOW_SECONDS * 2)
    pipe.execute()
    return True


def default_queues(store: JobStore) -> dict[str, str]:
    """The charted queues: the default model's engine pending set, its bulk queue, the convert queue."""
    return {
        "interactive": store.pending_key(),
        "bulk": store.queue_key(Lane.BULK.queue),
        "convert": store.queue_key(CONVERT),
    }


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _counters(stats: dict[Any, Any]) -> dict[str, Any]:
    values = {_text(k): float(_text(v)) for k, v in stats.items()}
    finished = sum(v for k, v in values.items() if k.startswith("jobs:"))
    out: dict[str, Any] = {"tokens": values.get("tokens", 0.0), "finished": finished}
    for name in HISTOGRAMS:
        out[name] = [values.get(f"{name}_bucket:{b}", 0.0) for b in HISTOGRAM_BUCKETS] + [
            values.get(f"{name}_count", 0.0)
        ]
    return out


def samples(store: JobStore) -> list[dict[str, Any]]:
    """The kept samples of the last 15 minutes, oldest first."""
    now = time.time()
    raw = store.client.lrange(store.stats_history_key(), 0, -1)
    found = [json.loads(r) for r in reversed(raw)]
    return [s for s in found if s.get("t", 0) >= now - WINDOW_SECONDS]


def quantile(q: float, before: list[float], after: list[float]) -> float | None:
    """The q-quantile of the observations between two cumulative histograms (buckets + total), or None."""
    deltas = [a - b for a, b in zip(after, before)]
    total = deltas[-1]
    if total <= 0:
        return None
    rank, lower, below = q * total, 0.0, 0.0
    for bound, count in zip(HISTOGRAM_BUCKETS, deltas):
        if count >= rank:
            inside = count - below
            return round(lower + (bound - lower) * ((rank - below) / inside if inside > 0 else 1.0), 4)
        lower, below = bound, count
    return float(HISTOGRAM_BUCKETS[-1])  # past the last bound: the largest one we can name


def series(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One point per sample after the first: rates and medians over the interval that ends at it."""
    out = []
    for before, after in zip(points, points[1:]):
        span = after["t"] - before["t"]
        if span <= 0:
            continue
        out.append(
            {
                "t": after["t"],
                "tokens_per_second": round(max(0.0, after["tokens"] - before["tokens"]) / span, 3),
                "jobs_per_minute": round(max(0.0, after["finished"] - before["finished"]) * 60 / span, 3),
                "depth": after["depth"],
                "queue_seconds_p50": quantile(0.5, before["queue_seconds"], after["queue_seconds"]),
                "run_seconds_p50": quantile(0.5, before["run_seconds"], after["run_seconds"]),
            }
        )
    return out
