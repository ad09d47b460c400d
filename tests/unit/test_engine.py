"""The batching engine in-process: batched and staggered outputs equal one-at-a-time `generate`, on
random Qwen2 and Llama models and the demo model; per-row sampling, cancel, budget, logprobs, n."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from qwen_deploy.queues import Lane
from tests.unit.test_handler import make_handler
from worker.engine import Seq
from worker.handler import GenerationRequest, ModelHandler

PROMPTS = [
    "Beautiful is better than",
    "Errors should never",
    "Simple is",
    "a",
    "Now is better than never. Although never is",
    "Flat is better than nested. Sparse",
    "In the face of ambiguity,",
    "There should be one",
]
LENGTHS = [5, 17, 30, 8, 12, 25, 3, 20]


def tiny(arch: str, out: Path, tokenizer_dir: Path, layers: int = 2) -> Path:
    import transformers

    classes = {
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
        "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
        "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
        "gpt2": ("GPT2Config", "GPT2LMHeadModel", {}),  # learned absolute positions
        # sliding-window attention over 8 positions: prompts and outputs here are longer
        "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 8}),
        "gemma3": (
            "Gemma3TextConfig",
            "Gemma3ForCausalLM",
            {
                "head_dim": 16,
                "sliding_window": 8,
                "layer_types": ["sliding_attention"] * (layers - 1) + ["full_attention"],
            },
        ),
    }
    config_cls, model_cls, extra = classes[arch]
    tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    common = dict(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **extra,
    )
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**common))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module", params=["qwen2", "llama", "demo"])
def handler(request: pytest.FixtureRequest, demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> ModelHandler:
    """The demo model in the default dtype (bf16 on a CPU with native bf16); the random models in fp32: their
    near-tied logits flip under bf16's rounding, which differs between a padded batch and a lone row."""
    if request.param == "demo":
        return make_handler(str(demo_model))
    return make_handler(str(tiny(request.param, tmp_path_factory.mktemp(request.param), demo_model)), dtype="fp32")


def greedy_ids(handler: ModelHandler, ids: list[int], n: int, ignore_eos: bool = True) -> list[int]:
    """transformers' own greedy `generate` of up to `n` tokens after `ids` (exactly `n` with `ignore_eos`)."""
    x = torch.tensor([ids])
    out = handler.model.generate(
        x,
        attention_mask=torch.ones_like(x),
        max_new_tokens=n,
        min_new_tokens=n if ignore_eos else None,
        do_sample=False,
        eos_token_id=handler.eos_ids,
        pad_token_id=handler.pad_id,
    )
    return [int(t) for t in out[0, len(ids) :]]


def reference(handler: ModelHandler, req: GenerationRequest) -> str:
    """transformers' own greedy `generate`, one request at a time."""
    ids, _ = handler.encode(req)
    return handler.decode(greedy_ids(handler, ids, req.max_new_tokens, req.ignore_eos))


def requests(random_model: bool) -> list[GenerationRequest]:
    return [GenerationRequest(prompt=p, max_new_tokens=n, ignore_eos=random_model) for p, n in zip(PROMPTS, LENGTHS)]


def test_batched_equals_generate_one_at_a_time(handler: ModelHandler) -> None:
    reqs = requests("demo-model" not in handler.info.name)  # type: ignore[union-attr]
    expected = [reference(handler, r) for r in reqs]
    batched = handler.generate_batch(reqs)
    assert [r.text for r in batched] == expected  # type: ignore[union-attr]
    if reqs[0].ignore_eos:
        assert [r.completion_tokens for r in batched] == LENGTHS  # type: ignore[union-attr]


def test_staggered_joins_match(handler: ModelHandler) -> None:
    """Rows that join mid-flight (and rows that leave) do not change anyone's tokens."""
    reqs = requests("demo-model" not in handler.info.name)  # type: ignore[union-attr]
    expected = [reference(handler, r) for r in reqs]
    engine = handler.engine()
    seqs = [handler.sequences(r, str(i), budget=60)[0][0] for i, r in enumerate(reqs)]
    pending = list(seqs)
    steps = 0
    while pending or len(engine):
        if pending and steps % 3 == 0:  # one arrival every three decode steps
            engine.add(pending.pop(0))
        engine.step()
        steps += 1
    assert [s.text for s in seqs] == expected


