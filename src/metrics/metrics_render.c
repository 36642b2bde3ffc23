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
#include <stddef.h>
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

/* The collectors being rendered: one family is written once, with every collector's samples
 * under it (the text format wants a family's samples together). lab[i] is the label prefix of
 * collector i: "" for a lone unlabelled collector, else `model="id",`. */
struct prom_set {
    const struct metrics_snapshot *const *s;
    char (*lab)[METRICS_LABEL_MAX];
    int n;
};

/* One sample: name{<collector label><extra>} value. extra is "" or `key="value"`. */
static void sample_f(struct out_buf *o, const char *name, const char *lab, const char *extra,
                     double v)
{
    size_t ll = strlen(lab);
    if (!ll && !*extra)
        put(o, "%s %.9g\n", name, v);
    else if (!*extra) /* drop the trailing comma of the label prefix */
        put(o, "%s{%.*s} %.9g\n", name, (int)(ll - 1), lab, v);
    else
        put(o, "%s{%s%s} %.9g\n", name, lab, extra, v);
}

static void sample_u(struct out_buf *o, const char *name, const char *lab, const char *extra,
                     unsigned long long v)
{
    size_t ll = strlen(lab);
    if (!ll && !*extra)
        put(o, "%s %llu\n", name, v);
    else if (!*extra)
        put(o, "%s{%.*s} %llu\n", name, (int)(ll - 1), lab, v);
    else
        put(o, "%s{%s%s} %llu\n", name, lab, extra, v);
}

#define FOR_EACH(ps, i) for (int i = 0; i < (ps)->n; i++)

/* A family of one sample per collector: expr reads it from snapshot S; put_fn is sample_f
 * (gauges, float values) or sample_u (counters), cast the value type it takes. */
#define FAMILY(o, ps, name, type, help, put_fn, cast, expr)                                        \
    do {                                                                                           \
        head(o, name, type, help);                                                                 \
        FOR_EACH(ps, i_)                                                                           \
        {                                                                                          \
            const struct metrics_snapshot *S = (ps)->s[i_];                                        \
            put_fn(o, name, (ps)->lab[i_], "", (cast)(expr));                                      \
        }                                                                                          \
    } while (0)
#define FAMILY_F(o, ps, name, type, help, expr)                                                    \
    FAMILY(o, ps, name, type, help, sample_f, double, expr)
#define FAMILY_U(o, ps, name, type, help, expr)                                                    \
    FAMILY(o, ps, name, type, help, sample_u, unsigned long long, expr)

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

static void put_hist_samples(struct out_buf *o, enum metrics_hist_id id, const char *lab,
                             const struct metrics_hist_snapshot *h)
{
    const struct hist_export *e = &hist_exports[id];
    char name[96], le[48];
    snprintf(name, sizeof name, "%s_bucket", e->name);
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
                snprintf(le, sizeof le, "le=\"%.9g\"", (double)edge_us * 1e-6);
                sample_u(o, name, lab, le, (unsigned long long)cum);
            }
        }
    } else {
        uint64_t cum = h->buckets[0];
        uint32_t b = 1;
        sample_u(o, name, lab, "le=\"0\"", (unsigned long long)cum);
        for (int k = 0; k <= e->max_exp; k++) {
            uint32_t last = metrics_raw_index(1ull << k); /* inclusive, see metrics.h */
            for (; b <= last; b++) cum += h->buckets[b];
            snprintf(le, sizeof le, "le=\"%llu\"", 1ull << k);
            sample_u(o, name, lab, le, (unsigned long long)cum);
        }
    }
    sample_u(o, name, lab, "le=\"+Inf\"", (unsigned long long)h->count);
    snprintf(name, sizeof name, "%s_sum", e->name);
    sample_f(o, name, lab, "", h->sum);
    snprintf(name, sizeof name, "%s_count", e->name);
    sample_u(o, name, lab, "", (unsigned long long)h->count);
}

/* A counter family split into result="hit" and result="miss" (= all - hit), read from two
 * uint64_t fields of each collector's snapshot. */
static void put_hit_miss(struct out_buf *o, const struct prom_set *ps, const char *name,
                         const char *help, size_t off_hit, size_t off_all)
{
    head(o, name, "counter", help);
    FOR_EACH(ps, i)
    {
        const char *d = (const char *)ps->s[i];
        uint64_t hit, all;
        memcpy(&hit, d + off_hit, sizeof hit);
        memcpy(&all, d + off_all, sizeof all);
        sample_u(o, name, ps->lab[i], "result=\"hit\"", hit);
        sample_u(o, name, ps->lab[i], "result=\"miss\"", all - hit);
    }
}

