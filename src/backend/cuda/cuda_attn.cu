/* CUDA paged KV store and attention.
 *
 * The KV pool (backend_cuda.cu) holds, per layer group, [layers][n_blocks][block_size][kv_dim]
 * floats for K and for V; block_table[group][seq * max_blocks + pos / block_size] names the
 * physical block of a position. A missing block (-1) never reads or writes memory: it sets
 * CUDA_ERRF_NO_BLOCK in the device error word, which step_end reports.
 *
 * Attention: one launch for every (token, head) of the step. A thread block of ATTN_WARPS warps
 * takes one (token, head) and one split of its visible positions [lo, pos]; each warp walks
 * every ATTN_WARPS-th position of the split, ATTN_UNROLL at a time (independent loads and
 * reductions in flight), keeping an online softmax (running max m, sum l, weighted V sum) over
 * head_dim <= 32 * D values, D per lane (any head_dim up to 256; multiples of 32 use vector
 * loads). The warps' states merge in shared memory. When a step has few (token, head) pairs
 * (decode) or long histories (prefill chunks deep into a sequence), positions are cut into
 * splits that run as separate blocks and write (m, l, acc) partials; the last split of a
 * (token, head) to finish (a counter per pair) merges them (flash-decoding without a second
 * launch: at batch 1 a launch costs as much as the attention itself). A decode over a short
 * history takes one wide block (ATTN_WIDE_WARPS) per (token, head) instead of splits. */
#include "backend/cuda/cuda_impl.h"

#include <math.h>
#include <string.h>

#define ATTN_WARPS  4
#define ATTN_UNROLL 4
#define ATTN_SPAN   1024 /* most positions one block walks when splits are affordable */
/* fewest positions of a split: one pass of the block's warps (ATTN_WARPS * ATTN_UNROLL), so a
 * decode at batch 1 spreads a short history over enough blocks to hide memory latency */
#define ATTN_MIN_SPLIT (ATTN_WARPS * ATTN_UNROLL)
/* Decode over a short history (at most ATTN_WIDE_SPAN positions): one block of
 * ATTN_WIDE_WARPS warps per (token, head) instead of splits, whose partials, counter and merge
 * cost more than the walk itself there. */
#define ATTN_WIDE_WARPS 16
#define ATTN_WIDE_SPAN  (4 * ATTN_WIDE_WARPS * ATTN_UNROLL)

struct attn_params {
    const float *q;
    float *out;
    float *part;
    int *done;      /* [pairs] splits finished; the last one merges and resets it */
    const float *k; /* the layer's slab of the group's pool */
    const float *v;
    const int32_t *pos, *seq, *table;
    int max_blocks, bs, kv_dim, n_head, group, head_dim, n_swa, nsplit;
    float scale;
    int *err;
};

/* The D values of a lane at p (its dims d0 .. d0+D-1); EXACT: all inside head_dim (vector
 * loads), else dims from hd on read as 0. */
template <int D, bool EXACT>
__device__ __forceinline__ void load_d(const float *p, float *r, int d0, int hd)
{
    if constexpr (!EXACT) {
#pragma unroll
        for (int j = 0; j < D; j++) r[j] = d0 + j < hd ? p[j] : 0.0f;
    } else if constexpr (D % 4 == 0) {
#pragma unroll
        for (int j = 0; j < D; j += 4) {
            float4 v = *(const float4 *)(p + j);
            r[j] = v.x, r[j + 1] = v.y, r[j + 2] = v.z, r[j + 3] = v.w;
        }
    } else if constexpr (D % 2 == 0) {
#pragma unroll
        for (int j = 0; j < D; j += 2) {
            float2 v = *(const float2 *)(p + j);
            r[j] = v.x, r[j + 1] = v.y;
        }
    } else {
#pragma unroll
        for (int j = 0; j < D; j++) r[j] = p[j];
    }
}

/* Merges the nsplit partials of one (token, head) into out[hd], by the whole block. The
 * partials were written by other blocks of this launch: read through L2 (__ldcg). */
__device__ void attn_merge(const float *pp, int nsplit, int hd, float *__restrict__ out)
{
    float M = -INFINITY;
    for (int s = 0; s < nsplit; s++) M = fmaxf(M, __ldcg(pp + s * (hd + 2)));
    float L = 0.0f;
    for (int s = 0; s < nsplit; s++) {
        float ms = __ldcg(pp + s * (hd + 2));
        if (ms != -INFINITY) L += __ldcg(pp + s * (hd + 2) + 1) * expf(ms - M);
    }
    const float inv = L > 0.0f ? 1.0f / L : 0.0f;
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float sum = 0.0f;
        for (int s = 0; s < nsplit; s++) {
            float ms = __ldcg(pp + s * (hd + 2));
            if (ms != -INFINITY) sum += __ldcg(pp + s * (hd + 2) + 2 + d) * expf(ms - M);
        }
        out[d] = sum * inv;
    }
}

