/* metrics/: counters and gauges, histogram quantiles against exact order statistics, the
 * per-second windows against a brute-force oracle of the documented definition, lock-free
 * recording from 4 threads, and the Prometheus / JSON renderers.
 *
 * Also writes the Prometheus text to $KRS_SOURCE_DIR/tests/.cache/metrics/sample.prom for
 * tests/metrics/test_metrics_promtool.py (promtool + prometheus_client parser). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <cjson/cJSON.h>
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "krserve.h"
#include "metrics/metrics.h"

#define S_NS  1000000000ull
#define MS_NS 1000000ull

static uint64_t rng_state = 88172645463325252ull;
static double uniform01(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (double)(rng_state >> 11) / 9007199254740992.0;
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static struct metrics_snapshot *snap_new(void)
{
    struct metrics_snapshot *s = calloc(1, sizeof *s);
    assert_non_null(s);
    return s;
}

static void test_counters_and_gauges(void **state)
{
    struct metrics *m;
    assert_int_equal(metrics_create(5 * S_NS, &m), KRS_OK);
    struct metrics_snapshot *s = snap_new();

    for (int i = 0; i < 7; i++) metrics_record_submit(m, METRICS_PRIO_URGENT);
    for (int i = 0; i < 5; i++) metrics_record_submit(m, METRICS_PRIO_DEFAULT);
    metrics_record_submit(m, METRICS_PRIO_BACKGROUND);
    metrics_record_submit(m, (enum metrics_priority)99); /* ignored */
    struct metrics_request_record r = {METRICS_PRIO_DEFAULT, METRICS_FINISH_STOP, 10, 20,
                                       50 * MS_NS};
    metrics_record_finish(m, &r, 6 * S_NS);
    r.reason = METRICS_FINISH_LENGTH;
    r.prompt_tokens = 5;
    metrics_record_finish(m, &r, 6 * S_NS);
    r.reason = METRICS_FINISH_CANCELLED;
    metrics_record_finish(m, &r, 6 * S_NS);
    r.reason = METRICS_FINISH_ERROR;
    metrics_record_finish(m, &r, 6 * S_NS);
    metrics_record_tokens(m, 33, 6 * S_NS);
    metrics_record_preemption(m);
    metrics_record_preemption(m);
    metrics_record_late_admission(m);
    metrics_record_tuning_adjustments(m, 3);
    metrics_set_queue_depth(m, METRICS_PRIO_URGENT, 4);
    metrics_set_queue_depth(m, METRICS_PRIO_DEFAULT, 2);
    metrics_set_queue_depth(m, METRICS_PRIO_BACKGROUND, 1);
    metrics_set_batch(m, 6, 8);
    metrics_set_kv_blocks(m, 100, 412);
    metrics_set_mode(m, METRICS_MODE_ON); /* already on: no transition */
    metrics_set_mode(m, METRICS_MODE_FIXED);
    metrics_set_mode(m, METRICS_MODE_OFF);
    char reason[64];
    for (int i = 0; i < 10; i++) {
        snprintf(reason, sizeof reason, "spike %d", i);
        metrics_record_degradation(m, reason, (uint64_t)(10 + i) * S_NS);
    }

    assert_int_equal(metrics_snapshot(m, 7 * S_NS, s), KRS_OK);
    assert_int_equal(s->uptime_ns, 2 * S_NS);
    assert_int_equal(s->submitted[METRICS_PRIO_URGENT], 7);
    assert_int_equal(s->submitted[METRICS_PRIO_DEFAULT], 5);
    assert_int_equal(s->submitted[METRICS_PRIO_BACKGROUND], 1);
    assert_int_equal(s->submitted_total, 13);
    for (int k = 0; k < METRICS_FINISH_COUNT; k++) assert_int_equal(s->finished[k], 1);
    assert_int_equal(s->finished_total, 4);
    assert_int_equal(s->prompt_tokens, 10 + 5 * 3);
    assert_int_equal(s->generated_tokens, 33);
    assert_int_equal(s->preemptions, 2);
    assert_int_equal(s->late_admissions, 1);
    assert_int_equal(s->tuning_adjustments, 3);
    assert_int_equal(s->mode_transitions, 2);
    assert_int_equal(s->mode, METRICS_MODE_OFF);
    assert_int_equal(s->queue_depth[METRICS_PRIO_URGENT], 4);
    assert_int_equal(s->queue_depth_total, 7);
    assert_int_equal(s->running, 6);
    assert_int_equal(s->batch_limit, 8);
    assert_int_equal(s->kv_used, 100);
    assert_int_equal(s->kv_free, 412);
    assert_int_equal(s->degradation_events, 10);
    assert_int_equal(s->n_degradations, METRICS_DEGRADE_RING);
    for (uint32_t i = 0; i < s->n_degradations; i++) { /* newest 8, oldest first */
        snprintf(reason, sizeof reason, "spike %u", i + 2);
        assert_string_equal(s->degradations[i].reason, reason);
        assert_int_equal(s->degradations[i].t_ns, (12 + i) * S_NS);
    }
    assert_int_equal(s->hist[METRICS_HIST_E2E].count, 4);
    assert_true(fabs(s->hist[METRICS_HIST_E2E].sum - 0.2) < 1e-12);
    assert_int_equal(s->hist[METRICS_HIST_GEN_TOKENS].count, 4);
    assert_true(fabs(s->hist[METRICS_HIST_GEN_TOKENS].sum - 80.0) < 1e-12);
    assert_true(fabs(s->hist[METRICS_HIST_PROMPT_TOKENS].p50 - 5.0) < 1e-12);
    free(s);
    metrics_destroy(m);
}

