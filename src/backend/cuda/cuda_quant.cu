/* CUDA kernels on quantized weights: decoders of every block format, the matvec kernels (few
 * activation rows), the dequantize-to-F32 + cuBLAS GEMM path (many rows), embedding lookup and
 * row gathering.
 *
 * Weights stay in their GGUF block layout on the device. Every format is read in pieces of 8
 * consecutive elements of a row (decode8): a 32-element block holds 4 pieces, a 256-element
 * K-quant super-block 32. The decoders follow quant.c's scalar dequantizers operation by
 * operation with explicitly rounded products (__fmul_rn: no fused multiply-add), so a dequantized
 * weight is bit-exact with the CPU's.
 *
 * Matvec: one warp per NW output rows; lane l takes pieces l, l+32, ... of the row, so a warp
 * reads 32 consecutive pieces (coalesced) and the activations in 32-byte runs. Each decoded
 * piece is applied to up to R = 8 activation rows before the next is read: a weight is read
 * once per launch however many rows there are. Accumulation is F32, reduced across the warp.
 *
 * GEMM path: the weight is dequantized in chunks of rows into an F32 scratch and multiplied
 * by cuBLAS: TF32 tensor cores with F32 accumulation for F16/BF16/quantized weights (relative
 * error ~1e-3 per output, well under their own rounding), plain F32 for F32 weights and for
 * every weight when the backend was created with KRS_CUDA_GEMM_F32=1. Must not allocate: the
 * scratch and cuBLAS' workspace are reserved by backend_cuda.cu. */
#include "backend/cuda/cuda_impl.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include <string.h>

/* ---- loads and scalar conversions ---- */

__device__ __forceinline__ uint32_t ld16(const uint8_t *p)
{
    return __ldg((const unsigned short *)p);
}

__device__ __forceinline__ uint32_t ld32(const uint8_t *p)
{
    return __ldg((const unsigned int *)p);
}

/* 8 bytes from a 2-aligned address, little-endian, as two words */
__device__ __forceinline__ uint2 ld8_a2(const uint8_t *p)
{
    uint2 r;
    r.x = ld16(p) | (ld16(p + 2) << 16);
    r.y = ld16(p + 4) | (ld16(p + 6) << 16);
    return r;
}

__device__ __forceinline__ uint2 ld8_a8(const uint8_t *p)
{
    return __ldg((const uint2 *)p);
}

__device__ __forceinline__ float h2f(uint32_t h)
{
    return __half2float(__ushort_as_half((unsigned short)h));
}

__device__ __forceinline__ float bf2f(uint32_t h)
{
    return __uint_as_float(h << 16);
}

/* (float)v for |v| < 2^22, exactly, without the conversion unit (a quarter-rate instruction):
 * the integer lands in the mantissa of 1.5 * 2^23, then the offset is subtracted. */
__device__ __forceinline__ float i2f(int v)
{
    return __int_as_float(0x4B400000 + v) - 12582912.0f;
}

/* byte k (runtime, < 8) of the 64-bit value (lo, hi) */
__device__ __forceinline__ uint32_t byte8(uint2 v, int k)
{
    return ((k < 4 ? v.x : v.y) >> (8 * (k & 3))) & 0xFF;
}

/* byte k (runtime, < 12) of a 12-byte value */
__device__ __forceinline__ uint32_t byte12(uint32_t a, uint32_t b, uint32_t c, int k)
{
    uint32_t w = k < 4 ? a : (k < 8 ? b : c);
    return (w >> (8 * (k & 3))) & 0xFF;
}

/* 6-bit scale and min of sub-block sb of a Q4_K/Q5_K super-block (quant_k4_scales) */
__device__ __forceinline__ void k4_scale(const uint8_t *s, int sb, uint32_t *sc, uint32_t *mn)
{
    uint32_t a = ld32(s), b = ld32(s + 4), c = ld32(s + 8);
    if (sb < 4) {
        *sc = byte12(a, b, c, sb) & 63;
        *mn = byte12(a, b, c, sb + 4) & 63;
    } else {
        *sc = (byte12(a, b, c, sb + 4) & 0x0F) | ((byte12(a, b, c, sb - 4) >> 6) << 4);
        *mn = (byte12(a, b, c, sb + 4) >> 4) | ((byte12(a, b, c, sb) >> 6) << 4);
    }
}

/* ---- decoders: elements [8p, 8p+8) of a row ---- */

template <int FMT> struct qfmt;
template <> struct qfmt<QUANT_F32> {
    static constexpr int QK = 32, BYTES = 128; /* float formats: virtual 32-element blocks */
};
template <> struct qfmt<QUANT_F16> {
    static constexpr int QK = 32, BYTES = 64;
};
template <> struct qfmt<QUANT_BF16> {
    static constexpr int QK = 32, BYTES = 64;
};
template <> struct qfmt<QUANT_Q4_0> {
    static constexpr int QK = 32, BYTES = 18;
};
template <> struct qfmt<QUANT_Q4_1> {
    static constexpr int QK = 32, BYTES = 20;
};
template <> struct qfmt<QUANT_Q5_0> {
    static constexpr int QK = 32, BYTES = 22;
};
template <> struct qfmt<QUANT_Q5_1> {
    static constexpr int QK = 32, BYTES = 24;
};
template <> struct qfmt<QUANT_Q8_0> {
    static constexpr int QK = 32, BYTES = 34;
};
template <> struct qfmt<CUDA_Q8_0_G> {
    static constexpr int QK = 128, BYTES = 136;
};
template <> struct qfmt<QUANT_Q4_K> {
    static constexpr int QK = 256, BYTES = 144;
};
template <> struct qfmt<QUANT_Q5_K> {
    static constexpr int QK = 256, BYTES = 176;
};
template <> struct qfmt<QUANT_Q6_K> {
    static constexpr int QK = 256, BYTES = 210;
};

/* 16 bytes read once: through the non-coherent path without allocating in L1. */
__device__ __forceinline__ uint4 ld_stream16(const uint8_t *p)
{
    uint4 r;
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
        : "l"(p));
    return r;
}

/* Eight F16 or BF16 values of a 16-byte load, as decode8 converts them. */
template <int FMT> __device__ __forceinline__ void unpack8_half(uint4 u, float *w)
{
    if constexpr (FMT == QUANT_F16) {
        w[0] = h2f(u.x & 0xFFFF), w[1] = h2f(u.x >> 16);
        w[2] = h2f(u.y & 0xFFFF), w[3] = h2f(u.y >> 16);
        w[4] = h2f(u.z & 0xFFFF), w[5] = h2f(u.z >> 16);
        w[6] = h2f(u.w & 0xFFFF), w[7] = h2f(u.w >> 16);
    } else {
        w[0] = bf2f(u.x & 0xFFFF), w[1] = bf2f(u.x >> 16);
        w[2] = bf2f(u.y & 0xFFFF), w[3] = bf2f(u.y >> 16);
        w[4] = bf2f(u.z & 0xFFFF), w[5] = bf2f(u.z >> 16);
        w[6] = bf2f(u.w & 0xFFFF), w[7] = bf2f(u.w >> 16);
    }
}

