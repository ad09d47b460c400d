"""A one-row bf16 matmul for CPUs with AVX-512 BF16: the decode step of a single sequence.

At one row a decode step reads every weight once and does two flops per weight, so it is bound by memory
bandwidth; oneDNN's bf16 matmul (packed or not) runs its blocked GEMM kernel on that one row. This kernel streams
each weight row once and accumulates 32 products per instruction (`vdpbf16ps`) into fp32, four weight rows at a
time, then rounds to bf16 as the matmul does (bias added in fp32 first). See `bench/step_bench.py --rows 1` for
what it changes on this machine.

It is C compiled once per machine into the cache directory (`cc`, a few hundred milliseconds) and loaded with
ctypes. Without AVX-512 BF16, a C compiler, one torch thread, an inner dimension that is a multiple of 32, or if
the compiled kernel does not match `torch.nn.functional.linear` on a self-check, nothing uses it.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import torch

from qwen_deploy.config import default_cache_dir

log = logging.getLogger(__name__)

SOURCE = r"""
#include <immintrin.h>
#include <stdint.h>

static inline uint16_t to_bf16(float f) {
    uint32_t u;
    __builtin_memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 64u); /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u); /* round to nearest even */
    return (uint16_t)(u >> 16);
}

static inline float from_bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    __builtin_memcpy(&f, &u, 4);
    return f;
}

/* y[n] = bf16(sum_k x[k] * w[n, k] + bias[n]) for one row x; K a multiple of 32; bias may be NULL. */
void gemv_bf16(const uint16_t *x, const uint16_t *w, const uint16_t *bias, uint16_t *y, int64_t n_out,
               int64_t k_in) {
    int64_t n = 0;
    for (; n + 4 <= n_out; n += 4) {
        const uint16_t *w0 = w + n * k_in, *w1 = w0 + k_in, *w2 = w1 + k_in, *w3 = w2 + k_in;
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(),
               a3 = _mm512_setzero_ps();
        for (int64_t k = 0; k < k_in; k += 32) {
            __m512bh xv = (__m512bh)_mm512_loadu_si512((const void *)(x + k));
            a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512((const void *)(w0 + k)), xv);
            a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512((const void *)(w1 + k)), xv);
            a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_loadu_si512((const void *)(w2 + k)), xv);
            a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_loadu_si512((const void *)(w3 + k)), xv);
        }
        float s0 = _mm512_reduce_add_ps(a0), s1 = _mm512_reduce_add_ps(a1), s2 = _mm512_reduce_add_ps(a2),
              s3 = _mm512_reduce_add_ps(a3);
        if (bias) {
            s0 += from_bf16(bias[n]);
            s1 += from_bf16(bias[n + 1]);
            s2 += from_bf16(bias[n + 2]);
            s3 += from_bf16(bias[n + 3]);
        }
        y[n] = to_bf16(s0);
        y[n + 1] = to_bf16(s1);
        y[n + 2] = to_bf16(s2);
        y[n + 3] = to_bf16(s3);
    }
    for (; n < n_out; n++) {
        __m512 a = _mm512_setzero_ps();
        for (int64_t k = 0; k < k_in; k += 32)
            a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_loadu_si512((const void *)(w + n * k_in + k)),
                                 (__m512bh)_mm512_loadu_si512((const void *)(x + k)));
        float s = _mm512_reduce_add_ps(a);
        if (bias) s += from_bf16(bias[n]);
        y[n] = to_bf16(s);
    }
}
"""
FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512bf16", "-shared", "-fPIC"]


def cpu_has_avx512_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags and " avx512bw" in flags


@functools.cache
def kernel() -> ctypes.CDLL | None:
    """The compiled kernel, or None where it cannot run here (see the module's docstring)."""
    if not cpu_has_avx512_bf16():
        return None
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        log.info("one-row bf16 kernel off: no C compiler")
        return None
    digest = hashlib.sha256((SOURCE + " ".join(FLAGS)).encode()).hexdigest()[:16]
    target = default_cache_dir() / "kernels" / f"gemv-bf16-{digest}.so"
    try:
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                src, out = Path(tmp) / "gemv.c", Path(tmp) / "gemv.so"
                src.write_text(SOURCE)
                subprocess.run(
                    [compiler, *FLAGS, str(src), "-o", str(out)], check=True, capture_output=True, timeout=60
                )
                out.replace(target)  # atomic: another process may compile it at the same time
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as exc:
        log.info("one-row bf16 kernel off: %s", exc)
        return None
    fn = lib.gemv_bf16
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 2
    if not _self_check(fn):
        log.warning("one-row bf16 kernel off: it does not match torch's matmul on this machine")
        return None
    return lib


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] holding one row, weight [N, K] plain contiguous bf16: x @ weight.T (+ bias), [..., N] bf16."""
    lib = kernel()
    assert lib is not None
    return _call(lib.gemv_bf16, x, weight, bias)


def usable(weight: torch.Tensor) -> bool:
    """Whether `gemv` can take this plain weight here (and one torch thread runs the model)."""
    return (
        weight.dtype == torch.bfloat16
        and weight.device.type == "cpu"
        and weight.dim() == 2
        and weight.shape[1] % 32 == 0
        and torch.get_num_threads() == 1
        and kernel() is not None
    )


def _call(fn: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    row = x.reshape(-1)
    if not row.is_contiguous():
        row = row.contiguous()
    out = torch.empty(*x.shape[:-1], weight.shape[0], dtype=torch.bfloat16)
    fn(row.data_ptr(), weight.data_ptr(), 0 if bias is None else bias.data_ptr(), out.data_ptr(), *weight.shape)
    return out


def _self_check(fn: Any) -> bool:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 96, generator=gen).to(torch.bfloat16)
    w = torch.randn(7, 96, generator=gen).to(torch.bfloat16)
    b = torch.randn(7, generator=gen).to(torch.bfloat16)
    ref = torch.nn.functional.linear(x.float(), w.float(), b.float())
    got = _call(fn, x, w.contiguous(), b.contiguous()).float()
    return bool(torch.allclose(got, ref, atol=0.05, rtol=0.02))
