/* backend/cuda: both matmul paths of the CUDA backend on every weight format, and timings.
 *
 * tests/backend/test_backend_ops checks each op through the default path choice. This test
 * forces each path for every row count (KRS_CUDA_MV_ROWS=64: the matvec kernels up to 64 rows;
 * KRS_CUDA_MV_ROWS=0: dequantize + cuBLAS GEMM, in TF32 (F32 weights: F32) and, with
 * KRS_CUDA_GEMM_F32=1, in F32 for every format)
 * and compares them with a double reference on the dequantized weights (NMSE). Float weights
 * whose rows are not a multiple of 8 take the GEMM path whatever the setting.
 *
 * With KRS_CUDA_BENCH=1 it also times, on model-sized shapes: matmul by path and row count
 * (the matvec / GEMM crossover), and paged attention (decode and prefill). Times are wall clock
 * over a step of N identical ops ended by step_end (one synchronisation), after a warm-up step.
 *
 * Without a CUDA device (or in a build without CUDA) it prints SKIP and passes. */
#include "backend/backend.h"
#define BACKEND_TEST_EXIT_ON_FAILURE
#include "backend/backend_test_util.h"
#include "krserve.h"
#include "quant/quant.h"
#include "util/clock.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static uint64_t g_rng = 0x1234567887654321ull;

static uint64_t rnd(void)
{
    return test_splitmix(&g_rng);
}

static float rnd_sym(void)
{
    return (float)((double)(rnd() >> 11) * 0x1.0p-53 * 2.0 - 1.0);
}

static int g_failed;

/* Random blocks with sane fp16 scales (random payload bytes otherwise). */
static void *make_weight(uint32_t type, int64_t n_out, int64_t n_in)
{
    uint64_t total = quant_row_bytes(type, n_in) * (uint64_t)n_out;
    uint8_t *d = xmalloc(total);
    for (uint64_t i = 0; i < total; i++) d[i] = (uint8_t)rnd();
    if (type == QUANT_F32) {
        for (uint64_t i = 0; i < total / 4; i++) ((float *)d)[i] = 0.1f * rnd_sym();
        return d;
    }
    if (type == QUANT_F16 || type == QUANT_BF16) {
        for (uint64_t i = 0; i < total / 2; i++) {
            float f = 0.1f * rnd_sym();
            uint32_t u;
            memcpy(&u, &f, 4);
            uint16_t v = type == QUANT_F16 ? quant_f32_to_fp16(f) : (uint16_t)(u >> 16);
            memcpy(d + 2 * i, &v, 2);
        }
        return d;
    }
    uint32_t bb = quant_block_bytes(type);
    for (uint64_t off = 0; off < total; off += bb) {
        uint8_t *b = d + off;
        float s = 0.001f + 0.009f * (float)(rnd() % 1000) / 1000.0f;
        switch (type) {
        case QUANT_Q4_1:
        case QUANT_Q5_1:
            put_half(b, s);
            put_half(b + 2, -4.0f * s);
            break;
        case QUANT_Q4_K:
        case QUANT_Q5_K:
            put_half(b, s);
            put_half(b + 2, 0.5f * s);
            break;
        case QUANT_Q6_K:
            put_half(b + 208, s);
            break;
        default:
            put_half(b, (rnd() & 1) ? s : -s);
            break;
        }
    }
    return d;
}

struct env {
    struct backend *b;
    const struct backend_ops *ops;
    int32_t iota[4096], zeros[4096];
};

