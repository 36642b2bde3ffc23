/* controller/: the adaptive batch-limit controller driven by synthetic step-latency traces.
 *
 * The oracle is the latency model itself: step latency = base + per_seq * batch (+ noise), so
 * the best limit is known in closed form: L* = floor((target - base) / per_seq), clamped. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "controller/controller.h"
#include "krserve.h"

struct sim {
    double base_ms, per_seq_ms, noise_ms; /* noise: uniform in [-noise, +noise] */
    uint32_t demand;                      /* requests wanting to run (UINT32_MAX: unbounded) */
    int limit_only;       /* run up to the limit, not up to controller_admit_limit (the scheduler's
                             admission in auto mode) */
    int late;             /* queued requests that waited late_wait_ms run up to
                             controller_late_admit_limit, as the scheduler admits them */
    double spike_ms;      /* >0: the next spike_steps steps take this long */
    uint32_t spike_steps; /* (0 counts as 1) */
    double wait_ms;       /* oldest queue wait reported while queued */
    double pf_ms;         /* cost of one prompt token in a step */
    uint32_t prompt_len, prompt_every; /* a prompt of prompt_len tokens every N steps */
    uint64_t steps;
    double pf_pending;  /* prompt tokens not yet run */
    uint64_t pf_done;   /* prompt tokens run */
    double max_step_ms; /* slowest step since the last reset */
    uint64_t now_ns;
    uint64_t rng;
};

static double sim_uniform(struct sim *s)
{
    s->rng ^= s->rng << 13;
    s->rng ^= s->rng >> 7;
    s->rng ^= s->rng << 17;
    return (double)(s->rng >> 11) / 9007199254740992.0; /* [0,1) */
}

/* Runs one step at the controller's current limit; returns the new limit. Prompt tokens
 * arrive at prompt_per_step and run in chunks of the controller's prefill budget. */
static uint32_t sim_step(struct sim *s, struct controller *c)
{
    uint32_t limit = s->limit_only ? controller_limit(c) : controller_admit_limit(c);
    uint32_t on_time = limit;
    if (s->late && s->wait_ms * 1e6 >= (double)controller_late_wait_ns(c)) {
        uint32_t late = controller_late_admit_limit(c);
        if (late > limit) limit = late;
    }
    uint32_t batch = s->demand < limit ? s->demand : limit;
    uint32_t queued = s->demand == UINT32_MAX ? 100 : s->demand - batch;
    if (s->prompt_every && s->steps++ % s->prompt_every == 0) s->pf_pending += s->prompt_len;
    uint32_t chunk = 0;
    if (s->pf_pending >= 1.0) {
        chunk = controller_prefill_budget(c, batch, 512);
        if (chunk > (uint32_t)s->pf_pending) chunk = (uint32_t)s->pf_pending;
        s->pf_pending -= chunk;
        s->pf_done += chunk;
    }
    double ms = s->base_ms + s->per_seq_ms * batch + s->pf_ms * chunk;
    if (s->noise_ms > 0) ms += s->noise_ms * (2.0 * sim_uniform(s) - 1.0);
    if (s->spike_ms > 0) {
        ms = s->spike_ms;
        if (s->spike_steps > 1) {
            s->spike_steps--;
        } else {
            s->spike_ms = 0;
            s->spike_steps = 0;
        }
    }
    if (ms < 0.01) ms = 0.01;
    if (ms > s->max_step_ms) s->max_step_ms = ms;
    uint64_t ns = (uint64_t)(ms * 1e6);
    s->now_ns += ns;
    struct controller_step st = {.latency_ns = ns,
                                 .n_decode = batch,
                                 .n_prefill = chunk,
                                 .queued = queued,
                                 .oldest_wait_ns = queued ? (uint64_t)(s->wait_ms * 1e6) : 0,
                                 .n_late = batch > on_time ? batch - on_time : 0,
                                 .now_ns = s->now_ns};
    return controller_observe(c, &st);
}

/* Runs `windows` windows; limits[i] = limit after window i (if limits != NULL). */
static void sim_run(struct sim *s, struct controller *c, int windows, uint32_t *limits)
{
    for (int w = 0; w < windows; w++) {
        for (uint32_t i = 0; i < c->cfg.interval; i++) sim_step(s, c);
        if (limits) limits[w] = controller_limit(c);
        if (getenv("CTRL_TRACE") && c->ev_count) {
            static uint64_t last_t;
            const struct controller_event *e =
                &c->events[(c->ev_head + c->ev_count - 1) % CONTROLLER_EVENTS];
            if (e->t_ns != last_t) printf("w%d event %s\n", w, e->reason);
            last_t = e->t_ns;
        }
        if (getenv("CTRL_TRACE"))
            printf("w%d limit %u ema %.2f p99 %.2f slope %.3f ceil %u pf %.1f/step %.3f ms/tok\n",
                   w, controller_limit(c), c->ema_ms, c->last_p99_ms, c->slope, c->ceiling,
                   c->prefill_per_step, c->pf_tok > 0 ? c->pf_ms / c->pf_tok : 0.0);
    }
}

static uint32_t best_limit(double base, double per, double target, uint32_t lo, uint32_t hi)
{
    double l = floor((target - base) / per);
    if (l < lo) return lo;
    if (l > hi) return hi;
    return (uint32_t)l;
}

static void init_default(struct controller *c, struct controller_config *cfg)
{
    controller_config_default(cfg);
    assert_int_equal(controller_init(c, cfg, 0), KRS_OK);
}

/* max-min of the last n limits, relative to their mean. */
static double spread(const uint32_t *v, int n)
{
    uint32_t lo = v[0], hi = v[0];
    double sum = 0;
    for (int i = 0; i < n; i++) {
        if (v[i] < lo) lo = v[i];
        if (v[i] > hi) hi = v[i];
        sum += v[i];
    }
    return (double)(hi - lo) / (sum / n);
}

static int reversals(const uint32_t *v, int n)
{
    int r = 0, dir = 0;
    for (int i = 1; i < n; i++) {
        int d = v[i] > v[i - 1] ? 1 : v[i] < v[i - 1] ? -1 : 0;
        if (d && dir && d != dir) r++;
        if (d) dir = d;
    }
    return r;
}

static void check_converges(double base, double per)
{
    struct controller c;
    struct controller_config cfg;
    init_default(&c, &cfg);
    struct sim s = {.base_ms = base, .per_seq_ms = per, .demand = UINT32_MAX, .rng = 1};
    uint32_t lim[600];
    sim_run(&s, &c, 300, lim);
    uint32_t best = best_limit(base, per, cfg.p99_target_ms, cfg.min_batch, cfg.max_batch);
    /* ...or the knee, where one more sequence adds < knee_gain of a sequence's share. */
    uint32_t knee = (uint32_t)floor(base * (1.0 / cfg.knee_gain - 1.0) / per + 1e-9) + 1;
    if (knee < best) best = knee;
    uint32_t final = lim[299];
    /* Meets the target, and is the best limit or within one grow step (10 %) below it. */
    assert_true(base + per * final <= cfg.p99_target_ms);
    /* (a knee under the first probe is found by that probe: it may stay one over) */
    assert_true(final <= (knee < 2 ? 2 : best));
    assert_true((double) final >= 0.9 * best);
    /* Holds steady: the last 100 windows vary by at most 5 %. */
    assert_true(spread(lim + 200, 100) <= 0.05);
    struct controller_snapshot snap;
    assert_int_equal(controller_state(&c, &snap), KRS_OK);
    assert_int_equal(snap.mode, CONTROLLER_MODE_TUNING);
    assert_int_equal(snap.limit, final);
    assert_int_equal(snap.degradations, 0);
    assert_true(snap.adjustments >= 1);
    assert_true(fabs(snap.ema_p99_ms - (base + per * final)) < 1e-3);
}

