/* OpenAI request bodies -> struct server_gen_request. Pure: no I/O, no engine, no globals, so
 * the fuzzer can call it directly. Every field is type- and range-checked; unknown fields are
 * ignored (OpenAI clients send extras); strings that reach the tokenizer or the stop matcher
 * must be valid UTF-8. */
#include "server/server.h"

#include "grammar/grammar.h"
#include "krserve.h"
#include "util/alloc.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int server_parse_fail(struct server_error *err, const char *param, const char *fmt, ...)
{
    err->status = 400;
    err->type = "invalid_request_error";
    err->code = NULL;
    snprintf(err->param, sizeof err->param, "%s", param ? param : "");
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err->message, sizeof err->message, fmt, ap);
    va_end(ap);
    return KRS_ERR_INVALID;
}

#define fail server_parse_fail

/* The process ran out of memory while parsing: a server error, not the client's. */
static int no_memory(struct server_error *err, const char *param)
{
    fail(err, param, "out of memory");
    err->status = 500;
    err->type = "server_error";
    return KRS_ERR_NOMEM;
}

void server_error_from_req(const struct engine_req_error *re, struct server_error *err)
{
    memset(err, 0, sizeof *err);
    err->status = re->fault == ENGINE_REQ_NO_MEMORY ? 500 : 400;
    err->type = re->fault == ENGINE_REQ_NO_MEMORY ? "server_error" : "invalid_request_error";
    err->code = re->fault == ENGINE_REQ_TOO_LONG ? "context_length_exceeded" : NULL;
    snprintf(err->param, sizeof err->param, "%s", re->field);
    snprintf(err->message, sizeof err->message, "%s", re->reason);
}

static int is_null(const cJSON *v)
{
    return !v || cJSON_IsNull(v);
}

/* A valid-UTF-8 string field or absent/null (*out NULL). */
static int get_string(const cJSON *root, const char *key, const char **out,
                      struct server_error *err)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(root, key);
    *out = NULL;
    if (is_null(v)) return KRS_OK;
    if (!cJSON_IsString(v)) return fail(err, key, "'%s' must be a string", key);
    if (!utf8_valid(v->valuestring, strlen(v->valuestring)))
        return fail(err, key, "'%s' is not valid UTF-8", key);
    *out = v->valuestring;
    return KRS_OK;
}

static int get_bool(const cJSON *root, const char *key, int *out, struct server_error *err)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(root, key);
    if (is_null(v)) return KRS_OK;
    if (!cJSON_IsBool(v)) return fail(err, key, "'%s' must be a boolean", key);
    *out = cJSON_IsTrue(v);
    return KRS_OK;
}

static int get_int(const cJSON *root, const char *key, double lo, double hi, int64_t *out,
                   int *given, struct server_error *err)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(root, key);
    if (given) *given = 0;
    if (is_null(v)) return KRS_OK;
    if (!cJSON_IsNumber(v) || v->valuedouble != floor(v->valuedouble))
        return fail(err, key, "'%s' must be an integer", key);
    double d = v->valuedouble;
    if (d < lo || d > hi)
        return fail(err, key, "'%s' must be between %.0f and %.0f, got %.0f", key, lo, hi, d);
    *out = (int64_t)d;
    if (given) *given = 1;
    return KRS_OK;
}

void server_gen_request_free(struct server_gen_request *r)
{
    if (!r) return;
    if (r->msg_text)
        for (int i = 0; i < r->n_msgs; i++) alloc_free(r->msg_text[i]);
    alloc_free(r->msg_text);
    alloc_free(r->msgs);
    engine_gen_free(&r->gen);
    alloc_free(r->prompt_ids);
    grammar_release(r->grammar);
    alloc_free(r->tool_prompt);
    if (r->root) cJSON_Delete((cJSON *)r->root);
    memset(r, 0, sizeof *r);
}

static int parse_prompt(const cJSON *root, struct server_gen_request *out, struct server_error *err)
{
    const cJSON *p = cJSON_GetObjectItemCaseSensitive(root, "prompt");
    if (is_null(p)) return fail(err, "prompt", "'prompt' is required");
    if (cJSON_IsArray(p) && cJSON_GetArraySize(p) == 1 && cJSON_IsString(p->child)) p = p->child;
    if (cJSON_IsString(p)) {
        size_t n = strlen(p->valuestring);
        if (!utf8_valid(p->valuestring, n))
            return fail(err, "prompt", "'prompt' is not valid UTF-8");
        if (n == 0) return fail(err, "prompt", "'prompt' must not be empty");
        out->prompt = p->valuestring;
        out->prompt_len = n;
        return KRS_OK;
    }
    if (!cJSON_IsArray(p)) return fail(err, "prompt", "'prompt' must be a string or token ids");
    int n = cJSON_GetArraySize(p);
    if (n == 0) return fail(err, "prompt", "'prompt' must not be empty");
    if (cJSON_IsArray(p->child) || cJSON_IsString(p->child))
        return fail(err, "prompt", "only one prompt per request is supported");
    out->prompt_ids = alloc_malloc((size_t)n * sizeof(int32_t));
    if (!out->prompt_ids) return no_memory(err, "prompt");
    int i = 0;
    for (const cJSON *v = p->child; v; v = v->next, i++) {
        if (!cJSON_IsNumber(v) || v->valuedouble != floor(v->valuedouble) || v->valuedouble < 0 ||
            v->valuedouble > INT32_MAX)
            return fail(err, "prompt", "'prompt' token ids must be non-negative integers");
        out->prompt_ids[i] = (int32_t)v->valuedouble;
    }
    out->n_prompt_ids = n;
    return KRS_OK;
}

