/* bench_kernels: throughput of quant_matmul per weight format and kernel path.
 *
 * 1. Measures the machine's memory bandwidth in the same run: all threads of the pool stream-read
 *    a buffer much larger than the last-level cache (AVX2 loads, best of several passes).
 * 2. For each format and each SIMD path: fills a weight buffer of the same size (random payload,
 *    sane scales), viewed as a stack of [4096 x 4096] matrices (like the layers of a model), and
 *    times one sweep of quant_matmul over all of them for T = 1, 2, 4, 8, 16, 32, 64.
 *    T = 1: GB/s of weight bytes and the fraction of the measured bandwidth;
 *    T > 1: time relative to T = 1 (batching efficiency).
 *
 * Usage: bench_kernels [--threads N] [--mb MiB] [--n-in N] [--json PATH] [--md PATH] [--quick]
 *                      [--types Q4_K,Q8_0,...]  (only these formats; default all)
 *                      [--cpu-time]  (time the calls in process CPU seconds instead of wall
 *                                     seconds: on a machine other jobs share, with --threads 1,
 *                                     what the kernel costs rather than what the scheduler
 *                                     gave it; the bandwidth figure stays wall-clock)
 * Results are meant for bench/results/kernels.{md,json}; see bench/kernels/README.md. */
#include "krserve.h"
#include "quant/quant.h"
#include "util/alloc.h"
#include "util/clock.h"
#include "util/threadpool.h"

#include <immintrin.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static double cpu_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* ---- memory bandwidth ---- */

struct bw_job {
    const uint8_t *buf;
    size_t bytes;
    double sink[64];
};

__attribute__((target("avx2"))) static void bw_task(void *arg, int ith, int nth)
{
    struct bw_job *j = arg;
    long b, e;
    long n = (long)(j->bytes / 256);
    pool_split(n, ith, nth, &b, &e);
    __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
    for (long i = b; i < e; i++) {
        const __m256i *p = (const __m256i *)(j->buf + (size_t)i * 256);
        a0 = _mm256_xor_si256(a0, _mm256_load_si256(p + 0));
        a1 = _mm256_xor_si256(a1, _mm256_load_si256(p + 1));
        a2 = _mm256_xor_si256(a2, _mm256_load_si256(p + 2));
        a3 = _mm256_xor_si256(a3, _mm256_load_si256(p + 3));
        a0 = _mm256_xor_si256(a0, _mm256_load_si256(p + 4));
        a1 = _mm256_xor_si256(a1, _mm256_load_si256(p + 5));
        a2 = _mm256_xor_si256(a2, _mm256_load_si256(p + 6));
        a3 = _mm256_xor_si256(a3, _mm256_load_si256(p + 7));
    }
    __m256i s = _mm256_xor_si256(_mm256_xor_si256(a0, a1), _mm256_xor_si256(a2, a3));
    j->sink[ith % 64] = (double)_mm256_extract_epi32(s, 0);
}

static double measure_bw(struct pool *pool, uint8_t *buf, size_t bytes, int passes)
{
    struct bw_job j = {buf, bytes, {0}};
    double best = 0;
    for (int p = 0; p < passes; p++) {
        double t0 = now_s();
        pool_run(pool, bw_task, &j);
        double gbs = (double)bytes / (now_s() - t0) / 1e9;
        if (gbs > best) best = gbs;
    }
    return best;
}

/* ---- weights ---- */

static uint64_t rs = 88172645463325252ULL;
static uint64_t rnd64(void)
{
    rs ^= rs << 13;
    rs ^= rs >> 7;
    rs ^= rs << 17;
    return rs;
}

static void put_fp16(uint8_t *p, float f)
{
    uint16_t h = quant_f32_to_fp16(f);
    memcpy(p, &h, 2);
}

/* Sane scales (no NaN/denormal slow paths); payload stays random. */
static void fix_scales(uint32_t type, uint8_t *buf, size_t bytes)
{
    uint32_t bb = quant_block_bytes(type);
    if (type == QUANT_F32) {
        for (size_t i = 0; i + 4 <= bytes; i += 4) {
            float f = (float)((int)(rnd64() & 0xFFFF) - 32768) * 1e-6f;
            memcpy(buf + i, &f, 4);
        }
        return;
    }
    if (type == QUANT_F16 || type == QUANT_BF16) {
        for (size_t i = 0; i + 2 <= bytes; i += 2) {
            float f = (float)((int)(rnd64() & 0xFFFF) - 32768) * 1e-6f;
            uint32_t u;
            memcpy(&u, &f, 4);
            uint16_t h = type == QUANT_F16 ? quant_f32_to_fp16(f) : (uint16_t)(u >> 16);
            memcpy(buf + i, &h, 2);
        }
        return;
    }
    int offs[2] = {0, -1};
    if (type == QUANT_Q4_1 || type == QUANT_Q5_1 || type == QUANT_Q4_K || type == QUANT_Q5_K)
        offs[1] = 2;
    if (type == QUANT_Q6_K) offs[0] = 208;
    if (type == QUANT_Q2_K) offs[0] = 80, offs[1] = 82;
    if (type == QUANT_Q3_K) offs[0] = 108;
    for (size_t o = 0; o + bb <= bytes; o += bb) {
        put_fp16(buf + o + offs[0], 0.01f);
        if (offs[1] >= 0) put_fp16(buf + o + offs[1], 0.005f);
    }
}

