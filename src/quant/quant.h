/* Quantized weight formats and the linear-layer kernel.
 *
 * Formats are ggml's block formats as stored in GGUF (ids below are ggml type ids). Each row of
 * a weight matrix is ne[0] elements = ne[0]/block_elems consecutive blocks.
 *
 * quant_matmul computes Y[T, n_out] = X[T, n_in] * W^T for a weight W[n_out, n_in] in any
 * supported format: every weight block is read once and applied to all T rows (this is what
 * makes batching pay on a CPU). The work is split over the output rows between the threads of a
 * persistent pool. A scalar reference path and SIMD paths (AVX2/FMA/F16C, AVX-512) are chosen at
 * run time from cpuid. Activations may be quantized to 8 bits per block on the SIMD paths; the
 * tolerance against the float reference is documented in quant.c and tested.
 *
 * No allocation per call: a quant_ctx reserves scratch for the largest (T, n_in) at creation. */
#ifndef KRS_QUANT_H
#define KRS_QUANT_H

#include <stddef.h>
#include <stdint.h>

struct pool;

enum quant_type {
    QUANT_F32 = 0,
    QUANT_F16 = 1,
    QUANT_Q4_0 = 2,
    QUANT_Q4_1 = 3,
    QUANT_Q5_0 = 6,
    QUANT_Q5_1 = 7,
    QUANT_Q8_0 = 8,
    QUANT_Q8_1 = 9,
    QUANT_Q2_K = 10,
    QUANT_Q3_K = 11,
    QUANT_Q4_K = 12,
    QUANT_Q5_K = 13,
    QUANT_Q6_K = 14,
    QUANT_Q8_K = 15,
    QUANT_BF16 = 30,
};

/* 1 when `type` is a ggml type id this module can dequantize and multiply, else 0. */
int quant_type_supported(uint32_t type);
/* "Q4_K", "F32", ...; "unknown" for others. Never NULL. */
const char *quant_type_name(uint32_t type);
/* Elements and bytes per block; 0 for unknown types. */
uint32_t quant_block_elems(uint32_t type);
uint32_t quant_block_bytes(uint32_t type);
/* Bytes of a row of n elements (n a multiple of the block size), 0 if not. */
uint64_t quant_row_bytes(uint32_t type, int64_t n);

/* Dequantizes n elements (a multiple of the block size) starting at src into dst.
 * Bit-exact with ggml's reference dequantizers. Returns KRS_OK or KRS_ERR_INVALID. */
int quant_dequantize(uint32_t type, const void *src, float *dst, int64_t n);

/* IEEE half and bfloat16 conversion (full subnormal / inf / NaN handling). */
float quant_fp16_to_f32(uint16_t h);
uint16_t quant_f32_to_fp16(float f);
float quant_bf16_to_f32(uint16_t h);

/* A weight matrix view: W[n_out, n_in], rows of row_bytes bytes at data (not owned). */
struct quant_matrix {
    uint32_t type;
    int64_t n_in;
    int64_t n_out;
    const void *data;
    uint64_t row_bytes;
};

enum quant_isa {
    QUANT_ISA_AUTO = 0, /* best the CPU supports */
    QUANT_ISA_SCALAR = 1,
    QUANT_ISA_AVX2 = 2,
    QUANT_ISA_AVX512 = 3,
};

struct quant_ctx;

/* Creates a context for products with up to max_rows rows of up to max_n_in inputs, run on
 * `pool` (borrowed; must outlive the context; NULL = single-threaded). isa selects the kernel
 * path: KRS_ERR_UNSUPPORTED when the CPU lacks it. The caller owns *out (quant_ctx_free). */
int quant_ctx_create(struct pool *pool, int max_rows, int64_t max_n_in, enum quant_isa isa,
                     struct quant_ctx **out);
void quant_ctx_free(struct quant_ctx *ctx);
/* Name of the path in use: "scalar", "avx2", "avx512". */
const char *quant_ctx_isa_name(const struct quant_ctx *ctx);

/* Y[T, n_out] = X[T, n_in] * W^T. x and y are contiguous row-major, T <= max_rows,
 * w->n_in <= max_n_in. Returns KRS_OK, or KRS_ERR_INVALID for bad shapes / unsupported type. */
int quant_matmul(struct quant_ctx *ctx, const struct quant_matrix *w, const float *x, int T,
                 float *y);

#endif
