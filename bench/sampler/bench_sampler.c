/* Sampler timing on one core: microseconds per sampler_sample call for a 262144-token vocab
 * under typical settings. Synthetic logits (normal, sd 3, plus a handful of peaked tokens, a
 * new random row per call) stand in for a model row. Prints a markdown table (recorded in
 * bench/results/sampler.md). Usage: bench_sampler [n_vocab] [calls] */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "krserve.h"
#include "sampler/sampler.h"
#include "util/clock.h"

#define N_ROWS 8

static uint64_t rng_state = 12345;
static double urand(void)
{
    rng_state = rng_state * 6364136223846793005ull + 1442695040888963407ull;
    return ((rng_state >> 11) + 0.5) * 0x1.0p-53;
}

static void fill_row(float *row, int32_t n)
{
    for (int32_t i = 0; i < n; i += 2) {
        double r = sqrt(-2.0 * log(urand())), t = 6.283185307179586 * urand();
        row[i] = (float)(3.0 * r * cos(t));
        if (i + 1 < n) row[i + 1] = (float)(3.0 * r * sin(t));
    }
    for (int k = 0; k < 8; k++) row[(int32_t)(urand() * n)] = 12.0f + 2.0f * (float)k;
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv)
{
    int32_t n_vocab = argc > 1 ? atoi(argv[1]) : 262144;
    int calls = argc > 2 ? atoi(argv[2]) : 200;
    if (n_vocab <= 0 || calls <= 0) return 2;
    float *rows = malloc((size_t)N_ROWS * (size_t)n_vocab * sizeof *rows);
    uint64_t *t = malloc((size_t)calls * sizeof *t);
    int32_t hist[1024];
    if (!rows || !t) return 1;
    for (int r = 0; r < N_ROWS; r++) fill_row(rows + (size_t)r * (size_t)n_vocab, n_vocab);
    for (int i = 0; i < 1024; i++) hist[i] = (int32_t)(urand() * n_vocab);
    struct sampler_scratch *sc;
    if (sampler_scratch_create(n_vocab, &sc) != KRS_OK) return 1;

    struct sampler_logit_bias bias[4] = {{1, -100.0f}, {2, 5.0f}, {3, 1.0f}, {4, -2.0f}};
    struct {
        const char *name;
        float temp, top_p, min_p, rep, pres, freq;
        int top_k, n_top, n_hist, n_bias, skip;
    } cases[] = {
        {"greedy", 0, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0},
        {"greedy, skip_logprob", 0, 1, 0, 1, 0, 0, 0, 0, 0, 0, 1},
        {"greedy + 5 logprobs", 0, 1, 0, 1, 0, 0, 0, 5, 0, 0, 0},
        {"T=1 (full vocab)", 1, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0},
        {"T=0.7 (full vocab)", 0.7f, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0},
        {"T=0.8 top_k=40", 0.8f, 1, 0, 1, 0, 0, 40, 0, 0, 0, 0},
        {"T=0.8 top_k=40 top_p=0.95", 0.8f, 0.95f, 0, 1, 0, 0, 40, 0, 0, 0, 0},
        {"T=0.8 top_k=40 top_p=0.95, skip_logprob", 0.8f, 0.95f, 0, 1, 0, 0, 40, 0, 0, 0, 1},
        {"T=0.8 top_k=1000 top_p=0.9", 0.8f, 0.9f, 0, 1, 0, 0, 1000, 0, 0, 0, 0},
        {"T=1 top_p=0.9", 1, 0.9f, 0, 1, 0, 0, 0, 0, 0, 0, 0},
        {"T=0.7 top_p=0.95", 0.7f, 0.95f, 0, 1, 0, 0, 0, 0, 0, 0, 0},
        {"T=1.5 top_p=0.99 (wide nucleus)", 1.5f, 0.99f, 0, 1, 0, 0, 0, 0, 0, 0, 0},
        {"T=1 min_p=0.05", 1, 1, 0.05f, 1, 0, 0, 0, 0, 0, 0, 0},
        {"llama.cpp-like: T=0.8 k=40 p=0.95 min_p=0.05 rep=1.1/64", 0.8f, 0.95f, 0.05f, 1.1f, 0, 0,
         40, 0, 1024, 0, 0},
        {"OpenAI-like: T=1 pres=0.5 freq=0.5 bias x4 + 20 logprobs", 1, 1, 0, 1, 0.5f, 0.5f, 0, 20,
         1024, 4, 0},
    };
    printf("n_vocab %d, %d calls per case, median / p90 microseconds per call\n\n", n_vocab, calls);
    printf("| case | median us | p90 us |\n|---|---:|---:|\n");
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        struct sampler_params p;
        sampler_params_default(&p);
        p.temperature = cases[c].temp;
        p.top_k = cases[c].top_k;
        p.top_p = cases[c].top_p;
        p.min_p = cases[c].min_p;
        p.repetition_penalty = cases[c].rep;
        p.presence_penalty = cases[c].pres;
        p.frequency_penalty = cases[c].freq;
        p.n_top_logprobs = cases[c].n_top;
        p.logit_bias = bias;
        p.n_logit_bias = cases[c].n_bias;
        p.seed = 42;
        p.skip_logprob = cases[c].skip;
        struct sampler s;
        if (sampler_init(&s, &p, n_vocab) != KRS_OK) return 1;
        struct sampler_result res;
        int32_t nh = cases[c].n_hist;
        for (int i = 0; i < calls; i++) {
            const float *row = rows + (size_t)(i % N_ROWS) * (size_t)n_vocab;
            uint64_t t0 = clock_now_ns();
            int rc =
                sampler_sample(&s, sc, row, n_vocab, hist, nh / 2, hist + nh / 2, nh / 2, &res);
            t[i] = clock_now_ns() - t0;
            if (rc != KRS_OK) return 1;
        }
        qsort(t, (size_t)calls, sizeof *t, cmp_u64);
        printf("| %s | %.1f | %.1f |\n", cases[c].name, t[calls / 2] / 1e3,
               t[(calls * 9) / 10] / 1e3);
    }
    sampler_scratch_free(sc);
    free(rows);
    free(t);
    return 0;
}
