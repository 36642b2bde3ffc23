/* backend/: every op of struct backend_ops on every backend this build has, against plain C
 * references (scalar loops, double accumulation), compared by normalised mean squared error
 *     NMSE = sum (y - ref)^2 / sum ref^2
 * in the spirit of ggml's test-backend-ops: random inputs from fixed seeds, shapes taken from the
 * target models (gemma3 270M, llama 1B, qwen2) plus awkward ones (T = 1, T not a multiple of
 * 8/16, odd widths, GQA 1..8, sliding windows that cross blocks, shuffled and reused KV blocks,
 * prefill chunks and decodes in one step).
 *
 * Inputs reach a backend only through its interface, so one harness drives the CPU and a device:
 * weights through weight_upload; an activation's contents through `embed` of an F32 "staging"
 * weight whose rows hold the wanted data, in a step whose tokens are 0..T-1 (h_stage / h_set);
 * results come back through step_end (h_read / h_get). Every case uploads its weights and
 * staging data first, then reserves the arena (and KV pool), then runs its steps, as a model
 * load does. Each step ends with step_end.
 *
 * A device compiled in but not present (backend_create says KRS_ERR_UNSUPPORTED) prints
 * "SKIP <device>: <reason>" and its tests are skipped, not passed.
 *
 * Output: one line per op / backend / format (or configuration) with the worst NMSE found, its
 * threshold and the worst case; the whole table again at the end of the run (that is how a GPU
 * run is read). KRS_BACKEND_OPS_VERBOSE=1 prints every case; KRS_BACKEND_OPS_FULL=1 adds the
 * model-sized shapes (2048 x 8192, 8192 x 2048, long windows), too slow for the sanitizer CI.
 *
 * Thresholds: the worst NMSE allowed. "CPU" is the worst the CPU backend reads over the default
 * and full sweeps, on an AVX2 host and on an AVX-512 one (the same figures). Where the CPU is
 * exact up to float rounding the threshold leaves room for what a device may legitimately do
 * differently, and stays far below what a wrong index, layout, mask or formula reads
 * (1e-4 .. 1; a window off by one reads ~1e-4, erf-GELU for tanh-GELU 7e-9).
 *
 *   op / format              CPU       threshold  why
 *   matmul F32, F16, BF16    1.7e-13   1e-5       a device may round activations to tf32/f16
 *                                                 (~1e-7) or bf16 (~1.3e-6)
 *   matmul Q8_0 .. Q6_K      3.2e-5    3e-4       the CPU's SIMD paths quantize activations to
 *                                                 int8 per 32-block; ~10x margin
 *   embed (every format)     8e-16     1e-12      dequantized rows times the scale
 *   rmsnorm                  3.4e-15   1e-10
 *   add_bias, add            8e-16     1e-12
 *   softcap, glu silu/gelu   2.8e-15   1e-10      tanh-GELU; erf-GELU would read 7e-9
 *   rope                     2e-15     1e-6       float angles at positions 5000..8100 read
 *                                                 1e-9 (powf) .. 1e-7 (ggml's iterated product)
 *   get_rows                 0         0          a copy
 *   attention                8e-13     1e-6       f32 K/V; K/V stored as f16 would read ~1e-7
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/backend.h"
#include "backend/backend_test_util.h"
#include "krserve.h"
#include "quant/quant.h"

#define ARRAY_LEN(a) ((int)(sizeof(a) / sizeof((a)[0])))

/* ---- random numbers: splitmix64, one stream per case ---- */

struct rng {
    uint64_t s;
};

static struct rng rng_seed(uint64_t seed)
{
    struct rng r = {seed * 0x9E3779B97F4A7C15ULL + 0x632BE59BD9B4E019ULL};
    return r;
}

static uint64_t rng_next(struct rng *r)
{
    return test_splitmix(&r->s);
}

static double rng_unit(struct rng *r) /* [0, 1) */
{
    return (double)(rng_next(r) >> 11) * 0x1.0p-53;
}

static float rng_sym(struct rng *r) /* [-1, 1) */
{
    return (float)(2.0 * rng_unit(r) - 1.0);
}

static int rng_int(struct rng *r, int n) /* [0, n) */
{
    return (int)(rng_next(r) % (uint64_t)n);
}

static void rng_fill(struct rng *r, float *x, int64_t n, float amp)
{
    for (int64_t i = 0; i < n; i++) x[i] = amp * rng_sym(r);
}

static void shuffle_i32(struct rng *r, int32_t *a, int n)
{
    for (int i = n - 1; i > 0; i--) {
        int j = rng_int(r, i + 1);
        int32_t t = a[i];
        a[i] = a[j];
        a[j] = t;
    }
}

static void *xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    assert_non_null(p);
    return p;
}

/* Dot product in double; four partial sums only to keep the full sweep's references quick. */
static double dot_ref(const float *a, const float *b, int64_t n)
{
    double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
        s0 += (double)a[i] * b[i];
        s1 += (double)a[i + 1] * b[i + 1];
        s2 += (double)a[i + 2] * b[i + 2];
        s3 += (double)a[i + 3] * b[i + 3];
    }
    for (; i < n; i++) s0 += (double)a[i] * b[i];
    return (s0 + s1) + (s2 + s3);
}

/* ---- options, error measure, per-op tallies ---- */

static int g_full, g_verbose;

static double nmse(const float *y, const double *ref, int64_t n)
{
    double num = 0.0, den = 0.0;
    for (int64_t i = 0; i < n; i++) {
        if (!isfinite(y[i])) return INFINITY;
        double d = (double)y[i] - ref[i];
        num += d * d;
        den += ref[i] * ref[i];
    }
    return den > 0.0 ? num / den : num;
}

#define SUMMARY_MAX 256

static char g_summary[SUMMARY_MAX][200];
static int g_n_summary;

struct tally {
    const char *op, *dev;
    char fmt[40];
    double thr, worst;
    char worst_case[96];
    int n, bad;
};

static void tally_init(struct tally *t, const char *op, const char *dev, const char *fmt,
                       double thr)
{
    memset(t, 0, sizeof *t);
    t->op = op;
    t->dev = dev;
    snprintf(t->fmt, sizeof t->fmt, "%s", fmt);
    t->thr = thr;
    t->worst = -1.0;
}

static void tally_add(struct tally *t, double e, const char *fmt, ...)
{
    char what[96];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(what, sizeof what, fmt, ap);
    va_end(ap);
    int ok = e <= t->thr; /* false for NaN */
    t->n++;
    if (!ok) t->bad++;
    if (!ok || g_verbose)
        printf("  %-4s %-9s %-22s %-40s nmse %.3e%s\n", t->dev, t->op, t->fmt, what, e,
               ok ? "" : "  FAIL");
    if (isnan(e)) e = INFINITY;
    if (e > t->worst) {
        t->worst = e;
        snprintf(t->worst_case, sizeof t->worst_case, "%s", what);
    }
}

static void summary_line(const char *fmt, ...)
{
    char line[200];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    printf("backend_ops %s\n", line);
    fflush(stdout);
    if (g_n_summary < SUMMARY_MAX)
        snprintf(g_summary[g_n_summary++], sizeof g_summary[0], "%s", line);
}

/* Prints the summary line; returns the number of failed cases. */
static int tally_end(const struct tally *t)
{
    summary_line("%-4s %-9s %-22s cases %3d  max_nmse %.2e  thr %.0e  %-4s  %s", t->dev, t->op,
                 t->fmt, t->n, t->worst < 0 ? 0.0 : t->worst, t->thr, t->bad ? "FAIL" : "ok",
                 t->worst_case);
    return t->bad;
}

/* ---- the harness: a backend plus the host memory it may map ---- */

#define KEEP_MAX 4096

struct harness {
    const char *dev;
    struct backend *b;
    const struct backend_ops *ops;
    struct backend_params p;
    int has_kv, block_size;
    int32_t *iota;        /* [max(max_tokens, max_ctx)] 0, 1, 2, ... */
    int32_t *zeros;       /* [max_tokens] */
    int32_t *none;        /* [max_ctx + 1] -1: a block table that holds nothing */
    void *keep[KEEP_MAX]; /* host buffers the backend may map: freed after destroy */
    int n_keep;
};