static void test_bucket_geometry(void **state)
{
    /* Every value lies in its bucket, buckets tile the line, widths <= 1/8 of the value. */
    for (int id = 0; id < METRICS_HIST_COUNT; id++) {
        int lat = id <= METRICS_HIST_STEP;
        double prev_hi = lat ? 0.0 : -1.0;
        for (uint32_t b = 0; b + 1 < METRICS_HIST_BUCKETS - (lat ? 1 : 0); b++) {
            double lo, hi;
            metrics_hist_bucket_range(id, b, &lo, &hi);
            /* latency: [lo, hi) tiles; counts: integers [lo, hi] follow each other */
            assert_true(lat ? fabs(lo - prev_hi) < 1e-12 : lo == prev_hi + 1.0);
            if (!isinf(hi) && lo >= (lat ? 16e-6 : 17.0))
                assert_true((hi - lo) / lo <= 0.125 + 1e-12);
            prev_hi = hi;
        }
        for (int i = 0; i < 20000; i++) {
            uint64_t v = (uint64_t)exp(uniform01() * log(lat ? 2e11 : 2e8));
            uint32_t b = metrics_hist_bucket(id, v);
            double lo, hi;
            metrics_hist_bucket_range(id, b, &lo, &hi);
            double x = lat ? (double)v * 1e-9 : (double)v;
            assert_true(x >= lo - 1e-15);
            assert_true(lat ? x < hi : x <= hi);
        }
    }
    double lo, hi;
    metrics_hist_bucket_range(METRICS_HIST_STEP, metrics_hist_bucket(METRICS_HIST_STEP, 500 * S_NS),
                              &lo, &hi);
    assert_true(isinf(hi)); /* overflow bucket */
    assert_int_equal(metrics_hist_bucket(METRICS_HIST_BATCH_SIZE, 0), 0);
}

/* Estimated quantiles vs the exact nearest-rank order statistic: within one bucket width. */
static void check_quantiles(enum metrics_hist_id id, const uint64_t *vals, size_t n,
                            const struct metrics_hist_snapshot *h)
{
    uint64_t *sorted = malloc(n * sizeof *sorted);
    assert_non_null(sorted);
    memcpy(sorted, vals, n * sizeof *sorted);
    qsort(sorted, n, sizeof *sorted, cmp_u64);
    int lat = id <= METRICS_HIST_STEP;
    const double qs[] = {0.01, 0.25, 0.5, 0.9, 0.95, 0.99, 0.999};
    for (size_t i = 0; i < sizeof qs / sizeof qs[0]; i++) {
        size_t rank = (size_t)ceil(qs[i] * (double)n);
        uint64_t exact_raw = sorted[rank - 1];
        double exact = lat ? (double)exact_raw * 1e-9 : (double)exact_raw;
        double est = metrics_hist_quantile(id, h->buckets, qs[i]);
        double lo, hi;
        metrics_hist_bucket_range(id, metrics_hist_bucket(id, exact_raw), &lo, &hi);
        double width = lat ? hi - lo : hi - lo + 1.0;
        assert_true(fabs(est - exact) <= width);
        /* the documented relative bound: 12.5 % of the value, or one unit below 16 */
        assert_true(fabs(est - exact) <= 0.125 * exact + (lat ? 16e-6 : 1.0));
    }
    free(sorted);
}

