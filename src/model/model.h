/* Transformer models from GGUF: hyper-parameters, weights bound to the mapped file, and the
 * batched forward pass.
 *
 * model_load opens the GGUF (kept mapped for the model's lifetime), reads the architecture's
 * hyper-parameters and binds every weight tensor, checking shapes and types. Supported
 * architectures: gemma3, llama, qwen2; anything else is KRS_ERR_UNSUPPORTED with its name.
 *
 * A model_ctx is the runtime for one engine: a compute backend (chosen by name: cpu, cuda) that
 * holds the weights, the KV pool and an activation arena reserved for the largest batch, plus
 * the KV block tables (kv/), so model_forward never allocates. model_forward only sequences
 * backend ops: one step_begin with all inputs, ops, one step_end for the logits. One batch mixes
 * any number of sequences, each with its own tokens at its own positions (prefill chunks and single
 * decode tokens together); each weight matrix is read once per call for all of them.
 *
 * Threading: a model is immutable after load and may be shared; a model_ctx belongs to one
 * thread (the engine thread); its backend's compute threads are the backend's. */
#ifndef KRS_MODEL_H
#define KRS_MODEL_H

#include <stddef.h>
#include <stdint.h>

struct gguf_file;
struct kv_cache;

enum model_arch {
    MODEL_ARCH_LLAMA = 0,
    MODEL_ARCH_QWEN2 = 1,
    MODEL_ARCH_GEMMA3 = 2,
};

struct model_hparams {
    enum model_arch arch;
    char arch_name[32];
    int n_embd;
    int n_layer;
    int n_head;
    int n_head_kv;
    int head_dim; /* key_length == value_length (checked) */
    int n_ff;
    int n_vocab;
    int n_ctx_train;
    int n_rot;
    float rms_eps;
    float rope_base;       /* full-attention layers */
    float rope_base_swa;   /* sliding layers (gemma3) */
    float rope_freq_scale; /* full-attention layers; sliding layers use 1 */
    int rope_neox;         /* 1: rotate (x[i], x[i+d/2]); 0: adjacent pairs */
    int n_swa;             /* sliding window (0 = none) */
    int swa_period;        /* layer il is sliding iff n_swa > 0 and il % period < period - 1 */
    float embed_scale;     /* gemma3: sqrt(n_embd); others 1 */
    float attn_scale;      /* applied to scores */
    float final_softcap;   /* 0 = off */
};

struct model;

/* Loads `path`. The caller owns *out (model_free). err gets a one-line reason on failure. */
int model_load(const char *path, struct model **out, char *err, size_t errlen);
void model_free(struct model *m);
const struct model_hparams *model_hparams(const struct model *m);
/* The open GGUF (for the tokenizer); owned by the model. */
const struct gguf_file *model_gguf(const struct model *m);
int model_layer_is_swa(const struct model *m, int layer);
/* Bytes of weights read for one token's forward (for roofline figures). */
uint64_t model_weight_bytes(const struct model *m);

struct model_ctx_params {
    int max_batch_tokens; /* tokens per forward (prefill chunks + decodes) */
    int max_seqs;         /* sequence slots of the KV cache */
    int64_t kv_tokens;    /* KV capacity in positions (full-attention layers); clamped to what
                           * the backend's memory holds; 0 = as much as it holds */
    int max_ctx;          /* longest sequence; 0 = min(n_ctx_train, kv_tokens) */
    int n_threads;        /* 0 = all online CPUs */
    int kv_block_size;    /* 0 = 16 */
    int max_logits;       /* rows of logits one forward may return; 0 = max_seqs */
    const char *device;   /* "cpu" (NULL) or "cuda" */
    uint64_t mem_budget;  /* CPU backend: bytes it may reserve; 0 = available memory */
    int prefix_cache;     /* 1: the KV cache keeps computed blocks for reuse (kv.h) */
    int64_t prefix_cache_max_tokens; /* cap on cached positions no sequence holds; 0 = none */
};

struct model_ctx;

/* Creates the runtime for m (borrowed: must outlive the ctx). Caller owns *out. */
int model_ctx_create(const struct model *m, const struct model_ctx_params *p,
                     struct model_ctx **out, char *err, size_t errlen);
