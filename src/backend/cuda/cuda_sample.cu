/* Device sampler: backend.h's pipeline on each logits row, blocks of 1024 threads.
 *
 * A row is one block, or, when the rows are too few to fill the GPU (decode at small batch:
 * one SM would read the 262,144-entry row alone), several: each split applies its share of
 * steps 1-2 and publishes its statistics; the split that finishes last merges them in split
 * order and runs the rest of the row (a max-only pass first where the candidate path needs
 * each thread's maximum). Token choices do not depend on the split count; Z1 (the logprob's
 * normaliser) is summed in another order, within rounding.
 *
 * Per row, in the logits tensor itself (it is dead after sampling):
 *   1. edits: l = rep(l + pre_add) + post_add, each operation rounded (no FMA contraction), so
 *      a host reference in float arithmetic gets the same edited logits bit for bit; then a
 *      masked row's disallowed tokens become -inf (a warp per mask word, coalesced stores);
 *   2. one pass: max, first argmax, Z1 = sum exp(l - max) (double accumulation), a NaN/+inf
 *      check, each thread's own maximum, and for top-p rows sum exp((l - max) / T). Greedy rows
 *      stop here (edits + one pass);
 *   3. weights w = expf((l - max) / T) as fixed-point integers q = trunc(w * 2^F) (F = 44 at
 *      262144 tokens: 2^-44 of the top token's weight; the vocab's sum fits in 64 bits). Integer
 *      sums are exact and order-free, so every threshold, histogram and scan below is
 *      deterministic and independent of the batch, whatever the atomics' order;
 *   4. candidate path (top-k <= 1024, or top-p without top-k): a threshold L that provably
 *      keeps every token the truncation can keep comes from the 1024 per-thread maxima (their
 *      k-th largest; or the largest whose maxima alone hold top_p of an upper bound of the
 *      mass). One pass gathers the tokens >= L; when they fit (4096) and are checked to hold
 *      the answer, they are sorted in shared memory (bitonic, value desc / id asc) and top-k,
 *      top-p, min-p and the draw finish there (survivors re-sorted by id);
 *   5. otherwise the general path: radix select on order-preserving 32-bit keys of the logits
 *      (digits of 11, 11, 10 bits, shared-memory histograms, early stop once a bin holds
 *      exactly what is needed): top-k's k-th key (ties at the cut all kept), then top-p over
 *      the top-k survivors: bins of q summed from the top until ceil(top_p * their mass); ties
 *      at the top-p cut are taken in id order (a rank pass finds the last one kept). Histogram
 *      atomics are aggregated per warp (__match_any_sync + __reduce_add_sync): logits crowd
 *      into a few bins of the top digit;
 *   6. min-p (w >= min_p) and the inverse CDF in id order: target = floor(u * sum of survivor
 *      q) (clamped below the sum: u = 1 is the last survivor), the token is the first whose
 *      running sum exceeds it: tile sums (tiles of 4096 ids), then a block scan of one tile;
 *   7. logprob = l[token] - max - log Z1.
 * KRS_CUDA_SAMPLE_RADIX=1 (read at creation) turns the candidate path off (tests, timing).
 *
 * Host side: one upload of rows + edits from pinned staging (and a second of the masks when a
 * row has one: the row -> mask index table, then the masks), one kernel, and in
 * step_end_sampled one download of [kv flags, ids, logprobs] into pinned memory. Nothing is
 * allocated per call. */
#include "backend/cuda/cuda_impl.h"
#include "backend/cuda/cuda_sample.h"

extern "C" {
#include "util/alloc.h"
#include "util/log.h"
}

#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define SMP_THREADS    1024
#define SMP_WARPS      (SMP_THREADS / 32)
#define SMP_UNROLL     4    /* quads each thread loads before using them */
#define SMP_BINS       2048 /* largest radix digit: 11 bits */
#define SMP_MAX_TILES  64   /* inverse-CDF tile sums kept in shared memory */
#define SMP_CAND       4096 /* candidate list: tokens above a threshold, sorted in shared memory */
#define SMP_EDITS_DEF  256  /* edits per row when the backend passes 0 */
#define SMP_SPLITS     16   /* most blocks one row's statistics pass is cut into */
#define SMP_SPLIT_ROWS 8    /* most rows of a call whose rows are cut into splits */
#define FULL_MASK      0xFFFFFFFFu
#define NO_DIGIT       0xFFFFFFFFu

typedef unsigned long long u64;

struct cuda_sampler {
    int max_rows, max_edits;
    uint8_t *h_stage; /* pinned: rows, then edits at edits_off */
    uint8_t *d_stage;
    size_t edits_off;
    int32_t *h_res; /* pinned: [kv flags, ids[rows], logprobs[rows]] */
    int32_t *d_res;
    cudaEvent_t staged; /* the upload is done: h_stage may be rewritten */
    int max_mask_rows, mask_words, mask_vocab;
    int32_t *h_mask; /* pinned: mask index per row [max_rows], then masks at mask_off */
    int32_t *d_mask;
    size_t mask_off;        /* in int32 units */
    int rows;               /* rows of the pending sample call; -1 = none */
    int radix_only;         /* KRS_CUDA_SAMPLE_RADIX=1: no candidate path (tests, timing) */
    struct mx_part *d_part; /* [max_rows][SMP_SPLITS] statistics of row splits */
    int *d_done;            /* [max_rows] splits finished; the last one resets it */
};

/* ---- device helpers ---- */

