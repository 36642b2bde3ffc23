/* Quantized formats: type table, fp16/bf16 conversion, reference dequantizers, the scalar
 * matmul path and the dispatch to the SIMD paths (quant_avx2.c / quant_avx512.c).
 *
 * Dequantizers follow gguf-py's numpy dequantizers operation by operation (float32 products in
 * the same order, no fused multiply-add: this file is built without FMA flags and C11 mode keeps
 * -ffp-contract=off), so they are bit-exact with gguf.quants.dequantize
 * (tests/quant/test_dequant_py.py checks it).
 *
 * Tolerance of the SIMD paths. For quantized weights (every type but F32/F16/BF16/Q2_K/Q3_K) the
 * SIMD paths round each 32-element block of an activation row to int8 with scale
 * d = amax/127, so every activation carries an absolute error of at most amax_block/254, and
 * one output element differs from the exact product by at most
 *     sum_blocks (amax_block / 254) * sum_{i in block} |w_i|      (+ float rounding),
 * i.e. about 1e-3..1e-2 relative error on typical data (about 0.4 % of the dot product's
 * L1 mass in the worst case). Float weights (F32/F16/BF16) and Q2_K/Q3_K keep float activations
 * and differ from the scalar path only by summation order (~1e-6 relative).
 * tests/quant/test_quant.c checks each SIMD output element against exactly this bound. */
#include "quant/quant.h"

#include "krserve.h"
#include "quant/quant_impl.h"
#include "util/alloc.h"
#include "util/threadpool.h"

#include <cpuid.h>
#include <stdatomic.h>
#include <string.h>

struct type_info {
    uint32_t type;
    const char *name;
    uint32_t elems;
    uint32_t bytes;
};

static const struct type_info TYPES[] = {
    {QUANT_F32, "F32", 1, 4},       {QUANT_F16, "F16", 1, 2},       {QUANT_BF16, "BF16", 1, 2},
    {QUANT_Q4_0, "Q4_0", 32, 18},   {QUANT_Q4_1, "Q4_1", 32, 20},   {QUANT_Q5_0, "Q5_0", 32, 22},
    {QUANT_Q5_1, "Q5_1", 32, 24},   {QUANT_Q8_0, "Q8_0", 32, 34},   {QUANT_Q2_K, "Q2_K", 256, 84},
    {QUANT_Q3_K, "Q3_K", 256, 110}, {QUANT_Q4_K, "Q4_K", 256, 144}, {QUANT_Q5_K, "Q5_K", 256, 176},
    {QUANT_Q6_K, "Q6_K", 256, 210},
};

static const struct type_info *type_find(uint32_t type)
{
    for (size_t i = 0; i < sizeof(TYPES) / sizeof(TYPES[0]); i++)
        if (TYPES[i].type == type) return &TYPES[i];
    return NULL;
}

int quant_type_supported(uint32_t type)
{
    return type_find(type) != NULL;
}

const char *quant_type_name(uint32_t type)
{
    const struct type_info *t = type_find(type);
    return t ? t->name : "unknown";
}

uint32_t quant_block_elems(uint32_t type)
{
    const struct type_info *t = type_find(type);
    return t ? t->elems : 0;
}

uint32_t quant_block_bytes(uint32_t type)
{
    const struct type_info *t = type_find(type);
    return t ? t->bytes : 0;
}

uint64_t quant_row_bytes(uint32_t type, int64_t n)
{
    const struct type_info *t = type_find(type);
    if (!t || n < 0 || n % t->elems) return 0;
    return (uint64_t)(n / t->elems) * t->bytes;
}

/* ---- fp16 / bf16 ---- */

static inline float bits_f32(uint32_t u)
{
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint32_t f32_bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

float quant_fp16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1F;
    uint32_t man = h & 0x3FF;
    if (exp == 0x1F) return bits_f32(sign | 0x7F800000u | (man << 13)); /* inf / NaN */
    if (exp == 0) {
        if (man == 0) return bits_f32(sign);
        /* subnormal: normalise the mantissa */
        int e = -1;
        do {
            man <<= 1;
            e++;
        } while (!(man & 0x400));
        return bits_f32(sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3FF) << 13));
    }
    return bits_f32(sign | ((exp + 127 - 15) << 23) | (man << 13));
}

