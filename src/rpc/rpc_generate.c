/* generate: JSON params -> a scheduler request (prompt or chat messages tokenized, sampling
 * validated against the vocabulary, limits from the configuration), submission, and the
 * non-streaming result. Threads and ordering are rpc.c's business; this file must not block. */
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
        rc = encode_alloc(e->tok, prompt->valuestring, strlen(prompt->valuestring), 1, 0, ids, n);
        if (rc) {
            snprintf(msg, ml, "tokenizer error: %s", krs_status_str(rc));
            return RPC_TOKENIZER_ERROR;
        }
        return 0;
    }
    if (cJSON_IsArray(prompt)) {
        int cnt = cJSON_GetArraySize(prompt);
        uint32_t n_vocab = tokenizer_n_vocab(e->tok);
        *ids = alloc_malloc((size_t)(cnt ? cnt : 1) * sizeof **ids);
        if (!*ids) {
            snprintf(msg, ml, "out of memory");
            return RPC_INTERNAL;
        }
        int i = 0;
        const cJSON *t;
        cJSON_ArrayForEach(t, prompt)
        {
            if (!cJSON_IsNumber(t) || t->valuedouble != floor(t->valuedouble) ||
                t->valuedouble < 0 || t->valuedouble >= n_vocab) {
                snprintf(msg, ml, "invalid params: 'prompt' token ids must be integers in [0, %u)",
                         n_vocab);
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
    rc = chat_apply(e->tok, tmpl ? tmpl->valuestring : NULL, msgs, (size_t)cnt, 1, &text, &tlen,
                    err, sizeof err);
    if (rc) {
        snprintf(msg, ml, "%s: %s", rc == KRS_ERR_INVALID ? "invalid params" : "chat template",
                 *err ? err : krs_status_str(rc));
        code = rc == KRS_ERR_INVALID ? RPC_INVALID_PARAMS : RPC_TOKENIZER_ERROR;
        goto out;
    }
    /* The rendered text carries the template's own BOS: no BOS added, specials parsed. */
    rc = encode_alloc(e->tok, text, tlen, 0, 1, ids, n);
    alloc_free(text);
    if (rc) {
        snprintf(msg, ml, "tokenizer error: %s", krs_status_str(rc));
        code = RPC_TOKENIZER_ERROR;
    }
out:
    alloc_free(msgs);
    return code;
}

static int parse_sampling(const cJSON *p, struct sched_request *req, struct rpc_gen_opts *o,
                          char *msg, size_t ml)
{
    struct sampler_params *sp = &req->sampling;
    double d;
    int64_t v;
    int r;
#define NUM(key, field)                                                                            \
    if ((r = opt_number(p, key, &d, msg, ml)) < 0) return RPC_INVALID_PARAMS;                      \
    if (r) sp->field = (float)d;
    NUM("temperature", temperature);
    NUM("top_p", top_p);
    NUM("min_p", min_p);
    NUM("repetition_penalty", repetition_penalty);
    NUM("presence_penalty", presence_penalty);
    NUM("frequency_penalty", frequency_penalty);
#undef NUM
    if ((r = opt_int(p, "top_k", 0, 2147483647.0, &v, msg, ml)) < 0) return RPC_INVALID_PARAMS;
    if (r) sp->top_k = (int32_t)v;
    if ((r = opt_int(p, "repetition_context_size", -1, 1 << 30, &v, msg, ml)) < 0)
        return RPC_INVALID_PARAMS;
    if (r) sp->penalty_last_n = (int32_t)v;
    if ((r = opt_int(p, "seed", 0, 9007199254740991.0, &v, msg, ml)) < 0) return RPC_INVALID_PARAMS;
    if (r) {
        sp->seed = (uint64_t)v;
        req->has_seed = 1;
    }
    int b = 0;
    if (opt_bool(p, "logprobs", &b, msg, ml) < 0) return RPC_INVALID_PARAMS;
    o->logprobs = b;
    if ((r = opt_int(p, "top_logprobs", 0, SAMPLER_MAX_TOP_LOGPROBS, &v, msg, ml)) < 0)
        return RPC_INVALID_PARAMS;
    if (r) o->top_logprobs = (int)v;
    if (o->top_logprobs > 0) o->logprobs = 1;
    sp->n_top_logprobs = o->top_logprobs;
    sp->skip_logprob = !o->logprobs;
    return 0;
}

static int parse_stop(const cJSON *p, struct sched_request *req, int32_t **stop_ids, char *msg,
                      size_t ml)
{
    const cJSON *stop = cJSON_GetObjectItemCaseSensitive(p, "stop");
    if (cJSON_IsString(stop)) {
        req->stop[0] = stop->valuestring;
        req->n_stop = 1;
    } else if (cJSON_IsArray(stop)) {
        const cJSON *s;
        cJSON_ArrayForEach(s, stop)
        {
            if (!cJSON_IsString(s) || req->n_stop >= SCHED_MAX_STOP) {
                snprintf(msg, ml, "invalid params: 'stop' takes at most %d strings",
                         SCHED_MAX_STOP);
                return RPC_INVALID_PARAMS;
            }
            req->stop[req->n_stop++] = s->valuestring;
        }
    } else if (stop && !cJSON_IsNull(stop)) {
        snprintf(msg, ml, "invalid params: 'stop' must be a string or an array of strings");
        return RPC_INVALID_PARAMS;
    }
    for (int i = 0; i < req->n_stop; i++) {
        size_t n = strlen(req->stop[i]);
        if (n == 0 || n > SCHED_MAX_STOP_LEN) {
            snprintf(msg, ml, "invalid params: stop strings must be 1 to %d bytes",
                     SCHED_MAX_STOP_LEN);
            return RPC_INVALID_PARAMS;
        }
    }
    const cJSON *ids = cJSON_GetObjectItemCaseSensitive(p, "stop_token_ids");
    if (ids && !cJSON_IsNull(ids)) {
        if (!cJSON_IsArray(ids)) {
            snprintf(msg, ml, "invalid params: 'stop_token_ids' must be an array of token ids");
            return RPC_INVALID_PARAMS;
        }
        int cnt = cJSON_GetArraySize(ids);
        *stop_ids = alloc_malloc((size_t)(cnt ? cnt : 1) * sizeof **stop_ids);
        if (!*stop_ids) return RPC_INTERNAL;
        const cJSON *t;
        cJSON_ArrayForEach(t, ids)
        {
            if (!cJSON_IsNumber(t) || t->valuedouble != floor(t->valuedouble) ||
                t->valuedouble < 0 || t->valuedouble > 2147483647.0) {
                snprintf(msg, ml, "invalid params: 'stop_token_ids' must be token ids");
                return RPC_INVALID_PARAMS;
            }
            (*stop_ids)[req->n_stop_ids++] = (int32_t)t->valuedouble;
        }
        req->stop_ids = *stop_ids;
    }
    return 0;
}

/* logit_bias: {"token id": bias, ...} (OpenAI). */
static int parse_bias(const cJSON *p, struct sched_request *req, struct sampler_logit_bias **out,
                      char *msg, size_t ml)
{
    const cJSON *lb = cJSON_GetObjectItemCaseSensitive(p, "logit_bias");
    if (!lb || cJSON_IsNull(lb)) return 0;
    if (!cJSON_IsObject(lb)) {
        snprintf(msg, ml, "invalid params: 'logit_bias' must be an object {token_id: bias}");
        return RPC_INVALID_PARAMS;
    }
    int cnt = cJSON_GetArraySize(lb);
    *out = alloc_malloc((size_t)(cnt ? cnt : 1) * sizeof **out);
    if (!*out) return RPC_INTERNAL;
    int i = 0;
    const cJSON *b;
    cJSON_ArrayForEach(b, lb)
    {
        char *end = NULL;
        long id = strtol(b->string, &end, 10);
        if (!*b->string || *end || id < 0 || id > 2147483647L || !cJSON_IsNumber(b) ||
            !isfinite(b->valuedouble)) {
            snprintf(msg, ml, "invalid params: bad logit_bias entry '%s'", b->string);
            return RPC_INVALID_PARAMS;
        }
        (*out)[i].token = (int32_t)id;
        (*out)[i].bias = (float)b->valuedouble;
        i++;
    }
    req->sampling.logit_bias = *out;
    req->sampling.n_logit_bias = i;
    return 0;
}

int rpc_generate_parse(struct engine *e, const struct krs_config *cfg, const cJSON *p,
                       struct sched_request *req, int32_t **prompt_out,
                       struct sampler_logit_bias **bias_out, int32_t **stop_ids_out,
                       struct rpc_gen_opts *o, char *msg, size_t ml)
{
    memset(req, 0, sizeof *req);
    memset(o, 0, sizeof *o);
    *prompt_out = NULL, *bias_out = NULL, *stop_ids_out = NULL;
    sampler_params_default(&req->sampling);
    req->priority = SCHED_PRIO_DEFAULT;
    int code, r, b;
    int64_t v;

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
    req->max_tokens = cfg->server.max_tokens_limit < DEFAULT_MAX_TOKENS
                          ? cfg->server.max_tokens_limit
                          : DEFAULT_MAX_TOKENS;
    if ((r = opt_int(p, "max_tokens", 1, cfg->server.max_tokens_limit, &v, msg, ml)) < 0)
        return RPC_INVALID_PARAMS;
    if (r) req->max_tokens = (int)v;
    if ((code = parse_sampling(p, req, o, msg, ml))) return code;
    if ((code = parse_stop(p, req, stop_ids_out, msg, ml))) return code;
    if ((code = parse_bias(p, req, bias_out, msg, ml))) return code;
    b = 0;
    if (opt_bool(p, "ignore_eos", &b, msg, ml) < 0) return RPC_INVALID_PARAMS;
    req->ignore_eos = b;
    const cJSON *prio = cJSON_GetObjectItemCaseSensitive(p, "priority");
    if (prio && !cJSON_IsNull(prio)) {
        enum sched_priority pr;
        const char *s = cJSON_IsString(prio) ? prio->valuestring : "";
        if (!strcmp(s, "high")) s = "urgent";
        if (!strcmp(s, "normal")) s = "default";
        if (!strcmp(s, "low")) s = "background";
        if (sched_parse_priority(s, &pr)) {
            snprintf(msg, ml,
                     "invalid params: 'priority' must be \"urgent\", \"default\" or "
                     "\"background\"");
            return RPC_INVALID_PARAMS;
        }
        req->priority = pr;
    }
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
    if (grammar_from_request(cJSON_GetObjectItemCaseSensitive(p, "response_format"),
                             cJSON_GetObjectItemCaseSensitive(p, "grammar"), &req->grammar, &gparam,
                             gerr, sizeof gerr)) {
        snprintf(msg, ml, "invalid params: %s", gerr);
        return RPC_INVALID_PARAMS;
    }
    req->timeout_ms = (uint64_t)cfg->server.request_timeout_ms;
    if ((r = opt_int(p, "timeout_ms", 1, (double)cfg->server.request_timeout_ms, &v, msg, ml)) < 0)
        return RPC_INVALID_PARAMS;
    if (r) req->timeout_ms = (uint64_t)v;

    /* Sampling values checked against the vocabulary before anything is tokenized. */
    struct sampler probe;
    if (sampler_init(&probe, &req->sampling, (int32_t)tokenizer_n_vocab(e->tok))) {
        snprintf(msg, ml,
                 "invalid params: sampling parameters out of range (temperature >= 0, top_p in "
                 "(0, 1], min_p in [0, 1], repetition_penalty > 0, logit_bias ids in the "
                 "vocabulary)");
        return RPC_INVALID_PARAMS;
    }
    size_t n = 0;
    if ((code = parse_prompt(e, p, prompt_out, &n, msg, ml))) return code;
    if (n == 0) {
        snprintf(msg, ml, "invalid params: the prompt is empty");
        return RPC_INVALID_PARAMS;
    }
    if (n > (size_t)cfg->server.max_prompt_tokens) {
        snprintf(msg, ml, "invalid params: prompt has %zu tokens, the limit is %d", n,
                 cfg->server.max_prompt_tokens);
        return RPC_INVALID_PARAMS;
    }
    req->prompt = *prompt_out;
    req->n_prompt = (int)n;
    return 0;
}

void rpc_generate_start(struct rpc_job *job, const cJSON *params, struct rpc_part *part)
{
    struct rpc_ctx *c = job->ctx;
    char msg[512] = "";
    struct sched_request req;
    struct rpc_gen_opts o;
    int32_t *prompt = NULL, *stop_ids = NULL;
    struct sampler_logit_bias *bias = NULL;
    struct rpc_gen *g = NULL;
    struct sched_stream *st = NULL;
    uint64_t id = 0;
    int code = 0, rc;
    memset(&req, 0, sizeof req);

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
    code = rpc_generate_parse(e, engine_registry_config(c->reg), params, &req, &prompt, &bias,
                              &stop_ids, &o, msg, sizeof msg);
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

    rc = sched_submit(e->sched, &req, &st, &id);
    if (rc) {
        if (rc == KRS_ERR_FULL)
            rpc_part_error(part, RPC_GENERATION_ERROR,
                           "server overloaded: the request queue is full, retry later");
        else if (rc == KRS_ERR_STATE)
            rpc_part_error(part, RPC_GENERATION_ERROR,
                           "model '%s' is not accepting requests (unloading or draining)", e->name);
        else if (rc == KRS_ERR_INVALID)
            rpc_part_error(part, RPC_INVALID_PARAMS,
                           "invalid params: prompt (%d tokens) + max_tokens do not fit the "
                           "context, or a parameter is out of range",
                           req.n_prompt);
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
    e = NULL; /* the generation thread owns the reference now */
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
    alloc_free(bias);
    alloc_free(stop_ids);
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
    cJSON *r = cJSON_CreateObject();
    cJSON_AddItemToObject(r, "text", rpc_json_string(g->text ? g->text : "", g->len));
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
