"""The batched sampler on a vocabulary of whole 64-column blocks, where the block maxima of the raw logits are
shared by the logprobs, the argmax, top-k and the weights' shift: logprobs equal the model's log-softmax, the
patched block maxima equal fresh ones after penalties, bias and bans, seeded rows sample the same alone and in
any batch, and the one-pass shift-and-scale equals the two-pass one."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from worker.engine.draw import LOG2E, _relative, tile_max
from worker.engine.sampler import RowPlan, _add_bias, _ban, _patch, _penalize, choose
from worker.engine.sequence import Sampling

pytestmark = pytest.mark.usefixtures("sampler_path")  # the C pass and the tensor path
V = 64 * 64

SETTINGS: list[dict[str, Any]] = [
    {"temperature": 0.8, "repetition_penalty": 1.1},
    {"temperature": 0.7, "top_k": 20, "top_p": 0.9, "repetition_penalty": 0.9},
    {"temperature": 1.0, "top_p": 0.8, "logit_bias": {5: 4.0, 4000: -3.0}},
    {"temperature": 0.5, "min_p": 0.1, "presence_penalty": 0.5, "frequency_penalty": 0.5},
    {"repetition_penalty": 1.3},  # greedy
    {"temperature": 3.0},  # a scale below one: shifted and scaled in two passes
]


def logits(rows: int, seed: int = 0) -> torch.Tensor:
    x = torch.randn(rows, V, generator=torch.Generator().manual_seed(seed)) * 3
    return x.bfloat16()  # what a bf16 model hands over


def plans(top_logprobs: int = 2) -> list[RowPlan]:
    out = []
    for i, s in enumerate(SETTINGS):
        sampling = Sampling(seed=10 + i, **s)
        sampling.make_generator()
        x = logits(len(SETTINGS))
        best = int(x[i].float().argmax())
        context = [best, 7, 4095, 70_000]  # the row's best id, a last-column id and one past the vocabulary
        lp = top_logprobs if i % 2 == 0 else -1
        out.append(RowPlan(sampling, context, [best] if i == 4 else [], top_logprobs=lp, counts={best: 2, 9: 1}))
    return out


def test_every_setting_samples_the_same_alone_and_in_any_batch_with_the_same_logprobs() -> None:
    x = logits(len(SETTINGS))
    batch, alone, shuffled = plans(), plans(), plans()
    order = [4, 2, 0, 5, 3, 1]
    for _ in range(10):
        _, together, lps = choose(x, batch)
        singles = [choose(x[i : i + 1], [alone[i]])[1:] for i in range(len(SETTINGS))]
        _, mixed, mixed_lps = choose(x[order], [shuffled[i] for i in order])
        assert together == [ids[0] for ids, _ in singles] == [mixed[order.index(i)] for i in range(len(SETTINGS))]
        for i in range(len(SETTINGS)):
            assert lps[i] == singles[i][1][0] == mixed_lps[order.index(i)]
    assert together[4] == int(x[4].float().topk(2).indices[1])  # greedy with its best id banned: the runner-up


def test_logprobs_are_the_models_log_softmax_before_any_change() -> None:
    x = logits(len(SETTINGS), seed=1)
    ps = plans(top_logprobs=3)
    _, ids, lps = choose(x, ps)
    want = torch.log_softmax(x.float(), -1)
    for i, (tok, got) in enumerate(zip(ids, lps)):
        if ps[i].top_logprobs < 0:
            assert got is None
            continue
        chosen, alts = got
        assert abs(chosen - float(want[i, tok])) < 1e-5
        top = want[i].topk(3).values  # bf16 logits tie often: the ids of tied values may come in either order
        assert len({a for a, _ in alts}) == 3
        assert all(abs(v - float(w)) < 1e-5 and abs(v - float(want[i, a])) < 1e-5 for (a, v), w in zip(alts, top))


def test_patched_block_maxima_equal_fresh_ones() -> None:
    x = logits(len(SETTINGS), seed=2).float()
    ps = plans()
    tiles = tile_max(x)
    assert tiles is not None
    touched: list[torch.Tensor] = []
    _penalize(x, ps, touched)
    _add_bias(x, ps, touched)
    _ban(x, ps, touched)
    assert len(touched) == 4
    _patch(x, tiles, touched)
    assert torch.equal(tiles, tile_max(x))
    assert x[4].isinf().sum() == 1 and bool(torch.isfinite(tiles).all())


@pytest.mark.parametrize("temperature", [0.03, 0.5, 0.8, 1.0, 1.44])
def test_one_pass_shift_and_scale_equals_two(temperature: float) -> None:
    x = logits(4, seed=3).float()
    x[1, ::7] = float("-inf")  # masked tokens stay masked
    top = x.amax(-1, keepdim=True)
    scale = LOG2E / temperature
    want = (x - top) * scale
    got = _relative(x.clone(), top, [scale] * 4)
    assert torch.equal(got.isinf(), want.isinf()) and not got.isnan().any()
    finite = want.isfinite()
    assert torch.allclose(got[finite], want[finite], rtol=1e-5, atol=1e-4 * scale)
    assert got.amax(-1).abs().max() < 1e-4 * scale  # the top token's weight stays 1


def test_a_wide_row_samples_its_top_tokens_and_denormals_come_back_after() -> None:
    x = logits(2, seed=5).float() * 40  # a spread of ~850 logits: most weights fall below float32's range
    ps = [
        RowPlan(Sampling(seed=1, temperature=0.3), [], [], top_logprobs=1),
        RowPlan(Sampling(seed=2, temperature=0.3), [], []),
    ]
    _, ids, lps = choose(x, ps)
    assert ids == x.argmax(-1).tolist()  # gaps of 12.5 and 32.5 logits at T 0.3: the runner-up weighs < 2^-60
    assert abs(lps[0][0] - float(torch.log_softmax(x[0], -1)[ids[0]])) < 1e-5
    assert float(torch.tensor([2.0**-140]) * 1.0) > 0  # denormals flushed only while choosing


def test_each_rows_weights_are_the_same_alone_and_beside_other_temperatures() -> None:
    x = logits(3, seed=6).float()
    top = x.amax(-1, keepdim=True)
    scales = [LOG2E / 0.8, LOG2E / 3.0, LOG2E / 0.8]  # one pass for 0.8, two for 3.0
    together = _relative(x.clone(), top, scales)
    for i, s in enumerate(scales):
        assert torch.equal(together[i : i + 1], _relative(x[i : i + 1].clone(), top[i : i + 1], [s]))
