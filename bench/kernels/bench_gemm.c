/* bench_gemm: quant_matmul on the default model's matrix shapes at any batch T, one thread,
 * process CPU time, plus a hash of Y's bits.
 *
 * bench_kernels sweeps T = 1..64 over large stacks of 4096-row matrices; prefill runs T = 512
 * on the model's own shapes (Q5_0 640 -> 2048 for FFN gate/up and Q, Q8_0 640 -> 256 for V,
 * Q4_K 1024 -> 640 for the attention output, Q4_K / Q6_K 2048 -> 640 for FFN down), which fit
 * in the caches. The hash lets two builds show that a kernel change kept every bit of Y (batch
 * invariance and the model's outputs depend on it): same seed, same weights, same X.
 *
 * usage: bench_gemm [T] [REPS] [INDEX]   (T default 512, REPS default 5: best of REPS calls
 *        after one warm-up; INDEX: only that shape of the table below, default all) */
#include "quant/quant.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double cpu_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* Random payload with small positive fp16 scales (d, and dmin where the format has one). */
static void fill_row(uint32_t type, uint8_t *row, int64_t n_in)
{
    const uint32_t be = quant_block_bytes(type), ne = quant_block_elems(type);
    const uint16_t h = 0x1c00; /* 0.0039 */
    for (int64_t b = 0; b < n_in / ne; b++) {
        uint8_t *p = row + b * be;
        if (type == QUANT_Q6_K) {
            memcpy(p + 208, &h, 2);
            continue;
        }
        memcpy(p, &h, 2);
        if (type == QUANT_Q4_K || type == QUANT_Q5_K || type == QUANT_Q4_1 || type == QUANT_Q5_1)
            memcpy(p + 2, &h, 2);
    }
}

int main(int argc, char **argv)
{
    static const struct {
        uint32_t type;
        int64_t n_in, n_out;
    } shapes[] = {
        {QUANT_Q5_0, 640, 2048}, {QUANT_Q8_0, 640, 256},  {QUANT_Q4_K, 1024, 640},
        {QUANT_Q4_K, 2048, 640}, {QUANT_Q6_K, 2048, 640},
    };
    const int n_shapes = (int)(sizeof(shapes) / sizeof(shapes[0]));
    const int T = argc > 1 ? atoi(argv[1]) : 512, reps = argc > 2 ? atoi(argv[2]) : 5;
    const int only = argc > 3 ? atoi(argv[3]) : -1;
    if (T < 1 || T > 4096 || reps < 1) {
        fprintf(stderr, "usage: bench_gemm [T 1..4096] [REPS] [INDEX]\n");
        return 2;
    }
    struct quant_ctx *ctx = NULL;
    float *x = malloc(sizeof(float) * (size_t)T * 2048), *y = malloc(sizeof(float) * T * 2048);
    if (!x || !y || quant_ctx_create(NULL, T, 2048, QUANT_ISA_AUTO, &ctx)) return 1;
    srand(1);
    for (int64_t i = 0; i < (int64_t)T * 2048; i++) x[i] = (float)rand() / (float)RAND_MAX - 0.5f;
    for (int k = 0; k < n_shapes; k++) {
        uint64_t rb = quant_row_bytes(shapes[k].type, shapes[k].n_in);
        uint8_t *w = malloc(rb * (uint64_t)shapes[k].n_out);
        if (!w) return 1;
        for (uint64_t i = 0; i < rb * (uint64_t)shapes[k].n_out; i++) w[i] = (uint8_t)rand();
        for (int64_t r = 0; r < shapes[k].n_out; r++)
            fill_row(shapes[k].type, w + r * rb, shapes[k].n_in);
        if (only >= 0 && k != only) {
            free(w);
            continue;
        }
        struct quant_matrix m = {shapes[k].type, shapes[k].n_in, shapes[k].n_out, w, rb};
        if (quant_matmul(ctx, &m, x, T, y)) return 1;
        double best = 1e30;
        for (int r = 0; r < reps; r++) {
            double t0 = cpu_s();
            quant_matmul(ctx, &m, x, T, y);
            double d = cpu_s() - t0;
            if (d < best) best = d;
        }
        uint32_t hash = 0;
        for (int64_t i = 0; i < (int64_t)T * shapes[k].n_out; i++) {
            uint32_t u;
            memcpy(&u, y + i, 4);
            hash = hash * 31u + u;
        }
        printf("%s_%ldx%ld T=%d %.3f ms %.1f Gop/s %s hash %08x\n", quant_type_name(shapes[k].type),
               (long)shapes[k].n_in, (long)shapes[k].n_out, T, best * 1e3,
               2.0 * T * (double)shapes[k].n_in * (double)shapes[k].n_out / best / 1e9,
               quant_ctx_isa_name(ctx), hash);
        free(w);
    }
    quant_ctx_free(ctx);
    free(x);
    free(y);
    return 0;
}
