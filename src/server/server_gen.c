/* OpenAI generation over HTTP: /v1/completions and /v1/chat/completions.
 *
 * Flow: parse (openai_parse.c) -> pick the engine -> chat template + tokenize -> limits ->
 * sched_submit -> the connection waits suspended. The stream's notify callback (engine thread)
 * resumes it; the MHD thread then drains the stream (sched_stream_try_read) and either writes
 * SSE chunks (streaming: from the response's content reader) or, at FINISH, the whole JSON
 * response (non-streaming: from the access handler, which MHD calls again after a resume).
 *
 * Wake-up protocol (no lost wake-ups, no use after free): the notify argument is the request's
 * slot (stable memory for the server's lifetime). Draining the stream, and deciding to suspend,
 * happen under the slot's lock; notify takes the same lock and resumes only when the slot still
 * belongs to a connection that is suspended. A stale notify can at worst resume a connection
 * spuriously, which drains nothing and suspends again. A client that goes away is seen either by
 * MHD (failed write) or by a peek at the socket on each wake-up; the request-completed callback
 * then releases the stream, which cancels the request at the engine's next step.
 *
 * `n` > 1 (several choices of one prompt): one scheduler request per choice, each with its own
 * sampler and seed (seed + i when a seed is given), all submitted together and all notifying
 * the same slot. The scheduler's prefix cache makes the prompt's KV computed once and shared
 * (the later choices wait for the first one's prefill and attach its blocks). Chunks carry their
 * choice's index; the response ends when every choice has, or at the first that fails (the
 * others are then cancelled). */
#include "server/server_impl.h"

#include "engine/engine.h"
#include "krserve.h"
#include "sched/sched.h"
#include "tokenizer/tokenizer.h"
#include "util/alloc.h"
#include "util/log.h"

#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

/* One choice: its scheduler request and what it produced. */
struct gen_choice {
    struct sched_stream *st;
    uint64_t req_id;
    size_t text_off; /* bytes of completion text so far (text_offset of the next token) */
    /* non-streaming accumulators */
    char *text;
    size_t text_len, text_cap;
    cJSON *lp; /* chat: array "content"; completions: {tokens, token_logprobs, ...} */
    int finished;
    struct sched_event fin;
    /* tools: 1 = the reply is a tool call, held back until the end; 0 = plain content;
     * -1 = not known yet (tool_choice auto: a reply starting with '{' is a call) */
    int tool_buf;
};

struct server_gen {
    struct server *srv;
    struct engine *eng;
    int slot;
    struct server_gen_request req;
    char id[64];
    uint64_t created;
    int n_prompt;
    int n_choices, n_finished; /* submitted / ended */
    int counted;               /* counted in srv->inflight */
    struct gen_choice ch[SERVER_MAX_N];
    const struct sched_event *failed; /* FINISH of the first choice that did not succeed */
    /* streaming output not yet handed to MHD */
    char *out;
    size_t out_len, out_cap, out_off;
    int finished, done_written; /* finished: every choice ended, or one failed */
    struct sched_event ev;      /* scratch */
    /* Out of memory while turning events into output: the request ends as failed with this
     * FINISH (every choice cancelled); a stream then ends with a static error event (tail). */
    struct sched_event oom_fin;
    const char *tail;
    size_t tail_len, tail_off;
};

/* A stream's end when its output ran out of memory: written without allocating. */
static const char OOM_TAIL[] =
    "data: {\"error\":{\"message\":\"request error: out of memory\",\"type\":\"server_error\","
    "\"param\":null,\"code\":\"out_of_memory\"}}\n\ndata: [DONE]\n\n";

/* Out of memory: the request fails with an error instead of a silently shortened output. */
static void gen_no_memory(struct server_gen *g)
{
    if (g->failed == &g->oom_fin) return;
    memset(&g->oom_fin, 0, sizeof g->oom_fin);
    g->oom_fin.kind = SCHED_EV_FINISH;
    g->oom_fin.finish = SCHED_FINISH_ERROR;
    snprintf(g->oom_fin.reason, sizeof g->oom_fin.reason, "out of memory");
    g->failed = &g->oom_fin;
    for (int i = 0; i < g->n_choices; i++) sched_cancel(engine_sched(g->eng), g->ch[i].req_id);
}

