/* The scheduler: one engine thread that owns the model context (weights, KV cache, backend) and
 * steps every running request together — continuous batching.
 *
 * Other threads talk to it only through this API: sched_submit hands over a request (the
 * scheduler copies what it needs) and returns a stream; tokens come back through the stream (a
 * bounded ring + condition variable). sched_cancel, sched_set_mode and sched_drain are messages
 * the engine applies at its next step. The engine never blocks on a reader: when a reader lets
 * its stream fill up, the request is cancelled with the reason "client too slow".
 *
 * Each step: apply messages; drop cancelled / timed-out requests and free their KV; admit queued
 * requests by priority (urgent > default > background, FIFO within a level, background aged so it
 * never starves) while the batch limit and free KV blocks allow; build one batch of every
 * running decode plus prompt chunks under the token budget; one forward; sample; push tokens;
 * retire finished requests with a finish reason. When KV blocks run out mid-generation the
 * lowest-priority, most recently admitted request is preempted back to the queue and recomputed
 * later (its stream just pauses).
 *
 * Dedup (sched_params.dedup, off by default): a request identical to a queued or prefilling one
 * (same prompt, max_tokens, sampling, stop, grammar and priority) whose output is deterministic
 * (greedy, or an explicit seed) joins it instead of computing again; both streams get the same
 * events, each request keeps its own id, usage, timeout and cancellation (sched_dedup.c).
 *
 * Modes (switchable at run time, nothing lost): SCHED_MODE_AUTO (continuous batching with the
 * AdaptiveController choosing the batch limit), SCHED_MODE_FIXED (a fixed limit), SCHED_MODE_OFF
 * (one request at a time: the rollback path of the seed plan). */
#ifndef KRS_SCHED_H
#define KRS_SCHED_H

#include <stddef.h>
#include <stdint.h>

#include "sampler/sampler.h"

struct model;
struct tokenizer;
struct grammar;
struct metrics;
struct sched;
struct sched_stream;

enum sched_mode { SCHED_MODE_AUTO = 0, SCHED_MODE_FIXED = 1, SCHED_MODE_OFF = 2 };
enum sched_priority { SCHED_PRIO_URGENT = 0, SCHED_PRIO_DEFAULT = 1, SCHED_PRIO_BACKGROUND = 2 };
enum sched_finish {
    SCHED_FINISH_NONE = 0,
    SCHED_FINISH_STOP = 1,      /* end-of-generation token, stop id or stop string */
    SCHED_FINISH_LENGTH = 2,    /* max_tokens or context length */
    SCHED_FINISH_CANCELLED = 3, /* sched_cancel, client gone, timeout, too slow, shutdown */
    SCHED_FINISH_ERROR = 4,
};

const char *sched_mode_name(enum sched_mode m);
const char *sched_priority_name(enum sched_priority p);
const char *sched_finish_name(enum sched_finish f);
int sched_parse_mode(const char *s, enum sched_mode *out);
int sched_parse_priority(const char *s, enum sched_priority *out);

struct sched_params {
    int max_running;      /* KV sequence slots = most requests running at once */
    int max_queue;        /* waiting requests beyond which submit returns KRS_ERR_FULL */
    int max_batch_tokens; /* tokens per forward (decodes + prefill chunks) */
    int64_t kv_tokens;    /* KV cache capacity in positions; 0 = what the device memory holds */
    int max_ctx;          /* 0 = model's context, capped by kv_tokens */
    int n_threads;        /* CPU compute threads and sampling threads, 0 = all */
    char device[16];      /* compute backend: "cpu" or "cuda" */
    uint64_t mem_budget;  /* CPU backend memory budget in bytes; 0 = available memory */
    enum sched_mode mode;
    int fixed_batch; /* limit in FIXED mode and the controller's fallback */
    int auto_min_batch, auto_max_batch;
    double ema_alpha;
    int tune_interval;
    double late_wait_ms;    /* controller's late_wait_ms (controller.h rule 4) */
    double late_p99_factor; /* controller's late_p99_factor */
    double p99_target_ms;
    int adaptive_window; /* 1: admission window between window_min_ms and window_max_ms */
    double window_min_ms, window_max_ms;
    int stream_capacity;     /* events buffered per stream before the request is cancelled */
    int background_aging_ms; /* a background request waiting this long competes with default */
    int prefix_cache;        /* 1: reuse the KV of prompt prefixes computed before (kv.h) */
    int64_t prefix_cache_max_tokens; /* cached positions kept while unused; 0 = KV pool's room */
    int dedup; /* 1: identical deterministic requests share one generation (sched_dedup.c) */
};
void sched_params_default(struct sched_params *p);

#define SCHED_MAX_STOP     STOP_MAX_STRINGS
#define SCHED_MAX_STOP_LEN STOP_MAX_LEN

struct sched_request {
    const int32_t *prompt; /* copied */
    int n_prompt;
    int max_tokens;                 /* > 0 */
    struct sampler_params sampling; /* logit_bias array copied; seed 0 = random */
    int has_seed;
    const int32_t *stop_ids; /* extra stop token ids, copied */
    int n_stop_ids;
    const char *stop[SCHED_MAX_STOP]; /* stop strings, copied */
    int n_stop;
    int ignore_eos;
    enum sched_priority priority;
    uint64_t timeout_ms; /* 0 = none */
    /* Constrained decoding (grammar/): NULL = unconstrained. Borrowed for the call; the request
     * takes its own reference. Only tokens that keep the output in the grammar are sampled, and
     * the request stops ("grammar complete") as soon as the output is a complete sentence that
     * nothing can extend. */
    struct grammar *grammar;
};

