/* Everything but generation: monitoring (/metrics, /health, /ready, /stats), /v1/models,
 * /tokenize and /detokenize, admin (/admin/scheduler, /admin/models/load|unload) and JSON-RPC
 * over HTTP (/rpc). These handlers answer at once, except /rpc, whose message is handled here
 * (rpc_handle_async) and whose streams the rpc ctx's pump reads while the connection waits
 * suspended until the message is done, and the model loads, which take the calling MHD thread
 * for the load. */
#include "server/server_impl.h"

#include "controller/controller.h"
#include "engine/engine.h"
#include "krserve.h"
#include "metrics/metrics.h"
#include "rpc/rpc.h"
#include "sched/sched.h"
#include "tokenizer/tokenizer.h"
#include "util/alloc.h"
#include "util/clock.h"
#include "util/log.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

#define HEALTH_STALE_NS 2000000000ull
/* A step in progress may take far longer than a loop iteration (a 512-token prompt chunk on a
 * loaded CPU: seconds); the engine counts as stuck only past this. */
#define HEALTH_STEP_NS 120000000000ull

static enum MHD_Result bad_request(struct MHD_Connection *mc, const char *param, const char *msg)
{
    return server_send_errorf(mc, 400, "invalid_request_error", NULL, param, "%s", msg);
}

/* Parses the body as a JSON object; on failure sends 400 and returns NULL with *ret set. */
static cJSON *body_object(struct server_conn *c, enum MHD_Result *ret)
{
    cJSON *j = cJSON_ParseWithLength(c->body, c->body_len);
    if (!j || !cJSON_IsObject(j)) {
        cJSON_Delete(j);
        *ret = bad_request(c->mc, NULL, "the request body must be a JSON object");
        return NULL;
    }
    return j;
}

/* An optional string member; 0 when absent or a valid string, -1 (400 sent) otherwise. */
static int opt_string(struct server_conn *c, cJSON *j, const char *key, const char **out,
                      enum MHD_Result *ret)
{
    cJSON *v = cJSON_GetObjectItemCaseSensitive(j, key);
    *out = NULL;
    if (!v || cJSON_IsNull(v)) return 0;
    if (!cJSON_IsString(v) || !utf8_valid(v->valuestring, strlen(v->valuestring))) {
        char msg[96];
        snprintf(msg, sizeof msg, "'%s' must be a UTF-8 string", key);
        *ret = bad_request(c->mc, key, msg);
        return -1;
    }
    *out = v->valuestring;
    return 0;
}

static struct engine *acquire_or_404(struct server_conn *c, const char *model, enum MHD_Result *ret)
{
    struct engine *e = engine_registry_acquire(c->srv->reg, model);
    if (!e && engine_registry_loading(c->srv->reg) > 0)
        *ret = server_send_errorf(c->mc, 503, "server_error", "model_loading", NULL,
                                  "a model is loading; retry shortly");
    else if (!e)
        *ret = server_send_errorf(c->mc, 404, "invalid_request_error", "model_not_found", "model",
                                  "the model '%s' does not exist", model ? model : "(default)");
    return e;
}

/* ---- monitoring ---------------------------------------------------------------------------- */

_Static_assert(ENGINE_MAX_MODELS <= METRICS_MAX_MODELS, "one metrics label per served model");

/* Every loaded model's collector in one exposition, each series labelled model="id". */
enum MHD_Result server_ops_metrics(struct server_conn *c)
{
    struct server *s = c->srv;
    char names[ENGINE_MAX_MODELS][ENGINE_NAME_MAX];
    struct engine *engs[ENGINE_MAX_MODELS];
    struct metrics *ms[ENGINE_MAX_MODELS];
    const char *ids[ENGINE_MAX_MODELS];
    int n = 0, listed = engine_registry_list(s->reg, names, ENGINE_MAX_MODELS);
    for (int i = 0; i < listed; i++) {
        struct engine *e = engine_registry_acquire(s->reg, names[i]);
        if (!e) continue; /* unloaded meanwhile */
        engs[n] = e;
        ms[n] = engine_metrics(e);
        ids[n] = engine_name(e);
        n++;
    }
    size_t cap = 64 * 1024 * (size_t)(n ? n : 1), len = 0;
    char *buf = alloc_malloc(cap);
    int rc = buf ? metrics_render_prometheus_models(ms, ids, n, clock_now_ns(), buf, cap, &len)
                 : KRS_ERR_NOMEM;
    if (rc == KRS_ERR_FULL) {
        alloc_free(buf);
        cap = len + len / 4 + 4096; /* values may grow a few digits between the two passes */
        buf = alloc_malloc(cap);
        rc = buf ? metrics_render_prometheus_models(ms, ids, n, clock_now_ns(), buf, cap, &len)
                 : KRS_ERR_NOMEM;
    }
    for (int i = 0; i < n; i++) engine_release(engs[i]);
    enum MHD_Result ret;
    if (rc)
        ret = server_send_errorf(c->mc, 500, "server_error", NULL, NULL, "metrics: %s",
                                 krs_status_str(rc));
    else
        ret = server_send(c->mc, 200, "text/plain; version=0.0.4", buf, len, NULL, NULL);
    alloc_free(buf);
    return ret;
}

