"""Decode attention in C for bf16 on CPUs with AVX-512 BF16 (compiled with the other kernels of
`worker/cpu_kernels.py`): one fed position per row against the row's cached keys and values.

torch's CPU attention (`scaled_dot_product_attention`) runs its blocked flash kernel (tiles, bf16 matmuls,
per-tile softmax bookkeeping) on what is, in a decode step, a few dot products per position: at 32 rows of a
SmolLM2-135M-shaped model it took ~380 us per layer for a few MFLOP. Here, per row and kv head, the scores of the
query heads that share it (`vdpbf16ps`, 16 positions reduced at once), a softmax in fp32, and the fp32 sum of
the value rows, rounded to bf16 once, written as [B, 1, heads * d] (what the output projection takes). Keys and
values are read where the cache keeps them (strided views, nothing copied); the row's [B, T] mask says which
positions count (the last, fed one always does, as the lean forward's mask says), so no [B, 1, 1, T] mask is built.

It runs with one torch thread, head_dim 64 or 128, and only where the compiled kernel matches
`scaled_dot_product_attention` on a self-check at load; see `bench/attention_bench.py` for what it changes.
"""

from __future__ import annotations

import ctypes
import functools
from typing import Any

import torch
import torch.nn.functional as F

from worker.cpu_kernels import checked_function

HEAD_DIMS = (64, 128)


@functools.cache
def _fn() -> Any | None:
    """The C function, or None where it cannot run or does not match torch here."""
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    # q, its batch and head strides; k and v, each with its batch, head and position strides; the mask and its row
    # stride; out; B, heads, kv_heads, T, d; the scale.
    args: list[Any] = [ptr, i64, i64, *(2 * [ptr, i64, i64, i64]), ptr, i64, ptr, *(5 * [i64]), ctypes.c_float]
    return checked_function("decode_attention_bf16", ctypes.c_int, args, _self_check, "decode attention kernel")


def available(head_dim: int) -> bool:
    """Whether `decode_attention` runs here for this head size (one torch thread, the kernel loaded)."""
    return head_dim in HEAD_DIMS and torch.get_num_threads() == 1 and _fn() is not None


def usable(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Whether `decode_attention` takes these tensors (shapes as it documents, each last dimension contiguous)."""
    b, heads, one, d = q.shape
    return (
        one == 1
        and q.dtype == k.dtype == v.dtype == torch.bfloat16
        and q.device.type == k.device.type == v.device.type == "cpu"
        and k.shape == v.shape
        and k.shape[0] == b
        and k.shape[3] == d
        and heads % k.shape[1] == 0
        and q.stride(3) == k.stride(3) == v.stride(3) == 1
        and (
            mask is None
            or (
                mask.dtype == torch.int64
                and mask.shape == (b, k.shape[2])
                and (mask.stride(1) == 1 or b * k.shape[2] == 0)
            )
        )
    )


def decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """Attention of one query position per row, [B, 1, heads * d] bf16: q [B, heads, 1, d], k and v
    [B, kv_heads, T, d] (views of a larger buffer welcome), mask [B, T] int64 (1: a real position; None: all are;
    the last position counts either way); query head h reads kv head h // (heads // kv_heads)."""
    fn = _fn()
    assert fn is not None
    return _call(fn, q, k, v, mask, scale)


def reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """What `decode_attention` computes, with torch's attention (in q's dtype): [B, 1, heads * d]."""
    b, heads, _, d = q.shape
    attn_mask = None
    if mask is not None:
        attn_mask = mask.bool().clone()
        attn_mask[:, -1] = True
        attn_mask = attn_mask[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale, enable_gqa=heads != k.shape[1])
    return out.transpose(1, 2).reshape(b, 1, heads * d)


def _self_check(fn: Any) -> bool:
    gen = torch.Generator().manual_seed(0)
    mask = torch.ones(3, 37, dtype=torch.int64)
    mask[1, :20] = 0
    mask[2, 5:9] = 0
    for d in HEAD_DIMS:
        q = torch.randn(3, 6, 1, d, generator=gen).to(torch.bfloat16)
        kv = torch.randn(2, 3, 2, 40, d, generator=gen).to(torch.bfloat16)
        k, v = kv[0, :, :, :37], kv[1, :, :, :37]  # views with room after them, as the KV cache keeps them
        want = reference(q.float(), k.float(), v.float(), mask, 0.125)
        got = _call(fn, q, k, v, mask, 0.125)
        if not torch.allclose(got.float(), want, atol=0.01, rtol=0.01):
            return False
    return True


def _call(
    fn: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    b, heads, _, d = q.shape
    kv_heads, t = k.shape[1], k.shape[2]
    out = torch.empty(b, 1, heads * d, dtype=torch.bfloat16)
    if b and t:
        qs, ks, vs = q.stride(), k.stride(), v.stride()
        mptr, mb = (0, 0) if mask is None else (mask.data_ptr(), mask.stride(0))
        rc = fn(
            q.data_ptr(), qs[0], qs[1], k.data_ptr(), ks[0], ks[1], ks[2], v.data_ptr(), vs[0], vs[1], vs[2],
            mptr, mb, out.data_ptr(), b, heads, kv_heads, t, d, scale,
        )  # fmt: skip
        if rc:
            raise MemoryError("decode attention: no scratch memory")
    return out
