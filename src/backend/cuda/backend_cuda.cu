/* CUDA backend: device memory (weights kept quantized, one activation arena, the KV pool), the
 * step (one upload of its inputs, one download of its logits, one synchronisation) and the ops
 * table of backend/backend.h.
 *
 * Everything is reserved at load time: create reserves the pinned staging buffer for the
 * largest step's inputs, the pinned logits buffer grows with act_alloc, the GEMM dequant
 * scratch with weight_upload, and kv_reserve enlarges the staging for block tables. The step
 * path never allocates and never synchronises except in step_end: ops validate their arguments
 * on the host, enqueue kernels (cuda_quant.cu, cuda_attn.cu, cuda_ops.cu) on one stream and
 * return. Device-side faults the host cannot see in advance (a position whose KV block is not
 * held) raise a flag that step_end reads back with the logits.
 *
 * Ops reach the kernels through cuda_submit (cuda_graph.cu): a decode-sized step whose shape
 * was seen before replays a CUDA graph of its ops instead of launching them, and runs of ops
 * fuse into single kernels (cuda_fuse.cu). For that every kernel reads what varies between steps
 * of one shape (tokens, positions, block tables, logit rows) from the step's upload, whose
 * layout the shape fixes: block tables are padded to a power-of-two width. */
#include "backend/cuda/cuda_impl.h"
#include "backend/cuda/cuda_sample.h"

extern "C" {
#include "util/alloc.h"
#include "util/clock.h"
#include "util/log.h"
}

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CUBLAS_WS_BYTES (32u << 20)

int cuda_status(cudaError_t e, const char *what, const char *file, int line)
{
    if (e == cudaSuccess) return KRS_OK;
    KRS_LOG_ERRORF("cuda: %s: %s (%s) at %s:%d", what, cudaGetErrorString(e), cudaGetErrorName(e),
                   file, line);
    switch (e) {
    case cudaErrorMemoryAllocation:
        return KRS_ERR_NOMEM;
    case cudaErrorNoDevice:
    case cudaErrorInsufficientDriver:
    case cudaErrorNoKernelImageForDevice:
    case cudaErrorUnsupportedPtxVersion:
    case cudaErrorInvalidDevice:
        return KRS_ERR_UNSUPPORTED;
    case cudaErrorInvalidValue:
    case cudaErrorInvalidConfiguration:
        return KRS_ERR_INVALID;
    default:
        return KRS_ERR_INTERNAL;
    }
}

int cuda_cublas_status(cublasStatus_t s, const char *what, const char *file, int line)
{
    if (s == CUBLAS_STATUS_SUCCESS) return KRS_OK;
    KRS_LOG_ERRORF("cublas: %s: %s at %s:%d", what, cublasGetStatusString(s), file, line);
    switch (s) {
    case CUBLAS_STATUS_ALLOC_FAILED:
        return KRS_ERR_NOMEM;
    case CUBLAS_STATUS_INVALID_VALUE:
        return KRS_ERR_INVALID;
    case CUBLAS_STATUS_NOT_SUPPORTED:
    case CUBLAS_STATUS_ARCH_MISMATCH:
        return KRS_ERR_UNSUPPORTED;
    default:
        return KRS_ERR_INTERNAL;
    }
}

static struct backend_cuda *cu(struct backend *b)
{
    return (struct backend_cuda *)b;
}

/* ---- tensors ---- */

static int tensor_new(struct backend_cuda *c, struct backend_tensor **out)
{
    if (c->n_tensors == c->cap_tensors) {
        size_t cap = c->cap_tensors ? 2 * c->cap_tensors : 64;
        void *p = alloc_realloc(c->tensors, cap * sizeof *c->tensors);
        if (!p) return KRS_ERR_NOMEM;
        c->tensors = (struct backend_tensor **)p;
        c->cap_tensors = cap;
    }
    struct backend_tensor *t = (struct backend_tensor *)alloc_calloc(1, sizeof *t);
    if (!t) return KRS_ERR_NOMEM;
    c->tensors[c->n_tensors++] = t;
    *out = t;
    return KRS_OK;
}

static int is_act(const struct backend_tensor *t, int64_t need)
{
    return t && t->kind == CUDA_T_ACT && need >= 0 && t->n >= need;
}

/* An F32 vector weight of at least n elements (norm weights, biases, rope factors). */
static int is_vec(const struct backend_tensor *t, int64_t n)
{
    return t && t->kind == CUDA_T_WEIGHT && t->type == QUANT_F32 && t->n_out == 1 && t->n_in >= n;
}

/* ---- lifetime ---- */