static void test_converges_linear_model(void **state)
{
    check_converges(20.0, 5.0); /* L* = 16 */
    check_converges(80.0, 1.0); /* L* = 20: large fixed cost, cheap sequences */
    check_converges(10.0, 1.0); /* L* = 90 > max: pinned at max_batch 32 */
    check_converges(5.0, 30.0); /* L* = 3, but the knee is 1: a second sequence adds 8 % */
}

static void test_step_change_shrinks(void **state)
{
    struct controller c;
    struct controller_config cfg;
    init_default(&c, &cfg);
    struct sim s = {.base_ms = 20, .per_seq_ms = 5, .demand = UINT32_MAX, .rng = 7};
    sim_run(&s, &c, 200, NULL);
    uint32_t before = controller_limit(&c);
    assert_true(before >= 15 && before <= 16);
    /* Every sequence becomes 50 % more expensive: L* = floor(80 / 7.5) = 10. The window P99
     * (20 + 7.5 * 16 = 140 ms) is below 2x target, so this is tuning, not degradation. */
    s.per_seq_ms = 7.5;
    uint32_t lim[600];
    sim_run(&s, &c, 200, lim);
    uint32_t after = lim[199];
    assert_true(20 + 7.5 * after <= 100.0);
    assert_true(after >= 9 && after <= 10);
    assert_true(spread(lim + 100, 100) <= 0.05 + 1e-9);
    struct controller_snapshot snap;
    controller_state(&c, &snap);
    assert_int_equal(snap.degradations, 0);
    assert_int_equal(snap.mode, CONTROLLER_MODE_TUNING);
    /* The last event is a shrink with its reason. */
    assert_true(snap.n_events >= 1);
    const struct controller_event *last = &snap.events[snap.n_events - 1];
    assert_int_equal(last->kind, CONTROLLER_EVENT_SHRINK);
    assert_non_null(strstr(last->reason, "> target 100.0 ms"));
    /* And it comes back up when the cost drops again. */
    s.per_seq_ms = 5.0;
    sim_run(&s, &c, 300, lim);
    assert_true(lim[299] >= 14 && lim[299] <= 16);
}

static void test_noise_does_not_oscillate(void **state)
{
    for (uint64_t seed = 1; seed <= 5; seed++) {
        struct controller c;
        struct controller_config cfg;
        init_default(&c, &cfg);
        /* +-8 ms of uniform noise on a 100 ms target: the window P99 (max of 10 samples) is
         * ~+6 ms above the mean. */
        struct sim s = {.base_ms = 20,
                        .per_seq_ms = 5,
                        .noise_ms = 8,
                        .demand = UINT32_MAX,
                        .rng = 0x9e3779b97f4a7c15ull * seed};
        uint32_t lim[600];
        sim_run(&s, &c, 600, lim);
        /* After settling: no back-and-forth, limit within 5 % and near the noisy optimum
         * (mean latency + P99 noise <= target gives 14..16). */
        assert_true(reversals(lim + 300, 300) <= 2);
        assert_true(spread(lim + 500, 100) <= 0.07);
        assert_true(lim[599] >= 12 && lim[599] <= 16);
        struct controller_snapshot snap;
        controller_state(&c, &snap);
        assert_int_equal(snap.degradations, 0);
        assert_true(snap.adjustments < 40);
    }
}

static void test_spike_degrades_and_recovers(void **state)
{
    struct controller c;
    struct controller_config cfg;
    init_default(&c, &cfg);
    struct sim s = {.base_ms = 20, .per_seq_ms = 5, .demand = UINT32_MAX, .rng = 3};
    sim_run(&s, &c, 200, NULL);
    uint32_t before = controller_limit(&c);
    assert_true(before >= 15);
    struct controller_snapshot snap;
    controller_state(&c, &snap);
    double ema = snap.ema_p99_ms;

    /* One slow step in a window (a host hiccup) is an outlier: left out of the window's P99,
     * nothing changes. */
    s.spike_ms = 312.0;
    sim_run(&s, &c, 1, NULL);
    controller_state(&c, &snap);
    assert_int_equal(snap.mode, CONTROLLER_MODE_TUNING);
    assert_int_equal(snap.limit, before);
    assert_int_equal(snap.outliers, 1);
    assert_true(snap.last_window_p99_ms <= cfg.p99_target_ms);
    assert_true(fabs(snap.ema_p99_ms - ema) < 1.0);
    sim_run(&s, &c, 5, NULL);
    controller_state(&c, &snap);
    assert_int_equal(snap.limit, before);
    ema = snap.ema_p99_ms;

    /* Two slow steps in a window (e.g. the host swapped): the window P99 is 312 ms. */
    s.spike_ms = 312.0;
    s.spike_steps = 2;
    uint64_t t_spike_window_end = 0;
    for (uint32_t i = 0; i < cfg.interval; i++) {
        sim_step(&s, &c);
        t_spike_window_end = s.now_ns;
    }
    controller_state(&c, &snap);
    assert_int_equal(snap.mode, CONTROLLER_MODE_DEGRADED);
    assert_int_equal(snap.limit, cfg.fixed_batch);
    assert_int_equal(snap.degradations, 1);
    assert_true(fabs(snap.last_window_p99_ms - 312.0) < 1e-6);
    assert_true(fabs(snap.ema_p99_ms - ema) < 1e-9); /* the spike is not folded in */
    const struct controller_event *ev = &snap.events[snap.n_events - 1];
    assert_int_equal(ev->kind, CONTROLLER_EVENT_DEGRADE);
    assert_int_equal(ev->old_limit, before);
    assert_int_equal(ev->new_limit, cfg.fixed_batch);
    assert_int_equal(ev->t_ns, t_spike_window_end);
    char want[128];
    snprintf(want, sizeof want,
             "p99 312.0 ms > 2.0x target 100.0 ms and 1.5x ema %.1f ms (2 of 10 steps)", ema);
    assert_non_null(strstr(ev->reason, want));

    /* Calm: the limit stays at the fallback until calm_period_ms has passed... */
    uint64_t calm_ns = cfg.calm_period_ms * 1000000ull;
    while (s.now_ns + 200000000ull < t_spike_window_end + calm_ns) {
        sim_step(&s, &c);
        assert_int_equal(controller_limit(&c), cfg.fixed_batch);
        controller_state(&c, &snap);
        assert_int_equal(snap.mode, CONTROLLER_MODE_DEGRADED);
    }
    /* ...then the first window after it recovers and tuning resumes. */
    sim_run(&s, &c, 3, NULL);
    controller_state(&c, &snap);
    assert_int_equal(snap.mode, CONTROLLER_MODE_TUNING);
    assert_int_equal(snap.recoveries, 1);
    int found = 0;
    for (uint32_t i = 0; i < snap.n_events; i++)
        if (snap.events[i].kind == CONTROLLER_EVENT_RECOVER) {
            found = 1;
            assert_true(snap.events[i].t_ns - t_spike_window_end >= calm_ns);
            assert_non_null(strstr(snap.events[i].reason, "recovered"));
        }
    assert_true(found);
    uint32_t lim[600];
    sim_run(&s, &c, 300, lim);
    assert_true(lim[299] >= 15 && lim[299] <= 16);
    controller_state(&c, &snap);
    assert_int_equal(snap.degradations, 1);
}

