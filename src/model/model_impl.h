/* Private model structures shared by model_load.c and model_forward.c. */
#ifndef KRS_MODEL_IMPL_H
#define KRS_MODEL_IMPL_H

#include "model/model.h"
#include "quant/quant.h"

struct backend;
struct backend_tensor;

struct model_layer {
    const float *attn_norm; /* [n_embd] */
    struct quant_matrix wq, wk, wv, wo;
    const float *bq, *bk, *bv;    /* qwen2 biases or NULL */
    const float *q_norm, *k_norm; /* gemma3 [head_dim] or NULL */
    const float *post_attn_norm;  /* gemma3 or NULL */
    const float *ffn_norm;
    struct quant_matrix w_gate, w_up, w_down;
    const float *post_ffw_norm; /* gemma3 or NULL */
    uint8_t is_swa;
};

struct model {
    struct gguf_file *gguf;
    struct model_hparams hp;
    struct quant_matrix tok_embd;
    struct quant_matrix output; /* output.weight or tied token_embd */
    const float *output_norm;
    const float *output_bias;   /* qwen2 optional */
    const float *rope_freqs;    /* llama3 optional [n_rot/2] */
    struct model_layer *layers; /* [n_layer] */
};

/* A layer's weights as the backend holds them (NULL where the model has none). */
struct model_ctx_layer {
    struct backend_tensor *attn_norm, *wq, *wk, *wv, *wo, *bq, *bk, *bv, *q_norm, *k_norm;
    struct backend_tensor *post_attn_norm, *ffn_norm, *w_gate, *w_up, *w_down, *post_ffw_norm;
};

struct model_ctx {
    const struct model *m;
    struct backend *be; /* owned */
    struct kv_cache *kv;
    int max_tokens;
    int max_logits;
    int max_ctx;
    int max_seqs;
    int cur_tokens;       /* T of the step in progress */
    int step_open;        /* model_forward_begin ran; model_forward_end* not yet */
    int step_logits;      /* its rows with logits */
    int max_sample_edits; /* what the backend reserved for device sampling */
    int max_mask_rows;    /* rows with a token mask one sample call may carry */
    /* Fault injection for tests ($KRSERVE_FAULT_FORWARD_AFTER=N): forwards after the N-th
     * fail with KRS_ERR_IO, as a device error would. -1 = off. */
    int64_t fault_after;
    /* Weights in backend memory. */
    struct backend_tensor *tok_embd, *output, *output_norm, *output_bias, *rope_freqs;
    struct model_ctx_layer *layers; /* [n_layer] */
    /* Activations in the backend's arena, reserved for max_tokens rows. Shapes: */
    struct backend_tensor *x;      /* [T, n_embd] residual stream */
    struct backend_tensor *xn;     /* [T, n_embd] normed input */
    struct backend_tensor *tmp;    /* [T, n_embd] */
    struct backend_tensor *q;      /* [T, n_head * head_dim] */
    struct backend_tensor *k;      /* [T, n_head_kv * head_dim] */
    struct backend_tensor *v;      /* [T, n_head_kv * head_dim] */
    struct backend_tensor *attn;   /* [T, n_head * head_dim] */
    struct backend_tensor *gate;   /* [T, n_ff] */
    struct backend_tensor *up;     /* [T, n_ff] */
    struct backend_tensor *sel;    /* [max_logits, n_embd] rows picked for logits */
    struct backend_tensor *logits; /* [max_logits, n_vocab] */
    /* Host staging of a step's inputs (struct backend_step), reserved for the largest step. */
    int32_t *slot_to_step; /* [max_seqs] KV slot -> step-local sequence, -1 = not in step */
    int32_t *step_slots;   /* [max_tokens] step-local sequence -> KV slot */
    int32_t *step_seq;     /* [max_tokens] */
    int32_t *step_max_pos; /* [max_tokens] per step-local sequence */
    int32_t *logit_rows;   /* [max_logits] */
    int32_t *tables[2];    /* [max_tokens, kv_max_blocks] per KV group */
};

#endif