/* Calls fn for every loaded engine (with a counted reference). */
static void for_each_engine(struct server *s, void (*fn)(struct engine *, void *), void *arg)
{
    char names[ENGINE_MAX_MODELS][ENGINE_NAME_MAX];
    int n = engine_registry_list(s->reg, names, ENGINE_MAX_MODELS);
    for (int i = 0; i < n; i++) {
        struct engine *e = engine_registry_acquire(s->reg, names[i]);
        if (!e) continue;
        fn(e, arg);
        engine_release(e);
    }
}

struct health_acc {
    cJSON *models;
    int ok;
    int saturated;
    int max_queue;
    uint64_t now;
};

static void health_one(struct engine *e, void *arg)
{
    struct health_acc *h = arg;
    struct sched_state st;
    sched_get_state(engine_sched(e), &st);
    double age_ms =
        st.heartbeat_ns && h->now > st.heartbeat_ns ? (double)(h->now - st.heartbeat_ns) / 1e6 : 0;
    const uint64_t stale = st.in_step ? HEALTH_STEP_NS : HEALTH_STALE_NS;
    int alive = !st.heartbeat_ns || h->now < st.heartbeat_ns || h->now - st.heartbeat_ns < stale;
    h->ok &= alive && !st.device_error[0];
    int queued = st.queued[0] + st.queued[1] + st.queued[2];
    if (queued >= h->max_queue) h->saturated = 1;
    cJSON *m = cJSON_CreateObject();
    cJSON_AddStringToObject(m, "id", engine_name(e));
    cJSON_AddBoolToObject(m, "alive", alive);
    cJSON_AddNumberToObject(m, "heartbeat_age_ms", age_ms);
    cJSON_AddBoolToObject(m, "in_step", st.in_step);
    cJSON_AddNumberToObject(m, "running", st.running);
    cJSON_AddNumberToObject(m, "queued", queued);
    cJSON_AddBoolToObject(m, "draining", st.draining);
    if (st.device_error[0]) cJSON_AddStringToObject(m, "device_error", st.device_error);
    cJSON_AddItemToArray(h->models, m);
}

static void health_collect(struct server *s, struct health_acc *h)
{
    h->models = cJSON_CreateArray();
    h->ok = 1;
    h->saturated = 0;
    h->max_queue = s->cfg.server.max_queue;
    h->now = clock_now_ns();
    for_each_engine(s, health_one, h);
}

enum MHD_Result server_ops_health(struct server_conn *c)
{
    struct health_acc h;
    health_collect(c->srv, &h);
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "status", h.ok ? "ok" : "unhealthy");
    cJSON_AddItemToObject(o, "models", h.models);
    return server_send_json(c->mc, h.ok ? 200 : 503, o);
}

enum MHD_Result server_ops_ready(struct server_conn *c)
{
    struct server *s = c->srv;
    struct health_acc h;
    health_collect(s, &h);
    int n = cJSON_GetArraySize(h.models);
    int draining = atomic_load(&s->draining);
    const char *why = draining                                        ? "draining"
                      : n == 0 && engine_registry_loading(s->reg) > 0 ? "loading model"
                      : n == 0                                        ? "no model loaded"
                      : h.saturated                                   ? "queue full"
                      : !h.ok                                         ? "engine unhealthy"
                                                                      : NULL;
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "status", why ? "not ready" : "ready");
    if (why) cJSON_AddStringToObject(o, "reason", why);
    cJSON_AddBoolToObject(o, "draining", draining);
    cJSON_AddItemToObject(o, "models", h.models);
    return server_send_json(c->mc, why ? 503 : 200, o);
}

