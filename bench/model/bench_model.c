/* bench_model: decode and prefill throughput of a model on this CPU, in one run.
 *
 *   decode tok/s (aggregate) at 1, 2, 4, 8, 16, 32 concurrent sequences, each with a 64-token
 *   context, through the batched forward (one forward per step for all sequences);
 *   prefill tok/s for a 512-token prompt in chunks of 128 (--prefill-chunk);
 *   read bandwidth measured in the same run, all threads streaming (a) a buffer as large as the
 *   weights read per token and (b) a 1 GiB buffer. The batch-1 roofline is (a) / weight bytes
 *   per token: what streaming the weights once per token can reach on this machine. Where the
 *   weights fit in the last-level cache (a 270M model in a 300 MiB L3), (a) is cache bandwidth
 *   and far above (b), the DRAM figure, which is reported beside it.
 *
 * usage: bench_model [MODEL] [--json OUT] [--md OUT] [--device cpu|cuda]
 *                    [--batches 1,2,4,8,16,32] [--steps N] [--bandwidth-gbs B] [--threads N]
 *                    [--prefill-chunk N]
 *        (default models/default.gguf on the cpu; --steps: timed decode steps per batch size,
 *        default 16 below batch 16 and 8 from there; --bandwidth-gbs: the device's memory
 *        bandwidth for the roofline instead of the CPU's measured one, e.g. 4290 for the H200's
 *        measured copy bandwidth; with --device other than cpu and no --bandwidth-gbs the
 *        CPU figure is meaningless and the roofline lines say so; --threads: the CPU
 *        backend's threads, default all online CPUs; --prefill-chunk: tokens per forward of the
 *        512-token prefill, default 128, at most 512) */
#include "backend/backend.h"
#include "krserve.h"
#include "kv/kv.h"
#include "model/model.h"
#include "util/alloc.h"
#include "util/clock.h"
#include "util/threadpool.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

struct bw_ctx {
    const uint64_t *buf;
    size_t n;
    uint64_t sums[64];
};

static void bw_task(void *p, int ith, int nth)
{
    struct bw_ctx *c = p;
    long b, e;
    pool_split((long)c->n, ith, nth, &b, &e);
    uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    for (long i = b; i + 4 <= e; i += 4) {
        s0 += c->buf[i];
        s1 += c->buf[i + 1];
        s2 += c->buf[i + 2];
        s3 += c->buf[i + 3];
    }
    c->sums[ith] = s0 + s1 + s2 + s3;
}

static double measure_bandwidth(struct pool *pool, size_t bytes)
{
    bytes &= ~(size_t)63;
    uint64_t *buf = alloc_aligned(64, bytes);
    if (!buf) return 0;
    memset(buf, 1, bytes);
    struct bw_ctx c = {buf, bytes / 8, {0}};
    double best = 0;
    for (int r = 0; r < 5; r++) {
        uint64_t t0 = clock_now_ns();
        pool_run(pool, bw_task, &c);
        double s = (double)(clock_now_ns() - t0) / 1e9;
        if (bytes / s > best) best = bytes / s;
    }
    alloc_aligned_free(buf);
    return best / 1e9;
}

#define MAX_BATCH 512

/* Process CPU seconds: on a machine other jobs share, CPU seconds per token (with --threads 1)
 * is what the engine costs, whatever the scheduler gave it; reported beside the wall-clock
 * rates. */
static double cpu_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* Prefills n_seq sequences with ctx_len tokens, then times `steps` decode steps. Where the
 * backend samples on the device, each step samples greedily there and feeds the ids back, as
 * the scheduler does (token ids cross to the host, not n_vocab logits per row); elsewhere the
 * step returns logits, as the CPU scheduler reads them. */
static double decode_tps(struct model_ctx *ctx, int n_seq, int ctx_len, int steps,
                         double *cpu_ms_tok)
{
    double c0 = 0;
    struct kv_cache *kv = model_ctx_kv(ctx);
    static int32_t tok[MAX_BATCH], pos[MAX_BATCH], seq[MAX_BATCH];
    static uint8_t want[MAX_BATCH];
    for (int s = 0; s < n_seq; s++) {
        for (int i = 0; i < ctx_len; i++) {
            tok[i] = 100 + (s * 31 + i * 7) % 20000;
            pos[i] = i;
            seq[i] = s;
            want[i] = i == ctx_len - 1;
        }
        kv_seq_reserve(kv, s, 0, ctx_len);
        struct model_batch b = {ctx_len, tok, pos, seq, want};
        const float *l;
        int n;
        if (model_forward(ctx, &b, &l, &n)) return 0;
    }
    static struct backend_sample_row rows[MAX_BATCH];
    static int32_t next[MAX_BATCH];
    const int sampled = model_ctx_samples_on_device(ctx);
    for (int s = 0; s < n_seq; s++) {
        rows[s] = (struct backend_sample_row){.top_p = 1.0f};
        next[s] = 100 + s;
    }
    uint64_t t0 = 0;
    for (int st = -1; st < steps; st++) { /* one warm-up step */
        if (st == 0) {
            t0 = clock_now_ns();
            c0 = cpu_now();
        }
        for (int s = 0; s < n_seq; s++) {
            int p = ctx_len + st + 1;
            kv_seq_reserve(kv, s, p, p + 1);
            tok[s] = sampled ? next[s] : 100 + (s + p) % 20000;
            pos[s] = p;
            seq[s] = s;
            want[s] = 1;
        }
        struct model_batch b = {n_seq, tok, pos, seq, want};
        const float *l;
        int n;
        if (sampled) {
            const int32_t *ids;
            if (model_forward_sampled(ctx, &b, rows, NULL, 0, NULL, &ids, &l, &n)) return 0;
            memcpy(next, ids, (size_t)n_seq * sizeof *ids);
        } else if (model_forward(ctx, &b, &l, &n)) {
            return 0;
        }
    }
    double secs = (double)(clock_now_ns() - t0) / 1e9;
    *cpu_ms_tok = (cpu_now() - c0) * 1e3 / ((double)n_seq * steps);
    for (int s = 0; s < n_seq; s++) kv_seq_release(kv, s);
    return (double)n_seq * steps / secs;
}