/* Order-preserving key: a < b (floats, -0 == +0) <=> key(a) < key(b). */
__device__ __forceinline__ uint32_t order_key(float x)
{
    uint32_t u = __float_as_uint(x);
    if ((u << 1) == 0) u = 0; /* -0 -> +0 */
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

/* v[0..4) = row[4q .. 4q+4), -inf past the end; one 16-byte load when the row is aligned. */
__device__ __forceinline__ void load_quad(const float *row, int V, int q, bool al, float v[4])
{
    if (al && 4 * q + 3 < V) {
        const float4 a = reinterpret_cast<const float4 *>(row)[q];
        v[0] = a.x;
        v[1] = a.y;
        v[2] = a.z;
        v[3] = a.w;
    } else {
#pragma unroll
        for (int j = 0; j < 4; j++) v[j] = 4 * q + j < V ? row[4 * q + j] : -INFINITY;
    }
}

/* Calls f(i, x, valid) for every element of the row: id i is handled by thread (i / 4) % 1024,
 * in increasing order of i; every thread runs the same iterations (valid = false and x = -inf
 * past the end), so warp-synchronous intrinsics inside f are safe. */
template <typename F>
__device__ __forceinline__ void row_pass_quads(const float *row, int V, int q0, int q1, F &&f)
{
    const int t = threadIdx.x;
    const bool al = ((uintptr_t)row & 15) == 0;
    for (int qb = q0; qb < q1; qb += SMP_UNROLL * SMP_THREADS) {
        float v[SMP_UNROLL][4];
#pragma unroll
        for (int u = 0; u < SMP_UNROLL; u++) {
            const int q = qb + u * SMP_THREADS + t;
            if (q < q1) {
                load_quad(row, V, q, al, v[u]);
            } else {
#pragma unroll
                for (int j = 0; j < 4; j++) v[u][j] = -INFINITY;
            }
        }
#pragma unroll
        for (int u = 0; u < SMP_UNROLL; u++)
#pragma unroll
            for (int j = 0; j < 4; j++) {
                const int q = qb + u * SMP_THREADS + t, i = 4 * q + j;
                f(i, v[u][j], q < q1 && i < V);
            }
    }
}

/* The whole row; row_pass_quads takes quads [q0, q1) of it (the same thread for a given id). */
template <typename F> __device__ __forceinline__ void row_pass(const float *row, int V, F &&f)
{
    row_pass_quads(row, V, 0, (V + 3) >> 2, f);
}

/* One thread's view of the max, its first position, sum exp(l - max) and (for top-p rows)
 * sum exp((l - max) / T). */
struct mx {
    float m;
    int i;
    double s, st;
};

__device__ __forceinline__ struct mx mx_combine(struct mx a, struct mx b, float inv_t)
{
    struct mx r;
    r.m = fmaxf(a.m, b.m);
    r.i = a.m > b.m ? a.i : (b.m > a.m ? b.i : min(a.i, b.i));
    const double da = (double)a.m - (double)r.m, db = (double)b.m - (double)r.m;
    r.s = (a.m == -INFINITY ? 0.0 : a.s * exp(da)) + (b.m == -INFINITY ? 0.0 : b.s * exp(db));
    r.st = (a.m == -INFINITY ? 0.0 : a.st * exp(da * inv_t)) +
           (b.m == -INFINITY ? 0.0 : b.st * exp(db * inv_t));
    return r;
}

/* One split's statistics of a row (k_sample with splits > 1). */
struct mx_part {
    struct mx a;
    int bad;
};

__device__ __forceinline__ struct mx mx_shfl_down(struct mx a, int o)
{
    struct mx r;
    r.m = __shfl_down_sync(FULL_MASK, a.m, o);
    r.i = __shfl_down_sync(FULL_MASK, a.i, o);
    r.s = __shfl_down_sync(FULL_MASK, a.s, o);
    r.st = __shfl_down_sync(FULL_MASK, a.st, o);
    return r;
}

__device__ __forceinline__ u64 warp_sum_u64(u64 v)
{
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

/* Shared state of one row's block. The radix histograms and the candidate list share memory. */
struct smp_hist {
    uint32_t hk[SMP_BINS]; /* top-k: counts per digit */
    uint32_t hc[SMP_BINS]; /* top-p: counts per digit */
    u64 hm[SMP_BINS];      /* top-p: mass per digit */
};

struct smp_shared {
    union {
        struct smp_hist h;
        u64 cand[SMP_CAND]; /* (key << 32 | ~id), or per-thread maxima, or (id << 32 | key) */
    } u;
    u64 tile[SMP_MAX_TILES];
    u64 wscan[SMP_WARPS];
    struct mx red[SMP_WARPS];
    int bad[SMP_WARPS];
    /* row results, written by one thread between barriers */
    float m;
    int amax, row_bad;
    double z1, zt;
    uint32_t kpre, krem, kthr;
    int kdone;
    uint32_t ppre, pthr;
    u64 prem;
    int pdone, pcut, pneed;
    int ctile, result;
    u64 base, target;
    uint32_t lkey; /* candidate threshold: keys >= lkey */
    int have_l, count, nk, np;
    u64 zq;
};

/* Block-wide exclusive scan of v (u64) in thread order; *total gets the sum. */
__device__ __forceinline__ u64 block_excl_scan(struct smp_shared *sh, u64 v, u64 *total)
{
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    u64 inc = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        u64 y = __shfl_up_sync(FULL_MASK, inc, o);
        if (lane >= o) inc += y;
    }
    __syncthreads(); /* wscan may still be read by a previous scan */
    if (lane == 31) sh->wscan[w] = inc;
    __syncthreads();
    if (w == 0) {
        u64 s = sh->wscan[lane], si = s;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            u64 y = __shfl_up_sync(FULL_MASK, si, o);
            if (lane >= o) si += y;
        }
        sh->wscan[lane] = si - s;
        if (lane == 31) sh->base = si; /* borrowed: total of this scan */
    }
    __syncthreads();
    *total = sh->base;
    return sh->wscan[w] + inc - v;
}

/* The first id whose running sum of vf(i, x) (u64, id order) exceeds tf(total); -1 when the
 * target is not below the total. vf must be a pure function of (i, x). */
