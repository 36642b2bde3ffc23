/* Generic (baseline ISA) build of the sampler kernels and the run-time choice between it and
 * the AVX2 build. Owns no state besides the chosen table. */
#define KERN_VBYTES 16
#define KERN_SUFFIX _generic
#include "sampler/sampler_kern_tmpl.h"

const struct sampler_kern sampler_kern_generic = {
    .max = kmax_generic,
    .copy_max = kcopy_max_generic,
    .gather_ge = kgather_ge_generic,
    .exp_sum = kexp_sum_generic,
    .sum = ksum_generic,
};

const struct sampler_kern *sampler_kern_get(void)
{
#if defined(__x86_64__) || defined(__i386__)
    if (__builtin_cpu_supports("avx2")) return &sampler_kern_avx2;
#endif
    return &sampler_kern_generic;
}