template <int D, bool EXACT, int W>
__global__ void __launch_bounds__(W * 32) k_attn(const attn_params P)
{
    cuda_pdl_enter();
    __shared__ float sm_m[W], sm_l[W];
    __shared__ float sm_acc[W][32 * D];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int th = blockIdx.x, split = blockIdx.y;
    const int t = th / P.n_head, h = th % P.n_head, g = h / P.group;
    const int hd = P.head_dim;
    const int p_end = P.pos[t];
    const int lo = (P.n_swa > 0 && p_end - P.n_swa + 1 > 0) ? p_end - P.n_swa + 1 : 0;
    const int span = p_end - lo + 1;
    const int chunk = (span + P.nsplit - 1) / P.nsplit;
    const int a = lo + split * chunk;
    const int e = min(a + chunk, p_end + 1);
    const int32_t *trow = P.table + (int64_t)P.seq[t] * P.max_blocks;

    const int d0 = lane * D;
    float q[D];
    load_d<D, EXACT>(P.q + (int64_t)th * hd + d0, q, d0, hd);
    float m = -INFINITY, l = 0.0f, acc[D];
#pragma unroll
    for (int j = 0; j < D; j++) acc[j] = 0.0f;

    for (int base = a + warp; base < e; base += W * ATTN_UNROLL) {
        float kr[ATTN_UNROLL][D], vr[ATTN_UNROLL][D], s[ATTN_UNROLL];
        bool ok[ATTN_UNROLL];
#pragma unroll
        for (int u = 0; u < ATTN_UNROLL; u++) {
            const int p = base + u * W;
            int blk = p < e ? trow[p / P.bs] : -1;
            ok[u] = blk >= 0;
            if (p < e && blk < 0 && lane == 0) atomicOr(P.err, CUDA_ERRF_NO_BLOCK);
            s[u] = 0.0f;
            if (ok[u]) {
                int64_t off = ((int64_t)blk * P.bs + p % P.bs) * P.kv_dim + g * hd + d0;
                load_d<D, EXACT>(P.k + off, kr[u], d0, hd);
                load_d<D, EXACT>(P.v + off, vr[u], d0, hd);
            }
        }
#pragma unroll
        for (int u = 0; u < ATTN_UNROLL; u++)
            if (ok[u])
#pragma unroll
                for (int j = 0; j < D; j++) s[u] = fmaf(q[j], kr[u][j], s[u]);
#pragma unroll
        for (int o = 16; o > 0; o >>= 1)
#pragma unroll
            for (int u = 0; u < ATTN_UNROLL; u++) s[u] += __shfl_xor_sync(0xFFFFFFFFu, s[u], o);
#pragma unroll
        for (int u = 0; u < ATTN_UNROLL; u++) {
            if (!ok[u]) continue;
            const float sc = s[u] * P.scale;
            const float mn = fmaxf(m, sc);
            const float corr = expf(m - mn), pw = expf(sc - mn);
            l = l * corr + pw;
#pragma unroll
            for (int j = 0; j < D; j++) acc[j] = fmaf(pw, vr[u][j], acc[j] * corr);
            m = mn;
        }
    }

    if (lane == 0) sm_m[warp] = m, sm_l[warp] = l;
#pragma unroll
    for (int j = 0; j < D; j++) sm_acc[warp][d0 + j] = acc[j]; /* zeros past hd */
    __syncthreads();
    float M = -INFINITY;
    for (int w = 0; w < W; w++) M = fmaxf(M, sm_m[w]);
    float L = 0.0f, f[W];
    for (int w = 0; w < W; w++) {
        f[w] = sm_m[w] == -INFINITY ? 0.0f : expf(sm_m[w] - M);
        L += sm_l[w] * f[w];
    }
    if (P.nsplit == 1) {
        const float inv = L > 0.0f ? 1.0f / L : 0.0f;
        for (int d = threadIdx.x; d < hd; d += blockDim.x) {
            float sum = 0.0f;
            for (int w = 0; w < W; w++) sum += sm_acc[w][d] * f[w];
            P.out[(int64_t)th * hd + d] = sum * inv;
        }
    } else {
        float *pp = P.part + ((int64_t)th * P.nsplit + split) * (hd + 2);
        if (threadIdx.x == 0) pp[0] = M, pp[1] = L;
        for (int d = threadIdx.x; d < hd; d += blockDim.x) {
            float sum = 0.0f;
            for (int w = 0; w < W; w++) sum += sm_acc[w][d] * f[w];
            pp[2 + d] = sum;
        }
        /* publish this split, then count it; the block that counts last merges */
        __shared__ int last;
        __threadfence();
        __syncthreads();
        if (threadIdx.x == 0) last = atomicAdd(P.done + th, 1) == P.nsplit - 1;
        __syncthreads();
        if (last) {
            __threadfence();
            attn_merge(P.part + (int64_t)th * P.nsplit * (hd + 2), P.nsplit, hd,
                       P.out + (int64_t)th * hd);
            if (threadIdx.x == 0) P.done[th] = 0; /* ready for the next launch */
        }
    }
}