template <typename VF, typename TF>
__device__ int find_crossing(struct smp_shared *sh, const float *row, int V, VF vf, TF tf)
{
    const int t = threadIdx.x, lane = t & 31;
    const int nq = (V + 3) >> 2;
    const int blocks = (nq + SMP_THREADS - 1) / SMP_THREADS;    /* of 1024 quads */
    const int g = (blocks + SMP_MAX_TILES - 1) / SMP_MAX_TILES; /* blocks per tile */
    const int ntiles = (blocks + g - 1) / g;
    __syncthreads(); /* the previous user of the shared state is done */
    for (int k = t; k < ntiles; k += SMP_THREADS) sh->tile[k] = 0;
    __syncthreads();
    const bool al = ((uintptr_t)row & 15) == 0;
    u64 acc = 0;
    for (int b0 = 0; b0 < blocks; b0 += SMP_UNROLL) {
        float v[SMP_UNROLL][4];
#pragma unroll
        for (int u = 0; u < SMP_UNROLL; u++)
            load_quad(row, V, (b0 + u) * SMP_THREADS + t, al, v[u]);
#pragma unroll
        for (int u = 0; u < SMP_UNROLL; u++) {
            const int blk = b0 + u;
            if (blk >= blocks) break; /* uniform */
#pragma unroll
            for (int j = 0; j < 4; j++) {
                const int i = 4 * (blk * SMP_THREADS + t) + j;
                if (i < V) acc += vf(i, v[u][j]);
            }
            if (blk % g == g - 1 || blk == blocks - 1) {
                const u64 s = warp_sum_u64(acc);
                if (lane == 0 && s) atomicAdd(&sh->tile[blk / g], s);
                acc = 0;
            }
        }
    }
    __syncthreads();
    if (t == 0) {
        u64 tot = 0;
        for (int k = 0; k < ntiles; k++) tot += sh->tile[k];
        u64 target = tf(tot), cum = 0;
        int c = -1;
        for (int k = 0; k < ntiles; k++) {
            if (cum + sh->tile[k] > target) {
                c = k;
                break;
            }
            cum += sh->tile[k];
        }
        sh->ctile = c;
        sh->target = target;
        sh->result = -1;
        sh->tile[0] = cum; /* the running sum before the crossing tile */
    }
    __syncthreads();
    const int c = sh->ctile;
    if (c < 0) return -1;
    const u64 target = sh->target;
    u64 base = sh->tile[0];
    for (int blk = c * g; blk < (c + 1) * g && blk < blocks; blk++) {
        const int q = blk * SMP_THREADS + t;
        u64 v[4], s = 0;
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const int i = 4 * q + j;
            v[j] = i < V ? vf(i, row[i]) : 0;
            s += v[j];
        }
        u64 total;
        u64 cum = base + block_excl_scan(sh, s, &total);
        if (cum <= target && target < cum + s) {
#pragma unroll
            for (int j = 0; j < 4; j++) {
                cum += v[j];
                if (cum > target) {
                    sh->result = 4 * q + j;
                    break;
                }
            }
        }
        __syncthreads();
        if (sh->result >= 0) break;
        base += total;
    }
    return sh->result;
}

/* Inverse of order_key. */
__device__ __forceinline__ float key_float(uint32_t k)
{
    return __uint_as_float((k & 0x80000000u) ? (k & 0x7FFFFFFFu) : ~k);
}

/* Sorts a[0..n) (n a power of two, <= SMP_CAND) in shared memory; every thread calls. */
__device__ void bitonic_sort(u64 *a, int n, bool desc)
{
    for (int k = 2; k <= n; k <<= 1)
        for (int j = k >> 1; j > 0; j >>= 1) {
            for (int i = threadIdx.x; i < n; i += SMP_THREADS) {
                const int ixj = i ^ j;
                if (ixj > i) {
                    const u64 x = a[i], y = a[ixj];
                    const bool up = ((i & k) == 0) != desc;
                    if ((x > y) == up) {
                        a[i] = y;
                        a[ixj] = x;
                    }
                }
            }
            __syncthreads();
        }
}

/* The candidate path: cand[0..count) holds (key << 32 | ~id) of every token >= the threshold.
 * Sorted by value (ties: lower id first), top-k is a prefix, top-p the prefix of it whose mass
 * reaches ceil(top_p * base) (base: the top-k prefix's mass, or sh->zq, the whole row's), min-p
 * a test per token; the survivors are re-sorted by id for the inverse CDF. -1 (every thread)
 * when the candidates do not provably hold the answer. */
template <typename QW>
__device__ int sample_candidates(struct smp_shared *sh, const struct backend_sample_row &P,
                                 bool use_k, bool use_p, bool use_min, QW qw, float m, float inv_t)
{
    const int t = threadIdx.x;
    u64 *cand = sh->u.cand;
    const int n = sh->count;
    if (use_k && n < P.top_k) return -1;
    int pn = 1;
    while (pn < n) pn <<= 1;
    for (int j = n + t; j < pn; j += SMP_THREADS) cand[j] = 0; /* sorts last */
    if (t == 0) {
        sh->nk = n;
        sh->np = 0;
        sh->result = -1;
    }
    __syncthreads();
    bitonic_sort(cand, pn, true);
    if (use_k) { /* the prefix with key >= the k-th key (its ties all stay) */
        const uint32_t kk = (uint32_t)(cand[P.top_k - 1] >> 32);
        for (int j = 4 * t; j < 4 * t + 4 && j < n; j++)
            if ((uint32_t)(cand[j] >> 32) >= kk &&
                (j + 1 == n || (uint32_t)(cand[j + 1] >> 32) < kk))
                sh->nk = j + 1;
        __syncthreads();
    }
    const int nk = sh->nk;
    u64 qv[4], s = 0, tot;
#pragma unroll
    for (int jj = 0; jj < 4; jj++) {
        const int j = 4 * t + jj;
        qv[jj] = j < nk ? qw(key_float((uint32_t)(cand[j] >> 32))) : 0;
        s += qv[jj];
    }
    const u64 ex = block_excl_scan(sh, s, &tot);
    int ns = nk;
    if (use_p) {
        const u64 base = use_k ? tot : sh->zq;
        u64 target = (u64)ceil((double)P.top_p * (double)base);
        if (target > base) target = base;
        if (target < 1) target = 1;
        if (target > tot) return -1; /* (uniform) the candidates miss part of the nucleus */
        u64 c = ex;
#pragma unroll
        for (int jj = 0; jj < 4; jj++) {
            const u64 c0 = c;
            c += qv[jj];
            if (4 * t + jj < nk && c0 < target && target <= c) sh->np = 4 * t + jj + 1;
        }
        __syncthreads();
        ns = sh->np;
    }
    /* survivors as (id << 32 | key), the rest ~0, sorted by id */
    u64 comp[4];
#pragma unroll
    for (int jj = 0; jj < 4; jj++) {
        const int j = 4 * t + jj;
        comp[jj] = ~0ull;
        if (j < ns) {
            const uint32_t key = (uint32_t)(cand[j] >> 32), id = ~(uint32_t)cand[j];
            if (!use_min || expf((key_float(key) - m) * inv_t) >= P.min_p)
                comp[jj] = ((u64)id << 32) | key;
        }
    }
    int p2 = 1;
    while (p2 < ns) p2 <<= 1;
    __syncthreads(); /* every read of the value order is done */
#pragma unroll
    for (int jj = 0; jj < 4; jj++)
        if (4 * t + jj < p2) cand[4 * t + jj] = comp[jj];
    __syncthreads();
    bitonic_sort(cand, p2, false);
    s = 0;
#pragma unroll
    for (int jj = 0; jj < 4; jj++) {
        const int j = 4 * t + jj;
        qv[jj] = j < p2 && cand[j] != ~0ull ? qw(key_float((uint32_t)cand[j])) : 0;
        s += qv[jj];
    }
    const u64 ex2 = block_excl_scan(sh, s, &tot); /* tot >= 2^F: the top token survives */
    u64 tg = (u64)((double)P.u * (double)tot);
    if (tg >= tot) tg = tot - 1; /* u rounding: the last survivor */
    u64 c = ex2;
#pragma unroll
    for (int jj = 0; jj < 4; jj++) {
        const u64 c0 = c;
        c += qv[jj];
        if (c0 <= tg && tg < c) sh->result = (int)(cand[4 * t + jj] >> 32);
    }
    __syncthreads();
    return sh->result;
}

