/* Private interface of the CUDA backend: the backend and tensor structs, the error helper, and
 * the kernel launchers of cuda_quant.cu (weights: dequant, matvec, GEMM path, embed),
 * cuda_attn.cu (KV store, paged attention) and cuda_ops.cu (elementwise ops); the op records
 * that cuda_graph.cu (CUDA graphs of decode steps) and cuda_fuse.cu (ops to kernels, fused
 * runs) pass around.
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
#define CUDA_ATTN_PAIRS  (256 * 1024)         /* most (token, head) pairs of a split launch */

enum cuda_tensor_kind { CUDA_T_WEIGHT = 1, CUDA_T_ACT = 2 };

/* Q8_0 rows of a multiple of 128 are stored regrouped on the device: per 128 elements, the 4
 * block scales (8 bytes) then the 128 quants, so a piece of 8 is one aligned 8-byte load and a
 * 2-byte scale instead of five 2-byte loads (the output projection of a 262k vocabulary is
 * bound by load instructions otherwise). Same bytes per row; a type id outside GGUF's. */
#define CUDA_Q8_0_G 0x1000u

struct backend_tensor {
    int kind;
    uint32_t type;      /* weights: enum quant_type; activations: QUANT_F32 */
    int64_t n_in;       /* weights: row elements */
    int64_t n_out;      /* weights: rows */
    uint64_t row_bytes; /* weights */
    int64_t n;          /* activations: floats */
    void *dev;          /* device memory: owned for weights, an arena slice for activations */
    void *half;         /* quantized/BF16 weights: an F16 copy the GEMM reads, or NULL; owned */
};

/* The step's inputs on the device (one upload in step_begin) and what the host kept of them. */
struct cuda_step {
    int active;
    int n_tokens, n_seqs, n_logits;
    int max_blocks;          /* table row width: the caller's, padded to a power of two */
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
struct cuda_graphs;

/* One op call as the ops table received it (arguments validated): what a CUDA graph records and
 * what a replayed step is compared with, byte for byte (records are zeroed before filling). */
enum cuda_op_kind {
    CUDA_OP_EMBED = 1, /* t0 emb, t1 x, f0 scale */
    CUDA_OP_MATMUL,    /* t0 w, t1 x, t2 y, i0 rows */
    CUDA_OP_RMSNORM,   /* t0 x, t1 w, t2 y, i0 rows, i1 n, f0 eps */
    CUDA_OP_ADD_BIAS,  /* t0 y, t1 bias, i0 rows, i1 n */
    CUDA_OP_ADD,       /* t0 y, t1 x, n */
    CUDA_OP_SOFTCAP,   /* t0 x, n, f0 cap */
    CUDA_OP_GLU,       /* t0 gate, t1 up, n, i0 gelu */
    CUDA_OP_ROPE,      /* t0 x, t1 freq_factors, i0 n_heads, i1 head_dim, i2 n_rot, i3 neox,
                        * f0 base, f1 freq_scale */
    CUDA_OP_KV_STORE,  /* i0 layer, t0 k, t1 v */
    CUDA_OP_ATTENTION, /* t0 q, t1 out, i0 layer, i1 n_head, i2 n_head_kv, i3 head_dim, i4 n_swa,
                        * f0 scale */
    CUDA_OP_GET_ROWS,  /* t0 x, t1 dst, i0 n */
};

struct cuda_op {
    int kind;
    int i[5];
    int64_t n;
    float f[2];
    const struct backend_tensor *t[3];
};

/* Ops not yet enqueued: cuda_fuse.cu looks this far ahead for runs it can fuse. */
#define CUDA_FUSE_WINDOW 5
#define CUDA_DEFER_MAX   3
struct cuda_defer {
    float *y[CUDA_DEFER_MAX];
    int64_t total[CUDA_DEFER_MAX], width[CUDA_DEFER_MAX];
    int n;
};

struct cuda_opq {
    struct cuda_op op[CUDA_FUSE_WINDOW];
    int n;
};

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

