/* bench_sched: the scheduler in-process on a real model, modes off / fixed 4 / auto compared in
 * one run.
 *
 * For each mode and each concurrency c in {1, 2, 4, 8, 16, 32}: c client threads each submit
 * `rounds` requests one after the other (closed loop; prompt of ~20 tokens, max_tokens G,
 * ignore_eos, greedy). Measured from the clients' side: aggregate generated tok/s, TTFT and
 * inter-token latency P50/P95/P99, end-to-end request latency P50/P99; from the engine: the
 * batch-limit trace (sampled every 50 ms) and its spread in the second half of the run.
 *
 * usage: bench_sched [MODEL] [--gen G] [--rounds R] [--json OUT] [--md OUT] */
#include "engine/engine.h"
#include "krserve.h"
#include "model/model.h"
#include "sched/sched.h"
#include "tokenizer/tokenizer.h"
#include "util/alloc.h"
#include "util/clock.h"
#include "util/log.h"

#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_SAMPLES 200000

struct samples {
    double *v;
    _Atomic int n;
};

static void add(struct samples *s, double x)
{
    int i = atomic_fetch_add(&s->n, 1);
    if (i < MAX_SAMPLES) s->v[i] = x;
}

static int cmp_d(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double pct(struct samples *s, double q)
{
    int n = atomic_load(&s->n);
    if (n > MAX_SAMPLES) n = MAX_SAMPLES;
    if (n == 0) return 0;
    qsort(s->v, (size_t)n, sizeof(double), cmp_d);
    int i = (int)ceil(q * n) - 1;
    return s->v[i < 0 ? 0 : i];
}

struct run {
    struct sched *s;
    const struct tokenizer *tok;
    int gen, rounds;
    struct samples ttft, itl, e2e;
    _Atomic long tokens;
};

static const char *const prompts[] = {
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a refrigerator keeps food cold, in simple terms for a child.",
    "List the planets of the solar system and one fact about each of them.",
    "What are the main differences between a violin and a viola?",
};

static void *client(void *arg)
{
    struct run *r = arg;
    static _Atomic int counter;
    int me = atomic_fetch_add(&counter, 1);
    for (int round = 0; round < r->rounds; round++) {
        const char *p = prompts[(me + round) % 4];
        int32_t ids[128];
        size_t n = 0;
        tokenizer_encode(r->tok, p, strlen(p), 1, 0, ids, 128, &n);
        struct sched_request req = {.prompt = ids, .n_prompt = (int)n, .max_tokens = r->gen};
        sampler_params_default(&req.sampling);
        req.sampling.temperature = 0;
        req.ignore_eos = 1;
        req.priority = SCHED_PRIO_DEFAULT;
        struct sched_stream *st;
        uint64_t id, t0 = clock_now_ns(), last = 0;
        while (sched_submit(r->s, &req, &st, &id) != KRS_OK) clock_sleep_us(1000);
        struct sched_event ev;
        while (sched_stream_read(st, &ev, -1) == KRS_OK) {
            uint64_t now = clock_now_ns();
            if (ev.kind == SCHED_EV_FINISH) {
                add(&r->e2e, (now - t0) / 1e6);
                atomic_fetch_add(&r->tokens, ev.n_gen_tokens);
                break;
            }
            if (ev.token < 0) continue;
            if (!last)
                add(&r->ttft, (now - t0) / 1e6);
            else
                add(&r->itl, (now - last) / 1e6);
            last = now;
        }
        sched_stream_release(st);
    }
    return NULL;
}

struct cell {
    double tps, ttft[3], itl[3], e2e[2], limit_mean, limit_spread;
    int limit_min, limit_max;
};

static void run_cell(const struct model *m, const struct tokenizer *tok, enum sched_mode mode,
                     int conc, int gen, int rounds, struct cell *out, FILE *trace)
{
    struct krs_config cfg;
    config_defaults(&cfg);
    struct sched_params sp;
    engine_sched_params(&cfg, &sp);
    sp.mode = mode;
    sp.fixed_batch = 4;
    sp.max_running = 32;
    sp.auto_max_batch = 32;
    sp.kv_tokens = 32 * 160;
    sp.max_ctx = 512;
    struct sched *s;
    char err[256];
    if (sched_create(m, tok, &sp, NULL, &s, err, sizeof err)) {
        fprintf(stderr, "%s\n", err);
        exit(1);
    }
    struct run r = {.s = s, .tok = tok, .gen = gen, .rounds = rounds};
    r.ttft.v = alloc_malloc(MAX_SAMPLES * sizeof(double));
    r.itl.v = alloc_malloc(MAX_SAMPLES * sizeof(double));
    r.e2e.v = alloc_malloc(MAX_SAMPLES * sizeof(double));
    pthread_t th[64];
    uint64_t t0 = clock_now_ns();
    for (int i = 0; i < conc; i++) pthread_create(&th[i], NULL, client, &r);
    /* Batch-limit trace while the clients run. */
    int limits[20000], n_lim = 0;
    for (;;) {
        struct sched_state st;
        sched_get_state(s, &st);
        if (n_lim < 20000) limits[n_lim++] = st.batch_limit;
        uint64_t done = 0;
        for (int f = 0; f < 5; f++) done += st.finished[f];
        if (done >= (uint64_t)(conc * rounds)) break;
        clock_sleep_us(50000);
    }
    for (int i = 0; i < conc; i++) pthread_join(th[i], NULL);
    double secs = (clock_now_ns() - t0) / 1e9;
    out->tps = atomic_load(&r.tokens) / secs;
    out->ttft[0] = pct(&r.ttft, .5), out->ttft[1] = pct(&r.ttft, .95),
    out->ttft[2] = pct(&r.ttft, .99);
    out->itl[0] = pct(&r.itl, .5), out->itl[1] = pct(&r.itl, .95), out->itl[2] = pct(&r.itl, .99);
    out->e2e[0] = pct(&r.e2e, .5), out->e2e[1] = pct(&r.e2e, .99);
    double sum = 0;
    int from = n_lim / 2, cnt = 0;
    out->limit_min = 1 << 30, out->limit_max = 0;
    for (int i = from; i < n_lim; i++) {
        sum += limits[i];
        cnt++;
        if (limits[i] < out->limit_min) out->limit_min = limits[i];
        if (limits[i] > out->limit_max) out->limit_max = limits[i];
    }
    out->limit_mean = cnt ? sum / cnt : 0;
    out->limit_spread =
        out->limit_mean > 0 ? (out->limit_max - out->limit_min) / 2.0 / out->limit_mean : 0;
    if (trace) {
        fprintf(trace, "%s,%d", sched_mode_name(mode), conc);
        for (int i = 0; i < n_lim; i++) fprintf(trace, ",%d", limits[i]);
        fprintf(trace, "\n");
    }
    alloc_free(r.ttft.v);
    alloc_free(r.itl.v);
    alloc_free(r.e2e.v);
    sched_destroy(s);
}

int main(int argc, char **argv)
{
    const char *path = "models/default.gguf", *json = NULL, *md = NULL, *trace_path = NULL;
    int gen = 24, rounds = 2;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--json") && i + 1 < argc)
            json = argv[++i];
        else if (!strcmp(argv[i], "--md") && i + 1 < argc)
            md = argv[++i];
        else if (!strcmp(argv[i], "--trace") && i + 1 < argc)
            trace_path = argv[++i];
        else if (!strcmp(argv[i], "--gen") && i + 1 < argc)
            gen = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--rounds") && i + 1 < argc)
            rounds = atoi(argv[++i]);
        else
            path = argv[i];
    }
    log_set_level(KRS_LOG_WARN);
    struct model *m;
    struct tokenizer *tok;
    char err[256];
    if (model_load(path, &m, err, sizeof err) ||
        tokenizer_load(model_gguf(m), &tok, err, sizeof err)) {
        fprintf(stderr, "%s: %s\n", path, err);
        return 1;
    }
    static const int concs[] = {1, 2, 4, 8, 16, 32};
    static const enum sched_mode modes[] = {SCHED_MODE_OFF, SCHED_MODE_FIXED, SCHED_MODE_AUTO};
    static const char *const mode_label[] = {"off", "fixed 4", "auto"};
    struct cell cells[3][6];
    FILE *trace = trace_path ? fopen(trace_path, "w") : NULL;
    for (int c = 0; c < 6; c++)
        for (int mi = 0; mi < 3; mi++) {
            run_cell(m, tok, modes[mi], concs[c], gen, rounds, &cells[mi][c], trace);
            struct cell *x = &cells[mi][c];
            printf("%-8s c=%2d  %7.1f tok/s  ttft p50/p95/p99 %6.0f/%6.0f/%6.0f ms  itl "
                   "%5.0f/%5.0f/%5.0f ms  e2e p50/p99 %6.0f/%6.0f ms  limit %.1f [%d..%d]\n",
                   mode_label[mi], concs[c], x->tps, x->ttft[0], x->ttft[1], x->ttft[2], x->itl[0],
                   x->itl[1], x->itl[2], x->e2e[0], x->e2e[1], x->limit_mean, x->limit_min,
                   x->limit_max);
            fflush(stdout);
        }
    if (trace) fclose(trace);
    if (json) {
        FILE *f = fopen(json, "w");
        fprintf(f, "{\"model\": \"%s\", \"gen_tokens\": %d, \"rounds\": %d, \"cells\": [", path,
                gen, rounds);
        for (int c = 0, first = 1; c < 6; c++)
            for (int mi = 0; mi < 3; mi++, first = 0) {
                struct cell *x = &cells[mi][c];
                fprintf(f,
                        "%s{\"mode\": \"%s\", \"concurrency\": %d, \"tok_s\": %.2f, \"ttft_ms\": "
                        "[%.1f, %.1f, %.1f], \"itl_ms\": [%.1f, %.1f, %.1f], \"e2e_ms_p50_p99\": "
                        "[%.1f, %.1f], \"limit_mean\": %.2f, \"limit_min\": %d, \"limit_max\": %d}",
                        first ? "" : ", ", mode_label[mi], concs[c], x->tps, x->ttft[0], x->ttft[1],
                        x->ttft[2], x->itl[0], x->itl[1], x->itl[2], x->e2e[0], x->e2e[1],
                        x->limit_mean, x->limit_min, x->limit_max);
            }
        fprintf(f, "]}\n");
        fclose(f);
    }
    if (md) {
        FILE *f = fopen(md, "w");
        fprintf(f, "# Scheduler benchmark (bench/sched/bench_sched)\n\n");
        fprintf(f,
                "Model `%s`; each client runs %d requests back to back (prompt ~20 tokens, %d "
                "generated, greedy, ignore_eos). Latencies as the clients see them.\n\n",
                path, rounds, gen);
        fprintf(f, "| mode | clients | tok/s | TTFT p50/p95/p99 ms | inter-token p50/p95/p99 ms | "
                   "e2e p50/p99 ms | batch limit mean [min..max], 2nd half "
                   "|\n|---|---|---|---|---|---|---|\n");
        for (int c = 0; c < 6; c++)
            for (int mi = 0; mi < 3; mi++) {
                struct cell *x = &cells[mi][c];
                fprintf(f,
                        "| %s | %d | %.1f | %.0f / %.0f / %.0f | %.0f / %.0f / %.0f | %.0f / %.0f "
                        "| %.1f [%d..%d] |\n",
                        mode_label[mi], concs[c], x->tps, x->ttft[0], x->ttft[1], x->ttft[2],
                        x->itl[0], x->itl[1], x->itl[2], x->e2e[0], x->e2e[1], x->limit_mean,
                        x->limit_min, x->limit_max);
            }
        int c16 = 4;
        fprintf(f,
                "\nAt 16 clients: auto / off throughput = %.2fx; auto vs fixed 4: throughput "
                "%+.0f%%, e2e P99 %+.0f%%.\n",
                cells[2][c16].tps / cells[0][c16].tps,
                100.0 * (cells[2][c16].tps / cells[1][c16].tps - 1),
                100.0 * (cells[2][c16].e2e[1] / cells[1][c16].e2e[1] - 1));
        fclose(f);
    }
    tokenizer_free(tok);
    model_free(m);
    return 0;
}
