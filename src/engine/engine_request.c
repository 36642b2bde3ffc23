/* The front door (engine.h): one request builder for every front end. It owns the shared
 * generation fields' names, aliases, defaults and ranges, the one context limit and the error
 * vocabulary (field + reason). It must not know about HTTP or JSON-RPC framing, prompts' forms
 * (chat messages, templates) or output options (logprobs, streaming): those stay in the front
 * ends. Pure except engine_limits_of (reads the scheduler and tokenizer). */
#include "engine/engine.h"

#include "krserve.h"
#include "tokenizer/tokenizer.h"
#include "util/alloc.h"
#include "util/utf8.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_LOGIT_BIAS 1024
#define MAX_TOKENS_ASK 1e9 /* sanity bound before the limits are known */

static int fault(struct engine_req_error *err, enum engine_req_fault f, const char *field,
                 const char *fmt, ...) __attribute__((format(printf, 4, 5)));
static int fault(struct engine_req_error *err, enum engine_req_fault f, const char *field,
                 const char *fmt, ...)
{
    err->fault = f;
    snprintf(err->field, sizeof err->field, "%s", field ? field : "");
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err->reason, sizeof err->reason, fmt, ap);
    va_end(ap);
    return f == ENGINE_REQ_NO_MEMORY ? KRS_ERR_NOMEM : KRS_ERR_INVALID;
}

#define bad(err, field, ...) fault(err, ENGINE_REQ_BAD_VALUE, field, __VA_ARGS__)

void engine_gen_init(struct engine_gen *g)
{
    memset(g, 0, sizeof *g);
    g->max_tokens = -1;
    sampler_params_default(&g->sampling);
    g->priority = SCHED_PRIO_DEFAULT;
}

void engine_gen_free(struct engine_gen *g)
{
    if (!g) return;
    alloc_free(g->stop_ids);
    alloc_free(g->bias);
    g->stop_ids = NULL;
    g->bias = NULL;
    g->n_stop_ids = g->n_bias = 0;
    g->sampling.logit_bias = NULL;
    g->sampling.n_logit_bias = 0;
}

int engine_parse_priority(const char *s, enum sched_priority *out)
{
    static const struct {
        const char *name, *alias;
        enum sched_priority p;
    } names[] = {
        {"urgent", "high", SCHED_PRIO_URGENT},
        {"default", "normal", SCHED_PRIO_DEFAULT},
        {"background", "low", SCHED_PRIO_BACKGROUND},
    };
    for (size_t i = 0; s && i < sizeof names / sizeof *names; i++)
        if (!strcmp(s, names[i].name) || !strcmp(s, names[i].alias)) {
            *out = names[i].p;
            return KRS_OK;
        }
    return KRS_ERR_INVALID;
}

/* ---- JSON readers: a status; *given says whether the field was there (absent or null: no,
 * and the output is left alone) ---- */

static const cJSON *field(const cJSON *o, const char *key)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    return v && !cJSON_IsNull(v) ? v : NULL;
}

static int read_number(const cJSON *o, const char *key, float *out, int *given,
                       struct engine_req_error *err)
{
    const cJSON *v = field(o, key);
    *given = v != NULL;
    if (!v) return KRS_OK;
    if (!cJSON_IsNumber(v) || !isfinite(v->valuedouble))
        return bad(err, key, "'%s' must be a number", key);
    *out = (float)v->valuedouble;
    return KRS_OK;
}

/* An integer in [lo, hi]. */
static int read_int(const cJSON *o, const char *key, double lo, double hi, int64_t *out, int *given,
                    struct engine_req_error *err)
{
    const cJSON *v = field(o, key);
    *given = v != NULL;
    if (!v) return KRS_OK;
    if (!cJSON_IsNumber(v) || v->valuedouble != floor(v->valuedouble))
        return bad(err, key, "'%s' must be an integer", key);
    if (v->valuedouble < lo || v->valuedouble > hi)
        return bad(err, key, "'%s' must be between %.0f and %.0f, got %.0f", key, lo, hi,
                   v->valuedouble);
    *out = (int64_t)v->valuedouble;
    return KRS_OK;
}