static int buf_append(char **buf, size_t *len, size_t *cap, const char *s, size_t n)
{
    if (*len + n + 1 > *cap) {
        size_t nc = *cap ? *cap : 1024;
        while (nc < *len + n + 1) nc *= 2;
        char *nb = alloc_realloc(*buf, nc);
        if (!nb) return KRS_ERR_NOMEM;
        *buf = nb;
        *cap = nc;
    }
    memcpy(*buf + *len, s, n);
    *len += n;
    (*buf)[*len] = '\0';
    return KRS_OK;
}

/* A JSON string of s[0..n) as valid UTF-8; small strings (token pieces, a chunk's text) never
 * touch the heap. NULL when out of memory. */
static cJSON *sanitized_string(const char *s, size_t n)
{
    char small[1600];
    char *t = 3 * n + 1 <= sizeof small ? small : alloc_malloc(3 * n + 1);
    if (!t) return NULL;
    server_utf8_sanitize_into(s, n, t);
    cJSON *j = cJSON_CreateString(t);
    if (t != small) alloc_free(t);
    return j;
}

/* 0, or -1 out of memory (nothing added). */
static int add_sanitized(cJSON *obj, const char *key, const char *s, size_t n)
{
    cJSON *j = sanitized_string(s, n);
    return j && cJSON_AddItemToObject(obj, key, j) ? 0 : -1;
}

static size_t token_piece(const struct tokenizer *tok, int32_t id, char *buf, size_t cap)
{
    size_t n = 0;
    if (tokenizer_token_piece(tok, id, 1, buf, cap, &n)) return 0;
    return n;
}

static cJSON *chat_lp_item(const struct tokenizer *tok, int32_t id, float logprob)
{
    char piece[512];
    size_t n = token_piece(tok, id, piece, sizeof piece);
    cJSON *o = cJSON_CreateObject();
    add_sanitized(o, "token", piece, n);
    cJSON_AddNumberToObject(o, "logprob", (double)logprob);
    cJSON *b = cJSON_AddArrayToObject(o, "bytes");
    for (size_t i = 0; i < n; i++)
        cJSON_AddItemToArray(b, cJSON_CreateNumber((unsigned char)piece[i]));
    return o;
}

/* Adds the logprobs of one sampled token to `lp` (chat: content array; completions: object). */
static void lp_add(struct server_gen *g, cJSON *lp, const struct sched_event *ev, size_t offset)
{
    const struct tokenizer *tok = engine_tokenizer(g->eng);
    if (g->req.api == SERVER_API_CHAT) {
        cJSON *item = chat_lp_item(tok, ev->token, ev->logprob);
        cJSON *top = cJSON_AddArrayToObject(item, "top_logprobs");
        for (int i = 0; i < ev->n_top && i < g->req.top_logprobs; i++)
            cJSON_AddItemToArray(top, chat_lp_item(tok, ev->top[i].token, ev->top[i].logprob));
        cJSON_AddItemToArray(lp, item);
        return;
    }
    char piece[512];
    size_t n = token_piece(tok, ev->token, piece, sizeof piece);
    cJSON_AddItemToArray(cJSON_GetObjectItem(lp, "tokens"), sanitized_string(piece, n));
    cJSON_AddItemToArray(cJSON_GetObjectItem(lp, "token_logprobs"),
                         cJSON_CreateNumber((double)ev->logprob));
    cJSON *top = cJSON_CreateObject();
    for (int i = 0; i < ev->n_top && i < g->req.logprobs; i++) {
        size_t m = token_piece(tok, ev->top[i].token, piece, sizeof piece);
        char t[3 * sizeof piece + 1];
        server_utf8_sanitize_into(piece, m, t);
        if (!cJSON_GetObjectItemCaseSensitive(top, t))
            cJSON_AddNumberToObject(top, t, (double)ev->top[i].logprob);
    }
    cJSON_AddItemToArray(cJSON_GetObjectItem(lp, "top_logprobs"), top);
    cJSON_AddItemToArray(cJSON_GetObjectItem(lp, "text_offset"),
                         cJSON_CreateNumber((double)offset));
}

static cJSON *lp_new(const struct server_gen *g)
{
    if (g->req.api == SERVER_API_CHAT) return cJSON_CreateArray();
    cJSON *o = cJSON_CreateObject();
    cJSON_AddArrayToObject(o, "tokens");
    cJSON_AddArrayToObject(o, "token_logprobs");
    cJSON_AddArrayToObject(o, "top_logprobs");
    cJSON_AddArrayToObject(o, "text_offset");
    return o;
}

