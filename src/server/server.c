/* The HTTP daemon: MHD setup (internal thread pool, epoll, suspend/resume), per-request
 * closures, body accumulation bounded by maxBodyBytes, authentication, routing, response and
 * error helpers, drain and reload. Generation lives in server_gen.c, the other routes in
 * server_ops.c. No handler here blocks on the model. */
#include "server/server_impl.h"

#include "engine/engine.h"
#include "krserve.h"
#include "model/model.h"
#include "sched/sched.h"
#include "util/alloc.h"
#include "util/clock.h"
#include "util/log.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

/* ---- helpers ------------------------------------------------------------------------------- */

void server_rt_get(struct server *s, struct server_limits_rt *out)
{
    pthread_mutex_lock(&s->rt_lock);
    *out = s->rt;
    pthread_mutex_unlock(&s->rt_lock);
}

enum MHD_Result server_send(struct MHD_Connection *mc, unsigned status, const char *ctype,
                            const char *data, size_t len, const char *hdr, const char *hval)
{
    struct MHD_Response *r =
        MHD_create_response_from_buffer(len, (void *)data, MHD_RESPMEM_MUST_COPY);
    if (!r) return MHD_NO;
    MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, ctype);
    if (hdr) MHD_add_response_header(r, hdr, hval);
    enum MHD_Result ret = MHD_queue_response(mc, status, r);
    MHD_destroy_response(r);
    return ret;
}

enum MHD_Result server_send_json(struct MHD_Connection *mc, unsigned status, cJSON *obj)
{
    char *txt = obj ? cJSON_PrintUnformatted(obj) : NULL;
    cJSON_Delete(obj);
    if (!txt) return server_send(mc, 500, "application/json", "{}", 2, NULL, NULL);
    enum MHD_Result ret = server_send(mc, status, "application/json", txt, strlen(txt), NULL, NULL);
    cJSON_free(txt);
    return ret;
}

cJSON *server_error_json(const struct server_error *e)
{
    cJSON *root = cJSON_CreateObject(), *o = cJSON_AddObjectToObject(root, "error");
    cJSON_AddStringToObject(o, "message", e->message);
    cJSON_AddStringToObject(o, "type", e->type ? e->type : "invalid_request_error");
    if (e->param[0])
        cJSON_AddStringToObject(o, "param", e->param);
    else
        cJSON_AddNullToObject(o, "param");
    if (e->code)
        cJSON_AddStringToObject(o, "code", e->code);
    else
        cJSON_AddNullToObject(o, "code");
    return root;
}

enum MHD_Result server_send_error(struct MHD_Connection *mc, const struct server_error *e)
{
    const char *hdr = NULL, *hval = NULL;
    if (e->status == 429 || e->status == 503) hdr = MHD_HTTP_HEADER_RETRY_AFTER, hval = "1";
    if (e->status == 401) hdr = MHD_HTTP_HEADER_WWW_AUTHENTICATE, hval = "Bearer";
    cJSON *j = server_error_json(e);
    char *txt = cJSON_PrintUnformatted(j);
    cJSON_Delete(j);
    if (!txt) return server_send_no_memory(mc);
    enum MHD_Result ret =
        server_send(mc, (unsigned)e->status, "application/json", txt, strlen(txt), hdr, hval);
    cJSON_free(txt);
    return ret;
}

enum MHD_Result server_send_no_memory(struct MHD_Connection *mc)
{
    static const char body[] = "{\"error\":{\"message\":\"out of memory\",\"type\":"
                               "\"server_error\",\"param\":null,\"code\":\"out_of_memory\"}}";
    struct MHD_Response *r =
        MHD_create_response_from_buffer(sizeof body - 1, (void *)body, MHD_RESPMEM_PERSISTENT);
    if (!r) return MHD_NO;
    MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, "application/json");
    MHD_add_response_header(r, MHD_HTTP_HEADER_RETRY_AFTER, "1");
    enum MHD_Result ret = MHD_queue_response(mc, 503, r);
    MHD_destroy_response(r);
    return ret;
}

