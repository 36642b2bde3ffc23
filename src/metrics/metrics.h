/* metrics/: the metrics collector (the seed plan's MetricsCollector + Prometheus exporter data).
 *
 * Recording is lock-free and allocation-free: every recorder is a handful of relaxed C11 atomic
 * adds or stores, safe from any thread (the engine thread records steps and tokens, HTTP threads
 * record submissions). Readers (HTTP /metrics and /stats) take a snapshot, which reads the same
 * atomics; a snapshot is not a single instant across all metrics, but every counter in it is a
 * value the counter really had, and histogram counts are the sums of their own buckets.
 *
 * Histograms (log-linear, HDR-style): a raw integer value v (microseconds for latencies, items
 * for counts) lands in an exact bucket when v < 16, else in one of 8 equal sub-buckets of its
 * power-of-two octave [2^k, 2^(k+1)), up to 2^27 (134 s or 134M items); larger values go to an
 * overflow bucket. Relative bucket width is 1/8..1/15, so a quantile estimated from buckets is
 * off by less than one bucket width: |error| < 12.5 % of the value (and < 1 us / < 1 item
 * below 16). Quantiles use the nearest-rank definition (the ceil(q*n)-th smallest) and
 * interpolate inside the bucket; integer histograms whose bucket holds one integer are exact.
 * Count histograms (batch size, tokens per request) put 0 in its own bucket and v >= 1 in the
 * bucket of v - 1, so that Prometheus `le` bounds 1, 2, 4, 8, ... are exact.
 *
 * Windows: a ring of per-second slots (tokens generated, requests finished, and a histogram of
 * end-to-end request latency). A window of W seconds covers the current second and the W-1
 * before it, i.e. [floor(now) - W + 1, now]: rates divide by that span (W-1 .. W seconds, or
 * the uptime if shorter), so they are computed relative to `now`, not to the last event, and
 * fall to zero once the window holds no event. mlx_latency_p50/p95/p99_milliseconds are the
 * end-to-end request latency (submit -> finish) of the requests that finished in the last 60 s
 * (0 when none did; the JSON stats give null). TTFT, inter-token, queue-wait and step time are
 * cumulative histograms.
 *
 * Times are passed in by the caller (now_ns from clock_now_ns(), or synthetic in tests): the
 * module never reads a clock. A recorder that runs more than 60 s behind the newest second
 * recorded is dropped from the windows (it still counts in totals and histograms). */
#ifndef KRS_METRICS_METRICS_H
#define KRS_METRICS_METRICS_H

#include <stddef.h>
#include <stdint.h>

struct cJSON;

/* 16 exact + 23 octaves * 8 + overflow, plus the zero-count bucket */
#define METRICS_HIST_BUCKETS   202
#define METRICS_N_WINDOWS      3  /* 5 s, 30 s, 60 s */
#define METRICS_LATENCY_WINDOW 60 /* seconds behind mlx_latency_p*_milliseconds */
#define METRICS_DEGRADE_RING   8  /* last degradation reasons kept */
#define METRICS_REASON_LEN     160

enum metrics_priority {
    METRICS_PRIO_URGENT = 0,
    METRICS_PRIO_DEFAULT = 1,
    METRICS_PRIO_BACKGROUND = 2,
    METRICS_PRIO_COUNT = 3,
};

enum metrics_finish_reason {
    METRICS_FINISH_STOP = 0,
    METRICS_FINISH_LENGTH = 1,
    METRICS_FINISH_CANCELLED = 2,
    METRICS_FINISH_ERROR = 3,
    METRICS_FINISH_COUNT = 4,
};

/* mlx_gpu_scheduler_mode: on = continuous batching with auto-tuning, off = one request at a
 * time (rollback path), fixed = continuous batching at a fixed batch size (auto-tune disabled
 * or degraded). */
enum metrics_sched_mode {
    METRICS_MODE_ON = 0,
    METRICS_MODE_OFF = 1,
    METRICS_MODE_FIXED = 2,
    METRICS_MODE_COUNT = 3,
};

enum metrics_hist_id {
    METRICS_HIST_TTFT = 0,          /* submit -> first generated token, seconds */
    METRICS_HIST_INTER_TOKEN = 1,   /* gap between consecutive tokens of a request, seconds */
    METRICS_HIST_E2E = 2,           /* submit -> finish, seconds */
    METRICS_HIST_QUEUE_WAIT = 3,    /* submit -> admitted into the running batch, seconds */
    METRICS_HIST_STEP = 4,          /* one engine step (batched forward + sampling), seconds */
    METRICS_HIST_BATCH_SIZE = 5,    /* sequences in a step, items */
    METRICS_HIST_PROMPT_TOKENS = 6, /* prompt tokens per finished request, items */
    METRICS_HIST_GEN_TOKENS = 7,    /* generated tokens per finished request, items */
    METRICS_HIST_COUNT = 8,
};

