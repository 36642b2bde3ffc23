/* rpc/: kr-serve's JSON-RPC 2.0 protocol (the kr-serve-mlx protocol), independent of transport.
 *
 * The stdio front end (`krserve rpc`) and HTTP POST /rpc both hand whole messages to rpc_handle
 * and receive every reply through a sink: responses, and the stream.chunk / stream.stats /
 * stream.event notifications of streaming generations. docs/rpc.md lists the methods, their
 * parameters and error codes.
 *
 * Threads: a ctx has one stream thread (the pump) that reads every generation's scheduler
 * stream when the scheduler notifies it, as the HTTP server does, and turns events into
 * notifications and non-streaming results: no thread per generation or per message. A caller
 * never blocks on a stream unless it asks to (wait_streams). The sink is called from the pump and
 * from the caller's thread; it must be thread-safe and should not block for long (it holds up
 * every stream of the ctx). A response is always written before the notifications of the
 * streams it announces.
 *
 * Out of memory: a message that cannot even be set up is answered with error -32099 "out of
 * memory" (id null); a request with code -32099 or its method's error; a stream that runs out
 * of memory is cancelled and ends with stream.event "error", message "out of memory".
 *
 * Ownership: the ctx borrows the registry (it must outlive the ctx). rpc_handle copies the sink
 * struct; with wait_streams = 0 the sink must stay usable until rpc_wait_idle / rpc_free return.
 * Streams hold a counted reference to their engine, so unloading a model while it streams is
 * safe (its streams end with event "cancelled", message "model unloaded"). */
#ifndef KRS_RPC_H
#define KRS_RPC_H

#include <stdatomic.h>
#include <stddef.h>

struct engine_registry;

/* One complete JSON message per call (no trailing newline); must be thread-safe. */
struct rpc_sink {
    void (*write)(void *user, const char *json, size_t len);
    void *user;
};

struct rpc_ctx;

/* KRS_OK or KRS_ERR_NOMEM. The caller owns *out (rpc_free). */
int rpc_create(struct engine_registry *reg, struct rpc_ctx **out);
/* Cancels every outstanding stream of the ctx, waits until each has written its last
 * notification, stops the pump and frees the ctx. NULL is a no-op. */
void rpc_free(struct rpc_ctx *ctx);

/* Handles one JSON-RPC message (object or batch array). Responses and notifications go to sink.
 * wait_streams = 1: returns only after every stream this message started has finished, so
 * all its notifications were written. wait_streams = 0 (stdio): streaming generate returns its
 * result {stream_id} at once and notifications follow asynchronously from the pump; a
 * non-streaming generate (or a batch that contains one) is answered from the pump when it
 * finishes, so the caller can go on reading messages (e.g. a cancel).
 * Protocol errors (parse error, unknown method, bad params, out of memory...) are JSON-RPC error
 * responses and still return KRS_OK; the return value is KRS_ERR_INVALID only for bad arguments
 * (NULL ctx, msg or sink). */
int rpc_handle(struct rpc_ctx *ctx, const char *msg, size_t len, const struct rpc_sink *sink,
               int wait_streams);

/* rpc_handle with wait_streams = 0 for an event-driven caller (HTTP /rpc): done(done_arg) is
 * called exactly once, when the message's response and every notification of its streams have
 * been written: from this call when nothing is left pending, else later from the pump (the
 * caller must not hold a lock there that done takes). Returns as rpc_handle; done is called iff
 * KRS_OK.
 * abort (may be NULL) is for a caller whose client can go away: the caller owns the flag (it
 * must outlive the call to done); once it sets *abort and calls rpc_abort(ctx, abort), every
 * generation the message started is cancelled (effective at the next scheduler step) and none
 * is started after, so the message finishes promptly and no token is computed for nobody. */
int rpc_handle_async(struct rpc_ctx *ctx, const char *msg, size_t len, const struct rpc_sink *sink,
                     const atomic_int *abort, void (*done)(void *), void *done_arg);
/* Cancels the running generations of every message handled with this abort flag. Thread-safe. */
void rpc_abort(struct rpc_ctx *ctx, const atomic_int *abort);

/* Waits until every stream and pending response of the ctx has finished (without cancelling);
 * for stdio at end of input. */
void rpc_wait_idle(struct rpc_ctx *ctx);

/* JSON-RPC / kr-serve-mlx error codes. */
enum rpc_error_code {
    RPC_PARSE_ERROR = -32700,
    RPC_INVALID_REQUEST = -32600,
    RPC_METHOD_NOT_FOUND = -32601,
    RPC_INVALID_PARAMS = -32602,
    RPC_INTERNAL_ERROR = -32603, /* JSON-RPC's; kr-serve uses RPC_INTERNAL below */
    RPC_MODEL_LOAD_ERROR = -32001,
    RPC_GENERATION_ERROR = -32002, /* includes overload: queue full */
    RPC_TOKENIZER_ERROR = -32003,
    RPC_MODEL_NOT_LOADED = -32005,
    RPC_INTERNAL = -32099,
};

#endif