static void test_repeated_spikes_extend_calm(void **state)
{
    struct controller c;
    struct controller_config cfg;
    init_default(&c, &cfg);
    struct sim s = {.base_ms = 20, .per_seq_ms = 5, .demand = UINT32_MAX, .rng = 5};
    sim_run(&s, &c, 200, NULL);
    s.spike_ms = 400;
    s.spike_steps = 2;
    sim_run(&s, &c, 1, NULL);
    assert_int_equal(c.mode, CONTROLLER_MODE_DEGRADED);
    /* A spike every ~5 s keeps it degraded (calm period 10 s). At the fallback of 4 a window
     * takes 10 * 40 ms = 0.4 s. */
    for (int k = 0; k < 5; k++) {
        sim_run(&s, &c, 12, NULL);
        s.spike_ms = 400;
        s.spike_steps = 2;
        sim_run(&s, &c, 1, NULL);
        assert_int_equal(c.mode, CONTROLLER_MODE_DEGRADED);
    }
    struct controller_snapshot snap;
    controller_state(&c, &snap);
    assert_int_equal(snap.degradations, 1);
    assert_int_equal(snap.recoveries, 0);
    sim_run(&s, &c, 30, NULL); /* 12 s of calm */
    assert_int_equal(c.mode, CONTROLLER_MODE_TUNING);
}

/* Far under target with a queue. The limit alone (as after a degradation): the first window
 * probes a second size (+50 %, 4 -> 6), then with a slope growth takes big steps (4 reaches
 * the optimum 32 in a few windows, not +1 per window). With admission (the engine's path):
 * a cold start runs everything that fits (32) at once, one window probes 24, and it holds 32. */
static void test_converges_fast_from_low_limit(void **state)
{
    struct controller c;
    struct controller_config cfg;
    controller_config_default(&cfg);
    cfg.initial_batch = 4;
    assert_int_equal(controller_init(&c, &cfg, 0), KRS_OK);
    struct sim s = {
        .base_ms = 20, .per_seq_ms = 2, .demand = UINT32_MAX, .limit_only = 1, .rng = 5};
    uint32_t lim[40];
    sim_run(&s, &c, 40, lim);
    assert_int_equal(lim[0], 6);
    int reached = -1;
    for (int i = 0; i < 40 && reached < 0; i++)
        if (lim[i] == 32) reached = i;
    assert_true(reached >= 0 && reached <= 8);
    for (int i = reached; i < 40; i++) assert_int_equal(lim[i], 32);

    assert_int_equal(controller_init(&c, &cfg, 0), KRS_OK);
    struct sim a = {.base_ms = 20, .per_seq_ms = 2, .demand = UINT32_MAX, .rng = 5};
    assert_int_equal(controller_admit_limit(&c), 32);
    sim_run(&a, &c, 1, lim);
    assert_int_equal(lim[0], 24); /* the probe: 32 ran, at max_batch, so down a quarter */
    assert_int_equal(controller_admit_limit(&c), 24);
    sim_run(&a, &c, 40, lim);
    reached = -1;
    for (int i = 0; i < 40 && reached < 0; i++)
        if (lim[i] == 32) reached = i;
    assert_true(reached >= 0 && reached <= 4);
    for (int i = reached; i < 40; i++) assert_int_equal(lim[i], 32);
    assert_int_equal(controller_admit_limit(&c), 32);
}

/* Load steps: light load moves nothing; more concurrent requests than the limit grow it to the
 * optimum within a few windows; once the line is fitted the limit sits at what the engine can
 * take (not at the current demand), so the next burst is admitted at once; load dropping
 * changes nothing (latency is fine). */
static void test_load_step(void **state)
{
    struct controller c;
    struct controller_config cfg;
    controller_config_default(&cfg);
    cfg.initial_batch = 8;
    assert_int_equal(controller_init(&c, &cfg, 0), KRS_OK);
    /* Only 2 requests, nothing waiting: the batch never fills, the limit never moves. */
    struct sim s = {.base_ms = 20, .per_seq_ms = 5, .demand = 2, .rng = 11};
    uint32_t lim[600];
    sim_run(&s, &c, 200, lim);
    for (int i = 0; i < 200; i++) assert_int_equal(lim[i], 8);
    struct controller_snapshot snap;
    controller_state(&c, &snap);
    assert_int_equal(snap.adjustments, 0);

    /* Load step to 12 concurrent requests: within 6 windows the limit takes all of them, and
     * it goes on to the latency-bound optimum 16 (knee 17) without a queue. */
    s.demand = 12;
    sim_run(&s, &c, 100, lim);
    int at = -1;
    for (int i = 0; i < 100 && at < 0; i++)
        if (lim[i] >= 12) at = i;
    assert_true(at >= 0 && at <= 6);
    assert_true(lim[99] >= 15 && lim[99] <= 16);
    controller_state(&c, &snap);
    assert_int_equal(snap.knee_limit, 17);
    assert_true(snap.capacity_limit >= 15 && snap.capacity_limit <= 16);
    assert_true(fabs(snap.intercept_ms - 20.0) < 0.5);
    /* Unbounded queue: stays at the optimum, steady. */
    s.demand = UINT32_MAX;
    sim_run(&s, &c, 200, lim);
    assert_true(lim[199] >= 15 && lim[199] <= 16);
    assert_true(spread(lim + 100, 100) <= 0.05 + 1e-9);
    /* Load drops: nothing shrinks it (latency is fine) and it never passes the optimum. */
    s.demand = 3;
    uint32_t held = lim[199];
    sim_run(&s, &c, 100, lim);
    for (int i = 0; i < 100; i++) assert_true(lim[i] >= held && lim[i] <= 16);
}

/* The knee: with a loose latency target the limit stops where one more sequence adds less
 * than knee_gain of a sequence's share of throughput (20 + 5 n: n = 17), not at max_batch;
 * past it only while queued requests miss the first-token target (goodput). */