/* Warp-wide: the bin where the running sum of h over bins from the top (nb - 1 down) reaches
 * rem (1 <= rem <= the sum of all bins). True in the one lane that found it, with the bin and
 * the sum of the bins above it. */
template <typename H>
__device__ __forceinline__ bool warp_cross(H h, int nb, u64 rem, int *bin, u64 *above)
{
    const int lane = threadIdx.x & 31, per = nb / 32, top = nb - 1 - lane * per;
    u64 s = 0;
    for (int k = 0; k < per; k++) s += h(top - k);
    u64 inc = s;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        u64 y = __shfl_up_sync(FULL_MASK, inc, o);
        if (lane >= o) inc += y;
    }
    const u64 ex = inc - s;
    if (!(ex < rem && rem <= inc)) return false;
    u64 c = ex;
    int b = top;
    for (int k = 0; k < per - 1; k++, b--) {
        const u64 v = h(b);
        if (c + v >= rem) break;
        c += v;
    }
    *bin = b;
    *above = c;
    return true;
}

__global__ void __launch_bounds__(SMP_THREADS, 1)
    k_sample(float *logits, int V, int n_rows, const struct backend_sample_row *rows,
             const struct backend_logit_edit *edits, const int32_t *mask_idx, const uint32_t *masks,
             int32_t *res, const int *kv_err, int cand_path, struct mx_part *part, int *row_done)
{
    cuda_pdl_enter();
    __shared__ struct smp_shared sh;
    __shared__ int split_bad;
    const int t = threadIdx.x, lane = t & 31, w = t >> 5;
    if (blockIdx.x == 0 && blockIdx.y == 0 && t == 0) res[0] = kv_err ? *kv_err : 0;
    const int r = blockIdx.x;
    if (r >= n_rows) return;
    /* Steps 1-2 over this block's split of the row: quads [q0, q1) */
    const int splits = gridDim.y, nq = (V + 3) >> 2;
    const int per = (nq + splits - 1) / splits;
    const int q0 = min(nq, (int)blockIdx.y * per), q1 = min(nq, q0 + per);
    const int i0 = 4 * q0, i1 = min(V, 4 * q1);
    float *row = logits + (int64_t)r * V;
    const struct backend_sample_row P = rows[r];
    int32_t *ids = res + 1;
    float *lps = reinterpret_cast<float *>(res + 1 + n_rows);

    /* 1. edits (each token at most once per row: no two threads write one entry) */
    for (int e = P.edit_begin + t; e < P.edit_begin + P.n_edits; e += SMP_THREADS) {
        const struct backend_logit_edit E = edits[e];
        if (E.token < i0 || E.token >= i1) continue; /* another split's */
        float x = __fadd_rn(row[E.token], E.pre_add);
        x = x > 0.0f ? __fdiv_rn(x, E.rep) : __fmul_rn(x, E.rep);
        row[E.token] = __fadd_rn(x, E.post_add);
    }
    __syncthreads();
    /* 1b. the token mask (the condition is the same for the whole block). Thread t takes
     * tokens t, t + 1024, ...: a warp covers the 32 tokens of one mask word (read once,
     * broadcast) and its stores are one coalesced 128-byte line. (A thread per word storing
     * its own 32 tokens made every store instruction touch 32 lines.) */
    if (mask_idx && mask_idx[r] >= 0) {
        const uint32_t *mk = masks + (int64_t)mask_idx[r] * ((V + 31) >> 5);
        for (int i = i0 + t; i < i1; i += SMP_THREADS)
            if (!(mk[i >> 5] >> (i & 31) & 1u)) row[i] = -INFINITY;
        __syncthreads();
    }

    /* 2. max, first argmax, sum exp(l - max) at T = 1; for top-p rows without top-k also
     * sum exp((l - max) / T), which sizes the candidate threshold below */
    const float inv_t = 1.0f / P.temperature;
    const bool greedy = !(P.temperature > 0.0f && inv_t < INFINITY);
    const bool use_k = !greedy && P.top_k > 0 && P.top_k < V;
    const bool use_p = !greedy && P.top_p < 1.0f;
    const bool use_min = !greedy && P.min_p > 0.0f;
    const bool want_zt = use_p && !use_k;
    /* step 4's candidate path (it needs each thread's maximum over the whole row) */
    const bool use_cand = !greedy && cand_path && ((use_k && P.top_k <= SMP_THREADS) || want_zt);
    struct mx a = {-INFINITY, INT_MAX, 0.0, 0.0};
    int bad = 0;
    row_pass_quads(row, V, q0, q1, [&](int i, float x, bool ok) {
        if (!(x < INFINITY)) bad = 1; /* NaN or +inf (padding is -inf) */
        if (x > a.m) {
            const float d = a.m - x;
            a.s = a.s * (double)expf(d) + 1.0;
            if (want_zt) a.st = a.st * (double)expf(d * inv_t) + 1.0;
            a.m = x;
            a.i = i;
        } else if (x > -INFINITY) {
            const float d = x - a.m;
            a.s += (double)expf(d);
            if (want_zt) a.st += (double)expf(d * inv_t);
        }
    });
    float my_max = a.m;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) a = mx_combine(a, mx_shfl_down(a, o), inv_t);
    bad = __any_sync(FULL_MASK, bad);
    if (lane == 0) {
        sh.red[w] = a;
        sh.bad[w] = bad;
    }
    __syncthreads();
    if (w == 0) {
        a = sh.red[lane];
        bad = __any_sync(FULL_MASK, sh.bad[lane]);
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) a = mx_combine(a, mx_shfl_down(a, o), inv_t);
        if (lane == 0) {
            sh.m = a.m;
            sh.amax = a.i;
            sh.z1 = a.s;
            sh.zt = a.st;
            sh.row_bad = bad || !(a.m > -INFINITY);
            split_bad = bad; /* a split may hold only -inf (masked); the row may not */
        }
    }
    __syncthreads();
    if (splits > 1) {
        /* Publish this split's statistics; the split that counts last merges them in split
         * order (the sums do not depend on which finished first) and finishes the row. */
        __shared__ int last;
        if (t == 0) {
            struct mx_part pt;
            pt.a.m = sh.m;
            pt.a.i = sh.amax;
            pt.a.s = sh.z1;
            pt.a.st = sh.zt;
            pt.bad = split_bad;
            part[(int64_t)r * splits + blockIdx.y] = pt;
            __threadfence();
            last = atomicAdd(row_done + r, 1) == splits - 1;
        }
        __syncthreads();
        if (!last) return;
        __threadfence();
        if (t == 0) {
            struct mx m0 = {-INFINITY, INT_MAX, 0.0, 0.0};
            int bad_any = 0;
            for (int k = 0; k < splits; k++) {
                const struct mx_part *pk = part + (int64_t)r * splits + k;
                struct mx b;
                b.m = __ldcg(&pk->a.m);
                b.i = __ldcg(&pk->a.i);
                b.s = __ldcg(&pk->a.s);
                b.st = __ldcg(&pk->a.st);
                bad_any |= __ldcg(&pk->bad);
                m0 = mx_combine(m0, b, inv_t);
            }
            sh.m = m0.m;
            sh.amax = m0.i;
            sh.z1 = m0.s;
            sh.zt = m0.st;
            sh.row_bad = bad_any || !(m0.m > -INFINITY);
            row_done[r] = 0; /* ready for the next launch */
        }
        __syncthreads();
        /* the candidate path below wants each thread's maximum over the whole row */
        if (use_cand) {
            my_max = -INFINITY;
            row_pass(row, V, [&](int i, float x, bool ok) {
                (void)i;
                if (ok) my_max = fmaxf(my_max, x);
            });
        }
    }
    const float m = sh.m;
    if (sh.row_bad) {
        if (t == 0) {
            ids[r] = -1;
            lps[r] = __int_as_float(0x7fc00000); /* NaN */
        }
        return;
    }

    int tok = sh.amax; /* greedy: temperature 0 (or so small that 1/T is infinite) */
    if (!greedy) {
        /* 3. fixed-point weights: F fraction bits; the top token weighs 2^F */
        int lg = 0;
        while (lg < 31 && (1ll << lg) < V) lg++;
        const int F = 62 - lg < 46 ? 62 - lg : 46; /* <= 46: __reduce_add_sync limbs fit */
        const float qscale = ldexpf(1.0f, F);
        auto qw = [=](float x) { return __float2ull_rz(expf((x - m) * inv_t) * qscale); };
        const float min_p = P.min_p, u = P.u;
        tok = -1;

        /* 4. candidates: when a threshold L provably keeps every token the truncation can keep,
         * gather the tokens >= L (at most SMP_CAND) and finish in shared memory. L comes from
         * the 1024 per-thread maxima (each is a distinct token): top-k -> their k-th largest
         * (>= k tokens reach it); top-p -> the largest L whose maxima alone hold top_p of the
         * mass (bounded above by sum exp((l - max) / T)). The candidates are checked to hold the
         * answer (>= k of them / enough mass); otherwise the radix path below runs. */
        if (use_cand) {
            u64 *cand = sh.u.cand;
            cand[t] = (u64)order_key(my_max) << 32;
            if (t == 0) {
                sh.have_l = 0;
                sh.count = 0;
                sh.zq = 0;
            }
            __syncthreads();
            bitonic_sort(cand, SMP_THREADS, true);
            if (use_k) {
                if (t == 0) {
                    sh.lkey = (uint32_t)(cand[P.top_k - 1] >> 32);
                    sh.have_l = 1;
                }
            } else {
                const uint32_t key = (uint32_t)(cand[t] >> 32);
                const u64 q = qw(key_float(key)), zup = (u64)((double)qscale * sh.zt * 1.00001) + 2;
                const u64 need = (u64)ceil((double)P.top_p * (double)zup);
                u64 tot;
                const u64 ex = block_excl_scan(&sh, q, &tot);
                if (ex < need && need <= ex + q) { /* the first maximum reaching the bound */
                    sh.lkey = key;
                    sh.have_l = 1;
                }
            }
            __syncthreads();
            if (sh.have_l) {
                const uint32_t lkey = sh.lkey;
                u64 zq = 0;
                row_pass(row, V, [&](int i, float x, bool ok) {
                    const uint32_t key = order_key(x);
                    const bool in = ok && key >= lkey;
                    if (want_zt && ok) zq += qw(x);
                    const unsigned bal = __ballot_sync(FULL_MASK, in);
                    if (bal) {
                        int base = 0;
                        if (lane == 0) base = atomicAdd(&sh.count, __popc(bal));
                        base = __shfl_sync(FULL_MASK, base, 0);
                        const int pos = base + __popc(bal & ((1u << lane) - 1));
                        if (in && pos < SMP_CAND) cand[pos] = ((u64)key << 32) | (uint32_t)~i;
                    }
                });
                if (want_zt) {
                    zq = warp_sum_u64(zq);
                    if (lane == 0 && zq) atomicAdd(&sh.zq, zq);
                }
                __syncthreads();
                if (sh.count <= SMP_CAND)
                    tok = sample_candidates(&sh, P, use_k, use_p, use_min, qw, m, inv_t);
            }
        }
        if (tok < 0) {
            /* 5. otherwise, radix select over digits of 11, 11, 10 bits: first top-k (key >= kthr
             * survives), then top-p over the top-k survivors (key > pthr, or key == pthr and id <=
             * pcut). */
            if (t == 0) {
                sh.kpre = 0;
                sh.krem = (uint32_t)P.top_k;
                sh.kdone = !use_k;
                sh.kthr = 0; /* every key: -inf is 0x007FFFFF */
                sh.ppre = 0;
                sh.prem = 0;
                sh.pdone = !use_p;
                sh.pthr = 0;
                sh.pcut = INT_MAX;
                sh.pneed = 0;
            }
            __syncthreads();
            const int hs[3] = {32, 21, 10}, ls[3] = {21, 10, 0}, nbs[3] = {2048, 2048, 1024};
#pragma unroll 1
            for (int j = 0; j < 3 && !sh.kdone; j++) {
                const int nb = nbs[j], sl = ls[j], shh = hs[j];
                const uint32_t pre0 = sh.kpre;
                for (int b = t; b < nb; b += SMP_THREADS) sh.u.h.hk[b] = 0;
                __syncthreads();
                row_pass(row, V, [&](int i, float x, bool ok) {
                    const uint32_t key = order_key(x);
                    const uint32_t d = (key >> sl) & (uint32_t)(nb - 1);
                    const bool in = ok && (j == 0 || key >> shh == pre0);
                    if (__any_sync(FULL_MASK, in)) {
                        const unsigned g = __match_any_sync(FULL_MASK, in ? d : NO_DIGIT);
                        if (in && lane == __ffs(g) - 1)
                            atomicAdd(&sh.u.h.hk[d], (uint32_t)__popc(g));
                    }
                });
                __syncthreads();
                if (w == 0) {
                    const uint32_t krem = sh.krem;
                    __syncwarp(); /* every lane has read krem before the finder rewrites it */
                    int b;
                    u64 above;
                    if (warp_cross([&](int k) { return (u64)sh.u.h.hk[k]; }, nb, krem, &b,
                                   &above)) {
                        const uint32_t rem = krem - (uint32_t)above;
                        const uint32_t pre = (pre0 << (j ? shh - sl : 0)) | (uint32_t)b;
                        sh.kpre = pre;
                        sh.krem = rem;
                        if (sh.u.h.hk[b] == rem) { /* the whole bin: nothing below it */
                            sh.kdone = 1;
                            sh.kthr = pre << sl;
                        } else if (j == 2) { /* the k-th key; its ties all stay */
                            sh.kdone = 1;
                            sh.kthr = pre;
                        }
                    }
                }
                __syncthreads();
            }
            const uint32_t kthr = sh.kthr;
#pragma unroll 1
            for (int j = 0; j < 3 && !sh.pdone; j++) {
                const int nb = nbs[j], sl = ls[j], shh = hs[j];
                const uint32_t pre0 = sh.ppre;
                for (int b = t; b < nb; b += SMP_THREADS) {
                    sh.u.h.hc[b] = 0;
                    sh.u.h.hm[b] = 0;
                }
                __syncthreads();
                row_pass(row, V, [&](int i, float x, bool ok) {
                    const uint32_t key = order_key(x);
                    const uint32_t d = (key >> sl) & (uint32_t)(nb - 1);
                    const bool in = ok && key >= kthr && (j == 0 || key >> shh == pre0);
                    if (__any_sync(FULL_MASK, in)) {
                        const u64 q = in ? qw(x) : 0;
                        const unsigned g = __match_any_sync(FULL_MASK, in ? d : NO_DIGIT);
                        const unsigned qh = __reduce_add_sync(g, (unsigned)(q >> 23));
                        const unsigned ql = __reduce_add_sync(g, (unsigned)(q & 0x7FFFFF));
                        if (in && lane == __ffs(g) - 1) {
                            atomicAdd(&sh.u.h.hc[d], (uint32_t)__popc(g));
                            atomicAdd(&sh.u.h.hm[d], ((u64)qh << 23) + ql);
                        }
                    }
                });
                __syncthreads();
                if (w == 0) {
                    u64 rem = sh.prem;
                    __syncwarp(); /* every lane has read prem before the finder rewrites it */
                    if (j == 0) { /* ceil(top_p * mass of the top-k survivors), at least 1 */
                        u64 z = 0;
                        for (int k = lane; k < nb; k += 32) z += sh.u.h.hm[k];
                        z = warp_sum_u64(z);
                        rem = (u64)ceil((double)P.top_p * (double)z);
                        if (rem > z) rem = z;
                        if (rem < 1) rem = 1;
                    }
                    int b;
                    u64 above;
                    if (warp_cross([&](int k) { return sh.u.h.hm[k]; }, nb, rem, &b, &above)) {
                        rem -= above;
                        const uint32_t pre = (pre0 << (j ? shh - sl : 0)) | (uint32_t)b;
                        const uint32_t cnt = sh.u.h.hc[b];
                        const u64 mass = sh.u.h.hm[b];
                        sh.ppre = pre;
                        sh.prem = rem;
                        if (cnt == 1 || mass == rem) { /* the whole bin is needed */
                            sh.pdone = 1;
                            sh.pthr = pre << sl;
                        } else if (j == 2) { /* ties of one key, equal weights: the first c by id */
                            const u64 qs = mass / cnt, c = (rem + qs - 1) / qs;
                            sh.pdone = 1;
                            sh.pthr = pre;
                            if (c < cnt) sh.pneed = (int)c;
                        }
                    }
                }
                __syncthreads();
            }
            if (sh.pneed > 0) { /* the id of the pneed-th tie at the top-p cut */
                const uint32_t pk = sh.pthr;
                const u64 need = (u64)sh.pneed;
                const int id = find_crossing(
                    &sh, row, V, [=](int i, float x) { return (u64)(order_key(x) == pk); },
                    [=](u64 tot) { return need - 1; });
                if (t == 0) sh.pcut = id;
                __syncthreads();
            }

            /* 6. inverse CDF over the survivors in id order */
            const uint32_t pthr = sh.pthr;
            const int pcut = sh.pcut;
            auto surv_q = [=](int i, float x) -> u64 {
                const uint32_t key = order_key(x);
                if (use_k && key < kthr) return 0;
                if (use_p && (key < pthr || (key == pthr && i > pcut))) return 0;
                const float wv = expf((x - m) * inv_t);
                if (use_min && !(wv >= min_p)) return 0;
                return __float2ull_rz(wv * qscale);
            };
            tok = find_crossing(&sh, row, V, surv_q, [=](u64 tot) {
                const u64 tg = (u64)((double)u * (double)tot);
                return tg < tot ? tg : tot - 1; /* u rounding: the last survivor */
            });
        }
        if (tok < 0) tok = sh.amax; /* unreachable: the top token always survives */
    }

    /* 7. logprob at T = 1 */
    if (t == 0) {
        ids[r] = tok;
        lps[r] = (float)((double)row[tok] - (double)m - log(sh.z1));
    }
}

