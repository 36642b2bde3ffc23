/* sampler/: every stage against an independent oracle computed here in double precision (sorted
 * softmax, explicit nucleus / top-k / min-p sets), distribution checks by chi-square over many
 * seeded draws (deterministic, so not flaky), reproducibility, the 262144-vocab paths, the
 * kernels against libm, and the stop matcher against a strstr oracle. */
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
#include "sampler/sampler.h"
#include "sampler/sampler_impl.h"

/* ---- helpers ---- */

static uint64_t lcg = 88172645463325252ull;
static double urand(void)
{
    lcg = lcg * 6364136223846793005ull + 1442695040888963407ull;
    return ((lcg >> 11) + 0.5) * 0x1.0p-53;
}
static float nrand(void)
{
    return (float)(sqrt(-2.0 * log(urand())) * cos(6.283185307179586 * urand()));
}

static struct sampler_scratch *scratch_for(int32_t n)
{
    struct sampler_scratch *sc = NULL;
    assert_int_equal(sampler_scratch_create(n, &sc), KRS_OK);
    return sc;
}

static void init_or_fail(struct sampler *s, const struct sampler_params *p, int32_t n)
{
    assert_int_equal(sampler_init(s, p, n), KRS_OK);
}

/* Oracle: indices sorted by value desc, id asc. */
static const float *sort_vals;
static int idx_cmp(const void *pa, const void *pb)
{
    int32_t a = *(const int32_t *)pa, b = *(const int32_t *)pb;
    if (sort_vals[a] > sort_vals[b]) return -1;
    if (sort_vals[a] < sort_vals[b]) return 1;
    return (a > b) - (a < b);
}
static int32_t *sorted_idx(const float *v, int32_t n)
{
    int32_t *idx = malloc((size_t)n * sizeof *idx);
    for (int32_t i = 0; i < n; i++) idx[i] = i;
    sort_vals = v;
    qsort(idx, (size_t)n, sizeof *idx, idx_cmp);
    return idx;
}

/* Oracle: allowed set and renormalised probabilities after temperature, top-k, top-p, min-p
 * (the order documented in sampler.h), in double. prob[] gets 0 outside the set. Returns the
 * set size; *margin is how far the top-p cut is from flipping (relative mass). */
static int32_t oracle_probs(const float *l, int32_t n, float temp, int32_t top_k, float top_p,
                            float min_p, double *prob, double *margin)
{
    int32_t *idx = sorted_idx(l, n);
    double m = l[idx[0]];
    int32_t keep = top_k > 0 && top_k < n ? top_k : n;
    double z = 0.0;
    for (int32_t j = 0; j < keep; j++) z += exp((l[idx[j]] - m) / temp);
    *margin = 1.0;
    if (top_p < 1.0f) {
        double cum = 0.0;
        int32_t j = 0;
        while (j < keep && (j == 0 || cum < top_p * z)) cum += exp((l[idx[j++]] - m) / temp);
        double before = cum - exp((l[idx[j - 1]] - m) / temp);
        *margin = fmin(fabs(cum / z - top_p), fabs(before / z - top_p));
        keep = j;
    }
    while (keep > 1 && exp((l[idx[keep - 1]] - m) / temp) < min_p) keep--;
    memset(prob, 0, (size_t)n * sizeof *prob);
    z = 0.0;
    for (int32_t j = 0; j < keep; j++) z += exp((l[idx[j]] - m) / temp);
    for (int32_t j = 0; j < keep; j++) prob[idx[j]] = exp((l[idx[j]] - m) / temp) / z;
    free(idx);
    return keep;
}

/* Draws `draws` tokens and returns the chi-square statistic against prob[] (categories with
 * expected count < 5 are pooled); fails on any token outside the support. *dof set. */
static double chi_square_draws(struct sampler *s, struct sampler_scratch *sc, const float *l,
                               int32_t n, const double *prob, int draws, int *dof)
{
    int *cnt = calloc((size_t)n, sizeof *cnt);
    struct sampler_result r;
    for (int d = 0; d < draws; d++) {
        assert_int_equal(sampler_sample(s, sc, l, n, NULL, 0, NULL, 0, &r), KRS_OK);
        assert_true(r.token >= 0 && r.token < n);
        if (prob[r.token] == 0.0) fail_msg("token %d outside the allowed set", r.token);
        cnt[r.token]++;
    }
    double chi = 0.0, pool_e = 0.0, pool_o = 0.0;
    int cats = 0;
    for (int32_t i = 0; i < n; i++) {
        double e = prob[i] * draws;
        if (e == 0.0) continue;
        if (e < 5.0) {
            pool_e += e;
            pool_o += cnt[i];
            continue;
        }
        chi += (cnt[i] - e) * (cnt[i] - e) / e;
        cats++;
    }
    if (pool_e > 0.0) {
        chi += (pool_o - pool_e) * (pool_o - pool_e) / (pool_e > 1.0 ? pool_e : 1.0);
        cats++;
    }
    *dof = cats > 1 ? cats - 1 : 1;
    free(cnt);
    return chi;
}

/* Generous bound: mean dof, sd sqrt(2 dof); 6 sd plus slack (the draws are seeded). */
static void assert_chi_ok(double chi, int dof)
{
    double bound = dof + 6.0 * sqrt(2.0 * dof) + 10.0;
    if (chi > bound) fail_msg("chi-square %.1f > %.1f (dof %d)", chi, bound, dof);
}

/* ---- tests ---- */

static void test_greedy_argmax(void **state)
{
    enum { N = 5000 };
    float *l = malloc(N * sizeof *l);
    struct sampler_scratch *sc = scratch_for(N);
    struct sampler_params p;
    sampler_params_default(&p);
    p.temperature = 0.0f;
    struct sampler s;
    init_or_fail(&s, &p, N);
    for (int rep = 0; rep < 20; rep++) {
        for (int i = 0; i < N; i++) l[i] = nrand() * 4.0f;
        int32_t best = 0;
        for (int i = 1; i < N; i++)
            if (l[i] > l[best]) best = i;
        struct sampler_result r;
        assert_int_equal(sampler_sample(&s, sc, l, N, NULL, 0, NULL, 0, &r), KRS_OK);
        assert_int_equal(r.token, best);
    }
    /* ties go to the lowest id */
    for (int i = 0; i < N; i++) l[i] = 0.0f;
    l[77] = l[1234] = l[4000] = 3.0f;
    struct sampler_result r;
    assert_int_equal(sampler_sample(&s, sc, l, N, NULL, 0, NULL, 0, &r), KRS_OK);
    assert_int_equal(r.token, 77);
    sampler_scratch_free(sc);
    free(l);
}

