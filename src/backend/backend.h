/* Compute backend interface: the backend owns compute memory and the step.
 *
 * Memory. Everything the forward pass touches lives in memory the backend owns, reached through
 * opaque tensor handles that model code never dereferences:
 *   - weights: uploaded once at load (weight_upload; the CPU backend maps the GGUF bytes in
 *     place, a device copies them and keeps them quantized);
 *   - activations: F32 tensors carved from one arena reserved once (arena_reserve, act_alloc);
 *   - the KV pool: kv_reserve allocates every block of both layer groups (full / sliding) once.
 *     kv/ decides which block holds what (allocator, block tables); the backend only stores.
 * Sizes come from mem_info: free bytes on a device, the configured budget on the CPU.
 *
 * The step. step_begin takes every input of one forward at once (token ids, positions,
 * step-local sequence ids, block tables, which rows get logits): one upload on a device. Ops
 * then enqueue work that reads those inputs; they may run eagerly (CPU) or asynchronously
 * (device). step_end hands back the logits of the requested rows in host memory: the one
 * synchronisation of the step. Every op returns a status; after a failed op the step is void
 * and the next step_begin starts clean.
 *
 * Shapes. An activation tensor is a flat array of F32; ops take the row count and width they
 * operate on (the same tensor serves T tokens or T*n_head head rows). Row r of a tensor of
 * width n starts at element r*n. Shape comments: [rows, cols].
 *
 * Threading: a backend belongs to one thread (the engine thread); its compute threads are its
 * own and never run anything but its ops. Ownership: the backend owns every tensor it hands out;
 * they live until destroy. */
#ifndef KRS_BACKEND_H
#define KRS_BACKEND_H

#include <stddef.h>
#include <stdint.h>

struct quant_matrix;
struct backend;
struct backend_tensor; /* opaque: a weight or an activation owned by the backend */

/* The two KV layer groups (kv/kv.h): layers that attend to all history, and sliding layers. */
enum { BACKEND_KV_FULL = 0, BACKEND_KV_SWA = 1, BACKEND_KV_GROUPS = 2 };

struct backend_kv_layout {
    int n_layers;
    const uint8_t *layer_group; /* [n_layers] BACKEND_KV_FULL or BACKEND_KV_SWA; copied */
    int64_t n_blocks[BACKEND_KV_GROUPS];
    int block_size; /* positions per block */
    int kv_dim;     /* n_head_kv * head_dim: one K (and one V) row per position and layer */
};

/* One forward's inputs. Token t is at position pos[t] of step-local sequence seq[t] in
 * [0, n_seqs); a sequence's tokens have consecutive increasing positions. block_table[g] holds
 * n_seqs rows of max_blocks physical block ids (row s, entry b = the block holding positions
 * [b*block_size, (b+1)*block_size) of sequence s in group g; -1 = not held). Tables of a group
 * without layers may be NULL. logit_rows lists the tokens whose logits step_end returns, in
 * order. Everything is copied by step_begin; the caller may reuse its arrays at once. */
struct backend_step {
    int n_tokens;
    const int32_t *tokens; /* [n_tokens] */
    const int32_t *pos;    /* [n_tokens] */
    const int32_t *seq;    /* [n_tokens] */
    int n_seqs;
    int max_blocks;
    const int32_t *block_table[BACKEND_KV_GROUPS]; /* [n_seqs, max_blocks] */
    int n_logits;
    const int32_t *logit_rows; /* [n_logits] token indices */
};

struct backend_attn_args {
    const struct backend_tensor *q; /* [T, n_head * head_dim], normed and roped */
    struct backend_tensor *out;     /* [T, n_head * head_dim] */
    int layer;                      /* KV layer: its group picks the block table */
    int n_head;
    int n_head_kv; /* divides n_head (GQA) */
    int head_dim;
    float scale; /* multiplies q.k */
    int n_swa;   /* 0: causal over the whole history; else query p sees p-n_swa+1 .. p */
};

struct backend_rope_args {
    struct backend_tensor *x; /* [T, n_heads * head_dim], rotated in place */
    int n_heads;
    int head_dim;
    int n_rot; /* leading dims that rotate */
    float base;
    float freq_scale;
    const struct backend_tensor *freq_factors; /* [n_rot/2] divides the angles, or NULL */
    int neox; /* 1: pairs (x[i], x[i+n_rot/2]); 0: (x[2i], x[2i+1]) */
};