enum MHD_Result server_send_errorf(struct MHD_Connection *mc, int status, const char *type,
                                   const char *code, const char *param, const char *fmt, ...)
{
    struct server_error e = {.status = status, .type = type, .code = code};
    snprintf(e.param, sizeof e.param, "%s", param ? param : "");
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e.message, sizeof e.message, fmt, ap);
    va_end(ap);
    return server_send_error(mc, &e);
}

int server_slot_alloc(struct server *s, struct server_conn *c, uint32_t *gen)
{
    pthread_mutex_lock(&s->free_lock);
    int idx = s->free_head;
    if (idx >= 0) s->free_head = s->slots[idx].next_free;
    pthread_mutex_unlock(&s->free_lock);
    if (idx < 0) return -1;
    struct server_slot *sl = &s->slots[idx];
    pthread_mutex_lock(&sl->lock);
    sl->conn = c;
    sl->suspended = 0;
    *gen = sl->gen;
    pthread_mutex_unlock(&sl->lock);
    return idx;
}

void server_slot_free(struct server *s, int idx)
{
    struct server_slot *sl = &s->slots[idx];
    pthread_mutex_lock(&sl->lock);
    sl->conn = NULL;
    sl->suspended = 0;
    sl->gen++;
    pthread_mutex_unlock(&sl->lock);
    pthread_mutex_lock(&s->free_lock);
    sl->next_free = s->free_head;
    s->free_head = idx;
    pthread_mutex_unlock(&s->free_lock);
}

int server_peer_closed(struct MHD_Connection *mc)
{
    const union MHD_ConnectionInfo *ci =
        MHD_get_connection_info(mc, MHD_CONNECTION_INFO_CONNECTION_FD);
    if (!ci) return 0;
    char b;
    ssize_t r = recv(ci->connect_fd, &b, 1, MSG_PEEK | MSG_DONTWAIT);
    if (r == 0) return 1;
    return r < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR;
}

char *server_utf8_sanitize(const char *str, size_t n)
{
    char *out = alloc_malloc(n * 3 + 1);
    if (out) server_utf8_sanitize_into(str, n, out);
    return out;
}

void server_utf8_sanitize_into(const char *str, size_t n, char *out)
{
    const unsigned char *s = (const unsigned char *)str;
    size_t o = 0, i = 0;
    while (i < n) {
        unsigned c = s[i];
        size_t len = c < 0x80                   ? 1
                     : (c >= 0xC2 && c <= 0xDF) ? 2
                     : (c >= 0xE0 && c <= 0xEF) ? 3
                     : (c >= 0xF0 && c <= 0xF4) ? 4
                                                : 0;
        if (c != 0 && len && i + len <= n && utf8_valid(str + i, len)) {
            memcpy(out + o, str + i, len);
            o += len, i += len;
        } else {
            memcpy(out + o, "\xEF\xBF\xBD", 3);
            o += 3, i++;
        }
    }
    out[o] = '\0';
}

/* ---- routing ------------------------------------------------------------------------------- */

static int auth_ok(struct server *s, struct MHD_Connection *mc)
{
    struct server_limits_rt rt;
    server_rt_get(s, &rt);
    if (!rt.api_key[0]) return 1;
    const char *h = MHD_lookup_connection_value(mc, MHD_HEADER_KIND, "Authorization");
    if (!h || strncasecmp(h, "Bearer ", 7)) return 0;
    h += 7;
    while (*h == ' ') h++;
    size_t a = strlen(h), b = strlen(rt.api_key);
    unsigned diff = (unsigned)(a ^ b);
    for (size_t i = 0; i < b; i++)
        diff |= (unsigned char)rt.api_key[i] ^ (i < a ? (unsigned char)h[i] : 0);
    return diff == 0;
}

static enum MHD_Result method_not_allowed(struct MHD_Connection *mc, const char *allow)
{
    struct server_error e = {
        .status = 405, .type = "invalid_request_error", .code = "method_not_allowed"};
    snprintf(e.message, sizeof e.message, "method not allowed; use %s", allow);
    cJSON *j = server_error_json(&e);
    char *txt = cJSON_PrintUnformatted(j);
    cJSON_Delete(j);
    enum MHD_Result r = server_send(mc, 405, "application/json", txt, strlen(txt), "Allow", allow);
    cJSON_free(txt);
    return r;
}

