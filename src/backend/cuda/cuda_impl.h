/* Private interface of the CUDA backend: the backend and tensor structs, the error helper, and
 * the kernel launchers of cuda_quant.cu (weights: dequant, matvec, GEMM path, embed),
 * cuda_attn.cu (KV store, paged attention) and cuda_ops.cu (elementwise ops).
 *
 * backend_cuda.cu owns every allocation and validates every argument on the host; a launcher
 * only enqueues kernels on the backend's stream and reports launch errors. Nothing here
 * allocates or synchronises. */
#ifndef KRS_BACKEND_CUDA_IMPL_H
#define KRS_BACKEND_CUDA_IMPL_H

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <stddef.h>
#include <stdint.h>

extern "C" {
#include "backend/backend.h"
#include "krserve.h"
#include "quant/quant.h"
}

#define CUDA_ALIGN       256                  /* arena carving and staging sections */
#define CUDA_MV_MAX_ROWS 8                    /* activation rows one matvec launch handles */
#define CUDA_DQ_SCRATCH  (16ll * 1024 * 1024) /* floats of dequantized weight per GEMM chunk */
#define CUDA_ATTN_PART   (16ll * 1024 * 1024) /* floats of split-attention partials */
#define CUDA_ATTN_SPLITS 64                   /* most position splits of one (token, head) */

enum cuda_tensor_kind { CUDA_T_WEIGHT = 1, CUDA_T_ACT = 2 };

struct backend_tensor {
    int kind;
    uint32_t type;      /* weights: enum quant_type; activations: QUANT_F32 */
    int64_t n_in;       /* weights: row elements */
    int64_t n_out;      /* weights: rows */
    uint64_t row_bytes; /* weights */
    int64_t n;          /* activations: floats */
    void *dev;          /* device memory: owned for weights, an arena slice for activations */
};

/* The step's inputs on the device (one upload in step_begin) and what the host kept of them. */
struct cuda_step {
    int active;
    int n_tokens, n_seqs, max_blocks, n_logits;
    int max_pos;             /* largest position of the step */
    const int32_t *h_tokens; /* pinned host copies (validation on the host) */
    const int32_t *h_pos, *h_seq;
    const int32_t *h_table[BACKEND_KV_GROUPS];
    const int32_t *d_tokens;                   /* [n_tokens] */
    const int32_t *d_pos;                      /* [n_tokens] */
    const int32_t *d_seq;                      /* [n_tokens] */
    const int32_t *d_logit_rows;               /* [n_logits] */
    const int32_t *d_table[BACKEND_KV_GROUPS]; /* [n_seqs, max_blocks] or NULL */
};

struct cuda_kv {
    int reserved;
    int n_layers;
    uint8_t *layer_group; /* [n_layers] */
    int *layer_slot;      /* [n_layers] index of the layer inside its group */
    int n_group_layers[BACKEND_KV_GROUPS];
    int64_t n_blocks[BACKEND_KV_GROUPS];
    int block_size;
    int kv_dim;
    float *k[BACKEND_KV_GROUPS]; /* [layers of group][n_blocks][block_size][kv_dim] */
    float *v[BACKEND_KV_GROUPS];
};

struct cuda_sampler;

struct backend_cuda {
    struct backend base;
    int device;
    int n_sm;
    int max_tokens;
    int64_t max_n_in;
    int max_ctx;
    cudaStream_t stream;
    cublasHandle_t cublas;
    void *cublas_ws; /* cuBLAS workspace: no allocation inside GEMM calls */
    size_t cublas_ws_bytes;

    /* tensors handed out (all freed by destroy) */
    struct backend_tensor **tensors;
    size_t n_tensors, cap_tensors;

    /* activation arena */
    uint8_t *arena;
    uint64_t arena_bytes, arena_used;

    /* dequantized-weight scratch of the GEMM path: [rows of a chunk, n_in] floats */
    float *dq_scratch;
    int64_t dq_scratch_floats;

