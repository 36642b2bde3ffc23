/* AVX2/FMA versions of the cpu_vec kernels (built with -mavx2 -mfma; called only after
 * cpu_vec_init checked cpuid). exp: x = n ln2 + r with |r| <= ln2/2 (ln2 split in two for
 * the reduction), e^r by a degree-6 polynomial (Cephes expf coefficients), 2^n through the
 * exponent bits; inputs are clamped to [-87.3, 88.7], so the result is finite. */
#include "backend/cpu/cpu_vec.h"

#include <immintrin.h>

static inline __m256 exp8(__m256 x)
{
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.7f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    /* 2^n: n in [-126, 128]; split in two factors so n = 128 (x near 88.7) does not overflow
     * the exponent field */
    __m256i ni = _mm256_cvtps_epi32(n);
    __m256i h = _mm256_srai_epi32(ni, 1);
    __m256 s1 =
        _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(h, _mm256_set1_epi32(127)), 23));
    __m256 s2 = _mm256_castsi256_ps(
        _mm256_slli_epi32(_mm256_add_epi32(_mm256_sub_epi32(ni, h), _mm256_set1_epi32(127)), 23));
    return _mm256_mul_ps(_mm256_mul_ps(p, s1), s2);
}

static inline float hsum8(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

float cpu_vec_dot_avx2(const float *a, const float *b, int n)
{
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int i = 0;
    for (; i + 32 <= n; i += 32) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 16), _mm256_loadu_ps(b + i + 16), a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 24), _mm256_loadu_ps(b + i + 24), a3);
    }
    for (; i + 8 <= n; i += 8)
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), a0);
    float s = hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

void cpu_vec_axpy_avx2(float *out, float w, const float *v, int n)
{
    const __m256 wv = _mm256_set1_ps(w);
    int i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(out + i,
                         _mm256_fmadd_ps(wv, _mm256_loadu_ps(v + i), _mm256_loadu_ps(out + i)));
    for (; i < n; i++) out[i] += w * v[i];
}

/* act(x) = x * sigmoid(s(x)) with s(x) = x (SiLU) or 2 * 0.79788456 * (x + 0.044715 x^3)
 * (tanh-GELU: 0.5 * (1 + tanh(z)) = sigmoid(2z)). */
static inline __m256 glu8(__m256 x, int gelu)
{
    __m256 s = x;
    if (gelu) {
        __m256 x3 = _mm256_mul_ps(_mm256_mul_ps(x, x), x);
        s = _mm256_mul_ps(_mm256_set1_ps(2.0f * 0.7978845608f),
                          _mm256_fmadd_ps(_mm256_set1_ps(0.044715f), x3, x));
    }
    __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), s));
    return _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
}

void cpu_vec_glu_avx2(float *g, const float *u, int64_t n, int gelu)
{
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(g + i,
                         _mm256_mul_ps(glu8(_mm256_loadu_ps(g + i), gelu), _mm256_loadu_ps(u + i)));
    if (i < n) {
        float gb[8] = {0}, ub[8] = {0};
        for (int64_t j = i; j < n; j++) {
            gb[j - i] = g[j];
            ub[j - i] = u[j];
        }
        _mm256_storeu_ps(gb, _mm256_mul_ps(glu8(_mm256_loadu_ps(gb), gelu), _mm256_loadu_ps(ub)));
        for (int64_t j = i; j < n; j++) g[j] = gb[j - i];
    }
}

float cpu_vec_exp_sum_avx2(float *x, int64_t n, float mx)
{
    const __m256 m = _mm256_set1_ps(mx);
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), m));
        _mm256_storeu_ps(x + i, e);
        acc = _mm256_add_ps(acc, e);
    }
    float sum = hsum8(acc);
    if (i < n) {
        float b[8] = {0};
        for (int64_t j = i; j < n; j++) b[j - i] = x[j];
        __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(b), m));
        _mm256_storeu_ps(b, e);
        for (int64_t j = i; j < n; j++) {
            x[j] = b[j - i];
            sum += b[j - i];
        }
    }
    return sum;
}