void model_ctx_free(struct model_ctx *ctx);
/* The context's KV cache (owned by ctx): the scheduler reserves / releases through kv.h. */
struct kv_cache *model_ctx_kv(struct model_ctx *ctx);
int model_ctx_max_batch_tokens(const struct model_ctx *ctx);
int model_ctx_max_ctx(const struct model_ctx *ctx);
const char *model_ctx_backend_name(const struct model_ctx *ctx);
/* The backend's memory by use, in bytes. */
struct model_ctx_memory {
    uint64_t weights, kv, activations, free_bytes, total;
};
void model_ctx_memory(const struct model_ctx *ctx, struct model_ctx_memory *out);
/* One forward batch. Token i belongs to sequence slot seq[i] at position pos[i]; a sequence's
 * tokens in the batch must have consecutive increasing positions, and its KV blocks must have
 * been reserved (kv_seq_reserve) for them. Earlier positions come from the KV cache. */
struct model_batch {
    int n_tokens;
    const int32_t *tokens; /* [n_tokens] */
    const int32_t *pos;    /* [n_tokens] */
    const int32_t *seq;    /* [n_tokens] */
    const uint8_t *logits; /* [n_tokens] 1 = produce logits for this token */
};

/* Runs the batch, writes K/V for every token into the cache and returns the logits of the
 * flagged tokens in batch order: *out_logits points at [n_flagged, n_vocab] floats owned by ctx
 * and valid until the next model_forward. KRS_ERR_INVALID for a malformed batch (too many
 * tokens, bad token id, unreserved KV). */
int model_forward(struct model_ctx *ctx, const struct model_batch *batch, const float **out_logits,
                  int *out_n);

/* Runs throwaway steps of every shape class serving will use (prompt lengths 1..the token
 * budget, decode batches 1..the sequence slots) so that a backend's one-time costs (lazy kernel
 * loading, library kernel selection) are paid before the first request; KV is released
 * uncommitted. No-op on the CPU backend. Errors are the forward's. */
int model_ctx_warmup(struct model_ctx *ctx);

/* 1 when the context's backend samples on the device (model_forward_sampled works). */
int model_ctx_samples_on_device(const struct model_ctx *ctx);
/* model_forward that samples each flagged row on the device instead of returning its logits:
 * rows[i] (backend.h's struct backend_sample_row; edits indexed by its edit range) for the i-th
 * flagged token. *out_ids and *out_logprobs point at [*out_n] values owned by ctx, valid until
 * the next forward. masks: NULL, or per flagged row an allowed-token mask or NULL (backend.h).
 * KRS_ERR_FULL: too many edits or masked rows for the device, nothing ran (sample on the host
 * instead); KRS_ERR_UNSUPPORTED without device sampling. */
struct backend_sample_row;
struct backend_logit_edit;
int model_forward_sampled(struct model_ctx *ctx, const struct model_batch *batch,
                          const struct backend_sample_row *rows,
                          const struct backend_logit_edit *edits, int n_edits,
                          const uint32_t *const *masks, const int32_t **out_ids,
                          const float **out_logprobs, int *out_n);
/* model_forward in two halves, so that the host works while the device runs the step:
 * model_forward_begin enqueues the batch (on a device it starts running; on the CPU it has run
 * when the call returns) and sets *out_n to its rows with logits; then exactly one of
 * model_forward_end (the logits, as model_forward gives them) or model_forward_end_sampled
 * (the rows sampled on the device, as model_forward_sampled; rows, edits and masks may be
 * prepared after begin returned) ends the step. Either end without a begun step:
 * KRS_ERR_STATE. end_sampled with more edits or masked rows than model_ctx_max_sample_edits /
 * model_ctx_max_mask_rows ends the step and returns KRS_ERR_FULL. */
int model_forward_begin(struct model_ctx *ctx, const struct model_batch *batch, int *out_n);
int model_forward_end(struct model_ctx *ctx, const float **out_logits);
int model_forward_end_sampled(struct model_ctx *ctx, const struct backend_sample_row *rows,
                              const struct backend_logit_edit *edits, int n_edits,
                              const uint32_t *const *masks, const int32_t **out_ids,
                              const float **out_logprobs);
/* Most logit edits one model_forward_sampled may carry (0 without device sampling). */
int model_ctx_max_sample_edits(const struct model_ctx *ctx);
/* Most rows with a token mask one model_forward_sampled may carry (0 without device
 * sampling). */
int model_ctx_max_mask_rows(const struct model_ctx *ctx);

#endif
