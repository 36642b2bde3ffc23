/* Private to sampler/: the vocab-wide kernels (max, copy, gather, exp+sum, sum) with a generic
 * build and an AVX2 build of the same source (sampler_kern_tmpl.h), chosen once from cpuid. */
#ifndef KRS_SAMPLER_IMPL_H
#define KRS_SAMPLER_IMPL_H

#include <stdint.h>

struct sampler_kern {
    /* max of a[0..n) ignoring NaN; -INFINITY when n == 0 or all -inf/NaN */
    float (*max)(const float *a, int32_t n);
    /* copies src[0..n) to dst and returns its max (one pass); NaN if any element is NaN */
    float (*copy_max)(float *dst, const float *src, int32_t n);
    /* indices i (ascending) with a[i] >= t into idx; returns their count, or cap + 1 as soon as
     * there are more than cap (idx then holds cap of them) */
    int32_t (*gather_ge)(const float *a, int32_t n, float t, int32_t *idx, int32_t cap);
    /* sum of w_i = exp((a_i - m) * scale), with w_i < wmin replaced by 0; a_i <= m expected.
     * Stores the w_i into w[0..n) when w != NULL. -inf inputs give 0, NaN gives NaN. */
    double (*exp_sum)(const float *a, int32_t n, float m, float scale, float wmin, float *w);
    /* sum of w[0..n) */
    double (*sum)(const float *w, int32_t n);
};

const struct sampler_kern *sampler_kern_get(void);

/* Both builds, exposed for the tests (they must agree); call avx2 only where the CPU has it. */
extern const struct sampler_kern sampler_kern_generic;
extern const struct sampler_kern sampler_kern_avx2;

#endif
