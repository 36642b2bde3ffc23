/* controller/: the adaptive batch-limit controller (the seed plan's AdaptiveController), a
 * goodput controller that finds the knee of step time vs batch size.
 *
 * The engine thread runs every admitted sequence together in one batched forward per "step";
 * the batch limit (how many sequences may run at once) trades per-stream speed for throughput,
 * and prompt chunks ride in the same steps. The controller sees every step (its latency, the
 * decoding sequences in it, the prompt tokens in it, the queue and how long its oldest request
 * has waited) and decides three things:
 *
 *   1. the batch LIMIT. Goodput is the tokens/s of requests that meet their latency targets: a
 *      step P99 under p99_target_ms (every stream's inter-token latency) and a first token
 *      before ttft_target_ms. From decode-only steps it keeps a decayed least-squares line of
 *      window step P99 against batch size, P99(n) = a + b n. Throughput n / (a + b n) has a
 *      knee: the marginal tok/s of one more sequence, relative to what each sequence gets,
 *      is a / (a + b n). The limit grows
 *        - up to the KNEE (the largest n where that ratio is still >= knee_gain): beyond it
 *          extra sequences add little throughput and slow every stream; on a GPU (b ~ 0) the
 *          knee is max_batch;
 *        - past the knee only while requests queue for longer than ttft_target_ms, or late
 *          admissions (rule 4) ran past the limit in the last window: then the
 *          sequences it admits turn missed first-token targets into goodput; such an episode
 *          lasts while requests still queue and more than the knee run (admitting the late
 *          requests shortens the wait; it must not send the limit back to the knee while
 *          work still waits);
 *        - never past the CAPACITY: the largest n whose predicted P99 plus twice the noise
 *          (EMA of the residual from the line) plus a prefill reserve (the time of a minimum
 *          prompt chunk while prompts are arriving) stays within target.
 *      Growth needs no queue once the line is fitted; before the fit it is a probe (below)
 *      under pressure. One grow step is at most +50 %. It HOLDS while the wanted change is under
 * hold_band (5 %) of the limit, so the limit is steady at steady load. It SHRINKS when the EMA of
 *      the window P99 of ALL steps (prompt chunks included: that is what a stream's
 *      inter-token gap sees) and the window P99 are both over target, to limit * target / ema
 *      (at least by 1, at most max_shrink_fraction; not below the knee while queued requests
 *      have waited past ttft_target_ms: fewer sequences would turn missed step targets into
 *      missed first tokens, no goodput either way, and lose throughput); the old limit is then
 *      a ceiling growth
 *      may not reach for ceiling_windows windows (forgotten early once the EMA falls under
 *      ceiling_reset * target), so noise cannot make it ping-pong.
 *      The limit governs decode concurrency once the engine is SATURATED; below that a new
 *      request does not wait for a tuning window: controller_admit_limit is the limit or,
 *      while the last windows are within target, the capacity the step-time model predicts
 *      (before any decode step was measured: max_batch, and the first window corrects it;
 *      before a slope is known and while nobody queued: the measured step scaled as if its
 *      whole cost were per sequence; with the target out of reach: the knee). So a burst at
 *      low load starts at once, and under saturation the limit decides. Without a slope and
 *      with work waiting, the limit PROBES a second batch size for one window (up by half
 *      within the steepest line through the measurement, at least one; from max_batch down by
 *      a quarter), so the fit learns the slope even when admission pinned the batch size;
 *      far over target (1.5x) it probes once the same way before shrinking (the cost may be
 *      the fixed part, which shrinking cannot fix). A limit well above the knee (25 %, with
 *      batch sizes in the fit far enough apart) comes back down to it;
 *   2. the PREFILL BUDGET of a step (controller_prefill_budget): the prompt tokens that keep
 *      the step's predicted latency (decode line + learned ms per prompt token) under 0.9 *
 *      target, at least min_prefill_chunk so prompts always progress, at most the engine's
 *      token budget. A step without decodes has no stream to protect: the whole token
 *      budget. With the target out of reach (see the unreachable rule) every step misses it
 *      anyway: prompts may add up to half a decode step, and while requests are late in the
 *      queue (past ttft_target_ms) up to two. Until the per-token cost has
 * been measured (against decode-only steps: while none was ever seen, the last step of each window
 * carries no prompt tokens) a prompt token is assumed to cost what one more decoding sequence costs
 * (the fitted slope), or min_prefill_chunk before the fit;
 *   3. DEGRADATION: at least CONTROLLER_DEGRADE_STEPS steps of a window, or one step in each of
 *      two windows in a row (a lasting regression, not one slow step: a lone one is an outlier,
 *      left out of the window's P99) over degrade_factor_target * target AND over
 *      degrade_factor_ema * EMA (a sudden regression, not a slow drift; the EMA or what the
 *      fitted line predicts at the window's batch size, whichever is more: admitting more
 *      sequences is not a regression) AND over EMA + 4 noise
 *      levels (P99 - P50 within windows, or the fit's residual: on a busy shared host the
 *      steps vary by hundreds of ms without any regression), each step counted less what its
 *      prompt tokens are known to cost (a long chunk is slow by leave of the prefill budget),
 *      cuts the limit at once
 *      to the fixed fallback size (fixed_batch, or min_batch when 0; never raised by a
 *      spike), records an event with its reason and stops tuning. Windows keep being measured;
 *      after `calm_period_ms` without a new spike tuning resumes from the fallback size
 *      ("recovered" event). The spike window itself is not folded into the EMA.
 *   4. LATE ADMISSION: a request that has waited late_wait_ms in the queue is admitted while the
 *      predicted step P99 stays within late_p99_factor * target (not just target), and a step
 *      that carries a late request's prompt sizes its chunk against that bound too. Where the
 *      load is more than the target allows but less than the engine can take (16 clients on 2
 *      cores: the target fits 9, the knee is 16+), holding requests at the target's capacity
 *      turned every queued request into a multi-second first token while the running streams
 *      gained a few ms per token; a request in the queue makes no progress at all, a stream
 *      slowed by half still does. The scheduler reports the late admissions that run past
 *      the limit (controller_step.n_late); the limit then takes them in, so that the next
 *      requests do not wait late_wait_ms first: over target but within the late bound it
 *      grows to what ran ("late" event) and holds while the engine stays busy, instead of
 *      shrinking for slower steps it allowed; under target they count as a goodput episode
 *      (rule 1, past the knee up to the capacity). A shrink never counts them as what the
 *      limit let run, and a shrink to where the limit already is makes no event. Not while
 *      degraded or fixed, and not with the target out of reach (rule 1's unreachable case
 *      admits everything late already).
 *   Disabled (controller_set_enabled(false)) the limit is the fixed fallback size and only the
 *   statistics are kept (mode CONTROLLER_MODE_FIXED).
 *   Windows and their P99 count only steps that decoded: a step of prompt tokens alone made no
 *   stream wait (it still teaches the cost of a prompt token).
 *
 * Every limit change is an event with its reason (which rule, the numbers behind it).
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
 *   ttft_target_ms 1000           a first token within a second.
 *   knee_gain 0.2                 stop at the knee where one more sequence adds less than a
 *                                 fifth of a sequence's share (80 % of the asymptotic tok/s).
 *   hold_band 0.05                the seed plan's +-5 % steadiness.
 *   min_prefill_chunk 8           prompts progress by at least 8 tokens a step.
 *   late_wait_ms 100              a tenth of the first-token target: a request waits about a
 *                                 step of the slow case before it is late (16 cores, 16
 *                                 clients, an earlier version of this rule: 250 put the TTFT
 *                                 p95 at 360 ms, llama-server's was 235-265 ms).
 *   late_p99_factor 2.0           the degradation threshold (degrade_factor_target): a late
 *                                 admission may slow the streams to where a regression
 *                                 starts, not past it (2-core, 16 clients, one run each with
 *                                 an earlier version of this rule: at 1.5 the TTFT p95 was
 *                                 6.0 s, at 2 and 3 0.8-1.0 s).
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

#define CONTROLLER_MAX_INTERVAL  256 /* most steps per evaluation window */
#define CONTROLLER_EVENTS        16  /* recent events kept (oldest dropped) */
#define CONTROLLER_REASON_LEN    128
#define CONTROLLER_DEGRADE_STEPS 2 /* steps of a window over the spike threshold to degrade */

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
    double ttft_target_ms;        /* queue wait past which growth may pass the knee; 0 = never */
    double knee_gain;             /* (0,1): marginal/average tok/s ratio that ends growth */
    double hold_band;             /* [0,1): changes smaller than this share of the limit wait */
    uint32_t min_prefill_chunk;   /* >= 1: prompt tokens a step carries at least */
    double late_wait_ms;          /* >= 0: queue wait that makes a request late (rule 4) */
    double late_p99_factor;       /* >= 1: late admissions keep P99 within this * target */
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
    double ema_p99_ms;           /* 0 before the first window */
    double last_window_p99_ms;   /* 0 before the first window */
    double slope_ms_per_seq;     /* current per-sequence latency estimate (0 if none yet) */
    double intercept_ms;         /* fitted P99 at batch 0 (0 if no fit yet) */
    uint32_t knee_limit;         /* where one more sequence stops paying (0 = no fit yet) */
    uint32_t capacity_limit;     /* most sequences the P99 target allows (0 = no fit yet) */
    uint32_t admit_limit;        /* controller_admit_limit: sequences that may run now */
    double prefill_ms_per_token; /* measured cost of a prompt token in a step (0 = unknown) */
    double window_tok_s;         /* decode tokens/s of the last window */
    double window_max_wait_ms;   /* longest queue wait seen in the last window */
    uint64_t windows;            /* windows evaluated */
    uint64_t adjustments;        /* grow + shrink decisions (not degradation cuts) */
    uint64_t degradations;
    uint64_t recoveries;
    uint32_t late_admit_limit; /* controller_late_admit_limit */
    uint64_t outliers;         /* windows with a lone step over the spike threshold, left out */
    uint32_t n_events;         /* valid entries in events[] */
    struct controller_event events[CONTROLLER_EVENTS]; /* oldest first */
};

