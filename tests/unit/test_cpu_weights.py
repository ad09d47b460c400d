"""bf16 linear weights packed once for oneDNN on the CPU: the same logits and greedy tokens as the plain model,
the same parameter count, and a tied lm_head left shared with its embedding."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.unit.test_engine import tiny
from worker.cpu_weights import pack_linear_weights, packing_available

pytestmark = pytest.mark.skipif(not packing_available(), reason="this torch has no oneDNN weight packing")


def test_packed_model_gives_the_plain_models_tokens(tmp_path: Path, demo_model: Path) -> None:
    from transformers import AutoModelForCausalLM

    path = tiny("llama", tmp_path / "llama", demo_model, layers=2)
    plain = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    packed = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    for model in (plain, packed):  # tied, as SmolLM2's and Qwen2.5's small models are
        model.lm_head.weight = model.model.embed_tokens.weight
    count = sum(p.numel() for p in packed.parameters())
    linears = sum(1 for m in packed.modules() if type(m) is torch.nn.Linear)
    assert pack_linear_weights(packed, rows=8) == linears > 0
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