static void render_prom(const struct prom_set *ps, struct out_buf *o)
{
    static const char *wnames[METRICS_N_WINDOWS] = {"5s", "30s", "60s"};
    char ex[96];
    head(o, "mlx_throughput_tokens_per_second", "gauge",
         "Generated tokens per second over a sliding window.");
    FOR_EACH(ps, i)
    for (int w = 0; w < METRICS_N_WINDOWS; w++) {
        snprintf(ex, sizeof ex, "window=\"%s\"", wnames[w]);
        sample_f(o, "mlx_throughput_tokens_per_second", ps->lab[i], ex,
                 ps->s[i]->windows[w].tokens_per_s);
    }
    head(o, "krserve_requests_per_second", "gauge",
         "Finished requests per second over a sliding window.");
    FOR_EACH(ps, i)
    for (int w = 0; w < METRICS_N_WINDOWS; w++) {
        snprintf(ex, sizeof ex, "window=\"%s\"", wnames[w]);
        sample_f(o, "krserve_requests_per_second", ps->lab[i], ex,
                 ps->s[i]->windows[w].requests_per_s);
    }
    FAMILY_F(o, ps, "mlx_latency_p50_milliseconds", "gauge",
             "End-to-end request latency P50 over the last 60 s (0 when none finished).",
             S->recent_p50_ms);
    FAMILY_F(o, ps, "mlx_latency_p95_milliseconds", "gauge",
             "End-to-end request latency P95 over the last 60 s (0 when none finished).",
             S->recent_p95_ms);
    FAMILY_F(o, ps, "mlx_latency_p99_milliseconds", "gauge",
             "End-to-end request latency P99 over the last 60 s (0 when none finished).",
             S->recent_p99_ms);
    FAMILY_F(o, ps, "mlx_batch_size_current", "gauge", "Sequences in the running batch.",
             S->running);
    FAMILY_F(o, ps, "krserve_batch_limit", "gauge", "Current batch limit (auto-tuned or fixed).",
             S->batch_limit);
    head(o, "mlx_gpu_scheduler_mode", "gauge", "Scheduler mode: 1 for the active mode.");
    FOR_EACH(ps, i)
    for (int md = 0; md < METRICS_MODE_COUNT; md++) {
        snprintf(ex, sizeof ex, "mode=\"%s\"", metrics_mode_name(md));
        sample_u(o, "mlx_gpu_scheduler_mode", ps->lab[i], ex, (int)ps->s[i]->mode == md);
    }
    FAMILY_U(o, ps, "mlx_auto_tuning_adjustments_total", "counter",
             "Batch-limit changes made by the auto-tuning controller.", S->tuning_adjustments);
    FAMILY_U(o, ps, "mlx_mode_transitions_total", "counter", "Scheduler mode changes.",
             S->mode_transitions);
    FAMILY_F(o, ps, "mlx_queue_depth", "gauge", "Requests waiting for admission, all priorities.",
             S->queue_depth_total);
    head(o, "krserve_queue_depth", "gauge", "Requests waiting for admission by priority.");
    FOR_EACH(ps, i)
    for (int p = 0; p < METRICS_PRIO_COUNT; p++) {
        snprintf(ex, sizeof ex, "priority=\"%s\"", metrics_priority_name(p));
        sample_f(o, "krserve_queue_depth", ps->lab[i], ex, (double)ps->s[i]->queue_depth[p]);
    }
    head(o, "krserve_kv_blocks", "gauge", "KV-cache blocks by state.");
    FOR_EACH(ps, i)
    {
        sample_f(o, "krserve_kv_blocks", ps->lab[i], "state=\"used\"", (double)ps->s[i]->kv_used);
        sample_f(o, "krserve_kv_blocks", ps->lab[i], "state=\"free\"", (double)ps->s[i]->kv_free);
    }
    head(o, "krserve_device_memory_bytes", "gauge",
         "Compute device memory by use (the CPU backend: host memory it reserved or mapped).");
    FOR_EACH(ps, i)
    {
        const struct metrics_snapshot *d = ps->s[i];
        sample_f(o, "krserve_device_memory_bytes", ps->lab[i], "use=\"weights\"",
                 (double)d->dev_weights);
        sample_f(o, "krserve_device_memory_bytes", ps->lab[i], "use=\"kv\"", (double)d->dev_kv);
        sample_f(o, "krserve_device_memory_bytes", ps->lab[i], "use=\"activations\"",
                 (double)d->dev_activations);
        sample_f(o, "krserve_device_memory_bytes", ps->lab[i], "use=\"free\"", (double)d->dev_free);
        sample_f(o, "krserve_device_memory_bytes", ps->lab[i], "use=\"total\"",
                 (double)d->dev_total);
    }
    head(o, "krserve_requests_total", "counter", "Finished requests by finish reason.");
    FOR_EACH(ps, i)
    for (int r = 0; r < METRICS_FINISH_COUNT; r++) {
        snprintf(ex, sizeof ex, "reason=\"%s\"", metrics_finish_reason_name(r));
        sample_u(o, "krserve_requests_total", ps->lab[i], ex, ps->s[i]->finished[r]);
    }
    head(o, "krserve_requests_by_priority_total", "counter", "Submitted requests by priority.");
    FOR_EACH(ps, i)
    for (int p = 0; p < METRICS_PRIO_COUNT; p++) {
        snprintf(ex, sizeof ex, "priority=\"%s\"", metrics_priority_name(p));
        sample_u(o, "krserve_requests_by_priority_total", ps->lab[i], ex, ps->s[i]->submitted[p]);
    }
    head(o, "krserve_tokens_total", "counter",
         "Tokens processed: prompt (counted when a request ends) and generated.");
    FOR_EACH(ps, i)
    {
        sample_u(o, "krserve_tokens_total", ps->lab[i], "kind=\"prompt\"", ps->s[i]->prompt_tokens);
        sample_u(o, "krserve_tokens_total", ps->lab[i], "kind=\"generated\"",
                 ps->s[i]->generated_tokens);
    }
    FAMILY_U(o, ps, "krserve_preemptions_total", "counter",
             "Running sequences preempted (KV blocks reclaimed).", S->preemptions);
    FAMILY_U(o, ps, "krserve_late_admissions_total", "counter",
             "Requests admitted past the batch limit after waiting lateWaitMs in the queue.",
             S->late_admissions);
    put_hit_miss(o, ps, "krserve_prefix_cache_requests_total",
                 "Requests that looked up the prefix cache at admission, by result.",
                 offsetof(struct metrics_snapshot, prefix_hit_requests),
                 offsetof(struct metrics_snapshot, prefix_requests));
    put_hit_miss(o, ps, "krserve_prefix_cache_tokens_total",
                 "Prompt tokens of those requests: hit = KV reused from the cache, miss = "
                 "computed.",
                 offsetof(struct metrics_snapshot, prefix_cached_tokens),
                 offsetof(struct metrics_snapshot, prefix_prompt_tokens));
    head(o, "krserve_prefix_cache_blocks", "gauge",
         "KV blocks published in the prefix cache: held by a running request, or evictable.");
    FOR_EACH(ps, i)
    {
        const struct metrics_snapshot *d = ps->s[i];
        sample_f(o, "krserve_prefix_cache_blocks", ps->lab[i], "state=\"held\"",
                 (double)(d->prefix_blocks - d->prefix_blocks_evictable));
        sample_f(o, "krserve_prefix_cache_blocks", ps->lab[i], "state=\"evictable\"",
                 (double)d->prefix_blocks_evictable);
    }
    FAMILY_U(o, ps, "krserve_prefix_cache_evictions_total", "counter",
             "Cached KV blocks evicted to make room or to stay under the size cap.",
             S->prefix_evictions);
    FAMILY_U(o, ps, "krserve_dedup_requests_total", "counter",
             "Requests that shared the generation of an identical concurrent request "
             "(performance.dedup).",
             S->dedup_requests);
    FAMILY_U(o, ps, "krserve_degradation_events_total", "counter",
             "P99 regressions that made the controller fall back to the fixed batch size.",
             S->degradation_events);
    FAMILY_F(o, ps, "krserve_uptime_seconds", "gauge",
             "Seconds since the metrics collector started.", (double)S->uptime_ns / 1e9);
    for (int h = 0; h < METRICS_HIST_COUNT; h++) {
        head(o, hist_exports[h].name, "histogram", hist_exports[h].help);
        FOR_EACH(ps, i) put_hist_samples(o, h, ps->lab[i], &ps->s[i]->hist[h]);
    }
}