static void test_temperature_distribution(void **state)
{
    /* small vocab and a 5000-token vocab (several walk blocks) */
    for (int pass = 0; pass < 2; pass++) {
        int32_t n = pass == 0 ? 8 : 5000;
        float *l = malloc((size_t)n * sizeof *l);
        double *prob = malloc((size_t)n * sizeof *prob);
        for (int32_t i = 0; i < n; i++) l[i] = nrand() * (pass == 0 ? 1.0f : 2.5f);
        float temps[] = {0.7f, 1.0f, 1.6f};
        for (int t = 0; t < 3; t++) {
            struct sampler_scratch *sc = scratch_for(n);
            struct sampler_params p;
            sampler_params_default(&p);
            p.temperature = temps[t];
            p.seed = 1000 + t;
            struct sampler s;
            init_or_fail(&s, &p, n);
            double margin;
            oracle_probs(l, n, temps[t], 0, 1.0f, 0.0f, prob, &margin);
            int dof;
            double chi = chi_square_draws(&s, sc, l, n, prob, 20000, &dof);
            assert_chi_ok(chi, dof);
            sampler_scratch_free(sc);
        }
        free(l);
        free(prob);
    }
}

static void test_temperature_chi_detects_wrong_temperature(void **state)
{
    /* the check above has teeth: sampling at T=1 does not pass for softmax(l / 0.5) */
    enum { N = 8 };
    float l[N];
    double prob[N], margin;
    for (int i = 0; i < N; i++) l[i] = (float)i * 0.3f;
    struct sampler_scratch *sc = scratch_for(N);
    struct sampler_params p;
    sampler_params_default(&p);
    struct sampler s;
    init_or_fail(&s, &p, N);
    oracle_probs(l, N, 0.5f, 0, 1.0f, 0.0f, prob, &margin);
    int dof;
    double chi = chi_square_draws(&s, sc, l, N, prob, 20000, &dof);
    assert_true(chi > dof + 6.0 * sqrt(2.0 * dof) + 10.0);
    sampler_scratch_free(sc);
}

/* Runs a truncation configuration against the oracle: support exact, distribution by
 * chi-square. */
static void check_truncation(int32_t n, float scale, float temp, int32_t top_k, float top_p,
                             float min_p, int draws)
{
    float *l = malloc((size_t)n * sizeof *l);
    double *prob = malloc((size_t)n * sizeof *prob), margin;
    for (int tries = 0;; tries++) {
        for (int32_t i = 0; i < n; i++) l[i] = nrand() * scale;
        oracle_probs(l, n, temp, top_k, top_p, min_p, prob, &margin);
        if (margin > 1e-4 || tries > 20) break; /* keep clear of a float tie at the cut */
    }
    int32_t support = 0;
    for (int32_t i = 0; i < n; i++) support += prob[i] > 0.0;
    struct sampler_scratch *sc = scratch_for(n);
    struct sampler_params p;
    sampler_params_default(&p);
    p.temperature = temp;
    p.top_k = top_k;
    p.top_p = top_p;
    p.min_p = min_p;
    p.seed = (uint64_t)n * 31 + (uint64_t)top_k;
    struct sampler s;
    init_or_fail(&s, &p, n);
    int dof;
    double chi = chi_square_draws(&s, sc, l, n, prob, draws, &dof);
    assert_chi_ok(chi, dof);
    assert_true(support >= 1);
    sampler_scratch_free(sc);
    free(l);
    free(prob);
}

static void test_top_k(void **state)
{
    check_truncation(1000, 1.0f, 2.0f, 5, 1.0f, 0.0f, 10000);
    check_truncation(1000, 3.0f, 1.0f, 1, 1.0f, 0.0f, 200); /* top_k 1 = greedy */
    check_truncation(20000, 2.0f, 1.0f, 40, 1.0f, 0.0f, 10000);
    check_truncation(20000, 0.5f, 1.0f, 1000, 1.0f, 0.0f, 10000); /* wide: crowded buckets */
    check_truncation(65536, 2.0f, 1.0f, 40, 1.0f, 0.0f, 5000);    /* prefilter path */
    check_truncation(65536, 1.0f, 1.0f, 900, 1.0f, 0.0f, 5000);
}

static void test_top_p(void **state)
{
    check_truncation(1000, 2.0f, 1.0f, 0, 0.5f, 0.0f, 10000);
    check_truncation(1000, 2.0f, 0.8f, 0, 0.9f, 0.0f, 10000);
    check_truncation(20000, 3.0f, 1.0f, 0, 0.3f, 0.0f, 10000);
    check_truncation(20000, 1.0f, 1.0f, 0, 0.02f, 0.0f, 10000); /* flat: big crossing bucket */
    check_truncation(1000, 2.0f, 1.0f, 50, 0.6f, 0.0f, 10000);  /* top-k then top-p */
    check_truncation(65536, 3.0f, 1.0f, 0, 0.5f, 0.0f, 5000);   /* prefilter path */
    check_truncation(65536, 2.0f, 0.8f, 50, 0.9f, 0.0f, 5000);
    check_truncation(1000, 2.0f, 1.0f, 0, 1e-6f, 0.0f, 100); /* tiny p: the argmax only */
}

static void test_min_p(void **state)
{
    check_truncation(1000, 2.0f, 1.0f, 0, 1.0f, 0.05f, 10000);
    check_truncation(1000, 2.0f, 1.5f, 0, 1.0f, 0.2f, 10000);
    check_truncation(1000, 2.0f, 1.0f, 100, 0.9f, 0.1f, 10000); /* all three */
    check_truncation(1000, 2.0f, 1.0f, 0, 0.8f, 0.1f, 10000);   /* dense top-p then min-p */
    check_truncation(65536, 3.0f, 1.0f, 0, 0.7f, 0.02f, 5000);
    check_truncation(20000, 0.3f, 1.0f, 0, 1.0f, 0.3f, 10000); /* > 4096 above min-p: dense */
}