static void test_knee(void **state)
{
    struct controller c;
    struct controller_config cfg;
    controller_config_default(&cfg);
    cfg.p99_target_ms = 1000.0;
    cfg.max_batch = 64;
    cfg.initial_batch = 4;
    assert_int_equal(controller_init(&c, &cfg, 0), KRS_OK);
    struct sim s = {.base_ms = 20, .per_seq_ms = 5, .demand = UINT32_MAX, .rng = 21};
    uint32_t lim[600];
    sim_run(&s, &c, 100, lim);
    assert_int_equal(lim[99], 17);
    assert_true(spread(lim + 50, 50) <= 1e-9);
    struct controller_snapshot snap;
    controller_state(&c, &snap);
    assert_int_equal(snap.knee_limit, 17);
    assert_true(snap.capacity_limit >= 60);
    /* (a cold start ran all 64 at once; a probe at 48 gave the slope; then down to the knee) */
    const struct controller_event *ev = &snap.events[snap.n_events - 1];
    assert_int_equal(ev->kind, CONTROLLER_EVENT_SHRINK);
    assert_non_null(strstr(ev->reason, "down to the knee"));
    assert_non_null(strstr(ev->reason, "knee 17"));
    assert_int_equal(controller_admit_limit(&c), 17);
    /* Throughput at the knee is >= 80 % of the asymptote 1000 / 5 = 200 seq/s... */
    assert_true(17.0 / (20 + 5 * 17) * 1000 >= 0.8 * 200 * 0.95);
    /* ...and requests that waited 1.5 s (> ttft target 1 s) take it to capacity (64). */
    s.wait_ms = 1500;
    sim_run(&s, &c, 20, lim);
    assert_int_equal(lim[19], 64);
    controller_state(&c, &snap);
    assert_non_null(strstr(snap.events[snap.n_events - 1].reason, "ttft target"));

    /* A GPU-like cost (flat: 8 ms + 0.01 ms per sequence): the knee is far away, the limit
     * reaches max_batch 256 (within the 5 % hold band) from 32 in a few windows. */
    controller_config_default(&cfg);
    cfg.max_batch = 256;
    cfg.initial_batch = 32;
    assert_int_equal(controller_init(&c, &cfg, 0), KRS_OK);
    struct sim g = {.base_ms = 8, .per_seq_ms = 0.01, .demand = UINT32_MAX, .rng = 23};
    sim_run(&g, &c, 12, lim);
    assert_true(lim[11] >= 244 && lim[11] <= 256);
}

/* Steady hold: a closed loop whose demand wanders (12..40 requests, noisy steps) keeps the limit
 * within +-5 % over the second half. */
static void test_steady_hold(void **state)
{
    for (uint64_t seed = 1; seed <= 5; seed++) {
        struct controller c;
        struct controller_config cfg;
        controller_config_default(&cfg);
        assert_int_equal(controller_init(&c, &cfg, 0), KRS_OK);
        struct sim s = {.base_ms = 20,
                        .per_seq_ms = 5,
                        .noise_ms = 5,
                        .demand = 20,
                        .rng = 0x2545f4914f6cdd1dull * seed};
        uint32_t lim[400];
        for (int w = 0; w < 400; w++) {
            s.demand = 12 + (uint32_t)(sim_uniform(&s) * 29);
            s.wait_ms = s.demand > controller_limit(&c) ? 300 : 0;
            sim_run(&s, &c, 1, lim + w);
        }
        double lo = lim[200], hi = lim[200];
        for (int i = 200; i < 400; i++) {
            if (lim[i] < lo) lo = lim[i];
            if (lim[i] > hi) hi = lim[i];
        }
        assert_true(hi - lo <= 0.1 * (hi + lo) / 2 + 1e-9); /* +-5 % */
        assert_true(lo >= 12 && hi <= 16);
    }
}

/* A saturated closed loop (16 clients; the knee near 6, capacity 14-15): with the limit at the knee
 * the oldest queued request waits 1.5 s, past the 1 s first-token target; past the knee 0.6 s.
 * The limit goes to capacity and stays there while requests still queue, instead of swinging
 * between knee and capacity at every window; once nobody queues the late episode ends. */
static void test_saturated_late_queue_holds(void **state)
{
    struct controller c;
    struct controller_config cfg;
    init_default(&c, &cfg);
    struct sim s = {.base_ms = 10, .per_seq_ms = 6, .demand = 16, .limit_only = 1, .rng = 31};
    uint32_t lim[200];
    for (int w = 0; w < 200; w++) {
        s.wait_ms = controller_limit(&c) <= 8 ? 1500 : 600;
        sim_run(&s, &c, 1, lim + w);
    }
    struct controller_snapshot snap;
    controller_state(&c, &snap);
    printf("knee %u, capacity %u, limit %u\n", snap.knee_limit, snap.capacity_limit, lim[199]);
    assert_true(snap.knee_limit >= 5 && snap.knee_limit <= 7);
    assert_true(lim[199] >= 13 && lim[199] <= 15);
    assert_true(spread(lim + 100, 100) <= 0.1 + 1e-9); /* +-5 % */
    assert_true(10 + 6 * lim[199] <= cfg.p99_target_ms);
    assert_true(c.goodput_hold);
    s.demand = 4; /* nobody queues: the episode ends */
    s.wait_ms = 0;
    sim_run(&s, &c, 3, lim);
    assert_false(c.goodput_hold);
}

/* Prompt-length step: prompts go from 20 to 700 tokens (2 ms a token). Chunks are sized to
 * the room the decodes leave, the limit shrinks within a few windows when it leaves no room
 * for them, and after settling no step is over target while prompts still progress. */
static void test_prompt_length_step(void **state)
{
    struct controller c;
    struct controller_config cfg;
    controller_config_default(&cfg);
    assert_int_equal(controller_init(&c, &cfg, 0), KRS_OK);
    struct sim s = {.base_ms = 20,
                    .per_seq_ms = 5,
                    .demand = UINT32_MAX,
                    .pf_ms = 2.0,
                    .prompt_len = 20,
                    .prompt_every = 16,
                    .rng = 31};
    uint32_t lim[600];
    sim_run(&s, &c, 200, lim);
    uint32_t before = lim[199];
    assert_true(before >= 11 && before <= 16);
    struct controller_snapshot snap;
    controller_state(&c, &snap);
    assert_true(fabs(snap.prefill_ms_per_token - 2.0) < 0.5);
    /* 700-token prompts, one per 50 steps: 14 tokens a step. */
    s.prompt_len = 700;
    s.prompt_every = 50;
    /* Within 5 windows (shrinking if the limit left no room for the chunks) no step is over
     * target any more, and the limit did not collapse. */
    sim_run(&s, &c, 5, lim);
    s.max_step_ms = 0;
    sim_run(&s, &c, 295, lim);
    assert_true(s.max_step_ms <= cfg.p99_target_ms);
    assert_true(lim[294] <= before && lim[294] >= 8);
    s.max_step_ms = 0;
    uint64_t done = s.pf_done;
    sim_run(&s, &c, 100, lim);
    assert_true(s.max_step_ms <= cfg.p99_target_ms);
    assert_true(s.pf_done - done >= 100 * 10 * cfg.min_prefill_chunk);
    assert_true(spread(lim, 100) <= 0.05 + 1e-9);
    controller_state(&c, &snap);
    assert_int_equal(snap.degradations, 0);
    /* From a limit that leaves no room (no prompts before: 15..16 at 95..100 ms), long
     * prompts arriving shrink it within 5 windows; from window 10 on no step is over target. */
    assert_int_equal(controller_init(&c, &cfg, 0), KRS_OK);
    struct sim t = {.base_ms = 20, .per_seq_ms = 5, .demand = UINT32_MAX, .pf_ms = 2.0, .rng = 37};
    sim_run(&t, &c, 200, lim);
    before = lim[199];
    assert_true(before >= 15 && before <= 16);
    t.prompt_len = 700;
    t.prompt_every = 50;
    sim_run(&t, &c, 10, lim);
    int shrunk = -1;
    for (int i = 0; i < 10 && shrunk < 0; i++)
        if (lim[i] < before) shrunk = i;
    assert_true(shrunk >= 0 && shrunk <= 5);
    t.max_step_ms = 0;
    done = t.pf_done;
    sim_run(&t, &c, 100, lim);
    assert_true(t.max_step_ms <= cfg.p99_target_ms);
    assert_true(t.pf_done - done >= 100 * 10 * cfg.min_prefill_chunk);
    assert_true(spread(lim, 100) <= 0.10 + 1e-9);
    /* The chunk budget follows the decode load: more room next to fewer sequences. */
    assert_true(controller_prefill_budget(&c, 2, 512) > controller_prefill_budget(&c, 10, 512));
    assert_true(controller_prefill_budget(&c, 30, 512) == cfg.min_prefill_chunk);
}