static int read_bool(const cJSON *o, const char *key, int *out, struct engine_req_error *err)
{
    const cJSON *v = field(o, key);
    if (!v) return KRS_OK;
    if (!cJSON_IsBool(v)) return bad(err, key, "'%s' must be a boolean", key);
    *out = cJSON_IsTrue(v);
    return KRS_OK;
}

/* A token id given as a JSON number or a decimal string (logit_bias keys). */
static int token_id(const cJSON *v, const char *key, int32_t *out, struct engine_req_error *err)
{
    if (!cJSON_IsNumber(v) || v->valuedouble != floor(v->valuedouble) || v->valuedouble < 0 ||
        v->valuedouble > INT32_MAX)
        return bad(err, key, "'%s' must hold token ids (integers >= 0)", key);
    *out = (int32_t)v->valuedouble;
    return KRS_OK;
}

static int read_stop(const cJSON *o, struct engine_gen *g, struct engine_req_error *err)
{
    const cJSON *s = field(o, "stop");
    if (!s) return KRS_OK;
    if (!cJSON_IsString(s) && !cJSON_IsArray(s))
        return bad(err, "stop", "'stop' must be a string or an array of strings");
    if (cJSON_IsArray(s) && cJSON_GetArraySize(s) > SCHED_MAX_STOP)
        return bad(err, "stop", "'stop' takes at most %d strings", SCHED_MAX_STOP);
    const cJSON *one = cJSON_IsArray(s) ? s->child : s;
    for (; one; one = cJSON_IsArray(s) ? one->next : NULL) {
        if (!cJSON_IsString(one)) return bad(err, "stop", "'stop' entries must be strings");
        g->stop[g->n_stop++] = one->valuestring;
    }
    return KRS_OK;
}

static int read_stop_ids(const cJSON *o, struct engine_gen *g, struct engine_req_error *err)
{
    const cJSON *a = field(o, "stop_token_ids");
    if (!a) return KRS_OK;
    if (!cJSON_IsArray(a)) return bad(err, "stop_token_ids", "'stop_token_ids' must be an array");
    int n = cJSON_GetArraySize(a);
    if (n == 0) return KRS_OK;
    g->stop_ids = alloc_malloc((size_t)n * sizeof *g->stop_ids);
    if (!g->stop_ids) return fault(err, ENGINE_REQ_NO_MEMORY, "stop_token_ids", "out of memory");
    const cJSON *v;
    int rc;
    cJSON_ArrayForEach(v, a)
    {
        if ((rc = token_id(v, "stop_token_ids", &g->stop_ids[g->n_stop_ids], err))) return rc;
        g->n_stop_ids++;
    }
    return KRS_OK;
}

static int read_bias(const cJSON *o, struct engine_gen *g, struct engine_req_error *err)
{
    const cJSON *b = field(o, "logit_bias");
    if (!b) return KRS_OK;
    if (!cJSON_IsObject(b))
        return bad(err, "logit_bias", "'logit_bias' must be an object {\"token id\": bias}");
    int n = cJSON_GetArraySize(b);
    if (n == 0) return KRS_OK;
    if (n > MAX_LOGIT_BIAS)
        return bad(err, "logit_bias", "'logit_bias' takes at most %d entries", MAX_LOGIT_BIAS);
    g->bias = alloc_calloc((size_t)n, sizeof *g->bias);
    if (!g->bias) return fault(err, ENGINE_REQ_NO_MEMORY, "logit_bias", "out of memory");
    const cJSON *v;
    cJSON_ArrayForEach(v, b)
    {
        char *end = NULL;
        const char *k = v->string ? v->string : "";
        long id = strtol(k, &end, 10);
        if (!*k || *end || id < 0 || id > INT32_MAX)
            return bad(err, "logit_bias", "'logit_bias' keys must be token ids, got '%s'", k);
        if (!cJSON_IsNumber(v) || !isfinite(v->valuedouble))
            return bad(err, "logit_bias", "'logit_bias' values must be numbers");
        g->bias[g->n_bias].token = (int32_t)id;
        g->bias[g->n_bias].bias = (float)v->valuedouble;
        g->n_bias++;
    }
    g->sampling.logit_bias = g->bias;
    g->sampling.n_logit_bias = g->n_bias;
    return KRS_OK;
}

