/* AVX512 variants of grouped_mm.c's grouped thin GEMM (engine/model/cpu_kernel.py picks one at run time).

   Same contract: out[r, :] = x[r, :] @ w[e].T for every row r of expert e's run (rows sorted by expert, counts[e]
   each), out float32; the loops and their order as in grouped_mm.c (a tile of weight rows kept in L1 against every
   row tile of the expert's activations, the next tile's weight rows prefetched), with wider tiles.

   grouped_mm_avx512 (AVX512F/DQ): x float32, w float32 or bfloat16 (widened in registers). Bitwise grouped_mm's
   results: each 512-bit accumulator holds two weight rows' 8-lane AVX2 accumulators side by side (x's 8 values
   broadcast to both halves), so every lane runs the same FMAs in the same order, and the halves are summed by
   grouped_mm.c's reduction. Twice the work per instruction, four weight rows a tile.

   grouped_mm_bf16dot (AVX512-BF16): x and w bfloat16, 32 products per VDPBF16PS (pairs of bf16 products summed in
   float32 into 16 lanes), four weight rows a tile. Its sums are not grouped_mm's (another order, pairs added
   first, denormal inputs read as zero), but each output is one fixed sequence over K whatever the rows, so a
   row's result does not depend on the others.

   Every function here is compiled for its ISA by a target attribute (the file builds with the AVX2 flags of
   grouped_mm.c) and may only be called where grouped_cpu_isa() says the CPU has it. */
#include <immintrin.h>
#include <stdint.h>

#include "grouped_mm_common.h"

#define AVX512 __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,fma")))
#define AVX512BF16 __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx512bf16,fma")))
#define INLINE static inline __attribute__((always_inline))

/* 2: AVX512-BF16 (both kernels), 1: AVX512F/DQ/BW/VL (grouped_mm_avx512), 0: neither */
int grouped_cpu_isa(void) {
    __builtin_cpu_init();
    if (!(__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
          __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl")))
        return 0;
    return __builtin_cpu_supports("avx512bf16") ? 2 : 1;
}

/* ---- float32 activations: two AVX2 accumulators per register ---- */

/* 8 weights of row a at ia, then 8 of row b at ib */
INLINE AVX512 __m512 pair8(const void *w, int64_t ia, int64_t ib, const int bf16) {
    if (bf16) {
        const uint16_t *h = (const uint16_t *)w;
        __m256i v = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)(h + ia))),
                                            _mm_loadu_si128((const __m128i *)(h + ib)), 1);
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
    }
    const float *f = (const float *)w;
    return _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_loadu_ps(f + ia)), _mm256_loadu_ps(f + ib), 1);
}

/* grouped_mm.c's row result: the lanes' sum, then the K % 8 tail in order */
INLINE AVX512 float finish(__m256 acc, const float *xr, const void *w, int64_t j, int64_t K, int64_t K8,
                           const int bf16) {
    float s = hsum(acc);
    for (int64_t kk = K8; kk < K; kk++)
        s += xr[kk] * load1(w, j * K + kk, bf16);
    return s;
}

#define FW 4  /* weight rows per float32 tile (FW / 2 registers) */
#define FM 4  /* activation rows per tile, at most */

INLINE AVX512 void tile_f32(const float *x, int64_t K, const void *w, int64_t j0, int64_t N, const int bf16,
                            const int mt, float *out, int64_t m0) {
    int64_t j[FW];
    for (int i = 0; i < FW; i++)
        j[i] = j0 + i < N ? j0 + i : N - 1;  /* past the end: the last row again (same value written twice) */
    __m512 acc[8][FW / 2];
    for (int r = 0; r < mt; r++)
        for (int p = 0; p < FW / 2; p++)
            acc[r][p] = _mm512_setzero_ps();
    const int64_t K8 = K & ~(int64_t)7, es = bf16 ? 2 : 4;
    const char *next = (const char *)w + (j0 + FW) * K * es;  /* the next tile's rows (a prefetch never faults) */
    _Pragma("GCC unroll 2")
    for (int64_t k = 0; k < K8; k += 8) {
        for (int i = 0; i < FW; i++)
            _mm_prefetch(next + (i * K + k) * es, _MM_HINT_T0);
        __m512 wv[FW / 2];
        for (int p = 0; p < FW / 2; p++)
            wv[p] = pair8(w, j[2 * p] * K + k, j[2 * p + 1] * K + k, bf16);
        for (int r = 0; r < mt; r++) {
            __m512 xv = _mm512_broadcast_f32x8(_mm256_loadu_ps(x + (m0 + r) * K + k));
            for (int p = 0; p < FW / 2; p++)
                acc[r][p] = _mm512_fmadd_ps(xv, wv[p], acc[r][p]);
        }
    }
    for (int r = 0; r < mt; r++) {
        const float *xr = x + (m0 + r) * K;
        for (int p = 0; p < FW / 2; p++) {
            float lo = finish(_mm512_castps512_ps256(acc[r][p]), xr, w, j[2 * p], K, K8, bf16);
            float hi = finish(_mm512_extractf32x8_ps(acc[r][p], 1), xr, w, j[2 * p + 1], K, K8, bf16);
            out[(m0 + r) * N + j[2 * p]] = lo;
            out[(m0 + r) * N + j[2 * p + 1]] = hi;
        }
    }
}