static int open_cuda(struct env *e, const char *mv_rows, const char *gemm_f32, int max_tokens,
                     int max_ctx)
{
    char err[256] = "";
    struct backend_params p = {.max_tokens = max_tokens, .max_n_in = 16384, .max_ctx = max_ctx};
    setenv("KRS_CUDA_MV_ROWS", mv_rows, 1);
    setenv("KRS_CUDA_MV_HALF_ROWS", mv_rows, 1); /* the path under test for F16/BF16 too */
    setenv("KRS_CUDA_GEMM_F32", gemm_f32, 1);
    int rc = backend_create("cuda", &p, &e->b, err, sizeof err);
    unsetenv("KRS_CUDA_MV_ROWS");
    unsetenv("KRS_CUDA_MV_HALF_ROWS");
    unsetenv("KRS_CUDA_GEMM_F32");
    if (rc == KRS_ERR_UNSUPPORTED) {
        printf("SKIP cuda: %s\n", err);
        return 0;
    }
    if (rc) {
        fprintf(stderr, "FAIL backend_create: %s (%s)\n", krs_status_str(rc), err);
        exit(1);
    }
    e->ops = e->b->ops;
    for (int i = 0; i < 4096; i++) e->iota[i] = i, e->zeros[i] = 0;
    return 1;
}

static void plain_step(struct env *e, int T)
{
    struct backend_step s = {.n_tokens = T,
                             .tokens = e->iota,
                             .pos = e->iota,
                             .seq = e->zeros,
                             .n_seqs = 1,
                             .logit_rows = e->iota};
    CHECK(e->ops->step_begin(e->b, &s));
}

/* dst = data [rows, n] through embed of an F32 weight (rows <= max_tokens). */
static void set_rows(struct env *e, struct backend_tensor *src_w, int rows,
                     struct backend_tensor *dst)
{
    const float *p;
    plain_step(e, rows);
    CHECK(e->ops->embed(e->b, src_w, 1.0f, dst));
    CHECK(e->ops->step_end(e->b, dst, 1, 1, &p));
}

static struct backend_tensor *upload(struct env *e, uint32_t type, int64_t n_in, int64_t n_out,
                                     const void *data)
{
    struct quant_matrix m = {.type = type,
                             .n_in = n_in,
                             .n_out = n_out,
                             .data = data,
                             .row_bytes = quant_row_bytes(type, n_in)};
    struct backend_tensor *t;
    CHECK(e->ops->weight_upload(e->b, &m, &t));
    return t;
}

/* ---- path coverage ---- */

static const uint32_t FMTS[] = {QUANT_F32,  QUANT_F16,  QUANT_BF16, QUANT_Q8_0,
                                QUANT_Q4_0, QUANT_Q4_1, QUANT_Q5_0, QUANT_Q5_1,
                                QUANT_Q4_K, QUANT_Q5_K, QUANT_Q6_K};
#define N_FMTS ((int)(sizeof FMTS / sizeof FMTS[0]))

struct path {
    const char *name, *mv_rows, *gemm_f32;
    double thr;
};

static const struct path PATHS[] = {
    {"matvec", "64", "0", 1e-10},
    {"gemm-tf32", "0", "0", 1e-5},
    {"gemm-f32", "0", "1", 1e-10},
    {"fallback", "64", "0", 1e-5}, /* matvec asked for, rows not in pieces of 8: TF32 GEMM */
};