template <int FMT>
__device__ __forceinline__ void decode8(const uint8_t *__restrict__ row, int64_t p, float *w)
{
    constexpr int QK = qfmt<FMT>::QK, BYTES = qfmt<FMT>::BYTES, PPB = QK / 8;
    const uint8_t *b = row + (p / PPB) * BYTES;
    const int i0 = (int)(p % PPB) * 8; /* first element inside the block */
    if constexpr (FMT == QUANT_F32) {
        const float4 *f = (const float4 *)(row + p * 32);
        float4 a = __ldg(f), c = __ldg(f + 1);
        w[0] = a.x, w[1] = a.y, w[2] = a.z, w[3] = a.w;
        w[4] = c.x, w[5] = c.y, w[6] = c.z, w[7] = c.w;
    } else if constexpr (FMT == QUANT_F16 || FMT == QUANT_BF16) {
        unpack8_half<FMT>(__ldg((const uint4 *)(row + p * 16)), w);
    } else if constexpr (FMT == QUANT_Q8_0) {
        float d = h2f(ld16(b));
        uint2 q = ld8_a2(b + 2 + i0);
#pragma unroll
        for (int j = 0; j < 8; j++) w[j] = __fmul_rn(i2f((int)(int8_t)byte8(q, j)), d);
    } else if constexpr (FMT == CUDA_Q8_0_G) {
        float d = h2f(ld16(b + 2 * (i0 / 32)));
        uint2 q = ld8_a8(b + 8 + i0);
#pragma unroll
        for (int j = 0; j < 8; j++) w[j] = __fmul_rn(i2f((int)(int8_t)byte8(q, j)), d);
    } else if constexpr (FMT == QUANT_Q4_0) {
        float d = h2f(ld16(b));
        uint2 q = ld8_a2(b + 2 + (i0 & 15));
        int sh = i0 >= 16 ? 4 : 0;
#pragma unroll
        for (int j = 0; j < 8; j++) w[j] = __fmul_rn(d, i2f((int)((byte8(q, j) >> sh) & 0xF) - 8));
    } else if constexpr (FMT == QUANT_Q4_1) {
        uint32_t dm = ld32(b);
        float d = h2f(dm & 0xFFFF), m = h2f(dm >> 16);
        uint2 q = ld8_a2(b + 4 + (i0 & 15));
        int sh = i0 >= 16 ? 4 : 0;
#pragma unroll
        for (int j = 0; j < 8; j++)
            w[j] = __fadd_rn(__fmul_rn(d, i2f((int)((byte8(q, j) >> sh) & 0xF))), m);
    } else if constexpr (FMT == QUANT_Q5_0) {
        float d = h2f(ld16(b));
        uint32_t qh = ld16(b + 2) | (ld16(b + 4) << 16);
        uint2 q = ld8_a2(b + 6 + (i0 & 15));
        int sh = i0 >= 16 ? 4 : 0;
#pragma unroll
        for (int j = 0; j < 8; j++) {
            int v = (int)((byte8(q, j) >> sh) & 0xF) | (int)(((qh >> (i0 + j)) & 1) << 4);
            w[j] = __fmul_rn(d, i2f(v - 16));
        }
    } else if constexpr (FMT == QUANT_Q5_1) {
        uint32_t dm = ld32(b);
        float d = h2f(dm & 0xFFFF), m = h2f(dm >> 16);
        uint32_t qh = ld32(b + 4);
        uint2 q = ld8_a8(b + 8 + (i0 & 15));
        int sh = i0 >= 16 ? 4 : 0;
#pragma unroll
        for (int j = 0; j < 8; j++) {
            int v = (int)((byte8(q, j) >> sh) & 0xF) | (int)(((qh >> (i0 + j)) & 1) << 4);
            w[j] = __fadd_rn(__fmul_rn(d, i2f(v)), m);
        }
    } else if constexpr (FMT == QUANT_Q4_K || FMT == QUANT_Q5_K) {
        uint32_t dm = ld32(b);
        float d = h2f(dm & 0xFFFF), dmin = h2f(dm >> 16);
        int sb = i0 / 32, l0 = i0 % 32;
        uint32_t sc, mn;
        k4_scale(b + 4, sb, &sc, &mn);
        float dl = __fmul_rn(d, (float)sc), ml = __fmul_rn(dmin, (float)mn);
        int sh = (sb & 1) * 4;
        if constexpr (FMT == QUANT_Q4_K) {
            uint2 q = ld8_a8(b + 16 + 32 * (sb / 2) + l0);
#pragma unroll
            for (int j = 0; j < 8; j++)
                w[j] = __fsub_rn(__fmul_rn(dl, i2f((int)((byte8(q, j) >> sh) & 0xF))), ml);
        } else {
            uint2 qh = ld8_a8(b + 16 + l0);
            uint2 q = ld8_a8(b + 48 + 32 * (sb / 2) + l0);
#pragma unroll
            for (int j = 0; j < 8; j++) {
                int v = (int)((byte8(q, j) >> sh) & 0xF) | (int)(((byte8(qh, j) >> sb) & 1) << 4);
                w[j] = __fsub_rn(__fmul_rn(dl, i2f(v)), ml);
            }
        }
    } else if constexpr (FMT == QUANT_Q6_K) {
        int h = i0 / 128, k = (i0 % 128) / 32, l0 = i0 % 32;
        uint2 ql = ld8_a2(b + 64 * h + l0 + 32 * (k & 1));
        uint2 qh = ld8_a2(b + 128 + 32 * h + l0);
        float d = h2f(ld16(b + 208));
        float ds = __fmul_rn(d, (float)(int8_t)__ldg(b + 192 + i0 / 16));
        int sh = k < 2 ? 0 : 4;
#pragma unroll
        for (int j = 0; j < 8; j++) {
            int v = (int)((byte8(ql, j) >> sh) & 0xF) | (int)(((byte8(qh, j) >> (2 * k)) & 3) << 4);
            w[j] = __fmul_rn(ds, i2f(v - 32));
        }
    }
}

/* Element i of a row of a float format (rows whose length is not a multiple of 8). */
__device__ __forceinline__ float decode1_float(uint32_t type, const uint8_t *row, int64_t i)
{
    if (type == QUANT_F32) return __ldg((const float *)row + i);
    uint32_t h = __ldg((const unsigned short *)row + i);
    return type == QUANT_F16 ? h2f(h) : bf2f(h);
}

