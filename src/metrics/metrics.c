/* metrics/: the collector's state, the lock-free recorders and the snapshot.
 *
 * Owns one struct metrics (reserved whole at create). Recorders are relaxed atomic adds/stores;
 * the per-second ring is rotated by whichever writer first touches a new second (CAS on the
 * slot tag, then clear, then publish the tag with release). Readers check a slot's tag before
 * and after reading it and skip a slot that rotated meanwhile. Renderers live in
 * metrics_render.c; bucket math in metrics_hist.c. Must never read a clock or allocate after
 * create. */
#include <math.h>
#include <sched.h>
#include <stdio.h>
#include <string.h>

#include "krserve.h"
#include "metrics/metrics_impl.h"
#include "util/alloc.h"

#define RLX      memory_order_relaxed
#define NS_PER_S 1000000000ull

static const uint32_t window_seconds[METRICS_N_WINDOWS] = {5, 30, 60};

int metrics_create(uint64_t now_ns, struct metrics **out)
{
    if (!out) return KRS_ERR_INVALID;
    *out = NULL;
    struct metrics *m = alloc_calloc(1, sizeof *m);
    if (!m) return KRS_ERR_NOMEM;
    m->start_ns = now_ns;
    if (pthread_mutex_init(&m->deg_mu, NULL) != 0) {
        alloc_free(m);
        return KRS_ERR_NOMEM;
    }
    atomic_store(&m->mode, METRICS_MODE_ON);
    *out = m;
    return KRS_OK;
}

void metrics_destroy(struct metrics *m)
{
    if (!m) return;
    pthread_mutex_destroy(&m->deg_mu);
    alloc_free(m);
}

static inline void hist_add(struct metrics *m, enum metrics_hist_id id, uint64_t value)
{
    struct metrics_hist *h = &m->hist[id];
    atomic_fetch_add_explicit(&h->buckets[metrics_bucket_fast(id, value)], 1, RLX);
    atomic_fetch_add_explicit(&h->sum, value, RLX);
}

/* The slot of second `sec`, rotated to it if it still holds an older second; NULL when the
 * slot already moved on to a newer second (a record that is more than the ring behind). */
static struct metrics_slot *slot_for(struct metrics *m, uint64_t sec)
{
    struct metrics_slot *s = &m->slots[sec % METRICS_SLOTS];
    uint64_t want = sec + 1;
    for (;;) {
        uint64_t t = atomic_load_explicit(&s->tag, memory_order_acquire);
        if (t == want) return s;
        if (t & SLOT_RESETTING) {
            sched_yield();
            continue;
        }
        if (t > want) return NULL;
        if (atomic_compare_exchange_weak_explicit(&s->tag, &t, t | SLOT_RESETTING,
                                                  memory_order_acq_rel, RLX)) {
            atomic_store_explicit(&s->tokens, 0, RLX);
            atomic_store_explicit(&s->requests, 0, RLX);
            for (uint32_t i = 0; i < RAW_BUCKETS; i++) atomic_store_explicit(&s->e2e[i], 0, RLX);
            atomic_store_explicit(&s->tag, want, memory_order_release);
            return s;
        }
    }
}

void metrics_record_submit(struct metrics *m, enum metrics_priority prio)
{
    if (!m || (unsigned)prio >= METRICS_PRIO_COUNT) return;
    atomic_fetch_add_explicit(&m->submitted[prio], 1, RLX);
}

void metrics_record_admit(struct metrics *m, uint64_t queue_wait_ns)
{
    if (m) hist_add(m, METRICS_HIST_QUEUE_WAIT, queue_wait_ns);
}

void metrics_record_first_token(struct metrics *m, uint64_t ttft_ns)
{
    if (m) hist_add(m, METRICS_HIST_TTFT, ttft_ns);
}

void metrics_record_inter_token(struct metrics *m, uint64_t gap_ns)
{
    if (m) hist_add(m, METRICS_HIST_INTER_TOKEN, gap_ns);
}

void metrics_record_tokens(struct metrics *m, uint32_t n, uint64_t now_ns)
{
    if (!m || n == 0) return;
    atomic_fetch_add_explicit(&m->generated_tokens, n, RLX);
    struct metrics_slot *s = slot_for(m, now_ns / NS_PER_S);
    if (s) atomic_fetch_add_explicit(&s->tokens, n, RLX);
}