static void test_histogram_quantiles(void **state)
{
    struct metrics *m;
    assert_int_equal(metrics_create(0, &m), KRS_OK);
    enum { N = 20000 };
    uint64_t *ttft = malloc(N * sizeof *ttft), *step = malloc(N * sizeof *step);
    uint64_t *batch = malloc(N * sizeof *batch);
    assert_non_null(ttft);
    assert_non_null(step);
    assert_non_null(batch);
    for (int i = 0; i < N; i++) {
        ttft[i] = (uint64_t)(1e4 * exp(uniform01() * log(1e6))); /* log-uniform 10 us..10 s */
        step[i] = (uint64_t)(40e6 + 20e6 * uniform01());         /* uniform 40..60 ms */
        batch[i] = 1 + (uint64_t)(64 * uniform01());             /* uniform 1..64 */
        metrics_record_first_token(m, ttft[i]);
        metrics_record_step(m, step[i], (uint32_t)batch[i]);
    }
    struct metrics_snapshot *s = snap_new();
    assert_int_equal(metrics_snapshot(m, 0, s), KRS_OK);
    assert_int_equal(s->hist[METRICS_HIST_TTFT].count, N);
    check_quantiles(METRICS_HIST_TTFT, ttft, N, &s->hist[METRICS_HIST_TTFT]);
    check_quantiles(METRICS_HIST_STEP, step, N, &s->hist[METRICS_HIST_STEP]);
    check_quantiles(METRICS_HIST_BATCH_SIZE, batch, N, &s->hist[METRICS_HIST_BATCH_SIZE]);
    double sum = 0;
    for (int i = 0; i < N; i++) sum += (double)step[i] * 1e-9;
    assert_true(fabs(s->hist[METRICS_HIST_STEP].sum - sum) < 1e-6);
    /* snapshot p50/p95/p99 are the same estimator */
    assert_true(s->hist[METRICS_HIST_STEP].p99 ==
                metrics_hist_quantile(METRICS_HIST_STEP, s->hist[METRICS_HIST_STEP].buckets, 0.99));
    /* small integers are exact */
    qsort(batch, N, sizeof *batch, cmp_u64);
    assert_true(metrics_hist_quantile(METRICS_HIST_BATCH_SIZE,
                                      s->hist[METRICS_HIST_BATCH_SIZE].buckets,
                                      0.1) == (double)batch[(size_t)ceil(0.1 * N) - 1]);
    uint64_t empty[METRICS_HIST_BUCKETS] = {0};
    assert_true(metrics_hist_quantile(METRICS_HIST_E2E, empty, 0.5) == 0.0);
    free(ttft);
    free(step);
    free(batch);
    free(s);
    metrics_destroy(m);
}

/* Oracle of the documented window: events with floor(t) >= floor(now) - W + 1 and t <= now,
 * divided by min(W - 1 + frac(now), uptime). */
struct ev {
    uint64_t t_ns;
    uint32_t tokens;
};
static double oracle_rate(const struct ev *e, int n, uint64_t start, uint64_t now, uint32_t w)
{
    uint64_t first = now / S_NS + 1 >= w ? now / S_NS + 1 - w : 0;
    uint64_t sum = 0;
    for (int i = 0; i < n; i++)
        if (e[i].t_ns / S_NS >= first && e[i].t_ns <= now) sum += e[i].tokens;
    double span = (double)(w - 1) + (double)(now % S_NS) / 1e9;
    double up = (double)(now - start) / 1e9;
    if (up < span) span = up;
    return (double)sum / span;
}

