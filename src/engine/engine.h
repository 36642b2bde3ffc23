/* Served models: each loaded model is an engine = weights + tokenizer + metrics + scheduler
 * (its own engine thread and KV pool). The registry maps model ids to engines for the HTTP and
 * JSON-RPC front ends, and loads/unloads them at run time.
 *
 * Loading at run time (engine_registry_load with restrict_to_dir) only opens files inside the
 * configured model directory: the name is resolved with realpath and must stay under the
 * directory's realpath; nothing outside it is ever opened.
 *
 * Lifetime: engine_registry_acquire returns a counted reference; the caller uses the engine and
 * gives it back with engine_release. Unloading removes the model from the registry, ends its
 * in-flight requests with "model unloaded", and frees it when the last reference goes.
 * All functions are thread-safe. */
#ifndef KRS_ENGINE_H
#define KRS_ENGINE_H

#include <stddef.h>
#include <stdint.h>

#include "config/config.h"

struct model;
struct tokenizer;
struct metrics;
struct sched;

#define ENGINE_NAME_MAX   256
#define ENGINE_MAX_MODELS 8

struct engine {
    char name[ENGINE_NAME_MAX]; /* the model id clients use */
    char path[4096];
    struct model *model;
    struct tokenizer *tok;
    struct metrics *metrics;
    struct sched *sched;
    uint64_t created_unix; /* seconds, for /v1/models */
    int refs;              /* guarded by the registry lock */
    struct engine_registry *reg;
};

struct engine_registry;

/* cfg is copied (model dir, scheduler and KV settings). */
int engine_registry_create(const struct krs_config *cfg, struct engine_registry **out);
/* Unloads every model (their requests end with "model unloaded") and frees the registry.
 * Call it only after every reference from engine_registry_acquire has been released. */
void engine_registry_destroy(struct engine_registry *r);

/* Loads a model under id `name` (NULL = the file stem). With restrict_to_dir, `path` is a file
 * name relative to the model directory and must resolve inside it (KRS_ERR_INVALID otherwise);
 * without, any path is accepted (the startup model from the command line or config).
 * KRS_ERR_STATE when the id is taken, KRS_ERR_FULL beyond ENGINE_MAX_MODELS, load errors as
 * model_load reports them (message in err). */
int engine_registry_load(struct engine_registry *r, const char *name, const char *path,
                         int restrict_to_dir, char *err, size_t errlen);
/* KRS_ERR_NOT_FOUND when no such model. */
int engine_registry_unload(struct engine_registry *r, const char *name);

/* A counted reference to model `name` (NULL or "" = the first loaded model), or NULL. */
struct engine *engine_registry_acquire(struct engine_registry *r, const char *name);
void engine_release(struct engine *e);

/* Copies up to cap model ids into names (each ENGINE_NAME_MAX bytes); returns the count. */
int engine_registry_list(struct engine_registry *r, char (*names)[ENGINE_NAME_MAX], int cap);
/* Number of loaded models. */
int engine_registry_count(struct engine_registry *r);
/* Number of engine_registry_load calls in progress (a server is "loading" while this is > 0
 * and nothing is loaded yet). */
int engine_registry_loading(struct engine_registry *r);
/* Counts a load that is about to start (+1) or is over (-1) in engine_registry_loading: a front
 * end that listens before it loads holds it around the load, so that a probe in between never
 * sees "no model loaded". */
void engine_registry_hold_loading(struct engine_registry *r, int delta);
/* The configuration the registry was created with. */
const struct krs_config *engine_registry_config(const struct engine_registry *r);

/* Builds scheduler parameters from the configuration (shared by every front end). */
struct sched_params;
void engine_sched_params(const struct krs_config *cfg, struct sched_params *p);

#endif