def test_a_wider_arrival_pads_the_rows_already_running(handler: ModelHandler) -> None:
    """A row running alone has no padding; a longer arrival merged beside it gives it padding columns, which
    every later step must mask (the lean forward skips the mask of a batch it believes unpadded). Both rows keep
    the tokens they get alone, and so does a row left alone again, then joined by a longer one once more."""
    random_model = "demo-model" not in handler.info.name  # type: ignore[union-attr]
    short = GenerationRequest(prompt="a", max_new_tokens=16, ignore_eos=random_model)
    long = GenerationRequest(prompt=PROMPTS[4] + " " + PROMPTS[5], max_new_tokens=6, ignore_eos=random_model)
    longer = GenerationRequest(prompt=" ".join(PROMPTS), max_new_tokens=6, ignore_eos=random_model)
    expected = [reference(handler, r) for r in (short, long, longer)]
    engine = handler.engine()
    batch = engine.scheduler.lanes[Lane.INTERACTIVE].batch
    seqs = [handler.sequences(r, str(i), budget=60)[0][0] for i, r in enumerate((short, long, longer))]
    engine.add(seqs[0])
    engine.step()
    assert batch.rows == 1 and not batch.padded
    engine.add(seqs[1])
    engine.step()
    assert batch.rows == 2 and batch.padded and batch.width > len(seqs[0].prompt) + len(seqs[0].out)
    while not seqs[1].done:
        engine.step()
    engine.step()  # the long row has left: the short one runs alone again, its padding columns dropped
    if not seqs[0].done:
        assert batch.rows == 1 and not batch.padded
    engine.add(seqs[2])
    while len(engine):
        engine.step()
    assert [s.text for s in seqs] == expected


def test_random_arrivals_resumes_and_shared_prefixes_match_generate(handler: ModelHandler) -> None:
    """Seeded random traffic on a 3-row engine: arrivals at random steps, prompts of 1-80 tokens sharing
    prefixes (prefix-cache hits), some resumed after some of their tokens (a hand-back's resume); every row's
    greedy tokens are `generate`'s."""
    if "demo-model" in handler.info.name:  # type: ignore[union-attr]
        pytest.skip("fp32 random models: exact equality with generate")
    rng = random.Random(5)
    vocab = handler.vocab_size
    stem = [rng.randrange(5, vocab) for _ in range(60)]
    prompts = [
        stem[: rng.randint(1, 60)] + [rng.randrange(5, vocab) for _ in range(rng.randint(0, 20))] for _ in range(6)
    ]
    expected: dict[tuple[int, int], list[int]] = {}

    def greedy(p: int, n: int) -> list[int]:
        if (p, n) not in expected:
            expected[p, n] = greedy_ids(handler, prompts[p], n)
        return expected[p, n]

    checked = 0
    for _ in range(4):
        engine = handler.engine(max_batch=3)
        arrivals = sorted((rng.randint(0, 30), j, rng.randrange(len(prompts)), rng.randint(1, 24)) for j in range(6))
        seqs: list[tuple[Seq, int, int]] = []
        step = 0
        while arrivals or len(engine):
            while arrivals and arrivals[0][0] <= step:
                _, j, p, n = arrivals.pop(0)
                done = greedy(p, n)[: rng.choice([0, 0, rng.randint(1, n)])]  # resumed after these tokens
                seq = Seq(f"s{j}", list(prompts[p]), n, ignore_eos=True, out=list(done), tag=(j, 0))
                seqs.append((seq, p, n))
                engine.add(seq)
            engine.step()
            step += 1
            batch = engine.scheduler.lanes[Lane.INTERACTIVE].batch  # a batch marked unpadded has no padding
            assert batch.mask is None or batch.padded or bool(batch.mask.all())
        assert [s.out for s, _, _ in seqs] == [greedy(p, n) for _, p, n in seqs]
        checked += len(seqs)
    assert checked == 24 and engine.prefix_cache is not None and engine.prefix_cache.hit_tokens > 0


def test_seeded_sampling_is_the_same_alone_and_batched(handler: ModelHandler) -> None:
    reqs = [
        GenerationRequest(
            prompt=p, max_new_tokens=10, temperature=0.9, top_p=0.9, top_k=20, seed=7 + i, repetition_penalty=2
        )
        for i, p in enumerate(PROMPTS)
    ]  # an integer penalty is fine
    alone = [handler.generate(r).text for r in reqs]
    batched = [r.text for r in handler.generate_batch(reqs)]  # type: ignore[union-attr]
    assert alone == batched
    if "demo-model" in handler.info.name:  # type: ignore[union-attr]
        return  # it has memorised its text: even sampled, it mostly repeats it
    unseeded = GenerationRequest(prompt=PROMPTS[0], max_new_tokens=10, temperature=1.0)
    texts = set()
    for _ in range(3):
        torch.manual_seed(0)  # the global RNG does not decide an unseeded job's tokens
        texts.add(handler.generate(unseeded).text)
    assert len(texts) > 1


