/* CPU backend: the reference implementation of backend.h. Weights are the GGUF bytes mapped in
 * place (no copy); activations are carved from one host arena; the KV pool is host memory in
 * the layout [group layer][block][position in block][kv_dim] per group, K and V apart. Ops run
 * eagerly on the backend's own worker pool (quantized matmuls through quant/, attention split
 * over (token, head) pairs), so step_end has nothing to wait for. */
#include "backend/backend.h"

#include "backend/cpu/cpu_vec.h"
#include "krserve.h"
#include "quant/quant.h"
#include "util/alloc.h"
#include "util/threadpool.h"

#include <math.h>
#include <stdatomic.h>
#include <string.h>
#include <unistd.h>

struct backend_tensor {
    float *data;           /* activations; F32 weights point here too */
    struct quant_matrix w; /* weights: the mapped view */
    int64_t n;             /* floats (activations) */
    struct backend_tensor *next;
};

struct backend_cpu {
    struct backend base;
    struct backend_params p;
    struct pool *pool;
    struct quant_ctx *qctx;
    struct backend_tensor *tensors;   /* every handle handed out, freed at destroy */
    float *scores;                    /* [n_threads][ATTN_QMAX][max_ctx] attention scratch */
    uint64_t reserved;                /* bytes taken from the budget */
    uint64_t weights_bytes, kv_bytes; /* by use, for mem_info */
    /* arena */
    float *arena;
    uint64_t arena_floats, arena_used;
    /* KV pool */
    struct backend_kv_layout kv;
    uint8_t *layer_group;
    int *group_layer;
    float *k[BACKEND_KV_GROUPS], *v[BACKEND_KV_GROUPS];
    /* the step's inputs, reserved for the largest step */
    int max_table; /* entries reserved per group */
    int32_t *tokens, *pos, *seq, *logit_rows, *tables[BACKEND_KV_GROUPS];
    struct backend_step step;
    /* the attention call in progress: units (tile, KV head, head chunk) claimed one at a time */
    const struct backend_attn_args *attn;
    _Atomic long attn_next;
    long attn_units;
    int attn_hq, attn_hchunks; /* query heads per unit, units per KV head and tile */
    int32_t *attn_tile;        /* [max_tokens + 1] first token of each tile, then T */
    /* the glu call in progress */
    float *glu_g;
    const float *glu_u;
    int64_t glu_n;
    int glu_gelu;
    struct cpu_vec vec;
};

static void cpu_destroy(struct backend *b)
{
    struct backend_cpu *c = (struct backend_cpu *)b;
    if (!c) return;
    for (struct backend_tensor *t = c->tensors, *n; t; t = n) {
        n = t->next;
        alloc_free(t);
    }
    quant_ctx_free(c->qctx);
    pool_destroy(c->pool);
    alloc_aligned_free(c->scores);
    alloc_free(c->attn_tile);
    alloc_aligned_free(c->arena);
    for (int g = 0; g < BACKEND_KV_GROUPS; g++) {
        alloc_aligned_free(c->k[g]);
        alloc_aligned_free(c->v[g]);
        alloc_free(c->tables[g]);
    }
    alloc_free(c->layer_group);
    alloc_free(c->group_layer);
    alloc_free(c->tokens);
    alloc_free(c->pos);
    alloc_free(c->seq);
    alloc_free(c->logit_rows);
    alloc_free(c);
}

static uint64_t budget_bytes(const struct backend_cpu *c)
{
    if (c->p.mem_budget) return c->p.mem_budget;
    long pages = sysconf(_SC_AVPHYS_PAGES), psz = sysconf(_SC_PAGESIZE);
    return pages > 0 && psz > 0 ? (uint64_t)pages * (uint64_t)psz : 0;
}

static void cpu_mem_info(const struct backend *b, struct backend_mem_info *out)
{
    const struct backend_cpu *c = (const struct backend_cpu *)b;
    uint64_t total = budget_bytes(c);
    out->weights_bytes = c->weights_bytes;
    out->kv_bytes = c->kv_bytes;
    out->activation_bytes = c->arena_floats * sizeof(float);
    if (c->p.mem_budget) {
        out->total_bytes = total;
        out->free_bytes = total > c->reserved ? total - c->reserved : 0;
    } else {
        /* The machine's available memory already excludes what we reserved and touched. */
        out->total_bytes = total + c->reserved;
        out->free_bytes = total;
    }
}

