/* quant/: type table, fp16 conversion, hand-checked blocks, and every matmul path (scalar and
 * each SIMD path the CPU has) against a double-precision oracle built from quant_dequantize.
 *
 * Error bounds (see the tolerance note in src/quant/quant.c):
 *   float paths (scalar; F32/F16/BF16/Q2_K/Q3_K on SIMD): |y - ref| <= 1e-4 * sum|w_i x_i| + 1e-6
 *   int8-activation paths: |y - ref| <= 1.002 * sum_blocks(amax_b/254 * sum_b |w_i|)
 *                                        + 1e-4 * sum|w_i x_i| + 1e-6
 * checked per output element, and for the int8-activation paths the relative L2 error of the
 * whole output, ||y - ref|| / ||ref||, must stay below 2.5e-2. The test activations are harsh
 * (uniform [-1, 1] with 1/64 of the values scaled by 8, so ~40 % of the blocks carry an outlier
 * that coarsens their int8 step): the expected relative error is then ~1.4e-2; with
 * well-behaved activations it is ~4e-3 (amax/127/sqrt(12) per element). Wrong unpacking or
 * offsets give errors of order 1.
 * Bit-exactness of the dequantizers against gguf-py is checked by
 * test_dequant_vectors.c (vectors written by make_dequant_vectors.py). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "krserve.h"
#include "quant/quant.h"
#include "util/alloc.h"
#include "util/threadpool.h"

static uint64_t rng_state = 0x9E3779B97F4A7C15ULL;

static uint32_t rnd(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (uint32_t)(rng_state >> 11);
}

static float rndf(void) /* uniform in [-1, 1) */
{
    return (float)(rnd() & 0xFFFFFF) / 8388608.0f - 1.0f;
}

static void put_fp16(uint8_t *p, float f)
{
    uint16_t h = quant_f32_to_fp16(f);
    p[0] = (uint8_t)h;
    p[1] = (uint8_t)(h >> 8);
}

/* Random but sane weights: random payload bytes, fp16 scales of magnitude ~1e-3..1e-1. */
static void fill_weights(uint32_t type, uint8_t *data, int64_t n_out, int64_t n_in)
{
    uint64_t rb = quant_row_bytes(type, n_in);
    uint64_t total = rb * (uint64_t)n_out;
    for (uint64_t i = 0; i < total; i++) data[i] = (uint8_t)rnd();
    uint32_t bb = quant_block_bytes(type);
    if (type == QUANT_F32) {
        for (uint64_t i = 0; i < total / 4; i++) ((float *)data)[i] = rndf() * 0.1f;
        return;
    }
    if (type == QUANT_F16 || type == QUANT_BF16) {
        for (uint64_t i = 0; i < total / 2; i++) {
            float f = rndf() * 0.1f;
            uint16_t h;
            if (type == QUANT_F16) {
                h = quant_f32_to_fp16(f);
            } else {
                uint32_t u;
                memcpy(&u, &f, 4);
                h = (uint16_t)(u >> 16);
            }
            memcpy(data + 2 * i, &h, 2);
        }
        return;
    }
    for (uint64_t off = 0; off < total; off += bb) {
        uint8_t *b = data + off;
        float s = (0.001f + 0.05f * fabsf(rndf()));
        switch (type) {
        case QUANT_Q4_1:
        case QUANT_Q5_1:
            put_fp16(b, s);
            put_fp16(b + 2, rndf() * 0.5f);
            break;
        case QUANT_Q2_K:
            put_fp16(b + 80, s), put_fp16(b + 82, s * 0.5f);
            break;
        case QUANT_Q3_K:
            put_fp16(b + 108, s * 0.2f);
            break;
        case QUANT_Q4_K:
        case QUANT_Q5_K:
            put_fp16(b, s * 0.1f);
            put_fp16(b + 2, s * 0.05f);
            break;
        case QUANT_Q6_K:
            put_fp16(b + 208, s * 0.05f);
            break;
        default:
            put_fp16(b, rndf() < 0 ? -s : s);
            break;
        }
    }
}

