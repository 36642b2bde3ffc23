/* Private interface between quant.c (formats, dispatch, scalar path) and the SIMD kernel files
 * (quant_avx2.c, quant_avx512.c, both instantiated from quant_simd.h).
 *
 * Quantized activations (SIMD paths): each row t of X is cut into 32-element blocks; block b
 * holds int8 values qs in [-127, 127] with scale d = amax/127 (x ~= d * q), and d times the sums
 * of its two 16-element halves (for the offset/min terms of Q4_0/Q4_1/Q5_x/K-quants). The int8
 * blocks of rows 8k..8k+7 are interleaved block by block ([T/8][nb][8][32]: the rows a kernel
 * group reads together are adjacent); the half sums are [T][2 * nb]; d and d times the sum of
 * each whole block (computed once per matmul, not once per weight row) are [T][nbp], each row
 * zero-padded to a multiple of 8 blocks so that the kernels read 8-block groups with plain
 * loads. */
#ifndef KRS_QUANT_IMPL_H
#define KRS_QUANT_IMPL_H

#include "quant/quant.h"

#include <stdint.h>

#define QK     32  /* elements of a small block and of an activation block */
#define QK_K   256 /* elements of a K-quant super-block */
#define QROWS  16  /* output rows per work chunk (threads split n_out in these) */
#define QK_PAD 16  /* floats of padding after the activation scale arrays */

struct quant_act {
    int8_t *qs;     /* [T rounded up to 8 / 8][nb][8][32] (see above) */
    float *d;       /* [T][nbp] (zero past nb) */
    float *ds16;    /* [T][2 * nb] d * (sum of the int8 values) of each 16-element half */
    float *ds32;    /* [T][nbp] the two half sums of each block added (zero past nb) */
    int64_t stride; /* elements per row (>= n_in, multiple of 32): nb = stride / 32 */
    int64_t nb;     /* 32-blocks per row */
    int64_t nbp;    /* nb rounded up to a multiple of 8 */
};

/* Floats of per-thread scratch for inputs of up to n_in elements: a dequantized row (Q2_K/Q3_K)
 * or QROWS unpacked rows of a 32-element block format (quant_simd.h, qs_rows32: 32 bytes of
 * quants and two float scales per block, d_w * d_x of one row for 8 activation rows, scale
 * arrays padded to 8 blocks). */
static inline int64_t quant_scratch_floats(int64_t n_in)
{
    int64_t nb = (n_in + QK - 1) / QK, nbp = (nb + 7) & ~(int64_t)7;
    int64_t unpacked = QROWS * nb * 8 + 2 * QROWS * nbp + 8 * nbp;
    int64_t n = n_in > unpacked ? n_in : unpacked;
    return (n + 15) & ~(int64_t)15;
}

/* Computes rows [r0, r1) of Y for all T rows: y[t * ldy + r]. x is the float input [T][n_in],
 * act its quantized copy (valid when quant_simd_needs_act(type)). scratch holds
 * quant_scratch_floats(n_in) floats, 64-byte aligned (per thread). */
typedef void (*quant_rows_fn)(const struct quant_matrix *w, int64_t r0, int64_t r1, const float *x,
                              const struct quant_act *act, int T, float *y, int64_t ldy,
                              float *scratch);
/* Quantizes rows [t0, t1) of x [T][n_in] into act (n_in a multiple of 32). */
typedef void (*quant_act_fn)(const float *x, int64_t n_in, int t0, int t1, struct quant_act *act);

/* 1 when the SIMD paths quantize activations for this weight type. */
int quant_simd_needs_act(uint32_t type);

void quant_rows_avx2(const struct quant_matrix *w, int64_t r0, int64_t r1, const float *x,
                     const struct quant_act *act, int T, float *y, int64_t ldy, float *scratch);
void quant_act_avx2(const float *x, int64_t n_in, int t0, int t1, struct quant_act *act);
void quant_rows_avx512(const struct quant_matrix *w, int64_t r0, int64_t r1, const float *x,
                       const struct quant_act *act, int T, float *y, int64_t ldy, float *scratch);
void quant_act_avx512(const float *x, int64_t n_in, int t0, int t1, struct quant_act *act);

/* Unpacks the 6-bit scales and mins of a Q4_K/Q5_K super-block (get_scale_min_k4). */
static inline void quant_k4_scales(const uint8_t *s, uint8_t sc[8], uint8_t mn[8])
{
    for (int j = 0; j < 4; j++) {
        sc[j] = s[j] & 63;
        mn[j] = s[j + 4] & 63;
        sc[j + 4] = (uint8_t)((s[j + 8] & 0x0F) | ((s[j] >> 6) << 4));
        mn[j + 4] = (uint8_t)((s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4));
    }
}

#endif
