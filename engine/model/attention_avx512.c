/* Attention in bfloat16 on AVX512-BF16 CPUs, bidirectional or block-causal (engine/model/attention_cpu.py calls it).

   attn_bf16 computes, for every row b of a group, every query head h and query i:
       s_j = scale * (q_i . k_j)          float32, over D in pairs (VDPBF16PS), masked keys -inf
       p_j = exp(s_j - max_j s_j)         float32
       o_i = (sum_j bf16(p_j) v_j) / sum_j p_j      bf16(p) * v summed in float32, rounded to bf16 once
   which is the arithmetic of torch's CPU flash-attention kernel for bf16 at one key block (scores and softmax in
   float32, probabilities rounded to bf16 for the value product). Each (row, head, query) is one fixed sequence of
   operations over its own row's keys, whatever the other rows, heads or queries of the call: a query's output
   does not depend on what it is batched with, and any split of the heads over threads gives the same bits.

   Layouts (elements are bf16, strides in elements): q[b, i, h, d] at q + b*qb + i*qr + h*D + d; k and v the same
   with their own strides and Hkv heads (query head h reads kv head h / (H / Hkv)); key_valid [G, Lk] bytes or
   NULL (all valid); q_limit [G, Lq] int32 or NULL: query i of row b sees only keys j < q_limit[b, i] (block-causal
   attention over keys at canvas positions 0..Lk-1: the end of the query's block); out [G, Lq, H, D] contiguous.
   A query that sees no key gets zeros (never NaN). D % 16 == 0, D <= 256. Heads h0 .. h1-1 are computed (the
   caller's thread split). Returns 0, or -1 when scratch memory cannot be had.

   Compiled with the AVX2 flags of grouped_mm.c; every function carries its own target attribute and may only run
   where grouped_cpu_isa() (grouped_mm_avx512.c) returns 2. */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "grouped_mm_common.h"

#define AVX512BF16 __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx512bf16,fma")))
#define INLINE static inline __attribute__((always_inline))

#define QM 8   /* query rows per score tile (x 2 key blocks of 16: 16 accumulators) */
#define PM 4   /* query rows per value tile (x up to 4 blocks of 16 dims: 16 accumulators) */

/* exp(x) for x <= 0 (scores minus their max), float32: 2^n * e^r with n = round(x / ln 2), |r| <= ln2 / 2,
   e^r by its degree-6 Taylor polynomial (relative error < 2e-7); x below -87 gives 0. */
INLINE AVX512BF16 __m512 exp_neg(__m512 x) {
    const __m512 log2e = _mm512_set1_ps(1.44269504088896341f);
    const __m512 ln2_hi = _mm512_set1_ps(0.693359375f), ln2_lo = _mm512_set1_ps(-2.12194440e-4f);
    __mmask16 tiny = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_LT_OQ);
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, ln2_hi, x);
    r = _mm512_fnmadd_ps(n, ln2_lo, r);
    __m512 p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_maskz_mov_ps(~tiny, _mm512_scalef_ps(p, n));
}

/* aligned_alloc's size: a multiple of the alignment */
static size_t round64(size_t n) { return (n + 63) & ~(size_t)63; }

INLINE uint32_t pair_at(const uint16_t *p) {
    uint32_t u;
    memcpy(&u, p, 4);
    return u;
}

/* keys of kv head hk -> kp[(jb * D/2 + c) * 16 + lane] = (k[j][2c], k[j][2c+1]), j = jb * 16 + lane (0 past Lk) */
static void pack_keys(const uint16_t *k, int64_t kr, int64_t Lk, int64_t D, int64_t nkb, uint32_t *kp) {
    const int64_t P = D / 2;
    for (int64_t jb = 0; jb < nkb; jb++)
        for (int64_t lane = 0; lane < 16; lane++) {
            const int64_t j = jb * 16 + lane;
            uint32_t *dst = kp + jb * P * 16 + lane;
            if (j < Lk) {
                const uint16_t *src = k + j * kr;
                for (int64_t c = 0; c < P; c++)
                    dst[c * 16] = pair_at(src + 2 * c);
            } else {
                for (int64_t c = 0; c < P; c++)
                    dst[c * 16] = 0;
            }
        }
}

/* values of kv head hk -> vp[t * D + d] = (v[2t][d], v[2t+1][d]); zeros past Lk and for masked keys (their
   probability is 0, and 0 * a NaN or inf left in an unused pool slot would not be) */
