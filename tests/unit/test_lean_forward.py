"""The engine's lean forward equals transformers' forward: logits in fp32 on random Llama, Qwen2 and Qwen3 models
through the runner's own paths (a left-padded prefill, decode steps with and without padding, rows leaving and
joining, a prefill continuing a cached prefix, every position's logits), and greedy engine texts with the lean
forward on and off; other architectures and `off` keep transformers' forward."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from tests.unit.test_engine import LENGTHS, PROMPTS, tiny
from tests.unit.test_handler import make_handler
from worker.engine import runner
from worker.engine.lean import LeanForward, lean_forward_for, unsupported
from worker.engine.prefix_cache import Prefix, row_kv
from worker.handler import GenerationRequest

TOL = 2e-5  # fp32: the same operations in (almost) the same order


def model(arch: str, **extra: Any) -> Any:
    config_cls, model_cls = {
        "llama": ("LlamaConfig", "LlamaForCausalLM"),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
        "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
        "mistral": ("MistralConfig", "MistralForCausalLM"),
    }[arch]
    torch.manual_seed(0)
    shape: dict[str, Any] = dict(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        **({"head_dim": 16} if arch == "qwen3" else {}),
    )
    config = getattr(transformers, config_cls)(**(shape | extra))
    m = getattr(transformers, model_cls)(config).eval()
    if arch == "qwen2":  # a random init leaves the q/k/v biases at zero: give them values to check they are applied
        for layer in m.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.5)
    return m


def prompts(seed: int, lengths: list[int]) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 320, (n,), generator=g).tolist() for n in lengths]


def assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape
    assert torch.isfinite(got).all()
    assert (got - want).abs().max().item() < TOL, (got - want).abs().max().item()


def assert_same_kv(a: runner.KVBatch, b: runner.KVBatch) -> None:
    assert a.mask is not None and b.mask is not None and torch.equal(a.mask, b.mask)
    real = a.mask.bool()[:, None, :, None]
    for la, lb in zip(a.cache.layers, b.cache.layers):
        assert_close(la.keys * real, lb.keys * real)
        assert_close(la.values * real, lb.values * real)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@torch.inference_mode()
def test_logits_equal_transformers_through_prefill_decode_leave_and_join(arch: str) -> None:
    m = model(arch)
    lean = lean_forward_for(m)
    assert isinstance(lean, LeanForward)
    batches, logits = [], []
    for fwd in (lean, None):  # the same steps with the lean forward, then with transformers'
        batch, first = runner.prefill(m, prompts(1, [7, 3, 12]), 0, lean=fwd)
        seen = [first]
        batch.last = first.argmax(-1)
        for step in range(6):
            if step == 2:  # the middle row leaves
                batch.keep([0, 2])
                batch.last = seen[-1][[0, 2]].argmax(-1)
            if step == 4:  # two rows join, one longer than the batch's cache
                new, joined = runner.prefill(m, prompts(2, [30, 4]), 0, lean=fwd)
                new.last = joined.argmax(-1)
                batch.merge(new)
                seen.append(joined)
            out = runner.decode(m, batch, fwd)
            seen.append(out)
            batch.last = out.argmax(-1)
        batches.append(batch)
        logits.append(seen)
    for got, want in zip(*logits):
        assert_close(got, want)
    assert_same_kv(*batches)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@torch.inference_mode()
def test_unpadded_steps_and_every_position_match(arch: str) -> None:
    """Rows of one length: the prefill is plainly causal and a decode step runs with no mask at all."""
    m = model(arch)
    lean = lean_forward_for(m)
    ids = torch.tensor(prompts(3, [9, 9]))
    mask = torch.ones_like(ids)
    pos = torch.arange(9).expand(2, -1)
    caches = [runner.new_cache(ids.device), runner.new_cache(ids.device)]
    want = runner.forward(m, None, ids, mask, pos, caches[1], padded=False, all_logits=True)
    got = runner.forward(m, lean, ids, mask, pos, caches[0], padded=False, all_logits=True)
    assert want.shape == (2, 9, 320)
    assert_close(got, want)
    batches = []
    for fwd, cache in zip((lean, None), caches):
        batch = runner.KVBatch()
        batch.cache, batch.mask, batch.pos, batch.last = cache, mask, torch.tensor([9, 9]), want[:, -1].argmax(-1)
        batches.append(runner.decode(m, batch, fwd))
    assert_close(*batches)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@torch.inference_mode()
def test_a_prefill_continuing_a_cached_prefix_matches(arch: str) -> None:
    m = model(arch)
    lean = lean_forward_for(m)
    shared = prompts(4, [16])[0]
    base, _ = runner.prefill(m, [shared], 0)
    prefix = Prefix(tuple(shared), row_kv(base.cache.layers, 0, 0, len(shared)))
    rests = prompts(5, [5, 1, 9])
    (got_batch, got), (want_batch, want) = (runner.prefill(m, rests, 0, prefix, fwd) for fwd in (lean, None))
    assert_close(got, want)
    assert_same_kv(got_batch, want_batch)
    whole, alone = runner.prefill(m, [shared + r for r in rests], 0, lean=lean)  # the same rows without the prefix
    assert (alone - want).abs().max().item() < 1e-4
    assert whole.pos is not None and got_batch.pos is not None and torch.equal(whole.pos, got_batch.pos)


def test_other_architectures_sliding_windows_and_off_keep_transformers() -> None:
    assert unsupported(model("llama")) is None
    assert lean_forward_for(model("llama"), "off") is None
    assert "MistralForCausalLM" in (unsupported(model("mistral")) or "")
    assert unsupported(model("qwen2", use_sliding_window=True, sliding_window=8)) == "sliding-window attention"
    with pytest.raises(ValueError, match="lean_forward"):
        lean_forward_for(model("llama"), "on")


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_greedy_engine_texts_equal_with_the_lean_forward_on_and_off(
    arch: str, demo_model: Path, tmp_path: Path
) -> None:
    """Staggered joins and leaves through the whole engine: the same texts either way, the lean one in use."""
    handler = make_handler(str(tiny(arch, tmp_path / arch, demo_model, layers=2)), dtype="fp32")
    texts = []
    for mode in ("auto", "off"):
        engine = handler.engine(lean_forward=mode)  # type: ignore[arg-type]  # a str setting beside the ints
        assert (engine.lean is not None) == (mode == "auto")
        seqs = []
        for i, (p, n) in enumerate(zip(PROMPTS, LENGTHS)):
            req = GenerationRequest(prompt=p, max_new_tokens=n, ignore_eos=True)
            seqs.append(handler.sequences(req, str(i), budget=60)[0][0])
            engine.add(seqs[-1])
            engine.step()
        while len(engine):
            engine.step()
        texts.append([s.text for s in seqs])
    assert texts[0] == texts[1]
    assert all(texts[0])