enum route_kind { R_GET, R_POST };
struct route {
    const char *path;
    enum route_kind method;
    int auth;    /* needs the API key */
    int monitor; /* also on the monitoring port */
    int id;
};
enum {
    RT_COMPLETIONS,
    RT_CHAT,
    RT_MODELS,
    RT_TOKENIZE,
    RT_DETOKENIZE,
    RT_RPC,
    RT_METRICS,
    RT_HEALTH,
    RT_READY,
    RT_STATS,
    RT_ADMIN_SCHED,
    RT_ADMIN_LOAD,
    RT_ADMIN_UNLOAD,
};
static const struct route routes[] = {
    {"/v1/completions", R_POST, 1, 0, RT_COMPLETIONS},
    {"/v1/chat/completions", R_POST, 1, 0, RT_CHAT},
    {"/v1/models", R_GET, 1, 0, RT_MODELS},
    {"/tokenize", R_POST, 1, 0, RT_TOKENIZE},
    {"/detokenize", R_POST, 1, 0, RT_DETOKENIZE},
    {"/rpc", R_POST, 1, 0, RT_RPC},
    {"/metrics", R_GET, 0, 1, RT_METRICS},
    {"/health", R_GET, 0, 1, RT_HEALTH},
    {"/ready", R_GET, 0, 1, RT_READY},
    {"/stats", R_GET, 0, 1, RT_STATS},
    {"/admin/scheduler", R_POST, 1, 0, RT_ADMIN_SCHED},
    {"/admin/models/load", R_POST, 1, 0, RT_ADMIN_LOAD},
    {"/admin/models/unload", R_POST, 1, 0, RT_ADMIN_UNLOAD},
};

