/* SIMD kernel template, included once by quant_avx2.c and once by quant_avx512.c; each
 * includer defines QS_FN(name) (suffixes the entry points) and qs_dot(u, s), the 8-lane int32
 * dot product of 32 unsigned bytes u with 32 signed bytes s (lane i sums bytes 4i..4i+3):
 * AVX2 uses maddubs+madd, AVX-512 VNNI uses vpdpbusd. Not a public header.
 *
 * Shape of the work (see quant_impl.h for the quantized activation layout):
 *   for each chunk of QROWS output rows      (weights of the chunk stay in L1/L2)
 *     for each group of up to 8 activation rows (4 for Q4_K/Q5_K, and for Q6_K and floats on
 *     AVX2: see QS_G32 / QS_GK / QS_GW below)
 *       for each row r of the chunk: one pass over row r's blocks; every weight block is
 *         unpacked once into registers and dotted with the G activation blocks.
 * Integer dot products per 32-element block are scaled by d_w*d_x in float; offsets and mins
 * use the activation block sums. F32/F16/BF16 rows use float FMA against the float input;
 * Q2_K/Q3_K rows are dequantized into scratch and take the F32 route. */
#include "quant/quant_impl.h"

#include <immintrin.h>
#include <string.h>

#define QS_INLINE static inline __attribute__((always_inline))

QS_INLINE float qs_hsum(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

QS_INLINE int qs_hsum_i32(__m256i v)
{
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    return _mm_cvtsi128_si32(s);
}

QS_INLINE float qs_fp16(const uint8_t *p)
{
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

/* 16 packed bytes -> 32 nibbles: low nibbles are elements 0..15, high nibbles 16..31. */
QS_INLINE __m256i qs_nibbles16(const uint8_t *p)
{
    __m128i v = _mm_loadu_si128((const __m128i *)p);
    __m128i m = _mm_set1_epi8(0x0F);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), m), _mm_and_si128(v, m));
}

/* Block blk of activation row t: rows are interleaved in groups of 8 (quant_impl.h), so the 8
 * rows of a group sit side by side per block. ACT_QG: row t0 + g where the group of G rows
 * starting at t0 stays inside one group of 8 (t0 a multiple of G, G dividing 8): constant
 * offsets g * 32 from one pointer per block. */
#define ACT_IDX(a, t, blk)    (((((int64_t)(t) >> 3) * (a)->nb + (blk)) * 8 + ((t)&7)) * QK)
#define ACT_QG(a, t0, g, blk) ((const __m256i *)((a)->qs + ACT_IDX(a, t0, blk) + (g)*QK))
#define ACT_D(a, t, blk)      ((a)->d[(int64_t)(t) * (a)->nbp + (blk)])
#define ACT_D32(a, t, blk)    ((a)->ds32 + (int64_t)(t) * (a)->nbp + (blk))
#define ACT_S(a, t, blk)      ((a)->ds16 + ((int64_t)(t) * (a)->nb + (blk)) * 2)

/* ---- 32-element block types: one weight row (nb blocks) x G activation rows ----
 *
 * Blocks are taken in groups of 8 (the last group may be shorter: lanes >= k are zero). Per
 * group, the 8 weight scales form one vector; per activation row g the 8 products
 * d_w * d_x are one vector multiply (stored, then broadcast per block from memory) and the
 * offset / min term is one vector FMA against the 8 block sums. Per block and row only the
 * integer dot, its conversion and one FMA remain. Even/odd blocks of a group use separate
 * accumulators. The sequence for one (weight row, activation row) pair depends on nb only,
 * never on G, T or the tile (batch invariance). */

QS_INLINE __m256i qs_iota8(void)
{
    return _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
}

/* The fp16 at p + j * stride for j < k (0 for j >= k) as 8 floats. Built in a register: eight
 * scalar stores read back as one vector would stall on store forwarding. */