static void cuda_destroy(struct backend *b)
{
    struct backend_cuda *c = cu(b);
    if (!c) return;
    cuda_graphs_destroy(c); /* ends a capture in progress, then waits for the stream */
    if (c->stream) cudaStreamSynchronize(c->stream);
    if (c->step_times) {
        if (c->n_timed > 0 && c->n_wall > 0)
            KRS_LOG_INFOF("cuda: %ld sampled steps: device %.1f us/step from launch to results; "
                          "%.1f us from such a launch to the next (%ld)",
                          c->n_timed, c->dev_us / c->n_timed, c->wall_us / c->n_wall, c->n_wall);
        cudaEventDestroy(c->ev_launch);
        cudaEventDestroy(c->ev_done);
    }
    for (size_t i = 0; i < c->n_tensors; i++) {
        if (c->tensors[i]->kind == CUDA_T_WEIGHT) {
            cudaFree(c->tensors[i]->dev);
            cudaFree(c->tensors[i]->half);
        }
        alloc_free(c->tensors[i]);
    }
    alloc_free(c->tensors);
    cuda_sampler_destroy(c->sampler);
    for (int g = 0; g < BACKEND_KV_GROUPS; g++) {
        cudaFree(c->kv.k[g]);
        cudaFree(c->kv.v[g]);
    }
    alloc_free(c->kv.layer_group);
    alloc_free(c->kv.layer_slot);
    cudaFree(c->arena);
    cudaFree(c->dq_scratch);
    cudaFree(c->x_half);
    cudaFree(c->x_inv_scale);
    cudaFree(c->attn_part);
    cudaFree(c->attn_done);
    cudaFree(c->res_done);
    cudaFree(c->d_stage);
    cudaFree(c->d_err);
    cudaFree(c->d_overflow);
    cudaFree(c->cublas_ws);
    cudaFreeHost(c->h_stage);
    cudaFreeHost(c->h_err);
    cudaFreeHost(c->h_out);
    if (c->staged) cudaEventDestroy(c->staged);
    if (c->cublas) cublasDestroy(c->cublas);
    if (c->stream) cudaStreamDestroy(c->stream);
    alloc_free(c);
}

static void cuda_mem_info(const struct backend *b, struct backend_mem_info *out)
{
    size_t fr = 0, tot = 0;
    cudaSetDevice(((const struct backend_cuda *)b)->device);
    if (CUDA_CHECK(cudaMemGetInfo(&fr, &tot), "cudaMemGetInfo")) fr = tot = 0;
    const struct backend_cuda *c = (const struct backend_cuda *)b;
    out->free_bytes = fr;
    out->total_bytes = tot;
    out->weights_bytes = c->weights_bytes;
    out->kv_bytes = c->kv_bytes;
    /* the arena and the scratch of the step (dequant, attention partials, cuBLAS workspace) */
    out->activation_bytes = c->arena_bytes + (uint64_t)c->dq_scratch_floats * sizeof(float) +
                            (c->x_half ? (uint64_t)c->max_tokens * (c->max_n_in * 2 + 4) : 0) +
                            (uint64_t)CUDA_ATTN_PART * sizeof(float) + c->cublas_ws_bytes;
}

/* ---- memory, at load time ---- */

/* GGUF Q8_0 (per 32: 2-byte scale, 32 quants) to CUDA_Q8_0_G (per 128: 4 scales, 128 quants),
 * for n_groups groups of 4 blocks. */
static void q8_0_regroup(const uint8_t *src, int64_t n_groups, uint8_t *dst)
{
    for (int64_t g = 0; g < n_groups; g++, src += 136, dst += 136)
        for (int k = 0; k < 4; k++) {
            memcpy(dst + 2 * k, src + 34 * k, 2);
            memcpy(dst + 8 + 32 * k, src + 34 * k + 2, 32);
        }
}

static int cuda_weight_upload(struct backend *b, const struct quant_matrix *w,
                              struct backend_tensor **out)
{
    struct backend_cuda *c = cu(b);
    *out = NULL;
    if (!w || !w->data || w->n_in <= 0 || w->n_out <= 0) return KRS_ERR_INVALID;
    if (!cuda_quant_supported(w->type)) {
        KRS_LOG_ERRORF("cuda: weight type %s is not supported", quant_type_name(w->type));
        return KRS_ERR_UNSUPPORTED;
    }
    uint64_t rb = quant_row_bytes(w->type, w->n_in);
    if (rb == 0 || rb != w->row_bytes) return KRS_ERR_INVALID;
    if (w->type == QUANT_F32 && w->n_out > 1) c->f32_weights = 1; /* F32 model: exact attention */
    struct backend_tensor *t;
    int rc = tensor_new(c, &t);
    if (rc) return rc;
    t->kind = CUDA_T_WEIGHT;
    t->type = w->type;
    t->n_in = w->n_in;
    t->n_out = w->n_out;
    t->row_bytes = rb;
    size_t bytes = (size_t)rb * (size_t)w->n_out;
    const void *src = w->data;
    uint8_t *regrouped = NULL;
    if (w->type == QUANT_Q8_0 && w->n_in % 128 == 0) {
        if (!(regrouped = (uint8_t *)alloc_malloc(bytes))) return KRS_ERR_NOMEM;
        q8_0_regroup((const uint8_t *)w->data, w->n_out * (w->n_in / 128), regrouped);
        src = regrouped;
        t->type = CUDA_Q8_0_G;
    }
    rc = CUDA_CHECK(cudaMalloc(&t->dev, bytes), "weight");
    if (!rc) rc = CUDA_CHECK(cudaMemcpy(t->dev, src, bytes, cudaMemcpyHostToDevice), "weight");
    alloc_free(regrouped);
    if (rc) return rc; /* t stays registered; destroy frees it */
    c->weights_bytes += bytes;
    /* Prompt steps and large batches multiply quantized weights through their F16 copy on
     * tensor cores where memory allows (no dequantization per step); else the GEMM path
     * dequantizes chunks of rows: at least one row, at most CUDA_DQ_SCRATCH. */
    if ((rc = cuda_make_half_copy(c, t))) return rc;
    if (w->type != QUANT_F32 && !cuda_gemm_half(c, t)) {
        int64_t need = w->n_out * w->n_in;
        if (need > CUDA_DQ_SCRATCH) need = CUDA_DQ_SCRATCH > w->n_in ? CUDA_DQ_SCRATCH : w->n_in;
        if (need > c->dq_scratch_floats) {
            cudaFree(c->dq_scratch);
            c->dq_scratch = NULL;
            c->dq_scratch_floats = 0;
            rc = CUDA_CHECK(cudaMalloc((void **)&c->dq_scratch, (size_t)need * sizeof(float)),
                            "dequant scratch");
            if (rc) return rc;
            c->dq_scratch_floats = need;
        }
    }
    *out = t;
    return KRS_OK;
}

