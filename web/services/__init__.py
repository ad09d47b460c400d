"""What the routes call: submitting jobs, reading the caller's jobs and their events, the stores.

Routes import these from here, never from each other, so a route module holds routes only:

- `submit.py`: `enqueue` (record + queue in one round trip), `submit_job`, `submit_request`;
- `records.py`: `load_record`, `load_job`, `load_batch`, `owns`, `missing` (404 or 410), `wait_for`, `iter_job_events`;
- `files.py`: the uploaded-file store; `stores.py`: the batch and webhook stores; `workers.py`: live workers.

The app's settings, Redis client and job store come from `web.context.current_services()`.
"""

from __future__ import annotations

from web.services.files import FILE_PREFIX, FileStore, file_object, file_store
from web.services.records import (
    SSE_KEEPALIVE_S,
    iter_job_events,
    load_batch,
    load_job,
    load_record,
    missing,
    owns,
    wait_for,
)
from web.services.stores import batch_store, webhook_store
from web.services.submit import enqueue, fair_cost, request_hash, submit_job, submit_request
from web.services.workers import model_workers, workers

__all__ = [
    "FILE_PREFIX",
    "SSE_KEEPALIVE_S",
    "FileStore",
    "batch_store",
    "enqueue",
    "fair_cost",
    "file_object",
    "file_store",
    "iter_job_events",
    "load_batch",
    "load_job",
    "load_record",
    "missing",
    "model_workers",
    "owns",
    "request_hash",
    "submit_job",
    "submit_request",
    "wait_for",
    "webhook_store",
    "workers",
]