static int want_logprobs(const struct server_gen *g)
{
    return g->req.api == SERVER_API_CHAT ? g->req.logprobs : g->req.logprobs >= 0;
}

static const char *finish_str(enum sched_finish f)
{
    return f == SCHED_FINISH_STOP ? "stop" : "length";
}

static cJSON *usage_json(const struct server_gen *g)
{
    cJSON *u = cJSON_CreateObject();
    int gen = 0;
    for (int i = 0; i < g->n_choices; i++) gen += g->ch[i].fin.n_gen_tokens;
    cJSON_AddNumberToObject(u, "prompt_tokens", g->n_prompt);
    cJSON_AddNumberToObject(u, "completion_tokens", gen);
    cJSON_AddNumberToObject(u, "total_tokens", g->n_prompt + gen);
    /* OpenAI's field: prompt tokens whose KV the prefix cache supplied (to the first choice;
     * the others share what it computed). */
    cJSON *d = cJSON_AddObjectToObject(u, "prompt_tokens_details");
    if (d) cJSON_AddNumberToObject(d, "cached_tokens", g->ch[0].fin.n_cached_tokens);
    return u;
}

/* The envelope shared by every response and chunk. */
static cJSON *envelope(const struct server_gen *g, const char *object)
{
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "id", g->id);
    cJSON_AddStringToObject(o, "object", object);
    cJSON_AddNumberToObject(o, "created", (double)g->created);
    cJSON_AddStringToObject(o, "model", engine_name(g->eng));
    cJSON_AddStringToObject(o, "system_fingerprint", "kr-serve");
    return o;
}

/* Appends one SSE event whole (obj deleted here; NULL = it could not be built), or fails the
 * request for want of memory. */
static void sse_emit(struct server_gen *g, cJSON *obj)
{
    char *txt = obj ? cJSON_PrintUnformatted(obj) : NULL;
    cJSON_Delete(obj);
    size_t n = txt ? strlen(txt) : 0;
    if (!txt || buf_append(&g->out, &g->out_len, &g->out_cap, "data: ", 6) ||
        buf_append(&g->out, &g->out_len, &g->out_cap, txt, n) ||
        buf_append(&g->out, &g->out_len, &g->out_cap, "\n\n", 2))
        gen_no_memory(g);
    cJSON_free(txt);
}

/* One streaming chunk of choice `index`: text (may be empty), optional logprobs, optional
 * finish reason. */
static cJSON *chunk(struct server_gen *g, int index, const char *text, size_t n, cJSON *lp,
                    const char *fin, int role)
{
    int chat = g->req.api == SERVER_API_CHAT;
    cJSON *o = envelope(g, chat ? "chat.completion.chunk" : "text_completion");
    cJSON *choices = cJSON_AddArrayToObject(o, "choices");
    cJSON *c = cJSON_CreateObject();
    cJSON_AddItemToArray(choices, c);
    cJSON_AddNumberToObject(c, "index", index);
    if (chat) {
        cJSON *d = cJSON_AddObjectToObject(c, "delta");
        if (role) cJSON_AddStringToObject(d, "role", "assistant");
        if ((role || n || !fin) && add_sanitized(d, "content", text, n)) goto no_memory;
        if (lp) {
            cJSON *l = cJSON_AddObjectToObject(c, "logprobs");
            cJSON_AddItemToObject(l, "content", lp);
        } else {
            cJSON_AddNullToObject(c, "logprobs");
        }
    } else {
        if (add_sanitized(c, "text", text, n)) goto no_memory;
        if (lp)
            cJSON_AddItemToObject(c, "logprobs", lp);
        else
            cJSON_AddNullToObject(c, "logprobs");
    }
    if (fin)
        cJSON_AddStringToObject(c, "finish_reason", fin);
    else
        cJSON_AddNullToObject(c, "finish_reason");
    if (g->req.include_usage) cJSON_AddNullToObject(o, "usage");
    return o;
no_memory:
    cJSON_Delete(o);
    cJSON_Delete(lp);
    return NULL;
}