/* Admission at low load: a request does not wait for a tuning window when the engine can take
 * it. Before anything is measured the engine takes what fits (max_batch); once the step-time
 * line is fitted it takes up to its capacity within target even while the limit is low; when
 * the windows run over target (saturation) the limit decides; degraded and fixed modes admit
 * up to the limit only. */
static void test_admit_at_low_load(void **state)
{
    struct controller c;
    struct controller_config cfg;
    controller_config_default(&cfg);
    cfg.initial_batch = 4;
    assert_int_equal(controller_init(&c, &cfg, 0), KRS_OK);
    assert_int_equal(controller_limit(&c), 4);
    assert_int_equal(controller_admit_limit(&c), cfg.max_batch);
    /* Two requests at a time (20 + 5 n ms): no queue and one batch size, so no slope and no
     * growth; admission assumes the whole step scales with the batch: 2 * 100 / 30 = 6. */
    struct sim s = {.base_ms = 20, .per_seq_ms = 5, .demand = 2, .rng = 41};
    sim_run(&s, &c, 20, NULL);
    struct controller_snapshot snap;
    controller_state(&c, &snap);
    assert_int_equal(snap.limit, 4);
    assert_int_equal(snap.knee_limit, 0);
    assert_int_equal(snap.admit_limit, 6);
    assert_int_equal(snap.admit_limit, controller_admit_limit(&c));
    /* Load wandering between 1 and 3 requests: the fit sees several batch sizes; admission
     * takes the capacity within target (L* = 16) at once, whatever the limit's growth. */
    for (int w = 0; w < 60; w++) {
        s.demand = 1 + (uint32_t)(sim_uniform(&s) * 3);
        sim_run(&s, &c, 1, NULL);
    }
    controller_state(&c, &snap);
    assert_true(snap.admit_limit >= 15 && snap.admit_limit <= 16);
    assert_true(snap.admit_limit >= snap.limit);
    /* A burst of 12 runs at once (first step), and no step goes over target. */
    s.demand = 12;
    s.max_step_ms = 0;
    uint32_t before = s.demand < controller_admit_limit(&c) ? s.demand : 0;
    assert_int_equal(before, 12);
    uint32_t lim[100];
    sim_run(&s, &c, 50, lim);
    assert_true(s.max_step_ms <= cfg.p99_target_ms);
    controller_state(&c, &snap);
    assert_int_equal(snap.degradations, 0);
    assert_true(spread(lim + 25, 25) <= 0.10 + 1e-9); /* +-5 % */

    /* Saturation: every sequence becomes 3x as expensive (20 + 15 n): the windows go over
     * target, admission falls back to the limit, which shrinks. */
    s.per_seq_ms = 15;
    s.demand = UINT32_MAX;
    sim_run(&s, &c, 1, NULL);
    assert_int_equal(controller_admit_limit(&c), controller_limit(&c));
    sim_run(&s, &c, 100, lim);
    uint32_t l = lim[99];
    assert_true(l >= 4 && l <= 5); /* L* = floor(80 / 15) = 5 */
    assert_true(controller_admit_limit(&c) <= 5);

    /* Degraded and fixed modes: the limit. */
    s.spike_ms = 900;
    s.spike_steps = 3;
    sim_run(&s, &c, 1, NULL);
    assert_int_equal(c.mode, CONTROLLER_MODE_DEGRADED);
    assert_int_equal(controller_admit_limit(&c), controller_limit(&c));
    assert_int_equal(controller_set_enabled(&c, false, s.now_ns), KRS_OK);
    assert_int_equal(controller_admit_limit(&c), cfg.fixed_batch);
    assert_int_equal(controller_admit_limit(NULL), 0);
}

/* A cold burst admitted at max_batch (nothing measured yet) that is over target: the shrink
 * starts from the concurrency that ran, not from the lower limit, and the engine settles at
 * the optimum without degrading. */
static void test_cold_burst_settles(void **state)
{
    struct controller c;
    struct controller_config cfg;
    controller_config_default(&cfg);
    cfg.initial_batch = 4;
    assert_int_equal(controller_init(&c, &cfg, 0), KRS_OK);
    struct sim s = {.base_ms = 20, .per_seq_ms = 5, .demand = UINT32_MAX, .rng = 43};
    uint32_t lim[200];
    sim_run(&s, &c, 1, lim); /* 32 ran: 180 ms a step, no slope: probe another size */
    struct controller_snapshot snap;
    controller_state(&c, &snap);
    assert_int_equal(snap.limit, 24);
    assert_int_equal(snap.admit_limit, 24);
    const struct controller_event *ev = &snap.events[snap.n_events - 1];
    assert_non_null(strstr(ev->reason, "at 32 running, no slope yet"));
    sim_run(&s, &c, 1, lim); /* 24 ran: 140 ms; now with a slope, shrink from what ran */
    controller_state(&c, &snap);
    ev = &snap.events[snap.n_events - 1];
    assert_int_equal(ev->kind, CONTROLLER_EVENT_SHRINK);
    assert_int_equal(ev->old_limit, 24);
    assert_non_null(strstr(ev->reason, "at 24.0 running"));
    assert_true(snap.limit < 24 && snap.admit_limit == snap.limit);
    sim_run(&s, &c, 200, lim);
    assert_true(lim[199] >= 15 && lim[199] <= 16);
    assert_true(spread(lim + 100, 100) <= 0.05 + 1e-9);
    s.max_step_ms = 0;
    sim_run(&s, &c, 50, NULL);
    assert_true(s.max_step_ms <= cfg.p99_target_ms);
    controller_state(&c, &snap);
    assert_int_equal(snap.degradations, 0);
}

/* Prompt chunks: with nothing decoding there is no stream to protect (the whole token budget);
 * next to decodes, before a prompt token's cost was measured, it is estimated as one more
 * decoding row (the fitted slope), then the measured cost takes over. */
static void test_prefill_budget(void **state)
{
    struct controller c;
    struct controller_config cfg;
    controller_config_default(&cfg);
    assert_int_equal(controller_init(&c, &cfg, 0), KRS_OK);
    assert_int_equal(controller_prefill_budget(&c, 0, 512), 512);
    assert_int_equal(controller_prefill_budget(&c, 4, 512), cfg.min_prefill_chunk);
    struct sim s = {.base_ms = 20, .per_seq_ms = 5, .demand = UINT32_MAX, .rng = 47};
    sim_run(&s, &c, 100, NULL);
    /* (90 - (20 + 5 * 4)) / 5 = 10 tokens next to 4 decodes, from the slope alone */
    uint32_t b4 = controller_prefill_budget(&c, 4, 512);
    assert_true(b4 >= 9 && b4 <= 10);
    assert_int_equal(controller_prefill_budget(&c, 0, 512), 512);
    /* Prompts measured at 0.5 ms a token: (90 - 40) / 0.5 = 100 next to 4 decodes. */
    s.pf_ms = 0.5;
    s.prompt_len = 64;
    s.prompt_every = 4;
    sim_run(&s, &c, 100, NULL);
    struct controller_snapshot snap;
    controller_state(&c, &snap);
    assert_true(fabs(snap.prefill_ms_per_token - 0.5) < 0.2);
    uint32_t m4 = controller_prefill_budget(&c, 4, 512);
    assert_true(m4 >= 70 && m4 <= 140);
    assert_int_equal(controller_prefill_budget(&c, 4, 50), 50);
    /* A step of prompt tokens alone enters no window: no stream waited on it. */
    uint64_t windows = snap.windows;
    struct controller_step st = {.latency_ns = 5000000000ull, .n_prefill = 512, .now_ns = 1};
    for (int i = 0; i < 40; i++) controller_observe(&c, &st);
    controller_state(&c, &snap);
    assert_int_equal(snap.windows, windows);
    assert_int_equal(snap.degradations, 0);
}

