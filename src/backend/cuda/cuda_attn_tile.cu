/* Prefill attention on tensor cores (flash-attention style) over the paged F32 KV cache.
 *
 * k_attn (cuda_attn.cu) gives every (token, head) its own walk over the keys: right for decode,
 * but a 512-token prompt then reads each key 512 x heads-per-KV-head times from L2, and that
 * walk was two thirds of a prefill step. Here a thread block takes a window of consecutive
 * tokens and one KV head: its rows are (token, query head of that KV head) pairs, 16 per warp
 * (one m16 MMA tile). The block stages TILE_KT keys at a time in shared memory as F16 (K row-major,
 * V transposed, rows padded so fragment loads hit distinct banks), and every warp computes
 * S = Q K^T and O += P V for its rows with mma.m16n8k16 (F16 in, F32 accumulate), keeping an
 * online softmax in the log2 domain (the softmax scale and log2(e) are folded into Q). The score
 * accumulator of S is laid out exactly as the A operand of P V needs, so P never leaves
 * registers. Masks per row: causal (key position <= the row's) and the sliding window.
 *
 * A window is TB tokens of the step in batch order; where sequences change inside it (or
 * positions are not consecutive) the block runs each segment in turn. So the launch depends only
 * on the step's token count, never on its contents, and a CUDA graph of the step stays valid.
 *
 * Rounding: Q, K, V and P pass through F16 (11-bit significands): ~1e-3 relative per element,
 * the same order as TF32 GEMMs. cuda_attention takes this path for steps of several tokens per
 * sequence, head sizes 64/128/256, enough blocks to fill the GPU, and models without F32
 * matrices (whose results stay exact). */
#include "backend/cuda/cuda_impl.h"

#include <cuda_fp16.h>
#include <math.h>

#define TILE_KT 32 /* keys staged per round */

struct tile_params {
    const float *q;
    float *out;
    const float *k, *v;
    const int32_t *pos, *seq, *table;
    int T, max_blocks, bs, kv_dim, n_head, group, n_swa, tb;
    float qscale; /* softmax scale * log2(e) */
    int *err;
};

