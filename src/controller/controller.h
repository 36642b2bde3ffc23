/* controller/: the adaptive batch-limit controller (the seed plan's AdaptiveController).
 *
 * The engine thread runs every admitted sequence together in one batched forward per "step";
 * the batch limit (how many sequences may run at once) trades per-stream speed for throughput.
 * This controller turns measured step latency into that limit:
 *
 *   - every `interval` steps it takes the P99 of the step latencies of that window and folds it
 *     into an EMA (alpha `ema_alpha`);
 *   - it SHRINKS when the EMA P99 is over the target: to limit * target / ema (the proportional
 *     model), at least by 1 and at most by `max_shrink_fraction` of the limit;
 *   - it GROWS only while work is waiting (a step in the window had queued requests or ran a
 *     full batch), the EMA and the window P99 are both under target, and the latency predicted
 *     for the bigger limit, plus twice the window-to-window noise (EMA of |P99 - EMA|), stays
 *     within target. The prediction uses the per-sequence slope of a
 *     decayed least-squares fit of window P99 against mean batch size (before the fit has two
 *     distinct batch sizes, growth is a single +1 probe). The step is
 *     +max(1, grow_fraction * limit), or up to +50 % once the slope is fitted, never beyond the
 *     most sequences that wanted to run in the window (one +1 probe aside), cut down to what
 *     the prediction allows;
 *   - between the two it HOLDS. That is the hysteresis band: [latency predicted one step up >
 *     target, EMA <= target]. A limit that went over target is also remembered as a ceiling
 *     that growth may not reach again for `ceiling_windows` windows (forgotten early once the
 *     EMA falls under `ceiling_reset` * target: the load got lighter), so noise cannot make the
 *     limit ping-pong across the target;
 *   - DEGRADATION: a window P99 over degrade_factor_target * target AND over
 *     degrade_factor_ema * EMA (a sudden regression, not a slow drift) cuts the limit at once to
 *     the fixed fallback size (fixed_batch, or min_batch when 0; never raised by a spike), records
 * an event with its reason and stops tuning. Windows keep being measured; after `calm_period_ms`
 * without a new spike tuning resumes from the fallback size ("recovered" event). The spike window
 * itself is not folded into the EMA;
 *   - disabled (controller_set_enabled(false)) the limit is the fixed fallback size and only
 *     the statistics are kept (mode CONTROLLER_MODE_FIXED).
 *
 * Pure logic: no threads, no clock reads (every time is passed in, so tests drive it with
 * synthetic traces), no allocation at all (the struct is caller-owned, fixed size).
 * Not thread-safe: one owner (the engine thread) calls everything; other threads see the state
 * through the metrics module or a snapshot the owner copies out.
 *
 * CPU defaults (controller_config_default), chosen for a small model on a few cores:
 *   min_batch 1, max_batch 32     a CPU decode step is bound by streaming the weights, so extra
 *                                 sequences are cheap up to a few dozen; beyond 32 the per-step
 *                                 activation and attention cost dominates and the KV pool runs
 *                                 out first anyway.
 *   p99_target_ms 100             100 ms per step = 10 tokens/s per stream, about reading speed:
 *                                 below that a stream looks stuck.
 *   fixed_batch 4                 the seed plan's middle batch size (2..8); safe on any CPU.
 *   ema_alpha 0.3, interval 10    the seed plan's values.
 *   degrade 2.0x target, 1.5x EMA the seed plan's regression rule.
 *   calm_period_ms 10000          ~10 windows at the target step time: long enough to see that
 *                                 a spike was not the start of a trend.
 *   grow_fraction 0.12, max_shrink_fraction 0.5, ceiling_windows 50, ceiling_reset 0.8. */
#ifndef KRS_CONTROLLER_CONTROLLER_H
#define KRS_CONTROLLER_CONTROLLER_H

#include <stdbool.h>
#include <stdint.h>

#define CONTROLLER_MAX_INTERVAL 256 /* most steps per evaluation window */
#define CONTROLLER_EVENTS       16  /* recent events kept (oldest dropped) */
#define CONTROLLER_REASON_LEN   128

enum controller_mode {
    CONTROLLER_MODE_TUNING = 0,   /* auto-tuning the limit */
    CONTROLLER_MODE_DEGRADED = 1, /* after a P99 spike: fixed fallback limit until calm */
    CONTROLLER_MODE_FIXED = 2,    /* auto-tuning disabled: fixed limit */
};

enum controller_event_kind {
    CONTROLLER_EVENT_GROW = 0,
    CONTROLLER_EVENT_SHRINK = 1,
    CONTROLLER_EVENT_DEGRADE = 2,
    CONTROLLER_EVENT_RECOVER = 3,
    CONTROLLER_EVENT_ENABLE = 4,
    CONTROLLER_EVENT_DISABLE = 5,
};

