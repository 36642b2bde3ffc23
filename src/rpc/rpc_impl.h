/* rpc/ internals: the per-message job, its generations, the ctx's stream pump, and the
 * helpers the method handlers share. Not part of the public API (rpc.h).
 *
 * A job is one rpc_handle call. It holds one slot per request (1 for an object, n for a batch
 * array); a slot holds one part per result (1, or one per batch_generate item). A part is either
 * ready (result or error) or waits for a non-streaming generation. Streaming generations are
 * ready at once ({stream_id}) and write notifications through a gate that opens only after the
 * job's response has been written, so a client always sees the stream id before its chunks.
 *
 * Streams are read the way the HTTP server reads them: each generation's scheduler stream
 * notifies (sched_stream_set_notify, engine thread) by putting the generation on the ctx's
 * ready list; the ctx's one pump thread takes generations off that list and drains their
 * streams without blocking (sched_stream_try_read). No thread per generation or per message.
 *
 * Lifetime: the job is counted: one reference for rpc_handle while it runs, one per live
 * generation; the last to let go frees it (and its generations). A job is "finished" when its
 * response is written and every generation has ended (all notifications written); that is when
 * the caller's done callback runs and the ctx's count of unfinished jobs (rpc_wait_idle) drops. */
#ifndef KRS_RPC_IMPL_H
#define KRS_RPC_IMPL_H

#include "config/config.h"
#include "rpc/rpc.h"
#include "sched/sched.h"

#include <cjson/cJSON.h>
#include <pthread.h>
#include <stdint.h>

#define RPC_STREAM_ID_MAX 128

struct engine;

struct rpc_ctx {
    struct engine_registry *reg;
    pthread_mutex_t lock;
    pthread_cond_t cv;
    struct rpc_gen *active; /* generations whose stream is still open (cancel looks here) */
    int n_jobs;             /* jobs not finished yet (rpc_wait_idle waits for 0) */
    uint64_t next_stream;   /* for generated stream ids */
    /* The pump: ready list of generations with events to read, under qlock (taken by the
     * engine thread's notify callback, so nothing else is done under it). */
    pthread_mutex_t qlock;
    pthread_cond_t qcv;
    struct rpc_gen *ready_head, *ready_tail;
    int stopping;
    pthread_t pump;
};

/* Notifications of a stream kept until its gate opens; the last RPC_GEN_FINAL_SLOTS entries
 * of `pending` are kept for the final stream.stats and stream.event so that a stream always
 * ends, also when memory ran out for its chunks. */
#define RPC_GEN_FINAL_SLOTS 2

struct rpc_gen {
    struct rpc_job *job;
    struct engine *eng; /* counted reference, released when the stream ends */
    struct sched_stream *st;
    uint64_t sched_id;
    char stream_id[RPC_STREAM_ID_MAX];
    int streaming;    /* notifications (else the result is built from text at the end) */
    int logprobs;     /* report logprobs */
    int top_logprobs; /* 0..SAMPLER_MAX_TOP_LOGPROBS */
    /* Pump-side state (only the pump thread touches it while the stream is open). */
    int index;  /* next chunk's index */
    int failed; /* out of memory: the request was cancelled and ends with an error */
    char *text; /* non-streaming: the whole text (alloc_*) */
    size_t len, cap;
    cJSON *lp; /* non-streaming with logprobs: [{token, logprob, top_logprobs?}] */
    struct sched_event fin;
    int done; /* under job->mu; fin, text and lp are final once it is set */
    /* Ready list (under ctx->qlock). */
    int queued;
    struct rpc_gen *next_ready;
    /* Gate: notifications wait in `pending` until the job's response is out. Under mu. */
    pthread_mutex_t mu;
    int gate_open;
    char **pending; /* cJSON_Print'ed texts, owned (cJSON_free) */
    size_t n_pending, cap_pending;
    struct rpc_gen *next_active; /* ctx->active list, under ctx->lock */
    int in_active;
};

struct rpc_part {
    int code;            /* 0: ok (result, or a pending gen) */
    char *msg;           /* error message (alloc_*) */
    cJSON *result;       /* ready result, owned */
    struct rpc_gen *gen; /* non-streaming generation whose finish makes the result */
};