static cJSON *controller_json(const struct controller_snapshot *cs)
{
    cJSON *o = cJSON_CreateObject();
    cJSON_AddNumberToObject(o, "limit", cs->limit);
    cJSON_AddStringToObject(o, "mode", controller_mode_name(cs->mode));
    cJSON_AddNumberToObject(o, "ema_p99_ms", cs->ema_p99_ms);
    cJSON_AddNumberToObject(o, "last_window_p99_ms", cs->last_window_p99_ms);
    cJSON_AddNumberToObject(o, "slope_ms_per_seq", cs->slope_ms_per_seq);
    cJSON_AddNumberToObject(o, "intercept_ms", cs->intercept_ms);
    cJSON_AddNumberToObject(o, "knee_limit", cs->knee_limit);
    cJSON_AddNumberToObject(o, "capacity_limit", cs->capacity_limit);
    cJSON_AddNumberToObject(o, "admit_limit", cs->admit_limit);
    cJSON_AddNumberToObject(o, "late_admit_limit", cs->late_admit_limit);
    cJSON_AddNumberToObject(o, "prefill_ms_per_token", cs->prefill_ms_per_token);
    cJSON_AddNumberToObject(o, "window_tok_s", cs->window_tok_s);
    cJSON_AddNumberToObject(o, "window_max_wait_ms", cs->window_max_wait_ms);
    cJSON_AddNumberToObject(o, "windows", (double)cs->windows);
    cJSON_AddNumberToObject(o, "adjustments", (double)cs->adjustments);
    cJSON_AddNumberToObject(o, "degradations", (double)cs->degradations);
    cJSON_AddNumberToObject(o, "recoveries", (double)cs->recoveries);
    cJSON_AddNumberToObject(o, "outliers", (double)cs->outliers);
    cJSON *ev = cJSON_AddArrayToObject(o, "events");
    for (uint32_t i = 0; i < cs->n_events && i < CONTROLLER_EVENTS; i++) {
        const struct controller_event *e = &cs->events[i];
        cJSON *x = cJSON_CreateObject();
        cJSON_AddNumberToObject(x, "t_ns", (double)e->t_ns);
        cJSON_AddStringToObject(x, "kind", controller_event_name(e->kind));
        cJSON_AddNumberToObject(x, "old_limit", e->old_limit);
        cJSON_AddNumberToObject(x, "new_limit", e->new_limit);
        cJSON_AddStringToObject(x, "reason", e->reason);
        cJSON_AddItemToArray(ev, x);
    }
    return o;
}

