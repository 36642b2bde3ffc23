/* JSON-RPC 2.0 message handling: parsing, request validation, batch arrays, the job that
 * writes responses, and the pump: the ctx's one thread that reads every generation's scheduler
 * stream when the scheduler notifies it (the HTTP server's path) and turns its events into
 * stream.* notifications or a non-streaming result. Method semantics live in rpc_methods.c and
 * rpc_generate.c; this file owns threading and ordering and must not know method details.
 * Nothing here blocks on a stream except rpc_handle with wait_streams = 1 (the caller's own
 * thread, waiting for its message to finish). */
#include "rpc/rpc_impl.h"

#include "engine/engine.h"
#include "krserve.h"
#include "util/alloc.h"
#include "util/log.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

/* ---- helpers ------------------------------------------------------------------------------ */

void rpc_part_error(struct rpc_part *p, int code, const char *fmt, ...)
{
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    alloc_free(p->msg);
    cJSON_Delete(p->result);
    p->result = NULL;
    p->gen = NULL;
    p->code = code;
    p->msg = alloc_strdup(buf);
}

/* Length of the valid UTF-8 sequence at s (n bytes left), or 0 if invalid. NUL is invalid here
 * (cJSON strings cannot carry it). */
static size_t utf8_valid_len(const unsigned char *s, size_t n)
{
    unsigned c = s[0];
    if (c == 0) return 0;
    if (c < 0x80) return 1;
    size_t need;
    unsigned lo = 0x80, hi = 0xBF;
    if (c >= 0xC2 && c <= 0xDF)
        need = 1;
    else if (c >= 0xE0 && c <= 0xEF) {
        need = 2;
        if (c == 0xE0) lo = 0xA0;
        if (c == 0xED) hi = 0x9F;
    } else if (c >= 0xF0 && c <= 0xF4) {
        need = 3;
        if (c == 0xF0) lo = 0x90;
        if (c == 0xF4) hi = 0x8F;
    } else
        return 0;
    if (n < need + 1) return 0;
    if (s[1] < lo || s[1] > hi) return 0;
    for (size_t i = 2; i <= need; i++)
        if ((s[i] & 0xC0) != 0x80) return 0;
    return need + 1;
}

cJSON *rpc_json_string(const char *s, size_t n)
{
    char small[1100];
    size_t cap = 3 * n + 1;
    char *buf = cap <= sizeof small ? small : alloc_malloc(cap);
    if (!buf) return NULL;
    size_t o = 0;
    for (size_t i = 0; i < n;) {
        size_t k = utf8_valid_len((const unsigned char *)s + i, n - i);
        if (k) {
            memcpy(buf + o, s + i, k);
            o += k, i += k;
        } else {
            memcpy(buf + o, "\xEF\xBF\xBD", 3);
            o += 3, i++;
        }
    }
    buf[o] = '\0';
    cJSON *j = cJSON_CreateString(buf);
    if (buf != small) alloc_free(buf);
    return j;
}

/* What is written when not even a message could be built. */
static const char OOM_RESPONSE[] =
    "{\"jsonrpc\":\"2.0\",\"error\":{\"code\":-32099,\"message\":\"out of memory\"},"
    "\"id\":null}";

/* Serialises and writes one message. */
static void sink_write_json(const struct rpc_sink *sink, const cJSON *j)
{
    char *txt = cJSON_PrintUnformatted(j);
    if (!txt) {
        sink->write(sink->user, OOM_RESPONSE, sizeof OOM_RESPONSE - 1);
        return;
    }
    sink->write(sink->user, txt, strlen(txt));
    cJSON_free(txt);
}

static cJSON *error_object(int code, const char *msg)
{
    cJSON *e = cJSON_CreateObject();
    cJSON_AddNumberToObject(e, "code", code);
    cJSON_AddStringToObject(e, "message", msg ? msg : "out of memory");
    return e;
}

/* {"jsonrpc":"2.0", "result"|"error": ..., "id": id}; takes ownership of payload. */
static cJSON *envelope(const cJSON *id, const char *key, cJSON *payload)
{
    cJSON *r = cJSON_CreateObject();
    cJSON_AddStringToObject(r, "jsonrpc", "2.0");
    cJSON_AddItemToObject(r, key, payload);
    cJSON_AddItemToObject(r, "id", id ? cJSON_Duplicate(id, 1) : cJSON_CreateNull());
    return r;
}