QS_INLINE __m256 qs_fp16x8(const uint8_t *p, const int stride, const int k)
{
    uint16_t h[8];
#pragma GCC unroll 8
    for (int j = 0; j < 8; j++) {
        h[j] = 0;
        if (j < k) memcpy(&h[j], p + j * stride, 2);
    }
    __m128i v = _mm_cvtsi32_si128(h[0]);
    v = _mm_insert_epi16(v, h[1], 1);
    v = _mm_insert_epi16(v, h[2], 2);
    v = _mm_insert_epi16(v, h[3], 3);
    v = _mm_insert_epi16(v, h[4], 4);
    v = _mm_insert_epi16(v, h[5], 5);
    v = _mm_insert_epi16(v, h[6], 6);
    v = _mm_insert_epi16(v, h[7], 7);
    return _mm256_cvtph_ps(v);
}

/* Unpacked (unsigned) quants of one Q4_0/Q4_1/Q5_0/Q5_1 block (kind 0..3). */
QS_INLINE __m256i qs_unpack_q45(const uint8_t *blk, const int kind)
{
    const int has_m = kind & 1, has_h = kind >= 2;
    __m256i u = qs_nibbles16(blk + 2 + 2 * has_m + 4 * has_h);
    if (has_h) {
        uint32_t qh;
        memcpy(&qh, blk + 2 + 2 * has_m, 4);
        u = _mm256_or_si256(u, qs_bit5(qh));
    }
    return u;
}

/* kind 0..3 = Q4_0, Q4_1, Q5_0, Q5_1; kind 4 = Q8_0 (u = |w|, the sign moves to x). One
 * accumulator per activation row: G independent FMA chains hide the FMA latency, and the
 * registers go to more rows (the weight block is unpacked once per G rows). u is the block's
 * unpacked quants (Q4/Q5: unsigned values; Q8_0: the signed bytes); S + g * ss is the block's
 * d_w * d_x for activation row t0 + g. t0 is a multiple of 8 (groups of QS_G32 rows). */
QS_INLINE void qs_blk32(__m256i u, int64_t b, const struct quant_act *a, int t0, const int G,
                        const int kind, const float *S, int64_t ss, __m256 *acc)
{
    if (kind == 4) {
        const __m256i w = u;
        u = _mm256_sign_epi8(w, w); /* |w| as unsigned (|-128| = 128 fits) */
#pragma GCC unroll 8
        for (int g = 0; g < G; g++) {
            __m256i s = _mm256_sign_epi8(_mm256_loadu_si256(ACT_QG(a, t0, g, b)), w);
            acc[g] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(qs_dot(u, s)),
                                     _mm256_broadcast_ss(S + g * ss), acc[g]);
        }
    } else {
#pragma GCC unroll 8
        for (int g = 0; g < G; g++) {
            __m256i p = qs_dot(u, _mm256_loadu_si256(ACT_QG(a, t0, g, b)));
            acc[g] =
                _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_broadcast_ss(S + g * ss), acc[g]);
        }
    }
}

QS_INLINE int qs_bytes32(const int kind)
{
    return kind == 0 ? 18 : kind == 1 ? 20 : kind == 2 ? 22 : kind == 3 ? 24 : 34;
}

QS_INLINE __m256i qs_unpack32(const uint8_t *blk, const int kind)
{
    return kind == 4 ? _mm256_loadu_si256((const __m256i *)(blk + 2)) : qs_unpack_q45(blk, kind);
}

/* Unpacks one weight row for qs_rows32: the quants of each block (qs_unpack32), its scale d and
 * min m as floats (the scale arrays zero-padded to a multiple of 8 blocks): exactly the values
 * the row path computes on the fly. */
QS_INLINE void qs_unpack_row32(const uint8_t *row, int64_t nb, const int kind, __m256i *u, float *d,
                               float *m)
{
    const int bytes = qs_bytes32(kind), has_m = kind == 1 || kind == 3;
    for (int64_t b = 0; b < nb; b++) _mm256_store_si256(u + b, qs_unpack32(row + b * bytes, kind));
    for (int64_t b0 = 0; b0 < nb; b0 += 8) {
        const int k = nb - b0 < 8 ? (int)(nb - b0) : 8;
        _mm256_storeu_ps(d + b0, qs_fp16x8(row + b0 * bytes, bytes, k));
        if (has_m) _mm256_storeu_ps(m + b0, qs_fp16x8(row + b0 * bytes + 2, bytes, k));
    }
}

/* Per 8-block group of one (weight row, activation row) pair: S = d_w * d_x of the 8 blocks
 * and the offset / min term's update corr += c_w * (d_x * block sums). Lanes past the row's
 * last block are zero in dwv / cwv and in the padded activation arrays. */