static struct backend_tensor *new_tensor(struct backend_cpu *c)
{
    struct backend_tensor *t = alloc_calloc(1, sizeof *t);
    if (!t) return NULL;
    t->next = c->tensors;
    c->tensors = t;
    return t;
}

static int cpu_weight_upload(struct backend *b, const struct quant_matrix *w,
                             struct backend_tensor **out)
{
    struct backend_cpu *c = (struct backend_cpu *)b;
    *out = NULL;
    if (!w->data || w->n_in <= 0 || w->n_out <= 0 || !quant_type_supported(w->type))
        return KRS_ERR_INVALID;
    struct backend_tensor *t = new_tensor(c);
    if (!t) return KRS_ERR_NOMEM;
    t->w = *w; /* mapped: the bytes stay where the GGUF mmap put them */
    c->weights_bytes += w->row_bytes * (uint64_t)w->n_out;
    if (w->type == QUANT_F32) {
        t->data = (float *)w->data;
        t->n = w->n_in * w->n_out;
    }
    *out = t;
    return KRS_OK;
}

static int cpu_arena_reserve(struct backend *b, uint64_t bytes)
{
    struct backend_cpu *c = (struct backend_cpu *)b;
    if (c->arena) return KRS_ERR_INVALID;
    uint64_t floats = (bytes + sizeof(float) - 1) / sizeof(float);
    c->arena = alloc_aligned(64, floats * sizeof(float));
    if (!c->arena) return KRS_ERR_NOMEM;
    c->arena_floats = floats;
    c->reserved += floats * sizeof(float);
    return KRS_OK;
}

static int cpu_act_alloc(struct backend *b, int64_t n, struct backend_tensor **out)
{
    struct backend_cpu *c = (struct backend_cpu *)b;
    *out = NULL;
    uint64_t need = ((uint64_t)n + 15) & ~(uint64_t)15; /* 64-byte aligned tensors */
    if (n <= 0 || c->arena_used + need > c->arena_floats) return KRS_ERR_NOMEM;
    struct backend_tensor *t = new_tensor(c);
    if (!t) return KRS_ERR_NOMEM;
    t->data = c->arena + c->arena_used;
    t->n = n;
    c->arena_used += need;
    *out = t;
    return KRS_OK;
}

static int cpu_kv_reserve(struct backend *b, const struct backend_kv_layout *l)
{
    struct backend_cpu *c = (struct backend_cpu *)b;
    if (c->layer_group || l->n_layers <= 0 || l->block_size <= 0 || l->kv_dim <= 0)
        return KRS_ERR_INVALID;
    c->kv = *l;
    c->layer_group = alloc_calloc((size_t)l->n_layers, 1);
    c->group_layer = alloc_calloc((size_t)l->n_layers, sizeof *c->group_layer);
    if (!c->layer_group || !c->group_layer) return KRS_ERR_NOMEM;
    int count[BACKEND_KV_GROUPS] = {0, 0};
    for (int il = 0; il < l->n_layers; il++) {
        int g = l->layer_group ? l->layer_group[il] : BACKEND_KV_FULL;
        if (g < 0 || g >= BACKEND_KV_GROUPS) return KRS_ERR_INVALID;
        c->layer_group[il] = (uint8_t)g;
        c->group_layer[il] = count[g]++;
    }
    c->kv.layer_group = c->layer_group;
    int blocks_per_seq = c->p.max_ctx / l->block_size + 2;
    c->max_table = c->p.max_tokens * blocks_per_seq;
    for (int g = 0; g < BACKEND_KV_GROUPS; g++) {
        if (!count[g]) continue;
        if (l->n_blocks[g] <= 0) return KRS_ERR_INVALID;
        size_t n =
            (size_t)count[g] * (size_t)l->n_blocks[g] * (size_t)l->block_size * (size_t)l->kv_dim;
        c->k[g] = alloc_aligned(64, n * sizeof(float));
        c->v[g] = alloc_aligned(64, n * sizeof(float));
        c->tables[g] = alloc_calloc((size_t)c->max_table, sizeof(int32_t));
        if (!c->k[g] || !c->v[g] || !c->tables[g]) return KRS_ERR_NOMEM;
        /* Touched now so the first requests do not pay page faults mid-step. */
        memset(c->k[g], 0, n * sizeof(float));
        memset(c->v[g], 0, n * sizeof(float));
        c->reserved += 2 * n * sizeof(float);
        c->kv_bytes += 2 * n * sizeof(float);
    }
    return KRS_OK;
}