static void check_format(const struct path *pa, uint32_t type, int64_t n_in, int64_t n_out)
{
    static const int ROWS[] = {1, 2, 3, 5, 8, 9, 16, 33, 64};
    const int n_rows = (int)(sizeof ROWS / sizeof ROWS[0]), max_rows = 64;
    struct env e;
    if (!open_cuda(&e, pa->mv_rows, pa->gemm_f32, max_rows, 128)) return;
    void *wd = make_weight(type, n_out, n_in);
    float *x = xmalloc((size_t)(max_rows * n_in) * sizeof *x);
    for (int64_t i = 0; i < max_rows * n_in; i++) x[i] = rnd_sym();
    struct backend_tensor *tw = upload(&e, type, n_in, n_out, wd);
    struct backend_tensor *tstage = upload(&e, QUANT_F32, n_in, max_rows, x);
    CHECK(e.ops->arena_reserve(e.b, (uint64_t)max_rows * (n_in + n_out) * 4 + 4096));
    struct backend_tensor *tx, *ty;
    CHECK(e.ops->act_alloc(e.b, max_rows * n_in, &tx));
    CHECK(e.ops->act_alloc(e.b, max_rows * n_out, &ty));
    set_rows(&e, tstage, max_rows, tx);
    float *w = xmalloc((size_t)(n_out * n_in) * sizeof *w);
    uint64_t rb = quant_row_bytes(type, n_in);
    for (int64_t o = 0; o < n_out; o++)
        quant_dequantize(type, (const uint8_t *)wd + o * rb, w + o * n_in, n_in);
    double worst = 0.0;
    int worst_rows = 0;
    for (int k = 0; k < n_rows; k++) {
        const int rows = ROWS[k];
        const float *y;
        plain_step(&e, 1);
        CHECK(e.ops->matmul(e.b, tw, tx, rows, ty));
        CHECK(e.ops->step_end(e.b, ty, rows, (int)n_out, &y));
        double num = 0.0, den = 0.0;
        for (int r = 0; r < rows; r++)
            for (int64_t o = 0; o < n_out; o++) {
                double acc = 0.0;
                for (int64_t i = 0; i < n_in; i++)
                    acc += (double)w[o * n_in + i] * x[(int64_t)r * n_in + i];
                double d = y[(int64_t)r * n_out + o] - acc;
                num += isfinite(d) ? d * d : INFINITY;
                den += acc * acc;
            }
        double nm = num / den;
        if (!(nm <= worst)) worst = nm, worst_rows = rows;
    }
    int ok = worst <= pa->thr;
    if (!ok) g_failed++;
    printf("cuda_paths %-9s %-5s n_in %5d n_out %4d rows 1..64  max_nmse %.2e (rows %d)  thr %.0e"
           "  %s\n",
           pa->name, quant_type_name(type), (int)n_in, (int)n_out, worst, worst_rows, pa->thr,
           ok ? "ok" : "FAIL");
    e.ops->destroy(e.b);
    free(wd);
    free(x);
    free(w);
}

/* ---- attention of head sizes test_backend_ops does not cover, long prefill splits ---- */

