/* backend/cuda: CUDA graphs and op fusion leave results unchanged, bit for bit.
 *
 * A small two-layer model (gemma3's op order: q/k norms, post-norms, GEGLU; a full and a
 * sliding layer; mixed weight formats) runs one program of steps through the ops table:
 * prefills of four sequences, then decodes of growing positions with block tables that change
 * (blocks from a shuffled pool, a block size of 4 so steps cross blocks often, sequences that
 * drop out and come back in another order), a step that leaves out an op (the same shape, a
 * different op list: a recorded graph must not be replayed for it) and, where the backend
 * samples, steps that end in sample + step_end_sampled. The program runs twice in one backend
 * (the second pass replays graphs the first recorded) under KRS_CUDA_GRAPHS=1, and once under
 * KRS_CUDA_GRAPHS=0: every logit and sampled id must be identical. KRS_CUDA_FUSE=0 (every op
 * its own kernel) must agree too (its kernels share the fused ones' arithmetic).
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

enum { E = 256, NH = 4, NKV = 2, HD = 64, FF = 512, V = 1000, L = 2, BS = 4, NSWA = 11 };
enum { MAX_T = 64, MAX_CTX = 128, NBLK = 64, NSEQ = 4, N_DECODE = 40, MB = MAX_CTX / BS };

static uint64_t g_rng;

static uint64_t rnd(void)
{
    return test_splitmix(&g_rng);
}

static float rnd_sym(void)
{
    return (float)((double)(rnd() >> 11) * 0x1.0p-53 * 2.0 - 1.0);
}

/* Random blocks with sane fp16 scales; F32 rows of small values. */
static void *make_weight(uint32_t type, int64_t n_out, int64_t n_in)
{
    uint64_t total = quant_row_bytes(type, n_in) * (uint64_t)n_out;
    uint8_t *d = xmalloc(total);
    for (uint64_t i = 0; i < total; i++) d[i] = (uint8_t)rnd();
    if (type == QUANT_F32) {
        for (uint64_t i = 0; i < total / 4; i++) ((float *)d)[i] = 0.1f * rnd_sym();
        return d;
    }
    uint32_t bb = quant_block_bytes(type);
    for (uint64_t off = 0; off < total; off += bb) {
        float s = 0.002f + 0.01f * (float)(rnd() % 1000) / 1000.0f;
        switch (type) {
        case QUANT_Q4_K:
        case QUANT_Q5_K:
            put_half(d + off, s);
            put_half(d + off + 2, 0.5f * s);
            break;
        case QUANT_Q6_K:
            put_half(d + off + 208, s);
            break;
        default: /* Q8_0, Q4_0: the scale leads the block */
            put_half(d + off, (rnd() & 1) ? s : -s);
            break;
        }
    }
    return d;
}

struct layer {
    struct backend_tensor *wq, *wk, *wv, *wo, *gate, *up, *down;
    struct backend_tensor *attn_norm, *q_norm, *k_norm, *post_attn, *ffn_norm, *post_ffw;
};

struct model {
    struct backend *b;
    const struct backend_ops *ops;
    struct backend_tensor *emb, *out, *out_norm;
    struct layer l[L];
    struct backend_tensor *x, *xn, *q, *k, *v, *attn, *tmp, *gate, *up, *sel, *logits;
};

static struct backend_tensor *upload(struct model *m, uint32_t type, int64_t n_out, int64_t n_in)
{
    void *data = make_weight(type, n_out, n_in);
    struct quant_matrix w = {.type = type,
                             .n_in = n_in,
                             .n_out = n_out,
                             .data = data,
                             .row_bytes = quant_row_bytes(type, n_in)};
    struct backend_tensor *t;
    CHECK(m->ops->weight_upload(m->b, &w, &t));
    free(data);
    return t;
}