static void error_of_finish(const struct sched_event *fin, struct server_error *e)
{
    memset(e, 0, sizeof *e);
    if (fin->finish == SCHED_FINISH_ERROR) {
        e->status = 500;
        e->type = "server_error";
        e->code = "internal_error";
    } else if (strstr(fin->reason, "timeout")) {
        e->status = 408;
        e->type = "timeout_error";
        e->code = "request_timeout";
    } else {
        e->status = 503;
        e->type = "server_error";
        e->code = "request_cancelled";
    }
    snprintf(e->message, sizeof e->message, "request %s: %s", sched_finish_name(fin->finish),
             fin->reason);
}

/* The reply as OpenAI tool_calls (one call), or NULL when it is not a complete call (cut by
 * max_tokens: the caller sends it as content). */
static cJSON *tool_calls_json(const struct server_gen *g, int i, int with_index)
{
    const struct gen_choice *ch = &g->ch[i];
    if (ch->tool_buf != 1 || ch->fin.finish != SCHED_FINISH_STOP) return NULL;
    cJSON *reply = cJSON_ParseWithLength(ch->text ? ch->text : "", ch->text_len);
    const cJSON *args = reply;
    const char *name = g->req.tool_name;
    if (reply && g->req.tool_mode != SERVER_TOOLS_NAMED) {
        const cJSON *n = cJSON_GetObjectItemCaseSensitive(reply, "name");
        args = cJSON_GetObjectItemCaseSensitive(reply, "arguments");
        name = cJSON_IsString(n) ? n->valuestring : NULL;
    }
    char *atext = args && name ? cJSON_PrintUnformatted(args) : NULL;
    cJSON *calls = NULL;
    if (atext) {
        calls = cJSON_CreateArray();
        cJSON *c = cJSON_CreateObject();
        cJSON_AddItemToArray(calls, c);
        if (with_index) cJSON_AddNumberToObject(c, "index", 0);
        char id[80];
        const char *base = strchr(g->id, '-') ? strchr(g->id, '-') + 1 : g->id;
        if (i)
            snprintf(id, sizeof id, "call_%s_%d", base, i);
        else
            snprintf(id, sizeof id, "call_%s", base);
        cJSON_AddStringToObject(c, "id", id);
        cJSON_AddStringToObject(c, "type", "function");
        cJSON *f = cJSON_AddObjectToObject(c, "function");
        cJSON_AddStringToObject(f, "name", name);
        cJSON_AddStringToObject(f, "arguments", atext);
        cJSON_free(atext);
    }
    cJSON_Delete(reply);
    return calls;
}

/* Drains one choice's buffered events into its accumulators / the SSE output. */
static void pump_choice(struct server_gen *g, int i)
{
    struct gen_choice *c = &g->ch[i];
    struct sched_event *ev = &g->ev;
    int stream = g->req.stream;
    while (!c->finished && sched_stream_try_read(c->st, ev) == KRS_OK) {
        if (ev->kind == SCHED_EV_TOKEN) {
            int lp = want_logprobs(g) && ev->token >= 0;
            size_t off = c->text_off;
            c->text_off += ev->text_len;
            if (stream && c->tool_buf) {
                /* a tool call is sent whole at the end; until the first byte decides (auto) the
                 * text is held back too */
                if (buf_append(&c->text, &c->text_len, &c->text_cap, ev->text, ev->text_len))
                    gen_no_memory(g);
                if (c->tool_buf < 0 && c->text_len > 0) {
                    c->tool_buf = c->text[0] == '{';
                    if (!c->tool_buf) sse_emit(g, chunk(g, i, c->text, c->text_len, NULL, NULL, 0));
                }
                continue;
            }
            if (stream) {
                if (!ev->text_len && !lp) continue;
                cJSON *l = NULL;
                if (lp) {
                    l = lp_new(g);
                    lp_add(g, l, ev, off);
                }
                sse_emit(g, chunk(g, i, ev->text, ev->text_len, l, NULL, 0));
            } else {
                if (buf_append(&c->text, &c->text_len, &c->text_cap, ev->text, ev->text_len))
                    gen_no_memory(g);
                if (lp) lp_add(g, c->lp, ev, off);
            }
            continue;
        }
        c->fin = *ev;
        c->finished = 1;
        g->n_finished++;
        if (ev->finish != SCHED_FINISH_STOP && ev->finish != SCHED_FINISH_LENGTH) {
            if (!g->failed) g->failed = &c->fin; /* the first failure is the one reported */
        } else if (stream) {
            cJSON *calls = tool_calls_json(g, i, 1);
            const char *fin = finish_str(ev->finish);
            if (calls) {
                cJSON *o = chunk(g, i, "", 0, NULL, NULL, 0);
                cJSON *d = cJSON_GetObjectItem(
                    cJSON_GetArrayItem(cJSON_GetObjectItem(o, "choices"), 0), "delta");
                cJSON_DeleteItemFromObject(d, "content");
                cJSON_AddItemToObject(d, "tool_calls", calls);
                sse_emit(g, o);
                fin = "tool_calls";
            } else if (c->tool_buf && c->text_len) { /* held back, and not a call after all */
                sse_emit(g, chunk(g, i, c->text, c->text_len, NULL, NULL, 0));
            }
            sse_emit(g, chunk(g, i, "", 0, NULL, fin, 0));
        }
    }
}

