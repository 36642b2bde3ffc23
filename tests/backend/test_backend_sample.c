/* backend/: the optional device sampler (ops `sample` + `step_end_sampled`) on every backend that
 * has one, against a plain C reference of backend.h's semantics in double precision.
 *
 * Inputs reach the backend only through its interface: logits rows are uploaded as an F32
 * weight [64, n_vocab] at load time; a step whose tokens are data-row ids copies them into an
 * activation tensor with `embed` (scale 1), then `sample` and `step_end_sampled` return the ids
 * and logprobs. Every row gets its own settings (temperature 0 / 0.7 / 1 / 1.5, top-k 1 / 40 /
 * near-vocab / off, top-p 0.5 / 0.9 / off, min-p 0.05 / off), its own draw u and its own edits
 * (biases of +-100 and small ones, repetition 1.3, presence/frequency), over rows built to be
 * awkward: ties at the max and at the cuts, -inf entries, all equal, only five finite. Every
 * other call gives every third row an allowed-token mask (grammar/), which the reference
 * applies as -inf after the edits.
 * Truncation as backend.h says: top-k (ties at the cut kept), then top-p over the top-k
 * survivors (mass normalised over them, ties in id order), then min-p (p >= min_p * p_max).
 *
 * What must hold:
 *   - greedy: the reference's id exactly (first maximum of the edited logits, computed in float
 *     like the device, so edits match bit for bit);
 *   - stochastic: the reference's id, except where the draw lands within 1e-5 (relative to the
 *     survivors' mass) of a boundary between tokens, or where top-p's or min-p's cut is itself
 *     that close to a token: then any id whose CDF interval is that close is accepted. The run
 *     prints how many rows needed the tolerance;
 *   - logprob (log-softmax at T = 1 at the returned id) within 1e-4;
 *   - statistics: 4096 draws at evenly spread u over 33 tokens match the distribution (T = 1
 *     untruncated, and T = 0.7 with top-k 10 + top-p 0.9) to within 2 draws per token;
 *   - errors: KRS_ERR_FULL beyond max_sample_edits, KRS_ERR_INVALID for bad settings and for a
 *     NaN or all -inf row (at step_end_sampled), KRS_ERR_STATE without a sample call.
 * Timing: per call at rows 1 / 64 x 262144 tokens, next to the step_end download of the same
 * logits that sampling on the device replaces. The CUDA sampler runs twice: as built, and with
 * KRS_CUDA_SAMPLE_RADIX=1 (its general path alone; the candidate shortcut off).
 * For the sanitizers: KRS_SAMPLE_QUICK=1 drops the 64-row 262144 case and the timing,
 * KRS_SAMPLE_SMALL=1 every 262144 case, KRS_SAMPLE_TINY=1 also the 64-row cases and the
 * statistics (racecheck).
 *
 * A backend compiled in but not present prints "SKIP <device>: <reason>"; one without the op
 * (the CPU) is "SKIP <device>: no sample op"; a run that tested nothing is skipped. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "backend/backend.h"
#include "backend/backend_test_util.h"
#include "krserve.h"
#include "quant/quant.h"

#define MAX_ROWS 64
#define BIG_V    262144
#define N_VOCABS 3
#define EPS_REL  1e-5
#define LP_TOL   1e-4

static const int g_vocabs[N_VOCABS] = {BIG_V, 1000, 33};
static const char *const g_devices[] = {"cpu", "cuda"};

/* ---- random numbers: splitmix64 ---- */

struct rng {
    uint64_t s;
};

static uint64_t rng_next(struct rng *r)
{
    return test_splitmix(&r->s);
}

static double rng_unit(struct rng *r) /* [0, 1) */
{
    return (double)(rng_next(r) >> 11) * 0x1.0p-53;
}

static int rng_int(struct rng *r, int n) /* [0, n) */
{
    return (int)(rng_next(r) % (uint64_t)n);
}

static float rng_normalish(struct rng *r) /* mean 0, sd 1 (sum of 4 uniforms) */
{
    double s = 0.0;
    for (int i = 0; i < 4; i++) s += rng_unit(r);
    return (float)((s - 2.0) * 1.7320508);
}

static void *xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    assert_non_null(p);
    return p;
}