    /* split-attention partials: [T * n_head * splits][head_dim + 2], and per (token, head) the
     * count of its splits done (zero between launches: the last split resets it) */
    float *attn_part;
    int *attn_done; /* [CUDA_ATTN_PAIRS] */
    int *res_done;  /* blocks of the running fused matvec + residual step that finished */

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
    int mv_max_rows;     /* rows up to which matmul uses the matvec kernels (KRS_CUDA_MV_ROWS) */
    int64_t mv_nw4_rows; /* outputs from which a batch-1 matvec gives each warp 4 rows
                          * (KRS_CUDA_MV_NW4, default 32768: the vocabulary) */
    int mv_half_rows;    /* the same for F16/BF16 weights, which GEMM reads as they are
                          * (KRS_CUDA_MV_HALF_ROWS) */
    void *x_half;        /* [max_tokens * max_n_in] activations as F16/BF16 for those GEMMs */
    float *x_inv_scale;  /* [max_tokens] 1 / the power-of-two scale of each such row */
    /* The activations x_half holds: a run of matmul ops on one input (q, k, v; gate, up)
     * converts it once. Set only by matmul ops (x_half_op), cleared by every other op. */
    const float *x_half_src;
    int64_t x_half_n_in;
    int x_half_rows, x_half_op;
    uint32_t x_half_type;
    /* Deferred unscale: an F16 GEMM leaves its output rows scaled by x_inv_scale's inverse,
     * and the kernel that reads them next applies it (cuda_defer_take) instead of a kernel of
     * its own after every GEMM; anything else that may read them first runs the unscale
     * (cuda_defer_flush). Only for ops enqueued through the fusion window (defer_ok). */
    struct cuda_defer defer;
    int defer_ok;
    int defer_on;      /* KRS_CUDA_DEFER_UNSCALE (default 1; 0: a k_unscale_rows after each GEMM) */
    int gemm_tf32;     /* GEMM of non-F32 weights: TF32 (default) or F32 (KRS_CUDA_GEMM_F32=1) */
    int half_copy;     /* F16 copies of quantized weights for GEMMs (KRS_CUDA_HALF_COPY, 1) */
    int *d_overflow;   /* set by cuda_make_half_copy when a weight does not fit F16 */
    int fuse;          /* fuse runs of ops into single kernels (KRS_CUDA_FUSE, default 1) */
    int pdl;           /* programmatic dependent launches (KRS_CUDA_PDL, default 1) */
    int attn_tile;     /* tensor-core attention for prompt steps (KRS_CUDA_ATTN_TILE, default 1) */
    int sample_splits; /* most blocks per sampled row (KRS_CUDA_SAMPLE_SPLITS, default 16) */
    /* KRS_CUDA_STEP_TIMES=1: device time of sampled steps (launch to results) vs the host's
     * time from one sampled step's launch to the next's, logged at destroy (tuning: how much
     * of a step the GPU is busy) */
    int step_times;
    cudaEvent_t ev_launch, ev_done;
    int ev_pending;
    double dev_us, wall_us;
    uint64_t last_launch_ns; /* the last timed launch */
    uint64_t last_timed_ns;  /* the same once its sampled step ended, until the next launch */
    long n_timed, n_wall;
    int f32_weights;            /* a matrix is stored in F32: attention stays in F32 too */
    struct cuda_opq opq;        /* ops waiting for fusion (cuda_fuse.cu) */
    struct cuda_graphs *graphs; /* recorded decode steps (cuda_graph.cu) */
};

/* Device error flags (bits of *d_err). */
enum { CUDA_ERRF_NO_BLOCK = 1 };

/* Maps a CUDA error to a KRS status and logs it with the call site; KRS_OK on cudaSuccess. */
int cuda_status(cudaError_t e, const char *what, const char *file, int line);
#define CUDA_CHECK(call, what) cuda_status((call), (what), __FILE__, __LINE__)
/* The last launch's error (cudaGetLastError). */
#define CUDA_LAUNCHED(what) cuda_status(cudaGetLastError(), (what), __FILE__, __LINE__)
int cuda_cublas_status(cublasStatus_t s, const char *what, const char *file, int line);

/* ---- launches ----
 * Every kernel is launched through cuda_launch and starts with cuda_pdl_enter. With c->pdl the
 * launch allows programmatic dependent launch (Hopper): the next kernel of the stream is
 * scheduled while this one still runs and waits in cuda_pdl_enter (griddepcontrol.wait) until
 * its predecessor has finished and its writes are visible, so a step of ~150 small kernels pays
 * the launch latency once instead of at every boundary. A kernel lets its successor be scheduled
 * right after its own wait: the successor still waits for the whole grid, so the order of
 * memory effects is exactly that of a plain stream. Graph capture keeps these edges. */
static __device__ __forceinline__ void cuda_pdl_enter()
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

