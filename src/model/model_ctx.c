/* model_ctx: the runtime of one engine. Creates the backend named by the parameters, uploads
 * the model's weights into it once (a tied output matrix is uploaded once), reserves the
 * activation arena for the largest step, sizes the KV pool from the backend's memory query and
 * reserves it, and creates the KV bookkeeping (kv/) with the same block counts. Everything the
 * step needs is reserved here; model_forward allocates nothing. */
#include "model/model_impl.h"

#include "backend/backend.h"
#include "gguf/gguf.h"
#include "krserve.h"
#include "kv/kv.h"
#include "util/alloc.h"
#include "util/log.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Fraction of the backend's free memory the KV pool may take (the rest: headroom for the
 * device runtime's own allocations). */
#define KV_MEM_FRACTION 0.9

static int upload(struct model_ctx *c, const struct quant_matrix *w, struct backend_tensor **out)
{
    *out = NULL;
    if (!w->data) return KRS_OK; /* absent optional weight */
    return c->be->ops->weight_upload(c->be, w, out);
}

static int upload_vec(struct model_ctx *c, const float *v, int64_t n, struct backend_tensor **out)
{
    struct quant_matrix w = {QUANT_F32, n, 1, v, (uint64_t)n * sizeof(float)};
    return upload(c, &w, out);
}

static int upload_weights(struct model_ctx *c)
{
    const struct model *m = c->m;
    const struct model_hparams *hp = &m->hp;
    const int64_t E = hp->n_embd, hd = hp->head_dim;
    const int64_t qd = (int64_t)hp->n_head * hd, kvd = (int64_t)hp->n_head_kv * hd;
    int rc;
    if ((rc = upload(c, &m->tok_embd, &c->tok_embd))) return rc;
    if (m->output.data == m->tok_embd.data)
        c->output = c->tok_embd; /* tied embeddings: one copy */
    else if ((rc = upload(c, &m->output, &c->output)))
        return rc;
    if ((rc = upload_vec(c, m->output_norm, E, &c->output_norm)) ||
        (rc = upload_vec(c, m->output_bias, hp->n_vocab, &c->output_bias)) ||
        (rc = upload_vec(c, m->rope_freqs, hp->n_rot / 2, &c->rope_freqs)))
        return rc;
    for (int il = 0; il < hp->n_layer; il++) {
        const struct model_layer *L = &m->layers[il];
        struct model_ctx_layer *D = &c->layers[il];
        if ((rc = upload_vec(c, L->attn_norm, E, &D->attn_norm)) ||
            (rc = upload(c, &L->wq, &D->wq)) || (rc = upload(c, &L->wk, &D->wk)) ||
            (rc = upload(c, &L->wv, &D->wv)) || (rc = upload(c, &L->wo, &D->wo)) ||
            (rc = upload_vec(c, L->bq, qd, &D->bq)) || (rc = upload_vec(c, L->bk, kvd, &D->bk)) ||
            (rc = upload_vec(c, L->bv, kvd, &D->bv)) ||
            (rc = upload_vec(c, L->q_norm, hd, &D->q_norm)) ||
            (rc = upload_vec(c, L->k_norm, hd, &D->k_norm)) ||
            (rc = upload_vec(c, L->post_attn_norm, E, &D->post_attn_norm)) ||
            (rc = upload_vec(c, L->ffn_norm, E, &D->ffn_norm)) ||
            (rc = upload(c, &L->w_gate, &D->w_gate)) || (rc = upload(c, &L->w_up, &D->w_up)) ||
            (rc = upload(c, &L->w_down, &D->w_down)) ||
            (rc = upload_vec(c, L->post_ffw_norm, E, &D->post_ffw_norm)))
            return rc;
    }
    return KRS_OK;
}

static uint64_t act_floats(int64_t n)
{
    return ((uint64_t)n + 63) & ~(uint64_t)63; /* room for each tensor's alignment */
}