static void stats_one(struct engine *e, void *arg)
{
    cJSON *models = arg;
    cJSON *m = cJSON_CreateObject();
    cJSON_AddStringToObject(m, "id", engine_name(e));
    uint64_t now = clock_now_ns();
    cJSON *mj = NULL;
    if (metrics_render_json(engine_metrics(e), now, &mj) == KRS_OK)
        cJSON_AddItemToObject(m, "metrics", mj);
    struct sched_state st;
    sched_get_state(engine_sched(e), &st);
    cJSON *s = cJSON_AddObjectToObject(m, "scheduler");
    cJSON_AddStringToObject(s, "mode", sched_mode_name(st.mode));
    cJSON_AddNumberToObject(s, "batch_limit", st.batch_limit);
    cJSON_AddNumberToObject(s, "running", st.running);
    cJSON *q = cJSON_AddObjectToObject(s, "queued");
    for (int p = 0; p < 3; p++)
        cJSON_AddNumberToObject(q, sched_priority_name((enum sched_priority)p), st.queued[p]);
    cJSON_AddNumberToObject(s, "steps", (double)st.steps);
    cJSON_AddNumberToObject(s, "submitted", (double)st.submitted);
    cJSON *f = cJSON_AddObjectToObject(s, "finished");
    for (int r = 1; r < 5; r++)
        cJSON_AddNumberToObject(f, sched_finish_name((enum sched_finish)r), (double)st.finished[r]);
    cJSON_AddNumberToObject(s, "preemptions", (double)st.preemptions);
    cJSON_AddNumberToObject(s, "deduped", (double)st.deduped);
    cJSON_AddNumberToObject(
        s, "heartbeat_age_ms",
        st.heartbeat_ns && now > st.heartbeat_ns ? (double)(now - st.heartbeat_ns) / 1e6 : 0);
    cJSON_AddBoolToObject(s, "idle", st.idle);
    cJSON_AddBoolToObject(s, "draining", st.draining);
    cJSON_AddNumberToObject(s, "kv_blocks_total", (double)st.kv_blocks_total);
    cJSON_AddNumberToObject(s, "kv_blocks_free", (double)st.kv_blocks_free);
    cJSON_AddNumberToObject(s, "window_ms", st.window_ms);
    cJSON_AddStringToObject(s, "device", st.device);
    cJSON *dm = cJSON_AddObjectToObject(s, "device_memory_bytes");
    if (dm) {
        cJSON_AddNumberToObject(dm, "weights", (double)st.mem_weights);
        cJSON_AddNumberToObject(dm, "kv", (double)st.mem_kv);
        cJSON_AddNumberToObject(dm, "activations", (double)st.mem_activations);
        cJSON_AddNumberToObject(dm, "free", (double)st.mem_free);
        cJSON_AddNumberToObject(dm, "total", (double)st.mem_total);
    }
    struct controller_snapshot *cs = alloc_malloc(sizeof *cs);
    if (cs) {
        sched_get_controller(engine_sched(e), cs);
        cJSON_AddItemToObject(m, "controller", controller_json(cs));
        alloc_free(cs);
    }
    int cap = 256;
    struct sched_request_info *ri = alloc_malloc((size_t)cap * sizeof *ri);
    cJSON *reqs = cJSON_AddArrayToObject(m, "requests");
    if (ri) {
        int n = sched_list_requests(engine_sched(e), ri, cap);
        for (int i = 0; i < n && i < cap; i++) {
            cJSON *x = cJSON_CreateObject();
            cJSON_AddNumberToObject(x, "id", (double)ri[i].id);
            cJSON_AddStringToObject(x, "state", ri[i].state);
            cJSON_AddStringToObject(x, "priority", sched_priority_name(ri[i].priority));
            cJSON_AddNumberToObject(x, "prompt_tokens", ri[i].n_prompt);
            cJSON_AddNumberToObject(x, "generated_tokens", ri[i].n_generated);
            cJSON_AddNumberToObject(x, "age_ms", ri[i].age_ms);
            cJSON_AddItemToArray(reqs, x);
        }
        alloc_free(ri);
    }
    cJSON_AddItemToArray(models, m);
}

enum MHD_Result server_ops_stats(struct server_conn *c)
{
    struct server *s = c->srv;
    cJSON *o = cJSON_CreateObject();
    cJSON *sv = cJSON_AddObjectToObject(o, "server");
    cJSON_AddBoolToObject(sv, "draining", atomic_load(&s->draining));
    cJSON_AddNumberToObject(sv, "inflight", atomic_load(&s->inflight));
    cJSON_AddNumberToObject(sv, "started", (double)s->started_unix);
    cJSON *models = cJSON_AddArrayToObject(o, "models");
    for_each_engine(s, stats_one, models);
    return server_send_json(c->mc, 200, o);
}

/* ---- models -------------------------------------------------------------------------------- */

static cJSON *model_json(const struct engine *e)
{
    cJSON *m = cJSON_CreateObject();
    cJSON_AddStringToObject(m, "id", engine_name(e));
    cJSON_AddStringToObject(m, "object", "model");
    cJSON_AddNumberToObject(m, "created", (double)engine_created_unix(e));
    cJSON_AddStringToObject(m, "owned_by", "kr-serve");
    return m;
}

static void models_one(struct engine *e, void *arg)
{
    cJSON_AddItemToArray((cJSON *)arg, model_json(e));
}

enum MHD_Result server_ops_models(struct server_conn *c, const char *id)
{
    if (id) {
        enum MHD_Result ret;
        struct engine *e = engine_registry_acquire(c->srv->reg, id);
        if (!e || strcmp(engine_name(e), id)) {
            engine_release(e);
            return server_send_errorf(c->mc, 404, "invalid_request_error", "model_not_found",
                                      "model", "the model '%s' does not exist", id);
        }
        ret = server_send_json(c->mc, 200, model_json(e));
        engine_release(e);
        return ret;
    }
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "object", "list");
    cJSON *data = cJSON_AddArrayToObject(o, "data");
    for_each_engine(c->srv, models_one, data);
    return server_send_json(c->mc, 200, o);
}

/* ---- tokenize / detokenize ----------------------------------------------------------------- */