__device__ __forceinline__ float warp_sum(float v)
{
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, o);
    return v;
}

/* ---- kernels ---- */

/* Pulls rows [row0, row0 + nw) of W (contiguous bytes) into L2, 128 bytes per lane at a time.
 * Matvec kernels call it before cuda_pdl_enter: weights do not depend on the previous kernel,
 * so under programmatic dependent launch they stream in while that kernel still runs and the
 * matvec then reads them from L2 instead of waiting on DRAM. */
__device__ __forceinline__ void mv_prefetch(const uint8_t *w, uint64_t row_bytes, int64_t n_out,
                                            int64_t row0, int nw)
{
    const int64_t r1 = row0 + nw < n_out ? row0 + nw : n_out;
    const uint8_t *e = w + r1 * row_bytes;
    for (const uint8_t *p = w + row0 * row_bytes + (threadIdx.x & 31) * 128; p < e; p += 32 * 128)
        asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
}

/* acc[j][r] += piece p of row j (8 decoded weights) . piece p of activation row r; the one
 * order of operations every matvec path uses, so outputs do not depend on the path. */
template <int NW, int R>
__device__ __forceinline__ void mv_fma(const float (&wv)[NW][8], const float *const (&xr)[R],
                                       int64_t p, float (&acc)[NW][R])
{
#pragma unroll
    for (int r = 0; r < R; r++) {
        const float4 *xp = (const float4 *)(xr[r] + p * 8);
        float4 a = __ldg(xp), b = __ldg(xp + 1);
#pragma unroll
        for (int j = 0; j < NW; j++) {
            float s = acc[j][r];
            s = fmaf(wv[j][0], a.x, s);
            s = fmaf(wv[j][1], a.y, s);
            s = fmaf(wv[j][2], a.z, s);
            s = fmaf(wv[j][3], a.w, s);
            s = fmaf(wv[j][4], b.x, s);
            s = fmaf(wv[j][5], b.y, s);
            s = fmaf(wv[j][6], b.z, s);
            s = fmaf(wv[j][7], b.w, s);
            acc[j][r] = s;
        }
    }
}

#define MV_WARPS 4

/* One warp's share of a matvec: acc[j][r] = row0 + j of W times activation row r, reduced
 * across the warp (every lane holds the sums). The plain and the fused matvec kernels both
 * call it, so an output does not depend on which kernel computed it. */
template <int FMT, int R, int NW>
__device__ __forceinline__ void mv_warp(const uint8_t *__restrict__ w, uint64_t row_bytes,
                                        int64_t n_out, int64_t n_in, const float *__restrict__ x,
                                        int rows, int64_t row0, float (&acc)[NW][R])
{
    const int lane = threadIdx.x & 31;
    const int64_t n_pieces = n_in / 8;
    const uint8_t *wr[NW];
#pragma unroll
    for (int j = 0; j < NW; j++) wr[j] = w + (uint64_t)min(row0 + j, n_out - 1) * row_bytes;
    const float *xr[R]; /* mv_fma takes it as const float *const (&)[R] */
#pragma unroll
    for (int r = 0; r < R; r++) xr[r] = x + (int64_t)min(r, rows - 1) * n_in;
#pragma unroll
    for (int j = 0; j < NW; j++)
#pragma unroll
        for (int r = 0; r < R; r++) acc[j][r] = 0.0f;

    int64_t p = lane;
    if constexpr (FMT == QUANT_F16 || FMT == QUANT_BF16) {
        /* Float rows: every lane first issues U loads of 16 bytes per row, all independent, and
         * only then converts and multiplies. At batch 1 a matvec is a stream of weights with
         * little math, and what bounds it is the bytes each warp has in flight: the rolled loop
         * below waits on one load per row at a time (measured 1.6-2.4 TB/s on 8-64 MB
         * matrices). The weights are read once: no L1 allocation. */
        constexpr int U = NW >= 8 ? 1 : 8 / NW;
        for (; p + 32 * (U - 1) < n_pieces; p += 32 * U) {
            uint4 raw[NW][U];
#pragma unroll
            for (int j = 0; j < NW; j++)
#pragma unroll
                for (int u = 0; u < U; u++) raw[j][u] = ld_stream16(wr[j] + (p + 32 * u) * 16);
#pragma unroll
            for (int u = 0; u < U; u++) {
                float wv[NW][8];
#pragma unroll
                for (int j = 0; j < NW; j++) unpack8_half<FMT>(raw[j][u], wv[j]);
                mv_fma<NW, R>(wv, xr, p + 32 * u, acc);
            }
        }
    } else if constexpr (R <= 2) {
        /* Quantized rows at batch 1-2, the same idea: decode U pieces per row (their loads are
         * independent, so they are all in flight together) before the first multiply. */
        constexpr int U = NW >= 8 ? 1 : 8 / NW;
        for (; p + 32 * (U - 1) < n_pieces; p += 32 * U) {
            float wv[U][NW][8];
#pragma unroll
            for (int u = 0; u < U; u++)
#pragma unroll
                for (int j = 0; j < NW; j++) decode8<FMT>(wr[j], p + 32 * u, wv[u][j]);
#pragma unroll
            for (int u = 0; u < U; u++) mv_fma<NW, R>(wv[u], xr, p + 32 * u, acc);
        }
    }
#pragma unroll 4
    for (; p < n_pieces; p += 32) {
        float wv[NW][8];
#pragma unroll
        for (int j = 0; j < NW; j++) decode8<FMT>(wr[j], p, wv[j]);
        mv_fma<NW, R>(wv, xr, p, acc);
    }
#pragma unroll
    for (int j = 0; j < NW; j++)
#pragma unroll
        for (int r = 0; r < R; r++) acc[j][r] = warp_sum(acc[j][r]);
}

/* A block of `warps` warps takes rows [blockIdx.x * warps * NW, + warps * NW): its weights are
 * prefetched into L2 before cuda_pdl_enter, then each warp computes its NW rows (mv_warp) and
 * stores them, y[r][row]. The plain and the residual matvec kernels share it. */
template <int FMT, int R, int NW>
__device__ __forceinline__ void
mv_block_rows(const uint8_t *__restrict__ w, uint64_t row_bytes, int64_t n_out, int64_t n_in,
              const float *__restrict__ x, int rows, float *__restrict__ y, int warps)
{
    const int lane = threadIdx.x & 31;
    const int64_t row0 = ((int64_t)blockIdx.x * warps + (threadIdx.x >> 5)) * NW;
    if (row0 < n_out) mv_prefetch(w, row_bytes, n_out, row0, NW);
    cuda_pdl_enter();
    if (row0 >= n_out) return;
    float acc[NW][R];
    mv_warp<FMT, R, NW>(w, row_bytes, n_out, n_in, x, rows, row0, acc);
#pragma unroll
    for (int j = 0; j < NW; j++)
#pragma unroll
        for (int r = 0; r < R; r++)
            if (lane == 0 && r < rows && row0 + j < n_out)
                y[(int64_t)r * n_out + row0 + j] = acc[j][r];
}

