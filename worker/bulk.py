"""Micro-batches in the engine: a batch's lines become bulk sequences; their output lines are recorded
with CHUNK_DONE (counted once) when the last of them finishes."""

from __future__ import annotations

import logging
import time
from typing import Any

from qwen_deploy.batches import BatchStore
from qwen_deploy.logs import event
from qwen_deploy.queues import Lane
from qwen_deploy.requests import GenerationRequest
from qwen_deploy.states import LINE_EXPIRED, LINE_FINISH_ERRORS, ErrorCode, error
from worker.engine import Seq
from worker.handler import GenerationResult

log = logging.getLogger(__name__)


def line_id(batch_id: str, line: int) -> str:
    return f"{batch_id}-{line}"


def failed_lines(batch_id: str, items: list[dict[str, Any]], error: dict[str, str]) -> list[dict[str, Any]]:
    return [
        {
            "id": line_id(batch_id, i["line"]),
            "custom_id": i["custom_id"],
            "response": None,
            "error": {**error, "line": i["line"]},
        }
        for i in items
    ]


def result_line(
    batch_id: str, item: dict[str, Any], outcome: GenerationResult, expired: bool = False
) -> dict[str, Any]:
    """One output line in the OpenAI Batch shape (`expired`: a time limit that was the batch's window)."""
    base = {"id": line_id(batch_id, item["line"]), "custom_id": item["custom_id"]}
    output: dict[str, Any] = {"text": outcome.text, "finish_reason": outcome.finish_reason, "usage": outcome.usage()}
    if outcome.choices:
        output["choices"] = outcome.choices
    if outcome.stop_sequence is not None:  # as a job's output names it
        output["stop_sequence"] = outcome.stop_sequence
    error = None
    if outcome.finish_reason in LINE_FINISH_ERRORS:
        late = expired and outcome.finish_reason == "time_limit"
        error = {**(LINE_EXPIRED if late else LINE_FINISH_ERRORS[outcome.finish_reason]), "line": item["line"]}
        if outcome.finish_reason == "error":
            return {**base, "response": None, "error": error}
    return {
        **base,
        "response": {"status_code": 200, "body": {"object": "generation", "output": output}},
        "error": error,
    }


class ChunkUnit:
    """Lines [start, end) of a batch, running as bulk sequences of one driver's engine."""

    def __init__(
        self,
        driver: Any,
        batches: BatchStore,
        batch_id: str,
        start: int,
        items: list[dict[str, Any]],
        budget: float,
        expires_at: float | None = None,
    ) -> None:
        self.driver, self.batches, self.batch_id, self.start = driver, batches, batch_id, start
        self.expires_at = expires_at
        self.key = f"{batch_id}:{start}"
        self.items = items
        self.lines: dict[int, Any] = {}
        self.done_lines: list[dict[str, Any] | None] = [None] * len(items)
        self.pending = len(items)
        self.started = time.perf_counter()
        handler = driver.handler
        driver.units[self.key] = self
        strict = driver.settings.generation.strict_requests
        reqs = [_line_request(item, strict) for item in items]
        driver.knows_adapters([r for r in reqs if isinstance(r, GenerationRequest)])
        for index, item in enumerate(items):
            try:
                req = reqs[index]
                if isinstance(req, Exception):
                    raise req
                seqs, prompt_tokens, truncated = handler.sequences(
                    req, f"{self.key}:{index}", budget=budget, priority=Lane.BULK, tag=self.key
                )
            except Exception as exc:  # a line this model cannot run fails alone
                code = getattr(exc, "code", None) or ErrorCode.INVALID_REQUEST
                self._record(index, failed_lines(batch_id, [item], error(code, str(exc)))[0])
                continue
            for seq in seqs:
                seq.tag = (self.key, index)
            self.lines[index] = (req, seqs, prompt_tokens, truncated)
        for _, seqs, _, _ in self.lines.values():
            for seq in seqs:
                driver.engine.add(seq)

    def seq_done(self, seq: Seq) -> None:
        index = seq.tag[1]
        req, seqs, prompt_tokens, truncated = self.lines[index]
        if all(s.done for s in seqs):
            result = self.driver.handler.result(seqs, prompt_tokens, truncated, req)
            expired = self.expires_at is not None and time.time() >= self.expires_at - 0.25
            self._record(index, result_line(self.batch_id, self.items[index], result, expired))

    def poll(self) -> None:
        """Stop every line of this micro-batch when its batch is being cancelled (and retry a failed record)."""
        if self.pending == 0:
            self._complete()
            return
        if self.batches.status(self.batch_id) == "cancelling":
            for _, seqs, _, _ in self.lines.values():
                for seq in seqs:
                    seq.canceled = True

    def _record(self, index: int, line: dict[str, Any]) -> None:
        if self.done_lines[index] is None:
            self.done_lines[index] = line
            self.pending -= 1
        if self.pending == 0:
            self._complete()

    def _complete(self) -> None:
        lines = [line for line in self.done_lines if line is not None]
        self.batches.chunk_done(self.batch_id, self.start, lines)
        self.driver.units.pop(self.key, None)
        event(
            log,
            "batch.micro_batch",
            batch=self.batch_id,
            queue="bulk",
            requests=len(self.items),
            lines=f"{self.start}-{self.start + len(self.items)}",
            run_ms=round((time.perf_counter() - self.started) * 1000, 1),
        )


def run_chunk(driver: Any, batches: BatchStore, batch_id: str, start: int, end: int, slice_end: float) -> str:
    """Generate lines [start, end) of a batch in the engine and record them; returns what happened."""
    max_deliveries = driver.settings.limits.max_deliveries
    items = batches.requests(batch_id, start, end)
    if batches.chunk_recorded(batch_id, start):
        return "skipped"
    if batches.chunk_tries(batch_id, start) > max_deliveries:
        batches.chunk_done(
            batch_id,
            start,
            failed_lines(
                batch_id,
                items,
                error(ErrorCode.WORKER_LOST, f"the worker running this micro-batch died {max_deliveries} time(s)"),
            ),
        )
        return "exhausted"
    record = batches.get(batch_id) or {}
    if record.get("status") in ("cancelling", "cancelled"):
        batches.chunk_done(batch_id, start, failed_lines(batch_id, items, LINE_FINISH_ERRORS["canceled"]))
        return "cancelled"
    expires_at = float(record["expires_at"]) if record.get("expires_at") else None
    if expires_at is not None and time.time() >= expires_at:  # its window ended while it waited
        batches.chunk_done(batch_id, start, failed_lines(batch_id, items, LINE_EXPIRED))
        return "expired"
    driver.reloader.through(
        slice_end
    )  # a worker in its reload turn drains and loads first: lines are never handed back
    budget = min(driver.settings.limits.generation_budget, max(1.0, slice_end - time.monotonic() - 1.0))
    if expires_at is not None:
        budget = min(budget, expires_at - time.time())
    unit = ChunkUnit(driver, batches, batch_id, start, items, budget, expires_at)
    driver.drive(lambda: unit.key not in driver.units, slice_end)
    return "done" if unit.key not in driver.units else "running"


def _line_request(item: dict[str, Any], strict: bool) -> GenerationRequest | Exception:
    """A micro-batch line's stored request, or why it cannot be read (the line then fails alone)."""
    try:
        return GenerationRequest.from_dict(item["body"], strict=strict)
    except Exception as exc:
        return exc