static void check_attention(int hd, int n_head, int n_kv, int T, int n_swa)
{
    const int kv_dim = n_kv * hd, qw = n_head * hd, bs = 16, group = n_head / n_kv;
    const float scale = 1.0f / sqrtf((float)hd);
    struct env e;
    if (!open_cuda(&e, "8", "0", T, T)) return;
    float *q = xmalloc((size_t)T * qw * sizeof *q), *k = xmalloc((size_t)T * kv_dim * sizeof *k);
    float *v = xmalloc((size_t)T * kv_dim * sizeof *v);
    for (int64_t i = 0; i < (int64_t)T * qw; i++) q[i] = 4.0f * rnd_sym();
    for (int64_t i = 0; i < (int64_t)T * kv_dim; i++) k[i] = rnd_sym(), v[i] = rnd_sym();
    struct backend_tensor *sq = upload(&e, QUANT_F32, qw, T, q);
    struct backend_tensor *sk = upload(&e, QUANT_F32, kv_dim, T, k);
    struct backend_tensor *sv = upload(&e, QUANT_F32, kv_dim, T, v);
    CHECK(e.ops->arena_reserve(e.b, (uint64_t)T * (2 * qw + 2 * kv_dim) * 4 + 8192));
    struct backend_tensor *tq, *to, *tk, *tv;
    CHECK(e.ops->act_alloc(e.b, (int64_t)T * qw, &tq));
    CHECK(e.ops->act_alloc(e.b, (int64_t)T * qw, &to));
    CHECK(e.ops->act_alloc(e.b, (int64_t)T * kv_dim, &tk));
    CHECK(e.ops->act_alloc(e.b, (int64_t)T * kv_dim, &tv));
    set_rows(&e, sq, T, tq);
    set_rows(&e, sk, T, tk);
    set_rows(&e, sv, T, tv);
    const int nb = (T + bs - 1) / bs;
    uint8_t lg[1] = {n_swa ? BACKEND_KV_SWA : BACKEND_KV_FULL};
    struct backend_kv_layout lay = {
        .n_layers = 1, .layer_group = lg, .block_size = bs, .kv_dim = kv_dim};
    lay.n_blocks[lg[0]] = nb + 7;
    CHECK(e.ops->kv_reserve(e.b, &lay));
    int32_t *table = xmalloc((size_t)nb * sizeof *table), *pos = xmalloc((size_t)T * sizeof *pos);
    for (int b = 0; b < nb; b++) table[b] = (int32_t)((b * 5 + 3) % (nb + 7)); /* scattered */
    for (int b = 0; b < nb; b++) /* make the ids distinct: linear probing over the pool */
        for (int a = 0; a < b; a++)
            if (table[a] == table[b]) table[b] = (table[b] + 1) % (nb + 7), a = -1;
    for (int t = 0; t < T; t++) pos[t] = t;
    struct backend_step st = {.n_tokens = T,
                              .tokens = e.zeros,
                              .pos = pos,
                              .seq = e.zeros,
                              .n_seqs = 1,
                              .max_blocks = nb,
                              .logit_rows = e.zeros};
    st.block_table[lg[0]] = table;
    struct backend_attn_args a = {.q = tq,
                                  .out = to,
                                  .layer = 0,
                                  .n_head = n_head,
                                  .n_head_kv = n_kv,
                                  .head_dim = hd,
                                  .scale = scale,
                                  .n_swa = n_swa};
    const float *y;
    CHECK(e.ops->step_begin(e.b, &st));
    CHECK(e.ops->kv_store(e.b, 0, tk, tv));
    CHECK(e.ops->attention(e.b, &a));
    CHECK(e.ops->step_end(e.b, to, T, qw, &y));
    double num = 0, den = 0, *sc = xmalloc((size_t)T * sizeof *sc);
    for (int t = 0; t < T; t++)
        for (int h = 0; h < n_head; h++) {
            const int g = h / group, lo = n_swa && t - n_swa + 1 > 0 ? t - n_swa + 1 : 0;
            const float *qq = q + (int64_t)t * qw + h * hd;
            double mx = -INFINITY, sum = 0;
            for (int j = lo; j <= t; j++) {
                double d = 0;
                for (int i = 0; i < hd; i++)
                    d += (double)qq[i] * k[(int64_t)j * kv_dim + g * hd + i];
                sc[j] = d * scale;
                if (sc[j] > mx) mx = sc[j];
            }
            for (int j = lo; j <= t; j++) sum += sc[j] = exp(sc[j] - mx);
            for (int i = 0; i < hd; i++) {
                double o = 0;
                for (int j = lo; j <= t; j++)
                    o += sc[j] / sum * v[(int64_t)j * kv_dim + g * hd + i];
                double d = y[(int64_t)t * qw + h * hd + i] - o;
                num += isfinite(d) ? d * d : INFINITY;
                den += o * o;
            }
        }
    double nm = num / den;
    int ok = nm <= 1e-6;
    if (!ok) g_failed++;
    printf("cuda_paths attention hd %3d heads %2d/%d T %4d swa %4d  nmse %.2e  thr 1e-06  %s\n", hd,
           n_head, n_kv, T, n_swa, nm, ok ? "ok" : "FAIL");
    e.ops->destroy(e.b);
    free(q);
    free(k);
    free(v);
    free(table);
    free(pos);
    free(sc);
}

/* ---- timings ---- */

static double time_matmul(struct env *e, struct backend_tensor *tw, struct backend_tensor *tx,
                          int rows, struct backend_tensor *ty, int iters)
{
    const float *y;
    for (int pass = 0; pass < 2; pass++) { /* warm-up, then timed */
        uint64_t t0 = clock_now_ns();
        plain_step(e, 1);
        for (int i = 0; i < iters; i++) CHECK(e->ops->matmul(e->b, tw, tx, rows, ty));
        CHECK(e->ops->step_end(e->b, ty, 1, 1, &y));
        if (pass) return (double)(clock_now_ns() - t0) / 1e3 / iters;
    }
    return 0;
}