/* ---- host ---- */

static size_t align_up(size_t n, size_t a)
{
    return (n + a - 1) / a * a;
}

int cuda_sampler_create(int max_rows, int max_edits, int max_mask_rows, int mask_vocab,
                        struct cuda_sampler **out)
{
    *out = NULL;
    if (max_rows <= 0 || max_edits < 0 || max_mask_rows < 0 || mask_vocab < 0)
        return KRS_ERR_INVALID;
    if (max_edits == 0) {
        int64_t e = (int64_t)SMP_EDITS_DEF * max_rows;
        max_edits = e > INT_MAX / 32 ? INT_MAX / 32 : (int)e;
    }
    struct cuda_sampler *s = (struct cuda_sampler *)alloc_calloc(1, sizeof *s);
    if (!s) return KRS_ERR_NOMEM;
    s->max_rows = max_rows;
    s->max_edits = max_edits;
    s->rows = -1;
    const char *env = getenv("KRS_CUDA_SAMPLE_RADIX");
    s->radix_only = env && *env && strcmp(env, "0") != 0;
    s->edits_off = align_up((size_t)max_rows * sizeof(struct backend_sample_row), CUDA_ALIGN);
    size_t stage = s->edits_off + (size_t)max_edits * sizeof(struct backend_logit_edit);
    size_t res = (1 + 2 * (size_t)max_rows) * sizeof(int32_t);
    if (max_mask_rows > max_rows) max_mask_rows = max_rows;
    s->max_mask_rows = mask_vocab > 0 ? max_mask_rows : 0;
    s->mask_vocab = mask_vocab;
    s->mask_words = (mask_vocab + 31) / 32;
    s->mask_off = align_up((size_t)max_rows * sizeof(int32_t), CUDA_ALIGN) / sizeof(int32_t);
    size_t mbytes = (s->mask_off + (size_t)s->max_mask_rows * (size_t)s->mask_words) * 4;
    int rc;
    if (s->max_mask_rows > 0 &&
        ((rc = CUDA_CHECK(cudaMallocHost((void **)&s->h_mask, mbytes), "sampler masks")) ||
         (rc = CUDA_CHECK(cudaMalloc((void **)&s->d_mask, mbytes), "sampler masks")))) {
        cuda_sampler_destroy(s);
        return rc;
    }
    if ((rc = CUDA_CHECK(cudaMallocHost((void **)&s->h_stage, stage), "sampler staging")) ||
        (rc = CUDA_CHECK(cudaMalloc((void **)&s->d_stage, stage), "sampler staging")) ||
        (rc = CUDA_CHECK(cudaMallocHost((void **)&s->h_res, res), "sampler results")) ||
        (rc = CUDA_CHECK(cudaMalloc((void **)&s->d_res, res), "sampler results")) ||
        (rc = CUDA_CHECK(cudaMalloc((void **)&s->d_part,
                                    (size_t)max_rows * SMP_SPLITS * sizeof(struct mx_part)),
                         "sampler splits")) ||
        (rc = CUDA_CHECK(cudaMalloc((void **)&s->d_done, (size_t)max_rows * sizeof(int)),
                         "sampler splits")) ||
        (rc = CUDA_CHECK(cudaMemset(s->d_done, 0, (size_t)max_rows * sizeof(int)),
                         "sampler splits")) ||
        (rc = CUDA_CHECK(cudaEventCreateWithFlags(&s->staged, cudaEventDisableTiming),
                         "sampler event"))) {
        cuda_sampler_destroy(s);
        return rc;
    }
    *out = s;
    return KRS_OK;
}

