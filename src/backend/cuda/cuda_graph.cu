/* CUDA graphs of decode steps: a step of a shape seen before replays a recorded graph of its
 * kernels instead of launching them one by one (~20 launches per layer otherwise).
 *
 * step_begin uploads the step's inputs, then hands cuda_graph_begin the step's shape key (token
 * and logit counts, sequences, the padded block-table width; 0 for steps never recorded: large
 * ones, and those without logits, which have no step_end to launch from). The kernels read
 * every input that varies between steps of one key from the upload, whose layout the key fixes,
 * so a graph recorded for a key is valid for every step of that key. Per key:
 *   - first sight: the step runs eagerly (warm-up: lazy module loads, cuBLAS' first calls),
 *     unless a graph of the same token and logit counts exists already;
 *   - next sight: the ops run as usual but the stream is captured; at cuda_flush the capture is
 *     instantiated, launched and kept with the list of op records (struct cuda_op) it came from;
 *   - later: ops are only validated and compared with the record; cuda_flush launches the graph.
 * A replayed step whose ops differ from the record (another op, argument or tensor, or fewer or
 * more ops) falls back: the ops received so far are enqueued eagerly from the record, the rest
 * as they come, and the graph is dropped (a key that mismatches twice is never recorded again).
 * A failed capture or instantiation runs the recorded ops eagerly instead. So a graph never runs
 * for a step it does not describe. The cache keeps CUDA_GRAPH_CACHE keys, least recently used
 * out. KRS_CUDA_GRAPHS=0 turns it off. Recording allocates (the op list, the graph); replay
 * does not. */
#include "backend/cuda/cuda_impl.h"

extern "C" {
#include "util/alloc.h"
#include "util/log.h"
}

#include <stdlib.h>
#include <string.h>

/* Records are compared with memcmp: no padding bytes in them. */
static_assert(sizeof(struct cuda_op) == 64, "struct cuda_op has padding");

#define CUDA_GRAPH_CACHE 64
#define KEY_SHAPE_MASK   ((1ull << 25) - 1) /* the token and logit counts of a key */

enum { G_FREE = 0, G_SEEN, G_READY, G_NEVER };
enum { M_EAGER = 0, M_CAPTURE, M_REPLAY };

struct graph_entry {
    uint64_t key;
    int state;
    int fails;
    uint64_t used; /* LRU clock */
    cudaGraphExec_t exec;
    struct cuda_op *ops;
    int n_ops;
};

struct cuda_graphs {
    int enabled;
    struct graph_entry e[CUDA_GRAPH_CACHE];
    uint64_t clock;
    int mode;
    struct graph_entry *cur;
    int pos;             /* replay: ops matched so far */
    struct cuda_op *rec; /* capture: ops recorded so far */
    int n_rec, cap_rec;
    uint64_t n_replayed, n_captured, n_dropped;
};

int cuda_graphs_create(struct backend_cuda *c)
{
    struct cuda_graphs *g = (struct cuda_graphs *)alloc_calloc(1, sizeof *g);
    if (!g) return KRS_ERR_NOMEM;
    const char *v = getenv("KRS_CUDA_GRAPHS");
    g->enabled = !(v && !strcmp(v, "0"));
    c->graphs = g;
    return KRS_OK;
}

static void entry_drop(struct graph_entry *e)
{
    if (e->exec) cudaGraphExecDestroy(e->exec);
    e->exec = NULL;
    alloc_free(e->ops);
    e->ops = NULL;
    e->n_ops = 0;
}

static void end_capture(struct backend_cuda *c)
{
    cudaGraph_t gr = NULL;
    cudaStreamEndCapture(c->stream, &gr);
    if (gr) cudaGraphDestroy(gr);
    cudaGetLastError(); /* an invalidated capture leaves its error behind */
}

void cuda_graphs_destroy(struct backend_cuda *c)
{
    struct cuda_graphs *g = c->graphs;
    if (!g) return;
    if (g->mode == M_CAPTURE) end_capture(c);
    if (c->stream) cudaStreamSynchronize(c->stream);
    for (int i = 0; i < CUDA_GRAPH_CACHE; i++) entry_drop(&g->e[i]);
    alloc_free(g->rec);
    if (g->n_captured)
        KRS_LOG_DEBUGF("cuda: graphs: %llu captured, %llu steps replayed, %llu dropped",
                       (unsigned long long)g->n_captured, (unsigned long long)g->n_replayed,
                       (unsigned long long)g->n_dropped);
    alloc_free(g);
    c->graphs = NULL;
}

/* A graph that did not describe its step: never trusted again for this step; the key is tried
 * once more, then left to eager execution. */
static void entry_fail(struct cuda_graphs *g, struct graph_entry *e)
{
    entry_drop(e);
    g->n_dropped++;
    e->state = ++e->fails >= 2 ? G_NEVER : G_SEEN;
}

