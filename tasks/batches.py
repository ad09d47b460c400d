"""The micro-batch task: a thin wrapper around worker.batch_executor."""

from __future__ import annotations

import logging

from celery import shared_task
from celery.worker.request import Request

from qwen_deploy.batches import BatchStore
from qwen_deploy.config import get_settings
from qwen_deploy.connections import redis_client
from qwen_deploy.queues import BATCH_CHUNK_TASK

log = logging.getLogger(__name__)


def batch_store() -> BatchStore:
    settings = get_settings()
    return BatchStore(redis_client(settings), settings.key_prefix, settings.limits.result_ttl)


class ChunkRequest(Request):
    """When the hard time limit kills the child, the micro-batch's lines fail with timed_out."""

    def on_timeout(self, soft: bool, timeout: float) -> None:
        super().on_timeout(soft, timeout)
        if soft:
            return
        from worker.batch_executor import failed_lines

        batch_id, start, end = self.args
        try:
            store = batch_store()
            lines = failed_lines(batch_id, store.requests(batch_id, start, end), "timed_out",
                                 f"the micro-batch was stopped at the hard time limit ({timeout:g} s)")
            store.chunk_done(batch_id, start, lines)
        except Exception as exc:
            log.error("could not record hard time limit for %s: %s", self.id, exc)


@shared_task(name=BATCH_CHUNK_TASK, Request="tasks.batches:ChunkRequest")
def batch_chunk(batch_id: str, start: int, end: int) -> str:
    """Generate one micro-batch of a batch."""
    from celery.exceptions import SoftTimeLimitExceeded

    from worker.batch_executor import failed_lines, run_chunk
    from worker.runtime import get_handler

    settings = get_settings()
    store = batch_store()
    try:
        return run_chunk(store, get_handler(), batch_id, start, end, settings.limits.max_deliveries,
                         settings.limits.generation_budget)
    except SoftTimeLimitExceeded:
        store.chunk_done(batch_id, start, failed_lines(batch_id, store.requests(batch_id, start, end),
                                                       "timed_out", "the micro-batch ran past its soft time limit"))
        return "timed_out"