void cuda_sampler_destroy(struct cuda_sampler *s)
{
    if (!s) return;
    if (s->staged) {
        cudaEventSynchronize(s->staged);
        cudaEventDestroy(s->staged);
    }
    cudaFreeHost(s->h_stage);
    cudaFree(s->d_stage);
    cudaFreeHost(s->h_res);
    cudaFree(s->d_res);
    cudaFreeHost(s->h_mask);
    cudaFree(s->d_mask);
    cudaFree(s->d_part);
    cudaFree(s->d_done);
    alloc_free(s);
}

static int row_ok(const struct backend_sample_row *p, int n_edits)
{
    return isfinite(p->temperature) && p->temperature >= 0.0f && p->top_k >= 0 && p->top_p > 0.0f &&
           p->top_p <= 1.0f && p->min_p >= 0.0f && p->min_p <= 1.0f && p->u >= 0.0f &&
           p->u <= 1.0f && p->edit_begin >= 0 && p->n_edits >= 0 &&
           p->edit_begin <= n_edits - p->n_edits;
}

static int edit_ok(const struct backend_logit_edit *e, int n_vocab)
{
    return e->token >= 0 && e->token < n_vocab && isfinite(e->pre_add) && isfinite(e->post_add) &&
           isfinite(e->rep) && e->rep > 0.0f;
}

