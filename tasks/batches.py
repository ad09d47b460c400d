"""The micro-batch task: a thin wrapper that puts a micro-batch's lines into the child's engine."""

from __future__ import annotations

import logging

from celery import shared_task
from celery.exceptions import SoftTimeLimitExceeded
from celery.worker.request import Request

from qwen_deploy.batches import BatchStore
from qwen_deploy.config import get_settings
from qwen_deploy.connections import redis_client
from qwen_deploy.queues import BATCH_CHUNK_TASK
from qwen_deploy.states import ErrorCode, error
from tasks.generation import _driver, _load_failure, _soft_limit, slice_end

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
        from worker.bulk import failed_lines

        batch_id, start, end = self.args
        try:
            store = batch_store()
            lines = failed_lines(
                batch_id,
                store.requests(batch_id, start, end),
                error(ErrorCode.TIMED_OUT, f"the micro-batch was stopped at the hard time limit ({timeout:g} s)"),
            )
            store.chunk_done(batch_id, start, lines)
        except Exception as exc:
            log.error("could not record hard time limit for %s: %s", self.id, exc)


@shared_task(name=BATCH_CHUNK_TASK, bind=True, Request="tasks.batches:ChunkRequest")
def batch_chunk(self: object, batch_id: str, start: int, end: int) -> str:
    """Generate one micro-batch of a batch (interactive jobs keep running beside it)."""
    from worker.bulk import failed_lines, run_chunk

    store = batch_store()
    failure = _load_failure()
    if failure is not None:  # the model did not load: the micro-batch's lines fail now
        store.chunk_done(batch_id, start, failed_lines(batch_id, store.requests(batch_id, start, end), failure))
        return failure["code"]
    try:
        return run_chunk(_driver(self), store, batch_id, start, end, slice_end(_soft_limit(self)))
    except SoftTimeLimitExceeded:
        store.chunk_done(
            batch_id,
            start,
            failed_lines(
                batch_id,
                store.requests(batch_id, start, end),
                error(ErrorCode.TIMED_OUT, "the micro-batch ran past its soft time limit"),
            ),
        )
        return "timed_out"
