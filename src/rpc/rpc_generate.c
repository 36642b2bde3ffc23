/* generate: JSON params -> a scheduler request (prompt or chat messages tokenized, sampling
 * validated against the vocabulary, limits from the configuration), submission, and the
 * non-streaming result. Reading streams and ordering are rpc.c's business; this file must not
 * block. */
#include "rpc/rpc_impl.h"

#include "engine/engine.h"
#include "grammar/grammar.h"
#include "krserve.h"
#include "tokenizer/tokenizer.h"
#include "util/alloc.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define DEFAULT_MAX_TOKENS 256

/* 0 absent (or null), 1 present and a number, -1 present with another type (msg written). */
static int opt_number(const cJSON *p, const char *key, double *out, char *msg, size_t ml)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(p, key);
    if (!v || cJSON_IsNull(v)) return 0;
    if (!cJSON_IsNumber(v) || !isfinite(v->valuedouble)) {
        snprintf(msg, ml, "invalid params: '%s' must be a number", key);
        return -1;
    }
    *out = v->valuedouble;
    return 1;
}

/* As opt_number for integers in [lo, hi]. */
static int opt_int(const cJSON *p, const char *key, double lo, double hi, int64_t *out, char *msg,
                   size_t ml)
{
    double d;
    int r = opt_number(p, key, &d, msg, ml);
    if (r <= 0) return r;
    if (d != floor(d) || d < lo || d > hi) {
        snprintf(msg, ml, "invalid params: '%s' must be an integer in [%.0f, %.0f]", key, lo, hi);
        return -1;
    }
    *out = (int64_t)d;
    return 1;
}

static int opt_bool(const cJSON *p, const char *key, int *out, char *msg, size_t ml)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(p, key);
    if (!v || cJSON_IsNull(v)) return 0;
    if (!cJSON_IsBool(v)) {
        snprintf(msg, ml, "invalid params: '%s' must be a boolean", key);
        return -1;
    }
    *out = cJSON_IsTrue(v);
    return 1;
}

/* Tokenizes text into a fresh array (alloc_free). */
static int encode_alloc(const struct tokenizer *tok, const char *text, size_t len, int add_special,
                        int parse_special, int32_t **ids, size_t *n)
{
    size_t cap = len + 8;
    *ids = NULL;
    for (int attempt = 0; attempt < 2; attempt++) {
        int32_t *buf = alloc_malloc(cap * sizeof *buf);
        if (!buf) return KRS_ERR_NOMEM;
        int rc = tokenizer_encode(tok, text, len, add_special, parse_special, buf, cap, n);
        if (rc == KRS_OK) {
            *ids = buf;
            return KRS_OK;
        }
        alloc_free(buf);
        if (rc != KRS_ERR_FULL) return rc;
        cap = *n + 1;
    }
    return KRS_ERR_INTERNAL;
}

