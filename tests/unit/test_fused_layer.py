"""A decode step's decoder layer in one C call (`worker/engine/lean.py` `FusedLayer`, `decode_layer_bf16`): the same
kernels in the same order as the lean forward's per-operation path, so random Llama (GQA) and Qwen2 (q/k/v biases)
models packed for the C matmul decode the same greedy tokens and logits with it and without it, through prefill,
decode, a row leaving and rows joining (one continuing a cached prefix); rows of LoRA adapters beside base rows
decode the per-operation path's tokens and logits exactly with their deltas added in the call; a model with q/k
norms (Qwen3) never takes it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

from tests.unit.test_cpu_attention import greedy, model
from worker import cpu_attention
from worker.cpu_weights import pack_linear_weights, tiles_available
from worker.engine import lean as lean_module
from worker.engine.lean import FusedLayer, LeanForward


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    if not tiles_available() or cpu_attention._fn() is None:
        torch.set_num_threads(threads)
        pytest.skip("the C kernels do not run here")
    yield
    torch.set_num_threads(threads)


def count_one_call_layers(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """From now on, 1 per layer run in one call and 0 per layer the one-call path handed back, in order."""
    ran: list[int] = []
    real = lean_module._FusedStep.run

    def counted(self: Any, i: int, *args: Any) -> bool:
        done = real(self, i, *args)
        ran.append(int(done))
        return done

    monkeypatch.setattr(lean_module._FusedStep, "run", counted)
    return ran


def packed(arch: str) -> Any:
    m = model(arch)
    pack_linear_weights(m, rows=8, fuse=True)
    return m


@pytest.mark.parametrize(("arch", "seed"), [("llama", 16), ("qwen2", 10)])
def test_one_call_layers_decode_the_per_operation_paths_tokens(
    arch: str, seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    m = packed(arch)
    lean = LeanForward(m)
    assert all(isinstance(p, FusedLayer) for p in lean.fused_layers())
    ran = count_one_call_layers(monkeypatch)
    fused_tokens, fused_logits = greedy(m, lean, seed)
    assert sum(ran) == len(ran) == 2 * 8  # every decode step, every layer, in one call
    monkeypatch.setattr(lean_module._FusedStep, "start", classmethod(lambda cls, *args: None))
    plain_tokens, plain_logits = greedy(m, lean, seed)
    assert len(ran) == 2 * 8
    assert fused_tokens == plain_tokens
    for got, want in zip(fused_logits, plain_logits, strict=True):
        torch.testing.assert_close(got.float(), want.float(), atol=1e-2, rtol=1e-2)


def test_a_layer_with_adapter_rows_adds_them_in_the_call_or_runs_the_per_operation_path() -> None:
    """A LoRA wrapper around a projection counts as its base; with rows of its adapter in the step their deltas go
    into the call where the LoRA kernel takes them (`lora` gives the descriptor), else the per-operation path runs
    the layer (None); a replaced projection is not the layer it was built from."""
    from worker.lora import LoraContext, LoraLinear

    m = packed("llama")
    lean = LeanForward(m)
    plan = lean.fused_layers()[0]
    assert plan is not None
    attn, mlp = m.model.layers[0].self_attn, m.model.layers[0].mlp
    context = LoraContext()
    attn.o_proj = LoraLinear(attn.o_proj, context)
    assert plan.current(attn, mlp) and plan.lora(attn, mlp, 2) == 0
    attn.o_proj.set_delta(7, torch.randn(4, 256).to(torch.bfloat16), torch.randn(4, 256).to(torch.bfloat16))
    context.rows, context.groups = 2, [(7, None)]
    assert plan.current(attn, mlp) and plan.lora(attn, mlp, 2) is None  # bound without the kernel's grouping
    context.keys = (7,)
    context.slot_rows = torch.tensor([0, 1], dtype=torch.int32)
    context.slot_starts = torch.tensor([0, 2], dtype=torch.int32)
    assert plan.lora(attn, mlp, 2) not in (None, 0)
    assert plan.lora(attn, mlp, 3) is None  # bound for another batch
    context.keys, context.groups = (), []
    assert plan.current(attn, mlp)
    packed_weight = attn.fused_qkv.weight
    attn.fused_qkv.weight = torch.nn.Parameter(packed_weight.clone(), requires_grad=False)  # new weights
    assert not plan.current(attn, mlp)
    attn.fused_qkv.weight = packed_weight
    assert plan.current(attn, mlp)
    mlp.down_proj = torch.nn.Linear(256, 256, dtype=torch.bfloat16)  # replaced: not the module it was built from
    assert not plan.current(attn, mlp)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_adapter_rows_in_the_one_call_layer_decode_the_per_operation_paths_tokens(
    arch: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows of two PEFT adapters (one on every projection, one on q/v only) beside base rows: every decode step's
    every layer runs in one call with the deltas added inside it, and gives the per-operation path's tokens and
    logits exactly; the adapters change the logits."""
    from tests.unit.test_lora import make_adapter
    from worker.engine import runner
    from worker.lora import AdapterSet

    m = model(arch)
    m.save_pretrained(tmp_path / "base")
    every = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    paths = {
        "all": make_adapter(tmp_path / "base", tmp_path / "all", 8, 16, False, every, seed=1),
        "qv": make_adapter(tmp_path / "base", tmp_path / "qv", 4, 8, True, ["q_proj", "v_proj"], seed=2),
    }
    pack_linear_weights(m, rows=8, fuse=True)
    adapters = AdapterSet(m, 2, [str(tmp_path / "base")])
    for name, path in paths.items():
        adapters.register(name, str(path))
        assert adapters.ensure(name, set())
    lean = LeanForward(m)

    def decode(names: list[str | None]) -> tuple[list[list[int]], list[torch.Tensor]]:
        gen = torch.Generator().manual_seed(3)
        prompts = [torch.randint(1, 320, (n,), generator=gen).tolist() for n in (7, 3, 12, 5)]
        with torch.inference_mode():
            adapters.bind(names)
            batch, logits = runner.prefill(m, prompts, 0, lean=lean)
            tokens, seen = [], [logits]
            for _ in range(6):
                batch.last = seen[-1].argmax(-1)
                tokens.append(batch.last.tolist())
                adapters.bind(names)
                seen.append(runner.decode(m, batch, lean))
        adapters.clear()
        return tokens, seen

    ran = count_one_call_layers(monkeypatch)
    names = ["all", None, "qv", "all"]
    fused_tokens, fused_logits = decode(names)
    assert sum(ran) == len(ran) == 6 * 2  # every decode step, every layer, in one call
    _, base_logits = decode([None] * 4)
    monkeypatch.setattr(lean_module._FusedStep, "start", classmethod(lambda cls, *args: None))
    plain_tokens, plain_logits = decode(names)
    assert len(ran) == 2 * 6 * 2
    assert fused_tokens == plain_tokens
    for got, want in zip(fused_logits, plain_logits, strict=True):
        assert torch.equal(got, want)
    changed = [(fused_logits[-1][r].float() - base_logits[-1][r].float()).abs().max() for r in range(4)]
    assert min(changed[0], changed[2], changed[3]) > 0.05


def test_a_model_with_qk_norms_keeps_the_per_operation_path() -> None:
    from tests.unit.test_lean_forward import model as random_model

    m = random_model("qwen3", hidden_size=256, intermediate_size=256, num_hidden_layers=2, head_dim=64)
    m = m.to(torch.bfloat16)
    pack_linear_weights(m, rows=8, fuse=True)
    assert LeanForward(m).fused_layers() == [None, None]