/* ---- ctx ---------------------------------------------------------------------------------- */

static void *pump_main(void *arg);

int rpc_create(struct engine_registry *reg, struct rpc_ctx **out)
{
    *out = NULL;
    struct rpc_ctx *c = alloc_calloc(1, sizeof *c);
    if (!c) return KRS_ERR_NOMEM;
    c->reg = reg;
    pthread_mutex_init(&c->lock, NULL);
    pthread_cond_init(&c->cv, NULL);
    pthread_mutex_init(&c->qlock, NULL);
    pthread_cond_init(&c->qcv, NULL);
    if (pthread_create(&c->pump, NULL, pump_main, c)) {
        pthread_mutex_destroy(&c->lock);
        pthread_cond_destroy(&c->cv);
        pthread_mutex_destroy(&c->qlock);
        pthread_cond_destroy(&c->qcv);
        alloc_free(c);
        return KRS_ERR_NOMEM;
    }
    *out = c;
    return KRS_OK;
}

static int handle(struct rpc_ctx *c, const char *msg, size_t len, const struct rpc_sink *sink,
                  const atomic_int *abort, void (*done)(void *), void *done_arg);

/* rpc_handle's wait: the done callback of a message handled synchronously. */
struct waiter {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int done;
};

static void waiter_done(void *arg)
{
    struct waiter *w = arg;
    pthread_mutex_lock(&w->mu);
    w->done = 1;
    pthread_cond_signal(&w->cv);
    pthread_mutex_unlock(&w->mu);
}

static int handle_and_wait(struct rpc_ctx *c, const char *msg, size_t len,
                           const struct rpc_sink *sink)
{
    struct waiter w = {.done = 0};
    pthread_mutex_init(&w.mu, NULL);
    pthread_cond_init(&w.cv, NULL);
    int rc = handle(c, msg, len, sink, NULL, waiter_done, &w);
    pthread_mutex_lock(&w.mu);
    while (rc == KRS_OK && !w.done) pthread_cond_wait(&w.cv, &w.mu);
    pthread_mutex_unlock(&w.mu);
    pthread_mutex_destroy(&w.mu);
    pthread_cond_destroy(&w.cv);
    return rc;
}

int rpc_handle(struct rpc_ctx *c, const char *msg, size_t len, const struct rpc_sink *sink,
               int wait_streams)
{
    if (wait_streams) return handle_and_wait(c, msg, len, sink);
    return handle(c, msg, len, sink, NULL, NULL, NULL);
}

int rpc_handle_async(struct rpc_ctx *c, const char *msg, size_t len, const struct rpc_sink *sink,
                     const atomic_int *abort, void (*done)(void *), void *done_arg)
{
    return handle(c, msg, len, sink, abort, done, done_arg);
}

void rpc_abort(struct rpc_ctx *c, const atomic_int *abort)
{
    if (!c || !abort) return;
    pthread_mutex_lock(&c->lock);
    for (struct rpc_gen *g = c->active; g; g = g->next_active)
        if (g->job->abort == abort) sched_cancel(engine_sched(g->eng), g->sched_id);
    pthread_mutex_unlock(&c->lock);
}

void rpc_wait_idle(struct rpc_ctx *c)
{
    if (!c) return;
    pthread_mutex_lock(&c->lock);
    while (c->n_jobs > 0) pthread_cond_wait(&c->cv, &c->lock);
    pthread_mutex_unlock(&c->lock);
}

void rpc_free(struct rpc_ctx *c)
{
    if (!c) return;
    pthread_mutex_lock(&c->lock);
    for (struct rpc_gen *g = c->active; g; g = g->next_active)
        sched_cancel(engine_sched(g->eng), g->sched_id);
    pthread_mutex_unlock(&c->lock);
    rpc_wait_idle(c);
    pthread_mutex_lock(&c->qlock);
    c->stopping = 1;
    pthread_cond_signal(&c->qcv);
    pthread_mutex_unlock(&c->qlock);
    pthread_join(c->pump, NULL);
    pthread_mutex_destroy(&c->lock);
    pthread_cond_destroy(&c->cv);
    pthread_mutex_destroy(&c->qlock);
    pthread_cond_destroy(&c->qcv);
    alloc_free(c);
}

