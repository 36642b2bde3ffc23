/* The key registry: the one table that declares every configuration key (name, type, field,
 * range, env var, flag, help) and the code that turns a value's text into a typed field.
 * The file parser, env, flags, --set, dump and JSON all go through here; nothing else knows the
 * field layout. */
#include "config/config_impl.h"
#include "krserve.h"

#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define OFF(field) offsetof(struct krs_config, field), sizeof(((struct krs_config *)0)->field)

static const char *const sched_modes[] = {"auto", "fixed", "off", NULL};
static const char *const devices[] = {"cpu", "cuda", NULL};
static const char *const log_levels[] = {"debug", "info", "warn", "error", "off", NULL};

static int check_url_path(const void *field, char *msg, size_t len)
{
    const char *s = field;
    if (s[0] != '/') {
        snprintf(msg, len, "must start with '/', got \"%s\"", s);
        return -1;
    }
    for (const char *p = s; *p; p++) {
        if (*p <= ' ' || *p == '?' || *p == '#' || *p == 0x7f) {
            snprintf(msg, len, "must be a plain URL path (no spaces, '?' or '#'), got \"%s\"", s);
            return -1;
        }
    }
    return 0;
}

static int check_host(const void *field, char *msg, size_t len)
{
    const char *s = field;
    for (const char *p = s; *p; p++) {
        if (*p <= ' ' || *p == '/' || *p == 0x7f) {
            snprintf(msg, len, "expected a host name or IP address, got \"%s\"", s);
            return -1;
        }
    }
    return 0;
}

