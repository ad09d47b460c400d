"""A model that cannot load: what its worker records, and the queued jobs it fails.

A generation worker child whose model does not load (a hub id without hub access, a misspelled local
directory) stays up and says so: its registry record has state `load_failed` and an `error`
({code: model_load_failed, message}); /readyz answers 503 with that code and reason, `up` exits, and the
model's queued jobs fail with the same error instead of waiting for a model that never comes.
"""

from __future__ import annotations

import time
from typing import Any

from qwen_deploy.job_records import as_text, strings
from qwen_deploy.jobs import JobStore
from qwen_deploy.lua import script
from qwen_deploy.states import ErrorCode

MODEL_LOAD_FAILED = ErrorCode.MODEL_LOAD_FAILED.value
LOAD_FAILED = "load_failed"  # a worker record's state
MAX_REASON = 500


def load_error(name: str, exc: BaseException, secrets: tuple[str | None, ...] = ()) -> dict[str, str]:
    """The job error (and registry reason) for a model `name` that failed to load with `exc`: one line,
    bounded, with any of `secrets` (a token) masked."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    if len(text) > MAX_REASON:
        text = text[: MAX_REASON - 3] + "..."
    return {"code": MODEL_LOAD_FAILED, "message": f"the model {name!r} could not be loaded: {text}"}


def fail_queued(store: JobStore, job_id: str, error: dict[str, str]) -> bool:
    """Fail one job with `error` if it is still queued (atomically: a job a worker claimed meanwhile runs)."""
    fields = strings({"error": error})
    args: list[Any] = [repr(time.time()), store.ttl, *(part for item in fields.items() for part in item)]
    keys = [store.key(job_id), store.events_key(job_id), store.stats_key(), store.active_key(), store.pending_key()]
    return bool(store.client.register_script(script("fail_queued"))(keys=keys, args=args))


def fail_pending(store: JobStore, model: str | None, error: dict[str, str], limit: int = 1000) -> int:
    """Fail the queued jobs in `model`'s pending set (up to `limit` per call); how many it failed."""
    ids = store.client.zrange(store.pending_key(model), 0, limit - 1)
    return sum(fail_queued(store, as_text(job_id), error) for job_id in ids)