uint16_t quant_f32_to_fp16(float f)
{
    uint32_t u = f32_bits(f);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000);
    uint32_t exp = (u >> 23) & 0xFF;
    uint32_t man = u & 0x7FFFFF;
    if (exp == 0xFF) { /* inf; NaN keeps its top payload bits (never becoming inf), as numpy */
        uint16_t h = (uint16_t)(0x7C00 | (man >> 13));
        if (man && h == 0x7C00) h++;
        return (uint16_t)(sign | h);
    }
    int32_t e = (int32_t)exp - 127 + 15;
    if (e >= 0x1F) return (uint16_t)(sign | 0x7C00); /* overflow -> inf */
    if (e <= 0) {
        if (e < -10) return sign; /* below half the smallest subnormal: +-0 */
        uint32_t m = man | 0x800000;
        int shift = 14 - e; /* 14..24 */
        uint32_t half = m >> shift;
        uint32_t rem = m & ((1u << shift) - 1);
        uint32_t mid = 1u << (shift - 1);
        if (rem > mid || (rem == mid && (half & 1))) half++;
        return (uint16_t)(sign | half);
    }
    uint32_t h = ((uint32_t)e << 10) | (man >> 13);
    uint32_t rem = man & 0x1FFF;
    if (rem > 0x1000 || (rem == 0x1000 && (h & 1))) h++; /* may carry into exp (-> inf ok) */
    return (uint16_t)(sign | h);
}

float quant_bf16_to_f32(uint16_t h)
{
    return bits_f32((uint32_t)h << 16);
}

static inline float fp16(const uint8_t *p)
{
    return quant_fp16_to_f32((uint16_t)(p[0] | (p[1] << 8)));
}

/* ---- dequantization (one block each) ---- */

static void deq_q4_0(const uint8_t *b, float *y)
{
    float d = fp16(b);
    for (int j = 0; j < 16; j++) {
        y[j] = d * (float)((b[2 + j] & 0x0F) - 8);
        y[j + 16] = d * (float)((b[2 + j] >> 4) - 8);
    }
}

static void deq_q4_1(const uint8_t *b, float *y)
{
    float d = fp16(b), m = fp16(b + 2);
    for (int j = 0; j < 16; j++) {
        y[j] = d * (float)(b[4 + j] & 0x0F) + m;
        y[j + 16] = d * (float)(b[4 + j] >> 4) + m;
    }
}

static void deq_q5_0(const uint8_t *b, float *y)
{
    float d = fp16(b);
    uint32_t qh =
        (uint32_t)b[2] | ((uint32_t)b[3] << 8) | ((uint32_t)b[4] << 16) | ((uint32_t)b[5] << 24);
    for (int j = 0; j < 16; j++) {
        int lo = (b[6 + j] & 0x0F) | (int)(((qh >> j) & 1) << 4);
        int hi = (b[6 + j] >> 4) | (int)(((qh >> (j + 16)) & 1) << 4);
        y[j] = d * (float)(lo - 16);
        y[j + 16] = d * (float)(hi - 16);
    }
}

static void deq_q5_1(const uint8_t *b, float *y)
{
    float d = fp16(b), m = fp16(b + 2);
    uint32_t qh =
        (uint32_t)b[4] | ((uint32_t)b[5] << 8) | ((uint32_t)b[6] << 16) | ((uint32_t)b[7] << 24);
    for (int j = 0; j < 16; j++) {
        int lo = (b[8 + j] & 0x0F) | (int)(((qh >> j) & 1) << 4);
        int hi = (b[8 + j] >> 4) | (int)(((qh >> (j + 16)) & 1) << 4);
        y[j] = d * (float)lo + m;
        y[j + 16] = d * (float)hi + m;
    }
}