/* Adjusted logprobs of all tokens of a small vocab through n_top_logprobs = n. */
static void all_logprobs(struct sampler *s, struct sampler_scratch *sc, const float *l, int32_t n,
                         const int32_t *prompt, int32_t np, const int32_t *gen, int32_t ng,
                         double *lp)
{
    struct sampler_result r;
    assert_int_equal(sampler_sample(s, sc, l, n, prompt, np, gen, ng, &r), KRS_OK);
    assert_int_equal(r.n_top, n);
    for (int32_t j = 0; j < n; j++) lp[r.top[j].token] = r.top[j].logprob;
}

static void oracle_logsoftmax(const double *a, int32_t n, double *lp)
{
    double m = a[0], z = 0.0;
    for (int32_t i = 1; i < n; i++) m = fmax(m, a[i]);
    for (int32_t i = 0; i < n; i++) z += exp(a[i] - m);
    for (int32_t i = 0; i < n; i++) lp[i] = a[i] - m - log(z);
}

static void test_penalties(void **state)
{
    enum { N = 10 };
    const float l[N] = {2.0f, -1.0f, 0.5f, 3.0f, -2.0f, 0.0f, 1.0f, -0.5f, 1.5f, 2.5f};
    /* prompt 0 1 2 3, generated 3 4 4 5 */
    const int32_t prompt[] = {0, 1, 2, 3}, gen[] = {3, 4, 4, 5};
    struct sampler_scratch *sc = scratch_for(N);
    struct sampler_params p;
    sampler_params_default(&p);
    p.temperature = 0.0f;
    p.n_top_logprobs = N;
    p.repetition_penalty = 2.0f;
    p.penalty_last_n = 6; /* window: 2 3 3 4 4 5 */
    p.presence_penalty = 0.5f;
    p.frequency_penalty = 0.25f;
    struct sampler s;
    init_or_fail(&s, &p, N);
    double lp[N], a[N], want[N];
    all_logprobs(&s, sc, l, N, prompt, 4, gen, 4, lp);
    for (int i = 0; i < N; i++) a[i] = l[i];
    a[2] /= 2.0; /* 0.5 -> 0.25 */
    a[3] /= 2.0; /* 3 -> 1.5, then presence+freq*1 */
    a[4] *= 2.0; /* -2 -> -4 */
    a[5] *= 2.0; /* 0 stays 0 */
    a[3] -= 0.5 + 0.25 * 1;
    a[4] -= 0.5 + 0.25 * 2;
    a[5] -= 0.5 + 0.25 * 1;
    oracle_logsoftmax(a, N, want);
    for (int i = 0; i < N; i++) assert_float_equal(lp[i], want[i], 1e-5);

    /* whole-history window, no presence/frequency: tokens 0 and 1 (prompt only) are penalised */
    p.penalty_last_n = -1;
    p.presence_penalty = p.frequency_penalty = 0.0f;
    init_or_fail(&s, &p, N);
    all_logprobs(&s, sc, l, N, prompt, 4, gen, 4, lp);
    for (int i = 0; i < N; i++) a[i] = l[i];
    for (int t = 0; t <= 5; t++) a[t] = a[t] > 0 ? a[t] / 2.0 : a[t] * 2.0;
    oracle_logsoftmax(a, N, want);
    for (int i = 0; i < N; i++) assert_float_equal(lp[i], want[i], 1e-5);

    /* penalty_last_n 0 and repetition 1: no change; presence applies to generated only */
    p.penalty_last_n = 0;
    p.presence_penalty = 1.0f;
    init_or_fail(&s, &p, N);
    all_logprobs(&s, sc, l, N, prompt, 4, gen, 4, lp);
    for (int i = 0; i < N; i++) a[i] = l[i] - ((i >= 3 && i <= 5) ? 1.0 : 0.0);
    oracle_logsoftmax(a, N, want);
    for (int i = 0; i < N; i++) assert_float_equal(lp[i], want[i], 1e-5);

    /* counters were reset: the same call without history gives the plain distribution */
    all_logprobs(&s, sc, l, N, NULL, 0, NULL, 0, lp);
    for (int i = 0; i < N; i++) a[i] = l[i];
    oracle_logsoftmax(a, N, want);
    for (int i = 0; i < N; i++) assert_float_equal(lp[i], want[i], 1e-5);
    sampler_scratch_free(sc);
}

static void test_logit_bias(void **state)
{
    enum { N = 1000 };
    float l[N];
    for (int i = 0; i < N; i++) l[i] = nrand();
    l[10] = 8.0f; /* would be picked most of the time */
    struct sampler_logit_bias ban[] = {{10, -100.0f}};
    struct sampler_logit_bias force[] = {{500, 100.0f}};
    struct sampler_scratch *sc = scratch_for(N);
    struct sampler_params p;
    sampler_params_default(&p);
    p.logit_bias = ban;
    p.n_logit_bias = 1;
    struct sampler s;
    init_or_fail(&s, &p, N);
    struct sampler_result r;
    for (int d = 0; d < 2000; d++) {
        assert_int_equal(sampler_sample(&s, sc, l, N, NULL, 0, NULL, 0, &r), KRS_OK);
        assert_int_not_equal(r.token, 10);
    }
    p.logit_bias = force;
    p.temperature = 1.5f;
    init_or_fail(&s, &p, N);
    for (int d = 0; d < 2000; d++) {
        assert_int_equal(sampler_sample(&s, sc, l, N, NULL, 0, NULL, 0, &r), KRS_OK);
        assert_int_equal(r.token, 500);
        assert_true(r.logprob > -1e-6f && r.logprob <= 0.0f);
    }
    /* out-of-range bias token is rejected at init */
    struct sampler_logit_bias bad[] = {{N, 1.0f}};
    p.logit_bias = bad;
    assert_int_equal(sampler_init(&s, &p, N), KRS_ERR_INVALID);
    sampler_scratch_free(sc);
}