/* Drains every choice; once all have ended (or one failed) writes the stream's tail. */
static void gen_pump(struct server_gen *g)
{
    for (int i = 0; i < g->n_choices && !g->finished; i++) {
        pump_choice(g, i);
        g->finished = g->failed || g->n_finished == g->n_choices;
    }
    if (!g->finished || !g->req.stream || g->done_written) return;
    if (g->failed == &g->oom_fin) {
        /* What this round added is not sent yet (sse_read drains the buffer before a pump):
         * the error replaces it, written without allocating. */
        g->out_len = 0;
        if (g->out_cap >= sizeof OOM_TAIL) {
            memcpy(g->out, OOM_TAIL, sizeof OOM_TAIL - 1);
            g->out_len = sizeof OOM_TAIL - 1;
        } else {
            g->tail = OOM_TAIL;
            g->tail_len = sizeof OOM_TAIL - 1;
        }
        g->done_written = 1;
        return;
    }
    if (g->failed) {
        struct server_error e;
        error_of_finish(g->failed, &e);
        sse_emit(g, server_error_json(&e));
    } else if (g->req.include_usage) {
        cJSON *o = envelope(g, g->req.api == SERVER_API_CHAT ? "chat.completion.chunk"
                                                             : "text_completion");
        cJSON_AddArrayToObject(o, "choices");
        cJSON_AddItemToObject(o, "usage", usage_json(g));
        sse_emit(g, o);
    }
    if (g->failed == &g->oom_fin ||
        buf_append(&g->out, &g->out_len, &g->out_cap, "data: [DONE]\n\n", 14)) {
        gen_no_memory(g);
        g->done_written = 0;
        gen_pump(g); /* writes the out-of-memory tail */
        return;
    }
    g->done_written = 1;
}

static ssize_t sse_read(void *cls, uint64_t pos, char *buf, size_t max)
{
    struct server_conn *c = cls;
    struct server_gen *g = c->gen;
    if (!g) return MHD_CONTENT_READER_END_WITH_ERROR;
    if (g->tail) { /* the out-of-memory end: static */
        size_t n = g->tail_len - g->tail_off;
        if (n == 0) return MHD_CONTENT_READER_END_OF_STREAM;
        if (n > max) n = max;
        memcpy(buf, g->tail + g->tail_off, n);
        g->tail_off += n;
        return (ssize_t)n;
    }
    if (g->out_off == g->out_len) {
        g->out_off = g->out_len = 0;
        if (g->done_written) return MHD_CONTENT_READER_END_OF_STREAM;
        if (server_peer_closed(c->mc)) return MHD_CONTENT_READER_END_WITH_ERROR;
        struct server_slot *sl = &g->srv->slots[g->slot];
        pthread_mutex_lock(&sl->lock);
        gen_pump(g);
        if (g->out_len == 0) {
            sl->suspended = 1;
            MHD_suspend_connection(c->mc);
        }
        pthread_mutex_unlock(&sl->lock);
        if (g->out_len == 0) return 0;
    }
    size_t n = g->out_len - g->out_off;
    if (n > max) n = max;
    memcpy(buf, g->out + g->out_off, n);
    g->out_off += n;
    return (ssize_t)n;
}