/* One block per token: K and V rows into the token's (sequence, position) slot. */
__global__ void k_kv_store(const float *__restrict__ k, const float *__restrict__ v,
                           float *__restrict__ kc, float *__restrict__ vc,
                           const int32_t *__restrict__ pos, const int32_t *__restrict__ seq,
                           const int32_t *__restrict__ table, int max_blocks, int bs, int kv_dim,
                           int *err)
{
    cuda_pdl_enter();
    const int t = blockIdx.x, p = pos[t];
    const int blk = table[(int64_t)seq[t] * max_blocks + p / bs];
    if (blk < 0) {
        if (threadIdx.x == 0) atomicOr(err, CUDA_ERRF_NO_BLOCK);
        return;
    }
    const int64_t dst = ((int64_t)blk * bs + p % bs) * kv_dim, src = (int64_t)t * kv_dim;
    for (int i = threadIdx.x; i < kv_dim; i += blockDim.x) {
        kc[dst + i] = k[src + i];
        vc[dst + i] = v[src + i];
    }
}

/* Fused attention prologue: block (t, h) takes q head h (h < n_head), k head h - n_head, or
 * (with a KV store) v head h - n_head - n_head_kv: rmsnorm (k_rmsnorm's arithmetic), rope
 * (k_rope's), then the row back in place and, for k and v, into its KV slot. */
struct qk_params {
    float *q, *k;
    float *v;
    const float *inv_q, *inv_k, *inv_v; /* deferred row scales, applied first (NULL: none) */
    const float *wq, *wk;
    float eps_q, eps_k;
    int nh, nkv, hd, n_rot, neox;
    float base, freq_scale;
    const float *ff;
    const int32_t *pos, *seq, *table;
    int max_blocks, bs, kv_dim;
    float *kc, *vc; /* the layer's slabs; NULL: no store */
    int *err;
};

__global__ void __launch_bounds__(CUDA_NORM_THREADS) k_qk_rope_store(const qk_params P)
{
    cuda_pdl_enter();
    __shared__ double part[CUDA_NORM_THREADS / 32];
    __shared__ float row[CUDA_QK_MAX_HD];
    const int H = P.nh + P.nkv + (P.kc ? P.nkv : 0);
    const int t = blockIdx.x / H, h = blockIdx.x % H, hd = P.hd, p = P.pos[t];
    int64_t slot = -1;
    if (P.kc && h >= P.nh) {
        const int blk = P.table[(int64_t)P.seq[t] * P.max_blocks + p / P.bs];
        if (blk < 0) {
            if (threadIdx.x == 0) atomicOr(P.err, CUDA_ERRF_NO_BLOCK);
        } else {
            slot = ((int64_t)blk * P.bs + p % P.bs) * P.kv_dim;
        }
    }
    if (h >= P.nh + P.nkv) { /* a v head: copy into the cache */
        const int64_t o = (int64_t)(h - P.nh - P.nkv) * hd;
        float *vr = P.v + (int64_t)t * P.kv_dim + o;
        for (int i = threadIdx.x; i < hd; i += blockDim.x) {
            float val = vr[i];
            if (P.inv_v) vr[i] = val *= P.inv_v[t]; /* the deferred unscale */
            if (slot >= 0) P.vc[slot + o + i] = val;
        }
        return;
    }
    const int isq = h < P.nh;
    float *xr =
        isq ? P.q + ((int64_t)t * P.nh + h) * hd : P.k + ((int64_t)t * P.nkv + h - P.nh) * hd;
    const float *inv = isq ? P.inv_q : P.inv_k;
    if (inv) { /* the deferred unscale of this head's slice, then the ops as they were */
        for (int i = threadIdx.x; i < hd; i += blockDim.x) xr[i] *= inv[t];
        __syncthreads();
    }
    const float *w = isq ? P.wq : P.wk;
    if (w) {
        const float sc = cuda_rms_scale(xr, hd, isq ? P.eps_q : P.eps_k, part);
        for (int i = threadIdx.x; i < hd; i += blockDim.x) row[i] = __fmul_rn(xr[i] * sc, w[i]);
    } else {
        for (int i = threadIdx.x; i < hd; i += blockDim.x) row[i] = xr[i];
    }
    __syncthreads();
    const int half = P.n_rot / 2;
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        float cs, sn;
        cuda_rope_cs(p, i, P.n_rot, P.base, P.freq_scale, P.ff, &cs, &sn);
        const int i0 = P.neox ? i : 2 * i, i1 = P.neox ? i + half : 2 * i + 1;
        cuda_rope_pair(row + i0, row + i1, cs, sn);
    }
    __syncthreads();
    for (int i = threadIdx.x; i < hd; i += blockDim.x) xr[i] = row[i];
    if (!isq && slot >= 0) {
        const int64_t o = slot + (int64_t)(h - P.nh) * hd;
        for (int i = threadIdx.x; i < hd; i += blockDim.x) P.kc[o + i] = row[i];
    }
}