static struct backend_tensor *norm_w(struct model *m, int n)
{
    float *w = xmalloc((size_t)n * sizeof *w);
    for (int i = 0; i < n; i++) w[i] = 1.0f + 0.2f * rnd_sym();
    struct quant_matrix q = {
        .type = QUANT_F32, .n_in = n, .n_out = 1, .data = w, .row_bytes = 4ull * n};
    struct backend_tensor *t;
    CHECK(m->ops->weight_upload(m->b, &q, &t));
    free(w);
    return t;
}

static struct backend_tensor *act(struct model *m, int64_t n)
{
    struct backend_tensor *t;
    CHECK(m->ops->act_alloc(m->b, n, &t));
    return t;
}

/* Opens the CUDA backend with the given switches and builds the model (the same weights every
 * time: the generator restarts). 0 when there is no device. */
static int model_open(struct model *m, const char *graphs, const char *fuse)
{
    memset(m, 0, sizeof *m);
    struct backend_params p = {.max_tokens = MAX_T, .max_n_in = FF, .max_ctx = MAX_CTX};
    char err[256] = "";
    setenv("KRS_CUDA_GRAPHS", graphs, 1);
    setenv("KRS_CUDA_FUSE", fuse, 1);
    int rc = backend_create("cuda", &p, &m->b, err, sizeof err);
    unsetenv("KRS_CUDA_GRAPHS");
    unsetenv("KRS_CUDA_FUSE");
    if (rc == KRS_ERR_UNSUPPORTED) {
        printf("SKIP cuda: %s\n", err);
        return 0;
    }
    if (rc) {
        fprintf(stderr, "FAIL backend_create: %s (%s)\n", krs_status_str(rc), err);
        exit(1);
    }
    m->ops = m->b->ops;
    g_rng = 0x1234567887654321ull;
    m->emb = upload(m, QUANT_Q8_0, V, E);
    m->out = upload(m, QUANT_Q6_K, V, E);
    m->out_norm = norm_w(m, E);
    for (int il = 0; il < L; il++) {
        struct layer *y = &m->l[il];
        y->wq = upload(m, QUANT_Q8_0, NH * HD, E);
        y->wk = upload(m, QUANT_Q4_K, NKV * HD, E);
        y->wv = upload(m, QUANT_Q6_K, NKV * HD, E);
        y->wo = upload(m, QUANT_Q4_0, E, NH * HD);
        y->gate = upload(m, QUANT_Q4_K, FF, E);
        y->up = upload(m, QUANT_Q4_K, FF, E);
        y->down = upload(m, QUANT_Q5_K, E, FF);
        y->attn_norm = norm_w(m, E);
        y->q_norm = norm_w(m, HD);
        y->k_norm = norm_w(m, HD);
        y->post_attn = norm_w(m, E);
        y->ffn_norm = norm_w(m, E);
        y->post_ffw = norm_w(m, E);
    }
    CHECK(m->ops->arena_reserve(m->b, 64ull << 20));
    m->x = act(m, (int64_t)MAX_T * E);
    m->xn = act(m, (int64_t)MAX_T * E);
    m->q = act(m, (int64_t)MAX_T * NH * HD);
    m->k = act(m, (int64_t)MAX_T * NKV * HD);
    m->v = act(m, (int64_t)MAX_T * NKV * HD);
    m->attn = act(m, (int64_t)MAX_T * NH * HD);
    m->tmp = act(m, (int64_t)MAX_T * E);
    m->gate = act(m, (int64_t)MAX_T * FF);
    m->up = act(m, (int64_t)MAX_T * FF);
    m->sel = act(m, (int64_t)MAX_T * E);
    m->logits = act(m, (int64_t)MAX_T * V);
    uint8_t groups[L] = {BACKEND_KV_FULL, BACKEND_KV_SWA};
    struct backend_kv_layout lay = {.n_layers = L,
                                    .layer_group = groups,
                                    .n_blocks = {NBLK, NBLK},
                                    .block_size = BS,
                                    .kv_dim = NKV * HD};
    CHECK(m->ops->kv_reserve(m->b, &lay));
    return 1;
}