QS_INLINE __m256 qs_scales32(__m256 dwv, __m256 cwv, const struct quant_act *a, int t, int64_t b0,
                             const int has_corr, float *S, __m256 corr)
{
    _mm256_storeu_ps(S, _mm256_mul_ps(dwv, _mm256_loadu_ps(&ACT_D(a, t, b0))));
    if (!has_corr) return corr;
    return _mm256_fmadd_ps(cwv, _mm256_loadu_ps(ACT_D32(a, t, b0)), corr);
}

/* value = d*q + m (Q4_1/Q5_1) or d*(q - 8|16) (Q4_0/Q5_0) or d*q (Q8_0): the factor of the
 * correction sum. */
QS_INLINE float qs_off32(const int kind)
{
    return kind == 0 ? -8.0f : kind == 2 ? -16.0f : 1.0f;
}

/* One weight row (raw GGUF bytes) times G activation rows; scales and corrections per 8-block
 * group on the fly. The path of calls with at most 8 activation rows. */
QS_INLINE void qs_row32(const uint8_t *row, int64_t nb, const struct quant_act *a, int t0,
                        const int G, const int kind, float *out)
{
    const int has_m = kind == 1 || kind == 3, has_corr = kind != 4;
    const int bytes = qs_bytes32(kind);
    __m256 acc[QS_G];
    /* offset / min terms: updated once per 8 blocks, kept in memory (registers go to acc) */
    __m256 corr[QS_G];
#pragma GCC unroll 8
    for (int g = 0; g < G; g++) acc[g] = corr[g] = _mm256_setzero_ps();
    for (int64_t b0 = 0; b0 < nb; b0 += 8) {
        const int k = nb - b0 < 8 ? (int)(nb - b0) : 8;
        const uint8_t *gr = row + b0 * bytes;
        const __m256 dwv = qs_fp16x8(gr, bytes, k);
        const __m256 cwv = has_m ? qs_fp16x8(gr + 2, bytes, k) : dwv;
        float S[QS_G][8];
#pragma GCC unroll 8
        for (int g = 0; g < G; g++)
            corr[g] = qs_scales32(dwv, cwv, a, t0 + g, b0, has_corr, S[g], corr[g]);
        for (int j = 0; j < k; j++)
            qs_blk32(qs_unpack32(gr + j * bytes, kind), b0 + j, a, t0, G, kind, &S[0][j], 8, acc);
    }
#pragma GCC unroll 8
    for (int g = 0; g < G; g++) {
        float v = qs_hsum(acc[g]);
        out[g] = has_corr ? v + qs_off32(kind) * qs_hsum(corr[g]) : v;
    }
}

/* ---- K-quants (256-element super-blocks = 8 activation blocks) ---- */

/* five = 0: Q4_K, 1: Q5_K. Per super-block the 8 sub-block scales are turned into floats
 * once (vector), multiplied by the 8 activation scales per row, and the min terms
 * sum_j dmin*mn_j * (d_x*sum_x)_j are one 8-lane multiply-add per activation row. */
QS_INLINE void qs_row_q45k(const uint8_t *row, int64_t nsb, const struct quant_act *a, int t0,
                           const int G, const int five, float *out)
{
    const int bytes = five ? 176 : 144;
    const __m256i m4 = _mm256_set1_epi8(0x0F), b5 = _mm256_set1_epi8(0x10);
    __m256 acc[2][QS_G], corr[QS_G];
#pragma GCC unroll 4
    for (int g = 0; g < G; g++) acc[0][g] = acc[1][g] = corr[g] = _mm256_setzero_ps();
    for (int64_t sb = 0; sb < nsb; sb++) {
        const uint8_t *blk = row + sb * bytes;
        /* the 6-bit scales and mins of quant_k4_scales, four bytes at a time */
        uint32_t w0, w1, w2;
        memcpy(&w0, blk + 4, 4);
        memcpy(&w1, blk + 8, 4);
        memcpy(&w2, blk + 12, 4);
        const uint64_t sc64 = (uint64_t)(w0 & 0x3F3F3F3Fu) |
                              ((uint64_t)((w2 & 0x0F0F0F0Fu) | ((w0 >> 2) & 0x30303030u)) << 32);
        const uint64_t mn64 =
            (uint64_t)(w1 & 0x3F3F3F3Fu) |
            ((uint64_t)(((w2 >> 4) & 0x0F0F0F0Fu) | ((w1 >> 2) & 0x30303030u)) << 32);
        const __m256 dsc = _mm256_mul_ps(
            _mm256_set1_ps(qs_fp16(blk)),
            _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)sc64))));
        const __m256 dmn = _mm256_mul_ps(
            _mm256_set1_ps(qs_fp16(blk + 2)),
            _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)mn64))));
        float scale[QS_G][8];