/* One finished request, as the scheduler hands it over (copied; nothing kept). */
struct metrics_request_record {
    enum metrics_priority priority;
    enum metrics_finish_reason reason;
    uint32_t prompt_tokens;
    uint32_t generated_tokens;
    uint64_t e2e_ns; /* submit -> finish */
};

struct metrics_hist_snapshot {
    uint64_t count;
    double sum;           /* seconds for latency histograms, items for count histograms */
    double p50, p95, p99; /* same unit; 0 when count == 0 */
    uint64_t buckets[METRICS_HIST_BUCKETS];
};

struct metrics_window_snapshot {
    uint32_t seconds;  /* 5, 30, 60 */
    double span_s;     /* the time the rates are divided by */
    uint64_t tokens;   /* generated tokens in the window */
    uint64_t requests; /* requests finished in the window */
    double tokens_per_s;
    double requests_per_s;
};

struct metrics_degradation {
    uint64_t t_ns;
    char reason[METRICS_REASON_LEN];
};

/* A plain copy of everything; large (~15 KB): put it on the heap or in static storage. */
struct metrics_snapshot {
    uint64_t now_ns, uptime_ns;
    /* counters */
    uint64_t submitted[METRICS_PRIO_COUNT];
    uint64_t submitted_total;
    uint64_t finished[METRICS_FINISH_COUNT];
    uint64_t finished_total;
    uint64_t prompt_tokens, generated_tokens;
    uint64_t preemptions, mode_transitions, tuning_adjustments, degradation_events;
    uint64_t late_admissions; /* admitted past the batch limit after waiting (controller rule 4) */
    /* gauges */
    int64_t queue_depth[METRICS_PRIO_COUNT];
    int64_t queue_depth_total;
    int64_t running, batch_limit, kv_used, kv_free;
    /* compute device memory in bytes, by use (metrics_set_device_memory) */
    int64_t dev_weights, dev_kv, dev_activations, dev_free, dev_total;
    enum metrics_sched_mode mode;
    /* prefix cache: lookups at first admission, and the KV cache's published blocks */
    uint64_t prefix_requests, prefix_hit_requests; /* requests looked up / that found a prefix */
    uint64_t prefix_prompt_tokens, prefix_cached_tokens; /* their prompt tokens / those reused */
    int64_t prefix_blocks, prefix_blocks_evictable;      /* gauges */
    uint64_t prefix_evictions;
    uint64_t dedup_requests; /* requests that shared an identical request's generation */
    /* windows */
    struct metrics_window_snapshot windows[METRICS_N_WINDOWS];
    uint64_t recent_requests; /* requests behind the recent_* percentiles */
    double recent_p50_ms, recent_p95_ms, recent_p99_ms;
    /* histograms */
    struct metrics_hist_snapshot hist[METRICS_HIST_COUNT];
    /* last degradation reasons, oldest first */
    uint32_t n_degradations;
    struct metrics_degradation degradations[METRICS_DEGRADE_RING];
};

struct metrics; /* opaque */

/* Creates a collector whose uptime starts at now_ns. All memory is reserved here (~120 KB).
 * Returns KRS_OK, KRS_ERR_INVALID (out NULL) or KRS_ERR_NOMEM. Free with metrics_destroy. */
int metrics_create(uint64_t now_ns, struct metrics **out);
/* Frees the collector; no recorder or reader may run concurrently. NULL is ignored. */
void metrics_destroy(struct metrics *m);

/* ---- recorders: any thread, lock-free, never fail (unknown enum values are ignored) ---- */

/* A request entered the queue. */
void metrics_record_submit(struct metrics *m, enum metrics_priority prio);
/* A request was admitted into the running batch after waiting queue_wait_ns. */
void metrics_record_admit(struct metrics *m, uint64_t queue_wait_ns);
/* A request produced its first token ttft_ns after submission. */
void metrics_record_first_token(struct metrics *m, uint64_t ttft_ns);
/* The gap between two consecutive tokens of one request. */
void metrics_record_inter_token(struct metrics *m, uint64_t gap_ns);
/* n generated tokens at now_ns (throughput windows and the generated-token total). */
void metrics_record_tokens(struct metrics *m, uint32_t n, uint64_t now_ns);
/* One engine step: its duration and how many sequences it ran. */
void metrics_record_step(struct metrics *m, uint64_t step_ns, uint32_t batch_size);
/* A request ended (exactly once per request) at now_ns. Counts it by reason, adds its prompt
 * tokens to the prompt-token total, and its latency to the 60 s window. */