/* A busy shared host (the 2-core VM under other people's builds): the fixed cost alone (250 ms
 * a step, +-150 ms of noise) is over the 100 ms target at any batch size. Shrinking would only
 * lose throughput: one probe gives the fit its slope, the target is found unreachable, and
 * the limit goes to the knee (250 * 4 / 10 + 1 > max: 32), so 16 closed-loop clients all run
 * instead of waiting in the queue; no degradation from the noise (nor from bursts of two
 * 800 ms steps: they do not stand out of it). */
static void test_busy_host_runs_at_knee(void **state)
{
    for (uint64_t seed = 1; seed <= 3; seed++) {
        struct controller c;
        struct controller_config cfg;
        controller_config_default(&cfg);
        cfg.initial_batch = 4;
        assert_int_equal(controller_init(&c, &cfg, 0), KRS_OK);
        struct sim s = {.base_ms = 250,
                        .per_seq_ms = 10,
                        .noise_ms = 150,
                        .demand = 4,
                        .wait_ms = 3000,
                        .rng = 0x51ed2701ull * seed};
        sim_run(&s, &c, 5, NULL); /* a warm-up of 4 requests: 290 ms, over target */
        s.demand = 16;
        uint32_t lim[60];
        for (int w = 0; w < 60; w++) {
            if (w % 7 == 3) { /* bursts of contention: two steps at 800 ms now and then */
                s.spike_ms = 800;
                s.spike_steps = 2;
            }
            sim_run(&s, &c, 1, lim + w);
        }
        int at = -1;
        for (int i = 0; i < 60 && at < 0; i++)
            if (controller_admit_limit(&c) >= 16 && lim[i] >= 16) at = i;
        assert_true(at >= 0 && at <= 20);
        for (int i = 40; i < 60; i++) assert_true(lim[i] >= 16);
        struct controller_snapshot snap;
        controller_state(&c, &snap);
        assert_int_equal(snap.degradations, 0);
        assert_non_null(strstr(snap.events[snap.n_events - 1].reason, "unreachable"));
        /* Prompt chunks: every step misses the target anyway, so a prompt may add half a
         * decode step (~400 ms at 16, 10 ms a token from the slope), not a minimum chunk. */
        uint32_t b = controller_prefill_budget(&c, 16, 512);
        assert_true(b >= 2 * cfg.min_prefill_chunk && b <= 40);
    }
}

/* The same busy host with sequences that cost more (250 + 80 n ms: the knee is 13): nobody
 * waiting past the first-token target, it runs at the knee; requests waiting 3 s in the queue
 * (past the 1 s target, while every stream misses its step target anyway) are all taken
 * (max_batch) rather than left waiting. */
static void test_busy_host_late_queue_runs_all(void **state)
{
    struct controller c;
    struct controller_config cfg;
    controller_config_default(&cfg);
    cfg.initial_batch = 4;
    assert_int_equal(controller_init(&c, &cfg, 0), KRS_OK);
    struct sim s = {.base_ms = 250, .per_seq_ms = 80, .demand = 24, .rng = 53};
    uint32_t lim[60];
    sim_run(&s, &c, 60, lim);
    assert_int_equal(lim[59], 13);
    assert_int_equal(controller_admit_limit(&c), 13);
    struct controller_snapshot snap;
    controller_state(&c, &snap);
    assert_non_null(strstr(snap.events[snap.n_events - 1].reason, "toward the knee 13"));
    s.wait_ms = 3000;
    sim_run(&s, &c, 1, lim);
    assert_int_equal(controller_admit_limit(&c), cfg.max_batch);
    sim_run(&s, &c, 10, lim);
    assert_int_equal(controller_admit_limit(&c), cfg.max_batch); /* all 24 run */
    assert_true(lim[9] >= 24);
    controller_state(&c, &snap);
    assert_non_null(strstr(snap.events[snap.n_events - 1].reason, "all waiting (late)"));
    /* (and their prompts may add two decode steps, not half of one: the slope says a prompt
     * token costs 80 ms, a step at 24 is 2170 ms: 2 * 2170 / 80 = 54) */
    uint32_t late_budget = controller_prefill_budget(&c, 24, 512);
    assert_true(late_budget >= 50 && late_budget <= 56);
    assert_int_equal(snap.degradations, 0);
    /* The queue drains (nobody late any more): back to the knee. */
    s.wait_ms = 0;
    s.demand = 8;
    sim_run(&s, &c, 20, lim);
    assert_true(controller_admit_limit(&c) <= 14);
    assert_true(controller_prefill_budget(&c, 24, 512) < late_budget / 2);
}

/* Goodput when the target allows only a few sequences (60 + 20 n ms: 2 meet 100 ms, the knee
 * is 13) and 16 requests want to run: nobody late, it shrinks to what meets the target; once
 * queued requests have waited past the first-token target it does not shrink below the knee
 * (fewer sequences would only move the misses from the step target to the first token). */
static void test_late_queue_floors_shrink_at_knee(void **state)
{
    struct controller c;
    struct controller_config cfg;
    controller_config_default(&cfg);
    cfg.initial_batch = 4;
    assert_int_equal(controller_init(&c, &cfg, 0), KRS_OK);
    struct sim s = {.base_ms = 60, .per_seq_ms = 20, .demand = 16, .rng = 59};
    uint32_t lim[80];
    sim_run(&s, &c, 80, lim);
    assert_int_equal(lim[79], 2);
    assert_int_equal(controller_admit_limit(&c), 2);
    assert_int_equal(controller_init(&c, &cfg, 0), KRS_OK);
    s.wait_ms = 3000;
    sim_run(&s, &c, 80, lim);
    for (int i = 40; i < 80; i++) assert_true(lim[i] >= 12 && lim[i] <= 16);
    struct controller_snapshot snap;
    controller_state(&c, &snap);
    assert_true(snap.knee_limit >= 12 && snap.knee_limit <= 14);
    assert_int_equal(snap.degradations, 0);
}

/* Late admission (rule 4): 16 closed-loop clients where the target fits (100 - 40) / 5 = 12
 * minus the noise headroom, and the degradation threshold (2x target) fits 32. Requests that
 * waited late_wait_ms are admitted against the late bound at once, all 16 run, the limit takes
 * them in ("late" grow) and holds there steadily although every window is over the target,
 * nothing degrades, and the step stays within the late bound. Not past it: with 40 clients the
 * late admissions stop at what 200 ms allows. Degraded, late admission is the fallback. */