void metrics_record_step(struct metrics *m, uint64_t step_ns, uint32_t batch_size)
{
    if (!m) return;
    hist_add(m, METRICS_HIST_STEP, step_ns);
    hist_add(m, METRICS_HIST_BATCH_SIZE, batch_size);
}

void metrics_record_finish(struct metrics *m, const struct metrics_request_record *rec,
                           uint64_t now_ns)
{
    if (!m || !rec || (unsigned)rec->reason >= METRICS_FINISH_COUNT) return;
    atomic_fetch_add_explicit(&m->finished[rec->reason], 1, RLX);
    atomic_fetch_add_explicit(&m->prompt_tokens, rec->prompt_tokens, RLX);
    hist_add(m, METRICS_HIST_E2E, rec->e2e_ns);
    hist_add(m, METRICS_HIST_PROMPT_TOKENS, rec->prompt_tokens);
    hist_add(m, METRICS_HIST_GEN_TOKENS, rec->generated_tokens);
    struct metrics_slot *s = slot_for(m, now_ns / NS_PER_S);
    if (s) {
        atomic_fetch_add_explicit(&s->requests, 1, RLX);
        atomic_fetch_add_explicit(&s->e2e[metrics_raw_index(rec->e2e_ns / 1000u)], 1, RLX);
    }
}

void metrics_record_preemption(struct metrics *m)
{
    if (m) atomic_fetch_add_explicit(&m->preemptions, 1, RLX);
}

void metrics_record_late_admission(struct metrics *m)
{
    if (m) atomic_fetch_add_explicit(&m->late_admissions, 1, RLX);
}

void metrics_record_prefix_lookup(struct metrics *m, uint32_t prompt_tokens, uint32_t cached_tokens)
{
    if (!m) return;
    atomic_fetch_add_explicit(&m->prefix_requests, 1, RLX);
    if (cached_tokens) atomic_fetch_add_explicit(&m->prefix_hit_requests, 1, RLX);
    atomic_fetch_add_explicit(&m->prefix_prompt_tokens, prompt_tokens, RLX);
    atomic_fetch_add_explicit(&m->prefix_cached_tokens, cached_tokens, RLX);
}

void metrics_record_dedup(struct metrics *m)
{
    if (m) atomic_fetch_add_explicit(&m->dedup_requests, 1, RLX);
}

void metrics_set_prefix_cache(struct metrics *m, int64_t blocks, int64_t evictable,
                              uint64_t evictions)
{
    if (!m) return;
    atomic_store_explicit(&m->prefix_blocks, blocks, RLX);
    atomic_store_explicit(&m->prefix_blocks_evictable, evictable, RLX);
    atomic_store_explicit(&m->prefix_evictions, evictions, RLX);
}

void metrics_record_tuning_adjustments(struct metrics *m, uint64_t n)
{
    if (m) atomic_fetch_add_explicit(&m->tuning_adjustments, n, RLX);
}

void metrics_record_degradation(struct metrics *m, const char *reason, uint64_t now_ns)
{
    if (!m) return;
    atomic_fetch_add_explicit(&m->degradation_events, 1, RLX);
    pthread_mutex_lock(&m->deg_mu);
    uint32_t idx;
    if (m->deg_count == METRICS_DEGRADE_RING) {
        idx = m->deg_head;
        m->deg_head = (m->deg_head + 1) % METRICS_DEGRADE_RING;
    } else {
        idx = (m->deg_head + m->deg_count++) % METRICS_DEGRADE_RING;
    }
    m->deg[idx].t_ns = now_ns;
    snprintf(m->deg[idx].reason, sizeof m->deg[idx].reason, "%s", reason ? reason : "");
    pthread_mutex_unlock(&m->deg_mu);
}

void metrics_set_queue_depth(struct metrics *m, enum metrics_priority prio, int64_t depth)
{
    if (!m || (unsigned)prio >= METRICS_PRIO_COUNT) return;
    atomic_store_explicit(&m->queue_depth[prio], depth, RLX);
}

void metrics_set_batch(struct metrics *m, uint32_t running, uint32_t limit)
{
    if (!m) return;
    atomic_store_explicit(&m->running, running, RLX);
    atomic_store_explicit(&m->batch_limit, limit, RLX);
}