static int cpu_step_begin(struct backend *b, const struct backend_step *s)
{
    struct backend_cpu *c = (struct backend_cpu *)b;
    const int T = s->n_tokens;
    if (T <= 0 || T > c->p.max_tokens || s->n_seqs <= 0 || s->n_seqs > T || s->n_logits < 0 ||
        s->n_logits > T || s->max_blocks < 0)
        return KRS_ERR_INVALID;
    int64_t table_n = (int64_t)s->n_seqs * s->max_blocks;
    for (int g = 0; g < BACKEND_KV_GROUPS; g++)
        if (c->tables[g] && (!s->block_table[g] || table_n > c->max_table)) return KRS_ERR_INVALID;
    for (int t = 0; t < T; t++)
        if (s->seq[t] < 0 || s->seq[t] >= s->n_seqs || s->pos[t] < 0 || s->pos[t] >= c->p.max_ctx)
            return KRS_ERR_INVALID;
    for (int i = 0; i < s->n_logits; i++)
        if (s->logit_rows[i] < 0 || s->logit_rows[i] >= T) return KRS_ERR_INVALID;
    memcpy(c->tokens, s->tokens, (size_t)T * sizeof(int32_t));
    memcpy(c->pos, s->pos, (size_t)T * sizeof(int32_t));
    memcpy(c->seq, s->seq, (size_t)T * sizeof(int32_t));
    memcpy(c->logit_rows, s->logit_rows, (size_t)s->n_logits * sizeof(int32_t));
    c->step = *s;
    for (int g = 0; g < BACKEND_KV_GROUPS; g++) {
        c->step.block_table[g] = NULL;
        if (!c->tables[g]) continue;
        memcpy(c->tables[g], s->block_table[g], (size_t)table_n * sizeof(int32_t));
        c->step.block_table[g] = c->tables[g];
    }
    c->step.tokens = c->tokens;
    c->step.pos = c->pos;
    c->step.seq = c->seq;
    c->step.logit_rows = c->logit_rows;
    return KRS_OK;
}

static int cpu_step_end(struct backend *b, const struct backend_tensor *t, int rows, int cols,
                        const float **out)
{
    /* Every op already ran: the logits are in host memory. */
    if (!t->data || (int64_t)rows * cols > t->n) return KRS_ERR_INVALID;
    *out = t->data;
    return KRS_OK;
}

static int cpu_embed(struct backend *b, const struct backend_tensor *emb, float scale,
                     struct backend_tensor *x)
{
    struct backend_cpu *c = (struct backend_cpu *)b;
    const struct quant_matrix *w = &emb->w;
    const int T = c->step.n_tokens;
    if ((int64_t)T * w->n_in > x->n) return KRS_ERR_INVALID;
    for (int t = 0; t < T; t++) {
        int32_t id = c->step.tokens[t];
        if (id < 0 || id >= w->n_out) return KRS_ERR_INVALID;
        float *row = x->data + (size_t)t * (size_t)w->n_in;
        int rc = quant_dequantize(w->type, (const uint8_t *)w->data + (size_t)id * w->row_bytes,
                                  row, w->n_in);
        if (rc) return rc;
        if (scale != 1.0f)
            for (int64_t i = 0; i < w->n_in; i++) row[i] *= scale;
    }
    return KRS_OK;
}