/* clang-format off */
static const struct config_key keys[] = {
    {"server.host", "127.0.0.1", CONFIG_T_STRING, OFF(server.host), 1, CONFIG_STR_MAX - 1, NULL, false,
     "KRSERVE_HOST", "--host", NULL, "address the HTTP server binds to", check_host},
    {"server.port", "8080", CONFIG_T_INT, OFF(server.port), 1, 65535, NULL, false,
     "KRSERVE_PORT", "--port", NULL, "HTTP port", NULL},
    {"server.apiKey", "", CONFIG_T_STRING, OFF(server.api_key), 1, CONFIG_STR_MAX - 1, NULL, true,
     "KRSERVE_API_KEY", "--api-key", NULL, "bearer token required on API routes; null = none", NULL},
    {"server.maxBodyBytes", "1048576", CONFIG_T_INT, OFF(server.max_body_bytes), 1024, 1073741824.0, NULL,
     false, NULL, NULL, NULL, "largest accepted request body in bytes", NULL},
    {"server.maxPromptTokens", "8192", CONFIG_T_INT, OFF(server.max_prompt_tokens), 1, 16777216, NULL,
     false, NULL, NULL, NULL, "longest accepted prompt in tokens", NULL},
    {"server.maxTokensLimit", "4096", CONFIG_T_INT, OFF(server.max_tokens_limit), 1, 16777216, NULL,
     false, NULL, NULL, NULL, "largest max_tokens a request may ask for", NULL},
    {"server.requestTimeoutMs", "600000", CONFIG_T_INT, OFF(server.request_timeout_ms), 1, 86400000, NULL,
     false, NULL, NULL, NULL, "end-to-end limit per request in ms", NULL},
    {"server.maxQueue", "256", CONFIG_T_INT, OFF(server.max_queue), 1, 1048576, NULL, false,
     NULL, NULL, NULL, "waiting requests before new ones get 429", NULL},
    {"server.threads", "8", CONFIG_T_INT, OFF(server.threads), 1, 1024, NULL, false,
     NULL, NULL, NULL, "HTTP threads", NULL},
    {"server.idleTimeoutSec", "60", CONFIG_T_INT, OFF(server.idle_timeout_s), 0, 86400, NULL, false,
     NULL, NULL, NULL, "seconds without traffic before a connection is closed; 0 = never", NULL},
    {"server.drainTimeoutMs", "30000", CONFIG_T_INT, OFF(server.drain_timeout_ms), 0, 3600000, NULL,
     false, NULL, NULL, NULL, "how long shutdown waits for running requests in ms", NULL},

    {"model.path", "", CONFIG_T_STRING, OFF(model.path), 1, CONFIG_PATH_MAX - 1, NULL, true,
     "KRSERVE_MODEL", "--model", "-m", "model loaded at start; null = the default model", NULL},
    {"model.dir", "models", CONFIG_T_STRING, OFF(model.dir), 1, CONFIG_PATH_MAX - 1, NULL, false,
     NULL, "--model-dir", NULL, "the only directory load_model may open", NULL},
    {"model.name", "", CONFIG_T_STRING, OFF(model.name), 1, CONFIG_STR_MAX - 1, NULL, true,
     NULL, NULL, NULL, "served model id; null = the model file's stem", NULL},
    {"model.kvCacheTokens", "16384", CONFIG_T_INT, OFF(model.kv_cache_tokens), 0, 16777216, NULL, false,
     NULL, "--kv-tokens", NULL,
     "KV cache capacity in tokens, shared by all sequences; clamped to the device's free memory; "
     "0 = as much as it holds", NULL},
    {"model.maxBatchTokens", "512", CONFIG_T_INT, OFF(model.max_batch_tokens), 1, 65536, NULL, false,
     NULL, NULL, NULL, "prefill token budget per step", NULL},
    {"model.device", "cpu", CONFIG_T_ENUM, OFF(model.device), 0, 0, devices, false,
     "KRSERVE_DEVICE", "--device", NULL, "compute backend: cpu or cuda (a CUDA build on a GPU)",
     NULL},
    {"model.memoryBudgetMB", "0", CONFIG_T_INT, OFF(model.memory_budget_mb), 0, 16777216, NULL,
     false, NULL, NULL, NULL,
     "memory the CPU backend may reserve for KV and buffers in MiB; 0 = the available memory",
     NULL},
    {"model.threads", "0", CONFIG_T_INT, OFF(model.threads), 0, 1024, NULL, false,
     NULL, "--threads", NULL, "compute threads; 0 = all cores", NULL},
    {"model.contextLength", "0", CONFIG_T_INT, OFF(model.context_length), 0, 16777216, NULL, false,
     NULL, NULL, NULL, "context length; 0 = the model's, capped by kvCacheTokens", NULL},

    {"performance.gpuScheduler.enabled", "true", CONFIG_T_BOOL,
     OFF(performance.gpu_scheduler.enabled), 0, 0, NULL, false, "MLX_GPU_SCHEDULER", NULL, NULL,
     "batched scheduling; off = one request at a time (rollback path)", NULL},
    {"performance.gpuScheduler.mode", "auto", CONFIG_T_ENUM, OFF(performance.gpu_scheduler.mode), 0, 0,
     sched_modes, false, NULL, NULL, NULL, "auto (tuned batch limit), fixed (batchSize) or off",
     NULL},
    {"performance.gpuScheduler.batchSize", "4", CONFIG_T_INT,
     OFF(performance.gpu_scheduler.batch_size), 1, 1024, NULL, false,
     "MLX_GPU_SCHEDULER_BATCH_SIZE", NULL, NULL, "batch limit in fixed mode; start value in auto",
     NULL},
    {"performance.gpuScheduler.batchWindowMs", "2.0", CONFIG_T_DOUBLE,
     OFF(performance.gpu_scheduler.batch_window_ms), 0, 1000, NULL, false,
     "MLX_GPU_SCHEDULER_WINDOW_MS", NULL, NULL, "admission window when adaptive batching is off",
     NULL},
    {"performance.gpuScheduler.p99ThresholdMs", "100.0", CONFIG_T_DOUBLE,
     OFF(performance.gpu_scheduler.p99_threshold_ms), 0.1, 600000, NULL, false,
     "MLX_GPU_SCHEDULER_P99_THRESHOLD_MS", NULL, NULL, "step-latency P99 target of the auto-tuner",
     NULL},
    {"performance.gpuScheduler.autoTune.enabled", "true", CONFIG_T_BOOL,
     OFF(performance.gpu_scheduler.auto_tune.enabled), 0, 0, NULL, false, "MLX_AUTO_TUNE", NULL,
     NULL, "auto-tune the batch limit (mode auto)", NULL},
    {"performance.gpuScheduler.autoTune.minBatch", "1", CONFIG_T_INT,
     OFF(performance.gpu_scheduler.auto_tune.min_batch), 1, 1024, NULL, false,
     "MLX_AUTO_TUNE_MIN_BATCH", NULL, NULL, "lowest batch limit the tuner may choose", NULL},
    {"performance.gpuScheduler.autoTune.maxBatch", "32", CONFIG_T_INT,
     OFF(performance.gpu_scheduler.auto_tune.max_batch), 1, 1024, NULL, false,
     "MLX_AUTO_TUNE_MAX_BATCH", NULL, NULL, "highest batch limit the tuner may choose", NULL},
    {"performance.gpuScheduler.autoTune.emaAlpha", "0.3", CONFIG_T_DOUBLE,
     OFF(performance.gpu_scheduler.auto_tune.ema_alpha), 0.01, 1, NULL, false,
     "MLX_AUTO_TUNE_EMA_ALPHA", NULL, NULL, "EMA smoothing of the step-latency P99", NULL},
    {"performance.gpuScheduler.autoTune.interval", "10", CONFIG_T_INT,
     OFF(performance.gpu_scheduler.auto_tune.interval), 1, 100000, NULL, false,
     "MLX_AUTO_TUNE_INTERVAL", NULL, NULL, "steps between tuning decisions", NULL},
    {"performance.gpuScheduler.autoTune.lateWaitMs", "100", CONFIG_T_DOUBLE,
     OFF(performance.gpu_scheduler.auto_tune.late_wait_ms), 0, 600000, NULL, false,
     "KRSERVE_LATE_WAIT_MS", NULL, NULL,
     "queue wait after which a request is admitted against the late step-latency bound", NULL},
    {"performance.gpuScheduler.autoTune.lateP99Factor", "2.0", CONFIG_T_DOUBLE,
     OFF(performance.gpu_scheduler.auto_tune.late_p99_factor), 1, 100, NULL, false,
     "KRSERVE_LATE_P99_FACTOR", NULL, NULL,
     "late admissions keep the step P99 within this multiple of the target", NULL},

    {"performance.adaptiveBatching.enabled", "true", CONFIG_T_BOOL,
     OFF(performance.adaptive_batching.enabled), 0, 0, NULL, false,
     "MLX_ENABLE_ADAPTIVE_BATCHING", NULL, NULL, "admission window adapts to the arrival rate",
     NULL},
    {"performance.adaptiveBatching.windowMinMs", "0.75", CONFIG_T_DOUBLE,
     OFF(performance.adaptive_batching.window_min_ms), 0, 1000, NULL, false,
     "MLX_BATCH_WINDOW_MIN_MS", NULL, NULL, "shortest adaptive admission window", NULL},
    {"performance.adaptiveBatching.windowMaxMs", "3.0", CONFIG_T_DOUBLE,
     OFF(performance.adaptive_batching.window_max_ms), 0, 1000, NULL, false,
     "MLX_BATCH_WINDOW_MAX_MS", NULL, NULL, "longest adaptive admission window", NULL},
    {"performance.adaptiveBatching.priorityLevels", "3", CONFIG_T_INT,
     OFF(performance.adaptive_batching.priority_levels), 1, 3, NULL, false, NULL, NULL, NULL,
     "priority queues in use (urgent, default, background)", NULL},

    {"performance.prefixCache.enabled", "true", CONFIG_T_BOOL, OFF(performance.prefix_cache.enabled),
     0, 0, NULL, false, "KRSERVE_PREFIX_CACHE", NULL, NULL,
     "reuse the KV cache of prompt prefixes computed before (shared system prompts, chat history)",
     NULL},
    {"performance.prefixCache.maxTokens", "0", CONFIG_T_INT, OFF(performance.prefix_cache.max_tokens),
     0, 1073741824.0, NULL, false, "KRSERVE_PREFIX_CACHE_MAX_TOKENS", NULL, NULL,
     "most cached positions kept while no request uses them; 0 = whatever the KV cache has free",
     NULL},
    {"performance.dedup", "false", CONFIG_T_BOOL, OFF(performance.dedup), 0, 0, NULL, false,
     "KRSERVE_DEDUP", NULL, NULL,
     "identical concurrent greedy (or same-seed) requests share one generation, streamed to each",
     NULL},

    {"monitoring.prometheus.enabled", "true", CONFIG_T_BOOL, OFF(monitoring.prometheus.enabled), 0, 0,
     NULL, false, NULL, NULL, NULL, "serve Prometheus metrics", NULL},
    {"monitoring.prometheus.port", "0", CONFIG_T_INT, OFF(monitoring.prometheus.port), 0, 65535, NULL,
     false, "MLX_PROMETHEUS_PORT", NULL, NULL,
     "extra port for metrics; 0 = main port only", NULL},
    {"monitoring.prometheus.path", "/metrics", CONFIG_T_STRING, OFF(monitoring.prometheus.path), 1,
     CONFIG_STR_MAX - 1, NULL, false, NULL, NULL, NULL, "URL path of the metrics", check_url_path},
    {"monitoring.metrics.enabled", "true", CONFIG_T_BOOL, OFF(monitoring.metrics.enabled), 0, 0, NULL,
     false, "MLX_METRICS_ENABLED", NULL, NULL, "collect metrics", NULL},
    {"monitoring.metrics.windowsSec", "5,30,60", CONFIG_T_INTLIST, OFF(monitoring.metrics.windows_sec), 1,
     86400, NULL, false, NULL, NULL, NULL, "rolling windows in seconds (increasing)", NULL},

    {"logging.level", "info", CONFIG_T_ENUM, OFF(logging.level), 0, 0, log_levels, false,
     "KRSERVE_LOG_LEVEL", "--log-level", NULL, "debug, info, warn, error or off", NULL},
};
/* clang-format on */