static void test_windows(void **state)
{
    const uint64_t t0 = 1000 * S_NS;
    struct metrics *m;
    assert_int_equal(metrics_create(t0, &m), KRS_OK);
    struct metrics_snapshot *s = snap_new();

    /* 500 tokens at t0 + 10.5 s, seen at t0 + 11 s: the 5 s window spans [t0+7, t0+11]. */
    metrics_record_tokens(m, 500, t0 + 10 * S_NS + S_NS / 2);
    assert_int_equal(metrics_snapshot(m, t0 + 11 * S_NS, s), KRS_OK);
    assert_int_equal(s->windows[0].seconds, 5);
    assert_int_equal(s->windows[0].tokens, 500);
    assert_true(fabs(s->windows[0].tokens_per_s - 125.0) < 1e-9);
    assert_true(fabs(s->windows[1].tokens_per_s - 500.0 / 11.0) < 1e-9); /* uptime 11 s */
    assert_true(fabs(s->windows[2].tokens_per_s - 500.0 / 11.0) < 1e-9);

    /* A steady stream of 100 tokens every 100 ms plus the early burst, checked against the
     * oracle at many instants while it is being recorded (queries move forward in time, as
     * the server's do). */
    struct ev evs[400];
    int n = 0;
    evs[n++] = (struct ev){t0 + 10 * S_NS + S_NS / 2, 500};
    uint64_t t1 = t0 + 20 * S_NS;
    for (int i = 0; i < 300; i++) evs[n++] = (struct ev){t1 + (uint64_t)i * 100 * MS_NS, 100};
    const uint64_t last = evs[n - 1].t_ns;
    int recorded = 1, checks = 0;
    for (uint64_t now = t1 - 3 * S_NS; now <= last + 70 * S_NS; now += 730 * MS_NS) {
        while (recorded < n && evs[recorded].t_ns <= now) {
            metrics_record_tokens(m, evs[recorded].tokens, evs[recorded].t_ns);
            recorded++;
        }
        assert_int_equal(metrics_snapshot(m, now, s), KRS_OK);
        const uint32_t ws[3] = {5, 30, 60};
        for (int w = 0; w < 3; w++) {
            double want = oracle_rate(evs, recorded, t0, now, ws[w]);
            assert_true(fabs(s->windows[w].tokens_per_s - want) < 1e-6 * (1.0 + want));
        }
        checks++;
    }
    assert_int_equal(recorded, n);
    assert_true(checks > 100);
    /* Steady state (1000 tokens/s): the 5 s window at the end of the stream. */
    assert_int_equal(metrics_snapshot(m, last + 50 * MS_NS, s), KRS_OK);
    assert_true(fabs(s->windows[0].tokens_per_s - 1000.0) < 30.0);
    /* 60 s after the last token every window is zero. */
    assert_int_equal(metrics_snapshot(m, last + 61 * S_NS, s), KRS_OK);
    for (int w = 0; w < METRICS_N_WINDOWS; w++) {
        assert_int_equal(s->windows[w].tokens, 0);
        assert_true(s->windows[w].tokens_per_s == 0.0);
    }
    assert_int_equal(s->generated_tokens, 500 + 300 * 100); /* totals never fall */

    /* Windowed latency: 200 requests of 10..1000 ms now, then 61 s later 50 of 5 ms. */
    uint64_t t2 = last + 100 * S_NS;
    uint64_t e2e[200];
    for (int i = 0; i < 200; i++) {
        e2e[i] = (uint64_t)(10 + i * 5) * MS_NS;
        struct metrics_request_record r = {METRICS_PRIO_DEFAULT, METRICS_FINISH_STOP, 4, 8, e2e[i]};
        metrics_record_finish(m, &r, t2 + (uint64_t)i * 10 * MS_NS);
    }
    assert_int_equal(metrics_snapshot(m, t2 + 3 * S_NS, s), KRS_OK);
    assert_int_equal(s->recent_requests, 200);
    assert_int_equal(s->windows[0].requests, 200);
    double span5 = 4.0 + (double)((t2 + 3 * S_NS) % S_NS) / 1e9;
    assert_true(fabs(s->windows[0].span_s - span5) < 1e-12);
    assert_true(fabs(s->windows[0].requests_per_s - 200.0 / span5) < 1e-9);
    /* exact nearest-rank: p50 = e2e[99] = 505 ms, p99 = e2e[197] = 995 ms */
    assert_true(fabs(s->recent_p50_ms - 505.0) <= 0.125 * 505.0);
    assert_true(fabs(s->recent_p99_ms - 995.0) <= 0.125 * 995.0);
    assert_true(s->recent_p95_ms >= s->recent_p50_ms && s->recent_p99_ms >= s->recent_p95_ms);
    for (int i = 0; i < 50; i++) {
        struct metrics_request_record r = {METRICS_PRIO_URGENT, METRICS_FINISH_STOP, 4, 8,
                                           5 * MS_NS};
        metrics_record_finish(m, &r, t2 + 62 * S_NS);
    }
    assert_int_equal(metrics_snapshot(m, t2 + 62 * S_NS, s), KRS_OK);
    assert_int_equal(s->recent_requests, 50);
    assert_true(fabs(s->recent_p99_ms - 5.0) <= 0.125 * 5.0);
    assert_int_equal(s->hist[METRICS_HIST_E2E].count, 250); /* cumulative keeps all */
    assert_int_equal(metrics_snapshot(m, t2 + 200 * S_NS, s), KRS_OK);
    assert_int_equal(s->recent_requests, 0);
    assert_true(s->recent_p99_ms == 0.0);
    free(s);
    metrics_destroy(m);
}

/* ---- concurrency ---- */

#define THREADS 4
#define ITERS   40000
struct worker {
    struct metrics *m;
    int id;
    uint64_t base;
};
static atomic_int workers_done;

static void *worker_main(void *arg)
{
    struct worker *w = arg;
    for (int j = 0; j < ITERS; j++) {
        /* sweep 10 s so that several threads rotate ring slots at the same time */
        uint64_t now = w->base + (uint64_t)j * (10 * S_NS / ITERS);
        metrics_record_submit(w->m, (enum metrics_priority)(j % 3));
        metrics_record_tokens(w->m, 1, now);
        metrics_record_step(w->m, (uint64_t)(j % 1000 + 1) * 10000, (uint32_t)(j % 32 + 1));
        metrics_record_inter_token(w->m, 2 * MS_NS);
        struct metrics_request_record r = {(enum metrics_priority)(j % 3),
                                           (enum metrics_finish_reason)(j % 4), 3, 1,
                                           (uint64_t)(j % 100 + 1) * MS_NS};
        metrics_record_finish(w->m, &r, now);
    }
    atomic_fetch_add(&workers_done, 1);
    return NULL;
}

