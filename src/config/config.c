/* The configuration pipeline: defaults < file < environment < flags, then cross-key checks; and
 * the two views of the result (text dump with sources, cJSON). Values are parsed and stored only
 * through config_keys.c; this file decides where they come from and in which order. */
#include "config/config_impl.h"
#include "krserve.h"

#include <stdlib.h>
#include <string.h>
#include <unistd.h>

void config_defaults(struct krs_config *cfg)
{
    memset(cfg, 0, sizeof *cfg);
    const struct config_origin o = {CONFIG_SRC_DEFAULT, 0, 0, NULL};
    char err[256];
    for (size_t i = 0; i < config_key_count(); i++) {
        const struct config_key *k = config_key_at(i);
        /* The registry's defaults are valid by construction (tests/config checks it). */
        (void)config_set_at(cfg, (int)i, k->def, false, &o, err, sizeof err);
    }
}

static int unknown_key(const char *key, char *err, size_t errlen)
{
    const char *s = config_suggest(key);
    if (s)
        snprintf(err, errlen, "%s: unknown key (did you mean %s?)", key, s);
    else
        snprintf(err, errlen, "%s: unknown key", key);
    return KRS_ERR_NOT_FOUND;
}

int config_set(struct krs_config *cfg, const char *key, const char *value,
               enum config_source source, char *err, size_t errlen)
{
    int idx = config_key_find(key);
    if (idx < 0) return unknown_key(key, err, errlen);
    struct config_origin o = {(uint8_t)source, 0, 0, source == CONFIG_SRC_FLAG ? "--set" : NULL};
    return config_set_at(cfg, idx, value ? value : "", false, &o, err, errlen);
}

static const char *env_get(char **envp, const char *name)
{
    if (!envp) return getenv(name);
    size_t n = strlen(name);
    for (char **e = envp; *e; e++)
        if (!strncmp(*e, name, n) && (*e)[n] == '=') return *e + n + 1;
    return NULL;
}

int config_apply_env(struct krs_config *cfg, char **envp, char *err, size_t errlen)
{
    char msg[512];
    for (size_t i = 0; i < config_key_count(); i++) {
        const struct config_key *k = config_key_at(i);
        if (!k->env) continue;
        const char *v = env_get(envp, k->env);
        if (!v || !*v) continue;
        struct config_origin o = {CONFIG_SRC_ENV, 0, 0, k->env};
        int rc = config_set_at(cfg, (int)i, v, false, &o, msg, sizeof msg);
        if (rc) {
            snprintf(err, errlen, "env %s: %s", k->env, msg);
            return rc;
        }
    }
    return KRS_OK;
}

/* Walks argv once. With apply, sets keys and collects the rest; without, only finds --config
 * (the last one wins) so that the file can be read before env and flags. */
static int walk_flags(struct krs_config *cfg, int argc, char **argv, bool apply, char **rest,
                      int *n_rest, const char **config_path, char *err, size_t errlen)
{
    char name[64], msg[512];
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        const char *inline_val = NULL;
        snprintf(name, sizeof name, "%s", a);
        if (!strncmp(a, "--", 2)) {
            const char *eq = strchr(a, '=');
            if (eq && (size_t)(eq - a) < sizeof name) {
                name[eq - a] = '\0';
                inline_val = eq + 1;
            }
        }
        int idx = -1;
        bool is_config = !strcmp(name, "--config"), is_set = !strcmp(name, "--set");
        for (size_t k = 0; !is_config && !is_set && k < config_key_count(); k++) {
            const struct config_key *key = config_key_at(k);
            if ((key->flag && !strcmp(name, key->flag)) ||
                (key->short_flag && !inline_val && !strcmp(a, key->short_flag)))
                idx = (int)k;
        }
        if (!is_config && !is_set && idx < 0) {
            if (!apply) continue;
            if (rest) {
                rest[(*n_rest)++] = argv[i];
                continue;
            }
            snprintf(err, errlen, "unknown option '%s'", a);
            return KRS_ERR_INVALID;
        }
        const char *val = inline_val;
        if (!val) {
            if (i + 1 >= argc) {
                snprintf(err, errlen, "%s: missing value", name);
                return KRS_ERR_INVALID;
            }
            val = argv[++i];
        }
        if (is_config) {
            if (config_path) *config_path = val;
            continue;
        }
        if (!apply) continue;
        int rc;
        if (is_set) {
            const char *eq = strchr(val, '=');
            if (!eq || eq == val || (size_t)(eq - val) >= 256) {
                snprintf(err, errlen, "--set: expected key.path=value, got \"%s\"", val);
                return KRS_ERR_INVALID;
            }
            char key[256];
            memcpy(key, val, (size_t)(eq - val));
            key[eq - val] = '\0';
            int kidx = config_key_find(key);
            if (kidx < 0) {
                rc = unknown_key(key, msg, sizeof msg);
            } else {
                struct config_origin o = {CONFIG_SRC_FLAG, 0, 0, "--set"};
                rc = config_set_at(cfg, kidx, eq + 1, false, &o, msg, sizeof msg);
            }
        } else {
            const struct config_key *key = config_key_at((size_t)idx);
            struct config_origin o = {CONFIG_SRC_FLAG, 0, 0,
                                      strcmp(name, key->flag) ? key->short_flag : key->flag};
            rc = config_set_at(cfg, idx, val, false, &o, msg, sizeof msg);
        }
        if (rc) {
            snprintf(err, errlen, "flag %s: %s", name, msg);
            return rc;
        }
    }
    return KRS_OK;
}

