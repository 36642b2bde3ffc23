/* Token sampling: logit bias, penalties, greedy/temperature, top-k, top-p, min-p, logprobs.
 *
 * Owns the per-thread scratch (work copy of the logits, weights, penalty counters, candidate
 * list, histogram). Must not allocate in sampler_sample, must not modify the caller's logits, and
 * must not depend on anything but (params, RNG state, logits, history): that is what makes a
 * seed reproduce alone or batched. The vocab-wide loops are in the kernels (sampler_kern*.c);
 * the rest touches only O(history + candidates) entries. See sampler.h for the semantics. */
#include "sampler/sampler.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "krserve.h"
#include "sampler/sampler_impl.h"
#include "util/alloc.h"

/* Histogram of d = max - l: 64 buckets per logit unit up to d = 64, one overflow bucket. */
#define HIST_SCALE 64.0f
#define HIST_RANGE 64.0f
#define HIST_N     4097
#define WALK_BLOCK 1024

/* Prefilter: thresholds from a strided sample of the row (rank r of PF_SAMPLES ~ r * stride
 * tokens above it); gather everything >= threshold with a vector compare; if that provably
 * contains the answer (count >= k, or mass >= top_p), finish on the small set, else fall back to
 * the histogram. Only for rows of at least PF_MIN_VOCAB. */
#define PF_SAMPLES   4096
#define PF_RANKS     64
#define PF_CAP       4096
#define PF_MIN_VOCAB (16 * PF_SAMPLES)

struct cand {
    float v;    /* adjusted logit */
    float w;    /* exp((v - max) / T) */
    int32_t id; /* token */
};

struct sampler_scratch {
    int32_t n_vocab;
    const struct sampler_kern *kern;
    float *work;       /* [n_vocab] adjusted logits */
    float *weight;     /* [n_vocab] temperature weights (dense paths) */
    uint32_t *count;   /* [n_vocab] generated-token counts; all zero between calls */
    uint8_t *seen;     /* [n_vocab] repetition-window marks; all zero between calls */
    struct cand *cand; /* [n_vocab] */
    int32_t *idx;      /* [PF_CAP] prefilter hits */
    uint32_t hist_count[HIST_N];
    double hist_mass[HIST_N];
};

/* ---- RNG: splitmix64 seeding, xoshiro256** (Blackman & Vigna) ---- */

