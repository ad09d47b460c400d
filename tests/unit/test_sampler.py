"""The batched sampler without a model: seeded rows sample the same tokens alone and in any batch, no global RNG
is touched, top-k / top-p keep the right tokens, draws follow the distribution, extreme settings never fail."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest
import torch

from worker.engine.draw import argmax as _argmax
from worker.engine.draw import topk as _topk
from worker.engine.sampler import RowPlan, _add_bias, _penalize, choose
from worker.engine.sequence import Sampling

pytestmark = pytest.mark.usefixtures("sampler_path")  # the C pass and the tensor path
V = 1000


def plan(seed: int, offset: int = 0, **kw: float) -> RowPlan:
    sampling = Sampling(seed=seed, **kw)  # type: ignore[arg-type]
    sampling.make_generator(offset=offset)
    return RowPlan(sampling, [], [])


def logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, V, generator=torch.Generator().manual_seed(seed)) * 3


SETTINGS: list[dict[str, float]] = [
    {"temperature": 0.7},
    {"temperature": 1.3, "top_k": 20},
    {"temperature": 1.0, "top_p": 0.9},
    {"temperature": 0.9, "top_k": 50, "top_p": 0.8},
    {"temperature": 1.0, "top_p": 0.999},  # nucleus wider than the candidates: the full-sort path
    {},  # greedy
]


def test_a_seeded_row_samples_the_same_alone_and_in_any_batch() -> None:
    x = logits(len(SETTINGS))
    batch = [plan(i, **s) for i, s in enumerate(SETTINGS)]
    alone = [plan(i, **s) for i, s in enumerate(SETTINGS)]
    shuffled = [plan(i, **s) for i, s in enumerate(SETTINGS)]
    order = [3, 0, 5, 1, 4, 2]
    for _ in range(20):
        _, together, _ = choose(x, batch)
        single = [choose(x[i : i + 1], [alone[i]])[1][0] for i in range(len(SETTINGS))]
        _, mixed, _ = choose(x[order], [shuffled[i] for i in order])
        assert together == single == [mixed[order.index(i)] for i in range(len(SETTINGS))]


def test_no_global_rng_is_touched() -> None:
    torch_state, py_state = torch.random.get_rng_state(), random.getstate()
    unseeded = Sampling(temperature=1.0)  # no generator made: one from the OS on first use
    choose(logits(2), [plan(1, temperature=1.0, top_p=0.5), RowPlan(unseeded, [], [])])
    assert torch.equal(torch.random.get_rng_state(), torch_state) and random.getstate() == py_state


def test_top_k_and_top_p_keep_only_their_tokens() -> None:
    x = torch.full((1, V), -10.0)
    x[0, :4] = torch.tensor([3.0, 2.0, 1.0, 0.5])  # softmax over these four ~ 0.60 0.22 0.08 0.05
    seen_k = Counter(draws(x, 400, temperature=1.0, top_k=2))
    seen_p = Counter(draws(x, 400, temperature=1.0, top_p=0.7))
    assert set(seen_k) == {0, 1} and set(seen_p) == {0, 1}  # 0.60 < 0.7: the nucleus needs two tokens


def test_draws_follow_the_distribution() -> None:
    x = torch.full((1, V), float("-inf"))
    x[0, [7, 70, 700]] = torch.tensor([0.5, 0.2, 0.3]).log()
    counts = Counter(draws(x, 4000, temperature=1.0))
    assert set(counts) == {7, 70, 700}
    assert all(abs(counts[t] / 4000 - q) < 0.03 for t, q in [(7, 0.5), (70, 0.2), (700, 0.3)])


def draws(x: torch.Tensor, n: int, **kw: Any) -> list[int]:
    """One token from each of n rows equal to x's row, each with its own seeded stream (one step)."""
    return choose(x.expand(n, -1), [plan(1000 + i, **kw) for i in range(n)])[1]


def test_extreme_settings_and_empty_rows_take_the_argmax() -> None:
    x = logits(4)
    x[3] = float("-inf")  # nothing left to draw from (e.g. every token masked)
    plans = [
        plan(1, temperature=5e-324),
        plan(2, temperature=1.0, top_p=1e-300),
        plan(3, temperature=1.0, top_k=1),
        plan(4, temperature=1.0),
    ]
    tokens, ids, _ = choose(x, plans)
    best = x.argmax(-1).tolist()
    assert ids[1:] == best[1:] and tokens.tolist() == ids
    assert x[0, ids[0]] > 0  # a denormal temperature ties every positive logit at the largest float


def test_penalty_ban_and_logprobs() -> None:
    x = logits(2)
    sampling = Sampling(repetition_penalty=2.0)
    plans = [RowPlan(sampling, [int(x[0].argmax())], [], top_logprobs=2), RowPlan(Sampling(), [], [int(x[1].argmax())])]
    _, ids, lps = choose(x, plans)
    row0 = x[0].clone()
    top = int(row0.argmax())
    row0[top] = row0[top] / 2 if row0[top] > 0 else row0[top] * 2
    assert ids[0] == int(row0.argmax()) and ids[1] == int(x[1].topk(2).indices[1])  # banned: the runner-up
    lp = torch.log_softmax(x[0], -1)  # of the model's distribution, before any penalty
    chosen, alts = lps[0]
    assert abs(chosen - float(lp[ids[0]])) < 1e-6 and lps[1] is None
    assert [a for a, _ in alts] == lp.topk(2).indices.tolist()