/* Prompt from "prompt" (text or token ids) or "messages" (chat template). */
static int parse_prompt(struct engine *e, const cJSON *p, int32_t **ids, size_t *n, char *msg,
                        size_t ml)
{
    const cJSON *prompt = cJSON_GetObjectItemCaseSensitive(p, "prompt");
    const cJSON *messages = cJSON_GetObjectItemCaseSensitive(p, "messages");
    int rc;
    if (prompt && messages) {
        snprintf(msg, ml, "invalid params: give either 'prompt' or 'messages', not both");
        return RPC_INVALID_PARAMS;
    }
    if (cJSON_IsString(prompt)) {
        rc = encode_alloc(engine_tokenizer(e), prompt->valuestring, strlen(prompt->valuestring), 1,
                          0, ids, n);
        if (rc) {
            snprintf(msg, ml, "tokenizer error: %s", krs_status_str(rc));
            return RPC_TOKENIZER_ERROR;
        }
        return 0;
    }
    if (cJSON_IsArray(prompt)) {
        int cnt = cJSON_GetArraySize(prompt);
        *ids = alloc_malloc((size_t)(cnt ? cnt : 1) * sizeof **ids);
        if (!*ids) {
            snprintf(msg, ml, "out of memory");
            return RPC_INTERNAL;
        }
        int i = 0;
        const cJSON *t;
        cJSON_ArrayForEach(t, prompt)
        {
            /* The vocabulary is the request builder's check (same words as over HTTP). */
            if (!cJSON_IsNumber(t) || t->valuedouble != floor(t->valuedouble) ||
                t->valuedouble < 0 || t->valuedouble > INT32_MAX) {
                snprintf(msg, ml, "invalid params: 'prompt' token ids must be integers >= 0");
                return RPC_INVALID_PARAMS;
            }
            (*ids)[i++] = (int32_t)t->valuedouble;
        }
        *n = (size_t)cnt;
        return 0;
    }
    if (prompt) {
        snprintf(msg, ml, "invalid params: 'prompt' must be a string or an array of token ids");
        return RPC_INVALID_PARAMS;
    }
    if (!cJSON_IsArray(messages) || cJSON_GetArraySize(messages) == 0) {
        snprintf(msg, ml,
                 messages ? "invalid params: 'messages' must be a non-empty array"
                          : "invalid params: 'prompt' or 'messages' is required");
        return RPC_INVALID_PARAMS;
    }
    int cnt = cJSON_GetArraySize(messages);
    struct chat_message *msgs = alloc_calloc((size_t)cnt, sizeof *msgs);
    if (!msgs) {
        snprintf(msg, ml, "out of memory");
        return RPC_INTERNAL;
    }
    int i = 0, code = 0;
    const cJSON *m;
    cJSON_ArrayForEach(m, messages)
    {
        const cJSON *role = cJSON_GetObjectItemCaseSensitive(m, "role");
        const cJSON *content = cJSON_GetObjectItemCaseSensitive(m, "content");
        if (!cJSON_IsString(role) || !cJSON_IsString(content)) {
            snprintf(msg, ml, "invalid params: messages[%d] needs string 'role' and 'content'", i);
            code = RPC_INVALID_PARAMS;
            goto out;
        }
        msgs[i].role = role->valuestring;
        msgs[i].content = content->valuestring;
        i++;
    }
    const cJSON *tmpl = cJSON_GetObjectItemCaseSensitive(p, "chat_template");
    if (tmpl && !cJSON_IsString(tmpl)) {
        snprintf(msg, ml, "invalid params: 'chat_template' must be a template family name");
        code = RPC_INVALID_PARAMS;
        goto out;
    }
    char *text = NULL, err[256] = "";
    size_t tlen = 0;
    rc = chat_apply(engine_tokenizer(e), tmpl ? tmpl->valuestring : NULL, msgs, (size_t)cnt, 1,
                    &text, &tlen, err, sizeof err);
    if (rc) {
        snprintf(msg, ml, "%s: %s", rc == KRS_ERR_INVALID ? "invalid params" : "chat template",
                 *err ? err : krs_status_str(rc));
        code = rc == KRS_ERR_INVALID ? RPC_INVALID_PARAMS : RPC_TOKENIZER_ERROR;
        goto out;
    }
    /* The rendered text carries the template's own BOS: no BOS added, specials parsed. */
    rc = encode_alloc(engine_tokenizer(e), text, tlen, 0, 1, ids, n);
    alloc_free(text);
    if (rc) {
        snprintf(msg, ml, "tokenizer error: %s", krs_status_str(rc));
        code = RPC_TOKENIZER_ERROR;
    }
out:
    alloc_free(msgs);
    return code;
}

/* The JSON-RPC form of a request builder error: -32602 "invalid params: <reason>" (-32603 when
 * out of memory). */
static int req_error(const struct engine_req_error *re, char *msg, size_t ml)
{
    snprintf(
        msg, ml, "%s%s",
        re->fault == ENGINE_REQ_NO_MEMORY ? "internal error: " : "invalid params: ", re->reason);
    return re->fault == ENGINE_REQ_NO_MEMORY ? RPC_INTERNAL : RPC_INVALID_PARAMS;
}

int rpc_generate_parse(struct engine *e, const struct krs_config *cfg, const cJSON *p,
                       struct engine_gen *gen, struct sched_request *req, int32_t **prompt_out,
                       struct rpc_gen_opts *o, char *msg, size_t ml)
{
    memset(req, 0, sizeof *req);
    memset(o, 0, sizeof *o);
    *prompt_out = NULL;
    int code, r, b;
    int64_t v;
    struct engine_req_error re;