int config_apply_flags(struct krs_config *cfg, int argc, char **argv, char **rest, int *n_rest,
                       char *err, size_t errlen)
{
    int n = 0;
    int rc = walk_flags(cfg, argc, argv, true, rest, &n, NULL, err, errlen);
    if (n_rest) *n_rest = n;
    return rc;
}

/* Numeric value of an INT/DOUBLE key. */
static double num_value(const struct krs_config *cfg, int idx)
{
    const struct config_key *k = config_key_at((size_t)idx);
    const char *f = (const char *)cfg + k->offset;
    if (k->type == CONFIG_T_DOUBLE) return *(const double *)f;
    if (k->size == sizeof(int64_t)) return (double)*(const int64_t *)f;
    return *(const int *)f;
}

/* Reports "<origin>key: must be <op> other (value, source), got value" about whichever of the
 * two keys came from the higher-precedence source (the second on a tie). */
static int pair_error(const struct krs_config *cfg, int a, int b, const char *rel_a,
                      const char *rel_b, char *err, size_t errlen)
{
    int blame = cfg->origin[a].source > cfg->origin[b].source ? a : b;
    int other = blame == a ? b : a;
    char pre[CONFIG_PATH_MAX + 32], v_blame[64], v_other[64], src[CONFIG_PATH_MAX + 32];
    const char *bn = config_key_at((size_t)blame)->name, *on = config_key_at((size_t)other)->name;
    config_origin_prefix(cfg, blame, pre, sizeof pre);
    config_format_value(cfg, bn, v_blame, sizeof v_blame);
    config_format_value(cfg, on, v_other, sizeof v_other);
    config_origin_str(cfg, other, src, sizeof src);
    snprintf(err, errlen, "%s%s: must be %s %s (%s, %s), got %s", pre, bn,
             blame == a ? rel_a : rel_b, on, v_other, src, v_blame);
    return KRS_ERR_INVALID;
}

const char *config_device_name(int device)
{
    return device == CONFIG_DEVICE_CUDA ? "cuda" : "cpu";
}

int config_validate(const struct krs_config *cfg, char *err, size_t errlen)
{
    static const struct {
        const char *lo, *hi;
        bool zero_is_unset; /* lo == 0 or hi == 0 means "not set": no check */
    } ordered[] = {
        {"performance.gpuScheduler.autoTune.minBatch", "performance.gpuScheduler.autoTune.maxBatch",
         false},
        {"performance.adaptiveBatching.windowMinMs", "performance.adaptiveBatching.windowMaxMs",
         false},
        {"model.contextLength", "model.kvCacheTokens", true},
    };
    for (size_t i = 0; i < sizeof ordered / sizeof ordered[0]; i++) {
        int lo = config_key_find(ordered[i].lo), hi = config_key_find(ordered[i].hi);
        double vl = num_value(cfg, lo), vh = num_value(cfg, hi);
        if (ordered[i].zero_is_unset && (vl == 0 || vh == 0)) continue;
        if (vl > vh) return pair_error(cfg, lo, hi, "<=", ">=", err, errlen);
    }
    if (cfg->monitoring.prometheus.port != 0 &&
        cfg->monitoring.prometheus.port == cfg->server.port) {
        int a = config_key_find("server.port"), b = config_key_find("monitoring.prometheus.port");
        return pair_error(cfg, a, b, "different from", "0 or different from", err, errlen);
    }
    return KRS_OK;
}

int config_load(struct krs_config *cfg, const char *file, char **envp, int argc, char **argv,
                char **rest, int *n_rest, char *err, size_t errlen)
{
    int rc;
    const char *path = file;
    if (n_rest) *n_rest = 0;
    config_defaults(cfg);
    rc = walk_flags(cfg, argc, argv, false, NULL, NULL, &path, err, errlen);
    if (rc) goto out;
    if (!path) {
        const char *e = env_get(envp, "KRSERVE_CONFIG");
        if (e && *e) path = e;
    }
    if (!path && access(CONFIG_DEFAULT_FILE, F_OK) == 0) path = CONFIG_DEFAULT_FILE;
    if (path) {
        rc = config_apply_file(cfg, path, err, errlen);
        if (rc) goto out;
    }
    rc = config_apply_env(cfg, envp, err, errlen);
    if (rc) goto out;
    rc = config_apply_flags(cfg, argc, argv, rest, n_rest, err, errlen);
    if (rc) goto out;
    rc = config_validate(cfg, err, errlen);
out:
    return rc;
}