static int cpu_matmul(struct backend *b, const struct backend_tensor *w,
                      const struct backend_tensor *x, int rows, struct backend_tensor *y)
{
    if ((int64_t)rows * w->w.n_in > x->n || (int64_t)rows * w->w.n_out > y->n)
        return KRS_ERR_INVALID;
    return quant_matmul(((struct backend_cpu *)b)->qctx, &w->w, x->data, rows, y->data);
}

/* Row-parallel host ops (RMSNorm, RoPE): rows [r0, r1) per thread, split over the pool once a
 * call has ROWS_PARALLEL_MIN elements (a prefill chunk; a decode step's few rows stay on the
 * calling thread, where waking the workers would cost more than the op). Each row's arithmetic
 * is the same whichever thread runs it and however the rows are split. */
#define ROWS_PARALLEL_MIN 16384

struct rows_job {
    void (*fn)(const struct rows_job *j, int r0, int r1);
    struct backend_cpu *c;
    const void *args;
    int rows;
    /* rmsnorm */
    const float *x, *w;
    float *y;
    int n;
    float eps;
    /* rope: base^(-2i/n_rot) per pair */
    const double *inv_tab;
};

static void rows_task(void *p, int ith, int nth)
{
    const struct rows_job *j = p;
    long r0, r1;
    pool_split(j->rows, ith, nth, &r0, &r1);
    if (r1 > r0) j->fn(j, (int)r0, (int)r1);
}

static void rows_run(struct backend_cpu *c, struct rows_job *j, int64_t elems)
{
    if (elems >= ROWS_PARALLEL_MIN && j->rows > 1)
        pool_run_n(c->pool, j->rows, rows_task, j);
    else
        j->fn(j, 0, j->rows);
}

static void rmsnorm_rows(const struct rows_job *j, int r0, int r1)
{
    const int n = j->n;
    for (int r = r0; r < r1; r++) {
        const float *xr = j->x + (size_t)r * n;
        float *yr = j->y + (size_t)r * n;
        double ss = 0.0;
        for (int i = 0; i < n; i++) ss += (double)xr[i] * xr[i];
        float scale = 1.0f / sqrtf((float)(ss / n) + j->eps);
        for (int i = 0; i < n; i++) yr[i] = xr[i] * scale * j->w[i];
    }
}

static int cpu_rmsnorm(struct backend *b, const struct backend_tensor *x,
                       const struct backend_tensor *w, int rows, int n, float eps,
                       struct backend_tensor *y)
{
    if ((int64_t)rows * n > x->n || (int64_t)rows * n > y->n || w->n < n) return KRS_ERR_INVALID;
    struct rows_job j = {.fn = rmsnorm_rows,
                         .rows = rows,
                         .x = x->data,
                         .w = w->data,
                         .y = y->data,
                         .n = n,
                         .eps = eps};
    rows_run((struct backend_cpu *)b, &j, (int64_t)rows * n);
    return KRS_OK;
}

static int cpu_add_bias(struct backend *b, struct backend_tensor *y,
                        const struct backend_tensor *bias, int rows, int n)
{
    if ((int64_t)rows * n > y->n || bias->n < n) return KRS_ERR_INVALID;
    for (int r = 0; r < rows; r++)
        for (int i = 0; i < n; i++) y->data[(size_t)r * n + i] += bias->data[i];
    return KRS_OK;
}

static int cpu_add(struct backend *b, struct backend_tensor *y, const struct backend_tensor *x,
                   int64_t n)
{
    if (n > y->n || n > x->n) return KRS_ERR_INVALID;
    for (int64_t i = 0; i < n; i++) y->data[i] += x->data[i];
    return KRS_OK;
}

static int cpu_softcap(struct backend *b, struct backend_tensor *x, int64_t n, float cap)
{
    if (n > x->n || !(cap > 0)) return KRS_ERR_INVALID;
    for (int64_t i = 0; i < n; i++) x->data[i] = cap * tanhf(x->data[i] / cap);
    return KRS_OK;
}

/* Elements worth waking a second thread for (the AVX2 GELU takes ~1 ns per element). */
#define GLU_PARALLEL_MIN 32768