template <int FMT, int R, int NW>
__global__ void __launch_bounds__(MV_WARPS * 32)
    k_matvec(const uint8_t *__restrict__ w, uint64_t row_bytes, int64_t n_out, int64_t n_in,
             const float *__restrict__ x, int rows, float *__restrict__ y)
{
    mv_block_rows<FMT, R, NW>(w, row_bytes, n_out, n_in, x, rows, y, MV_WARPS);
}

/* A one-row matvec whose output tm feeds the residual step (cuda_ops.cu's k_norm_add_norm_reg):
 * blocks of CUDA_NORM_THREADS compute rows as k_matvec does (each row by one warp, the same
 * arithmetic), count themselves done, and the last one runs the residual step, so the step
 * costs no launch of its own. The counter is reset for the next launch. */
struct mv_res_params {
    float *tm;
    const float *wp, *wn;
    float eps_p, eps_n;
    float *x, *xn;
    int *done;
};

template <int FMT, int NW>
__global__ void __launch_bounds__(CUDA_NORM_THREADS)
    k_matvec_res(const uint8_t *__restrict__ w, uint64_t row_bytes, int64_t n_out, int64_t n_in,
                 const float *__restrict__ x, const mv_res_params P)
{
    __shared__ int last;
    __shared__ double part[CUDA_NORM_THREADS / 32];
    mv_block_rows<FMT, 1, NW>(w, row_bytes, n_out, n_in, x, 1, P.tm, CUDA_NORM_THREADS / 32);
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) last = atomicAdd(P.done, 1) == (int)gridDim.x - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();
    cuda_norm_add_norm_row(P.tm, NULL, P.wp, P.eps_p, P.x, P.wn, P.eps_n, P.xn, (int)n_out, part);
    if (threadIdx.x == 0) *P.done = 0;
}

/* Several matvecs of one input in one launch: blocks [s.block0, next block0) take segment s. */
#define MV_MULTI 3
struct mv_seg {
    const uint8_t *w;
    uint64_t row_bytes;
    int64_t n_out;
    uint32_t type;
    unsigned block0;
    float *y;
};
struct mv_multi_params {
    mv_seg s[MV_MULTI];
    int n_seg;
    int64_t n_in;
    const float *x;
    int rows;
};

template <int R, int NW>
__device__ __forceinline__ void mv_any(const mv_seg &S, int64_t n_in, const float *x, int rows,
                                       int64_t row0, float (&acc)[NW][R])
{
#define MV_CASE(F)                                                                                 \
    case F:                                                                                        \
        mv_warp<F, R, NW>(S.w, S.row_bytes, S.n_out, n_in, x, rows, row0, acc);                    \
        break
    switch (S.type) {
        MV_CASE(QUANT_F32);
        MV_CASE(QUANT_F16);
        MV_CASE(QUANT_BF16);
        MV_CASE(QUANT_Q4_0);
        MV_CASE(QUANT_Q4_1);
        MV_CASE(QUANT_Q5_0);
        MV_CASE(QUANT_Q5_1);
        MV_CASE(QUANT_Q8_0);
        MV_CASE(CUDA_Q8_0_G);
        MV_CASE(QUANT_Q4_K);
        MV_CASE(QUANT_Q5_K);
        MV_CASE(QUANT_Q6_K);
    default:
        break; /* the launcher takes supported types only */
    }
#undef MV_CASE
}

template <int R, int NW>
__global__ void __launch_bounds__(MV_WARPS * 32) k_matvec_multi(const mv_multi_params P)
{
    int si = 0;
    while (si + 1 < P.n_seg && blockIdx.x >= P.s[si + 1].block0) si++;
    const mv_seg &S = P.s[si];
    const int lane = threadIdx.x & 31;
    const int64_t row0 = ((int64_t)(blockIdx.x - S.block0) * MV_WARPS + (threadIdx.x >> 5)) * NW;
    if (row0 < S.n_out) mv_prefetch(S.w, S.row_bytes, S.n_out, row0, NW);
    cuda_pdl_enter();
    if (row0 >= S.n_out) return;
    float acc[NW][R];
    mv_any<R, NW>(S, P.n_in, P.x, P.rows, row0, acc);
#pragma unroll
    for (int j = 0; j < NW; j++)
#pragma unroll
        for (int r = 0; r < R; r++)
            if (lane == 0 && r < P.rows && row0 + j < S.n_out)
                S.y[(int64_t)r * S.n_out + row0 + j] = acc[j][r];
}

/* Gate and up of one type and shape, then the GLU: each warp takes the same rows of both. */
template <int FMT, int R, int NW>
__global__ void __launch_bounds__(MV_WARPS * 32) k_matvec_glu(const mv_multi_params P, int gelu)
{
    const mv_seg &G = P.s[0], &U = P.s[1];
    const int lane = threadIdx.x & 31;
    const int64_t row0 = ((int64_t)blockIdx.x * MV_WARPS + (threadIdx.x >> 5)) * NW;
    if (row0 < G.n_out) {
        mv_prefetch(G.w, G.row_bytes, G.n_out, row0, NW);
        mv_prefetch(U.w, U.row_bytes, U.n_out, row0, NW);
    }
    cuda_pdl_enter();
    if (row0 >= G.n_out) return;
    float g[NW][R], u[NW][R];
    mv_warp<FMT, R, NW>(G.w, G.row_bytes, G.n_out, P.n_in, P.x, P.rows, row0, g);
    mv_warp<FMT, R, NW>(U.w, U.row_bytes, U.n_out, P.n_in, P.x, P.rows, row0, u);
#pragma unroll
    for (int j = 0; j < NW; j++)
#pragma unroll
        for (int r = 0; r < R; r++)
            if (lane == 0 && r < P.rows && row0 + j < G.n_out) {
                const int64_t o = (int64_t)r * G.n_out + row0 + j;
                U.y[o] = u[j][r];
                G.y[o] = cuda_glu1(g[j][r], u[j][r], gelu);
            }
}

/* dst[r, :] = dequant(row r0 + r) * scale for r < nr; rows of n_in, pieces of 8. O = float,
 * or __half (the F16 weight copies), where a value beyond F16's range sets *overflow. */