static void test_type_table(void **state)
{
    (void)state;
    static const struct {
        uint32_t t;
        uint32_t e, b;
        const char *name;
    } want[] = {{QUANT_F32, 1, 4, "F32"},       {QUANT_F16, 1, 2, "F16"},
                {QUANT_BF16, 1, 2, "BF16"},     {QUANT_Q4_0, 32, 18, "Q4_0"},
                {QUANT_Q4_1, 32, 20, "Q4_1"},   {QUANT_Q5_0, 32, 22, "Q5_0"},
                {QUANT_Q5_1, 32, 24, "Q5_1"},   {QUANT_Q8_0, 32, 34, "Q8_0"},
                {QUANT_Q2_K, 256, 84, "Q2_K"},  {QUANT_Q3_K, 256, 110, "Q3_K"},
                {QUANT_Q4_K, 256, 144, "Q4_K"}, {QUANT_Q5_K, 256, 176, "Q5_K"},
                {QUANT_Q6_K, 256, 210, "Q6_K"}};
    for (size_t i = 0; i < sizeof(want) / sizeof(want[0]); i++) {
        assert_true(quant_type_supported(want[i].t));
        assert_int_equal(quant_block_elems(want[i].t), want[i].e);
        assert_int_equal(quant_block_bytes(want[i].t), want[i].b);
        assert_string_equal(quant_type_name(want[i].t), want[i].name);
    }
    assert_false(quant_type_supported(QUANT_Q8_K));
    assert_false(quant_type_supported(16));
    assert_string_equal(quant_type_name(99), "unknown");
    assert_int_equal(quant_row_bytes(QUANT_Q4_K, 2048), 8 * 144);
    assert_int_equal(quant_row_bytes(QUANT_Q4_K, 640), 0);
    assert_int_equal(quant_row_bytes(QUANT_Q8_0, 640), 20 * 34);
}

static void test_fp16(void **state)
{
    (void)state;
    assert_true(quant_fp16_to_f32(0x3C00) == 1.0f);
    assert_true(quant_fp16_to_f32(0xC000) == -2.0f);
    assert_true(quant_fp16_to_f32(0x0001) == ldexpf(1.0f, -24));
    assert_true(quant_fp16_to_f32(0x03FF) == ldexpf(1023.0f, -24));
    assert_true(quant_fp16_to_f32(0x7BFF) == 65504.0f);
    assert_true(isinf(quant_fp16_to_f32(0x7C00)) && quant_fp16_to_f32(0x7C00) > 0);
    assert_true(isinf(quant_fp16_to_f32(0xFC00)) && quant_fp16_to_f32(0xFC00) < 0);
    assert_true(isnan(quant_fp16_to_f32(0x7E00)));
    assert_true(signbit(quant_fp16_to_f32(0x8000)));
    /* round trip of every non-NaN half */
    for (uint32_t h = 0; h < 65536; h++) {
        float f = quant_fp16_to_f32((uint16_t)h);
        if (isnan(f)) {
            assert_true(isnan(quant_fp16_to_f32(quant_f32_to_fp16(f))));
            continue;
        }
        assert_int_equal(quant_f32_to_fp16(f), h);
    }
    /* round to nearest even, overflow, underflow */
    assert_int_equal(quant_f32_to_fp16(1.0f + ldexpf(1.0f, -11)), 0x3C00);
    assert_int_equal(quant_f32_to_fp16(1.0f + 3 * ldexpf(1.0f, -11)), 0x3C02);
    assert_int_equal(quant_f32_to_fp16(65520.0f), 0x7C00);
    assert_int_equal(quant_f32_to_fp16(65519.0f), 0x7BFF);
    assert_int_equal(quant_f32_to_fp16(ldexpf(1.0f, -25)), 0x0000);
    assert_int_equal(quant_f32_to_fp16(ldexpf(1.5f, -25)), 0x0001);
    assert_int_equal(quant_f32_to_fp16(ldexpf(3.0f, -25)), 0x0002);
    assert_true(quant_bf16_to_f32(0x3F80) == 1.0f);
    assert_true(quant_bf16_to_f32(0xC0A0) == -5.0f);
}