static enum MHD_Result route(struct server_conn *c, const char *url, const char *method)
{
    struct server *s = c->srv;
    struct MHD_Connection *mc = c->mc;
    const struct route *rt = NULL;
    const char *model_id = NULL;
    for (size_t i = 0; i < sizeof routes / sizeof routes[0]; i++)
        if (!strcmp(url, routes[i].path)) rt = &routes[i];
    if (!rt && !strncmp(url, "/v1/models/", 11) && url[11]) {
        rt = &routes[2];
        model_id = url + 11;
    }
    if (!rt && !strcmp(url, s->cfg.monitoring.prometheus.path)) rt = &routes[6];
    if (rt && c->monitor_only && !rt->monitor) rt = NULL;
    if (rt && c->monitor_only && rt->id == RT_METRICS &&
        strcmp(url, s->cfg.monitoring.prometheus.path))
        rt = NULL;
    if (!rt)
        return server_send_errorf(mc, 404, "invalid_request_error", "not_found", NULL,
                                  "no route %s %s", method, url);
    int is_get = !strcmp(method, "GET") || !strcmp(method, "HEAD");
    int is_post = !strcmp(method, "POST");
    if (rt->method == R_GET && !is_get) return method_not_allowed(mc, "GET");
    if (rt->method == R_POST && !is_post) return method_not_allowed(mc, "POST");
    if (rt->auth && !auth_ok(s, mc))
        return server_send_errorf(mc, 401, "invalid_request_error", "invalid_api_key", NULL,
                                  "missing or invalid API key (Authorization: Bearer ...)");
    if (c->no_memory) return server_send_no_memory(mc);
    if (c->too_large)
        return server_send_errorf(mc, 413, "invalid_request_error", "request_too_large", NULL,
                                  "request body exceeds %lld bytes", (long long)c->max_body);
    switch (rt->id) {
    case RT_COMPLETIONS:
        return server_gen_start(c, SERVER_API_COMPLETIONS);
    case RT_CHAT:
        return server_gen_start(c, SERVER_API_CHAT);
    case RT_MODELS:
        return server_ops_models(c, model_id);
    case RT_TOKENIZE:
        return server_ops_tokenize(c);
    case RT_DETOKENIZE:
        return server_ops_detokenize(c);
    case RT_RPC:
        return server_ops_rpc(c);
    case RT_METRICS:
        return server_ops_metrics(c);
    case RT_HEALTH:
        return server_ops_health(c);
    case RT_READY:
        return server_ops_ready(c);
    case RT_STATS:
        return server_ops_stats(c);
    case RT_ADMIN_SCHED:
        return server_ops_admin_scheduler(c);
    case RT_ADMIN_LOAD:
        return server_ops_admin_load(c);
    case RT_ADMIN_UNLOAD:
        return server_ops_admin_unload(c);
    }
    return MHD_NO;
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *mc, const char *url,
                                  const char *method, const char *version, const char *upload_data,
                                  size_t *upload_data_size, void **con_cls)
{
    struct server_daemon_ctx *dc = cls;
    struct server_conn *c = *con_cls;
    if (!c) {
        c = alloc_calloc(1, sizeof *c);
        if (!c) return server_send_no_memory(mc); /* answered now; MHD drops the body */
        c->srv = dc->srv;
        c->mc = mc;
        c->monitor_only = dc->monitor_only;
        atomic_fetch_add(&dc->srv->active, 1); /* until on_completed */
        struct server_limits_rt rt;
        server_rt_get(dc->srv, &rt);
        c->max_body = rt.max_body_bytes;
        const char *cl = MHD_lookup_connection_value(mc, MHD_HEADER_KIND, "Content-Length");
        if (cl && strtoll(cl, NULL, 10) > c->max_body) c->too_large = 1;
        *con_cls = c;
        return MHD_YES;
    }
    if (*upload_data_size) {
        size_t n = *upload_data_size;
        *upload_data_size = 0;
        if (c->too_large || c->no_memory || (int64_t)(c->body_len + n) > c->max_body) {
            if (!c->no_memory) c->too_large = 1;
            return MHD_YES; /* keep reading (and dropping) so the client sees the 413 / 503 */
        }
        if (c->body_len + n + 1 > c->body_cap) {
            size_t cap = c->body_cap ? c->body_cap : 4096;
            while (cap < c->body_len + n + 1) cap *= 2;
            char *nb = alloc_realloc(c->body, cap);
            if (!nb) {
                c->no_memory = 1;
                return MHD_YES;
            }
            c->body = nb;
            c->body_cap = cap;
        }
        memcpy(c->body + c->body_len, upload_data, n);
        c->body_len += n;
        c->body[c->body_len] = '\0';
        return MHD_YES;
    }
    if (c->gen) return server_gen_continue(c);
    if (c->rpc) return server_rpc_continue(c);
    if (!c->body && !c->no_memory) {
        c->body = alloc_calloc(1, 1);
        if (!c->body) c->no_memory = 1;
    }
    return route(c, url, method);
}

static void on_completed(void *cls, struct MHD_Connection *mc, void **con_cls,
                         enum MHD_RequestTerminationCode toe)
{
    struct server_conn *c = *con_cls;
    if (!c) return;
    if (c->gen) {
        if (toe != MHD_REQUEST_TERMINATED_COMPLETED_OK)
            KRS_LOG_DEBUGF("http: request ended early (code %d): cancelling", (int)toe);
        server_gen_end(c);
    }
    if (c->rpc) server_rpc_end(c);
    atomic_fetch_sub(&c->srv->active, 1);
    alloc_free(c->body);
    alloc_free(c);
    *con_cls = NULL;
}

static void mhd_log(void *cls, const char *fmt, va_list ap)
{
    char buf[512];
    vsnprintf(buf, sizeof buf, fmt, ap);
    size_t n = strlen(buf);
    while (n && buf[n - 1] == '\n') buf[--n] = '\0';
    KRS_LOG_DEBUGF("mhd: %s", buf);
}

/* Thousands of open client connections need as many descriptors: the soft limit (often 1024)
 * goes up to the hard one. Best effort; the connection limit below still holds. */