template <typename... KArgs, typename... Args>
static inline void cuda_launch_smem(const struct backend_cuda *c, void (*kernel)(KArgs...),
                                    dim3 grid, dim3 block, size_t smem, Args... args)
{
    cudaLaunchConfig_t cfg = {};
    cfg.dynamicSmemBytes = smem;
    cudaLaunchAttribute attr[1] = {};
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.gridDim = grid;
    cfg.blockDim = block;
    cfg.stream = c->stream;
    cfg.attrs = attr;
    cfg.numAttrs = c->pdl ? 1 : 0;
    /* errors are the launch's: CUDA_LAUNCHED reads them with cudaGetLastError */
    (void)cudaLaunchKernelEx(&cfg, kernel, args...);
}

template <typename... KArgs, typename... Args>
static inline void cuda_launch(const struct backend_cuda *c, void (*kernel)(KArgs...), dim3 grid,
                               dim3 block, Args... args)
{
    cuda_launch_smem(c, kernel, grid, block, 0, args...);
}

/* ---- cuda_quant.cu ---- */
/* 1 when the type has a device decoder. */
int cuda_quant_supported(uint32_t type);
/* y[rows, n_out] = x[rows, n_in] * W^T, any rows (chooses matvec or dequant + GEMM). */
int cuda_matmul(struct backend_cuda *c, const struct backend_tensor *w, const float *x, int rows,
                float *y);
/* Runs only the matvec kernels / only the GEMM path (tests and timing compare them). */
/* Rows up to which matmul of w takes the matvec kernels (the fused ones too). */
int cuda_matvec_rows(const struct backend_cuda *c, const struct backend_tensor *w);
/* 1 when GEMMs of w read F16/BF16 elements directly (tensor cores, activations converted):
 * its own, or its F16 copy. */
int cuda_gemm_half(const struct backend_cuda *c, const struct backend_tensor *w);
/* Gives quantized or BF16 weight w an F16 copy (w->half) for the GEMM path when half_copy is on and
 * the device keeps at least half its memory free after it; KRS_OK without a copy otherwise
 * (a weight that does not fit F16 keeps none). */
int cuda_make_half_copy(struct backend_cuda *c, struct backend_tensor *w);
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
/* ---- cuda_attn_tile.cu ---- */
/* 1 when the step and layer suit the tensor-core attention (several tokens per sequence). */
int cuda_attn_tile_fits(const struct backend_cuda *c, const struct backend_attn_args *a);
/* Attention of the step's tokens over the layer's slabs kc / vc and block table. */
int cuda_attention_tiles(struct backend_cuda *c, const struct backend_attn_args *a, const float *q,
                         float *out, const float *kc, const float *vc, const int32_t *table);
int cuda_attention(struct backend_cuda *c, const struct backend_attn_args *a, const float *q,
                   float *out);

/* ---- cuda_ops.cu ---- */
int cuda_rmsnorm(struct backend_cuda *c, const float *x, const float *w, int rows, int n, float eps,
                 float *y);
int cuda_add_bias(struct backend_cuda *c, float *y, const float *bias, int rows, int n);
int cuda_add(struct backend_cuda *c, float *y, const float *x, int64_t n);
int cuda_softcap(struct backend_cuda *c, float *x, int64_t n, float cap);
/* gate = glu(gate, up); inv_g / inv_u (NULL: none): row scales that a deferred unscale left
 * on gate / up (rows of `width`), applied first (up keeps its unscaled values too). */
int cuda_glu(struct backend_cuda *c, float *gate, float *up, int64_t n, int gelu,
             const float *inv_g, const float *inv_u, int64_t width);
int cuda_rope(struct backend_cuda *c, float *x, int n_heads, int head_dim, int n_rot, float base,
              float freq_scale, const float *freq_factors, int neox);

/* ---- cuda_graph.cu: CUDA graphs of decode steps ----
 * step_begin hands over the step's shape key (0: never recorded); every op goes through
 * cuda_submit; cuda_flush enqueues whatever the step holds back (a graph launch, the end of a
 * capture, ops waiting for fusion) and must run before anything else is enqueued on the stream
 * for the step (step_end, the sampler) and before the next step's upload. */
int cuda_graphs_create(struct backend_cuda *c);
void cuda_graphs_destroy(struct backend_cuda *c);
int cuda_graph_begin(struct backend_cuda *c, uint64_t key);
int cuda_submit(struct backend_cuda *c, const struct cuda_op *op);
int cuda_flush(struct backend_cuda *c);

