/* Vocab-wide kernels written with GCC/clang vector extensions (KERN_VBYTES wide). Included by
 * sampler_kern.c (baseline ISA, 16 bytes) and sampler_kern_avx2.c (AVX2 flags, 32 bytes) with
 * KERN_SUFFIX and KERN_VBYTES set; the arithmetic is the same in both, only the width and the
 * instructions differ.
 *
 * exp: x = n ln2 + r, |r| <= ln2/2, e^r by the Cephes expf polynomial (about 1 ulp), 2^n
 * built in the exponent bits. Inputs below -87 give
 * 0 (the true value is < 1.7e-38, below any weight that matters). */
#include <string.h>

#include "sampler/sampler_impl.h"

#define KERN_CAT2(a, b) a##b
#define KERN_CAT(a, b)  KERN_CAT2(a, b)
#define KERN(name)      KERN_CAT(name, KERN_SUFFIX)

typedef float kvf __attribute__((vector_size(KERN_VBYTES)));
typedef int32_t kvi __attribute__((vector_size(KERN_VBYTES)));
#define KW (KERN_VBYTES / 4)

static inline kvf KERN(vload)(const float *p)
{
    kvf v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* Loads the n < KW remaining floats, padding with `pad`. */
static inline kvf KERN(vload_tail)(const float *p, int32_t n, float pad)
{
    float tmp[KW];
    for (int32_t i = 0; i < KW; i++) tmp[i] = i < n ? p[i] : pad;
    return KERN(vload)(tmp);
}

static inline kvf KERN(vsel)(kvi mask, kvf a, kvf b) /* mask ? a : b */
{
    return (kvf)(((kvi)a & mask) | ((kvi)b & ~mask));
}

static inline kvf KERN(vexp)(kvf x)
{
    const kvf lo = (kvf){0} - 87.0f;
    kvi under = x < lo; /* also -inf */
    x = KERN(vsel)(under, lo, x);
    kvf t = x * 1.44269504088896341f;
    kvf n = (t + 12582912.0f) - 12582912.0f; /* round to nearest */
    kvf r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    /* Cephes expf polynomial: e^r ~ 1 + r + r^2 P(r), about 1 ulp on |r| <= ln2/2 */
    kvf p = (kvf){0} + 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.0f;
    kvi ni = __builtin_convertvector(n, kvi);
    kvf scale = (kvf)((ni + 127) << 23);
    kvf res = p * scale;
    return (kvf)((kvi)res & ~under);
}

static float KERN(kmax)(const float *a, int32_t n)
{
    kvf m0 = (kvf){0} - __builtin_inff(), m1 = m0;
    int32_t i = 0;
    for (; i + 2 * KW <= n; i += 2 * KW) {
        kvf x0 = KERN(vload)(a + i), x1 = KERN(vload)(a + i + KW);
        m0 = KERN(vsel)(x0 > m0, x0, m0);
        m1 = KERN(vsel)(x1 > m1, x1, m1);
    }
    for (; i < n; i += KW) {
        kvf x =
            n - i >= KW ? KERN(vload)(a + i) : KERN(vload_tail)(a + i, n - i, -__builtin_inff());
        m0 = KERN(vsel)(x > m0, x, m0);
    }
    m0 = KERN(vsel)(m1 > m0, m1, m0);
    float m = -__builtin_inff();
    for (int k = 0; k < KW; k++)
        if (m0[k] > m) m = m0[k];
    return m;
}

static float KERN(kcopy_max)(float *dst, const float *src, int32_t n)
{
    kvf m0 = (kvf){0} - __builtin_inff(), m1 = m0;
    kvi nan = (kvi){0};
    int32_t i = 0;
    for (; i + 2 * KW <= n; i += 2 * KW) {
        kvf x0 = KERN(vload)(src + i), x1 = KERN(vload)(src + i + KW);
        memcpy(dst + i, &x0, sizeof x0);
        memcpy(dst + i + KW, &x1, sizeof x1);
        nan |= (x0 != x0) | (x1 != x1);
        m0 = KERN(vsel)(x0 > m0, x0, m0);
        m1 = KERN(vsel)(x1 > m1, x1, m1);
    }
    m0 = KERN(vsel)(m1 > m0, m1, m0);
    float m = -__builtin_inff();
    int any_nan = 0;
    for (int k = 0; k < KW; k++) {
        if (m0[k] > m) m = m0[k];
        any_nan |= nan[k];
    }
    for (; i < n; i++) {
        dst[i] = src[i];
        if (src[i] > m) m = src[i];
        any_nan |= src[i] != src[i];
    }
    return any_nan ? __builtin_nanf("") : m;
}

static int32_t KERN(kgather_ge)(const float *a, int32_t n, float t, int32_t *idx, int32_t cap)
{
    int32_t cnt = 0, i = 0;
    for (; i + KW <= n; i += KW) {
        kvi ge = KERN(vload)(a + i) >= t;
        int any = 0;
        for (int k = 0; k < KW; k++) any |= ge[k];
        if (!any) continue;
        for (int k = 0; k < KW; k++) {
            if (!ge[k]) continue;
            if (cnt == cap) return cap + 1;
            idx[cnt++] = i + k;
        }
    }
    for (; i < n; i++) {
        if (!(a[i] >= t)) continue;
        if (cnt == cap) return cap + 1;
        idx[cnt++] = i;
    }
    return cnt;
}

static inline kvf KERN(vexp_w)(kvf x, float m, float scale, float wmin)
{
    kvf e = KERN(vexp)((x - m) * scale);
    return KERN(vsel)(e < wmin, (kvf){0}, e);
}

/* Lane sums are flushed to double every 256 elements to keep the total accurate. */
static double KERN(kexp_sum)(const float *a, int32_t n, float m, float scale, float wmin, float *w)
{
    double total = 0.0;
    int32_t i = 0, body = n - n % KW;
    while (i < body) {
        int32_t end = body - i > 256 ? i + 256 : body;
        kvf acc = (kvf){0};
        kvf acc2 = (kvf){0};
        for (; i + 2 * KW <= end; i += 2 * KW) { /* two independent chains */
            kvf e0 = KERN(vexp_w)(KERN(vload)(a + i), m, scale, wmin);
            kvf e1 = KERN(vexp_w)(KERN(vload)(a + i + KW), m, scale, wmin);
            if (w) {
                memcpy(w + i, &e0, sizeof e0);
                memcpy(w + i + KW, &e1, sizeof e1);
            }
            acc += e0;
            acc2 += e1;
        }
        for (; i < end; i += KW) {
            kvf e = KERN(vexp_w)(KERN(vload)(a + i), m, scale, wmin);
            if (w) memcpy(w + i, &e, sizeof e);
            acc += e;
        }
        acc += acc2;
        double s = 0.0;
        for (int k = 0; k < KW; k++) s += acc[k];
        total += s;
    }
    if (i < n) {
        kvf e = KERN(vexp_w)(KERN(vload_tail)(a + i, n - i, -__builtin_inff()), m, scale, wmin);
        for (int32_t k = 0; k < n - i; k++) {
            if (w) w[i + k] = e[k];
            total += e[k];
        }
    }
    return total;
}

static double KERN(ksum)(const float *w, int32_t n)
{
    double total = 0.0;
    int32_t i = 0;
    while (i < n) {
        int32_t end = n - i > 256 ? i + 256 : n;
        kvf acc = (kvf){0};
        for (; i < end; i += KW) {
            int32_t left = end - i;
            acc += left >= KW ? KERN(vload)(w + i) : KERN(vload_tail)(w + i, left, 0.0f);
        }
        double s = 0.0;
        for (int k = 0; k < KW; k++) s += acc[k];
        total += s;
    }
    return total;
}