static void deq_q8_0(const uint8_t *b, float *y)
{
    float d = fp16(b);
    for (int j = 0; j < 32; j++) y[j] = (float)(int8_t)b[2 + j] * d;
}

static void deq_q2_k(const uint8_t *b, float *y)
{
    const uint8_t *sc = b, *qs = b + 16;
    float d = fp16(b + 80), dmin = fp16(b + 82);
    for (int e = 0; e < 256; e++) {
        int h = e / 128, j = (e % 128) / 32, l = e % 32;
        int q = (qs[32 * h + l] >> (2 * j)) & 3;
        uint8_t s = sc[e / 16];
        float dl = d * (float)(s & 0xF), ml = dmin * (float)(s >> 4);
        y[e] = dl * (float)q - ml;
    }
}

static void deq_q3_k(const uint8_t *b, float *y)
{
    const uint8_t *hmask = b, *qs = b + 32, *s = b + 96;
    float d = fp16(b + 108);
    float dl[16];
    for (int i = 0; i < 16; i++) {
        int low4 = (i < 8) ? (s[i] & 0xF) : (s[i - 8] >> 4);
        int hi2 = (s[8 + i % 4] >> (2 * (i / 4))) & 3;
        dl[i] = d * (float)((low4 | (hi2 << 4)) - 32);
    }
    for (int e = 0; e < 256; e++) {
        int h = e / 128, j = (e % 128) / 32, l = e % 32;
        int q2 = (qs[32 * h + l] >> (2 * j)) & 3;
        int hbit = (hmask[l] >> (4 * h + j)) & 1;
        y[e] = dl[e / 16] * (float)(q2 - (hbit ? 0 : 4));
    }
}

static void deq_q4_k(const uint8_t *b, float *y)
{
    float d = fp16(b), dmin = fp16(b + 2);
    uint8_t sc[8], mn[8];
    quant_k4_scales(b + 4, sc, mn);
    const uint8_t *qs = b + 16;
    for (int sb = 0; sb < 8; sb++) {
        float dl = d * (float)sc[sb], ml = dmin * (float)mn[sb];
        const uint8_t *q = qs + 32 * (sb / 2);
        int shift = (sb & 1) * 4;
        for (int l = 0; l < 32; l++) y[32 * sb + l] = dl * (float)((q[l] >> shift) & 0xF) - ml;
    }
}

static void deq_q5_k(const uint8_t *b, float *y)
{
    float d = fp16(b), dmin = fp16(b + 2);
    uint8_t sc[8], mn[8];
    quant_k4_scales(b + 4, sc, mn);
    const uint8_t *qh = b + 16, *qs = b + 48;
    for (int sb = 0; sb < 8; sb++) {
        float dl = d * (float)sc[sb], ml = dmin * (float)mn[sb];
        const uint8_t *q = qs + 32 * (sb / 2);
        int shift = (sb & 1) * 4;
        for (int l = 0; l < 32; l++) {
            int v = ((q[l] >> shift) & 0xF) | (((qh[l] >> sb) & 1) << 4);
            y[32 * sb + l] = dl * (float)v - ml;
        }
    }
}

static void deq_q6_k(const uint8_t *b, float *y)
{
    const uint8_t *ql = b, *qh = b + 128;
    const int8_t *sc = (const int8_t *)(b + 192);
    float d = fp16(b + 208);
    for (int e = 0; e < 256; e++) {
        int h = e / 128, k = (e % 128) / 32, l = e % 32;
        uint8_t lb = ql[64 * h + l + 32 * (k & 1)];
        int low4 = (k < 2) ? (lb & 0x0F) : (lb >> 4);
        int hi2 = (qh[32 * h + l] >> (2 * k)) & 3;
        y[e] = (d * (float)sc[e / 16]) * (float)((low4 | (hi2 << 4)) - 32);
    }
}

