/* metrics/ private: the collector's layout and the histogram bucket math shared by metrics.c,
 * metrics_hist.c and metrics_render.c. Not for other modules: use metrics.h. */
#ifndef KRS_METRICS_IMPL_H
#define KRS_METRICS_IMPL_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#include "metrics/metrics.h"

/* Raw bucket index of an integer value (see metrics.h): 16 exact buckets, then 8 sub-buckets
 * per octave from 2^4 to 2^27, then one overflow bucket. */
#define RAW_EXACT    16u
#define RAW_SUB      8u
#define RAW_MAX_MSB  27
#define RAW_OVERFLOW (RAW_EXACT + (RAW_MAX_MSB - 4) * RAW_SUB) /* 200 */
#define RAW_BUCKETS  (RAW_OVERFLOW + 1)                        /* 201 */

#define METRICS_SLOTS  64 /* per-second ring, > the longest window (60 s) */
#define SLOT_RESETTING (1ull << 63)

static inline uint32_t metrics_raw_index(uint64_t v)
{
    if (v < RAW_EXACT) return (uint32_t)v;
    int msb = 63 - __builtin_clzll(v);
    if (msb >= RAW_MAX_MSB) return RAW_OVERFLOW;
    return RAW_EXACT + (uint32_t)(msb - 4) * RAW_SUB + (uint32_t)((v >> (msb - 3)) & 7u);
}

/* Lower bound of a raw bucket (inclusive). */
static inline uint64_t metrics_raw_lo(uint32_t i)
{
    if (i < RAW_EXACT) return i;
    if (i >= RAW_OVERFLOW) return 1ull << RAW_MAX_MSB;
    uint32_t o = (i - RAW_EXACT) / RAW_SUB, sub = (i - RAW_EXACT) % RAW_SUB;
    return (uint64_t)(8u + sub) << (o + 1);
}

/* Upper bound of a raw bucket (exclusive); UINT64_MAX for the overflow bucket. */
static inline uint64_t metrics_raw_hi(uint32_t i)
{
    if (i < RAW_EXACT) return (uint64_t)i + 1;
    if (i >= RAW_OVERFLOW) return UINT64_MAX;
    uint32_t o = (i - RAW_EXACT) / RAW_SUB, sub = (i - RAW_EXACT) % RAW_SUB;
    return (uint64_t)(9u + sub) << (o + 1);
}

static inline bool metrics_hist_is_latency(enum metrics_hist_id id)
{
    return id <= METRICS_HIST_STEP;
}

/* Bucket of a value: latency histograms take ns (bucketed in whole us), counts take items. */
static inline uint32_t metrics_bucket_fast(enum metrics_hist_id id, uint64_t value)
{
    if (metrics_hist_is_latency(id)) return metrics_raw_index(value / 1000u);
    return value == 0 ? 0u : 1u + metrics_raw_index(value - 1);
}

struct metrics_hist {
    _Atomic uint64_t buckets[METRICS_HIST_BUCKETS];
    _Atomic uint64_t sum; /* ns for latency histograms, items for counts */
};

/* One second of the windows. tag = second + 1 (0 = never used), SLOT_RESETTING while a
 * writer clears it for a new second. */
struct metrics_slot {
    _Atomic uint64_t tag;
    _Atomic uint64_t tokens;
    _Atomic uint64_t requests;
    _Atomic uint64_t e2e[RAW_BUCKETS]; /* end-to-end latency, raw us buckets */
};

struct metrics {
    uint64_t start_ns;
    _Atomic uint64_t submitted[METRICS_PRIO_COUNT];
    _Atomic uint64_t finished[METRICS_FINISH_COUNT];
    _Atomic uint64_t prompt_tokens, generated_tokens;
    _Atomic uint64_t preemptions, mode_transitions, tuning_adjustments, degradation_events;
    _Atomic uint64_t late_admissions;
    _Atomic int64_t queue_depth[METRICS_PRIO_COUNT];
    _Atomic int64_t running, batch_limit, kv_used, kv_free;
    _Atomic int64_t dev_weights, dev_kv, dev_activations, dev_free, dev_total;
    _Atomic int mode;
    _Atomic uint64_t prefix_requests, prefix_hit_requests, prefix_prompt_tokens,
        prefix_cached_tokens, prefix_evictions, dedup_requests;
    _Atomic int64_t prefix_blocks, prefix_blocks_evictable;
    struct metrics_hist hist[METRICS_HIST_COUNT];
    struct metrics_slot slots[METRICS_SLOTS];
    pthread_mutex_t deg_mu; /* guards deg_* (rare writes, snapshot reads) */
    uint32_t deg_head, deg_count;
    struct metrics_degradation deg[METRICS_DEGRADE_RING];
};

#endif