static enum MHD_Result send_final(struct server_conn *c)
{
    struct server_gen *g = c->gen;
    if (g->failed) {
        struct server_error e;
        error_of_finish(g->failed, &e);
        return server_send_error(c->mc, &e);
    }
    int chat = g->req.api == SERVER_API_CHAT;
    cJSON *o = envelope(g, chat ? "chat.completion" : "text_completion");
    cJSON *choices = cJSON_AddArrayToObject(o, "choices");
    for (int i = 0; i < g->n_choices; i++) {
        struct gen_choice *gc = &g->ch[i];
        cJSON *ch = cJSON_CreateObject();
        cJSON_AddItemToArray(choices, ch);
        cJSON_AddNumberToObject(ch, "index", i);
        const char *text = gc->text ? gc->text : "";
        const char *fin = finish_str(gc->fin.finish);
        if (gc->tool_buf < 0) gc->tool_buf = gc->text_len > 0 && text[0] == '{';
        cJSON *calls = chat ? tool_calls_json(g, i, 0) : NULL;
        cJSON *holder = ch;
        if (chat) {
            cJSON *m = cJSON_AddObjectToObject(ch, "message");
            cJSON_AddStringToObject(m, "role", "assistant");
            if (calls) {
                cJSON_AddNullToObject(m, "content");
                cJSON_AddItemToObject(m, "tool_calls", calls);
                fin = "tool_calls";
            } else if (add_sanitized(m, "content", text, gc->text_len)) {
                cJSON_Delete(o);
                return server_send_no_memory(c->mc);
            }
            if (gc->lp) holder = cJSON_AddObjectToObject(ch, "logprobs");
        } else if (add_sanitized(ch, "text", text, gc->text_len)) {
            cJSON_Delete(o);
            return server_send_no_memory(c->mc);
        }
        if (gc->lp) {
            cJSON_AddItemToObject(holder, chat ? "content" : "logprobs", gc->lp);
            gc->lp = NULL;
        } else {
            cJSON_AddNullToObject(ch, "logprobs");
        }
        cJSON_AddStringToObject(ch, "finish_reason", fin);
    }
    cJSON_AddItemToObject(o, "usage", usage_json(g));
    return server_send_json(c->mc, 200, o);
}

enum MHD_Result server_gen_continue(struct server_conn *c)
{
    struct server_gen *g = c->gen;
    if (!g->finished && server_peer_closed(c->mc)) return MHD_NO; /* closes; cancels */
    struct server_slot *sl = &g->srv->slots[g->slot];
    pthread_mutex_lock(&sl->lock);
    gen_pump(g);
    if (!g->finished) {
        sl->suspended = 1;
        MHD_suspend_connection(c->mc);
    }
    pthread_mutex_unlock(&sl->lock);
    if (!g->finished) return MHD_YES;
    return send_final(c);
}

static void gen_notify(void *arg)
{
    struct server_slot *sl = arg;
    pthread_mutex_lock(&sl->lock);
    if (sl->conn && sl->suspended) {
        sl->suspended = 0;
        MHD_resume_connection(sl->conn->mc);
    }
    pthread_mutex_unlock(&sl->lock);
}

static void gen_free(struct server_gen *g)
{
    if (g->slot >= 0) server_slot_free(g->srv, g->slot);
    for (int i = 0; i < g->n_choices; i++) {
        sched_stream_release(g->ch[i].st);
        cJSON_Delete(g->ch[i].lp);
        alloc_free(g->ch[i].text);
    }
    if (g->counted) atomic_fetch_sub(&g->srv->inflight, 1);
    if (g->eng) engine_release(g->eng);
    server_gen_request_free(&g->req);
    alloc_free(g->out);
    alloc_free(g);
}

void server_gen_end(struct server_conn *c)
{
    struct server_gen *g = c->gen;
    c->gen = NULL;
    if (g) gen_free(g);
}

/* Tokenizes text; *out is alloc'd. */
static int encode(const struct tokenizer *tok, const char *text, size_t len, int add_special,
                  int parse_special, int32_t **out, int *n_out)
{
    size_t cap = len + 16, n = 0;
    int32_t *ids = alloc_malloc(cap * sizeof *ids);
    if (!ids) return KRS_ERR_NOMEM;
    int rc = tokenizer_encode(tok, text, len, add_special, parse_special, ids, cap, &n);
    if (rc == KRS_ERR_FULL) {
        alloc_free(ids);
        cap = n;
        ids = alloc_malloc(cap * sizeof *ids);
        if (!ids) return KRS_ERR_NOMEM;
        rc = tokenizer_encode(tok, text, len, add_special, parse_special, ids, cap, &n);
    }
    if (rc) {
        alloc_free(ids);
        return rc;
    }
    *out = ids;
    *n_out = (int)n;
    return KRS_OK;
}