static int cuda_arena_reserve(struct backend *b, uint64_t bytes)
{
    struct backend_cuda *c = cu(b);
    if (c->arena) return KRS_ERR_STATE;
    if (bytes == 0) return KRS_ERR_INVALID;
    int rc = CUDA_CHECK(cudaMalloc((void **)&c->arena, bytes), "activation arena");
    if (rc) return rc;
    c->arena_bytes = bytes;
    c->arena_used = 0;
    return KRS_OK;
}

static int cuda_act_alloc(struct backend *b, int64_t n, struct backend_tensor **out)
{
    struct backend_cuda *c = cu(b);
    *out = NULL;
    if (!c->arena) return KRS_ERR_STATE;
    if (n <= 0) return KRS_ERR_INVALID;
    uint64_t off = (c->arena_used + CUDA_ALIGN - 1) & ~(uint64_t)(CUDA_ALIGN - 1);
    uint64_t bytes = (uint64_t)n * sizeof(float);
    if (off > c->arena_bytes || bytes > c->arena_bytes - off) return KRS_ERR_NOMEM;
    /* step_end may return any activation tensor: the pinned buffer fits the largest. */
    if (n > c->h_out_floats) {
        cudaFreeHost(c->h_out);
        c->h_out = NULL;
        c->h_out_floats = 0;
        int rc = CUDA_CHECK(cudaMallocHost((void **)&c->h_out, (size_t)bytes), "pinned output");
        if (rc) return rc;
        c->h_out_floats = n;
    }
    struct backend_tensor *t;
    int rc = tensor_new(c, &t);
    if (rc) return rc;
    t->kind = CUDA_T_ACT;
    t->type = QUANT_F32;
    t->n = n;
    t->dev = c->arena + off;
    c->arena_used = off + bytes;
    *out = t;
    return KRS_OK;
}

static int pow2_at_least(int n)
{
    int w = 1;
    while (w < n && w < (1 << 30)) w <<= 1;
    return w;
}

/* Pinned staging and its device twin: the header section (tokens, pos, seq, logit rows) and
 * two block-table sections of table_cap entries. */
static int stage_reserve(struct backend_cuda *c, int64_t table_cap)
{
    int64_t ints = 4ll * c->max_tokens + 2 * table_cap;
    cudaFreeHost(c->h_stage);
    cudaFree(c->d_stage);
    c->h_stage = NULL;
    c->d_stage = NULL;
    c->stage_ints = c->table_cap = 0;
    int rc;
    if ((rc = CUDA_CHECK(cudaMallocHost((void **)&c->h_stage, (size_t)ints * 4), "staging")) ||
        (rc = CUDA_CHECK(cudaMalloc((void **)&c->d_stage, (size_t)ints * 4), "staging")))
        return rc;
    c->stage_ints = ints;
    c->table_cap = table_cap;
    return KRS_OK;
}

static int cuda_kv_reserve(struct backend *b, const struct backend_kv_layout *l)
{
    struct backend_cuda *c = cu(b);
    struct cuda_kv *kv = &c->kv;
    if (kv->reserved) return KRS_ERR_STATE;
    if (!l || l->n_layers <= 0 || !l->layer_group || l->block_size <= 0 || l->kv_dim <= 0)
        return KRS_ERR_INVALID;
    kv->layer_group = (uint8_t *)alloc_calloc((size_t)l->n_layers, 1);
    kv->layer_slot = (int *)alloc_calloc((size_t)l->n_layers, sizeof(int));
    if (!kv->layer_group || !kv->layer_slot) return KRS_ERR_NOMEM;
    kv->n_layers = l->n_layers;
    kv->block_size = l->block_size;
    kv->kv_dim = l->kv_dim;
    for (int il = 0; il < l->n_layers; il++) {
        int g = l->layer_group[il];
        if (g != BACKEND_KV_FULL && g != BACKEND_KV_SWA) return KRS_ERR_INVALID;
        kv->layer_group[il] = (uint8_t)g;
        kv->layer_slot[il] = kv->n_group_layers[g]++;
    }
    for (int g = 0; g < BACKEND_KV_GROUPS; g++) {
        kv->n_blocks[g] = l->n_blocks[g];
        if (kv->n_group_layers[g] == 0) continue;
        if (l->n_blocks[g] <= 0) return KRS_ERR_INVALID;
        size_t bytes = (size_t)kv->n_group_layers[g] * (size_t)l->n_blocks[g] *
                       (size_t)l->block_size * (size_t)l->kv_dim * sizeof(float);
        int rc;
        if ((rc = CUDA_CHECK(cudaMalloc((void **)&kv->k[g], bytes), "KV pool")) ||
            (rc = CUDA_CHECK(cudaMalloc((void **)&kv->v[g], bytes), "KV pool")))
            return rc;
        c->kv_bytes += 2 * (uint64_t)bytes;
    }
    int rc =
        stage_reserve(c, (int64_t)c->max_tokens * pow2_at_least(c->max_ctx / l->block_size + 1));
    if (rc) return rc;
    kv->reserved = 1;
    return KRS_OK;
}

