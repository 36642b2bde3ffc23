/* The batched forward pass shared by gemma3, llama and qwen2: the architectures differ only in
 * a few switches (q/k norms, post-norms, biases, GEGLU vs SwiGLU, rope style, embedding scale),
 * all read from the bound weights and hyper-parameters. This file only sequences backend ops:
 * it packs the step's inputs (build_step), hands them to the backend at once, enqueues the ops
 * and collects the logits at step_end. It never touches backend memory and allocates nothing:
 * model_ctx_create reserved every buffer for the largest batch. */
#include "model/model_impl.h"

#include "backend/backend.h"
#include "krserve.h"
#include "kv/kv.h"

#include <string.h>

/* Validates the batch against the KV tables and packs the step's inputs: step-local sequence
 * ids, the block tables of the step's sequences (rows as long as the longest needs) and the
 * rows that want logits. */
static int build_step(struct model_ctx *c, const struct model_batch *b, struct backend_step *s)
{
    const struct model_hparams *hp = &c->m->hp;
    const int T = b->n_tokens;
    if (T <= 0 || T > c->max_tokens) return KRS_ERR_INVALID;
    int n_seqs = 0, n_logits = 0, rc = KRS_OK;
    for (int t = 0; t < T; t++) {
        if (b->tokens[t] < 0 || b->tokens[t] >= hp->n_vocab || b->pos[t] < 0 ||
            b->pos[t] >= c->max_ctx || b->seq[t] < 0 || b->seq[t] >= c->max_seqs) {
            rc = KRS_ERR_INVALID;
            goto out;
        }
        /* Every position this token writes must be held in both groups. */
        for (int il = 0; il < hp->n_layer; il++)
            if (!kv_seq_holds(c->kv, il, b->seq[t], b->pos[t])) {
                rc = KRS_ERR_INVALID;
                goto out;
            }
        int32_t *sl = &c->slot_to_step[b->seq[t]];
        if (*sl < 0) {
            *sl = n_seqs;
            c->step_slots[n_seqs] = b->seq[t];
            c->step_max_pos[n_seqs++] = b->pos[t];
        } else if (b->pos[t] > c->step_max_pos[*sl]) {
            c->step_max_pos[*sl] = b->pos[t];
        }
        c->step_seq[t] = *sl;
        if (b->logits[t]) {
            if (n_logits == c->max_logits) {
                rc = KRS_ERR_INVALID;
                goto out;
            }
            c->logit_rows[n_logits++] = t;
        }
    }
    int bs = kv_block_size(c->kv), max_blocks = 0;
    for (int i = 0; i < n_seqs; i++) {
        int nb = c->step_max_pos[i] / bs + 1;
        if (nb > max_blocks) max_blocks = nb;
    }
    for (int g = 0; g < 2; g++) {
        s->block_table[g] = NULL;
        if (!kv_group_blocks(c->kv, g)) continue;
        for (int i = 0; i < n_seqs; i++)
            memcpy(c->tables[g] + (size_t)i * max_blocks, kv_seq_table(c->kv, g, c->step_slots[i]),
                   (size_t)max_blocks * sizeof(int32_t));
        s->block_table[g] = c->tables[g];
    }
    s->n_tokens = T;
    s->tokens = b->tokens;
    s->pos = b->pos;
    s->seq = c->step_seq;
    s->n_seqs = n_seqs;
    s->max_blocks = max_blocks;
    s->n_logits = n_logits;
    s->logit_rows = c->logit_rows;
out:
    for (int i = 0; i < n_seqs; i++) c->slot_to_step[c->step_slots[i]] = -1;
    return rc;
}