static void raise_fd_limit(void)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) || rl.rlim_cur >= rl.rlim_max) return;
    rlim_t want = rl.rlim_max > 65536 ? 65536 : rl.rlim_max;
    if (want <= rl.rlim_cur) return;
    rl.rlim_cur = want;
    if (setrlimit(RLIMIT_NOFILE, &rl))
        KRS_LOG_WARNF("cannot raise the open-file limit: %s", strerror(errno));
}

static struct MHD_Daemon *start_daemon(struct server *s, const char *host, int port, int threads,
                                       int mon, char *err, size_t errlen)
{
    struct sockaddr_in sa;
    memset(&sa, 0, sizeof sa);
    sa.sin_family = AF_INET;
    sa.sin_port = htons((uint16_t)port);
    const char *h = !strcmp(host, "localhost") ? "127.0.0.1" : host;
    if (inet_pton(AF_INET, h, &sa.sin_addr) != 1) {
        snprintf(err, errlen, "server.host must be an IPv4 address, got \"%s\"", host);
        return NULL;
    }
    s->dctx[mon].srv = s;
    s->dctx[mon].monitor_only = mon;
    struct MHD_Daemon *d = MHD_start_daemon(
        MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_EPOLL | MHD_ALLOW_SUSPEND_RESUME | MHD_USE_ITC |
            MHD_USE_ERROR_LOG,
        (uint16_t)port, NULL, NULL, on_request, &s->dctx[mon], MHD_OPTION_SOCK_ADDR,
        (struct sockaddr *)&sa, MHD_OPTION_THREAD_POOL_SIZE, (unsigned)threads,
        MHD_OPTION_NOTIFY_COMPLETED, on_completed, NULL, MHD_OPTION_CONNECTION_LIMIT,
        (unsigned)16384, MHD_OPTION_EXTERNAL_LOGGER, mhd_log, NULL,
        MHD_OPTION_LISTENING_ADDRESS_REUSE, (unsigned)1, MHD_OPTION_CONNECTION_TIMEOUT,
        (unsigned)s->cfg.server.idle_timeout_s, MHD_OPTION_END);
    if (!d) snprintf(err, errlen, "cannot listen on %s:%d: %s", host, port, strerror(errno));
    return d;
}

static void rt_from_cfg(struct server_limits_rt *rt, const struct krs_config *cfg)
{
    snprintf(rt->api_key, sizeof rt->api_key, "%s", cfg->server.api_key);
    rt->max_body_bytes = cfg->server.max_body_bytes;
    rt->max_prompt_tokens = cfg->server.max_prompt_tokens;
    rt->max_tokens_limit = cfg->server.max_tokens_limit;
    rt->request_timeout_ms = cfg->server.request_timeout_ms;
}

#define WATCH_PERIOD_MS 100

/* Every WATCH_PERIOD_MS: resumes each suspended connection whose peer has closed, so that its
 * handler runs, sees the close and ends the request (which cancels its generation). */
static void *watch_main(void *arg)
{
    struct server *s = arg;
    pthread_mutex_lock(&s->watch_lock);
    while (!s->watch_stop) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        ts.tv_nsec += WATCH_PERIOD_MS * 1000000L;
        ts.tv_sec += ts.tv_nsec / 1000000000L;
        ts.tv_nsec %= 1000000000L;
        pthread_cond_timedwait(&s->watch_cv, &s->watch_lock, &ts);
        if (s->watch_stop) break;
        pthread_mutex_unlock(&s->watch_lock);
        for (int i = 0; i < SERVER_SLOTS; i++) {
            struct server_slot *sl = &s->slots[i];
            pthread_mutex_lock(&sl->lock);
            if (sl->conn && sl->suspended && server_peer_closed(sl->conn->mc)) {
                sl->suspended = 0;
                MHD_resume_connection(sl->conn->mc);
            }
            pthread_mutex_unlock(&sl->lock);
        }
        pthread_mutex_lock(&s->watch_lock);
    }
    pthread_mutex_unlock(&s->watch_lock);
    return NULL;
}