/* The forward of model_forward.c's op order. variant 1 leaves the last op out, variant 2 changes
 * an argument of the second op (the same shape, another op list). */
static void forward(struct model *m, int T, int n_logits, int variant)
{
    const struct backend_ops *o = m->ops;
    struct backend *b = m->b;
    const float eps = 1e-6f;
    CHECK(o->embed(b, m->emb, 16.0f, m->x));
    for (int il = 0; il < L; il++) {
        const struct layer *y = &m->l[il];
        struct backend_rope_args rq = {.x = m->q,
                                       .n_heads = NH,
                                       .head_dim = HD,
                                       .n_rot = HD,
                                       .base = il ? 10000.0f : 1000000.0f,
                                       .freq_scale = 1.0f,
                                       .neox = 1};
        struct backend_rope_args rk = rq;
        rk.x = m->k;
        rk.n_heads = NKV;
        struct backend_attn_args aa = {.q = m->q,
                                       .out = m->attn,
                                       .layer = il,
                                       .n_head = NH,
                                       .n_head_kv = NKV,
                                       .head_dim = HD,
                                       .scale = 0.125f,
                                       .n_swa = il ? NSWA : 0};
        CHECK(o->rmsnorm(b, m->x, y->attn_norm, T, E, variant == 2 && !il ? 1e-5f : eps, m->xn));
        CHECK(o->matmul(b, y->wq, m->xn, T, m->q));
        CHECK(o->matmul(b, y->wk, m->xn, T, m->k));
        CHECK(o->matmul(b, y->wv, m->xn, T, m->v));
        CHECK(o->rmsnorm(b, m->q, y->q_norm, T * NH, HD, eps, m->q));
        CHECK(o->rmsnorm(b, m->k, y->k_norm, T * NKV, HD, eps, m->k));
        CHECK(o->rope(b, &rq));
        CHECK(o->rope(b, &rk));
        CHECK(o->kv_store(b, il, m->k, m->v));
        CHECK(o->attention(b, &aa));
        CHECK(o->matmul(b, y->wo, m->attn, T, m->tmp));
        CHECK(o->rmsnorm(b, m->tmp, y->post_attn, T, E, eps, m->tmp));
        CHECK(o->add(b, m->x, m->tmp, (int64_t)T * E));
        CHECK(o->rmsnorm(b, m->x, y->ffn_norm, T, E, eps, m->xn));
        CHECK(o->matmul(b, y->gate, m->xn, T, m->gate));
        CHECK(o->matmul(b, y->up, m->xn, T, m->up));
        CHECK(o->glu(b, m->gate, m->up, (int64_t)T * FF, 1));
        CHECK(o->matmul(b, y->down, m->gate, T, m->tmp));
        CHECK(o->rmsnorm(b, m->tmp, y->post_ffw, T, E, eps, m->tmp));
        CHECK(o->add(b, m->x, m->tmp, (int64_t)T * E));
    }
    CHECK(o->get_rows(b, m->x, E, m->sel));
    CHECK(o->rmsnorm(b, m->sel, m->out_norm, n_logits, E, eps, m->sel));
    CHECK(o->matmul(b, m->out, m->sel, n_logits, m->logits));
    if (variant != 1) CHECK(o->softcap(b, m->logits, (int64_t)n_logits * V, 300.0f));
}

struct seqs {
    int len[NSEQ];
    int32_t table[2][NSEQ][MB]; /* per group */
    int32_t pool[2][NBLK];
    int n_free[2];
};

/* Gives sequence s the block of position p in both groups when it starts a block. */
static void hold(struct seqs *q, int s, int p)
{
    for (int g = 0; g < 2; g++)
        if (q->table[g][s][p / BS] < 0) {
            if (!q->n_free[g]) {
                fprintf(stderr, "FAIL test: out of blocks\n");
                exit(1);
            }
            q->table[g][s][p / BS] = q->pool[g][--q->n_free[g]];
        }
}

struct out {
    float *logits;
    int32_t *ids;
    int64_t n_logits, n_ids;
    double decode_us; /* mean decode step */
};

