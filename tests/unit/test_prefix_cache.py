"""The prefix cache across jobs: greedy outputs equal the engine without it (demo model, random Qwen2 and Llama),
rows of different cached prefix lengths in one batch, a bulk admission computes its shared instruction once,
eviction under load stays bounded and correct, cancel mid-run, and `cached_tokens` in the usage."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.unit.test_engine import tiny
from tests.unit.test_handler import make_handler
from worker.bulk import result_line
from worker.engine import Engine, Seq, runner
from worker.engine.prefix_cache import BLOCK, PrefixCache, prefix_cache_for
from worker.handler import GenerationRequest, ModelHandler

ZEN = (
    "Beautiful is better than ugly. Explicit is better than implicit. Simple is better than complex. "
    "Complex is better than complicated. Flat is better than nested. Sparse is better than dense. "
)
DOCS = [
    "Errors should never",
    "Now is better than never. Although never is",
    "In the face of ambiguity,",
    "There should be one",
    "Readability",
    "Special cases aren't special enough",
]


@pytest.fixture(scope="module", params=["qwen2", "llama", "demo"])
def handler(request: pytest.FixtureRequest, demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> ModelHandler:
    if request.param == "demo":
        return make_handler(str(demo_model))
    # The random models in fp32: their near-tied logits flip under bf16's rounding, which differs between a
    # whole prompt's prefill and a reused prefix plus the rest (as between a padded batch and a lone row).
    return make_handler(str(tiny(request.param, tmp_path_factory.mktemp(request.param), demo_model)), dtype="fp32")


def req(prompt: str, n: int = 10) -> GenerationRequest:
    return GenerationRequest(prompt=prompt, max_new_tokens=n, ignore_eos=True)


def run(
    handler: ModelHandler, reqs: list[GenerationRequest], tokens: int, engine: Engine | None = None, every: int = 0
) -> list[Seq]:
    """The requests through one engine (arriving together, or one every `every` steps); checks the bound."""
    engine = handler.engine(prefix_cache_tokens=tokens) if engine is None else engine
    seqs = [handler.sequences(r, str(i), budget=60)[0][0] for i, r in enumerate(reqs)]
    pending, steps = list(seqs), 0
    if not every:
        for seq in pending:
            engine.add(seq)
        pending = []
    while pending or len(engine):
        if pending and steps % every == 0:
            engine.add(pending.pop(0))
        engine.step()
        steps += 1
        cache = engine.prefix_cache
        assert cache is None or cache.tokens <= tokens
    return seqs


def texts(seqs: list[Seq]) -> list[str]:
    return [s.text for s in seqs]


def test_rows_of_different_cached_prefix_lengths_match_no_cache(handler: ModelHandler) -> None:
    engine = handler.engine(prefix_cache_tokens=16384)
    first = ZEN + DOCS[0] + " pass silently. Unless explicitly silenced."
    warm = [req(first), req(ZEN[:60] + DOCS[1])]
    assert texts(run(handler, warm, 16384, engine)) == texts(run(handler, warm, 0))
    later = [
        req(first + " In the face"),  # a follow-up: the first job's prompt and more
        req(ZEN + DOCS[2]),  # the shared instruction
        req(ZEN[:60] + DOCS[3], 14),  # a shorter cached prefix
        req(DOCS[4]),  # nothing cached
    ]
    seqs = run(handler, later, 16384, engine)
    assert texts(seqs) == texts(run(handler, later, 0))
    cached = [s.cached for s in seqs]
    assert cached[0] > cached[1] > cached[2] > 0 and cached[3] == 0
    assert all(c % BLOCK == 0 and c < len(s.prompt) for c, s in zip(cached, seqs))


def test_staggered_arrivals_and_n_samples_match_no_cache(handler: ModelHandler) -> None:
    reqs = [req(ZEN + d, 8) for d in DOCS]
    on = run(handler, reqs, 16384, every=3)
    assert texts(on) == texts(run(handler, reqs, 0, every=3))
    assert on[0].cached == 0 and all(s.cached > 0 for s in on[1:])  # later arrivals reuse the first's prefix
    sampled = GenerationRequest(prompt=ZEN + DOCS[1], max_new_tokens=6, n=3, temperature=1.0, seed=5, ignore_eos=True)
    on, off = handler.engine(prefix_cache_tokens=16384), handler.engine(prefix_cache_tokens=0)
    run(handler, [req(ZEN + DOCS[0], 2)], 16384, on)
    outs = []
    for engine in (on, off):
        seqs = handler.sequences(sampled, "s", budget=60)[0]
        for seq in seqs:
            engine.add(seq)
        while len(engine):
            engine.step()
        outs.append([s.text for s in seqs])
    assert outs[0] == outs[1]
    assert [s.cached for s in seqs] == [0, 0, 0]  # the engine without the cache


def count_tokens(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Real (unmasked) new tokens each forward computes, through the runner's one forward function (the lean
    forward or transformers')."""
    counts: list[int] = []
    real = runner.forward

    def counted(model: Any, lean: Any, ids: torch.Tensor, mask: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        counts.append(int(mask[:, -ids.shape[1] :].sum()))
        return real(model, lean, ids, mask, *args, **kwargs)

    monkeypatch.setattr(runner, "forward", counted)
    return counts


def test_bulk_admission_computes_the_shared_instruction_once(
    handler: ModelHandler, monkeypatch: pytest.MonkeyPatch
) -> None:
    instruction = ZEN * 2
    reqs = [req(instruction + d, 4) for d in DOCS]
    prompts = [handler.encode(r)[0] for r in reqs]
    shared = min(len(p) for p in prompts)
    while any(p[:shared] != prompts[0][:shared] for p in prompts):
        shared -= 1
    shared = shared // BLOCK * BLOCK
    counts = count_tokens(monkeypatch)
    off = run(handler, reqs, 0)
    spent_off, counts[:] = sum(counts), []
    on = run(handler, reqs, 16384)
    spent_on = sum(counts)
    assert texts(on) == texts(off)
    assert spent_off - spent_on == (len(reqs) - 1) * shared  # every line but one skipped the instruction
    results = [handler.result([s], len(p), False, r) for s, p, r in zip(on, prompts, reqs)]
    assert [r.usage()["prompt_tokens_details"] for r in results] == [{"cached_tokens": shared}] * len(reqs)
    line = result_line("batch_x", {"line": 0, "custom_id": "a"}, results[0])
    assert line["response"]["body"]["output"]["usage"]["prompt_tokens_details"] == {"cached_tokens": shared}
    assert handler.result(off[:1], len(prompts[0]), False, reqs[0]).cached_tokens == 0


def test_eviction_under_load_stays_bounded_and_correct(handler: ModelHandler) -> None:
    """Three blocks for many prompts sharing prefixes: entries are evicted while prefills use them."""
    bound = 3 * BLOCK
    reqs = [req(ZEN[: 40 + 25 * (i % 4)] + d, 6) for i, d in enumerate(DOCS * 2)]
    engine = handler.engine(prefix_cache_tokens=bound)
    assert texts(run(handler, reqs, bound, engine, every=2)) == texts(run(handler, reqs, 0, every=2))
    cache = engine.prefix_cache
    assert cache is not None and cache.evicted_tokens > 0 and 0 < cache.tokens <= bound
    assert texts(run(handler, reqs, bound, engine)) == texts(run(handler, reqs, 0))


def test_cancel_mid_run_spares_the_others_and_the_cache(handler: ModelHandler) -> None:
    reqs = [req(ZEN + d, 20) for d in DOCS[:3]]
    expected = texts(run(handler, reqs, 0))
    engine = handler.engine(prefix_cache_tokens=16384)
    seqs = [handler.sequences(r, str(i), budget=60)[0][0] for i, r in enumerate(reqs)]
    for seq in seqs:
        engine.add(seq)
    for _ in range(4):
        engine.step()
    seqs[1].canceled = True
    while len(engine):
        engine.step()
    assert seqs[1].finish_reason == "canceled" and expected[1].startswith(seqs[1].text)
    assert [seqs[0].text, seqs[2].text] == [expected[0], expected[2]]
    again = run(handler, reqs[1:2], 16384, engine)  # the canceled prompt, later: served from the cache
    assert texts(again) == expected[1:2] and again[0].cached > 0


def test_a_resumed_job_continues_identically_from_the_cache(handler: ModelHandler) -> None:
    """A job taken over after its worker died resumes with its generated ids as context: the prefix its new
    engine already holds is reused, and its text is the uninterrupted one."""
    job = req(ZEN + DOCS[1], 16)
    whole = run(handler, [job], 0)[0]
    engine = handler.engine(prefix_cache_tokens=16384)
    run(handler, [req(ZEN + DOCS[0], 2)], 16384, engine)  # the shared instruction is cached
    resumed = handler.sequences(job, "r", budget=60, resume=whole.out[:5])[0][0]
    engine.add(resumed)
    while len(engine):
        engine.step()
    assert resumed.out == whole.out and resumed.text == whole.text
    result = handler.result([resumed], len(resumed.prompt), False, job)
    assert 0 < result.cached_tokens == resumed.cached <= result.prompt_tokens


def test_lru_keeps_chains_whole_and_counts_tokens() -> None:
    kv = torch.arange(4 * BLOCK, dtype=torch.float32).reshape(1, 1, 1, 4 * BLOCK, 1)
    cache = PrefixCache(3 * BLOCK)

    def fetch(start: int, end: int) -> torch.Tensor:
        return kv[:, :, :, start:end]

    a, b = list(range(4 * BLOCK)), list(range(BLOCK)) + [-1] * BLOCK + [-2]
    assert cache.put(a, fetch) == 3 and cache.tokens == 3 * BLOCK  # as many blocks as fit
    assert cache.match(a) == 3 * BLOCK and cache.match(a[: 3 * BLOCK]) == 2 * BLOCK  # the last token is computed
    prefix = cache.get(a)
    assert prefix is not None and torch.equal(prefix.kv, kv[:, :, :, : 3 * BLOCK])
    assert cache.put(b, fetch) == 1  # evicts a's last block (a leaf), never the shared first one
    assert cache.match(a) == 2 * BLOCK and cache.match(b) == 2 * BLOCK and cache.tokens == 3 * BLOCK
    prefix.kv.zero_()  # what a lookup hands out is a copy
    assert torch.equal(cache.get(a).kv, kv[:, :, :, : 2 * BLOCK])  # type: ignore[union-attr]
    assert cache.put(list(range(100, 100 + 3 * BLOCK)), fetch) == 3 and cache.match(a) == 0  # all of it goes
    assert PrefixCache(BLOCK - 1).put(a, fetch) == 0


def test_disabled_for_sliding_windows_and_zero(demo_model: Path, tmp_path: Path) -> None:
    mistral = make_handler(str(tiny("mistral", tmp_path / "mistral", demo_model)), dtype="fp32")
    assert prefix_cache_for(mistral.model, 16384) is None
    qwen2 = make_handler(str(tiny("qwen2", tmp_path / "qwen2", demo_model)), dtype="fp32")
    assert prefix_cache_for(qwen2.model, 0) is None and prefix_cache_for(qwen2.model, 16384) is not None
    assert qwen2.engine().prefix_cache is not None  # on by default (engine.prefix_cache_tokens)


def test_a_row_that_scores_its_prompt_computes_every_position(handler: ModelHandler) -> None:
    """echo with logprobs: the prompt's logprobs come from the row's own prefill, which bypasses the cached prefix
    (a plain row with the same prompt still reuses it) and equal a lone forward of the model; max_new_tokens 0
    ends at the prefill with no token."""
    engine = handler.engine(prefix_cache_tokens=16384)
    run(handler, [req(ZEN + DOCS[0], 2)], 16384, engine)  # caches ZEN's blocks
    scoring = GenerationRequest(prompt=ZEN + DOCS[1], max_new_tokens=0, echo=True, logprobs=True, top_logprobs=1)
    short = GenerationRequest(prompt=DOCS[2], max_new_tokens=1, echo=True, logprobs=True)
    seqs = run(handler, [scoring, req(ZEN + DOCS[1], 2), short], 16384, engine)
    assert seqs[0].cached == 0 and seqs[1].cached >= len(handler.encode(req(ZEN))[0]) - BLOCK
    assert seqs[0].out == [] and seqs[0].finish_reason == "length" and len(seqs[2].out) == 1
    tolerance = 1e-4 if handler.model.dtype == torch.float32 else 0.1  # bf16: a padded batch rounds otherwise
    for seq in (seqs[0], seqs[2]):
        with torch.no_grad():  # a lone prefill of the prompt through the engine's own forward (lean or not)
            _, logits = runner.prefill(handler.model, [seq.prompt], handler.pad_id, None, engine.lean, all_logits=True)
            lp = torch.log_softmax(logits[0].float(), dim=-1)
        want = [lp[i - 1, seq.prompt[i]].item() for i in range(1, len(seq.prompt))]
        scores = seq.prompt_scores
        assert [s[0] for s in scores] == seq.prompt and scores[0][1] is None
        assert [s[1] for s in scores[1:]] == pytest.approx(want, abs=tolerance)
    assert all(len(s[2]) == 1 and s[2][0][1] >= s[1] for s in seqs[0].prompt_scores[1:])  # the top alternative
    assert seqs[2].prompt_scores and not seqs[1].prompt_scores