/* ---- job ---------------------------------------------------------------------------------- */

static void gen_free(struct rpc_gen *g)
{
    for (size_t i = 0; i < g->n_pending; i++) cJSON_free(g->pending[i]);
    alloc_free(g->pending);
    alloc_free(g->text);
    cJSON_Delete(g->lp);
    pthread_mutex_destroy(&g->mu);
    alloc_free(g);
}

static void job_free(struct rpc_job *job)
{
    for (int i = 0; i < job->n_slots; i++) {
        struct rpc_slot *s = &job->slots[i];
        cJSON_Delete(s->id);
        for (int k = 0; k < s->n_parts; k++) {
            alloc_free(s->parts[k].msg);
            cJSON_Delete(s->parts[k].result);
        }
        alloc_free(s->parts);
    }
    alloc_free(job->slots);
    for (int i = 0; i < job->n_gens; i++) gen_free(job->gens[i]);
    alloc_free(job->gens);
    pthread_mutex_destroy(&job->mu);
    alloc_free(job);
}

static void job_unref(struct rpc_job *job)
{
    pthread_mutex_lock(&job->mu);
    int left = --job->refs;
    pthread_mutex_unlock(&job->mu);
    if (left == 0) job_free(job);
}

static void job_write_response(struct rpc_job *job);

/* Moves the job on after a change of its progress: writes the response once every request is
 * dispatched and every non-streaming generation has ended (whoever sees that first), and
 * reports the job finished once the response is out and every generation has ended. Called by
 * handle after dispatching and by the pump after each generation ends; the claims under mu make
 * each step happen exactly once. */
static void job_advance(struct rpc_job *job)
{
    struct rpc_ctx *c = job->ctx;
    int respond = 0, finished = 0;
    pthread_mutex_lock(&job->mu);
    if (job->dispatched && !job->resp_claimed && job->n_waiting == 0)
        job->resp_claimed = respond = 1;
    pthread_mutex_unlock(&job->mu);
    if (respond) job_write_response(job);
    pthread_mutex_lock(&job->mu);
    if (respond) job->responded = 1;
    if (job->responded && job->n_open == 0 && !job->finished) job->finished = finished = 1;
    pthread_mutex_unlock(&job->mu);
    if (!finished) return;
    if (job->done) job->done(job->done_arg);
    pthread_mutex_lock(&c->lock);
    c->n_jobs--;
    pthread_cond_broadcast(&c->cv);
    pthread_mutex_unlock(&c->lock);
}

/* ---- generations: the pump ---------------------------------------------------------------- */

/* Puts g on the ready list (once). The notify callback of g's stream (engine thread): it only
 * takes qlock; the pump does the rest. */
static void gen_ready(void *arg)
{
    struct rpc_gen *g = arg;
    struct rpc_ctx *c = g->job->ctx;
    pthread_mutex_lock(&c->qlock);
    if (!g->queued) {
        g->queued = 1;
        g->next_ready = NULL;
        if (c->ready_tail)
            c->ready_tail->next_ready = g;
        else
            c->ready_head = g;
        c->ready_tail = g;
        pthread_cond_signal(&c->qcv);
    }
    pthread_mutex_unlock(&c->qlock);
}

/* Takes g off the ready list if it is there (its stream is released: no notify follows). */
static void gen_unready(struct rpc_gen *g)
{
    struct rpc_ctx *c = g->job->ctx;
    pthread_mutex_lock(&c->qlock);
    if (g->queued) {
        struct rpc_gen *prev = NULL;
        for (struct rpc_gen *x = c->ready_head; x; prev = x, x = x->next_ready)
            if (x == g) {
                if (prev)
                    prev->next_ready = g->next_ready;
                else
                    c->ready_head = g->next_ready;
                if (c->ready_tail == g) c->ready_tail = prev;
                break;
            }
        g->queued = 0;
    }
    pthread_mutex_unlock(&c->qlock);
}