/* Sampling on the device (optional op): the sampler's pipeline (sampler/sampler.h) on each
 * logits row, so a step returns token ids instead of [rows, n_vocab] floats. The host keeps
 * each request's RNG and history; per row it hands over the one uniform draw of the step and
 * the row's logit edits (bias and penalties folded per token):
 *   l[token] = rep(l[token] + pre_add) + post_add, rep(x) = x > 0 ? x / r : x * r (r = 1: none)
 * then: temperature 0 = argmax (ties -> lowest id); else p ~ exp((l - max) / T) truncated in
 * this order, as the host sampler does: top-k (the k largest; ties at the cut are all kept),
 * then top-p over the top-k survivors (the smallest set of largest p whose mass, normalised
 * over those survivors, reaches top_p), then min-p (p >= min_p * p_max); the token is the
 * inverse CDF of u over the final survivors in id order. logprob = log-softmax of the edited
 * logits at T = 1.
 *
 * Constrained decoding (grammar/): a row may carry an allowed-token mask of ceil(n_vocab / 32)
 * words, bit t of word t / 32 clear = token t's edited logit becomes -inf, after the edits and
 * before everything else (logprob is then over the allowed tokens). */
struct backend_logit_edit {
    int32_t token;
    float pre_add;  /* logit bias */
    float rep;      /* repetition penalty for this token, 1 = none */
    float post_add; /* -(presence + frequency * count) */
};

struct backend_sample_row {
    float temperature;           /* 0 = greedy */
    int32_t top_k;               /* 0 = off */
    float top_p;                 /* 1 = off */
    float min_p;                 /* 0 = off */
    float u;                     /* the row's draw in [0, 1) */
    int32_t edit_begin, n_edits; /* the row's range in the edits array */
};

struct backend_mem_info {
    uint64_t free_bytes;  /* what the backend may still reserve */
    uint64_t total_bytes; /* device memory, or the CPU budget */
    /* what the backend holds, by use (the CPU counts mapped weights) */
    uint64_t weights_bytes, kv_bytes, activation_bytes;
};

struct backend_ops {
    const char *name;
    void (*destroy)(struct backend *b);
    void (*mem_info)(const struct backend *b, struct backend_mem_info *out);

    /* --- memory, at load time only --- */
    /* A weight from host bytes (w->data: n_out rows of row_bytes; borrowed for the call on a
     * device, for the backend's lifetime on the CPU which maps in place). F32 vectors are
     * matrices with n_out = 1. */
    int (*weight_upload)(struct backend *b, const struct quant_matrix *w,
                         struct backend_tensor **out);
    /* Reserves the activation arena; act_alloc carves F32 tensors of n floats from it. */
    int (*arena_reserve)(struct backend *b, uint64_t bytes);
    int (*act_alloc)(struct backend *b, int64_t n, struct backend_tensor **out);
    /* Allocates the KV pool (once). */
    int (*kv_reserve)(struct backend *b, const struct backend_kv_layout *l);

    /* --- the step --- */
    int (*step_begin)(struct backend *b, const struct backend_step *s);
    /* Logits of the step: the first rows*cols floats of t, in host memory owned by the backend
     * and valid until the next step_begin. The step's only synchronisation. */
    int (*step_end)(struct backend *b, const struct backend_tensor *t, int rows, int cols,
                    const float **out);