#define N_KEYS (sizeof keys / sizeof keys[0])
_Static_assert(N_KEYS <= CONFIG_MAX_KEYS, "raise CONFIG_MAX_KEYS");

size_t config_key_count(void)
{
    return N_KEYS;
}

const struct config_key *config_key_at(size_t i)
{
    return i < N_KEYS ? &keys[i] : NULL;
}

int config_key_find(const char *name)
{
    for (size_t i = 0; i < N_KEYS; i++)
        if (strcmp(keys[i].name, name) == 0) return (int)i;
    return -1;
}

bool config_word_eq(const char *a, const char *b)
{
    for (; *a && *b; a++, b++)
        if (tolower((unsigned char)*a) != tolower((unsigned char)*b)) return false;
    return *a == *b;
}

static size_t edit_distance(const char *a, const char *b)
{
    size_t la = strlen(a), lb = strlen(b);
    if (la > 80 || lb > 80) return 99;
    size_t row[81];
    for (size_t j = 0; j <= lb; j++) row[j] = j;
    for (size_t i = 1; i <= la; i++) {
        size_t diag = row[0];
        row[0] = i;
        for (size_t j = 1; j <= lb; j++) {
            size_t up = row[j];
            size_t sub =
                diag + (tolower((unsigned char)a[i - 1]) != tolower((unsigned char)b[j - 1]));
            size_t best = up + 1 < row[j - 1] + 1 ? up + 1 : row[j - 1] + 1;
            row[j] = sub < best ? sub : best;
            diag = up;
        }
    }
    return row[lb];
}