/* One step as the engine saw it. */
struct controller_step {
    uint64_t latency_ns;
    uint32_t n_decode;       /* sequences that decoded one token in the step */
    uint32_t n_prefill;      /* prompt tokens the step carried */
    uint32_t queued;         /* requests still waiting for admission after it */
    uint64_t oldest_wait_ns; /* how long the oldest of them has waited (0 if none) */
    uint32_t n_late;         /* of n_decode, those running past the limit by late admission */
    uint64_t now_ns;         /* when the step ended */
};

/* Internal state; caller-owned (embed or put on the heap), treat as opaque. */
struct controller {
    struct controller_config cfg;
    enum controller_mode mode;
    uint32_t limit;
    uint64_t window_ns[CONTROLLER_MAX_INTERVAL]; /* every step of the window */
    uint64_t spike_ns[CONTROLLER_MAX_INTERVAL];  /* ... less its prompt tokens' known cost */
    uint64_t dec_ns[CONTROLLER_MAX_INTERVAL];    /* its decode-only steps */
    uint32_t n_in_window, n_dec;
    uint64_t batch_sum;   /* sum of batch sizes of the decode-only steps */
    uint64_t late_sum;    /* sum of n_late over the window's steps */
    double late_last;     /* mean n_late of the last window */
    uint64_t tokens_sum;  /* decode tokens in the window */
    uint64_t prefill_sum; /* prompt tokens in the window */
    uint64_t window_time_ns;
    uint64_t max_wait_ns; /* longest queue wait in the window */
    bool pressure;        /* work was waiting at some step of the window */
    bool last_pressure;   /* ... of the last evaluated window */
    bool queued_seen;     /* a request stayed queued after some step of the window */
    bool last_queued;     /* ... of the last evaluated window */
    bool outlier_prev;    /* the last window had a lone step over the spike threshold */
    bool unmet_probe;     /* probed a second size far over target; cleared by a fit */
    bool have_ema;
    double ema_ms, last_p99_ms;
    double dev_ms;    /* EMA of |window p99 - fitted line|: the noise the fit sees */
    double spread_ms; /* EMA of window P99 - P50: the noise within windows */
    bool have_dec;
    double dec_ema_ms, dec_last_ms, dec_last_batch; /* decode-only window P99 */
    double pf_ms, pf_tok;  /* decayed sums: what prompt tokens added to steps, and how many */
    uint64_t plain_ns_sum; /* decode-only steps of the window: latency sum, count, batches */
    uint32_t plain_n;
    uint64_t plain_batch_sum;
    bool have_plain;
    double plain_ms, plain_batch; /* EMA of their window means (the prompt-cost baseline) */
    double prefill_per_step;      /* EMA of prompt tokens per step (are prompts arriving?) */
    double last_tok_s, last_wait_ms;
    /* decayed least-squares stats of (mean batch, window p99 ms) */
    double sw, sx, sy, sxx, sxy;
    double slope;
    uint32_t knee;         /* knee of the last confirmed fit; 0 = unknown */
    uint32_t unreach_knee; /* != 0: the target is unreachable, run at this knee */
    double unreach_ms;     /* the P99 predicted at the minimum batch when that was seen */
    bool late_hold;        /* unreachable target and requests were late: run max_batch while
                              more than the knee run */
    bool late_grown;       /* the limit took in late admissions (rule 4); held while busy */
    bool goodput_hold;     /* reachable target, requests were late: stay past the knee (at
                              capacity) while requests queue and more than the knee run */
    uint32_t ceiling;      /* 0 = none */
    uint32_t ceiling_left; /* windows the ceiling still holds */
    uint64_t last_spike_ns;
    uint64_t windows, adjustments, degradations, recoveries, outliers;
    uint32_t ev_head, ev_count;
    struct controller_event events[CONTROLLER_EVENTS];
};

