"""LoRA adapters per request: random PEFT adapters on random Qwen2 and Llama bases; greedy text with an adapter
equals PEFT's `merge_and_unload` of it, alone and in batches mixing three adapters and the base, n > 1;
the prefix cache keeps each adapter's prefixes apart; residency stays under `max_adapters` (LRU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qwen_deploy.adapters import AdapterError, check_base, read_adapter
from tests.unit.test_engine import PROMPTS, reference, tiny
from tests.unit.test_handler import make_handler
from worker.handler import GenerationRequest, ModelHandler

ADAPTERS = {  # name: (rank, alpha, rslora, targets)
    "a1": (4, 8, False, ["q_proj", "v_proj"]),
    "a2": (8, 16, True, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "a3": (64, 32, False, ["o_proj", "down_proj"]),
}
PREAMBLE = "The Zen of Python, by Tim Peters. Beautiful is better than ugly. Explicit is better than implicit. "


def make_adapter(base: Path, out: Path, rank: int, alpha: int, rslora: bool, targets: list[str], seed: int) -> Path:
    """A PEFT adapter with random A and B (B is zero at PEFT's init: no effect), saved in PEFT's format."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=alpha, use_rslora=rslora, target_modules=targets, init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn_like(param) * 0.3)
    peft_model.save_pretrained(out)
    return out


def merged(base: Path, adapter: Path) -> ModelHandler:
    """A handler whose model is the base with the adapter merged (PEFT's merge_and_unload, in-process)."""
    from peft import PeftModel

    handler = make_handler(str(base), dtype="fp32")
    handler.model = PeftModel.from_pretrained(handler.model, adapter).merge_and_unload().eval()
    return handler


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def lora_setup(request: pytest.FixtureRequest, demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp(f"lora-{request.param}")
    base = tiny(request.param, root / "base", demo_model)
    adapters = {name: make_adapter(base, root / name, *spec, seed=i) for i, (name, spec) in enumerate(ADAPTERS.items())}
    reqs = {
        name: [
            GenerationRequest(prompt=PREAMBLE + p, max_new_tokens=12, ignore_eos=True, adapter=name)
            for p in PROMPTS[:3]
        ]
        for name in [None, *adapters]
    }
    expected = {
        name: [
            reference(merged(base, adapters[name]) if name else make_handler(str(base), dtype="fp32"), r) for r in rs
        ]
        for name, rs in reqs.items()
    }
    return {"base": base, "root": root, "adapters": adapters, "reqs": reqs, "expected": expected}


def served(setup: dict, **engine: int) -> ModelHandler:
    handler = make_handler(
        str(setup["base"]),
        dtype="fp32",
        paths={"models_root": str(setup["root"])},
        model={
            "name_or_path": str(setup["base"]),
            "threads": 1,
            "dtype": "fp32",
            "adapters": {name: name for name in setup["adapters"]},
        },
        engine=engine,
    )
    return handler


def test_adapters_differ_from_the_base(lora_setup: dict) -> None:
    """The random adapters change the greedy text (else equality below would prove nothing)."""
    texts = {name: tuple(t) for name, t in lora_setup["expected"].items()}
    assert len(set(texts.values())) == len(texts)


def test_alone_equals_merged(lora_setup: dict) -> None:
    handler = served(lora_setup, prefix_cache_tokens=0)
    for name, reqs in lora_setup["reqs"].items():
        got = [handler.generate(r).text for r in reqs]
        assert got == lora_setup["expected"][name], name


@pytest.mark.parametrize("prefix_cache_tokens", [0, 4096])
def test_mixed_batch_equals_merged(lora_setup: dict, prefix_cache_tokens: int) -> None:
    """Three adapters and the base in one batch (interleaved rows, each prompt under every adapter); twice, so
    the second pass runs from the prefix cache where it is on, which must not hand one adapter's KV to another."""
    handler = served(lora_setup, prefix_cache_tokens=prefix_cache_tokens)
    names = list(lora_setup["reqs"])
    order = [(name, i) for i in range(3) for name in names]
    for _ in range(2):
        results = handler.generate_batch([lora_setup["reqs"][name][i] for name, i in order])
        got = {(name, i): r.text for (name, i), r in zip(order, results)}  # type: ignore[union-attr]
        assert got == {(n, i): lora_setup["expected"][n][i] for n, i in order}
    cached = [r.cached_tokens for r in results]  # type: ignore[union-attr]
    assert all(cached) if prefix_cache_tokens else not any(cached)


def test_n_samples_with_an_adapter(lora_setup: dict) -> None:
    handler = served(lora_setup)
    req = GenerationRequest(prompt=PREAMBLE + PROMPTS[1], max_new_tokens=12, ignore_eos=True, adapter="a2", n=3)
    base = GenerationRequest(prompt=PREAMBLE + PROMPTS[1], max_new_tokens=12, ignore_eos=True, n=2)
    with_adapter, plain = handler.generate_batch([req, base])
    assert [c["text"] for c in with_adapter.choices] == [lora_setup["expected"]["a2"][1]] * 3  # type: ignore[union-attr]
    assert [c["text"] for c in plain.choices] == [lora_setup["expected"][None][1]] * 2  # type: ignore[union-attr]


def test_lru_residency_under_max_adapters(lora_setup: dict) -> None:
    """Two resident at most: a third adapter evicts the least recently used one, which loads again on demand
    with the same output."""
    handler = served(lora_setup, max_adapters=2)
    adapters = handler.adapters
    assert adapters is not None and not adapters.resident  # config adapters load on first use
    for name in ["a1", "a2", "a1", "a3"]:
        assert handler.generate(lora_setup["reqs"][name][0]).text == lora_setup["expected"][name][0]
    assert list(adapters.resident) == ["a1", "a3"] and adapters.loads == 3
    # a batch of all three: one waits until another's rows finish, and all are right
    results = handler.generate_batch([lora_setup["reqs"][n][2] for n in ["a1", "a2", "a3"]])
    assert [r.text for r in results] == [lora_setup["expected"][n][2] for n in ["a1", "a2", "a3"]]  # type: ignore[union-attr]
    assert len(adapters.resident) == 2


def test_unknown_adapter_fails_alone(lora_setup: dict) -> None:
    handler = served(lora_setup)
    bad, good = handler.generate_batch([GenerationRequest(prompt="x", adapter="nope"), lora_setup["reqs"]["a1"][0]])
    assert isinstance(bad, LookupError) and "nope" in str(bad)
    assert good.text == lora_setup["expected"]["a1"][0]  # type: ignore[union-attr]


def test_an_adapter_for_another_base_is_refused(lora_setup: dict, tmp_path: Path) -> None:
    adapter = read_adapter(lora_setup["adapters"]["a2"])
    config = json.loads((lora_setup["base"] / "config.json").read_text())
    check_base(adapter, config, [str(lora_setup["base"])])
    wider = {**config, "intermediate_size": 256}
    with pytest.raises(AdapterError, match="down_proj: the adapter maps 128 -> 64.*256 -> 64"):
        check_base(adapter, wider, [str(lora_setup["base"])])
    with pytest.raises(AdapterError, match="trained on"):
        check_base(adapter, config, ["other-model"])
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8}))
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(AdapterError, match="not a safetensors file"):
        read_adapter(tmp_path)