/* Out of memory while turning g's events into output: cancel the request; it ends with an
 * error (gen_finish) instead of a silently incomplete text. */
static void gen_fail(struct rpc_gen *g)
{
    if (g->failed) return;
    g->failed = 1;
    sched_cancel(engine_sched(g->eng), g->sched_id);
}

/* Writes a notification now, or queues it until the gate opens. Keeps the stream's order. The
 * final notifications (final = 1) use the slots kept for them. 0, or -1 out of memory. */
static int gen_emit(struct rpc_gen *g, const char *method, cJSON *params, int final)
{
    cJSON *n = cJSON_CreateObject();
    cJSON_AddStringToObject(n, "jsonrpc", "2.0");
    cJSON_AddStringToObject(n, "method", method);
    cJSON_AddItemToObject(n, "params", params);
    char *txt = cJSON_PrintUnformatted(n);
    cJSON_Delete(n);
    if (!txt) return -1;
    int rc = 0;
    pthread_mutex_lock(&g->mu);
    if (g->gate_open) {
        g->job->sink.write(g->job->sink.user, txt, strlen(txt));
    } else {
        size_t room = final ? g->cap_pending : g->cap_pending - RPC_GEN_FINAL_SLOTS;
        if (!final && g->n_pending >= room) {
            size_t nc = 2 * g->cap_pending;
            char **np = alloc_realloc(g->pending, nc * sizeof *np);
            if (np) g->pending = np, g->cap_pending = nc, room = nc - RPC_GEN_FINAL_SLOTS;
        }
        if (g->n_pending < room) {
            g->pending[g->n_pending++] = txt;
            txt = NULL;
        } else {
            rc = -1;
        }
    }
    pthread_mutex_unlock(&g->mu);
    cJSON_free(txt);
    return rc;
}

static void gen_open_gate(struct rpc_gen *g)
{
    pthread_mutex_lock(&g->mu);
    for (size_t i = 0; i < g->n_pending; i++) {
        g->job->sink.write(g->job->sink.user, g->pending[i], strlen(g->pending[i]));
        cJSON_free(g->pending[i]);
    }
    g->n_pending = 0;
    g->gate_open = 1;
    pthread_mutex_unlock(&g->mu);
}

static cJSON *top_logprobs_json(const struct sched_event *ev)
{
    cJSON *a = cJSON_CreateArray();
    for (int i = 0; i < ev->n_top; i++) {
        cJSON *o = cJSON_CreateObject();
        cJSON_AddNumberToObject(o, "token", ev->top[i].token);
        cJSON_AddNumberToObject(o, "logprob", ev->top[i].logprob);
        cJSON_AddItemToArray(a, o);
    }
    return a;
}

static const char *event_name(enum sched_finish f)
{
    return f == SCHED_FINISH_CANCELLED ? "cancelled"
           : f == SCHED_FINISH_ERROR   ? "error"
                                       : "completed";
}

static int gen_append_text(struct rpc_gen *g, const char *s, size_t n)
{
    if (g->len + n + 1 > g->cap) {
        size_t nc = g->cap ? g->cap : 256;
        while (nc < g->len + n + 1) nc *= 2;
        char *nt = alloc_realloc(g->text, nc);
        if (!nt) return -1;
        g->text = nt, g->cap = nc;
    }
    memcpy(g->text + g->len, s, n);
    g->len += n;
    g->text[g->len] = '\0';
    return 0;
}

