/* AVX-512 (VL + VNNI) kernels: the template in quant_simd.h with vpdpbusd (u8 x s8 -> s32,
 * no int16 saturation) as the integer dot product, on 256-bit registers (no frequency
 * penalty; the loops are memory bound at T = 1). Built with the AVX-512 flags; only called
 * after quant.c checked cpuid for avx512f/bw/vl/dq/vnni. */
#include <immintrin.h>

#define QS_FN(name) name##_avx512

static inline __attribute__((always_inline)) __m256i qs_dot(__m256i u, __m256i s)
{
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
}

#include "quant/quant_simd.h"