/* The prompt's token ids for a parsed request (chat template or plain text or ids). */
static int build_prompt(struct engine *e, const struct server_gen_request *r, int32_t **ids, int *n,
                        struct server_error *err)
{
    const struct tokenizer *tok = engine_tokenizer(e);
    int rc;
    err->status = 400;
    err->type = "invalid_request_error";
    if (r->api == SERVER_API_CHAT) {
        char *text = NULL, msg[200] = "";
        size_t len = 0;
        rc = chat_apply(tok, NULL, r->msgs, (size_t)r->n_msgs, 1, &text, &len, msg, sizeof msg);
        if (rc) {
            snprintf(err->param, sizeof err->param, "messages");
            snprintf(err->message, sizeof err->message, "%s",
                     rc == KRS_ERR_UNSUPPORTED ? "this model has no usable chat template"
                     : msg[0]                  ? msg
                                               : "invalid messages");
            if (rc == KRS_ERR_NOMEM) { /* the process's fault, not the request's */
                err->status = 500;
                err->type = "server_error";
            }
            return rc;
        }
        rc = encode(tok, text, len, 0, 1, ids, n);
        alloc_free(text);
    } else if (r->prompt_ids) { /* ids outside the vocabulary: engine_gen_build says so */
        *ids = alloc_malloc((size_t)r->n_prompt_ids * sizeof(int32_t));
        rc = *ids ? KRS_OK : KRS_ERR_NOMEM; /* reported below */
        if (*ids) memcpy(*ids, r->prompt_ids, (size_t)r->n_prompt_ids * sizeof(int32_t));
        *n = r->n_prompt_ids;
    } else {
        rc = encode(tok, r->prompt, r->prompt_len, 1, 0, ids, n);
    }
    if (rc) {
        err->status = 500;
        err->type = "server_error";
        snprintf(err->message, sizeof err->message, "tokenization failed: %s", krs_status_str(rc));
    }
    return rc;
}

enum MHD_Result server_gen_start(struct server_conn *c, enum server_api api)
{
    struct server *s = c->srv;
    struct MHD_Connection *mc = c->mc;
    struct server_limits_rt rt;
    server_rt_get(s, &rt);
    struct server_error err;
    struct server_gen *g = alloc_calloc(1, sizeof *g);
    if (!g) return server_send_no_memory(mc);
    g->srv = s;
    g->slot = -1;
    /* Counted in flight before the drain flag is read (both seq_cst): a drain that starts
     * concurrently either sees this request and waits for it, or this request sees the drain
     * and answers 503 — never neither (the flaky test_sigterm_drains_inflight). The count is
     * given back by gen_free on every path. */
    atomic_fetch_add(&s->inflight, 1);
    g->counted = 1;
    if (atomic_load(&s->draining)) {
        gen_free(g);
        return server_send_errorf(mc, 503, "server_error", "service_unavailable", NULL,
                                  "the server is shutting down");
    }
    int32_t *ids = NULL;
    int n_ids = 0;
    enum MHD_Result ret;
    if (server_parse_gen(c->body, c->body_len, api, &g->req, &err)) goto fail_err;
    g->eng = engine_registry_acquire(s->reg, g->req.model);
    if (!g->eng) {
        memset(&err, 0, sizeof err);
        if (engine_registry_loading(s->reg) > 0) { /* it may be the model being loaded */
            err.status = 503;
            err.type = "server_error";
            err.code = "model_loading";
            snprintf(err.message, sizeof err.message, "a model is loading; retry shortly");
            goto fail_err;
        }
        err.status = 404;
        err.type = "invalid_request_error";
        err.code = "model_not_found";
        snprintf(err.param, sizeof err.param, "model");
        snprintf(err.message, sizeof err.message, "the model '%s' does not exist",
                 g->req.model ? g->req.model : "(default)");
        goto fail_err;
    }
    memset(&err, 0, sizeof err);
    if (build_prompt(g->eng, &g->req, &ids, &n_ids, &err)) goto fail_err;
    /* The engine's request builder: one context limit, the server's limits, the documented
     * defaults (completions 16 tokens, chat the rest of the context). */
    struct engine_limits lim;
    engine_limits_of(engine_sched(g->eng), engine_tokenizer(g->eng), NULL, &lim);
    lim.max_prompt_tokens = rt.max_prompt_tokens;
    lim.max_tokens_limit = rt.max_tokens_limit;
    lim.timeout_ms = rt.request_timeout_ms;
    lim.default_max_tokens = api == SERVER_API_COMPLETIONS ? 16 : 0;
    struct sched_request sr;
    struct engine_req_error re;
    if (engine_gen_build(&g->req.gen, &lim, ids, n_ids,
                         api == SERVER_API_CHAT ? "messages" : "prompt", &sr, &re)) {
        server_error_from_req(&re, &err);
        goto fail_err;
    }
    sr.grammar = g->req.grammar;