int cuda_op_sample(struct backend *b, const struct backend_tensor *logits, int rows, int n_vocab,
                   const struct backend_sample_row *r, const struct backend_logit_edit *edits,
                   int n_edits, const uint32_t *const *masks)
{
    struct backend_cuda *c = (struct backend_cuda *)b;
    struct cuda_sampler *s = c->sampler;
    if (!s) return KRS_ERR_UNSUPPORTED;
    if (!c->step.active) return KRS_ERR_STATE;
    s->rows = -1;
    if (rows < 0 || rows > s->max_rows || n_vocab <= 0 || n_vocab > (1 << 28) || (rows > 0 && !r) ||
        n_edits < 0 || (n_edits > 0 && !edits) || !logits || logits->kind != CUDA_T_ACT ||
        logits->n < (int64_t)rows * n_vocab)
        return KRS_ERR_INVALID;
    if (n_edits > s->max_edits) return KRS_ERR_FULL;
    int n_masked = 0;
    for (int i = 0; masks && i < rows; i++) n_masked += masks[i] != NULL;
    if (n_masked > s->max_mask_rows || (n_masked && n_vocab > s->mask_vocab)) return KRS_ERR_FULL;
    for (int i = 0; i < rows; i++)
        if (!row_ok(&r[i], n_edits)) return KRS_ERR_INVALID;
    for (int i = 0; i < n_edits; i++)
        if (!edit_ok(&edits[i], n_vocab)) return KRS_ERR_INVALID;

    /* The previous upload must be done before its pinned buffer is rewritten. */
    int rc = CUDA_CHECK(cudaEventSynchronize(s->staged), "sampler staging reuse");
    if (rc) return rc;
    size_t rb = (size_t)rows * sizeof *r, eb = (size_t)n_edits * sizeof *edits;
    if (rb) memcpy(s->h_stage, r, rb);
    if (eb) memcpy(s->h_stage + s->edits_off, edits, eb);
    size_t bytes = eb ? s->edits_off + eb : rb;
    if (bytes && ((rc = CUDA_CHECK(cudaMemcpyAsync(s->d_stage, s->h_stage, bytes,
                                                   cudaMemcpyHostToDevice, c->stream),
                                   "sampler upload")) ||
                  (rc = CUDA_CHECK(cudaEventRecord(s->staged, c->stream), "sampler upload"))))
        return rc;
    if (n_masked) {
        /* the same event guards the mask staging: it was recorded after the last upload */
        const size_t cw = ((size_t)n_vocab + 31) / 32; /* this call's words per mask */
        for (int i = 0, k = 0; i < rows; i++) {
            s->h_mask[i] = masks[i] ? k : -1;
            if (masks[i]) memcpy(s->h_mask + s->mask_off + (size_t)k++ * cw, masks[i], cw * 4);
        }
        size_t mb = (s->mask_off + (size_t)n_masked * cw) * 4;
        if ((rc = CUDA_CHECK(
                 cudaMemcpyAsync(s->d_mask, s->h_mask, mb, cudaMemcpyHostToDevice, c->stream),
                 "sampler mask upload")) ||
            (rc = CUDA_CHECK(cudaEventRecord(s->staged, c->stream), "sampler mask upload")))
            return rc;
    }
    /* Few rows leave most SMs idle: each row is then cut into splits (blocks of the row's
     * statistics pass; the last one to finish samples the row). H200, default model's
     * stand-in: batch 1 -28 us per step with 16 splits; from 32 rows on, splits measured no
     * faster (2-3 % slower at 32-128 rows), so more rows take one block each. */
    int splits = rows >= 1 && rows <= SMP_SPLIT_ROWS ? c->sample_splits : 1;
    splits = splits < 1 ? 1 : (splits > SMP_SPLITS ? SMP_SPLITS : splits);
    const dim3 grid(rows > 0 ? (unsigned)rows : 1u, (unsigned)splits); /* block 0 reads the flags */
    cuda_launch(c, k_sample, grid, SMP_THREADS, (float *)logits->dev, n_vocab, rows,
                (const struct backend_sample_row *)s->d_stage,
                (const struct backend_logit_edit *)(s->d_stage + s->edits_off),
                n_masked ? s->d_mask : NULL,
                n_masked ? reinterpret_cast<const uint32_t *>(s->d_mask + s->mask_off) : NULL,
                s->d_res, c->d_err, !s->radix_only, s->d_part, s->d_done);
    if ((rc = CUDA_LAUNCHED("sample"))) return rc;
    s->rows = rows;
    return KRS_OK;
}