static int watch_start(struct server *s)
{
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&s->watch_cv, &ca);
    pthread_condattr_destroy(&ca);
    pthread_mutex_init(&s->watch_lock, NULL);
    s->watch_started = pthread_create(&s->watch_thread, NULL, watch_main, s) == 0;
    return s->watch_started ? 0 : -1;
}

static void watch_stop(struct server *s)
{
    if (!s->watch_started) return;
    pthread_mutex_lock(&s->watch_lock);
    s->watch_stop = 1;
    pthread_cond_signal(&s->watch_cv);
    pthread_mutex_unlock(&s->watch_lock);
    pthread_join(s->watch_thread, NULL);
    pthread_cond_destroy(&s->watch_cv);
    pthread_mutex_destroy(&s->watch_lock);
    s->watch_started = 0;
}

int server_start(const struct krs_config *cfg, struct engine_registry *reg, struct server **out,
                 char *err, size_t errlen)
{
    *out = NULL;
    struct server *s = alloc_calloc(1, sizeof *s);
    if (!s) return KRS_ERR_NOMEM;
    s->cfg = *cfg;
    s->reg = reg;
    raise_fd_limit();
    pthread_mutex_init(&s->rt_lock, NULL);
    pthread_mutex_init(&s->free_lock, NULL);
    rt_from_cfg(&s->rt, cfg);
    s->started_unix = (uint64_t)time(NULL);
    s->slots = alloc_calloc(SERVER_SLOTS, sizeof *s->slots);
    if (!s->slots) {
        alloc_free(s);
        return KRS_ERR_NOMEM;
    }
    for (int i = 0; i < SERVER_SLOTS; i++) {
        pthread_mutex_init(&s->slots[i].lock, NULL);
        s->slots[i].next_free = i + 1 < SERVER_SLOTS ? i + 1 : -1;
    }
    s->free_head = 0;
    int rc = server_rpc_init(s);
    if (rc) {
        snprintf(err, errlen, "cannot create the JSON-RPC dispatcher");
        goto fail;
    }
    rc = KRS_ERR_IO;
    s->d_main =
        start_daemon(s, cfg->server.host, cfg->server.port, cfg->server.threads, 0, err, errlen);
    if (!s->d_main) goto fail;
    if (cfg->monitoring.prometheus.enabled && cfg->monitoring.prometheus.port > 0) {
        s->d_mon =
            start_daemon(s, cfg->server.host, cfg->monitoring.prometheus.port, 2, 1, err, errlen);
        if (!s->d_mon) goto fail;
    }
    if (watch_start(s)) {
        snprintf(err, errlen, "cannot start the disconnect watcher thread");
        rc = KRS_ERR_INTERNAL;
        goto fail;
    }
    *out = s;
    return KRS_OK;
fail:
    server_stop(s);
    return rc;
}

void server_begin_drain(struct server *s)
{
    atomic_store(&s->draining, 1);
    char names[ENGINE_MAX_MODELS][ENGINE_NAME_MAX];
    int n = engine_registry_list(s->reg, names, ENGINE_MAX_MODELS);
    for (int i = 0; i < n; i++) {
        struct engine *e = engine_registry_acquire(s->reg, names[i]);
        if (!e) continue;
        sched_drain(engine_sched(e));
        engine_release(e);
    }
}

int server_inflight(struct server *s)
{
    return atomic_load(&s->inflight);
}

/* Stops listening (MHD keeps serving the connections it has) and closes the socket. */
static void stop_listening(struct MHD_Daemon *d)
{
    if (!d) return;
    MHD_socket fd = MHD_quiesce_daemon(d);
    if (fd != MHD_INVALID_SOCKET) close(fd);
}

void server_finish_drain(struct server *s, int64_t timeout_ms)
{
    stop_listening(s->d_main);
    stop_listening(s->d_mon);
    uint64_t deadline = clock_now_ns() + (uint64_t)(timeout_ms > 0 ? timeout_ms : 0) * 1000000ull;
    while (atomic_load(&s->active) > 0 && clock_now_ns() < deadline) clock_sleep_us(5000);
    if (atomic_load(&s->active) > 0)
        KRS_LOG_WARNF("shutdown: %d HTTP requests unanswered after %lld ms; closing them",
                      atomic_load(&s->active), (long long)timeout_ms);
}

