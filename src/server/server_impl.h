/* server/ internals shared by server.c (daemon, routing, connection lifetime), server_gen.c
 * (OpenAI generation: submit, suspend/resume, SSE and JSON rendering) and server_ops.c
 * (monitoring, admin, models, tokenize, JSON-RPC). Not a public header. */
#ifndef KRS_SERVER_IMPL_H
#define KRS_SERVER_IMPL_H

#include "server/server.h"

#include <cjson/cJSON.h>
#include <microhttpd.h>
#include <pthread.h>
#include <stdatomic.h>

struct engine;

#define SERVER_SLOTS 8192 /* generation requests in progress at once (beyond: 503) */

/* The resume handle of one suspended-able request. The stream's notify callback gets (index,
 * generation) packed into its argument, never a pointer, so a notify that races with the end of
 * the request finds a newer generation and does nothing. */
struct server_slot {
    pthread_mutex_t lock;
    uint32_t gen;
    struct server_conn *conn; /* NULL when free */
    int suspended;            /* we called MHD_suspend_connection and no resume since */
    int next_free;
};

/* Settings that SIGHUP may change, copied per request under the server's lock. */
struct server_limits_rt {
    char api_key[CONFIG_STR_MAX];
    int64_t max_body_bytes;
    int max_prompt_tokens;
    int max_tokens_limit;
    int64_t request_timeout_ms;
};

struct server;
struct server_daemon_ctx {
    struct server *srv;
    int monitor_only;
};

struct server {
    struct krs_config cfg; /* as started (host, port, paths) */
    pthread_mutex_t rt_lock;
    struct server_limits_rt rt;
    struct engine_registry *reg;
    struct MHD_Daemon *d_main, *d_mon;
    atomic_int draining;
    atomic_int inflight; /* generations (HTTP and JSON-RPC) counted before they can be refused */
    atomic_int active;   /* HTTP requests between their first handler call and completion */
    atomic_ullong next_id;
    uint64_t started_unix;
    struct server_slot *slots;
    pthread_mutex_t free_lock;
    int free_head;
    struct rpc_ctx *rpc;
    struct server_daemon_ctx dctx[2];
    /* The disconnect watcher: MHD does not poll suspended connections, so a client that leaves
     * while its request waits (queued, or between tokens) is found by this thread. */
    pthread_t watch_thread;
    int watch_started;
    pthread_mutex_t watch_lock;
    pthread_cond_t watch_cv;
    int watch_stop; /* guarded by watch_lock */
};

struct server_gen;     /* server_gen.c */
struct server_rpc_job; /* server_ops.c */

/* One HTTP request (MHD's per-request closure). */
struct server_conn {
    struct server *srv;
    struct MHD_Connection *mc;
    int monitor_only;
    int64_t max_body;
    char *body;
    size_t body_len, body_cap;
    int too_large;
    int no_memory;              /* the body could not be kept: answered 503 "out of memory" */
    struct server_gen *gen;     /* generation in progress, or NULL */
    struct server_rpc_job *rpc; /* JSON-RPC message in progress, or NULL */
};

/* ---- server.c helpers ---- */
void server_rt_get(struct server *s, struct server_limits_rt *out);
enum MHD_Result server_send(struct MHD_Connection *mc, unsigned status, const char *ctype,
                            const char *data, size_t len, const char *hdr, const char *hval);
/* Sends obj (deleted here) as application/json. */
enum MHD_Result server_send_json(struct MHD_Connection *mc, unsigned status, cJSON *obj);
/* OpenAI error envelope {"error": {message, type, param, code}}. */
cJSON *server_error_json(const struct server_error *e);
enum MHD_Result server_send_error(struct MHD_Connection *mc, const struct server_error *e);
enum MHD_Result server_send_errorf(struct MHD_Connection *mc, int status, const char *type,
                                   const char *code, const char *param, const char *fmt, ...)
    __attribute__((format(printf, 6, 7)));
/* 503 {"error": {"message": "out of memory", ...}} with Retry-After, built without allocating
 * (for the paths where the process just ran out of memory). */
enum MHD_Result server_send_no_memory(struct MHD_Connection *mc);
/* Slot allocation: returns the index or -1 when all are taken. */
int server_slot_alloc(struct server *s, struct server_conn *c, uint32_t *gen);
void server_slot_free(struct server *s, int idx);
/* 1 when the peer has closed its side of the connection. */
int server_peer_closed(struct MHD_Connection *mc);
/* Replaces invalid UTF-8 and NUL bytes with U+FFFD; returns an alloc'd NUL-terminated copy. */
char *server_utf8_sanitize(const char *s, size_t n);
/* The same into out (3 * n + 1 bytes), for callers that keep small strings off the heap. */
void server_utf8_sanitize_into(const char *s, size_t n, char *out);

/* ---- server_gen.c ---- */
/* Handles POST /v1/completions and /v1/chat/completions once the body is complete. */
enum MHD_Result server_gen_start(struct server_conn *c, enum server_api api);
/* Called again by MHD after a resume (non-streaming requests). */
enum MHD_Result server_gen_continue(struct server_conn *c);
/* The request is over (any reason): stops notifications, releases the stream (cancelling an
 * unfinished request) and frees the state. */
void server_gen_end(struct server_conn *c);

/* ---- server_ops.c ---- */
enum MHD_Result server_ops_metrics(struct server_conn *c);
enum MHD_Result server_ops_health(struct server_conn *c);
enum MHD_Result server_ops_ready(struct server_conn *c);
enum MHD_Result server_ops_stats(struct server_conn *c);
enum MHD_Result server_ops_models(struct server_conn *c, const char *id);
enum MHD_Result server_ops_tokenize(struct server_conn *c);
enum MHD_Result server_ops_detokenize(struct server_conn *c);
enum MHD_Result server_ops_admin_scheduler(struct server_conn *c);
enum MHD_Result server_ops_admin_load(struct server_conn *c);
enum MHD_Result server_ops_admin_unload(struct server_conn *c);
enum MHD_Result server_ops_rpc(struct server_conn *c);
int server_rpc_init(struct server *s);
enum MHD_Result server_rpc_continue(struct server_conn *c);
void server_rpc_end(struct server_conn *c);
void server_rpc_free(struct server *s);

#endif