void metrics_set_kv_blocks(struct metrics *m, uint32_t used, uint32_t free_blocks)
{
    if (!m) return;
    atomic_store_explicit(&m->kv_used, used, RLX);
    atomic_store_explicit(&m->kv_free, free_blocks, RLX);
}

void metrics_set_device_memory(struct metrics *m, uint64_t weights, uint64_t kv,
                               uint64_t activations, uint64_t free_bytes, uint64_t total)
{
    if (!m) return;
    atomic_store_explicit(&m->dev_weights, (int64_t)weights, RLX);
    atomic_store_explicit(&m->dev_kv, (int64_t)kv, RLX);
    atomic_store_explicit(&m->dev_activations, (int64_t)activations, RLX);
    atomic_store_explicit(&m->dev_free, (int64_t)free_bytes, RLX);
    atomic_store_explicit(&m->dev_total, (int64_t)total, RLX);
}

void metrics_set_mode(struct metrics *m, enum metrics_sched_mode mode)
{
    if (!m || (unsigned)mode >= METRICS_MODE_COUNT) return;
    int old = atomic_exchange_explicit(&m->mode, (int)mode, RLX);
    if (old != (int)mode) atomic_fetch_add_explicit(&m->mode_transitions, 1, RLX);
}

static void snapshot_windows(struct metrics *m, uint64_t now_ns, struct metrics_snapshot *out)
{
    uint64_t now_sec = now_ns / NS_PER_S;
    uint64_t tokens[METRICS_N_WINDOWS] = {0}, reqs[METRICS_N_WINDOWS] = {0};
    uint64_t e2e[METRICS_HIST_BUCKETS] = {0};
    uint64_t e2e_slot[RAW_BUCKETS];
    for (uint32_t i = 0; i < METRICS_SLOTS; i++) {
        struct metrics_slot *s = &m->slots[i];
        uint64_t t1 = atomic_load_explicit(&s->tag, memory_order_acquire);
        if (t1 == 0 || (t1 & SLOT_RESETTING)) continue;
        uint64_t sec = t1 - 1;
        if (sec > now_sec || now_sec - sec >= METRICS_LATENCY_WINDOW) continue;
        uint64_t tok = atomic_load_explicit(&s->tokens, RLX);
        uint64_t req = atomic_load_explicit(&s->requests, RLX);
        for (uint32_t b = 0; b < RAW_BUCKETS; b++)
            e2e_slot[b] = atomic_load_explicit(&s->e2e[b], RLX);
        atomic_thread_fence(memory_order_acquire);
        if (atomic_load_explicit(&s->tag, RLX) != t1) continue; /* rotated while read */
        uint64_t age = now_sec - sec;
        for (int w = 0; w < METRICS_N_WINDOWS; w++) {
            if (age < window_seconds[w]) {
                tokens[w] += tok;
                reqs[w] += req;
            }
        }
        for (uint32_t b = 0; b < RAW_BUCKETS; b++) e2e[b] += e2e_slot[b];
    }
    double frac = (double)(now_ns % NS_PER_S) / 1e9;
    double uptime = (double)out->uptime_ns / 1e9;
    for (int w = 0; w < METRICS_N_WINDOWS; w++) {
        struct metrics_window_snapshot *ws = &out->windows[w];
        double span = (double)(window_seconds[w] - 1) + frac;
        if (uptime < span) span = uptime;
        if (span < 1e-3) span = 1e-3;
        ws->seconds = window_seconds[w];
        ws->span_s = span;
        ws->tokens = tokens[w];
        ws->requests = reqs[w];
        ws->tokens_per_s = (double)tokens[w] / span;
        ws->requests_per_s = (double)reqs[w] / span;
    }
    uint64_t n = 0;
    for (uint32_t b = 0; b < RAW_BUCKETS; b++) n += e2e[b];
    out->recent_requests = n;
    out->recent_p50_ms = metrics_hist_quantile(METRICS_HIST_E2E, e2e, 0.50) * 1e3;
    out->recent_p95_ms = metrics_hist_quantile(METRICS_HIST_E2E, e2e, 0.95) * 1e3;
    out->recent_p99_ms = metrics_hist_quantile(METRICS_HIST_E2E, e2e, 0.99) * 1e3;
}