/* The layer's K (or V) slab inside its group's pool. */
static float *layer_slab(const struct backend_cuda *c, float *const *pool, int layer)
{
    const struct cuda_kv *kv = &c->kv;
    int g = kv->layer_group[layer];
    return pool[g] + (int64_t)kv->layer_slot[layer] * kv->n_blocks[g] * kv->block_size * kv->kv_dim;
}

int cuda_kv_store(struct backend_cuda *c, int layer, const float *k, const float *v)
{
    const struct cuda_kv *kv = &c->kv;
    int g = kv->layer_group[layer];
    if (c->step.n_tokens <= 0) return KRS_OK;
    cuda_launch(c, k_kv_store, c->step.n_tokens, 256, k, v, layer_slab(c, kv->k, layer),
                layer_slab(c, kv->v, layer), c->step.d_pos, c->step.d_seq, c->step.d_table[g],
                c->step.max_blocks, kv->block_size, kv->kv_dim, c->d_err);
    return CUDA_LAUNCHED("kv_store");
}

int cuda_qk_rope_store(struct backend_cuda *c, const struct cuda_qk_args *a)
{
    const struct cuda_kv *kv = &c->kv;
    const int T = c->step.n_tokens;
    if (T <= 0) return KRS_OK;
    if (a->head_dim > CUDA_QK_MAX_HD) return KRS_ERR_INVALID; /* the caller checks */
    qk_params P;
    memset(&P, 0, sizeof P);
    P.q = a->q;
    P.k = a->k;
    P.v = a->v;
    P.inv_q = a->inv_q;
    P.inv_k = a->inv_k;
    P.inv_v = a->inv_v;
    P.wq = a->wq;
    P.wk = a->wk;
    P.eps_q = a->eps_q;
    P.eps_k = a->eps_k;
    P.nh = a->n_head;
    P.nkv = a->n_head_kv;
    P.hd = a->head_dim;
    P.n_rot = a->n_rot;
    P.neox = a->neox;
    P.base = a->base;
    P.freq_scale = a->freq_scale;
    P.ff = a->freq_factors;
    P.pos = c->step.d_pos;
    P.seq = c->step.d_seq;
    P.err = c->d_err;
    int heads = a->n_head + a->n_head_kv;
    if (a->layer >= 0) {
        P.table = c->step.d_table[kv->layer_group[a->layer]];
        P.max_blocks = c->step.max_blocks;
        P.bs = kv->block_size;
        P.kv_dim = kv->kv_dim;
        P.kc = layer_slab(c, kv->k, a->layer);
        P.vc = layer_slab(c, kv->v, a->layer);
        heads += a->n_head_kv;
    }
    cuda_launch(c, k_qk_rope_store, (unsigned)((int64_t)T * heads), CUDA_NORM_THREADS, P);
    return CUDA_LAUNCHED("qk_rope_store");
}

