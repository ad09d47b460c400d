"""Small C kernels for bf16 decode steps on CPUs with AVX-512 BF16: a one-row matmul, and the residual add +
RMSNorm of the lean forward.

At one row a decode step reads every weight once and does two flops per weight, so it is bound by memory
bandwidth; oneDNN's bf16 matmul (packed or not) runs its blocked GEMM kernel on that one row. This kernel streams
each weight row once and accumulates 32 products per instruction (`vdpbf16ps`) into fp32, four weight rows at a
time, then rounds to bf16 as the matmul does (bias added in fp32 first). See `bench/step_bench.py --rows 1` for
what it changes on this machine.

The residual add + RMSNorm (`add_rms_norm`) does in one call what transformers' bf16 RMSNorm does in about eight
torch operations (upcast, square, mean, rsqrt, scale, downcast, weight, plus the residual add before it), with
the same roundings: the sum rounded to bf16, normalized in fp32, rounded to bf16, then multiplied by the weight and
rounded again. At the few rows of a decode step those operations are mostly per-call overhead.

The kernels are C compiled once per machine into the cache directory (`cc`, a few hundred milliseconds) and loaded with
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
"""
MAX_DIM = 16384  # the widest row `add_rms_norm` takes (its stack buffer)
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
    fn = lib.gemv_bf16
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 2
    norm = lib.add_rms_norm_bf16
    norm.restype = None
    norm.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 2 + [ctypes.c_float]
    if not _self_check(fn) or not _norm_check(norm):
        log.warning("one-row bf16 kernel off: it does not match torch's matmul on this machine")
        return None
    return lib


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] holding one row, weight [N, K] plain contiguous bf16: x @ weight.T (+ bias), [..., N] bf16."""
    lib = kernel()
    assert lib is not None
    return _call(lib.gemv_bf16, x, weight, bias)


def add_rms_norm(
    h: torch.Tensor, add: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(h + add, RMSNorm of it) for contiguous bf16 rows [..., dim] (`add` None: h itself, normalized), with
    transformers' bf16 roundings (see the module's docstring); `norm_usable` says whether it runs here."""
    lib = kernel()
    assert lib is not None
    return _norm(lib.add_rms_norm_bf16, h, add, weight, eps)


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


def _norm_check(fn: Any) -> bool:
    gen = torch.Generator().manual_seed(0)
    h, add = (torch.randn(3, 96, generator=gen).to(torch.bfloat16) for _ in range(2))
    w = torch.randn(96, generator=gen).to(torch.bfloat16)
    total = h + add
    ref = w * torch.nn.functional.rms_norm(total.float(), (96,), None, 1e-6).to(torch.bfloat16)
    got_total, got = _norm(fn, h, add, w, 1e-6)
    return torch.equal(got_total, total) and bool(torch.allclose(got.float(), ref.float(), atol=0.02, rtol=0.02))


def _self_check(fn: Any) -> bool:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 96, generator=gen).to(torch.bfloat16)
    w = torch.randn(7, 96, generator=gen).to(torch.bfloat16)
    b = torch.randn(7, generator=gen).to(torch.bfloat16)
    ref = torch.nn.functional.linear(x.float(), w.float(), b.float())
    got = _call(fn, x, w.contiguous(), b.contiguous()).float()
    return bool(torch.allclose(got, ref, atol=0.05, rtol=0.02))


if __name__ == "__main__":  # python -m worker.cpu_kernels DIR: compile the kernels into DIR (an image build)
    import sys

    print(build(Path(sys.argv[1])))
