"""The batched sampler without a model: seeded rows sample the same tokens alone and in any batch, no global RNG
is touched, top-k / top-p keep the right tokens, draws follow the distribution, extreme settings never fail."""

from __future__ import annotations

import random
from collections import Counter

import torch

from worker.engine.sampler import RowPlan, choose
from worker.engine.sequence import Sampling

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
    seen_k, seen_p = Counter(), Counter()
    k_plan, p_plan = plan(1, temperature=1.0, top_k=2), plan(2, temperature=1.0, top_p=0.7)
    for _ in range(400):
        seen_k[choose(x, [k_plan])[1][0]] += 1
        seen_p[choose(x, [p_plan])[1][0]] += 1
    assert set(seen_k) == {0, 1} and set(seen_p) == {0, 1}  # 0.60 < 0.7: the nucleus needs two tokens


def test_draws_follow_the_distribution() -> None:
    x = torch.full((1, V), float("-inf"))
    x[0, [7, 70, 700]] = torch.tensor([0.5, 0.2, 0.3]).log()
    p = plan(3, temperature=1.0)
    counts = Counter(choose(x, [p])[1][0] for _ in range(4000))
    assert set(counts) == {7, 70, 700}
    assert all(abs(counts[t] / 4000 - q) < 0.03 for t, q in [(7, 0.5), (70, 0.2), (700, 0.3)])


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