    o->streaming = 1;
    if (opt_bool(p, "stream", &o->streaming, msg, ml) < 0) return RPC_INVALID_PARAMS;
    const cJSON *sid = cJSON_GetObjectItemCaseSensitive(p, "stream_id");
    if (sid && !cJSON_IsNull(sid)) {
        if (!cJSON_IsString(sid) || !*sid->valuestring ||
            strlen(sid->valuestring) >= RPC_STREAM_ID_MAX) {
            snprintf(msg, ml, "invalid params: 'stream_id' must be a string of 1 to %d bytes",
                     RPC_STREAM_ID_MAX - 1);
            return RPC_INVALID_PARAMS;
        }
        snprintf(o->stream_id, sizeof o->stream_id, "%s", sid->valuestring);
    }
    /* The shared fields: the engine's request builder (same names, aliases and ranges as the
     * OpenAI endpoints). */
    if (engine_gen_from_json(p, gen, &re)) return req_error(&re, msg, ml);
    b = 0;
    if (opt_bool(p, "logprobs", &b, msg, ml) < 0) return RPC_INVALID_PARAMS;
    o->logprobs = b;
    if ((r = opt_int(p, "top_logprobs", 0, SAMPLER_MAX_TOP_LOGPROBS, &v, msg, ml)) < 0)
        return RPC_INVALID_PARAMS;
    if (r) o->top_logprobs = (int)v;
    if (o->top_logprobs > 0) o->logprobs = 1;
    gen->sampling.n_top_logprobs = o->top_logprobs;
    gen->sampling.skip_logprob = !o->logprobs;
    static const char *const not_here[] = {"tools", "tool_choice"};
    for (size_t i = 0; i < sizeof not_here / sizeof *not_here; i++) {
        const cJSON *x = cJSON_GetObjectItemCaseSensitive(p, not_here[i]);
        if (x && !cJSON_IsNull(x) && !(cJSON_IsArray(x) && !cJSON_GetArraySize(x))) {
            snprintf(msg, ml,
                     "invalid params: '%s' is not supported by generate (tool calling is on "
                     "/v1/chat/completions)",
                     not_here[i]);
            return RPC_INVALID_PARAMS;
        }
    }
    const char *gparam = NULL;
    char gerr[200];
    struct grammar *grammar = NULL;
    if (grammar_from_request(cJSON_GetObjectItemCaseSensitive(p, "response_format"),
                             cJSON_GetObjectItemCaseSensitive(p, "grammar"), &grammar, &gparam,
                             gerr, sizeof gerr)) {
        snprintf(msg, ml, "invalid params: %s", gerr);
        return RPC_INVALID_PARAMS;
    }
    size_t n = 0;
    if ((code = parse_prompt(e, p, prompt_out, &n, msg, ml))) goto fail;
    /* Documented default: 256 tokens (capped by maxTokensLimit and the room in the context). */
    struct engine_limits lim;
    engine_limits_of(engine_sched(e), engine_tokenizer(e), cfg, &lim);
    lim.default_max_tokens = DEFAULT_MAX_TOKENS;
    if (engine_gen_build(gen, &lim, *prompt_out, (int)n,
                         p && cJSON_GetObjectItemCaseSensitive(p, "messages") ? "messages"
                                                                              : "prompt",
                         req, &re)) {
        code = req_error(&re, msg, ml);
        goto fail;
    }
    req->grammar = grammar;
    return 0;
fail:
    grammar_release(grammar);
    return code;
}