static void test_dequant_by_hand(void **state)
{
    (void)state;
    float y[256];
    uint8_t b[256];
    /* Q4_0: d = 2, qs[j] = 0x?j pattern -> elements (lo - 8) * 2, (hi - 8) * 2 */
    memset(b, 0, sizeof(b));
    put_fp16(b, 2.0f);
    for (int j = 0; j < 16; j++) b[2 + j] = (uint8_t)(j | ((15 - j) << 4));
    assert_int_equal(quant_dequantize(QUANT_Q4_0, b, y, 32), KRS_OK);
    for (int j = 0; j < 16; j++) {
        assert_true(y[j] == (float)((j - 8) * 2));
        assert_true(y[16 + j] == (float)((7 - j) * 2));
    }
    /* Q5_0: element 20's high bit set -> (hi nibble of qs[4] | 16) - 16 */
    memset(b, 0, sizeof(b));
    put_fp16(b, 1.0f);
    b[2 + 2] = 0x10; /* qh bit 20 */
    b[6 + 4] = 0x30; /* element 20 = high nibble of qs[4] = 3 */
    assert_int_equal(quant_dequantize(QUANT_Q5_0, b, y, 32), KRS_OK);
    assert_true(y[20] == 3.0f);
    assert_true(y[4] == -16.0f);
    /* Q8_0 */
    put_fp16(b, 0.5f);
    for (int j = 0; j < 32; j++) b[2 + j] = (uint8_t)(int8_t)(j - 16);
    assert_int_equal(quant_dequantize(QUANT_Q8_0, b, y, 32), KRS_OK);
    for (int j = 0; j < 32; j++) assert_true(y[j] == (float)(j - 16) * 0.5f);
    /* Q4_K: sub-block 5 scale 3 min 2 (packed in the high half of scales[]) */
    memset(b, 0, sizeof(b));
    put_fp16(b, 1.0f);
    put_fp16(b + 2, 1.0f);
    b[4 + 9] = 0x23;                                    /* sc[5] low 4 = 3, mn[5] low 4 = 2 */
    for (int l = 0; l < 32; l++) b[16 + 64 + l] = 0x50; /* chunk 2, high nibble = 5 */
    assert_int_equal(quant_dequantize(QUANT_Q4_K, b, y, 256), KRS_OK);
    for (int l = 0; l < 32; l++) assert_true(y[160 + l] == 3.0f * 5 - 2.0f);
    assert_true(y[128] == 0.0f);
    /* Q6_K: element 200 (h=1, k=2, l=8): ql[64+8] high nibble, qh[32+8] bits 4..5 */
    memset(b, 0, sizeof(b));
    put_fp16(b + 208, 1.0f);
    b[192 + 12] = (uint8_t)(int8_t)-3;
    b[64 + 8] = 0x70;
    b[128 + 32 + 8] = 0x20;
    assert_int_equal(quant_dequantize(QUANT_Q6_K, b, y, 256), KRS_OK);
    assert_true(y[200] == -3.0f * ((7 | (2 << 4)) - 32));
    assert_int_equal(quant_dequantize(QUANT_Q4_K, b, y, 100), KRS_ERR_INVALID);
    assert_int_equal(quant_dequantize(99, b, y, 32), KRS_ERR_INVALID);
}

static const uint32_t ALL_TYPES[] = {QUANT_F32,  QUANT_F16,  QUANT_BF16, QUANT_Q4_0, QUANT_Q4_1,
                                     QUANT_Q5_0, QUANT_Q5_1, QUANT_Q8_0, QUANT_Q2_K, QUANT_Q3_K,
                                     QUANT_Q4_K, QUANT_Q5_K, QUANT_Q6_K};

static int act_quantized(uint32_t type, enum quant_isa isa)
{
    if (isa == QUANT_ISA_SCALAR) return 0;
    return !(type == QUANT_F32 || type == QUANT_F16 || type == QUANT_BF16 || type == QUANT_Q2_K ||
             type == QUANT_Q3_K);
}

