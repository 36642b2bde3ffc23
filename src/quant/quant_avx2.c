/* AVX2/FMA/F16C kernels: the template in quant_simd.h with the maddubs+madd integer dot
 * product (operands stay within int16 range: u <= 128, |s| <= 127). Built with -mavx2 -mfma
 * -mf16c; only called after quant.c checked cpuid. */
#include <immintrin.h>

#define QS_FN(name) name##_avx2

static inline __attribute__((always_inline)) __m256i qs_dot(__m256i u, __m256i s)
{
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
}

#include "quant/quant_simd.h"
