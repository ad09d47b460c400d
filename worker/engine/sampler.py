"""Token choice for a whole batch in a few tensor ops: repetition, presence and frequency penalties, logit
bias, banned ids (EOS under ignore_eos or before min_tokens), grammar masks, then greedy or temperature / min-p /
top-k / top-p sampling, and logprobs; one device-to-host transfer (top-p may add one per rejection round).

Sampling is inverse-CDF: each sampled row draws uniform numbers from its own `random.Random` (seeded from the
request's seed, else from the OS) and takes the first token whose cumulative probability passes one. A row's
choice depends on its own logits and its own stream only, so a seeded request samples the same tokens alone or
in any batch, and no global RNG (Python's or torch's) is touched. On CPU, at 32 rows x 49k tokens, this is ~10x
cheaper than an exponential race with per-row noise (`argmax(p / Exp(1))`): the noise alone is a [B, V] fill.

Top-p without top-k never sorts the vocabulary: it draws from the whole row and accepts the token when the tokens
heavier than it hold at most top_p of the mass; otherwise it draws again among the heavier tokens only (each
rejection keeps a superset of the nucleus, so the accepted token follows the nucleus distribution exactly, as
FlashInfer's rejection top-p does). Top-k and the argmax find their tokens among the best 64-token blocks first.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass
from typing import Any

import torch

from worker.engine.sequence import Sampling

BLOCK = 64  # columns per block of the two-level argmax and top-k
DRAW_BLOCK = 256  # columns per block of the two-level draw
NUCLEUS_ROUNDS = 8  # top-p rejection rounds before a row's nucleus is found by a sort
MAX_INVERSE_TEMPERATURE = 1e30  # a denormal temperature: the top token wins, nothing overflows
LOG2E = 1.4426950408889634  # exp(x) = exp2(x * log2(e))
_SCRATCH = threading.local()


@dataclass
class RowPlan:
    """What a row needs from the chooser this step."""

    sampling: Sampling
    context: list[int]  # ids the repetition penalty applies to (repeats are harmless; empty when there is none)
    banned: list[int]  # token ids that may not be chosen now (EOS under ignore_eos or before min_tokens)
    constraint: Any = None  # structured-output constraint with mask(logits) / accept(id)
    top_logprobs: int = -1  # -1: no logprobs; 0..k: chosen token's logprob and that many alternatives
    counts: dict[int, int] | None = None  # generated ids and how often, for presence / frequency penalties


def choose(logits: torch.Tensor, plans: list[RowPlan]) -> tuple[torch.Tensor, list[int], list[Any]]:
    """One token per row (as a device tensor and as ints) and, where asked, (logprob, [(id, logprob), ...]) of
    the model's distribution."""
    x = _scratch("logits", logits).copy_(logits)  # this step's own float copy
    want = [i for i, p in enumerate(plans) if p.top_logprobs >= 0]
    lp = None
    if want:  # of the model's distribution, before any change to x
        lp = torch.log_softmax(x if len(want) == len(plans) else x[want], -1, out=_scratch("logprobs", x, len(want)))
    _penalize(x, plans)
    _add_bias(x, plans)
    _ban(x, plans)
    constraints = [p.constraint for p in plans]
    if any(c is not None for c in constraints):  # grammar masks, computed for all rows at once
        from worker.structured import mask_batch

        mask_batch(constraints, x)
    sampled = [i for i, p in enumerate(plans) if not p.sampling.greedy]
    if not sampled:
        tokens = _argmax(x)
    elif len(sampled) == len(plans):  # the common case: no row copy
        tokens = _sample(x, [p.sampling for p in plans])
    else:
        greedy = [i for i, p in enumerate(plans) if p.sampling.greedy]
        tokens = torch.empty(len(plans), dtype=torch.long, device=x.device)
        at = torch.tensor(greedy, device=x.device)
        tokens[at] = _argmax(x[at])
        at = torch.tensor(sampled, device=x.device)
        tokens[at] = _sample(x[at], [plans[i].sampling for i in sampled])
    return _to_host(tokens, lp, want, plans)


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