int cuda_graph_begin(struct backend_cuda *c, uint64_t key)
{
    struct cuda_graphs *g = c->graphs;
    g->mode = M_EAGER;
    g->cur = NULL;
    if (!g->enabled || !key) return KRS_OK;
    struct graph_entry *e = NULL, *lru = NULL;
    int warm = 0; /* a graph of the same token and logit counts: the kernels ran already */
    for (int i = 0; i < CUDA_GRAPH_CACHE; i++) {
        struct graph_entry *x = &g->e[i];
        if (x->state != G_FREE && x->key == key) e = x;
        if (x->state == G_READY && ((x->key ^ key) & KEY_SHAPE_MASK) == 0) warm = 1;
        if (!lru || x->state == G_FREE || (lru->state != G_FREE && x->used < lru->used)) lru = x;
    }
    if (!e) {
        e = lru;
        entry_drop(e);
        memset(e, 0, sizeof *e);
        e->key = key;
        e->state = G_SEEN;
        e->used = ++g->clock;
        if (!warm) return KRS_OK;
    }
    e->used = ++g->clock;
    if (e->state == G_READY) {
        g->mode = M_REPLAY;
        g->cur = e;
        g->pos = 0;
        return KRS_OK;
    }
    if (e->state != G_SEEN) return KRS_OK;
    if (cudaStreamBeginCapture(c->stream, cudaStreamCaptureModeRelaxed) != cudaSuccess) {
        cudaGetLastError();
        e->state = G_NEVER;
        return KRS_OK;
    }
    g->mode = M_CAPTURE;
    g->cur = e;
    g->n_rec = 0;
    return KRS_OK;
}

/* Enqueues recorded ops eagerly (after a capture was abandoned or a replay mismatched). */
static int run_eager(struct backend_cuda *c, const struct cuda_op *ops, int n)
{
    for (int i = 0; i < n; i++) {
        int rc = cuda_fuse_push(c, &ops[i]);
        if (rc) return rc;
    }
    return KRS_OK;
}

/* Capture failed: what was enqueued went into the capture, not to the GPU; run it all now. */
static int capture_abort(struct backend_cuda *c)
{
    struct cuda_graphs *g = c->graphs;
    cuda_fuse_clear(c); /* held-back ops are in the record too */
    end_capture(c);
    g->mode = M_EAGER;
    entry_fail(g, g->cur);
    return run_eager(c, g->rec, g->n_rec);
}

/* Replay mismatch: the graph is dropped, the ops matched so far run eagerly. */
static int replay_abort(struct backend_cuda *c)
{
    struct cuda_graphs *g = c->graphs;
    struct graph_entry *e = g->cur;
    g->mode = M_EAGER;
    struct cuda_op *ops = e->ops;
    e->ops = NULL; /* kept until they ran */
    entry_fail(g, e);
    int rc = run_eager(c, ops, g->pos);
    alloc_free(ops);
    return rc;
}

int cuda_submit(struct backend_cuda *c, const struct cuda_op *op)
{
    struct cuda_graphs *g = c->graphs;
    if (g->mode == M_REPLAY) {
        struct graph_entry *e = g->cur;
        if (g->pos < e->n_ops && !memcmp(&e->ops[g->pos], op, sizeof *op)) {
            g->pos++;
            return KRS_OK;
        }
        int rc = replay_abort(c);
        return rc ? rc : cuda_fuse_push(c, op);
    }
    if (g->mode == M_CAPTURE) {
        if (g->n_rec == g->cap_rec) {
            int cap = g->cap_rec ? 2 * g->cap_rec : 512;
            void *p = alloc_realloc(g->rec, (size_t)cap * sizeof *g->rec);
            if (!p) {
                int rc = capture_abort(c);
                return rc ? rc : cuda_fuse_push(c, op);
            }
            g->rec = (struct cuda_op *)p;
            g->cap_rec = cap;
        }
        memcpy(&g->rec[g->n_rec++], op, sizeof *op);
        int rc = cuda_fuse_push(c, op);
        return rc ? capture_abort(c) : KRS_OK;
    }
    return cuda_fuse_push(c, op);
}

/* Ends a capture: instantiates and keeps the graph, then launches it (the step's work). */
static int capture_end(struct backend_cuda *c)
{
    struct cuda_graphs *g = c->graphs;
    struct graph_entry *e = g->cur;
    if (cuda_fuse_drain(c)) {
        int rc = capture_abort(c);
        return rc ? rc : cuda_fuse_drain(c);
    }
    cudaGraph_t gr = NULL;
    cudaGraphExec_t ex = NULL;
    struct cuda_op *ops = NULL;
    if (cudaStreamEndCapture(c->stream, &gr) != cudaSuccess || !gr || g->n_rec == 0 ||
        cudaGraphInstantiate(&ex, gr, 0) != cudaSuccess ||
        !(ops = (struct cuda_op *)alloc_malloc((size_t)g->n_rec * sizeof *ops))) {
        cudaGetLastError();
        if (gr) cudaGraphDestroy(gr);
        if (ex) cudaGraphExecDestroy(ex);
        g->mode = M_EAGER;
        if (g->n_rec == 0) return KRS_OK; /* nothing to run, nothing to keep */
        entry_fail(g, e);
        int rc = run_eager(c, g->rec, g->n_rec);
        return rc ? rc : cuda_fuse_drain(c);
    }
    cudaGraphDestroy(gr);
    memcpy(ops, g->rec, (size_t)g->n_rec * sizeof *ops);
    e->exec = ex;
    e->ops = ops;
    e->n_ops = g->n_rec;
    e->state = G_READY;
    g->n_captured++;
    g->mode = M_EAGER;
    return CUDA_CHECK(cudaGraphLaunch(ex, c->stream), "graph launch");
}

int cuda_flush(struct backend_cuda *c)
{
    struct cuda_graphs *g = c->graphs;
    if (!g || g->mode == M_EAGER) return cuda_fuse_drain(c);
    if (g->mode == M_CAPTURE) return capture_end(c);
    struct graph_entry *e = g->cur; /* replay */
    if (g->pos != e->n_ops) {
        int rc = replay_abort(c);
        return rc ? rc : cuda_fuse_drain(c);
    }
    g->mode = M_EAGER;
    g->n_replayed++;
    return CUDA_CHECK(cudaGraphLaunch(e->exec, c->stream), "graph launch");
}