static void bench_matmul(void)
{
    static const uint32_t types[] = {QUANT_Q4_K, QUANT_Q6_K, QUANT_Q8_0, QUANT_F16};
    static const int rows_list[] = {1, 2, 4, 8, 16, 32, 64, 128, 512};
    const int64_t n_in = 4096, n_out = 14336;
    const int max_rows = 512;
    struct env e[3];
    for (int k = 0; k < 3; k++)
        if (!open_cuda(&e[k], PATHS[k].mv_rows, PATHS[k].gemm_f32, max_rows, 128)) return;
    float *x = xmalloc((size_t)(max_rows * n_in) * sizeof *x);
    for (int64_t i = 0; i < max_rows * n_in; i++) x[i] = rnd_sym();
    printf("\ncuda_bench matmul [rows x %d] * W[%d x %d]^T: microseconds per call (weight GB/s)\n",
           (int)n_in, (int)n_out, (int)n_in);
    printf("cuda_bench %-5s %5s %18s %18s %18s\n", "type", "rows", "matvec", "gemm-tf32",
           "gemm-f32");
    for (size_t ti = 0; ti < sizeof types / sizeof types[0]; ti++) {
        void *wd = make_weight(types[ti], n_out, n_in);
        double wbytes = (double)quant_row_bytes(types[ti], n_in) * n_out;
        struct backend_tensor *tw[3], *tx[3], *ty[3];
        for (int k = 0; k < 3; k++) {
            tw[k] = upload(&e[k], types[ti], n_in, n_out, wd);
            if (ti == 0) {
                struct backend_tensor *st = upload(&e[k], QUANT_F32, n_in, max_rows, x);
                CHECK(e[k].ops->arena_reserve(e[k].b,
                                              (uint64_t)max_rows * (n_in + n_out) * 4 + 4096));
                CHECK(e[k].ops->act_alloc(e[k].b, max_rows * n_in, &tx[k]));
                CHECK(e[k].ops->act_alloc(e[k].b, max_rows * n_out, &ty[k]));
                set_rows(&e[k], st, max_rows, tx[k]);
            }
        }
        static struct backend_tensor *keep_x[3], *keep_y[3];
        if (ti == 0)
            for (int k = 0; k < 3; k++) keep_x[k] = tx[k], keep_y[k] = ty[k];
        for (size_t ri = 0; ri < sizeof rows_list / sizeof rows_list[0]; ri++) {
            const int rows = rows_list[ri];
            double us[3];
            for (int k = 0; k < 3; k++) {
                if (k == 0 && rows > 64) {
                    us[k] = NAN; /* the matvec path stops at 64 rows here */
                    continue;
                }
                us[k] =
                    time_matmul(&e[k], tw[k], keep_x[k], rows, keep_y[k], rows >= 128 ? 10 : 40);
            }
            printf("cuda_bench %-5s %5d", quant_type_name(types[ti]), rows);
            for (int k = 0; k < 3; k++) {
                if (isnan(us[k]))
                    printf(" %18s", "-");
                else
                    printf(" %9.1f (%5.0f)", us[k], wbytes / (us[k] * 1e3));
            }
            printf("\n");
        }
        free(wd);
    }
    for (int k = 0; k < 3; k++) e[k].ops->destroy(e[k].b);
    free(x);
}

/* Attention of the gemma3 270M shape (4 heads over 1 KV head of 256) on a KV pool filled by
 * kv_store; one layer. */