int quant_dequantize(uint32_t type, const void *src, float *dst, int64_t n)
{
    const struct type_info *t = type_find(type);
    if (!t || !src || !dst || n < 0 || n % t->elems) return KRS_ERR_INVALID;
    const uint8_t *p = src;
    int64_t nb = n / t->elems;
    void (*fn)(const uint8_t *, float *) = NULL;
    switch (type) {
    case QUANT_F32:
        memcpy(dst, src, (size_t)n * 4);
        return KRS_OK;
    case QUANT_F16:
        for (int64_t i = 0; i < n; i++) dst[i] = fp16(p + 2 * i);
        return KRS_OK;
    case QUANT_BF16:
        for (int64_t i = 0; i < n; i++)
            dst[i] = quant_bf16_to_f32((uint16_t)(p[2 * i] | (p[2 * i + 1] << 8)));
        return KRS_OK;
    case QUANT_Q4_0:
        fn = deq_q4_0;
        break;
    case QUANT_Q4_1:
        fn = deq_q4_1;
        break;
    case QUANT_Q5_0:
        fn = deq_q5_0;
        break;
    case QUANT_Q5_1:
        fn = deq_q5_1;
        break;
    case QUANT_Q8_0:
        fn = deq_q8_0;
        break;
    case QUANT_Q2_K:
        fn = deq_q2_k;
        break;
    case QUANT_Q3_K:
        fn = deq_q3_k;
        break;
    case QUANT_Q4_K:
        fn = deq_q4_k;
        break;
    case QUANT_Q5_K:
        fn = deq_q5_k;
        break;
    case QUANT_Q6_K:
        fn = deq_q6_k;
        break;
    default:
        return KRS_ERR_INVALID;
    }
    for (int64_t i = 0; i < nb; i++) fn(p + i * t->bytes, dst + i * t->elems);
    return KRS_OK;
}

/* ---- matmul: context, scalar path, dispatch ---- */

int quant_simd_needs_act(uint32_t type)
{
    switch (type) {
    case QUANT_Q4_0:
    case QUANT_Q4_1:
    case QUANT_Q5_0:
    case QUANT_Q5_1:
    case QUANT_Q8_0:
    case QUANT_Q4_K:
    case QUANT_Q5_K:
    case QUANT_Q6_K:
        return 1;
    default:
        return 0;
    }
}

/* Work (bytes of weights, plus dot cost) worth waking one more thread for. */
#define QUANT_BYTES_PER_THREAD (64.0 * 1024.0)

struct quant_ctx {
    struct pool *pool;
    int nth;
    int max_rows;
    int64_t max_n_in;
    enum quant_isa isa;
    quant_rows_fn rows;
    quant_act_fn act_fn;
    float *scratch; /* [nth][scratch_stride] */
    int64_t scratch_stride;
    int8_t *act_qs;
    float *act_d;
    float *act_ds16;
    float *act_ds32;
    /* the job being run */
    const struct quant_matrix *w;
    const float *x;
    int T;
    float *y;
    struct quant_act act;
    /* Work sharing: output rows go in grains of grain_chunks x QROWS rows, claimed from
     * next_chunk by whichever thread is free, so a thread the OS delays (a busy machine) does
     * not hold the whole call up the way a static 1/nth split does. */
    _Atomic long next_chunk;
    long n_chunks, grain_chunks;
};

/* Reference path: dequantize one weight row into scratch, dot it with every row of x. */
static void rows_scalar(const struct quant_matrix *w, int64_t r0, int64_t r1, const float *x,
                        const struct quant_act *act, int T, float *y, int64_t ldy, float *scratch)
{
    (void)act;
    const int64_t n = w->n_in;
    for (int64_t r = r0; r < r1; r++) {
        quant_dequantize(w->type, (const uint8_t *)w->data + (uint64_t)r * w->row_bytes, scratch,
                         n);
        for (int t = 0; t < T; t++) {
            const float *xt = x + (int64_t)t * n;
            float s = 0.0f;
            for (int64_t i = 0; i < n; i++) s += scratch[i] * xt[i];
            y[(int64_t)t * ldy + r] = s;
        }
    }
}

/* F16C from cpuid leaf 1 (ECX bit 29): clang's __builtin_cpu_supports has no "f16c". */
static int cpu_has_f16c(void)
{
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
    return (c >> 29) & 1;
}

