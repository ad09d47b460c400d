"""Run one micro-batch of a batch: batched generation, then its output lines, counted once."""

from __future__ import annotations

import logging
import time
from typing import Any

from qwen_deploy.batches import BatchStore
from qwen_deploy.logs import event
from worker.batching import generate_batch
from worker.handler import GenerationRequest, GenerationResult, ModelHandler

log = logging.getLogger(__name__)

# finish_reason → (error code, message) for lines that did not complete.
INCOMPLETE = {
    "time_limit": ("timed_out", "the micro-batch reached its generation time budget"),
    "canceled": ("batch_cancelled", "the batch was cancelled"),
}


def line_id(batch_id: str, line: int) -> str:
    return f"{batch_id}-{line}"


def result_line(batch_id: str, item: dict[str, Any], outcome: GenerationResult | Exception) -> dict[str, Any]:
    """One output line in the OpenAI Batch shape."""
    base = {"id": line_id(batch_id, item["line"]), "custom_id": item["custom_id"]}
    if isinstance(outcome, Exception):
        error = {"code": "generation_error", "message": f"{type(outcome).__name__}: {outcome}", "line": item["line"]}
        return {**base, "response": None, "error": error}
    body = {"object": "generation", "output": {"text": outcome.text, "finish_reason": outcome.finish_reason,
                                               "usage": outcome.usage()}}
    error = None
    if outcome.finish_reason in INCOMPLETE:
        code, message = INCOMPLETE[outcome.finish_reason]
        error = {"code": code, "message": message, "line": item["line"]}
    return {**base, "response": {"status_code": 200, "body": body}, "error": error}


def failed_lines(batch_id: str, items: list[dict[str, Any]], code: str, message: str) -> list[dict[str, Any]]:
    return [{"id": line_id(batch_id, i["line"]), "custom_id": i["custom_id"], "response": None,
             "error": {"code": code, "message": message, "line": i["line"]}} for i in items]


def run_chunk(batches: BatchStore, handler: ModelHandler, batch_id: str, start: int, end: int,
              max_deliveries: int, budget: float) -> str:
    """Generate lines [start, end) of a batch and record them; returns what happened."""
    items = batches.requests(batch_id, start, end)
    if batches.chunk_tries(batch_id, start) > max_deliveries:
        batches.chunk_done(batch_id, start, failed_lines(
            batch_id, items, "worker_lost", f"the worker running this micro-batch died {max_deliveries} time(s)"))
        return "exhausted"
    if batches.status(batch_id) in ("cancelling", "cancelled"):
        batches.chunk_done(batch_id, start, failed_lines(batch_id, items, *INCOMPLETE["canceled"]))
        return "cancelled"
    started = time.perf_counter()
    reqs = [GenerationRequest.from_dict(i["body"]) for i in items]
    outcomes = generate_batch(handler, reqs, budget, lambda: batches.status(batch_id) == "cancelling")
    batches.chunk_done(batch_id, start, [result_line(batch_id, i, o) for i, o in zip(items, outcomes)])
    done = [o for o in outcomes if not isinstance(o, Exception)]
    event(log, "batch.micro_batch", batch=batch_id, queue="bulk", lines=f"{start}-{end}", requests=len(items),
          prompt_tokens=sum(o.prompt_tokens for o in done), completion_tokens=sum(o.completion_tokens for o in done),
          run_ms=round((time.perf_counter() - started) * 1000, 1))
    return "done"