#pragma GCC unroll 4
        for (int g = 0; g < G; g++) {
            const float *da = &ACT_D(a, t0 + g, sb * 8);
            _mm256_storeu_ps(scale[g], _mm256_mul_ps(dsc, _mm256_loadu_ps(da)));
            /* d_x * sum of each 32-block */
            corr[g] = _mm256_fmadd_ps(dmn, _mm256_loadu_ps(ACT_D32(a, t0 + g, sb * 8)), corr[g]);
        }
        const uint8_t *qs = blk + (five ? 48 : 16);
        __m256i qh =
            five ? _mm256_loadu_si256((const __m256i *)(blk + 16)) : _mm256_setzero_si256();
#pragma GCC unroll 4
        for (int c = 0; c < 4; c++) {
            __m256i q = _mm256_loadu_si256((const __m256i *)(qs + 32 * c));
            __m256i uq[2];
            uq[0] = _mm256_and_si256(q, m4);
            uq[1] = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
#pragma GCC unroll 2
            for (int h = 0; h < 2; h++) {
                const int j = 2 * c + h;
                __m256i u = uq[h];
                if (five) {
                    __m256i bit = _mm256_set1_epi8((char)(1 << j));
                    __m256i hb = _mm256_cmpeq_epi8(_mm256_and_si256(qh, bit), bit);
                    u = _mm256_or_si256(u, _mm256_and_si256(hb, b5));
                }
                const int64_t ab = sb * 8 + j;
#pragma GCC unroll 4
                for (int g = 0; g < G; g++) {
                    __m256i p = qs_dot(u, _mm256_loadu_si256(ACT_QG(a, t0, g, ab)));
                    acc[h][g] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p),
                                                _mm256_broadcast_ss(&scale[g][j]), acc[h][g]);
                }
            }
        }
    }
#pragma GCC unroll 4
    for (int g = 0; g < G; g++)
        out[g] = qs_hsum(_mm256_sub_ps(_mm256_add_ps(acc[0][g], acc[1][g]), corr[g]));
}

/* Q6_K: per super-block the 16 scales times d are two vectors; per activation row they are
 * multiplied by the activation scales (expanded to half-blocks) once, and the -32 offset is
 * two vector FMAs against the 16 half-block sums. Per 32-block and row: dot, convert, FMA. */
QS_INLINE void qs_row_q6k(const uint8_t *row, int64_t nsb, const struct quant_act *a, int t0,
                          const int G, float *out)
{
    const __m256i m4 = _mm256_set1_epi8(0x0F), m30 = _mm256_set1_epi8(0x30);
    const __m256i lo_idx = _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3);
    const __m256i hi_idx = _mm256_setr_epi32(4, 4, 5, 5, 6, 6, 7, 7);
    __m256 acc[2][QS_G], corr[QS_G];
#pragma GCC unroll 8
    for (int g = 0; g < G; g++) acc[0][g] = acc[1][g] = corr[g] = _mm256_setzero_ps();
    for (int64_t sb = 0; sb < nsb; sb++) {
        const uint8_t *blk = row + sb * 210;
        const __m256 d = _mm256_set1_ps(qs_fp16(blk + 208));
        const __m128i sc = _mm_loadu_si128((const __m128i *)(blk + 192));
        const __m256 dsc_lo = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(sc)));
        const __m256 dsc_hi =
            _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(sc, 8))));
        float S[QS_G][16];