int metrics_snapshot(struct metrics *m, uint64_t now_ns, struct metrics_snapshot *out)
{
    if (!m || !out) return KRS_ERR_INVALID;
    memset(out, 0, sizeof *out);
    out->now_ns = now_ns;
    out->uptime_ns = now_ns > m->start_ns ? now_ns - m->start_ns : 0;
    for (int p = 0; p < METRICS_PRIO_COUNT; p++) {
        out->submitted[p] = atomic_load_explicit(&m->submitted[p], RLX);
        out->submitted_total += out->submitted[p];
        out->queue_depth[p] = atomic_load_explicit(&m->queue_depth[p], RLX);
        out->queue_depth_total += out->queue_depth[p];
    }
    for (int r = 0; r < METRICS_FINISH_COUNT; r++) {
        out->finished[r] = atomic_load_explicit(&m->finished[r], RLX);
        out->finished_total += out->finished[r];
    }
    out->prompt_tokens = atomic_load_explicit(&m->prompt_tokens, RLX);
    out->generated_tokens = atomic_load_explicit(&m->generated_tokens, RLX);
    out->preemptions = atomic_load_explicit(&m->preemptions, RLX);
    out->late_admissions = atomic_load_explicit(&m->late_admissions, RLX);
    out->mode_transitions = atomic_load_explicit(&m->mode_transitions, RLX);
    out->tuning_adjustments = atomic_load_explicit(&m->tuning_adjustments, RLX);
    out->degradation_events = atomic_load_explicit(&m->degradation_events, RLX);
    out->running = atomic_load_explicit(&m->running, RLX);
    out->batch_limit = atomic_load_explicit(&m->batch_limit, RLX);
    out->kv_used = atomic_load_explicit(&m->kv_used, RLX);
    out->kv_free = atomic_load_explicit(&m->kv_free, RLX);
    out->dev_weights = atomic_load_explicit(&m->dev_weights, RLX);
    out->dev_kv = atomic_load_explicit(&m->dev_kv, RLX);
    out->dev_activations = atomic_load_explicit(&m->dev_activations, RLX);
    out->dev_free = atomic_load_explicit(&m->dev_free, RLX);
    out->dev_total = atomic_load_explicit(&m->dev_total, RLX);
    out->mode = (enum metrics_sched_mode)atomic_load_explicit(&m->mode, RLX);
    out->prefix_requests = atomic_load_explicit(&m->prefix_requests, RLX);
    out->prefix_hit_requests = atomic_load_explicit(&m->prefix_hit_requests, RLX);
    out->prefix_prompt_tokens = atomic_load_explicit(&m->prefix_prompt_tokens, RLX);
    out->prefix_cached_tokens = atomic_load_explicit(&m->prefix_cached_tokens, RLX);
    out->prefix_blocks = atomic_load_explicit(&m->prefix_blocks, RLX);
    out->prefix_blocks_evictable = atomic_load_explicit(&m->prefix_blocks_evictable, RLX);
    out->prefix_evictions = atomic_load_explicit(&m->prefix_evictions, RLX);
    out->dedup_requests = atomic_load_explicit(&m->dedup_requests, RLX);

    for (int h = 0; h < METRICS_HIST_COUNT; h++) {
        struct metrics_hist_snapshot *hs = &out->hist[h];
        for (uint32_t b = 0; b < METRICS_HIST_BUCKETS; b++) {
            hs->buckets[b] = atomic_load_explicit(&m->hist[h].buckets[b], RLX);
            hs->count += hs->buckets[b];
        }
        uint64_t sum = atomic_load_explicit(&m->hist[h].sum, RLX);
        hs->sum = metrics_hist_is_latency(h) ? (double)sum * 1e-9 : (double)sum;
        hs->p50 = metrics_hist_quantile(h, hs->buckets, 0.50);
        hs->p95 = metrics_hist_quantile(h, hs->buckets, 0.95);
        hs->p99 = metrics_hist_quantile(h, hs->buckets, 0.99);
    }
    snapshot_windows(m, now_ns, out);

    pthread_mutex_lock(&m->deg_mu);
    out->n_degradations = m->deg_count;
    for (uint32_t i = 0; i < m->deg_count; i++)
        out->degradations[i] = m->deg[(m->deg_head + i) % METRICS_DEGRADE_RING];
    pthread_mutex_unlock(&m->deg_mu);
    return KRS_OK;
}