static int env_flag(const char *name)
{
    const char *v = getenv(name);
    return v && *v && strcmp(v, "0");
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* ---- data rows ---- */

/* Row `r` of a data matrix: one of eight kinds by r % 8. */
static void make_row(struct rng *g, float *x, int V, int r)
{
    int kind = r % 8;
    for (int i = 0; i < V; i++) x[i] = 2.0f * rng_normalish(g);
    switch (kind) {
    case 0: /* plain noise */
        break;
    case 1: /* one dominant token */
        x[rng_int(g, V)] += 25.0f;
        break;
    case 2: /* coarse values: ties everywhere, at the max and at every cut */
        for (int i = 0; i < V; i++) x[i] = roundf(x[i]) * 0.5f;
        break;
    case 3: /* about half -inf */
        for (int i = 0; i < V; i++)
            if (rng_next(g) & 1) x[i] = -INFINITY;
        break;
    case 4: /* all equal */
        for (int i = 0; i < V; i++) x[i] = 1.5f;
        break;
    case 5: /* five finite, the rest -inf */
        for (int i = 0; i < V; i++) x[i] = -INFINITY;
        for (int k = 0; k < 5; k++) x[rng_int(g, V)] = 3.0f * rng_normalish(g);
        break;
    case 6: /* LLM-like: a few strong candidates over a broad tail */
        for (int k = 0; k < 20 && k < V; k++) x[rng_int(g, V)] += 8.0f + 6.0f * (float)rng_unit(g);
        break;
    default: { /* ties at the max (10 tokens) and a tied group just below */
        float mx = -INFINITY;
        for (int i = 0; i < V; i++) mx = x[i] > mx ? x[i] : mx;
        for (int k = 0; k < 10; k++) x[rng_int(g, V)] = mx + 1.0f;
        for (int k = 0; k < 10; k++) x[rng_int(g, V)] = mx + 0.5f;
        break;
    }
    }
}

/* ---- the backend through its interface ---- */

struct ctx {
    const char *dev, *mode;
    struct backend *b;
    const struct backend_ops *ops;
    struct backend_tensor *data[N_VOCABS]; /* F32 [MAX_ROWS, V] */
    float *host[N_VOCABS];                 /* the same, here */
    struct backend_tensor *x;              /* [MAX_ROWS, BIG_V] */
    int32_t pos[MAX_ROWS], seq[MAX_ROWS];
};

/* A failing call fails the current cmocka test, naming the device. */
#define CHECK(call)                                                                                \
    do {                                                                                           \
        int rc_ = (call);                                                                          \
        if (rc_) fail_msg("%s: %s -> %s", c->dev, #call, krs_status_str(rc_));                     \
    } while (0)

/* Modes: the default, and KRS_CUDA_SAMPLE_RADIX=1 (the CUDA sampler's general path only: the
 * candidate shortcut off), read when the backend is created. */
#define N_MODES 2
static const char *const g_mode_name[N_MODES] = {"", " (radix)"};

/* Creates the backend; 0 (after a SKIP line) when it is absent or has no sampler. */
static int ctx_open(struct ctx *c, const char *dev, int mode)
{
    memset(c, 0, sizeof *c);
    c->dev = dev;
    if (!backend_available(dev)) return 0;
    if (mode && strcmp(dev, "cuda")) return 0; /* the mode is the CUDA sampler's */
    if (mode) setenv("KRS_CUDA_SAMPLE_RADIX", "1", 1);
    struct backend_params p = {.n_threads = 0,
                               .max_tokens = MAX_ROWS,
                               .max_n_in = BIG_V,
                               .max_ctx = MAX_ROWS,
                               .mem_budget = 0,
                               .max_sample_edits = 0,
                               .max_mask_rows = MAX_ROWS,
                               .mask_vocab = BIG_V};
    char err[256] = "";
    int rc = backend_create(dev, &p, &c->b, err, sizeof err);
    unsetenv("KRS_CUDA_SAMPLE_RADIX");
    c->mode = g_mode_name[mode];
    if (rc) {
        if (!mode) printf("SKIP %s: %s\n", dev, err[0] ? err : krs_status_str(rc));
        fflush(stdout);
        return 0;
    }
    c->ops = c->b->ops;
    if (!c->ops->sample || !c->ops->step_end_sampled) {
        if (!mode) printf("SKIP %s: no sample op\n", dev);
        fflush(stdout);
        c->ops->destroy(c->b);
        c->b = NULL;
        return 0;
    }
    for (int i = 0; i < MAX_ROWS; i++) {
        c->pos[i] = i;
        c->seq[i] = 0;
    }
    return 1;
}

/* Load time: the data matrices (vocab index mask), then the arena and the logits tensor. */
static void ctx_load(struct ctx *c, uint64_t seed)
{
    for (int v = 0; v < N_VOCABS; v++) {
        int V = g_vocabs[v];
        struct rng g = {seed * 1000003u + (uint64_t)V};
        float *h = xmalloc((size_t)MAX_ROWS * V * sizeof(float));
        for (int r = 0; r < MAX_ROWS; r++) make_row(&g, h + (size_t)r * V, V, r);
        struct quant_matrix m = {.type = QUANT_F32,
                                 .n_in = V,
                                 .n_out = MAX_ROWS,
                                 .data = h,
                                 .row_bytes = quant_row_bytes(QUANT_F32, V)};
        CHECK(c->ops->weight_upload(c->b, &m, &c->data[v]));
        c->host[v] = h;
    }
    CHECK(c->ops->arena_reserve(c->b, (uint64_t)MAX_ROWS * BIG_V * sizeof(float) + (1u << 20)));
    CHECK(c->ops->act_alloc(c->b, (int64_t)MAX_ROWS * BIG_V, &c->x));
}

static void ctx_close(struct ctx *c)
{
    if (c->b) c->ops->destroy(c->b);
    for (int v = 0; v < N_VOCABS; v++) free(c->host[v]);
    memset(c, 0, sizeof *c);
}

static int vocab_index(int V)
{
    for (int v = 0; v < N_VOCABS; v++)
        if (g_vocabs[v] == V) return v;
    fail_msg("no data for vocab %d", V);
    return -1;
}

/* Step: logits rows = data rows tok[0..rows) of vocab V, then embed. */
static void ctx_fill(struct ctx *c, int V, const int32_t *tok, int rows)
{
    struct backend_step s = {.n_tokens = rows,
                             .tokens = tok,
                             .pos = c->pos,
                             .seq = c->seq,
                             .n_seqs = 1,
                             .n_logits = 0,
                             .logit_rows = c->pos};
    CHECK(c->ops->step_begin(c->b, &s));
    CHECK(c->ops->embed(c->b, c->data[vocab_index(V)], 1.0f, c->x));
}

/* One sampled step; ids/lp copied out. */
static void ctx_sample(struct ctx *c, int V, const int32_t *tok, int rows,
                       const struct backend_sample_row *r, const struct backend_logit_edit *e,
                       int n_e, const uint32_t *const *masks, int32_t *ids, float *lp)
{
    const int32_t *pi = NULL;
    const float *pl = NULL;
    ctx_fill(c, V, tok, rows);
    CHECK(c->ops->sample(c->b, c->x, rows, V, r, e, n_e, masks));
    CHECK(c->ops->step_end_sampled(c->b, rows, &pi, &pl));
    assert_non_null(pi);
    assert_non_null(pl);
    memcpy(ids, pi, (size_t)rows * sizeof *ids);
    memcpy(lp, pl, (size_t)rows * sizeof *lp);
}

/* ---- the reference (backend.h's semantics; double precision) ---- */

/* Edits in float, operation by operation, as the device does them. */
static void apply_edits(float *a, const struct backend_logit_edit *e, int n)
{
    for (int i = 0; i < n; i++) {
        float x = a[e[i].token] + e[i].pre_add;
        x = x > 0.0f ? x / e[i].rep : x * e[i].rep;
        a[e[i].token] = x + e[i].post_add;
    }
}

struct cand {
    float v;
    int id;
};

static int cand_cmp(const void *pa, const void *pb) /* value desc, id asc */
{
    const struct cand *a = pa, *b = pb;
    if (a->v > b->v) return -1;
    if (a->v < b->v) return 1;
    return (a->id > b->id) - (a->id < b->id);
}

struct ref_scratch {
    int V;
    struct cand *order;
    double *w;
    signed char *state; /* 1 nominal survivor, 2 ambiguous, 0 out */
};

struct verdict {
    int ok;    /* the device's id is acceptable */
    int exact; /* ... and equal to the reference's nominal id */
    double lp; /* reference logprob at the device's id */
    int ref_id;
};

/* Judges the device's (id, u) for one edited row a[V]. */
static struct verdict judge(struct ref_scratch *sc, const float *a, int V,
                            const struct backend_sample_row *p, int dev_id)
{
    struct verdict out = {0, 0, NAN, -1};
    float m = -INFINITY;
    int amax = -1;
    for (int i = 0; i < V; i++)
        if (a[i] > m) {
            m = a[i];
            amax = i;
        }
    double z1 = 0.0;
    for (int i = 0; i < V; i++)
        if (a[i] > -INFINITY) z1 += exp((double)a[i] - m);
    if (dev_id >= 0 && dev_id < V) out.lp = (double)a[dev_id] - m - log(z1);
    if (p->temperature == 0.0f) {
        out.ref_id = amax;
        out.ok = out.exact = dev_id == amax;
        return out;
    }
    const double T = p->temperature;
    double *w = sc->w;
    double z = 0.0;
    for (int i = 0; i < V; i++) {
        w[i] = a[i] > -INFINITY ? exp(((double)a[i] - m) / T) : 0.0;
        z += w[i];
        sc->state[i] = 1;
    }
    int use_k = p->top_k > 0 && p->top_k < V, use_p = p->top_p < 1.0f;
    if (use_k || use_p) {
        for (int i = 0; i < V; i++) sc->order[i] = (struct cand){a[i], i};
        qsort(sc->order, (size_t)V, sizeof *sc->order, cand_cmp);
    }
    if (use_k) { /* the k largest; ties at the cut all stay (exact: float compares) */
        float vk = sc->order[p->top_k - 1].v;
        for (int i = 0; i < V; i++)
            if (a[i] < vk) sc->state[i] = 0;
    }
    if (use_p) { /* over the top-k survivors (a prefix of the order): the smallest prefix
                  * holding top_p of their mass; the cut may be ambiguous */
        double zk = 0.0;
        int n_k = 0;
        while (n_k < V && sc->state[sc->order[n_k].id]) zk += w[sc->order[n_k++].id];
        double target = (double)p->top_p * zk, tol = EPS_REL * zk, cum = 0.0;
        int n_lo = -1, n_p = -1, n_hi = -1;
        for (int j = 0; j < n_k; j++) {
            cum += w[sc->order[j].id];
            if (n_lo < 0 && cum >= target - tol) n_lo = j;
            if (n_p < 0 && cum >= target) n_p = j;
            if (n_hi < 0 && cum >= target + tol) n_hi = j;
        }
        if (n_p < 0) n_p = n_k - 1;
        if (n_lo < 0) n_lo = n_p;
        if (n_hi < 0) n_hi = n_k - 1;
        for (int j = n_lo + 1; j < n_k; j++) /* (n_lo, n_hi]: either side of the cut */
            sc->state[sc->order[j].id] = j <= n_hi ? 2 : 0;
    }
    if (p->min_p > 0.0f)
        for (int i = 0; i < V; i++) {
            if (sc->state[i] == 0) continue;
            double rel = w[i] / (double)p->min_p - 1.0;
            if (fabs(rel) <= EPS_REL)
                sc->state[i] = 2;
            else if (rel < 0.0)
                sc->state[i] = 0;
        }
    /* nominal set: state 1, plus ambiguous tokens on their nominal side */
    double s0 = 0.0, amb = 0.0;
    for (int i = 0; i < V; i++) {
        if (sc->state[i] == 1) s0 += w[i];
        if (sc->state[i] == 2) amb += w[i];
    }
    /* Nominal reference id over the state-1 set (ambiguous tokens left out); then accept the
     * device's id if its CDF interval lies within the slack of u * s0. */
    double tgt = (double)p->u * s0, cum = 0.0;
    for (int i = 0; i < V; i++) {
        if (sc->state[i] != 1) continue;
        cum += w[i];
        if (cum > tgt) {
            out.ref_id = i;
            break;
        }
    }
    if (out.ref_id < 0) /* rounding: the last survivor with weight */
        for (int i = V - 1; i >= 0; i--)
            if (sc->state[i] == 1 && w[i] > 0.0) {
                out.ref_id = i;
                break;
            }
    if (dev_id < 0 || dev_id >= V || sc->state[dev_id] == 0 || !(w[dev_id] > 0.0)) return out;
    double lo = 0.0;
    for (int i = 0; i < dev_id; i++)
        if (sc->state[i] == 1) lo += w[i];
    double hi = lo + (sc->state[dev_id] == 1 ? w[dev_id] : 0.0);
    double slack = 2.0 * (amb + EPS_REL * s0);
    out.exact = dev_id == out.ref_id;
    out.ok = out.exact || (lo - slack <= tgt && tgt < hi + slack);
    return out;
}

static void scratch_init(struct ref_scratch *sc, int V)
{
    sc->V = V;
    sc->order = xmalloc((size_t)V * sizeof *sc->order);
    sc->w = xmalloc((size_t)V * sizeof *sc->w);
    sc->state = xmalloc((size_t)V);
}

static void scratch_free(struct ref_scratch *sc)
{
    free(sc->order);
    free(sc->w);
    free(sc->state);
}

/* ---- settings and edits ---- */

#define N_CONF 11

static struct backend_sample_row conf(int k, int V)
{
    struct backend_sample_row p = {.temperature = 1.0f, .top_k = 0, .top_p = 1.0f, .min_p = 0.0f};
    switch (k) {
    case 0:
        p.temperature = 0.0f;
        break;
    case 1:
        p.temperature = 0.7f, p.top_k = 40;
        break;
    case 2:
        p.temperature = 1.5f, p.top_p = 0.9f;
        break;
    case 3:
        p.temperature = 0.7f, p.min_p = 0.05f;
        break;
    case 4:
        break; /* T = 1, nothing truncated */
    case 5:
        p.temperature = 0.7f, p.top_k = 40, p.top_p = 0.9f, p.min_p = 0.05f;
        break;
    case 6:
        p.temperature = 1.5f, p.top_k = 1;
        break;
    case 7:
        p.temperature = 1.5f, p.top_p = 0.5f, p.min_p = 0.05f;
        break;
    case 8:
        p.temperature = 0.0f, p.top_k = 40, p.top_p = 0.9f;
        break; /* greedy ignores them */
    case 9:
        p.temperature = 0.7f, p.top_k = V > 1 ? V - 1 : 1, p.top_p = 0.9f;
        break;
    default:
        p.temperature = 1.5f, p.top_k = 1000, p.min_p = 0.05f;
        break;
    }
    return p;
}

/* Edits of one row (distinct tokens); some hit the row's maximum. */
static int make_edits(struct rng *g, const float *x, int V, struct backend_logit_edit *e, int *used)
{
    if (rng_int(g, 3) == 0) return 0;
    int n = 1 + rng_int(g, V < 4 ? 1 : V < 48 ? V / 2 : 24), k = 0;
    int amax = 0;
    for (int i = 1; i < V; i++)
        if (x[i] > x[amax]) amax = i;
    for (int tries = 0; k < n && tries < 1000; tries++) {
        int t = k == 0 && rng_int(g, 2) ? amax : rng_int(g, V);
        if (used[t]) continue;
        used[t] = 1;
        struct backend_logit_edit d = {t, 0.0f, 1.0f, 0.0f};
        switch (rng_int(g, 6)) {
        case 0:
            d.pre_add = rng_int(g, 2) ? 100.0f : -100.0f;
            break;
        case 1:
            d.pre_add = (float)(4.0 * rng_unit(g) - 2.0);
            break;
        case 2:
            d.rep = 1.3f;
            break;
        case 3:
            d.post_add = -(0.5f + 0.3f * (float)(1 + rng_int(g, 5)));
            break;
        case 4:
            d.pre_add = 1.0f;
            d.rep = 1.3f;
            d.post_add = -0.8f;
            break;
        default:
            d.rep = 1.3f, d.post_add = -0.5f;
            break;
        }
        e[k++] = d;
    }
    for (int i = 0; i < k; i++) used[e[i].token] = 0;
    return k;
}

/* ---- tests ---- */

struct tally {
    int rows, greedy, exact, tolerant, bad;
    double worst_lp;
};

/* One call: rows of vocab V from data rows tok[], settings by (row, call), checked. */
static void check_call(struct ctx *c, struct ref_scratch *sc, struct rng *g, int V, int rows,
                       int call, struct tally *ty)
{
    int32_t tok[MAX_ROWS], ids[MAX_ROWS];
    float lp[MAX_ROWS];
    struct backend_sample_row r[MAX_ROWS];
    static struct backend_logit_edit e[MAX_ROWS * 32];
    int *used = calloc((size_t)V, sizeof(int));
    assert_non_null(used);
    const float *host = c->host[vocab_index(V)];
    int n_e = 0;
    for (int i = 0; i < rows; i++) {
        tok[i] = (int32_t)((i * 5 + call * 11) % MAX_ROWS);
        r[i] = conf((i * 7 + call * 3) % N_CONF, V);
        r[i].u = (float)rng_unit(g);
        r[i].edit_begin = n_e;
        r[i].n_edits = make_edits(g, host + (size_t)tok[i] * V, V, e + n_e, used);
        n_e += r[i].n_edits;
    }
    free(used);
    /* odd calls: every third row carries a token mask (dense on small vocabularies, about 64
     * tokens on the large one), always with at least one finite logit allowed */
    const int nw = (V + 31) / 32;
    uint32_t *mbuf = xmalloc((size_t)rows * nw * sizeof *mbuf);
    const uint32_t *masks[MAX_ROWS];
    float *a = xmalloc((size_t)V * sizeof *a);
    for (int i = 0; i < rows; i++) {
        masks[i] = NULL;
        if (!(call & 1) || i % 3) continue;
        uint32_t *m = mbuf + (size_t)i * nw;
        for (int w = 0; w < nw; w++)
            m[w] = V >= BIG_V ? 0 : (uint32_t)rng_next(g) | (uint32_t)rng_next(g);
        for (int k = 0; V >= BIG_V && k < 64; k++) {
            int t = rng_int(g, V);
            m[t >> 5] |= 1u << (t & 31);
        }
        memcpy(a, host + (size_t)tok[i] * V, (size_t)V * sizeof *a);
        apply_edits(a, e + r[i].edit_begin, r[i].n_edits);
        for (int t = rng_int(g, V), n = 0; n < V; n++, t = (t + 1) % V)
            if (a[t] > -INFINITY) {
                m[t >> 5] |= 1u << (t & 31);
                break;
            }
        masks[i] = m;
    }
    ctx_sample(c, V, tok, rows, r, e, n_e, (call & 1) ? masks : NULL, ids, lp);
    for (int i = 0; i < rows; i++) {
        memcpy(a, host + (size_t)tok[i] * V, (size_t)V * sizeof *a);
        apply_edits(a, e + r[i].edit_begin, r[i].n_edits);
        for (int t = 0; masks[i] && t < V; t++)
            if (!(masks[i][t >> 5] >> (t & 31) & 1)) a[t] = -INFINITY;
        struct verdict v = judge(sc, a, V, &r[i], ids[i]);
        double dlp = fabs((double)lp[i] - v.lp);
        if (!v.ok || !(dlp <= LP_TOL)) {
            if (ty->bad++ < 10)
                printf("MISMATCH %s%s V=%d rows=%d call=%d row %d (data %d, T=%g k=%d p=%g "
                       "minp=%g u=%.9g, %d edits): id %d logprob %.7g; reference id %d "
                       "logprob %.7g\n",
                       c->dev, c->mode, V, rows, call, i, tok[i], r[i].temperature, r[i].top_k,
                       r[i].top_p, r[i].min_p, r[i].u, r[i].n_edits, ids[i], lp[i], v.ref_id, v.lp);
            continue;
        }
        ty->rows++;
        ty->greedy += r[i].temperature == 0.0f;
        ty->exact += v.exact;
        ty->tolerant += !v.exact;
        if (dlp > ty->worst_lp) ty->worst_lp = dlp;
    }
    free(a);
    free(mbuf);
}

static void test_sample_matches_reference(void **state)
{
    int tested = 0, quick = env_flag("KRS_SAMPLE_QUICK"), small = env_flag("KRS_SAMPLE_SMALL");
    int tiny = env_flag("KRS_SAMPLE_TINY");
    static const struct {
        int V, rows, calls;
    } shapes[] = {{BIG_V, 64, 3}, {BIG_V, 7, 2}, {BIG_V, 1, 4}, {1000, 64, 4},
                  {1000, 7, 3},   {33, 64, 4},   {33, 1, 4},    {33, 7, 2}};
    for (size_t d = 0; d < sizeof g_devices / sizeof *g_devices; d++) {
        for (int mode = 0; mode < N_MODES; mode++) {
            struct ctx cx, *c = &cx;
            if (!ctx_open(c, g_devices[d], mode)) continue;
            ctx_load(c, 1);
            tested++;
            for (size_t s = 0; s < sizeof shapes / sizeof *shapes; s++) {
                int V = shapes[s].V, rows = shapes[s].rows, calls = shapes[s].calls;
                if ((quick && V == BIG_V && rows > 7) || ((small || tiny) && V == BIG_V) ||
                    (tiny && rows > 7))
                    continue;
                struct ref_scratch sc;
                scratch_init(&sc, V);
                struct rng g = {0x5A5A0000u + s};
                struct tally ty = {0};
                for (int k = 0; k < calls; k++) check_call(c, &sc, &g, V, rows, k, &ty);
                printf("sample %s%s V=%-6d rows=%-2d: %3d rows (%d greedy) %d exact, %d within the "
                       "boundary tolerance, %d wrong; worst |logprob - ref| %.2e\n",
                       c->dev, c->mode, V, rows, ty.rows + ty.bad, ty.greedy, ty.exact, ty.tolerant,
                       ty.bad, ty.worst_lp);
                fflush(stdout);
                assert_int_equal(ty.bad, 0);
                /* The tolerance is for rare boundary cases, not a way to pass a wrong sampler. */
                assert_true(ty.tolerant * 20 <= ty.rows);
                scratch_free(&sc);
            }
            ctx_close(c);
        }
    }
    if (!tested) skip();
}

/* Evenly spread draws over 33 tokens: the counts follow the (truncated) distribution. */
static void test_sample_statistics(void **state)
{
    if (env_flag("KRS_SAMPLE_TINY")) skip();
    int tested = 0;
    enum { V = 33, CALLS = 64, N = CALLS * MAX_ROWS };
    for (size_t d = 0; d < sizeof g_devices / sizeof *g_devices; d++) {
        for (int mode = 0; mode < N_MODES; mode++) {
            struct ctx cx, *c = &cx;
            if (!ctx_open(c, g_devices[d], mode)) continue;
            ctx_load(c, 2);
            tested++;
            struct ref_scratch sc;
            scratch_init(&sc, V);
            const int data_row = 0; /* plain noise, sd 2 */
            const float *x = c->host[vocab_index(V)] + (size_t)data_row * V;
            for (int setting = 0; setting < 2; setting++) {
                struct backend_sample_row p = {.temperature = 1.0f, .top_p = 1.0f};
                if (setting == 1) p.temperature = 0.7f, p.top_k = 10, p.top_p = 0.9f;
                /* expected probabilities: the reference's survivors and weights */
                struct backend_sample_row probe = p;
                probe.u = 0.0f;
                judge(&sc, x, V, &probe, 0);
                double s0 = 0.0, expect[V];
                for (int i = 0; i < V; i++) s0 += sc.state[i] == 1 ? sc.w[i] : 0.0;
                for (int i = 0; i < V; i++) {
                    assert_true(sc.state[i] != 2); /* no ambiguous cut in this row */
                    expect[i] = sc.state[i] == 1 ? N * sc.w[i] / s0 : 0.0;
                }
                int count[V];
                memset(count, 0, sizeof count);
                int32_t tok[MAX_ROWS], ids[MAX_ROWS];
                float lp[MAX_ROWS];
                struct backend_sample_row r[MAX_ROWS];
                for (int i = 0; i < MAX_ROWS; i++) tok[i] = data_row;
                for (int k = 0; k < CALLS; k++) {
                    for (int i = 0; i < MAX_ROWS; i++) {
                        r[i] = p;
                        r[i].u = (float)(((double)(k * MAX_ROWS + i) + 0.5) / N);
                    }
                    ctx_sample(c, V, tok, MAX_ROWS, r, NULL, 0, NULL, ids, lp);
                    for (int i = 0; i < MAX_ROWS; i++) {
                        assert_true(ids[i] >= 0 && ids[i] < V);
                        count[ids[i]]++;
                    }
                }
                double worst = 0.0, chi2 = 0.0;
                int cells = 0;
                for (int i = 0; i < V; i++) {
                    double dv = fabs(count[i] - expect[i]);
                    if (dv > worst) worst = dv;
                    if (expect[i] > 0.0) {
                        chi2 += (count[i] - expect[i]) * (count[i] - expect[i]) / expect[i];
                        cells++;
                    } else {
                        assert_int_equal(count[i], 0);
                    }
                }
                printf("sample %s%s statistics (%s): %d draws over %d tokens, worst |count - N p| "
                       "%.2f, chi2 %.3f\n",
                       c->dev, c->mode, setting ? "T 0.7, top-k 10, top-p 0.9" : "T 1", N, cells,
                       worst, chi2);
                assert_true(worst <= 2.0);
            }
            scratch_free(&sc);
            ctx_close(c);
        }
    }
    if (!tested) skip();
}

static void test_sample_errors(void **state)
{
    int tested = 0;
    for (size_t d = 0; d < sizeof g_devices / sizeof *g_devices; d++) {
        struct ctx cx, *c = &cx;
        if (!ctx_open(c, g_devices[d], 0)) continue;
        ctx_load(c, 3);
        tested++;
        const int V = 33;
        int32_t tok[2] = {0, 1};
        struct backend_sample_row r[2] = {{.temperature = 0.7f, .top_p = 1.0f, .u = 0.5f},
                                          {.temperature = 0.0f, .top_p = 1.0f, .u = 0.5f}};
        const int32_t *ids;
        const float *lp;
        /* no sample call in the step */
        ctx_fill(c, V, tok, 2);
        assert_int_equal(c->ops->step_end_sampled(c->b, 2, &ids, &lp), KRS_ERR_STATE);
        /* too many edits: the caller samples on the host */
        int n_big = MAX_ROWS * 256 + 1;
        struct backend_logit_edit *big = xmalloc((size_t)n_big * sizeof *big);
        for (int i = 0; i < n_big; i++) big[i] = (struct backend_logit_edit){i % V, 0.0f, 1.0f, 0};
        r[0].n_edits = n_big;
        ctx_fill(c, V, tok, 2);
        assert_int_equal(c->ops->sample(c->b, c->x, 2, V, r, big, n_big, NULL), KRS_ERR_FULL);
        r[0].n_edits = 0;
        free(big);
        /* bad settings and arguments */
        struct {
            const char *what;
            struct backend_sample_row p;
        } bad[] = {
            {"top_p 0", {.temperature = 1.0f, .top_p = 0.0f, .u = 0.5f}},
            {"top_p > 1", {.temperature = 1.0f, .top_p = 1.5f, .u = 0.5f}},
            {"u > 1", {.temperature = 1.0f, .top_p = 1.0f, .u = 1.5f}},
            {"u < 0", {.temperature = 1.0f, .top_p = 1.0f, .u = -0.1f}},
            {"temperature < 0", {.temperature = -1.0f, .top_p = 1.0f, .u = 0.5f}},
            {"temperature NaN", {.temperature = NAN, .top_p = 1.0f, .u = 0.5f}},
            {"top_k < 0", {.temperature = 1.0f, .top_k = -1, .top_p = 1.0f, .u = 0.5f}},
            {"min_p > 1", {.temperature = 1.0f, .top_p = 1.0f, .min_p = 2.0f, .u = 0.5f}},
            {"edit range", {.temperature = 1.0f, .top_p = 1.0f, .u = 0.5f, .n_edits = 1}},
        };
        for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
            ctx_fill(c, V, tok, 2);
            int rc = c->ops->sample(c->b, c->x, 1, V, &bad[i].p, NULL, 0, NULL);
            if (rc != KRS_ERR_INVALID)
                fail_msg("%s: %s -> %s", c->dev, bad[i].what, krs_status_str(rc));
        }
        struct backend_logit_edit e_bad = {V, 1.0f, 1.0f, 0.0f}; /* token out of range */
        struct backend_sample_row r1 = {.temperature = 1.0f, .top_p = 1.0f, .n_edits = 1};
        ctx_fill(c, V, tok, 2);
        assert_int_equal(c->ops->sample(c->b, c->x, 1, V, &r1, &e_bad, 1, NULL), KRS_ERR_INVALID);
        e_bad = (struct backend_logit_edit){0, 1.0f, 0.0f, 0.0f}; /* repetition 0 */
        ctx_fill(c, V, tok, 2);
        assert_int_equal(c->ops->sample(c->b, c->x, 1, V, &r1, &e_bad, 1, NULL), KRS_ERR_INVALID);
        ctx_fill(c, V, tok, 2);
        assert_int_equal(c->ops->sample(c->b, c->x, MAX_ROWS + 1, V, r, NULL, 0, NULL),
                         KRS_ERR_INVALID);
        /* edits are finite: a -inf bias (banning data row 5's finite entries) is invalid */
        const float *h5 = c->host[vocab_index(V)] + 5 * V;
        struct backend_logit_edit ban[V];
        int n_ban = 0;
        for (int i = 0; i < V; i++)
            if (h5[i] > -INFINITY) ban[n_ban++] = (struct backend_logit_edit){i, -INFINITY, 1, 0};
        struct backend_sample_row r5[2] = {
            {.temperature = 0.7f, .top_p = 1.0f, .u = 0.5f, .n_edits = n_ban},
            {.temperature = 0.0f, .top_p = 1.0f, .u = 0.5f}};
        int32_t tok5[2] = {5, 0};
        ctx_fill(c, V, tok5, 2);
        assert_int_equal(c->ops->sample(c->b, c->x, 2, V, r5, ban, n_ban, NULL), KRS_ERR_INVALID);
        /* the backend still works after the failures */
        int32_t got[2];
        float glp[2];
        ctx_sample(c, V, tok, 2, r, NULL, 0, NULL, got, glp);
        assert_true(got[0] >= 0 && got[0] < V && got[1] >= 0 && got[1] < V);
        /* u = 1 (a double draw just below 1 rounds to 1.0f): the last survivor, not an error */
        struct backend_sample_row one = {.temperature = 1.0f, .top_p = 1.0f, .u = 1.0f};
        ctx_sample(c, V, tok, 1, &one, NULL, 0, NULL, got, glp); /* data row 0: all finite */
        assert_int_equal(got[0], V - 1);
        ctx_close(c);
    }
    if (!tested) skip();
}

/* Rows that are NaN or all -inf reach the device only through the data: their own load. */
static void test_sample_bad_rows(void **state)
{
    int tested = 0;
    for (size_t d = 0; d < sizeof g_devices / sizeof *g_devices; d++) {
        struct ctx cx, *c = &cx;
        if (!ctx_open(c, g_devices[d], 0)) continue;
        const int V = 33;
        float *h = xmalloc(3 * V * sizeof *h);
        for (int i = 0; i < 3 * V; i++) h[i] = (float)(i % 7);
        h[V + 4] = NAN;                                       /* row 1: a NaN */
        for (int i = 0; i < V; i++) h[2 * V + i] = -INFINITY; /* row 2: all -inf */
        struct quant_matrix m = {.type = QUANT_F32,
                                 .n_in = V,
                                 .n_out = 3,
                                 .data = h,
                                 .row_bytes = quant_row_bytes(QUANT_F32, V)};
        struct backend_tensor *w = NULL;
        CHECK(c->ops->weight_upload(c->b, &m, &w));
        CHECK(c->ops->arena_reserve(c->b, 1u << 20));
        CHECK(c->ops->act_alloc(c->b, 4 * V, &c->x));
        tested++;
        for (int bad_row = 1; bad_row <= 3; bad_row++) {
            int32_t tok[2] = {0, bad_row == 3 ? 0 : bad_row};
            struct backend_sample_row r[2] = {{.temperature = 0.0f, .top_p = 1.0f},
                                              {.temperature = 1.0f, .top_p = 0.9f, .u = 0.3f}};
            struct backend_step s = {.n_tokens = 2,
                                     .tokens = tok,
                                     .pos = c->pos,
                                     .seq = c->seq,
                                     .n_seqs = 1,
                                     .logit_rows = c->pos};
            CHECK(c->ops->step_begin(c->b, &s));
            CHECK(c->ops->embed(c->b, w, 1.0f, c->x));
            CHECK(c->ops->sample(c->b, c->x, 2, V, r, NULL, 0, NULL));
            const int32_t *ids = NULL;
            const float *lp = NULL;
            int rc = c->ops->step_end_sampled(c->b, 2, &ids, &lp);
            if (bad_row == 3) { /* good rows: row 0 twice */
                assert_int_equal(rc, KRS_OK);
                assert_int_equal(ids[0], 6); /* first maximum of 0..6 repeating */
                double z = 0.0;
                for (int i = 0; i < V; i++) z += exp(h[i] - 6.0);
                assert_true(fabs(lp[0] - (0.0 - log(z))) <= LP_TOL);
                assert_true(ids[1] >= 0 && ids[1] < V && h[ids[1]] >= 4.0f); /* top-p 0.9 */
            } else {
                assert_int_equal(rc, KRS_ERR_INVALID);
            }
        }
        free(h);
        ctx_close(c);
    }
    if (!tested) skip();
}

/* Time per call, rows 1 and 64 of 262144 tokens, against downloading the logits. */
static void test_sample_timing(void **state)
{
    if (env_flag("KRS_SAMPLE_QUICK") || env_flag("KRS_SAMPLE_SMALL") || env_flag("KRS_SAMPLE_TINY"))
        skip();
    int tested = 0;
    for (size_t d = 0; d < sizeof g_devices / sizeof *g_devices; d++) {
        for (int mode = 0; mode < N_MODES; mode++) {
            struct ctx cx, *c = &cx;
            if (!ctx_open(c, g_devices[d], mode)) continue;
            ctx_load(c, 4);
            tested++;
            static const struct {
                const char *name;
                struct backend_sample_row p;
            } set[] = {
                {"greedy", {.temperature = 0.0f, .top_p = 1.0f}},
                {"T 1 (no truncation)", {.temperature = 1.0f, .top_p = 1.0f}},
                {"T 0.7 top-k 40", {.temperature = 0.7f, .top_k = 40, .top_p = 1.0f}},
                {"T 1.5 top-p 0.9", {.temperature = 1.5f, .top_p = 0.9f}},
                {"T 0.7 min-p 0.05", {.temperature = 0.7f, .top_p = 1.0f, .min_p = 0.05f}},
                {"T 0.7 k 40 p 0.9 minp .05",
                 {.temperature = 0.7f, .top_k = 40, .top_p = 0.9f, .min_p = 0.05f}},
            };
            const int iters = 20, nrow_set[2] = {1, 64};
            for (int ri = 0; ri < 2; ri++) {
                int rows = nrow_set[ri];
                int32_t tok[MAX_ROWS], ids[MAX_ROWS];
                float lp[MAX_ROWS];
                struct backend_sample_row r[MAX_ROWS];
                for (int i = 0; i < rows; i++) tok[i] = (int32_t)(6 + 8 * (i % 8)) % MAX_ROWS;
                /* baseline: the step without sampling (1-float download); and the logits download
                 */
                double t_base = 1e9, t_dl = 1e9;
                for (int rep = 0; rep < 3; rep++) {
                    double t0 = now_s();
                    for (int it = 0; it < iters; it++) {
                        const float *o;
                        ctx_fill(c, BIG_V, tok, rows);
                        CHECK(c->ops->step_end(c->b, c->x, 1, 1, &o));
                    }
                    double t1 = now_s();
                    for (int it = 0; it < iters; it++) {
                        const float *o;
                        ctx_fill(c, BIG_V, tok, rows);
                        CHECK(c->ops->step_end(c->b, c->x, rows, BIG_V, &o));
                    }
                    double t2 = now_s();
                    if ((t1 - t0) / iters < t_base) t_base = (t1 - t0) / iters;
                    if ((t2 - t1) / iters < t_dl) t_dl = (t2 - t1) / iters;
                }
                printf("sample %s%s timing rows=%d V=%d: step without sampling %.1f us; logits "
                       "download adds %.1f us\n",
                       c->dev, c->mode, rows, BIG_V, 1e6 * t_base, 1e6 * (t_dl - t_base));
                for (size_t k = 0; k < sizeof set / sizeof *set; k++) {
                    double best = 1e9;
                    for (int i = 0; i < rows; i++) {
                        r[i] = set[k].p;
                        r[i].u = (float)((i + 0.5) / rows);
                    }
                    for (int rep = 0; rep < 3; rep++) {
                        double t0 = now_s();
                        for (int it = 0; it < iters; it++)
                            ctx_sample(c, BIG_V, tok, rows, r, NULL, 0, NULL, ids, lp);
                        double t = (now_s() - t0) / iters;
                        if (t < best) best = t;
                    }
                    printf("sample %s%s timing rows=%d V=%d %-26s: sample + ids back %.1f us\n",
                           c->dev, c->mode, rows, BIG_V, set[k].name, 1e6 * (best - t_base));
                }
            }
            ctx_close(c);
        }
    }
    if (!tested) skip();
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_sample_matches_reference),
        cmocka_unit_test(test_sample_statistics),
        cmocka_unit_test(test_sample_errors),
        cmocka_unit_test(test_sample_bad_rows),
        cmocka_unit_test(test_sample_timing),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
