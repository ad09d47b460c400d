"""Reading the caller's jobs: ownership, 404 against 410, long-poll waits and the event stream."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from qwen_deploy.batches import BATCH_ID_PREFIX
from qwen_deploy.errors import Gone, NotFound
from qwen_deploy.job_records import JOB_ID_PREFIX, id_time, public_job, valid_id
from qwen_deploy.jobs import TERMINAL
from qwen_deploy.lifecycle import current, with_positions
from web.auth import current_owner
from web.context import current_services

SSE_KEEPALIVE_S = 15.0


def load_record(job_id: str) -> dict[str, str]:
    """The caller's job record: 404 for a malformed id or another owner's job, 410 once expired."""
    if not valid_id(job_id):
        raise NotFound("no job with this id", param="id")
    record = current_services().store.get(job_id)
    if record is None:
        raise missing("job", job_id)
    if not owns(record):
        raise NotFound(f"no job with id {job_id}", param="id")
    return record


def load_batch(batch_id: str) -> dict[str, str]:
    """The caller's batch record: 404 for a malformed id or another owner's batch, 410 once expired."""
    if not valid_id(batch_id, BATCH_ID_PREFIX):
        raise NotFound("no batch with this id", param="id")
    record = current_services().batches.get(batch_id)
    if record is None or "id" not in record:
        raise missing("batch", batch_id, BATCH_ID_PREFIX)
    if not owns(record):
        raise NotFound(f"no batch with id {batch_id}", param="id")
    return record


def owns(record: dict[str, str]) -> bool:
    """Whether the caller owns a job or batch record (records without an owner are "anonymous")."""
    return record.get("owner", "anonymous") == current_owner()


def load_job(job_id: str) -> dict[str, Any]:
    """The caller's job object; a queued one past its deadline is closed first, one still queued gets
    its queue position."""
    store = current_services().store
    return with_positions(store, [public_job(current(store, load_record(job_id)))])[0]


def missing(kind: str, any_id: str, prefix: str = JOB_ID_PREFIX) -> Exception:
    """410 for a well-formed id older than the result TTL, else 404."""
    if not valid_id(any_id, prefix):
        return NotFound(f"no {kind} with this id", param="id")
    created = id_time(any_id, prefix)
    if created is not None and created + current_services().settings.limits.result_ttl <= time.time():
        return Gone(f"{kind} {any_id} has expired", param="id")
    return NotFound(f"no {kind} with id {any_id}", param="id")


def wait_for(job_id: str, seconds: float) -> dict[str, Any]:
    """The job once terminal, or as it stands when `seconds` have passed."""
    store = current_services().store
    job = load_job(job_id)
    deadline = time.monotonic() + seconds
    last = "0-0"
    while job["status"] not in TERMINAL:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        events = store.read_events(job_id, last, int(min(remaining, 10.0) * 1000))
        if events:
            last = events[-1][0]
        if not events or any(ev.get("type") == "done" for _, ev in events):
            job = load_job(job_id)
    return job


def iter_job_events(job_id: str, last: str = "0-0", idle_s: float = SSE_KEEPALIVE_S) -> Iterator[tuple[str, Any]]:
    """(kind, data) from a job's event stream: token/status events, "idle" after idle_s, and a final "done" job."""
    store = current_services().store
    while True:
        events = store.read_events(job_id, last, int(idle_s * 1000))
        if not events:
            record = store.get(job_id)
            if record is None:
                return
            if record.get("status") in TERMINAL:  # events expired or never written
                yield "done", public_job(record)
                return
            yield "idle", None
            continue
        for event_id, ev in events:
            last = event_id
            if ev.get("type") == "done":
                yield "done", load_job(job_id)
                return
            yield ev.get("type", ""), ev