static void test_late_admission(void **state)
{
    struct controller c;
    struct controller_config cfg;
    controller_config_default(&cfg);
    assert_int_equal(controller_init(&c, &cfg, 0), KRS_OK);
    struct sim s = {
        .base_ms = 40, .per_seq_ms = 5, .noise_ms = 2, .demand = 16, .late = 1, .rng = 71};
    s.wait_ms = 400; /* what a queued request has waited each step */
    uint32_t lim[120];
    sim_run(&s, &c, 120, lim);
    struct controller_snapshot snap;
    controller_state(&c, &snap);
    printf("limit %u, late admit limit %u, capacity %u, p99 %.1f ms, events %u\n", lim[119],
           snap.late_admit_limit, snap.capacity_limit, snap.last_window_p99_ms, snap.n_events);
    /* (all 16 always run: no second batch size, no fitted capacity; the late limit is the
     * measured step scaled to the late bound) */
    assert_true(snap.capacity_limit <= 12);
    assert_true(snap.late_admit_limit >= 16);
    for (int i = 60; i < 120; i++) assert_int_equal(lim[i], 16);
    assert_true(s.max_step_ms <= 2.0 * cfg.p99_target_ms);
    assert_true(snap.last_window_p99_ms > cfg.p99_target_ms); /* over target, by leave */
    assert_int_equal(snap.degradations, 0);
    bool late_event = false;
    for (uint32_t i = 0; i < snap.n_events; i++)
        late_event |= strncmp(snap.events[i].reason, "late ", 5) == 0;
    assert_true(late_event);
    /* The same load without late admission (a request waits less than late_wait_ms): the
     * target holds the concurrency at its capacity. */
    assert_int_equal(controller_init(&c, &cfg, 0), KRS_OK);
    s.wait_ms = 50;
    sim_run(&s, &c, 40, lim); /* (a cold burst runs all 16 in the first window) */
    s.max_step_ms = 0;
    sim_run(&s, &c, 80, lim);
    assert_true(lim[79] >= 9 && lim[79] <= 12);
    assert_true(s.max_step_ms <= cfg.p99_target_ms + 2);
    /* 40 clients, all late: no more run than the late bound allows. */
    assert_int_equal(controller_init(&c, &cfg, 0), KRS_OK);
    s.demand = 40;
    s.wait_ms = 400;
    sim_run(&s, &c, 40, lim); /* (the cold burst again) */
    s.max_step_ms = 0;
    sim_run(&s, &c, 80, lim);
    controller_state(&c, &snap);
    printf("40 clients: limit %u, late admit limit %u, slowest step %.1f ms\n", lim[79],
           snap.late_admit_limit, s.max_step_ms);
    assert_true(snap.late_admit_limit >= 24 && snap.late_admit_limit <= 32);
    assert_true(s.max_step_ms <= 2.0 * cfg.p99_target_ms);
    assert_int_equal(snap.degradations, 0);
    /* The late bound also sizes a late prompt's chunks: (180 - (40 + 5 * 4)) / 5 = 24 tokens
     * next to 4 decodes where the target leaves (90 - 60) / 5 = 6 (min chunk 8). */
    uint32_t on_time = controller_prefill_budget(&c, 4, 512);
    uint32_t late = controller_late_prefill_budget(&c, 4, 512);
    printf("prefill budget next to 4 decodes: %u on time, %u late\n", on_time, late);
    assert_true(on_time <= 8);
    assert_true(late >= 20 && late <= 24);
    /* Degraded: the fallback size holds, late or not. */
    s.spike_ms = 900;
    s.spike_steps = 30;
    sim_run(&s, &c, 2, lim);
    controller_state(&c, &snap);
    assert_int_equal(snap.mode, CONTROLLER_MODE_DEGRADED);
    assert_int_equal(controller_late_admit_limit(&c), controller_limit(&c));
    assert_int_equal(controller_late_prefill_budget(&c, 4, 512),
                     controller_prefill_budget(&c, 4, 512));
}

/* A lone request runs, then a burst arrives (requests queued behind the one that ran): the
 * probe for a second batch size must not pull a limit of 16 down to 2 (what one more than a
 * lone request would be); the burst is admitted at 16 (a 16-core host, 16 clients after one:
 * the limit walked 2, 3, 4, 6, 16 and the burst's first tokens waited seconds). */
static void test_lone_request_then_burst(void **state)
{
    struct controller c;
    struct controller_config cfg;
    controller_config_default(&cfg);
    cfg.initial_batch = 16;
    assert_int_equal(controller_init(&c, &cfg, 0), KRS_OK);
    uint64_t now = 0;
    for (uint32_t i = 0; i < 3 * cfg.interval; i++) {
        now += 20000000;
        struct controller_step st = {.latency_ns = 20000000,
                                     .n_decode = 1,
                                     .queued = i % cfg.interval == 9 ? 15 : 0,
                                     .oldest_wait_ns = 1000000,
                                     .now_ns = now};
        controller_observe(&c, &st);
    }
    assert_int_equal(controller_limit(&c), 16);
    assert_true(controller_admit_limit(&c) >= 16);
}

/* The cost of a prompt token on a noisy host (+-150 ms a step, 1 ms a prompt token, 64-token
 * chunks every other step): measured against the mean decode step, without clipping the noisy
 * differences, it comes out near 1 ms whatever the noise does. */
static void test_prompt_cost_under_noise(void **state)
{
    for (uint64_t seed = 1; seed <= 4; seed++) {
        struct controller c;
        struct controller_config cfg;
        controller_config_default(&cfg);
        cfg.p99_target_ms = 1000.0;
        assert_int_equal(controller_init(&c, &cfg, 0), KRS_OK);
        struct sim s = {.base_ms = 250,
                        .per_seq_ms = 10,
                        .noise_ms = 150,
                        .demand = 16,
                        .pf_ms = 1.0,
                        .prompt_len = 64,
                        .prompt_every = 2,
                        .rng = 0x7f4a7c15ull * seed};
        double sum = 0;
        for (int w = 0; w < 200; w++) {
            sim_run(&s, &c, 1, NULL);
            struct controller_snapshot snap;
            controller_state(&c, &snap);
            if (w >= 100) sum += snap.prefill_ms_per_token;
        }
        double mean = sum / 100;
        assert_true(mean >= 0.6 && mean <= 1.6);
    }
}

/* Steps that carry long prompt chunks (the prefill budget's whole token budget, as for late
 * requests) are as slow as their prompt tokens make them: not a regression, no degradation;
 * the same latency without prompt tokens is one. */
static void test_prompt_steps_are_not_spikes(void **state)
{
    struct controller c;
    struct controller_config cfg;
    controller_config_default(&cfg);
    assert_int_equal(controller_init(&c, &cfg, 0), KRS_OK);
    struct sim s = {.base_ms = 20,
                    .per_seq_ms = 5,
                    .demand = 12,
                    .pf_ms = 1.0,
                    .prompt_len = 16,
                    .prompt_every = 4,
                    .rng = 61};
    sim_run(&s, &c, 100, NULL);
    struct controller_snapshot snap;
    controller_state(&c, &snap);
    assert_true(fabs(snap.prefill_ms_per_token - 1.0) < 0.3);
    for (int with_prompt = 1; with_prompt >= 0; with_prompt--) {
        /* two steps of 12 decodes + 512 prompt tokens (80 + 512 ms), then ordinary ones */
        for (uint32_t i = 0; i < cfg.interval; i++) {
            uint64_t ns = i < 2 ? 592000000ull : 80000000ull;
            s.now_ns += ns;
            struct controller_step st = {.latency_ns = ns,
                                         .n_decode = 12,
                                         .n_prefill = i < 2 && with_prompt ? 512 : 0,
                                         .now_ns = s.now_ns};
            controller_observe(&c, &st);
        }
        controller_state(&c, &snap);
        assert_int_equal(snap.degradations, with_prompt ? 0 : 1);
        sim_run(&s, &c, 50, NULL); /* (the EMA and the noise level settle again) */
    }
}