def _penalize(x: torch.Tensor, plans: list[RowPlan]) -> None:
    """transformers' repetition penalty on every id of each row's context, then OpenAI's presence and frequency
    penalties on the generated ids (`logit - count x frequency - presence`), in place, one gather/scatter each."""
    rep = [(i, p) for i, p in enumerate(plans) if p.context and p.sampling.repetition_penalty not in (0, 1.0)]
    if rep:
        r, c = _cells(x, [i for i, _ in rep], [p.context for _, p in rep])
        by = torch.tensor([p.sampling.repetition_penalty for _, p in rep], device=x.device)
        by = by.repeat_interleave(torch.tensor([len(p.context) for _, p in rep], device=x.device))
        ok = c < x.shape[1]  # a prompt id past the model's vocabulary (a tokenizer's added token)
        r, c, by = r[ok], c[ok], by[ok]
        vals = x[r, c]
        x[r, c] = torch.where(vals < 0, vals * by, vals / by)
    pf = [
        (i, p)
        for i, p in enumerate(plans)
        if p.counts and (p.sampling.presence_penalty or p.sampling.frequency_penalty)
    ]
    if pf:
        r, c = _cells(x, [i for i, _ in pf], [list(p.counts) for _, p in pf])  # type: ignore[arg-type]
        minus = [
            p.sampling.presence_penalty + n * p.sampling.frequency_penalty
            for _, p in pf
            for n in p.counts.values()  # type: ignore[union-attr]
        ]
        x.index_put_((r, c), -torch.tensor(minus, device=x.device), accumulate=True)


def _add_bias(x: torch.Tensor, plans: list[RowPlan]) -> None:
    """Each row's logit_bias (token id -> value added to its logit)."""
    rows = [(i, p.sampling.bias_tensors(x.device)) for i, p in enumerate(plans) if p.sampling.logit_bias]
    if rows:
        r = torch.tensor([i for i, _ in rows], device=x.device)
        r = r.repeat_interleave(torch.tensor([len(ids) for _, (ids, _) in rows], device=x.device))
        c = torch.cat([ids for _, (ids, _) in rows])
        x.index_put_((r, c), torch.cat([v for _, (_, v) in rows]), accumulate=True)


