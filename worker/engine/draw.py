"""The token draws of the batched sampler: argmax, temperature, min-p, top-k and top-p over a whole batch.

Sampling is inverse-CDF: each sampled row draws uniform numbers from its own `random.Random` (seeded from the
request's seed, else from the OS) and takes the first token whose cumulative probability passes one. A row's
choice depends on its own logits and its own stream only, so a seeded request samples the same tokens alone or
in any batch, and no global RNG (Python's or torch's) is touched. On CPU, at 32 rows x 49k tokens, this is ~10x
cheaper than an exponential race with per-row noise (`argmax(p / Exp(1))`): the noise alone is a [B, V] fill.

Top-p without top-k never sorts the vocabulary: it draws from the whole row and accepts the token when the tokens
heavier than it hold at most top_p of the mass; otherwise it draws again among the heavier tokens only (each
rejection keeps a superset of the nucleus, so the accepted token follows the nucleus distribution exactly, as
FlashInfer's rejection top-p does). Top-k and the argmax find their tokens among the best 64-token blocks first;
`tiles` (each block's maximum, [rows, vocab / 64]) may come from the caller, who has them already.
"""

from __future__ import annotations

from typing import Any

import torch

from worker.engine.sequence import Sampling

BLOCK = 64  # columns per block of the two-level argmax and top-k
DRAW_BLOCK = 256  # columns per block of the two-level draw
NUCLEUS_ROUNDS = 8  # top-p rejection rounds before a row's nucleus is found by a sort
MAX_INVERSE_TEMPERATURE = 1e30  # a denormal temperature: the top token wins, nothing overflows
LOG2E = 1.4426950408889634  # exp(x) = exp2(x * log2(e))
LERP_SCALES = (1.0, 64.0)  # scales (log2(e) / temperature) shifted and scaled in one pass: T in [0.023, 1.44)