static void pack_values(const uint16_t *v, int64_t vr, int64_t Lk, const uint8_t *valid, int64_t D, int64_t npair,
                        uint32_t *vp) {
    for (int64_t t = 0; t < npair; t++) {
        const uint16_t *a = v + 2 * t * vr, *b = v + (2 * t + 1) * vr;
        const uint32_t ma = !valid || valid[2 * t] ? 0xFFFFu : 0u;
        const uint32_t mb = 2 * t + 1 < Lk && (!valid || valid[2 * t + 1]) ? 0xFFFF0000u : 0u;
        for (int64_t d = 0; d < D; d++)
            vp[t * D + d] = ((uint32_t)a[d] & ma) | (mb ? ((uint32_t)b[d] << 16) & mb : 0u);
    }
}

/* s[r][j] = q_r . k_j for mt query rows and two key blocks (jb, jb + 1; the second only when two) */
INLINE AVX512BF16 void score_tile(const uint16_t *q, int64_t qr, const uint32_t *kp, int64_t P, int64_t jb,
                                  const int two, const int mt, float *s, int64_t ls) {
    __m512 acc[QM][2];
    for (int r = 0; r < mt; r++)
        acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    const uint32_t *k0 = kp + jb * P * 16, *k1 = k0 + P * 16;
    for (int64_t c = 0; c < P; c++) {
        __m512bh a = (__m512bh)_mm512_loadu_si512(k0 + c * 16);
        __m512bh b = two ? (__m512bh)_mm512_loadu_si512(k1 + c * 16) : a;
        for (int r = 0; r < mt; r++) {
            __m512bh qv = (__m512bh)_mm512_set1_epi32((int)pair_at(q + r * qr + 2 * c));
            acc[r][0] = _mm512_dpbf16_ps(acc[r][0], qv, a);
            if (two)
                acc[r][1] = _mm512_dpbf16_ps(acc[r][1], qv, b);
        }
    }
    for (int r = 0; r < mt; r++) {
        _mm512_storeu_ps(s + r * ls + jb * 16, acc[r][0]);
        if (two)
            _mm512_storeu_ps(s + r * ls + jb * 16 + 16, acc[r][1]);
    }
}

/* o_r = (sum_t p_r[2t..2t+1] . vp[t]) * inv[r] over nc blocks of 16 dims from d0, rounded to bf16 */
INLINE AVX512BF16 void value_tile(const uint16_t *p, int64_t lp, const uint32_t *vp, int64_t D, int64_t npair,
                                  int64_t d0, const int nc, const int mt, const float *inv, uint16_t *o,
                                  int64_t orow) {
    __m512 acc[PM][4];
    for (int r = 0; r < mt; r++)
        for (int c = 0; c < nc; c++)
            acc[r][c] = _mm512_setzero_ps();
    for (int64_t t = 0; t < npair; t++) {
        __m512bh vv[4];
        for (int c = 0; c < nc; c++)
            vv[c] = (__m512bh)_mm512_loadu_si512(vp + t * D + d0 + c * 16);
        for (int r = 0; r < mt; r++) {
            __m512bh pv = (__m512bh)_mm512_set1_epi32((int)pair_at(p + r * lp + 2 * t));
            for (int c = 0; c < nc; c++)
                acc[r][c] = _mm512_dpbf16_ps(acc[r][c], pv, vv[c]);
        }
    }
    for (int r = 0; r < mt; r++) {
        const __m512 scale = _mm512_set1_ps(inv[r]);
        for (int c = 0; c < nc; c++) {
            __m256bh h = _mm512_cvtneps_pbh(_mm512_mul_ps(acc[r][c], scale));
            _mm256_storeu_si256((__m256i *)(o + r * orow + d0 + c * 16), (__m256i)h);
        }
    }
}

/* softmax of mt score rows (scaled, masked) in place -> p (bf16, zero-padded to an even length), 1 / sums */
INLINE AVX512BF16 void softmax_rows(float *s, int64_t ls, int64_t Lk, const uint8_t *valid, const int32_t *limit,
                                    float scale, int mt, uint16_t *p, int64_t lp, float *inv) {
    const int64_t nkb = (Lk + 15) / 16;
    const __m512 sc = _mm512_set1_ps(scale), ninf = _mm512_set1_ps(-INFINITY);
    for (int r = 0; r < mt; r++) {
        float *sr = s + r * ls;
        const int64_t lim = limit && limit[r] < Lk ? limit[r] : Lk;  /* keys at or past it are masked */
        __m512 mx = ninf;
        for (int64_t jb = 0; jb < nkb; jb++) {
            const int64_t left = lim - jb * 16;
            __mmask16 m = left >= 16 ? (__mmask16)0xFFFF : left <= 0 ? 0 : (__mmask16)((1u << left) - 1);
            if (valid) {
                __m128i vb = _mm_maskz_loadu_epi8(m, valid + jb * 16);
                m &= _mm_test_epi8_mask(vb, vb);
            }
            __m512 x = _mm512_mask_mul_ps(ninf, m, _mm512_loadu_ps(sr + jb * 16), sc);
            _mm512_storeu_ps(sr + jb * 16, x);
            mx = _mm512_max_ps(mx, x);
        }
        const __m512 mxv = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
        __m512 sum = _mm512_setzero_ps();
        uint16_t *pr = p + r * lp;
        for (int64_t jb = 0; jb < nkb; jb++) {
            __m512 x = _mm512_loadu_ps(sr + jb * 16);
            __mmask16 live = _mm512_cmp_ps_mask(x, ninf, _CMP_NEQ_OQ);
            __m512 e = _mm512_maskz_mov_ps(live, exp_neg(_mm512_sub_ps(x, mxv)));
            sum = _mm512_add_ps(sum, e);
            _mm256_storeu_si256((__m256i *)(pr + jb * 16), (__m256i)_mm512_cvtneps_pbh(e));
        }
        const float total = _mm512_reduce_add_ps(sum);
        inv[r] = total > 0.0f ? 1.0f / total : 0.0f;  /* no key seen: zeros, as the value sum is */
    }
}

