/* The batched forward pass shared by gemma3, llama and qwen2: the architectures differ only in
 * a few switches (q/k norms, post-norms, biases, GEGLU vs SwiGLU, rope style, embedding scale),
 * all read from the bound weights and hyper-parameters. No allocation here: model_ctx_create
 * reserves every buffer for the largest batch. */
#include "model/model_impl.h"

#include "backend/backend.h"
#include "krserve.h"
#include "kv/kv.h"
#include "util/alloc.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

static float *scratch(size_t n)
{
    return alloc_aligned(64, n * sizeof(float));
}

int model_ctx_create(const struct model *m, const struct model_ctx_params *p,
                     struct model_ctx **out, char *err, size_t errlen)
{
    *out = NULL;
    const struct model_hparams *hp = &m->hp;
    if (p->max_batch_tokens <= 0 || p->max_seqs <= 0 || p->kv_tokens <= 0) {
        snprintf(err, errlen, "invalid context parameters");
        return KRS_ERR_INVALID;
    }
    struct model_ctx *c = alloc_calloc(1, sizeof *c);
    if (!c) return KRS_ERR_NOMEM;
    int rc = KRS_ERR_NOMEM;
    c->m = m;
    c->max_tokens = p->max_batch_tokens;
    c->max_logits = p->max_logits > 0 ? p->max_logits : p->max_seqs;
    c->max_ctx = p->max_ctx > 0 ? p->max_ctx : hp->n_ctx_train;
    if (c->max_ctx > p->kv_tokens) c->max_ctx = (int)p->kv_tokens;

    uint8_t *swa = alloc_calloc((size_t)hp->n_layer, 1);
    if (!swa) goto fail;
    for (int il = 0; il < hp->n_layer; il++) swa[il] = m->layers[il].is_swa;
    /* Sliding layers never need more than window + one batch of positions per sequence. */
    int bs = p->kv_block_size > 0 ? p->kv_block_size : 16;
    int64_t swa_tokens = 0;
    if (hp->n_swa > 0) {
        swa_tokens = (int64_t)p->max_seqs * (hp->n_swa + 2 * bs) + p->max_batch_tokens;
        if (swa_tokens > p->kv_tokens) swa_tokens = p->kv_tokens;
    }
    struct kv_config kc = {
        .n_layers = hp->n_layer,
        .layer_is_swa = swa,
        .n_swa = hp->n_swa,
        .n_kv_heads = hp->n_head_kv,
        .head_dim = hp->head_dim,
        .block_size = bs,
        .n_tokens = p->kv_tokens,
        .n_tokens_swa = swa_tokens,
        .max_seqs = p->max_seqs,
        .max_ctx = c->max_ctx,
    };
    rc = kv_create(&kc, &c->kv);
    alloc_free(swa);
    if (rc) {
        snprintf(err, errlen, "KV cache of %lld tokens: %s", (long long)p->kv_tokens,
                 krs_status_str(rc));
        goto fail;
    }
    int64_t max_in = hp->n_ff > hp->n_embd ? hp->n_ff : hp->n_embd;
    if ((int64_t)hp->n_head * hp->head_dim > max_in) max_in = (int64_t)hp->n_head * hp->head_dim;
    rc = backend_cpu_create(p->n_threads, c->max_tokens, max_in, c->max_ctx, &c->be);
    if (rc) {
        snprintf(err, errlen, "CPU backend: %s", krs_status_str(rc));
        goto fail;
    }
    rc = KRS_ERR_NOMEM;
    size_t T = (size_t)c->max_tokens;
    size_t qd = (size_t)hp->n_head * hp->head_dim, kvd = (size_t)hp->n_head_kv * hp->head_dim;
    c->x = scratch(T * hp->n_embd);
    c->xn = scratch(T * hp->n_embd);
    c->tmp = scratch(T * hp->n_embd);
    c->q = scratch(T * qd);
    c->k = scratch(T * kvd);
    c->v = scratch(T * kvd);
    c->attn = scratch(T * qd);
    c->gate = scratch(T * hp->n_ff);
    c->up = scratch(T * hp->n_ff);
    c->sel = scratch((size_t)c->max_logits * hp->n_embd);
    c->logits = scratch((size_t)c->max_logits * hp->n_vocab);
    if (!c->x || !c->xn || !c->tmp || !c->q || !c->k || !c->v || !c->attn || !c->gate || !c->up ||
        !c->sel || !c->logits) {
        snprintf(err, errlen, "out of memory reserving forward buffers");
        goto fail;
    }
    *out = c;
    return KRS_OK;
fail:
    model_ctx_free(c);
    return rc;
}

