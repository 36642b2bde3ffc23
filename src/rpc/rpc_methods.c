/* The method table and every method except generate's internals: runtime/info, runtime/state,
 * generate and batch_generate (fan-out to rpc_generate.c), cancel, tokenize, detokenize,
 * load_model, unload_model. Each handler fills its slot's parts; none blocks on a stream. */
#include "rpc/rpc_impl.h"

#include "engine/engine.h"
#include "krserve.h"
#include "tokenizer/tokenizer.h"
#include "util/alloc.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

static const char *const capabilities[] = {
    "generate",   "batch_generate", "stream",       "cancel", "tokenize",
    "detokenize", "load_model",     "unload_model", "chat",   "logprobs",
    "priority",   "stop",           "logit_bias",   "seed",   "state",
};

static void set_result(struct rpc_slot *s, cJSON *r)
{
    s->parts[0].code = 0;
    s->parts[0].result = r;
}

/* The engine for params.model (NULL/absent = the default model) or an error in the slot. */
static struct engine *acquire(struct rpc_job *job, struct rpc_slot *s, const cJSON *params)
{
    const cJSON *m = params ? cJSON_GetObjectItemCaseSensitive(params, "model") : NULL;
    if (m && !cJSON_IsNull(m) && !cJSON_IsString(m)) {
        rpc_part_error(&s->parts[0], RPC_INVALID_PARAMS,
                       "invalid params: 'model' must be a string");
        return NULL;
    }
    const char *name = cJSON_IsString(m) ? m->valuestring : NULL;
    struct engine *e = engine_registry_acquire(job->ctx->reg, name);
    if (!e) {
        if (name && *name)
            rpc_part_error(&s->parts[0], RPC_MODEL_NOT_LOADED, "model '%s' is not loaded", name);
        else
            rpc_part_error(&s->parts[0], RPC_MODEL_NOT_LOADED, "no model is loaded");
    }
    return e;
}

static void m_info(struct rpc_job *job, struct rpc_slot *s, const cJSON *params)
{
    (void)params;
    char names[ENGINE_MAX_MODELS][ENGINE_NAME_MAX];
    int n = engine_registry_list(job->ctx->reg, names, ENGINE_MAX_MODELS);
    if (n > ENGINE_MAX_MODELS) n = ENGINE_MAX_MODELS;
    const struct krs_config *cfg = engine_registry_config(job->ctx->reg);
    cJSON *r = cJSON_CreateObject();
    cJSON_AddStringToObject(r, "version", krs_version());
    cJSON_AddStringToObject(r, "protocol", "json-rpc-2.0");
    if (n > 0)
        cJSON_AddStringToObject(r, "model", names[0]);
    else
        cJSON_AddNullToObject(r, "model");
    cJSON *models = cJSON_AddArrayToObject(r, "models");
    for (int i = 0; i < n; i++) cJSON_AddItemToArray(models, cJSON_CreateString(names[i]));
    cJSON *caps = cJSON_AddArrayToObject(r, "capabilities");
    for (size_t i = 0; i < sizeof capabilities / sizeof *capabilities; i++)
        cJSON_AddItemToArray(caps, cJSON_CreateString(capabilities[i]));
    cJSON *lim = cJSON_AddObjectToObject(r, "limits");
    cJSON_AddNumberToObject(lim, "max_tokens", cfg->server.max_tokens_limit);
    cJSON_AddNumberToObject(lim, "max_prompt_tokens", cfg->server.max_prompt_tokens);
    cJSON_AddNumberToObject(lim, "max_stop", SCHED_MAX_STOP);
    cJSON_AddNumberToObject(lim, "max_top_logprobs", SAMPLER_MAX_TOP_LOGPROBS);
    cJSON_AddNumberToObject(lim, "max_models", ENGINE_MAX_MODELS);
    set_result(s, r);
}