/* One token event: a stream.chunk, or the non-streaming text and logprobs. */
static void gen_event(struct rpc_gen *g, const struct sched_event *ev)
{
    if (g->failed) return; /* cancelled; waiting for the finish */
    int bad = 0;
    if (g->streaming) {
        cJSON *p = cJSON_CreateObject();
        cJSON_AddStringToObject(p, "stream_id", g->stream_id);
        bad |= !cJSON_AddItemToObject(p, "text", rpc_json_string(ev->text, ev->text_len));
        if (ev->token >= 0) {
            cJSON_AddNumberToObject(p, "token", ev->token);
            if (g->logprobs) cJSON_AddNumberToObject(p, "logprob", ev->logprob);
            if (g->top_logprobs > 0)
                cJSON_AddItemToObject(p, "top_logprobs", top_logprobs_json(ev));
        }
        cJSON_AddNumberToObject(p, "index", g->index);
        if (bad)
            cJSON_Delete(p);
        else
            bad = gen_emit(g, "stream.chunk", p, 0) != 0;
    } else {
        bad = gen_append_text(g, ev->text, ev->text_len) != 0;
        if (!bad && g->logprobs && ev->token >= 0) {
            if (!g->lp) g->lp = cJSON_CreateArray();
            cJSON *o = cJSON_CreateObject();
            cJSON_AddNumberToObject(o, "token", ev->token);
            cJSON_AddNumberToObject(o, "logprob", ev->logprob);
            if (g->top_logprobs > 0)
                cJSON_AddItemToObject(o, "top_logprobs", top_logprobs_json(ev));
            bad = !cJSON_AddItemToArray(g->lp, o);
        }
    }
    g->index++;
    if (bad) gen_fail(g);
}

/* The stream ended (g->fin holds its FINISH): final notifications, the stream and the engine
 * given back, the job moved on. */
static void gen_finish(struct rpc_gen *g)
{
    struct rpc_job *job = g->job;
    struct rpc_ctx *c = job->ctx;
    if (g->failed) {
        g->fin.finish = SCHED_FINISH_ERROR;
        snprintf(g->fin.reason, sizeof g->fin.reason, "out of memory");
    }
    /* Out of the cancel registry before the final notifications go out (a client that has seen
     * the stream end must get "unknown or finished stream" for it) and before the engine
     * reference goes. */
    pthread_mutex_lock(&c->lock);
    for (struct rpc_gen **pp = &c->active; *pp; pp = &(*pp)->next_active)
        if (*pp == g) {
            *pp = g->next_active;
            break;
        }
    g->in_active = 0;
    pthread_mutex_unlock(&c->lock);
    if (g->streaming) {
        const struct sched_event *f = &g->fin;
        cJSON *p = cJSON_CreateObject();
        cJSON_AddStringToObject(p, "stream_id", g->stream_id);
        cJSON_AddNumberToObject(p, "prompt_tokens", f->n_prompt_tokens);
        cJSON_AddNumberToObject(p, "cached_tokens", f->n_cached_tokens);
        cJSON_AddNumberToObject(p, "generated_tokens", f->n_gen_tokens);
        cJSON_AddNumberToObject(p, "ttft_ms", f->ttft_ms);
        cJSON_AddNumberToObject(p, "total_ms", f->total_ms);
        cJSON_AddNumberToObject(p, "queue_ms", f->queue_ms);
        cJSON_AddNumberToObject(p, "tokens_per_second",
                                f->total_ms > 0 ? f->n_gen_tokens * 1000.0 / f->total_ms : 0.0);
        cJSON_AddStringToObject(p, "finish_reason", sched_finish_name(f->finish));
        gen_emit(g, "stream.stats", p, 1);
        p = cJSON_CreateObject();
        cJSON_AddStringToObject(p, "stream_id", g->stream_id);
        cJSON_AddStringToObject(p, "event", event_name(f->finish));
        cJSON_AddStringToObject(p, "finish_reason", sched_finish_name(f->finish));
        if (f->finish == SCHED_FINISH_CANCELLED || f->finish == SCHED_FINISH_ERROR)
            cJSON_AddStringToObject(p, "message", f->reason);
        gen_emit(g, "stream.event", p, 1);
    }
    sched_stream_release(g->st); /* no notify after this */
    g->st = NULL;
    gen_unready(g);
    engine_release(g->eng);
    g->eng = NULL;

    pthread_mutex_lock(&job->mu);
    g->done = 1;
    job->n_open--;
    if (!g->streaming) job->n_waiting--;
    pthread_mutex_unlock(&job->mu);
    job_advance(job);
    job_unref(job);
}

