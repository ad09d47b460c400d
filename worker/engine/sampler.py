"""Token choice for a whole batch in a few tensor ops: repetition, presence and frequency penalties, logit
bias, banned ids (EOS under ignore_eos or before min_tokens), grammar masks, then greedy or temperature / min-p /
top-k / top-p sampling (`worker.engine.draw`), and logprobs; one device-to-host transfer (top-p may add one per
rejection round).

Each pass over the [rows, vocab] logits costs about as much as the rest of a step's bookkeeping, so passes are
shared: the 64-column block maxima of the raw logits give the logprobs' top tokens, the argmax and top-k
candidates, and, patched where a penalty, bias or ban changed a cell, each row's maximum for the weights. The
logprobs are those of the model's distribution (before any change): the normalizer of each asking row from one
log-softmax, the values from the raw logits at the chosen and top ids.

On a CPU the same choice runs as one C call where it can (`worker.engine.cpu_sampler`); this tensor path runs on
other devices, with grammar masks, and is the reference its tests compare it with.
"""

from __future__ import annotations

import itertools
import threading
from array import array
from dataclasses import dataclass
from typing import Any

import torch

from worker.engine import cpu_sampler
from worker.engine.draw import BLOCK, argmax, sample, tile_max, topk
from worker.engine.sequence import Sampling

_SCRATCH = threading.local()
LOGPROB_ROWS = 4  # rows per log-softmax on CPU: 4 x 49k floats stay in cache between its write and the gather


@dataclass
class RowPlan:
    """What a row needs from the chooser this step."""

    sampling: Sampling
    context: list[int]  # ids the repetition penalty applies to (repeats are harmless; empty when there is none)
    banned: list[int]  # token ids that may not be chosen now (EOS under ignore_eos or before min_tokens)
    constraint: Any = None  # structured-output constraint with mask(logits) / accept(id)
    top_logprobs: int = -1  # -1: no logprobs; 0..k: chosen token's logprob and that many alternatives
    counts: dict[int, int] | None = None  # generated ids and how often, for presence / frequency penalties


@dataclass
class Normalizer:
    """What the logprobs need of the raw logits, taken before any change: the rows that asked, each one's
    log-normalizer (logsumexp) and its top ids, best first."""

    rows: list[int]
    lse: torch.Tensor  # [W]
    ids: torch.Tensor  # [W, k]


def choose(
    logits: torch.Tensor, plans: list[RowPlan], native: bool = True
) -> tuple[torch.Tensor, list[int], list[Any]]:
    """One token per row (as a device tensor and as ints) and, where asked, (logprob, [(id, logprob), ...]) of
    the model's distribution. On a CPU, one C call (`worker.engine.cpu_sampler`) where it runs and `native`;
    else the tensor path below.

    On CPU with denormals flushed to zero (restored after; nothing else here sets it): `exp2` and `log_softmax`
    over a row whose values fall below float32's normal range (a low temperature, a wide-spread model) are
    10-20x slower otherwise, and a weight below 2^-126 of the top token's counts for nothing in a draw."""
    flush = logits.device.type == "cpu" and torch.set_flush_denormal(True)
    try:
        if native and cpu_sampler.usable(logits, plans):
            return cpu_sampler.choose(logits, plans)
        return _choose(logits, plans)
    finally:
        if flush:
            torch.set_flush_denormal(False)


def _choose(logits: torch.Tensor, plans: list[RowPlan]) -> tuple[torch.Tensor, list[int], list[Any]]:
    x = _scratch("logits", logits).copy_(logits)  # this step's own float copy
    vocab = x.shape[1]
    want = [i for i, p in enumerate(plans) if p.top_logprobs >= 0]
    blocks = want or any(p.sampling.greedy or 0 < (p.sampling.top_k or 0) < vocab for p in plans)
    tiles = tile_max(x) if blocks else None
    norm = _normalizer(x, want, plans, tiles) if want else None
    touched: list[torch.Tensor] = []  # flat indices of the cells changed below
    _penalize(x, plans, touched)
    _add_bias(x, plans, touched)
    _ban(x, plans, touched)
    constraints = [p.constraint for p in plans]
    if any(c is not None for c in constraints):  # grammar masks, computed for all rows at once
        from worker.structured import mask_batch

        mask_batch(constraints, x)
        tiles = tile_max(x) if tiles is not None else None
    elif tiles is not None and touched:
        _patch(x, tiles, touched)
    sampled = [i for i, p in enumerate(plans) if not p.sampling.greedy]
    top = None if tiles is None or not sampled else tiles.amax(-1, keepdim=True)  # each row's maximum, after all
    if not sampled:
        tokens = argmax(x, tiles)
    elif len(sampled) == len(plans):  # the common case: no row copy
        tokens = sample(x, [p.sampling for p in plans], top, tiles)
    else:
        greedy = [i for i, p in enumerate(plans) if p.sampling.greedy]
        tokens = torch.empty(len(plans), dtype=torch.long, device=x.device)
        at = torch.tensor(greedy, device=x.device)
        tokens[at] = argmax(x[at], _rows(tiles, at))
        at = torch.tensor(sampled, device=x.device)
        tokens[at] = sample(x[at], [plans[i].sampling for i in sampled], _rows(top, at), _rows(tiles, at))
    return _to_host(tokens, logits, norm, plans)


