/* server/: kr-serve's HTTP front end over libmicrohttpd.
 *
 * Routes (main port): the OpenAI-compatible API (/v1/completions, /v1/chat/completions, with SSE
 * streaming; /v1/models), /tokenize and /detokenize, JSON-RPC over HTTP (/rpc), monitoring
 * (/metrics, /health, /ready, /stats) and admin (/admin/scheduler, /admin/models/load|unload).
 * With monitoring.prometheus.port set, a second daemon serves only the monitoring routes.
 *
 * Threads: MHD's internal thread pool (server.threads) runs every handler; no handler ever
 * blocks on the model. A generation request is submitted to its engine's scheduler and its
 * connection is suspended; the stream's notify callback (engine thread) resumes it when events
 * arrive. A client that disconnects releases its stream, which cancels the request.
 *
 * The request parser (JSON body -> struct server_gen_request) is a pure function so that the
 * fuzzer (fuzz/fuzz_request.c) drives it without sockets. */
#ifndef KRS_SERVER_H
#define KRS_SERVER_H

#include <stddef.h>
#include <stdint.h>

#include "config/config.h"
#include "engine/engine.h"
#include "sampler/sampler.h"
#include "sched/sched.h"
#include "tokenizer/tokenizer.h"
#include "util/utf8.h" /* utf8_valid, for the parser files and the fuzzer */

struct engine_registry;
struct server;
struct grammar;

/* ---- the server ---------------------------------------------------------------------------- */

/* Creates and starts the daemons on cfg->server.host:port (and the monitoring port when set).
 * `reg` is borrowed and must outlive the server. cfg is copied. On failure err says why. */
int server_start(const struct krs_config *cfg, struct engine_registry *reg, struct server **out,
                 char *err, size_t errlen);
/* Begins draining: /ready turns 503, new generation requests get 503, every engine stops
 * admitting work (sched_drain). Running requests go on. */
void server_begin_drain(struct server *s);
/* Generation requests (HTTP and JSON-RPC) still in progress. */
int server_inflight(struct server *s);
/* Ends the drain once server_inflight is 0 (or its deadline passed): stops accepting
 * connections, then waits up to timeout_ms for every HTTP request already received (a 503 to a
 * request that raced with the drain, a probe) to be answered in full, so that server_stop never
 * cuts a request it had accepted. */
void server_finish_drain(struct server *s, int64_t timeout_ms);
/* Ends every running request (sched_cancel_all with `reason`). */
void server_cancel_all(struct server *s, const char *reason);
/* Applies run-time-safe settings of a re-read configuration (log level, scheduler mode and
 * batch size, limits) and logs the keys that need a restart. */
void server_reload(struct server *s, const struct krs_config *cfg);
/* Stops the daemons and frees the server (the registry stays). */
void server_stop(struct server *s);

/* ---- request parsing (pure; used by the fuzzer) -------------------------------------------- */

enum server_api { SERVER_API_COMPLETIONS = 0, SERVER_API_CHAT = 1 };

struct server_error {
    int status;       /* HTTP status */
    const char *type; /* "invalid_request_error", ... */
    const char *code; /* NULL or e.g. "model_not_found" */
    char param[64];   /* "" = null */
    char message[256];
};

#define SERVER_MAX_N 16 /* most choices (OpenAI `n`) one request may ask for */
enum {
    SERVER_TOOLS_NONE = 0,     /* no tools, or tool_choice "none" */
    SERVER_TOOLS_AUTO = 1,     /* a call or plain text */
    SERVER_TOOLS_REQUIRED = 2, /* one call of any tool */
    SERVER_TOOLS_NAMED = 3,    /* one call of tool_name: the reply is its arguments */
};
#define SERVER_TOOL_NAME_MAX 64

/* A parsed generation request. Strings point into `root` (owned, freed with
 * server_gen_request_free); msgs and bias are owned arrays. */
struct server_gen_request {
    enum server_api api;
    const char *model; /* NULL = default model */
    const char *prompt;
    size_t prompt_len;
    int32_t *prompt_ids; /* token-id prompt (completions), owned */
    int n_prompt_ids;
    struct chat_message *msgs; /* chat, owned */
    char **msg_text;           /* joined content parts per message (owned, may be NULL each) */
    int n_msgs;
    int n; /* choices, 1..SERVER_MAX_N: one generation each (own sampler and seed) */
    int stream, include_usage;
    int logprobs;     /* completions: -1 = off, else top count; chat: 0/1 */
    int top_logprobs; /* chat: 0..20 */
    /* The shared generation fields, read and checked by the engine's request builder
     * (engine.h: max_tokens, sampling, seed, stop, logit_bias, priority, timeout...); owned. */
    struct engine_gen gen;
    struct grammar *grammar; /* response_format / grammar / tools, owned; NULL = none */
    int tool_mode;           /* SERVER_TOOLS_*: how the reply may call the tools */
    char tool_name[SERVER_TOOL_NAME_MAX + 1]; /* SERVER_TOOLS_NAMED: the function */
    char *tool_prompt; /* owned: the system text describing the tools (in msgs), or NULL */
    void *root;        /* cJSON tree, owned */
};

/* Parses and validates a /v1/completions or /v1/chat/completions body. KRS_OK with *out filled
 * (free with server_gen_request_free), or KRS_ERR_INVALID with *err filled (400) and *out
 * empty. Unknown fields are ignored; wrong types, out-of-range values and invalid UTF-8 in any
 * string used are errors. The limits that need the engine (context, vocabulary, the server's
 * maxTokensLimit / maxPromptTokens / requestTimeoutMs) are checked later by engine_gen_build. */
int server_parse_gen(const char *body, size_t len, enum server_api api,
                     struct server_gen_request *out, struct server_error *err);
/* The HTTP form of a request builder error: 400 invalid_request_error with param = the field
 * (code context_length_exceeded when too long), 500 server_error when out of memory. */
void server_error_from_req(const struct engine_req_error *re, struct server_error *err);
void server_gen_request_free(struct server_gen_request *r);

/* Internal to the parser files (openai_parse.c, openai_tools.c). server_parse_fail fills err
 * (400, invalid_request_error, param) and returns KRS_ERR_INVALID. server_parse_tools reads
 * tools / tool_choice into out (after response_format: they exclude each other).
 * server_tool_turn rewrites a tool-call assistant turn or a "tool" turn into plain text (*text
 * owned, NULL when msg is an ordinary message; *role may change). */
struct cJSON;
int server_parse_fail(struct server_error *err, const char *param, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
int server_parse_tools(const struct cJSON *root, struct server_gen_request *out,
                       struct server_error *err);
int server_tool_turn(const struct cJSON *msg, int idx, const char **role, char **text,
                     struct server_error *err);

#endif