/* One event read from a stream. */
enum sched_event_kind { SCHED_EV_TOKEN = 1, SCHED_EV_FINISH = 2 };
#define SCHED_EV_TEXT_MAX 256
struct sched_event {
    enum sched_event_kind kind;
    int32_t token; /* TOKEN: the sampled id (-1 for text-only continuation entries) */
    float logprob;
    int n_top;
    struct sampler_token_logprob top[SAMPLER_MAX_TOP_LOGPROBS];
    uint16_t text_len; /* bytes of new complete UTF-8 text (stop strings held back/removed) */
    char text[SCHED_EV_TEXT_MAX];
    /* FINISH: */
    enum sched_finish finish;
    char reason[96]; /* human-readable detail (e.g. "stop string", "client too slow") */
    int n_prompt_tokens, n_gen_tokens;
    int n_cached_tokens; /* prompt tokens whose KV came from the prefix cache at admission */
    double ttft_ms, total_ms, queue_ms;
};

/* Creates the engine for `model` and `tok` (both borrowed; must outlive the sched) and starts
 * its thread. `metrics` (borrowed, may be NULL) receives every observation. */
int sched_create(const struct model *model, const struct tokenizer *tok,
                 const struct sched_params *p, struct metrics *metrics, struct sched **out,
                 char *err, size_t errlen);
/* Stops the engine: every unfinished request ends with CANCELLED ("shutdown"), then the thread
 * is joined and everything freed. Streams still held by readers stay valid until released. */
void sched_destroy(struct sched *s);

/* The longest sequence a request may have: prompt + max_tokens must not exceed it (the model
 * context, capped by the KV cache). The one context limit every front end checks against. */
int sched_max_ctx(const struct sched *s);

/* Submits a request. On success *out_stream (owned by the caller until sched_stream_release)
 * and *out_id are set. KRS_ERR_FULL: queue full (overload); KRS_ERR_STATE: draining;
 * KRS_ERR_INVALID: bad request (empty prompt, prompt + max_tokens beyond sched_max_ctx, a
 * token id outside the vocabulary, sampling parameters out of range); nothing is clamped. */
int sched_submit(struct sched *s, const struct sched_request *r, struct sched_stream **out_stream,
                 uint64_t *out_id);
/* Cancels by id at any stage; effective at the next step. KRS_ERR_NOT_FOUND if unknown/done. */
int sched_cancel(struct sched *s, uint64_t id);

/* Waits up to timeout_ms (-1 = forever) for the next event. KRS_OK with *ev filled,
 * KRS_ERR_AGAIN on timeout, KRS_ERR_STATE after the FINISH event has been read. */
int sched_stream_read(struct sched_stream *st, struct sched_event *ev, int timeout_ms);
/* Non-blocking variant for event loops: KRS_ERR_AGAIN when nothing is buffered. */
int sched_stream_try_read(struct sched_stream *st, struct sched_event *ev);
/* Called (from the engine thread, without locks held) whenever events become available; lets
 * an event-driven server resume a suspended connection. fn must not block for long nor call
 * back into this stream's release. */
void sched_stream_set_notify(struct sched_stream *st, void (*fn)(void *), void *arg);
uint64_t sched_stream_id(const struct sched_stream *st);
/* The reader is done: cancels the request if unfinished; frees the stream once both sides let
 * go. Waits for a notify callback in progress: when it returns, the callback is not running and
 * will not be called again (its argument may be freed). Not from inside the callback. */
void sched_stream_release(struct sched_stream *st);

/* Ends every queued and running request at the next step with CANCELLED and `reason` (e.g.
 * "model unloaded"); new submissions are still accepted unless draining. */
void sched_cancel_all(struct sched *s, const char *reason);

int sched_set_mode(struct sched *s, enum sched_mode mode, int fixed_batch);
/* Stop admitting new work (submit returns KRS_ERR_STATE); running and queued requests finish. */
void sched_drain(struct sched *s);

struct sched_request_info {
    uint64_t id;
    const char *state; /* "queued", "prefill", "decode", "shared" (follows a dedup leader) */
    enum sched_priority priority;
    int n_prompt, n_generated;
    double age_ms;
};

struct sched_state {
    enum sched_mode mode;
    int batch_limit;
    int running;
    int queued[3];
    uint64_t steps;
    uint64_t submitted, finished[5]; /* indexed by enum sched_finish */
    uint64_t preemptions;
    uint64_t deduped;      /* requests that joined an identical request's generation (dedup) */
    uint64_t heartbeat_ns; /* clock_now_ns() of the engine's last loop iteration */
    int in_step;           /* 1 while the engine runs a step (begun at heartbeat_ns) */
    int idle;              /* 1 when the engine has nothing to do */
    int draining;
    int64_t kv_blocks_total, kv_blocks_free;
    double window_ms;       /* current admission window */
    char device[16];        /* the compute backend's name */
    char device_error[128]; /* "" or why a forward failed for a device reason (sticky) */
    uint64_t mem_weights, mem_kv, mem_activations, mem_free, mem_total; /* its memory, bytes */
};
void sched_get_state(struct sched *s, struct sched_state *out);
/* The AdaptiveController's state as of the engine's last loop iteration. */
struct controller_snapshot;
void sched_get_controller(struct sched *s, struct controller_snapshot *out);
/* Copies up to cap live requests (registry); returns how many exist. */
int sched_list_requests(struct sched *s, struct sched_request_info *out, int cap);

#endif
