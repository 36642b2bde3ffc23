/* CPU backend: quantized matmuls through quant/, attention over the paged KV cache split over
 * (token, head) pairs on the worker pool, and simple elementwise ops. Reference semantics for
 * every other backend. */
#include "backend/backend.h"

#include "krserve.h"
#include "kv/kv.h"
#include "quant/quant.h"
#include "util/alloc.h"
#include "util/threadpool.h"

#include <math.h>
#include <stdatomic.h>
#include <string.h>

struct backend_cpu {
    struct backend base;
    struct pool *pool;
    struct quant_ctx *qctx;
    int max_ctx;
    float *scores; /* [n_threads][max_ctx] */
    const struct backend_attn_args *attn;
    /* the parallel_for in progress */
    void (*pf_fn)(void *arg, int i, int worker);
    void *pf_arg;
    int pf_n;
    _Atomic int pf_next;
};

static void cpu_destroy(struct backend *b)
{
    struct backend_cpu *c = (struct backend_cpu *)b;
    if (!c) return;
    quant_ctx_free(c->qctx);
    pool_destroy(c->pool);
    alloc_aligned_free(c->scores);
    alloc_free(c);
}

static int cpu_matmul(struct backend *b, const struct quant_matrix *w, const float *x, int T,
                      float *y)
{
    return quant_matmul(((struct backend_cpu *)b)->qctx, w, x, T, y);
}

static void cpu_rmsnorm(struct backend *b, const float *x, const float *w, int T, int n, float eps,
                        float *y)
{
    for (int t = 0; t < T; t++) {
        const float *xr = x + (size_t)t * n;
        float *yr = y + (size_t)t * n;
        double ss = 0.0;
        for (int i = 0; i < n; i++) ss += (double)xr[i] * xr[i];
        float scale = 1.0f / sqrtf((float)(ss / n) + eps);
        for (int i = 0; i < n; i++) yr[i] = xr[i] * scale * w[i];
    }
}

static void cpu_rope(struct backend *b, float *x, const int32_t *pos, int T, int n_heads,
                     int head_dim, int n_rot, float base, float freq_scale,
                     const float *freq_factors, int neox)
{
    int half = n_rot / 2;
    for (int t = 0; t < T; t++) {
        for (int i = 0; i < half; i++) {
            /* theta = p * base^(-2i/n_rot) * freq_scale / ff[i], as ggml computes it */
            double inv = pow((double)base, -2.0 * i / n_rot);
            double theta = (double)pos[t] * inv * freq_scale;
            if (freq_factors) theta /= freq_factors[i];
            float c = (float)cos(theta), s = (float)sin(theta);
            for (int h = 0; h < n_heads; h++) {
                float *v = x + ((size_t)t * n_heads + h) * head_dim;
                int i0 = neox ? i : 2 * i, i1 = neox ? i + half : 2 * i + 1;
                float a = v[i0], bb = v[i1];
                v[i0] = a * c - bb * s;
                v[i1] = a * s + bb * c;
            }
        }
    }
}

static inline float dot_f32(const float *a, const float *b, int n)
{
    float acc[8] = {0};
    int i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++) acc[j] += a[i + j] * b[i + j];
    float s = 0;
    for (; i < n; i++) s += a[i] * b[i];
    for (int j = 0; j < 8; j++) s += acc[j];
    return s;
}

static void attn_task(void *p, int ith, int nth)
{
    struct backend_cpu *c = p;
    const struct backend_attn_args *a = c->attn;
    float *scores = c->scores + (size_t)ith * (size_t)c->max_ctx;
    const int hd = a->head_dim, group = a->n_head / a->n_head_kv;
    long begin, end;
    pool_split((long)a->T * a->n_head, ith, nth, &begin, &end);
    for (long task = begin; task < end; task++) {
        int t = (int)(task / a->n_head), h = (int)(task % a->n_head), g = h / group;
        const float *q = a->q + ((size_t)t * a->n_head + h) * hd;
        float *out = a->out + ((size_t)t * a->n_head + h) * hd;
        int64_t p_end = a->pos[t], lo = 0;
        if (a->n_swa > 0 && p_end - a->n_swa + 1 > 0) lo = p_end - a->n_swa + 1;
        int seq = a->seq[t];
        float mx = -INFINITY;
        for (int64_t p0 = lo; p0 <= p_end;) {
            int run = kv_run_length(a->kv, p0);
            if (p0 + run > p_end + 1) run = (int)(p_end + 1 - p0);
            const float *k = kv_k_row(a->kv, a->layer, seq, p0);
            int dim = kv_dim(a->kv);
            for (int j = 0; j < run; j++) {
                float s = dot_f32(q, k + (size_t)j * dim + (size_t)g * hd, hd) * a->scale;
                scores[p0 - lo + j] = s;
                if (s > mx) mx = s;
            }
            p0 += run;
        }
        int64_t n = p_end - lo + 1;
        float sum = 0;
        for (int64_t j = 0; j < n; j++) {
            scores[j] = expf(scores[j] - mx);
            sum += scores[j];
        }
        float inv = 1.0f / sum;
        memset(out, 0, (size_t)hd * sizeof(float));
        for (int64_t p0 = lo; p0 <= p_end;) {
            int run = kv_run_length(a->kv, p0);
            if (p0 + run > p_end + 1) run = (int)(p_end + 1 - p0);
            const float *v = kv_v_row(a->kv, a->layer, seq, p0);
            int dim = kv_dim(a->kv);
            for (int j = 0; j < run; j++) {
                float w = scores[p0 - lo + j] * inv;
                const float *vr = v + (size_t)j * dim + (size_t)g * hd;
                for (int i = 0; i < hd; i++) out[i] += w * vr[i];
            }
            p0 += run;
        }
    }
}