void model_ctx_free(struct model_ctx *c)
{
    if (!c) return;
    if (c->be) c->be->ops->destroy(c->be);
    kv_free(c->kv);
    float *bufs[] = {c->x,    c->xn,   c->tmp, c->q,   c->k,     c->v,
                     c->attn, c->gate, c->up,  c->sel, c->logits};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) alloc_aligned_free(bufs[i]);
    alloc_free(c);
}

struct kv_cache *model_ctx_kv(struct model_ctx *c)
{
    return c->kv;
}

int model_ctx_max_batch_tokens(const struct model_ctx *c)
{
    return c->max_tokens;
}

int model_ctx_max_ctx(const struct model_ctx *c)
{
    return c->max_ctx;
}

int model_ctx_host_threads(const struct model_ctx *c)
{
    return c->be->ops->host_threads(c->be);
}

void model_ctx_parallel_for(struct model_ctx *c, int n, void (*fn)(void *arg, int i, int worker),
                            void *arg)
{
    c->be->ops->parallel_for(c->be, n, fn, arg);
}

const char *model_ctx_backend_name(const struct model_ctx *c)
{
    return c->be->ops->name;
}

static void add_bias(float *y, const float *b, int T, int n)
{
    if (!b) return;
    for (int t = 0; t < T; t++)
        for (int i = 0; i < n; i++) y[(size_t)t * n + i] += b[i];
}

static int check_batch(const struct model_ctx *c, const struct model_batch *b, int *n_logits)
{
    const struct model_hparams *hp = &c->m->hp;
    if (b->n_tokens <= 0 || b->n_tokens > c->max_tokens) return KRS_ERR_INVALID;
    int n = 0;
    for (int t = 0; t < b->n_tokens; t++) {
        if (b->tokens[t] < 0 || b->tokens[t] >= hp->n_vocab) return KRS_ERR_INVALID;
        if (b->pos[t] < 0 || b->pos[t] >= c->max_ctx) return KRS_ERR_INVALID;
        /* Every position this token attends to through the newest layer must be held. */
        for (int il = 0; il < hp->n_layer; il++)
            if (!kv_k_row(c->kv, il, b->seq[t], b->pos[t])) return KRS_ERR_INVALID;
        n += b->logits[t] != 0;
    }
    if (n > c->max_logits) return KRS_ERR_INVALID;
    *n_logits = n;
    return KRS_OK;
}

