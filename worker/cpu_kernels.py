"""Small C kernels for bf16 on CPUs with AVX-512 BF16: the matmul of every linear layer, and the residual add +
RMSNorm of the lean forward.

The matmul (`matmul`, on weights `pack`ed once into its tile layout) multiplies x [M, K] by W [N, K] with
`vdpbf16ps` (32 products per instruction into fp32) and rounds once to bf16, as torch's bf16 matmul does (bias added
in fp32 first). Each tile of 64 output columns is stored as one contiguous stream in which every pair of inputs
holds its 64 columns' weights side by side; six rows of x at a time multiply it (24 accumulators in registers,
each weight load feeding six products). At one row a decode step is bound by memory bandwidth and the tile
streams sequentially (measured here on SmolLM2-135M's shapes: 1.6-2.5x faster than oneDNN's packed matmul and
~2x the plain four-rows-at-a-time kernel it replaces, whose interleaved row streams the prefetchers served at
half the bandwidth); from four rows up it runs at this CPU's `vdpbf16ps` throughput (~225 GFLOP/s on one thread
here), 1.0-1.2x oneDNN at 8-32 rows and equal at a 352-row prefill. See `bench/step_bench.py` and
`bench/matmul_bench.py`.

The residual add + RMSNorm (`add_rms_norm`) does in one call what transformers' bf16 RMSNorm does in about eight
torch operations (upcast, square, mean, rsqrt, scale, downcast, weight, plus the residual add before it), with
the same roundings: the sum rounded to bf16, normalized in fp32, rounded to bf16, then multiplied by the weight and
rounded again. At the few rows of a decode step those operations are mostly per-call overhead.

The same library holds the decode step's other per-layer kernels (SiLU-and-product, RoPE with the cache write,
decode attention, the whole decoder layer in one call), the sampler's pass over a row of logits
(worker/engine/cpu_sampler.py) and the LoRA deltas of a projection (`lora_add`, worker/lora_kernel.py).

The kernels are C compiled once per machine into the cache directory (`cc`, a few hundred milliseconds) and loaded
with ctypes. Without AVX-512 BF16 or a C compiler, or if a compiled kernel does not match torch on a self-check,
nothing uses them (`worker/cpu_weights.py` then packs for oneDNN).
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
from collections.abc import Callable
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

/* The matmul's weight layout: W [N, K] (N a multiple of 16, K even) cut into tiles of 64 output columns (the
   last tile may be 16, 32 or 48 wide), each tile stored as [K/2][width][2]: for every pair of inputs, the pair of
   weights of each of the tile's columns side by side. A tile is then one contiguous stream, and one `vdpbf16ps`
   multiplies a broadcast pair of x by 16 columns' pairs. The packed weight has exactly N * K elements. */
void pack_bf16(const uint16_t *w, uint16_t *out, int64_t n_out, int64_t k_in) {
    int64_t kp = k_in / 2;
    for (int64_t t0 = 0; t0 < n_out; t0 += 64) {
        int64_t width = n_out - t0 < 64 ? n_out - t0 : 64;
        uint16_t *tile = out + t0 * k_in;
        for (int64_t c = 0; c < width; c++) {
            const uint16_t *row = w + (t0 + c) * k_in;
            for (int64_t p = 0; p < kp; p++) {
                tile[(p * width + c) * 2] = row[2 * p];
                tile[(p * width + c) * 2 + 1] = row[2 * p + 1];
            }
        }
    }
}

/* The inverse of pack_bf16 (the plain weight back, for anything that needs it). */
void unpack_bf16(const uint16_t *packed, uint16_t *w, int64_t n_out, int64_t k_in) {
    int64_t kp = k_in / 2;
    for (int64_t t0 = 0; t0 < n_out; t0 += 64) {
        int64_t width = n_out - t0 < 64 ? n_out - t0 : 64;
        const uint16_t *tile = packed + t0 * k_in;
        for (int64_t c = 0; c < width; c++)
            for (int64_t p = 0; p < kp; p++) {
                w[(t0 + c) * k_in + 2 * p] = tile[(p * width + c) * 2];
                w[(t0 + c) * k_in + 2 * p + 1] = tile[(p * width + c) * 2 + 1];
            }
    }
}

static inline void store_cols(uint16_t *y, __m512 v, const float *bias) {
    if (bias) v = _mm512_add_ps(v, _mm512_loadu_ps(bias));
    _mm256_storeu_si256((__m256i *)y, (__m256i)_mm512_cvtneps_pbh(v)); /* round to nearest even, as torch */
}

/* MR rows of x times one tile of NB * 16 columns: MR * NB fp32 accumulators held in registers over all of K. */
#define TILE_KERNEL(MR, NB)                                                                                      \
    static void mk_##MR##_##NB(const uint16_t *x, int64_t ldx, const uint16_t *wt, const float *bias,            \
                               uint16_t *y, int64_t ldy, int64_t kp) {                                           \
        __m512 acc[MR][NB];                                                                                      \
        for (int r = 0; r < MR; r++)                                                                             \
            for (int j = 0; j < NB; j++) acc[r][j] = _mm512_setzero_ps();                                        \
        for (int64_t p = 0; p < kp; p++) {                                                                       \
            __m512bh w[NB];                                                                                      \
            for (int j = 0; j < NB; j++) w[j] = (__m512bh)_mm512_loadu_si512((const void *)(wt + (p * NB + j) * 32)); \
            for (int r = 0; r < MR; r++) {                                                                       \
                __m512bh xb = (__m512bh)_mm512_set1_epi32(*(const int32_t *)(x + r * ldx + 2 * p));              \
                for (int j = 0; j < NB; j++) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], w[j], xb);                 \
            }                                                                                                    \
        }                                                                                                        \
        for (int r = 0; r < MR; r++)                                                                             \
            for (int j = 0; j < NB; j++) store_cols(y + r * ldy + j * 16, acc[r][j], bias ? bias + j * 16 : 0);  \
    }
#define TILE_KERNELS(MR) TILE_KERNEL(MR, 1) TILE_KERNEL(MR, 2) TILE_KERNEL(MR, 3) TILE_KERNEL(MR, 4)
TILE_KERNELS(1)
TILE_KERNELS(2)
TILE_KERNELS(3)
TILE_KERNELS(4)
TILE_KERNELS(5)
TILE_KERNELS(6)

typedef void (*tile_fn)(const uint16_t *, int64_t, const uint16_t *, const float *, uint16_t *, int64_t, int64_t);
#define TILE_ROW(MR) {mk_##MR##_1, mk_##MR##_2, mk_##MR##_3, mk_##MR##_4}
static const tile_fn TILES[6][4] = {TILE_ROW(1), TILE_ROW(2), TILE_ROW(3), TILE_ROW(4), TILE_ROW(5), TILE_ROW(6)};

/* y[m, n] = bf16(x[m, :] . W[n, :] + bias[n]) for W packed by pack_bf16 (fp32 accumulation, one rounding, as
   torch's bf16 matmul); x rows `ldx` apart, y rows `ldy` apart; bias fp32 [N] or NULL. Rows go in blocks of 96 (a
   block of x stays in cache while every tile streams past it), each tile's rows six at a time (24 accumulators:
   one weight load feeds six products; a software prefetch of the next tile measured no gain here). */
void gemm_bf16(const uint16_t *x, int64_t ldx, const uint16_t *wp, const float *bias, uint16_t *y, int64_t ldy,
               int64_t m, int64_t n_out, int64_t k_in) {
    int64_t kp = k_in / 2;
    for (int64_t m0 = 0; m0 < m; m0 += 96) {
        int64_t mb = m - m0 < 96 ? m - m0 : 96;
        for (int64_t t0 = 0; t0 < n_out; t0 += 64) {
            int64_t nb = (n_out - t0 < 64 ? n_out - t0 : 64) / 16;
            const uint16_t *wt = wp + t0 * k_in;
            for (int64_t r = 0; r < mb;) {
                int64_t mr = mb - r < 6 ? mb - r : 6;
                TILES[mr - 1][nb - 1](x + (m0 + r) * ldx, ldx, wt, bias ? bias + t0 : 0, y + (m0 + r) * ldy + t0, ldy,
                                      kp);
                r += mr;
            }
        }
    }
}

/* exp(x) for 16 lanes: 2^(x log2 e) split into 2^n (scalef) and a degree-6 polynomial of 2^f, f in [-0.5, 0.5]
   (relative error ~2e-7, below a bf16 rounding); -inf and very negative x give 0, large x +inf. */
static inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f));
    __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
    __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_sub_ps(t, n);
    __m512 p = _mm512_set1_ps(1.5353362e-4f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3398874e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504109e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022650e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

static inline __m512 load_bf16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

static inline __m512 round_bf16(__m512 v) { /* v rounded to bf16 (nearest even), kept as fp32 */
    return _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(v)), 16));
}

/* The gated MLP's activation in one pass: out = bf16(bf16(silu(gate)) * up) per element (torch's two bf16 ops and
   their roundings), `dim` (a multiple of 16) elements per row; gate and up rows `ldg` / `ldu` apart, out rows dense. */
void silu_mul_bf16(const uint16_t *gate, int64_t ldg, const uint16_t *up, int64_t ldu, uint16_t *out, int64_t rows,
                   int64_t dim) {
    const __m512 one = _mm512_set1_ps(1.0f);
    for (int64_t r = 0; r < rows; r++)
        for (int64_t i = 0; i < dim; i += 16) {
            __m512 g = load_bf16(gate + r * ldg + i), u = load_bf16(up + r * ldu + i);
            __m512 s = _mm512_div_ps(g, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), g))));
            __m512 v = _mm512_mul_ps(round_bf16(s), u);
            _mm256_storeu_si256((__m256i *)(out + r * dim + i), (__m256i)_mm512_cvtneps_pbh(v));
        }
}

/* RoPE for one decode position per row, and the cache write: per row r, the `heads` query heads of q and the
   `kv_heads` heads of k rotated as transformers' apply_rotary_pos_emb does in bf16 (bf16(bf16(x * cos) +
   rotate_half(x) * sin), `ssin` being sin with its first half negated), q written to q_out [rows, heads, d] and k
   to kbuf, v copied to vbuf, at position `at` of buffers [rows, kv_heads, room, d] (row and head strides `sb`,
   `sh`). Sources are rows `ldq` / `ldk` / `ldv` apart (heads * d, kv_heads * d dense within a row); cos and ssin
   rows `ldc` apart. d a multiple of 32. */
static inline void rope_head(const uint16_t *x, const uint16_t *cos, const uint16_t *ssin, uint16_t *out,
                             int64_t d) {
    int64_t half = d / 2;
    for (int64_t i = 0; i < d; i += 16) {
        int64_t j = i < half ? i + half : i - half;
        __m512 xv = load_bf16(x + i), rot = load_bf16(x + j);
        __m512 a = round_bf16(_mm512_mul_ps(xv, load_bf16(cos + i)));
        __m512 v = _mm512_add_ps(a, _mm512_mul_ps(rot, load_bf16(ssin + i)));
        _mm256_storeu_si256((__m256i *)(out + i), (__m256i)_mm512_cvtneps_pbh(v));
    }
}

void rope_kv_bf16(const uint16_t *q, int64_t ldq, const uint16_t *k, int64_t ldk, const uint16_t *v, int64_t ldv,
                  const uint16_t *cos, const uint16_t *ssin, int64_t ldc, uint16_t *q_out, uint16_t *kbuf,
                  uint16_t *vbuf, int64_t sb, int64_t sh, int64_t at, int64_t rows, int64_t heads, int64_t kv_heads,
                  int64_t d) {
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *c = cos + r * ldc, *s = ssin + r * ldc;
        for (int64_t h = 0; h < heads; h++) rope_head(q + r * ldq + h * d, c, s, q_out + (r * heads + h) * d, d);
        for (int64_t h = 0; h < kv_heads; h++) {
            rope_head(k + r * ldk + h * d, c, s, kbuf + r * sb + h * sh + at * d, d);
            __builtin_memcpy(vbuf + r * sb + h * sh + at * d, v + r * ldv + h * d, (size_t)d * 2);
        }
    }
}

/* For each of `rows` rows of `dim` (contiguous): h = bf16(h + add) when `add` is not NULL (written back to
   h_out), out = bf16(w * bf16(h * rsqrt(mean(h^2) + eps))). */
void add_rms_norm_bf16(const uint16_t *h, const uint16_t *add, const uint16_t *w, uint16_t *h_out, uint16_t *out,
                       int64_t rows, int64_t dim, float eps) {
    float buf[16384];
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *hr = h + r * dim;
        float sq = 0.0f;
        for (int64_t i = 0; i < dim && i < 16384; i++) {
            float v = from_bf16(hr[i]);
            if (add) {
                v = from_bf16(to_bf16(v + from_bf16(add[r * dim + i])));
                h_out[r * dim + i] = to_bf16(v);
            }
            buf[i] = v;
            sq += v * v;
        }
        float scale = 1.0f / __builtin_sqrtf(sq / (float)dim + eps);
        for (int64_t i = 0; i < dim; i++)
            out[r * dim + i] = to_bf16(from_bf16(w[i]) * from_bf16(to_bf16(buf[i] * scale)));
    }
}

/* Decode attention (one fed position per row), bf16 in and out, fp32 inside: worker/cpu_attention.py. */

/* 16 vectors -> one: lane j holds the sum of the lanes of a[j]. */
static inline __attribute__((always_inline)) __m512 hsum16(const __m512 *a) {
    __m512 b[8], c[4], e[2];
    for (int i = 0; i < 8; i++)
        b[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
    for (int i = 0; i < 4; i++) {
        __m512d x = _mm512_castps_pd(b[2 * i]), y = _mm512_castps_pd(b[2 * i + 1]);
        c[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
    }
    for (int i = 0; i < 2; i++)
        e[i] = _mm512_add_ps(_mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], 0x88),
                             _mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], 0xdd));
    return _mm512_add_ps(_mm512_shuffle_f32x4(e[0], e[1], 0x88), _mm512_shuffle_f32x4(e[0], e[1], 0xdd));
}

/* exp(x) in fp32 for x <= 0 (cephes' expf: 2^n e^r, |r| <= ln2/2, a degree-6 polynomial); -inf gives 0. */
static inline __m512 exp512(__m512 x) {
    __mmask16 real = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-__builtin_inff()), _CMP_NEQ_OQ);
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_maskz_mov_ps(real, _mm512_scalef_ps(p, n));
}

/* s[j] = scale * q.k[j] for the first n (<= 16) of 16 key rows `st` apart; q as nk bf16 vectors of 32. */
static inline __attribute__((always_inline)) void qk16(const uint16_t *k, int64_t st, const __m512bh *q, int nk,
                                                       int n, float scale, float *s) {
    __m512 acc[16];
    for (int j = 0; j < 16; j++) {
        __m512 a = _mm512_setzero_ps();
        if (j < n)
            for (int c = 0; c < nk; c++)
                a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_loadu_si512((const void *)(k + j * st + 32 * c)), q[c]);
        acc[j] = a;
    }
    __m512 sum = _mm512_mul_ps(hsum16(acc), _mm512_set1_ps(scale));
    _mm512_mask_storeu_ps(s, (__mmask16)((1u << n) - 1u), sum);
}

/* The scores of one query head over positions lo..T-1, softmax'd in place (0 where masked); returns 1 / sum. */
static inline __attribute__((always_inline)) float head_probs(const uint16_t *q, const uint16_t *k, int64_t st,
                                                             const int64_t *m, int64_t lo, int64_t T, int nk,
                                                             float scale, float *s) {
    __m512bh qv[4];
    for (int c = 0; c < nk; c++) qv[c] = (__m512bh)_mm512_loadu_si512((const void *)(q + 32 * c));
    int64_t t = lo;
    for (; t + 16 <= T; t += 16) qk16(k + t * st, st, qv, nk, 16, scale, s + t);
    if (t < T) qk16(k + t * st, st, qv, nk, (int)(T - t), scale, s + t);
    if (m)
        for (t = lo; t < T - 1; t++)
            if (!m[t]) s[t] = -__builtin_inff();
    __m512 mx = _mm512_set1_ps(-__builtin_inff());
    for (t = lo; t < T; t += 16) {
        __mmask16 in = T - t >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (T - t)) - 1u);
        mx = _mm512_max_ps(mx, _mm512_mask_loadu_ps(_mm512_set1_ps(-__builtin_inff()), in, s + t));
    }
    __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(mx)), sum = _mm512_setzero_ps();
    for (t = lo; t < T; t += 16) {
        __mmask16 in = T - t >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (T - t)) - 1u);
        __m512 e = exp512(_mm512_sub_ps(_mm512_mask_loadu_ps(_mm512_set1_ps(-__builtin_inff()), in, s + t), top));
        _mm512_mask_storeu_ps(s + t, in, e);
        sum = _mm512_add_ps(sum, e);
    }
    return 1.0f / _mm512_reduce_add_ps(sum);
}

/* out[h] = bf16(inv[h] * sum_t p[h][t] v[t]) for nh heads (p rows T apart), v rows of nd * 16 values `st` apart;
   masked positions skipped. */
static inline __attribute__((always_inline)) void pv_heads(const uint16_t *v, int64_t st, const float *p, int64_t T,
                                                           const int64_t *m, int64_t lo, const float *inv, int nh,
                                                           int nd, uint16_t *out) {
    __m512 acc[16];
    for (int i = 0; i < nh * nd; i++) acc[i] = _mm512_setzero_ps();
    for (int64_t t = lo; t < T; t++) {
        if (m && !m[t] && t < T - 1) continue;
        __m512 vv[8];
        for (int c = 0; c < nd; c++)
            vv[c] = _mm512_castsi512_ps(_mm512_slli_epi32(
                _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(v + t * st + 16 * c))), 16));
        for (int h = 0; h < nh; h++) {
            __m512 ph = _mm512_set1_ps(p[h * T + t]);
            for (int c = 0; c < nd; c++) acc[h * nd + c] = _mm512_fmadd_ps(ph, vv[c], acc[h * nd + c]);
        }
    }
    for (int h = 0; h < nh; h++)
        for (int c = 0; c < nd; c++)
            _mm256_storeu_si256((__m256i *)(out + h * nd * 16 + 16 * c),
                                (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(acc[h * nd + c], _mm512_set1_ps(inv[h]))));
}

/* One row's kv head: its `g` query heads (q rows qh apart, out rows d apart), head_dim d = 32 * nk. */
static inline __attribute__((always_inline)) void attend_group(const uint16_t *q, int64_t qh, const uint16_t *k,
                                                               int64_t kt, const uint16_t *v, int64_t vt,
                                                               const int64_t *m, int64_t T, int64_t g, int nk,
                                                               float scale, float *s, float *inv, uint16_t *out) {
    int64_t lo = 0;
    if (m)
        while (lo < T - 1 && !m[lo]) lo++;
    for (int64_t i = 0; i < g; i++) inv[i] = head_probs(q + i * qh, k, kt, m, lo, T, nk, scale, s + i * T);
    int64_t d = 32 * nk;
    for (int64_t i = 0; i < g;) { /* as many heads at once as their fp32 sums fit 16 registers */
        int64_t left = g - i, n = nk == 2 ? (left < 4 ? left : 4) : (left < 2 ? left : 2);
        const float *p = s + i * T;
        uint16_t *o = out + i * d;
        if (nk == 4 && n == 2)
            pv_heads(v, vt, p, T, m, lo, inv + i, 2, 8, o);
        else if (nk == 4)
            pv_heads(v, vt, p, T, m, lo, inv + i, 1, 8, o);
        else if (n == 4)
            pv_heads(v, vt, p, T, m, lo, inv + i, 4, 4, o);
        else if (n == 3)
            pv_heads(v, vt, p, T, m, lo, inv + i, 3, 4, o);
        else if (n == 2)
            pv_heads(v, vt, p, T, m, lo, inv + i, 2, 4, o);
        else
            pv_heads(v, vt, p, T, m, lo, inv + i, 1, 4, o);
        i += n;
    }
}

/* out [B, heads * d] = softmax(scale * q k^T) v per row and query head (kv head = head / (heads / kv_heads)), over
   the positions whose mask is 1 and the last (fed) one; mask NULL: every position. q [B, heads, d], k and v
   [B, kv_heads, T, d] with the given strides (elements; d contiguous), mask [B, T] rows mb apart. d is 64 or 128.
   Returns 0, or -1 when the scratch memory cannot be had. */
int decode_attention_bf16(const uint16_t *q, int64_t qb, int64_t qh, const uint16_t *k, int64_t kb, int64_t kh,
                          int64_t kt, const uint16_t *v, int64_t vb, int64_t vh, int64_t vt, const int64_t *mask,
                          int64_t mb, uint16_t *out, int64_t B, int64_t heads, int64_t kv_heads, int64_t T,
                          int64_t d, float scale) {
    int64_t g = heads / kv_heads;
    float *s = (float *)__builtin_malloc(sizeof(float) * (size_t)(g * T + g + 16));
    if (!s) return -1;
    float *inv = s + g * T;
    for (int64_t b = 0; b < B; b++)
        for (int64_t j = 0; j < kv_heads; j++) {
            const uint16_t *qj = q + b * qb + j * g * qh, *kj = k + b * kb + j * kh, *vj = v + b * vb + j * vh;
            const int64_t *m = mask ? mask + b * mb : 0;
            uint16_t *o = out + (b * heads + j * g) * d;
            if (d == 64)
                attend_group(qj, qh, kj, kt, vj, vt, m, T, g, 2, scale, s, inv, o);
            else
                attend_group(qj, qh, kj, kt, vj, vt, m, T, g, 4, scale, s, inv, o);
        }
    __builtin_free(s);
    return 0;
}

/* One decoder layer of a decode step (one fed position per row) in one call, for the lean forward's Llama / Qwen2
   layers whose every projection runs the tile matmul: the same kernels, in the same order, with the same roundings
   as the lean forward's per-operation path. `a` holds (as int64) the layer's constants and the step's values at
   the DL_* indices below, `f` the two norms' epsilons and the attention scale. h [B, hidden] is updated in place
   (h + the last layer's MLP output `pending`, NULL for the first layer, then + this layer's attention output);
   this layer's MLP output goes to `pending_out` (may be `pending` itself); `scratch` holds B * (2 * hidden +
   (heads + 2 * kv_heads) * d + 2 * heads * d + 3 * inter) bf16. Where LoRA adapters have rows in the step, each
   projection's deltas are added to its output right after its matmul (`dl_lora`), as the per-operation path's
   wrappers add them. Returns decode_attention_bf16's code. */
enum {
    DL_IN_W, DL_POST_W, DL_QKV_W, DL_QKV_B, DL_O_W, DL_O_B, DL_GU_W, DL_GU_B, DL_DOWN_W, DL_DOWN_B,
    DL_HIDDEN, DL_HEADS, DL_KV_HEADS, DL_D, DL_INTER,
    DL_B, DL_H, DL_PENDING, DL_PENDING_OUT, DL_COS, DL_SSIN, DL_LDC, DL_KBUF, DL_VBUF, DL_SB, DL_SH, DL_AT,
    DL_MASK, DL_MASK_LD, DL_SCRATCH, DL_LORA, DL_COUNT
};

void lora_add(const void *x, void *out, int64_t x_stride, int64_t out_stride, int64_t k_in, int64_t n_out, int64_t per,
              int32_t bf16, int32_t wbf16, const int32_t *order, const int32_t *starts, int64_t slots,
              const int64_t *a, const int64_t *bt, const int32_t *rank);

/* The LoRA deltas of projection p (0-6: q k v o gate up down) where the step binds adapters: `l` (DL_LORA, NULL
   when none) holds the bound rows grouped by slot, each slot's start, the slot count, then per projection the
   addresses of its A table, B.T table and ranks (0: no delta on it) and whether they are bf16 (lora_add). */
static void dl_lora(const int64_t *l, int p, const uint16_t *x, int64_t xs, uint16_t *out, int64_t os, int64_t k,
                    int64_t n) {
    if (!l) return;
    const int64_t *t = l + 3 + 4 * p;
    if (!t[0]) return;
    lora_add(x, out, xs, os, k, n, 1, 1, (int32_t)t[3], (const int32_t *)l[0], (const int32_t *)l[1], l[2],
             (const int64_t *)t[0], (const int64_t *)t[1], (const int32_t *)t[2]);
}

int decode_layer_bf16(const int64_t *a, const float *f) {
    int64_t B = a[DL_B], D = a[DL_HIDDEN], H = a[DL_HEADS], KV = a[DL_KV_HEADS], d = a[DL_D], I = a[DL_INTER];
    int64_t nqkv = (H + 2 * KV) * d;
    uint16_t *h = (uint16_t *)a[DL_H], *x = (uint16_t *)a[DL_SCRATCH];
    uint16_t *qkv = x + B * D, *qr = qkv + B * nqkv, *att = qr + B * H * d, *o = att + B * H * d;
    uint16_t *gu = o + B * D, *act = gu + B * 2 * I;
    uint16_t *kbuf = (uint16_t *)a[DL_KBUF], *vbuf = (uint16_t *)a[DL_VBUF];
    int64_t sb = a[DL_SB], sh = a[DL_SH], at = a[DL_AT];
    add_rms_norm_bf16(h, (const uint16_t *)a[DL_PENDING], (const uint16_t *)a[DL_IN_W], h, x, B, D, f[0]);
    const int64_t *l = (const int64_t *)a[DL_LORA];
    gemm_bf16(x, D, (const uint16_t *)a[DL_QKV_W], (const float *)a[DL_QKV_B], qkv, nqkv, B, nqkv, D);
    dl_lora(l, 0, x, D, qkv, nqkv, D, H * d);
    dl_lora(l, 1, x, D, qkv + H * d, nqkv, D, KV * d);
    dl_lora(l, 2, x, D, qkv + (H + KV) * d, nqkv, D, KV * d);
    rope_kv_bf16(qkv, nqkv, qkv + H * d, nqkv, qkv + (H + KV) * d, nqkv, (const uint16_t *)a[DL_COS],
                 (const uint16_t *)a[DL_SSIN], a[DL_LDC], qr, kbuf, vbuf, sb, sh, at, B, H, KV, d);
    int rc = decode_attention_bf16(qr, H * d, d, kbuf, sb, sh, d, vbuf, sb, sh, d, (const int64_t *)a[DL_MASK],
                                   a[DL_MASK_LD], att, B, H, KV, at + 1, d, f[2]);
    if (rc) return rc;
    gemm_bf16(att, H * d, (const uint16_t *)a[DL_O_W], (const float *)a[DL_O_B], o, D, B, D, H * d);
    dl_lora(l, 3, att, H * d, o, D, H * d, D);
    add_rms_norm_bf16(h, o, (const uint16_t *)a[DL_POST_W], h, x, B, D, f[1]);
    gemm_bf16(x, D, (const uint16_t *)a[DL_GU_W], (const float *)a[DL_GU_B], gu, 2 * I, B, 2 * I, D);
    dl_lora(l, 4, x, D, gu, 2 * I, D, I);
    dl_lora(l, 5, x, D, gu + I, 2 * I, D, I);
    silu_mul_bf16(gu, 2 * I, gu + I, 2 * I, act, B, I);
    gemm_bf16(act, I, (const uint16_t *)a[DL_DOWN_W], (const float *)a[DL_DOWN_B], (uint16_t *)a[DL_PENDING_OUT], D,
              B, D, I);
    dl_lora(l, 6, act, I, (uint16_t *)a[DL_PENDING_OUT], D, I, D);
    return 0;
}

/* ---- The batched sampler's pass over each row of logits on a CPU (worker/engine/cpu_sampler.py) ---- */

#include <stdlib.h>

#define SB 64  /* columns per block of the maxima */
#define DB 256 /* columns per block of the draw's sums */
#define LOG2E_F 1.4426950408889634f
/* A block whose largest weight is below 2^-64 of the top token's is taken as 0 without its exps: all such weights
   of a row (at most 2^18 of them) add up to less than 2^-46 of its total, far below float32's rounding of it. */
#define NEGLIGIBLE -64.0f

/* per-row parameters, doubles: what Python hands over */
enum { P_SCALE, P_INV_MIN_P, P_TOP_K, P_TOP_P, P_UNIFORM, P_LOGPROBS, P_REPETITION, P_PRESENCE, P_FREQUENCY, P_COUNT };

typedef double (*uniform_fn)(int64_t row);

static inline __m512 load16(const void *src, int64_t bf16, int64_t i) {
    if (!bf16) return _mm512_loadu_ps((const float *)src + i);
    __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)src + i));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

static inline float load1(const void *src, int64_t bf16, int64_t i) {
    return bf16 ? from_bf16(((const uint16_t *)src)[i]) : ((const float *)src)[i];
}

/* 2^e for e <= 0; 0 where e < -126 (a flushed denormal) or NaN, whatever the lanes computed there (-inf: NaN).
   Cephes' exp2f polynomial (~1 ulp). */
static inline __m512 exp2_neg(__m512 e) {
    __mmask16 ok = _mm512_cmp_ps_mask(e, _mm512_set1_ps(-126.0f), _CMP_GE_OQ);
    __m512 n = _mm512_roundscale_ps(e, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_sub_ps(e, n);
    __m512 p = _mm512_set1_ps(1.535336188319500e-4f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.339887440266574e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618437357674640e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550332471162809e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402264791363012e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931472028550421e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_maskz_scalef_ps(ok, p, n);
}

/* weight = 2^((x - top) * scale), then min-p as draw.py's: w / min_p kept where above 1 - 2^-23, else 0 */
static inline __m512 weight16(__m512 v, __m512 top, __m512 scale, float inv_min_p) {
    __m512 w = exp2_neg(_mm512_mul_ps(_mm512_sub_ps(v, top), scale));
    if (inv_min_p > 0.0f) {
        w = _mm512_mul_ps(w, _mm512_set1_ps(inv_min_p));
        w = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(w, _mm512_set1_ps(1.0f - 0x1p-23f), _CMP_GT_OQ), w);
    }
    return w;
}

static inline float block_max(const float *x) {
    __m512 m = _mm512_max_ps(_mm512_max_ps(_mm512_loadu_ps(x), _mm512_loadu_ps(x + 16)),
                             _mm512_max_ps(_mm512_loadu_ps(x + 32), _mm512_loadu_ps(x + 48)));
    return _mm512_reduce_max_ps(m);
}

/* x = the row as float32, -inf past the vocabulary up to `padded`; bm = its 64-column block maxima */
static void convert_row(const void *src, int64_t bf16, int64_t vocab, int64_t padded, float *x, float *bm) {
    int64_t whole = vocab / SB;
    for (int64_t b = 0; b < whole; b++) {
        int64_t i = b * SB;
        __m512 v0 = load16(src, bf16, i), v1 = load16(src, bf16, i + 16), v2 = load16(src, bf16, i + 32),
               v3 = load16(src, bf16, i + 48);
        _mm512_storeu_ps(x + i, v0);
        _mm512_storeu_ps(x + i + 16, v1);
        _mm512_storeu_ps(x + i + 32, v2);
        _mm512_storeu_ps(x + i + 48, v3);
        bm[b] = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(v0, v1), _mm512_max_ps(v2, v3)));
    }
    for (int64_t i = whole * SB; i < padded; i++) x[i] = i < vocab ? load1(src, bf16, i) : -__builtin_inff();
    for (int64_t b = whole; b < padded / SB; b++) bm[b] = block_max(x + b * SB);
}

static float max_of(const float *a, int64_t n) {
    float m = -__builtin_inff();
    for (int64_t i = 0; i < n; i++) m = a[i] > m ? a[i] : m;
    return m;
}

/* sum of 2^((x - m) log2 e) over the row: the softmax normalizer of x at its maximum m (bm: the block maxima) */
static float exp_sum(const float *x, const float *bm, int64_t nb, float m) {
    __m512 top = _mm512_set1_ps(m), scale = _mm512_set1_ps(LOG2E_F);
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        if ((bm[b] - m) * LOG2E_F < NEGLIGIBLE) continue;
        for (int64_t i = b * SB; i < b * SB + SB; i += 32) {
            a0 = _mm512_add_ps(a0, exp2_neg(_mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(x + i), top), scale)));
            a1 = _mm512_add_ps(a1, exp2_neg(_mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(x + i + 16), top), scale)));
        }
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
}

/* a sort key: larger value first, then the lower column */
static inline uint64_t order_key(float v, int32_t col) {
    uint32_t u;
    __builtin_memcpy(&u, &v, 4);
    u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
    return ((uint64_t)u << 32) | (uint32_t)~(uint32_t)col;
}

static int by_key_desc(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? 1 : (x > y ? -1 : 0);
}

/* the n largest keys first (in any order), as std::nth_element; returns the n-th largest */
static uint64_t select_keys(uint64_t *a, int64_t len, int64_t n) {
    int64_t lo = 0, hi = len - 1, want = n - 1;
    while (lo < hi) {
        uint64_t p = a[lo + (hi - lo) / 2];
        int64_t i = lo, j = hi;
        while (i <= j) {
            while (a[i] > p) i++;
            while (a[j] < p) j--;
            if (i <= j) {
                uint64_t t = a[i];
                a[i++] = a[j];
                a[j--] = t;
            }
        }
        if (want <= j) hi = j;
        else if (want >= i) lo = i;
        else break;
    }
    return a[want];
}

/* largest first: insertion for a few, qsort for many */
static void sort_keys(uint64_t *a, int64_t n) {
    if (n > 96) {
        qsort(a, n, sizeof(uint64_t), by_key_desc);
        return;
    }
    for (int64_t j = 1; j < n; j++) {
        uint64_t kj = a[j];
        int64_t i = j - 1;
        for (; i >= 0 && a[i] < kj; i--) a[i + 1] = a[i];
        a[i + 1] = kj;
    }
}

/* The columns of the n largest values of x (n < the vocabulary), largest first, ties by the lower column, found
   among the blocks whose maximum is at least the n-th largest block maximum; returns how many (n). */
static int64_t top_n(const float *x, const float *bm, int64_t nb, int64_t n, float *cv, int32_t *ci,
                     uint64_t *keys, int32_t *out) {
    float t = -__builtin_inff();
    if (n < nb) { /* the n-th largest block maximum */
        for (int64_t b = 0; b < nb; b++) keys[b] = order_key(bm[b], (int32_t)b);
        uint32_t u = (uint32_t)(select_keys(keys, nb, n) >> 32);
        u = (u & 0x80000000u) ? (u & 0x7fffffffu) : ~u;
        __builtin_memcpy(&t, &u, 4);
    }
    __m512 tv = _mm512_set1_ps(t);
    __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    int64_t c = 0;
    for (int64_t b = 0; b < nb; b++) {
        if (!(bm[b] >= t)) continue;
        for (int64_t i = b * SB; i < b * SB + SB; i += 16) {
            __m512 v = _mm512_loadu_ps(x + i);
            __mmask16 m = _mm512_cmp_ps_mask(v, tv, _CMP_GE_OQ);
            /* compressed in a register, then stored whole (a compress to memory is microcoded on some CPUs) */
            __m512i cols = _mm512_add_epi32(lane, _mm512_set1_epi32((int32_t)i));
            _mm512_storeu_ps(cv + c, _mm512_maskz_compress_ps(m, v));
            _mm512_storeu_si512(ci + c, _mm512_maskz_compress_epi32(m, cols));
            c += __builtin_popcount(m);
        }
    }
    for (int64_t j = 0; j < c; j++) keys[j] = order_key(cv[j], ci[j]);
    if (n > c) n = c;
    if (c > n) select_keys(keys, c, n);
    sort_keys(keys, n);
    for (int64_t j = 0; j < n; j++) out[j] = (int32_t)~(uint32_t)keys[j];
    return n;
}

/* draw.py's `_search`: the first index whose cumulative weight exceeds target (kept inside the total); -1 where
   the weights have no mass. `above`: only weights above it count. */
static int64_t search(const float *w, int64_t n, float target, float above) {
    float total = 0.0f;
    for (int64_t j = 0; j < n; j++) total += w[j] > above ? w[j] : 0.0f;
    if (!(total > 0.0f) || total == __builtin_inff()) return -1;
    float cap = total * (1.0f - 0x1p-20f);
    target = target > 0.0f ? target : 0.0f;
    target = target < cap ? target : cap;
    float c = 0.0f;
    for (int64_t j = 0; j < n; j++) {
        c += w[j] > above ? w[j] : 0.0f;
        if (c > target) return j;
    }
    return n - 1;
}

/* Inverse-CDF over a row of weights by 256-column blocks (bs: each block's sum of the weights above `above`):
   the block the draw falls in, then the column inside it; -1 where there is nothing to draw. */
static int64_t draw_blocks(const float *w, const float *bs, int64_t nblk, float u, float above, float *cum) {
    float c = 0.0f;
    for (int64_t b = 0; b < nblk; b++) cum[b] = c += bs[b];
    if (!(c > 0.0f) || c == __builtin_inff()) return -1;
    float target = u * c;
    int64_t b = search(bs, nblk, target, -1.0f);
    if (b < 0) return -1;
    float before = b > 0 ? cum[b - 1] : 0.0f;
    int64_t j = search(w + b * DB, DB, target - before, above);
    return j < 0 ? -1 : b * DB + j;
}

/* block sums of the weights above `above`; returns their sum */
static float block_sums(const float *w, int64_t nblk, float above, float *bs) {
    __m512 a = _mm512_set1_ps(above);
    float total = 0.0f;
    for (int64_t b = 0; b < nblk; b++) {
        __m512 s = _mm512_setzero_ps();
        for (int64_t i = b * DB; i < b * DB + DB; i += 16) {
            __m512 v = _mm512_loadu_ps(w + i);
            s = _mm512_mask_add_ps(s, _mm512_cmp_ps_mask(v, a, _CMP_GT_OQ), s, v);
        }
        total += bs[b] = _mm512_reduce_add_ps(s);
    }
    return total;
}

/* Top-p over the whole row by rejection, as draw.py's `_draw_nucleus`: draw; keep the token when the weights
   strictly above its own hold at most top_p of the row's; else draw again among those, with the row's next
   uniform; after `rounds` rejections, the nucleus of what is left by a sort. */
static int64_t draw_nucleus(float *w, float *bs, int64_t nblk, float total, float top_p, float u, int64_t row,
                            uniform_fn more, float *cum, float *cv, int32_t *ci, uint64_t *keys) {
    float limit = top_p * total, above = -1.0f;
    for (int round = 0; round < 8; round++) {
        int64_t at = draw_blocks(w, bs, nblk, u, above, cum);
        if (at < 0) return -1;
        above = w[at];
        if (block_sums(w, nblk, above, bs) <= limit) return at;
        u = (float)more(row);
    }
    int64_t c = 0;
    for (int64_t i = 0; i < nblk * DB; i++)
        if (w[i] > above) keys[c++] = order_key(w[i], (int32_t)i);
    sort_keys(keys, c);
    float before = 0.0f;
    int64_t keep = 0;
    for (; keep < c; keep++) {
        int32_t i = (int32_t)~(uint32_t)keys[keep];
        if (keep > 0 && before > limit) break;
        cv[keep] = w[i];
        ci[keep] = i;
        before += w[i];
    }
    float sum = 0.0f;
    for (int64_t j = 0; j < keep; j++) sum += cv[j];
    int64_t j = search(cv, keep, u * sum, -1.0f);
    return j < 0 ? -1 : ci[j];
}

/* Top-k (then top-p of what they hold) as draw.py's `_draw_top_k`: weights of the k best columns, largest first */
static int64_t draw_top_k(const float *x, const int32_t *cols, int64_t k, float top, float scale, float inv_min_p,
                          float top_p, float u, float *w) {
    if (k <= 0) return -1; /* no candidates (NaN logits) */
    for (int64_t j = 0; j < k; j += 16) {
        __mmask16 m = k - j >= 16 ? 0xffff : (__mmask16)((1u << (k - j)) - 1);
        __m512 v = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, _mm512_maskz_loadu_epi32(m, cols + j), x, 4);
        _mm512_mask_storeu_ps(w + j, m, weight16(v, _mm512_set1_ps(top), _mm512_set1_ps(scale), inv_min_p));
    }
    int64_t keep = k;
    if (top_p < 1.0f) {
        float sum = 0.0f, c = 0.0f;
        for (int64_t j = 0; j < k; j++) sum += w[j];
        keep = 0;
        for (int64_t j = 0; j < k; j++) {
            float share = w[j] / sum;
            c += share;
            if (c - share <= top_p) keep++;
        }
        keep = keep > 1 ? keep : 1;
    }
    float sum = 0.0f;
    for (int64_t j = 0; j < keep; j++) sum += w[j];
    int64_t j = search(w, keep, u * sum, -1.0f);
    return j < 0 ? -1 : cols[j];
}

/* the first column holding the row maximum m (bm: the block maxima) */
static int64_t first_max(const float *x, const float *bm, int64_t nb, float m) {
    for (int64_t b = 0; b < nb; b++)
        if (bm[b] == m)
            for (int64_t i = b * SB; i < b * SB + SB; i++)
                if (x[i] == m) return i;
    return 0;
}

/* One token per row of `src` ([rows, vocab], bf16 or float32, rows `stride` elements apart) after the row's
   penalties, bias and bans; where asked, the raw logits' normalizer (max, sum) and top columns. See
   worker/engine/cpu_sampler.py for the arguments; `scratch`: 6 x padded + 3 x padded / 64 floats. */
void sample_rows(const void *src, int64_t bf16, int64_t rows, int64_t vocab, int64_t stride, const double *params,
                 const int64_t *rep_off, const int64_t *rep_ids, const int64_t *pf_off, const int64_t *pf_ids,
                 const int64_t *pf_counts, const int64_t *bias_n, const int64_t *bias_ids, const int64_t *bias_vals,
                 const int64_t *ban_off, const int64_t *ban_ids, int64_t top_lp, uniform_fn more, float *scratch,
                 int64_t *tokens, float *lse, int64_t *top_ids, float *top_vals, float *chosen) {
    int64_t padded = (vocab + DB - 1) / DB * DB, nb = padded / SB, nblk = padded / DB;
    float *x = scratch, *cv = x + padded, *bm = cv + padded, *bs = bm + nb, *cum = bs + nblk;
    int32_t *ci = (int32_t *)(cum + nblk);
    uint64_t *keys = (uint64_t *)(ci + padded);
    int32_t *cols = (int32_t *)(keys + padded);
    uint8_t *dirty = (uint8_t *)(cols + padded);
    for (int64_t b = 0; b < nb; b++) dirty[b] = 0;
    for (int64_t r = 0; r < rows; r++) {
        const void *row = (const char *)src + r * stride * (bf16 ? 2 : 4);
        const double *p = params + r * P_COUNT;
        convert_row(row, bf16, vocab, padded, x, bm);
        if (p[P_LOGPROBS] >= 0) { /* the model's distribution, before any change */
            float m = max_of(bm, nb);
            lse[2 * r] = m;
            lse[2 * r + 1] = exp_sum(x, bm, nb, m);
            int64_t got = top_n(x, bm, nb, top_lp, cv, ci, keys, cols);
            for (int64_t j = 0; j < top_lp; j++) {
                top_ids[r * top_lp + j] = j < got ? cols[j] : 0;
                top_vals[r * top_lp + j] = j < got ? x[cols[j]] : -__builtin_inff();
            }
        }
        int64_t touched = 0;
        float pen = (float)p[P_REPETITION];
        for (int64_t j = rep_off[r]; j < rep_off[r + 1]; j++) { /* from the raw value: repeats apply once */
            int64_t c = rep_ids[j];
            if (c < 0 || c >= vocab) continue;
            float v = load1(row, bf16, c);
            x[c] = v < 0.0f ? v * pen : v / pen;
            dirty[c / SB] = 1, touched = 1;
        }
        for (int64_t j = pf_off[r]; j < pf_off[r + 1]; j++) {
            int64_t c = pf_ids[j];
            if (c < 0 || c >= vocab) continue;
            x[c] += -(float)(p[P_PRESENCE] + (double)pf_counts[j] * p[P_FREQUENCY]);
            dirty[c / SB] = 1, touched = 1;
        }
        const int64_t *bi = (const int64_t *)(intptr_t)bias_ids[r];
        const float *bv = (const float *)(intptr_t)bias_vals[r];
        for (int64_t j = 0; j < bias_n[r]; j++) {
            int64_t c = bi[j];
            if (c < 0 || c >= vocab) continue;
            x[c] += bv[j];
            dirty[c / SB] = 1, touched = 1;
        }
        for (int64_t j = ban_off[r]; j < ban_off[r + 1]; j++) {
            int64_t c = ban_ids[j];
            if (c < 0 || c >= vocab) continue;
            x[c] = -__builtin_inff();
            dirty[c / SB] = 1, touched = 1;
        }
        if (touched)
            for (int64_t b = 0; b < nb; b++)
                if (dirty[b]) bm[b] = block_max(x + b * SB), dirty[b] = 0;
        float top = max_of(bm, nb), scale = (float)p[P_SCALE];
        int64_t k = (int64_t)p[P_TOP_K], at;
        if (scale < 0.0f) { /* greedy */
            at = first_max(x, bm, nb, top);
        } else if (!(top > -__builtin_inff() && top < __builtin_inff())) {
            at = -1;
        } else if (k > 0) {
            k = top_n(x, bm, nb, k, cv, ci, keys, cols);
            at = draw_top_k(x, cols, k, top, scale, (float)p[P_INV_MIN_P], (float)p[P_TOP_P], (float)p[P_UNIFORM], cv);
        } else {
            __m512 tv = _mm512_set1_ps(top), sv = _mm512_set1_ps(scale);
            float inv = (float)p[P_INV_MIN_P], total = 0.0f;
            for (int64_t b = 0; b < nblk; b++) {
                __m512 s = _mm512_setzero_ps();
                float most = max_of(bm + b * (DB / SB), DB / SB);
                if ((most - top) * scale < NEGLIGIBLE) {
                    for (int64_t i = b * DB; i < b * DB + DB; i += 16) _mm512_storeu_ps(x + i, s);
                    bs[b] = 0.0f;
                    continue;
                }
                for (int64_t i = b * DB; i < b * DB + DB; i += 16) {
                    __m512 w = weight16(_mm512_loadu_ps(x + i), tv, sv, inv);
                    _mm512_storeu_ps(x + i, w);
                    s = _mm512_add_ps(s, w);
                }
                total += bs[b] = _mm512_reduce_add_ps(s);
            }
            float top_p = (float)p[P_TOP_P];
            if (top_p < 1.0f)
                at = draw_nucleus(x, bs, nblk, total, top_p, (float)p[P_UNIFORM], r, more, cum, cv, ci, keys);
            else
                at = draw_blocks(x, bs, nblk, (float)p[P_UNIFORM], -1.0f, cum);
        }
        at = at < 0 ? 0 : (at >= vocab ? vocab - 1 : at); /* nothing to draw (NaN or -inf rows): the first column */
        tokens[r] = at;
        chosen[r] = load1(row, bf16, at);
    }
}

/* LoRA deltas of one projection (worker/lora_kernel.py). */
#define LORA_MAX_RANK 1024

/* Rows of x and out are read with the sampler's load16 / load1 (bf16 or fp32, as fp32). */
static inline void lora_out16(void *out, int32_t bf16, int64_t n, __m512 d) {
    if (bf16) {
        uint16_t *o = (uint16_t *)out + n;
        __m256bh v = _mm512_cvtneps_pbh(_mm512_add_ps(load16(out, 1, n), d));
        _mm256_storeu_si256((__m256i *)o, (__m256i)v);
    } else {
        _mm512_storeu_ps((float *)out + n, _mm512_add_ps(_mm512_loadu_ps((float *)out + n), d));
    }
}

/* For rows i < NR (1 to 4, inlined with a constant): t[i][j] = sum_k x_i[k] * a[j, k] for j < r, four rows of a
   at a time, each load of a serving every row. x bf16 (`bf16`) or fp32, a fp32 (16 products per instruction), or
   both bf16 (`wbf16`: 32 per instruction, `vdpbf16ps`). */
static inline __attribute__((always_inline)) void lora_down(const void **x, int32_t bf16, int32_t wbf16, const void *a,
                                                            int64_t r, int64_t k_in, float (*t)[LORA_MAX_RANK],
                                                            const int NR) {
    const int64_t width = wbf16 ? 32 : 16, kv = k_in - k_in % width;
    for (int64_t j = 0; j < r; j += 4) {
        const int nq = r - j < 4 ? (int)(r - j) : 4;
        __m512 s[4][4];
        for (int i = 0; i < NR; i++)
            for (int q = 0; q < 4; q++) s[i][q] = _mm512_setzero_ps();
        /* constant bounds on q and i everywhere (q < nq as a test): the accumulators stay in registers */
        if (wbf16) {
            const uint16_t *ah = (const uint16_t *)a + j * k_in;
            for (int64_t k = 0; k < kv; k += 32) {
                __m512bh xv[4];
                for (int i = 0; i < NR; i++) xv[i] = (__m512bh)_mm512_loadu_si512((const uint16_t *)x[i] + k);
                for (int q = 0; q < 4; q++) {
                    if (q >= nq) break;
                    __m512bh av = (__m512bh)_mm512_loadu_si512((const void *)(ah + q * k_in + k));
                    for (int i = 0; i < NR; i++) s[i][q] = _mm512_dpbf16_ps(s[i][q], av, xv[i]);
                }
            }
        } else if (nq == 4) {
            const float *af = (const float *)a + j * k_in;
            for (int64_t k = 0; k < kv; k += 16) {
                __m512 xv[4];
                for (int i = 0; i < NR; i++) xv[i] = load16(x[i], bf16, k);
                for (int q = 0; q < 4; q++) {
                    __m512 av = _mm512_loadu_ps(af + q * k_in + k);
                    for (int i = 0; i < NR; i++) s[i][q] = _mm512_fmadd_ps(xv[i], av, s[i][q]);
                }
            }
        } else {
            for (int64_t k = 0; k < kv; k += 16)
                for (int q = 0; q < 4; q++) {
                    if (q >= nq) break;
                    __m512 av = _mm512_loadu_ps((const float *)a + (j + q) * k_in + k);
                    for (int i = 0; i < NR; i++) s[i][q] = _mm512_fmadd_ps(load16(x[i], bf16, k), av, s[i][q]);
                }
        }
        for (int i = 0; i < NR; i++)
            for (int q = 0; q < 4; q++) {
                if (q >= nq) break;
                float v = _mm512_reduce_add_ps(s[i][q]);
                for (int64_t k = kv; k < k_in; k++)
                    v += load1(x[i], bf16, k) * load1(a, wbf16, (j + q) * k_in + k);
                t[i][j + q] = v;
            }
    }
}

/* For rows i < NR: out_i[n] = round(out_i[n] + sum_j t[i][j] * bt[j, n]) (bt bf16 when `wbf16`, else fp32; the
   sums in fp32), 64 outputs at a time, then 16, then one by one; each load of bt serves every row. */
static inline __attribute__((always_inline)) void lora_up(void **out, int32_t bf16, int32_t wbf16, const void *bt,
                                                          int64_t r, int64_t n_out, float (*t)[LORA_MAX_RANK],
                                                          const int NR) {
    int64_t n = 0;
    for (; n + 64 <= n_out; n += 64) {
        __m512 d[4][4];
        for (int i = 0; i < NR; i++)
            for (int q = 0; q < 4; q++) d[i][q] = _mm512_setzero_ps();
        for (int64_t j = 0; j < r; j++) {
            __m512 bv[4];
            for (int q = 0; q < 4; q++) bv[q] = load16(bt, wbf16, j * n_out + n + 16 * q);
            for (int i = 0; i < NR; i++) {
                __m512 tv = _mm512_set1_ps(t[i][j]);
                for (int q = 0; q < 4; q++) d[i][q] = _mm512_fmadd_ps(tv, bv[q], d[i][q]);
            }
        }
        for (int i = 0; i < NR; i++)
            for (int q = 0; q < 4; q++) lora_out16(out[i], bf16, n + 16 * q, d[i][q]);
    }
    for (; n + 16 <= n_out; n += 16) {
        __m512 d[4];
        for (int i = 0; i < NR; i++) d[i] = _mm512_setzero_ps();
        for (int64_t j = 0; j < r; j++) {
            __m512 bv = load16(bt, wbf16, j * n_out + n);
            for (int i = 0; i < NR; i++) d[i] = _mm512_fmadd_ps(_mm512_set1_ps(t[i][j]), bv, d[i]);
        }
        for (int i = 0; i < NR; i++) lora_out16(out[i], bf16, n, d[i]);
    }
    for (; n < n_out; n++)
        for (int i = 0; i < NR; i++) {
            float d = 0.0f;
            for (int64_t j = 0; j < r; j++) d += t[i][j] * load1(bt, wbf16, j * n_out + n);
            if (bf16) {
                uint16_t *o = (uint16_t *)out[i] + n;
                *o = to_bf16(from_bf16(*o) + d);
            } else {
                ((float *)out[i])[n] += d;
            }
        }
}

/* lora_down then lora_up for NR rows, one instance per NR so that the accumulators stay in registers. */
#define LORA_ROWS(NR)                                                                                              \
    static void lora_rows##NR(const void **x, void **out, int32_t bf16, int32_t wbf16, const void *a,              \
                              const void *bt, int64_t r, int64_t k_in, int64_t n_out, float (*t)[LORA_MAX_RANK]) { \
        lora_down(x, bf16, wbf16, a, r, k_in, t, NR);                                                              \
        lora_up(out, bf16, wbf16, bt, r, n_out, t, NR);                                                            \
    }
LORA_ROWS(1)
LORA_ROWS(2)
LORA_ROWS(3)
LORA_ROWS(4)

/* The LoRA deltas of one projection for rows grouped by adapter ("slots"). Slot s covers the entries
   order[starts[s]] .. order[starts[s + 1] - 1], each `per` consecutive rows (a sequence's positions) from row
   order[i] * per; its adapter has A = a[s] [rank[s], K] and Bt = bt[s] [rank[s], N], the scale folded into Bt
   (a[s] == 0: no delta on this projection). For each such row: out = round(out + (x @ A.T) @ Bt), the sums in
   fp32, four rows at a time (the last 1 to 3 together). x and out are bf16 when `bf16`, else fp32; A and Bt bf16
   when `wbf16` (x then bf16 too), else fp32. Rows of x are x_stride elements apart, rows of out out_stride (out
   may be some columns of a wider matrix). Ranks above LORA_MAX_RANK are not taken. */
void lora_add(const void *x, void *out, int64_t x_stride, int64_t out_stride, int64_t k_in, int64_t n_out, int64_t per,
              int32_t bf16, int32_t wbf16, const int32_t *order, const int32_t *starts, int64_t slots,
              const int64_t *a, const int64_t *bt, const int32_t *rank) {
    float t[4][LORA_MAX_RANK];
    const void *xs[4];
    void *outs[4];
    int64_t size = bf16 ? 2 : 4;
    if (wbf16 && !bf16) return;
    for (int64_t s = 0; s < slots; s++) {
        const void *as = (const void *)a[s], *bs = (const void *)bt[s];
        int64_t r = rank[s], rows = (int64_t)(starts[s + 1] - starts[s]) * per, base = (int64_t)starts[s] * per;
        if (!as || r > LORA_MAX_RANK) continue;
        int64_t done = 0;
        for (; done < rows; done++) {
            int64_t e = base + done, row = (int64_t)order[e / per] * per + e % per, i = done % 4;
            xs[i] = (const char *)x + row * x_stride * size;
            outs[i] = (char *)out + row * out_stride * size;
            if (i == 3) lora_rows4(xs, outs, bf16, wbf16, as, bs, r, k_in, n_out, t);
        }
        if (done % 4 == 1) lora_rows1(xs, outs, bf16, wbf16, as, bs, r, k_in, n_out, t);
        if (done % 4 == 2) lora_rows2(xs, outs, bf16, wbf16, as, bs, r, k_in, n_out, t);
        if (done % 4 == 3) lora_rows3(xs, outs, bf16, wbf16, as, bs, r, k_in, n_out, t);
    }
}
"""
MAX_DIM = 16384  # the widest row `add_rms_norm` takes (its stack buffer)
# `decode_layer_bf16`'s argument slots (the C enum's order)
DL = {
    name: i
    for i, name in enumerate(
        "in_w post_w qkv_w qkv_b o_w o_b gu_w gu_b down_w down_b hidden heads kv_heads d inter b h pending "
        "pending_out cos ssin ldc kbuf vbuf sb sh at mask mask_ld scratch lora".split()
    )
}
SHIPPED = Path(__file__).resolve().parent / "_kernels"
FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512bf16", "-shared", "-fPIC"]