static void cpu_attention(struct backend *b, const struct backend_attn_args *a)
{
    struct backend_cpu *c = (struct backend_cpu *)b;
    c->attn = a;
    /* (token, head) pairs are the work items: no more threads than items. */
    pool_run_n(c->pool, a->T * a->n_head, attn_task, c);
    c->attn = NULL;
}

static inline float gelu_tanh(float x)
{
    return 0.5f * x * (1.0f + tanhf(0.7978845608f * (x + 0.044715f * x * x * x)));
}

static void cpu_glu(struct backend *b, float *gate, const float *up, int64_t n, int gelu)
{
    if (gelu) {
        for (int64_t i = 0; i < n; i++) gate[i] = gelu_tanh(gate[i]) * up[i];
    } else {
        for (int64_t i = 0; i < n; i++) gate[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
    }
}

static void cpu_add(struct backend *b, float *y, const float *x, int64_t n)
{
    for (int64_t i = 0; i < n; i++) y[i] += x[i];
}

static int cpu_embed(struct backend *b, const struct quant_matrix *emb, const int32_t *ids, int T,
                     float scale, float *y)
{
    for (int t = 0; t < T; t++) {
        if (ids[t] < 0 || ids[t] >= emb->n_out) return KRS_ERR_INVALID;
        float *row = y + (size_t)t * emb->n_in;
        int rc = quant_dequantize(emb->type,
                                  (const uint8_t *)emb->data + (size_t)ids[t] * emb->row_bytes, row,
                                  emb->n_in);
        if (rc) return rc;
        if (scale != 1.0f)
            for (int64_t i = 0; i < emb->n_in; i++) row[i] *= scale;
    }
    return KRS_OK;
}

/* Items are claimed one at a time: they are few (one per sequence) and uneven (top-p sorts). */
static void pf_task(void *arg, int ith, int nth)
{
    struct backend_cpu *c = arg;
    (void)nth;
    for (int i; (i = atomic_fetch_add_explicit(&c->pf_next, 1, memory_order_relaxed)) < c->pf_n;)
        c->pf_fn(c->pf_arg, i, ith);
}

static void cpu_parallel_for(struct backend *b, int n, void (*fn)(void *arg, int i, int worker),
                             void *arg)
{
    struct backend_cpu *c = (struct backend_cpu *)b;
    if (n <= 0) return;
    if (n == 1) {
        fn(arg, 0, 0);
        return;
    }
    c->pf_fn = fn;
    c->pf_arg = arg;
    c->pf_n = n;
    atomic_store_explicit(&c->pf_next, 0, memory_order_relaxed);
    pool_run(c->pool, pf_task, c);
}

static int cpu_host_threads(const struct backend *b)
{
    return pool_size(((const struct backend_cpu *)b)->pool);
}

static const struct backend_ops cpu_ops = {
    .name = "cpu",
    .destroy = cpu_destroy,
    .matmul = cpu_matmul,
    .rmsnorm = cpu_rmsnorm,
    .rope = cpu_rope,
    .attention = cpu_attention,
    .glu = cpu_glu,
    .add = cpu_add,
    .embed = cpu_embed,
    .parallel_for = cpu_parallel_for,
    .host_threads = cpu_host_threads,
};

int backend_cpu_create(int n_threads, int max_rows, int64_t max_n_in, int max_ctx,
                       struct backend **out)
{
    *out = NULL;
    struct backend_cpu *c = alloc_calloc(1, sizeof *c);
    if (!c) return KRS_ERR_NOMEM;
    c->base.ops = &cpu_ops;
    c->max_ctx = max_ctx;
    int rc = KRS_ERR_NOMEM;
    if (pool_create(n_threads, &c->pool)) goto fail;
    rc = quant_ctx_create(c->pool, max_rows, max_n_in, QUANT_ISA_AUTO, &c->qctx);
    if (rc) goto fail;
    rc = KRS_ERR_NOMEM;
    c->scores = alloc_aligned(64, (size_t)pool_size(c->pool) * (size_t)max_ctx * sizeof(float));
    if (!c->scores) goto fail;
    *out = &c->base;
    return KRS_OK;
fail:
    cpu_destroy(&c->base);
    return rc;
}