struct rpc_slot {
    cJSON *id; /* duplicate of the request id; NULL with has_id = 0 for notifications */
    int has_id;
    int no_memory; /* its parts could not be allocated: answered "out of memory" */
    int batch_gen; /* batch_generate: parts become {results: [envelopes]} */
    int n_parts;
    struct rpc_part *parts;
};

struct rpc_job {
    struct rpc_ctx *ctx;
    struct rpc_sink sink;
    int is_array;
    int n_slots;
    struct rpc_slot *slots;
    struct rpc_gen **gens; /* every generation started by this job (owned) */
    int n_gens, cap_gens;
    pthread_mutex_t mu;
    int refs;
    /* Progress, under mu: generations not ended (all / non-streaming ones, whose results the
     * response waits for); every request dispatched; response claimed / written; finished. */
    int n_open, n_waiting;
    int dispatched, resp_claimed, responded, finished;
    void (*done)(void *); /* called once when finished; may be NULL */
    void *done_arg;
    const atomic_int *abort; /* set by the caller when its client went away; may be NULL */
};

/* ---- rpc.c: shared helpers ---------------------------------------------------------------- */

/* Sets part to an error (message formatted). */
void rpc_part_error(struct rpc_part *p, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* A JSON string of s[0..n) with invalid UTF-8 and NUL bytes replaced by U+FFFD. */
cJSON *rpc_json_string(const char *s, size_t n);
/* Starts one generation from generate params into part: an error, a ready {stream_id}
 * (streaming) or a pending gen. */
void rpc_generate_start(struct rpc_job *job, const cJSON *params, struct rpc_part *part);
/* Builds a non-streaming generation's result into part (after the gen is done). */
void rpc_generate_result(const struct rpc_gen *g, struct rpc_part *part);

/* Registers g under its stream id (unique among the ctx's live streams and this job's) and
 * hands its stream to the ctx's pump; the job takes ownership of g. On failure (returns the
 * JSON-RPC code, msg filled) the caller still owns g, its sched stream and its engine
 * reference. */
int rpc_gen_launch(struct rpc_job *job, struct rpc_gen *g, char *msg, size_t msglen);
/* Writes a fresh id "stream-N" not used by any live stream of the ctx. */
void rpc_gen_make_id(struct rpc_ctx *c, char *out, size_t cap);
/* Cancels the live stream stream_id: 0, or RPC_INVALID_PARAMS if unknown or finished. */
int rpc_cancel_stream(struct rpc_ctx *c, const char *stream_id, char *msg, size_t msglen);
/* Number of live streams of the ctx. */
int rpc_active_streams(struct rpc_ctx *c);

/* ---- rpc_methods.c ------------------------------------------------------------------------ */

/* Runs method `name` with params (object or NULL) into slot; unknown -> -32601. */
void rpc_dispatch(struct rpc_job *job, struct rpc_slot *slot, const char *name,
                  const cJSON *params);

/* ---- rpc_generate.c ----------------------------------------------------------------------- */

/* Parses generate params into a scheduler request for engine e: the shared fields through the
 * engine's request builder into *gen (engine_gen_init'd by the caller, who engine_gen_frees it
 * after sched_submit), the prompt (text, token ids or chat messages) into *prompt_out (the
 * caller alloc_frees it), stream and logprobs options into *opts. On error returns the
 * JSON-RPC code with msg filled. */
struct rpc_gen_opts {
    int streaming, logprobs, top_logprobs;
    char stream_id[RPC_STREAM_ID_MAX]; /* "" = generate one */
};
struct engine_gen;
int rpc_generate_parse(struct engine *e, const struct krs_config *cfg, const cJSON *params,
                       struct engine_gen *gen, struct sched_request *req, int32_t **prompt_out,
                       struct rpc_gen_opts *opts, char *msg, size_t msglen);
/* (req->grammar, from "response_format" / "grammar", is the caller's: grammar_release it, also
 * when parsing fails.) */

#endif
