/* rpc/ internals: the per-message job, its generations (one reader thread each), and the
 * helpers the method handlers share. Not part of the public API (rpc.h).
 *
 * A job is one rpc_handle call. It holds one slot per request (1 for an object, n for a batch
 * array); a slot holds one part per result (1, or one per batch_generate item). A part is either
 * ready (result or error) or waits for a non-streaming generation. Streaming generations are
 * ready at once ({stream_id}) and write notifications through a gate that opens only after the
 * job's response has been written, so a client always sees the stream id before its chunks.
 *
 * Lifetime: the job is counted: one reference for whoever writes its response, one per
 * generation thread; the last to let go frees it. The ctx counts its live threads so that
 * rpc_wait_idle / rpc_free can wait for them. */
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
    int n_threads;          /* live generation and job threads */
    uint64_t next_stream;   /* for generated stream ids */
};

struct rpc_gen {
    struct rpc_job *job;
    struct engine *eng; /* counted reference, released by the thread */
    struct sched_stream *st;
    uint64_t sched_id;
    char stream_id[RPC_STREAM_ID_MAX];
    int streaming;    /* notifications (else the result is built from text at the end) */
    int logprobs;     /* report logprobs */
    int top_logprobs; /* 0..SAMPLER_MAX_TOP_LOGPROBS */
    /* Written by the thread; read by the job once done is set. */
    char *text; /* non-streaming: the whole text (alloc_*) */
    size_t len, cap;
    cJSON *lp; /* non-streaming with logprobs: [{token, logprob, top_logprobs?}] */
    struct sched_event fin;
    int done; /* under job->mu */
    /* Gate: notifications wait in `pending` until the job's response is out. Under mu. */
    pthread_mutex_t mu;
    int gate_open;
    char **pending;
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
    pthread_cond_t cv;
    int refs;
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
 * starts its reader thread; the job takes ownership of g. On failure (returns the JSON-RPC code,
 * msg filled) the caller still owns g, its sched stream and its engine reference. */
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
