/* AVX-512 (VL + VNNI + BW) kernels: the template in quant_simd.h with vpdpbusd (u8 x s8 -> s32,
 * no int16 saturation) as the integer dot product, on 256-bit registers (no frequency
 * penalty), 8 activation rows at a time (32 ymm registers), and the fifth bit of Q5_0/Q5_1
 * straight from a mask register. Built with the AVX-512 flags; only called after quant.c
 * checked cpuid for avx512f/bw/vl/dq/vnni. */
#include <immintrin.h>
#include <stdint.h>

#define QS_FN(name) name##_avx512
#define QS_G        8
#define QS_GW       8

static inline __attribute__((always_inline)) __m256i qs_dot(__m256i u, __m256i s)
{
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
}

/* Bit i of x -> byte i = 0x10 (the fifth bit of Q5_0/Q5_1). */
static inline __attribute__((always_inline)) __m256i qs_bit5(uint32_t x)
{
    return _mm256_maskz_mov_epi8((__mmask32)x, _mm256_set1_epi8(0x10));
}

#include "quant/quant_simd.h"