/* Reads what g's stream holds, without blocking; the next notify puts it back on the list. */
static void gen_drain(struct rpc_gen *g)
{
    struct sched_event ev;
    int rc;
    while ((rc = sched_stream_try_read(g->st, &ev)) == KRS_OK) {
        if (ev.kind == SCHED_EV_FINISH) {
            g->fin = ev;
            gen_finish(g);
            return;
        }
        gen_event(g, &ev);
    }
    if (rc == KRS_ERR_STATE) { /* cannot happen: the finish ends the stream above */
        memset(&g->fin, 0, sizeof g->fin);
        g->fin.finish = SCHED_FINISH_ERROR;
        snprintf(g->fin.reason, sizeof g->fin.reason, "stream ended without a finish event");
        gen_finish(g);
    }
}

static void *pump_main(void *arg)
{
    struct rpc_ctx *c = arg;
    pthread_mutex_lock(&c->qlock);
    for (;;) {
        while (!c->ready_head && !c->stopping) pthread_cond_wait(&c->qcv, &c->qlock);
        struct rpc_gen *g = c->ready_head;
        if (!g) break; /* stopping, and nothing left */
        c->ready_head = g->next_ready;
        if (!c->ready_head) c->ready_tail = NULL;
        g->queued = 0; /* before draining: a notify from now on queues it again */
        pthread_mutex_unlock(&c->qlock);
        gen_drain(g);
        pthread_mutex_lock(&c->qlock);
    }
    pthread_mutex_unlock(&c->qlock);
    return NULL;
}

int rpc_gen_launch(struct rpc_job *job, struct rpc_gen *g, char *msg, size_t msglen)
{
    struct rpc_ctx *c = job->ctx;
    if (job->n_gens == job->cap_gens) {
        int nc = job->cap_gens ? 2 * job->cap_gens : 4;
        struct rpc_gen **ng = alloc_realloc(job->gens, (size_t)nc * sizeof *ng);
        if (!ng) {
            snprintf(msg, msglen, "out of memory");
            return RPC_INTERNAL;
        }
        job->gens = ng, job->cap_gens = nc;
    }
    if (g->streaming && !g->pending) {
        g->cap_pending = 8 + RPC_GEN_FINAL_SLOTS;
        g->pending = alloc_calloc(g->cap_pending, sizeof *g->pending);
        if (!g->pending) {
            g->cap_pending = 0;
            snprintf(msg, msglen, "out of memory");
            return RPC_INTERNAL;
        }
    }
    pthread_mutex_lock(&c->lock);
    int taken = 0;
    for (struct rpc_gen *o = c->active; o && !taken; o = o->next_active)
        taken = !strcmp(o->stream_id, g->stream_id);
    for (int i = 0; i < job->n_gens && !taken; i++)
        taken = !strcmp(job->gens[i]->stream_id, g->stream_id);
    if (taken) {
        pthread_mutex_unlock(&c->lock);
        alloc_free(g->pending); /* the caller frees g itself */
        g->pending = NULL;
        g->cap_pending = 0;
        snprintf(msg, msglen, "stream_id '%s' is already in use", g->stream_id);
        return RPC_INVALID_PARAMS;
    }
    g->job = job;
    g->next_active = c->active;
    c->active = g;
    g->in_active = 1;
    /* Checked under the lock rpc_abort takes: a generation registered after the scan of an
     * abort sees the flag here, one registered before is found by the scan. */
    if (job->abort && atomic_load(job->abort)) sched_cancel(engine_sched(g->eng), g->sched_id);
    pthread_mutex_unlock(&c->lock);
    pthread_mutex_lock(&job->mu);
    job->refs++;
    job->n_open++;
    if (!g->streaming) job->n_waiting++;
    pthread_mutex_unlock(&job->mu);
    job->gens[job->n_gens++] = g;
    /* Events may have arrived before the callback was set: one look now. */
    sched_stream_set_notify(g->st, gen_ready, g);
    gen_ready(g);
    return 0;
}

void rpc_gen_make_id(struct rpc_ctx *c, char *out, size_t cap)
{
    pthread_mutex_lock(&c->lock);
    for (;;) {
        snprintf(out, cap, "stream-%llu", (unsigned long long)++c->next_stream);
        int taken = 0;
        for (struct rpc_gen *o = c->active; o && !taken; o = o->next_active)
            taken = !strcmp(o->stream_id, out);
        if (!taken) break;
    }
    pthread_mutex_unlock(&c->lock);
}