template <int FMT, typename O>
__global__ void k_dequant(const uint8_t *__restrict__ w, uint64_t row_bytes, int64_t n_in,
                          int64_t nr, float scale, O *__restrict__ dst, int *overflow)
{
    cuda_pdl_enter();
    const int64_t n_pieces = n_in / 8;
    const int64_t total = nr * n_pieces;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (int64_t)gridDim.x * blockDim.x) {
        int64_t r = i / n_pieces, p = i % n_pieces;
        float v[8];
        decode8<FMT>(w + (uint64_t)r * row_bytes, p, v);
        if (scale != 1.0f)
#pragma unroll
            for (int j = 0; j < 8; j++) v[j] = __fmul_rn(v[j], scale);
        if constexpr (std::is_same<O, float>::value) {
            float4 *o = (float4 *)(dst + r * n_in + p * 8);
            o[0] = make_float4(v[0], v[1], v[2], v[3]);
            o[1] = make_float4(v[4], v[5], v[6], v[7]);
        } else {
            __half h[8];
#pragma unroll
            for (int j = 0; j < 8; j++) {
                h[j] = __float2half_rn(v[j]);
                if ((__hisinf(h[j]) || __hisnan(h[j])) && isfinite(v[j])) atomicOr(overflow, 1);
            }
            *(uint4 *)(dst + r * n_in + p * 8) = *(const uint4 *)h;
        }
    }
}

/* Float formats of any row length, one element per thread. */
__global__ void k_dequant_float(uint32_t type, const uint8_t *__restrict__ w, uint64_t row_bytes,
                                int64_t n_in, int64_t nr, float scale, float *__restrict__ dst)
{
    cuda_pdl_enter();
    const int64_t total = nr * n_in;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (int64_t)gridDim.x * blockDim.x) {
        int64_t r = i / n_in, e = i % n_in;
        float v = decode1_float(type, w + (uint64_t)r * row_bytes, e);
        dst[i] = scale != 1.0f ? __fmul_rn(v, scale) : v;
    }
}

/* Embedding: block t dequantizes row tokens[t] (validated on the host). */
template <int FMT>
__global__ void k_embed(const uint8_t *__restrict__ w, uint64_t row_bytes, int64_t n_in,
                        const int32_t *__restrict__ tokens, float scale, float *__restrict__ x)
{
    cuda_pdl_enter();
    const int64_t t = blockIdx.x;
    const uint8_t *row = w + (uint64_t)tokens[t] * row_bytes;
    float *dst = x + t * n_in;
    for (int64_t p = threadIdx.x; p < n_in / 8; p += blockDim.x) {
        float v[8];
        decode8<FMT>(row, p, v);
        if (scale != 1.0f)
#pragma unroll
            for (int j = 0; j < 8; j++) v[j] = __fmul_rn(v[j], scale);
        float4 *o = (float4 *)(dst + p * 8);
        o[0] = make_float4(v[0], v[1], v[2], v[3]);
        o[1] = make_float4(v[4], v[5], v[6], v[7]);
    }
}

__global__ void k_embed_float(uint32_t type, const uint8_t *__restrict__ w, uint64_t row_bytes,
                              int64_t n_in, const int32_t *__restrict__ tokens, float scale,
                              float *__restrict__ x)
{
    cuda_pdl_enter();
    const int64_t t = blockIdx.x;
    const uint8_t *row = w + (uint64_t)tokens[t] * row_bytes;
    for (int64_t e = threadIdx.x; e < n_in; e += blockDim.x) {
        float v = decode1_float(type, row, e);
        x[t * n_in + e] = scale != 1.0f ? __fmul_rn(v, scale) : v;
    }
}

__global__ void k_get_rows(const float *__restrict__ x, int n, const int32_t *__restrict__ rows,
                           float *__restrict__ dst)
{
    cuda_pdl_enter();
    const float *src = x + (int64_t)rows[blockIdx.x] * n;
    float *d = dst + (int64_t)blockIdx.x * n;
    for (int i = threadIdx.x; i < n; i += blockDim.x) d[i] = src[i];
}

/* ---- dispatch ---- */

/* Calls F.template run<FMT>() for the weight type; KRS_ERR_UNSUPPORTED for others. */
template <class F> static int dispatch_type(uint32_t type, F &f)
{
    switch (type) {
    case QUANT_F32:
        return f.template run<QUANT_F32>();
    case QUANT_F16:
        return f.template run<QUANT_F16>();
    case QUANT_BF16:
        return f.template run<QUANT_BF16>();
    case QUANT_Q4_0:
        return f.template run<QUANT_Q4_0>();
    case QUANT_Q4_1:
        return f.template run<QUANT_Q4_1>();
    case QUANT_Q5_0:
        return f.template run<QUANT_Q5_0>();
    case QUANT_Q5_1:
        return f.template run<QUANT_Q5_1>();
    case QUANT_Q8_0:
        return f.template run<QUANT_Q8_0>();
    case CUDA_Q8_0_G:
        return f.template run<CUDA_Q8_0_G>();
    case QUANT_Q4_K:
        return f.template run<QUANT_Q4_K>();
    case QUANT_Q5_K:
        return f.template run<QUANT_Q5_K>();
    case QUANT_Q6_K:
        return f.template run<QUANT_Q6_K>();
    default:
        return KRS_ERR_UNSUPPORTED;
    }
}

struct type_probe {
    template <int FMT> int run()
    {
        return KRS_OK;
    }
};

int cuda_quant_supported(uint32_t type)
{
    type_probe p;
    return dispatch_type(type, p) == KRS_OK;
}

static int is_float_type(uint32_t type)
{
    return type == QUANT_F32 || type == QUANT_F16 || type == QUANT_BF16;
}

/* Pieces of 8 work for every quantized type and for float rows of a multiple of 8. */
static int pieces_ok(const struct backend_tensor *w)
{
    return !is_float_type(w->type) || w->n_in % 8 == 0;
}

static unsigned grid_for(int64_t items, int threads)
{
    int64_t g = (items + threads - 1) / threads;
    if (g > 65535ll * 16) g = 65535ll * 16;
    return (unsigned)(g > 0 ? g : 1);
}

struct mv_launch {
    struct backend_cuda *c;
    const struct backend_tensor *w;
    const float *x;
    int rows; /* <= CUDA_MV_MAX_ROWS */
    float *y;

