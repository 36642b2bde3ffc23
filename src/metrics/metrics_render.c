/* metrics/: Prometheus text exposition (format 0.0.4) and the /stats JSON, both built from one
 * snapshot. Runs on HTTP threads; allocates the snapshot (and the cJSON tree), never touches
 * the collector's atomics except through metrics_snapshot.
 *
 * Exported histogram bounds are bucket edges, so cumulative counts are exact: latency `le` at
 * 2^k and 1.5 * 2^k microseconds (16 us .. 134 s, two per octave), count histograms at
 * 0, 1, 2, 4, ..., 2^k. */
#include <cjson/cJSON.h>
#include <math.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>

#include "krserve.h"
#include "metrics/metrics_impl.h"
#include "util/alloc.h"

struct out_buf {
    char *buf;
    size_t cap, len;
};

static void put(struct out_buf *o, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void put(struct out_buf *o, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    char *dst = o->len < o->cap ? o->buf + o->len : NULL;
    size_t room = o->len < o->cap ? o->cap - o->len : 0;
    int n = vsnprintf(dst, room, fmt, ap);
    va_end(ap);
    if (n > 0) o->len += (size_t)n;
}

static void head(struct out_buf *o, const char *name, const char *type, const char *help)
{
    put(o, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

static void put_u64(struct out_buf *o, const char *name, const char *type, const char *help,
                    uint64_t v)
{
    head(o, name, type, help);
    put(o, "%s %llu\n", name, (unsigned long long)v);
}

static void put_i64(struct out_buf *o, const char *name, const char *help, int64_t v)
{
    head(o, name, "gauge", help);
    put(o, "%s %lld\n", name, (long long)v);
}

static void put_f(struct out_buf *o, const char *name, const char *help, double v)
{
    head(o, name, "gauge", help);
    put(o, "%s %.9g\n", name, v);
}

struct hist_export {
    const char *name;
    const char *help;
    int max_exp; /* count histograms: le up to 2^max_exp */
};

static const struct hist_export hist_exports[METRICS_HIST_COUNT] = {
    [METRICS_HIST_TTFT] = {"krserve_ttft_seconds", "Time from submission to the first token.", 0},
    [METRICS_HIST_INTER_TOKEN] = {"krserve_inter_token_latency_seconds",
                                  "Time between consecutive tokens of a request.", 0},
    [METRICS_HIST_E2E] = {"krserve_e2e_latency_seconds",
                          "Time from submission to the end of a request.", 0},
    [METRICS_HIST_QUEUE_WAIT] = {"krserve_queue_wait_seconds",
                                 "Time from submission to admission into the running batch.", 0},
    [METRICS_HIST_STEP] = {"krserve_step_seconds",
                           "Duration of one engine step (batched forward and sampling).", 0},
    [METRICS_HIST_BATCH_SIZE] = {"krserve_batch_size", "Sequences run together in one step.", 12},
    [METRICS_HIST_PROMPT_TOKENS] = {"krserve_request_prompt_tokens",
                                    "Prompt tokens per finished request.", 20},
    [METRICS_HIST_GEN_TOKENS] = {"krserve_request_generated_tokens",
                                 "Generated tokens per finished request.", 20},
};

static void put_hist(struct out_buf *o, enum metrics_hist_id id,
                     const struct metrics_hist_snapshot *h)
{
    const struct hist_export *e = &hist_exports[id];
    head(o, e->name, "histogram", e->help);
    if (metrics_hist_is_latency(id)) {
        /* cumulative count below each exported edge (edges are raw bucket lower bounds) */
        uint64_t cum = 0;
        uint32_t b = 0;
        for (int k = 4; k <= RAW_MAX_MSB; k++) {
            for (int half = 0; half < 2; half++) {
                if (k == RAW_MAX_MSB && half) break;
                uint64_t edge_us = half ? 3ull << (k - 1) : 1ull << k;
                uint32_t stop = metrics_raw_index(edge_us);
                for (; b < stop; b++) cum += h->buckets[b];
                put(o, "%s_bucket{le=\"%.9g\"} %llu\n", e->name, (double)edge_us * 1e-6,
                    (unsigned long long)cum);
            }
        }
    } else {
        uint64_t cum = h->buckets[0];
        uint32_t b = 1;
        put(o, "%s_bucket{le=\"0\"} %llu\n", e->name, (unsigned long long)cum);
        for (int k = 0; k <= e->max_exp; k++) {
            uint32_t last = metrics_raw_index(1ull << k); /* inclusive, see metrics.h */
            for (; b <= last; b++) cum += h->buckets[b];
            put(o, "%s_bucket{le=\"%llu\"} %llu\n", e->name, 1ull << k, (unsigned long long)cum);
        }
    }
    put(o, "%s_bucket{le=\"+Inf\"} %llu\n", e->name, (unsigned long long)h->count);
    put(o, "%s_sum %.9g\n", e->name, h->sum);
    put(o, "%s_count %llu\n", e->name, (unsigned long long)h->count);
}

static void render_prom(const struct metrics_snapshot *s, struct out_buf *o)
{
    static const char *wnames[METRICS_N_WINDOWS] = {"5s", "30s", "60s"};
    head(o, "mlx_throughput_tokens_per_second", "gauge",
         "Generated tokens per second over a sliding window.");
    for (int w = 0; w < METRICS_N_WINDOWS; w++)
        put(o, "mlx_throughput_tokens_per_second{window=\"%s\"} %.9g\n", wnames[w],
            s->windows[w].tokens_per_s);
    head(o, "krserve_requests_per_second", "gauge",
         "Finished requests per second over a sliding window.");
    for (int w = 0; w < METRICS_N_WINDOWS; w++)
        put(o, "krserve_requests_per_second{window=\"%s\"} %.9g\n", wnames[w],
            s->windows[w].requests_per_s);
    put_f(o, "mlx_latency_p50_milliseconds",
          "End-to-end request latency P50 over the last 60 s (0 when none finished).",
          s->recent_p50_ms);
    put_f(o, "mlx_latency_p95_milliseconds",
          "End-to-end request latency P95 over the last 60 s (0 when none finished).",
          s->recent_p95_ms);
    put_f(o, "mlx_latency_p99_milliseconds",
          "End-to-end request latency P99 over the last 60 s (0 when none finished).",
          s->recent_p99_ms);
    put_i64(o, "mlx_batch_size_current", "Sequences in the running batch.", s->running);
    put_i64(o, "krserve_batch_limit", "Current batch limit (auto-tuned or fixed).", s->batch_limit);
    head(o, "mlx_gpu_scheduler_mode", "gauge", "Scheduler mode: 1 for the active mode.");
    for (int md = 0; md < METRICS_MODE_COUNT; md++)
        put(o, "mlx_gpu_scheduler_mode{mode=\"%s\"} %d\n", metrics_mode_name(md),
            (int)s->mode == md ? 1 : 0);
    put_u64(o, "mlx_auto_tuning_adjustments_total", "counter",
            "Batch-limit changes made by the auto-tuning controller.", s->tuning_adjustments);
    put_u64(o, "mlx_mode_transitions_total", "counter", "Scheduler mode changes.",
            s->mode_transitions);
    put_i64(o, "mlx_queue_depth", "Requests waiting for admission, all priorities.",
            s->queue_depth_total);
    head(o, "krserve_queue_depth", "gauge", "Requests waiting for admission by priority.");
    for (int p = 0; p < METRICS_PRIO_COUNT; p++)
        put(o, "krserve_queue_depth{priority=\"%s\"} %lld\n", metrics_priority_name(p),
            (long long)s->queue_depth[p]);
    head(o, "krserve_kv_blocks", "gauge", "KV-cache blocks by state.");
    put(o, "krserve_kv_blocks{state=\"used\"} %lld\n", (long long)s->kv_used);
    put(o, "krserve_kv_blocks{state=\"free\"} %lld\n", (long long)s->kv_free);
    head(o, "krserve_requests_total", "counter", "Finished requests by finish reason.");
    for (int r = 0; r < METRICS_FINISH_COUNT; r++)
        put(o, "krserve_requests_total{reason=\"%s\"} %llu\n", metrics_finish_reason_name(r),
            (unsigned long long)s->finished[r]);
    head(o, "krserve_requests_by_priority_total", "counter", "Submitted requests by priority.");
    for (int p = 0; p < METRICS_PRIO_COUNT; p++)
        put(o, "krserve_requests_by_priority_total{priority=\"%s\"} %llu\n",
            metrics_priority_name(p), (unsigned long long)s->submitted[p]);
    head(o, "krserve_tokens_total", "counter",
         "Tokens processed: prompt (counted when a request ends) and generated.");
    put(o, "krserve_tokens_total{kind=\"prompt\"} %llu\n", (unsigned long long)s->prompt_tokens);
    put(o, "krserve_tokens_total{kind=\"generated\"} %llu\n",
        (unsigned long long)s->generated_tokens);
    put_u64(o, "krserve_preemptions_total", "counter",
            "Running sequences preempted (KV blocks reclaimed).", s->preemptions);
    put_u64(o, "krserve_degradation_events_total", "counter",
            "P99 regressions that made the controller fall back to the fixed batch size.",
            s->degradation_events);
    put_f(o, "krserve_uptime_seconds", "Seconds since the metrics collector started.",
          (double)s->uptime_ns / 1e9);
    for (int h = 0; h < METRICS_HIST_COUNT; h++) put_hist(o, h, &s->hist[h]);
}

int metrics_render_prometheus(struct metrics *m, uint64_t now_ns, char *buf, size_t cap,
                              size_t *len)
{
    int rc = KRS_OK;
    struct metrics_snapshot *s = NULL;
    if (!m || !len || (!buf && cap)) return KRS_ERR_INVALID;
    s = alloc_malloc(sizeof *s);
    if (!s) return KRS_ERR_NOMEM;
    rc = metrics_snapshot(m, now_ns, s);
    if (rc) goto out;
    struct out_buf o = {buf, cap, 0};
    render_prom(s, &o);
    *len = o.len;
    if (o.len >= cap) {
        if (cap) buf[cap - 1] = '\0';
        rc = KRS_ERR_FULL;
    }
out:
    alloc_free(s);
    return rc;
}

/* ---- JSON ---- */

static void add_num(cJSON *obj, const char *name, double v, bool *ok)
{
    if (!cJSON_AddNumberToObject(obj, name, v)) *ok = false;
}

static cJSON *add_obj(cJSON *obj, const char *name, bool *ok)
{
    cJSON *c = cJSON_AddObjectToObject(obj, name);
    if (!c) *ok = false;
    return c;
}

static void add_hist_summary(cJSON *parent, enum metrics_hist_id id,
                             const struct metrics_hist_snapshot *h, bool *ok)
{
    char name[48];
    bool lat = metrics_hist_is_latency(id);
    double scale = lat ? 1e3 : 1.0; /* latencies in ms */
    snprintf(name, sizeof name, "%s%s", metrics_hist_name(id), lat ? "_ms" : "");
    cJSON *o = add_obj(parent, name, ok);
    if (!o) return;
    add_num(o, "count", (double)h->count, ok);
    add_num(o, "mean", h->count ? h->sum / (double)h->count * scale : 0.0, ok);
    add_num(o, "p50", h->p50 * scale, ok);
    add_num(o, "p95", h->p95 * scale, ok);
    add_num(o, "p99", h->p99 * scale, ok);
}

static void build_json(const struct metrics_snapshot *s, cJSON *root, bool *ok)
{
    static const char *wnames[METRICS_N_WINDOWS] = {"5s", "30s", "60s"};
    add_num(root, "uptime_s", (double)s->uptime_ns / 1e9, ok);
    if (!cJSON_AddStringToObject(root, "mode", metrics_mode_name(s->mode))) *ok = false;

    cJSON *tp = add_obj(root, "throughput", ok);
    for (int w = 0; tp && w < METRICS_N_WINDOWS; w++) {
        cJSON *wo = add_obj(tp, wnames[w], ok);
        if (!wo) break;
        add_num(wo, "tokens_per_s", s->windows[w].tokens_per_s, ok);
        add_num(wo, "requests_per_s", s->windows[w].requests_per_s, ok);
        add_num(wo, "tokens", (double)s->windows[w].tokens, ok);
        add_num(wo, "requests", (double)s->windows[w].requests, ok);
    }

    cJSON *lat = add_obj(root, "latency_ms", ok);
    if (lat) {
        add_num(lat, "window_s", METRICS_LATENCY_WINDOW, ok);
        add_num(lat, "requests", (double)s->recent_requests, ok);
        const char *names[3] = {"p50", "p95", "p99"};
        double v[3] = {s->recent_p50_ms, s->recent_p95_ms, s->recent_p99_ms};
        for (int i = 0; i < 3; i++) {
            cJSON *x = s->recent_requests ? cJSON_AddNumberToObject(lat, names[i], v[i])
                                          : cJSON_AddNullToObject(lat, names[i]);
            if (!x) *ok = false;
        }
    }

    cJSON *hs = add_obj(root, "histograms", ok);
    for (int h = 0; hs && h < METRICS_HIST_COUNT; h++) add_hist_summary(hs, h, &s->hist[h], ok);

    cJSON *dist = cJSON_AddArrayToObject(root, "batch_size_distribution");
    if (!dist) *ok = false;
    const struct metrics_hist_snapshot *bh = &s->hist[METRICS_HIST_BATCH_SIZE];
    for (uint32_t b = 0; dist && b < METRICS_HIST_BUCKETS; b++) {
        if (!bh->buckets[b]) continue;
        double lo, hi;
        metrics_hist_bucket_range(METRICS_HIST_BATCH_SIZE, b, &lo, &hi);
        cJSON *e = cJSON_CreateObject();
        if (!e || !cJSON_AddItemToArray(dist, e)) {
            cJSON_Delete(e);
            *ok = false;
            break;
        }
        add_num(e, "min", lo, ok);
        add_num(e, "max", isinf(hi) ? lo : hi, ok);
        add_num(e, "count", (double)bh->buckets[b], ok);
    }

    cJSON *q = add_obj(root, "queue_depth", ok);
    for (int p = 0; q && p < METRICS_PRIO_COUNT; p++)
        add_num(q, metrics_priority_name(p), (double)s->queue_depth[p], ok);
    if (q) add_num(q, "total", (double)s->queue_depth_total, ok);

    cJSON *b = add_obj(root, "batch", ok);
    if (b) {
        add_num(b, "running", (double)s->running, ok);
        add_num(b, "limit", (double)s->batch_limit, ok);
    }
    cJSON *kv = add_obj(root, "kv_blocks", ok);
    if (kv) {
        add_num(kv, "used", (double)s->kv_used, ok);
        add_num(kv, "free", (double)s->kv_free, ok);
    }

    cJSON *c = add_obj(root, "counters", ok);
    if (c) {
        cJSON *sub = add_obj(c, "requests_submitted", ok);
        for (int p = 0; sub && p < METRICS_PRIO_COUNT; p++)
            add_num(sub, metrics_priority_name(p), (double)s->submitted[p], ok);
        if (sub) add_num(sub, "total", (double)s->submitted_total, ok);
        cJSON *fin = add_obj(c, "requests_finished", ok);
        for (int r = 0; fin && r < METRICS_FINISH_COUNT; r++)
            add_num(fin, metrics_finish_reason_name(r), (double)s->finished[r], ok);
        if (fin) add_num(fin, "total", (double)s->finished_total, ok);
        add_num(c, "prompt_tokens", (double)s->prompt_tokens, ok);
        add_num(c, "generated_tokens", (double)s->generated_tokens, ok);
        add_num(c, "preemptions", (double)s->preemptions, ok);
        add_num(c, "mode_transitions", (double)s->mode_transitions, ok);
        add_num(c, "tuning_adjustments", (double)s->tuning_adjustments, ok);
        add_num(c, "degradation_events", (double)s->degradation_events, ok);
    }

    cJSON *dl = cJSON_AddArrayToObject(root, "recent_degradations");
    if (!dl) *ok = false;
    for (uint32_t i = 0; dl && i < s->n_degradations; i++) {
        cJSON *e = cJSON_CreateObject();
        if (!e || !cJSON_AddItemToArray(dl, e)) {
            cJSON_Delete(e);
            *ok = false;
            break;
        }
        add_num(e, "t_ns", (double)s->degradations[i].t_ns, ok);
        if (!cJSON_AddStringToObject(e, "reason", s->degradations[i].reason)) *ok = false;
    }
}

int metrics_render_json(struct metrics *m, uint64_t now_ns, struct cJSON **out)
{
    int rc = KRS_OK;
    struct metrics_snapshot *s = NULL;
    cJSON *root = NULL;
    bool ok = true;
    if (!m || !out) return KRS_ERR_INVALID;
    *out = NULL;
    s = alloc_malloc(sizeof *s);
    if (!s) return KRS_ERR_NOMEM;
    rc = metrics_snapshot(m, now_ns, s);
    if (rc) goto out;
    root = cJSON_CreateObject();
    if (!root) {
        rc = KRS_ERR_NOMEM;
        goto out;
    }
    build_json(s, root, &ok);
    if (!ok) {
        rc = KRS_ERR_NOMEM;
        goto out;
    }
    *out = root;
    root = NULL;
out:
    cJSON_Delete(root);
    alloc_free(s);
    return rc;
}