static void run_sequence(uint64_t seed, const float *l, int32_t n, int32_t *toks, int count,
                         struct sampler_scratch *sc, struct sampler *other)
{
    struct sampler_params p;
    sampler_params_default(&p);
    p.temperature = 1.2f;
    p.top_p = 0.95f;
    p.seed = seed;
    struct sampler s;
    init_or_fail(&s, &p, n);
    struct sampler_result r;
    for (int i = 0; i < count; i++) {
        /* an interleaved sequence on the same scratch (a "batch") must not change anything */
        if (other) assert_int_equal(sampler_sample(other, sc, l, n, NULL, 0, toks, i, &r), KRS_OK);
        assert_int_equal(sampler_sample(&s, sc, l + (size_t)(i % 4) * n, n, NULL, 0, toks, i, &r),
                         KRS_OK);
        toks[i] = r.token;
    }
}

static void test_seed_reproducible(void **state)
{
    enum { N = 3000, C = 200 };
    float *l = malloc(4 * N * sizeof *l);
    for (int i = 0; i < 4 * N; i++) l[i] = nrand() * 1.5f;
    struct sampler_scratch *sc = scratch_for(N);
    int32_t a[C], b[C], c[C];
    run_sequence(7, l, N, a, C, sc, NULL);
    struct sampler other;
    struct sampler_params po;
    sampler_params_default(&po);
    po.top_k = 10;
    po.seed = 99;
    init_or_fail(&other, &po, N);
    run_sequence(7, l, N, b, C, sc, &other);
    assert_memory_equal(a, b, sizeof a);
    run_sequence(8, l, N, c, C, sc, NULL);
    int diff = 0;
    for (int i = 0; i < C; i++) diff += a[i] != c[i];
    assert_true(diff > C / 4);
    sampler_scratch_free(sc);
    free(l);
}

static void test_logprobs(void **state)
{
    enum { N = 20 };
    float l[N];
    for (int i = 0; i < N; i++) l[i] = nrand() * 3.0f;
    l[4] = l[9]; /* a tie: lower id first */
    struct sampler_scratch *sc = scratch_for(N);
    struct sampler_params p;
    sampler_params_default(&p);
    p.temperature = 0.5f; /* logprobs are before temperature */
    p.top_k = 3;
    p.n_top_logprobs = N;
    struct sampler s;
    init_or_fail(&s, &p, N);
    struct sampler_result r;
    assert_int_equal(sampler_sample(&s, sc, l, N, NULL, 0, NULL, 0, &r), KRS_OK);
    double a[N], want[N], sum = 0.0;
    for (int i = 0; i < N; i++) a[i] = l[i];
    oracle_logsoftmax(a, N, want);
    int32_t *idx = sorted_idx(l, N);
    assert_int_equal(r.n_top, N);
    for (int j = 0; j < N; j++) {
        assert_int_equal(r.top[j].token, idx[j]);
        assert_float_equal(r.top[j].logprob, want[idx[j]], 1e-5);
        sum += exp(r.top[j].logprob);
    }
    assert_float_equal(sum, 1.0, 1e-5);
    assert_float_equal(r.logprob, want[r.token], 1e-5);
    free(idx);
    sampler_scratch_free(sc);

    /* big vocab: top-5 and the chosen token's logprob against the double oracle */
    enum { B = 262144 };
    float *big = malloc(B * sizeof *big);
    double *bd = malloc(B * sizeof *bd), *bw = malloc(B * sizeof *bw);
    for (int i = 0; i < B; i++) bd[i] = big[i] = nrand() * 3.0f;
    oracle_logsoftmax(bd, B, bw);
    sc = scratch_for(B);
    p.n_top_logprobs = 5;
    p.top_k = 0;
    p.temperature = 1.0f;
    init_or_fail(&s, &p, B);
    assert_int_equal(sampler_sample(&s, sc, big, B, NULL, 0, NULL, 0, &r), KRS_OK);
    idx = sorted_idx(big, B);
    for (int j = 0; j < 5; j++) {
        assert_int_equal(r.top[j].token, idx[j]);
        assert_float_equal(r.top[j].logprob, bw[idx[j]], 1e-4);
    }
    assert_float_equal(r.logprob, bw[r.token], 1e-4);
    free(idx);
    free(big);
    free(bd);
    free(bw);
    sampler_scratch_free(sc);
}

/* All paths on the default model's vocab size: valid token, inside the oracle's support. */
static void test_big_vocab_paths(void **state)
{
    enum { B = 262144 };
    float *l = malloc(B * sizeof *l);
    double *prob = malloc(B * sizeof *prob), margin;
    for (int i = 0; i < B; i++) l[i] = nrand() * 3.0f;
    for (int k = 0; k < 8; k++) l[(k * 7919) % B] = 12.0f + k;
    struct sampler_scratch *sc = scratch_for(B);
    struct {
        float t, p, minp;
        int32_t k;
    } cfg[] = {{0, 1, 0, 0},         {1, 1, 0, 0},     {0.7f, 1, 0, 0},     {0.8f, 1, 0, 40},
               {0.8f, 0.95f, 0, 40}, {1, 0.9f, 0, 0},  {1.5f, 0.99f, 0, 0}, {1, 1, 0.05f, 0},
               {3, 0.9f, 0, 0},      {1, 1, 0, 200000}};
    for (size_t c = 0; c < sizeof cfg / sizeof cfg[0]; c++) {
        struct sampler_params p;
        sampler_params_default(&p);
        p.temperature = cfg[c].t;
        p.top_p = cfg[c].p;
        p.min_p = cfg[c].minp;
        p.top_k = cfg[c].k;
        p.n_top_logprobs = 3;
        struct sampler s;
        init_or_fail(&s, &p, B);
        if (cfg[c].t > 0)
            oracle_probs(l, B, cfg[c].t, cfg[c].k, cfg[c].p, cfg[c].minp, prob, &margin);
        for (int d = 0; d < 5; d++) {
            struct sampler_result r;
            assert_int_equal(sampler_sample(&s, sc, l, B, NULL, 0, NULL, 0, &r), KRS_OK);
            assert_true(r.token >= 0 && r.token < B);
            if (cfg[c].t > 0) assert_true(prob[r.token] > 0.0);
            assert_int_equal(r.n_top, 3);
        }
    }
    free(l);
    free(prob);
    sampler_scratch_free(sc);
}