/* One step: rows (sequence, how many new tokens); logits for the last token of each. */
static void run_step(struct model *m, struct seqs *q, const int *sq, const int *nt, int n_rows,
                     int variant, int sampled, struct out *o)
{
    int32_t tok[MAX_T], pos[MAX_T], seq[MAX_T], rows[MAX_T];
    int32_t tables[2][NSEQ * MB];
    int T = 0, max_blocks = 0;
    for (int r = 0; r < n_rows; r++) {
        const int s = sq[r];
        for (int i = 0; i < nt[r]; i++, T++) {
            const int p = q->len[s] + i;
            hold(q, s, p);
            pos[T] = p;
            seq[T] = r;
            tok[T] = (int32_t)((s * 131 + p * 17 + 7) % V);
            if (p / BS + 1 > max_blocks) max_blocks = p / BS + 1;
        }
        rows[r] = T - 1;
        q->len[s] += nt[r];
    }
    for (int g = 0; g < 2; g++)
        for (int r = 0; r < n_rows; r++)
            memcpy(tables[g] + r * max_blocks, q->table[g][sq[r]], (size_t)max_blocks * 4);
    struct backend_step st = {.n_tokens = T,
                              .tokens = tok,
                              .pos = pos,
                              .seq = seq,
                              .n_seqs = n_rows,
                              .max_blocks = max_blocks,
                              .block_table = {tables[0], tables[1]},
                              .n_logits = n_rows,
                              .logit_rows = rows};
    CHECK(m->ops->step_begin(m->b, &st));
    forward(m, T, n_rows, variant);
    if (sampled) {
        struct backend_sample_row sr[NSEQ];
        memset(sr, 0, sizeof sr);
        for (int r = 0; r < n_rows; r++) {
            sr[r].top_p = 1.0f;
            sr[r].temperature = r % 2 ? 0.8f : 0.0f;
            sr[r].u = 0.37f;
        }
        const int32_t *ids;
        const float *lp;
        CHECK(m->ops->sample(m->b, m->logits, n_rows, V, sr, NULL, 0, NULL));
        CHECK(m->ops->step_end_sampled(m->b, n_rows, &ids, &lp));
        memcpy(o->ids + o->n_ids, ids, (size_t)n_rows * sizeof *ids);
        o->n_ids += n_rows;
        return;
    }
    const float *l;
    CHECK(m->ops->step_end(m->b, m->logits, n_rows, V, &l));
    memcpy(o->logits + o->n_logits, l, (size_t)n_rows * V * sizeof *l);
    o->n_logits += (int64_t)n_rows * V;
}

/* The program: prefills, then decodes (every 7th step three sequences in another order, steps
 * 25 and 33 with another op list, every 9th step sampled where the backend samples). */
static void program(struct model *m, struct out *o)
{
    struct seqs q;
    memset(&q, 0, sizeof q);
    memset(q.table, 0xFF, sizeof q.table);
    uint64_t save = g_rng;
    g_rng = 42;
    for (int g = 0; g < 2; g++) {
        for (int i = 0; i < NBLK; i++) q.pool[g][i] = i;
        for (int i = NBLK - 1; i > 0; i--) { /* shuffled: tables change on every block */
            int j = (int)(rnd() % (uint64_t)(i + 1));
            int32_t t = q.pool[g][i];
            q.pool[g][i] = q.pool[g][j];
            q.pool[g][j] = t;
        }
        q.n_free[g] = NBLK;
    }
    g_rng = save;
    static const int prefill[NSEQ] = {5, 24, 3, 7}; /* (24: a GEMM step, deferred unscales) */
    for (int s = 0; s < NSEQ; s++) {
        int one = 1;
        run_step(m, &q, &s, &prefill[s], one, 0, 0, o);
    }
    const int has_sample = m->ops->sample != NULL;
    uint64_t t0 = clock_now_ns();
    for (int i = 0; i < N_DECODE; i++) {
        int sq[NSEQ], nt[NSEQ] = {1, 1, 1, 1}, n = NSEQ;
        if (i % 7 == 3) {
            n = 3;
            sq[0] = 2, sq[1] = 0, sq[2] = 3;
        } else {
            for (int s = 0; s < NSEQ; s++) sq[s] = i % 5 == 2 ? NSEQ - 1 - s : s;
        }
        run_step(m, &q, sq, nt, n, i == 25 ? 1 : i == 33 ? 2 : 0, has_sample && i % 9 == 4, o);
    }
    o->decode_us = (double)(clock_now_ns() - t0) / 1e3 / N_DECODE;
}