def _rows(t: torch.Tensor | None, at: torch.Tensor | None) -> torch.Tensor | None:
    return t if t is None or at is None else t[at]


def _scratch(name: str, like: torch.Tensor, rows: int | None = None) -> torch.Tensor:
    """A float32 [rows, vocab] buffer of this thread's, kept across steps: a fresh multi-megabyte tensor per step
    costs more in page faults than the sampling itself (glibc hands freed large blocks back to the OS)."""
    bufs: dict[tuple[str, torch.device], torch.Tensor] = _SCRATCH.__dict__.setdefault("bufs", {})
    shape = (like.shape[0] if rows is None else rows, like.shape[1])
    buf = bufs.get((name, like.device))
    # a buffer made under inference mode cannot be written outside it (and the other way round)
    if buf is None or buf.numel() < shape[0] * shape[1] or buf.is_inference() != torch.is_inference_mode_enabled():
        buf = bufs[(name, like.device)] = torch.empty(shape[0] * shape[1], device=like.device)
    return buf[: shape[0] * shape[1]].view(shape)


def _normalizer(x: torch.Tensor, want: list[int], plans: list[RowPlan], tiles: torch.Tensor | None) -> Normalizer:
    """The asking rows' logsumexp and top ids, from the raw logits: a log-softmax (its own fused max, exp and sum
    pass) of a few rows at a time into a small buffer that stays in cache (on CPU; a whole [rows, vocab] output
    measured ~20% slower at 32 rows); the normalizer is any column's logit minus its log-probability."""
    k = max(1, max(plans[i].top_logprobs for i in want))
    at = None if len(want) == x.shape[0] else torch.tensor(want, device=x.device)
    raw = x if at is None else x[at]
    _, ids = topk(raw, k, _rows(tiles, at))
    first = ids[:, :1]
    step = LOGPROB_ROWS if x.device.type == "cpu" else len(want)
    buf, lse = _scratch("logprobs", x, min(step, len(want))), torch.empty(len(want), 1, device=x.device)
    for lo in range(0, len(want), step):
        part, top = raw[lo : lo + step], first[lo : lo + step]
        lp = torch.log_softmax(part, -1, out=buf[: len(part)])
        torch.sub(part.gather(1, top), lp.gather(1, top), out=lse[lo : lo + step])
    return Normalizer(want, lse[:, 0], ids)


def _penalize(x: torch.Tensor, plans: list[RowPlan], touched: list[torch.Tensor] | None = None) -> None:
    """transformers' repetition penalty on every id of each row's context, then OpenAI's presence and frequency
    penalties on the generated ids (`logit - count x frequency - presence`), in place, one gather/scatter each."""
    rep = [(i, p) for i, p in enumerate(plans) if p.context and p.sampling.repetition_penalty not in (0, 1.0)]
    if rep:
        cells, kept = _cells(x, [i for i, _ in rep], [p.context for _, p in rep])
        by = [p.sampling.repetition_penalty for _, p in rep]
        penalty: torch.Tensor | float = by[0]
        if any(b != by[0] for b in by):  # each cell its row's penalty
            lens = torch.tensor([len(p.context) for _, p in rep])
            penalty = torch.tensor(by).repeat_interleave(lens, output_size=int(lens.sum()))
            penalty = (penalty if kept is None else penalty[kept]).to(x.device)
        vals = x.take(cells)
        x.put_(cells, torch.where(vals < 0, vals * penalty, vals / penalty))
        if touched is not None:
            touched.append(cells)
    pf = [
        (i, p)
        for i, p in enumerate(plans)
        if p.counts and (p.sampling.presence_penalty or p.sampling.frequency_penalty)
    ]
    if pf:
        cells, kept = _cells(x, [i for i, _ in pf], [list(p.counts) for _, p in pf])  # type: ignore[arg-type]
        minus = torch.tensor(
            [
                p.sampling.presence_penalty + n * p.sampling.frequency_penalty
                for _, p in pf
                for n in p.counts.values()  # type: ignore[union-attr]
            ]
        )
        x.put_(cells, -(minus if kept is None else minus[kept]).to(x.device), accumulate=True)
        if touched is not None:
            touched.append(cells)