static int read_timeout(const cJSON *o, struct engine_gen *g, struct engine_req_error *err)
{
    float secs = 0;
    int64_t ms = 0;
    int rc, has_s, has_ms;
    if ((rc = read_number(o, "timeout", &secs, &has_s, err)) ||
        (rc = read_int(o, "timeout_ms", 1, 86400000, &ms, &has_ms, err)))
        return rc;
    if (has_s && has_ms)
        return bad(err, "timeout", "give 'timeout' (seconds) or 'timeout_ms', not both");
    if (has_s) {
        if (!(secs > 0 && secs <= 86400))
            return bad(err, "timeout", "'timeout' must be > 0 and at most 86400 seconds");
        g->timeout_ms = (uint64_t)((double)secs * 1000.0 + 0.5);
        if (!g->timeout_ms) g->timeout_ms = 1;
    }
    if (has_ms) g->timeout_ms = (uint64_t)ms;
    return KRS_OK;
}

int engine_gen_from_json(const cJSON *o, struct engine_gen *g, struct engine_req_error *err)
{
    int rc, given;
    int64_t v;
    struct sampler_params *sp = &g->sampling;
    if (!cJSON_IsObject(o)) return bad(err, NULL, "the parameters must be a JSON object");
    /* max_completion_tokens is OpenAI's newer name; it wins when both are given. */
    const char *mt = field(o, "max_completion_tokens") ? "max_completion_tokens" : "max_tokens";
    if ((rc = read_int(o, mt, -MAX_TOKENS_ASK, MAX_TOKENS_ASK, &v, &given, err))) return rc;
    if (given && v < 1) return bad(err, mt, "'%s' must be at least 1, got %lld", mt, (long long)v);
    if (given) g->max_tokens = (int)v;
    static const struct {
        const char *key;
        size_t off;
    } nums[] = {
        {"temperature", offsetof(struct sampler_params, temperature)},
        {"top_p", offsetof(struct sampler_params, top_p)},
        {"min_p", offsetof(struct sampler_params, min_p)},
        {"repetition_penalty", offsetof(struct sampler_params, repetition_penalty)},
        {"presence_penalty", offsetof(struct sampler_params, presence_penalty)},
        {"frequency_penalty", offsetof(struct sampler_params, frequency_penalty)},
    };
    for (size_t i = 0; i < sizeof nums / sizeof *nums; i++)
        if ((rc = read_number(o, nums[i].key, (float *)((char *)sp + nums[i].off), &given, err)))
            return rc;
    if ((rc = read_int(o, "top_k", 0, INT32_MAX, &v, &given, err))) return rc;
    if (given) sp->top_k = (int32_t)v;
    if ((rc = read_int(o, "repetition_context_size", -1, 1 << 30, &v, &given, err))) return rc;
    if (given) sp->penalty_last_n = (int32_t)v;
    if ((rc = read_int(o, "seed", -9.2e18, 9.2e18, &v, &given, err))) return rc;
    if (given) {
        sp->seed = (uint64_t)v;
        g->has_seed = 1;
    }
    if ((rc = read_stop(o, g, err)) || (rc = read_stop_ids(o, g, err)) ||
        (rc = read_bias(o, g, err)) || (rc = read_bool(o, "ignore_eos", &g->ignore_eos, err)))
        return rc;
    const cJSON *p = field(o, "priority");
    if (p && (!cJSON_IsString(p) || engine_parse_priority(p->valuestring, &g->priority)))
        return bad(err, "priority",
                   "'priority' must be \"urgent\", \"default\" or \"background\" (or \"high\", "
                   "\"normal\", \"low\")");
    if ((rc = read_timeout(o, g, err))) return rc;
    return engine_gen_check(g, err);
}