/* Message content: a string, null, or an array of {type: "text", text} parts (joined). */
static int parse_content(const cJSON *c, int idx, char **joined, const char **out,
                         struct server_error *err)
{
    *joined = NULL;
    if (is_null(c)) {
        *out = "";
        return KRS_OK;
    }
    if (cJSON_IsString(c)) {
        if (!utf8_valid(c->valuestring, strlen(c->valuestring)))
            return fail(err, "messages", "messages[%d].content is not valid UTF-8", idx);
        *out = c->valuestring;
        return KRS_OK;
    }
    if (!cJSON_IsArray(c))
        return fail(err, "messages", "messages[%d].content must be a string or an array", idx);
    size_t total = 0;
    for (const cJSON *part = c->child; part; part = part->next) {
        const cJSON *type = cJSON_GetObjectItemCaseSensitive(part, "type");
        const cJSON *text = cJSON_GetObjectItemCaseSensitive(part, "text");
        if (!cJSON_IsObject(part) || !cJSON_IsString(type) || strcmp(type->valuestring, "text"))
            return fail(err, "messages", "messages[%d].content: only text parts are supported",
                        idx);
        if (!cJSON_IsString(text))
            return fail(err, "messages", "messages[%d].content[].text must be a string", idx);
        size_t n = strlen(text->valuestring);
        if (!utf8_valid(text->valuestring, n))
            return fail(err, "messages", "messages[%d].content is not valid UTF-8", idx);
        total += n;
    }
    char *buf = alloc_malloc(total + 1);
    if (!buf) return no_memory(err, "messages");
    size_t off = 0;
    for (const cJSON *part = c->child; part; part = part->next) {
        const char *t = cJSON_GetObjectItemCaseSensitive(part, "text")->valuestring;
        size_t n = strlen(t);
        memcpy(buf + off, t, n);
        off += n;
    }
    buf[off] = '\0';
    *joined = buf;
    *out = buf;
    return KRS_OK;
}

static int parse_messages(const cJSON *root, struct server_gen_request *out,
                          struct server_error *err)
{
    const cJSON *m = cJSON_GetObjectItemCaseSensitive(root, "messages");
    if (is_null(m)) return fail(err, "messages", "'messages' is required");
    if (!cJSON_IsArray(m)) return fail(err, "messages", "'messages' must be an array");
    int n = cJSON_GetArraySize(m);
    if (n == 0) return fail(err, "messages", "'messages' must not be empty");
    out->msgs = alloc_calloc((size_t)n, sizeof *out->msgs);
    out->msg_text = alloc_calloc((size_t)n, sizeof *out->msg_text);
    if (!out->msgs || !out->msg_text) return no_memory(err, "messages");
    out->n_msgs = n;
    int i = 0;
    for (const cJSON *v = m->child; v; v = v->next, i++) {
        if (!cJSON_IsObject(v)) return fail(err, "messages", "messages[%d] must be an object", i);
        const cJSON *role = cJSON_GetObjectItemCaseSensitive(v, "role");
        if (!cJSON_IsString(role))
            return fail(err, "messages", "messages[%d].role must be a string", i);
        const char *r = role->valuestring;
        if (!utf8_valid(r, strlen(r)))
            return fail(err, "messages", "messages[%d].role is not valid UTF-8", i);
        if (!strcmp(r, "developer")) r = "system";
        char *turn = NULL;
        int rc = server_tool_turn(v, i, &r, &turn, err);
        if (rc) return rc;
        out->msgs[i].role = r;
        if (turn) {
            out->msg_text[i] = turn;
            out->msgs[i].content = turn;
            continue;
        }
        rc = parse_content(cJSON_GetObjectItemCaseSensitive(v, "content"), i, &out->msg_text[i],
                           &out->msgs[i].content, err);
        if (rc) return rc;
    }
    return KRS_OK;
}