static void glu_task(void *p, int ith, int nth)
{
    struct backend_cpu *c = p;
    long b, e;
    /* split in 8-element units so every thread but the last runs whole vectors */
    pool_split((long)((c->glu_n + 7) / 8), ith, nth, &b, &e);
    int64_t i0 = (int64_t)b * 8, i1 = (int64_t)e * 8 < c->glu_n ? (int64_t)e * 8 : c->glu_n;
    if (i1 > i0) c->vec.glu(c->glu_g + i0, c->glu_u + i0, i1 - i0, c->glu_gelu);
}

static int cpu_glu(struct backend *b, struct backend_tensor *gate, const struct backend_tensor *up,
                   int64_t n, int gelu)
{
    struct backend_cpu *c = (struct backend_cpu *)b;
    if (n > gate->n || n > up->n) return KRS_ERR_INVALID;
    c->glu_g = gate->data;
    c->glu_u = up->data;
    c->glu_n = n;
    c->glu_gelu = gelu;
    if (n >= GLU_PARALLEL_MIN)
        pool_run(c->pool, glu_task, c);
    else
        glu_task(c, 0, 1);
    return KRS_OK;
}

#define ROPE_TAB 256 /* rotary pairs tabulated per call (head_dim <= 512) */

static void rope_rows(const struct rows_job *j, int t0, int t1)
{
    const struct backend_cpu *c = j->c;
    const struct backend_rope_args *a = j->args;
    const int half = a->n_rot / 2;
    const float *ff = a->freq_factors ? a->freq_factors->data : NULL;
    for (int t = t0; t < t1; t++) {
        for (int i = 0; i < half; i++) {
            /* theta = p * base^(-2i/n_rot) * freq_scale / ff[i], as ggml computes it */
            double inv = i < ROPE_TAB ? j->inv_tab[i] : pow((double)a->base, -2.0 * i / a->n_rot);
            double theta = (double)c->step.pos[t] * inv * a->freq_scale;
            if (ff) theta /= ff[i];
            float cs = (float)cos(theta), sn = (float)sin(theta);
            for (int h = 0; h < a->n_heads; h++) {
                float *v = a->x->data + ((size_t)t * a->n_heads + h) * a->head_dim;
                int i0 = a->neox ? i : 2 * i, i1 = a->neox ? i + half : 2 * i + 1;
                float x0 = v[i0], x1 = v[i1];
                v[i0] = x0 * cs - x1 * sn;
                v[i1] = x0 * sn + x1 * cs;
            }
        }
    }
}

static int cpu_rope(struct backend *b, const struct backend_rope_args *a)
{
    struct backend_cpu *c = (struct backend_cpu *)b;
    const int T = c->step.n_tokens, half = a->n_rot / 2;
    if ((int64_t)T * a->n_heads * a->head_dim > a->x->n || a->n_rot > a->head_dim || a->n_rot % 2 ||
        (a->freq_factors && a->freq_factors->n < half))
        return KRS_ERR_INVALID;
    /* base^(-2i/n_rot) once per call, not per token (the same values: pure function of i) */
    double inv_tab[ROPE_TAB];
    for (int i = 0; i < half && i < ROPE_TAB; i++)
        inv_tab[i] = pow((double)a->base, -2.0 * i / a->n_rot);
    struct rows_job j = {.fn = rope_rows, .c = c, .args = a, .rows = T, .inv_tab = inv_tab};
    /* sin and cos per (token, pair) dominate: weigh the call by them, not by its floats */
    rows_run(c, &j, (int64_t)T * half * 16);
    return KRS_OK;
}

/* Row of (layer, physical slot) in the pool of the layer's group. */
static inline size_t kv_row(const struct backend_cpu *c, int layer, int64_t block, int in_block)
{
    int g = c->layer_group[layer];
    return (((size_t)c->group_layer[layer] * (size_t)c->kv.n_blocks[g] + (size_t)block) *
                (size_t)c->kv.block_size +
            (size_t)in_block) *
           (size_t)c->kv.kv_dim;
}