    template <int FMT, int R, int NW> int go()
    {
        const int per_block = MV_WARPS * NW;
        unsigned grid = (unsigned)((w->n_out + per_block - 1) / per_block);
        cuda_launch(c, k_matvec<FMT, R, NW>, grid, MV_WARPS * 32, (const uint8_t *)w->dev,
                    w->row_bytes, w->n_out, w->n_in, x, rows, y);
        return CUDA_LAUNCHED("matvec");
    }
    template <int FMT> int run()
    {
        /* a long output (the vocabulary) at batch 1: 4 rows per warp share each activation
         * load; short ones keep a warp per row for more parallel warps */
        if (rows <= 1) return w->n_out >= c->mv_nw4_rows ? go<FMT, 1, 4>() : go<FMT, 1, 1>();
        if (rows <= 2) return go<FMT, 2, 1>();
        if (rows <= 4) return go<FMT, 4, 2>();
        return go<FMT, 8, 2>();
    }
};

int cuda_matmul_matvec(struct backend_cuda *c, const struct backend_tensor *w, const float *x,
                       int rows, float *y)
{
    if (!pieces_ok(w)) return KRS_ERR_UNSUPPORTED;
    for (int r0 = 0; r0 < rows; r0 += CUDA_MV_MAX_ROWS) {
        int nr = rows - r0 < CUDA_MV_MAX_ROWS ? rows - r0 : CUDA_MV_MAX_ROWS;
        mv_launch l = {c, w, x + (int64_t)r0 * w->n_in, nr, y + (int64_t)r0 * w->n_out};
        int rc = dispatch_type(w->type, l);
        if (rc) return rc;
    }
    return KRS_OK;
}

struct mv_res_launch {
    struct backend_cuda *c;
    const struct backend_tensor *w;
    const float *x;
    mv_res_params P;

    template <int FMT, int NW> int go()
    {
        const int per_block = (CUDA_NORM_THREADS / 32) * NW;
        unsigned grid = (unsigned)((w->n_out + per_block - 1) / per_block);
        cuda_launch(c, k_matvec_res<FMT, NW>, grid, CUDA_NORM_THREADS, (const uint8_t *)w->dev,
                    w->row_bytes, w->n_out, w->n_in, x, P);
        return CUDA_LAUNCHED("matvec_residual");
    }
    template <int FMT> int run()
    {
        /* the same rows per warp as mv_launch at one row: the same arithmetic per output */
        return w->n_out >= c->mv_nw4_rows ? go<FMT, 4>() : go<FMT, 1>();
    }
};

int cuda_matvec_residual(struct backend_cuda *c, const struct backend_tensor *w, const float *x,
                         float *tm, const float *wp, float eps_p, float *xr, const float *wn,
                         float eps_n, float *xn)
{
    if (w->n_out > CUDA_NORM_REG_MAX || !pieces_ok(w) || !cuda_quant_supported(w->type))
        return KRS_ERR_INVALID; /* cuda_fuse.cu matches only what fits */
    mv_res_launch l;
    memset(&l, 0, sizeof l);
    l.c = c;
    l.w = w;
    l.x = x;
    l.P.tm = tm;
    l.P.wp = wp;
    l.P.eps_p = eps_p;
    l.P.x = xr;
    l.P.wn = wn;
    l.P.eps_n = eps_n;
    l.P.xn = xn;
    l.P.done = c->res_done;
    return dispatch_type(w->type, l);
}

struct mv_multi_launch {
    struct backend_cuda *c;
    mv_multi_params P;
    int glu;
    unsigned grid;

    template <int R, int NW> int go()
    {
        const int per_block = MV_WARPS * NW;
        unsigned blocks = 0;
        for (int i = 0; i < P.n_seg; i++) {
            P.s[i].block0 = blocks;
            blocks += (unsigned)((P.s[i].n_out + per_block - 1) / per_block);
        }
        grid = blocks;
        if (glu < 0) {
            cuda_launch(c, k_matvec_multi<R, NW>, grid, MV_WARPS * 32, P);
            return CUDA_LAUNCHED("matvec_multi");
        }
        grid = P.s[1].block0; /* the blocks of the gate rows cover both */
        glu_fmt<R, NW> f = {this};
        return dispatch_type(P.s[0].type, f);
    }
    template <int R, int NW> struct glu_fmt {
        mv_multi_launch *l;
        template <int FMT> int run()
        {
            cuda_launch(l->c, k_matvec_glu<FMT, R, NW>, l->grid, MV_WARPS * 32, l->P, l->glu);
            return CUDA_LAUNCHED("matvec_glu");
        }
    };
};

int cuda_matvec_multi(struct backend_cuda *c, int nw, const struct backend_tensor *const *w,
                      const float *x, int rows, float *const *y, int glu)
{
    if (nw < 1 || nw > MV_MULTI || rows < 1 || rows > CUDA_MV_MAX_ROWS ||
        (glu >= 0 && (nw != 2 || w[0]->type != w[1]->type || w[0]->n_out != w[1]->n_out)))
        return KRS_ERR_INVALID; /* cuda_fuse.cu matches only what fits */
    mv_multi_launch l;
    memset(&l, 0, sizeof l);
    l.c = c;
    l.glu = glu;
    l.P.n_seg = nw;
    l.P.n_in = w[0]->n_in;
    l.P.x = x;
    l.P.rows = rows;
    for (int i = 0; i < nw; i++) {
        if (!pieces_ok(w[i]) || !cuda_quant_supported(w[i]->type) || w[i]->n_in != w[0]->n_in)
            return KRS_ERR_INVALID;
        l.P.s[i].w = (const uint8_t *)w[i]->dev;
        l.P.s[i].row_bytes = w[i]->row_bytes;
        l.P.s[i].n_out = w[i]->n_out;
        l.P.s[i].type = w[i]->type;
        l.P.s[i].y = y[i];
    }
    int64_t min_out = w[0]->n_out;
    for (int i = 1; i < nw; i++) min_out = w[i]->n_out < min_out ? w[i]->n_out : min_out;
    if (rows <= 1) return min_out >= c->mv_nw4_rows ? l.go<1, 4>() : l.go<1, 1>();
    if (rows <= 2) return l.go<2, 1>();
    if (rows <= 4) return l.go<4, 2>();
    return l.go<8, 2>();
}

struct dq_launch {
    struct backend_cuda *c;
    const uint8_t *w;
    uint64_t row_bytes;
    int64_t n_in, nr;
    float scale;
    float *dst;

    template <int FMT> int run()
    {
        cuda_launch(c, k_dequant<FMT, float>, grid_for(nr * (n_in / 8), 256), 256, w, row_bytes,
                    n_in, nr, scale, dst, (int *)NULL);
        return CUDA_LAUNCHED("dequant");
    }
};

/* Activations to F16 (H = __half) or BF16 for a GEMM on F16/BF16 weights, one block per row.
 * F16 rows whose largest magnitude exceeds 2^14 are scaled down by a power of two (exact) so
 * that products stay in range; inv[row] takes 1 / scale for k_unscale_rows. */
