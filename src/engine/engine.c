/* Model registry: load/unload at run time, counted references, model-directory confinement. */
#include "engine/engine_impl.h"

#include "krserve.h"
#include "metrics/metrics.h"
#include "model/model.h"
#include "sched/sched.h"
#include "tokenizer/tokenizer.h"
#include "util/alloc.h"
#include "util/clock.h"
#include "util/log.h"

#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

struct engine_registry {
    pthread_mutex_t lock;
    struct krs_config cfg;
    struct engine *models[ENGINE_MAX_MODELS];
    int n;
    int loading; /* loads in progress; guarded by lock */
};

void engine_sched_params(const struct krs_config *cfg, struct sched_params *p)
{
    sched_params_default(p);
#define g (&cfg->performance.gpu_scheduler)
    p->max_queue = cfg->server.max_queue;
    p->max_batch_tokens = cfg->model.max_batch_tokens;
    p->kv_tokens = cfg->model.kv_cache_tokens;
    p->max_ctx = cfg->model.context_length;
    p->n_threads = cfg->model.threads;
    snprintf(p->device, sizeof p->device, "%s", config_device_name(cfg->model.device));
    p->mem_budget = (uint64_t)cfg->model.memory_budget_mb << 20;
    p->auto_min_batch = g->auto_tune.min_batch;
    p->auto_max_batch = g->auto_tune.max_batch;
    p->max_running =
        g->auto_tune.max_batch > g->batch_size ? g->auto_tune.max_batch : g->batch_size;
    p->fixed_batch = g->batch_size;
    p->ema_alpha = g->auto_tune.ema_alpha;
    p->tune_interval = g->auto_tune.interval;
    p->late_wait_ms = g->auto_tune.late_wait_ms;
    p->late_p99_factor = g->auto_tune.late_p99_factor;
    p->p99_target_ms = g->p99_threshold_ms;
    enum config_sched_mode m = config_effective_sched_mode(cfg);
    p->mode = m == CONFIG_SCHED_OFF     ? SCHED_MODE_OFF
              : m == CONFIG_SCHED_FIXED ? SCHED_MODE_FIXED
                                        : SCHED_MODE_AUTO;
    p->prefix_cache = cfg->performance.prefix_cache.enabled;
    p->prefix_cache_max_tokens = cfg->performance.prefix_cache.max_tokens;
    p->dedup = cfg->performance.dedup;
    p->adaptive_window = cfg->performance.adaptive_batching.enabled;
    p->window_min_ms = cfg->performance.adaptive_batching.window_min_ms;
    p->window_max_ms = cfg->performance.adaptive_batching.window_max_ms;
    /* A GPU step costs about the same for 8 sequences as for 1 and grows slowly to hundreds
     * (bench/results/h200): where the batch keys were left at their CPU-sized defaults, a cuda
     * engine may run up to 256 sequences and starts its tuner (and fixed mode) at 32. */
    if (cfg->model.device == CONFIG_DEVICE_CUDA) {
        int k_max = config_key_find("performance.gpuScheduler.autoTune.maxBatch");
        int k_size = config_key_find("performance.gpuScheduler.batchSize");
        if (k_max >= 0 && cfg->origin[k_max].source == CONFIG_SRC_DEFAULT) p->auto_max_batch = 256;
        if (k_size >= 0 && cfg->origin[k_size].source == CONFIG_SRC_DEFAULT)
            p->fixed_batch = p->auto_max_batch < 32 ? p->auto_max_batch : 32;
        p->max_running = p->auto_max_batch > p->fixed_batch ? p->auto_max_batch : p->fixed_batch;
    }
#undef g
}

int engine_registry_create(const struct krs_config *cfg, struct engine_registry **out)
{
    struct engine_registry *r = alloc_calloc(1, sizeof *r);
    if (!r) return KRS_ERR_NOMEM;
    r->cfg = *cfg;
    pthread_mutex_init(&r->lock, NULL);
    *out = r;
    return KRS_OK;
}

static void engine_free(struct engine *e)
{
    sched_destroy(e->sched);
    metrics_destroy(e->metrics);
    tokenizer_free(e->tok);
    model_free(e->model);
    KRS_LOG_INFOF("model '%s' unloaded", e->name);
    alloc_free(e);
}