#pragma GCC unroll 8
        for (int g = 0; g < G; g++) {
            const __m256 da = _mm256_loadu_ps(&ACT_D(a, t0 + g, sb * 8));
            _mm256_storeu_ps(S[g], _mm256_mul_ps(dsc_lo, _mm256_permutevar8x32_ps(da, lo_idx)));
            _mm256_storeu_ps(S[g] + 8, _mm256_mul_ps(dsc_hi, _mm256_permutevar8x32_ps(da, hi_idx)));
            const float *s16 = ACT_S(a, t0 + g, sb * 8);
            corr[g] = _mm256_fmadd_ps(dsc_lo, _mm256_loadu_ps(s16), corr[g]);
            corr[g] = _mm256_fmadd_ps(dsc_hi, _mm256_loadu_ps(s16 + 8), corr[g]);
        }
        for (int h = 0; h < 2; h++) {
            __m256i ql0 = _mm256_loadu_si256((const __m256i *)(blk + 64 * h));
            __m256i ql1 = _mm256_loadu_si256((const __m256i *)(blk + 64 * h + 32));
            __m256i qh = _mm256_loadu_si256((const __m256i *)(blk + 128 + 32 * h));
            __m256i u[4];
            u[0] = _mm256_or_si256(_mm256_and_si256(ql0, m4),
                                   _mm256_and_si256(_mm256_slli_epi16(qh, 4), m30));
            u[1] = _mm256_or_si256(_mm256_and_si256(ql1, m4),
                                   _mm256_and_si256(_mm256_slli_epi16(qh, 2), m30));
            u[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4),
                                   _mm256_and_si256(qh, m30));
            u[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4),
                                   _mm256_and_si256(_mm256_srli_epi16(qh, 2), m30));
#pragma GCC unroll 4
            for (int k = 0; k < 4; k++) {
                const int m = 4 * h + k; /* 32-block within the super-block */
                const int64_t ab = sb * 8 + m;
#pragma GCC unroll 8
                for (int g = 0; g < G; g++) {
                    /* lanes 0-3 hold the first 16 elements (scale 2m), 4-7 the next 16 */
                    const __m256 scv =
                        _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_broadcast_ss(&S[g][2 * m])),
                                             _mm_broadcast_ss(&S[g][2 * m + 1]), 1);
                    __m256i p = qs_dot(u[k], _mm256_loadu_si256(ACT_QG(a, t0, g, ab)));
                    acc[k & 1][g] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), scv, acc[k & 1][g]);
                }
            }
        }
    }
#pragma GCC unroll 8
    for (int g = 0; g < G; g++)
        out[g] = qs_hsum(_mm256_add_ps(acc[0][g], acc[1][g])) - 32.0f * qs_hsum(corr[g]);
}

/* ---- float weights: kind 0 = F32, 1 = F16, 2 = BF16 ---- */

QS_INLINE __m256 qs_load8(const uint8_t *row, int64_t i, const int kind)
{
    if (kind == 0) return _mm256_loadu_ps((const float *)row + i);
    __m128i h = _mm_loadu_si128((const __m128i *)(row + 2 * i));
    if (kind == 1) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

QS_INLINE float qs_load1(const uint8_t *row, int64_t i, const int kind)
{
    if (kind == 0) return ((const float *)row)[i];
    uint16_t h;
    memcpy(&h, row + 2 * i, 2);
    if (kind == 1) return _cvtsh_ss(h);
    return quant_bf16_to_f32(h);
}

QS_INLINE void qs_row_float(const uint8_t *row, int64_t n, const float *x, int t0, const int G,
                            const int kind, float *out)
{
    __m256 acc0[QS_G], acc1[QS_G];
    for (int g = 0; g < G; g++) acc0[g] = acc1[g] = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m256 w0 = qs_load8(row, i, kind), w1 = qs_load8(row, i + 8, kind);
#pragma GCC unroll 4
        for (int g = 0; g < G; g++) {
            const float *xg = x + (int64_t)(t0 + g) * n + i;
            acc0[g] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xg), acc0[g]);
            acc1[g] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xg + 8), acc1[g]);
        }
    }
    for (; i + 8 <= n; i += 8) {
        __m256 w0 = qs_load8(row, i, kind);
        for (int g = 0; g < G; g++)
            acc0[g] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + (int64_t)(t0 + g) * n + i), acc0[g]);
    }
    for (int g = 0; g < G; g++) {
        float s = qs_hsum(_mm256_add_ps(acc0[g], acc1[g]));
        for (int64_t k = i; k < n; k++) s += qs_load1(row, k, kind) * x[(int64_t)(t0 + g) * n + k];
        out[g] = s;
    }
}

