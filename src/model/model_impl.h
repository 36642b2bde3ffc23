/* Private model structures shared by model_load.c and model_forward.c. */
#ifndef KRS_MODEL_IMPL_H
#define KRS_MODEL_IMPL_H

#include "model/model.h"
#include "quant/quant.h"

struct backend;

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

struct model_ctx {
    const struct model *m;
    struct backend *be;
    struct kv_cache *kv;
    int max_tokens;
    int max_logits;
    int max_ctx;
    /* Scratch, reserved for max_tokens rows. Shapes in floats: */
    float *x;      /* [T, n_embd] residual stream */
    float *xn;     /* [T, n_embd] normed input */
    float *tmp;    /* [T, n_embd] */
    float *q;      /* [T, n_head * head_dim] */
    float *k;      /* [T, n_head_kv * head_dim] */
    float *v;      /* [T, n_head_kv * head_dim] */
    float *attn;   /* [T, n_head * head_dim] */
    float *gate;   /* [T, n_ff] */
    float *up;     /* [T, n_ff] */
    float *sel;    /* [max_logits, n_embd] rows picked for logits */
    float *logits; /* [max_logits, n_vocab] */
};

#endif