enum MHD_Result server_ops_tokenize(struct server_conn *c)
{
    enum MHD_Result ret = MHD_NO;
    cJSON *j = body_object(c, &ret);
    if (!j) return ret;
    const char *model = NULL, *prompt = NULL;
    struct engine *e = NULL;
    char *text = NULL;
    int32_t *ids = NULL;
    struct server_gen_request req;
    memset(&req, 0, sizeof req);
    if (opt_string(c, j, "model", &model, &ret) || opt_string(c, j, "prompt", &prompt, &ret))
        goto out;
    int add_special = 1;
    cJSON *as = cJSON_GetObjectItemCaseSensitive(j, "add_special");
    if (as && !cJSON_IsNull(as)) {
        if (!cJSON_IsBool(as)) {
            ret = bad_request(c->mc, "add_special", "'add_special' must be a boolean");
            goto out;
        }
        add_special = cJSON_IsTrue(as);
    }
    cJSON *msgs = cJSON_GetObjectItemCaseSensitive(j, "messages");
    if (!prompt && (!msgs || cJSON_IsNull(msgs))) {
        ret = bad_request(c->mc, "prompt", "'prompt' or 'messages' is required");
        goto out;
    }
    if (!(e = acquire_or_404(c, model, &ret))) goto out;
    size_t len = 0;
    int parse_special = 0;
    if (prompt) {
        len = strlen(prompt);
    } else {
        /* Reuse the chat parser for the messages array. */
        struct server_error err;
        char *body = cJSON_PrintUnformatted(j);
        int rc = body ? server_parse_gen(body, strlen(body), SERVER_API_CHAT, &req, &err)
                      : KRS_ERR_NOMEM;
        cJSON_free(body);
        if (rc) {
            ret = server_send_error(c->mc, &err);
            goto out;
        }
        char msg[200] = "";
        rc = chat_apply(engine_tokenizer(e), NULL, req.msgs, (size_t)req.n_msgs, 1, &text, &len,
                        msg, sizeof msg);
        if (rc) {
            ret = rc == KRS_ERR_NOMEM
                      ? server_send_no_memory(c->mc)
                      : bad_request(c->mc, "messages",
                                    msg[0] ? msg : "cannot apply the chat template");
            goto out;
        }
        prompt = text;
        add_special = 0;
        parse_special = 1;
    }
    size_t cap = len + 16, n = 0;
    ids = alloc_malloc(cap * sizeof *ids);
    int rc = ids ? tokenizer_encode(engine_tokenizer(e), prompt, len, add_special, parse_special,
                                    ids, cap, &n)
                 : KRS_ERR_NOMEM;
    if (rc == KRS_ERR_FULL) {
        alloc_free(ids);
        cap = n;
        ids = alloc_malloc(cap * sizeof *ids);
        rc = ids ? tokenizer_encode(engine_tokenizer(e), prompt, len, add_special, parse_special,
                                    ids, cap, &n)
                 : KRS_ERR_NOMEM;
    }
    if (rc) {
        ret = server_send_errorf(c->mc, 500, "server_error", NULL, NULL, "tokenize: %s",
                                 krs_status_str(rc));
        goto out;
    }
    cJSON *o = cJSON_CreateObject();
    cJSON *arr = cJSON_AddArrayToObject(o, "tokens");
    for (size_t i = 0; i < n; i++) cJSON_AddItemToArray(arr, cJSON_CreateNumber(ids[i]));
    cJSON_AddNumberToObject(o, "count", (double)n);
    cJSON_AddStringToObject(o, "model", engine_name(e));
    ret = server_send_json(c->mc, 200, o);
out:
    server_gen_request_free(&req);
    alloc_free(text);
    alloc_free(ids);
    engine_release(e);
    cJSON_Delete(j);
    return ret;
}

