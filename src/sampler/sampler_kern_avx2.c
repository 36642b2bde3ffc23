/* AVX2 build of the sampler kernels (same source as the generic build, compiled with -mavx2;
 * used only when cpuid reports AVX2). */
#define KERN_VBYTES 32
#define KERN_SUFFIX _avx2
#include "sampler/sampler_kern_tmpl.h"

const struct sampler_kern sampler_kern_avx2 = {
    .max = kmax_avx2,
    .copy_max = kcopy_max_avx2,
    .gather_ge = kgather_ge_avx2,
    .exp_sum = kexp_sum_avx2,
    .sum = ksum_avx2,
};
