/* Portable versions of the cpu_vec kernels and the run-time choice between them and AVX2. */
#include "backend/cpu/cpu_vec.h"

#include <math.h>

static float dot_c(const float *a, const float *b, int n)
{
    float acc[8] = {0};
    int i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++) acc[j] += a[i + j] * b[i + j];
    float s = 0;
    for (; i < n; i++) s += a[i] * b[i];
    for (int j = 0; j < 8; j++) s += acc[j];
    return s;
}

/* restrict and fixed 8-wide groups let -O2 vectorize it */
static void axpy_c(float *restrict out, float w, const float *restrict v, int n)
{
    int i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++) out[i + j] += w * v[i + j];
    for (; i < n; i++) out[i] += w * v[i];
}

static void glu_c(float *g, const float *u, int64_t n, int gelu)
{
    if (gelu) {
        for (int64_t i = 0; i < n; i++) {
            float x = g[i];
            g[i] = 0.5f * x * (1.0f + tanhf(0.7978845608f * (x + 0.044715f * x * x * x))) * u[i];
        }
    } else {
        for (int64_t i = 0; i < n; i++) g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
    }
}

static float exp_sum_c(float *x, int64_t n, float mx)
{
    float sum = 0;
    for (int64_t i = 0; i < n; i++) {
        x[i] = expf(x[i] - mx);
        sum += x[i];
    }
    return sum;
}

void cpu_vec_init(struct cpu_vec *v, int simd)
{
    __builtin_cpu_init();
    if (simd && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        *v = (struct cpu_vec){"avx2", cpu_vec_dot_avx2, cpu_vec_axpy_avx2, cpu_vec_glu_avx2,
                              cpu_vec_exp_sum_avx2};
    } else {
        *v = (struct cpu_vec){"c", dot_c, axpy_c, glu_c, exp_sum_c};
    }
}