static void m_state(struct rpc_job *job, struct rpc_slot *s, const cJSON *params)
{
    (void)params;
    char names[ENGINE_MAX_MODELS][ENGINE_NAME_MAX];
    int n = engine_registry_list(job->ctx->reg, names, ENGINE_MAX_MODELS);
    if (n > ENGINE_MAX_MODELS) n = ENGINE_MAX_MODELS;
    cJSON *r = cJSON_CreateObject();
    cJSON_AddNumberToObject(r, "active_streams", rpc_active_streams(job->ctx));
    cJSON *arr = cJSON_AddArrayToObject(r, "models");
    for (int i = 0; i < n; i++) {
        struct engine *e = engine_registry_acquire(job->ctx->reg, names[i]);
        if (!e) continue; /* unloaded meanwhile */
        struct sched_state st;
        sched_get_state(engine_sched(e), &st);
        cJSON *m = cJSON_CreateObject();
        cJSON_AddStringToObject(m, "model", engine_name(e));
        cJSON_AddStringToObject(m, "mode", sched_mode_name(st.mode));
        cJSON_AddNumberToObject(m, "batch_limit", st.batch_limit);
        cJSON_AddNumberToObject(m, "running", st.running);
        cJSON *q = cJSON_AddObjectToObject(m, "queued");
        for (int p = 0; p < 3; p++)
            cJSON_AddNumberToObject(q, sched_priority_name((enum sched_priority)p), st.queued[p]);
        cJSON_AddNumberToObject(m, "steps", (double)st.steps);
        cJSON_AddNumberToObject(m, "submitted", (double)st.submitted);
        cJSON *f = cJSON_AddObjectToObject(m, "finished");
        for (int k = 1; k < 5; k++)
            cJSON_AddNumberToObject(f, sched_finish_name((enum sched_finish)k),
                                    (double)st.finished[k]);
        cJSON_AddNumberToObject(m, "preemptions", (double)st.preemptions);
        cJSON_AddNumberToObject(m, "kv_blocks_total", (double)st.kv_blocks_total);
        cJSON_AddNumberToObject(m, "kv_blocks_free", (double)st.kv_blocks_free);
        cJSON_AddNumberToObject(m, "window_ms", st.window_ms);
        cJSON_AddBoolToObject(m, "idle", st.idle);
        cJSON_AddBoolToObject(m, "draining", st.draining);
        cJSON_AddItemToArray(arr, m);
        engine_release(e);
    }
    set_result(s, r);
}

static void m_generate(struct rpc_job *job, struct rpc_slot *s, const cJSON *params)
{
    rpc_generate_start(job, params, &s->parts[0]);
}

static void m_batch_generate(struct rpc_job *job, struct rpc_slot *s, const cJSON *params)
{
    const cJSON *reqs = params ? cJSON_GetObjectItemCaseSensitive(params, "requests") : NULL;
    if (!cJSON_IsArray(reqs) || cJSON_GetArraySize(reqs) == 0) {
        rpc_part_error(&s->parts[0], RPC_INVALID_PARAMS,
                       "invalid params: 'requests' must be a non-empty array");
        return;
    }
    int n = cJSON_GetArraySize(reqs);
    struct rpc_part *parts = alloc_calloc((size_t)n, sizeof *parts);
    if (!parts) {
        rpc_part_error(&s->parts[0], RPC_INTERNAL, "out of memory");
        return;
    }
    alloc_free(s->parts);
    s->parts = parts;
    s->n_parts = n;
    s->batch_gen = 1;
    /* Every item is submitted before any is awaited: they run in the same scheduler batches. */
    int i = 0;
    const cJSON *item;
    cJSON_ArrayForEach(item, reqs)
    {
        struct rpc_part *p = &parts[i++];
        if (!cJSON_IsObject(item)) {
            rpc_part_error(p, RPC_INVALID_PARAMS, "invalid params: each request must be an object");
            continue;
        }
        /* Items default to non-streaming; "stream": true streams that item. */
        const cJSON *st = cJSON_GetObjectItemCaseSensitive(item, "stream");
        if (st) {
            rpc_generate_start(job, item, p);
        } else {
            cJSON *copy = cJSON_Duplicate(item, 1);
            if (!copy) {
                rpc_part_error(p, RPC_INTERNAL, "out of memory");
                continue;
            }
            cJSON_AddFalseToObject(copy, "stream");
            rpc_generate_start(job, copy, p);
            cJSON_Delete(copy);
        }
    }
}

static void m_cancel(struct rpc_job *job, struct rpc_slot *s, const cJSON *params)
{
    const cJSON *sid = params ? cJSON_GetObjectItemCaseSensitive(params, "stream_id") : NULL;
    if (!cJSON_IsString(sid)) {
        rpc_part_error(&s->parts[0], RPC_INVALID_PARAMS,
                       "invalid params: 'stream_id' (string) is required");
        return;
    }
    char msg[256];
    int code = rpc_cancel_stream(job->ctx, sid->valuestring, msg, sizeof msg);
    if (code) {
        rpc_part_error(&s->parts[0], code, "%s", msg);
        return;
    }
    cJSON *r = cJSON_CreateObject();
    cJSON_AddTrueToObject(r, "cancelled");
    cJSON_AddStringToObject(r, "stream_id", sid->valuestring);
    set_result(s, r);
}