/* One prompt of n tokens in steps of chunk: the best of three after a warm-up (a device loads
 * kernels and picks GEMM algorithms at their first use); *cpu_ms_tok of that best run. */
static double prefill_tps(struct model_ctx *ctx, int n, int chunk, double *cpu_ms_tok)
{
    struct kv_cache *kv = model_ctx_kv(ctx);
    int32_t tok[512], pos[512], seq[512];
    uint8_t want[512];
    double best = 0;
    for (int rep = 0; rep < 4; rep++) {
        uint64_t t0 = clock_now_ns();
        double c0 = cpu_now();
        for (int off = 0; off < n; off += chunk) {
            for (int i = 0; i < chunk; i++) {
                tok[i] = 100 + (off + i) % 20000;
                pos[i] = off + i;
                seq[i] = 0;
                want[i] = off + i == n - 1;
            }
            kv_seq_reserve(kv, 0, off, off + chunk);
            struct model_batch b = {chunk, tok, pos, seq, want};
            const float *l;
            int nn;
            if (model_forward(ctx, &b, &l, &nn)) return 0;
        }
        double tps = n / ((double)(clock_now_ns() - t0) / 1e9);
        double cpu = (cpu_now() - c0) * 1e3 / n;
        kv_seq_release(kv, 0);
        if (rep > 0 && tps > best) {
            best = tps;
            *cpu_ms_tok = cpu;
        }
    }
    return best;
}