void rpc_generate_start(struct rpc_job *job, const cJSON *params, struct rpc_part *part)
{
    struct rpc_ctx *c = job->ctx;
    char msg[512] = "";
    struct sched_request req;
    struct rpc_gen_opts o;
    int32_t *prompt = NULL;
    struct engine_gen gen;
    struct rpc_gen *g = NULL;
    struct sched_stream *st = NULL;
    uint64_t id = 0;
    int code = 0, rc;
    memset(&req, 0, sizeof req);
    engine_gen_init(&gen);

    const cJSON *model = params ? cJSON_GetObjectItemCaseSensitive(params, "model") : NULL;
    if (model && !cJSON_IsNull(model) && !cJSON_IsString(model)) {
        rpc_part_error(part, RPC_INVALID_PARAMS, "invalid params: 'model' must be a string");
        return;
    }
    const char *name = cJSON_IsString(model) ? model->valuestring : NULL;
    struct engine *e = engine_registry_acquire(c->reg, name);
    if (!e) {
        if (name && *name)
            rpc_part_error(part, RPC_MODEL_NOT_LOADED, "model '%s' is not loaded", name);
        else
            rpc_part_error(part, RPC_MODEL_NOT_LOADED, "no model is loaded");
        return;
    }
    if (!params) {
        rpc_part_error(part, RPC_INVALID_PARAMS,
                       "invalid params: 'prompt' or 'messages' is required");
        goto out;
    }
    code = rpc_generate_parse(e, engine_registry_config(c->reg), params, &gen, &req, &prompt, &o,
                              msg, sizeof msg);
    if (code) {
        rpc_part_error(part, code, "%s", *msg ? msg : "out of memory");
        goto out;
    }
    if (!*o.stream_id) rpc_gen_make_id(c, o.stream_id, sizeof o.stream_id);
    g = alloc_calloc(1, sizeof *g);
    if (!g) {
        rpc_part_error(part, RPC_INTERNAL, "out of memory");
        goto out;
    }
    pthread_mutex_init(&g->mu, NULL);
    snprintf(g->stream_id, sizeof g->stream_id, "%s", o.stream_id);
    g->streaming = o.streaming;
    g->logprobs = o.logprobs;
    g->top_logprobs = o.top_logprobs;

    rc = sched_submit(engine_sched(e), &req, &st, &id);
    if (rc) {
        if (rc == KRS_ERR_FULL)
            rpc_part_error(part, RPC_GENERATION_ERROR,
                           "server overloaded: the request queue is full, retry later");
        else if (rc == KRS_ERR_STATE)
            rpc_part_error(part, RPC_GENERATION_ERROR,
                           "model '%s' is not accepting requests (unloading or draining)",
                           engine_name(e));
        else if (rc == KRS_ERR_INVALID)
            rpc_part_error(part, RPC_INVALID_PARAMS,
                           "invalid params: the scheduler refused the request (prompt + "
                           "max_tokens beyond its context of %d tokens, or a parameter out of "
                           "range)",
                           sched_max_ctx(engine_sched(e)));
        else
            rpc_part_error(part, RPC_GENERATION_ERROR, "generation error: %s", krs_status_str(rc));
        goto out;
    }
    g->eng = e;
    g->st = st;
    g->sched_id = id;
    if ((code = rpc_gen_launch(job, g, msg, sizeof msg))) {
        rpc_part_error(part, code, "%s", msg);
        sched_stream_release(st);
        g->eng = NULL;
        goto out;
    }
    e = NULL; /* the generation owns the reference now (released when its stream ends) */
    if (g->streaming) {
        part->code = 0;
        part->result = cJSON_CreateObject();
        cJSON_AddStringToObject(part->result, "stream_id", g->stream_id);
    } else {
        part->gen = g;
    }
    g = NULL; /* owned by the job */
out:
    if (g) {
        pthread_mutex_destroy(&g->mu);
        alloc_free(g);
    }
    alloc_free(prompt);
    engine_gen_free(&gen);
    grammar_release(req.grammar); /* the scheduler holds its own reference */
    engine_release(e);
}

void rpc_generate_result(const struct rpc_gen *g, struct rpc_part *part)
{
    const struct sched_event *f = &g->fin;
    if (f->finish == SCHED_FINISH_ERROR) {
        rpc_part_error(part, RPC_GENERATION_ERROR, "generation error: %s", f->reason);
        return;
    }
    cJSON *text = rpc_json_string(g->text ? g->text : "", g->len);
    if (!text) {
        rpc_part_error(part, RPC_INTERNAL, "out of memory");
        return;
    }
    cJSON *r = cJSON_CreateObject();
    cJSON_AddItemToObject(r, "text", text);
    cJSON_AddStringToObject(r, "finish_reason", sched_finish_name(f->finish));
    if (f->finish == SCHED_FINISH_CANCELLED) cJSON_AddStringToObject(r, "message", f->reason);
    cJSON *u = cJSON_AddObjectToObject(r, "usage");
    cJSON_AddNumberToObject(u, "prompt_tokens", f->n_prompt_tokens);
    cJSON_AddNumberToObject(u, "completion_tokens", f->n_gen_tokens);
    cJSON_AddNumberToObject(u, "total_tokens", f->n_prompt_tokens + f->n_gen_tokens);
    /* OpenAI's field: prompt tokens whose KV came from the prefix cache. */
    cJSON *d = cJSON_AddObjectToObject(u, "prompt_tokens_details");
    if (d) cJSON_AddNumberToObject(d, "cached_tokens", f->n_cached_tokens);
    cJSON_AddStringToObject(r, "stream_id", g->stream_id);
    cJSON *t = cJSON_AddObjectToObject(r, "timing");
    cJSON_AddNumberToObject(t, "ttft_ms", f->ttft_ms);
    cJSON_AddNumberToObject(t, "total_ms", f->total_ms);
    cJSON_AddNumberToObject(t, "queue_ms", f->queue_ms);
    if (g->logprobs)
        cJSON_AddItemToObject(r, "logprobs",
                              g->lp ? cJSON_Duplicate(g->lp, 1) : cJSON_CreateArray());
    part->gen = NULL;
    part->code = 0;
    cJSON_Delete(part->result);
    part->result = r;
}