static void bench_attention(void)
{
    const int n_head = 4, n_kv = 1, hd = 256, kv_dim = n_kv * hd, qw = n_head * hd, bs = 16;
    const int max_T = 512, max_ctx = 32768;
    struct env e;
    if (!open_cuda(&e, "8", "0", max_T, max_ctx)) return;
    float *data = xmalloc((size_t)max_T * qw * sizeof *data);
    for (int64_t i = 0; i < (int64_t)max_T * qw; i++) data[i] = rnd_sym();
    struct backend_tensor *stq = upload(&e, QUANT_F32, qw, max_T, data);
    struct backend_tensor *stk = upload(&e, QUANT_F32, kv_dim, max_T, data);
    CHECK(e.ops->arena_reserve(e.b, (uint64_t)max_T * (2 * qw + 2 * kv_dim) * 4 + 8192));
    struct backend_tensor *tq, *to, *tk, *tv;
    CHECK(e.ops->act_alloc(e.b, max_T * qw, &tq));
    CHECK(e.ops->act_alloc(e.b, max_T * qw, &to));
    CHECK(e.ops->act_alloc(e.b, max_T * kv_dim, &tk));
    CHECK(e.ops->act_alloc(e.b, max_T * kv_dim, &tv));
    set_rows(&e, stq, max_T, tq);
    set_rows(&e, stk, max_T, tk);
    set_rows(&e, stk, max_T, tv);
    const int64_t n_blocks = max_ctx / bs + 32 * (2048 / bs) + 64;
    uint8_t lg[1] = {BACKEND_KV_FULL};
    struct backend_kv_layout lay = {.n_layers = 1,
                                    .layer_group = lg,
                                    .n_blocks = {n_blocks, 0},
                                    .block_size = bs,
                                    .kv_dim = kv_dim};
    CHECK(e.ops->kv_reserve(e.b, &lay));
    /* sequences: s0 holds blocks [0, max_ctx/bs); s1..s32 hold 2048 positions each after it */
    const int per_seq = max_ctx / bs + 1, n_seqs = 33;
    int32_t *table = xmalloc((size_t)n_seqs * per_seq * sizeof *table);
    for (int s = 0; s < n_seqs; s++)
        for (int b = 0; b < per_seq; b++) {
            int64_t id = s == 0 ? b : max_ctx / bs + (int64_t)(s - 1) * (2048 / bs) + b;
            table[s * per_seq + b] = (b < (s == 0 ? max_ctx / bs : 2048 / bs)) ? (int32_t)id : -1;
        }
    /* fill: every held slot written by kv_store in steps of max_T tokens */
    int32_t *pos = xmalloc(max_T * sizeof *pos), *seq = xmalloc(max_T * sizeof *seq);
    for (int s = 0; s < n_seqs; s++) {
        int len = s == 0 ? max_ctx : 2048;
        for (int p0 = 0; p0 < len; p0 += max_T) {
            for (int i = 0; i < max_T; i++) pos[i] = p0 + i, seq[i] = 0;
            struct backend_step st = {.n_tokens = max_T,
                                      .tokens = e.zeros,
                                      .pos = pos,
                                      .seq = seq,
                                      .n_seqs = 1,
                                      .max_blocks = per_seq,
                                      .block_table = {table + s * per_seq, NULL},
                                      .logit_rows = e.zeros};
            const float *p;
            CHECK(e.ops->step_begin(e.b, &st));
            CHECK(e.ops->kv_store(e.b, 0, tk, tv));
            CHECK(e.ops->step_end(e.b, tk, 1, 1, &p));
        }
    }
    struct bcase {
        const char *what;
        int T, n_seqs, ctx; /* ctx: position of each sequence's last token + 1 */
        int s_first;
    } cases[] = {
        {"decode 1 seq ctx 1024", 1, 1, 1024, 0},   {"decode 1 seq ctx 8192", 1, 1, 8192, 0},
        {"decode 1 seq ctx 32768", 1, 1, 32768, 0}, {"decode 32 seqs ctx 2048", 32, 32, 2048, 1},
        {"prefill 512 ctx 512", 512, 1, 512, 0},    {"prefill 512 ctx 8192", 512, 1, 8192, 0},
    };
    printf("\ncuda_bench attention %d/%d heads x %d, f32 KV: microseconds per call (KV GB/s)\n",
           n_head, n_kv, hd);
    struct backend_attn_args a = {.q = tq,
                                  .out = to,
                                  .layer = 0,
                                  .n_head = n_head,
                                  .n_head_kv = n_kv,
                                  .head_dim = hd,
                                  .scale = 0.0625f,
                                  .n_swa = 0};
    int32_t *btab = xmalloc((size_t)n_seqs * per_seq * sizeof *btab);
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        const struct bcase *bc = &cases[c];
        int T = 0;
        for (int s = 0; s < bc->n_seqs; s++) {
            int n = bc->T / bc->n_seqs;
            memcpy(btab + s * per_seq, table + (bc->s_first + s) * per_seq, per_seq * sizeof *btab);
            for (int i = 0; i < n; i++, T++) pos[T] = bc->ctx - n + i, seq[T] = s;
        }
        struct backend_step st = {.n_tokens = T,
                                  .tokens = e.zeros,
                                  .pos = pos,
                                  .seq = seq,
                                  .n_seqs = bc->n_seqs,
                                  .max_blocks = per_seq,
                                  .block_table = {btab, NULL},
                                  .logit_rows = e.zeros};
        const int iters = 20;
        double us = 0;
        for (int pass = 0; pass < 2; pass++) {
            const float *p;
            uint64_t t0 = clock_now_ns();
            CHECK(e.ops->step_begin(e.b, &st));
            for (int i = 0; i < iters; i++) CHECK(e.ops->attention(e.b, &a));
            CHECK(e.ops->step_end(e.b, to, 1, 1, &p));
            us = (double)(clock_now_ns() - t0) / 1e3 / iters;
        }
        /* K and V bytes read: each sequence's visible positions once per KV head (GQA shares) */
        double kv_bytes = 0;
        for (int t = 0; t < T; t++) kv_bytes += (double)(pos[t] + 1) * kv_dim * 4 * 2;
        if (T > bc->n_seqs) kv_bytes = (double)bc->n_seqs * bc->ctx * kv_dim * 4 * 2;
        printf("cuda_bench attention %-26s T %4d: %9.1f us (%6.0f GB/s)\n", bc->what, T, us,
               kv_bytes / (us * 1e3));
    }
    e.ops->destroy(e.b);
    free(data);
    free(table);
    free(btab);
    free(pos);
    free(seq);
}