/* ---- cuda_fuse.cu: ops to kernels, fusing runs of them ---- */
int cuda_op_exec(struct backend_cuda *c, const struct cuda_op *op); /* one op, unfused */
int cuda_fuse_push(struct backend_cuda *c, const struct cuda_op *op);
int cuda_fuse_drain(struct backend_cuda *c);
void cuda_fuse_clear(struct backend_cuda *c); /* drops what waits (an abandoned capture) */

/* Fused launchers. cuda_quant.cu: up to 3 matvecs of one input (rows <= CUDA_MV_MAX_ROWS,
 * pieces of 8, equal n_in), bit-identical to separate ones; with glu >= 0 exactly two, gate
 * and up of one type and shape, and gate[i] = act(gate[i]) * up[i] as cuda_glu computes it. */
int cuda_matvec_multi(struct backend_cuda *c, int nw, const struct backend_tensor *const *w,
                      const float *x, int rows, float *const *y, int glu);
/* cuda_ops.cu: tm = rmsnorm(tm) * wp (wp NULL: skipped); x += tm; xn = rmsnorm(x) * wn.
 * inv_tm (NULL: none): row scales a deferred unscale left on tm, applied to tm first. */
int cuda_norm_add_norm(struct backend_cuda *c, float *tm, const float *inv_tm, const float *wp,
                       float eps_p, float *x, const float *wn, float eps_n, float *xn, int rows,
                       int n);
/* cuda_quant.cu, the deferred unscale (struct cuda_defer): cuda_defer_take returns the row
 * scales pending on y (x_inv_scale; *width: y's row length, when width is not NULL) and drops y
 * from the pending list, or NULL when none is; the caller's kernel applies them. cuda_defer_flush
 * unscales whatever is pending, in place; cuda_defer_flush_if does so when y is pending. */
const float *cuda_defer_take(struct backend_cuda *c, const float *y, int64_t *width);
int cuda_defer_flush(struct backend_cuda *c);
int cuda_defer_flush_if(struct backend_cuda *c, const float *y);
/* cuda_quant.cu: tm = W x for one token row (the matvec path), then the residual step above on
 * tm, in one kernel (the last block to finish its rows runs the residual step): for
 * n_out <= CUDA_NORM_REG_MAX; bit-identical to cuda_matmul then cuda_norm_add_norm. */
int cuda_matvec_residual(struct backend_cuda *c, const struct backend_tensor *w, const float *x,
                         float *tm, const float *wp, float eps_p, float *xr, const float *wn,
                         float eps_n, float *xn);
/* cuda_attn.cu: per-head rmsnorm of q and k (wq NULL: none), rope of both, and (layer >= 0) the
 * KV store of k and v: the ops rmsnorm, rmsnorm, rope, rope, kv_store in one kernel. */
struct cuda_qk_args {
    float *q, *k;
    float *v;
    const float *inv_q, *inv_k, *inv_v; /* deferred row scales (cuda_defer_take) or NULL */
    const float *wq, *wk;
    float eps_q, eps_k;
    int n_head, n_head_kv, head_dim, n_rot, neox;
    float base, freq_scale;
    const float *freq_factors;
    int layer; /* -1: no KV store */
};
int cuda_qk_rope_store(struct backend_cuda *c, const struct cuda_qk_args *a);
#define CUDA_QK_MAX_HD 512 /* head_dim the fused q/k kernel takes */

/* ---- device helpers shared by the plain and the fused kernels (same arithmetic) ---- */
#define CUDA_NORM_THREADS 256 /* block of every rmsnorm: the reduction order depends on it */

/* 1 / sqrt(mean(x^2) + eps) of a row of n from each thread's partial sum of squares ss (its
 * elements threadIdx.x, + blockDim.x, ... in that order), by the whole block
 * (CUDA_NORM_THREADS threads); part: shared, one double per warp, free again on return. */
static __device__ __forceinline__ float cuda_block_rms(double ss, int n, float eps, double *part)
{
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xFFFFFFFFu, ss, o);
    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = ss;
    __syncthreads();
    double tot = 0.0;
    for (int j = 0; j < (int)(blockDim.x >> 5); j++) tot += part[j];
    __syncthreads();
    return 1.0f / sqrtf((float)(tot / n) + eps);
}

static __device__ __forceinline__ float cuda_rms_scale(const float *xr, int n, float eps,
                                                       double *part)
{
    double ss = 0.0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) ss += (double)xr[i] * xr[i];
    return cuda_block_rms(ss, n, eps, part);
}