def test_presence_frequency_penalties_and_logit_bias_change_exactly_their_logits() -> None:
    x = logits(2)
    pf = Sampling(presence_penalty=0.5, frequency_penalty=0.25)
    bias = Sampling(logit_bias={3: 100.0, 4: -7.5})
    plans = [RowPlan(pf, [], [], counts={3: 2, 9: 1}), RowPlan(bias, [], [])]
    got = x.clone()
    _penalize(got, plans)
    _add_bias(got, plans)
    want = x.clone()
    want[0, 3] -= 0.5 + 2 * 0.25
    want[0, 9] -= 0.5 + 0.25
    want[1, 3] += 100.0
    want[1, 4] -= 7.5
    assert torch.equal(got, want)
    _, ids, _ = choose(x, plans)
    assert ids[1] == 3  # +100: greedy takes it
    top = int(x[0].argmax())
    row = x[0:1].clone()
    row[0, top] -= 2.0 + 3 * 2.0  # presence + count x frequency: the greedy choice moves to the runner-up
    _, ids, _ = choose(
        x[0:1], [RowPlan(Sampling(presence_penalty=2.0, frequency_penalty=2.0), [], [], counts={top: 3})]
    )
    assert ids == [int(row.argmax())] and ids[0] != top


def test_min_p_keeps_only_tokens_near_the_top_after_temperature() -> None:
    x = torch.full((1, V), float("-inf"))
    x[0, :4] = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    # min_p 0.25: keeps p >= 0.125 (tokens 0, 1, 2); at temperature 0.5 the weights square: 0.25 0.09 0.0225 ...
    # relative to the top 1, 0.36, 0.09: only tokens 0 and 1 pass 0.25
    seen_wide = Counter(draws(x, 1000, temperature=1.0, min_p=0.25))
    seen_sharp = Counter(draws(x, 1000, temperature=0.5, min_p=0.25))
    assert set(seen_wide) == {0, 1, 2} and set(seen_sharp) == {0, 1}
    assert abs(seen_wide[0] / 1000 - 0.5 / 0.95) < 0.05  # renormalised over what is kept


def test_top_p_rejection_draws_follow_the_renormalised_nucleus() -> None:
    x = torch.randn(1, V, generator=torch.Generator().manual_seed(3)) - 30  # a long, flat tail of ~1e-13 each
    x[0, [11, 22, 33, 44]] = torch.tensor([0.4, 0.3, 0.2, 0.1]).log()
    # heavier than 44: 0.9 > 0.75; heavier than 33: 0.7 <= 0.75
    counts = Counter(draws(x, 3000, temperature=1.0, top_p=0.75))
    assert set(counts) == {11, 22, 33}
    assert all(abs(counts[t] / 3000 - q) < 0.03 for t, q in [(11, 4 / 9), (22, 3 / 9), (33, 2 / 9)])
    y = torch.zeros(1, V)  # a flat row: the nucleus is half the vocabulary
    y[0, V // 2 :] = -1.0  # the first half (tied, so all of it) holds 0.73 of the mass: the nucleus
    drawn = draws(y, 300, temperature=1.0, top_p=0.5)
    assert all(t < V // 2 for t in drawn) and len(set(drawn)) > 180  # ~225 distinct of 500 expected


def test_every_setting_samples_the_same_alone_and_in_any_batch() -> None:
    settings: list[dict[str, Any]] = [
        {"temperature": 0.8, "min_p": 0.05, "presence_penalty": 0.7, "frequency_penalty": 0.4},
        {"temperature": 1.0, "top_p": 0.5, "logit_bias": {5: 3.0, 6: -2.0}},
        {"temperature": 1.2, "top_k": 30, "top_p": 0.9, "min_p": 0.01},
        {"temperature": 1.0, "top_p": 0.95, "repetition_penalty": 1.3},
        {"logit_bias": {7: 50.0}, "frequency_penalty": 1.0},  # greedy
    ]
    x = logits(len(settings), seed=4)

    def plans() -> list[RowPlan]:
        out = []
        for i, s in enumerate(settings):
            sampling = Sampling(seed=100 + i, **s)
            sampling.make_generator()
            out.append(RowPlan(sampling, [1, 2, 3], [9], counts={4: 2, 8: 1}))
        return out

    batch, alone, shuffled = plans(), plans(), plans()
    order = [4, 2, 0, 3, 1]
    for _ in range(15):
        _, together, _ = choose(x, batch)
        single = [choose(x[i : i + 1], [alone[i]])[1][0] for i in range(len(settings))]
        _, mixed, _ = choose(x[order], [shuffled[i] for i in order])
        assert together == single == [mixed[order.index(i)] for i in range(len(settings))]
        assert 9 not in together and together[4] == 7


def test_argmax_and_top_k_by_blocks_equal_torch() -> None:
    x = torch.randn(6, 64 * 40 + 17, generator=torch.Generator().manual_seed(5))
    x[1, 100] = x[1, 2000] = 50.0  # a tie: the first wins, as argmax's
    x[2, -3] = 60.0  # in the last, partial block
    assert torch.equal(_argmax(x), x.argmax(-1))
    y = x[:, : 64 * 40]
    for k in (1, 5, 10):
        vals, ids = _topk(y, k)
        ref = torch.topk(y, k)
        assert torch.equal(vals, ref.values) and torch.equal(y.gather(1, ids), ref.values)
