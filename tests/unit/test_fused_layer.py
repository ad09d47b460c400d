"""A decode step's decoder layer in one C call (`worker/engine/lean.py` `FusedLayer`, `decode_layer_bf16`): the same
kernels in the same order as the lean forward's per-operation path, so random Llama (GQA) and Qwen2 (q/k/v biases)
models packed for the C matmul decode the same greedy tokens and logits with it and without it, through prefill,
decode, a row leaving and rows joining (one continuing a cached prefix); a layer a LoRA adapter runs in goes back to
the per-operation path, and a model with q/k norms (Qwen3) never takes it."""

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
    ran: list[int] = []
    real = lean_module._FusedStep.run

    def counted(self: Any, i: int, *args: Any) -> bool:
        done = real(self, i, *args)
        ran.append(int(done))
        return done

    monkeypatch.setattr(lean_module._FusedStep, "run", counted)
    fused_tokens, fused_logits = greedy(m, lean, seed)
    assert sum(ran) == len(ran) == 2 * 8  # every decode step, every layer, in one call
    monkeypatch.setattr(lean_module._FusedStep, "start", classmethod(lambda cls, *args: None))
    plain_tokens, plain_logits = greedy(m, lean, seed)
    assert len(ran) == 2 * 8
    assert fused_tokens == plain_tokens
    for got, want in zip(fused_logits, plain_logits, strict=True):
        torch.testing.assert_close(got.float(), want.float(), atol=1e-2, rtol=1e-2)


def test_a_layer_with_adapter_rows_runs_the_per_operation_path() -> None:
    """A LoRA wrapper around a projection: with no rows of its adapter in the step the layer still runs in one call
    (the wrapper adds nothing); with rows to run it does not, so the delta is added."""
    from worker.lora import LoraContext, LoraLinear

    m = packed("llama")
    lean = LeanForward(m)
    plan = lean.fused_layers()[0]
    assert plan is not None
    attn, mlp = m.model.layers[0].self_attn, m.model.layers[0].mlp
    context = LoraContext()
    attn.o_proj = LoraLinear(attn.o_proj, context)
    assert plan.current(attn, mlp)
    context.groups = [(0, None)]
    assert not plan.current(attn, mlp)
    context.groups = []
    mlp.down_proj = torch.nn.Linear(256, 256, dtype=torch.bfloat16)  # replaced: not the module it was built from
    assert not plan.current(attn, mlp)


def test_a_model_with_qk_norms_keeps_the_per_operation_path() -> None:
    from tests.unit.test_lean_forward import model as random_model

    m = random_model("qwen3", hidden_size=256, intermediate_size=256, num_hidden_layers=2, head_dim=64)
    m = m.to(torch.bfloat16)
    pack_linear_weights(m, rows=8, fuse=True)
    assert LeanForward(m).fused_layers() == [None, None]
