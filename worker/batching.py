"""Batched generation: many requests in padded, left-aligned `generate` calls on the loaded model.

Requests are grouped by their sampling settings (greedy requests share one call; a seeded sampled
request runs alone so it matches the single job exactly). Inside a call each row stops on its own:
EOS, its own `max_new_tokens`, its own stop strings; the time budget and a cancel stop every row.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from worker.handler import GenerationRequest, GenerationResult, ModelHandler, _cut_at_stop

Outcome = GenerationResult | Exception


class RowMonitor(StoppingCriteria):
    """Per-row stopping for a batch; records when and why each row finished."""

    def __init__(self, handler: ModelHandler, prompt_len: int, reqs: list[GenerationRequest], budget: float,
                 should_cancel: Callable[[], bool] | None, interval: float) -> None:
        self.handler, self.prompt_len, self.reqs = handler, prompt_len, reqs
        self.deadline = time.monotonic() + budget
        self.should_cancel, self.interval = should_cancel, interval
        self.next_check = time.monotonic() + interval
        self.done_at: list[int | None] = [None] * len(reqs)
        self.reasons: list[str | None] = [None] * len(reqs)

    def _finish(self, row: int, n: int, reason: str) -> None:
        self.done_at[row], self.reasons[row] = n, reason

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        n = input_ids.shape[1] - self.prompt_len
        now = time.monotonic()
        stop_all = None
        if now >= self.deadline:
            stop_all = "time_limit"
        elif self.should_cancel is not None and now >= self.next_check:
            self.next_check = now + self.interval
            stop_all = "canceled" if self.should_cancel() else None
        for row, req in enumerate(self.reqs):
            if self.done_at[row] is not None:
                continue
            last = int(input_ids[row, -1])
            if last in self.handler.eos_ids and not req.ignore_eos:
                self._finish(row, n, "eos")
            elif n >= req.max_new_tokens:
                self._finish(row, n, "length")
            elif req.stop and any(s in self.handler.decode(input_ids[row, self.prompt_len:].tolist())
                                  for s in req.stop):
                self._finish(row, n, "stop")
            elif stop_all:
                self._finish(row, n, stop_all)
        done = [d is not None for d in self.done_at]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def sampling_group(index: int, req: GenerationRequest) -> str:
    """Requests with the same key can share one generate call."""
    key: dict[str, Any] = {"temperature": req.temperature or 0, "repetition_penalty": req.repetition_penalty}
    if req.temperature:
        key.update(top_p=req.top_p, top_k=req.top_k, seed=req.seed, row=index if req.seed is not None else None)
    if req.ignore_eos:  # min_new_tokens is batch-wide
        key["ignore_eos"] = req.max_new_tokens
    return json.dumps(key, sort_keys=True)


def generate_batch(handler: ModelHandler, reqs: list[GenerationRequest], budget: float | None = None,
                   should_cancel: Callable[[], bool] | None = None, max_batch: int | None = None) -> list[Outcome]:
    """One outcome per request, in order: a GenerationResult or the exception that request raised."""
    outcomes: list[Outcome | None] = [None] * len(reqs)
    deadline = time.monotonic() + (budget or handler.settings.limits.generation_budget)
    groups: dict[str, list[int]] = {}
    encoded: dict[int, tuple[list[int], bool]] = {}
    for i, req in enumerate(reqs):
        try:
            encoded[i] = handler.encode(req)
        except Exception as exc:  # a bad request fails alone
            outcomes[i] = exc
            continue
        groups.setdefault(sampling_group(i, req), []).append(i)
    for rows in groups.values():
        for start in range(0, len(rows), max_batch or len(rows)):
            chunk = rows[start:start + (max_batch or len(rows))]
            remaining = max(0.0, deadline - time.monotonic())
            results = _run(handler, [reqs[i] for i in chunk], [encoded[i] for i in chunk], remaining, should_cancel)
            for i, result in zip(chunk, results):
                outcomes[i] = result
    return [o if o is not None else RuntimeError("not run") for o in outcomes]


def _run(handler: ModelHandler, reqs: list[GenerationRequest], encoded: list[tuple[list[int], bool]],
         budget: float, should_cancel: Callable[[], bool] | None) -> list[GenerationResult]:
    width = max(max(len(ids), 1) for ids, _ in encoded)
    rows, masks = [], []
    for ids, _ in encoded:
        ids = ids or [handler.eos_ids[0]]
        rows.append([handler.pad_id] * (width - len(ids)) + ids)
        masks.append([0] * (width - len(ids)) + [1] * len(ids))
    device = handler.model.device
    input_ids = torch.tensor(rows, device=device)
    monitor = RowMonitor(handler, width, reqs, budget, should_cancel,
                         handler.settings.generation.progress_interval_ms / 1000)
    kwargs = handler.sampling_kwargs(reqs[0])
    kwargs["max_new_tokens"] = max(r.max_new_tokens for r in reqs)
    if reqs[0].seed is not None:
        torch.manual_seed(reqs[0].seed)
    with torch.inference_mode():
        out = handler.model.generate(input_ids, attention_mask=torch.tensor(masks, device=device),
                                     stopping_criteria=StoppingCriteriaList([monitor]), **kwargs)
    results = []
    for row, (req, (ids, truncated)) in enumerate(zip(reqs, encoded)):
        new = out[row, width:].tolist()
        n = monitor.done_at[row] if monitor.done_at[row] is not None else len(new)
        new = new[:n]
        text = handler.decode(new)
        reason = monitor.reasons[row] or ("eos" if new and new[-1] in handler.eos_ids else "length")
        if reason == "stop":
            text = _cut_at_stop(text, req.stop)
        results.append(GenerationResult(text, reason, len(ids), len(new), truncated))
    return results