static int reserve_activations(struct model_ctx *c)
{
    const struct model_hparams *hp = &c->m->hp;
    const int64_t T = c->max_tokens, E = hp->n_embd, L = c->max_logits;
    const int64_t qd = (int64_t)hp->n_head * hp->head_dim;
    const int64_t kvd = (int64_t)hp->n_head_kv * hp->head_dim;
    struct {
        struct backend_tensor **t;
        int64_t n;
    } acts[] = {
        {&c->x, T * E},
        {&c->xn, T * E},
        {&c->tmp, T * E},
        {&c->q, T * qd},
        {&c->k, T * kvd},
        {&c->v, T * kvd},
        {&c->attn, T * qd},
        {&c->gate, T * hp->n_ff},
        {&c->up, T * hp->n_ff},
        {&c->sel, L * E},
        {&c->logits, L * hp->n_vocab},
    };
    const size_t n_acts = sizeof acts / sizeof acts[0];
    uint64_t floats = 0;
    for (size_t i = 0; i < n_acts; i++) floats += act_floats(acts[i].n);
    int rc = c->be->ops->arena_reserve(c->be, floats * sizeof(float));
    for (size_t i = 0; !rc && i < n_acts; i++)
        rc = c->be->ops->act_alloc(c->be, acts[i].n, acts[i].t);
    return rc;
}

/* KV capacity in full-layer positions that fits the backend's free memory next to the sliding
 * pool; the request (0 = as much as fits) is clamped to it. */
static int size_kv(struct model_ctx *c, const struct model_ctx_params *p, int n_full, int n_swa,
                   int64_t swa_tokens, int64_t *kv_tokens, char *err, size_t errlen)
{
    const struct model_hparams *hp = &c->m->hp;
    struct backend_mem_info mi;
    c->be->ops->mem_info(c->be, &mi);
    const uint64_t row = 2ull * (uint64_t)hp->n_head_kv * (uint64_t)hp->head_dim * sizeof(float);
    const uint64_t per_full = row * (uint64_t)n_full, swa_bytes = row * n_swa * swa_tokens;
    const uint64_t avail = (uint64_t)((double)mi.free_bytes * KV_MEM_FRACTION);
    int64_t fits = avail > swa_bytes && per_full ? (int64_t)((avail - swa_bytes) / per_full) : 0;
    if (!per_full) fits = INT64_MAX;
    int64_t want = p->kv_tokens > 0 ? p->kv_tokens : (int64_t)p->max_seqs * hp->n_ctx_train;
    int64_t got = want < fits ? want : fits;
    if (got < 16) {
        snprintf(err, errlen,
                 "KV cache does not fit: %s has %llu MiB free, %llu MiB taken by weights and "
                 "buffers",
                 c->be->ops->name, (unsigned long long)(mi.free_bytes >> 20),
                 (unsigned long long)((mi.total_bytes - mi.free_bytes) >> 20));
        return KRS_ERR_NOMEM;
    }
    if (got < p->kv_tokens)
        KRS_LOG_WARNF("KV cache: %lld tokens asked, %lld fit the %s backend's %llu MiB free",
                      (long long)p->kv_tokens, (long long)got, c->be->ops->name,
                      (unsigned long long)(mi.free_bytes >> 20));
    *kv_tokens = got;
    return KRS_OK;
}

/* What the KV of a token sequence depends on besides the tokens: the weights (file size and
 * the hyper-parameters stand for them) and the element type. Seeds the prefix cache's hash
 * chains so that no cached block could ever be taken for another model's. */
static uint64_t model_identity(const struct model *m)
{
    const struct model_hparams *hp = &m->hp;
    uint64_t h = 0xcbf29ce484222325ull ^ gguf_file_size(m->gguf) ^ (sizeof(float) << 56);
    const unsigned char *b = (const unsigned char *)hp;
    for (size_t i = 0; i < sizeof *hp; i++) h = (h ^ b[i]) * 0x100000001b3ull;
    return h;
}

