"""The C kernels: the matmul equals (to bf16 rounding) torch's for the shapes a model has, at one row, a few rows and
a prefill, with and without a bias, on full and partial tiles; a packed model gives the same greedy tokens with the
C matmul as with oneDNN's; the residual add + RMSNorm matches transformers' bf16 norm."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.unit.test_engine import tiny
from worker.cpu_kernels import kernel, matmul, matmul_usable, pack, unpack

pytestmark = pytest.mark.skipif(kernel() is None, reason="no AVX-512 BF16 or no C compiler here")


@pytest.mark.parametrize(
    ("n", "k", "bias"), [(16, 32, False), (80, 96, True), (576, 576, True), (3072, 576, False), (560, 1536, True)]
)
@pytest.mark.parametrize("rows", [1, 2, 6, 7, 32, 200])
def test_matmul_equals_torch_matmul(n: int, k: int, bias: bool, rows: int) -> None:
    gen = torch.Generator().manual_seed(n + k + rows)
    x = torch.randn(rows, k, generator=gen).to(torch.bfloat16)
    w = (torch.randn(n, k, generator=gen) * 0.05).to(torch.bfloat16)
    b = torch.randn(n, generator=gen) if bias else None
    packed = pack(w)
    assert packed.shape == w.shape and torch.equal(unpack(packed), w)
    exact = torch.nn.functional.linear(x.float(), w.float(), b)
    got = matmul(x, packed, b)
    assert got.shape == (rows, n) and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), exact.to(torch.bfloat16).float(), atol=1e-2, rtol=1e-2)
    wide = torch.randn(rows, 3, k, generator=gen).to(torch.bfloat16)[:, 1]  # rows of a larger tensor
    torch.testing.assert_close(
        matmul(wide, packed).float(), torch.nn.functional.linear(wide.float(), w.float()), atol=1e-2, rtol=1e-2
    )


def test_matmul_takes_only_what_its_layout_holds() -> None:
    assert matmul_usable(torch.zeros(48, 64, dtype=torch.bfloat16))
    assert not matmul_usable(torch.zeros(40, 64, dtype=torch.bfloat16))  # out features not a multiple of 16
    assert not matmul_usable(torch.zeros(48, 63, dtype=torch.bfloat16))  # odd in features
    assert not matmul_usable(torch.zeros(48, 64))  # fp32


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_the_c_matmul_decodes_onednns_tokens(tmp_path: Path, demo_model: Path, arch: str) -> None:
    """A lone sequence and a batch of three decode the same greedy tokens with every layer on the C matmul as on
    oneDNN's packed one (one torch thread, as the worker runs)."""
    from transformers import AutoModelForCausalLM

    from worker.cpu_weights import Fused, pack_linear_weights, packing_available
    from worker.engine import runner
    from worker.engine.lean import LeanForward

    if not packing_available():
        pytest.skip("no oneDNN weight packing in this torch")
    path = tiny(arch, tmp_path / arch, demo_model, layers=2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = []
        for use_kernel in (False, True):
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
            pack_linear_weights(model, rows=8, fuse=True, kernel=use_kernel)
            fused = model.model.layers[0].self_attn.fused_qkv
            assert isinstance(fused, Fused) and fused.__dict__["packing"].tiles == use_kernel
            assert model.model.layers[0].self_attn.o_proj.__dict__["packing"].tiles == use_kernel
            lean = LeanForward(model)
            out = []
            for prompts in ([[3, 17, 42, 7, 99, 5, 11, 23]], [[3, 17, 42], [8, 9, 10, 11, 12], [5]]):
                with torch.inference_mode():
                    batch, logits = runner.prefill(model, prompts, 0, lean=lean)
                    tokens, steps = [], []
                    for _ in range(8):
                        batch.last = logits.argmax(-1)
                        tokens.append(batch.last.tolist())
                        logits = runner.decode(model, batch, lean)
                        steps.append(logits.float())
                out.append((tokens, torch.stack(steps)))
            results.append(out)
    finally:
        torch.set_num_threads(threads)
    for (onednn_tokens, onednn_logits), (kernel_tokens, kernel_logits) in zip(*results, strict=True):
        assert kernel_tokens == onednn_tokens
        torch.testing.assert_close(kernel_logits, onednn_logits, atol=3e-2, rtol=3e-2)


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


@pytest.mark.parametrize("rows", [1, 32])
def test_silu_mul_equals_torchs_two_bf16_operations(rows: int) -> None:
    """The gated MLP's activation in one call: bit-equal (or within one bf16 rounding where the exponential's last
    bit differs) to `silu(gate) * up` in bf16, on the two halves of a fused gate/up output and on plain tensors."""
    from worker.cpu_kernels import silu_mul, silu_mul_usable

    gen = torch.Generator().manual_seed(rows)
    both = (torch.randn(rows, 2 * 1536, generator=gen) * 4).to(torch.bfloat16)
    gate, up = both.split(1536, -1)
    assert silu_mul_usable(gate, up) and not silu_mul_usable(gate[:, :40], up[:, :40])
    expected = torch.nn.functional.silu(gate) * up
    got = silu_mul(gate, up)
    assert got.shape == expected.shape and got.is_contiguous()
    torch.testing.assert_close(got.float(), expected.float(), atol=0, rtol=8e-3)
    assert (got != expected).float().mean() < 0.001
    extreme = torch.tensor([[-200.0, -30.0, -1.0, 0.0, 1.0, 30.0, 200.0, float("-inf")] * 2], dtype=torch.bfloat16)
    ones = torch.ones_like(extreme)
    expected = torch.nn.functional.silu(extreme).float()  # NaN at -inf, as torch
    torch.testing.assert_close(silu_mul(extreme, ones).float(), expected, equal_nan=True)


@pytest.mark.parametrize(("heads", "kv_heads", "d"), [(9, 3, 64), (4, 4, 128)])
def test_rope_and_cache_write_equal_transformers_rotation_and_a_cache_update(heads: int, kv_heads: int, d: int) -> None:
    """A decode step's RoPE of q and k and the write of k and v into a chunked cache layer, in one call: the same q,
    keys and values as the lean forward's torch rotation (`_rope`: the same two roundings) and
    `ChunkedLayer.update`, on q/k/v that are column slices of one fused projection output."""
    from worker.cpu_kernels import rope_kv, rope_kv_usable
    from worker.engine.lean import _rope
    from worker.engine.runner import _chunked

    gen = torch.Generator().manual_seed(d)
    b = 3
    fused = torch.randn(b, (heads + 2 * kv_heads) * d, generator=gen).to(torch.bfloat16)
    q, k, v = fused.split([heads * d, kv_heads * d, kv_heads * d], -1)
    cos, sin = (torch.randn(b, d, generator=gen).to(torch.bfloat16) for _ in range(2))
    signed = torch.cat((-sin[:, : d // 2], sin[:, d // 2 :]), -1)
    past = [torch.randn(b, kv_heads, 5, d, generator=gen).to(torch.bfloat16) for _ in range(2)]
    ref_q = _rope(q.view(b, 1, heads, d).transpose(1, 2), cos[:, None, None], signed[:, None, None])
    ref_k = _rope(k.view(b, 1, kv_heads, d).transpose(1, 2), cos[:, None, None], signed[:, None, None])
    reference, layer = _chunked(4)(), _chunked(4)()
    for cache in (reference, layer):
        cache.update(*past)
    ref_keys, ref_values = reference.update(ref_k, v.view(b, 1, kv_heads, d).transpose(1, 2))
    kbuf, vbuf, at = layer.reserve(1)
    assert at == 5 and rope_kv_usable([q, k, v, cos, signed], kbuf, vbuf)
    got_q = rope_kv(q, k, v, cos, signed, kbuf, vbuf, at)
    keys, values = layer.advance(1)
    assert got_q.shape == (b, heads, 1, d) and keys.shape == ref_keys.shape == (b, kv_heads, 6, d)
    torch.testing.assert_close(got_q.float(), ref_q.float(), atol=1e-2, rtol=8e-3)
    torch.testing.assert_close(keys.float(), ref_keys.float(), atol=1e-2, rtol=8e-3)
    assert torch.equal(values, ref_values) and torch.equal(keys[:, :, :5], past[0])
    assert (got_q != ref_q).float().mean() < 0.01 and (keys != ref_keys).float().mean() < 0.01