enum MHD_Result server_ops_detokenize(struct server_conn *c)
{
    enum MHD_Result ret = MHD_NO;
    cJSON *j = body_object(c, &ret);
    if (!j) return ret;
    const char *model = NULL;
    struct engine *e = NULL;
    int32_t *ids = NULL;
    char *buf = NULL;
    if (opt_string(c, j, "model", &model, &ret)) goto out;
    cJSON *toks = cJSON_GetObjectItemCaseSensitive(j, "tokens");
    if (!cJSON_IsArray(toks)) {
        ret = bad_request(c->mc, "tokens", "'tokens' must be an array of token ids");
        goto out;
    }
    if (!(e = acquire_or_404(c, model, &ret))) goto out;
    int n = cJSON_GetArraySize(toks), i = 0;
    ids = alloc_malloc(((size_t)n + 1) * sizeof *ids);
    if (!ids) {
        ret = server_send_no_memory(c->mc);
        goto out;
    }
    uint32_t nv = tokenizer_n_vocab(engine_tokenizer(e));
    for (cJSON *v = toks->child; v; v = v->next, i++) {
        if (!cJSON_IsNumber(v) || v->valuedouble != floor(v->valuedouble) || v->valuedouble < 0 ||
            v->valuedouble >= nv) {
            ret = bad_request(c->mc, "tokens", "'tokens' must hold valid token ids");
            goto out;
        }
        ids[i] = (int32_t)v->valuedouble;
    }
    size_t cap = (size_t)n * 16 + 16, len = 0;
    buf = alloc_malloc(cap);
    int rc = buf ? tokenizer_decode(engine_tokenizer(e), ids, (size_t)n, 0, buf, cap, &len)
                 : KRS_ERR_NOMEM;
    if (rc == KRS_ERR_FULL) {
        alloc_free(buf);
        cap = len + 1;
        buf = alloc_malloc(cap);
        rc = buf ? tokenizer_decode(engine_tokenizer(e), ids, (size_t)n, 0, buf, cap, &len)
                 : KRS_ERR_NOMEM;
    }
    if (rc) {
        ret = server_send_errorf(c->mc, 500, "server_error", NULL, NULL, "detokenize: %s",
                                 krs_status_str(rc));
        goto out;
    }
    char *t = server_utf8_sanitize(buf, len);
    if (!t) {
        ret = server_send_no_memory(c->mc);
        goto out;
    }
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "prompt", t);
    alloc_free(t);
    cJSON_AddStringToObject(o, "model", engine_name(e));
    ret = server_send_json(c->mc, 200, o);
out:
    alloc_free(buf);
    alloc_free(ids);
    engine_release(e);
    cJSON_Delete(j);
    return ret;
}

/* ---- admin --------------------------------------------------------------------------------- */

struct mode_arg {
    const char *only;
    enum sched_mode mode;
    int batch;
    int n, rc;
};

static void mode_one(struct engine *e, void *arg)
{
    struct mode_arg *m = arg;
    if (m->only && strcmp(m->only, engine_name(e))) return;
    int rc = sched_set_mode(engine_sched(e), m->mode, m->batch);
    if (rc) m->rc = rc;
    m->n++;
    KRS_LOG_INFOF("admin: model '%s' scheduler mode -> %s (batch %d)", engine_name(e),
                  sched_mode_name(m->mode), m->batch);
}

enum MHD_Result server_ops_admin_scheduler(struct server_conn *c)
{
    enum MHD_Result ret = MHD_NO;
    cJSON *j = body_object(c, &ret);
    if (!j) return ret;
    const char *mode = NULL, *model = NULL;
    if (opt_string(c, j, "mode", &mode, &ret) || opt_string(c, j, "model", &model, &ret)) goto out;
    struct mode_arg m = {.only = model, .batch = c->srv->cfg.performance.gpu_scheduler.batch_size};
    if (!mode || sched_parse_mode(mode, &m.mode)) {
        ret = bad_request(c->mc, "mode", "'mode' must be \"auto\", \"fixed\" or \"off\"");
        goto out;
    }
    cJSON *b = cJSON_GetObjectItemCaseSensitive(j, "batch_size");
    if (b && !cJSON_IsNull(b)) {
        if (!cJSON_IsNumber(b) || b->valuedouble != floor(b->valuedouble) || b->valuedouble < 1 ||
            b->valuedouble > 1024) {
            ret = bad_request(c->mc, "batch_size", "'batch_size' must be an integer in 1..1024");
            goto out;
        }
        m.batch = (int)b->valuedouble;
    }
    for_each_engine(c->srv, mode_one, &m);
    if (model && m.n == 0) {
        ret = server_send_errorf(c->mc, 404, "invalid_request_error", "model_not_found", "model",
                                 "the model '%s' does not exist", model);
        goto out;
    }
    if (m.rc) {
        ret = bad_request(c->mc, "batch_size", "the scheduler rejected the setting");
        goto out;
    }
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "mode", sched_mode_name(m.mode));
    cJSON_AddNumberToObject(o, "batch_size", m.batch);
    cJSON_AddNumberToObject(o, "models", m.n);
    ret = server_send_json(c->mc, 200, o);
out:
    cJSON_Delete(j);
    return ret;
}