INLINE AVX512 void run_f32(const float *x, const int64_t *counts, int64_t E, int64_t K, int64_t N, const void *w,
                           const int bf16, float *out) {
    const int64_t es = bf16 ? 2 : 4;
    int64_t start = 0;
    for (int64_t e = 0; e < E; e++) {
        const int64_t n = counts[e];
        if (n == 0) continue;
        const char *we = (const char *)w + e * N * K * es;
        const float *xe = x + start * K;
        float *oe = out + start * N;
        for (int64_t j = 0; j < N; j += FW)
            for (int64_t m = 0; m < n; m += FM)
            {
#define F32_TILE(h) tile_f32(xe, K, we, j, N, bf16, h, oe, m)
                BY_HEIGHT(n - m < FM ? n - m : FM, F32_TILE)  /* constant heights: accumulators in registers */
            }
        start += n;
    }
}

AVX512 void grouped_mm_avx512(const float *x, const int64_t *counts, int64_t E, int64_t K, int64_t N,
                              const void *w, int bf16, float *out) {
    if (bf16)
        run_f32(x, counts, E, K, N, w, 1, out);
    else
        run_f32(x, counts, E, K, N, w, 0, out);
}

/* ---- bfloat16 activations and weights: VDPBF16PS ---- */

#define BW 4  /* weight rows per bf16 tile */
#define AHEAD 4  /* bf16 weight tiles between a tile and the one it prefetches: one tile on streamed 25 GB/s, four
                    28 GB/s (12 MoE layers' three projections at 32 tokens, one thread; 30 GB/s is Tensor.sum's;
                    the float32 kernel streamed 5% slower with four, so it keeps one) */
#define BM 4  /* activation rows per tile, at most */

INLINE AVX512BF16 __m512bh bf16x32(const uint16_t *p, __mmask32 m) {
    return (__m512bh)_mm512_maskz_loadu_epi16(m, p);
}

INLINE AVX512BF16 void tile_dot(const uint16_t *x, int64_t K, const uint16_t *w, int64_t j0, int64_t N,
                                const int mt, float *out, int64_t m0) {
    int64_t j[BW];
    for (int i = 0; i < BW; i++)
        j[i] = j0 + i < N ? j0 + i : N - 1;
    __m512 acc[8][BW];
    for (int r = 0; r < mt; r++)
        for (int i = 0; i < BW; i++)
            acc[r][i] = _mm512_setzero_ps();
    const uint16_t *next = w + (j0 + AHEAD * BW) * K;  /* AHEAD tiles on */
    for (int64_t k = 0; k < K; k += 32) {
        /* whole steps, then one masked step over the K % 32 tail (zeros past the end) */
        const __mmask32 m = K - k >= 32 ? (__mmask32)-1 : (__mmask32)(((uint64_t)1 << (K - k)) - 1);
        for (int i = 0; i < BW; i++)
            _mm_prefetch((const char *)(next + i * K + k), _MM_HINT_T0);
        __m512bh wv[BW];
        for (int i = 0; i < BW; i++)
            wv[i] = bf16x32(w + j[i] * K + k, m);
        for (int r = 0; r < mt; r++) {
            __m512bh xv = bf16x32(x + (m0 + r) * K + k, m);
            for (int i = 0; i < BW; i++)
                acc[r][i] = _mm512_dpbf16_ps(acc[r][i], xv, wv[i]);
        }
    }
    for (int r = 0; r < mt; r++)
        for (int i = 0; i < BW; i++)
            out[(m0 + r) * N + j[i]] = _mm512_reduce_add_ps(acc[r][i]);
}

AVX512BF16 void grouped_mm_bf16dot(const uint16_t *x, const int64_t *counts, int64_t E, int64_t K, int64_t N,
                                   const uint16_t *w, float *out) {
    int64_t start = 0;
    for (int64_t e = 0; e < E; e++) {
        const int64_t n = counts[e];
        if (n == 0) continue;
        const uint16_t *we = w + e * N * K, *xe = x + start * K;
        float *oe = out + start * N;
        for (int64_t j = 0; j < N; j += BW)
            for (int64_t m = 0; m < n; m += BM)
            {
#define DOT_TILE(h) tile_dot(xe, K, we, j, N, h, oe, m)
                BY_HEIGHT(n - m < BM ? n - m : BM, DOT_TILE)
            }
        start += n;
    }
}