def test_cancel_and_budget_stop_one_row_and_spare_the_others(handler: ModelHandler) -> None:
    reqs = [GenerationRequest(prompt=p, max_new_tokens=30, ignore_eos=True) for p in PROMPTS[:3]]
    expected = [reference(handler, r) for r in reqs]
    engine = handler.engine()
    seqs = [handler.sequences(r, str(i), budget=60)[0][0] for i, r in enumerate(reqs)]
    late: Seq = handler.sequences(reqs[0], "late", budget=0.0)[0][0]
    for seq in (*seqs, late):
        engine.add(seq)
    for _ in range(5):
        engine.step()
    seqs[1].canceled = True
    while len(engine):
        engine.step()
    assert seqs[1].finish_reason == "canceled" and 0 < len(seqs[1].out) < 30
    assert expected[1].startswith(seqs[1].text)
    assert late.finish_reason == "time_limit"
    assert [seqs[0].text, seqs[2].text] == [expected[0], expected[2]]
    assert [s.finish_reason for s in (seqs[0], seqs[2])] == ["length", "length"]


@pytest.mark.parametrize("arch", ["qwen3", "gpt2", "mistral", "gemma3"])
def test_other_architectures_and_sliding_windows_match_generate(arch: str, demo_model: Path, tmp_path: Path) -> None:
    """Qwen3, GPT-2, and models whose attention slides over 8 positions (Mistral; Gemma 3 mixing sliding and full
    layers): staggered joins, contexts past the window, still exactly `generate`'s text."""
    handler = make_handler(str(tiny(arch, tmp_path / arch, demo_model, layers=3)), dtype="fp32")
    reqs = [GenerationRequest(prompt=p, max_new_tokens=n, ignore_eos=True) for p, n in zip(PROMPTS, LENGTHS)][:5]
    expected = [reference(handler, r) for r in reqs]
    engine = handler.engine()
    seqs = []
    for i, r in enumerate(reqs):
        seqs.append(handler.sequences(r, str(i), budget=60)[0][0])
        engine.add(seqs[-1])
        for _ in range(3):
            engine.step()
    while len(engine):
        engine.step()
    assert [s.text for s in seqs] == expected


def test_extreme_sampling_values_never_fail_the_shared_step(handler: ModelHandler) -> None:
    """A denormal temperature or a tiny penalty overflows to inf; the row still gets a token, and the
    greedy job batched beside it keeps its one-at-a-time text."""
    plain = GenerationRequest(prompt=PROMPTS[0], max_new_tokens=12, ignore_eos=True)
    odd = [
        GenerationRequest(prompt=PROMPTS[1], max_new_tokens=12, ignore_eos=True, temperature=5e-324, seed=1),
        GenerationRequest(
            prompt=PROMPTS[2],
            max_new_tokens=12,
            ignore_eos=True,
            temperature=1.0,
            repetition_penalty=1e-300,
            top_p=1e-300,
            seed=2,
        ),
    ]
    engine = handler.engine()
    seqs = [handler.sequences(r, str(i), budget=60)[0][0] for i, r in enumerate([plain, *odd])]
    for seq in seqs:
        engine.add(seq)
    while len(engine):
        engine.step()
    assert [s.finish_reason for s in seqs] == ["length"] * 3
    assert [len(s.out) for s in seqs] == [12, 12, 12]
    assert seqs[0].text == reference(handler, plain)


def test_n_samples_share_a_prefill_and_logprobs(handler: ModelHandler) -> None:
    req = GenerationRequest(
        prompt=PROMPTS[1],
        max_new_tokens=6,
        n=3,
        temperature=1.0,
        seed=3,
        logprobs=True,
        top_logprobs=2,
        ignore_eos=True,
    )
    result = handler.generate(req)
    assert [c["index"] for c in result.choices] == [0, 1, 2]
    assert result.completion_tokens == 18 and result.text == result.choices[0]["text"]
    for choice in result.choices:
        content = choice["logprobs"]["content"]
        assert len(content) == 6 and all(e["logprob"] <= 0 for e in content)
        assert all(len(e["top_logprobs"]) == 2 for e in content)
        assert all(e["top_logprobs"][0]["logprob"] >= e["top_logprobs"][1]["logprob"] for e in content)
    greedy = handler.generate(
        GenerationRequest(prompt=PROMPTS[1], max_new_tokens=6, logprobs=True, top_logprobs=1, ignore_eos=True)
    )
    content = greedy.choices[0]["logprobs"]["content"]
    assert all(e["token"] == e["top_logprobs"][0]["token"] for e in content)  # greedy picks the top token