int cuda_op_step_end_sampled(struct backend *b, int rows, const int32_t **ids,
                             const float **logprobs)
{
    struct backend_cuda *c = (struct backend_cuda *)b;
    struct cuda_sampler *s = c->sampler;
    if (ids) *ids = NULL;
    if (logprobs) *logprobs = NULL;
    if (!s) return KRS_ERR_UNSUPPORTED;
    if (!c->step.active) return KRS_ERR_STATE;
    c->step.active = 0;
    const int n = s->rows;
    s->rows = -1;
    if (n < 0) return KRS_ERR_STATE; /* no sample call in this step */
    if (rows != n || !ids || !logprobs) return KRS_ERR_INVALID;
    int rc;
    if ((rc = CUDA_CHECK(cudaMemcpyAsync(s->h_res, s->d_res, (1 + 2 * (size_t)n) * sizeof(int32_t),
                                         cudaMemcpyDeviceToHost, c->stream),
                         "sampled download")) ||
        (rc = CUDA_CHECK(cudaStreamSynchronize(c->stream), "step")) ||
        (rc = CUDA_CHECK(cudaGetLastError(), "step")))
        return rc;
    if (s->h_res[0]) {
        KRS_LOG_ERRORF("cuda: step read or wrote a KV position whose block is not held (flags %d)",
                       s->h_res[0]);
        return KRS_ERR_INVALID;
    }
    for (int i = 0; i < n; i++)
        if (s->h_res[1 + i] < 0) {
            KRS_LOG_ERRORF("cuda: sample row %d: logits hold NaN or +inf, or are all -inf", i);
            return KRS_ERR_INVALID;
        }
    *ids = s->h_res + 1;
    *logprobs = reinterpret_cast<const float *>(s->h_res + 1 + n);
    return KRS_OK;
}