AVX512BF16 int attn_bf16(const uint16_t *q, int64_t qb, int64_t qr, const uint16_t *k, int64_t kb, int64_t kr,
                         const uint16_t *v, int64_t vb, int64_t vr, const uint8_t *key_valid,
                         const int32_t *q_limit, int64_t G,
                         int64_t Lq, int64_t Lk, int64_t H, int64_t Hkv, int64_t D, float scale, int64_t h0,
                         int64_t h1, uint16_t *out) {
    const int64_t P = D / 2, nkb = (Lk + 15) / 16, ls = nkb * 16, npair = (Lk + 1) / 2, lp = ls;
    const int64_t per_kv = H / Hkv;
    uint32_t *kp = aligned_alloc(64, round64((size_t)(nkb * P * 16 + npair * D) * 4));
    float *s = aligned_alloc(64, round64((size_t)(QM * ls + QM) * 4));
    uint16_t *p = aligned_alloc(64, round64((size_t)(QM * lp) * 2));
    if (!kp || !s || !p) {
        free(kp); free(s); free(p);
        return -1;
    }
    uint32_t *vp = kp + nkb * P * 16;
    float *inv = s + QM * ls;
    for (int64_t b = 0; b < G; b++) {
        const uint8_t *valid = key_valid ? key_valid + b * Lk : NULL;
        int64_t packed_kv = -1;
        for (int64_t h = h0; h < h1; h++) {
            const int64_t hk = h / per_kv;
            if (hk != packed_kv) {  /* query heads of one kv head are adjacent: each kv head packed once */
                pack_keys(k + b * kb + hk * D, kr, Lk, D, nkb, kp);
                pack_values(v + b * vb + hk * D, vr, Lk, valid, D, npair, vp);
                packed_kv = hk;
            }
            const uint16_t *qh = q + b * qb + h * D;
            uint16_t *oh = out + (b * Lq * H + h) * D;
            for (int64_t i0 = 0; i0 < Lq; i0 += QM) {
                const int mt = Lq - i0 < QM ? (int)(Lq - i0) : QM;
                for (int64_t jb = 0; jb < nkb; jb += 2) {
                    const int two = jb + 1 < nkb;
#define SCORE(m) score_tile(qh + i0 * qr, qr, kp, P, jb, two, m, s, ls)
                    BY_HEIGHT(mt, SCORE)
                }
                softmax_rows(s, ls, Lk, valid, q_limit ? q_limit + b * Lq + i0 : NULL, scale, mt, p, lp, inv);
                for (int r0 = 0; r0 < mt; r0 += PM) {
                    const int pm = mt - r0 < PM ? mt - r0 : PM;
                    for (int64_t d0 = 0; d0 < D; d0 += 64) {
                        const int nc = D - d0 >= 64 ? 4 : (int)((D - d0) / 16);
                        uint16_t *o = oh + (i0 + r0) * H * D;
#define VALUE(m)                                                                                        \
    switch (nc) {                                                                                       \
    case 4: value_tile(p + r0 * lp, lp, vp, D, npair, d0, 4, m, inv + r0, o, H * D); break;             \
    case 3: value_tile(p + r0 * lp, lp, vp, D, npair, d0, 3, m, inv + r0, o, H * D); break;             \
    case 2: value_tile(p + r0 * lp, lp, vp, D, npair, d0, 2, m, inv + r0, o, H * D); break;             \
    default: value_tile(p + r0 * lp, lp, vp, D, npair, d0, 1, m, inv + r0, o, H * D); break;            \
    }
                        BY_HEIGHT4(pm, VALUE)
                    }
                }
            }
        }
    }
    free(kp); free(s); free(p);
    return 0;
}