void engine_release(struct engine *e)
{
    if (!e) return;
    struct engine_registry *r = e->reg;
    pthread_mutex_lock(&r->lock);
    int left = --e->refs;
    pthread_mutex_unlock(&r->lock);
    if (left == 0) engine_free(e);
}

/* Resolves `name` inside the model directory; KRS_ERR_INVALID if it escapes. */
static int resolve_in_dir(const char *dir, const char *name, char *out, size_t cap, char *err,
                          size_t errlen)
{
    char real_dir[PATH_MAX], joined[PATH_MAX * 2], real_file[PATH_MAX];
    if (!name || !*name || name[0] == '/' || strstr(name, "..")) {
        snprintf(err, errlen, "model name must be a file name inside the model directory");
        return KRS_ERR_INVALID;
    }
    if (!realpath(dir, real_dir)) {
        snprintf(err, errlen, "model directory %s does not exist", dir);
        return KRS_ERR_NOT_FOUND;
    }
    snprintf(joined, sizeof joined, "%s/%s", real_dir, name);
    if (!realpath(joined, real_file)) {
        snprintf(err, errlen, "no model '%s' in the model directory", name);
        return KRS_ERR_NOT_FOUND;
    }
    size_t n = strlen(real_dir);
    if (strncmp(real_file, real_dir, n) != 0 || real_file[n] != '/') {
        snprintf(err, errlen, "model '%s' resolves outside the model directory", name);
        return KRS_ERR_INVALID;
    }
    snprintf(out, cap, "%s", real_file);
    return KRS_OK;
}

static void stem_of(const char *path, char *out, size_t cap)
{
    const char *base = strrchr(path, '/');
    base = base ? base + 1 : path;
    snprintf(out, cap, "%s", base);
    char *dot = strrchr(out, '.');
    if (dot && !strcmp(dot, ".gguf")) *dot = '\0';
}

int engine_registry_load(struct engine_registry *r, const char *name, const char *path,
                         int restrict_to_dir, char *err, size_t errlen)
{
    char resolved[4096];
    int rc;
    if (errlen) *err = '\0';
    if (restrict_to_dir) {
        if ((rc = resolve_in_dir(r->cfg.model.dir, path, resolved, sizeof resolved, err, errlen)))
            return rc;
    } else {
        snprintf(resolved, sizeof resolved, "%s", path);
    }
    char id[ENGINE_NAME_MAX];
    if (name && *name)
        snprintf(id, sizeof id, "%s", name);
    else
        stem_of(path, id, sizeof id);

    pthread_mutex_lock(&r->lock);
    int taken = 0;
    for (int i = 0; i < r->n; i++) taken |= !strcmp(r->models[i]->name, id);
    int full = r->n >= ENGINE_MAX_MODELS;
    pthread_mutex_unlock(&r->lock);
    if (taken) {
        snprintf(err, errlen, "model '%s' is already loaded", id);
        return KRS_ERR_STATE;
    }
    if (full) {
        snprintf(err, errlen, "at most %d models can be loaded", ENGINE_MAX_MODELS);
        return KRS_ERR_FULL;
    }

    struct engine *e = alloc_calloc(1, sizeof *e);
    if (!e) {
        snprintf(err, errlen, "out of memory");
        return KRS_ERR_NOMEM;
    }
    int counted_down = 0;
    const char *stage = "model";
    pthread_mutex_lock(&r->lock);
    r->loading++;
    pthread_mutex_unlock(&r->lock);
    snprintf(e->name, sizeof e->name, "%s", id);
    snprintf(e->path, sizeof e->path, "%s", resolved);
    e->created_unix = (uint64_t)time(NULL);
    e->reg = r;
    e->refs = 1; /* the registry's */
    struct sched_params sp;
    engine_sched_params(&r->cfg, &sp);
    if ((rc = model_load(resolved, &e->model, err, errlen))) goto fail;
    stage = "tokenizer";
    if ((rc = tokenizer_load(model_gguf(e->model), &e->tok, err, errlen))) goto fail;
    if ((rc = metrics_create(clock_now_ns(), &e->metrics))) {
        snprintf(err, errlen, "metrics: %s", krs_status_str(rc));
        goto fail;
    }
    stage = "scheduler";
    if ((rc = sched_create(e->model, e->tok, &sp, e->metrics, &e->sched, err, errlen))) goto fail;

    pthread_mutex_lock(&r->lock);
    taken = 0;
    for (int i = 0; i < r->n; i++) taken |= !strcmp(r->models[i]->name, id);
    full = r->n >= ENGINE_MAX_MODELS; /* a concurrent load may have won the race */
    if (!taken && !full) r->models[r->n++] = e;
    r->loading--;
    counted_down = 1;
    pthread_mutex_unlock(&r->lock);
    if (taken || full) {
        if (taken)
            snprintf(err, errlen, "model '%s' is already loaded", id);
        else
            snprintf(err, errlen, "at most %d models can be loaded", ENGINE_MAX_MODELS);
        rc = taken ? KRS_ERR_STATE : KRS_ERR_FULL;
        goto fail;
    }
    KRS_LOG_INFOF("model '%s' loaded from %s", e->name, e->path);
    return KRS_OK;
fail:
    /* Every failure says why, also where a lower layer returned only a status. */
    if (errlen && !*err) snprintf(err, errlen, "%s: %s", stage, krs_status_str(rc));
    pthread_mutex_lock(&r->lock);
    if (!counted_down) r->loading--;
    pthread_mutex_unlock(&r->lock);
    if (e->sched) sched_destroy(e->sched);
    metrics_destroy(e->metrics);
    tokenizer_free(e->tok);
    model_free(e->model);
    alloc_free(e);
    return rc;
}