static void test_bounds_respected(void **state)
{
    struct controller c;
    struct controller_config cfg;
    controller_config_default(&cfg);
    cfg.min_batch = 2;
    cfg.max_batch = 6;
    cfg.fixed_batch = 3;
    assert_int_equal(controller_init(&c, &cfg, 0), KRS_OK);
    assert_int_equal(controller_limit(&c), 2);
    /* Cheap steps (1 + n ms): grows to the knee, 1 * 4 / 1 + 1 = 5, within max, and stays. */
    struct sim s = {.base_ms = 1, .per_seq_ms = 1, .demand = UINT32_MAX, .rng = 13};
    uint32_t lim[600];
    sim_run(&s, &c, 100, lim);
    for (int i = 0; i < 100; i++) assert_true(lim[i] >= 2 && lim[i] <= 6);
    assert_int_equal(lim[99], 5);
    /* Expensive sequences (slow drift, not a spike): 1 + 40 n ms meets the target only at
     * the minimum 2; shrinks to it and never below. */
    for (int k = 0; k < 13; k++) {
        s.per_seq_ms += 3;
        sim_run(&s, &c, 10, lim);
        for (int i = 0; i < 10; i++) assert_true(lim[i] >= 2 && lim[i] <= 6);
    }
    sim_run(&s, &c, 30, lim);
    assert_int_equal(controller_limit(&c), 2);
    /* The host becomes so slow that even the minimum misses the target (fixed cost 300 ms):
     * a spike (degraded, fallback 3), and after the calm period fewer sequences would only
     * lose throughput, so it goes to the knee (300 * 4 / 40 + 1 = 31, capped at max 6). */
    s.base_ms = 300;
    sim_run(&s, &c, 60, lim);
    for (int i = 0; i < 60; i++) assert_true(lim[i] >= 2 && lim[i] <= 6);
    assert_int_equal(controller_limit(&c), 6);
    struct controller_snapshot snap;
    controller_state(&c, &snap);
    assert_int_equal(snap.degradations, 1);
    assert_int_equal(snap.recoveries, 1);
    assert_non_null(strstr(snap.events[snap.n_events - 1].reason, "unreachable"));

    /* Invalid configurations are refused. */
    struct controller_config bad = cfg;
    bad.min_batch = 0;
    assert_int_equal(controller_init(&c, &bad, 0), KRS_ERR_INVALID);
    bad = cfg;
    bad.max_batch = 1;
    assert_int_equal(controller_init(&c, &bad, 0), KRS_ERR_INVALID);
    bad = cfg;
    bad.interval = CONTROLLER_MAX_INTERVAL + 1;
    assert_int_equal(controller_init(&c, &bad, 0), KRS_ERR_INVALID);
    bad = cfg;
    bad.p99_target_ms = 0;
    assert_int_equal(controller_init(&c, &bad, 0), KRS_ERR_INVALID);
    bad = cfg;
    bad.ema_alpha = 1.5;
    assert_int_equal(controller_init(&c, &bad, 0), KRS_ERR_INVALID);
    assert_int_equal(controller_init(NULL, &cfg, 0), KRS_ERR_INVALID);
}

static void test_disabled_is_fixed(void **state)
{
    struct controller c;
    struct controller_config cfg;
    controller_config_default(&cfg);
    cfg.enabled = false;
    cfg.fixed_batch = 5;
    assert_int_equal(controller_init(&c, &cfg, 0), KRS_OK);
    struct sim s = {.base_ms = 20, .per_seq_ms = 5, .demand = UINT32_MAX, .rng = 17};
    uint32_t lim[600];
    sim_run(&s, &c, 100, lim);
    for (int i = 0; i < 100; i++) assert_int_equal(lim[i], 5);
    s.spike_ms = 500;
    s.spike_steps = 2;
    sim_run(&s, &c, 1, NULL);
    struct controller_snapshot snap;
    controller_state(&c, &snap);
    assert_int_equal(snap.mode, CONTROLLER_MODE_FIXED);
    assert_int_equal(snap.limit, 5);
    assert_int_equal(snap.adjustments, 0);
    assert_int_equal(snap.degradations, 0);
    assert_true(snap.windows == 101);
    /* statistics are still kept: the spike window is folded into the 45 ms EMA */
    assert_true(fabs(snap.ema_p99_ms - (0.3 * 500.0 + 0.7 * 45.0)) < 1e-6);

    /* Turned on: tunes; turned off again: back to the fixed size at once. */
    assert_int_equal(controller_set_enabled(&c, true, s.now_ns), KRS_OK);
    sim_run(&s, &c, 200, lim);
    assert_true(lim[199] >= 15 && lim[199] <= 16);
    assert_int_equal(controller_set_enabled(&c, false, s.now_ns), KRS_OK);
    assert_int_equal(controller_limit(&c), 5);
    sim_run(&s, &c, 50, lim);
    for (int i = 0; i < 50; i++) assert_int_equal(lim[i], 5);
    controller_state(&c, &snap);
    assert_int_equal(snap.events[snap.n_events - 1].kind, CONTROLLER_EVENT_DISABLE);
    assert_string_equal(controller_mode_name(snap.mode), "fixed");
    /* The event ring keeps the newest CONTROLLER_EVENTS, oldest first. */
    assert_true(snap.n_events <= CONTROLLER_EVENTS);
    for (uint32_t i = 1; i < snap.n_events; i++)
        assert_true(snap.events[i].t_ns >= snap.events[i - 1].t_ns);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_converges_linear_model),
        cmocka_unit_test(test_step_change_shrinks),
        cmocka_unit_test(test_noise_does_not_oscillate),
        cmocka_unit_test(test_spike_degrades_and_recovers),
        cmocka_unit_test(test_repeated_spikes_extend_calm),
        cmocka_unit_test(test_converges_fast_from_low_limit),
        cmocka_unit_test(test_load_step),
        cmocka_unit_test(test_knee),
        cmocka_unit_test(test_steady_hold),
        cmocka_unit_test(test_saturated_late_queue_holds),
        cmocka_unit_test(test_prompt_length_step),
        cmocka_unit_test(test_admit_at_low_load),
        cmocka_unit_test(test_cold_burst_settles),
        cmocka_unit_test(test_prefill_budget),
        cmocka_unit_test(test_busy_host_runs_at_knee),
        cmocka_unit_test(test_busy_host_late_queue_runs_all),
        cmocka_unit_test(test_late_queue_floors_shrink_at_knee),
        cmocka_unit_test(test_late_admission),
        cmocka_unit_test(test_lone_request_then_burst),
        cmocka_unit_test(test_prompt_cost_under_noise),
        cmocka_unit_test(test_prompt_steps_are_not_spikes),
        cmocka_unit_test(test_bounds_respected),
        cmocka_unit_test(test_disabled_is_fixed),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