/* Physical block of (step sequence, position) in group g, or -1. */
static inline int32_t block_of(const struct backend_cpu *c, int g, int seq, int64_t pos)
{
    int64_t lb = pos / c->kv.block_size;
    if (lb >= c->step.max_blocks) return -1;
    return c->step.block_table[g][(size_t)seq * (size_t)c->step.max_blocks + (size_t)lb];
}

static int cpu_kv_store(struct backend *b, int layer, const struct backend_tensor *k,
                        const struct backend_tensor *v)
{
    struct backend_cpu *c = (struct backend_cpu *)b;
    const int T = c->step.n_tokens, dim = c->kv.kv_dim;
    if (layer < 0 || layer >= c->kv.n_layers || (int64_t)T * dim > k->n || (int64_t)T * dim > v->n)
        return KRS_ERR_INVALID;
    int g = c->layer_group[layer];
    for (int t = 0; t < T; t++) {
        int32_t pb = block_of(c, g, c->step.seq[t], c->step.pos[t]);
        if (pb < 0 || pb >= c->kv.n_blocks[g]) return KRS_ERR_INVALID;
        size_t row = kv_row(c, layer, pb, c->step.pos[t] % c->kv.block_size);
        memcpy(c->k[g] + row, k->data + (size_t)t * dim, (size_t)dim * sizeof(float));
        memcpy(c->v[g] + row, v->data + (size_t)t * dim, (size_t)dim * sizeof(float));
    }
    return KRS_OK;
}

/* Attention runs in units of (tile of consecutive tokens of one sequence, KV head, chunk of the
 * query heads that share it): up to ATTN_QMAX queries that read the same K and V rows. Each K
 * row is loaded once per unit and dotted with every query whose window holds it, then each V row
 * is added into every such query's output, so a 512-token prompt streams K and V through the
 * cache once per tile instead of once per (token, head). Per query the operations and their
 * order are the ones of a query alone (dot per key in ascending position, max, exp_sum, axpy per
 * key in ascending position): a token's output does not depend on the tile it landed in. */
#define ATTN_QMAX 16

/* Keys p .. p + *run - 1 (*run stops at p_hi and at the end of p's KV block) of step sequence
 * seq: the pool row of key p; the others follow it, kv_dim floats apart. One division per run,
 * not per key (checked by cpu_attention). */
static inline size_t key_run(const struct backend_cpu *c, int layer, int g, int seq, int64_t p,
                             int64_t p_hi, int *run)
{
    int off = (int)(p % c->kv.block_size), n = c->kv.block_size - off;
    if (p + n > p_hi + 1) n = (int)(p_hi + 1 - p);
    *run = n;
    return kv_row(c, layer, block_of(c, g, seq, p), off);
}