int engine_registry_unload(struct engine_registry *r, const char *name)
{
    struct engine *e = NULL;
    pthread_mutex_lock(&r->lock);
    for (int i = 0; i < r->n; i++)
        if (!strcmp(r->models[i]->name, name)) {
            e = r->models[i];
            r->models[i] = r->models[--r->n];
            r->models[r->n] = NULL;
            break;
        }
    pthread_mutex_unlock(&r->lock);
    if (!e) return KRS_ERR_NOT_FOUND;
    sched_drain(e->sched);
    sched_cancel_all(e->sched, "model unloaded");
    engine_release(e);
    return KRS_OK;
}

struct engine *engine_registry_acquire(struct engine_registry *r, const char *name)
{
    struct engine *e = NULL;
    pthread_mutex_lock(&r->lock);
    for (int i = 0; i < r->n && !e; i++)
        if (!name || !*name || !strcmp(r->models[i]->name, name)) e = r->models[i];
    if (e) e->refs++;
    pthread_mutex_unlock(&r->lock);
    return e;
}

int engine_registry_list(struct engine_registry *r, char (*names)[ENGINE_NAME_MAX], int cap)
{
    pthread_mutex_lock(&r->lock);
    int n = r->n;
    for (int i = 0; i < n && i < cap; i++)
        snprintf(names[i], ENGINE_NAME_MAX, "%s", r->models[i]->name);
    pthread_mutex_unlock(&r->lock);
    return n;
}

int engine_registry_count(struct engine_registry *r)
{
    pthread_mutex_lock(&r->lock);
    int n = r->n;
    pthread_mutex_unlock(&r->lock);
    return n;
}

int engine_registry_loading(struct engine_registry *r)
{
    pthread_mutex_lock(&r->lock);
    int n = r->loading;
    pthread_mutex_unlock(&r->lock);
    return n;
}

void engine_registry_hold_loading(struct engine_registry *r, int delta)
{
    pthread_mutex_lock(&r->lock);
    r->loading += delta;
    pthread_mutex_unlock(&r->lock);
}

const char *engine_name(const struct engine *e)
{
    return e->name;
}

uint64_t engine_created_unix(const struct engine *e)
{
    return e->created_unix;
}

struct sched *engine_sched(const struct engine *e)
{
    return e->sched;
}

const struct tokenizer *engine_tokenizer(const struct engine *e)
{
    return e->tok;
}

const struct model *engine_model(const struct engine *e)
{
    return e->model;
}

struct metrics *engine_metrics(const struct engine *e)
{
    return e->metrics;
}

const struct krs_config *engine_registry_config(const struct engine_registry *r)
{
    return &r->cfg;
}

void engine_registry_destroy(struct engine_registry *r)
{
    if (!r) return;
    for (;;) {
        char name[ENGINE_NAME_MAX];
        pthread_mutex_lock(&r->lock);
        int n = r->n;
        if (n) snprintf(name, sizeof name, "%s", r->models[0]->name);
        pthread_mutex_unlock(&r->lock);
        if (!n) break;
        engine_registry_unload(r, name);
    }
    pthread_mutex_destroy(&r->lock);
    alloc_free(r);
}