int main(int argc, char **argv)
{
    const char *path = "models/default.gguf", *json = NULL, *md = NULL, *device = "cpu";
    int batches[16] = {1, 2, 4, 8, 16, 32}, n_batches = 6, steps = 0, max_batch = 0;
    int threads_arg = 0, chunk = 128;
    double dev_bw = 0; /* GB/s for the roofline when the device is not the CPU */
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--json") && i + 1 < argc)
            json = argv[++i];
        else if (!strcmp(argv[i], "--md") && i + 1 < argc)
            md = argv[++i];
        else if (!strcmp(argv[i], "--device") && i + 1 < argc)
            device = argv[++i];
        else if (!strcmp(argv[i], "--bandwidth-gbs") && i + 1 < argc)
            dev_bw = atof(argv[++i]);
        else if (!strcmp(argv[i], "--steps") && i + 1 < argc)
            steps = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--threads") && i + 1 < argc)
            threads_arg = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--prefill-chunk") && i + 1 < argc)
            chunk = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--batches") && i + 1 < argc) {
            n_batches = 0;
            for (char *t = strtok(argv[++i], ","); t && n_batches < 16; t = strtok(NULL, ","))
                batches[n_batches++] = atoi(t);
        } else
            path = argv[i];
    }
    if (chunk < 1 || chunk > 512 || 512 % chunk) {
        fprintf(stderr, "--prefill-chunk: a divisor of 512\n");
        return 2;
    }
    struct model *m;
    char err[256];
    if (model_load(path, &m, err, sizeof err)) {
        fprintf(stderr, "%s: %s\n", path, err);
        return 1;
    }
    for (int i = 0; i < n_batches; i++) {
        if (batches[i] < 1 || batches[i] > MAX_BATCH) {
            fprintf(stderr, "--batches: each in [1, %d]\n", MAX_BATCH);
            return 2;
        }
        if (batches[i] > max_batch) max_batch = batches[i];
    }
    int n_slots = max_batch < 32 ? 32 : max_batch;
    struct model_ctx *ctx;
    struct model_ctx_params p = {.max_batch_tokens = 512,
                                 .max_seqs = n_slots,
                                 .kv_tokens = (int64_t)n_slots * 256,
                                 .max_ctx = 1024,
                                 .n_threads = threads_arg,
                                 .device = device};
    if (model_ctx_create(m, &p, &ctx, err, sizeof err)) {
        fprintf(stderr, "%s\n", err);
        return 1;
    }
    struct pool *pool;
    pool_create(threads_arg, &pool);
    double wbytes = (double)model_weight_bytes(m);
    /* The CPU streams the weights from its caches / DRAM; a device reads them from its own
     * memory, whose bandwidth this program cannot measure: --bandwidth-gbs gives it. */
    double bw = dev_bw > 0 ? dev_bw : measure_bandwidth(pool, (size_t)wbytes);
    double bw_dram = dev_bw > 0 ? dev_bw : measure_bandwidth(pool, (size_t)1 << 30);
    int threads = pool_size(pool);
    pool_destroy(pool);
    double roofline = bw * 1e9 / wbytes;
    double tps[16], cpu_ms[16], pf_cpu_ms = 0;
    for (int i = 0; i < n_batches; i++)
        tps[i] = decode_tps(ctx, batches[i], 64,
                            steps > 0          ? steps
                            : batches[i] >= 16 ? 8
                                               : 16,
                            &cpu_ms[i]);
    double pf = prefill_tps(ctx, 512, chunk, &pf_cpu_ms);

    printf(
        "device %s; model %s: %.1f MB of weights read per token; %d threads; bandwidth streaming a "
        "weights-sized buffer %.1f GB/s (1 GiB buffer: %.1f GB/s) -> batch-1 roofline %.1f "
        "tok/s\n",
        device, path, wbytes / 1e6, threads, bw, bw_dram, roofline);
    for (int i = 0; i < n_batches; i++)
        printf("decode batch %2d: %8.1f tok/s aggregate (%.2fx batch 1), %.2f CPU ms/token\n",
               batches[i], tps[i], tps[i] / tps[0], cpu_ms[i]);
    if (strcmp(device, "cpu") && dev_bw <= 0)
        printf("(roofline above is the CPU's; pass --bandwidth-gbs for the device's)\n");
    printf("decode steps %s\n", model_ctx_samples_on_device(ctx)
                                    ? "sample greedily on the device (token ids back)"
                                    : "return logits to the host");
    printf("batch-1 decode = %.0f%% of roofline; prefill 512 tokens (chunks of %d): %.1f tok/s, "
           "%.2f CPU ms/token\n",
           100.0 * tps[0] / roofline, chunk, pf, pf_cpu_ms);
    if (json) {
        FILE *f = fopen(json, "w");
        if (f) {
            fprintf(
                f,
                "{\"device\": \"%s\", \"model\": \"%s\", \"threads\": %d, \"bandwidth_gbs\": %.2f, "
                "\"bandwidth_1gib_gbs\": %.2f, \"weight_bytes_per_token\": %.0f, "
                "\"roofline_tps\": %.2f, \"prefill_chunk\": %d, \"decode\": {",
                device, path, threads, bw, bw_dram, wbytes, roofline, chunk);
            for (int i = 0; i < n_batches; i++)
                fprintf(f, "%s\"%d\": %.2f", i ? ", " : "", batches[i], tps[i]);
            fprintf(f, "}, \"decode_cpu_ms_per_token\": {");
            for (int i = 0; i < n_batches; i++)
                fprintf(f, "%s\"%d\": %.3f", i ? ", " : "", batches[i], cpu_ms[i]);
            fprintf(f,
                    "}, \"prefill_tps\": %.2f, \"prefill_cpu_ms_per_token\": %.3f, "
                    "\"batch1_roofline_fraction\": %.3f, \"decode_sampled_on_device\": %s}\n",
                    pf, pf_cpu_ms, tps[0] / roofline,
                    model_ctx_samples_on_device(ctx) ? "true" : "false");
            fclose(f);
        }
    }
    if (md) {
        FILE *f = fopen(md, "w");
        if (f) {
            fprintf(f, "# Model throughput (bench/model/bench_model)\n\n");
            fprintf(f,
                    "Model `%s`, %d threads, %.1f MB of weights per token. Read bandwidth "
                    "measured in the same run streaming a buffer the size of the weights: %.1f "
                    "GB/s (a 1 GiB buffer, i.e. DRAM: %.1f GB/s); batch-1 roofline = %.1f GB/s / "
                    "%.1f MB = %.1f tok/s.\n\n",
                    path, threads, wbytes / 1e6, bw, bw_dram, bw, wbytes / 1e6, roofline);
            fprintf(f, "| concurrent sequences | decode tok/s (aggregate) | vs batch 1 "
                       "|\n|---|---|---|\n");
            for (int i = 0; i < n_batches; i++)
                fprintf(f, "| %d | %.1f | %.2fx |\n", batches[i], tps[i], tps[i] / tps[0]);
            fprintf(f,
                    "\nBatch-1 decode: %.0f%% of the bandwidth roofline. Prefill (512-token "
                    "prompt, chunks of %d): %.1f tok/s.\n",
                    100.0 * tps[0] / roofline, chunk, pf);
            fclose(f);
        }
    }
    model_ctx_free(ctx);
    model_free(m);
    return 0;
}
