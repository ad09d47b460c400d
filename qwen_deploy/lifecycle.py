"""The job lifecycle around the queue: deadlines, purges, and where a queued job stands.

- Deadlines: a job submitted with `Cancel-After` / `deadline_seconds` has an absolute `deadline` in
  its record and an entry in `{prefix}:deadlines`. CLAIM refuses to start a job past it, and
  `sweep_deadlines` (the workers' heartbeat; a read of the job in web too) closes queued ones, so a
  job never waits for a worker to learn it is late: `canceled` with error `deadline_exceeded`.
  A running job is stopped by its engine at the deadline (its budget) with its partial text.
- Purge: queued jobs of a queue end `canceled` with error `purged` (`POST /v1/queues/{name}/purge`).
- Position: `queue_position` is the number of jobs ahead in the engine's pending set (0: next to
  start); `estimated_start_seconds` is 0 while a live engine of the job's model has a free row for it
  (`engine.max_batch` minus the jobs each holds), else (position + 1) / the recent completion rate of
  generation jobs (the last 256 completions, counted over the last minute; unknown without completions).
"""

from __future__ import annotations

import json
import time
from typing import Any

from qwen_deploy.job_records import as_text, public_job
from qwen_deploy.jobs import JobStore
from qwen_deploy.lua import script
from qwen_deploy.states import PURGED

MAX_DEADLINE_SECONDS = 86400.0  # a deadline further ahead is refused (400/422)
PURGE_PAGE = 500


def done_times_key(store: JobStore) -> str:
    """The times of the last 256 generation job completions (newest first), written by close_job."""
    return store.done_times_key()


def _keys(store: JobStore) -> list[str]:
    return [store.deadlines_key(), store.stats_key(), store.active_key(), store.pending_key()]


def sweep_deadlines(store: JobStore, job_ids: list[str] | None = None, limit: int = 500) -> list[str]:
    """Close the queued jobs past their deadline (all due ones, or only `job_ids`); flag running ones."""
    closed = store.client.register_script(script("deadline"))(
        keys=_keys(store), args=[store.prefix, repr(time.time()), store.ttl, limit, *(job_ids or [])]
    )
    return [as_text(i) for i in closed]


def current(store: JobStore, record: dict[str, str]) -> dict[str, str]:
    """The record, closed first when it is queued past its deadline (a read never shows a late job queued)."""
    if record.get("status") == "queued" and record.get("deadline") and float(record["deadline"]) <= time.time():
        sweep_deadlines(store, [record["id"]])
        return store.get(record["id"]) or record
    return record


def purge(store: JobStore, queue: str, pending: bool) -> int:
    """End every queued job of `queue` (`pending`: read them from the engine's pending set, else from
    the active set); returns how many were closed."""
    run = store.client.register_script(script("purge"))
    source = store.pending_key() if pending else store.active_key()
    total, offset = 0, 0
    while True:
        ids = [as_text(i) for i in store.client.zrange(source, offset, offset + PURGE_PAGE - 1)]
        if not ids:
            return total
        closed = int(
            run(
                keys=[store.stats_key(), store.active_key(), store.pending_key()],
                args=[store.prefix, queue, repr(time.time()), store.ttl, json.dumps(PURGED), *ids],
            )
        )
        total += closed
        offset += len(ids) - closed  # closed ones left the set; the others stay ahead of the next page


def estimate(position: int, rate: float | None, free: int = 0) -> float | None:
    """Seconds until a job `position` places back starts: 0 when an engine has a free row for it (`free`
    rows across its model's live workers), else at `rate` completions per second (None: unknown)."""
    if position < free:
        return 0.0
    return round((position + 1) / rate, 1) if rate else None


def with_positions(store: JobStore, jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Fill `queue_position` and `estimated_start_seconds` of the queued generation jobs (one script); a job
    no longer pending (an engine claimed it after its record was read) is read again, so a job shown
    queued always has its position."""
    queued = [j for j in jobs if j["status"] == "queued" and j["type"] == "generation"]
    if not queued:
        return jobs
    rate, *standing = store.client.register_script(script("position"))(
        keys=[store.pending_key()],
        args=[
            store.prefix,
            repr(time.time()),
            store.key(""),
            store.max_batch,
            store.default_model,
            *(j["id"] for j in queued),
        ],
    )
    per_second = float(as_text(rate)) if as_text(rate) else None
    for job, rank, free in zip(queued, standing[::2], standing[1::2]):
        if int(rank) >= 0:
            job["queue_position"] = int(rank)
            job["estimated_start_seconds"] = estimate(int(rank), per_second, int(free))
        elif (record := store.get(str(job["id"]))) is not None:  # claimed since its record was read
            job.update(public_job(record))
    return jobs