def _cells(x: torch.Tensor, rows: list[int], ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column index tensors of each row's ids."""
    dev = x.device
    r = torch.tensor(rows, device=dev).repeat_interleave(torch.tensor([len(c) for c in ids], device=dev))
    c = torch.tensor(list(itertools.chain.from_iterable(ids)), device=dev, dtype=torch.long)
    return r, c


def _ban(x: torch.Tensor, plans: list[RowPlan]) -> None:
    rows = [i for i, p in enumerate(plans) for _ in p.banned]
    if rows:
        cols = [t for p in plans for t in p.banned]
        x[torch.tensor(rows, device=x.device), torch.tensor(cols, device=x.device)] = float("-inf")


def _argmax(x: torch.Tensor) -> torch.Tensor:
    """Each row's first largest column: the first block holding the row maximum, then the column inside it
    (a block maximum and a small argmax cost a tenth of `argmax` over the row on CPU)."""
    rows, width = x.shape
    blocks = width // BLOCK
    if blocks < 4:
        return x.argmax(-1)
    head = x[:, : blocks * BLOCK].view(rows, blocks, BLOCK)
    block = head.amax(-1).argmax(-1)
    at = block * BLOCK + head[torch.arange(rows, device=x.device), block].argmax(-1)
    if blocks * BLOCK < width:  # a last partial block: taken only where strictly larger
        tail = x[:, blocks * BLOCK :]
        best, inside = tail.max(-1)
        at = torch.where(best > x.gather(1, at[:, None])[:, 0], blocks * BLOCK + inside, at)
    return at


def _topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`torch.topk(x, k)` (sorted) found among the k blocks with the largest maxima: they hold the k largest
    values (a block outside them has k blocks above it, each with a larger value)."""
    rows, width = x.shape
    blocks = width // BLOCK
    if blocks * BLOCK != width or 4 * k > blocks:
        return torch.topk(x, k)
    tiles = x.view(rows, blocks, BLOCK)
    best = tiles.amax(-1).topk(k).indices
    cand = tiles.gather(1, best[:, :, None].expand(-1, -1, BLOCK)).view(rows, k * BLOCK)
    vals, at = cand.topk(k)
    return vals, best.gather(1, at // BLOCK) * BLOCK + at % BLOCK


def _sample(x: torch.Tensor, params: list[Sampling]) -> torch.Tensor:
    """Temperature, min-p, top-k, top-p, then inverse-CDF draws (x: [S, V] logits, this step's own copy, turned
    into the weights in place). Rows with top-k draw among their top candidates; top-p rows without top-k by
    rejection over the whole row; a row with nothing left to draw from takes its argmax, and an extreme
    temperature is capped (the top token wins), so one row's settings can never fail the step its batch shares."""
    dev, vocab = x.device, x.shape[1]
    scale = torch.tensor([[_inverse(s.temperature) * LOG2E] for s in params], device=dev)
    draws = torch.tensor([s.uniform() for s in params], device=dev)
    # weights relative to the row's top token (1.0): exp2 is ~3x cheaper than exp on CPU, and in place
    weights = x.sub_(x.amax(-1, keepdim=True)).mul_(scale).exp2_()
    mins = [s.min_p for s in params]
    if any(mins):
        _min_p(weights, mins)
    ks = [s.top_k if s.top_k and 0 < s.top_k < vocab else 0 for s in params]
    ps = [s.top_p if s.top_p and s.top_p < 1.0 else 1.0 for s in params]
    groups = (
        ([i for i in range(len(params)) if not ks[i] and ps[i] >= 1.0], _draw_plain),
        ([i for i in range(len(params)) if ks[i]], _draw_top_k),
        ([i for i in range(len(params)) if not ks[i] and ps[i] < 1.0], _draw_nucleus),
    )
    picked = torch.empty(len(params), dtype=torch.long, device=dev)
    for rows, draw in groups:
        if len(rows) == len(params):  # every row alike: no row copies (the group may change the weights)
            picked = draw(weights, draws, ks, ps, params)
        elif rows:
            at = torch.tensor(rows, device=dev)
            sub = ([ks[i] for i in rows], [ps[i] for i in rows], [params[i] for i in rows])
            picked[at] = draw(weights[at], draws[at], *sub)
    # nothing to draw from: NaN weights, where every logit is -inf; their argmax, the first column, as the
    # logits' would be (x holds what the groups left of the weights)
    failed = picked < 0
    if dev.type != "cpu":  # no host sync
        return torch.where(failed, 0, picked)
    if bool(failed.any()):
        picked[failed] = 0
    return picked


def _min_p(weights: torch.Tensor, mins: list[float]) -> None:
    """Drop the tokens whose weight is below min_p of the top token's (weights are relative to it), in place;
    the kept weights of a min-p row come out scaled by 1/min_p (the draw does not mind)."""
    rows = [i for i, m in enumerate(mins) if m > 0]
    factor = torch.tensor([[1.0 / mins[i]] for i in rows], device=weights.device)
    if len(rows) == len(mins):
        torch.threshold_(weights.mul_(factor), 1.0 - 2**-23, 0.0)
    else:
        at = torch.tensor(rows, device=weights.device)
        weights[at] = torch.threshold_(weights[at].mul_(factor), 1.0 - 2**-23, 0.0)


def _inverse(temperature: float) -> float:
    return 1.0 / temperature if temperature > 1.0 / MAX_INVERSE_TEMPERATURE else MAX_INVERSE_TEMPERATURE


def _draw(weights: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF: the first column whose cumulative weight passes draw x total; -1 where nothing can be drawn.

    Two levels, so no scan runs over the whole row (a cumsum over 49k columns costs more than the rest of the
    draw): block sums, the block the draw falls in, then the column inside that block."""
    rows, width = weights.shape
    if width <= DRAW_BLOCK:
        return _search(weights, draws * weights.sum(-1))
    blocks = -(-width // DRAW_BLOCK)
    if blocks * DRAW_BLOCK != width:
        weights = torch.nn.functional.pad(weights, (0, blocks * DRAW_BLOCK - width))
    tiles = weights.view(rows, blocks, DRAW_BLOCK)
    sums = tiles.sum(-1)
    cum = sums.cumsum(-1)
    total = cum[:, -1]
    target = draws * total
    block = _search(sums, target, cum)
    inside = block.clamp(min=0)
    before = torch.where(inside > 0, cum.gather(1, (inside - 1).clamp(min=0)[:, None])[:, 0], 0.0)
    tile = tiles[torch.arange(rows, device=weights.device), inside]
    col = _search(tile, target - before)
    return torch.where((block >= 0) & (col >= 0), inside * DRAW_BLOCK + col, -1).clamp_(max=width - 1)


def _search(weights: torch.Tensor, target: torch.Tensor, cdf: torch.Tensor | None = None) -> torch.Tensor:
    """The first column whose cumulative weight exceeds `target` (kept inside the row's total, so float rounding
    never lands on a trailing zero-weight column); -1 where the row has no weight to draw from."""
    cdf = weights.cumsum(-1) if cdf is None else cdf
    total = cdf[:, -1]
    target = torch.minimum(target.clamp(min=0), total * (1 - 2**-20))
    at = torch.searchsorted(cdf, target[:, None], right=True)[:, 0].clamp_(max=weights.shape[1] - 1)
    return torch.where(torch.isfinite(total) & (total > 0), at, -1)


def _draw_plain(weights: torch.Tensor, draws: torch.Tensor, *_: list[Any]) -> torch.Tensor:
    """Temperature (and min-p) only: the whole row's weights."""
    return _draw(weights, draws)


def _draw_top_k(
    weights: torch.Tensor, draws: torch.Tensor, ks: list[int], ps: list[float], _: list[Sampling]
) -> torch.Tensor:
    """Top-k then top-p (the smallest prefix reaching top_p of the distribution renormalised over the top-k set),
    drawn among the top-k candidates in descending order."""
    dev = weights.device
    width = max(ks)
    vals, ids = _topk(weights, width)
    column = torch.arange(width, device=dev)[None, :]
    vals.masked_fill_(column >= torch.tensor(ks, device=dev)[:, None], 0.0)
    if any(q < 1.0 for q in ps):
        share = vals / vals.sum(-1, keepdim=True)
        keep = ((share.cumsum(-1) - share) <= torch.tensor(ps, device=dev)[:, None]).sum(-1).clamp_(min=1)
        vals.masked_fill_(column >= keep[:, None], 0.0)
    at = _draw(vals, draws)
    return torch.where(at >= 0, ids.gather(1, at.clamp(min=0)[:, None])[:, 0], -1)


def _draw_nucleus(
    weights: torch.Tensor, draws: torch.Tensor, _: list[int], ps: list[float], params: list[Sampling]
) -> torch.Tensor:
    """Top-p over whole rows by rejection: draw a token; keep it when the tokens strictly heavier than it hold at
    most top_p of the row's weight (it is in the nucleus); else draw again, from the next uniform of the row's
    stream, among those heavier tokens only. A row still rejected after `NUCLEUS_ROUNDS` takes a sort. The
    weights are consumed: each round divides them by the drawn token's weight (`unit` keeps the original one)."""
    dev = weights.device
    limit = torch.tensor(ps, device=dev) * weights.sum(-1)
    picked = torch.full((len(ps),), -1, dtype=torch.long, device=dev)
    rows = torch.arange(len(ps), device=dev)
    pending = list(range(len(ps)))
    current, unit = weights, torch.ones(len(ps), device=dev)
    for _round in range(NUCLEUS_ROUNDS):
        at = _draw(current, draws)
        drawn = current.gather(1, at.clamp(min=0)[:, None])
        unit = unit * drawn[:, 0]  # the drawn token's original weight
        heavier = torch.threshold_(current.div_(drawn), 1.0, 0.0)  # the tokens strictly heavier, in units of it
        done = (at < 0) | (heavier.sum(-1) * unit <= limit[rows])
        picked[rows] = torch.where(done, at, -1)
        again = (~done).nonzero()[:, 0].tolist()  # one host sync per round, for the whole batch
        if not again:
            return picked
        pending = [pending[j] for j in again]
        rows, unit = rows[again], unit[again]
        current = heavier if len(again) == len(heavier) else heavier[again]
        draws = torch.tensor([params[i].uniform() for i in pending], device=dev)
    picked[rows] = _draw_sorted(current, draws, limit[rows] / unit)
    return picked


def _draw_sorted(weights: torch.Tensor, draws: torch.Tensor, limit: torch.Tensor) -> torch.Tensor:
    """Top-p by a full sort: the heaviest tokens whose weight before them is at most `limit` (top_p of the row's
    total; `weights` may hold only the heaviest tokens of the row, the rest zero)."""
    ordered, order = torch.sort(weights, dim=-1, descending=True)
    keep = ((ordered.cumsum(-1) - ordered) <= limit[:, None]).sum(-1).clamp_(min=1)
    ordered.masked_fill_(torch.arange(weights.shape[1], device=weights.device)[None, :] >= keep[:, None], 0.0)
    at = _draw(ordered, draws)
    return torch.where(at >= 0, order.gather(1, at.clamp(min=0)[:, None])[:, 0], -1)


def _to_host(
    tokens: torch.Tensor, lp: torch.Tensor | None, want: list[int], plans: list[RowPlan]
) -> tuple[torch.Tensor, list[int], list[Any]]:
    """Tokens and the asked-for logprobs in one transfer."""
    logprobs: list[Any] = [None] * len(plans)
    if lp is None:
        return tokens, tokens.tolist(), logprobs
    rows = torch.tensor(want, device=tokens.device)
    chosen = lp.gather(1, tokens[rows][:, None])[:, 0]
    k = max(plans[i].top_logprobs for i in want)
    parts = [tokens.double(), chosen.double()]
    if k > 0:
        values, indices = _topk(lp, k)
        parts += [indices.double().flatten(), values.double().flatten()]
    flat = torch.cat(parts).tolist()
    n, w = len(plans), len(want)
    ids = [int(t) for t in flat[:n]]
    alt_ids, alt_lps = flat[n + w : n + w + w * k], flat[n + w + w * k :]
    for j, i in enumerate(want):
        m = plans[i].top_logprobs
        alts = [(int(alt_ids[j * k + a]), alt_lps[j * k + a]) for a in range(m)]
        logprobs[i] = (flat[n + j], alts)
    return tokens, ids, logprobs
