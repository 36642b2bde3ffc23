/* The CPU backend's vector kernels (src/backend/cpu/cpu_vec*.c): the AVX2 versions against the
 * portable C versions and against double-precision references, on lengths that exercise the
 * vector body and every tail length, and on inputs across exp's range (GELU / SiLU arguments
 * from -30 to 30, softmax differences down to -100). Skips the AVX2 half on CPUs without it. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/cpu/cpu_vec.h"

static uint64_t rs = 0x9E3779B97F4A7C15ull;

static float rndf(float lo, float hi)
{
    rs ^= rs << 13;
    rs ^= rs >> 7;
    rs ^= rs << 17;
    return lo + (hi - lo) * (float)((rs >> 11) * (1.0 / 9007199254740992.0));
}

static const int LENS[] = {1, 3, 7, 8, 9, 15, 16, 31, 33, 64, 100, 256, 257, 1000};
#define N_LENS (int)(sizeof(LENS) / sizeof(LENS[0]))

static double gelu_ref(double x)
{
    return 0.5 * x * (1.0 + tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)));
}

/* max |got - ref| / (|ref| + floor) over n values */
static double rel_err(const float *got, const double *ref, int n, double floor)
{
    double worst = 0;
    for (int i = 0; i < n; i++) {
        double e = fabs((double)got[i] - ref[i]) / (fabs(ref[i]) + floor);
        if (e > worst || isnan(got[i])) worst = isnan(got[i]) ? INFINITY : e;
    }
    return worst;
}

static void check_table(const struct cpu_vec *v)
{
    float a[1000], b[1000], g[1000], u[1000], o[1000];
    double ref[1000];
    for (int li = 0; li < N_LENS; li++) {
        const int n = LENS[li];
        /* dot: relative to the L1 mass of the products (summation order differs) */
        double d = 0, mass = 0;
        for (int i = 0; i < n; i++) {
            a[i] = rndf(-2, 2);
            b[i] = rndf(-2, 2);
            d += (double)a[i] * b[i];
            mass += fabs((double)a[i] * b[i]);
        }
        float got = v->dot(a, b, n);
        assert_true(fabs(got - d) <= 1e-6 * mass + 1e-30);
        /* axpy */
        for (int i = 0; i < n; i++) {
            o[i] = rndf(-1, 1);
            ref[i] = (double)o[i] + (double)0.37f * (double)a[i];
        }
        v->axpy(o, 0.37f, a, n);
        assert_true(rel_err(o, ref, n, 1.0) < 1e-6); /* values are O(1) */
        /* glu, both activations, arguments across exp's useful range: relative error, plus
         * an absolute floor of 2e-7 |x u| where act(x) is tiny (the float C version's
         * 1 + tanh cancels there; in the op's NMSE those values weigh nothing) */
        for (int gelu = 0; gelu < 2; gelu++) {
            double worst = 0;
            for (int i = 0; i < n; i++) {
                g[i] = rndf(-30, 30) * (i % 3 ? 0.1f : 1.0f);
                u[i] = rndf(-2, 2);
                double x = g[i];
                ref[i] = (gelu ? gelu_ref(x) : x / (1.0 + exp(-x))) * u[i];
                o[i] = (float)fabs(x * u[i]);
            }
            v->glu(g, u, n, gelu);
            for (int i = 0; i < n; i++) {
                double e = fabs(g[i] - ref[i]) / (2e-6 * fabs(ref[i]) + 2e-7 * o[i] + 1e-30);
                if (!(e <= worst)) worst = e; /* NaN propagates */
            }
            assert_true(worst <= 1.0);
        }
        /* exp_sum: x - mx in [-100, 0] */
        float mx = 3.0f;
        double sum = 0;
        for (int i = 0; i < n; i++) {
            a[i] = mx - rndf(0, 100) * (i % 2 ? 0.05f : 1.0f);
            ref[i] = exp((double)a[i] - mx);
            sum += ref[i];
        }
        float s = v->exp_sum(a, n, mx);
        assert_true(rel_err(a, ref, n, 1e-30) < 2e-6 || rel_err(a, ref, n, 1e-37) < 2e-6);
        assert_true(fabs(s - sum) <= 1e-5 * sum); /* float sum of <= 1000 terms */
    }
}

static void test_c(void **state)
{
    (void)state;
    struct cpu_vec v;
    cpu_vec_init(&v, 0);
    assert_string_equal(v.name, "c");
    check_table(&v);
}

static void test_simd(void **state)
{
    (void)state;
    struct cpu_vec v;
    cpu_vec_init(&v, 1);
    if (strcmp(v.name, "avx2") != 0) {
        printf("SKIP cpu_vec avx2: this CPU lacks AVX2/FMA\n");
        return;
    }
    check_table(&v);
}

int main(void)
{
    const struct CMUnitTest tests[] = {cmocka_unit_test(test_c), cmocka_unit_test(test_simd)};
    return cmocka_run_group_tests(tests, NULL, NULL);
}