#define MAX_T   512
#define MAX_NIN 2048

/* Runs one shape on one path and checks every element against the double oracle. Returns the
 * worst error as a fraction of its bound. */
static double check_shape(struct quant_ctx *ctx, enum quant_isa isa, uint32_t type, int64_t n_out,
                          int64_t n_in, int T, const float *x, uint8_t *wdata, float *wf, float *y,
                          double *rel_worst)
{
    fill_weights(type, wdata, n_out, n_in);
    struct quant_matrix m = {type, n_in, n_out, wdata, quant_row_bytes(type, n_in)};
    for (int64_t r = 0; r < n_out; r++)
        assert_int_equal(quant_dequantize(type, wdata + r * m.row_bytes, wf + r * n_in, n_in),
                         KRS_OK);
    for (int64_t i = 0; i < (int64_t)T * n_out; i++) y[i] = NAN;
    assert_int_equal(quant_matmul(ctx, &m, x, T, y), KRS_OK);
    int aq = act_quantized(type, isa);
    double worst = 0, e2 = 0, r2 = 0;
    for (int t = 0; t < T; t++) {
        const float *xt = x + (int64_t)t * n_in;
        for (int64_t r = 0; r < n_out; r++) {
            const float *wr = wf + r * n_in;
            double ref = 0, mass = 0, qb = 0;
            for (int64_t i = 0; i < n_in; i++) {
                ref += (double)wr[i] * xt[i];
                mass += fabs((double)wr[i] * xt[i]);
            }
            if (aq) {
                for (int64_t b = 0; b < n_in / 32; b++) {
                    double amax = 0, wl1 = 0;
                    for (int j = 0; j < 32; j++) {
                        amax = fmax(amax, fabs(xt[b * 32 + j]));
                        wl1 += fabs(wr[b * 32 + j]);
                    }
                    qb += amax / 254.0 * wl1;
                }
            }
            double bound = 1.002 * qb + 1e-4 * mass + 1e-6;
            double err = fabs((double)y[(int64_t)t * n_out + r] - ref);
            if (!(err <= bound)) {
                fprintf(stderr, "%s %s n_out=%ld n_in=%ld T=%d t=%d r=%ld: y=%g ref=%g bound=%g\n",
                        quant_ctx_isa_name(ctx), quant_type_name(type), (long)n_out, (long)n_in, T,
                        t, (long)r, y[(int64_t)t * n_out + r], ref, bound);
                fail();
            }
            if (err / bound > worst) worst = err / bound;
            e2 += err * err;
            r2 += ref * ref;
        }
    }
    double rel = sqrt(e2 / r2);
    if (rel > *rel_worst) *rel_worst = rel;
    if (aq)
        assert_true(rel < 2.5e-2);
    else
        assert_true(rel < 1e-5);
    return worst;
}