static void attn_unit(struct backend_cpu *c, const struct backend_attn_args *a, long unit,
                      float *scores)
{
    const int hd = a->head_dim, group = a->n_head / a->n_head_kv;
    const int g = c->layer_group[a->layer], nhc = c->attn_hchunks, hq = c->attn_hq;
    const size_t max_ctx = (size_t)c->p.max_ctx;
    const long per_tile = (long)a->n_head_kv * nhc;
    const int tile = (int)(unit / per_tile), kh = (int)(unit % per_tile / nhc);
    const int h0 = kh * group + (int)(unit % nhc) * hq;
    const int h1 = h0 + hq < (kh + 1) * group ? h0 + hq : (kh + 1) * group, nh = h1 - h0;
    const int t0 = c->attn_tile[tile], t1 = c->attn_tile[tile + 1], nq = (t1 - t0) * nh;
    const int seq = c->step.seq[t0];
    const float *qv[ATTN_QMAX];
    float *ov[ATTN_QMAX], mx[ATTN_QMAX], inv[ATTN_QMAX];
    int64_t lo[ATTN_QMAX] = {0}, hi[ATTN_QMAX] = {0};
    for (int i = 0; i < nq; i++) {
        int t = t0 + i / nh, h = h0 + i % nh;
        qv[i] = a->q->data + ((size_t)t * a->n_head + h) * hd;
        ov[i] = a->out->data + ((size_t)t * a->n_head + h) * hd;
        hi[i] = c->step.pos[t];
        lo[i] = a->n_swa > 0 && hi[i] - a->n_swa + 1 > 0 ? hi[i] - a->n_swa + 1 : 0;
        mx[i] = -INFINITY;
    }
    /* positions ascend within a tile, so do the window starts: keys lo[0] .. hi[nq - 1] */
    const int64_t p_lo = lo[0], p_hi = hi[nq - 1];
    const size_t dim = (size_t)c->kv.kv_dim;
    int run;
    for (int64_t p0 = p_lo; p0 <= p_hi; p0 += run) {
        const float *k = c->k[g] + key_run(c, a->layer, g, seq, p0, p_hi, &run) + (size_t)kh * hd;
        for (int64_t p = p0; p < p0 + run; p++, k += dim)
            for (int i = 0; i < nq; i++) {
                if (p < lo[i] || p > hi[i]) continue;
                float s = c->vec.dot(qv[i], k, hd) * a->scale;
                scores[(size_t)i * max_ctx + (size_t)(p - lo[i])] = s;
                if (s > mx[i]) mx[i] = s;
            }
    }
    for (int i = 0; i < nq; i++) {
        inv[i] = 1.0f / c->vec.exp_sum(scores + (size_t)i * max_ctx, hi[i] - lo[i] + 1, mx[i]);
        memset(ov[i], 0, (size_t)hd * sizeof(float));
    }
    for (int64_t p0 = p_lo; p0 <= p_hi; p0 += run) {
        const float *v = c->v[g] + key_run(c, a->layer, g, seq, p0, p_hi, &run) + (size_t)kh * hd;
        for (int64_t p = p0; p < p0 + run; p++, v += dim)
            for (int i = 0; i < nq; i++)
                if (p >= lo[i] && p <= hi[i])
                    c->vec.axpy(ov[i], scores[(size_t)i * max_ctx + (size_t)(p - lo[i])] * inv[i],
                                v, hd);
    }
}

/* Units are claimed one at a time from a shared counter, last tile first: in a prefill chunk
 * the later tokens see longer windows, so the long units start early and the short ones fill
 * the gaps at the end (a static split would leave one thread the long ones). */
static void attn_task(void *p, int ith, int nth)
{
    struct backend_cpu *c = p;
    const struct backend_attn_args *a = c->attn;
    float *scores = c->scores + (size_t)ith * ATTN_QMAX * (size_t)c->p.max_ctx;
    (void)nth;
    for (;;) {
        long u = atomic_fetch_add_explicit(&c->attn_next, 1, memory_order_relaxed);
        if (u >= c->attn_units) break;
        attn_unit(c, a, c->attn_units - 1 - u, scores);
    }
}

static int cpu_attention(struct backend *b, const struct backend_attn_args *a)
{
    struct backend_cpu *c = (struct backend_cpu *)b;
    const int T = c->step.n_tokens;
    if (a->layer < 0 || a->layer >= c->kv.n_layers || a->n_head_kv <= 0 ||
        a->n_head % a->n_head_kv || a->n_head_kv * a->head_dim != c->kv.kv_dim ||
        (int64_t)T * a->n_head * a->head_dim > a->q->n ||
        (int64_t)T * a->n_head * a->head_dim > a->out->n)
        return KRS_ERR_INVALID;
    /* Every block a query will read must be held: checked here, once, not in the workers. */
    int g = c->layer_group[a->layer];
    for (int t = 0; t < T; t++) {
        int64_t p_end = c->step.pos[t], lo = 0;
        if (a->n_swa > 0 && p_end - a->n_swa + 1 > 0) lo = p_end - a->n_swa + 1;
        for (int64_t p = lo - lo % c->kv.block_size; p <= p_end; p += c->kv.block_size) {
            int32_t pb = block_of(c, g, c->step.seq[t], p);
            if (pb < 0 || pb >= c->kv.n_blocks[g]) return KRS_ERR_INVALID;
        }
    }
    /* tiles: runs of consecutive positions of one sequence, at most ATTN_QMAX / hq tokens */
    const int group = a->n_head / a->n_head_kv;
    c->attn_hq = group < ATTN_QMAX ? group : ATTN_QMAX;
    c->attn_hchunks = (group + c->attn_hq - 1) / c->attn_hq;
    const int tq = ATTN_QMAX / c->attn_hq;
    int n_tiles = 0;
    for (int t = 0; t < T; t++)
        if (t == 0 || c->step.seq[t] != c->step.seq[t - 1] ||
            c->step.pos[t] != c->step.pos[t - 1] + 1 || t - c->attn_tile[n_tiles - 1] == tq)
            c->attn_tile[n_tiles++] = t;
    c->attn_tile[n_tiles] = T;
    c->attn_units = (long)n_tiles * a->n_head_kv * c->attn_hchunks;
    c->attn = a;
    atomic_store_explicit(&c->attn_next, 0, memory_order_relaxed);
    pool_run_dynamic(c->pool, c->attn_units < INT32_MAX ? (int)c->attn_units : INT32_MAX, attn_task,
                     c);
    c->attn = NULL;
    return KRS_OK;
}

