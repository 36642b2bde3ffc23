/* metrics/: histogram bucket geometry, quantile estimation from buckets, and the name tables.
 * Pure functions over bucket arrays; no state, no atomics (snapshots are plain copies). */
#include <math.h>

#include "metrics/metrics_impl.h"

uint32_t metrics_hist_bucket(enum metrics_hist_id id, uint64_t value)
{
    return metrics_bucket_fast(id, value);
}

void metrics_hist_bucket_range(enum metrics_hist_id id, uint32_t bucket, double *lo, double *hi)
{
    double l, h;
    if (metrics_hist_is_latency(id)) {
        if (bucket > RAW_OVERFLOW) bucket = RAW_OVERFLOW;
        l = (double)metrics_raw_lo(bucket) * 1e-6;
        h = bucket == RAW_OVERFLOW ? INFINITY : (double)metrics_raw_hi(bucket) * 1e-6;
    } else if (bucket == 0) {
        l = h = 0.0;
    } else {
        uint32_t r = bucket - 1 > RAW_OVERFLOW ? RAW_OVERFLOW : bucket - 1;
        l = (double)metrics_raw_lo(r) + 1.0;
        h = r == RAW_OVERFLOW ? INFINITY : (double)metrics_raw_hi(r);
    }
    if (lo) *lo = l;
    if (hi) *hi = h;
}

double metrics_hist_quantile(enum metrics_hist_id id, const uint64_t *buckets, double q)
{
    uint32_t nb = metrics_hist_is_latency(id) ? RAW_BUCKETS : METRICS_HIST_BUCKETS;
    uint64_t n = 0;
    for (uint32_t i = 0; i < nb; i++) n += buckets[i];
    if (n == 0) return 0.0;
    if (q < 0.0) q = 0.0;
    if (q > 1.0) q = 1.0;
    uint64_t rank = (uint64_t)ceil(q * (double)n);
    if (rank < 1) rank = 1;
    if (rank > n) rank = n;
    uint64_t before = 0;
    uint32_t b = 0;
    for (; b < nb; b++) {
        if (before + buckets[b] >= rank) break;
        before += buckets[b];
    }
    double lo, hi;
    metrics_hist_bucket_range(id, b, &lo, &hi);
    if (isinf(hi) || hi == lo) return lo;
    /* count histograms hold the integers [lo, hi] (width hi - lo + 1 values): exact if 1 */
    double frac = ((double)(rank - before) - 0.5) / (double)buckets[b];
    return lo + (hi - lo) * frac;
}

const char *metrics_hist_name(enum metrics_hist_id id)
{
    switch (id) {
    case METRICS_HIST_TTFT:
        return "ttft";
    case METRICS_HIST_INTER_TOKEN:
        return "inter_token";
    case METRICS_HIST_E2E:
        return "e2e";
    case METRICS_HIST_QUEUE_WAIT:
        return "queue_wait";
    case METRICS_HIST_STEP:
        return "step";
    case METRICS_HIST_BATCH_SIZE:
        return "batch_size";
    case METRICS_HIST_PROMPT_TOKENS:
        return "prompt_tokens";
    case METRICS_HIST_GEN_TOKENS:
        return "generated_tokens";
    case METRICS_HIST_COUNT:
        break;
    }
    return "unknown";
}

const char *metrics_priority_name(enum metrics_priority prio)
{
    switch (prio) {
    case METRICS_PRIO_URGENT:
        return "urgent";
    case METRICS_PRIO_DEFAULT:
        return "default";
    case METRICS_PRIO_BACKGROUND:
        return "background";
    case METRICS_PRIO_COUNT:
        break;
    }
    return "unknown";
}

const char *metrics_finish_reason_name(enum metrics_finish_reason reason)
{
    switch (reason) {
    case METRICS_FINISH_STOP:
        return "stop";
    case METRICS_FINISH_LENGTH:
        return "length";
    case METRICS_FINISH_CANCELLED:
        return "cancelled";
    case METRICS_FINISH_ERROR:
        return "error";
    case METRICS_FINISH_COUNT:
        break;
    }
    return "unknown";
}

const char *metrics_mode_name(enum metrics_sched_mode mode)
{
    switch (mode) {
    case METRICS_MODE_ON:
        return "on";
    case METRICS_MODE_OFF:
        return "off";
    case METRICS_MODE_FIXED:
        return "fixed";
    case METRICS_MODE_COUNT:
        break;
    }
    return "unknown";
}