void metrics_record_finish(struct metrics *m, const struct metrics_request_record *rec,
                           uint64_t now_ns);
void metrics_record_preemption(struct metrics *m);
/* A request admitted past the batch limit by late admission (sched_admit.c). */
void metrics_record_late_admission(struct metrics *m);
/* A request's first admission looked up the prefix cache: cached_tokens of its prompt_tokens
 * came from the cache. */
void metrics_record_prefix_lookup(struct metrics *m, uint32_t prompt_tokens,
                                  uint32_t cached_tokens);
/* A request joined an identical request's generation instead of computing its own (dedup). */
void metrics_record_dedup(struct metrics *m);
void metrics_record_tuning_adjustments(struct metrics *m, uint64_t n);
/* A degradation event; reason is copied (truncated to METRICS_REASON_LEN - 1). Takes a short
 * mutex (rare event, never on the per-token path). */
void metrics_record_degradation(struct metrics *m, const char *reason, uint64_t now_ns);

/* Gauges: last value wins. */
void metrics_set_queue_depth(struct metrics *m, enum metrics_priority prio, int64_t depth);
void metrics_set_batch(struct metrics *m, uint32_t running, uint32_t limit);
void metrics_set_kv_blocks(struct metrics *m, uint32_t used, uint32_t free_blocks);
/* The prefix cache's blocks (published, of which evictable) and its eviction total. */
void metrics_set_prefix_cache(struct metrics *m, int64_t blocks, int64_t evictable,
                              uint64_t evictions);
/* The compute backend's memory: weights, KV pool, activation arena, free and total bytes. */
void metrics_set_device_memory(struct metrics *m, uint64_t weights, uint64_t kv,
                               uint64_t activations, uint64_t free_bytes, uint64_t total);
/* Sets the scheduler mode; a change of mode counts one mode transition. */
void metrics_set_mode(struct metrics *m, enum metrics_sched_mode mode);

/* ---- readers: any thread ---- */

/* Fills *out as seen at now_ns (windows are relative to now_ns). KRS_OK or KRS_ERR_INVALID. */
int metrics_snapshot(struct metrics *m, uint64_t now_ns, struct metrics_snapshot *out);

/* Prometheus text exposition format 0.0.4 into buf (NUL-terminated). *len gets the length
 * without the NUL; when cap is too small returns KRS_ERR_FULL and *len is the length needed
 * (retry with cap > *len). KRS_ERR_NOMEM if the snapshot cannot be allocated. */
int metrics_render_prometheus(struct metrics *m, uint64_t now_ns, char *buf, size_t cap,
                              size_t *len);

/* Several collectors (one per served model) in one exposition: each family once, with every
 * collector's samples labelled model="ids[i]" (ids NULL: no label, n must then be 1 to keep
 * series distinct). n in [0, METRICS_MAX_MODELS]; buffer contract as above. */
#define METRICS_MAX_MODELS 16
#define METRICS_LABEL_MAX  320 /* the `model="..."` label prefix of one collector */
int metrics_render_prometheus_models(struct metrics *const *ms, const char *const *ids, int n,
                                     uint64_t now_ns, char *buf, size_t cap, size_t *len);

/* The /stats JSON object. On KRS_OK *out is a new cJSON tree the caller frees with
 * cJSON_Delete; KRS_ERR_NOMEM otherwise. */
int metrics_render_json(struct metrics *m, uint64_t now_ns, struct cJSON **out);

/* ---- histogram helpers (also used by tests) ---- */

/* The bucket a value falls in: latency histograms take nanoseconds, count histograms items. */
uint32_t metrics_hist_bucket(enum metrics_hist_id id, uint64_t value);
/* The value range of a bucket in the histogram's unit (seconds or items): [*lo, *hi) for
 * latencies, the integers [*lo, *hi] for counts; *hi = INFINITY for the overflow bucket. */
void metrics_hist_bucket_range(enum metrics_hist_id id, uint32_t bucket, double *lo, double *hi);
/* Nearest-rank quantile q in [0,1] of a snapshot histogram (0 when empty). */
double metrics_hist_quantile(enum metrics_hist_id id, const uint64_t *buckets, double q);
/* "ttft", "inter_token", "e2e", ... and the Prometheus name of a histogram. */
const char *metrics_hist_name(enum metrics_hist_id id);
const char *metrics_priority_name(enum metrics_priority prio);
const char *metrics_finish_reason_name(enum metrics_finish_reason reason);
const char *metrics_mode_name(enum metrics_sched_mode mode);

#endif