static int cpu_get_rows(struct backend *b, const struct backend_tensor *x, int n,
                        struct backend_tensor *dst)
{
    struct backend_cpu *c = (struct backend_cpu *)b;
    if ((int64_t)c->step.n_logits * n > dst->n || (int64_t)c->step.n_tokens * n > x->n)
        return KRS_ERR_INVALID;
    for (int i = 0; i < c->step.n_logits; i++)
        memcpy(dst->data + (size_t)i * n, x->data + (size_t)c->step.logit_rows[i] * n,
               (size_t)n * sizeof(float));
    return KRS_OK;
}

static const struct backend_ops cpu_ops = {
    .name = "cpu",
    .destroy = cpu_destroy,
    .mem_info = cpu_mem_info,
    .weight_upload = cpu_weight_upload,
    .arena_reserve = cpu_arena_reserve,
    .act_alloc = cpu_act_alloc,
    .kv_reserve = cpu_kv_reserve,
    .step_begin = cpu_step_begin,
    .step_end = cpu_step_end,
    .embed = cpu_embed,
    .matmul = cpu_matmul,
    .rmsnorm = cpu_rmsnorm,
    .add_bias = cpu_add_bias,
    .add = cpu_add,
    .softcap = cpu_softcap,
    .glu = cpu_glu,
    .rope = cpu_rope,
    .kv_store = cpu_kv_store,
    .attention = cpu_attention,
    .get_rows = cpu_get_rows,
};

int backend_cpu_create(const struct backend_params *p, struct backend **out)
{
    *out = NULL;
    if (p->max_tokens <= 0 || p->max_n_in <= 0 || p->max_ctx <= 0) return KRS_ERR_INVALID;
    struct backend_cpu *c = alloc_calloc(1, sizeof *c);
    if (!c) return KRS_ERR_NOMEM;
    c->base.ops = &cpu_ops;
    c->p = *p;
    cpu_vec_init(&c->vec, 1);
    int rc = KRS_ERR_NOMEM;
    if (pool_create(p->n_threads, &c->pool)) goto fail;
    rc = quant_ctx_create(c->pool, p->max_tokens, p->max_n_in, QUANT_ISA_AUTO, &c->qctx);
    if (rc) goto fail;
    rc = KRS_ERR_NOMEM;
    c->scores = alloc_aligned(64, (size_t)pool_size(c->pool) * ATTN_QMAX * (size_t)p->max_ctx *
                                      sizeof(float));
    size_t T = (size_t)p->max_tokens;
    c->attn_tile = alloc_calloc(T + 1, sizeof(int32_t));
    c->tokens = alloc_calloc(T, sizeof(int32_t));
    c->pos = alloc_calloc(T, sizeof(int32_t));
    c->seq = alloc_calloc(T, sizeof(int32_t));
    c->logit_rows = alloc_calloc(T, sizeof(int32_t));
    if (!c->scores || !c->attn_tile || !c->tokens || !c->pos || !c->seq || !c->logit_rows)
        goto fail;
    *out = &c->base;
    return KRS_OK;
fail:
    cpu_destroy(&c->base);
    return rc;
}