/* The layers, as backend ops. Returns the first failing op's status. */
static int forward_layers(struct model_ctx *c)
{
    const struct model *m = c->m;
    const struct model_hparams *hp = &m->hp;
    struct backend *be = c->be;
    const struct backend_ops *ops = be->ops;
    const int T = c->cur_tokens, E = hp->n_embd, hd = hp->head_dim;
    const int qd = hp->n_head * hd, kvd = hp->n_head_kv * hd;
    const int gemma = hp->arch == MODEL_ARCH_GEMMA3;
    int rc;
    if ((rc = ops->embed(be, c->tok_embd, hp->embed_scale, c->x))) return rc;
    for (int il = 0; il < hp->n_layer; il++) {
        const struct model_ctx_layer *L = &c->layers[il];
        const int swa = m->layers[il].is_swa;
        struct backend_rope_args rq = {
            .x = c->q,
            .n_heads = hp->n_head,
            .head_dim = hd,
            .n_rot = hp->n_rot,
            .base = swa ? hp->rope_base_swa : hp->rope_base,
            .freq_scale = swa ? 1.0f : hp->rope_freq_scale,
            .freq_factors = c->rope_freqs,
            .neox = hp->rope_neox,
        };
        struct backend_rope_args rk = rq;
        rk.x = c->k;
        rk.n_heads = hp->n_head_kv;
        struct backend_attn_args aa = {
            .q = c->q,
            .out = c->attn,
            .layer = il,
            .n_head = hp->n_head,
            .n_head_kv = hp->n_head_kv,
            .head_dim = hd,
            .scale = hp->attn_scale,
            .n_swa = swa ? hp->n_swa : 0,
        };
        if ((rc = ops->rmsnorm(be, c->x, L->attn_norm, T, E, hp->rms_eps, c->xn)) ||
            (rc = ops->matmul(be, L->wq, c->xn, T, c->q)) ||
            (rc = ops->matmul(be, L->wk, c->xn, T, c->k)) ||
            (rc = ops->matmul(be, L->wv, c->xn, T, c->v)) ||
            (L->bq && (rc = ops->add_bias(be, c->q, L->bq, T, qd))) ||
            (L->bk && (rc = ops->add_bias(be, c->k, L->bk, T, kvd))) ||
            (L->bv && (rc = ops->add_bias(be, c->v, L->bv, T, kvd))) ||
            (L->q_norm &&
             (rc = ops->rmsnorm(be, c->q, L->q_norm, T * hp->n_head, hd, hp->rms_eps, c->q))) ||
            (L->k_norm &&
             (rc = ops->rmsnorm(be, c->k, L->k_norm, T * hp->n_head_kv, hd, hp->rms_eps, c->k))) ||
            (rc = ops->rope(be, &rq)) || (rc = ops->rope(be, &rk)) ||
            (rc = ops->kv_store(be, il, c->k, c->v)) || (rc = ops->attention(be, &aa)) ||
            (rc = ops->matmul(be, L->wo, c->attn, T, c->tmp)) ||
            (L->post_attn_norm &&
             (rc = ops->rmsnorm(be, c->tmp, L->post_attn_norm, T, E, hp->rms_eps, c->tmp))) ||
            (rc = ops->add(be, c->x, c->tmp, (int64_t)T * E)))
            return rc;
        if ((rc = ops->rmsnorm(be, c->x, L->ffn_norm, T, E, hp->rms_eps, c->xn)) ||
            (rc = ops->matmul(be, L->w_gate, c->xn, T, c->gate)) ||
            (rc = ops->matmul(be, L->w_up, c->xn, T, c->up)) ||
            (rc = ops->glu(be, c->gate, c->up, (int64_t)T * hp->n_ff, gemma)) ||
            (rc = ops->matmul(be, L->w_down, c->gate, T, c->tmp)) ||
            (L->post_ffw_norm &&
             (rc = ops->rmsnorm(be, c->tmp, L->post_ffw_norm, T, E, hp->rms_eps, c->tmp))) ||
            (rc = ops->add(be, c->x, c->tmp, (int64_t)T * E)))
            return rc;
    }
    return KRS_OK;
}

/* Final norm and output projection of the rows that want logits. */
static int forward_logits(struct model_ctx *c, int n_logits)
{
    const struct model_hparams *hp = &c->m->hp;
    struct backend *be = c->be;
    const struct backend_ops *ops = be->ops;
    const int E = hp->n_embd;
    int rc;
    if (!n_logits) return KRS_OK;
    if ((rc = ops->get_rows(be, c->x, E, c->sel)) ||
        (rc = ops->rmsnorm(be, c->sel, c->output_norm, n_logits, E, hp->rms_eps, c->sel)) ||
        (rc = ops->matmul(be, c->output, c->sel, n_logits, c->logits)) ||
        (c->output_bias &&
         (rc = ops->add_bias(be, c->logits, c->output_bias, n_logits, hp->n_vocab))) ||
        (hp->final_softcap > 0 &&
         (rc = ops->softcap(be, c->logits, (int64_t)n_logits * hp->n_vocab, hp->final_softcap))))
        return rc;
    return KRS_OK;
}

/* Packs, uploads and runs the batch up to the logits of the flagged rows (not synchronised). */
static int forward(struct model_ctx *c, const struct model_batch *b, struct backend_step *s)
{
    int rc;
    if ((rc = build_step(c, b, s))) return rc;
    if (c->fault_after >= 0 && c->fault_after-- == 0) {
        c->fault_after = 0; /* every later forward fails too, like a lost device */
        return KRS_ERR_IO;
    }
    if ((rc = c->be->ops->step_begin(c->be, s))) return rc;
    c->cur_tokens = s->n_tokens;
    if ((rc = forward_layers(c)) || (rc = forward_logits(c, s->n_logits))) return rc;
    return KRS_OK;
}