int config_source_of(const struct krs_config *cfg, const char *name)
{
    int idx = config_key_find(name);
    return idx < 0 ? -1 : cfg->origin[idx].source;
}

void config_dump(const struct krs_config *cfg, FILE *f)
{
    char val[CONFIG_PATH_MAX], src[CONFIG_PATH_MAX + 32];
    fprintf(f, "# kr-serve effective configuration (precedence: flag > env > file > default)\n");
    fprintf(f, "# config file: %s\n", cfg->file[0] ? cfg->file : "none");
    for (size_t i = 0; i < config_key_count(); i++) {
        const struct config_key *k = config_key_at(i);
        config_format_value(cfg, k->name, val, sizeof val);
        config_origin_str(cfg, (int)i, src, sizeof src);
        fprintf(f, "%-44s = %-12s # %s\n", k->name, val, src);
    }
}

/* The object for the sections of `name` ("a.b.c" -> root.a.b), created as needed. */
static cJSON *json_parent(cJSON *root, const char *name, const char **leaf)
{
    char seg[128];
    const char *p = name, *dot;
    cJSON *obj = root;
    while ((dot = strchr(p, '.'))) {
        size_t n = (size_t)(dot - p) < sizeof seg - 1 ? (size_t)(dot - p) : sizeof seg - 1;
        memcpy(seg, p, n);
        seg[n] = '\0';
        cJSON *next = cJSON_GetObjectItemCaseSensitive(obj, seg);
        if (!next) next = cJSON_AddObjectToObject(obj, seg);
        if (!next) return NULL;
        obj = next;
        p = dot + 1;
    }
    *leaf = p;
    return obj;
}

int config_to_json(const struct krs_config *cfg, bool with_sources, cJSON **out)
{
    int rc = KRS_ERR_NOMEM;
    cJSON *root = cJSON_CreateObject(), *sources = NULL;
    if (!root) goto out;
    if (with_sources && !(sources = cJSON_CreateObject())) goto out;
    for (size_t i = 0; i < config_key_count(); i++) {
        const struct config_key *k = config_key_at(i);
        const char *leaf;
        cJSON *parent = json_parent(root, k->name, &leaf), *item = NULL;
        if (!parent) goto out;
        const char *f = (const char *)cfg + k->offset;
        switch (k->type) {
        case CONFIG_T_BOOL:
            item = cJSON_AddBoolToObject(parent, leaf, *(const bool *)f);
            break;
        case CONFIG_T_INT:
        case CONFIG_T_DOUBLE:
            item = cJSON_AddNumberToObject(parent, leaf, num_value(cfg, (int)i));
            break;
        case CONFIG_T_STRING:
            if (!*f)
                item = cJSON_AddNullToObject(parent, leaf);
            else
                item = cJSON_AddStringToObject(parent, leaf,
                                               f == cfg->server.api_key ? "<redacted>" : f);
            break;
        case CONFIG_T_ENUM:
            item = cJSON_AddStringToObject(parent, leaf, k->enum_names[*(const int *)f]);
            break;
        case CONFIG_T_INTLIST: {
            const int *v = (const int *)f;
            item = cJSON_AddArrayToObject(parent, leaf);
            for (int j = 0; item && j < cfg->monitoring.metrics.n_windows_sec; j++) {
                cJSON *num = cJSON_CreateNumber(v[j]);
                if (!num || !cJSON_AddItemToArray(item, num)) {
                    cJSON_Delete(num);
                    goto out;
                }
            }
            break;
        }
        }
        if (!item) goto out;
        if (sources) {
            char src[CONFIG_PATH_MAX + 32];
            config_origin_str(cfg, (int)i, src, sizeof src);
            if (!cJSON_AddStringToObject(sources, k->name, src)) goto out;
        }
    }
    if (sources) {
        if (!cJSON_AddItemToObject(root, "sources", sources)) goto out;
        sources = NULL; /* owned by root now */
    }
    *out = root;
    root = NULL;
    rc = KRS_OK;
out:
    cJSON_Delete(sources);
    cJSON_Delete(root);
    return rc;
}

enum config_sched_mode config_effective_sched_mode(const struct krs_config *cfg)
{
    bool enabled = cfg->performance.gpu_scheduler.enabled;
    int mode = cfg->performance.gpu_scheduler.mode;
    if (!enabled || mode == CONFIG_SCHED_OFF) return CONFIG_SCHED_OFF;
    if (mode == CONFIG_SCHED_FIXED || !cfg->performance.gpu_scheduler.auto_tune.enabled)
        return CONFIG_SCHED_FIXED;
    return CONFIG_SCHED_AUTO;
}

void config_free(struct krs_config *cfg)
{
    if (cfg) explicit_bzero(cfg->server.api_key, sizeof cfg->server.api_key);
}