    uint32_t sgen;
    g->slot = server_slot_alloc(s, c, &sgen);
    if (g->slot < 0) {
        err.status = 503;
        err.type = "server_error";
        err.code = "service_unavailable";
        snprintf(err.message, sizeof err.message, "too many requests in progress");
        goto fail_err;
    }
    int rc = KRS_OK;
    for (int i = 0; i < g->req.n && !rc; i++) {
        /* Each choice its own sampler: with a seed, seed + i (reproducible and distinct). */
        if (g->req.gen.has_seed) sr.sampling.seed = g->req.gen.sampling.seed + (uint64_t)i;
        rc = sched_submit(engine_sched(g->eng), &sr, &g->ch[i].st, &g->ch[i].req_id);
        if (!rc) g->n_choices++;
    }
    if (rc) {
        /* Choices already submitted are cancelled when gen_free releases their streams. */
        if (rc == KRS_ERR_FULL) {
            err.status = 429;
            err.type = "rate_limit_error";
            err.code = "queue_full";
            snprintf(err.message, sizeof err.message, "the request queue is full; retry later");
        } else if (rc == KRS_ERR_STATE) {
            err.status = 503;
            err.type = "server_error";
            err.code = "service_unavailable";
            snprintf(err.message, sizeof err.message, "the model is not accepting requests");
        } else if (rc == KRS_ERR_INVALID) { /* the builder checked what sched checks */
            err.status = 400;
            err.type = "invalid_request_error";
            snprintf(err.message, sizeof err.message,
                     "the scheduler refused the request (prompt + max_tokens beyond its context "
                     "of %d tokens, or a parameter out of range)",
                     lim.max_ctx);
        } else {
            err.status = 500;
            err.type = "server_error";
            snprintf(err.message, sizeof err.message, "submit failed: %s", krs_status_str(rc));
        }
        goto fail_err;
    }
    alloc_free(ids);
    ids = NULL;
    g->n_prompt = n_ids;
    g->created = (uint64_t)time(NULL);
    snprintf(g->id, sizeof g->id, "%s-%" PRIx64 "%06" PRIx64,
             api == SERVER_API_CHAT ? "chatcmpl" : "cmpl", g->created,
             (uint64_t)atomic_fetch_add(&s->next_id, 1));
    c->gen = g;
    for (int i = 0; i < g->n_choices; i++) {
        if (want_logprobs(g) && !g->req.stream) g->ch[i].lp = lp_new(g);
        g->ch[i].tool_buf =
            g->req.tool_mode == SERVER_TOOLS_NAMED || g->req.tool_mode == SERVER_TOOLS_REQUIRED ? 1
            : g->req.tool_mode == SERVER_TOOLS_AUTO                                             ? -1
                                                                                                : 0;
        sched_stream_set_notify(g->ch[i].st, gen_notify, &s->slots[g->slot]);
    }

    if (!g->req.stream) return server_gen_continue(c);

    if (api == SERVER_API_CHAT)
        for (int i = 0; i < g->n_choices; i++) sse_emit(g, chunk(g, i, "", 0, NULL, NULL, 1));
    struct MHD_Response *resp =
        MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, 16 * 1024, sse_read, c, NULL);
    if (!resp) return MHD_NO;
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, "text/event-stream");
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CACHE_CONTROL, "no-cache");
    ret = MHD_queue_response(mc, 200, resp);
    MHD_destroy_response(resp);
    return ret;

fail_err:
    alloc_free(ids);
    gen_free(g);
    return server_send_error(mc, &err);
}
