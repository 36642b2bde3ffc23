/* Served models: each loaded model is an engine = weights + tokenizer + metrics + scheduler
 * (its own engine thread and KV pool). The registry maps model ids to engines for the HTTP and
 * JSON-RPC front ends, and loads/unloads them at run time.
 *
 * Loading at run time (engine_registry_load with restrict_to_dir) only opens files inside the
 * configured model directory: the name is resolved with realpath and must stay under the
 * directory's realpath; nothing outside it is ever opened.
 *
 * Lifetime: engine_registry_acquire returns a counted reference; the caller uses the engine and
 * gives it back with engine_release. Unloading removes the model from the registry, ends its
 * in-flight requests with "model unloaded", and frees it when the last reference goes.
 * All functions are thread-safe. */
#ifndef KRS_ENGINE_H
#define KRS_ENGINE_H

#include <stddef.h>
#include <stdint.h>

#include "config/config.h"
#include "sched/sched.h"

struct model;
struct tokenizer;
struct metrics;

#define ENGINE_NAME_MAX   256
#define ENGINE_MAX_MODELS 8

/* One served model (opaque to the front ends; engine_impl.h). */
struct engine;

struct engine_registry;

/* cfg is copied (model dir, scheduler and KV settings). */
int engine_registry_create(const struct krs_config *cfg, struct engine_registry **out);
/* Unloads every model (their requests end with "model unloaded") and frees the registry.
 * Call it only after every reference from engine_registry_acquire has been released. */
void engine_registry_destroy(struct engine_registry *r);

/* Loads a model under id `name` (NULL = the file stem). With restrict_to_dir, `path` is a file
 * name relative to the model directory and must resolve inside it (KRS_ERR_INVALID otherwise);
 * without, any path is accepted (the startup model from the command line or config).
 * KRS_ERR_STATE when the id is taken, KRS_ERR_FULL beyond ENGINE_MAX_MODELS, load errors as
 * model_load reports them (message in err). */
int engine_registry_load(struct engine_registry *r, const char *name, const char *path,
                         int restrict_to_dir, char *err, size_t errlen);
/* KRS_ERR_NOT_FOUND when no such model. */
int engine_registry_unload(struct engine_registry *r, const char *name);

/* A counted reference to model `name` (NULL or "" = the first loaded model), or NULL. */
struct engine *engine_registry_acquire(struct engine_registry *r, const char *name);
void engine_release(struct engine *e);

/* Copies up to cap model ids into names (each ENGINE_NAME_MAX bytes); returns the count. */
int engine_registry_list(struct engine_registry *r, char (*names)[ENGINE_NAME_MAX], int cap);
/* Number of loaded models. */
int engine_registry_count(struct engine_registry *r);
/* Number of engine_registry_load calls in progress (a server is "loading" while this is > 0
 * and nothing is loaded yet). */
int engine_registry_loading(struct engine_registry *r);
/* Counts a load that is about to start (+1) or is over (-1) in engine_registry_loading: a front
 * end that listens before it loads holds it around the load, so that a probe in between never
 * sees "no model loaded". */
void engine_registry_hold_loading(struct engine_registry *r, int delta);
/* An engine's parts, valid while the caller holds its reference. */
const char *engine_name(const struct engine *e);      /* the model id clients use */
uint64_t engine_created_unix(const struct engine *e); /* load time, seconds */
struct sched *engine_sched(const struct engine *e);   /* its scheduler */
const struct tokenizer *engine_tokenizer(const struct engine *e);
const struct model *engine_model(const struct engine *e);
struct metrics *engine_metrics(const struct engine *e); /* its collector */

/* The configuration the registry was created with. */
const struct krs_config *engine_registry_config(const struct engine_registry *r);

/* Builds scheduler parameters from the configuration (shared by every front end). */
void engine_sched_params(const struct krs_config *cfg, struct sched_params *p);

