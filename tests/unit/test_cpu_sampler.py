"""The sampler's C pass against its tensor path: for the same seeds, the same tokens, the same uniforms used and the
same logprobs (to float32 rounding), for every option step_bench covers and more, on float32 and bf16 logits,
vocabularies of whole and partial blocks and Qwen's 151,936; with the row alone or in any batch."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from worker.engine import cpu_sampler
from worker.engine.sampler import RowPlan, choose
from worker.engine.sequence import Sampling

pytestmark = pytest.mark.skipif(
    not cpu_sampler.usable(torch.zeros(1, 64), []), reason="no AVX-512 BF16 or no C compiler here"
)

BIAS = {i: -1.0 for i in range(0, 2500, 10)}  # step_bench has 0..3000 on 49,152 columns
SETTINGS: dict[str, dict[str, Any]] = {  # step_bench's scenarios, then the other options and edges
    "greedy": {},
    "T0.8": {"temperature": 0.8},
    "top_k 50 top_p 0.95": {"temperature": 0.8, "top_k": 50, "top_p": 0.95},
    "top_p 0.95": {"temperature": 0.8, "top_p": 0.95},
    "rep 1.1 + logprobs 2": {"temperature": 0.8, "repetition_penalty": 1.1, "logprobs": 2},
    "min_p pres/freq bias": {
        "temperature": 0.8,
        "min_p": 0.05,
        "presence_penalty": 0.5,
        "frequency_penalty": 0.3,
        "logit_bias": BIAS,
    },
    "greedy rep pres/freq bias + logprobs 5": {
        "repetition_penalty": 1.3,
        "presence_penalty": 0.5,
        "frequency_penalty": 0.3,
        "logit_bias": {5: 4.0, 70: -3.0},
        "logprobs": 5,
    },
    "top_k 20 min_p, T1.3": {"temperature": 1.3, "top_k": 20, "min_p": 0.1},
    "top_p 0.5 rep 0.9 + logprobs 0": {"temperature": 1.0, "top_p": 0.5, "repetition_penalty": 0.9, "logprobs": 0},
}


def plans(settings: dict[str, Any], rows: int, vocab: int, seed: int = 0) -> list[RowPlan]:
    out = []
    for i in range(rows):
        s = dict(settings)
        top_logprobs = s.pop("logprobs", -1)
        sampling = Sampling(seed=seed * 1000 + i, **s)
        sampling.make_generator()
        context = [i, 7 + i, vocab - 1, vocab + 5]  # the last column and an added token past the vocabulary
        counts = {i: 2, 3 * i + 1: 1}
        out.append(RowPlan(sampling, context, [0, 1 + i], top_logprobs=top_logprobs, counts=counts))
    return out


def logits(rows: int, vocab: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    return (torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3).to(dtype)


def both(x: torch.Tensor, settings: dict[str, Any], seed: int) -> tuple[Any, Any, list[float], list[float]]:
    """Each path's (ids, logprobs) for the same seeds, and the next uniform of each row's stream after."""
    native, tensor = plans(settings, len(x), x.shape[1], seed), plans(settings, len(x), x.shape[1], seed)
    got, want = choose(x, native)[1:], choose(x, tensor, native=False)[1:]
    after = [[p.sampling.uniform() for p in ps if p.sampling.generator] for ps in (native, tensor)]
    return got, want, after[0], after[1]


def close(got: Any, want: Any, ids: bool = True) -> bool:
    if got is None or want is None:
        return got is want
    (lp, alts), (lp_want, alts_want) = got, want
    values = [v for _, v in alts] + [lp]
    values_want = [v for _, v in alts_want] + [lp_want]
    same_ids = [a for a, _ in alts] == [a for a, _ in alts_want] or not ids
    return same_ids and all(abs(a - b) < 2e-5 for a, b in zip(values, values_want))


@pytest.mark.parametrize("name", list(SETTINGS))
@pytest.mark.parametrize("vocab", [64 * 64, 64 * 40 + 17])
def test_the_c_pass_samples_what_the_tensor_path_samples(name: str, vocab: int) -> None:
    """Float32 logits with no ties: the same tokens, uniforms and logprobs, step after step."""
    for step in range(3):
        x = logits(12, vocab, torch.float32, seed=step)
        (ids, lps), (ids_want, lps_want), after, after_want = both(x, SETTINGS[name], step)
        assert ids == ids_want and after == after_want
        assert all(close(a, b) for a, b in zip(lps, lps_want))


@pytest.mark.parametrize("name", ["T0.8", "top_p 0.95", "rep 1.1 + logprobs 2", "top_p 0.5 rep 0.9 + logprobs 0"])
def test_wide_rows_whose_far_blocks_are_skipped(name: str) -> None:
    """A spread of ~400 logits: most 64-column blocks weigh below 2^-64 of the top token and are taken as 0 by the
    C pass; what it samples and its logprobs stay the tensor path's."""
    x = logits(12, 64 * 64, torch.float32, seed=13) * 12
    x[:, :16] = x[:, :16].abs() / 12 + x.amax(-1, keepdim=True) - 3  # a few tokens near the top to draw from
    (ids, lps), (ids_want, lps_want), after, after_want = both(x, SETTINGS[name], 13)
    assert ids == ids_want and after == after_want and len(set(ids)) > 3
    assert all(close(a, b) for a, b in zip(lps, lps_want))