    /* split-attention partials: [T * n_head * splits][head_dim + 2] */
    float *attn_part;

    /* step inputs: pinned staging and its device twin, reserved for the largest step */
    int32_t *h_stage;
    int32_t *d_stage;
    int64_t stage_ints;
    int64_t table_cap;  /* entries of one group's block table */
    cudaEvent_t staged; /* recorded after the upload: the pinned buffer may be rewritten */
    int *d_err;         /* device-side error flags (bad block ids): read back by step_end */
    int *h_err;         /* pinned */

    /* logits back to the host */
    float *h_out;
    int64_t h_out_floats;

    uint64_t weights_bytes, kv_bytes; /* device memory held, for mem_info */

    struct cuda_step step;
    struct cuda_kv kv;
    struct cuda_sampler *sampler; /* device sampling (cuda_sample.cu) */
    int mv_max_rows; /* rows up to which matmul uses the matvec kernels (KRS_CUDA_MV_ROWS) */
    int gemm_tf32;   /* GEMM of non-F32 weights: TF32 (default) or F32 (KRS_CUDA_GEMM_F32=1) */
};

/* Device error flags (bits of *d_err). */
enum { CUDA_ERRF_NO_BLOCK = 1 };

/* Maps a CUDA error to a KRS status and logs it with the call site; KRS_OK on cudaSuccess. */
int cuda_status(cudaError_t e, const char *what, const char *file, int line);
#define CUDA_CHECK(call, what) cuda_status((call), (what), __FILE__, __LINE__)
/* The last launch's error (cudaGetLastError). */
#define CUDA_LAUNCHED(what) cuda_status(cudaGetLastError(), (what), __FILE__, __LINE__)
int cuda_cublas_status(cublasStatus_t s, const char *what, const char *file, int line);

/* ---- cuda_quant.cu ---- */
/* 1 when the type has a device decoder. */
int cuda_quant_supported(uint32_t type);
/* y[rows, n_out] = x[rows, n_in] * W^T, any rows (chooses matvec or dequant + GEMM). */
int cuda_matmul(struct backend_cuda *c, const struct backend_tensor *w, const float *x, int rows,
                float *y);
/* Runs only the matvec kernels / only the GEMM path (tests and timing compare them). */
int cuda_matmul_matvec(struct backend_cuda *c, const struct backend_tensor *w, const float *x,
                       int rows, float *y);
int cuda_matmul_gemm(struct backend_cuda *c, const struct backend_tensor *w, const float *x,
                     int rows, float *y);
/* x[t] = dequant(emb row tokens[t]) * scale, t < T. */
int cuda_embed(struct backend_cuda *c, const struct backend_tensor *emb, const int32_t *tokens,
               int T, float scale, float *x);
/* dst[i] = x[rows[i]], rows of n, i < n_rows. */
int cuda_get_rows(struct backend_cuda *c, const float *x, int n, const int32_t *rows, int n_rows,
                  float *dst);

/* ---- cuda_attn.cu ---- */
int cuda_kv_store(struct backend_cuda *c, int layer, const float *k, const float *v);
int cuda_attention(struct backend_cuda *c, const struct backend_attn_args *a, const float *q,
                   float *out);

/* ---- cuda_ops.cu ---- */
int cuda_rmsnorm(struct backend_cuda *c, const float *x, const float *w, int rows, int n, float eps,
                 float *y);
int cuda_add_bias(struct backend_cuda *c, float *y, const float *bias, int rows, int n);
int cuda_add(struct backend_cuda *c, float *y, const float *x, int64_t n);
int cuda_softcap(struct backend_cuda *c, float *x, int64_t n, float cap);
int cuda_glu(struct backend_cuda *c, float *gate, const float *up, int64_t n, int gelu);
int cuda_rope(struct backend_cuda *c, float *x, int n_heads, int head_dim, int n_rot, float base,
              float freq_scale, const float *freq_factors, int neox);

#endif