/* Puts the tools' description in the system message (a new first message when there is none). */
static int add_tool_prompt(struct server_gen_request *out, struct server_error *err)
{
    int n = out->n_msgs;
    if (n > 0 && !strcmp(out->msgs[0].role, "system")) {
        size_t a = strlen(out->msgs[0].content), b = strlen(out->tool_prompt);
        char *t = alloc_malloc(a + b + 3);
        if (!t) return no_memory(err, "tools");
        memcpy(t, out->msgs[0].content, a);
        memcpy(t + a, "\n\n", 2);
        memcpy(t + a + 2, out->tool_prompt, b + 1);
        alloc_free(out->msg_text[0]);
        out->msg_text[0] = t;
        out->msgs[0].content = t;
        return KRS_OK;
    }
    struct chat_message *m = alloc_calloc((size_t)n + 1, sizeof *m);
    char **mt = alloc_calloc((size_t)n + 1, sizeof *mt);
    if (!m || !mt) {
        alloc_free(m);
        alloc_free(mt);
        return no_memory(err, "tools");
    }
    memcpy(m + 1, out->msgs, (size_t)n * sizeof *m);
    memcpy(mt + 1, out->msg_text, (size_t)n * sizeof *mt);
    m[0].role = "system";
    m[0].content = out->tool_prompt; /* owned by tool_prompt */
    alloc_free(out->msgs);
    alloc_free(out->msg_text);
    out->msgs = m;
    out->msg_text = mt;
    out->n_msgs = n + 1;
    return KRS_OK;
}

static int parse_body(const cJSON *root, enum server_api api, struct server_gen_request *out,
                      struct server_error *err)
{
    int rc, given;
    if (!cJSON_IsObject(root)) return fail(err, NULL, "the request body must be a JSON object");
    if ((rc = get_string(root, "model", &out->model, err))) return rc;
    if (api == SERVER_API_CHAT ? (rc = parse_messages(root, out, err))
                               : (rc = parse_prompt(root, out, err)))
        return rc;

    int64_t iv = 1;
    if ((rc = get_int(root, "n", 1, SERVER_MAX_N, &iv, NULL, err))) return rc;
    out->n = (int)iv;
    if ((rc = get_int(root, "best_of", 1, 1e9, &iv, &given, err))) return rc;
    if (given && iv != 1) return fail(err, "best_of", "only best_of=1 is supported");
    /* Structured output: compiled here, once; anything not applied is refused by name. */
    const char *gparam = NULL;
    char gerr[200];
    if (grammar_from_request(cJSON_GetObjectItemCaseSensitive(root, "response_format"),
                             cJSON_GetObjectItemCaseSensitive(root, "grammar"), &out->grammar,
                             &gparam, gerr, sizeof gerr))
        return fail(err, gparam, "%s", gerr);
    if ((rc = server_parse_tools(root, out, err))) return rc;
    if (out->tool_prompt && (rc = add_tool_prompt(out, err))) return rc;

    if ((rc = get_bool(root, "stream", &out->stream, err))) return rc;
    const cJSON *so = cJSON_GetObjectItemCaseSensitive(root, "stream_options");
    if (!is_null(so)) {
        if (!cJSON_IsObject(so))
            return fail(err, "stream_options", "'stream_options' must be an object");
        if ((rc = get_bool(so, "include_usage", &out->include_usage, err))) return rc;
    }

    /* The shared fields (sampling, seed, stop, logit_bias, max_tokens, priority, timeout...):
     * one reader and one set of ranges for every front end. */
    struct engine_req_error re;
    if (engine_gen_from_json(root, &out->gen, &re)) {
        server_error_from_req(&re, err);
        return KRS_ERR_INVALID;
    }
    struct sampler_params *sp = &out->gen.sampling;

    /* logprobs */
    const cJSON *lp = cJSON_GetObjectItemCaseSensitive(root, "logprobs");
    out->logprobs = api == SERVER_API_CHAT ? 0 : -1;
    if (api == SERVER_API_CHAT) {
        if ((rc = get_bool(root, "logprobs", &out->logprobs, err))) return rc;
        iv = 0;
        if ((rc = get_int(root, "top_logprobs", 0, SAMPLER_MAX_TOP_LOGPROBS, &iv, &given, err)))
            return rc;
        if (given && iv > 0 && !out->logprobs)
            return fail(err, "top_logprobs", "'top_logprobs' requires 'logprobs': true");
        out->top_logprobs = (int)iv;
        sp->n_top_logprobs = out->logprobs ? out->top_logprobs : 0;
    } else if (!is_null(lp)) {
        iv = 0;
        if ((rc = get_int(root, "logprobs", 0, SAMPLER_MAX_TOP_LOGPROBS, &iv, NULL, err)))
            return rc;
        out->logprobs = (int)iv;
        sp->n_top_logprobs = (int32_t)iv;
    }

    return KRS_OK;
}

int server_parse_gen(const char *body, size_t len, enum server_api api,
                     struct server_gen_request *out, struct server_error *err)
{
    memset(out, 0, sizeof *out);
    memset(err, 0, sizeof *err);
    out->api = api;
    engine_gen_init(&out->gen);
    cJSON *root = cJSON_ParseWithLength(body, len);
    if (!root) return fail(err, NULL, "the request body is not valid JSON");
    out->root = root;
    int rc = parse_body(root, api, out, err);
    if (rc) server_gen_request_free(out);
    return rc;
}