struct controller_config {
    uint32_t min_batch;           /* >= 1 (MLX_AUTO_TUNE_MIN_BATCH) */
    uint32_t max_batch;           /* >= min_batch (MLX_AUTO_TUNE_MAX_BATCH) */
    uint32_t fixed_batch;         /* fallback/fixed size, clamped into [min,max]
                                     (MLX_GPU_SCHEDULER_BATCH_SIZE) */
    uint32_t initial_batch;       /* starting limit when tuning; 0 = min_batch */
    double ema_alpha;             /* (0,1] */
    uint32_t interval;            /* steps per window, 1..CONTROLLER_MAX_INTERVAL */
    double p99_target_ms;         /* > 0 (MLX_GPU_SCHEDULER_P99_THRESHOLD_MS) */
    double degrade_factor_target; /* >= 1: spike if window P99 > this * target ... */
    double degrade_factor_ema;    /* >= 1: ... and > this * EMA */
    uint64_t calm_period_ms;      /* spike-free time before tuning resumes */
    double grow_fraction;         /* grow step = max(1, floor(grow_fraction * limit)), [0,1] */
    double max_shrink_fraction;   /* one shrink removes at most this share of the limit, (0,1] */
    uint32_t ceiling_windows;     /* windows a limit that went over target stays barred */
    double ceiling_reset;         /* forget the ceiling when EMA < ceiling_reset * target */
    bool enabled;                 /* false = fixed limit (MLX_AUTO_TUNE off) */
};

struct controller_event {
    uint64_t t_ns; /* the now_ns passed with the step that caused it */
    enum controller_event_kind kind;
    uint32_t old_limit, new_limit;
    char reason[CONTROLLER_REASON_LEN]; /* e.g. "p99 312.0 ms > 2.0x target 100.0 ms and ..." */
};

struct controller_snapshot {
    uint32_t limit;
    enum controller_mode mode;
    double ema_p99_ms;         /* 0 before the first window */
    double last_window_p99_ms; /* 0 before the first window */
    double slope_ms_per_seq;   /* current per-sequence latency estimate (0 if none yet) */
    uint64_t windows;          /* windows evaluated */
    uint64_t adjustments;      /* grow + shrink decisions (not degradation cuts) */
    uint64_t degradations;
    uint64_t recoveries;
    uint32_t n_events;                                 /* valid entries in events[] */
    struct controller_event events[CONTROLLER_EVENTS]; /* oldest first */
};

/* Internal state; caller-owned (embed or put on the heap), treat as opaque. */
struct controller {
    struct controller_config cfg;
    enum controller_mode mode;
    uint32_t limit;
    uint64_t window_ns[CONTROLLER_MAX_INTERVAL];
    uint32_t n_in_window;
    uint64_t batch_sum; /* sum of batch sizes in the window */
    bool pressure;      /* work was waiting at some step of the window */
    uint32_t demand;    /* most sequences that wanted to run at a step (running + waiting) */
    bool have_ema;
    double ema_ms, last_p99_ms;
    double dev_ms; /* EMA of |window p99 - EMA|: the noise level */
    /* decayed least-squares stats of (mean batch, window p99 ms) */
    double sw, sx, sy, sxx, sxy;
    double slope;
    uint32_t ceiling;      /* 0 = none */
    uint32_t ceiling_left; /* windows the ceiling still holds */
    uint64_t last_spike_ns;
    uint64_t windows, adjustments, degradations, recoveries;
    uint32_t ev_head, ev_count;
    struct controller_event events[CONTROLLER_EVENTS];
};

/* Fills the documented CPU defaults. */
void controller_config_default(struct controller_config *cfg);

/* Checks cfg and sets ctrl to its initial state at time now_ns. Returns KRS_OK or
 * KRS_ERR_INVALID (NULL pointer, min_batch 0, max < min, interval out of range, target <= 0,
 * alpha outside (0,1], factors < 1, fractions out of range). cfg is copied. */
int controller_init(struct controller *ctrl, const struct controller_config *cfg, uint64_t now_ns);

/* Records one step: its latency, how many sequences it ran, how many requests were waiting for
 * admission after it, and the time it ended. Every `interval` steps evaluates a window and may
 * change the limit. Steps with batch_size 0 are ignored. Returns the batch limit to use from
 * now on (0 only for ctrl NULL). Callers feed adjustments/degradations to metrics from the
 * snapshot counters or events. */
uint32_t controller_observe_step(struct controller *ctrl, uint64_t step_latency_ns,
                                 uint32_t batch_size, uint32_t queued_waiting, uint64_t now_ns);

/* The current batch limit. */
uint32_t controller_limit(const struct controller *ctrl);

/* Copies the state out (events oldest first). Returns KRS_OK or KRS_ERR_INVALID on NULL. */
int controller_state(const struct controller *ctrl, struct controller_snapshot *out);

/* Turns auto-tuning on (mode TUNING, starting from the current limit) or off (mode FIXED, limit
 * = fixed_batch). Records an event when the setting changes. Returns KRS_OK or
 * KRS_ERR_INVALID on NULL. */
int controller_set_enabled(struct controller *ctrl, bool on, uint64_t now_ns);

/* "tuning", "degraded" or "fixed"; "grow", "shrink", "degrade", "recover", "enable",
 * "disable". Static strings, never NULL. */
const char *controller_mode_name(enum controller_mode mode);
const char *controller_event_name(enum controller_event_kind kind);

#endif