/* skip_logprob changes nothing but the logprob (NaN); NaN logits are still rejected. */
static void test_skip_logprob(void **state)
{
    enum { B = 262144 };
    float *l = malloc(B * sizeof *l);
    for (int i = 0; i < B; i++) l[i] = nrand() * 3.0f;
    struct sampler_scratch *sc = scratch_for(B);
    struct {
        float t, p;
        int32_t k;
    } cfg[] = {{0, 1, 0}, {0.8f, 1, 40}, {0.7f, 0.9f, 0}, {1, 1, 0}, {1.3f, 1, 0}};
    for (size_t c = 0; c < sizeof cfg / sizeof cfg[0]; c++) {
        struct sampler_params p;
        sampler_params_default(&p);
        p.temperature = cfg[c].t;
        p.top_p = cfg[c].p;
        p.top_k = cfg[c].k;
        p.seed = 5 + c;
        struct sampler s1, s2;
        init_or_fail(&s1, &p, B);
        p.skip_logprob = 1;
        init_or_fail(&s2, &p, B);
        for (int d = 0; d < 10; d++) {
            struct sampler_result r1, r2;
            assert_int_equal(sampler_sample(&s1, sc, l, B, NULL, 0, NULL, 0, &r1), KRS_OK);
            assert_int_equal(sampler_sample(&s2, sc, l, B, NULL, 0, NULL, 0, &r2), KRS_OK);
            assert_int_equal(r1.token, r2.token);
            assert_true(isnan(r2.logprob));
            assert_false(isnan(r1.logprob));
        }
        l[B - 1] = NAN;
        struct sampler_result r;
        assert_int_equal(sampler_sample(&s2, sc, l, B, NULL, 0, NULL, 0, &r), KRS_ERR_INVALID);
        l[B - 1] = 0.0f;
        p.n_top_logprobs = 1;
        assert_int_equal(sampler_init(&s2, &p, B), KRS_ERR_INVALID);
    }
    free(l);
    sampler_scratch_free(sc);
}

static void test_kernels(void **state)
{
    enum { N = 1003 };
    float a[N], w0[N], w1[N];
    for (int i = 0; i < N; i++) a[i] = -120.0f + 120.0f * (float)urand();
    a[5] = -INFINITY;
    a[17] = 0.0f;
    const struct sampler_kern *k[2] = {&sampler_kern_generic, &sampler_kern_avx2};
    int nk = __builtin_cpu_supports("avx2") ? 2 : 1;
    for (int j = 0; j < nk; j++) {
        assert_true(k[j]->max(a, N) == 0.0f);
        float cp[N];
        assert_true(k[j]->copy_max(cp, a, N) == 0.0f);
        assert_memory_equal(cp, a, sizeof cp);
        int32_t idx[N], want = 0;
        for (int i = 0; i < N; i++) want += a[i] >= -3.0f;
        assert_int_equal(k[j]->gather_ge(a, N, -3.0f, idx, N), want);
        for (int q = 0; q < want; q++)
            assert_true(a[idx[q]] >= -3.0f && (q == 0 || idx[q] > idx[q - 1]));
        if (want > 1) assert_int_equal(k[j]->gather_ge(a, N, -3.0f, idx, want - 1), want);
        cp[N - 1] = NAN;
        assert_true(isnan(k[j]->copy_max(cp + 0, cp, N)));
        float *w = j ? w1 : w0;
        double s = k[j]->exp_sum(a, N, 0.0f, 1.0f, 0.0f, w), ref = 0.0;
        for (int i = 0; i < N; i++) {
            double e = a[i] < -87.0f ? 0.0 : exp((double)a[i]);
            ref += e;
            assert_true(fabs(w[i] - e) <= 3e-7 * e + 1e-38);
        }
        assert_true(fabs(s - ref) <= 1e-6 * ref);
        assert_true(fabs(k[j]->sum(w, N) - s) <= 1e-6 * s);
        double sm = k[j]->exp_sum(a, N, 0.0f, 0.5f, 1e-3f, NULL), refm = 0.0;
        for (int i = 0; i < N; i++) {
            double e = exp(0.5 * a[i]);
            refm += e >= 1e-3 ? e : 0.0;
        }
        assert_true(fabs(sm - refm) <= 1e-5 * refm);
    }
}

static void test_invalid(void **state)
{
    enum { N = 100 };
    float l[N];
    for (int i = 0; i < N; i++) l[i] = (float)i * 0.01f;
    struct sampler_scratch *sc = scratch_for(N);
    struct sampler_params p;
    sampler_params_default(&p);
    struct sampler s;
    struct sampler_result r;
    p.top_p = 0.0f;
    assert_int_equal(sampler_init(&s, &p, N), KRS_ERR_INVALID);
    p.top_p = 1.0f;
    p.n_top_logprobs = 21;
    assert_int_equal(sampler_init(&s, &p, N), KRS_ERR_INVALID);
    p.n_top_logprobs = 0;
    p.temperature = NAN;
    assert_int_equal(sampler_init(&s, &p, N), KRS_ERR_INVALID);
    p.temperature = 1.0f;
    init_or_fail(&s, &p, N);
    uint64_t rng[4];
    memcpy(rng, s.rng, sizeof rng);
    int32_t bad_tok[] = {N};
    assert_int_equal(sampler_sample(&s, sc, l, N, NULL, 0, bad_tok, 1, &r), KRS_ERR_INVALID);
    l[3] = NAN;
    assert_int_equal(sampler_sample(&s, sc, l, N, NULL, 0, NULL, 0, &r), KRS_ERR_INVALID);
    assert_memory_equal(rng, s.rng, sizeof rng); /* failures do not consume a draw */
    for (int i = 0; i < N; i++) l[i] = -INFINITY;
    assert_int_equal(sampler_sample(&s, sc, l, N, NULL, 0, NULL, 0, &r), KRS_ERR_INVALID);
    l[42] = 1.0f; /* -inf elsewhere is fine */
    assert_int_equal(sampler_sample(&s, sc, l, N, NULL, 0, NULL, 0, &r), KRS_OK);
    assert_int_equal(r.token, 42);
    assert_int_equal(sampler_sample(&s, sc, l, N + 1, NULL, 0, NULL, 0, &r), KRS_ERR_INVALID);
    sampler_scratch_free(sc);
}

