/* Scalar and reduction helpers shared by grouped_mm.c and grouped_mm_avx512.c, so the AVX512 float32 kernel's row
   results are the AVX2 kernel's operation for operation; and the tile-height dispatch that grouped_mm_avx512.c and
   attention_avx512.c share. Plain (AVX2 + FMA, the files' build flags) always-inline
   functions: they inline into the AVX512-target functions too. */
#ifndef GROUPED_MM_COMMON_H
#define GROUPED_MM_COMMON_H
#include <immintrin.h>
#include <stdint.h>

/* w[i] as float32 (bf16 = 1: a bfloat16 weight, widened by a 16-bit shift) */
static inline __attribute__((always_inline)) float load1(const void *w, int64_t i, int bf16) {
    if (bf16) {
        union { uint32_t u; float f; } v;
        v.u = (uint32_t)((const uint16_t *)w)[i] << 16;
        return v.f;
    }
    return ((const float *)w)[i];
}

/* the 8 lanes' sum, in a fixed order */
static inline __attribute__((always_inline)) float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
/* a tile call at each constant height 1..8, or 1..4 (so each height's accumulators stay in registers; heights above
   the tile's maximum never occur) */
#define BY_HEIGHT(mt, CALL)                                                              \
    switch (mt) {                                                                        \
    case 8: CALL(8); break; case 7: CALL(7); break; case 6: CALL(6); break;              \
    case 5: CALL(5); break; case 4: CALL(4); break; case 3: CALL(3); break;              \
    case 2: CALL(2); break; default: CALL(1); break;                                     \
    }
#define BY_HEIGHT4(mt, CALL)                                                             \
    switch (mt) {                                                                        \
    case 4: CALL(4); break; case 3: CALL(3); break; case 2: CALL(2); break;              \
    default: CALL(1); break;                                                             \
    }
#endif