def cpu_has_avx512_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags and " avx512bw" in flags


@functools.cache
def library_name() -> str:
    """The compiled file's name: it changes with the source and flags."""
    return f"cpu-kernels-{hashlib.sha256((SOURCE + ' '.join(FLAGS)).encode()).hexdigest()[:16]}.so"


def build(directory: Path) -> Path:
    """Compile the kernels into `directory` (no-op when there); CalledProcessError / OSError when it cannot."""
    target = directory / library_name()
    if target.exists():
        return target
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        raise OSError("no C compiler (cc or gcc) on PATH")
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        src, out = Path(tmp) / "kernels.c", Path(tmp) / "kernels.so"
        src.write_text(SOURCE)
        subprocess.run([compiler, *FLAGS, str(src), "-o", str(out)], check=True, capture_output=True, timeout=60)
        out.replace(target)  # atomic: another process may compile it at the same time
    return target


@functools.cache
def kernel() -> ctypes.CDLL | None:
    """The compiled kernels, or None where they cannot run here (see the module's docstring). A build shipped
    beside this module (`_kernels/`, the container image compiles one) is used first, else one compiled once
    into the cache directory."""
    if not cpu_has_avx512_bf16():
        return None
    shipped = SHIPPED / library_name()
    try:
        lib = ctypes.CDLL(str(shipped if shipped.exists() else build(default_cache_dir() / "kernels")))
    except (OSError, subprocess.SubprocessError) as exc:
        log.info("CPU kernels off: %s", exc)
        return None
    for name, args in {
        "pack_bf16": [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 2,
        "unpack_bf16": [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 2,
        "gemm_bf16": [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        + [ctypes.c_int64] * 4,
        "add_rms_norm_bf16": [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 2 + [ctypes.c_float],
        "silu_mul_bf16": [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
        + [ctypes.c_int64, ctypes.c_void_p]
        + [ctypes.c_int64] * 2,
        "rope_kv_bf16": [ctypes.c_void_p, ctypes.c_int64] * 3
        + [ctypes.c_void_p] * 2
        + [ctypes.c_int64]
        + [ctypes.c_void_p] * 3
        + [ctypes.c_int64] * 7,
    }.items():
        getattr(lib, name).restype = None
        getattr(lib, name).argtypes = args
    lib.decode_layer_bf16.restype = ctypes.c_int
    lib.decode_layer_bf16.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    checks = (_matmul_check(lib), _norm_check(lib.add_rms_norm_bf16), _silu_mul_check(lib), _rope_kv_check(lib))
    if not all(checks):
        log.warning("CPU kernels off: they do not match torch on this machine")
        return None
    return lib


def checked_function(name: str, restype: Any, argtypes: list[Any], check: Callable[[Any], bool], what: str) -> Any:
    """The library's C function `name` with its signature, or None where the kernels do not run here or it does not
    match torch on `check` (a warning names `what` then). Each caller caches it (`functools.cache`)."""
    lib = kernel()
    if lib is None:
        return None
    fn = getattr(lib, name)
    fn.restype, fn.argtypes = restype, argtypes
    if not check(fn):
        log.warning("%s off: it does not match torch on this machine", what)
        return None
    return fn


def matmul(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] bf16 times a weight packed by `pack` (bias: fp32 [N] or None): x @ W.T (+ bias), [..., N] bf16,
    summed in fp32 and rounded once, as torch's bf16 matmul."""
    lib = kernel()
    assert lib is not None
    n, k = packed.shape
    rows = x.reshape(-1, k)
    if rows.stride(-1) != 1 or (rows.shape[0] > 1 and rows.stride(0) < k):
        rows = rows.contiguous()
    out = torch.empty(*x.shape[:-1], n, dtype=torch.bfloat16, device=x.device)
    addr = 0 if bias is None else bias.data_ptr()
    lib.gemm_bf16(rows.data_ptr(), rows.stride(0), packed.data_ptr(), addr, out.data_ptr(), n, rows.shape[0], n, k)
    return out


def pack(weight: torch.Tensor) -> torch.Tensor:
    """A plain bf16 weight [N, K] in the matmul's tile layout (see the C source), as a tensor of the same shape."""
    lib = kernel()
    assert lib is not None and matmul_usable(weight)
    plain = weight.detach().contiguous()
    out = torch.empty_like(plain)
    lib.pack_bf16(plain.data_ptr(), out.data_ptr(), *plain.shape)
    return out


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """The plain weight [N, K] of a `pack`ed one."""
    lib = kernel()
    assert lib is not None
    out = torch.empty_like(packed)
    lib.unpack_bf16(packed.data_ptr(), out.data_ptr(), *packed.shape)
    return out


def matmul_usable(weight: torch.Tensor) -> bool:
    """Whether `pack` / `matmul` take this weight here: bf16 on the CPU, out features a multiple of 16, in features
    even, and the kernels run on this machine."""
    return (
        weight.dtype == torch.bfloat16
        and weight.device.type == "cpu"
        and weight.dim() == 2
        and weight.shape[0] % 16 == 0
        and weight.shape[1] % 2 == 0
        and kernel() is not None
    )


def add_rms_norm(
    h: torch.Tensor, add: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(h + add, RMSNorm of it) for contiguous bf16 rows [..., dim] (`add` None: h itself, normalized), with
    transformers' bf16 roundings (see the module's docstring); `norm_usable` says whether it runs here."""
    lib = kernel()
    assert lib is not None
    return _norm(lib.add_rms_norm_bf16, h, add, weight, eps)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for bf16 rows [..., dim] in one call, with torch's roundings (see `silu_mul_usable`)."""
    lib = kernel()
    assert lib is not None
    dim = gate.shape[-1]
    g, u = gate.reshape(-1, dim), up.reshape(-1, dim)
    out = torch.empty(*gate.shape, dtype=torch.bfloat16)
    lib.silu_mul_bf16(g.data_ptr(), g.stride(0), u.data_ptr(), u.stride(0), out.data_ptr(), g.shape[0], dim)
    return out


def silu_mul_usable(gate: torch.Tensor, up: torch.Tensor) -> bool:
    """Whether `silu_mul` takes these: bf16 CPU tensors of one shape whose rows are dense (the two halves of a
    fused gate/up output are), a width that is a multiple of 16, and the kernels run here."""
    if gate.dtype != torch.bfloat16 or up.dtype != torch.bfloat16 or gate.device.type != "cpu":
        return False
    if gate.shape != up.shape or gate.shape[-1] % 16 or gate.stride(-1) != 1 or up.stride(-1) != 1:
        return False
    try:
        g, u = gate.view(-1, gate.shape[-1]), up.view(-1, up.shape[-1])
    except RuntimeError:  # rows not evenly strided
        return False
    return (g.shape[0] < 2 or (g.stride(0) >= g.shape[1] and u.stride(0) >= u.shape[1])) and kernel() is not None


def rope_kv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    ssin: torch.Tensor,
    kbuf: torch.Tensor,
    vbuf: torch.Tensor,
    at: int,
) -> torch.Tensor:
    """One decode position per row: q [B, heads * d] and k [B, kv_heads * d] rotated (cos, ssin [B, d]: the
    rotary cos and sin with its first half negated), k and v [B, kv_heads * d] written at position `at` of the
    cache buffers [B, kv_heads, room, d]; returns q rotated, [B, heads, 1, d]. See `rope_kv_usable`."""
    lib = kernel()
    assert lib is not None
    b, kv_heads, _, d = kbuf.shape
    heads = q.shape[-1] // d
    out = torch.empty(b, heads, 1, d, dtype=torch.bfloat16)
    lib.rope_kv_bf16(
        q.data_ptr(), q.stride(0), k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0), cos.data_ptr(),
        ssin.data_ptr(), cos.stride(0), out.data_ptr(), kbuf.data_ptr(), vbuf.data_ptr(), kbuf.stride(0),
        kbuf.stride(1), at, b, heads, kv_heads, d,
    )  # fmt: skip
    return out


def rope_kv_usable(tensors: list[torch.Tensor], kbuf: torch.Tensor, vbuf: torch.Tensor) -> bool:
    """Whether `rope_kv` takes these: 2-D bf16 CPU rows dense in their last dimension (q, k, v, cos, ssin), cache
    buffers of one layout with dense positions, a head dim that is a multiple of 32, and the kernels run here."""
    if kernel() is None or kbuf.shape[-1] % 32 or kbuf.stride() != vbuf.stride() or kbuf.stride(-1) != 1:
        return False
    if kbuf.dtype != torch.bfloat16 or vbuf.dtype != torch.bfloat16 or kbuf.stride(2) != kbuf.shape[-1]:
        return False
    return all(t.dtype == torch.bfloat16 and t.dim() == 2 and t.stride(-1) == 1 for t in tensors)


def norm_usable(h: torch.Tensor, add: torch.Tensor | None, weight: torch.Tensor) -> bool:
    """Whether `add_rms_norm` takes these tensors here."""
    return (
        h.dtype == torch.bfloat16
        and h.device.type == "cpu"
        and h.is_contiguous()
        and (add is None or (add.is_contiguous() and add.dtype == torch.bfloat16 and add.shape == h.shape))
        and weight.dtype == torch.bfloat16
        and weight.is_contiguous()
        and weight.shape[-1] == h.shape[-1] <= MAX_DIM
        and kernel() is not None
    )


def _norm(
    fn: Any, h: torch.Tensor, add: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    dim = h.shape[-1]
    out = torch.empty_like(h)
    total = h if add is None else torch.empty_like(h)
    addr = 0 if add is None else add.data_ptr()
    fn(h.data_ptr(), addr, weight.data_ptr(), total.data_ptr(), out.data_ptr(), h.numel() // dim, dim, eps)
    return total, out


def _silu_mul_check(lib: Any) -> bool:
    gen = torch.Generator().manual_seed(0)
    both = (torch.randn(3, 64, generator=gen) * 4).to(torch.bfloat16)
    gate, up = both.split(32, -1)
    out = torch.empty(3, 32, dtype=torch.bfloat16)
    lib.silu_mul_bf16(gate.data_ptr(), 64, up.data_ptr(), 64, out.data_ptr(), 3, 32)
    ref = torch.nn.functional.silu(gate) * up
    return bool(torch.allclose(out.float(), ref.float(), atol=1e-2, rtol=1e-2))


def _rope_kv_check(lib: Any) -> bool:
    """The compiled RoPE + cache write against transformers' rotation in bf16 on two rows, 3 query heads, 1 kv head."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n * 32, generator=gen).to(torch.bfloat16) for n in (3, 1, 1))
    cos, sin = (torch.randn(2, 32, generator=gen).to(torch.bfloat16) for _ in range(2))
    ssin = torch.cat((-sin[:, :16], sin[:, 16:]), -1)
    kbuf, vbuf = torch.zeros(2, 1, 4, 32, dtype=torch.bfloat16), torch.zeros(2, 1, 4, 32, dtype=torch.bfloat16)
    out = torch.empty(2, 3, 1, 32, dtype=torch.bfloat16)
    lib.rope_kv_bf16(
        q.data_ptr(), 96, k.data_ptr(), 32, v.data_ptr(), 32, cos.data_ptr(), ssin.data_ptr(), 32, out.data_ptr(),
        kbuf.data_ptr(), vbuf.data_ptr(), 128, 128, 2, 2, 3, 1, 32,
    )  # fmt: skip

    def rotated(x: torch.Tensor) -> torch.Tensor:  # [2, heads, 32] as transformers rotates it in bf16
        half = torch.cat((-x[..., 16:], x[..., :16]), -1)
        return x * cos[:, None] + half * sin[:, None]

    ok = torch.allclose(out[:, :, 0].float(), rotated(q.view(2, 3, 32)).float(), atol=0.02, rtol=0.02)
    ok = ok and torch.allclose(kbuf[:, :, 2].float(), rotated(k.view(2, 1, 32)).float(), atol=0.02, rtol=0.02)
    return bool(ok and torch.equal(vbuf[:, 0, 2], v) and not kbuf[:, :, (0, 1, 3)].any())


def _norm_check(fn: Any) -> bool:
    gen = torch.Generator().manual_seed(0)
    h, add = (torch.randn(3, 96, generator=gen).to(torch.bfloat16) for _ in range(2))
    w = torch.randn(96, generator=gen).to(torch.bfloat16)
    total = h + add
    ref = w * torch.nn.functional.rms_norm(total.float(), (96,), None, 1e-6).to(torch.bfloat16)
    got_total, got = _norm(fn, h, add, w, 1e-6)
    return torch.equal(got_total, total) and bool(torch.allclose(got.float(), ref.float(), atol=0.02, rtol=0.02))


def _matmul_check(lib: Any) -> bool:
    """The compiled matmul against torch's on a tile and a partial tile, six rows and a seventh, with a bias."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(7, 96, generator=gen).to(torch.bfloat16)
    w = torch.randn(80, 96, generator=gen).to(torch.bfloat16)
    b = torch.randn(80, generator=gen)
    packed = torch.empty_like(w)
    lib.pack_bf16(w.data_ptr(), packed.data_ptr(), 80, 96)
    back = torch.empty_like(w)
    lib.unpack_bf16(packed.data_ptr(), back.data_ptr(), 80, 96)
    got = torch.empty(7, 80, dtype=torch.bfloat16)
    lib.gemm_bf16(x.data_ptr(), 96, packed.data_ptr(), b.data_ptr(), got.data_ptr(), 80, 7, 80, 96)
    ref = torch.nn.functional.linear(x.float(), w.float(), b)
    return torch.equal(back, w) and bool(torch.allclose(got.float(), ref, atol=0.05, rtol=0.02))


if __name__ == "__main__":  # python -m worker.cpu_kernels DIR: compile the kernels into DIR (an image build)
    import sys

    print(build(Path(sys.argv[1])))