/* ---- the front door: one request builder (engine_request.c) -------------------------------
 *
 * Every front end (OpenAI HTTP, JSON-RPC, `krserve generate`) turns its input into a
 * sched_request here, so a request means the same thing whichever door it came through:
 *   1. engine_gen_init, then engine_gen_from_json (a JSON object: the shared fields below) or
 *      the front end's own setters (CLI flags), then engine_gen_check: types and ranges.
 *   2. The front end renders and tokenizes its prompt (that part is its own: chat messages,
 *      token ids, templates).
 *   3. engine_gen_build: limits of the engine (one context limit, the vocabulary, the server's
 *      maxPromptTokens / maxTokensLimit / requestTimeoutMs), the front end's default max_tokens,
 *      and the sched_request itself.
 * Shared fields and their rules (docs/api.md, docs/rpc.md): max_tokens (alias
 * max_completion_tokens) integer >= 1, at most maxTokensLimit, and prompt + max_tokens within
 * the context; when absent the front end's default, capped by maxTokensLimit and the room left
 * in the context (a default is never an error, an explicit value never silently shortened);
 * temperature 0..2; top_p (0, 1]; top_k >= 0; min_p 0..1; repetition_penalty (0, 10];
 * repetition_context_size -1..2^30; presence_penalty, frequency_penalty -2..2; seed any integer;
 * stop a string or up to SCHED_MAX_STOP strings of 1..SCHED_MAX_STOP_LEN bytes of UTF-8;
 * stop_token_ids and logit_bias (<= 1024 entries, -100..100) token ids in the vocabulary;
 * ignore_eos boolean; priority urgent|default|background (aliases high|normal|low); timeout
 * (seconds) or timeout_ms, at most requestTimeoutMs.
 *
 * One error vocabulary: a field name and a reason (a sentence naming the field), and whether
 * the request was wrong (ENGINE_REQ_BAD_VALUE), too long for the context or the prompt limit
 * (ENGINE_REQ_TOO_LONG) or the process out of memory. HTTP answers 400 (too long:
 * code context_length_exceeded; memory: 500), JSON-RPC -32602 (memory: -32603), the CLI exits
 * 2 with the reason. */

enum engine_req_fault {
    ENGINE_REQ_BAD_VALUE = 1, /* wrong type, out of range, unknown alias */
    ENGINE_REQ_TOO_LONG = 2,  /* prompt (+ max_tokens) beyond the context or maxPromptTokens */
    ENGINE_REQ_NO_MEMORY = 3,
};

struct engine_req_error {
    enum engine_req_fault fault;
    char field[64];   /* the parameter at fault ("" = the request as a whole) */
    char reason[256]; /* why, naming the field */
};

/* The shared generation parameters as asked. Strings are borrowed (they point into the JSON
 * tree or argv, which must outlive engine_gen_build's sched_request); stop_ids and bias are
 * owned and freed by engine_gen_free. */
struct engine_gen {
    int max_tokens; /* -1 = not given: the front end's default applies */
    struct sampler_params sampling;
    int has_seed;
    const char *stop[SCHED_MAX_STOP];
    int n_stop;
    int32_t *stop_ids;
    int n_stop_ids;
    struct sampler_logit_bias *bias;
    int n_bias;
    int ignore_eos;
    enum sched_priority priority;
    uint64_t timeout_ms; /* 0 = not given: the server's requestTimeoutMs */
};

/* What a request is checked against: the engine's and the front end's limits. */
struct engine_limits {
    int max_ctx;            /* the one context limit: sched_max_ctx (prompt + max_tokens) */
    int n_vocab;            /* token ids (prompt, stop_token_ids, logit_bias) below this */
    int max_prompt_tokens;  /* 0 = the context only */
    int max_tokens_limit;   /* 0 = the context only */
    int64_t timeout_ms;     /* the default and the most a request may ask; 0 = none */
    int default_max_tokens; /* the front end's default; 0 = the room left in the context */
};

/* Defaults: nothing given, sampler defaults (temperature 1), priority default. */
void engine_gen_init(struct engine_gen *g);
void engine_gen_free(struct engine_gen *g);
/* Reads the shared fields of a JSON object (unknown keys ignored) and checks them
 * (engine_gen_check). KRS_OK, or KRS_ERR_INVALID / KRS_ERR_NOMEM with err filled. On error g
 * keeps what it had read: engine_gen_free it all the same. */
struct cJSON;
int engine_gen_from_json(const struct cJSON *obj, struct engine_gen *g,
                         struct engine_req_error *err);
/* Ranges of the shared fields (after a front end set them itself). */
int engine_gen_check(const struct engine_gen *g, struct engine_req_error *err);
/* "urgent"/"high", "default"/"normal", "background"/"low": KRS_OK, else KRS_ERR_INVALID. */
int engine_parse_priority(const char *s, enum sched_priority *out);

/* The limits of a scheduler (context, vocabulary) and of cfg's server.* keys (cfg NULL: none);
 * default_max_tokens is left 0 for the caller to set. */
void engine_limits_of(struct sched *s, const struct tokenizer *tok, const struct krs_config *cfg,
                      struct engine_limits *out);
/* Checks the prompt and g against lim and fills *out. out borrows prompt, g's strings, stop ids
 * and bias: they must stay valid until sched_submit returns (the scheduler copies them).
 * out->grammar is left NULL for the front end. KRS_OK or KRS_ERR_INVALID with err filled;
 * prompt_field names the prompt in errors ("prompt", "messages"). */
int engine_gen_build(const struct engine_gen *g, const struct engine_limits *lim,
                     const int32_t *prompt, int n_prompt, const char *prompt_field,
                     struct sched_request *out, struct engine_req_error *err);

#endif