int rpc_cancel_stream(struct rpc_ctx *c, const char *stream_id, char *msg, size_t msglen)
{
    int rc = RPC_INVALID_PARAMS;
    pthread_mutex_lock(&c->lock);
    for (struct rpc_gen *g = c->active; g; g = g->next_active)
        if (!strcmp(g->stream_id, stream_id)) {
            if (sched_cancel(engine_sched(g->eng), g->sched_id) == KRS_OK) rc = 0;
            break;
        }
    pthread_mutex_unlock(&c->lock);
    if (rc) snprintf(msg, msglen, "unknown or finished stream '%s'", stream_id);
    return rc;
}

int rpc_active_streams(struct rpc_ctx *c)
{
    int n = 0;
    pthread_mutex_lock(&c->lock);
    for (struct rpc_gen *g = c->active; g; g = g->next_active) n++;
    pthread_mutex_unlock(&c->lock);
    return n;
}

/* ---- building and writing the response ---------------------------------------------------- */

static cJSON *part_payload(struct rpc_part *p, const char **key)
{
    if (p->gen) rpc_generate_result(p->gen, p);
    if (p->code) {
        *key = "error";
        return error_object(p->code, p->msg);
    }
    *key = "result";
    cJSON *r = p->result ? p->result : cJSON_CreateNull();
    p->result = NULL;
    return r;
}

static cJSON *slot_response(struct rpc_slot *s)
{
    const char *key;
    cJSON *payload;
    if (s->no_memory) {
        key = "error";
        payload = error_object(RPC_INTERNAL, "out of memory");
    } else if (!s->batch_gen) {
        payload = part_payload(&s->parts[0], &key);
    } else {
        key = "result";
        payload = cJSON_CreateObject();
        cJSON *arr = cJSON_AddArrayToObject(payload, "results");
        for (int i = 0; i < s->n_parts; i++) {
            const char *k;
            cJSON *v = part_payload(&s->parts[i], &k);
            cJSON *env;
            if (!strcmp(k, "error")) {
                env = cJSON_CreateObject();
                cJSON_AddBoolToObject(env, "success", 0);
                cJSON_AddItemToObject(env, "error", v);
            } else {
                env = v; /* result object: {success: true, ...} */
                if (!cJSON_IsObject(env)) {
                    cJSON_Delete(env);
                    env = cJSON_CreateObject();
                }
                cJSON_AddItemToObject(env, "success", cJSON_CreateTrue());
            }
            cJSON_AddItemToArray(arr, env);
        }
    }
    return envelope(s->id, key, payload);
}

/* Writes the response (every non-streaming generation has ended) and opens every gate. */
static void job_write_response(struct rpc_job *job)
{
    cJSON *out = job->is_array ? cJSON_CreateArray() : NULL;
    for (int i = 0; i < job->n_slots; i++) {
        struct rpc_slot *s = &job->slots[i];
        if (!s->has_id) {
            for (int k = 0; k < s->n_parts; k++) s->parts[k].gen = NULL; /* nobody reads it */
            continue;
        }
        cJSON *r = slot_response(s);
        if (job->is_array)
            cJSON_AddItemToArray(out, r);
        else
            out = r;
    }
    /* An array of only notifications gets no response at all (JSON-RPC 2.0). */
    if (out && (!job->is_array || cJSON_GetArraySize(out) > 0)) sink_write_json(&job->sink, out);
    cJSON_Delete(out);
    for (int i = 0; i < job->n_gens; i++) gen_open_gate(job->gens[i]);
}

/* ---- request validation ------------------------------------------------------------------- */

