"""Run one generation job: claim its record, generate with progress, write the terminal state."""

from __future__ import annotations

import json
import logging
import time

from celery.exceptions import SoftTimeLimitExceeded

from qwen_deploy.jobs import JobStore
from qwen_deploy.logs import event
from worker.handler import GenerationRequest, JobMonitor, ModelHandler

log = logging.getLogger(__name__)

STATUS_BY_REASON = {"time_limit": "timed_out", "canceled": "canceled"}


class StoreSink:
    """Publishes partial text to the job record and reports the cancel flag."""

    def __init__(self, store: JobStore, job_id: str) -> None:
        self.store, self.job_id = store, job_id
        self.sent = ""

    def __call__(self, tokens: int, text: str) -> bool:
        delta = text[len(self.sent):] if text.startswith(self.sent) else text
        canceled = self.store.progress(self.job_id, tokens, text, delta)
        self.sent = text
        return canceled


def execute(store: JobStore, handler: ModelHandler, job_id: str, worker: str, max_deliveries: int,
            budget: float, running_for: float = 3600.0) -> str:
    """Run the job and return its final status (or why it was not run)."""
    claim, value = store.start(job_id, worker, max_deliveries, running_for)
    if claim != "run":
        event(log, "job.skipped", logging.WARNING, id=job_id, reason=claim, detail=value or None)
        return claim
    started = time.perf_counter()
    event(log, "job.started", id=job_id, queue="interactive", worker=worker)
    sink = StoreSink(store, job_id)
    monitors: list[JobMonitor] = []
    try:
        request = GenerationRequest.from_dict(json.loads(value))
        log.debug("job %s request: %r", job_id, request)
        result = handler.generate(request, sink, budget, monitor_out=monitors)
    except SoftTimeLimitExceeded:
        text = monitors[0].stream_text if monitors else sink.sent
        store.finish(job_id, "timed_out", {
            "text": text, "finish_reason": "time_limit",
            "error": {"code": "soft_time_limit", "message": "the job ran past its soft time limit"}},
            text[len(sink.sent):], monitors[0].tokens if monitors else 0)
        log.warning("job %s hit the soft time limit", job_id)
        return "timed_out"
    except Exception as exc:  # the job fails; the worker and its model stay up
        log.exception("job %s failed", job_id)
        store.finish(job_id, "failed", {"error": {"code": "generation_error",
                                                  "message": f"{type(exc).__name__}: {exc}"}})
        return "failed"
    status = STATUS_BY_REASON.get(result.finish_reason, "succeeded")
    fields = {"text": result.text, "finish_reason": result.finish_reason, "tokens": str(result.completion_tokens),
              "usage": result.usage()}
    if status == "timed_out":
        fields["error"] = {"code": "time_limit", "message": "generation stopped at its time budget"}
    delta = result.text[len(sink.sent):] if result.text.startswith(sink.sent) else ""
    store.finish(job_id, status, fields, delta, result.completion_tokens)
    event(log, "job.finished", id=job_id, queue="interactive", status=status,
          prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens,
          prompt_truncated=result.prompt_truncated, finish_reason=result.finish_reason,
          run_ms=round((time.perf_counter() - started) * 1000, 1))
    return status