enum MHD_Result server_ops_admin_load(struct server_conn *c)
{
    enum MHD_Result ret = MHD_NO;
    cJSON *j = body_object(c, &ret);
    if (!j) return ret;
    const char *name = NULL, *path = NULL;
    if (opt_string(c, j, "name", &name, &ret) || opt_string(c, j, "path", &path, &ret)) goto out;
    if (!path) {
        ret = bad_request(c->mc, "path", "'path' is required (a file in the model directory)");
        goto out;
    }
    char err[256] = "";
    int rc = engine_registry_load(c->srv->reg, name, path, 1, err, sizeof err);
    KRS_LOG_INFOF("admin: load '%s' as '%s': %s%s%s", path, name ? name : "(stem)",
                  krs_status_str(rc), err[0] ? ": " : "", err);
    if (rc) {
        int st = rc == KRS_ERR_INVALID     ? 400
                 : rc == KRS_ERR_NOT_FOUND ? 404
                 : rc == KRS_ERR_STATE     ? 409
                 : rc == KRS_ERR_FULL      ? 409
                                           : 500;
        ret = server_send_errorf(c->mc, st, st >= 500 ? "server_error" : "invalid_request_error",
                                 NULL, "path", "%s", err[0] ? err : krs_status_str(rc));
        goto out;
    }
    cJSON *o = cJSON_CreateObject();
    cJSON *models = cJSON_AddArrayToObject(o, "models");
    for_each_engine(c->srv, models_one, models);
    cJSON_AddStringToObject(o, "status", "loaded");
    ret = server_send_json(c->mc, 200, o);
out:
    cJSON_Delete(j);
    return ret;
}

enum MHD_Result server_ops_admin_unload(struct server_conn *c)
{
    enum MHD_Result ret = MHD_NO;
    cJSON *j = body_object(c, &ret);
    if (!j) return ret;
    const char *name = NULL;
    if (opt_string(c, j, "name", &name, &ret)) goto out;
    if (!name) {
        ret = bad_request(c->mc, "name", "'name' is required");
        goto out;
    }
    int rc = engine_registry_unload(c->srv->reg, name);
    KRS_LOG_INFOF("admin: unload '%s': %s", name, krs_status_str(rc));
    if (rc) {
        ret = server_send_errorf(c->mc, rc == KRS_ERR_NOT_FOUND ? 404 : 500,
                                 rc == KRS_ERR_NOT_FOUND ? "invalid_request_error" : "server_error",
                                 rc == KRS_ERR_NOT_FOUND ? "model_not_found" : NULL, "name",
                                 "cannot unload '%s': %s", name, krs_status_str(rc));
        goto out;
    }
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "status", "unloaded");
    cJSON_AddStringToObject(o, "name", name);
    ret = server_send_json(c->mc, 200, o);
out:
    cJSON_Delete(j);
    return ret;
}

/* ---- JSON-RPC over HTTP -------------------------------------------------------------------- */

/* One /rpc message, handled by rpc_handle_async from the connection's thread; its streams are
 * read by the rpc ctx's pump. Shared by the rpc side (until its done callback) and the
 * connection (refs); the connection waits suspended on slot `slot` until `done`. */
struct server_rpc_job {
    struct server *srv;
    pthread_mutex_t lock; /* guards out/n_msgs (the sink is called from the rpc pump) */
    int refs;             /* guarded by lock */
    char *body;
    size_t body_len;
    char *out;
    size_t out_len, out_cap;
    int n_msgs;
    int no_memory; /* a message could not be kept (guarded by lock) */
    int done;      /* guarded by the slot's lock */
    int slot;
    atomic_int abort; /* the client went away: cancel what the message started */
};

static void job_unref(struct server_rpc_job *j)
{
    pthread_mutex_lock(&j->lock);
    int left = --j->refs;
    pthread_mutex_unlock(&j->lock);
    if (left) return;
    pthread_mutex_destroy(&j->lock);
    alloc_free(j->body);
    alloc_free(j->out);
    alloc_free(j);
}

static void rpc_sink_write(void *user, const char *json, size_t len)
{
    struct server_rpc_job *j = user;
    pthread_mutex_lock(&j->lock);
    if (j->out_len + len + 2 > j->out_cap) {
        size_t cap = j->out_cap ? j->out_cap : 1024;
        while (cap < j->out_len + len + 2) cap *= 2;
        char *nb = alloc_realloc(j->out, cap);
        if (!nb) { /* the reply would be incomplete: it becomes a 503 "out of memory" */
            j->no_memory = 1;
            pthread_mutex_unlock(&j->lock);
            return;
        }
        j->out = nb;
        j->out_cap = cap;
    }
    memcpy(j->out + j->out_len, json, len);
    j->out_len += len;
    j->out[j->out_len++] = '\n';
    j->out[j->out_len] = '\0';
    j->n_msgs++;
    pthread_mutex_unlock(&j->lock);
}