template <int D>
static void launch_attn(const struct backend_cuda *c, const attn_params &P, dim3 grid, int wide)
{
    if (wide) {
        if (P.head_dim == 32 * D)
            cuda_launch(c, k_attn<D, true, ATTN_WIDE_WARPS>, grid, ATTN_WIDE_WARPS * 32, P);
        else
            cuda_launch(c, k_attn<D, false, ATTN_WIDE_WARPS>, grid, ATTN_WIDE_WARPS * 32, P);
    } else if (P.head_dim == 32 * D) {
        cuda_launch(c, k_attn<D, true, ATTN_WARPS>, grid, ATTN_WARPS * 32, P);
    } else {
        cuda_launch(c, k_attn<D, false, ATTN_WARPS>, grid, ATTN_WARPS * 32, P);
    }
}

int cuda_attention(struct backend_cuda *c, const struct backend_attn_args *a, const float *q,
                   float *out)
{
    const struct cuda_kv *kv = &c->kv;
    const int T = c->step.n_tokens, g = kv->layer_group[a->layer];
    if (T <= 0) return KRS_OK;
    if (cuda_attn_tile_fits(c, a))
        return cuda_attention_tiles(c, a, q, out, layer_slab(c, kv->k, a->layer),
                                    layer_slab(c, kv->v, a->layer), c->step.d_table[g]);
    const int64_t pairs = (int64_t)T * a->n_head;
    /* Splits when (token, head) pairs alone leave the GPU idle (decode), or a block would walk
     * more than ATTN_SPAN positions (long prefill chunks); >= ATTN_MIN_SPLIT positions each, as far
     * as the partials buffer allows. The span is bounded by the table's (padded) width, not by the
     * step's positions: steps of one graph key take the same launch (cuda_graph.cu). */
    int span = c->step.max_blocks * kv->block_size;
    if (a->n_swa > 0 && a->n_swa < span) span = a->n_swa;
    const int64_t target = 4ll * c->n_sm;
    int64_t nsplit = pairs < target ? (target + pairs - 1) / pairs : 1;
    if (nsplit < (span + ATTN_SPAN - 1) / ATTN_SPAN) nsplit = (span + ATTN_SPAN - 1) / ATTN_SPAN;
    if (nsplit > (span + ATTN_MIN_SPLIT - 1) / ATTN_MIN_SPLIT)
        nsplit = (span + ATTN_MIN_SPLIT - 1) / ATTN_MIN_SPLIT;
    if (nsplit > CUDA_ATTN_SPLITS) nsplit = CUDA_ATTN_SPLITS;
    while (nsplit > 1 && pairs * nsplit * (a->head_dim + 2) > CUDA_ATTN_PART) nsplit--;
    if (nsplit < 1 || pairs > CUDA_ATTN_PAIRS) nsplit = 1;
    const int wide = nsplit > 1 && span <= ATTN_WIDE_SPAN;
    if (wide) nsplit = 1;
    attn_params P;
    P.q = q;
    P.out = out;
    P.part = c->attn_part;
    P.done = c->attn_done;
    P.k = layer_slab(c, kv->k, a->layer);
    P.v = layer_slab(c, kv->v, a->layer);
    P.pos = c->step.d_pos;
    P.seq = c->step.d_seq;
    P.table = c->step.d_table[g];
    P.max_blocks = c->step.max_blocks;
    P.bs = kv->block_size;
    P.kv_dim = kv->kv_dim;
    P.n_head = a->n_head;
    P.group = a->n_head / a->n_head_kv;
    P.head_dim = a->head_dim;
    P.n_swa = a->n_swa;
    P.nsplit = (int)nsplit;
    P.scale = a->scale;
    P.err = c->d_err;
    dim3 grid((unsigned)pairs, (unsigned)nsplit);
    switch ((a->head_dim + 31) / 32) {
    case 1:
        launch_attn<1>(c, P, grid, wide);
        break;
    case 2:
        launch_attn<2>(c, P, grid, wide);
        break;
    case 3:
        launch_attn<3>(c, P, grid, wide);
        break;
    case 4:
        launch_attn<4>(c, P, grid, wide);
        break;
    case 5:
        launch_attn<5>(c, P, grid, wide);
        break;
    case 6:
        launch_attn<6>(c, P, grid, wide);
        break;
    case 7:
        launch_attn<7>(c, P, grid, wide);
        break;
    case 8:
        launch_attn<8>(c, P, grid, wide);
        break;
    default:
        return KRS_ERR_UNSUPPORTED; /* validated by the caller */
    }
    return CUDA_LAUNCHED("attention");
}
