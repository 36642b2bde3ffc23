/* Compute backend interface: the operations a transformer forward pass needs, behind a vtable
 * so that a device backend (CUDA) can implement the same functions as the CPU reference.
 *
 * Buffers are host float arrays in row-major [rows, cols] layout; the KV cache is the paged
 * cache of kv/kv.h. Every op is synchronous: when it returns, its outputs are written.
 * A backend belongs to one thread (the engine thread). */
#ifndef KRS_BACKEND_H
#define KRS_BACKEND_H

#include <stdint.h>

struct quant_matrix;
struct kv_cache;
struct backend;

struct backend_attn_args {
    const float *q;     /* [T, n_head * head_dim], already normed/roped */
    float *out;         /* [T, n_head * head_dim] */
    const int32_t *pos; /* [T] */
    const int32_t *seq; /* [T] */
    int T;
    int n_head;
    int n_head_kv;
    int head_dim;
    float scale; /* multiplies q.k */
    int layer;   /* KV cache layer */
    int n_swa;   /* 0: causal over the whole history; else sliding window */
    const struct kv_cache *kv;
};

struct backend_ops {
    const char *name;
    void (*destroy)(struct backend *b);
    /* y[T, w->n_out] = x[T, w->n_in] * W^T */
    int (*matmul)(struct backend *b, const struct quant_matrix *w, const float *x, int T, float *y);
    /* y[t] = x[t] / sqrt(mean(x[t]^2) + eps) * w, for T rows of n (y may alias x) */
    void (*rmsnorm)(struct backend *b, const float *x, const float *w, int T, int n, float eps,
                    float *y);
    /* In-place rotary embedding of T rows of n_heads heads of head_dim; the first n_rot dims
     * rotate, by pairs (x[i], x[i+n_rot/2]) when neox else (x[2i], x[2i+1]). freq_factors
     * ([n_rot/2] or NULL) divide the angles (llama3 rope scaling). */
    void (*rope)(struct backend *b, float *x, const int32_t *pos, int T, int n_heads, int head_dim,
                 int n_rot, float base, float freq_scale, const float *freq_factors, int neox);
    void (*attention)(struct backend *b, const struct backend_attn_args *a);
    /* gate[i] = act(gate[i]) * up[i]; act = tanh-GELU when gelu else SiLU */
    void (*glu)(struct backend *b, float *gate, const float *up, int64_t n, int gelu);
    /* y[i] += x[i] */
    void (*add)(struct backend *b, float *y, const float *x, int64_t n);
    /* y[t] = dequant(emb row ids[t]) * scale */
    int (*embed)(struct backend *b, const struct quant_matrix *emb, const int32_t *ids, int T,
                 float scale, float *y);
    /* Host work beside the forward pass (per-sequence sampling) on the backend's host threads:
     * fn(arg, i, worker) for every i in [0, n), worker in [0, host_threads) naming the calling
     * thread (for per-thread scratch). Returns when all are done. */
    void (*parallel_for)(struct backend *b, int n, void (*fn)(void *arg, int i, int worker),
                         void *arg);
    int (*host_threads)(const struct backend *b);
};

struct backend {
    const struct backend_ops *ops;
};

/* CPU backend: n_threads workers (0 = all CPUs), matmuls of up to max_rows x max_n_in, attention
 * over up to max_ctx positions. The caller owns *out (b->ops->destroy). */
int backend_cpu_create(int n_threads, int max_rows, int64_t max_n_in, int max_ctx,
                       struct backend **out);

#endif