/* The message is answered and its streams ended (rpc_handle_async's done callback). */
static void rpc_done(void *arg)
{
    struct server_rpc_job *j = arg;
    struct server_slot *sl = &j->srv->slots[j->slot];
    pthread_mutex_lock(&sl->lock);
    j->done = 1;
    if (sl->conn && sl->suspended) {
        sl->suspended = 0;
        MHD_resume_connection(sl->conn->mc);
    }
    pthread_mutex_unlock(&sl->lock);
    atomic_fetch_sub(&j->srv->inflight, 1);
    job_unref(j);
}

int server_rpc_init(struct server *s)
{
    return rpc_create(s->reg, &s->rpc);
}

void server_rpc_free(struct server *s)
{
    rpc_free(s->rpc);
    s->rpc = NULL;
}

enum MHD_Result server_ops_rpc(struct server_conn *c)
{
    struct server *s = c->srv;
    /* Counted before the drain flag is read, as in server_gen_start. */
    atomic_fetch_add(&s->inflight, 1);
    if (atomic_load(&s->draining)) {
        atomic_fetch_sub(&s->inflight, 1);
        return server_send_errorf(c->mc, 503, "server_error", "service_unavailable", NULL,
                                  "the server is shutting down");
    }
    struct server_rpc_job *j = alloc_calloc(1, sizeof *j);
    if (!j) {
        atomic_fetch_sub(&s->inflight, 1);
        return server_send_no_memory(c->mc);
    }
    j->srv = s;
    j->refs = 2;
    pthread_mutex_init(&j->lock, NULL);
    j->body = alloc_malloc(c->body_len + 1);
    uint32_t gen;
    j->slot = j->body ? server_slot_alloc(s, c, &gen) : -1;
    if (j->slot < 0) {
        int no_memory = !j->body;
        atomic_fetch_sub(&s->inflight, 1);
        j->refs = 1;
        job_unref(j);
        if (no_memory) return server_send_no_memory(c->mc);
        return server_send_errorf(c->mc, 503, "server_error", "service_unavailable", NULL,
                                  "too many requests in progress");
    }
    memcpy(j->body, c->body, c->body_len);
    j->body[c->body_len] = '\0';
    j->body_len = c->body_len;
    c->rpc = j; /* its count in flight is given back by rpc_done */
    struct rpc_sink sink = {rpc_sink_write, j};
    if (rpc_handle_async(s->rpc, j->body, j->body_len, &sink, &j->abort, rpc_done, j)) {
        rpc_done(j); /* cannot happen: the arguments are good */
    }
    return server_rpc_continue(c);
}

enum MHD_Result server_rpc_continue(struct server_conn *c)
{
    struct server_rpc_job *j = c->rpc;
    struct server_slot *sl = &c->srv->slots[j->slot];
    pthread_mutex_lock(&sl->lock);
    int done = j->done;
    if (!done && server_peer_closed(c->mc)) {
        pthread_mutex_unlock(&sl->lock);
        return MHD_NO; /* closes; server_rpc_end cancels the message's generations */
    }
    if (!done) {
        sl->suspended = 1;
        MHD_suspend_connection(c->mc);
    }
    pthread_mutex_unlock(&sl->lock);
    if (!done) return MHD_YES;
    pthread_mutex_lock(&j->lock);
    enum MHD_Result ret;
    if (j->no_memory)
        ret = server_send_no_memory(c->mc);
    else if (j->n_msgs == 0)
        ret = server_send(c->mc, 204, "application/json", "", 0, NULL, NULL);
    else if (j->n_msgs == 1)
        ret = server_send(c->mc, 200, "application/json", j->out, j->out_len - 1, NULL, NULL);
    else
        ret = server_send(c->mc, 200, "application/x-ndjson", j->out, j->out_len, NULL, NULL);
    pthread_mutex_unlock(&j->lock);
    return ret;
}

void server_rpc_end(struct server_conn *c)
{
    struct server_rpc_job *j = c->rpc;
    c->rpc = NULL;
    /* Harmless when the job is done: it then has no generation left to cancel. */
    atomic_store(&j->abort, 1);
    rpc_abort(c->srv->rpc, &j->abort);
    server_slot_free(c->srv, j->slot);
    job_unref(j);
}
