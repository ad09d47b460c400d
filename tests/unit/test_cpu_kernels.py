"""The one-row bf16 kernel: equal (to bf16 rounding) to torch's matmul for the shapes a model has, with and
without a bias, and a packed model that keeps plain copies for it gives the same greedy tokens at one row."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.unit.test_engine import tiny
from worker.cpu_kernels import gemv, kernel

pytestmark = pytest.mark.skipif(kernel() is None, reason="no AVX-512 BF16 or no C compiler here")


@pytest.mark.parametrize(("n", "k", "bias"), [(7, 32, False), (576, 576, True), (3072, 576, False), (576, 1536, True)])
def test_one_row_equals_torch_matmul(n: int, k: int, bias: bool) -> None:
    gen = torch.Generator().manual_seed(n + k)
    x = torch.randn(1, 1, k, generator=gen).to(torch.bfloat16)
    w = (torch.randn(n, k, generator=gen) * 0.05).to(torch.bfloat16)
    b = torch.randn(n, generator=gen).to(torch.bfloat16) if bias else None
    exact = torch.nn.functional.linear(x.float(), w.float(), None if b is None else b.float())
    got = gemv(x, w, b)
    assert got.shape == (1, 1, n) and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), exact.to(torch.bfloat16).float(), atol=1e-2, rtol=1e-2)
    strided = torch.randn(3, k, generator=gen).to(torch.bfloat16)[1:2, :]  # a row of a larger tensor
    torch.testing.assert_close(
        gemv(strided, w).float(), torch.nn.functional.linear(strided, w).float(), atol=1e-2, rtol=1e-2
    )


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_a_lone_sequence_decodes_the_same_tokens_with_the_kernel(tmp_path: Path, demo_model: Path, arch: str) -> None:
    from transformers import AutoModelForCausalLM

    from worker.cpu_weights import pack_linear_weights, packing_available
    from worker.engine import runner
    from worker.engine.lean import LeanForward

    if not packing_available():
        pytest.skip("no oneDNN weight packing in this torch")
    path = tiny(arch, tmp_path / arch, demo_model, layers=2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = []
        for one_row in (False, True):
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
            pack_linear_weights(model, rows=8, fuse=True, one_row=one_row)
            attn = model.model.layers[0].self_attn
            assert (attn.fused_qkv.__dict__["plain_weight"] is not None) == one_row
            assert ("plain_weight" in vars(attn.o_proj)) == one_row
            lean = LeanForward(model)
            with torch.inference_mode():
                batch, logits = runner.prefill(model, [[3, 17, 42, 7, 99, 5, 11, 23]], 0, lean=lean)
                tokens, steps = [], []
                for _ in range(8):
                    batch.last = logits.argmax(-1)
                    tokens.append(int(batch.last))
                    logits = runner.decode(model, batch, lean)
                    steps.append(logits.float())
            results.append((tokens, torch.stack(steps)))
    finally:
        torch.set_num_threads(threads)
    (plain_tokens, plain_logits), (kernel_tokens, kernel_logits) = results
    assert kernel_tokens == plain_tokens
    torch.testing.assert_close(kernel_logits, plain_logits, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("rows", [1, 5])
def test_add_rms_norm_equals_transformers_bf16_norm(rows: int) -> None:
    """The residual add + RMSNorm in one call: the sum exactly, the norm as transformers' bf16 RMSNorm computes it
    (normalized in fp32, rounded, times the weight) to within one bf16 rounding."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from worker.cpu_kernels import add_rms_norm

    gen = torch.Generator().manual_seed(rows)
    h, add = (torch.randn(rows, 1, 576, generator=gen).to(torch.bfloat16) for _ in range(2))
    norm = LlamaRMSNorm(576, eps=1e-5).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(576, generator=gen))
        total, out = add_rms_norm(h, add, norm.weight, 1e-5)
        assert torch.equal(total, h + add)
        expected = norm(h + add)
        torch.testing.assert_close(out.float(), expected.float(), atol=0, rtol=8e-3)  # one bf16 ulp
        assert (out != expected).float().mean() < 0.01  # all but a few elements bit-equal
        same, alone = add_rms_norm(h, None, norm.weight, 1e-5)
        assert same is h and torch.equal(alone, norm(h))


def test_an_image_build_compiles_the_kernels_beside_the_module(tmp_path: Path) -> None:
    """`python -m worker.cpu_kernels DIR` (the Dockerfile's build stage) writes the library the runtime loads first
    from `worker/_kernels/`, so a runtime image without a C compiler still has the kernels."""
    import subprocess
    import sys

    from worker.cpu_kernels import SHIPPED, library_name

    out = subprocess.run([sys.executable, "-m", "worker.cpu_kernels", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    built = tmp_path / library_name()
    assert out.stdout.strip() == str(built) and built.stat().st_size > 0
    assert SHIPPED.name == "_kernels" and SHIPPED.parent.name == "worker"