/* ---- stop matcher ---- */

/* Pushes `text` cut at the given positions; returns emitted bytes (NUL-terminated in out) and
 * whether it stopped. */
static int push_pieces(struct stop_matcher *m, const char *text, const size_t *cuts, int n_cuts,
                       char *out)
{
    size_t len = strlen(text), pos = 0, o = 0;
    int stopped = 0;
    char emit[4096];
    for (int c = 0; c <= n_cuts && !stopped; c++) {
        size_t end = c < n_cuts ? cuts[c] : len;
        size_t el;
        assert_int_equal(
            stop_matcher_push(m, text + pos, end - pos, emit, sizeof emit, &el, &stopped), KRS_OK);
        memcpy(out + o, emit, el);
        o += el;
        pos = end;
    }
    if (!stopped) {
        size_t el;
        assert_int_equal(stop_matcher_flush(m, emit, sizeof emit, &el), KRS_OK);
        memcpy(out + o, emit, el);
        o += el;
    }
    out[o] = 0;
    return stopped;
}

static void test_stop_basic(void **state)
{
    struct stop_matcher m;
    char out[256];
    const char *s1[] = {"STOP"};
    /* split across 1..n pieces: every cut combination of "abcSTOPxyz" up to 3 cuts */
    const char *text = "abcSTOPxyz";
    size_t len = strlen(text);
    for (size_t c1 = 0; c1 <= len; c1++)
        for (size_t c2 = c1; c2 <= len; c2++)
            for (size_t c3 = c2; c3 <= len; c3++) {
                size_t cuts[3] = {c1, c2, c3};
                assert_int_equal(stop_matcher_init(&m, s1, 1), KRS_OK);
                assert_int_equal(push_pieces(&m, text, cuts, 3, out), 1);
                assert_string_equal(out, "abc");
            }
    /* one byte per piece */
    size_t cuts[16];
    for (size_t i = 0; i < len; i++) cuts[i] = i + 1;
    assert_int_equal(stop_matcher_init(&m, s1, 1), KRS_OK);
    assert_int_equal(push_pieces(&m, text, cuts, (int)len, out), 1);
    assert_string_equal(out, "abc");

    /* overlapping prefix: "ab" in "aab" fed byte by byte */
    const char *s2[] = {"ab"};
    assert_int_equal(stop_matcher_init(&m, s2, 1), KRS_OK);
    assert_int_equal(push_pieces(&m, "aab", cuts, 2, out), 1);
    assert_string_equal(out, "a");
    /* "aab" in "aaab" */
    const char *s3[] = {"aab"};
    assert_int_equal(stop_matcher_init(&m, s3, 1), KRS_OK);
    assert_int_equal(push_pieces(&m, "xaaaby", cuts, 5, out), 1);
    assert_string_equal(out, "xa");

    /* multiple strings: the one ending first wins, longest on ties */
    const char *s4[] = {"abcd", "bc", "zz"};
    assert_int_equal(stop_matcher_init(&m, s4, 3), KRS_OK);
    assert_int_equal(push_pieces(&m, "xabcd", NULL, 0, out), 1);
    assert_string_equal(out, "xa");
    const char *s5[] = {"c", "abc"};
    assert_int_equal(stop_matcher_init(&m, s5, 2), KRS_OK);
    assert_int_equal(push_pieces(&m, "xabc", NULL, 0, out), 1);
    assert_string_equal(out, "x");

    /* no stop: everything after flush, and a held-back prefix comes out at flush */
    assert_int_equal(stop_matcher_init(&m, s1, 1), KRS_OK);
    assert_int_equal(push_pieces(&m, "hello STO", cuts, 4, out), 0);
    assert_string_equal(out, "hello STO");
    /* zero stop strings: pass-through, nothing held */
    assert_int_equal(stop_matcher_init(&m, NULL, 0), KRS_OK);
    char emit[64];
    size_t el;
    int st;
    assert_int_equal(stop_matcher_push(&m, "abc", 3, emit, sizeof emit, &el, &st), KRS_OK);
    assert_int_equal(el, 3);
    /* after a stop nothing more comes out */
    assert_int_equal(stop_matcher_init(&m, s2, 1), KRS_OK);
    assert_int_equal(stop_matcher_push(&m, "xab", 3, emit, sizeof emit, &el, &st), KRS_OK);
    assert_int_equal(st, 1);
    assert_int_equal(stop_matcher_push(&m, "more", 4, emit, sizeof emit, &el, &st), KRS_OK);
    assert_int_equal(el, 0);
    assert_int_equal(st, 1);
    /* limits */
    const char *bad_empty[] = {""};
    assert_int_equal(stop_matcher_init(&m, bad_empty, 1), KRS_ERR_INVALID);
    char longs[STOP_MAX_LEN + 2];
    memset(longs, 'x', sizeof longs - 1);
    longs[sizeof longs - 1] = 0;
    const char *bad_long[] = {longs};
    assert_int_equal(stop_matcher_init(&m, bad_long, 1), KRS_ERR_INVALID);
    const char *bad_utf8[] = {"\x80x"};
    assert_int_equal(stop_matcher_init(&m, bad_utf8, 1), KRS_ERR_INVALID);
    const char *nine[9] = {"a", "b", "c", "d", "e", "f", "g", "h", "i"};
    assert_int_equal(stop_matcher_init(&m, nine, 9), KRS_ERR_INVALID);
    assert_int_equal(stop_matcher_init(&m, s1, 1), KRS_OK);
    assert_int_equal(stop_matcher_push(&m, "abcdef", 6, emit, 2, &el, &st), KRS_ERR_FULL);
}

static int utf8_ok(const unsigned char *s, size_t n)
{
    for (size_t i = 0; i < n;) {
        size_t len = s[i] < 0x80 ? 1 : (s[i] & 0xE0) == 0xC0 ? 2 : (s[i] & 0xF0) == 0xE0 ? 3 : 4;
        if ((s[i] & 0xC0) == 0x80 || i + len > n) return 0;
        for (size_t k = 1; k < len; k++)
            if ((s[i + k] & 0xC0) != 0x80) return 0;
        i += len;
    }
    return 1;
}