static struct out out_new(void)
{
    struct out o = {0};
    o.logits = xmalloc((size_t)(NSEQ + N_DECODE * NSEQ) * V * sizeof(float));
    o.ids = xmalloc((size_t)N_DECODE * NSEQ * sizeof(int32_t));
    return o;
}

static int same(const struct out *a, const struct out *b)
{
    return a->n_logits == b->n_logits && a->n_ids == b->n_ids &&
           !memcmp(a->logits, b->logits, (size_t)a->n_logits * sizeof(float)) &&
           !memcmp(a->ids, b->ids, (size_t)a->n_ids * sizeof(int32_t));
}

static double max_diff(const struct out *a, const struct out *b)
{
    double d = 0;
    for (int64_t i = 0; i < a->n_logits && i < b->n_logits; i++)
        if (fabs((double)a->logits[i] - b->logits[i]) > d)
            d = fabs((double)a->logits[i] - b->logits[i]);
    return d;
}

int main(void)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (!backend_available("cuda")) {
        printf("SKIP cuda: this build has no CUDA backend\n");
        return 0;
    }
    struct model m;
    struct out on1 = out_new(), on2 = out_new(), off = out_new(), nofuse = out_new();
    if (!model_open(&m, "1", "1")) return 0;
    program(&m, &on1);
    program(&m, &on2); /* the same program again: graphs recorded by the first pass replay */
    m.ops->destroy(m.b);
    if (!model_open(&m, "0", "1")) return 0;
    program(&m, &off);
    m.ops->destroy(m.b);
    if (!model_open(&m, "0", "0")) return 0;
    program(&m, &nofuse);
    m.ops->destroy(m.b);

    int bad = 0;
    for (int64_t i = 0; i < off.n_logits; i++) bad += !isfinite(off.logits[i]);
    double mag = 0;
    for (int64_t i = 0; i < off.n_logits; i++) mag += fabs(off.logits[i]);
    printf("cuda_graphs: %lld logits (mean |l| %.3f), %lld sampled ids; decode step %.1f us "
           "(graphs, 2nd pass) vs %.1f us (no graphs) vs %.1f us (no graphs, no fusion)\n",
           (long long)off.n_logits, mag / (double)(off.n_logits ? off.n_logits : 1),
           (long long)off.n_ids, on2.decode_us, off.decode_us, nofuse.decode_us);
    if (bad || mag == 0) {
        printf("FAIL cuda_graphs: %d non-finite logits (or all zero)\n", bad);
        return 1;
    }
    int ok1 = same(&on1, &off), ok2 = same(&on2, &off), ok3 = same(&nofuse, &off);
    printf("cuda_graphs: graphs on (1st pass) vs off: %s (max |diff| %.3g)\n",
           ok1 ? "identical" : "DIFFER", max_diff(&on1, &off));
    printf("cuda_graphs: graphs on (2nd pass, replayed) vs off: %s (max |diff| %.3g)\n",
           ok2 ? "identical" : "DIFFER", max_diff(&on2, &off));
    printf("cuda_graphs: fused vs unfused: %s (max |diff| %.3g)\n", ok3 ? "identical" : "DIFFER",
           max_diff(&nofuse, &off));
    if (!ok1 || !ok2 || !ok3) {
        printf("FAIL cuda_graphs\n");
        return 1;
    }
    printf("PASS cuda_graphs\n");
    return 0;
}