struct result {
    const char *type;
    const char *isa;
    double gbs_t1;
    double frac_bw;
    double ms_t1;
    double rel[7];
};

/* 1 when name is one of the comma-separated names in sel. */
static int type_selected(const char *sel, const char *name)
{
    size_t n = strlen(name);
    for (const char *p = sel; *p;) {
        const char *e = strchr(p, ',');
        size_t len = e ? (size_t)(e - p) : strlen(p);
        if (len == n && !strncmp(p, name, n)) return 1;
        if (!e) break;
        p = e + 1;
    }
    return 0;
}

static const int TS[7] = {1, 2, 4, 8, 16, 32, 64};

int main(int argc, char **argv)
{
    int threads = 0, quick = 0, cpu_time = 0;
    long mb = 1024, n_in = 4096;
    const char *json_path = NULL, *md_path = NULL, *types_sel = NULL;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--threads") && i + 1 < argc)
            threads = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--mb") && i + 1 < argc)
            mb = atol(argv[++i]);
        else if (!strcmp(argv[i], "--n-in") && i + 1 < argc)
            n_in = atol(argv[++i]);
        else if (!strcmp(argv[i], "--json") && i + 1 < argc)
            json_path = argv[++i];
        else if (!strcmp(argv[i], "--md") && i + 1 < argc)
            md_path = argv[++i];
        else if (!strcmp(argv[i], "--types") && i + 1 < argc)
            types_sel = argv[++i];
        else if (!strcmp(argv[i], "--quick"))
            quick = 1;
        else if (!strcmp(argv[i], "--cpu-time"))
            cpu_time = 1;
        else {
            fprintf(stderr,
                    "usage: %s [--threads N] [--mb MiB] [--n-in N] [--json P] [--md P] [--quick] "
                    "[--types A,B] [--cpu-time]\n",
                    argv[0]);
            return 2;
        }
    }
    struct pool *pool = NULL;
    if (pool_create(threads, &pool)) return 1;
    int nth = pool_size(pool);
    size_t bytes = (size_t)mb << 20;
    uint8_t *buf = alloc_aligned(4096, bytes);
    float *x = alloc_aligned(64, sizeof(float) * 64 * (size_t)n_in);
    float *y = alloc_aligned(64, sizeof(float) * 64 * 4096);
    if (!buf || !x || !y) return 1;
    for (size_t i = 0; i < bytes; i += 8) {
        uint64_t r = rnd64();
        memcpy(buf + i, &r, 8);
    }
    for (long i = 0; i < 64 * n_in; i++) x[i] = (float)((int)(rnd64() % 2001) - 1000) * 1e-3f;

    double bw = measure_bw(pool, buf, bytes, quick ? 3 : 8);
    printf("memory bandwidth (stream read, %d threads, %ld MiB): %.2f GB/s\n", nth, mb, bw);

    static const uint32_t types[] = {QUANT_F32,  QUANT_F16,  QUANT_BF16, QUANT_Q4_0, QUANT_Q4_1,
                                     QUANT_Q5_0, QUANT_Q5_1, QUANT_Q8_0, QUANT_Q2_K, QUANT_Q3_K,
                                     QUANT_Q4_K, QUANT_Q5_K, QUANT_Q6_K};
    static const enum quant_isa isas[] = {QUANT_ISA_AVX2, QUANT_ISA_AVX512};
    struct result res[2 * 13];
    int nres = 0;
    for (size_t ti = 0; ti < sizeof(types) / sizeof(types[0]); ti++) {
        uint32_t type = types[ti];
        if (types_sel && !type_selected(types_sel, quant_type_name(type))) continue;
        uint64_t rb = quant_row_bytes(type, n_in);
        int64_t rows_per_mat = 4096;
        int64_t n_mats = (int64_t)(bytes / (rb * (uint64_t)rows_per_mat));
        if (n_mats < 1) n_mats = 1, rows_per_mat = (int64_t)(bytes / rb);
        fix_scales(type, buf, bytes);
        for (size_t k = 0; k < 2; k++) {
            struct quant_ctx *ctx = NULL;
            if (quant_ctx_create(pool, 64, n_in, isas[k], &ctx) != KRS_OK) continue;
            struct result *r = &res[nres++];
            r->type = quant_type_name(type);
            r->isa = quant_ctx_isa_name(ctx);
            double t_1 = 0;
            for (int ti2 = 0; ti2 < 7; ti2++) {
                int T = TS[ti2];
                int reps = T == 1 ? (quick ? 2 : 5) : (quick ? 1 : 2);
                double best = 1e30;
                for (int rep = 0; rep < reps; rep++) {
                    double t0 = cpu_time ? cpu_s() : now_s();
                    for (int64_t m = 0; m < n_mats; m++) {
                        struct quant_matrix w = {type, n_in, rows_per_mat,
                                                 buf + (uint64_t)m * rb * (uint64_t)rows_per_mat,
                                                 rb};
                        if (quant_matmul(ctx, &w, x, T, y) != KRS_OK) return 1;
                    }
                    double dt = (cpu_time ? cpu_s() : now_s()) - t0;
                    if (dt < best) best = dt;
                }
                if (T == 1) {
                    t_1 = best;
                    double wbytes = (double)rb * (double)rows_per_mat * (double)n_mats;
                    r->gbs_t1 = wbytes / best / 1e9;
                    r->frac_bw = r->gbs_t1 / bw;
                    r->ms_t1 = best * 1e3 / (double)n_mats;
                }
                r->rel[ti2] = best / t_1;
            }
            printf("%-5s %-6s T=1 %6.2f GB/s (%3.0f%% of bw, %.3f ms per 4096x%ld)  rel T=2..64:",
                   r->type, r->isa, r->gbs_t1, 100 * r->frac_bw, r->ms_t1, n_in);
            for (int i = 1; i < 7; i++) printf(" %.2f", r->rel[i]);
            printf("\n");
            fflush(stdout);
            quant_ctx_free(ctx);
        }
    }

    char cpu[256] = "unknown";
    FILE *f = fopen("/proc/cpuinfo", "r");
    if (f) {
        char line[512];
        while (fgets(line, sizeof(line), f))
            if (!strncmp(line, "model name", 10)) {
                char *c = strchr(line, ':');
                if (c) snprintf(cpu, sizeof(cpu), "%s", c + 2);
                cpu[strcspn(cpu, "\n")] = 0;
                break;
            }
        fclose(f);
    }
    if (md_path && (f = fopen(md_path, "w"))) {
        fprintf(f, "# Kernel benchmark (bench/kernels/bench_kernels)\n\n");
        fprintf(f,
                "CPU: %s, %d threads. Weights: %ld MiB per format, as [4096 x %ld] matrices "
                "swept once per measurement (buffer >> LLC).\n\n",
                cpu, nth, mb, n_in);
        fprintf(f, "Measured memory bandwidth (multi-threaded stream read): **%.2f GB/s**.\n\n",
                bw);
        if (cpu_time)
            fprintf(f, "Kernel times are process CPU seconds (--cpu-time), not wall-clock.\n\n");
        fprintf(f, "| format | path | T=1 GB/s | %% of bw | T=1 ms/matrix | T=2 | T=4 | T=8 | "
                   "T=16 | T=32 | T=64 |\n|---|---|---|---|---|---|---|---|---|---|---|\n");
        for (int i = 0; i < nres; i++) {
            struct result *r = &res[i];
            fprintf(f, "| %s | %s | %.2f | %.0f%% | %.3f |", r->type, r->isa, r->gbs_t1,
                    100 * r->frac_bw, r->ms_t1);
            for (int k = 1; k < 7; k++) fprintf(f, " %.2f |", r->rel[k]);
            fprintf(f, "\n");
        }
        fprintf(f, "\nT=n columns: time of one call with n activation rows / time with 1 row "
                   "(same weights).\n");
        fclose(f);
    }
    if (json_path && (f = fopen(json_path, "w"))) {
        fprintf(
            f,
            "{\n  \"cpu\": \"%s\",\n  \"threads\": %d,\n  \"weights_mib\": %ld,\n"
            "  \"n_in\": %ld,\n  \"mem_bw_gbs\": %.3f,\n  \"cpu_time\": %d,\n  \"results\": [\n",
            cpu, nth, mb, n_in, bw, cpu_time);
        for (int i = 0; i < nres; i++) {
            struct result *r = &res[i];
            fprintf(
                f,
                "    {\"type\": \"%s\", \"isa\": \"%s\", \"t1_gbs\": %.3f, \"t1_frac_bw\": %.3f,"
                " \"t1_ms_per_matrix\": %.4f, \"rel_time\": {",
                r->type, r->isa, r->gbs_t1, r->frac_bw, r->ms_t1);
            for (int k = 0; k < 7; k++)
                fprintf(f, "%s\"%d\": %.3f", k ? ", " : "", TS[k], r->rel[k]);
            fprintf(f, "}}%s\n", i + 1 < nres ? "," : "");
        }
        fprintf(f, "  ]\n}\n");
        fclose(f);
    }
    quant_ctx_free(NULL);
    alloc_aligned_free(buf);
    alloc_aligned_free(x);
    alloc_aligned_free(y);
    pool_destroy(pool);
    return 0;
}