/* ---- the step ---- */

/* Steps of up to this many tokens (with logits) are recorded as CUDA graphs. */
#define GRAPH_MAX_TOKENS 256

static int cuda_step_begin(struct backend *b, const struct backend_step *s)
{
    struct backend_cuda *c = cu(b);
    struct cuda_step *st = &c->step;
    const struct cuda_kv *kv = &c->kv;
    /* What the last step still holds back (one without step_end: no logits, or abandoned). */
    int rc = cuda_flush(c);
    st->active = 0;
    c->x_half_src = NULL;
    if (rc) return rc;
    if (!s || s->n_tokens <= 0 || s->n_tokens > c->max_tokens || !s->tokens || !s->pos || !s->seq ||
        s->n_seqs <= 0 || s->n_seqs > c->max_tokens || s->n_logits < 0 ||
        s->n_logits > c->max_tokens || (s->n_logits > 0 && !s->logit_rows))
        return KRS_ERR_INVALID;
    const int T = s->n_tokens;
    int max_pos = 0;
    for (int t = 0; t < T; t++) {
        if (s->pos[t] < 0 || s->seq[t] < 0 || s->seq[t] >= s->n_seqs) return KRS_ERR_INVALID;
        if (s->pos[t] > max_pos) max_pos = s->pos[t];
    }
    for (int i = 0; i < s->n_logits; i++)
        if (s->logit_rows[i] < 0 || s->logit_rows[i] >= T) return KRS_ERR_INVALID;
    /* Block tables of the groups that have layers: ids in range (kv_store checks that the
     * tokens' own slots are held; a step need not touch the KV cache). */
    int use[BACKEND_KV_GROUPS] = {0, 0};
    const int mb = s->max_blocks;
    for (int g = 0; g < BACKEND_KV_GROUPS; g++) {
        if (!kv->reserved || kv->n_group_layers[g] == 0) continue;
        const int32_t *tb = s->block_table[g];
        if (!tb || mb <= 0) return KRS_ERR_INVALID;
        int64_t n = (int64_t)s->n_seqs * mb;
        if (n > c->table_cap) return KRS_ERR_INVALID;
        for (int64_t i = 0; i < n; i++)
            if (tb[i] < -1 || tb[i] >= kv->n_blocks[g]) return KRS_ERR_INVALID;
        for (int t = 0; t < T; t++) /* kernels index row seq[t] up to entry pos[t] / bs */
            if (s->pos[t] / kv->block_size >= mb) return KRS_ERR_INVALID;
        use[g] = 1;
    }
    /* Rows padded with -1 to a power of two (what does not fit stays as it came): steps with
     * the same width share a graph, and no kernel reads past entry pos / block_size. */
    int W = 0;
    if (use[0] || use[1]) {
        W = pow2_at_least(mb);
        if ((int64_t)s->n_seqs * W > c->table_cap) W = mb;
    }
    /* The previous upload must be done before its pinned buffer is rewritten. */
    if ((rc = CUDA_CHECK(cudaEventSynchronize(c->staged), "staging reuse"))) return rc;
    int32_t *h = c->h_stage;
    int64_t off = 0;
    const int32_t *d[4];
    const int32_t *src[4] = {s->tokens, s->pos, s->seq, s->logit_rows};
    const int64_t cnt[4] = {T, T, T, s->n_logits};
    for (int i = 0; i < 4; i++) {
        if (cnt[i] > 0) memcpy(h + off, src[i], (size_t)cnt[i] * 4);
        d[i] = c->d_stage + off;
        off += cnt[i];
    }
    for (int g = 0; g < BACKEND_KV_GROUPS; g++) {
        st->d_table[g] = st->h_table[g] = NULL;
        if (!use[g]) continue;
        for (int q = 0; q < s->n_seqs; q++) {
            int32_t *row = h + off + (int64_t)q * W;
            memcpy(row, s->block_table[g] + (int64_t)q * mb, (size_t)mb * 4);
            for (int i = mb; i < W; i++) row[i] = -1;
        }
        st->h_table[g] = h + off;
        st->d_table[g] = c->d_stage + off;
        off += (int64_t)s->n_seqs * W;
    }
    if ((rc = CUDA_CHECK(
             cudaMemcpyAsync(c->d_stage, h, (size_t)off * 4, cudaMemcpyHostToDevice, c->stream),
             "step upload")) ||
        (rc = CUDA_CHECK(cudaEventRecord(c->staged, c->stream), "step upload")) ||
        (rc = CUDA_CHECK(cudaMemsetAsync(c->d_err, 0, sizeof(int), c->stream), "step flags")))
        return rc;
    st->n_tokens = T;
    st->n_seqs = s->n_seqs;
    st->max_blocks = W;
    st->n_logits = s->n_logits;
    st->max_pos = max_pos;
    st->h_tokens = h;
    st->h_pos = h + T;
    st->h_seq = h + 2 * T;
    st->d_tokens = d[0];
    st->d_pos = d[1];
    st->d_seq = d[2];
    st->d_logit_rows = d[3];
    /* The shape key: everything the upload's layout and the kernels' launch parameters depend
     * on besides the ops' own arguments. Steps without logits have no step_end to launch from. */
    uint64_t key = 0;
    if (T <= GRAPH_MAX_TOKENS && s->n_logits > 0 && s->n_logits < 4096 && s->n_seqs < 4096 &&
        W < (1 << 24))
        key = 1 | (uint64_t)T << 1 | (uint64_t)s->n_logits << 13 | (uint64_t)s->n_seqs << 25 |
              (uint64_t)(use[0] | use[1] << 1) << 37 | (uint64_t)W << 39;
    if ((rc = cuda_graph_begin(c, key))) return rc;
    st->active = 1;
    return KRS_OK;
}