@pytest.mark.parametrize("name", ["greedy", "rep 1.1 + logprobs 2", "greedy rep pres/freq bias + logprobs 5"])
def test_bf16_logits_give_the_same_greedy_tokens_and_logprobs(name: str) -> None:
    """bf16 logits tie often: the argmax is the first of the tied, the logprobs' values match, and a sampled row
    draws what the tensor path draws but where a rounding of the sums puts the draw on either side of a boundary."""
    x = logits(16, 64 * 64, torch.bfloat16, seed=7)
    (ids, lps), (ids_want, lps_want), _, _ = both(x, SETTINGS[name], 7)
    if "T" not in name and "temperature" not in SETTINGS[name]:
        assert ids == ids_want
    else:
        assert sum(a == b for a, b in zip(ids, ids_want)) >= 15
    assert all(close(a, b, ids=False) for a, b in zip(lps, lps_want))


def test_qwens_vocabulary() -> None:
    """151,936 columns (whole 64-column blocks, not whole 256-column ones): greedy with penalties, bans and
    logprobs, top-k with min-p."""
    vocab = 151_936
    x = logits(4, vocab, torch.float32, seed=3)
    for name in ("greedy rep pres/freq bias + logprobs 5", "top_k 20 min_p, T1.3"):
        (ids, lps), (ids_want, lps_want), after, after_want = both(x, SETTINGS[name], 3)
        assert ids == ids_want and after == after_want
        assert all(close(a, b) for a, b in zip(lps, lps_want))
    x[:, -1] = 40.0  # the last column: 40 / 1.3 after the repetition penalty, still the largest
    assert both(x, SETTINGS["greedy rep pres/freq bias + logprobs 5"], 3)[0][0] == [vocab - 1] * 4


def test_a_nucleus_still_rejected_after_eight_draws_is_found_by_a_sort() -> None:
    """Nearly flat rows and top_p 1e-4: each rejection keeps about half the row, so 4,096 columns outlast the
    eight rounds; both paths then sort what is left, with the ninth uniform."""
    x = logits(8, 64 * 64, torch.float32, seed=11) * 0.003
    settings = {"temperature": 1.0, "top_p": 1e-4}
    (ids, _), (ids_want, _), after, after_want = both(x, settings, 11)
    assert ids == ids_want and after == after_want
    streams = [[p.sampling.uniform() for _ in range(10)] for p in plans(settings, 8, 64 * 64, 11)]
    used = [stream.index(nxt) for stream, nxt in zip(streams, after)]
    assert max(used) == 9 and min(used) >= 2  # a sorted row (nine uniforms); every row rejected at least once


def test_a_seeded_row_samples_the_same_alone_and_in_any_batch() -> None:
    vocab = 64 * 40 + 17
    x = logits(len(SETTINGS), vocab, torch.bfloat16, seed=5)
    rows = [plans(s, 1, vocab, i)[0] for i, s in enumerate(SETTINGS.values())]
    order = [3, 0, 5, 1, 8, 2, 7, 4, 6]

    def fresh() -> list[RowPlan]:
        return [plans(s, 1, vocab, i)[0] for i, s in enumerate(SETTINGS.values())]

    batch, alone, shuffled = rows, fresh(), fresh()
    for _ in range(5):
        _, together, lps = choose(x, batch)
        singles = [choose(x[i : i + 1], [alone[i]])[1:] for i in range(len(batch))]
        _, mixed, mixed_lps = choose(x[order], [shuffled[i] for i in order])
        assert together == [ids[0] for ids, _ in singles] == [mixed[order.index(i)] for i in range(len(batch))]
        assert all(lps[i] == singles[i][1][0] == mixed_lps[order.index(i)] for i in range(len(batch)))


def test_rows_with_nothing_to_draw_and_extreme_settings() -> None:
    x = logits(5, 64 * 64, torch.float32, seed=9)
    x[3] = float("-inf")  # every token masked: the first column, as the tensor path's argmax
    x[4, 100:] = float("-inf")
    settings = [
        {"temperature": 5e-324},  # a denormal temperature: the top token wins
        {"temperature": 1.0, "top_p": 1e-300},
        {"temperature": 1.0, "top_k": 1},
        {"temperature": 1.0},
        {"temperature": 1e30, "top_k": 200},  # flat weights; candidates past the row's last finite column
    ]
    native = [plans(s, 1, 64 * 64, i)[0] for i, s in enumerate(settings)]
    tensor = [plans(s, 1, 64 * 64, i)[0] for i, s in enumerate(settings)]
    _, ids, _ = choose(x, native)
    assert ids[:4] == choose(x, tensor, native=False)[1][:4]  # row 4's weights tie: the two paths order them apart
    x[:, :2] = float("-inf")  # banned
    assert ids[:3] == x[:3].argmax(-1).tolist() and ids[3] == 0 and 2 <= ids[4] < 100


@pytest.mark.parametrize("name", list(SETTINGS))
def test_nan_logits_give_a_token_of_the_vocabulary(name: str) -> None:
    x = logits(3, 64 * 40 + 17, torch.float32, seed=15)
    x[0] = float("nan")
    x[1, ::3] = float("nan")
    _, ids, _ = choose(x, plans(SETTINGS[name], 3, x.shape[1]))
    assert all(0 <= i < x.shape[1] for i in ids)