def test_a_packed_bf16_projection_is_wrapped_too(lora_setup: dict) -> None:
    """bf16 on a CPU packs linear weights for oneDNN (worker/cpu_weights.py): the wrapper runs whatever module
    is there, and its rows get the same delta as on the plain layer."""
    from worker.cpu_weights import packing_available
    from worker.lora import AdapterSet

    if not packing_available():
        pytest.skip("no oneDNN weight packing in this torch")
    base = str(lora_setup["base"])
    handler = make_handler(base, model={"name_or_path": base, "threads": 1, "dtype": "bf16", "pack_cpu_weights": False})
    packed = make_handler(base, dtype="bf16")
    if "forward" not in vars(packed.model.get_submodule("model.layers.0.mlp.down_proj")):
        pytest.skip("this CPU's oneDNN refused to pack the layer")
    outs = []
    for h in (handler, packed):
        adapters = AdapterSet(h.model, 2)
        adapters.register("a2", str(lora_setup["adapters"]["a2"]))
        assert adapters.ensure("a2", set())
        layer = h.model.get_submodule("model.layers.0.mlp.down_proj")
        x = torch.randn(3, 1, 128, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
        with torch.inference_mode():
            adapters.bind(["a2", None, "a2"])
            adapted = layer(x)
            adapters.bind([None, None, None])
            plain = layer(x)
        outs.append((adapted.float(), plain.float()))
    (adapted, plain), (adapted_packed, plain_packed) = outs
    assert not torch.equal(adapted[0], plain[0]) and torch.equal(adapted[1], plain[1])
    torch.testing.assert_close(adapted_packed - plain_packed, adapted - plain, atol=0.05, rtol=0.05)


def test_export_keep_lora_checks_and_writes_the_adapter(lora_setup: dict, tmp_path: Path) -> None:
    """`export --keep-lora`: the adapter unmerged, its logits checked against the merged model; one for another
    base is refused and nothing is written."""
    from worker.lora_export import export_adapter

    report = export_adapter(lora_setup["adapters"]["a3"], lora_setup["base"], tmp_path / "out")
    assert report["ranks"] == [64] and report["logits_max_abs_diff"] < 1e-3
    assert read_adapter(tmp_path / "out").modules == read_adapter(lora_setup["adapters"]["a3"]).modules
    other = tmp_path / "narrower" / "base"  # the same name, another shape
    config = json.loads((lora_setup["base"] / "config.json").read_text())
    other.mkdir(parents=True)
    (other / "config.json").write_text(json.dumps({**config, "hidden_size": 32}))
    with pytest.raises(AdapterError, match="maps"):
        export_adapter(lora_setup["adapters"]["a3"], other, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()


def test_an_adapter_on_fused_projections(lora_setup: dict) -> None:
    """bf16 on a CPU packs q/k/v and gate/up as one matrix each: the lean forward adds each wrapped projection's
    delta to its share of the fused output, as the unfused model does, and base rows stay the base's."""
    from worker.cpu_weights import packing_available
    from worker.engine import runner
    from worker.lora import AdapterSet

    if not packing_available():
        pytest.skip("no oneDNN weight packing in this torch")
    base = str(lora_setup["base"])
    plain = make_handler(base, model={"name_or_path": base, "threads": 1, "dtype": "bf16", "pack_cpu_weights": False})
    fused = make_handler(base, dtype="bf16")
    if getattr(fused.model.model.layers[0].self_attn, "fused_qkv", None) is None:
        pytest.skip("this CPU's oneDNN refused to pack the projections")
    prompts = [[3, 17, 42, 7, 99, 5, 11, 23]] * 3
    outs = []
    for h in (plain, fused):
        adapters = AdapterSet(h.model, 2)
        adapters.register("a2", str(lora_setup["adapters"]["a2"]))
        assert adapters.ensure("a2", set())
        lean = h.engine().lean
        assert lean is not None
        with torch.inference_mode():
            adapters.bind(["a2", None, "a2"])
            _, adapted = runner.prefill(h.model, prompts, 0, lean=lean)
            adapters.bind([None, None, None])
            _, base_logits = runner.prefill(h.model, prompts, 0, lean=lean)
        outs.append((adapted.float(), base_logits.float()))
    (adapted, base_logits), (adapted_fused, base_fused) = outs
    assert (adapted[0] - base_logits[0]).abs().max() > 0.5  # the adapter changes the logits
    torch.testing.assert_close(adapted_fused, adapted, atol=0.05, rtol=0.05)
    torch.testing.assert_close(adapted_fused[1], base_fused[1])  # the base row of the mixed batch
    torch.testing.assert_close(base_fused, base_logits, atol=0.05, rtol=0.05)