/* ---- row loops ---- */

#define QS_CASE_G(n, EXPR_G)                                                                       \
    case n:                                                                                        \
        EXPR_G(n);                                                                                 \
        break;

#if QS_G != 8
#error "QS_G must be 8"
#endif
#define QS_CALL_G(G, EXPR_G)                                                                       \
    switch (G) {                                                                                   \
        QS_CASE_G(1, EXPR_G)                                                                       \
        QS_CASE_G(2, EXPR_G)                                                                       \
        QS_CASE_G(3, EXPR_G)                                                                       \
        QS_CASE_G(4, EXPR_G)                                                                       \
        QS_CASE_G(5, EXPR_G)                                                                       \
        QS_CASE_G(6, EXPR_G)                                                                       \
        QS_CASE_G(7, EXPR_G)                                                                       \
    default:                                                                                       \
        EXPR_G(8);                                                                                 \
        break;                                                                                     \
    }

/* Activation rows per group. QS_G (8) bounds the arrays; the 32-element block formats take 8
 * rows on every path (one accumulator per row); Q4_K/Q5_K keep 4 (their per-row state is
 * larger: 8 rows spill registers); Q6_K and the float formats take QS_GW (4 on AVX2 with its
 * 16 registers, 8 on AVX-512 with 32). */
#define QS_G32 8
#define QS_GK  4

/* Rows [r0, r1) of a 32-element block format for all T activation rows. With more than one
 * group of activation rows (T > 8) each chunk of QROWS weight rows is unpacked once into
 * `cache` (quant_scratch_floats(n_in) floats, 64-byte aligned): quants and float scales; then
 * per activation group one pass computes every d_w * d_x and correction of the chunk and a
 * second runs the integer dots alone. The arithmetic per (weight row, activation row) is the
 * row path's, operation for operation, so the bits do not depend on T (batch invariance). */
#define QS_NBP(nb) (((nb) + 7) & ~(int64_t)7)

/* One chunk of nr unpacked weight rows times activation rows t0..t0+G-1 (qs_rows32). Per
 * weight row: first every d_w * d_x product and the corrections (G independent chains), into
 * cs (one row's worth: stays in L1), then the integer dots alone. */
QS_INLINE void qs_group32(const __m256i *cu, const float *cd, const float *cm, float *cs, int nr,
                          int64_t nb, const struct quant_act *act, int t0, const int G,
                          const int kind, float *y, int64_t ldy, int64_t r_first)
{
    const int64_t nbp = QS_NBP(nb);
    const int has_m = kind == 1 || kind == 3, has_corr = kind != 4;
    for (int i = 0; i < nr; i++) {
        __m256 corr[QS_G], acc[QS_G];
#pragma GCC unroll 8
        for (int g = 0; g < G; g++) corr[g] = acc[g] = _mm256_setzero_ps();
        for (int64_t b0 = 0; b0 < nb; b0 += 8) {
            const __m256 dwv = _mm256_load_ps(cd + i * nbp + b0);
            const __m256 cwv = has_m ? _mm256_load_ps(cm + i * nbp + b0) : dwv;
#pragma GCC unroll 8
            for (int g = 0; g < G; g++)
                corr[g] =
                    qs_scales32(dwv, cwv, act, t0 + g, b0, has_corr, cs + g * nbp + b0, corr[g]);
        }
        float cc[QS_G];
        if (has_corr)
#pragma GCC unroll 8
            for (int g = 0; g < G; g++) cc[g] = qs_hsum(corr[g]);
        const __m256i *u = cu + i * nb;
        for (int64_t b = 0; b < nb; b++)
            qs_blk32(_mm256_load_si256(u + b), b, act, t0, G, kind, cs + b, nbp, acc);
#pragma GCC unroll 8
        for (int g = 0; g < G; g++) {
            float v = qs_hsum(acc[g]);
            y[(int64_t)(t0 + g) * ldy + r_first + i] = has_corr ? v + qs_off32(kind) * cc[g] : v;
        }
    }
}