/* Fills the documented CPU defaults. */
void controller_config_default(struct controller_config *cfg);

/* Checks cfg and sets ctrl to its initial state at time now_ns. Returns KRS_OK or
 * KRS_ERR_INVALID (NULL pointer, min_batch 0, max < min, interval out of range, target <= 0,
 * alpha outside (0,1], factors < 1, fractions out of range). cfg is copied. */
int controller_init(struct controller *ctrl, const struct controller_config *cfg, uint64_t now_ns);

/* Records one step (see struct controller_step). Every `interval` steps that carried work
 * evaluates a window and may change the limit. Returns the batch limit to use from now on (0
 * only for ctrl/st NULL). */
uint32_t controller_observe(struct controller *ctrl, const struct controller_step *st);

/* The most sequences that may run at once now (see rule 1 above): >= the limit; in DEGRADED and
 * FIXED mode the limit. 0 only for ctrl NULL. */
uint32_t controller_admit_limit(const struct controller *ctrl);

/* The prompt tokens the next step may carry next to n_decode decoding sequences, at most
 * max_tokens (see rule 2 above; 0 for the one step a window that measures the decode-only
 * baseline before there is one); in FIXED mode, or with n_decode 0, max_tokens. */
uint32_t controller_prefill_budget(const struct controller *ctrl, uint32_t n_decode,
                                   uint32_t max_tokens);

/* LATE ADMISSION (rule 4): the sequences that may run when the request to admit has waited
 * controller_late_wait_ns (late_wait_ms) in the queue, at least controller_admit_limit, and
 * the prefill budget of a step that carries the prompt of such a request (its first token is
 * late). Both hold the predicted step P99 within late_p99_factor * target instead of target. */
uint32_t controller_late_admit_limit(const struct controller *ctrl);
uint32_t controller_late_prefill_budget(const struct controller *ctrl, uint32_t n_decode,
                                        uint32_t max_tokens);
uint64_t controller_late_wait_ns(const struct controller *ctrl);

/* controller_observe for a decode-only step that nobody waited long for (no prompt tokens,
 * oldest_wait 0): batch_size decoding sequences, queued_waiting requests queued after it. */
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