static int cuda_step_end(struct backend *b, const struct backend_tensor *t, int rows, int cols,
                         const float **out)
{
    struct backend_cuda *c = cu(b);
    *out = NULL;
    if (!c->step.active) return KRS_ERR_STATE;
    int rc = cuda_flush(c);
    c->step.active = 0;
    if (rc) return rc;
    int64_t n = (int64_t)rows * cols;
    if (rows < 0 || cols < 0 || !is_act(t, n) || n > c->h_out_floats) return KRS_ERR_INVALID;
    if ((n > 0 && (rc = CUDA_CHECK(cudaMemcpyAsync(c->h_out, t->dev, (size_t)n * sizeof(float),
                                                   cudaMemcpyDeviceToHost, c->stream),
                                   "logits download"))) ||
        (rc = CUDA_CHECK(
             cudaMemcpyAsync(c->h_err, c->d_err, sizeof(int), cudaMemcpyDeviceToHost, c->stream),
             "step flags")) ||
        (rc = CUDA_CHECK(cudaStreamSynchronize(c->stream), "step")) ||
        (rc = CUDA_CHECK(cudaGetLastError(), "step")))
        return rc;
    if (*c->h_err) {
        KRS_LOG_ERRORF("cuda: step read or wrote a KV position whose block is not held (flags %d)",
                       *c->h_err);
        return KRS_ERR_INVALID;
    }
    *out = c->h_out;
    return KRS_OK;
}

/* The sampler enqueues on the stream itself: what the step holds back goes first. */
static int op_sample(struct backend *b, const struct backend_tensor *logits, int rows, int n_vocab,
                     const struct backend_sample_row *r, const struct backend_logit_edit *edits,
                     int n_edits, const uint32_t *const *masks)
{
    struct backend_cuda *c = cu(b);
    if (c->step.active) {
        int rc = cuda_flush(c);
        if (rc) return rc;
    }
    return cuda_op_sample(b, logits, rows, n_vocab, r, edits, n_edits, masks);
}

static int op_step_end_sampled(struct backend *b, int rows, const int32_t **ids,
                               const float **logprobs)
{
    struct backend_cuda *c = cu(b);
    if (c->step.active) {
        int rc = cuda_flush(c);
        if (rc) {
            c->step.active = 0;
            return rc;
        }
    }
    const int timed = c->ev_pending && cudaEventRecord(c->ev_done, c->stream) == cudaSuccess;
    c->ev_pending = 0;
    int rc = cuda_op_step_end_sampled(b, rows, ids, logprobs);
    float ms = 0.0f;
    if (!rc && timed && cudaEventElapsedTime(&ms, c->ev_launch, c->ev_done) == cudaSuccess) {
        c->dev_us += 1e3 * ms;
        c->n_timed++;
        c->last_timed_ns = c->last_launch_ns;
    }
    return rc;
}

static int op_step_flush(struct backend *b)
{
    struct backend_cuda *c = cu(b);
    if (!c->step.active) return KRS_ERR_STATE;
    cudaStreamCaptureStatus cap = cudaStreamCaptureStatusNone;
    if (c->step_times && cudaStreamIsCapturing(c->stream, &cap) == cudaSuccess &&
        cap == cudaStreamCaptureStatusNone &&
        cudaEventRecord(c->ev_launch, c->stream) == cudaSuccess) {
        /* host time: from a timed sampled step's launch to the next launch */
        const uint64_t now = clock_now_ns();
        if (c->last_timed_ns) {
            c->wall_us += 1e-3 * (double)(now - c->last_timed_ns);
            c->n_wall++;
        }
        c->last_launch_ns = now;
        c->ev_pending = 1;
    }
    c->last_timed_ns = 0;
    int rc = cuda_flush(c);
    if (rc) c->step.active = 0;
    return rc;
}

/* ---- ops: validated here, recorded as struct cuda_op, enqueued by cuda_submit ---- */

#define NEED_STEP(c)                                                                               \
    do {                                                                                           \
        if (!(c)->step.active) return KRS_ERR_STATE;                                               \
    } while (0)

static struct cuda_op op_new(int kind)
{
    struct cuda_op o;
    memset(&o, 0, sizeof o); /* records compare byte for byte */
    o.kind = kind;
    return o;
}

static int cuda_op_embed(struct backend *b, const struct backend_tensor *emb, float scale,
                         struct backend_tensor *x)
{
    struct backend_cuda *c = cu(b);
    NEED_STEP(c);
    const int T = c->step.n_tokens;
    if (!emb || emb->kind != CUDA_T_WEIGHT || !is_act(x, (int64_t)T * emb->n_in))
        return KRS_ERR_INVALID;
    for (int t = 0; t < T; t++)
        if (c->step.h_tokens[t] < 0 || c->step.h_tokens[t] >= emb->n_out) return KRS_ERR_INVALID;
    struct cuda_op o = op_new(CUDA_OP_EMBED);
    o.t[0] = emb;
    o.t[1] = x;
    o.f[0] = scale;
    return cuda_submit(c, &o);
}