#define CHECK(h, call)                                                                             \
    do {                                                                                           \
        int rc_ = (call);                                                                          \
        if (rc_) fail_msg("%s: %s -> %d (%s)", (h)->dev, #call, rc_, krs_status_str(rc_));         \
    } while (0)

static void *h_keep(struct harness *h, void *p)
{
    assert_true(h->n_keep < KEEP_MAX);
    h->keep[h->n_keep++] = p;
    return p;
}

static struct backend_params make_params(int max_tokens, int64_t max_n_in, int max_ctx)
{
    struct backend_params p = {
        .n_threads = 0,
        .max_tokens = max_tokens,
        .max_n_in = max_n_in,
        .max_ctx = max_ctx > max_tokens ? max_ctx : max_tokens,
        .mem_budget = 0,
    };
    return p;
}

/* Creates the backend; a device this machine lacks skips the test (nothing allocated yet). */
static void h_open(struct harness *h, const char *dev, const struct backend_params *p)
{
    char err[256] = "";
    memset(h, 0, sizeof *h);
    h->dev = dev;
    h->p = *p;
    int rc = backend_create(dev, p, &h->b, err, sizeof err);
    if (rc == KRS_ERR_UNSUPPORTED) {
        size_t dl = strlen(dev); /* the reason may already name the device */
        printf("SKIP %s: %s\n", dev,
               !strncmp(err, dev, dl) && err[dl] == ':' ? err + dl + 1 + (err[dl + 1] == ' ')
                                                        : err);
        fflush(stdout);
        skip();
    }
    if (rc) fail_msg("%s: backend_create -> %s (%s)", dev, krs_status_str(rc), err);
    assert_non_null(h->b);
    h->ops = h->b->ops;
    assert_non_null(h->ops);
    int n = p->max_ctx > p->max_tokens ? p->max_ctx : p->max_tokens;
    h->iota = h_keep(h, xmalloc((size_t)n * sizeof(int32_t)));
    h->zeros = h_keep(h, calloc((size_t)p->max_tokens, sizeof(int32_t)));
    h->none = h_keep(h, xmalloc(((size_t)n + 1) * sizeof(int32_t)));
    assert_non_null(h->zeros);
    for (int i = 0; i < n; i++) h->iota[i] = i;
    for (int i = 0; i <= n; i++) h->none[i] = -1;
}

static void h_close(struct harness *h)
{
    if (h->b) h->ops->destroy(h->b);
    for (int i = 0; i < h->n_keep; i++) free(h->keep[i]);
    memset(h, 0, sizeof *h);
}

/* Uploads a weight; data (malloc'ed) is kept alive until h_close. */
static struct backend_tensor *h_weight(struct harness *h, uint32_t type, int64_t n_in,
                                       int64_t n_out, void *data)
{
    h_keep(h, data);
    struct quant_matrix m = {.type = type,
                             .n_in = n_in,
                             .n_out = n_out,
                             .data = data,
                             .row_bytes = quant_row_bytes(type, n_in)};
    assert_true(m.row_bytes > 0);
    struct backend_tensor *t = NULL;
    CHECK(h, h->ops->weight_upload(h->b, &m, &t));
    assert_non_null(t);
    return t;
}

static struct backend_tensor *h_vector(struct harness *h, const float *v, int64_t n)
{
    float *copy = xmalloc((size_t)n * sizeof *copy);
    memcpy(copy, v, (size_t)n * sizeof *copy);
    return h_weight(h, QUANT_F32, n, 1, copy);
}

/* Reserves the arena for `tensors` tensors of `floats` floats in all (alignment slack added). */
static void h_arena(struct harness *h, int64_t floats, int tensors)
{
    uint64_t bytes = ((uint64_t)floats + 256u * (uint64_t)tensors) * sizeof(float) + 65536u;
    CHECK(h, h->ops->arena_reserve(h->b, bytes));
}

static struct backend_tensor *h_act(struct harness *h, int64_t n)
{
    struct backend_tensor *t = NULL;
    CHECK(h, h->ops->act_alloc(h->b, n, &t));
    assert_non_null(t);
    return t;
}

static void h_kv(struct harness *h, const struct backend_kv_layout *l)
{
    CHECK(h, h->ops->kv_reserve(h->b, l));
    h->has_kv = 1;
    h->block_size = l->block_size;
}

/* The largest divisor of n that is at most max_rows: a flat tensor read or written as rows. */
static int pick_rows(int64_t n, int max_rows)
{
    for (int64_t d = n < max_rows ? n : max_rows; d > 1; d--)
        if (n % d == 0) return (int)d;
    return 1;
}

/* A step of T tokens 0..T-1 at positions 0..T-1 of one sequence that holds no KV block. */
static void h_plain_step(struct harness *h, int T)
{
    struct backend_step s = {
        .n_tokens = T,
        .tokens = h->iota,
        .pos = h->iota,
        .seq = h->zeros,
        .n_seqs = 1,
        .n_logits = 0,
        .logit_rows = h->iota,
    };
    if (h->has_kv) {
        s.max_blocks = (T + h->block_size - 1) / h->block_size;
        s.block_table[BACKEND_KV_FULL] = h->none;
        s.block_table[BACKEND_KV_SWA] = h->none;
    }
    CHECK(h, h->ops->step_begin(h->b, &s));
}

/* step_end of the first n floats of t (as rows that fit a step), copied to out. */
static void h_read(struct harness *h, const struct backend_tensor *t, int64_t n, float *out)
{
    int rows = pick_rows(n, h->p.max_tokens);
    const float *p = NULL;
    CHECK(h, h->ops->step_end(h->b, t, rows, (int)(n / rows), &p));
    assert_non_null(p);
    memcpy(out, p, (size_t)n * sizeof *out);
}

/* Reads a tensor in a step of its own. */
static void h_get(struct harness *h, const struct backend_tensor *t, int64_t n, float *out)
{
    h_plain_step(h, 1);
    h_read(h, t, n, out);
}

struct staged {
    struct backend_tensor *w; /* F32 [rows, n / rows] */
    int rows;
};

/* Load time: uploads n floats as an F32 weight whose rows embed writes back in order. */
static struct staged h_stage(struct harness *h, const float *data, int64_t n)
{
    struct staged s;
    s.rows = pick_rows(n, h->p.max_tokens);
    float *copy = xmalloc((size_t)n * sizeof *copy);
    memcpy(copy, data, (size_t)n * sizeof *copy);
    s.w = h_weight(h, QUANT_F32, n / s.rows, s.rows, copy);
    return s;
}

/* Step time: dst[0 .. n) = the staged data, through embed (tokens 0..rows-1, scale 1). */
static void h_set(struct harness *h, struct staged s, struct backend_tensor *dst)
{
    const float *p = NULL;
    h_plain_step(h, s.rows);
    CHECK(h, h->ops->embed(h->b, s.w, 1.0f, dst));
    CHECK(h, h->ops->step_end(h->b, dst, 1, 1, &p));
}

/* ---- random weights in every format ---- */

static float rng_scale(struct rng *r) /* [0.001, 0.01) */
{
    return 0.001f + 0.009f * (float)rng_unit(r);
}

/* Random payload bytes with sane fp16 scales, as a quantizer would leave them: block scales d in
 * [0.001, 0.01] of random sign (Q*_0), d > 0 and a min m in [-8d, 0] (Q*_1), K-quant
 * super-block d and dmin in [0.001, 0.01] with random 6-bit sub-scales and mins (Q4_K/Q5_K),
 * random int8 sub-scales (Q6_K). Float formats: uniform [-0.1, 0.1]. */
static void *make_weight(struct rng *r, uint32_t type, int64_t n_out, int64_t n_in)
{
    uint64_t total = quant_row_bytes(type, n_in) * (uint64_t)n_out;
    uint8_t *d = xmalloc((size_t)total);
    for (uint64_t i = 0; i < total; i++) d[i] = (uint8_t)rng_next(r);
    uint32_t bb = quant_block_bytes(type);
    switch (type) {
    case QUANT_F32:
        for (uint64_t i = 0; i < total / 4; i++) {
            float f = 0.1f * rng_sym(r);
            memcpy(d + 4 * i, &f, 4);
        }
        return d;
    case QUANT_F16:
    case QUANT_BF16:
        for (uint64_t i = 0; i < total / 2; i++) {
            float f = 0.1f * rng_sym(r);
            uint32_t u;
            memcpy(&u, &f, 4);
            uint16_t v = type == QUANT_F16 ? quant_f32_to_fp16(f) : (uint16_t)(u >> 16);
            memcpy(d + 2 * i, &v, 2);
        }
        return d;
    default:
        break;
    }
    for (uint64_t off = 0; off < total; off += bb) {
        uint8_t *blk = d + off;
        float s = rng_scale(r);
        switch (type) {
        case QUANT_Q4_1:
        case QUANT_Q5_1:
            put_half(blk, s);
            put_half(blk + 2, -8.0f * s * (float)rng_unit(r));
            break;
        case QUANT_Q4_K:
        case QUANT_Q5_K:
            put_half(blk, s);
            put_half(blk + 2, rng_scale(r));
            break;
        case QUANT_Q6_K:
            put_half(blk + 208, s);
            break;
        default: /* Q4_0, Q5_0, Q8_0 */
            put_half(blk, (rng_next(r) & 1) ? s : -s);
            break;
        }
    }
    return d;
}

/* The reference's view of a weight: every row through quant_dequantize (bit-exact with ggml). */
static float *dequant_all(uint32_t type, const void *data, int64_t n_out, int64_t n_in)
{
    float *w = xmalloc((size_t)(n_out * n_in) * sizeof *w);
    uint64_t rb = quant_row_bytes(type, n_in);
    for (int64_t o = 0; o < n_out; o++)
        assert_int_equal(
            quant_dequantize(type, (const uint8_t *)data + (size_t)o * rb, w + o * n_in, n_in),
            KRS_OK);
    return w;
}

struct fmt_info {
    uint32_t type;
    double mm_thr; /* matmul NMSE threshold (see the table atop) */
};

static const struct fmt_info g_fmts[] = {
    {QUANT_F32, 1e-5},  {QUANT_F16, 1e-5},  {QUANT_BF16, 1e-5}, {QUANT_Q8_0, 3e-4},
    {QUANT_Q4_0, 3e-4}, {QUANT_Q4_1, 3e-4}, {QUANT_Q5_0, 3e-4}, {QUANT_Q5_1, 3e-4},
    {QUANT_Q4_K, 3e-4}, {QUANT_Q5_K, 3e-4}, {QUANT_Q6_K, 3e-4},
};
#define N_FMTS (ARRAY_LEN(g_fmts))

/* ---- mem_info, step_end ---- */

static void test_mem_info(void **state)
{
    const char *dev = *state;
    struct harness h;
    struct backend_params p = make_params(16, 1024, 64);
    p.mem_budget = 1ull << 30;
    h_open(&h, dev, &p);
    struct backend_mem_info m0, m1;
    memset(&m0, 0, sizeof m0);
    h.ops->mem_info(h.b, &m0);
    assert_true(m0.free_bytes > 0);
    assert_true(m0.total_bytes >= m0.free_bytes);
    if (!strcmp(dev, "cpu")) assert_true(m0.total_bytes == p.mem_budget);
    const uint64_t arena = 64ull << 20;
    CHECK(&h, h.ops->arena_reserve(h.b, arena));
    h.ops->mem_info(h.b, &m1);
    summary_line("%-4s %-9s total %.3f GiB, free %.3f GiB, free after a 64 MiB arena %.3f GiB", dev,
                 "mem_info", (double)m0.total_bytes / (1 << 30), (double)m0.free_bytes / (1 << 30),
                 (double)m1.free_bytes / (1 << 30));
    assert_true(m1.free_bytes > 0);
    assert_true(m1.total_bytes >= m1.free_bytes);
    assert_true(m1.free_bytes < m0.free_bytes);
    if (!strcmp(dev, "cpu")) assert_true(m1.free_bytes + arena <= m0.free_bytes);
    h_close(&h);
}

static void test_step_end(void **state)
{
    const char *dev = *state;
    struct harness h;
    struct backend_params p = make_params(64, 640, 64);
    const int rows = 33, cols = 640;
    const int64_t n = (int64_t)rows * cols;
    h_open(&h, dev, &p);
    struct rng r = rng_seed(1);
    float *x = xmalloc((size_t)n * sizeof *x), *y = xmalloc((size_t)n * sizeof *y);
    rng_fill(&r, x, n, 1.0f);
    struct staged sx = h_stage(&h, x, n);
    h_arena(&h, n, 1);
    struct backend_tensor *t = h_act(&h, n);
    h_set(&h, sx, t);
    static const int shapes[][2] = {{33, 640}, {5, 640}, {1, 640}, {1, 1}, {7, 17}, {11, 1920}};
    for (int i = 0; i < ARRAY_LEN(shapes); i++) {
        const float *out = NULL;
        int64_t k = (int64_t)shapes[i][0] * shapes[i][1];
        h_plain_step(&h, 1);
        CHECK(&h, h.ops->step_end(h.b, t, shapes[i][0], shapes[i][1], &out));
        assert_non_null(out);
        assert_memory_equal(out, x, (size_t)k * sizeof *x);
    }
    /* The embed of a staged F32 weight is exact: the harness's way in is lossless. */
    h_get(&h, t, n, y);
    assert_memory_equal(y, x, (size_t)n * sizeof *x);
    summary_line("%-4s %-9s requested rows returned; staging through embed exact", dev, "step_end");
    free(x);
    free(y);
    h_close(&h);
}

/* ---- matmul ---- */

struct mm_shape {
    int n_in, n_out, rows;
};

static const struct mm_shape mm_fast[] = {
    {640, 1024, 1}, /* gemma3 attn_q, decode */
    {640, 256, 7},  /* gemma3 attn_k */
    {1024, 640, 1}, /* gemma3 attn_output (K-quant capable) */
    {2048, 640, 7}, /* gemma3 ffn_down */
    {256, 37, 33},  /* odd n_out */
    {512, 72, 100}, /* prefill chunk */
    {768, 40, 16},
};
static const struct mm_shape mm_full[] = {
    {640, 2048, 33}, {640, 1024, 100},  {2048, 8192, 1},  {2048, 8192, 16},
    {8192, 2048, 7}, {8192, 2048, 100}, {1024, 2048, 33},
};

struct mm_case {
    struct mm_shape s;
    void *w;
    float *x;
    struct backend_tensor *tw, *tx, *ty;
    struct staged sx;
};

static int run_matmul_format(const char *dev, const struct fmt_info *f)
{
    struct mm_case cs[16];
    int n = 0;
    int64_t max_in = 0, floats = 0;
    uint32_t be = quant_block_elems(f->type);
    for (int pass = 0; pass < 2; pass++) {
        const struct mm_shape *list = pass ? mm_full : mm_fast;
        int cnt = pass ? ARRAY_LEN(mm_full) : ARRAY_LEN(mm_fast);
        if (pass && !g_full) break;
        for (int i = 0; i < cnt; i++) {
            if (list[i].n_in % (int)be) continue;
            assert_true(n < ARRAY_LEN(cs));
            memset(&cs[n], 0, sizeof cs[n]);
            cs[n].s = list[i];
            if (list[i].n_in > max_in) max_in = list[i].n_in;
            floats += (int64_t)list[i].rows * (list[i].n_in + list[i].n_out);
            n++;
        }
    }
    struct harness h;
    struct backend_params p = make_params(100, max_in, 128);
    h_open(&h, dev, &p);
    /* load: weights and staged activations */
    for (int i = 0; i < n; i++) {
        struct mm_case *c = &cs[i];
        struct rng r = rng_seed(1000u * f->type + (uint64_t)i);
        c->w = make_weight(&r, f->type, c->s.n_out, c->s.n_in);
        c->tw = h_weight(&h, f->type, c->s.n_in, c->s.n_out, c->w);
        c->x = xmalloc((size_t)c->s.rows * (size_t)c->s.n_in * sizeof(float));
        rng_fill(&r, c->x, (int64_t)c->s.rows * c->s.n_in, 1.0f);
        c->sx = h_stage(&h, c->x, (int64_t)c->s.rows * c->s.n_in);
    }
    h_arena(&h, floats, 2 * n);
    for (int i = 0; i < n; i++) {
        cs[i].tx = h_act(&h, (int64_t)cs[i].s.rows * cs[i].s.n_in);
        cs[i].ty = h_act(&h, (int64_t)cs[i].s.rows * cs[i].s.n_out);
    }
    struct tally t;
    tally_init(&t, "matmul", dev, quant_type_name(f->type), f->mm_thr);
    for (int i = 0; i < n; i++) {
        struct mm_case *c = &cs[i];
        const int rows = c->s.rows, n_in = c->s.n_in, n_out = c->s.n_out;
        h_set(&h, c->sx, c->tx);
        h_plain_step(&h, 1);
        CHECK(&h, h.ops->matmul(h.b, c->tw, c->tx, rows, c->ty));
        float *y = xmalloc((size_t)rows * (size_t)n_out * sizeof *y);
        h_read(&h, c->ty, (int64_t)rows * n_out, y);
        float *w = dequant_all(f->type, c->w, n_out, n_in);
        double *ref = xmalloc((size_t)rows * (size_t)n_out * sizeof *ref);
        for (int o = 0; o < n_out; o++) {
            const float *wr = w + (size_t)o * n_in;
            for (int rr = 0; rr < rows; rr++) {
                ref[(size_t)rr * n_out + o] = dot_ref(wr, c->x + (size_t)rr * n_in, n_in);
            }
        }
        tally_add(&t, nmse(y, ref, (int64_t)rows * n_out), "rows %d n_in %d n_out %d", rows, n_in,
                  n_out);
        free(w);
        free(ref);
        free(y);
    }
    for (int i = 0; i < n; i++) free(cs[i].x);
    h_close(&h);
    return tally_end(&t);
}

static void test_matmul(void **state)
{
    int bad = 0;
    for (int i = 0; i < N_FMTS; i++) bad += run_matmul_format(*state, &g_fmts[i]);
    assert_int_equal(bad, 0);
}

/* ---- embed ---- */

static int run_embed_format(const char *dev, const struct fmt_info *f)
{
    const int64_t n_in = quant_block_elems(f->type) == 256 ? 1024 : 640;
    const int vocab = g_full ? 40000 : 300;
    static const int Ts[] = {1, 7, 33, 100};
    const int n_T = ARRAY_LEN(Ts);
    struct harness h;
    struct backend_params p = make_params(100, n_in, 128);
    h_open(&h, dev, &p);
    struct rng r = rng_seed(77u + f->type);
    void *wd = make_weight(&r, f->type, vocab, n_in);
    struct backend_tensor *tw = h_weight(&h, f->type, n_in, vocab, wd);
    h_arena(&h, 100 * n_in, 1);
    struct backend_tensor *x = h_act(&h, 100 * n_in);
    float *row = xmalloc((size_t)n_in * sizeof *row);
    float *y = xmalloc((size_t)(100 * n_in) * sizeof *y);
    double *ref = xmalloc((size_t)(100 * n_in) * sizeof *ref);
    int32_t tok[100], pos[100], seq[100] = {0};
    struct tally t;
    tally_init(&t, "embed", dev, quant_type_name(f->type), 1e-12);
    for (int c = 0; c < 2 * n_T; c++) {
        const int T = Ts[c % n_T];
        const float scale = c < n_T ? sqrtf((float)n_in) : 1.0f;
        for (int i = 0; i < T; i++) {
            /* random ids, the last and the first id, and a repeat */
            tok[i] = rng_int(&r, vocab);
            pos[i] = i;
        }
        tok[0] = vocab - 1;
        if (T > 2) tok[T - 1] = 0;
        if (T > 3) tok[1] = tok[2];
        struct backend_step s = {
            .n_tokens = T, .tokens = tok, .pos = pos, .seq = seq, .n_seqs = 1, .logit_rows = pos};
        CHECK(&h, h.ops->step_begin(h.b, &s));
        CHECK(&h, h.ops->embed(h.b, tw, scale, x));
        h_read(&h, x, T * n_in, y);
        uint64_t rb = quant_row_bytes(f->type, n_in);
        for (int i = 0; i < T; i++) {
            assert_int_equal(
                quant_dequantize(f->type, (const uint8_t *)wd + (size_t)tok[i] * rb, row, n_in),
                KRS_OK);
            for (int64_t k = 0; k < n_in; k++) ref[i * n_in + k] = (double)row[k] * scale;
        }
        tally_add(&t, nmse(y, ref, T * n_in), "T %d n_in %d vocab %d scale %.3f", T, (int)n_in,
                  vocab, scale);
    }
    free(row);
    free(y);
    free(ref);
    h_close(&h);
    return tally_end(&t);
}

static void test_embed(void **state)
{
    int bad = 0;
    for (int i = 0; i < N_FMTS; i++) bad += run_embed_format(*state, &g_fmts[i]);
    assert_int_equal(bad, 0);
}

/* ---- rmsnorm ---- */

struct norm_case {
    int rows, n, in_place;
    const char *what;
};

static const struct norm_case norm_fast[] = {
    {1, 640, 0, "gemma3 hidden, decode"},
    {7, 640, 0, "gemma3 hidden"},
    {33, 2048, 0, "llama-1B hidden"},
    {28, 256, 0, "gemma3 q heads T=7"},
    {7, 256, 1, "gemma3 k head in place"},
    {1056, 64, 1, "T=33 x 32 heads in place"},
    {200, 128, 0, "T=100 x 2 kv heads"},
    {5, 4099, 0, "odd width"},
    {3, 1, 1, "n=1"},
};
static const struct norm_case norm_full[] = {
    {100, 2048, 0, "llama-1B hidden T=100"},
    {3200, 64, 1, "T=100 x 32 heads in place"},
    {400, 256, 1, "T=100 x 4 heads in place"},
};

static void run_norm_case(const char *dev, const struct norm_case *nc, int idx, struct tally *t)
{
    const int64_t N = (int64_t)nc->rows * nc->n;
    struct harness h;
    struct backend_params p = make_params(100, 8192, 128);
    h_open(&h, dev, &p);
    struct rng r = rng_seed(500u + (uint64_t)idx);
    float *x = xmalloc((size_t)N * sizeof *x), *w = xmalloc((size_t)nc->n * sizeof *w);
    float *y = xmalloc((size_t)N * sizeof *y);
    double *ref = xmalloc((size_t)N * sizeof *ref);
    /* rows of very different magnitudes (1e-2 .. 1e2); norm weights around 1 */
    for (int rr = 0; rr < nc->rows; rr++) {
        float mag = (float)pow(10.0, 4.0 * rng_unit(&r) - 2.0);
        rng_fill(&r, x + (int64_t)rr * nc->n, nc->n, mag);
    }
    for (int i = 0; i < nc->n; i++) w[i] = 1.0f + 0.5f * rng_sym(&r);
    const float eps = 1e-6f;
    struct backend_tensor *tw = h_vector(&h, w, nc->n);
    struct staged sx = h_stage(&h, x, N);
    h_arena(&h, 2 * N, 2);
    struct backend_tensor *tx = h_act(&h, N);
    struct backend_tensor *ty = nc->in_place ? tx : h_act(&h, N);
    h_set(&h, sx, tx);
    h_plain_step(&h, 1);
    CHECK(&h, h.ops->rmsnorm(h.b, tx, tw, nc->rows, nc->n, eps, ty));
    h_read(&h, ty, N, y);
    for (int rr = 0; rr < nc->rows; rr++) {
        const float *xr = x + (int64_t)rr * nc->n;
        double ss = 0.0;
        for (int i = 0; i < nc->n; i++) ss += (double)xr[i] * xr[i];
        double sc = 1.0 / sqrt(ss / nc->n + eps);
        for (int i = 0; i < nc->n; i++) ref[(int64_t)rr * nc->n + i] = xr[i] * sc * w[i];
    }
    tally_add(t, nmse(y, ref, N), "rows %d n %d%s (%s)", nc->rows, nc->n,
              nc->in_place ? " y==x" : "", nc->what);
    free(x);
    free(w);
    free(y);
    free(ref);
    h_close(&h);
}

static void test_rmsnorm(void **state)
{
    struct tally t;
    tally_init(&t, "rmsnorm", *state, "F32", 1e-10);
    for (int i = 0; i < ARRAY_LEN(norm_fast); i++) run_norm_case(*state, &norm_fast[i], i, &t);
    if (g_full)
        for (int i = 0; i < ARRAY_LEN(norm_full); i++)
            run_norm_case(*state, &norm_full[i], 100 + i, &t);
    assert_int_equal(tally_end(&t), 0);
}

/* ---- elementwise: add_bias, add, softcap, glu ---- */

enum ew_op { EW_BIAS, EW_ADD, EW_SOFTCAP, EW_GELU, EW_SILU };

struct ew_case {
    int64_t rows, n; /* rows only for add_bias; else n elements */
    float param;     /* softcap's cap */
};

/* One case of an elementwise op. The tensors are `pad` floats longer than the op's range, and
 * the reference says the padding stays as it was: an op must not write past its n. */
static void run_ew_case(const char *dev, enum ew_op op, const struct ew_case *ec, int idx,
                        struct tally *t)
{
    const int64_t n = op == EW_BIAS ? ec->rows * ec->n : ec->n;
    const int64_t pad = 37, N = n + pad;
    struct harness h;
    struct backend_params p = make_params(100, 8192, 128);
    h_open(&h, dev, &p);
    struct rng r = rng_seed(900u + 31u * (uint64_t)op + (uint64_t)idx);
    float *a = xmalloc((size_t)N * sizeof *a), *b = xmalloc((size_t)N * sizeof *b);
    float *y = xmalloc((size_t)N * sizeof *y);
    double *ref = xmalloc((size_t)N * sizeof *ref);
    switch (op) {
    case EW_SOFTCAP:
        rng_fill(&r, a, N, 4.0f * ec->param); /* well into the saturation */
        break;
    case EW_GELU:
    case EW_SILU:
        rng_fill(&r, a, N, 6.0f);
        for (int64_t i = 0; i < N; i += 97) a[i] = (i & 1) ? 12.5f : -12.5f; /* |x| > 10 */
        break;
    default:
        rng_fill(&r, a, N, 1.0f);
        break;
    }
    rng_fill(&r, b, N, 2.0f);
    struct backend_tensor *bias = op == EW_BIAS ? h_vector(&h, b, ec->n) : NULL;
    struct staged sa = h_stage(&h, a, N), sb = h_stage(&h, b, N);
    h_arena(&h, 2 * N, 2);
    struct backend_tensor *ta = h_act(&h, N), *tb = h_act(&h, N);
    h_set(&h, sa, ta);
    h_set(&h, sb, tb);
    h_plain_step(&h, 1);
    switch (op) {
    case EW_BIAS:
        CHECK(&h, h.ops->add_bias(h.b, ta, bias, (int)ec->rows, (int)ec->n));
        break;
    case EW_ADD:
        CHECK(&h, h.ops->add(h.b, ta, tb, n));
        break;
    case EW_SOFTCAP:
        CHECK(&h, h.ops->softcap(h.b, ta, n, ec->param));
        break;
    case EW_GELU:
    case EW_SILU:
        CHECK(&h, h.ops->glu(h.b, ta, tb, n, op == EW_GELU));
        break;
    }
    h_read(&h, ta, N, y);
    for (int64_t i = 0; i < N; i++) {
        double x = a[i], v = x;
        if (i < n) {
            switch (op) {
            case EW_BIAS:
                v = x + (double)b[i % ec->n];
                break;
            case EW_ADD:
                v = x + (double)b[i];
                break;
            case EW_SOFTCAP:
                v = ec->param * tanh(x / ec->param);
                break;
            case EW_GELU:
                v = 0.5 * x * (1.0 + tanh(0.7978845608028654 * (x + 0.044715 * x * x * x))) * b[i];
                break;
            case EW_SILU:
                v = x / (1.0 + exp(-x)) * b[i];
                break;
            }
        }
        ref[i] = v;
    }
    if (op == EW_BIAS)
        tally_add(t, nmse(y, ref, N), "rows %d n %d", (int)ec->rows, (int)ec->n);
    else if (op == EW_SOFTCAP)
        tally_add(t, nmse(y, ref, N), "n %d cap %.0f", (int)ec->n, ec->param);
    else
        tally_add(t, nmse(y, ref, N), "n %d", (int)ec->n);
    free(a);
    free(b);
    free(y);
    free(ref);
    h_close(&h);
}

/* Returns the number of failed cases. */
static int run_ew(const char *dev, enum ew_op op, const char *name, const char *fmt, double thr,
                  const struct ew_case *cs, int n)
{
    struct tally t;
    tally_init(&t, name, dev, fmt, thr);
    for (int i = 0; i < n; i++) run_ew_case(dev, op, &cs[i], i, &t);
    return tally_end(&t);
}

static void test_add_bias(void **state)
{
    static const struct ew_case cs[] = {
        {1, 256, 0},   /* qwen2 k bias, decode */
        {7, 1792, 0},  /* qwen2 q bias (14 x 128) */
        {33, 256, 0},  /* qwen2 k/v bias */
        {100, 128, 0}, /* one head */
        {3, 4097, 0},  /* odd width */
    };
    assert_int_equal(run_ew(*state, EW_BIAS, "add_bias", "F32", 1e-12, cs, ARRAY_LEN(cs)), 0);
}

static void test_add(void **state)
{
    static const struct ew_case cs[] = {{0, 1, 0}, {0, 4480, 0}, {0, 4483, 0}, {0, 67591, 0}};
    assert_int_equal(run_ew(*state, EW_ADD, "add", "F32", 1e-12, cs, ARRAY_LEN(cs)), 0);
}

static void test_softcap(void **state)
{
    static const struct ew_case cs[] = {
        {0, 1, 30.0f}, {0, 4483, 30.0f}, {0, 4483, 50.0f}, {0, 262147, 30.0f}};
    assert_int_equal(run_ew(*state, EW_SOFTCAP, "softcap", "F32", 1e-10, cs, ARRAY_LEN(cs)), 0);
}

static void test_glu(void **state)
{
    static const struct ew_case cs[] = {{0, 1, 0}, {0, 14336, 0}, {0, 8195, 0}, {0, 270336, 0}};
    int bad = run_ew(*state, EW_GELU, "glu", "gelu", 1e-10, cs, ARRAY_LEN(cs));
    bad += run_ew(*state, EW_SILU, "glu", "silu", 1e-10, cs, ARRAY_LEN(cs));
    assert_int_equal(bad, 0);
}

/* ---- rope ---- */

struct rope_cfg {
    const char *name;
    int n_heads, head_dim, n_rot;
    float base, freq_scale;
    int ff, neox;
};

static const struct rope_cfg rope_cfgs[] = {
    {"neox hd256 gemma3-q", 4, 256, 256, 1e6f, 1.0f, 0, 1},
    {"neox hd256 gemma3-k", 1, 256, 256, 1e4f, 1.0f, 0, 1},
    {"norm hd64 llama3-ff", 32, 64, 64, 5e5f, 1.0f, 1, 0},
    {"norm hd64 llama-kv", 8, 64, 64, 1e4f, 1.0f, 0, 0},
    {"neox hd128 qwen2", 14, 128, 128, 1e6f, 1.0f, 0, 1},
    {"neox hd128 rot64 s1/8", 2, 128, 64, 1e4f, 0.125f, 0, 1},
    {"norm hd128 rot32 ff", 3, 128, 32, 1e4f, 1.0f, 1, 0},
    {"neox hd64 rot32 ff s.5", 8, 64, 32, 5e5f, 0.5f, 1, 1},
    {"norm hd256", 2, 256, 256, 1e4f, 1.0f, 0, 0},
};

/* Steps of the rope test: several sequences (prefill chunks, decodes) at large positions. */
struct rope_step {
    int n;
    int seq_len[4];
    int seq_pos[4];
};

static const struct rope_step rope_steps[] = {
    {4, {7, 1, 33, 1}, {0, 5000, 4090, 1}}, /* T = 42 */
    {1, {1}, {4999}},                       /* T = 1 */
    {1, {100}, {8000}},                     /* T = 100 */
};
#define N_ROPE_STEPS (ARRAY_LEN(rope_steps))

static void run_rope_cfg(const char *dev, const struct rope_cfg *rc, int idx)
{
    const int width = rc->n_heads * rc->head_dim, half = rc->n_rot / 2;
    struct harness h;
    struct backend_params p = make_params(100, 8192, 8192);
    h_open(&h, dev, &p);
    struct rng r = rng_seed(1300u + (uint64_t)idx);
    float ff[128];
    /* llama3-like factors: 1 at high frequencies, up to 8 at low ones */
    for (int i = 0; i < half; i++) ff[i] = rc->ff ? 1.0f + 7.0f * (float)rng_unit(&r) : 1.0f;
    struct backend_tensor *tff = rc->ff ? h_vector(&h, ff, half) : NULL;
    float *x[N_ROPE_STEPS];
    struct staged sx[N_ROPE_STEPS];
    int Ts[N_ROPE_STEPS];
    for (int s = 0; s < N_ROPE_STEPS; s++) {
        Ts[s] = 0;
        for (int i = 0; i < rope_steps[s].n; i++) Ts[s] += rope_steps[s].seq_len[i];
        x[s] = xmalloc((size_t)Ts[s] * width * sizeof(float));
        rng_fill(&r, x[s], (int64_t)Ts[s] * width, 1.0f);
        sx[s] = h_stage(&h, x[s], (int64_t)Ts[s] * width);
    }
    h_arena(&h, 100 * width, 1);
    struct backend_tensor *tx = h_act(&h, 100 * width);
    struct tally t;
    tally_init(&t, "rope", dev, rc->name, 1e-6);
    float *y = xmalloc((size_t)100 * width * sizeof *y);
    double *ref = xmalloc((size_t)100 * width * sizeof *ref);
    for (int s = 0; s < N_ROPE_STEPS; s++) {
        const struct rope_step *st = &rope_steps[s];
        int32_t tok[100], pos[100], seq[100], T = 0, max_pos = 0;
        for (int i = 0; i < st->n; i++)
            for (int j = 0; j < st->seq_len[i]; j++, T++) {
                tok[T] = 0;
                pos[T] = st->seq_pos[i] + j;
                seq[T] = i;
                if (pos[T] > max_pos) max_pos = pos[T];
            }
        h_set(&h, sx[s], tx);
        struct backend_step bs = {.n_tokens = T,
                                  .tokens = tok,
                                  .pos = pos,
                                  .seq = seq,
                                  .n_seqs = st->n,
                                  .logit_rows = pos};
        CHECK(&h, h.ops->step_begin(h.b, &bs));
        struct backend_rope_args a = {.x = tx,
                                      .n_heads = rc->n_heads,
                                      .head_dim = rc->head_dim,
                                      .n_rot = rc->n_rot,
                                      .base = rc->base,
                                      .freq_scale = rc->freq_scale,
                                      .freq_factors = tff,
                                      .neox = rc->neox};
        CHECK(&h, h.ops->rope(h.b, &a));
        h_read(&h, tx, (int64_t)T * width, y);
        for (int tk = 0; tk < T; tk++)
            for (int hh = 0; hh < rc->n_heads; hh++) {
                const float *v = x[s] + ((int64_t)tk * rc->n_heads + hh) * rc->head_dim;
                double *o = ref + ((int64_t)tk * rc->n_heads + hh) * rc->head_dim;
                for (int i = 0; i < rc->head_dim; i++) o[i] = v[i];
                for (int i = 0; i < half; i++) {
                    double theta = (double)pos[tk] * rc->freq_scale *
                                   pow((double)rc->base, -2.0 * i / rc->n_rot) / ff[i];
                    int i0 = rc->neox ? i : 2 * i, i1 = rc->neox ? i + half : 2 * i + 1;
                    o[i0] = v[i0] * cos(theta) - v[i1] * sin(theta);
                    o[i1] = v[i0] * sin(theta) + v[i1] * cos(theta);
                }
            }
        tally_add(&t, nmse(y, ref, (int64_t)T * width), "T %d seqs %d max pos %d", T, st->n,
                  max_pos);
    }
    for (int s = 0; s < N_ROPE_STEPS; s++) free(x[s]);
    free(y);
    free(ref);
    h_close(&h);
    assert_int_equal(tally_end(&t), 0);
}

static void test_rope(void **state)
{
    for (int i = 0; i < ARRAY_LEN(rope_cfgs); i++) run_rope_cfg(*state, &rope_cfgs[i], i);
}

/* ---- get_rows ---- */

struct rows_case {
    int T, n, n_logits;
    int32_t rows[8]; /* n_logits > 8: every row, last first */
};

static void test_get_rows(void **state)
{
    const char *dev = *state;
    static const struct rows_case cs[] = {
        {33, 640, 5, {32, 0, 17, 5, 31}},
        {1, 2048, 1, {0}},
        {7, 4099, 3, {6, 2, 3}},
        {100, 896, 100, {0}},
        {16, 64, 2, {15, 14}},
    };
    const int n_cs = ARRAY_LEN(cs);
    struct harness h;
    struct backend_params p = make_params(100, 8192, 128);
    h_open(&h, dev, &p);
    struct rng r = rng_seed(1700);
    float *x[8];
    struct staged sx[8];
    int64_t floats = 0;
    for (int c = 0; c < n_cs; c++) {
        int64_t N = (int64_t)cs[c].T * cs[c].n;
        x[c] = xmalloc((size_t)N * sizeof(float));
        rng_fill(&r, x[c], N, 1.0f);
        sx[c] = h_stage(&h, x[c], N);
        floats += 2 * N;
    }
    h_arena(&h, floats, 2 * n_cs);
    struct backend_tensor *tx[8], *td[8];
    for (int c = 0; c < n_cs; c++) {
        tx[c] = h_act(&h, (int64_t)cs[c].T * cs[c].n);
        td[c] = h_act(&h, (int64_t)cs[c].T * cs[c].n);
    }
    struct tally t;
    tally_init(&t, "get_rows", dev, "F32", 0.0);
    for (int c = 0; c < n_cs; c++) {
        const struct rows_case *rc = &cs[c];
        int32_t tok[100], pos[100], seq[100] = {0}, lr[100];
        for (int i = 0; i < rc->T; i++) tok[i] = 0, pos[i] = i;
        for (int i = 0; i < rc->n_logits; i++)
            lr[i] = rc->n_logits > 8 ? rc->T - 1 - i : rc->rows[i];
        h_set(&h, sx[c], tx[c]);
        struct backend_step s = {.n_tokens = rc->T,
                                 .tokens = tok,
                                 .pos = pos,
                                 .seq = seq,
                                 .n_seqs = 1,
                                 .n_logits = rc->n_logits,
                                 .logit_rows = lr};
        CHECK(&h, h.ops->step_begin(h.b, &s));
        CHECK(&h, h.ops->get_rows(h.b, tx[c], rc->n, td[c]));
        const float *out = NULL;
        CHECK(&h, h.ops->step_end(h.b, td[c], rc->n_logits, rc->n, &out));
        assert_non_null(out);
        double *ref = xmalloc((size_t)rc->n_logits * rc->n * sizeof *ref);
        for (int i = 0; i < rc->n_logits; i++)
            for (int k = 0; k < rc->n; k++)
                ref[(int64_t)i * rc->n + k] = x[c][(int64_t)lr[i] * rc->n + k];
        tally_add(&t, nmse(out, ref, (int64_t)rc->n_logits * rc->n), "T %d n %d n_logits %d", rc->T,
                  rc->n, rc->n_logits);
        free(ref);
    }
    for (int c = 0; c < n_cs; c++) free(x[c]);
    h_close(&h);
    assert_int_equal(tally_end(&t), 0);
}

/* ---- kv_store + attention over a paged pool, several steps ---- */

struct attn_cfg {
    const char *name;
    int n_head, n_head_kv, head_dim;
    int n_swa; /* > 0: layers 0 and 2 slide (group SWA), layer 1 is full */
    int block_size;
    int factor; /* multiplies the prefill lengths of the program */
};

static const struct attn_cfg attn_fast[] = {
    {"gemma3 4/1x256 swa37", 4, 1, 256, 37, 16, 1},  {"llama1B 32/8x64", 32, 8, 64, 0, 16, 1},
    {"qwen2 16/2x128 swa16", 16, 2, 128, 16, 16, 1}, {"mha 4/4x64 swa5", 4, 4, 64, 5, 16, 1},
    {"gqa2 8/4x128 swa5 bs8", 8, 4, 128, 5, 8, 1},
};
static const struct attn_cfg attn_full[] = {
    {"gemma3 4/1x256 swa512", 4, 1, 256, 512, 16, 8},
    {"llama1B 32/8x64 long", 32, 8, 64, 0, 16, 5},
    {"qwen2 14/2x128 swa37", 14, 2, 128, 37, 32, 4},
};

/* The program: per step, (sequence, new tokens); n = 0 releases the sequence (its blocks go back
 * to the pool and are handed to the next new sequence, stale contents and all). The order of the
 * items is the step-local sequence order. */
struct item {
    int seq, n;
};

#define MAX_ITEMS 5
#define N_SEQS    5

struct prog_step {
    int n_items;
    struct item it[MAX_ITEMS];
};

static const struct prog_step attn_prog[] = {
    {3, {{0, 7}, {1, 33}, {2, 1}}},         /* prefill of three sequences */
    {3, {{2, 20}, {0, 1}, {1, 1}}},         /* a chunk and two decodes */
    {4, {{1, 1}, {3, 50}, {0, 1}, {2, 1}}}, /* a new sequence among decodes */
    {2, {{0, 40}, {3, 1}}},                 /* chunk crossing several blocks */
    {4, {{3, 1}, {2, 1}, {1, 1}, {0, 1}}},
    {1, {{1, 1}}},                          /* T = 1 */
    {4, {{1, 0}, {4, 30}, {0, 1}, {2, 1}}}, /* seq 1 leaves, seq 4 reuses its blocks */
    {4, {{2, 64}, {4, 1}, {3, 1}, {0, 1}}},
    {4, {{4, 1}, {0, 1}, {2, 1}, {3, 1}}},
    {2, {{3, 9}, {2, 1}}},
    {1, {{0, 1}}},
};
#define N_PROG (ARRAY_LEN(attn_prog))

#define ATTN_LAYERS 3

struct blockpool {
    int32_t *ids;
    int n;
};

struct seq_state {
    int len;
    int32_t *tab[BACKEND_KV_GROUPS];          /* [blocks_per_seq] physical id or -1 */
    float *kh[ATTN_LAYERS], *vh[ATTN_LAYERS]; /* [max_ctx, kv_dim] history of the reference */
};

static int item_len(const struct attn_cfg *c, const struct item *it)
{
    return it->n > 1 ? it->n * c->factor : it->n;
}

static int run_attention_cfg(const char *dev, const struct attn_cfg *c, int idx)
{
    const int hd = c->head_dim, kv_dim = c->n_head_kv * hd, qw = c->n_head * hd;
    const int n_layers = c->n_swa ? 3 : 2, bs = c->block_size, group = c->n_head / c->n_head_kv;
    const float scale = 1.0f / sqrtf((float)hd);
    uint8_t layer_group[ATTN_LAYERS];
    for (int l = 0; l < n_layers; l++)
        layer_group[l] = c->n_swa && l != 1 ? BACKEND_KV_SWA : BACKEND_KV_FULL;
    /* Dry run: the step sizes and the longest sequence. */
    int Ts[N_PROG], max_T = 1, max_len = 1;
    {
        int len[N_SEQS] = {0};
        for (int s = 0; s < N_PROG; s++) {
            Ts[s] = 0;
            for (int i = 0; i < attn_prog[s].n_items; i++) {
                const struct item *it = &attn_prog[s].it[i];
                if (!it->n) {
                    len[it->seq] = 0;
                    continue;
                }
                Ts[s] += item_len(c, it);
                len[it->seq] += item_len(c, it);
                if (len[it->seq] > max_len) max_len = len[it->seq];
            }
            if (Ts[s] > max_T) max_T = Ts[s];
        }
    }
    const int max_ctx = max_len + bs, blocks_per_seq = max_ctx / bs + 2;
    const int64_t n_blocks = 2 * N_SEQS * blocks_per_seq;
    struct harness h;
    struct backend_params p = make_params(max_T, 8192, max_ctx);
    h_open(&h, dev, &p);
    struct rng r = rng_seed(2000u + (uint64_t)idx);
    /* load: every step's q, k, v of every layer */
    float *hq[N_PROG][ATTN_LAYERS], *hk[N_PROG][ATTN_LAYERS], *hv[N_PROG][ATTN_LAYERS];
    struct staged sq[N_PROG][ATTN_LAYERS], sk[N_PROG][ATTN_LAYERS], sv[N_PROG][ATTN_LAYERS];
    for (int s = 0; s < N_PROG; s++)
        for (int l = 0; l < n_layers; l++) {
            const int T = Ts[s];
            hq[s][l] = xmalloc((size_t)T * qw * sizeof(float));
            hk[s][l] = xmalloc((size_t)T * kv_dim * sizeof(float));
            hv[s][l] = xmalloc((size_t)T * kv_dim * sizeof(float));
            rng_fill(&r, hq[s][l], (int64_t)T * qw, 4.0f); /* scores of std ~1.3 */
            rng_fill(&r, hk[s][l], (int64_t)T * kv_dim, 1.0f);
            rng_fill(&r, hv[s][l], (int64_t)T * kv_dim, 1.0f);
            sq[s][l] = h_stage(&h, hq[s][l], (int64_t)T * qw);
            sk[s][l] = h_stage(&h, hk[s][l], (int64_t)T * kv_dim);
            sv[s][l] = h_stage(&h, hv[s][l], (int64_t)T * kv_dim);
        }
    h_arena(&h, (int64_t)n_layers * max_T * (2 * qw + 2 * kv_dim), 4 * n_layers);
    struct backend_tensor *tq[ATTN_LAYERS], *tk[ATTN_LAYERS], *tv[ATTN_LAYERS], *to[ATTN_LAYERS];
    for (int l = 0; l < n_layers; l++) {
        tq[l] = h_act(&h, (int64_t)max_T * qw);
        tk[l] = h_act(&h, (int64_t)max_T * kv_dim);
        tv[l] = h_act(&h, (int64_t)max_T * kv_dim);
        to[l] = h_act(&h, (int64_t)max_T * qw);
    }
    struct backend_kv_layout lay = {
        .n_layers = n_layers,
        .layer_group = layer_group,
        .n_blocks = {n_blocks, c->n_swa ? n_blocks : 0},
        .block_size = bs,
        .kv_dim = kv_dim,
    };
    h_kv(&h, &lay);
    /* the reference's block pools: every id once, shuffled */
    struct blockpool pool[BACKEND_KV_GROUPS];
    for (int g = 0; g < BACKEND_KV_GROUPS; g++) {
        pool[g].ids = xmalloc((size_t)n_blocks * sizeof(int32_t));
        pool[g].n = (int)n_blocks;
        for (int i = 0; i < n_blocks; i++) pool[g].ids[i] = i;
        shuffle_i32(&r, pool[g].ids, (int)n_blocks);
    }
    struct seq_state sq_st[N_SEQS];
    for (int i = 0; i < N_SEQS; i++) {
        sq_st[i].len = 0;
        for (int g = 0; g < BACKEND_KV_GROUPS; g++) {
            sq_st[i].tab[g] = xmalloc((size_t)blocks_per_seq * sizeof(int32_t));
            for (int b = 0; b < blocks_per_seq; b++) sq_st[i].tab[g][b] = -1;
        }
        for (int l = 0; l < n_layers; l++) {
            sq_st[i].kh[l] = xmalloc((size_t)max_ctx * kv_dim * sizeof(float));
            sq_st[i].vh[l] = xmalloc((size_t)max_ctx * kv_dim * sizeof(float));
        }
    }
    int32_t *tok = xmalloc((size_t)max_T * sizeof(int32_t));
    int32_t *pos = xmalloc((size_t)max_T * sizeof(int32_t));
    int32_t *seq = xmalloc((size_t)max_T * sizeof(int32_t));
    int32_t *tables[BACKEND_KV_GROUPS];
    for (int g = 0; g < BACKEND_KV_GROUPS; g++)
        tables[g] = xmalloc((size_t)MAX_ITEMS * (blocks_per_seq + 2) * sizeof(int32_t));
    float *y = xmalloc((size_t)max_T * qw * sizeof *y);
    double *ref = xmalloc((size_t)max_T * qw * sizeof *ref);
    double *sc = xmalloc((size_t)max_ctx * sizeof *sc);
    struct tally t;
    tally_init(&t, "attention", dev, c->name, 1e-6);
    for (int s = 0; s < N_PROG; s++) {
        const struct prog_step *ps = &attn_prog[s];
        int T = 0, n_seqs = 0, max_blocks = 0;
        int step_seq[MAX_ITEMS];
        for (int i = 0; i < ps->n_items; i++) {
            const struct item *it = &ps->it[i];
            struct seq_state *ss = &sq_st[it->seq];
            if (!it->n) { /* release: blocks back to the pools, history gone */
                for (int g = 0; g < BACKEND_KV_GROUPS; g++)
                    for (int b = 0; b < blocks_per_seq; b++)
                        if (ss->tab[g][b] >= 0) {
                            pool[g].ids[pool[g].n++] = ss->tab[g][b];
                            ss->tab[g][b] = -1;
                        }
                ss->len = 0;
                continue;
            }
            const int n = item_len(c, it), p0 = ss->len, p1 = p0 + n; /* [p0, p1) */
            /* blocks: the full group holds all history; the sliding group holds what the
             * window of the step's first query can still see, onwards (as kv/ reserves). */
            for (int b = 0; b * bs < p1; b++) {
                if (ss->tab[BACKEND_KV_FULL][b] < 0) {
                    assert_true(pool[BACKEND_KV_FULL].n > 0);
                    ss->tab[BACKEND_KV_FULL][b] =
                        pool[BACKEND_KV_FULL].ids[--pool[BACKEND_KV_FULL].n];
                }
                int lo = p0 - c->n_swa + 1;
                if (c->n_swa && (b + 1) * bs > lo && ss->tab[BACKEND_KV_SWA][b] < 0) {
                    assert_true(pool[BACKEND_KV_SWA].n > 0);
                    ss->tab[BACKEND_KV_SWA][b] = pool[BACKEND_KV_SWA].ids[--pool[BACKEND_KV_SWA].n];
                }
            }
            int nb = (p1 + bs - 1) / bs;
            if (nb > max_blocks) max_blocks = nb;
            for (int j = 0; j < n; j++, T++) {
                tok[T] = rng_int(&r, 1000);
                pos[T] = p0 + j;
                seq[T] = n_seqs;
            }
            step_seq[n_seqs++] = it->seq;
        }
        assert_int_equal(T, Ts[s]);
        if (s % 2) max_blocks += 2; /* a wider table than needed, padded with -1 */
        for (int g = 0; g < BACKEND_KV_GROUPS; g++)
            for (int i = 0; i < n_seqs; i++)
                for (int b = 0; b < max_blocks; b++)
                    tables[g][i * max_blocks + b] =
                        b < blocks_per_seq ? sq_st[step_seq[i]].tab[g][b] : -1;
        /* the step: inputs in, then per layer store and attend */
        for (int l = 0; l < n_layers; l++) {
            h_set(&h, sq[s][l], tq[l]);
            h_set(&h, sk[s][l], tk[l]);
            h_set(&h, sv[s][l], tv[l]);
        }
        struct backend_step st = {
            .n_tokens = T,
            .tokens = tok,
            .pos = pos,
            .seq = seq,
            .n_seqs = n_seqs,
            .max_blocks = max_blocks,
            .block_table = {tables[BACKEND_KV_FULL], c->n_swa ? tables[BACKEND_KV_SWA] : NULL},
            .n_logits = 0,
            .logit_rows = pos,
        };
        CHECK(&h, h.ops->step_begin(h.b, &st));
        for (int l = 0; l < n_layers; l++) {
            struct backend_attn_args a = {
                .q = tq[l],
                .out = to[l],
                .layer = l,
                .n_head = c->n_head,
                .n_head_kv = c->n_head_kv,
                .head_dim = hd,
                .scale = scale,
                .n_swa = layer_group[l] == BACKEND_KV_SWA ? c->n_swa : 0,
            };
            CHECK(&h, h.ops->kv_store(h.b, l, tk[l], tv[l]));
            CHECK(&h, h.ops->attention(h.b, &a));
        }
        /* the reference's history */
        for (int tk_ = 0; tk_ < T; tk_++) {
            struct seq_state *ss = &sq_st[step_seq[seq[tk_]]];
            for (int l = 0; l < n_layers; l++) {
                memcpy(ss->kh[l] + (int64_t)pos[tk_] * kv_dim, hk[s][l] + (int64_t)tk_ * kv_dim,
                       (size_t)kv_dim * sizeof(float));
                memcpy(ss->vh[l] + (int64_t)pos[tk_] * kv_dim, hv[s][l] + (int64_t)tk_ * kv_dim,
                       (size_t)kv_dim * sizeof(float));
            }
        }
        for (int i = 0; i < n_seqs; i++) {
            int n_new = 0;
            for (int tk_ = 0; tk_ < T; tk_++) n_new += seq[tk_] == i;
            sq_st[step_seq[i]].len += n_new;
        }
        for (int l = n_layers - 1; l >= 0; l--) {
            if (l == n_layers - 1)
                h_read(&h, to[l], (int64_t)T * qw, y);
            else
                h_get(&h, to[l], (int64_t)T * qw, y);
            const int n_swa = layer_group[l] == BACKEND_KV_SWA ? c->n_swa : 0;
            for (int tk_ = 0; tk_ < T; tk_++) {
                const struct seq_state *ss = &sq_st[step_seq[seq[tk_]]];
                const int pq = pos[tk_], lo = n_swa && pq - n_swa + 1 > 0 ? pq - n_swa + 1 : 0;
                for (int hh = 0; hh < c->n_head; hh++) {
                    const float *q = hq[s][l] + (int64_t)tk_ * qw + (int64_t)hh * hd;
                    const int g = hh / group;
                    double mx = -INFINITY, sum = 0.0;
                    for (int j = lo; j <= pq; j++) {
                        const float *k = ss->kh[l] + (int64_t)j * kv_dim + (int64_t)g * hd;
                        double d = 0.0;
                        for (int e = 0; e < hd; e++) d += (double)q[e] * k[e];
                        sc[j] = d * scale;
                        if (sc[j] > mx) mx = sc[j];
                    }
                    for (int j = lo; j <= pq; j++) sum += (sc[j] = exp(sc[j] - mx));
                    double *o = ref + (int64_t)tk_ * qw + (int64_t)hh * hd;
                    for (int e = 0; e < hd; e++) o[e] = 0.0;
                    for (int j = lo; j <= pq; j++) {
                        const float *v = ss->vh[l] + (int64_t)j * kv_dim + (int64_t)g * hd;
                        double wgt = sc[j] / sum;
                        for (int e = 0; e < hd; e++) o[e] += wgt * v[e];
                    }
                }
            }
            tally_add(&t, nmse(y, ref, (int64_t)T * qw), "step %d layer %d%s T %d seqs %d", s, l,
                      n_swa ? " swa" : "", T, n_seqs);
        }
        /* trim: sliding blocks no later query can see go back to the pool (table entry -1) */
        if (c->n_swa)
            for (int i = 0; i < n_seqs; i++) {
                struct seq_state *ss = &sq_st[step_seq[i]];
                const int lo = ss->len - c->n_swa + 1;
                for (int b = 0; (b + 1) * bs <= lo; b++)
                    if (ss->tab[BACKEND_KV_SWA][b] >= 0) {
                        pool[BACKEND_KV_SWA].ids[pool[BACKEND_KV_SWA].n++] =
                            ss->tab[BACKEND_KV_SWA][b];
                        ss->tab[BACKEND_KV_SWA][b] = -1;
                    }
            }
    }
    for (int s = 0; s < N_PROG; s++)
        for (int l = 0; l < n_layers; l++) {
            free(hq[s][l]);
            free(hk[s][l]);
            free(hv[s][l]);
        }
    for (int i = 0; i < N_SEQS; i++) {
        for (int g = 0; g < BACKEND_KV_GROUPS; g++) free(sq_st[i].tab[g]);
        for (int l = 0; l < n_layers; l++) {
            free(sq_st[i].kh[l]);
            free(sq_st[i].vh[l]);
        }
    }
    for (int g = 0; g < BACKEND_KV_GROUPS; g++) {
        free(pool[g].ids);
        free(tables[g]);
    }
    free(tok);
    free(pos);
    free(seq);
    free(y);
    free(ref);
    free(sc);
    h_close(&h);
    return tally_end(&t);
}

static void test_attention(void **state)
{
    int bad = 0;
    for (int i = 0; i < ARRAY_LEN(attn_fast); i++)
        bad += run_attention_cfg(*state, &attn_fast[i], i);
    if (g_full)
        for (int i = 0; i < ARRAY_LEN(attn_full); i++)
            bad += run_attention_cfg(*state, &attn_full[i], 100 + i);
    assert_int_equal(bad, 0);
}

/* The same program with every prompt step on the CUDA backend's tensor-core kernel, which it
 * otherwise takes only where a layer fills the GPU (KRS_CUDA_ATTN_TILE=2: wherever the shape
 * fits; the harness' steps are too small to reach the default threshold). */
static void test_attention_tiles(void **state)
{
    if (strcmp(*state, "cuda")) {
        summary_line("%-4s attention tiles: a CUDA kernel, nothing to run", (const char *)*state);
        return;
    }
    const char *old = getenv("KRS_CUDA_ATTN_TILE");
    char *saved = old ? strdup(old) : NULL;
    setenv("KRS_CUDA_ATTN_TILE", "2", 1);
    int bad = 0;
    for (int i = 0; i < ARRAY_LEN(attn_fast); i++)
        bad += run_attention_cfg(*state, &attn_fast[i], 200 + i);
    if (g_full)
        for (int i = 0; i < ARRAY_LEN(attn_full); i++)
            bad += run_attention_cfg(*state, &attn_full[i], 300 + i);
    if (saved) {
        setenv("KRS_CUDA_ATTN_TILE", saved, 1);
        free(saved);
    } else {
        unsetenv("KRS_CUDA_ATTN_TILE");
    }
    assert_int_equal(bad, 0);
}

/* ---- a failed op voids its step; the next step starts clean ---- */

static void test_errors(void **state)
{
    const char *dev = *state;
    struct harness h;
    struct backend_params p = make_params(8, 64, 64);
    h_open(&h, dev, &p);
    struct rng r = rng_seed(2500);
    float x[8 * 64], w[16 * 64], y[8 * 16];
    rng_fill(&r, x, 8 * 64, 1.0f);
    rng_fill(&r, w, 16 * 64, 1.0f);
    float *wd = xmalloc(sizeof w);
    memcpy(wd, w, sizeof w);
    struct backend_tensor *tw = h_weight(&h, QUANT_F32, 64, 16, wd);
    struct staged sx = h_stage(&h, x, 8 * 64);
    h_arena(&h, 8 * 64 + 8 * 16, 2);
    struct backend_tensor *tx = h_act(&h, 8 * 64), *ty = h_act(&h, 8 * 16);
    h_set(&h, sx, tx);
    /* rows past the tensors: refused, not read */
    h_plain_step(&h, 1);
    assert_int_not_equal(h.ops->matmul(h.b, tw, tx, 9, ty), KRS_OK);
    /* a token of a sequence the step does not have */
    int32_t tok[2] = {0, 0}, pos[2] = {0, 1}, bad_seq[2] = {0, 1};
    struct backend_step s = {
        .n_tokens = 2, .tokens = tok, .pos = pos, .seq = bad_seq, .n_seqs = 1, .logit_rows = pos};
    assert_int_not_equal(h.ops->step_begin(h.b, &s), KRS_OK);
    /* and the next step works */
    h_plain_step(&h, 1);
    CHECK(&h, h.ops->matmul(h.b, tw, tx, 8, ty));
    h_read(&h, ty, 8 * 16, y);
    double ref[8 * 16];
    for (int rr = 0; rr < 8; rr++)
        for (int o = 0; o < 16; o++) {
            double acc = 0.0;
            for (int k = 0; k < 64; k++) acc += (double)w[o * 64 + k] * x[rr * 64 + k];
            ref[rr * 16 + o] = acc;
        }
    double e = nmse(y, ref, 8 * 16);
    summary_line("%-4s %-9s bad rows and bad seq ids refused; the next step: nmse %.2e", dev,
                 "errors", e);
    assert_true(e < 1e-5);
    h_close(&h);
}

/* ---- registry ---- */

struct op_test {
    const char *name;
    CMUnitTestFunction fn;
};

static const struct op_test g_ops[] = {
    {"mem_info", test_mem_info},
    {"step_end", test_step_end},
    {"matmul", test_matmul},
    {"embed", test_embed},
    {"rmsnorm", test_rmsnorm},
    {"add_bias", test_add_bias},
    {"add", test_add},
    {"softcap", test_softcap},
    {"glu", test_glu},
    {"rope", test_rope},
    {"get_rows", test_get_rows},
    {"attention", test_attention},
    {"attention_tiles", test_attention_tiles},
    {"errors", test_errors},
};
#define N_OPS (ARRAY_LEN(g_ops))

static const char *const g_devices[] = {"cpu", "cuda"};
#define N_DEVICES (ARRAY_LEN(g_devices))

static int env_flag(const char *name)
{
    const char *v = getenv(name);
    return v && *v && strcmp(v, "0") != 0;
}

int main(void)
{
    static struct CMUnitTest tests[N_OPS * N_DEVICES];
    static char names[N_OPS * N_DEVICES][48];
    int n = 0;
    g_full = env_flag("KRS_BACKEND_OPS_FULL");
    g_verbose = env_flag("KRS_BACKEND_OPS_VERBOSE");
    setvbuf(stdout, NULL, _IOLBF, 0);
    for (int d = 0; d < N_DEVICES; d++) {
        if (!backend_available(g_devices[d])) {
            printf("backend_ops: device %s is not in this build\n", g_devices[d]);
            continue;
        }
        for (int i = 0; i < N_OPS; i++) {
            snprintf(names[n], sizeof names[n], "%s/%s", g_ops[i].name, g_devices[d]);
            tests[n].name = names[n];
            tests[n].test_func = g_ops[i].fn;
            tests[n].setup_func = NULL;
            tests[n].teardown_func = NULL;
            tests[n].initial_state = (void *)g_devices[d];
            n++;
        }
    }
    int rc = _cmocka_run_group_tests("backend_ops", tests, (size_t)n, NULL, NULL);
    printf("\nbackend_ops summary (%s sweep; worst NMSE per op / backend / format)\n",
           g_full ? "full" : "default");
    for (int i = 0; i < g_n_summary; i++) printf("  %s\n", g_summary[i]);
    return rc;
}