static void test_matmul_paths(void **state)
{
    (void)state;
    static const int Ts[] = {1, 2, 3, 7, 16, 33, 512};
    struct pool *pool = NULL;
    assert_int_equal(pool_create(2, &pool), 0);
    float *x = alloc_malloc(sizeof(float) * MAX_T * MAX_NIN);
    float *y = alloc_malloc(sizeof(float) * MAX_T * 64);
    float *wf = alloc_malloc(sizeof(float) * 64 * MAX_NIN);
    uint8_t *wdata = alloc_malloc(64 * MAX_NIN * 4);
    assert_non_null(x), assert_non_null(y), assert_non_null(wf), assert_non_null(wdata);
    for (int64_t i = 0; i < (int64_t)MAX_T * MAX_NIN; i++) {
        /* activations with outliers so per-block scales vary */
        x[i] = rndf() * ((rnd() % 64) == 0 ? 8.0f : 1.0f);
    }
    enum quant_isa isas[] = {QUANT_ISA_SCALAR, QUANT_ISA_AVX2, QUANT_ISA_AVX512};
    for (size_t k = 0; k < 3; k++) {
        struct quant_ctx *ctx = NULL;
        int rc = quant_ctx_create(pool, MAX_T, MAX_NIN, isas[k], &ctx);
        if (rc == KRS_ERR_UNSUPPORTED) {
            fprintf(stderr, "isa %d not available on this CPU: skipped\n", (int)isas[k]);
            continue;
        }
        assert_int_equal(rc, KRS_OK);
        for (size_t ti = 0; ti < sizeof(ALL_TYPES) / sizeof(ALL_TYPES[0]); ti++) {
            uint32_t type = ALL_TYPES[ti];
            int64_t nins[2];
            if (quant_block_elems(type) == 256)
                nins[0] = 1024, nins[1] = 2048;
            else if (quant_block_elems(type) == 32)
                nins[0] = 640, nins[1] = 2048;
            else
                nins[0] = 640, nins[1] = 1003;
            double worst = 0, rel = 0;
            for (int ni = 0; ni < 2; ni++) {
                for (size_t tt = 0; tt < sizeof(Ts) / sizeof(Ts[0]); tt++) {
                    int64_t n_out = (tt % 2) ? 37 : 19;
                    if (Ts[tt] == 1) n_out = 61;
                    double wv = check_shape(ctx, isas[k], type, n_out, nins[ni], Ts[tt], x, wdata,
                                            wf, y, &rel);
                    if (wv > worst) worst = wv;
                }
            }
            fprintf(stderr, "%-6s %-5s worst error/bound %.3f, worst relative L2 error %.2e\n",
                    quant_ctx_isa_name(ctx), quant_type_name(type), worst, rel);
        }
        quant_ctx_free(ctx);
    }
    alloc_free(x), alloc_free(y), alloc_free(wf), alloc_free(wdata);
    pool_destroy(pool);
}

static void test_matmul_errors_and_no_alloc(void **state)
{
    (void)state;
    struct quant_ctx *ctx = NULL;
    assert_int_equal(quant_ctx_create(NULL, 4, 1024, QUANT_ISA_AUTO, &ctx), KRS_OK);
    assert_int_equal(quant_ctx_create(NULL, 0, 1024, QUANT_ISA_AUTO, &(struct quant_ctx *){0}),
                     KRS_ERR_INVALID);
    static uint8_t w[1024 * 4 * 3];
    static float x[4 * 1024], y[4 * 3];
    memset(w, 0, sizeof(w));
    struct quant_matrix m = {QUANT_Q4_K, 640, 3, w, 0};
    assert_int_equal(quant_matmul(ctx, &m, x, 1, y), KRS_ERR_INVALID); /* 640 % 256 */
    m = (struct quant_matrix){QUANT_Q8_0, 2048, 3, w, quant_row_bytes(QUANT_Q8_0, 2048)};
    assert_int_equal(quant_matmul(ctx, &m, x, 1, y), KRS_ERR_INVALID); /* n_in > max */
    m = (struct quant_matrix){QUANT_Q8_0, 1024, 3, w, quant_row_bytes(QUANT_Q8_0, 1024)};
    assert_int_equal(quant_matmul(ctx, &m, x, 5, y), KRS_ERR_INVALID); /* T > max_rows */
    m.type = QUANT_Q8_K;
    assert_int_equal(quant_matmul(ctx, &m, x, 1, y), KRS_ERR_INVALID);
    m.type = QUANT_Q8_0;
    struct alloc_stats a, b;
    alloc_get_stats(&a);
    assert_int_equal(quant_matmul(ctx, &m, x, 4, y), KRS_OK);
    alloc_get_stats(&b);
    assert_int_equal(a.blocks_in_use, b.blocks_in_use);
    assert_int_equal(b.bytes_peak, a.bytes_peak);
    for (int i = 0; i < 12; i++) assert_true(y[i] == 0.0f);
    quant_ctx_free(ctx);
}