QS_INLINE void qs_rows32(const struct quant_matrix *w, int64_t r0, int64_t r1,
                         const struct quant_act *act, int T, float *y, int64_t ldy, void *cache,
                         const int kind)
{
    const int64_t nb = w->n_in / QK, nbp = QS_NBP(nb);
    if (T <= QS_G32) {
        for (int64_t r = r0; r < r1; r++) {
            const uint8_t *row = (const uint8_t *)w->data + (uint64_t)r * w->row_bytes;
            float out[QS_G];
#define G_ROW32(g) qs_row32(row, nb, act, 0, g, kind, out)
            QS_CALL_G(T, G_ROW32)
#undef G_ROW32
            for (int g = 0; g < T; g++) y[(int64_t)g * ldy + r] = out[g];
        }
        return;
    }
    __m256i *cu = cache;                    /* [QROWS][nb] quants */
    float *cd = (float *)(cu + QROWS * nb); /* [QROWS][nbp] d */
    float *cm = cd + QROWS * nbp;           /* [QROWS][nbp] m */
    float *cs = cm + QROWS * nbp;           /* [QS_G][nbp] d_w * d_x of one weight row */
    for (int64_t rc = r0; rc < r1; rc += QROWS) {
        const int nr = (int)(rc + QROWS < r1 ? QROWS : r1 - rc);
        for (int i = 0; i < nr; i++)
            qs_unpack_row32((const uint8_t *)w->data + (uint64_t)(rc + i) * w->row_bytes, nb, kind,
                            cu + i * nb, cd + i * nbp, cm + i * nbp);
        for (int t0 = 0; t0 < T; t0 += QS_G32) {
            const int G = T - t0 < QS_G32 ? T - t0 : QS_G32;
#define G_GROUP32(g) qs_group32(cu, cd, cm, cs, nr, nb, act, t0, g, kind, y, ldy, rc)
            QS_CALL_G(G, G_GROUP32)
#undef G_GROUP32
        }
    }
}

/* Loops chunks of QROWS rows x groups of GS (<= QS_G) activation rows; ROW_G(g) computes out[] for
 * weight row pointer `row` and activation rows t0..t0+g-1. */
#define QS_LOOP(ROW_G, GS)                                                                         \
    for (int64_t rc = r0; rc < r1; rc += QROWS) {                                                  \
        int64_t re = rc + QROWS < r1 ? rc + QROWS : r1;                                            \
        for (int t0 = 0; t0 < T; t0 += (GS)) {                                                     \
            int G = T - t0 < (GS) ? T - t0 : (GS);                                                 \
            for (int64_t r = rc; r < re; r++) {                                                    \
                const uint8_t *row = (const uint8_t *)w->data + (uint64_t)r * w->row_bytes;        \
                float out[QS_G];                                                                   \
                QS_CALL_G(G, ROW_G)                                                                \
                for (int g = 0; g < G; g++) y[(int64_t)(t0 + g) * ldy + r] = out[g];               \
            }                                                                                      \
        }                                                                                          \
    }

#define G_Q4_K(g) qs_row_q45k(row, nb, act, t0, g, 0, out)
#define G_Q5_K(g) qs_row_q45k(row, nb, act, t0, g, 1, out)
#define G_Q6_K(g) qs_row_q6k(row, nb, act, t0, g, out)
#define G_F32(g)  qs_row_float(row, n, x, t0, g, 0, out)
#define G_F16(g)  qs_row_float(row, n, x, t0, g, 1, out)
#define G_BF16(g) qs_row_float(row, n, x, t0, g, 2, out)
#define G_DEQ(g)  qs_row_float((const uint8_t *)scratch, n, x, t0, g, 0, out)

