"""bf16 linear weights packed once on the CPU (for the C matmul where it runs, else oneDNN): the same logits and greedy
tokens as the plain model, the same parameter count, and a tied lm_head left shared with its embedding."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.unit.test_engine import tiny
from worker.cpu_weights import pack_linear_weights, packing_available

pytestmark = pytest.mark.skipif(not packing_available(), reason="this torch has no oneDNN weight packing")


@pytest.fixture(params=["kernel", "onednn"])
def kernel(request: pytest.FixtureRequest) -> Any:
    """Both packings: the C matmul (one torch thread, where its kernels run) and oneDNN's."""
    from worker.cpu_weights import tiles_available

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    if request.param == "kernel" and not tiles_available():
        torch.set_num_threads(threads)
        pytest.skip("the C matmul does not run here")
    yield request.param == "kernel"
    torch.set_num_threads(threads)


def test_packed_model_gives_the_plain_models_tokens(tmp_path: Path, demo_model: Path, kernel: bool) -> None:
    from transformers import AutoModelForCausalLM

    path = tiny("llama", tmp_path / "llama", demo_model, layers=2)
    plain = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    packed = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    for model in (plain, packed):  # tied, as SmolLM2's and Qwen2.5's small models are
        model.lm_head.weight = model.model.embed_tokens.weight
    count = sum(p.numel() for p in packed.parameters())
    linears = sum(1 for m in packed.modules() if type(m) is torch.nn.Linear)
    assert pack_linear_weights(packed, rows=8, kernel=kernel) == linears > 0
    assert all(m.__dict__["packing"].tiles == kernel for m in packed.modules() if type(m) is torch.nn.Linear)
    assert sum(p.numel() for p in packed.parameters()) == count  # packed in place, nothing dropped
    assert packed.get_output_embeddings().weight is packed.get_input_embeddings().weight  # still tied
    ids = torch.tensor([[3, 17, 42, 7, 99, 5, 11, 23]] * 8)
    with torch.inference_mode():
        a, b = plain(ids).logits, packed(ids).logits
        assert torch.allclose(a.float(), b.float(), atol=1e-2, rtol=1e-2)
        assert torch.equal(
            plain.generate(ids, max_new_tokens=8, do_sample=False),
            packed.generate(ids, max_new_tokens=8, do_sample=False),
        )


def test_nothing_is_packed_in_fp32(tmp_path: Path, demo_model: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny("qwen2", tmp_path / "q", demo_model)).eval()
    assert pack_linear_weights(model) == 0


@pytest.mark.parametrize("arch", ["qwen2", "llama"])  # Qwen2's q/k/v have biases, Llama's none
def test_fused_projections_give_the_unfused_models_logits_and_tokens(
    tmp_path: Path, demo_model: Path, arch: str, kernel: bool
) -> None:
    """q/k/v and gate/up packed as one matrix each: the lean forward splits one matmul, a projection called alone
    (transformers' forward) runs it and takes its columns; both give the unfused packed model's logits and greedy
    tokens, and nothing is stored twice."""
    from transformers import AutoModelForCausalLM

    from worker.cpu_weights import Fused, FusedSlice
    from worker.engine import runner
    from worker.engine.lean import LeanForward

    path = tiny(arch, tmp_path / arch, demo_model, layers=2)
    models = [AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval() for _ in range(2)]
    unfused, fused = models
    pack_linear_weights(unfused, rows=8, kernel=kernel)
    count = sum(p.numel() for p in fused.parameters())
    linears = sum(1 for m in fused.modules() if type(m) is torch.nn.Linear)
    assert pack_linear_weights(fused, rows=8, fuse=True, kernel=kernel) == linears
    attn, mlp = fused.model.layers[0].self_attn, fused.model.layers[0].mlp
    assert isinstance(attn.fused_qkv, Fused) and isinstance(mlp.fused_gate_up, Fused)
    assert all(isinstance(getattr(attn, n), FusedSlice) for n in ("q_proj", "k_proj", "v_proj"))
    assert (attn.fused_qkv.bias is not None) == (arch == "qwen2")
    assert sum(p.numel() for p in fused.parameters()) == count  # the fused matrices replace the projections'
    prompts = [[3, 17, 42, 7, 99, 5, 11, 23], [8, 9, 10]]
    with torch.inference_mode():
        ids = torch.tensor([prompts[0]] * 2)
        torch.testing.assert_close(fused(ids).logits.float(), unfused(ids).logits.float(), atol=1e-2, rtol=1e-2)
        tokens = []
        for model in (unfused, fused):
            lean = LeanForward(model)
            batch, logits = runner.prefill(model, prompts, 0, lean=lean)
            out = []
            for _ in range(6):
                batch.last = logits.argmax(-1)
                out.append(batch.last.tolist())
                logits = runner.decode(model, batch, lean)
            tokens.append((out, logits.float()))
        assert tokens[0][0] == tokens[1][0]
        torch.testing.assert_close(tokens[1][1], tokens[0][1], atol=1e-2, rtol=1e-2)