/* Batch invariance (the scheduler relies on it): on every path, row t of Y computed inside a
 * batch of T rows (any position, any thread split) is bit-identical to the same activation row
 * computed alone. n_in 640 / 1024 exercise partial block groups; T = 13 exercises partial row
 * groups (4 and 8 rows per group). */
static void test_matmul_batch_invariance(void **state)
{
    (void)state;
    enum { BT = 13, BOUT = 35, BNIN = 1024 };
    struct pool *pool = NULL;
    assert_int_equal(pool_create(2, &pool), 0);
    float *x = alloc_malloc(sizeof(float) * BT * BNIN);
    float *yb = alloc_malloc(sizeof(float) * BT * BOUT);
    float *y1 = alloc_malloc(sizeof(float) * BOUT);
    uint8_t *wdata = alloc_malloc(BOUT * BNIN * 4);
    assert_non_null(x), assert_non_null(yb), assert_non_null(y1), assert_non_null(wdata);
    for (int64_t i = 0; i < (int64_t)BT * BNIN; i++)
        x[i] = rndf() * ((rnd() % 64) == 0 ? 8.0f : 1.0f);
    enum quant_isa isas[] = {QUANT_ISA_SCALAR, QUANT_ISA_AVX2, QUANT_ISA_AVX512};
    for (size_t k = 0; k < 3; k++) {
        struct quant_ctx *cb = NULL, *c1 = NULL;
        int rc = quant_ctx_create(pool, BT, BNIN, isas[k], &cb);
        if (rc == KRS_ERR_UNSUPPORTED) continue;
        assert_int_equal(rc, KRS_OK);
        assert_int_equal(quant_ctx_create(NULL, 1, BNIN, isas[k], &c1), KRS_OK);
        for (size_t ti = 0; ti < sizeof(ALL_TYPES) / sizeof(ALL_TYPES[0]); ti++) {
            uint32_t type = ALL_TYPES[ti];
            int64_t n_in = quant_block_elems(type) == 256 ? 1024 : 640;
            fill_weights(type, wdata, BOUT, n_in);
            struct quant_matrix m = {type, n_in, BOUT, wdata, quant_row_bytes(type, n_in)};
            for (int t = 0; t < BT; t++)
                memmove(x + (int64_t)t * n_in, x + (int64_t)t * BNIN, sizeof(float) * n_in);
            assert_int_equal(quant_matmul(cb, &m, x, BT, yb), KRS_OK);
            for (int t = 0; t < BT; t++) {
                assert_int_equal(quant_matmul(c1, &m, x + (int64_t)t * n_in, 1, y1), KRS_OK);
                if (memcmp(y1, yb + (int64_t)t * BOUT, sizeof(float) * BOUT) != 0) {
                    fprintf(stderr, "%s %s: row %d differs alone vs in a batch of %d\n",
                            quant_ctx_isa_name(cb), quant_type_name(type), t, BT);
                    fail();
                }
            }
            /* the same rows at another offset inside a smaller batch */
            assert_int_equal(quant_matmul(cb, &m, x + 3 * n_in, 6, yb), KRS_OK);
            for (int t = 0; t < 6; t++) {
                assert_int_equal(quant_matmul(c1, &m, x + (int64_t)(t + 3) * n_in, 1, y1), KRS_OK);
                assert_memory_equal(y1, yb + (int64_t)t * BOUT, sizeof(float) * BOUT);
            }
            for (int64_t i = 0; i < (int64_t)BT * BNIN; i++)
                x[i] = rndf() * ((rnd() % 64) == 0 ? 8.0f : 1.0f);
        }
        quant_ctx_free(cb);
        quant_ctx_free(c1);
    }
    alloc_free(x), alloc_free(yb), alloc_free(y1), alloc_free(wdata);
    pool_destroy(pool);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_type_table),      cmocka_unit_test(test_fp16),
        cmocka_unit_test(test_dequant_by_hand), cmocka_unit_test(test_matmul_errors_and_no_alloc),
        cmocka_unit_test(test_matmul_paths),    cmocka_unit_test(test_matmul_batch_invariance),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