static int cuda_op_matmul(struct backend *b, const struct backend_tensor *w,
                          const struct backend_tensor *x, int rows, struct backend_tensor *y)
{
    struct backend_cuda *c = cu(b);
    NEED_STEP(c);
    if (!w || w->kind != CUDA_T_WEIGHT || rows < 0 || !is_act(x, (int64_t)rows * w->n_in) ||
        !is_act(y, (int64_t)rows * w->n_out) || x == y)
        return KRS_ERR_INVALID;
    if (rows == 0) return KRS_OK;
    struct cuda_op o = op_new(CUDA_OP_MATMUL);
    o.t[0] = w;
    o.t[1] = x;
    o.t[2] = y;
    o.i[0] = rows;
    return cuda_submit(c, &o);
}

static int cuda_op_rmsnorm(struct backend *b, const struct backend_tensor *x,
                           const struct backend_tensor *w, int rows, int n, float eps,
                           struct backend_tensor *y)
{
    struct backend_cuda *c = cu(b);
    NEED_STEP(c);
    int64_t need = (int64_t)rows * n;
    if (rows < 0 || n <= 0 || !is_act(x, need) || !is_act(y, need) || !is_vec(w, n))
        return KRS_ERR_INVALID;
    struct cuda_op o = op_new(CUDA_OP_RMSNORM);
    o.t[0] = x;
    o.t[1] = w;
    o.t[2] = y;
    o.i[0] = rows;
    o.i[1] = n;
    o.f[0] = eps;
    return cuda_submit(c, &o);
}

static int cuda_op_add_bias(struct backend *b, struct backend_tensor *y,
                            const struct backend_tensor *bias, int rows, int n)
{
    struct backend_cuda *c = cu(b);
    NEED_STEP(c);
    if (rows < 0 || n <= 0 || !is_act(y, (int64_t)rows * n) || !is_vec(bias, n))
        return KRS_ERR_INVALID;
    struct cuda_op o = op_new(CUDA_OP_ADD_BIAS);
    o.t[0] = y;
    o.t[1] = bias;
    o.i[0] = rows;
    o.i[1] = n;
    return cuda_submit(c, &o);
}

static int cuda_op_add(struct backend *b, struct backend_tensor *y, const struct backend_tensor *x,
                       int64_t n)
{
    struct backend_cuda *c = cu(b);
    NEED_STEP(c);
    if (!is_act(y, n) || !is_act(x, n)) return KRS_ERR_INVALID;
    struct cuda_op o = op_new(CUDA_OP_ADD);
    o.t[0] = y;
    o.t[1] = x;
    o.n = n;
    return cuda_submit(c, &o);
}

static int cuda_op_softcap(struct backend *b, struct backend_tensor *x, int64_t n, float cap)
{
    struct backend_cuda *c = cu(b);
    NEED_STEP(c);
    if (!is_act(x, n) || !(cap > 0.0f)) return KRS_ERR_INVALID;
    struct cuda_op o = op_new(CUDA_OP_SOFTCAP);
    o.t[0] = x;
    o.n = n;
    o.f[0] = cap;
    return cuda_submit(c, &o);
}

static int cuda_op_glu(struct backend *b, struct backend_tensor *gate,
                       const struct backend_tensor *up, int64_t n, int gelu)
{
    struct backend_cuda *c = cu(b);
    NEED_STEP(c);
    if (!is_act(gate, n) || !is_act(up, n)) return KRS_ERR_INVALID;
    struct cuda_op o = op_new(CUDA_OP_GLU);
    o.t[0] = gate;
    o.t[1] = up;
    o.n = n;
    o.i[0] = gelu != 0;
    return cuda_submit(c, &o);
}

static int cuda_op_rope(struct backend *b, const struct backend_rope_args *a)
{
    struct backend_cuda *c = cu(b);
    NEED_STEP(c);
    if (!a || a->n_heads <= 0 || a->head_dim <= 0 || a->n_rot <= 0 || a->n_rot % 2 ||
        a->n_rot > a->head_dim ||
        !is_act(a->x, (int64_t)c->step.n_tokens * a->n_heads * a->head_dim) ||
        (a->freq_factors && !is_vec(a->freq_factors, a->n_rot / 2)))
        return KRS_ERR_INVALID;
    struct cuda_op o = op_new(CUDA_OP_ROPE);
    o.t[0] = a->x;
    o.t[1] = a->freq_factors;
    o.i[0] = a->n_heads;
    o.i[1] = a->head_dim;
    o.i[2] = a->n_rot;
    o.i[3] = a->neox != 0;
    o.f[0] = a->base;
    o.f[1] = a->freq_scale;
    return cuda_submit(c, &o);
}