static int get_flag(const cJSON *params, const char *key, int def, int *out, struct rpc_slot *s)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(params, key);
    *out = def;
    if (!v || cJSON_IsNull(v)) return 0;
    if (!cJSON_IsBool(v)) {
        rpc_part_error(&s->parts[0], RPC_INVALID_PARAMS, "invalid params: '%s' must be a boolean",
                       key);
        return -1;
    }
    *out = cJSON_IsTrue(v);
    return 0;
}

static void m_tokenize(struct rpc_job *job, struct rpc_slot *s, const cJSON *params)
{
    const cJSON *text = params ? cJSON_GetObjectItemCaseSensitive(params, "text") : NULL;
    if (!cJSON_IsString(text)) {
        rpc_part_error(&s->parts[0], RPC_INVALID_PARAMS,
                       "invalid params: 'text' (string) is required");
        return;
    }
    int add_special, parse_special;
    if (get_flag(params, "add_special", 1, &add_special, s) ||
        get_flag(params, "parse_special", 0, &parse_special, s))
        return;
    struct engine *e = acquire(job, s, params);
    if (!e) return;
    size_t len = strlen(text->valuestring), cap = len + 8, n = 0;
    int32_t *ids = alloc_malloc(cap * sizeof *ids);
    int rc = ids ? tokenizer_encode(engine_tokenizer(e), text->valuestring, len, add_special,
                                    parse_special, ids, cap, &n)
                 : KRS_ERR_NOMEM;
    if (rc == KRS_ERR_FULL) {
        alloc_free(ids);
        cap = n;
        ids = alloc_malloc(cap * sizeof *ids);
        rc = ids ? tokenizer_encode(engine_tokenizer(e), text->valuestring, len, add_special,
                                    parse_special, ids, cap, &n)
                 : KRS_ERR_NOMEM;
    }
    if (rc) {
        rpc_part_error(&s->parts[0], RPC_TOKENIZER_ERROR, "tokenizer error: %s",
                       krs_status_str(rc));
    } else {
        cJSON *r = cJSON_CreateObject();
        cJSON *arr = cJSON_AddArrayToObject(r, "tokens");
        for (size_t i = 0; i < n; i++) cJSON_AddItemToArray(arr, cJSON_CreateNumber(ids[i]));
        cJSON_AddNumberToObject(r, "count", (double)n);
        cJSON_AddStringToObject(r, "model", engine_name(e));
        set_result(s, r);
    }
    alloc_free(ids);
    engine_release(e);
}

static void m_detokenize(struct rpc_job *job, struct rpc_slot *s, const cJSON *params)
{
    const cJSON *toks = params ? cJSON_GetObjectItemCaseSensitive(params, "tokens") : NULL;
    if (!cJSON_IsArray(toks)) {
        rpc_part_error(&s->parts[0], RPC_INVALID_PARAMS,
                       "invalid params: 'tokens' (array of token ids) is required");
        return;
    }
    int render_special;
    if (get_flag(params, "render_special", 0, &render_special, s)) return;
    struct engine *e = acquire(job, s, params);
    if (!e) return;
    int n = cJSON_GetArraySize(toks);
    uint32_t n_vocab = tokenizer_n_vocab(engine_tokenizer(e));
    int32_t *ids = alloc_malloc((size_t)(n ? n : 1) * sizeof *ids);
    char *buf = NULL;
    if (!ids) {
        rpc_part_error(&s->parts[0], RPC_INTERNAL, "out of memory");
        goto out;
    }
    int i = 0;
    const cJSON *t;
    cJSON_ArrayForEach(t, toks)
    {
        if (!cJSON_IsNumber(t) || t->valuedouble != floor(t->valuedouble) || t->valuedouble < 0 ||
            t->valuedouble >= n_vocab) {
            rpc_part_error(&s->parts[0], RPC_INVALID_PARAMS,
                           "invalid params: tokens must be integers in [0, %u)", n_vocab);
            goto out;
        }
        ids[i++] = (int32_t)t->valuedouble;
    }
    size_t need = 0, cap = (size_t)n * 16 + 16;
    buf = alloc_malloc(cap);
    int rc =
        buf ? tokenizer_decode(engine_tokenizer(e), ids, (size_t)n, render_special, buf, cap, &need)
            : KRS_ERR_NOMEM;
    if (rc == KRS_ERR_FULL) {
        alloc_free(buf);
        cap = need + 1;
        buf = alloc_malloc(cap);
        rc = buf ? tokenizer_decode(engine_tokenizer(e), ids, (size_t)n, render_special, buf, cap,
                                    &need)
                 : KRS_ERR_NOMEM;
    }
    if (rc) {
        rpc_part_error(&s->parts[0], RPC_TOKENIZER_ERROR, "tokenizer error: %s",
                       krs_status_str(rc));
        goto out;
    }
    cJSON *r = cJSON_CreateObject();
    cJSON_AddItemToObject(r, "text", rpc_json_string(buf, need));
    cJSON_AddStringToObject(r, "model", engine_name(e));
    set_result(s, r);
out:
    alloc_free(buf);
    alloc_free(ids);
    engine_release(e);
}