def test_stop_strings_in_a_batch(handler: ModelHandler) -> None:
    if "demo-model" not in handler.info.name:  # type: ignore[union-attr]
        pytest.skip("needs the demo model's known text")
    reqs = [
        GenerationRequest(prompt="Beautiful is better than", max_new_tokens=64, stop=["\n"]),
        GenerationRequest(prompt="Errors should never", max_new_tokens=64, stop=["silently"]),
        GenerationRequest(prompt="Simple is", max_new_tokens=4),
    ]
    out = handler.generate_batch(reqs)
    assert [(o.text, o.finish_reason) for o in out[:2]] == [(" ugly.", "stop"), (" pass ", "stop")]  # type: ignore[union-attr]
    assert [o.stop_sequence for o in out] == ["\n", "silently", None]  # type: ignore[union-attr]
    two = handler.generate(GenerationRequest(prompt="Errors should never", max_new_tokens=64, stop=["ly.", "silent"]))
    assert (two.text, two.stop_sequence) == (" pass ", "silent")  # the one found first, not the first given
    assert out[2].finish_reason == "length"  # type: ignore[union-attr]


@pytest.mark.parametrize("chunk", [3, 64])
def test_kv_grown_in_chunks_matches(handler: ModelHandler, chunk: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keys and values written into spare room (3: a new buffer every few steps and after every join and leave;
    64: rarely) give exactly the text of one-at-a-time `generate`, with rows joining and leaving."""
    from worker.engine import runner

    monkeypatch.setitem(runner.KV_CHUNK, "cpu", chunk)
    reqs = requests("demo-model" not in handler.info.name)  # type: ignore[union-attr]
    expected = [reference(handler, r) for r in reqs]
    engine = handler.engine()
    seqs = [handler.sequences(r, str(i), budget=60)[0][0] for i, r in enumerate(reqs)]
    pending, steps = list(seqs), 0
    while pending or len(engine):
        if pending and steps % 2 == 0:
            engine.add(pending.pop(0))
        engine.step()
        steps += 1
    assert [s.text for s in seqs] == expected
    assert runner.new_cache(handler.model.device).layer_class_to_replicate.chunk == chunk  # chunked layers in use


def test_min_tokens_stop_token_ids_and_logit_bias(handler: ModelHandler) -> None:
    """A +100 bias makes greedy pick a token at once; min_tokens bans it (as EOS or a stop token) until
    reached; a stop token ends the sample and is left out of its text."""
    if "demo-model" in handler.info.name or "llama" in handler.info.name:  # type: ignore[union-attr]
        pytest.skip("one model is enough")
    eos, word = handler.eos_ids[0], handler.tokenizer.encode(" better", add_special_tokens=False)[0]

    def run(**kw: object) -> Seq:
        req = GenerationRequest(prompt=PROMPTS[0], max_new_tokens=10, **kw)  # type: ignore[arg-type]
        seqs, _, _ = handler.sequences(req, "k", budget=60)
        engine = handler.engine()
        engine.add(seqs[0])
        while len(engine):
            engine.step()
        return seqs[0]

    plain = run(ignore_eos=True)
    to_eos = run(logit_bias={str(eos): 100})
    assert (to_eos.out, to_eos.finish_reason) == ([eos], "eos")
    late_eos = run(logit_bias={str(eos): 100}, min_tokens=3)
    assert late_eos.out[3] == eos and eos not in late_eos.out[:3] and late_eos.finish_reason == "eos"
    stopped = run(logit_bias={str(word): 100}, stop_token_ids=[word])
    assert (stopped.out, stopped.finish_reason, stopped.text) == ([word], "stop", "")
    late = run(logit_bias={str(word): 100}, stop_token_ids=[word], min_tokens=2)
    assert late.out[2] == word and word not in late.out[:2] and late.finish_reason == "stop"
    assert late.text == handler.decode(late.out[:2]) and late.text
    ends = run(ignore_eos=True, stop_token_ids=[plain.out[4]])  # a token the model picks on its own
    first = plain.out.index(plain.out[4])
    assert ends.out == plain.out[: first + 1] and ends.text == handler.decode(plain.out[:first])
    bad = handler.generate_batch([GenerationRequest(prompt="x", logit_bias={"99999999": 1.0})])[0]
    assert isinstance(bad, ValueError) and "logit_bias" in str(bad)


def test_scoring_prefills_keep_a_bounded_number_of_positions() -> None:
    """Rows that keep every position's logits (echo with logprobs) are prefilled in parts of at most
    SCORING_POSITIONS padded positions; a longer row runs alone."""
    from worker.engine.core import SCORING_POSITIONS, _bounded

    assert SCORING_POSITIONS == 4096
    seqs = [Seq(str(i), [1] * n, 1) for i, n in enumerate([900, 1000, 1000, 1000, 1000, 5000])]
    parts = _bounded([seqs[:5], seqs[5:]])
    assert [[len(s.prompt) for s in part] for part in parts] == [[900, 1000, 1000, 1000], [1000], [5000]]
