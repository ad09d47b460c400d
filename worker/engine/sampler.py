"""Per-row token choice for a batch: repetition penalty, EOS masking, grammar masks, then greedy or
temperature / top-k / top-p sampling with each row's own `torch.Generator`, and logprobs.

Each row is processed on its own logits row, so a row's choice never depends on its batch neighbours:
a seeded request samples the same tokens alone or in a batch, and no global RNG is touched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from worker.engine.sequence import Sampling


def penalize(row: torch.Tensor, context: list[int], penalty: float) -> None:
    """transformers' repetition penalty, in place, on one logits row."""
    ids = torch.tensor(sorted(set(context)), device=row.device, dtype=torch.long)
    if ids.numel() == 0:
        return
    ids = ids[ids < row.shape[0]]
    vals = row[ids]
    row[ids] = torch.where(vals < 0, vals * penalty, vals / penalty)


def sample_row(row: torch.Tensor, s: Sampling) -> int:
    """Temperature, then top-k, then top-p, then one draw with the row's generator.

    Extreme but valid settings (a denormal temperature, a tiny repetition penalty) overflow to inf:
    those become the largest float (the top tokens tie), and a row with nothing left to draw from
    takes its argmax, so one row's settings can never fail the step its batch shares."""
    row = (row / s.temperature).nan_to_num(nan=float("-inf"), posinf=torch.finfo(row.dtype).max, neginf=float("-inf"))
    if s.top_k and 0 < s.top_k < row.shape[0]:
        kth = torch.topk(row, s.top_k).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    if s.top_p and s.top_p < 1.0:
        sorted_logits, order = torch.sort(row, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = probs.cumsum(-1) - probs > s.top_p  # keep the smallest set reaching top_p (at least one)
        row = row.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = torch.softmax(row, dim=-1)
    if not bool(torch.isfinite(probs).all()) or float(probs.sum()) <= 0:
        return int(row.argmax())
    return int(torch.multinomial(probs, 1, generator=s.generator).item())


@dataclass
class RowPlan:
    """What a row needs from the chooser this step."""

    sampling: Sampling
    context: list[int]  # prompt + generated ids, for the repetition penalty
    banned: list[int]  # token ids that may not be chosen now (EOS under ignore_eos)
    constraint: Any = None  # structured-output constraint with mask(logits) / accept(id)
    top_logprobs: int = -1  # -1: no logprobs; 0..5: chosen token's logprob and that many alternatives


def choose(logits: torch.Tensor, plans: list[RowPlan]) -> tuple[list[int], list[Any]]:
    """One token per row and, where asked, (logprob, [(id, logprob), ...]) of the model's distribution."""
    logits = logits.float()
    want = [i for i, p in enumerate(plans) if p.top_logprobs >= 0]
    logprobs: list[Any] = [None] * len(plans)
    lp = torch.log_softmax(logits[want], dim=-1) if want else None
    processed = logits.clone() if want else logits
    for i, p in enumerate(plans):
        if p.sampling.repetition_penalty and p.sampling.repetition_penalty != 1.0:
            penalize(processed[i], p.context, p.sampling.repetition_penalty)
        if p.banned:
            processed[i, p.banned] = float("-inf")
    constraints = [p.constraint for p in plans]
    if any(c is not None for c in constraints):  # grammar masks, computed for all rows at once
        from worker.structured import mask_batch

        mask_batch(constraints, processed)
    greedy = processed.argmax(dim=-1).tolist()
    tokens = [greedy[i] if p.sampling.greedy else sample_row(processed[i], p.sampling) for i, p in enumerate(plans)]
    if lp is not None:
        for j, i in enumerate(want):
            k = plans[i].top_logprobs
            alts: list[tuple[int, float]] = []
            if k > 0:
                top = torch.topk(lp[j], k)
                alts = list(zip(top.indices.tolist(), top.values.tolist()))
            logprobs[i] = (float(lp[j, tokens[i]]), alts)
    return tokens, logprobs
