"""The per-key quota on the request bytes of batches still running (`batches.max_open_bytes_per_key`): a batch
counts from its creation until it ends (completed, failed, cancelled, expired; a cancel asked still has its
lines in the queue), when the key's next create releases it; an entry also lapses an hour past the batch's
completion window."""

from __future__ import annotations

from qwen_deploy.batches import TERMINAL
from qwen_deploy.errors import QuotaExceeded
from qwen_deploy.job_records import as_text
from qwen_deploy.quotas import Quota
from web.auth import current_owner
from web.context import current_services

LAPSE_GRACE = 3600.0  # seconds past the completion window an entry is kept when nothing released it


def _quota() -> Quota:
    svc = current_services()
    return Quota(svc.redis, svc.settings.key_prefix, current_owner(), "batches")


def reserve(batch_id: str, size: int, expires_at: float) -> None:
    """Count a new batch's `size` bytes, after releasing the caller's batches that ended; 429 `quota_exceeded`
    past the quota."""
    svc, quota = current_services(), _quota()
    entries = quota.entries()
    pipe = svc.redis.pipeline(transaction=False)
    for entry in entries:
        pipe.hget(svc.batches.key(entry), "status")
    ended = [e for e, status in zip(entries, pipe.execute()) if not status or as_text(status) in TERMINAL]
    limit = svc.settings.batches.max_open_bytes_per_key
    counted, used = quota.reserve(batch_id, size, limit, expires_at + LAPSE_GRACE, ended)
    if not counted:
        raise QuotaExceeded(
            f"this key's running batches hold {used} bytes of requests; this one ({size}) would pass the quota of "
            f"{limit} bytes (batches.max_open_bytes_per_key); try again when some have ended",
            param="requests",
            headers={"Retry-After": "30"},
        )


def release(batch_id: str) -> None:
    _quota().release(batch_id)