static int create_kv(struct model_ctx *c, const struct model_ctx_params *p, int requested_ctx,
                     char *err, size_t errlen)
{
    const struct model *m = c->m;
    const struct model_hparams *hp = &m->hp;
    int rc = KRS_ERR_NOMEM;
    uint8_t *swa = alloc_calloc((size_t)hp->n_layer, 1);
    if (!swa) return rc;
    int n_swa_layers = 0;
    for (int il = 0; il < hp->n_layer; il++) n_swa_layers += swa[il] = m->layers[il].is_swa;
    const int bs = p->kv_block_size > 0 ? p->kv_block_size : 16;
    /* Sliding layers never need more than window + one batch of positions per sequence. */
    int64_t swa_tokens = 0;
    if (hp->n_swa > 0 && n_swa_layers) {
        swa_tokens = (int64_t)p->max_seqs * (hp->n_swa + 2 * bs) + p->max_batch_tokens;
        if (p->kv_tokens > 0 && swa_tokens > p->kv_tokens) swa_tokens = p->kv_tokens;
    }
    int64_t kv_tokens;
    rc = size_kv(c, p, hp->n_layer - n_swa_layers, n_swa_layers, swa_tokens, &kv_tokens, err,
                 errlen);
    if (rc) goto out;
    c->max_ctx = requested_ctx < kv_tokens ? requested_ctx : (int)kv_tokens;
    struct kv_config kc = {
        .n_layers = hp->n_layer,
        .layer_is_swa = swa,
        .n_swa = hp->n_swa,
        .n_kv_heads = hp->n_head_kv,
        .head_dim = hp->head_dim,
        .block_size = bs,
        .n_tokens = kv_tokens,
        .n_tokens_swa = swa_tokens,
        .max_seqs = p->max_seqs,
        .max_ctx = c->max_ctx,
        .elem_bytes = sizeof(float),
        .prefix_cache = p->prefix_cache,
        .prefix_salt = model_identity(m),
        .prefix_max_tokens = p->prefix_cache_max_tokens,
    };
    if ((rc = kv_create(&kc, &c->kv))) {
        snprintf(err, errlen, "KV cache of %lld tokens: %s", (long long)kv_tokens,
                 krs_status_str(rc));
        goto out;
    }
    struct backend_kv_layout kl = {
        .n_layers = hp->n_layer,
        .layer_group = swa,
        .n_blocks = {kv_group_blocks(c->kv, 0), kv_group_blocks(c->kv, 1)},
        .block_size = bs,
        .kv_dim = hp->n_head_kv * hp->head_dim,
    };
    if ((rc = c->be->ops->kv_reserve(c->be, &kl))) {
        snprintf(err, errlen, "KV pool of %lld tokens on %s: %s", (long long)kv_tokens,
                 c->be->ops->name, krs_status_str(rc));
        goto out;
    }
out:
    alloc_free(swa);
    return rc;
}

int model_ctx_create(const struct model *m, const struct model_ctx_params *p,
                     struct model_ctx **out, char *err, size_t errlen)
{
    *out = NULL;
    const struct model_hparams *hp = &m->hp;
    if (p->max_batch_tokens <= 0 || p->max_seqs <= 0 || p->kv_tokens < 0) {
        snprintf(err, errlen, "invalid context parameters");
        return KRS_ERR_INVALID;
    }
    struct model_ctx *c = alloc_calloc(1, sizeof *c);
    if (!c) return KRS_ERR_NOMEM;
    int rc = KRS_ERR_NOMEM;
    c->m = m;
    c->max_tokens = p->max_batch_tokens;
    c->max_seqs = p->max_seqs;
    c->max_logits = p->max_logits > 0 ? p->max_logits : p->max_seqs;
    if (c->max_logits > c->max_tokens) c->max_logits = c->max_tokens;
    int requested_ctx = p->max_ctx > 0 ? p->max_ctx : hp->n_ctx_train;
    if (p->kv_tokens > 0 && requested_ctx > p->kv_tokens) requested_ctx = (int)p->kv_tokens;