    /* --- ops: rows/widths as documented; T is the step's n_tokens --- */
    /* x[T, emb->n_in] = dequant(emb rows of the step's tokens) * scale */
    int (*embed)(struct backend *b, const struct backend_tensor *emb, float scale,
                 struct backend_tensor *x);
    /* y[rows, w->n_out] = x[rows, w->n_in] * W^T */
    int (*matmul)(struct backend *b, const struct backend_tensor *w, const struct backend_tensor *x,
                  int rows, struct backend_tensor *y);
    /* y[r] = x[r] / sqrt(mean(x[r]^2) + eps) * w, rows of n (y may be x) */
    int (*rmsnorm)(struct backend *b, const struct backend_tensor *x,
                   const struct backend_tensor *w, int rows, int n, float eps,
                   struct backend_tensor *y);
    /* y[r] += bias, rows of n */
    int (*add_bias)(struct backend *b, struct backend_tensor *y, const struct backend_tensor *bias,
                    int rows, int n);
    /* y[i] += x[i], i < n */
    int (*add)(struct backend *b, struct backend_tensor *y, const struct backend_tensor *x,
               int64_t n);
    /* x[i] = cap * tanh(x[i] / cap), i < n */
    int (*softcap)(struct backend *b, struct backend_tensor *x, int64_t n, float cap);
    /* gate[i] = act(gate[i]) * up[i], i < n; act = tanh-GELU when gelu else SiLU */
    int (*glu)(struct backend *b, struct backend_tensor *gate, const struct backend_tensor *up,
               int64_t n, int gelu);
    /* Rotary embedding at the step's positions, rows = T. */
    int (*rope)(struct backend *b, const struct backend_rope_args *a);
    /* Stores K and V rows [T, kv_dim] of `layer` at the step's (sequence, position) slots. */
    int (*kv_store)(struct backend *b, int layer, const struct backend_tensor *k,
                    const struct backend_tensor *v);
    /* Paged attention of every step token over its sequence's cached positions (causal, sliding
     * window, GQA): one call for all sequences, prefill chunks and decodes together. */
    int (*attention)(struct backend *b, const struct backend_attn_args *a);
    /* dst[i] = x[step logit_rows[i]], rows of n, i < n_logits */
    int (*get_rows)(struct backend *b, const struct backend_tensor *x, int n,
                    struct backend_tensor *dst);

    /* --- optional (NULL where the backend samples nothing; the CPU: logits are host memory) --- */
    /* Samples rows of logits[rows, n_vocab] per `r`, `edits` and `masks` (all copied at the
     * call). masks NULL: no row is masked; else masks[i] is row i's allowed-token mask or NULL.
     * More masked rows than max_mask_rows, or n_vocab above mask_vocab with a mask:
     * KRS_ERR_FULL (nothing enqueued: the caller samples on the host). The ids and logprobs
     * come back from step_end_sampled, which replaces step_end for such a step. */
    int (*sample)(struct backend *b, const struct backend_tensor *logits, int rows, int n_vocab,
                  const struct backend_sample_row *r, const struct backend_logit_edit *edits,
                  int n_edits, const uint32_t *const *masks);
    /* The step's only synchronisation when it sampled: ids[rows] and logprobs[rows] in host
     * memory owned by the backend, valid until the next step_begin. */
    int (*step_end_sampled)(struct backend *b, int rows, const int32_t **ids,
                            const float **logprobs);
    /* Starts on the device what the step's ops so far hold back (a recorded graph waits for
     * step_end or sample otherwise), so that the host prepares sampling while the device runs
     * the step. NULL where every op runs as it is called (the CPU). */
    int (*step_flush)(struct backend *b);
};

struct backend {
    const struct backend_ops *ops;
};

struct backend_params {
    int n_threads;        /* CPU compute threads; 0 = all CPUs */
    int max_tokens;       /* rows of the largest step */
    int64_t max_n_in;     /* widest matmul input */
    int max_ctx;          /* longest sequence */
    uint64_t mem_budget;  /* CPU: bytes mem_info reports; 0 = the machine's available memory */
    int max_sample_edits; /* logit edits one sample call may take (0 = 256 per token of the
                           * largest step); more is KRS_ERR_FULL: the caller samples on the host */
    int max_mask_rows;    /* rows of one sample call that may carry a token mask (0: none) */
    int mask_vocab;       /* the largest n_vocab those masks may cover */
};

/* Devices this build can create: "cpu" always, "cuda" when built with it. */
int backend_available(const char *device);
/* Creates the backend for `device` ("cpu" or "cuda"). KRS_ERR_UNSUPPORTED with a one-line
 * reason in err for a device this build or machine lacks. The caller owns *out (destroy). */
int backend_create(const char *device, const struct backend_params *p, struct backend **out,
                   char *err, size_t errlen);

int backend_cpu_create(const struct backend_params *p, struct backend **out);
#ifdef KRS_HAVE_CUDA
int backend_cuda_create(const struct backend_params *p, struct backend **out, char *err,
                        size_t errlen);
#endif

#endif