/* Randomised against the oracle: per stop string its first occurrence (strstr); the match is
 * the one with the smallest end, then the smallest start. Includes multi-byte characters; every
 * emitted chunk must be valid UTF-8. */
static void test_stop_random(void **state)
{
    const char *alpha[] = {"a", "b", "c", "\xc3\xa9", "\xe2\x82\xac"}; /* a b c é € */
    for (int iter = 0; iter < 3000; iter++) {
        char text[256] = {0}, strs[4][64];
        size_t bounds[128];
        int nb = 0;
        int tl = 1 + (int)(urand() * 40);
        for (int i = 0; i < tl; i++) {
            strcat(text, alpha[(int)(urand() * (urand() < 0.8 ? 3 : 5))]);
            bounds[nb++] = strlen(text);
        }
        int ns = 1 + (int)(urand() * 4);
        const char *ptrs[4];
        for (int s = 0; s < ns; s++) {
            strs[s][0] = 0;
            int sl = 1 + (int)(urand() * 4);
            for (int i = 0; i < sl; i++)
                strcat(strs[s], alpha[(int)(urand() * (urand() < 0.8 ? 3 : 5))]);
            ptrs[s] = strs[s];
        }
        /* oracle */
        size_t best_end = SIZE_MAX, best_start = SIZE_MAX;
        for (int s = 0; s < ns; s++) {
            const char *f = strstr(text, strs[s]);
            if (!f) continue;
            size_t st = (size_t)(f - text), en = st + strlen(strs[s]);
            if (en < best_end || (en == best_end && st < best_start))
                best_end = en, best_start = st;
        }
        /* random cuts at character boundaries, as the detokenizer delivers them */
        size_t cuts[128];
        int nc = 0;
        for (int b = 0; b < nb - 1; b++)
            if (urand() < 0.4) cuts[nc++] = bounds[b];
        struct stop_matcher m;
        assert_int_equal(stop_matcher_init(&m, ptrs, ns), KRS_OK);
        char out[512], emit[512];
        size_t o = 0, pos = 0, el;
        int stopped = 0;
        for (int c = 0; c <= nc && !stopped; c++) {
            size_t end = c < nc ? cuts[c] : strlen(text);
            assert_int_equal(
                stop_matcher_push(&m, text + pos, end - pos, emit, sizeof emit, &el, &stopped),
                KRS_OK);
            assert_true(utf8_ok((unsigned char *)emit, el));
            memcpy(out + o, emit, el);
            o += el;
            pos = end;
        }
        if (!stopped) {
            assert_int_equal(stop_matcher_flush(&m, emit, sizeof emit, &el), KRS_OK);
            assert_true(utf8_ok((unsigned char *)emit, el));
            memcpy(out + o, emit, el);
            o += el;
        }
        if (best_start == SIZE_MAX) {
            assert_int_equal(stopped, 0);
            assert_int_equal(o, strlen(text));
            assert_memory_equal(out, text, o);
        } else {
            assert_int_equal(stopped, 1);
            assert_int_equal(o, best_start);
            assert_memory_equal(out, text, o);
        }
    }
}

/* sampler_edits folds bias and penalties into per-token edits that reproduce sampler_sample's
 * adjusted logits: the greedy token and its logprob agree, for many random histories. */
static void test_device_edits_match(void **state)
{
    enum { V = 1000, N_PROMPT = 50, N_GEN = 40 };
    static float logits[V], adj[V];
    int32_t toks[N_PROMPT + N_GEN];
    struct sampler_logit_bias bias[3] = {{7, 2.5f}, {7, -1.0f}, {999, 100.0f}};
    struct sampler_edit edits[256];
    struct sampler_scratch *sc;
    assert_int_equal(sampler_scratch_create(V, &sc), KRS_OK);
    uint64_t rs = 12345;
    for (int iter = 0; iter < 200; iter++) {
        for (int i = 0; i < V; i++) {
            rs = rs * 6364136223846793005ull + 1442695040888963407ull;
            logits[i] = (float)((int)(rs >> 40) % 2000 - 1000) / 100.0f;
        }
        for (int i = 0; i < N_PROMPT + N_GEN; i++) {
            rs = rs * 6364136223846793005ull + 1442695040888963407ull;
            toks[i] = (int32_t)((rs >> 33) % 60); /* repeats, so counts > 1 */
        }
        struct sampler_params p;
        sampler_params_default(&p);
        p.temperature = 0.0f;
        p.repetition_penalty = iter % 3 ? 1.3f : 1.0f;
        p.penalty_last_n = iter % 4 == 0 ? -1 : 16;
        p.presence_penalty = iter % 2 ? 0.7f : 0.0f;
        p.frequency_penalty = iter % 5 ? 0.3f : 0.0f;
        p.logit_bias = iter % 2 ? bias : NULL;
        p.n_logit_bias = iter % 2 ? 3 : 0;
        struct sampler smp;
        assert_int_equal(sampler_init(&smp, &p, V), KRS_OK);
        int32_t n;
        assert_int_equal(
            sampler_edits(&smp, sc, toks, N_PROMPT, toks + N_PROMPT, N_GEN, edits, 256, &n),
            KRS_OK);
        memcpy(adj, logits, sizeof adj);
        for (int32_t i = 0; i < n; i++) {
            float x = adj[edits[i].token] + edits[i].pre_add, r = edits[i].rep;
            adj[edits[i].token] = (x > 0.0f ? x / r : x * r) + edits[i].post_add;
        }
        int best = 0;
        double z = 0.0;
        for (int i = 1; i < V; i++)
            if (adj[i] > adj[best]) best = i;
        for (int i = 0; i < V; i++) z += exp((double)adj[i] - adj[best]);
        struct sampler_result res;
        assert_int_equal(
            sampler_sample(&smp, sc, logits, V, toks, N_PROMPT, toks + N_PROMPT, N_GEN, &res),
            KRS_OK);
        assert_int_equal(res.token, best);
        assert_true(fabs(res.logprob - (-log(z))) < 1e-4);
        /* Too small an output: FULL, and the scratch stays usable (counters cleared). */
        if (n > 1)
            assert_int_equal(
                sampler_edits(&smp, sc, toks, N_PROMPT, toks + N_PROMPT, N_GEN, edits, n - 1, &n),
                KRS_ERR_FULL);
    }
    sampler_scratch_free(sc);
}