const char *config_suggest(const char *name)
{
    const char *best = NULL;
    size_t best_d = 3;
    for (size_t i = 0; i < N_KEYS; i++) {
        size_t d = edit_distance(name, keys[i].name);
        if (d < best_d) {
            best_d = d;
            best = keys[i].name;
        }
    }
    return best;
}

static void *field_ptr(struct krs_config *cfg, const struct config_key *k)
{
    return (char *)cfg + k->offset;
}

static bool parse_bool(const char *s, bool *out)
{
    static const char *const yes[] = {"true", "on", "yes", "1"};
    static const char *const no[] = {"false", "off", "no", "0"};
    for (int i = 0; i < 4; i++) {
        if (config_word_eq(s, yes[i])) {
            *out = true;
            return true;
        }
        if (config_word_eq(s, no[i])) {
            *out = false;
            return true;
        }
    }
    return false;
}

static bool parse_int(const char *s, int64_t *out)
{
    if (!*s || isspace((unsigned char)*s)) return false;
    errno = 0;
    char *end;
    long long v = strtoll(s, &end, 10);
    if (errno || *end) return false;
    *out = v;
    return true;
}

static bool parse_double(const char *s, double *out)
{
    if (!*s || isspace((unsigned char)*s)) return false;
    for (const char *p = s; *p; p++)
        if (!strchr("0123456789+-.eE", *p)) return false; /* no hex, inf, nan */
    errno = 0;
    char *end;
    double v = strtod(s, &end);
    if (errno || *end || !isfinite(v)) return false;
    *out = v;
    return true;
}

