/* Vector kernels of the CPU backend's non-matmul ops (private to backend/cpu).
 *
 * backend_cpu.c runs attention, GLU and softmax through this table; cpu_vec_init fills it with
 * the AVX2/FMA versions (cpu_vec_avx2.c, built with those flags) when cpuid reports them, else
 * with the portable C versions in cpu_vec.c. The AVX2 exp is a degree-6 polynomial after range
 * reduction (~2 ulp), so results differ from libm's by float rounding only: GELU, SiLU and the
 * softmax weights stay within the op thresholds of tests/backend/test_backend_ops.c (1e-10 and
 * 1e-6 NMSE). */
#ifndef KRS_BACKEND_CPU_VEC_H
#define KRS_BACKEND_CPU_VEC_H

#include <stdint.h>

struct cpu_vec {
    const char *name; /* "avx2" or "c" */
    /* sum a[i] * b[i] over n elements */
    float (*dot)(const float *a, const float *b, int n);
    /* out[i] += w * v[i] */
    void (*axpy)(float *out, float w, const float *v, int n);
    /* g[i] = act(g[i]) * u[i], act = tanh-GELU (gelu != 0) or SiLU */
    void (*glu)(float *g, const float *u, int64_t n, int gelu);
    /* x[i] = exp(x[i] - mx); returns the sum of the new x[i] */
    float (*exp_sum)(float *x, int64_t n, float mx);
};

/* Fills *v: the AVX2 kernels when simd != 0 and the CPU has AVX2 and FMA, else the C ones. */
void cpu_vec_init(struct cpu_vec *v, int simd);

float cpu_vec_dot_avx2(const float *a, const float *b, int n);
void cpu_vec_axpy_avx2(float *out, float w, const float *v, int n);
void cpu_vec_glu_avx2(float *g, const float *u, int64_t n, int gelu);
float cpu_vec_exp_sum_avx2(float *x, int64_t n, float mx);

#endif