def tile_max(x: torch.Tensor) -> torch.Tensor | None:
    """Each 64-column block's maximum [rows, vocab / 64]; None where the vocabulary is not whole blocks."""
    rows, width = x.shape
    if width % BLOCK or width // BLOCK < 4:
        return None
    return x.view(rows, width // BLOCK, BLOCK).amax(-1)


def argmax(x: torch.Tensor, tiles: torch.Tensor | None = None) -> torch.Tensor:
    """Each row's first largest column: the first block holding the row maximum, then the column inside it
    (a block maximum and a small argmax cost a tenth of `argmax` over the row on CPU)."""
    rows, width = x.shape
    blocks = width // BLOCK
    if blocks < 4:
        return x.argmax(-1)
    head = x[:, : blocks * BLOCK].view(rows, blocks, BLOCK)
    block = (head.amax(-1) if tiles is None else tiles).argmax(-1)
    at = block * BLOCK + head[torch.arange(rows, device=x.device), block].argmax(-1)
    if blocks * BLOCK < width:  # a last partial block: taken only where strictly larger
        tail = x[:, blocks * BLOCK :]
        best, inside = tail.max(-1)
        at = torch.where(best > x.gather(1, at[:, None])[:, 0], blocks * BLOCK + inside, at)
    return at


def topk(x: torch.Tensor, k: int, tiles: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`torch.topk(x, k)` (sorted) found among the k blocks with the largest maxima: they hold the k largest
    values (a block outside them has k blocks above it, each with a larger value). `tiles` may be the block maxima
    of any increasing function of x (the logits of weights made from them): only their order counts."""
    rows, width = x.shape
    blocks = width // BLOCK
    if blocks * BLOCK != width or 4 * k > blocks:
        return torch.topk(x, k)
    tiles_ = x.view(rows, blocks, BLOCK)
    best = (tiles_.amax(-1) if tiles is None else tiles).topk(k).indices
    cand = tiles_.gather(1, best[:, :, None].expand(-1, -1, BLOCK)).view(rows, k * BLOCK)
    vals, at = cand.topk(k)
    return vals, best.gather(1, at // BLOCK) * BLOCK + at % BLOCK


def sample(
    x: torch.Tensor, params: list[Sampling], top: torch.Tensor | None = None, tiles: torch.Tensor | None = None
) -> torch.Tensor:
    """Temperature, min-p, top-k, top-p, then inverse-CDF draws (x: [S, V] logits, this step's own copy, turned
    into the weights in place; `top`: each row's maximum [S, 1], when the caller knows it; `tiles`: x's block
    maxima). Rows with top-k draw among their top candidates; top-p rows without top-k by rejection over the
    whole row; a row with nothing left to draw from takes its argmax, and an extreme temperature is capped (the
    top token wins), so one row's settings can never fail the step its batch shares."""
    dev, vocab = x.device, x.shape[1]
    scales = [_inverse(s.temperature) * LOG2E for s in params]
    draws = torch.tensor([s.uniform() for s in params], device=dev)
    # weights relative to the row's top token (1.0): exp2 is cheaper than exp on CPU, and in place
    weights = _relative(x, x.amax(-1, keepdim=True) if top is None else top, scales).exp2_()
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
            picked = draw(weights, draws, ks, ps, params, tiles)
        elif rows:
            at = torch.tensor(rows, device=dev)
            sub = ([ks[i] for i in rows], [ps[i] for i in rows], [params[i] for i in rows])
            picked[at] = draw(weights[at], draws[at], *sub, None if tiles is None else tiles[at])
    # nothing to draw from: NaN weights, where every logit is -inf; their argmax, the first column, as the
    # logits' would be (x holds what the groups left of the weights)
    failed = picked < 0
    if dev.type != "cpu":  # no host sync
        return torch.where(failed, 0, picked)
    if bool(failed.any()):
        picked[failed] = 0
    return picked


def _relative(x: torch.Tensor, top: torch.Tensor, scales: list[float]) -> torch.Tensor:
    """(x - top) x scale, in place. A row whose scale is in `LERP_SCALES` takes one pass instead of two:
    `lerp(x, end, w) = x + w (end - x)` with w = 1 - s and end = top s / (s - 1) is s x - s top (w < 0 keeps
    -inf at -inf; s beyond the range would let rounding of `end` move the top away from 0). Which of the two a
    row takes depends on its own scale only, so its weights are the same alone or in any batch; rows with other
    scales than the first are shifted and scaled as a group of their own (a copy out and back)."""
    groups: dict[float, list[int]] = {}
    for i, s in enumerate(scales):
        groups.setdefault(s, []).append(i)
    if len(groups) == 1:
        return _shift_scale(x, top, scales[0])
    for s, rows in groups.items():
        at = torch.tensor(rows, device=x.device)
        x[at] = _shift_scale(x[at], top[at], s)
    return x


def _shift_scale(x: torch.Tensor, top: torch.Tensor, s: float) -> torch.Tensor:
    if LERP_SCALES[0] < s <= LERP_SCALES[1]:
        return x.lerp_(top * (s / (s - 1.0)), 1.0 - s)
    return x.sub_(top).mul_(s)


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


def _draw_plain(weights: torch.Tensor, draws: torch.Tensor, *_: Any) -> torch.Tensor:
    """Temperature (and min-p) only: the whole row's weights."""
    return _draw(weights, draws)


def _draw_top_k(
    weights: torch.Tensor,
    draws: torch.Tensor,
    ks: list[int],
    ps: list[float],
    _: list[Sampling],
    tiles: torch.Tensor | None = None,
) -> torch.Tensor:
    """Top-k then top-p (the smallest prefix reaching top_p of the distribution renormalised over the top-k set),
    drawn among the top-k candidates in descending order."""
    dev = weights.device
    width = max(ks)
    vals, ids = topk(weights, width, tiles)
    column = torch.arange(width, device=dev)[None, :]
    vals.masked_fill_(column >= torch.tensor(ks, device=dev)[:, None], 0.0)
    if any(q < 1.0 for q in ps):
        share = vals / vals.sum(-1, keepdim=True)
        keep = ((share.cumsum(-1) - share) <= torch.tensor(ps, device=dev)[:, None]).sum(-1).clamp_(min=1)
        vals.masked_fill_(column >= keep[:, None], 0.0)
    at = _draw(vals, draws)
    return torch.where(at >= 0, ids.gather(1, at.clamp(min=0)[:, None])[:, 0], -1)


def _draw_nucleus(
    weights: torch.Tensor, draws: torch.Tensor, _: list[int], ps: list[float], params: list[Sampling], *__: Any
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
