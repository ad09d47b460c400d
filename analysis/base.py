"""The analyzer template and its two runners.

An Analyzer turns a record into a request (`prompt()` returns a prompt string or chat messages) and
the generated text back into a result record (`parse()`). The same analyzer runs in-process on a
ModelHandler (batched generation, no queue: scripts and notebooks) or through the queue as batches.
Greedy decoding gives the same records either way.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable, Iterator
from typing import Any

from qwen_deploy.requests import GenerationRequest

Record = dict[str, Any]


class Analyzer:
    """Subclass and override `prompt` and `parse` (and the class settings if needed)."""

    max_new_tokens: int = 16
    stop: list[str] = []
    temperature: float | None = None
    response_format: Record | None = None  # e.g. {"type": "json_schema", "json_schema": {...}}: structured output
    required_fields: tuple[str, ...] = ()  # record fields `prompt` reads (the CLI warns about records without them)

    def prompt(self, record: Record) -> str | list[dict[str, str]]:
        """A prompt string, or chat messages (`[{"role": "user", "content": ...}]`)."""
        raise NotImplementedError

    def parse(self, record: Record, text: str) -> Record:
        """The result record for one generated text; be tolerant of what models write."""
        raise NotImplementedError

    def key(self, record: Record, index: int) -> str:
        """A stable id for resuming: the record's `id` if it has one, else its position."""
        return str(record.get("id", index))

    def request(self, record: Record) -> Record:
        """The job body for one record (as for POST /v1/jobs)."""
        made = self.prompt(record)
        body: Record = {"prompt": made} if isinstance(made, str) else {"messages": made}
        body["max_new_tokens"] = self.max_new_tokens
        if self.stop:
            body["stop"] = list(self.stop)
        if self.temperature:
            body["temperature"] = self.temperature
        if self.response_format:
            body["response_format"] = copy.deepcopy(self.response_format)
        return body

    def result(self, key: str, record: Record, output: Record | None, error: Record | None) -> Record:
        """The line written to the results file."""
        if error is not None or output is None:
            return {"key": key, "record": record, "result": None, "text": None, "error": error}
        text = output["text"]
        return {"key": key, "record": record, "result": self.parse(record, text), "text": text, "error": None}


class LocalRunner:
    """Runs requests in this process on a loaded ModelHandler, through one batching engine."""

    def __init__(self, handler: Any, batch_size: int = 32) -> None:
        self.handler, self.batch_size = handler, batch_size

    def run(self, bodies: list[Record]) -> list[tuple[Record | None, Record | None]]:
        strict = self.handler.settings.generation.strict_requests
        reqs = [GenerationRequest.from_dict(b, strict=strict) for b in bodies]
        out: list[tuple[Record | None, Record | None]] = []
        for outcome in self.handler.generate_batch(reqs, max_batch=self.batch_size):
            if isinstance(outcome, Exception):
                out.append((None, {"code": "generation_error", "message": str(outcome)}))
            else:
                out.append(
                    ({"text": outcome.text, "finish_reason": outcome.finish_reason, "usage": outcome.usage()}, None)
                )
        return out


class QueueRunner:
    """Runs requests through the service as one batch per chunk, reading results as they finish."""

    def __init__(self, client: Any, poll: float = 0.2) -> None:
        self.client, self.poll = client, poll

    def run(self, bodies: list[Record]) -> list[tuple[Record | None, Record | None]]:
        lines = [{"custom_id": str(i), "method": "POST", "url": "/v1/jobs", "body": b} for i, b in enumerate(bodies)]
        batch = self.client.create_batch(lines)
        got: dict[int, tuple[Record | None, Record | None]] = {}
        after = 0
        while len(got) < len(bodies):
            fresh = self.client.batch_results(batch["id"], after)
            after += len(fresh)
            for line in fresh:
                response = line.get("response") or {}
                output = (response.get("body") or {}).get("output")
                got[int(line["custom_id"])] = (output if not line.get("error") else None, line.get("error"))
            if len(got) < len(bodies):
                if self.client.batch(batch["id"])["status"] in ("cancelled", "failed", "expired"):
                    raise RuntimeError(f"batch {batch['id']} ended before all results arrived")
                time.sleep(self.poll)
        return [got[i] for i in range(len(bodies))]


def run_analysis(
    analyzer: Analyzer, records: Iterable[Record], runner: Any, done: set[str], chunk: int = 64
) -> Iterator[Record]:
    """Result lines for the records whose key is not in `done`, chunk by chunk, in input order."""
    pending: list[tuple[str, Record]] = []
    for index, record in enumerate(records):
        key = analyzer.key(record, index)
        if key in done:
            continue
        pending.append((key, record))
        if len(pending) >= chunk:
            yield from _run_chunk(analyzer, pending, runner)
            pending = []
    if pending:
        yield from _run_chunk(analyzer, pending, runner)


def _run_chunk(analyzer: Analyzer, pending: list[tuple[str, Record]], runner: Any) -> Iterator[Record]:
    outcomes = runner.run([analyzer.request(record) for _, record in pending])
    for (key, record), (output, error) in zip(pending, outcomes, strict=True):
        yield analyzer.result(key, record, output, error)