static uint64_t splitmix64(uint64_t *x)
{
    uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static inline uint64_t rotl64(uint64_t x, int k)
{
    return (x << k) | (x >> (64 - k));
}

static uint64_t rng_next(uint64_t st[4])
{
    uint64_t result = rotl64(st[1] * 5, 7) * 9;
    uint64_t t = st[1] << 17;
    st[2] ^= st[0];
    st[3] ^= st[1];
    st[1] ^= st[2];
    st[0] ^= st[3];
    st[2] ^= t;
    st[3] = rotl64(st[3], 45);
    return result;
}

/* ---- setup ---- */

void sampler_params_default(struct sampler_params *p)
{
    memset(p, 0, sizeof *p);
    p->temperature = 1.0f;
    p->top_p = 1.0f;
    p->repetition_penalty = 1.0f;
    p->penalty_last_n = SAMPLER_DEFAULT_PENALTY_LAST_N;
}

int sampler_init(struct sampler *s, const struct sampler_params *p, int32_t n_vocab)
{
    if (!s || !p || n_vocab <= 0) return KRS_ERR_INVALID;
    if (!isfinite(p->temperature) || p->temperature < 0.0f) return KRS_ERR_INVALID;
    if (p->top_k < 0) return KRS_ERR_INVALID;
    if (!(p->top_p > 0.0f && p->top_p <= 1.0f)) return KRS_ERR_INVALID;
    if (!(p->min_p >= 0.0f && p->min_p <= 1.0f)) return KRS_ERR_INVALID;
    if (!isfinite(p->repetition_penalty) || !(p->repetition_penalty > 0.0f)) return KRS_ERR_INVALID;
    if (p->penalty_last_n < -1) return KRS_ERR_INVALID;
    if (!isfinite(p->presence_penalty) || !isfinite(p->frequency_penalty)) return KRS_ERR_INVALID;
    if (p->n_logit_bias < 0 || (p->n_logit_bias > 0 && !p->logit_bias)) return KRS_ERR_INVALID;
    for (int32_t i = 0; i < p->n_logit_bias; i++) {
        if (p->logit_bias[i].token < 0 || p->logit_bias[i].token >= n_vocab) return KRS_ERR_INVALID;
        if (!isfinite(p->logit_bias[i].bias)) return KRS_ERR_INVALID;
    }
    if (p->n_top_logprobs < 0 || p->n_top_logprobs > SAMPLER_MAX_TOP_LOGPROBS)
        return KRS_ERR_INVALID;
    if (p->skip_logprob != 0 && (p->skip_logprob != 1 || p->n_top_logprobs != 0))
        return KRS_ERR_INVALID;
    s->params = *p;
    s->n_vocab = n_vocab;
    uint64_t x = p->seed;
    for (int i = 0; i < 4; i++) s->rng[i] = splitmix64(&x);
    return KRS_OK;
}

int sampler_scratch_create(int32_t n_vocab, struct sampler_scratch **out)
{
    if (!out || n_vocab <= 0) return KRS_ERR_INVALID;
    *out = NULL;
    size_t n = (size_t)n_vocab;
    struct sampler_scratch *sc = alloc_calloc(1, sizeof *sc);
    if (!sc) return KRS_ERR_NOMEM;
    sc->n_vocab = n_vocab;
    sc->kern = sampler_kern_get();
    sc->work = alloc_aligned(64, n * sizeof(float));
    sc->weight = alloc_aligned(64, n * sizeof(float));
    sc->count = alloc_calloc(n, sizeof(uint32_t));
    sc->seen = alloc_calloc(n, sizeof(uint8_t));
    sc->cand = alloc_calloc(n, sizeof(struct cand));
    sc->idx = alloc_calloc(PF_CAP, sizeof(int32_t));
    if (!sc->work || !sc->weight || !sc->count || !sc->seen || !sc->cand || !sc->idx) {
        sampler_scratch_free(sc);
        return KRS_ERR_NOMEM;
    }
    *out = sc;
    return KRS_OK;
}

void sampler_scratch_free(struct sampler_scratch *sc)
{
    if (!sc) return;
    if (sc->work) alloc_aligned_free(sc->work);
    if (sc->weight) alloc_aligned_free(sc->weight);
    alloc_free(sc->count);
    alloc_free(sc->seen);
    alloc_free(sc->cand);
    alloc_free(sc->idx);
    alloc_free(sc);
}

/* ---- selection helpers ---- */

/* Descending value, ties by ascending id: the one order used for every "sorted" statement. */
static int cand_cmp(const void *pa, const void *pb)
{
    const struct cand *a = pa, *b = pb;
    if (a->v > b->v) return -1;
    if (a->v < b->v) return 1;
    return (a->id > b->id) - (a->id < b->id);
}

static inline int hist_bucket(float m, float v)
{
    float d = m - v; /* >= 0; +inf for -inf logits */
    return (int)((d < HIST_RANGE ? d : HIST_RANGE) * HIST_SCALE);
}

/* The kk (< n) largest of a[0..n) into cand[0..kk); sorted only when `sorted` (else just the
 * set). A histogram finds the bucket where the count reaches kk; buckets above it are taken
 * whole ("sure"), only the crossing bucket ("edge") is sorted and cut. */
static int32_t select_top_k(struct sampler_scratch *sc, const float *a, int32_t n, float m,
                            int32_t kk, int sorted)
{
    uint32_t *hc = sc->hist_count;
    memset(hc, 0, sizeof sc->hist_count);
    for (int32_t i = 0; i < n; i++) hc[hist_bucket(m, a[i])]++;
    int b = 0;
    for (uint32_t cum = 0; b < HIST_N - 1; b++) {
        if (cum + hc[b] >= (uint32_t)kk) break;
        cum += hc[b];
    }
    /* bucket(i) < b  <=>  d * 64 < b (scaling by 64 is exact); the overflow bucket is open */
    struct cand *c = sc->cand;
    int32_t ns = 0, ne = 0;
    float lo = (float)b / HIST_SCALE, hi = (float)(b + 1) / HIST_SCALE;
    int last = b == HIST_N - 1;
    for (int32_t i = 0; i < n; i++) {
        float d = m - a[i];
        if (d < lo)
            c[ns++] = (struct cand){a[i], 0.0f, i};
        else if (last || d < hi)
            c[n - 1 - ne++] = (struct cand){a[i], 0.0f, i};
    }
    struct cand *edge = c + n - ne;
    qsort(edge, (size_t)ne, sizeof *edge, cand_cmp);
    memmove(c + ns, edge, (size_t)(kk - ns) * sizeof *c);
    if (sorted) qsort(c, (size_t)kk, sizeof *c, cand_cmp);
    return kk;
}

/* Top-p over the whole vocab with weights w (sum zt). Buckets above the one where the mass
 * crosses top_p * zt are kept unsorted ("sure"); only the crossing bucket is sorted and cut.
 * Result: the nucleus in cand[0..return). */
static int32_t select_top_p_dense(struct sampler_scratch *sc, const float *a, const float *w,
                                  int32_t n, float m, double zt, float top_p)
{
    uint32_t *hc = sc->hist_count;
    double *hm = sc->hist_mass;
    memset(hc, 0, sizeof sc->hist_count);
    memset(hm, 0, sizeof sc->hist_mass);
    for (int32_t i = 0; i < n; i++) {
        int b = hist_bucket(m, a[i]);
        hc[b]++;
        hm[b] += w[i];
    }
    double target = (double)top_p * zt;
    int b = 0;
    for (double cum = 0.0; b < HIST_N - 1; b++) {
        if (cum + hm[b] >= target) break;
        cum += hm[b];
    }
    struct cand *c = sc->cand;
    int32_t ns = 0, ne = 0;
    float lo = (float)b / HIST_SCALE, hi = (float)(b + 1) / HIST_SCALE;
    int last = b == HIST_N - 1;
    for (int32_t i = 0; i < n; i++) {
        float d = m - a[i];
        if (d < lo)
            c[ns++] = (struct cand){a[i], w[i], i};
        else if (last || d < hi)
            c[n - 1 - ne++] = (struct cand){a[i], w[i], i};
    }
    struct cand *edge = c + n - ne;
    qsort(edge, (size_t)ne, sizeof *edge, cand_cmp);
    double cum = 0.0;
    for (int32_t j = 0; j < ns; j++) cum += c[j].w;
    int32_t ke = 0;
    while (ke < ne && (cum < target || ns + ke == 0)) cum += edge[ke++].w;
    memmove(c + ns, edge, (size_t)ke * sizeof *c);
    return ns + ke;
}

/* ranks[r] = the (r+1)-th largest of a[j * stride], j < PF_SAMPLES; returns the stride. */
static int32_t sample_ranks(const float *a, int32_t n, float *ranks)
{
    int32_t stride = n / PF_SAMPLES, cnt = 0;
    for (int32_t j = 0; j < PF_SAMPLES; j++) {
        float v = a[(int64_t)j * stride];
        if (cnt == PF_RANKS && !(v > ranks[PF_RANKS - 1])) continue;
        int32_t q = cnt < PF_RANKS ? cnt++ : PF_RANKS - 1;
        while (q > 0 && ranks[q - 1] < v) {
            ranks[q] = ranks[q - 1];
            q--;
        }
        ranks[q] = v;
    }
    for (; cnt < PF_RANKS; cnt++) ranks[cnt] = -INFINITY;
    return stride;
}

/* Top-k through the prefilter; -1 when it cannot decide (caller uses select_top_k). */
static int32_t prefilter_top_k(struct sampler_scratch *sc, const struct sampler_kern *k,
                               const float *a, int32_t n, int32_t kk)
{
    float ranks[PF_RANKS];
    int32_t stride = sample_ranks(a, n, ranks);
    int32_t r = (2 * kk + 64 + stride - 1) / stride; /* expect ~2k + 64 hits */
    if (r > PF_RANKS) return -1;
    int32_t c = k->gather_ge(a, n, ranks[r - 1], sc->idx, PF_CAP);
    if (c < kk || c > PF_CAP) return -1;
    for (int32_t j = 0; j < c; j++) sc->cand[j] = (struct cand){a[sc->idx[j]], 0.0f, sc->idx[j]};
    qsort(sc->cand, (size_t)c, sizeof *sc->cand, cand_cmp);
    return kk;
}

/* Dense top-p through the prefilter (w: weights, zt: their sum); -1 when undecided. */
static int32_t prefilter_top_p(struct sampler_scratch *sc, const struct sampler_kern *k,
                               const float *a, const float *w, int32_t n, double zt, float top_p)
{
    static const int32_t try_rank[] = {2, 8, PF_RANKS};
    float ranks[PF_RANKS];
    sample_ranks(a, n, ranks);
    double target = (double)top_p * zt;
    for (size_t t = 0; t < sizeof try_rank / sizeof try_rank[0]; t++) {
        int32_t c = k->gather_ge(a, n, ranks[try_rank[t] - 1], sc->idx, PF_CAP);
        if (c > PF_CAP) return -1;
        double mass = 0.0;
        for (int32_t j = 0; j < c; j++) mass += w[sc->idx[j]];
        if (mass < target) continue;
        /* everything outside is below everything inside: the nucleus is a prefix of these */
        struct cand *cd = sc->cand;
        for (int32_t j = 0; j < c; j++) {
            int32_t i = sc->idx[j];
            cd[j] = (struct cand){a[i], w[i], i};
        }
        qsort(cd, (size_t)c, sizeof *cd, cand_cmp);
        double cum = 0.0;
        int32_t kept = 0;
        while (kept < c && (cum < target || kept == 0)) cum += cd[kept++].w;
        return kept;
    }
    return -1;
}

/* Inverse CDF over cand[0..n) by weight. */
static int32_t draw_cand(const struct cand *c, int32_t n, double u)
{
    double z = 0.0;
    for (int32_t j = 0; j < n; j++) z += c[j].w;
    double t = u * z, cum = 0.0;
    for (int32_t j = 0; j < n; j++) {
        cum += c[j].w;
        if (t < cum) return c[j].id;
    }
    for (int32_t j = n - 1; j > 0; j--) /* rounding: t reached the total */
        if (c[j].w > 0.0f) return c[j].id;
    return c[0].id;
}

/* Inverse CDF over w[0..n) (total zt), skipping whole blocks by their sums. */
static int32_t draw_dense(const struct sampler_kern *k, const float *w, int32_t n, double zt,
                          double u)
{
    double t = u * zt, cum = 0.0;
    for (int32_t blk = 0; blk < n; blk += WALK_BLOCK) {
        int32_t len = n - blk < WALK_BLOCK ? n - blk : WALK_BLOCK;
        double bs = k->sum(w + blk, len);
        if (cum + bs <= t) {
            cum += bs;
            continue;
        }
        for (int32_t i = blk; i < blk + len; i++) {
            cum += w[i];
            if (t < cum) return i;
        }
    }
    for (int32_t i = n - 1; i > 0; i--)
        if (w[i] > 0.0f) return i;
    return 0;
}

/* The n largest of a[0..V) (ties: lower id first) into top[], values in .logprob for now.
 * Once full, chunks whose max does not beat the current n-th are skipped with one vector pass. */
static int32_t select_small(const struct sampler_kern *k, const float *a, int32_t V, int32_t n,
                            struct sampler_token_logprob *top)
{
    enum { CHUNK = 256 };
    int32_t cnt = 0;
    for (int32_t c0 = 0; c0 < V; c0 += CHUNK) {
        int32_t c1 = V - c0 < CHUNK ? V : c0 + CHUNK;
        if (cnt == n && !(k->max(a + c0, c1 - c0) > top[n - 1].logprob)) continue;
        for (int32_t i = c0; i < c1; i++) {
            float v = a[i];
            if (cnt == n && !(v > top[n - 1].logprob)) continue;
            int32_t j = cnt < n ? cnt++ : n - 1;
            while (j > 0 && top[j - 1].logprob < v) {
                top[j] = top[j - 1];
                j--;
            }
            top[j].token = i;
            top[j].logprob = v;
        }
    }
    return cnt;
}

static inline int32_t hist_token(const int32_t *prompt, int32_t n_prompt, const int32_t *gen,
                                 int64_t i)
{
    return i < n_prompt ? prompt[i] : gen[i - n_prompt];
}

/* Applies bias and penalties to sc->work; all counters are back to zero on return. */
static void apply_adjustments(const struct sampler_params *p, struct sampler_scratch *sc,
                              const int32_t *prompt, int32_t n_prompt, const int32_t *gen,
                              int32_t n_gen, int64_t win_start)
{
    float *a = sc->work;
    for (int32_t i = 0; i < p->n_logit_bias; i++)
        a[p->logit_bias[i].token] += p->logit_bias[i].bias;

    int64_t n_hist = (int64_t)n_prompt + n_gen;
    if (win_start < n_hist) {
        float r = p->repetition_penalty;
        for (int64_t i = win_start; i < n_hist; i++) {
            int32_t t = hist_token(prompt, n_prompt, gen, i);
            if (sc->seen[t]) continue;
            sc->seen[t] = 1;
            a[t] = a[t] > 0.0f ? a[t] / r : a[t] * r;
        }
        for (int64_t i = win_start; i < n_hist; i++)
            sc->seen[hist_token(prompt, n_prompt, gen, i)] = 0;
    }

    if (p->presence_penalty != 0.0f || p->frequency_penalty != 0.0f) {
        for (int32_t i = 0; i < n_gen; i++) sc->count[gen[i]]++;
        for (int32_t i = 0; i < n_gen; i++) {
            int32_t t = gen[i];
            uint32_t c = sc->count[t];
            if (!c) continue;
            a[t] -= p->presence_penalty + p->frequency_penalty * (float)c;
            sc->count[t] = 0;
        }
    }
}

int sampler_sample(struct sampler *s, struct sampler_scratch *sc, const float *logits,
                   int32_t n_vocab, const int32_t *prompt, int32_t n_prompt,
                   const int32_t *generated, int32_t n_generated, struct sampler_result *out)
{
    return sampler_sample_masked(s, sc, logits, n_vocab, NULL, prompt, n_prompt, generated,
                                 n_generated, out);
}

/* a[t] = -inf for every token t whose bit in allow is clear (whole words at a time); returns
 * the number of allowed tokens. */
static int32_t apply_mask(float *a, int32_t V, const uint32_t *allow)
{
    int32_t n_allowed = 0;
    for (int32_t w = 0; w * 32 < V; w++) {
        uint32_t bits = allow[w];
        if (V - w * 32 < 32) bits &= (1u << (V - w * 32)) - 1;
        n_allowed += __builtin_popcount(bits);
        if (bits == 0xFFFFFFFFu) continue;
        int32_t t0 = w * 32, n = V - t0 < 32 ? V - t0 : 32;
        float *x = a + t0;
        if (!bits) {
            for (int32_t j = 0; j < n; j++) x[j] = -INFINITY;
            continue;
        }
        uint32_t *xu = (uint32_t *)x; /* branchless: keep or replace by -inf's bits */
        for (int32_t j = 0; j < n; j++) {
            uint32_t keep = 0u - (bits >> j & 1u);
            xu[j] = (xu[j] & keep) | (0xFF800000u & ~keep);
        }
    }
    return n_allowed;
}

/* A mask that allows few tokens (a grammar between JSON tokens): the same pipeline on the
 * allowed tokens alone (sc->work holds the masked logits, m their max) instead of passes over
 * the whole vocabulary. Draws once, like sampler_sample_masked. */
static int sample_sparse(struct sampler *s, struct sampler_scratch *sc, const uint32_t *allow,
                         int32_t V, float m, struct sampler_result *out)
{
    const struct sampler_params *p = &s->params;
    const float *a = sc->work;
    struct cand *c = sc->cand;
    int32_t n = 0;
    for (int32_t w = 0; w * 32 < V; w++)
        for (uint32_t bits = allow[w]; bits; bits &= bits - 1) {
            int32_t t = w * 32 + __builtin_ctz(bits);
            if (t < V && a[t] > -INFINITY) c[n++] = (struct cand){a[t], 0.0f, t};
        }
    double z1 = 0.0; /* T = 1 mass of the allowed tokens, for the logprob */
    for (int32_t j = 0; j < n; j++) z1 += exp((double)c[j].v - (double)m);
    double u = (double)(rng_next(s->rng) >> 11) * 0x1.0p-53;
    float scale = p->temperature > 0.0f ? 1.0f / p->temperature : 0.0f;
    int32_t tok = c[0].id;
    if (!(scale > 0.0f) || !isfinite(scale)) {
        for (int32_t j = 0; j < n; j++) /* the first maximum: ids ascend */
            if (c[j].v == m) {
                tok = c[j].id;
                break;
            }
    } else {
        qsort(c, (size_t)n, sizeof *c, cand_cmp);
        if (p->top_k > 0 && p->top_k < n) n = p->top_k;
        double z = 0.0;
        for (int32_t j = 0; j < n; j++) z += c[j].w = expf((c[j].v - m) * scale);
        if (p->top_p < 1.0f) {
            double target = (double)p->top_p * z, cum = 0.0;
            int32_t j = 0;
            while (j < n && (cum < target || j == 0)) cum += c[j++].w;
            n = j;
        }
        if (p->min_p > 0.0f) {
            int32_t kept = 0;
            for (int32_t j = 0; j < n; j++)
                if (c[j].w >= p->min_p) c[kept++] = c[j];
            n = kept; /* the maximum (w = 1) always stays */
        }
        tok = draw_cand(c, n, u);
    }
    out->token = tok;
    out->logprob = p->skip_logprob ? NAN : (float)((double)a[tok] - ((double)m + log(z1)));
    out->n_top = 0;
    return KRS_OK;
}

int sampler_sample_masked(struct sampler *s, struct sampler_scratch *sc, const float *logits,
                          int32_t n_vocab, const uint32_t *allow, const int32_t *prompt,
                          int32_t n_prompt, const int32_t *generated, int32_t n_generated,
                          struct sampler_result *out)
{
    if (!s || !sc || !logits || !out || n_vocab <= 0 || n_vocab != s->n_vocab ||
        n_vocab > sc->n_vocab || n_prompt < 0 || n_generated < 0 || (n_prompt > 0 && !prompt) ||
        (n_generated > 0 && !generated))
        return KRS_ERR_INVALID;
    const struct sampler_params *p = &s->params;
    const struct sampler_kern *k = sc->kern;
    const int32_t V = n_vocab;

    /* Repetition window [win_start, n_hist) of prompt ++ generated; empty when off. */
    int64_t n_hist = (int64_t)n_prompt + n_generated;
    int64_t win_start = n_hist;
    if (p->repetition_penalty != 1.0f && p->penalty_last_n != 0)
        win_start =
            p->penalty_last_n < 0 || p->penalty_last_n > n_hist ? 0 : n_hist - p->penalty_last_n;
    for (int64_t i = win_start; i < n_prompt; i++)
        if (prompt[i] < 0 || prompt[i] >= V) return KRS_ERR_INVALID;
    for (int32_t i = 0; i < n_generated; i++)
        if (generated[i] < 0 || generated[i] >= V) return KRS_ERR_INVALID;

    float *a = sc->work;
    float m = k->copy_max(a, logits, V);
    int adjusted = p->n_logit_bias > 0 || win_start < n_hist ||
                   ((p->presence_penalty != 0.0f || p->frequency_penalty != 0.0f) && n_generated);
    if (adjusted) {
        apply_adjustments(p, sc, prompt, n_prompt, generated, n_generated, win_start);
        m = k->max(a, V);
    }
    int32_t n_allowed = V;
    if (allow) {
        if (isnan(m)) return KRS_ERR_INVALID;
        n_allowed = apply_mask(a, V, allow);
        m = k->max(a, V);
    }
    if (!isfinite(m)) return KRS_ERR_INVALID; /* NaN, +inf, or all -inf */
    if (allow && n_allowed <= PF_CAP && p->n_top_logprobs == 0)
        return sample_sparse(s, sc, allow, V, m, out);

    /* Which path: greedy, top-k (then top-p/min-p on the k), top-p (then min-p), min-p alone,
     * dense. */
    float scale = p->temperature > 0.0f ? 1.0f / p->temperature : 0.0f;
    int greedy = !(scale > 0.0f) || !isfinite(scale);
    /* top-k over a mask that allows at most k tokens keeps them all (the rest weigh 0) */
    int use_top_k = !greedy && p->top_k > 0 && p->top_k < V && p->top_k < n_allowed;
    int use_top_p = !greedy && !use_top_k && p->top_p < 1.0f;
    int use_min_p = !greedy && !use_top_k && !use_top_p && p->min_p > 0.0f;
    int32_t n_min_p = -1;
    if (use_min_p) {
        /* min-p alone is a value threshold: gather the few tokens above it (a hair below, the
         * exact test is on the weights); too many -> the dense path with masked weights */
        float t = m + p->temperature * logf(p->min_p) - 1e-3f * (1.0f + fabsf(m));
        n_min_p = k->gather_ge(a, V, t, sc->idx, PF_CAP);
        if (n_min_p > PF_CAP) n_min_p = -1;
    }
    int dense = !greedy && !use_top_k && !use_top_p && n_min_p < 0;

    double zt = 0.0, z1 = NAN;
    if (use_top_p || dense) {
        zt = k->exp_sum(a, V, m, scale, dense ? p->min_p : 0.0f, sc->weight);
        if (!(zt >= 0.5) || !isfinite(zt)) return KRS_ERR_INVALID;
    }
    if (!p->skip_logprob) {
        if ((use_top_p || (dense && p->min_p == 0.0f)) && scale == 1.0f)
            z1 = zt;
        else
            z1 = k->exp_sum(a, V, m, 1.0f, 0.0f, NULL);
        if (!(z1 >= 0.5) || !isfinite(z1)) return KRS_ERR_INVALID;
    }

    /* One draw per call, greedy included, so the n-th token always uses the n-th number. */
    double u = (double)(rng_next(s->rng) >> 11) * 0x1.0p-53;

    int32_t tok = 0;
    if (greedy) {
        while (a[tok] != m) tok++; /* the first maximum */
    } else if (use_top_k) {
        int32_t n = V >= PF_MIN_VOCAB ? prefilter_top_k(sc, k, a, V, p->top_k) : -1;
        if (n < 0) n = select_top_k(sc, a, V, m, p->top_k, p->top_p < 1.0f);
        struct cand *c = sc->cand;
        for (int32_t j = 0; j < n; j++) c[j].w = expf((c[j].v - m) * scale);
        if (p->top_p < 1.0f) {
            double z = 0.0, cum = 0.0;
            for (int32_t j = 0; j < n; j++) z += c[j].w;
            double target = (double)p->top_p * z;
            int32_t j = 0;
            while (j < n && (cum < target || j == 0)) cum += c[j++].w;
            n = j;
        }
        if (p->min_p > 0.0f) {
            int32_t kept = 0;
            for (int32_t j = 0; j < n; j++)
                if (c[j].w >= p->min_p) c[kept++] = c[j];
            n = kept; /* the maximum (w = 1) always stays */
        }
        tok = draw_cand(c, n, u);
    } else if (use_top_p) {
        int32_t n = V >= PF_MIN_VOCAB ? prefilter_top_p(sc, k, a, sc->weight, V, zt, p->top_p) : -1;
        if (n < 0) n = select_top_p_dense(sc, a, sc->weight, V, m, zt, p->top_p);
        struct cand *c = sc->cand;
        if (p->min_p > 0.0f) {
            int32_t kept = 0;
            for (int32_t j = 0; j < n; j++)
                if (c[j].w >= p->min_p) c[kept++] = c[j];
            n = kept; /* the maximum (w = 1) always stays */
        }
        tok = draw_cand(c, n, u);
    } else if (n_min_p >= 0) {
        struct cand *c = sc->cand;
        int32_t n = 0;
        for (int32_t j = 0; j < n_min_p; j++) {
            int32_t i = sc->idx[j];
            float w = expf((a[i] - m) * scale);
            if (w >= p->min_p) c[n++] = (struct cand){a[i], w, i};
        }
        tok = draw_cand(c, n, u); /* the maximum (w = 1) is always there */
    } else {
        tok = draw_dense(k, sc->weight, V, zt, u);
    }

    double log_z = (double)m + log(z1); /* NaN when skipped */
    out->token = tok;
    out->logprob = (float)((double)a[tok] - log_z);
    out->n_top = 0;
    if (p->n_top_logprobs > 0) {
        int32_t n = p->n_top_logprobs < V ? p->n_top_logprobs : V;
        out->n_top = select_small(k, a, V, n, out->top);
        for (int32_t j = 0; j < out->n_top; j++)
            out->top[j].logprob = (float)((double)out->top[j].logprob - log_z);
    }
    return KRS_OK;
}

/* ---- inputs for device sampling ---- */

double sampler_next_uniform(struct sampler *s)
{
    return (double)(rng_next(s->rng) >> 11) * 0x1.0p-53;
}

int sampler_edits(const struct sampler *s, struct sampler_scratch *sc, const int32_t *prompt,
                  int32_t n_prompt, const int32_t *gen, int32_t n_gen, struct sampler_edit *out,
                  int32_t cap, int32_t *n_out)
{
    *n_out = 0;
    if (!s || !sc || s->n_vocab > sc->n_vocab || n_prompt < 0 || n_gen < 0 || cap < 0)
        return KRS_ERR_INVALID;
    const struct sampler_params *p = &s->params;
    const int32_t V = s->n_vocab;
    int64_t n_hist = (int64_t)n_prompt + n_gen, win_start = n_hist;
    if (p->repetition_penalty != 1.0f && p->penalty_last_n != 0)
        win_start =
            p->penalty_last_n < 0 || p->penalty_last_n > n_hist ? 0 : n_hist - p->penalty_last_n;
    for (int64_t i = win_start; i < n_hist; i++) {
        int32_t t = hist_token(prompt, n_prompt, gen, i);
        if (t < 0 || t >= V) return KRS_ERR_INVALID;
    }
    for (int32_t i = 0; i < n_gen; i++)
        if (gen[i] < 0 || gen[i] >= V) return KRS_ERR_INVALID;
    /* count[t] = 1 + index of t's entry in out (0: none yet); zeroed again before returning.
     * post_add holds the generated count until the last loop turns it into the penalty. */
    uint32_t *slot = sc->count;
    int32_t n = 0, rc = KRS_OK;
#define EDIT_OF(t)                                                                                 \
    (slot[t]   ? &out[slot[t] - 1]                                                                 \
     : n < cap ? (out[n] = (struct sampler_edit){(t), 0.0f, 1.0f, 0.0f}, slot[t] = (uint32_t)++n,  \
                  &out[n - 1])                                                                     \
               : NULL)
    for (int32_t i = 0; i < p->n_logit_bias && !rc; i++) {
        struct sampler_edit *e = EDIT_OF(p->logit_bias[i].token);
        if (!e)
            rc = KRS_ERR_FULL;
        else
            e->pre_add += p->logit_bias[i].bias;
    }
    for (int64_t i = win_start; i < n_hist && !rc; i++) {
        struct sampler_edit *e = EDIT_OF(hist_token(prompt, n_prompt, gen, i));
        if (!e)
            rc = KRS_ERR_FULL;
        else
            e->rep = p->repetition_penalty;
    }
    int pf = p->presence_penalty != 0.0f || p->frequency_penalty != 0.0f;
    for (int32_t i = 0; pf && i < n_gen && !rc; i++) {
        struct sampler_edit *e = EDIT_OF(gen[i]);
        if (!e)
            rc = KRS_ERR_FULL;
        else
            e->post_add += 1.0f;
    }
#undef EDIT_OF
    for (int32_t i = 0; i < n; i++) {
        slot[out[i].token] = 0;
        float c = out[i].post_add;
        out[i].post_add = c > 0.0f ? -(p->presence_penalty + p->frequency_penalty * c) : 0.0f;
    }
    if (rc) return rc;
    *n_out = n;
    return KRS_OK;
}