static void test_concurrent_recording(void **state)
{
    const uint64_t base = 5000 * S_NS;
    struct metrics *m;
    assert_int_equal(metrics_create(base, &m), KRS_OK);
    pthread_t th[THREADS];
    struct worker w[THREADS];
    atomic_store(&workers_done, 0);
    for (int i = 0; i < THREADS; i++) {
        w[i] = (struct worker){m, i, base};
        assert_int_equal(pthread_create(&th[i], NULL, worker_main, &w[i]), 0);
    }
    struct metrics_snapshot *s = snap_new();
    uint64_t prev_tokens = 0, prev_submitted = 0;
    int snaps = 0;
    while (atomic_load(&workers_done) < THREADS) {
        assert_int_equal(metrics_snapshot(m, base + 10 * S_NS, s), KRS_OK);
        assert_true(s->generated_tokens >= prev_tokens); /* counters never go back */
        assert_true(s->submitted_total >= prev_submitted);
        prev_tokens = s->generated_tokens;
        prev_submitted = s->submitted_total;
        snaps++;
    }
    for (int i = 0; i < THREADS; i++) pthread_join(th[i], NULL);
    assert_int_equal(metrics_snapshot(m, base + 10 * S_NS, s), KRS_OK);
    const uint64_t total = (uint64_t)THREADS * ITERS;
    assert_int_equal(s->generated_tokens, total);
    assert_int_equal(s->submitted_total, total);
    assert_int_equal(s->finished_total, total);
    assert_int_equal(s->prompt_tokens, 3 * total);
    assert_int_equal(s->hist[METRICS_HIST_STEP].count, total);
    assert_int_equal(s->hist[METRICS_HIST_BATCH_SIZE].count, total);
    assert_int_equal(s->hist[METRICS_HIST_INTER_TOKEN].count, total);
    assert_int_equal(s->hist[METRICS_HIST_E2E].count, total);
    assert_true(fabs(s->hist[METRICS_HIST_INTER_TOKEN].sum - 0.002 * (double)total) < 1e-6);
    /* no count lost in the rotating per-second ring either */
    assert_int_equal(s->windows[2].tokens, total);
    assert_int_equal(s->windows[2].requests, total);
    assert_int_equal(s->recent_requests, total);
    for (int p = 0; p < METRICS_PRIO_COUNT; p++)
        assert_int_equal(s->submitted[p], THREADS * (uint64_t)((ITERS + 2 - p) / 3));
    print_message("  %d snapshots taken while 4 threads recorded\n", snaps);
    free(s);
    metrics_destroy(m);
}

/* ---- Prometheus text ---- */

static struct metrics *make_busy_metrics(uint64_t t0)
{
    struct metrics *m;
    assert_int_equal(metrics_create(t0, &m), KRS_OK);
    for (int i = 0; i < 120; i++) {
        uint64_t now = t0 + (uint64_t)i * 50 * MS_NS;
        metrics_record_submit(m, (enum metrics_priority)(i % 3));
        metrics_record_admit(m, (uint64_t)(i % 7) * MS_NS);
        metrics_record_first_token(m, (uint64_t)(20 + i) * MS_NS);
        metrics_record_inter_token(m, (uint64_t)(30 + i % 5) * MS_NS);
        metrics_record_step(m, (uint64_t)(25 + i % 9) * MS_NS, (uint32_t)(i % 12 + 1));
        metrics_record_tokens(m, 7, now);
        struct metrics_request_record r = {(enum metrics_priority)(i % 3),
                                           (enum metrics_finish_reason)(i % 4), (uint32_t)(10 + i),
                                           (uint32_t)(i % 40), (uint64_t)(100 + 3 * i) * MS_NS};
        metrics_record_finish(m, &r, now);
    }
    metrics_set_queue_depth(m, METRICS_PRIO_URGENT, 1);
    metrics_set_queue_depth(m, METRICS_PRIO_DEFAULT, 5);
    metrics_set_queue_depth(m, METRICS_PRIO_BACKGROUND, 9);
    metrics_set_batch(m, 7, 12);
    metrics_set_kv_blocks(m, 300, 212);
    metrics_set_mode(m, METRICS_MODE_FIXED);
    metrics_record_tuning_adjustments(m, 4);
    metrics_record_preemption(m);
    metrics_record_late_admission(m);
    metrics_record_degradation(m, "p99 312.0 ms > 2.0x target 100.0 ms and 1.5x ema 120.0 ms",
                               t0 + 3 * S_NS);
    return m;
}

static void copy_str(char *dst, size_t cap, const char *src)
{
    size_t n = strlen(src);
    assert_true(n < cap);
    memcpy(dst, src, n + 1);
}

struct family {
    char name[96];
    char type[16];
    int help, samples;
};

static struct family *find_family(struct family *f, int n, const char *name)
{
    for (int i = 0; i < n; i++)
        if (strcmp(f[i].name, name) == 0) return &f[i];
    return NULL;
}