def _add_bias(x: torch.Tensor, plans: list[RowPlan], touched: list[torch.Tensor] | None = None) -> None:
    """Each row's logit_bias (token id -> value added to its logit)."""
    rows = [(i, p.sampling.bias_tensors(x.device)) for i, p in enumerate(plans) if p.sampling.logit_bias]
    if rows:
        vocab = x.shape[1]
        cells = torch.cat([ids + i * vocab for i, (ids, _) in rows])
        x.put_(cells, torch.cat([v for _, (_, v) in rows]), accumulate=True)
        if touched is not None:
            touched.append(cells)


def _cells(x: torch.Tensor, rows: list[int], ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Flat indices into x of each row's ids, built on the host (an `array` reads a list of ints ~2x faster than
    `torch.tensor`) and moved once; ids past the vocabulary (a tokenizer's added tokens) are left out, and then
    the mask of those kept comes too."""
    vocab = x.shape[1]
    flat = array("q", itertools.chain.from_iterable(ids))
    lens = torch.tensor([len(c) for c in ids])
    start = torch.tensor([i * vocab for i in rows]).repeat_interleave(lens, output_size=len(flat))
    cols = torch.frombuffer(flat, dtype=torch.int64)
    cells, kept = start.add_(cols), None
    if max(flat) >= vocab:
        kept = cols < vocab
        cells = cells[kept]
    return cells.to(x.device), kept


def _ban(x: torch.Tensor, plans: list[RowPlan], touched: list[torch.Tensor] | None = None) -> None:
    vocab = x.shape[1]
    cells = [i * vocab + t for i, p in enumerate(plans) for t in p.banned]
    if cells:
        at = torch.tensor(cells, device=x.device)
        x.view(-1).index_fill_(0, at, float("-inf"))
        if touched is not None:
            touched.append(at)


def _patch(x: torch.Tensor, tiles: torch.Tensor, touched: list[torch.Tensor]) -> None:
    """Recompute the block maxima of the blocks holding a changed cell (one gather of those blocks)."""
    at = (torch.cat(touched) if len(touched) > 1 else touched[0]).div(BLOCK, rounding_mode="floor")
    tiles.view(-1).index_copy_(0, at, x.view(-1, BLOCK).index_select(0, at).amax(-1))


def _to_host(
    tokens: torch.Tensor, logits: torch.Tensor, norm: Normalizer | None, plans: list[RowPlan]
) -> tuple[torch.Tensor, list[int], list[Any]]:
    """Tokens and the asked-for logprobs (raw logit minus the row's normalizer) in one transfer."""
    logprobs: list[Any] = [None] * len(plans)
    if norm is None:
        return tokens, tokens.tolist(), logprobs
    rows = torch.tensor(norm.rows, device=tokens.device)
    k = max(plans[i].top_logprobs for i in norm.rows)
    cols = torch.cat([tokens[rows][:, None], norm.ids[:, :k]], 1)  # [W, 1 + k]: the chosen id, then the top ids
    values = logits[rows[:, None], cols].float() - norm.lse[:, None]
    flat = torch.cat([tokens.double(), cols.double().flatten(), values.double().flatten()]).tolist()
    n, cells = len(plans), len(norm.rows) * (k + 1)
    ids, at, lps = [int(t) for t in flat[:n]], flat[n : n + cells], flat[n + cells :]
    for j, i in enumerate(norm.rows):
        first = j * (k + 1)
        logprobs[i] = (lps[first], [(int(at[first + a]), lps[first + a]) for a in range(1, plans[i].top_logprobs + 1)])
    return tokens, ids, logprobs