template <typename H>
__global__ void __launch_bounds__(CUDA_NORM_THREADS)
    k_rows_to_half(const float *__restrict__ x, int64_t n_in, H *__restrict__ xh,
                   float *__restrict__ inv)
{
    cuda_pdl_enter();
    __shared__ float part[CUDA_NORM_THREADS / 32];
    const float *xr = x + (int64_t)blockIdx.x * n_in;
    H *hr = xh + (int64_t)blockIdx.x * n_in;
    float s = 1.0f;
    if constexpr (sizeof(H) == 2 && std::is_same<H, __half>::value) {
        float m = 0.0f;
        for (int64_t i = threadIdx.x; i < n_in; i += blockDim.x) m = fmaxf(m, fabsf(xr[i]));
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xFFFFFFFFu, m, o));
        if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = m;
        __syncthreads();
        m = 0.0f;
        for (int j = 0; j < (int)(blockDim.x >> 5); j++) m = fmaxf(m, part[j]);
        if (m > 16384.0f) s = exp2f(-ceilf(log2f(m / 16384.0f)));
        if (threadIdx.x == 0) inv[blockIdx.x] = 1.0f / s;
    }
    for (int64_t i = threadIdx.x; i < n_in; i += blockDim.x) {
        if constexpr (std::is_same<H, __half>::value)
            hr[i] = __float2half_rn(xr[i] * s);
        else
            hr[i] = __float2bfloat16_rn(xr[i]);
    }
}

__global__ void k_unscale_rows(float *y, int64_t n_out, int64_t total, const float *inv)
{
    cuda_pdl_enter();
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (int64_t)gridDim.x * blockDim.x)
        y[i] *= inv[i / n_out];
}

static int defer_find(const struct backend_cuda *c, const float *y)
{
    for (int i = 0; i < c->defer.n; i++)
        if (c->defer.y[i] == y) return i;
    return -1;
}

static void defer_drop(struct backend_cuda *c, int i)
{
    struct cuda_defer *d = &c->defer;
    d->n--;
    d->y[i] = d->y[d->n];
    d->total[i] = d->total[d->n];
    d->width[i] = d->width[d->n];
}

const float *cuda_defer_take(struct backend_cuda *c, const float *y, int64_t *width)
{
    const int i = y ? defer_find(c, y) : -1;
    if (i < 0) return NULL;
    if (width) *width = c->defer.width[i];
    defer_drop(c, i);
    return c->x_inv_scale;
}

int cuda_defer_flush(struct backend_cuda *c)
{
    struct cuda_defer *d = &c->defer;
    for (int i = 0; i < d->n; i++) {
        cuda_launch(c, k_unscale_rows, grid_for(d->total[i], 256), 256, d->y[i], d->width[i],
                    d->total[i], (const float *)c->x_inv_scale);
        int rc = CUDA_LAUNCHED("unscale rows");
        if (rc) {
            d->n = 0;
            return rc;
        }
    }
    d->n = 0;
    return KRS_OK;
}

int cuda_defer_flush_if(struct backend_cuda *c, const float *y)
{
    return y && defer_find(c, y) >= 0 ? cuda_defer_flush(c) : KRS_OK;
}

int cuda_gemm_half(const struct backend_cuda *c, const struct backend_tensor *w)
{
    return c->gemm_tf32 && c->x_half &&
           (w->type == QUANT_F16 || w->type == QUANT_BF16 || w->half != NULL);
}

int cuda_matvec_rows(const struct backend_cuda *c, const struct backend_tensor *w)
{
    /* Quantized weights stay on the matvec kernels up to mv_max_rows even with an F16 copy:
     * there they read 4-8 bits per weight instead of 16. */
    const int own_half = w->type == QUANT_F16 || w->type == QUANT_BF16;
    return own_half && cuda_gemm_half(c, w) && c->mv_half_rows < c->mv_max_rows ? c->mv_half_rows
                                                                                : c->mv_max_rows;
}

struct half_copy_launch {
    struct backend_cuda *c;
    const struct backend_tensor *w;
    __half *dst;

    template <int FMT> int run()
    {
        cuda_launch(c, k_dequant<FMT, __half>, grid_for(w->n_out * (w->n_in / 8), 256), 256,
                    (const uint8_t *)w->dev, w->row_bytes, w->n_in, w->n_out, 1.0f, dst,
                    c->d_overflow);
        return CUDA_LAUNCHED("dequant to F16");
    }
};

int cuda_make_half_copy(struct backend_cuda *c, struct backend_tensor *w)
{
    /* BF16 weights too: F16 holds their values exactly (wider mantissa) wherever they fit its
     * range, and F16 activations carry 10 mantissa bits where BF16 ones carry 7 (a BF16 GEMM
     * put the tiny models' logits 3e-5 NMSE from their reference; F16 weights 5e-7). */
    if (!c->half_copy || !c->gemm_tf32 || !c->x_half || w->half || w->type == QUANT_F32 ||
        w->type == QUANT_F16 || !pieces_ok(w) || w->n_in > c->max_n_in || w->n_out < 2)
        return KRS_OK;
    const size_t bytes = (size_t)w->n_out * (size_t)w->n_in * 2;
    size_t free_b = 0, total_b = 0;
    int rc = CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b), "cudaMemGetInfo");
    if (rc) return rc;
    if (free_b < bytes || free_b - bytes < total_b / 2) return KRS_OK; /* memory goes to KV */
    void *dst = NULL;
    int overflow = 0;
    if ((rc = CUDA_CHECK(cudaMalloc(&dst, bytes), "F16 weight copy")) ||
        (rc = CUDA_CHECK(cudaMemsetAsync(c->d_overflow, 0, sizeof(int), c->stream), "flag")))
        goto out;
    {
        half_copy_launch l = {c, w, (__half *)dst};
        if ((rc = dispatch_type(w->type, l))) goto out;
    }
    if ((rc = CUDA_CHECK(cudaMemcpyAsync(&overflow, c->d_overflow, sizeof(int),
                                         cudaMemcpyDeviceToHost, c->stream),
                         "flag")) ||
        (rc = CUDA_CHECK(cudaStreamSynchronize(c->stream), "F16 weight copy")))
        goto out;
    if (!overflow) {
        w->half = dst; /* owned by w from here */
        dst = NULL;
        c->weights_bytes += bytes;
    }
out:
    cudaFree(dst);
    return rc;
}

/* y = x * W^T for F16/BF16 W (its own elements or its F16 copy) on tensor cores: activations
 * converted, F32 accumulation. */