/* a <= x <= b, with NaN out. */
static int within(float x, float a, float b)
{
    return x >= a && x <= b;
}

int engine_gen_check(const struct engine_gen *g, struct engine_req_error *err)
{
    const struct sampler_params *sp = &g->sampling;
    if (g->max_tokens != -1 && g->max_tokens < 1)
        return bad(err, "max_tokens", "'max_tokens' must be at least 1, got %d", g->max_tokens);
    if (!within(sp->temperature, 0, 2))
        return bad(err, "temperature", "'temperature' must be between 0 and 2, got %g",
                   (double)sp->temperature);
    if (!within(sp->top_p, 0, 1) || sp->top_p <= 0)
        return bad(err, "top_p", "'top_p' must be > 0 and at most 1, got %g", (double)sp->top_p);
    if (sp->top_k < 0) return bad(err, "top_k", "'top_k' must be >= 0, got %d", sp->top_k);
    if (!within(sp->min_p, 0, 1))
        return bad(err, "min_p", "'min_p' must be between 0 and 1, got %g", (double)sp->min_p);
    if (!within(sp->repetition_penalty, 0, 10) || sp->repetition_penalty <= 0)
        return bad(err, "repetition_penalty",
                   "'repetition_penalty' must be > 0 and at most 10, got %g",
                   (double)sp->repetition_penalty);
    if (sp->penalty_last_n < -1)
        return bad(err, "repetition_context_size", "'repetition_context_size' must be >= -1");
    if (!within(sp->presence_penalty, -2, 2))
        return bad(err, "presence_penalty", "'presence_penalty' must be between -2 and 2, got %g",
                   (double)sp->presence_penalty);
    if (!within(sp->frequency_penalty, -2, 2))
        return bad(err, "frequency_penalty", "'frequency_penalty' must be between -2 and 2, got %g",
                   (double)sp->frequency_penalty);
    if (g->n_stop < 0 || g->n_stop > SCHED_MAX_STOP)
        return bad(err, "stop", "'stop' takes at most %d strings", SCHED_MAX_STOP);
    for (int i = 0; i < g->n_stop; i++) {
        size_t n = strlen(g->stop[i]);
        if (n == 0 || n > SCHED_MAX_STOP_LEN)
            return bad(err, "stop", "'stop' strings must be 1 to %d bytes", SCHED_MAX_STOP_LEN);
        if (!utf8_valid(g->stop[i], n)) return bad(err, "stop", "'stop' is not valid UTF-8");
    }
    for (int i = 0; i < g->n_bias; i++)
        if (!within(g->bias[i].bias, -100, 100))
            return bad(err, "logit_bias", "'logit_bias' values must be between -100 and 100");
    if ((unsigned)g->priority > SCHED_PRIO_BACKGROUND)
        return bad(err, "priority", "'priority' is out of range");
    return KRS_OK;
}

void engine_limits_of(struct sched *s, const struct tokenizer *tok, const struct krs_config *cfg,
                      struct engine_limits *out)
{
    memset(out, 0, sizeof *out);
    out->max_ctx = sched_max_ctx(s);
    out->n_vocab = (int)tokenizer_n_vocab(tok);
    if (cfg) {
        out->max_prompt_tokens = cfg->server.max_prompt_tokens;
        out->max_tokens_limit = cfg->server.max_tokens_limit;
        out->timeout_ms = cfg->server.request_timeout_ms;
    }
}