/* Parses the exposition back: returns the value of `series` (exact text before the space)
 * or NAN, after checking the whole document's structure. */
static double sample_value(const char *text, const char *series)
{
    size_t n = strlen(series);
    for (const char *p = text; p && *p;) {
        if (strncmp(p, series, n) == 0 && p[n] == ' ') return strtod(p + n + 1, NULL);
        p = strchr(p, '\n');
        if (p) p++;
    }
    return NAN;
}

static void check_exposition(const char *text)
{
    struct family fam[128];
    int nf = 0;
    char line[512];
    const char *p = text;
    char last_hist[96] = "";
    double last_cum = -1;
    while (*p) {
        const char *nl = strchr(p, '\n');
        assert_non_null(nl); /* every line ends with \n */
        size_t len = (size_t)(nl - p);
        assert_true(len > 0 && len < sizeof line);
        memcpy(line, p, len);
        line[len] = '\0';
        p = nl + 1;
        if (line[0] == '#') {
            char kw[8], name[96], rest[400];
            assert_int_equal(sscanf(line, "# %7s %95s %399[^\n]", kw, name, rest), 3);
            struct family *f = find_family(fam, nf, name);
            if (!f) {
                assert_true(nf < 128);
                f = &fam[nf++];
                memset(f, 0, sizeof *f);
                copy_str(f->name, sizeof f->name, name);
            }
            assert_int_equal(f->samples, 0); /* metadata before samples */
            if (strcmp(kw, "HELP") == 0) {
                assert_int_equal(f->help, 0);
                f->help = 1;
            } else {
                assert_string_equal(kw, "TYPE");
                assert_int_equal(f->type[0], 0);
                assert_true(strcmp(rest, "counter") == 0 || strcmp(rest, "gauge") == 0 ||
                            strcmp(rest, "histogram") == 0);
                copy_str(f->type, sizeof f->type, rest);
            }
            continue;
        }
        /* sample: name[{labels}] value */
        char *sp = strrchr(line, ' ');
        assert_non_null(sp);
        char *end;
        errno = 0;
        double v = strtod(sp + 1, &end);
        assert_true(*end == '\0' && errno == 0 && !isnan(v));
        *sp = '\0';
        char *brace = strchr(line, '{');
        if (brace) {
            assert_true(line[strlen(line) - 1] == '}');
            /* labels: k="v"(,k="v")* */
            char *q = brace + 1;
            while (*q != '}') {
                while ((*q >= 'a' && *q <= 'z') || *q == '_') q++;
                assert_true(q[0] == '=' && q[1] == '"');
                q = strchr(q + 2, '"');
                assert_non_null(q);
                q++;
                if (*q == ',') q++;
            }
            *brace = '\0';
        }
        for (const char *c = line; *c; c++)
            assert_true((*c >= 'a' && *c <= 'z') || (*c >= '0' && *c <= '9') || *c == '_');
        struct family *f = find_family(fam, nf, line);
        char base[96];
        copy_str(base, sizeof base, line);
        if (!f) { /* histogram series */
            const char *suf[] = {"_bucket", "_sum", "_count"};
            for (int i = 0; i < 3 && !f; i++) {
                size_t bl = strlen(base), sl = strlen(suf[i]);
                if (bl > sl && strcmp(base + bl - sl, suf[i]) == 0) {
                    base[bl - sl] = '\0';
                    f = find_family(fam, nf, base);
                    if (f) {
                        assert_string_equal(f->type, "histogram");
                        if (i == 0) {
                            if (strcmp(last_hist, base) != 0) {
                                copy_str(last_hist, sizeof last_hist, base);
                                last_cum = -1;
                            }
                            assert_true(v >= last_cum); /* cumulative */
                            last_cum = v;
                        } else if (i == 2) {
                            assert_true(v == last_cum); /* _count == +Inf bucket */
                        }
                    }
                    copy_str(base, sizeof base, line);
                }
            }
        }
        assert_non_null(f);
        assert_true(f->help && f->type[0]);
        if (strcmp(f->type, "counter") == 0) {
            size_t l = strlen(f->name);
            assert_true(l > 6 && strcmp(f->name + l - 6, "_total") == 0);
        }
        f->samples++;
    }
    const char *required[] = {"mlx_throughput_tokens_per_second",
                              "mlx_latency_p50_milliseconds",
                              "mlx_latency_p95_milliseconds",
                              "mlx_latency_p99_milliseconds",
                              "mlx_batch_size_current",
                              "mlx_gpu_scheduler_mode",
                              "mlx_auto_tuning_adjustments_total",
                              "mlx_queue_depth",
                              "mlx_mode_transitions_total",
                              "krserve_ttft_seconds",
                              "krserve_inter_token_latency_seconds",
                              "krserve_e2e_latency_seconds",
                              "krserve_queue_wait_seconds",
                              "krserve_step_seconds",
                              "krserve_batch_size",
                              "krserve_kv_blocks",
                              "krserve_requests_total",
                              "krserve_requests_by_priority_total",
                              "krserve_preemptions_total",
                              "krserve_late_admissions_total",
                              "krserve_degradation_events_total",
                              "krserve_tokens_total",
                              "krserve_queue_depth"};
    for (size_t i = 0; i < sizeof required / sizeof required[0]; i++) {
        struct family *f = find_family(fam, nf, required[i]);
        if (!f) fail_msg("missing metric %s", required[i]);
        assert_true(f->samples > 0);
    }
}