/* `model="id",` with the id escaped as the text format wants (\\, \", \n). */
static void model_label(const char *id, char *out, size_t cap)
{
    size_t n = (size_t)snprintf(out, cap, "model=\"");
    for (const char *p = id; *p && n + 8 < cap; p++) {
        if (*p == '\\' || *p == '"') out[n++] = '\\';
        if (*p == '\n') {
            out[n++] = '\\';
            out[n++] = 'n';
            continue;
        }
        out[n++] = *p;
    }
    snprintf(out + n, cap - n, "\",");
}

int metrics_render_prometheus_models(struct metrics *const *ms, const char *const *ids, int n,
                                     uint64_t now_ns, char *buf, size_t cap, size_t *len)
{
    int rc = KRS_OK;
    if (!ms || n < 0 || n > METRICS_MAX_MODELS || (!ids && n > 1) || !len || (!buf && cap))
        return KRS_ERR_INVALID;
    struct metrics_snapshot *snaps = NULL;
    const struct metrics_snapshot *ptrs[METRICS_MAX_MODELS];
    char lab[METRICS_MAX_MODELS][METRICS_LABEL_MAX];
    if (n > 0) {
        snaps = alloc_malloc((size_t)n * sizeof *snaps);
        if (!snaps) return KRS_ERR_NOMEM;
    }
    for (int i = 0; i < n; i++) {
        if (!ms[i]) {
            rc = KRS_ERR_INVALID;
            goto out;
        }
        if ((rc = metrics_snapshot(ms[i], now_ns, &snaps[i]))) goto out;
        ptrs[i] = &snaps[i];
        if (ids)
            model_label(ids[i] ? ids[i] : "", lab[i], sizeof lab[i]);
        else
            lab[i][0] = '\0';
    }
    struct prom_set ps = {ptrs, lab, n};
    struct out_buf o = {buf, cap, 0};
    if (n > 0) render_prom(&ps, &o);
    if (cap) buf[o.len < cap ? o.len : cap - 1] = '\0';
    *len = o.len;
    if (o.len >= cap) rc = KRS_ERR_FULL;
out:
    alloc_free(snaps);
    return rc;
}