static void fmt_num(char *buf, size_t len, double v)
{
    snprintf(buf, len, "%.15g", v);
}

/* Writes `key: expected ..., got "text"` (the text shortened and made printable). */
static void bad_value(char *err, size_t errlen, const struct config_key *k, const char *what,
                      const char *text)
{
    char shown[72];
    size_t n = 0;
    for (const char *p = text; *p && n < sizeof shown - 4; p++)
        shown[n++] = (*p >= ' ' && *p < 0x7f) ? *p : '?';
    if (strlen(text) > n) {
        memcpy(shown + n, "...", 3);
        n += 3;
    }
    shown[n] = '\0';
    snprintf(err, errlen, "%s: expected %s, got \"%s\"", k->name, what, shown);
}

static void range_desc(const struct config_key *k, const char *noun, char *buf, size_t len)
{
    char lo[32], hi[32];
    fmt_num(lo, sizeof lo, k->min);
    fmt_num(hi, sizeof hi, k->max);
    snprintf(buf, len, "%s in [%s, %s]", noun, lo, hi);
}

int config_parse_list_elem(int idx, const char *text, int *out, char *err, size_t errlen)
{
    const struct config_key *k = &keys[idx];
    int64_t v;
    if (!parse_int(text, &v) || v < k->min || v > k->max) {
        char what[96];
        range_desc(k, "a list of integers", what, sizeof what);
        bad_value(err, errlen, k, what, text);
        return KRS_ERR_INVALID;
    }
    *out = (int)v;
    return KRS_OK;
}

int config_set_list_at(struct krs_config *cfg, int idx, const int *v, int n,
                       const struct config_origin *o, char *err, size_t errlen)
{
    const struct config_key *k = &keys[idx];
    int cap = (int)(k->size / sizeof(int));
    if (n < 1 || n > cap) {
        snprintf(err, errlen, "%s: expected 1 to %d entries, got %d", k->name, cap, n);
        return KRS_ERR_INVALID;
    }
    for (int i = 1; i < n; i++) {
        if (v[i] <= v[i - 1]) {
            snprintf(err, errlen, "%s: entries must be strictly increasing (%d after %d)", k->name,
                     v[i], v[i - 1]);
            return KRS_ERR_INVALID;
        }
    }
    /* The count lives in the int right after the array (n_windows_sec); the only list key. */
    int *arr = field_ptr(cfg, k);
    memcpy(arr, v, (size_t)n * sizeof(int));
    for (int i = n; i < cap; i++) arr[i] = 0;
    cfg->monitoring.metrics.n_windows_sec = n;
    cfg->origin[idx] = *o;
    return KRS_OK;
}