/* sampler_next_uniform is the draw sampler_sample makes: on two tokens of equal weight the
 * token is 0 exactly when the draw is below one half. */
static void test_next_uniform_is_the_draw(void **state)
{
    float logits[2] = {0.0f, 0.0f};
    struct sampler_scratch *sc;
    assert_int_equal(sampler_scratch_create(2, &sc), KRS_OK);
    struct sampler_params p;
    sampler_params_default(&p);
    p.seed = 99;
    struct sampler a, b;
    assert_int_equal(sampler_init(&a, &p, 2), KRS_OK);
    assert_int_equal(sampler_init(&b, &p, 2), KRS_OK);
    int zeros = 0;
    for (int i = 0; i < 200; i++) {
        double u = sampler_next_uniform(&a);
        assert_true(u >= 0.0 && u < 1.0);
        struct sampler_result r;
        assert_int_equal(sampler_sample(&b, sc, logits, 2, NULL, 0, NULL, 0, &r), KRS_OK);
        assert_int_equal(r.token, u < 0.5 ? 0 : 1);
        zeros += r.token == 0;
    }
    assert_true(zeros > 60 && zeros < 140);
    sampler_scratch_free(sc);
}

/* Draws from a masked row: only allowed tokens, greedy = the first best allowed one, logprob =
 * log-softmax over the allowed tokens; and the draws follow the allowed distribution (T = 1,
 * no truncation: chi-square-like bound on the count of the best token). */
static void check_masked(struct sampler_scratch *sc, const float *logits, int V,
                         const uint32_t *allow)
{
    const struct {
        float temp, top_p;
        int top_k;
    } cfg[] = {{0, 1, 0}, {1, 1, 40}, {0.7f, 0.9f, 0}, {1.3f, 1, 0}, {1, 1, 3}, {1, 1, 0}};
    int best = -1;
    double z = 0;
    for (int t = 0; t < V; t++)
        if (allow[t >> 5] >> (t & 31) & 1 && (best < 0 || logits[t] > logits[best])) best = t;
    for (int t = 0; t < V; t++)
        if (allow[t >> 5] >> (t & 31) & 1) z += exp((double)logits[t] - logits[best]);
    for (size_t c = 0; c < sizeof cfg / sizeof cfg[0]; c++) {
        struct sampler_params p;
        sampler_params_default(&p);
        p.temperature = cfg[c].temp;
        p.top_p = cfg[c].top_p;
        p.top_k = cfg[c].top_k;
        p.seed = 42 + c;
        struct sampler s;
        assert_int_equal(sampler_init(&s, &p, V), KRS_OK);
        int n_best = 0, draws = 400;
        for (int draw = 0; draw < draws; draw++) {
            struct sampler_result r;
            assert_int_equal(sampler_sample_masked(&s, sc, logits, V, allow, NULL, 0, NULL, 0, &r),
                             KRS_OK);
            assert_true(allow[r.token >> 5] >> (r.token & 31) & 1);
            if (cfg[c].temp == 0) assert_int_equal(r.token, best);
            double want = (double)logits[r.token] - logits[best] - log(z);
            assert_true(fabs(r.logprob - want) < 1e-4);
            n_best += r.token == best;
        }
        if (c == 5) { /* T = 1 untruncated: P(best) = 1 / z */
            double pb = 1.0 / z, sd = sqrt(draws * pb * (1 - pb));
            assert_true(fabs(n_best - draws * pb) <= 5 * sd + 1);
        }
    }
}

/* The allowed-token mask, sparse (5 tokens: the candidate path) and dense (every other token:
 * the vocabulary-wide path), for every sampling path. */
static void test_mask(void **state)
{
    (void)state;
    enum { V = 70000 };
    static float logits[V];
    static uint32_t allow[(V + 31) / 32];
    for (int i = 0; i < V; i++) logits[i] = nrand() * 3.0f;
    logits[123] = 50.0f; /* the unmasked argmax: never allowed */
    memset(allow, 0, sizeof allow);
    int ids[] = {7, 31, 32, 4000, 69999};
    for (size_t i = 0; i < 5; i++) allow[ids[i] >> 5] |= 1u << (ids[i] & 31);
    struct sampler_scratch *sc;
    assert_int_equal(sampler_scratch_create(V, &sc), KRS_OK);
    for (int i = 0; i < V; i++) logits[i] = nrand() * 1.5f; /* a flatter row: draws spread */
    logits[123] = 50.0f;
    check_masked(sc, logits, V, allow);
    for (int w = 0; w < (V + 31) / 32; w++) allow[w] = 0x55555555u; /* even ids; 123 is odd */
    check_masked(sc, logits, V, allow);
    /* nothing allowed: an error, not a token */
    memset(allow, 0, sizeof allow);
    struct sampler_params p;
    sampler_params_default(&p);
    struct sampler s;
    struct sampler_result r;
    assert_int_equal(sampler_init(&s, &p, V), KRS_OK);
    assert_int_equal(sampler_sample_masked(&s, sc, logits, V, allow, NULL, 0, NULL, 0, &r),
                     KRS_ERR_INVALID);
    sampler_scratch_free(sc);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_greedy_argmax),
        cmocka_unit_test(test_device_edits_match),
        cmocka_unit_test(test_next_uniform_is_the_draw),
        cmocka_unit_test(test_temperature_distribution),
        cmocka_unit_test(test_temperature_chi_detects_wrong_temperature),
        cmocka_unit_test(test_top_k),
        cmocka_unit_test(test_top_p),
        cmocka_unit_test(test_min_p),
        cmocka_unit_test(test_penalties),
        cmocka_unit_test(test_logit_bias),
        cmocka_unit_test(test_seed_reproducible),
        cmocka_unit_test(test_logprobs),
        cmocka_unit_test(test_big_vocab_paths),
        cmocka_unit_test(test_skip_logprob),
        cmocka_unit_test(test_kernels),
        cmocka_unit_test(test_invalid),
        cmocka_unit_test(test_mask),
        cmocka_unit_test(test_stop_basic),
        cmocka_unit_test(test_stop_random),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