static int cuda_op_kv_store(struct backend *b, int layer, const struct backend_tensor *k,
                            const struct backend_tensor *v)
{
    struct backend_cuda *c = cu(b);
    NEED_STEP(c);
    const struct cuda_kv *kv = &c->kv;
    int64_t need = (int64_t)c->step.n_tokens * kv->kv_dim;
    if (!kv->reserved || layer < 0 || layer >= kv->n_layers || !is_act(k, need) || !is_act(v, need))
        return KRS_ERR_INVALID;
    /* Every token's own slot must be held in the layer's group. */
    const struct cuda_step *st = &c->step;
    const int32_t *tb = st->h_table[kv->layer_group[layer]];
    if (!tb) return KRS_ERR_INVALID;
    for (int t = 0; t < st->n_tokens; t++) {
        int64_t blk = st->h_pos[t] / kv->block_size;
        if (blk >= st->max_blocks || tb[(int64_t)st->h_seq[t] * st->max_blocks + blk] < 0)
            return KRS_ERR_INVALID;
    }
    struct cuda_op o = op_new(CUDA_OP_KV_STORE);
    o.i[0] = layer;
    o.t[0] = k;
    o.t[1] = v;
    return cuda_submit(c, &o);
}

static int cuda_op_attention(struct backend *b, const struct backend_attn_args *a)
{
    struct backend_cuda *c = cu(b);
    NEED_STEP(c);
    const struct cuda_kv *kv = &c->kv;
    if (!a || !kv->reserved || a->layer < 0 || a->layer >= kv->n_layers || a->n_head <= 0 ||
        a->n_head_kv <= 0 || a->n_head % a->n_head_kv || a->head_dim <= 0 || a->n_swa < 0 ||
        a->n_head_kv * a->head_dim != kv->kv_dim)
        return KRS_ERR_INVALID;
    int64_t need = (int64_t)c->step.n_tokens * a->n_head * a->head_dim;
    if (!is_act(a->q, need) || !is_act(a->out, need) || a->q == a->out ||
        !c->step.d_table[kv->layer_group[a->layer]])
        return KRS_ERR_INVALID;
    if (a->head_dim > 256) {
        KRS_LOG_ERRORF("cuda: attention head_dim %d (at most 256)", a->head_dim);
        return KRS_ERR_UNSUPPORTED;
    }
    struct cuda_op o = op_new(CUDA_OP_ATTENTION);
    o.t[0] = a->q;
    o.t[1] = a->out;
    o.i[0] = a->layer;
    o.i[1] = a->n_head;
    o.i[2] = a->n_head_kv;
    o.i[3] = a->head_dim;
    o.i[4] = a->n_swa;
    o.f[0] = a->scale;
    return cuda_submit(c, &o);
}

static int cuda_op_get_rows(struct backend *b, const struct backend_tensor *x, int n,
                            struct backend_tensor *dst)
{
    struct backend_cuda *c = cu(b);
    NEED_STEP(c);
    const struct cuda_step *st = &c->step;
    if (n <= 0 || !is_act(x, (int64_t)st->n_tokens * n) || !is_act(dst, (int64_t)st->n_logits * n))
        return KRS_ERR_INVALID;
    struct cuda_op o = op_new(CUDA_OP_GET_ROWS);
    o.t[0] = x;
    o.t[1] = dst;
    o.i[0] = n;
    return cuda_submit(c, &o);
}

static const struct backend_ops cuda_ops = {
    .name = "cuda",
    .destroy = cuda_destroy,
    .mem_info = cuda_mem_info,
    .weight_upload = cuda_weight_upload,
    .arena_reserve = cuda_arena_reserve,
    .act_alloc = cuda_act_alloc,
    .kv_reserve = cuda_kv_reserve,
    .step_begin = cuda_step_begin,
    .step_end = cuda_step_end,
    .embed = cuda_op_embed,
    .matmul = cuda_op_matmul,
    .rmsnorm = cuda_op_rmsnorm,
    .add_bias = cuda_op_add_bias,
    .add = cuda_op_add,
    .softcap = cuda_op_softcap,
    .glu = cuda_op_glu,
    .rope = cuda_op_rope,
    .kv_store = cuda_op_kv_store,
    .attention = cuda_op_attention,
    .get_rows = cuda_op_get_rows,
    .sample = op_sample,
    .step_end_sampled = op_step_end_sampled,
    .step_flush = op_step_flush,
};

static int env_int(const char *name, int def)
{
    const char *v = getenv(name);
    if (!v || !*v) return def;
    char *end;
    long x = strtol(v, &end, 10);
    return *end ? def : (int)x;
}