int metrics_render_prometheus(struct metrics *m, uint64_t now_ns, char *buf, size_t cap,
                              size_t *len)
{
    if (!m) return KRS_ERR_INVALID;
    return metrics_render_prometheus_models(&m, NULL, 1, now_ns, buf, cap, len);
}

/* ---- JSON ---------------------------------------------------------------------------------- */

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

    cJSON *pc = add_obj(root, "prefix_cache", ok);
    if (pc) {
        add_num(pc, "requests", (double)s->prefix_requests, ok);
        add_num(pc, "hit_requests", (double)s->prefix_hit_requests, ok);
        add_num(pc, "request_hit_rate",
                s->prefix_requests ? (double)s->prefix_hit_requests / s->prefix_requests : 0, ok);
        add_num(pc, "prompt_tokens", (double)s->prefix_prompt_tokens, ok);
        add_num(pc, "cached_tokens", (double)s->prefix_cached_tokens, ok);
        add_num(pc, "token_hit_rate",
                s->prefix_prompt_tokens ? (double)s->prefix_cached_tokens / s->prefix_prompt_tokens
                                        : 0,
                ok);
        add_num(pc, "blocks", (double)s->prefix_blocks, ok);
        add_num(pc, "evictable_blocks", (double)s->prefix_blocks_evictable, ok);
        add_num(pc, "evictions", (double)s->prefix_evictions, ok);
    }
    cJSON *dd = add_obj(root, "dedup", ok);
    if (dd) add_num(dd, "requests", (double)s->dedup_requests, ok);

    cJSON *dm = add_obj(root, "device_memory_bytes", ok);
    if (dm) {
        add_num(dm, "weights", (double)s->dev_weights, ok);
        add_num(dm, "kv", (double)s->dev_kv, ok);
        add_num(dm, "activations", (double)s->dev_activations, ok);
        add_num(dm, "free", (double)s->dev_free, ok);
        add_num(dm, "total", (double)s->dev_total, ok);
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
        add_num(c, "late_admissions", (double)s->late_admissions, ok);
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