static int cpu_has(enum quant_isa isa)
{
    __builtin_cpu_init();
    switch (isa) {
    case QUANT_ISA_SCALAR:
        return 1;
    case QUANT_ISA_AVX2:
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && cpu_has_f16c();
    case QUANT_ISA_AVX512:
        return cpu_has(QUANT_ISA_AVX2) && __builtin_cpu_supports("avx512f") &&
               __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
               __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vnni");
    default:
        return 0;
    }
}

int quant_ctx_create(struct pool *pool, int max_rows, int64_t max_n_in, enum quant_isa isa,
                     struct quant_ctx **out)
{
    int rc = KRS_OK;
    struct quant_ctx *c = NULL;
    if (!out || max_rows <= 0 || max_n_in <= 0) return KRS_ERR_INVALID;
    *out = NULL;
    if (isa == QUANT_ISA_AUTO)
        isa = cpu_has(QUANT_ISA_AVX512) ? QUANT_ISA_AVX512
              : cpu_has(QUANT_ISA_AVX2) ? QUANT_ISA_AVX2
                                        : QUANT_ISA_SCALAR;
    if (isa != QUANT_ISA_SCALAR && isa != QUANT_ISA_AVX2 && isa != QUANT_ISA_AVX512)
        return KRS_ERR_INVALID;
    if (!cpu_has(isa)) return KRS_ERR_UNSUPPORTED;
    c = alloc_calloc(1, sizeof(*c));
    if (!c) return KRS_ERR_NOMEM;
    c->pool = pool;
    c->nth = pool ? pool_size(pool) : 1;
    c->max_rows = max_rows;
    c->max_n_in = max_n_in;
    c->isa = isa;
    c->rows = isa == QUANT_ISA_AVX512 ? quant_rows_avx512
              : isa == QUANT_ISA_AVX2 ? quant_rows_avx2
                                      : rows_scalar;
    c->act_fn = isa == QUANT_ISA_AVX512 ? quant_act_avx512
                : isa == QUANT_ISA_AVX2 ? quant_act_avx2
                                        : NULL;
    c->scratch_stride = quant_scratch_floats(max_n_in);
    c->scratch = alloc_aligned(64, (size_t)c->nth * (size_t)c->scratch_stride * sizeof(float));
    if (!c->scratch) {
        rc = KRS_ERR_NOMEM;
        goto out;
    }
    if (isa != QUANT_ISA_SCALAR) {
        int64_t stride = (max_n_in + QK - 1) / QK * QK, nb = stride / QK;
        c->act.stride = stride;
        c->act_qs = alloc_aligned(64, (size_t)((max_rows + 7) & ~7) * (size_t)stride);
        /* d and ds32 rows are padded to whole 8-block groups (zeros, written by the activation
         * quantizer); + QK_PAD floats of slack after each array */
        int64_t nbp = (nb + 7) & ~(int64_t)7;
        c->act.nbp = nbp;
        c->act_d = alloc_aligned(64, ((size_t)max_rows * (size_t)nbp + QK_PAD) * sizeof(float));
        c->act_ds32 = alloc_aligned(64, ((size_t)max_rows * (size_t)nbp + QK_PAD) * sizeof(float));
        c->act_ds16 =
            alloc_aligned(64, ((size_t)max_rows * (size_t)nb * 2 + QK_PAD) * sizeof(float));
        if (!c->act_qs || !c->act_d || !c->act_ds16 || !c->act_ds32) {
            rc = KRS_ERR_NOMEM;
            goto out;
        }
    }
out:
    if (rc)
        quant_ctx_free(c);
    else
        *out = c;
    return rc;
}

void quant_ctx_free(struct quant_ctx *ctx)
{
    if (!ctx) return;
    alloc_aligned_free(ctx->scratch);
    alloc_aligned_free(ctx->act_qs);
    alloc_aligned_free(ctx->act_d);
    alloc_aligned_free(ctx->act_ds16);
    alloc_aligned_free(ctx->act_ds32);
    alloc_free(ctx);
}