static void test_prometheus_text(void **state)
{
    const uint64_t t0 = 100 * S_NS;
    struct metrics *m = make_busy_metrics(t0);
    uint64_t now = t0 + 6 * S_NS;
    size_t need = 0;
    char tiny[64];
    assert_int_equal(metrics_render_prometheus(m, now, tiny, sizeof tiny, &need), KRS_ERR_FULL);
    assert_true(need > sizeof tiny);
    assert_int_equal(strlen(tiny), sizeof tiny - 1); /* truncated but terminated */
    char *buf = malloc(need + 1);
    assert_non_null(buf);
    size_t len = 0;
    assert_int_equal(metrics_render_prometheus(m, now, buf, need + 1, &len), KRS_OK);
    assert_int_equal(len, need);
    assert_int_equal(strlen(buf), len);
    check_exposition(buf);

    /* values: against the recorded synthetic load */
    assert_true(sample_value(buf, "mlx_gpu_scheduler_mode{mode=\"fixed\"}") == 1.0);
    assert_true(sample_value(buf, "mlx_gpu_scheduler_mode{mode=\"on\"}") == 0.0);
    assert_true(sample_value(buf, "mlx_gpu_scheduler_mode{mode=\"off\"}") == 0.0);
    assert_true(sample_value(buf, "mlx_queue_depth") == 15.0);
    assert_true(sample_value(buf, "krserve_queue_depth{priority=\"background\"}") == 9.0);
    assert_true(sample_value(buf, "mlx_batch_size_current") == 7.0);
    assert_true(sample_value(buf, "krserve_kv_blocks{state=\"free\"}") == 212.0);
    assert_true(sample_value(buf, "krserve_requests_total{reason=\"cancelled\"}") == 30.0);
    assert_true(sample_value(buf, "krserve_requests_by_priority_total{priority=\"urgent\"}") ==
                40.0);
    assert_true(sample_value(buf, "krserve_tokens_total{kind=\"generated\"}") == 840.0);
    assert_true(sample_value(buf, "mlx_mode_transitions_total") == 1.0);
    assert_true(sample_value(buf, "mlx_auto_tuning_adjustments_total") == 4.0);
    assert_true(sample_value(buf, "krserve_degradation_events_total") == 1.0);
    assert_true(sample_value(buf, "krserve_ttft_seconds_count") == 120.0);
    assert_true(sample_value(buf, "krserve_batch_size_bucket{le=\"+Inf\"}") == 120.0);
    /* batch sizes are i % 12 + 1: 10 steps each of 1..12, so le=4 counts 40, le=8 counts 80 */
    assert_true(sample_value(buf, "krserve_batch_size_bucket{le=\"4\"}") == 40.0);
    assert_true(sample_value(buf, "krserve_batch_size_bucket{le=\"8\"}") == 80.0);
    assert_true(sample_value(buf, "krserve_batch_size_bucket{le=\"0\"}") == 0.0);
    /* generated tokens per request i % 40: 3 requests have 0 */
    assert_true(sample_value(buf, "krserve_request_generated_tokens_bucket{le=\"0\"}") == 3.0);
    /* step seconds 25..33 ms: all below 0.049152 (= 3 * 2^14 us), none below 0.016384 */
    assert_true(sample_value(buf, "krserve_step_seconds_bucket{le=\"0.016384\"}") == 0.0);
    assert_true(sample_value(buf, "krserve_step_seconds_bucket{le=\"0.049152\"}") == 120.0);
    /* 5 s window at now = t0 + 6 s: tokens recorded at t0 + [2, 6) s = 80 events * 7 */
    double tps = sample_value(buf, "mlx_throughput_tokens_per_second{window=\"5s\"}");
    assert_true(fabs(tps - 80.0 * 7.0 / 4.0) < 1e-6);

    /* hand the text to the pytest side (promtool + prometheus_client) */
    const char *root = getenv("KRS_SOURCE_DIR");
    if (root) {
        char path[4096];
        snprintf(path, sizeof path, "%s/tests/.cache", root);
        mkdir(path, 0755);
        snprintf(path, sizeof path, "%s/tests/.cache/metrics", root);
        mkdir(path, 0755);
        snprintf(path, sizeof path, "%s/tests/.cache/metrics/sample.prom", root);
        FILE *f = fopen(path, "w");
        assert_non_null(f);
        assert_int_equal(fwrite(buf, 1, len, f), len);
        assert_int_equal(fclose(f), 0);
    }
    free(buf);

    /* An empty collector renders too (no NaN: latency gauges are 0 without data). */
    struct metrics *e;
    assert_int_equal(metrics_create(0, &e), KRS_OK);
    assert_int_equal(metrics_render_prometheus(e, 0, NULL, 0, &need), KRS_ERR_FULL);
    buf = malloc(need + 1);
    assert_int_equal(metrics_render_prometheus(e, 0, buf, need + 1, &len), KRS_OK);
    check_exposition(buf);
    assert_true(sample_value(buf, "mlx_latency_p99_milliseconds") == 0.0);
    free(buf);
    metrics_destroy(e);
    metrics_destroy(m);
}