int model_ctx_samples_on_device(const struct model_ctx *c)
{
    return c->be->ops->sample != NULL;
}

int model_ctx_max_sample_edits(const struct model_ctx *c)
{
    return c->be->ops->sample ? c->max_sample_edits : 0;
}

int model_ctx_max_mask_rows(const struct model_ctx *c)
{
    return c->be->ops->sample ? c->max_mask_rows : 0;
}

int model_forward_begin(struct model_ctx *c, const struct model_batch *b, int *out_n)
{
    struct backend_step s;
    int rc;
    *out_n = 0;
    c->step_open = 0;
    if ((rc = forward(c, b, &s))) return rc;
    if (c->be->ops->step_flush && (rc = c->be->ops->step_flush(c->be))) return rc;
    c->step_logits = s.n_logits;
    c->step_open = 1;
    *out_n = s.n_logits;
    return KRS_OK;
}

/* Closes the step begun by model_forward_begin: KRS_ERR_STATE when none is open. */
static int end_step(struct model_ctx *c, int *n)
{
    if (!c->step_open) return KRS_ERR_STATE;
    c->step_open = 0;
    *n = c->step_logits;
    return KRS_OK;
}

int model_forward_end(struct model_ctx *c, const float **out_logits)
{
    int n, rc;
    *out_logits = NULL;
    if ((rc = end_step(c, &n))) return rc;
    if (n && (rc = c->be->ops->step_end(c->be, c->logits, n, c->m->hp.n_vocab, out_logits)))
        return rc;
    return KRS_OK;
}

/* Whether n_edits edits and the masked rows among masks[0..n_rows) fit the device sampler. */
static int sampling_fits(const struct model_ctx *c, int n_edits, const uint32_t *const *masks,
                         int n_rows)
{
    int n_masked = 0;
    for (int i = 0; masks && i < n_rows; i++) n_masked += masks[i] != NULL;
    return n_edits <= c->max_sample_edits && n_masked <= c->max_mask_rows;
}

int model_forward_end_sampled(struct model_ctx *c, const struct backend_sample_row *rows,
                              const struct backend_logit_edit *edits, int n_edits,
                              const uint32_t *const *masks, const int32_t **out_ids,
                              const float **out_logprobs)
{
    const struct backend_ops *ops = c->be->ops;
    int n, rc;
    *out_ids = NULL;
    *out_logprobs = NULL;
    if (!ops->sample) return KRS_ERR_UNSUPPORTED;
    if ((rc = end_step(c, &n))) return rc;
    if (!sampling_fits(c, n_edits, masks, n)) {
        /* past the limits the caller was given: the step still ends here */
        const float *unused;
        if (n) ops->step_end(c->be, c->logits, n, c->m->hp.n_vocab, &unused);
        return KRS_ERR_FULL;
    }
    if (n &&
        ((rc = ops->sample(c->be, c->logits, n, c->m->hp.n_vocab, rows, edits, n_edits, masks)) ||
         (rc = ops->step_end_sampled(c->be, n, out_ids, out_logprobs))))
        return rc;
    return KRS_OK;
}

int model_forward_sampled(struct model_ctx *c, const struct model_batch *b,
                          const struct backend_sample_row *rows,
                          const struct backend_logit_edit *edits, int n_edits,
                          const uint32_t *const *masks, const int32_t **out_ids,
                          const float **out_logprobs, int *out_n)
{
    int rc, n_rows = 0;
    *out_ids = NULL;
    *out_logprobs = NULL;
    if (!c->be->ops->sample) return KRS_ERR_UNSUPPORTED;
    /* checked before anything runs: KRS_ERR_FULL means the caller may run it on the host */
    for (int i = 0; i < b->n_tokens; i++) n_rows += b->logits[i] != 0;
    if (!sampling_fits(c, n_edits, masks, n_rows)) return KRS_ERR_FULL;
    if ((rc = model_forward_begin(c, b, out_n)) ||
        (rc = model_forward_end_sampled(c, rows, edits, n_edits, masks, out_ids, out_logprobs)))
        return rc;
    return KRS_OK;
}

int model_forward(struct model_ctx *c, const struct model_batch *b, const float **out_logits,
                  int *out_n)
{
    int rc;
    if ((rc = model_forward_begin(c, b, out_n)) || (rc = model_forward_end(c, out_logits)))
        return rc;
    return KRS_OK;
}