static int ids_in_vocab(const int32_t *ids, int n, int n_vocab, const char *key,
                        struct engine_req_error *err)
{
    for (int i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= n_vocab)
            return bad(err, key, "'%s': token id %d is outside the vocabulary [0, %d)", key, ids[i],
                       n_vocab);
    return KRS_OK;
}

int engine_gen_build(const struct engine_gen *g, const struct engine_limits *lim,
                     const int32_t *prompt, int n_prompt, const char *prompt_field,
                     struct sched_request *out, struct engine_req_error *err)
{
    const char *pf = prompt_field ? prompt_field : "prompt";
    int rc;
    memset(out, 0, sizeof *out);
    if ((rc = engine_gen_check(g, err))) return rc;
    if (!prompt || n_prompt <= 0) return bad(err, pf, "the prompt is empty");
    if ((rc = ids_in_vocab(prompt, n_prompt, lim->n_vocab, pf, err)) ||
        (rc = ids_in_vocab(g->stop_ids, g->n_stop_ids, lim->n_vocab, "stop_token_ids", err)))
        return rc;
    for (int i = 0; i < g->n_bias; i++)
        if (g->bias[i].token >= lim->n_vocab)
            return bad(err, "logit_bias",
                       "'logit_bias': token id %d is outside the vocabulary "
                       "[0, %d)",
                       g->bias[i].token, lim->n_vocab);
    if (lim->max_prompt_tokens > 0 && n_prompt > lim->max_prompt_tokens)
        return fault(err, ENGINE_REQ_TOO_LONG, pf,
                     "the prompt has %d tokens, more than the limit of %d", n_prompt,
                     lim->max_prompt_tokens);
    if (n_prompt >= lim->max_ctx)
        return fault(err, ENGINE_REQ_TOO_LONG, pf,
                     "the prompt has %d tokens; the context length is %d", n_prompt, lim->max_ctx);
    int room = lim->max_ctx - n_prompt, max_tokens = g->max_tokens;
    if (max_tokens > 0) {
        if (lim->max_tokens_limit > 0 && max_tokens > lim->max_tokens_limit)
            return bad(err, "max_tokens", "'max_tokens' %d exceeds the server limit %d", max_tokens,
                       lim->max_tokens_limit);
        if (max_tokens > room)
            return fault(err, ENGINE_REQ_TOO_LONG, "max_tokens",
                         "prompt (%d tokens) + max_tokens (%d) exceeds the context length %d",
                         n_prompt, max_tokens, lim->max_ctx);
    } else {
        max_tokens = lim->default_max_tokens > 0 ? lim->default_max_tokens : room;
        if (lim->max_tokens_limit > 0 && max_tokens > lim->max_tokens_limit)
            max_tokens = lim->max_tokens_limit;
        if (max_tokens > room) max_tokens = room;
    }
    if (lim->timeout_ms > 0 && g->timeout_ms > (uint64_t)lim->timeout_ms)
        return bad(err, "timeout", "the timeout (%llu ms) exceeds the server's %lld ms",
                   (unsigned long long)g->timeout_ms, (long long)lim->timeout_ms);
    out->prompt = prompt;
    out->n_prompt = n_prompt;
    out->max_tokens = max_tokens;
    out->sampling = g->sampling;
    out->has_seed = g->has_seed;
    out->stop_ids = g->stop_ids;
    out->n_stop_ids = g->n_stop_ids;
    for (int i = 0; i < g->n_stop; i++) out->stop[i] = g->stop[i];
    out->n_stop = g->n_stop;
    out->ignore_eos = g->ignore_eos;
    out->priority = g->priority;
    out->timeout_ms =
        g->timeout_ms ? g->timeout_ms : (uint64_t)(lim->timeout_ms > 0 ? lim->timeout_ms : 0);
    return KRS_OK;
}