static int set_list_text(struct krs_config *cfg, int idx, const char *text,
                         const struct config_origin *o, char *err, size_t errlen)
{
    char buf[512];
    const struct config_key *k = &keys[idx];
    if (strlen(text) >= sizeof buf) {
        bad_value(err, errlen, k, "a short list of integers", text);
        return KRS_ERR_INVALID;
    }
    snprintf(buf, sizeof buf, "%s", text);
    char *s = buf;
    while (isspace((unsigned char)*s)) s++;
    size_t L = strlen(s);
    while (L && isspace((unsigned char)s[L - 1])) s[--L] = '\0';
    if (*s == '[') {
        if (L < 2 || s[L - 1] != ']') {
            bad_value(err, errlen, k, "a list like 5,30,60", text);
            return KRS_ERR_INVALID;
        }
        s[L - 1] = '\0';
        s++;
    }
    int v[CONFIG_MAX_WINDOWS];
    int n = 0;
    char *save = NULL;
    for (char *tok = strtok_r(s, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        while (isspace((unsigned char)*tok)) tok++;
        size_t tl = strlen(tok);
        while (tl && isspace((unsigned char)tok[tl - 1])) tok[--tl] = '\0';
        int x, rc = config_parse_list_elem(idx, tok, &x, err, errlen);
        if (rc) return rc;
        if (n < CONFIG_MAX_WINDOWS) v[n] = x;
        n++; /* too many entries: reported by config_set_list_at */
    }
    return config_set_list_at(cfg, idx, v, n, o, err, errlen);
}

int config_set_at(struct krs_config *cfg, int idx, const char *text, bool is_null,
                  const struct config_origin *o, char *err, size_t errlen)
{
    const struct config_key *k = &keys[idx];
    void *f = field_ptr(cfg, k);
    char what[128];

    if (is_null && !(k->type == CONFIG_T_STRING && k->nullable)) {
        switch (k->type) {
        case CONFIG_T_BOOL:
            snprintf(what, sizeof what, "a boolean");
            break;
        case CONFIG_T_INT:
            range_desc(k, "an integer", what, sizeof what);
            break;
        case CONFIG_T_DOUBLE:
            range_desc(k, "a number", what, sizeof what);
            break;
        default:
            snprintf(what, sizeof what, "a value");
        }
        snprintf(err, errlen, "%s: expected %s, got null", k->name, what);
        return KRS_ERR_INVALID;
    }

    switch (k->type) {
    case CONFIG_T_BOOL: {
        bool b;
        if (!parse_bool(text, &b)) {
            bad_value(err, errlen, k, "a boolean (true/false, on/off, yes/no, 1/0)", text);
            return KRS_ERR_INVALID;
        }
        *(bool *)f = b;
        break;
    }
    case CONFIG_T_INT: {
        int64_t v;
        if (!parse_int(text, &v) || v < k->min || v > k->max) {
            range_desc(k, "an integer", what, sizeof what);
            bad_value(err, errlen, k, what, text);
            return KRS_ERR_INVALID;
        }
        if (k->size == sizeof(int64_t))
            *(int64_t *)f = v;
        else
            *(int *)f = (int)v;
        break;
    }
    case CONFIG_T_DOUBLE: {
        double v;
        if (!parse_double(text, &v) || v < k->min || v > k->max) {
            range_desc(k, "a number", what, sizeof what);
            bad_value(err, errlen, k, what, text);
            return KRS_ERR_INVALID;
        }
        *(double *)f = v;
        break;
    }
    case CONFIG_T_STRING: {
        if (is_null) {
            memset(f, 0, k->size);
            break;
        }
        size_t n = strlen(text);
        if (n == 0 && k->nullable) {
            memset(f, 0, k->size);
            break;
        }
        if (n < (size_t)k->min || n > (size_t)k->max) {
            snprintf(what, sizeof what, "a non-empty string of at most %.0f bytes", k->max);
            bad_value(err, errlen, k, what, text);
            return KRS_ERR_INVALID;
        }
        if (k->check) {
            char msg[160];
            if (k->check(text, msg, sizeof msg)) {
                snprintf(err, errlen, "%s: %s", k->name, msg);
                return KRS_ERR_INVALID;
            }
        }
        memset(f, 0, k->size);
        memcpy(f, text, n);
        break;
    }
    case CONFIG_T_ENUM: {
        int found = -1;
        for (int i = 0; k->enum_names[i]; i++)
            if (config_word_eq(text, k->enum_names[i])) found = i;
        if (found < 0) {
            size_t m = (size_t)snprintf(what, sizeof what, "one of ");
            for (int i = 0; k->enum_names[i] && m < sizeof what; i++)
                m += (size_t)snprintf(what + m, sizeof what - m, "%s%s", i ? "|" : "",
                                      k->enum_names[i]);
            bad_value(err, errlen, k, what, text);
            return KRS_ERR_INVALID;
        }
        *(int *)f = found;
        break;
    }
    case CONFIG_T_INTLIST:
        return set_list_text(cfg, idx, text, o, err, errlen);
    }
    cfg->origin[idx] = *o;
    return KRS_OK;
}

static void fmt_double(char *buf, size_t len, double v)
{
    snprintf(buf, len, "%.15g", v);
    if (!strpbrk(buf, ".eE") && strlen(buf) + 2 < len) strcat(buf, ".0");
}

int config_format_value(const struct krs_config *cfg, const char *name, char *buf, size_t len)
{
    int idx = config_key_find(name);
    if (idx < 0) return KRS_ERR_NOT_FOUND;
    const struct config_key *k = &keys[idx];
    const void *f = (const char *)cfg + k->offset;
    switch (k->type) {
    case CONFIG_T_BOOL:
        snprintf(buf, len, "%s", *(const bool *)f ? "true" : "false");
        break;
    case CONFIG_T_INT:
        if (k->size == sizeof(int64_t))
            snprintf(buf, len, "%lld", (long long)*(const int64_t *)f);
        else
            snprintf(buf, len, "%d", *(const int *)f);
        break;
    case CONFIG_T_DOUBLE:
        fmt_double(buf, len, *(const double *)f);
        break;
    case CONFIG_T_STRING: {
        const char *s = f;
        if (!*s)
            snprintf(buf, len, "null");
        else if (f == (const void *)cfg->server.api_key)
            snprintf(buf, len, "<redacted>");
        else
            snprintf(buf, len, "%s", s);
        break;
    }
    case CONFIG_T_ENUM:
        snprintf(buf, len, "%s", k->enum_names[*(const int *)f]);
        break;
    case CONFIG_T_INTLIST: {
        const int *v = f;
        size_t m = (size_t)snprintf(buf, len, "[");
        for (int i = 0; i < cfg->monitoring.metrics.n_windows_sec && m < len; i++)
            m += (size_t)snprintf(buf + m, len - m, "%s%d", i ? ", " : "", v[i]);
        if (m < len) snprintf(buf + m, len - m, "]");
        break;
    }
    }
    return KRS_OK;
}

void config_origin_str(const struct krs_config *cfg, int idx, char *buf, size_t len)
{
    const struct config_origin *o = &cfg->origin[idx];
    switch (o->source) {
    case CONFIG_SRC_FILE:
        snprintf(buf, len, "file %s:%d:%d", cfg->file, o->line, o->col);
        break;
    case CONFIG_SRC_ENV:
        snprintf(buf, len, "env %s", o->name ? o->name : "?");
        break;
    case CONFIG_SRC_FLAG:
        snprintf(buf, len, "flag %s", o->name ? o->name : "--set");
        break;
    default:
        snprintf(buf, len, "default");
    }
}

void config_origin_prefix(const struct krs_config *cfg, int idx, char *buf, size_t len)
{
    const struct config_origin *o = &cfg->origin[idx];
    switch (o->source) {
    case CONFIG_SRC_FILE:
        snprintf(buf, len, "%s:%d:%d: ", cfg->file, o->line, o->col);
        break;
    case CONFIG_SRC_ENV:
        snprintf(buf, len, "env %s: ", o->name ? o->name : "?");
        break;
    case CONFIG_SRC_FLAG:
        snprintf(buf, len, "flag %s: ", o->name ? o->name : "--set");
        break;
    default:
        buf[0] = '\0';
    }
}
