/* AVX2/FMA/F16C kernels: the template in quant_simd.h with the maddubs+madd integer dot
 * product (operands stay within int16 range: u <= 128, |s| <= 127). Built with -mavx2 -mfma
 * -mf16c; only called after quant.c checked cpuid. With 16 ymm registers the 32-element
 * block formats still take 8 activation rows per weight row (one accumulator each); Q6_K and
 * the float formats take 4 (QS_GW). */
#include <immintrin.h>
#include <stdint.h>

#define QS_FN(name) name##_avx2
#define QS_G        8
#define QS_GW       4

static inline __attribute__((always_inline)) __m256i qs_dot(__m256i u, __m256i s)
{
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
}

/* Bit i of x -> byte i = 0x10 (the fifth bit of Q5_0/Q5_1). */
static inline __attribute__((always_inline)) __m256i qs_bit5(uint32_t x)
{
    __m256i v = _mm256_set1_epi32((int)x);
    const __m256i shuf = _mm256_set_epi64x(0x0303030303030303LL, 0x0202020202020202LL,
                                           0x0101010101010101LL, 0x0000000000000000LL);
    const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    v = _mm256_and_si256(_mm256_shuffle_epi8(v, shuf), bit);
    return _mm256_and_si256(_mm256_cmpeq_epi8(v, bit), _mm256_set1_epi8(0x10));
}

#include "quant/quant_simd.h"