    int64_t max_in = hp->n_ff > hp->n_embd ? hp->n_ff : hp->n_embd;
    if ((int64_t)hp->n_head * hp->head_dim > max_in) max_in = (int64_t)hp->n_head * hp->head_dim;
    struct backend_params bp = {
        .n_threads = p->n_threads,
        .max_tokens = c->max_tokens,
        .max_n_in = max_in,
        .max_ctx = requested_ctx,
        .mem_budget = p->mem_budget,
        .max_sample_edits = c->max_tokens * 256,
        .max_mask_rows = c->max_logits,
        .mask_vocab = (int)hp->n_vocab,
    };
    c->max_sample_edits = bp.max_sample_edits;
    c->max_mask_rows = bp.max_mask_rows;
    const char *fault = getenv("KRSERVE_FAULT_FORWARD_AFTER");
    c->fault_after = fault && *fault ? strtoll(fault, NULL, 10) : -1;
    if ((rc = backend_create(p->device, &bp, &c->be, err, errlen))) goto fail;
    c->layers = alloc_calloc((size_t)hp->n_layer, sizeof *c->layers);
    if (!c->layers) {
        rc = KRS_ERR_NOMEM;
        goto fail;
    }
    if ((rc = upload_weights(c))) {
        struct backend_mem_info mi = {0};
        c->be->ops->mem_info(c->be, &mi);
        snprintf(err, errlen,
                 "uploading weights to %s: %s after %.1f MiB; %.1f MiB free of %.1f MiB "
                 "(the model's matrices: %.1f MiB)",
                 c->be->ops->name, krs_status_str(rc), mi.weights_bytes / 1048576.0,
                 mi.free_bytes / 1048576.0, mi.total_bytes / 1048576.0,
                 model_weight_bytes(m) / 1048576.0);
        goto fail;
    }
    if ((rc = reserve_activations(c))) {
        snprintf(err, errlen, "activation buffers on %s: %s", c->be->ops->name, krs_status_str(rc));
        goto fail;
    }
    if ((rc = create_kv(c, p, requested_ctx, err, errlen))) goto fail;
    rc = KRS_ERR_NOMEM;
    size_t T = (size_t)c->max_tokens, nb = (size_t)kv_max_blocks(c->kv);
    c->slot_to_step = alloc_calloc((size_t)p->max_seqs, sizeof(int32_t));
    c->step_slots = alloc_calloc(T, sizeof(int32_t));
    c->step_seq = alloc_calloc(T, sizeof(int32_t));
    c->step_max_pos = alloc_calloc(T, sizeof(int32_t));
    c->logit_rows = alloc_calloc((size_t)c->max_logits, sizeof(int32_t));
    c->tables[0] = alloc_calloc(T * nb, sizeof(int32_t));
    c->tables[1] = alloc_calloc(T * nb, sizeof(int32_t));
    if (!c->slot_to_step || !c->step_slots || !c->step_seq || !c->step_max_pos || !c->logit_rows ||
        !c->tables[0] || !c->tables[1]) {
        snprintf(err, errlen, "out of memory reserving step buffers");
        goto fail;
    }
    for (int i = 0; i < p->max_seqs; i++) c->slot_to_step[i] = -1;
    struct model_ctx_memory mm;
    model_ctx_memory(c, &mm);
    KRS_LOG_INFOF("device %s: weights %.1f MiB, KV pool %.1f MiB (%lld tokens, %d-token "
                  "context), activations %.1f MiB; %.1f of %.1f MiB free",
                  c->be->ops->name, mm.weights / 1048576.0, mm.kv / 1048576.0,
                  (long long)kv_group_blocks(c->kv, 0) * kv_block_size(c->kv), c->max_ctx,
                  mm.activations / 1048576.0, mm.free_bytes / 1048576.0, mm.total / 1048576.0);
    *out = c;
    return KRS_OK;
fail:
    model_ctx_free(c);
    return rc;
}

void model_ctx_free(struct model_ctx *c)
{
    if (!c) return;
    if (c->be) c->be->ops->destroy(c->be); /* every tensor handle goes with it */
    kv_free(c->kv);
    alloc_free(c->layers);
    alloc_free(c->slot_to_step);
    alloc_free(c->step_slots);
    alloc_free(c->step_seq);
    alloc_free(c->step_max_pos);
    alloc_free(c->logit_rows);
    alloc_free(c->tables[0]);
    alloc_free(c->tables[1]);
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

void model_ctx_memory(const struct model_ctx *c, struct model_ctx_memory *out)
{
    struct backend_mem_info mi = {0};
    c->be->ops->mem_info(c->be, &mi);
    *out = (struct model_ctx_memory){mi.weights_bytes, mi.kv_bytes, mi.activation_bytes,
                                     mi.free_bytes, mi.total_bytes};
}

const char *model_ctx_backend_name(const struct model_ctx *c)
{
    return c->be->ops->name;
}