static int gemm_half(struct backend_cuda *c, const struct backend_tensor *w, const float *x,
                     int rows, float *y)
{
    const float one = 1.0f, zero = 0.0f;
    const int f16 = w->type == QUANT_F16 || w->half;
    const void *wdev = w->half ? w->half : w->dev;
    const uint32_t htype = f16 ? QUANT_F16 : QUANT_BF16;
    const cudaDataType_t dt = f16 ? CUDA_R_16F : CUDA_R_16BF;
    const int converted = c->x_half_op && c->x_half_src == x && c->x_half_rows == rows &&
                          c->x_half_n_in == w->n_in && c->x_half_type == htype;
    int rc = KRS_OK;
    if (!converted) {
        /* (the conversion rewrites x_inv_scale, which pending outputs still need) */
        if ((rc = cuda_defer_flush(c))) return rc;
        if (f16)
            cuda_launch(c, k_rows_to_half<__half>, rows, CUDA_NORM_THREADS, x, w->n_in,
                        (__half *)c->x_half, c->x_inv_scale);
        else
            cuda_launch(c, k_rows_to_half<__nv_bfloat16>, rows, CUDA_NORM_THREADS, x, w->n_in,
                        (__nv_bfloat16 *)c->x_half, c->x_inv_scale);
        rc = CUDA_LAUNCHED("rows to half");
        if (rc) return rc;
    }
    c->x_half_src = c->x_half_op ? x : NULL;
    c->x_half_rows = rows;
    c->x_half_n_in = w->n_in;
    c->x_half_type = htype;
    rc = cuda_cublas_status(cublasGemmEx(c->cublas, CUBLAS_OP_T, CUBLAS_OP_N, (int)w->n_out, rows,
                                         (int)w->n_in, &one, wdev, dt, (int)w->n_in, c->x_half, dt,
                                         (int)w->n_in, &zero, y, CUDA_R_32F, (int)w->n_out,
                                         CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                            "cublasGemmEx", __FILE__, __LINE__);
    if (rc || !f16) return rc;
    const int64_t total = (int64_t)rows * w->n_out;
    if (c->defer_ok) {
        /* y's next reader applies the row scales (struct cuda_defer): one launch less */
        struct cuda_defer *d = &c->defer;
        if (defer_find(c, y) >= 0 || d->n == CUDA_DEFER_MAX) rc = cuda_defer_flush(c);
        if (rc) return rc;
        d->y[d->n] = y;
        d->total[d->n] = total;
        d->width[d->n] = w->n_out;
        d->n++;
        return KRS_OK;
    }
    cuda_launch(c, k_unscale_rows, grid_for(total, 256), 256, y, w->n_out, total, c->x_inv_scale);
    return CUDA_LAUNCHED("unscale rows");
}

int cuda_matmul_gemm(struct backend_cuda *c, const struct backend_tensor *w, const float *x,
                     int rows, float *y)
{
    if (cuda_gemm_half(c, w) && rows <= c->max_tokens && w->n_in <= c->max_n_in)
        return gemm_half(c, w, x, rows, y);
    const float one = 1.0f, zero = 0.0f;
    /* F32 weights keep F32 products (a model stored in F32 is held to ~1e-4 of its reference;
     * TF32 alone gives ~1e-3); every other format carries far larger rounding of its own. */
    const cublasComputeType_t ct =
        c->gemm_tf32 && w->type != QUANT_F32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
    const int64_t n_in = w->n_in;
    int64_t chunk = w->type == QUANT_F32 ? w->n_out : c->dq_scratch_floats / n_in;
    if (chunk <= 0) return KRS_ERR_INTERNAL; /* weight_upload sizes the scratch */
    if (chunk > w->n_out) chunk = w->n_out;
    for (int64_t r0 = 0; r0 < w->n_out; r0 += chunk) {
        int64_t nr = w->n_out - r0 < chunk ? w->n_out - r0 : chunk;
        const uint8_t *src = (const uint8_t *)w->dev + (uint64_t)r0 * w->row_bytes;
        const float *a = (const float *)src;
        int rc;
        if (w->type != QUANT_F32) {
            if (pieces_ok(w)) {
                dq_launch l = {c, src, w->row_bytes, n_in, nr, 1.0f, c->dq_scratch};
                rc = dispatch_type(w->type, l);
            } else {
                cuda_launch(c, k_dequant_float, grid_for(nr * n_in, 256), 256, w->type, src,
                            w->row_bytes, n_in, nr, 1.0f, c->dq_scratch);
                rc = CUDA_LAUNCHED("dequant");
            }
            if (rc) return rc;
            a = c->dq_scratch;
        }
        /* column-major view: Y^T[n_out, rows] = W[n_out, n_in] * X^T[n_in, rows] */
        rc = cuda_cublas_status(cublasGemmEx(c->cublas, CUBLAS_OP_T, CUBLAS_OP_N, (int)nr, rows,
                                             (int)n_in, &one, a, CUDA_R_32F, (int)n_in, x,
                                             CUDA_R_32F, (int)n_in, &zero, y + r0, CUDA_R_32F,
                                             (int)w->n_out, ct, CUBLAS_GEMM_DEFAULT),
                                "cublasGemmEx", __FILE__, __LINE__);
        if (rc) return rc;
    }
    return KRS_OK;
}

int cuda_matmul(struct backend_cuda *c, const struct backend_tensor *w, const float *x, int rows,
                float *y)
{
    if (rows <= cuda_matvec_rows(c, w) && pieces_ok(w)) return cuda_matmul_matvec(c, w, x, rows, y);
    return cuda_matmul_gemm(c, w, x, rows, y);
}

struct embed_launch {
    struct backend_cuda *c;
    const struct backend_tensor *w;
    const int32_t *tokens;
    int T;
    float scale;
    float *x;

    template <int FMT> int run()
    {
        cuda_launch(c, k_embed<FMT>, T, 128, (const uint8_t *)w->dev, w->row_bytes, w->n_in, tokens,
                    scale, x);
        return CUDA_LAUNCHED("embed");
    }
};

int cuda_embed(struct backend_cuda *c, const struct backend_tensor *emb, const int32_t *tokens,
               int T, float scale, float *x)
{
    if (T <= 0) return KRS_OK;
    if (!pieces_ok(emb)) {
        cuda_launch(c, k_embed_float, T, 128, emb->type, (const uint8_t *)emb->dev, emb->row_bytes,
                    emb->n_in, tokens, scale, x);
        return CUDA_LAUNCHED("embed");
    }
    embed_launch l = {c, emb, tokens, T, scale, x};
    return dispatch_type(emb->type, l);
}

int cuda_get_rows(struct backend_cuda *c, const float *x, int n, const int32_t *rows, int n_rows,
                  float *dst)
{
    if (n_rows <= 0) return KRS_OK;
    cuda_launch(c, k_get_rows, n_rows, 256, x, n, rows, dst);
    return CUDA_LAUNCHED("get_rows");
}