static void test_json_stats(void **state)
{
    const uint64_t t0 = 100 * S_NS;
    struct metrics *m = make_busy_metrics(t0);
    cJSON *j = NULL;
    assert_int_equal(metrics_render_json(m, t0 + 6 * S_NS, &j), KRS_OK);
    assert_non_null(j);
    assert_string_equal(cJSON_GetObjectItem(j, "mode")->valuestring, "fixed");
    cJSON *w5 = cJSON_GetObjectItem(cJSON_GetObjectItem(j, "throughput"), "5s");
    assert_true(fabs(cJSON_GetObjectItem(w5, "tokens_per_s")->valuedouble - 140.0) < 1e-6);
    cJSON *lat = cJSON_GetObjectItem(j, "latency_ms");
    assert_int_equal(cJSON_GetObjectItem(lat, "requests")->valueint, 120);
    double p99 = cJSON_GetObjectItem(lat, "p99")->valuedouble;
    /* e2e = 100 + 3 i ms, i < 120: exact P99 = 100 + 3 * 118 = 454 ms */
    assert_true(fabs(p99 - 454.0) <= 0.125 * 454.0);
    cJSON *dist = cJSON_GetObjectItem(j, "batch_size_distribution");
    assert_int_equal(cJSON_GetArraySize(dist), 12);
    int sum = 0;
    cJSON *e;
    cJSON_ArrayForEach(e, dist)
    {
        assert_true(cJSON_GetObjectItem(e, "min")->valueint ==
                    cJSON_GetObjectItem(e, "max")->valueint);
        assert_int_equal(cJSON_GetObjectItem(e, "count")->valueint, 10);
        sum += cJSON_GetObjectItem(e, "count")->valueint;
    }
    assert_int_equal(sum, 120);
    cJSON *q = cJSON_GetObjectItem(j, "queue_depth");
    assert_int_equal(cJSON_GetObjectItem(q, "default")->valueint, 5);
    assert_int_equal(cJSON_GetObjectItem(q, "total")->valueint, 15);
    cJSON *c = cJSON_GetObjectItem(j, "counters");
    assert_int_equal(
        cJSON_GetObjectItem(cJSON_GetObjectItem(c, "requests_finished"), "total")->valueint, 120);
    assert_int_equal(cJSON_GetObjectItem(c, "degradation_events")->valueint, 1);
    cJSON *h = cJSON_GetObjectItem(cJSON_GetObjectItem(j, "histograms"), "step_ms");
    assert_int_equal(cJSON_GetObjectItem(h, "count")->valueint, 120);
    assert_true(cJSON_GetObjectItem(h, "p50")->valuedouble > 20.0 &&
                cJSON_GetObjectItem(h, "p50")->valuedouble < 40.0);
    cJSON *d = cJSON_GetArrayItem(cJSON_GetObjectItem(j, "recent_degradations"), 0);
    assert_non_null(strstr(cJSON_GetObjectItem(d, "reason")->valuestring, "1.5x ema"));
    cJSON_Delete(j);

    /* Idle: percentiles are null, rates zero. */
    assert_int_equal(metrics_render_json(m, t0 + 200 * S_NS, &j), KRS_OK);
    lat = cJSON_GetObjectItem(j, "latency_ms");
    assert_true(cJSON_IsNull(cJSON_GetObjectItem(lat, "p50")));
    w5 = cJSON_GetObjectItem(cJSON_GetObjectItem(j, "throughput"), "60s");
    assert_true(cJSON_GetObjectItem(w5, "tokens_per_s")->valuedouble == 0.0);
    cJSON_Delete(j);
    metrics_destroy(m);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_counters_and_gauges),  cmocka_unit_test(test_bucket_geometry),
        cmocka_unit_test(test_histogram_quantiles),  cmocka_unit_test(test_windows),
        cmocka_unit_test(test_concurrent_recording), cmocka_unit_test(test_prometheus_text),
        cmocka_unit_test(test_json_stats),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