static void handle_request(struct rpc_job *job, struct rpc_slot *s, const cJSON *req)
{
    const cJSON *id = cJSON_IsObject(req) ? cJSON_GetObjectItemCaseSensitive(req, "id") : NULL;
    int good_id = id && (cJSON_IsString(id) || cJSON_IsNumber(id) || cJSON_IsNull(id));
    if (good_id) {
        s->id = cJSON_Duplicate(id, 1);
        s->has_id = 1;
    }
    s->n_parts = 1;
    s->parts = alloc_calloc(1, sizeof *s->parts);
    if (!s->parts) { /* answered "out of memory" (a notification: nothing) */
        s->n_parts = 0;
        s->no_memory = 1;
        return;
    }
    /* A request with an id of the wrong type is answered with id null. */
    if (good_id) {
    } else if (id) {
        s->has_id = 1;
        rpc_part_error(&s->parts[0], RPC_INVALID_REQUEST, "invalid request: bad id type");
        return;
    }
    if (!cJSON_IsObject(req)) {
        s->has_id = 1;
        rpc_part_error(&s->parts[0], RPC_INVALID_REQUEST, "invalid request: not an object");
        return;
    }
    const cJSON *ver = cJSON_GetObjectItemCaseSensitive(req, "jsonrpc");
    const cJSON *method = cJSON_GetObjectItemCaseSensitive(req, "method");
    if (!cJSON_IsString(ver) || strcmp(ver->valuestring, "2.0") != 0) {
        s->has_id = 1;
        rpc_part_error(&s->parts[0], RPC_INVALID_REQUEST,
                       "invalid request: jsonrpc must be \"2.0\"");
        return;
    }
    if (!cJSON_IsString(method)) {
        s->has_id = 1;
        rpc_part_error(&s->parts[0], RPC_INVALID_REQUEST,
                       "invalid request: method must be a string");
        return;
    }
    const cJSON *params = cJSON_GetObjectItemCaseSensitive(req, "params");
    if (params && !cJSON_IsObject(params) && !cJSON_IsNull(params)) {
        rpc_part_error(&s->parts[0], RPC_INVALID_PARAMS, "invalid params: must be an object");
        return;
    }
    rpc_dispatch(job, s, method->valuestring, cJSON_IsObject(params) ? params : NULL);
}

static int handle(struct rpc_ctx *c, const char *msg, size_t len, const struct rpc_sink *sink,
                  const atomic_int *abort, void (*done)(void *), void *done_arg)
{
    if (!c || !msg || !sink || !sink->write) return KRS_ERR_INVALID;
    cJSON *root = cJSON_ParseWithLength(msg, len);
    struct rpc_job *job = NULL;
    if (!root) {
        cJSON *r = envelope(NULL, "error", error_object(RPC_PARSE_ERROR, "parse error"));
        sink_write_json(sink, r);
        cJSON_Delete(r);
        goto answered;
    }
    if (cJSON_IsArray(root) && cJSON_GetArraySize(root) == 0) {
        cJSON *r = envelope(NULL, "error",
                            error_object(RPC_INVALID_REQUEST, "invalid request: empty batch"));
        sink_write_json(sink, r);
        cJSON_Delete(r);
        goto answered;
    }
    job = alloc_calloc(1, sizeof *job);
    if (!job) goto no_memory;
    job->ctx = c;
    job->sink = *sink;
    job->refs = 1; /* this call's */
    job->abort = abort;
    job->done = done;
    job->done_arg = done_arg;
    pthread_mutex_init(&job->mu, NULL);
    job->is_array = cJSON_IsArray(root);
    job->n_slots = job->is_array ? cJSON_GetArraySize(root) : 1;
    job->slots = alloc_calloc((size_t)job->n_slots, sizeof *job->slots);
    if (!job->slots) {
        job->n_slots = 0;
        job_unref(job);
        goto no_memory;
    }
    pthread_mutex_lock(&c->lock);
    c->n_jobs++;
    pthread_mutex_unlock(&c->lock);
    if (job->is_array) {
        int i = 0;
        const cJSON *el;
        cJSON_ArrayForEach(el, root) handle_request(job, &job->slots[i++], el);
    } else {
        handle_request(job, &job->slots[0], root);
    }
    pthread_mutex_lock(&job->mu);
    job->dispatched = 1;
    pthread_mutex_unlock(&job->mu);
    job_advance(job); /* answers now unless a non-streaming generation is still running */
    job_unref(job);
    cJSON_Delete(root);
    return KRS_OK;
no_memory:
    /* Not even the job could be set up: one error, written without allocating. */
    sink->write(sink->user, OOM_RESPONSE, sizeof OOM_RESPONSE - 1);
answered:
    cJSON_Delete(root);
    if (done) done(done_arg);
    return KRS_OK;
}