/* Rows up to CUDA_NORM_REG * CUDA_NORM_THREADS elements are held in registers: every input of
 * a row is loaded at once, so a norm costs one trip to memory instead of one per phase. Longer
 * rows take looping kernels. Both sum squares in the same order (cuda_block_rms), so they
 * give the same bits. */
#define CUDA_NORM_REG     8
#define CUDA_NORM_REG_MAX (CUDA_NORM_REG * CUDA_NORM_THREADS)

/* rms scale of a row held CUDA_NORM_REG elements per thread (zeros past its end) */
static __device__ __forceinline__ float cuda_reg_rms(const float (&v)[CUDA_NORM_REG], int n,
                                                     float eps, double *part)
{
    double ss = 0.0;
#pragma unroll
    for (int j = 0; j < CUDA_NORM_REG; j++) ss += (double)v[j] * v[j];
    return cuda_block_rms(ss, n, eps, part);
}

/* The residual step of one row of n <= CUDA_NORM_REG_MAX, by a block of CUDA_NORM_THREADS:
 * tr = rmsnorm(tr) * wp (wp NULL: skipped); xr += tr; yr = rmsnorm(xr) * wn. tr and xr are
 * read through L2 (__ldcg): the fused matvec's last block reads what other blocks wrote. */
static __device__ __forceinline__ void
cuda_norm_add_norm_row(float *tr, const float *inv, const float *wp, float eps_p, float *xr,
                       const float *wn, float eps_n, float *yr, int n, double *part)
{
    float t[CUDA_NORM_REG], xv[CUDA_NORM_REG], wpv[CUDA_NORM_REG], wnv[CUDA_NORM_REG];
#pragma unroll
    for (int j = 0; j < CUDA_NORM_REG; j++) {
        const int i = threadIdx.x + j * CUDA_NORM_THREADS;
        const bool in = i < n;
        t[j] = in ? __ldcg(tr + i) : 0.0f;
        if (inv) { /* the deferred unscale of tm's row (k_unscale_rows' arithmetic) */
            t[j] *= *inv;
            if (in && !wp) tr[i] = t[j];
        }
        xv[j] = in ? __ldcg(xr + i) : 0.0f;
        wpv[j] = in && wp ? wp[i] : 0.0f;
        wnv[j] = in ? wn[i] : 0.0f;
    }
    if (wp) {
        const float sp = cuda_reg_rms(t, n, eps_p, part);
#pragma unroll
        for (int j = 0; j < CUDA_NORM_REG; j++) {
            const int i = threadIdx.x + j * CUDA_NORM_THREADS;
            t[j] = __fmul_rn(t[j] * sp, wpv[j]);
            if (i < n) tr[i] = t[j];
        }
    }
#pragma unroll
    for (int j = 0; j < CUDA_NORM_REG; j++) xv[j] += t[j];
    const float sn = cuda_reg_rms(xv, n, eps_n, part);
#pragma unroll
    for (int j = 0; j < CUDA_NORM_REG; j++) {
        const int i = threadIdx.x + j * CUDA_NORM_THREADS;
        if (i < n) {
            xr[i] = xv[j];
            yr[i] = __fmul_rn(xv[j] * sn, wnv[j]);
        }
    }
}

/* cos and sin of rotary pair i at position pos (angles in double, as the CPU) */
static __device__ __forceinline__ void cuda_rope_cs(int pos, int i, int n_rot, float base,
                                                    float freq_scale, const float *ff, float *c,
                                                    float *s)
{
    double inv = pow((double)base, -2.0 * i / n_rot);
    double theta = (double)pos * inv * freq_scale;
    if (ff) theta /= ff[i];
    double sd, cd;
    sincos(theta, &sd, &cd); /* one argument reduction for both: cos and sin bit for bit */
    *c = (float)cd;
    *s = (float)sd;
}

static __device__ __forceinline__ void cuda_rope_pair(float *v0, float *v1, float c, float s)
{
    float a = *v0, b = *v1;
    *v0 = __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s));
    *v1 = __fadd_rn(__fmul_rn(a, s), __fmul_rn(b, c));
}

/* act(g) * u: tanh-GELU or SiLU */
static __device__ __forceinline__ float cuda_glu1(float g, float u, int gelu)
{
    float a = gelu ? 0.5f * g * (1.0f + tanhf(0.7978845608f * (g + 0.044715f * g * g * g)))
                   : g / (1.0f + expf(-g));
    return a * u;
}

#endif