void QS_FN(quant_rows)(const struct quant_matrix *w, int64_t r0, int64_t r1, const float *x,
                       const struct quant_act *act, int T, float *y, int64_t ldy, float *scratch)
{
    const int64_t n = w->n_in;
    int64_t nb = n / (int64_t)quant_block_elems(w->type);
    switch (w->type) {
    case QUANT_Q4_0:
        qs_rows32(w, r0, r1, act, T, y, ldy, scratch, 0);
        break;
    case QUANT_Q4_1:
        qs_rows32(w, r0, r1, act, T, y, ldy, scratch, 1);
        break;
    case QUANT_Q5_0:
        qs_rows32(w, r0, r1, act, T, y, ldy, scratch, 2);
        break;
    case QUANT_Q5_1:
        qs_rows32(w, r0, r1, act, T, y, ldy, scratch, 3);
        break;
    case QUANT_Q8_0:
        qs_rows32(w, r0, r1, act, T, y, ldy, scratch, 4);
        break;
    case QUANT_Q4_K:
        QS_LOOP(G_Q4_K, QS_GK) break;
    case QUANT_Q5_K:
        QS_LOOP(G_Q5_K, QS_GK) break;
    case QUANT_Q6_K:
        QS_LOOP(G_Q6_K, QS_GW) break;
    case QUANT_F32:
        QS_LOOP(G_F32, QS_GW) break;
    case QUANT_F16:
        QS_LOOP(G_F16, QS_GW) break;
    case QUANT_BF16:
        QS_LOOP(G_BF16, QS_GW) break;
    default:
        /* Q2_K, Q3_K: dequantize each row once, then float FMA for all T rows */
        for (int64_t r = r0; r < r1; r++) {
            quant_dequantize(w->type, (const uint8_t *)w->data + (uint64_t)r * w->row_bytes,
                             scratch, n);
            for (int t0 = 0; t0 < T; t0 += QS_GW) {
                int G = T - t0 < QS_GW ? T - t0 : QS_GW;
                float out[QS_G];
                QS_CALL_G(G, G_DEQ)
                for (int g = 0; g < G; g++) y[(int64_t)(t0 + g) * ldy + r] = out[g];
            }
        }
        break;
    }
    (void)nb;
}

/* Quantizes activation rows [t0, t1): per 32-block d = amax/127, q = round-to-nearest-even. */
void QS_FN(quant_act)(const float *x, int64_t n_in, int t0, int t1, struct quant_act *act)
{
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    const int64_t nb = n_in / QK;
    for (int t = t0; t < t1; t++) {
        const float *xt = x + (int64_t)t * n_in;
        for (int64_t b = 0; b < nb; b++) {
            __m256 v0 = _mm256_loadu_ps(xt + b * QK), v1 = _mm256_loadu_ps(xt + b * QK + 8);
            __m256 v2 = _mm256_loadu_ps(xt + b * QK + 16), v3 = _mm256_loadu_ps(xt + b * QK + 24);
            __m256 m = _mm256_max_ps(
                _mm256_max_ps(_mm256_andnot_ps(sign, v0), _mm256_andnot_ps(sign, v1)),
                _mm256_max_ps(_mm256_andnot_ps(sign, v2), _mm256_andnot_ps(sign, v3)));
            __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
            m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
            m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
            float amax = _mm_cvtss_f32(m4);
            float d = amax / 127.0f, id = amax != 0.0f ? 127.0f / amax : 0.0f;
            __m256 vid = _mm256_set1_ps(id);
            __m256i q0 = _mm256_cvtps_epi32(_mm256_mul_ps(v0, vid));
            __m256i q1 = _mm256_cvtps_epi32(_mm256_mul_ps(v1, vid));
            __m256i q2 = _mm256_cvtps_epi32(_mm256_mul_ps(v2, vid));
            __m256i q3 = _mm256_cvtps_epi32(_mm256_mul_ps(v3, vid));
            int s0 = qs_hsum_i32(_mm256_add_epi32(q0, q1));
            int s1 = qs_hsum_i32(_mm256_add_epi32(q2, q3));
            __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(q0, q1), _mm256_packs_epi32(q2, q3));
            p = _mm256_permutevar8x32_epi32(p, perm);
            _mm256_storeu_si256((__m256i *)(act->qs + ACT_IDX(act, t, b)), p);
            const float h0 = d * (float)s0, h1 = d * (float)s1;
            act->d[(int64_t)t * act->nbp + b] = d;
            act->ds16[((int64_t)t * act->nb + b) * 2] = h0;
            act->ds16[((int64_t)t * act->nb + b) * 2 + 1] = h1;
            act->ds32[(int64_t)t * act->nbp + b] = h0 + h1;
        }
        for (int64_t b = nb; b < ((nb + 7) & ~(int64_t)7); b++)
            act->d[(int64_t)t * act->nbp + b] = act->ds32[(int64_t)t * act->nbp + b] = 0.0f;
    }
}