static __device__ __forceinline__ void mma16816(float (&c)[4], uint32_t a0, uint32_t a1,
                                                uint32_t a2, uint32_t a3, uint32_t b0, uint32_t b1)
{
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, "
                 "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

static __device__ __forceinline__ uint32_t pack2(float lo, float hi)
{
    __half2 h = __floats2half2_rn(lo, hi);
    return *(uint32_t *)&h;
}

static __device__ __forceinline__ uint32_t ld32(const __half *p)
{
    return *(const uint32_t *)p;
}

/* One segment: tokens [s0, s0 + n) of one sequence at consecutive positions. */
template <int HD, int W>
__device__ void tile_segment(const tile_params &P, int s0, int n, __half *Qs, __half *Ks,
                             __half *Vt)
{
    constexpr int QS = HD + 8, KS = HD + 8, VS = TILE_KT + 8;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t4 = lane & 3;
    const int kvh = blockIdx.y, G = P.group, rows = n * G;
    const int p0 = P.pos[s0], p_hi = P.pos[s0 + n - 1];
    const int lo = P.n_swa > 0 && p0 - P.n_swa + 1 > 0 ? p0 - P.n_swa + 1 : 0;
    const int32_t *trow = P.table + (int64_t)P.seq[s0] * P.max_blocks;

    /* Q rows (token i = r / G, head kvh * G + r % G), scaled, as F16; zeros past `rows` */
    for (int i = threadIdx.x; i < W * 16 * (HD / 4); i += W * 32) {
        const int r = i / (HD / 4), d = (i % (HD / 4)) * 4;
        float4 x = make_float4(0.f, 0.f, 0.f, 0.f);
        if (r < rows) {
            const int64_t th = (int64_t)(s0 + r / G) * P.n_head + kvh * G + r % G;
            x = *(const float4 *)(P.q + th * HD + d);
        }
        uint2 h = {pack2(x.x * P.qscale, x.y * P.qscale), pack2(x.z * P.qscale, x.w * P.qscale)};
        *(uint2 *)(Qs + r * QS + d) = h;
    }

    /* this thread's two rows: rA = 16 warp + g, rB = rA + 8 */
    const int rA = warp * 16 + g, rB = rA + 8;
    const bool vA = rA < rows, vB = rB < rows;
    const int pA = vA ? P.pos[s0 + rA / G] : -1, pB = vB ? P.pos[s0 + rB / G] : -1;
    const int loA = P.n_swa > 0 ? pA - P.n_swa + 1 : 0, loB = P.n_swa > 0 ? pB - P.n_swa + 1 : 0;
    const int warp_rows = rows - warp * 16; /* > 0: the warp has work */
    const int warp_hi = warp_rows > 0 ? P.pos[s0 + (warp * 16 + min(warp_rows, 16) - 1) / G] : -1;

    float o[HD / 8][4];
#pragma unroll
    for (int j = 0; j < HD / 8; j++) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
    float mA = -INFINITY, mB = -INFINITY, lA = 0.f, lB = 0.f;

    for (int kb = lo; kb <= p_hi; kb += TILE_KT) {
        __syncthreads(); /* Q written / the previous keys consumed */
        for (int i = threadIdx.x; i < TILE_KT * (HD / 4); i += W * 32) {
            const int key = i / (HD / 4), d = (i % (HD / 4)) * 4, p = kb + key;
            float4 kx = make_float4(0.f, 0.f, 0.f, 0.f), vx = kx;
            if (p <= p_hi) {
                const int blk = trow[p / P.bs];
                if (blk >= 0) {
                    const int64_t off =
                        ((int64_t)blk * P.bs + p % P.bs) * P.kv_dim + (int64_t)kvh * HD + d;
                    kx = *(const float4 *)(P.k + off);
                    vx = *(const float4 *)(P.v + off);
                } else if (d == 0) {
                    atomicOr(P.err, CUDA_ERRF_NO_BLOCK);
                }
            }
            *(uint2 *)(Ks + key * KS + d) = make_uint2(pack2(kx.x, kx.y), pack2(kx.z, kx.w));
            Vt[(d + 0) * VS + key] = __float2half_rn(vx.x);
            Vt[(d + 1) * VS + key] = __float2half_rn(vx.y);
            Vt[(d + 2) * VS + key] = __float2half_rn(vx.z);
            Vt[(d + 3) * VS + key] = __float2half_rn(vx.w);
        }
        __syncthreads();
        if (warp_rows <= 0 || kb > warp_hi) continue; /* every key of the round is masked */

        float s[TILE_KT / 8][4];
#pragma unroll
        for (int j = 0; j < TILE_KT / 8; j++) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
        const __half *qa = Qs + rA * QS + 2 * t4, *qb = Qs + rB * QS + 2 * t4;
#pragma unroll
        for (int ks = 0; ks < HD / 16; ks++) {
            const uint32_t a0 = ld32(qa + ks * 16), a1 = ld32(qb + ks * 16);
            const uint32_t a2 = ld32(qa + ks * 16 + 8), a3 = ld32(qb + ks * 16 + 8);
#pragma unroll
            for (int nc = 0; nc < TILE_KT / 8; nc++) {
                const __half *kp = Ks + (nc * 8 + g) * KS + ks * 16 + 2 * t4;
                mma16816(s[nc], a0, a1, a2, a3, ld32(kp), ld32(kp + 8));
            }
        }
        /* masks, then the online softmax of rows rA (s[][0..1]) and rB (s[][2..3]) */
        float xA = -INFINITY, xB = -INFINITY;
#pragma unroll
        for (int nc = 0; nc < TILE_KT / 8; nc++)
#pragma unroll
            for (int e = 0; e < 2; e++) {
                const int p = kb + nc * 8 + 2 * t4 + e;
                if (!(vA && p <= pA && p >= loA)) s[nc][e] = -INFINITY;
                if (!(vB && p <= pB && p >= loB)) s[nc][2 + e] = -INFINITY;
                xA = fmaxf(xA, s[nc][e]);
                xB = fmaxf(xB, s[nc][2 + e]);
            }
#pragma unroll
        for (int off = 1; off <= 2; off <<= 1) {
            xA = fmaxf(xA, __shfl_xor_sync(0xFFFFFFFFu, xA, off));
            xB = fmaxf(xB, __shfl_xor_sync(0xFFFFFFFFu, xB, off));
        }
        const float nA = fmaxf(mA, xA), nB = fmaxf(mB, xB);
        const float cA = nA == -INFINITY ? 1.f : exp2f(mA - nA);
        const float cB = nB == -INFINITY ? 1.f : exp2f(mB - nB);
        mA = nA;
        mB = nB;
        float sumA = 0.f, sumB = 0.f;
#pragma unroll
        for (int nc = 0; nc < TILE_KT / 8; nc++)
#pragma unroll
            for (int e = 0; e < 2; e++) {
                s[nc][e] = nA == -INFINITY ? 0.f : exp2f(s[nc][e] - nA);
                s[nc][2 + e] = nB == -INFINITY ? 0.f : exp2f(s[nc][2 + e] - nB);
                sumA += s[nc][e];
                sumB += s[nc][2 + e];
            }
        lA = lA * cA + sumA;
        lB = lB * cB + sumB;
#pragma unroll
        for (int j = 0; j < HD / 8; j++) {
            o[j][0] *= cA;
            o[j][1] *= cA;
            o[j][2] *= cB;
            o[j][3] *= cB;
        }
        /* O += P V: S's accumulators of key chunks 2kk, 2kk+1 are P's A fragment */
#pragma unroll
        for (int kk = 0; kk < TILE_KT / 16; kk++) {
            const uint32_t a0 = pack2(s[2 * kk][0], s[2 * kk][1]);
            const uint32_t a1 = pack2(s[2 * kk][2], s[2 * kk][3]);
            const uint32_t a2 = pack2(s[2 * kk + 1][0], s[2 * kk + 1][1]);
            const uint32_t a3 = pack2(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
            for (int j = 0; j < HD / 8; j++) {
                const __half *vp = Vt + (j * 8 + g) * VS + kk * 16 + 2 * t4;
                mma16816(o[j], a0, a1, a2, a3, ld32(vp), ld32(vp + 8));
            }
        }
    }
#pragma unroll
    for (int off = 1; off <= 2; off <<= 1) {
        lA += __shfl_xor_sync(0xFFFFFFFFu, lA, off);
        lB += __shfl_xor_sync(0xFFFFFFFFu, lB, off);
    }
    const float iA = lA > 0.f ? 1.f / lA : 0.f, iB = lB > 0.f ? 1.f / lB : 0.f;
    float *outA = vA ? P.out + ((int64_t)(s0 + rA / G) * P.n_head + kvh * G + rA % G) * HD : NULL;
    float *outB = vB ? P.out + ((int64_t)(s0 + rB / G) * P.n_head + kvh * G + rB % G) * HD : NULL;
#pragma unroll
    for (int j = 0; j < HD / 8; j++) {
        if (outA) *(float2 *)(outA + j * 8 + 2 * t4) = make_float2(o[j][0] * iA, o[j][1] * iA);
        if (outB) *(float2 *)(outB + j * 8 + 2 * t4) = make_float2(o[j][2] * iB, o[j][3] * iB);
    }
}

template <int HD, int W> __global__ void __launch_bounds__(W * 32) k_attn_tile(const tile_params P)
{
    cuda_pdl_enter();
    extern __shared__ __align__(16) unsigned char tile_smem[];
    __half *Qs = (__half *)tile_smem;
    __half *Ks = Qs + W * 16 * (HD + 8);
    __half *Vt = Ks + TILE_KT * (HD + 8);
    const int a1 = min(P.T, ((int)blockIdx.x + 1) * P.tb);
    for (int s0 = blockIdx.x * P.tb; s0 < a1;) {
        int s1 = s0 + 1;
        while (s1 < a1 && P.seq[s1] == P.seq[s0] && P.pos[s1] == P.pos[s1 - 1] + 1) s1++;
        tile_segment<HD, W>(P, s0, s1 - s0, Qs, Ks, Vt);
        s0 = s1;
        __syncthreads(); /* Qs is rewritten by the next segment */
    }
}

template <int HD, int W> static size_t tile_smem_bytes()
{
    return sizeof(__half) *
           ((size_t)W * 16 * (HD + 8) + (size_t)TILE_KT * (HD + 8) + (size_t)HD * (TILE_KT + 8));
}

template <int HD, int W> static int tile_launch(struct backend_cuda *c, tile_params P, int n_kv)
{
    const size_t smem = tile_smem_bytes<HD, W>();
    static int attr_set; /* one device per process: the attribute belongs to the function */
    if (!attr_set && smem > 48 * 1024) {
        int rc =
            CUDA_CHECK(cudaFuncSetAttribute(k_attn_tile<HD, W>,
                                            cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem),
                       "attention smem");
        if (rc) return rc;
        attr_set = 1;
    }
    P.tb = W * 16 / P.group;
    dim3 grid((unsigned)((P.T + P.tb - 1) / P.tb), (unsigned)n_kv);
    cuda_launch_smem(c, k_attn_tile<HD, W>, grid, W * 32, smem, P);
    return CUDA_LAUNCHED("attention (tiles)");
}

/* Blocks of four warps (64 rows) the step gives a layer. */
static int64_t tile_blocks4(const struct backend_cuda *c, const struct backend_attn_args *a)
{
    const int tb = 64 / (a->n_head / a->n_head_kv);
    return (int64_t)((c->step.n_tokens + tb - 1) / tb) * a->n_head_kv;
}

int cuda_attn_tile_fits(const struct backend_cuda *c, const struct backend_attn_args *a)
{
    const int T = c->step.n_tokens;
    if (!c->attn_tile || a->n_head_kv <= 0 || a->n_head % a->n_head_kv ||
        a->n_head / a->n_head_kv > 16 ||
        !(a->head_dim == 64 || a->head_dim == 128 || a->head_dim == 256) ||
        T < 4 * c->step.n_seqs || T < 16)
        return 0;
    if (c->attn_tile == 2) return 1; /* wherever the shape fits (tests) */
    /* Each block stages every key of its window once for its 64 rows; with fewer blocks than
     * multiprocessors (few KV heads: Gemma 3 270M's one, 512 tokens -> 32 blocks) the
     * per-(token, head) kernel, which spreads over every SM, measured 1.9x faster. */
    return !c->f32_weights && tile_blocks4(c, a) >= c->n_sm;
}

int cuda_attention_tiles(struct backend_cuda *c, const struct backend_attn_args *a, const float *q,
                         float *out, const float *kc, const float *vc, const int32_t *table)
{
    const struct cuda_kv *kv = &c->kv;
    tile_params P;
    P.q = q;
    P.out = out;
    P.k = kc;
    P.v = vc;
    P.pos = c->step.d_pos;
    P.seq = c->step.d_seq;
    P.table = table;
    P.T = c->step.n_tokens;
    P.max_blocks = c->step.max_blocks;
    P.bs = kv->block_size;
    P.kv_dim = kv->kv_dim;
    P.n_head = a->n_head;
    P.group = a->n_head / a->n_head_kv;
    P.n_swa = a->n_swa;
    P.tb = 0;
    P.qscale = a->scale * 1.4426950408889634f;
    P.err = c->d_err;
    switch (a->head_dim) {
    case 64:
        return tile_launch<64, 4>(c, P, a->n_head_kv);
    case 128:
        return tile_launch<128, 4>(c, P, a->n_head_kv);
    case 256:
        return tile_launch<256, 4>(c, P, a->n_head_kv);
    default:
        return KRS_ERR_UNSUPPORTED;
    }
}