static void m_load_model(struct rpc_job *job, struct rpc_slot *s, const cJSON *params)
{
    const cJSON *path = params ? cJSON_GetObjectItemCaseSensitive(params, "path") : NULL;
    const cJSON *name = params ? cJSON_GetObjectItemCaseSensitive(params, "name") : NULL;
    if (!path) path = params ? cJSON_GetObjectItemCaseSensitive(params, "model") : NULL;
    if (!cJSON_IsString(path) || !*path->valuestring ||
        (name && !cJSON_IsNull(name) && !cJSON_IsString(name))) {
        rpc_part_error(&s->parts[0], RPC_INVALID_PARAMS,
                       "invalid params: 'path' (file name in the model directory) is required, "
                       "'name' must be a string");
        return;
    }
    const char *id = cJSON_IsString(name) && *name->valuestring ? name->valuestring : NULL;
    char err[512] = "";
    int rc = engine_registry_load(job->ctx->reg, id, path->valuestring, 1, err, sizeof err);
    if (rc) {
        rpc_part_error(
            &s->parts[0], rc == KRS_ERR_INVALID ? RPC_INVALID_PARAMS : RPC_MODEL_LOAD_ERROR,
            "cannot load model '%s': %s", path->valuestring, *err ? err : krs_status_str(rc));
        return;
    }
    /* The id the registry used: name, else the file stem. */
    char stem[ENGINE_NAME_MAX];
    if (!id) {
        const char *base = strrchr(path->valuestring, '/');
        snprintf(stem, sizeof stem, "%s", base ? base + 1 : path->valuestring);
        char *dot = strrchr(stem, '.');
        if (dot && !strcmp(dot, ".gguf")) *dot = '\0';
        id = stem;
    }
    cJSON *r = cJSON_CreateObject();
    cJSON_AddTrueToObject(r, "loaded");
    cJSON_AddStringToObject(r, "model", id);
    set_result(s, r);
}

static void m_unload_model(struct rpc_job *job, struct rpc_slot *s, const cJSON *params)
{
    const cJSON *name = params ? cJSON_GetObjectItemCaseSensitive(params, "name") : NULL;
    if (!name) name = params ? cJSON_GetObjectItemCaseSensitive(params, "model") : NULL;
    if (!cJSON_IsString(name) || !*name->valuestring) {
        rpc_part_error(&s->parts[0], RPC_INVALID_PARAMS,
                       "invalid params: 'name' (model id) is required");
        return;
    }
    int rc = engine_registry_unload(job->ctx->reg, name->valuestring);
    if (rc) {
        rpc_part_error(&s->parts[0], RPC_MODEL_NOT_LOADED, "model '%s' is not loaded",
                       name->valuestring);
        return;
    }
    cJSON *r = cJSON_CreateObject();
    cJSON_AddTrueToObject(r, "unloaded");
    cJSON_AddStringToObject(r, "model", name->valuestring);
    set_result(s, r);
}

static const struct {
    const char *name;
    void (*fn)(struct rpc_job *, struct rpc_slot *, const cJSON *);
} methods[] = {
    {"batch_generate", m_batch_generate}, {"cancel", m_cancel},
    {"detokenize", m_detokenize},         {"generate", m_generate},
    {"load_model", m_load_model},         {"runtime/info", m_info},
    {"runtime/state", m_state},           {"tokenize", m_tokenize},
    {"unload_model", m_unload_model},
};

void rpc_dispatch(struct rpc_job *job, struct rpc_slot *slot, const char *name, const cJSON *params)
{
    for (size_t i = 0; i < sizeof methods / sizeof *methods; i++)
        if (!strcmp(methods[i].name, name)) {
            methods[i].fn(job, slot, params);
            return;
        }
    rpc_part_error(&slot->parts[0], RPC_METHOD_NOT_FOUND, "method not found: %.200s", name);
}
