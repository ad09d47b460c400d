"""The sampler on a CPU in one C call (`sample_rows` in `worker/cpu_kernels.py`): each row of logits is read once
into a float32 row that stays in cache, and every pass over it (maxima, normalizer, penalties, weights, draw)
runs there before the next row.

Per row, in the order of the tensor path (`worker.engine.sampler` and `worker.engine.draw`), with its float32
roundings: the logprobs' normalizer and top ids from the raw logits; the repetition penalty (from the raw value, so
repeats apply once), presence and frequency penalties, logit bias and bans on their cells only; then the argmax
(greedy), or weights 2^((x - max) x log2(e) / T) (0 below 2^-126, as with denormals flushed) and min-p, and an
inverse-CDF draw from the row's uniform: over the top-k candidates (found among the best 64-column blocks, then
top-p among them), or over the whole row by 256-column block sums, with top-p by rejection (the row's next uniform
comes from its stream through a callback, only when a draw is rejected, so each row uses as many uniforms as on
the tensor path). A block whose largest weight is below 2^-64 of the top token's (a wide-spread model, a low
temperature) is taken as 0 without computing its exps, and so for the normalizer. Weights come from a polynomial
exp2 (~1 ulp) and sums in another order than torch's, so a draw that falls within a rounding of a boundary may take
the neighbouring token, and tied top-k candidates come lowest id first where torch orders them its own way; a
seeded row still samples the same alone and in any batch, as nothing a row computes depends on another.

Used on a CPU for bf16 and float32 logits without grammar constraints, where the kernels load; the tensor path
runs everywhere else.
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import math
import threading
from array import array
from typing import Any

import torch

from worker import cpu_kernels
from worker.engine.draw import LOG2E, _inverse

PARAMS = 9  # doubles per row: scale (-1: greedy), 1 / min_p, top_k, top_p, uniform, logprobs, repetition, presence,
# frequency (the C side's P_* order)
DRAW_BLOCK = 256  # the C side's DB: a row is padded to whole draw blocks
UNIFORM = ctypes.CFUNCTYPE(ctypes.c_double, ctypes.c_int64)
_LOCAL = threading.local()


def _more(row: int) -> float:
    """The next uniform of a row whose top-p draw was rejected (called from C, on the calling thread)."""
    return float(_LOCAL.plans[row].sampling.uniform())


_MORE = UNIFORM(_more)


def usable(logits: torch.Tensor, plans: list[Any]) -> bool:
    """Whether the C pass takes this step: CPU bf16 or float32 rows with unit column stride, no grammar."""
    return (
        logits.device.type == "cpu"
        and logits.dtype in (torch.bfloat16, torch.float32)
        and logits.dim() == 2
        and logits.stride(1) == 1
        and all(p.constraint is None for p in plans)
        and _kernel() is not None
    )


@functools.cache
def _kernel() -> Any:
    args = [ctypes.c_void_p, *[ctypes.c_int64] * 4, *[ctypes.c_void_p] * 11, ctypes.c_int64, UNIFORM]
    args += [ctypes.c_void_p] * 6
    return cpu_kernels.checked_function("sample_rows", None, args, _self_check, "C sampler")


def choose(logits: torch.Tensor, plans: list[Any]) -> tuple[torch.Tensor, list[int], list[Any]]:
    """`worker.engine.sampler.choose` for the rows of `logits` (see the module's docstring)."""
    return _run(_kernel(), logits, plans)


def _run(fn: Any, logits: torch.Tensor, plans: list[Any]) -> tuple[torch.Tensor, list[int], list[Any]]:
    rows, vocab = logits.shape
    params = array("d", itertools.chain.from_iterable(_params(p, vocab) for p in plans))
    rep = [p.context if p.context and p.sampling.repetition_penalty not in (0, 1.0) else () for p in plans]
    pf = [p.counts if p.counts and (p.sampling.presence_penalty or p.sampling.frequency_penalty) else {} for p in plans]
    bias = [p.sampling.bias_tensors(logits.device) if p.sampling.logit_bias else None for p in plans]
    rep_off, rep_ids = _ragged(rep)
    pf_off, pf_ids = _ragged(pf)
    pf_counts = array("q", itertools.chain.from_iterable(c.values() for c in pf))
    bias_n = array("q", [0 if b is None else b[0].shape[0] for b in bias])
    bias_ids = array("q", [0 if b is None else b[0].data_ptr() for b in bias])
    bias_vals = array("q", [0 if b is None else b[1].data_ptr() for b in bias])
    ban_off, ban_ids = _ragged([p.banned for p in plans])
    want = [i for i, p in enumerate(plans) if p.top_logprobs >= 0]
    k = max(1, max(plans[i].top_logprobs for i in want)) if want else 1
    tokens = torch.empty(rows, dtype=torch.long)
    lse, chosen = array("f", bytes(8 * rows)), array("f", bytes(4 * rows))
    top_ids, top_vals = array("q", bytes(8 * rows * k)), array("f", bytes(4 * rows * k))
    _LOCAL.plans = plans
    try:
        fn(
            logits.data_ptr(),
            logits.dtype == torch.bfloat16,
            rows,
            vocab,
            logits.stride(0),
            *map(_address, (params, rep_off, rep_ids, pf_off, pf_ids, pf_counts, bias_n, bias_ids, bias_vals)),
            *map(_address, (ban_off, ban_ids)),
            k,
            _MORE,
            _scratch(vocab).data_ptr(),
            tokens.data_ptr(),
            *map(_address, (lse, top_ids, top_vals, chosen)),
        )
    finally:
        _LOCAL.plans = None
    ids = tokens.tolist()
    logprobs: list[Any] = [None] * rows
    for i in want:
        peak, total = lse[2 * i], lse[2 * i + 1]
        norm = peak + math.log(total) if total > 0 else math.nan
        alts = [(top_ids[i * k + j], top_vals[i * k + j] - norm) for j in range(plans[i].top_logprobs)]
        logprobs[i] = (chosen[i] - norm, alts)
    return tokens, ids, logprobs


def _params(p: Any, vocab: int) -> tuple[float, ...]:
    s = p.sampling
    rep, presence, frequency = s.repetition_penalty, s.presence_penalty, s.frequency_penalty
    if s.greedy:
        return (-1.0, 0.0, 0.0, 1.0, 0.0, p.top_logprobs, rep, presence, frequency)
    k = s.top_k if s.top_k and 0 < s.top_k < vocab else 0
    top_p = s.top_p if s.top_p and s.top_p < 1.0 else 1.0
    inv_min_p = 1.0 / s.min_p if s.min_p > 0 else 0.0
    return (_inverse(s.temperature) * LOG2E, inv_min_p, k, top_p, s.uniform(), p.top_logprobs, rep, presence, frequency)


def _ragged(lists: list[Any]) -> tuple[array[int], array[int]]:
    """Offsets [rows + 1] and the flat ids of per-row id lists (a dict gives its keys)."""
    offsets = array("q", itertools.accumulate(map(len, lists), initial=0))
    return offsets, array("q", itertools.chain.from_iterable(lists))


def _address(a: Any) -> int:
    return a.buffer_info()[0]


def _scratch(vocab: int) -> torch.Tensor:
    """This thread's work space for rows of `vocab` columns (see `sample_rows`), kept across steps."""
    padded = -(-vocab // DRAW_BLOCK) * DRAW_BLOCK
    size = 6 * padded + 3 * (padded // 64) + 16
    buf: torch.Tensor | None = getattr(_LOCAL, "scratch", None)
    if buf is None or buf.numel() < size:
        buf = _LOCAL.scratch = torch.empty(size, dtype=torch.float64)  # 8-byte aligned; twice the room needed
    return buf


def _self_check(fn: Any) -> bool:
    """A greedy row, a sampled row whose weights are known and a logprob, against their exact values."""
    from worker.engine.sampler import RowPlan
    from worker.engine.sequence import Sampling

    x = torch.full((2, 300), -50.0)
    x[0, 7], x[0, 299] = 3.0, 2.0
    x[1, [10, 200]] = torch.tensor([0.25, 0.75]).log()
    first, second = Sampling(temperature=1.0, seed=0), Sampling(temperature=1.0, seed=0)
    first.make_generator()
    second.make_generator()
    u = second.uniform()
    plans = [RowPlan(Sampling(), [], [], top_logprobs=1), RowPlan(first, [], [])]
    _, ids, lps = _run(fn, x, plans)
    lse = float(torch.logsumexp(x[0], -1))
    return ids == [7, 10 if u < 0.25 else 200] and abs(lps[0][0] - (3.0 - lse)) < 1e-5 and lps[0][1][0][0] == 7
