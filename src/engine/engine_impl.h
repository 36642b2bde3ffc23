/* engine/ internals: the engine's layout, private to engine.c (front ends use the accessors of
 * engine.h, so that what an engine holds can change without touching them). */
#ifndef KRS_ENGINE_IMPL_H
#define KRS_ENGINE_IMPL_H

#include "engine/engine.h"

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

#endif