void server_cancel_all(struct server *s, const char *reason)
{
    char names[ENGINE_MAX_MODELS][ENGINE_NAME_MAX];
    int n = engine_registry_list(s->reg, names, ENGINE_MAX_MODELS);
    for (int i = 0; i < n; i++) {
        struct engine *e = engine_registry_acquire(s->reg, names[i]);
        if (!e) continue;
        sched_cancel_all(engine_sched(e), reason);
        engine_release(e);
    }
}

void server_reload(struct server *s, const struct krs_config *cfg)
{
    log_set_level((enum krs_log_level)cfg->logging.level);
    pthread_mutex_lock(&s->rt_lock);
    rt_from_cfg(&s->rt, cfg);
    pthread_mutex_unlock(&s->rt_lock);
    enum config_sched_mode m = config_effective_sched_mode(cfg);
    enum sched_mode sm = m == CONFIG_SCHED_OFF     ? SCHED_MODE_OFF
                         : m == CONFIG_SCHED_FIXED ? SCHED_MODE_FIXED
                                                   : SCHED_MODE_AUTO;
    char names[ENGINE_MAX_MODELS][ENGINE_NAME_MAX];
    int n = engine_registry_list(s->reg, names, ENGINE_MAX_MODELS);
    for (int i = 0; i < n; i++) {
        struct engine *e = engine_registry_acquire(s->reg, names[i]);
        if (!e) continue;
        sched_set_mode(engine_sched(e), sm, cfg->performance.gpu_scheduler.batch_size);
        engine_release(e);
    }
    KRS_LOG_INFOF("reload: log level %s, scheduler %s (batch %d), limits applied",
                  log_level_name((enum krs_log_level)cfg->logging.level), sched_mode_name(sm),
                  cfg->performance.gpu_scheduler.batch_size);
    const struct krs_config *o = &s->cfg;
    if (strcmp(o->server.host, cfg->server.host) || o->server.port != cfg->server.port)
        KRS_LOG_WARNF("reload: server.host/server.port changed: needs a restart");
    if (o->server.threads != cfg->server.threads)
        KRS_LOG_WARNF("reload: server.threads changed: needs a restart");
    if (strcmp(o->model.path, cfg->model.path) || strcmp(o->model.name, cfg->model.name) ||
        o->model.kv_cache_tokens != cfg->model.kv_cache_tokens ||
        o->model.context_length != cfg->model.context_length ||
        o->model.threads != cfg->model.threads ||
        o->model.max_batch_tokens != cfg->model.max_batch_tokens)
        KRS_LOG_WARNF("reload: model.* changed: needs a restart (or /admin/models/load)");
    if (o->performance.prefix_cache.enabled != cfg->performance.prefix_cache.enabled ||
        o->performance.prefix_cache.max_tokens != cfg->performance.prefix_cache.max_tokens)
        KRS_LOG_WARNF("reload: performance.prefixCache.* changed: needs a restart");
    if (o->monitoring.prometheus.port != cfg->monitoring.prometheus.port ||
        strcmp(o->monitoring.prometheus.path, cfg->monitoring.prometheus.path))
        KRS_LOG_WARNF("reload: monitoring.prometheus.* changed: needs a restart");
    if (o->server.max_queue != cfg->server.max_queue)
        KRS_LOG_WARNF("reload: server.maxQueue changed: needs a restart");
}

void server_stop(struct server *s)
{
    if (!s) return;
    watch_stop(s);
    if (s->d_mon) MHD_stop_daemon(s->d_mon);
    if (s->d_main) MHD_stop_daemon(s->d_main);
    server_rpc_free(s);
    if (s->slots) {
        for (int i = 0; i < SERVER_SLOTS; i++) pthread_mutex_destroy(&s->slots[i].lock);
        alloc_free(s->slots);
    }
    pthread_mutex_destroy(&s->rt_lock);
    pthread_mutex_destroy(&s->free_lock);
    alloc_free(s);
}