int main(void)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (!backend_available("cuda")) {
        printf("SKIP cuda: this build has no CUDA backend\n");
        return 0;
    }
    {
        struct env e;
        if (!open_cuda(&e, "8", "0", 8, 8)) return 0;
        e.ops->destroy(e.b);
    }
    for (int p = 0; p < 3; p++)
        for (int f = 0; f < N_FMTS; f++) {
            int64_t n_in = quant_block_elems(FMTS[f]) == 256 ? 1024 : 768;
            check_format(&PATHS[p], FMTS[f], n_in, 300);
        }
    /* float rows of a length that is not a multiple of 8: the GEMM path for any row count */
    check_format(&PATHS[3], QUANT_F32, 100, 37);
    check_format(&PATHS[3], QUANT_F16, 100, 37);
    check_format(&PATHS[3], QUANT_BF16, 36, 5);
    check_attention(16, 4, 2, 77, 0);      /* qwen2 tiny test model */
    check_attention(80, 6, 2, 300, 0);     /* not a multiple of 32 */
    check_attention(96, 4, 1, 1500, 0);    /* prefill split by span: 2 splits, some empty */
    check_attention(256, 4, 1, 1500, 0);   /* gemma3 shape, split prefill */
    check_attention(128, 8, 8, 2100, 512); /* sliding window in a long prefill */
    const char *bench = getenv("KRS_CUDA_BENCH");
    if (bench && *bench && strcmp(bench, "0")) {
        bench_matmul();
        bench_attention();
    }
    printf("cuda_paths: %s\n", g_failed ? "FAILED" : "all ok");
    return g_failed ? 1 : 0;
}