extern "C" int backend_cuda_create(const struct backend_params *p, struct backend **out, char *err,
                                   size_t errlen)
{
    *out = NULL;
    if (err && errlen) err[0] = 0;
    if (!p || p->max_tokens <= 0 || p->max_ctx <= 0 || p->max_n_in <= 0) {
        if (err) snprintf(err, errlen, "cuda: invalid backend parameters");
        return KRS_ERR_INVALID;
    }
    int n_dev = 0;
    cudaError_t e = cudaGetDeviceCount(&n_dev);
    if (e != cudaSuccess || n_dev == 0) {
        if (err)
            snprintf(err, errlen, "cuda: no usable device (%s)",
                     e != cudaSuccess ? cudaGetErrorString(e) : "none found");
        cudaGetLastError(); /* clear */
        return KRS_ERR_UNSUPPORTED;
    }
    cudaDeviceProp prop;
    memset(&prop, 0, sizeof prop);
    if (cudaGetDeviceProperties(&prop, 0) != cudaSuccess || prop.major < 9) {
        if (err)
            snprintf(err, errlen,
                     "cuda: device 0 is compute capability %d.%d; this build needs 9.0", prop.major,
                     prop.minor);
        return KRS_ERR_UNSUPPORTED;
    }
    struct backend_cuda *c = (struct backend_cuda *)alloc_calloc(1, sizeof *c);
    if (!c) return KRS_ERR_NOMEM;
    c->base.ops = &cuda_ops;
    c->device = 0;
    c->n_sm = prop.multiProcessorCount;
    c->max_tokens = p->max_tokens;
    c->max_n_in = p->max_n_in;
    c->max_ctx = p->max_ctx;
    c->mv_max_rows = env_int("KRS_CUDA_MV_ROWS", CUDA_MV_MAX_ROWS);
    c->mv_half_rows = env_int("KRS_CUDA_MV_HALF_ROWS", 2);
    c->mv_nw4_rows = env_int("KRS_CUDA_MV_NW4", 32768);
    c->gemm_tf32 = !env_int("KRS_CUDA_GEMM_F32", 0);
    c->half_copy = env_int("KRS_CUDA_HALF_COPY", 1) != 0;
    c->fuse = env_int("KRS_CUDA_FUSE", 1) != 0;
    c->defer_on = env_int("KRS_CUDA_DEFER_UNSCALE", 1) != 0;
    c->pdl = env_int("KRS_CUDA_PDL", 1) != 0;
    c->attn_tile = env_int("KRS_CUDA_ATTN_TILE", 1);
    c->sample_splits = env_int("KRS_CUDA_SAMPLE_SPLITS", 16);
    c->step_times = env_int("KRS_CUDA_STEP_TIMES", 0) != 0;
    if (c->step_times && (cudaEventCreate(&c->ev_launch) != cudaSuccess ||
                          cudaEventCreate(&c->ev_done) != cudaSuccess))
        c->step_times = 0;
    int rc;
    if ((rc = CUDA_CHECK(cudaSetDevice(0), "cudaSetDevice")) ||
        (rc = CUDA_CHECK(cudaStreamCreateWithFlags(&c->stream, cudaStreamNonBlocking), "stream")) ||
        (rc = CUDA_CHECK(cudaEventCreateWithFlags(&c->staged, cudaEventDisableTiming), "event")) ||
        (rc = CUDA_CHECK(cudaMalloc(&c->cublas_ws, CUBLAS_WS_BYTES), "cuBLAS workspace")) ||
        (rc = CUDA_CHECK(cudaMalloc((void **)&c->attn_part, CUDA_ATTN_PART * sizeof(float)),
                         "attention partials")) ||
        (rc = CUDA_CHECK(cudaMalloc((void **)&c->attn_done, CUDA_ATTN_PAIRS * sizeof(int)),
                         "attention split counters")) ||
        (rc = CUDA_CHECK(cudaMemset(c->attn_done, 0, CUDA_ATTN_PAIRS * sizeof(int)),
                         "attention split counters")) ||
        (rc = CUDA_CHECK(cudaMalloc((void **)&c->res_done, sizeof(int)), "fused counter")) ||
        (rc = CUDA_CHECK(cudaMemset(c->res_done, 0, sizeof(int)), "fused counter")) ||
        (rc = CUDA_CHECK(cudaMalloc(&c->x_half, (size_t)c->max_tokens * c->max_n_in * 2),
                         "half activations")) ||
        (rc = CUDA_CHECK(cudaMalloc((void **)&c->x_inv_scale, (size_t)c->max_tokens * 4),
                         "half activation scales")) ||
        (rc = CUDA_CHECK(cudaMalloc((void **)&c->d_err, sizeof(int)), "flags")) ||
        (rc = CUDA_CHECK(cudaMalloc((void **)&c->d_overflow, sizeof(int)), "flags")) ||
        (rc = CUDA_CHECK(cudaMallocHost((void **)&c->h_err, sizeof(int)), "flags")))
        goto fail;
    c->cublas_ws_bytes = CUBLAS_WS_BYTES;
    if ((rc = cuda_cublas_status(cublasCreate(&c->cublas), "cublasCreate", __FILE__, __LINE__)) ||
        (rc = cuda_cublas_status(cublasSetStream(c->cublas, c->stream), "cublasSetStream", __FILE__,
                                 __LINE__)) ||
        (rc = cuda_cublas_status(cublasSetWorkspace(c->cublas, c->cublas_ws, c->cublas_ws_bytes),
                                 "cublasSetWorkspace", __FILE__, __LINE__)))
        goto fail;
    if ((rc = stage_reserve(c, 0))) goto fail;
    if ((rc = cuda_sampler_create(p->max_tokens, p->max_sample_edits, p->max_mask_rows,
                                  p->mask_vocab, &c->sampler)))
        goto fail;
    if ((rc = cuda_graphs_create(c))) goto fail;
    if ((rc = CUDA_CHECK(cudaEventRecord(c->staged, c->stream), "event"))) goto fail;
    KRS_LOG_DEBUGF("cuda: %s, %d SMs, %.1f GiB; matvec up to %d rows, GEMM %s, fusion %s, PDL %s",
                   prop.name, c->n_sm, prop.totalGlobalMem / 1073741824.0, c->mv_max_rows,
                   c->gemm_tf32 ? "TF32" : "F32", c->fuse ? "on" : "off", c->pdl ? "on" : "off");
    *out = &c->base;
    return KRS_OK;
fail:
    if (err) snprintf(err, errlen, "cuda: backend setup failed: %s", krs_status_str(rc));
    cuda_destroy(&c->base);
    return rc;
}