const char *quant_ctx_isa_name(const struct quant_ctx *ctx)
{
    if (!ctx) return "none";
    switch (ctx->isa) {
    case QUANT_ISA_AVX2:
        return "avx2";
    case QUANT_ISA_AVX512:
        return "avx512";
    default:
        return "scalar";
    }
}

static void task_act(void *arg, int ith, int nth)
{
    struct quant_ctx *c = arg;
    long t0, t1;
    pool_split(c->T, ith, nth, &t0, &t1);
    if (t1 > t0) c->act_fn(c->x, c->w->n_in, (int)t0, (int)t1, &c->act);
}

static void task_rows(void *arg, int ith, int nth)
{
    struct quant_ctx *c = arg;
    (void)nth;
    float *scratch = c->scratch + (int64_t)ith * c->scratch_stride;
    for (;;) {
        long c0 = atomic_fetch_add_explicit(&c->next_chunk, c->grain_chunks, memory_order_relaxed);
        if (c0 >= c->n_chunks) break;
        long c1 = c0 + c->grain_chunks < c->n_chunks ? c0 + c->grain_chunks : c->n_chunks;
        int64_t r0 = (int64_t)c0 * QROWS, r1 = (int64_t)c1 * QROWS;
        if (r1 > c->w->n_out) r1 = c->w->n_out;
        c->rows(c->w, r0, r1, c->x, &c->act, c->T, c->y, c->w->n_out, scratch);
    }
}

int quant_matmul(struct quant_ctx *ctx, const struct quant_matrix *w, const float *x, int T,
                 float *y)
{
    if (!ctx || !w || !x || !y || T <= 0 || T > ctx->max_rows || !w->data || w->n_out <= 0 ||
        w->n_in <= 0 || w->n_in > ctx->max_n_in)
        return KRS_ERR_INVALID;
    uint64_t rb = quant_row_bytes(w->type, w->n_in);
    if (rb == 0 || w->row_bytes < rb) return KRS_ERR_INVALID;
    ctx->w = w;
    ctx->x = x;
    ctx->T = T;
    ctx->y = y;
    if (ctx->isa != QUANT_ISA_SCALAR && quant_simd_needs_act(w->type)) {
        ctx->act.qs = ctx->act_qs;
        ctx->act.d = ctx->act_d;
        ctx->act.ds16 = ctx->act_ds16;
        ctx->act.ds32 = ctx->act_ds32;
        ctx->act.nb = ctx->act.stride / QK;
        if (ctx->pool && (int64_t)T * w->n_in >= 65536)
            pool_run(ctx->pool, task_act, ctx);
        else
            ctx->act_fn(x, w->n_in, 0, T, &ctx->act);
    }
    /* Threads in proportion to the work: waking and joining a thread costs microseconds, and
     * a small layer matrix (a few hundred KB at T = 1) is done in about that time, so it gets
     * a few threads, not all of them. Work ~ weight bytes + T * n_out * n_in / 8 (dot cost). */
    ctx->n_chunks = (long)((w->n_out + QROWS - 1) / QROWS);
    double work = (double)w->row_bytes * (double)w->n_out +
                  (double)T * (double)w->n_out * (double)w->n_in / 8.0;
    long nth = (long)(work / QUANT_BYTES_PER_THREAD) + 1;
    if (nth > ctx->nth) nth = ctx->nth;
    if (nth > ctx->n_chunks) nth = ctx->n_chunks;
    /* About 8 grains per thread: enough to even out a late thread, few enough that claiming
     * one (an atomic add) costs nothing next to its rows. */
    ctx->grain_chunks = ctx->n_chunks / (nth * 8);
    if (ctx->grain_chunks < 1) ctx->grain_chunks = 1;
    atomic_store_explicit(&ctx->next_chunk, 0, memory_order_relaxed);
    if (ctx->pool && nth > 1)
        pool_run_dynamic(ctx->pool, (int)nth, task_rows, ctx);
    else
        task_rows(ctx, 0, 1);
    return KRS_OK;
}