int model_forward(struct model_ctx *c, const struct model_batch *b, const float **out_logits,
                  int *out_n)
{
    const struct model *m = c->m;
    const struct model_hparams *hp = &m->hp;
    struct backend *be = c->be;
    const struct backend_ops *ops = be->ops;
    int n_logits, rc;
    if ((rc = check_batch(c, b, &n_logits))) return rc;

    const int T = b->n_tokens, E = hp->n_embd, hd = hp->head_dim;
    const int qd = hp->n_head * hd, kvd = hp->n_head_kv * hd;
    const int gemma = hp->arch == MODEL_ARCH_GEMMA3;

    if ((rc = ops->embed(be, &m->tok_embd, b->tokens, T, hp->embed_scale, c->x))) return rc;

    for (int il = 0; il < hp->n_layer; il++) {
        const struct model_layer *L = &m->layers[il];
        const float base = L->is_swa ? hp->rope_base_swa : hp->rope_base;
        const float fscale = L->is_swa ? 1.0f : hp->rope_freq_scale;

        ops->rmsnorm(be, c->x, L->attn_norm, T, E, hp->rms_eps, c->xn);
        if ((rc = ops->matmul(be, &L->wq, c->xn, T, c->q)) ||
            (rc = ops->matmul(be, &L->wk, c->xn, T, c->k)) ||
            (rc = ops->matmul(be, &L->wv, c->xn, T, c->v)))
            return rc;
        add_bias(c->q, L->bq, T, qd);
        add_bias(c->k, L->bk, T, kvd);
        add_bias(c->v, L->bv, T, kvd);
        if (L->q_norm) ops->rmsnorm(be, c->q, L->q_norm, T * hp->n_head, hd, hp->rms_eps, c->q);
        if (L->k_norm) ops->rmsnorm(be, c->k, L->k_norm, T * hp->n_head_kv, hd, hp->rms_eps, c->k);
        ops->rope(be, c->q, b->pos, T, hp->n_head, hd, hp->n_rot, base, fscale, m->rope_freqs,
                  hp->rope_neox);
        ops->rope(be, c->k, b->pos, T, hp->n_head_kv, hd, hp->n_rot, base, fscale, m->rope_freqs,
                  hp->rope_neox);
        for (int t = 0; t < T; t++) {
            memcpy(kv_k_row(c->kv, il, b->seq[t], b->pos[t]), c->k + (size_t)t * kvd,
                   (size_t)kvd * sizeof(float));
            memcpy(kv_v_row(c->kv, il, b->seq[t], b->pos[t]), c->v + (size_t)t * kvd,
                   (size_t)kvd * sizeof(float));
        }
        struct backend_attn_args aa = {
            .q = c->q,
            .out = c->attn,
            .pos = b->pos,
            .seq = b->seq,
            .T = T,
            .n_head = hp->n_head,
            .n_head_kv = hp->n_head_kv,
            .head_dim = hd,
            .scale = hp->attn_scale,
            .layer = il,
            .n_swa = L->is_swa ? hp->n_swa : 0,
            .kv = c->kv,
        };
        ops->attention(be, &aa);
        if ((rc = ops->matmul(be, &L->wo, c->attn, T, c->tmp))) return rc;
        if (L->post_attn_norm)
            ops->rmsnorm(be, c->tmp, L->post_attn_norm, T, E, hp->rms_eps, c->tmp);
        ops->add(be, c->x, c->tmp, (int64_t)T * E);

        ops->rmsnorm(be, c->x, L->ffn_norm, T, E, hp->rms_eps, c->xn);
        if ((rc = ops->matmul(be, &L->w_gate, c->xn, T, c->gate)) ||
            (rc = ops->matmul(be, &L->w_up, c->xn, T, c->up)))
            return rc;
        ops->glu(be, c->gate, c->up, (int64_t)T * hp->n_ff, gemma);
        if ((rc = ops->matmul(be, &L->w_down, c->gate, T, c->tmp))) return rc;
        if (L->post_ffw_norm) ops->rmsnorm(be, c->tmp, L->post_ffw_norm, T, E, hp->rms_eps, c->tmp);
        ops->add(be, c->x, c->tmp, (int64_t)T * E);
    }

    int r = 0;
    for (int t = 0; t < T; t++)
        if (b->logits[t])
            memcpy(c->sel + (size_t)r++ * E, c->x + (size_t)t * E, (size_t)E * sizeof(float));
    if (n_logits > 0) {
        ops->rmsnorm(be, c->sel, m->output_norm, n_logits, E, hp->rms_eps, c->sel);
        if ((rc = ops->matmul(be, &m->output, c->sel, n_logits, c->logits))) return rc;
        add_bias(c->logits, m->output_bias, n_logits, hp->n_vocab);
        if (hp->final_softcap > 0) {
            float cap = hp->final_softcap;
            for (size_t i = 0; i < (size_t)n_logits * hp->n_vocab; i++)
                c->logits[i] = cap * tanhf(c->logits[i] / cap);
        }
    }
    *out_logits = c->logits;
    *out_n = n_logits;
    return KRS_OK;
}
