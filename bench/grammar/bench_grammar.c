/* Constrained-decoding cost on one core, for the default model's vocabulary (262,144 tokens):
 * building the vocabulary table once, then per generated token the mask (cache hit or miss),
 * the accept, and the extra time of sampler_sample_masked over sampler_sample. Tokens are
 * chosen at random among the allowed ones (more distinct grammar states than a model's text, so
 * a pessimistic miss rate). Prints a markdown report (bench/results/grammar.md).
 * Usage: bench_grammar [model.gguf] [walks] */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gguf/gguf.h"
#include "grammar/grammar.h"
#include "grammar/grammar_impl.h"
#include "krserve.h"
#include "sampler/sampler.h"
#include "tokenizer/tokenizer.h"
#include "util/clock.h"

static uint64_t rng = 0x9E3779B97F4A7C15ull;
static uint32_t rnd(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (uint32_t)(rng >> 32);
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

struct result {
    uint64_t n, hits, states, flushes;
    uint64_t digest; /* FNV-1a over every mask word of every step: equal digests, equal masks */
    uint64_t *mask_ns, *accept_ns;
};

static void run(const struct grammar_vocab *v, struct grammar *g, int walks, int max_tokens,
                struct result *res)
{
    int32_t n_vocab = grammar_vocab_size(v);
    int32_t *allowed = malloc((size_t)n_vocab * sizeof *allowed);
    for (int w = 0; w < walks; w++) {
        struct grammar_matcher *m = NULL;
        if (grammar_matcher_create(g, v, &m)) exit(1);
        for (int step = 0; step < max_tokens; step++) {
            const uint32_t *mask;
            int32_t n = 0, k = 0, eog = -1;
            uint64_t t0 = clock_now_ns();
            int rc = grammar_matcher_mask(m, &mask, &n);
            if (rc || n == 0) {
                fprintf(stderr, "walk %d step %d: mask rc %d, %d allowed\n", w, step, rc, n);
                exit(1);
            }
            uint64_t t1 = clock_now_ns();
            for (int32_t w = 0; w < v->n_words; w++) {
                res->digest ^= mask[w];
                res->digest *= 0x100000001B3ull;
            }
            for (int32_t t = 0; t < n_vocab; t++)
                if (mask[t >> 5] >> (t & 31) & 1) {
                    allowed[k++] = t;
                    if (v->eog[t]) eog = t;
                }
            int32_t t = allowed[rnd() % (uint32_t)k];
            if (step > max_tokens / 2) {
                if (eog >= 0) t = eog;
                for (int tries = 0; tries < 64 && v->tok_len[t] > 1 && eog < 0; tries++)
                    t = allowed[rnd() % (uint32_t)k];
            }
            uint64_t t2 = clock_now_ns();
            if (grammar_matcher_accept(m, t)) exit(1);
            uint64_t t3 = clock_now_ns();
            res->mask_ns[res->n] = t1 - t0;
            res->accept_ns[res->n] = t3 - t2;
            res->n++;
            if (v->eog[t] || grammar_matcher_done(m)) break;
        }
        struct grammar_matcher_stats st;
        grammar_matcher_get_stats(m, &st);
        res->hits += st.mask_hits;
        res->states += st.states;
        res->flushes += st.flushes;
        grammar_matcher_free(m);
    }
    free(allowed);
}

static double pct(uint64_t *a, uint64_t n, double p)
{
    qsort(a, n, sizeof *a, cmp_u64);
    return n ? (double)a[(uint64_t)(p * (double)(n - 1))] / 1e3 : 0;
}

static double mean(const uint64_t *a, uint64_t n)
{
    double s = 0;
    for (uint64_t i = 0; i < n; i++) s += (double)a[i];
    return n ? s / (double)n / 1e3 : 0;
}

int main(int argc, char **argv)
{
    const char *path = argc > 1 ? argv[1] : "models/default.gguf";
    int walks = argc > 2 ? atoi(argv[2]) : 20;
    char err[256];
    struct gguf_file *f;
    struct tokenizer *tok;
    if (gguf_open(path, &f, err, sizeof err) || tokenizer_load(f, &tok, err, sizeof err)) {
        fprintf(stderr, "%s: %s\n", path, err);
        return 1;
    }
    uint64_t t0 = clock_now_ns();
    struct grammar_vocab *v;
    if (grammar_vocab_create(tok, &v)) return 1;
    double vocab_ms = (double)(clock_now_ns() - t0) / 1e6;
    int32_t n_vocab = grammar_vocab_size(v);

    static const struct {
        const char *name, *schema;
        int max_tokens;
    } cases[] = {
        {"json_schema: object (string maxLength 40, integer 0..999, enum array, boolean)",
         "{\"type\":\"object\",\"properties\":{\"name\":{\"type\":\"string\",\"maxLength\":40},"
         "\"age\":{\"type\":\"integer\",\"minimum\":0,\"maximum\":999},\"tags\":{\"type\":"
         "\"array\",\"items\":{\"enum\":[\"red\",\"green\",\"blue\"]},\"maxItems\":4},"
         "\"ok\":{\"type\":\"boolean\"}},\"required\":[\"name\",\"age\",\"tags\",\"ok\"]}",
         120},
        {"json_schema: array of 1..8 objects {id: integer, title: string}",
         "{\"type\":\"array\",\"minItems\":1,\"maxItems\":8,\"items\":{\"type\":\"object\","
         "\"properties\":{\"id\":{\"type\":\"integer\"},\"title\":{\"type\":\"string\","
         "\"maxLength\":30}},\"required\":[\"id\",\"title\"]}}",
         200},
        {"json_schema: serve_grammar.py's (24 strings, maxLength 40)",
         "{\"type\":\"object\",\"properties\":{\"items\":{\"type\":\"array\",\"items\":"
         "{\"type\":\"string\",\"maxLength\":40},\"minItems\":24,\"maxItems\":24}},"
         "\"required\":[\"items\"]}",
         200},
        {"json_object (any JSON object)", NULL, 120},
    };
    printf("# grammar: constrained-decoding cost per token\n\n");
    printf("`bench/grammar/bench_grammar.c` on `%s` (n_vocab %d), one core, %d random walks per "
           "case\n(tokens drawn uniformly among the allowed ones: more distinct grammar states "
           "than model text,\nso a pessimistic cache-miss rate). Vocabulary table built once per "
           "model: %.0f ms.\n\n",
           path, n_vocab, walks, vocab_ms);
    uint64_t digests[sizeof cases / sizeof cases[0]];
    printf("| case | tokens | mask hit rate | mask mean us | mask p50 us | mask p99 us | "
           "accept mean us | states/walk |\n|---|---:|---:|---:|---:|---:|---:|---:|\n");
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        struct grammar *g;
        const char *s = cases[c].schema;
        if (grammar_compile_json_schema(s, s ? strlen(s) : 0, &g, err, sizeof err)) {
            fprintf(stderr, "%s\n", err);
            return 1;
        }
        size_t cap = (size_t)walks * (size_t)cases[c].max_tokens;
        struct result r = {.digest = 0xCBF29CE484222325ull};
        r.mask_ns = malloc(cap * sizeof *r.mask_ns);
        r.accept_ns = malloc(cap * sizeof *r.accept_ns);
        run(v, g, walks, cases[c].max_tokens, &r);
        double mm = mean(r.mask_ns, r.n), am = mean(r.accept_ns, r.n);
        printf("| %s | %llu | %.1f %% | %.0f | %.1f | %.0f | %.1f | %.0f |\n", cases[c].name,
               (unsigned long long)r.n, 100.0 * (double)r.hits / (double)r.n, mm,
               pct(r.mask_ns, r.n, 0.5), pct(r.mask_ns, r.n, 0.99), am, (double)r.states / walks);
        digests[c] = r.digest;
        free(r.mask_ns);
        free(r.accept_ns);
        grammar_release(g);
    }

    printf("\nmask digests (FNV-1a of every mask, per case):");
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++)
        printf(" %016llx", (unsigned long long)digests[c]);
    printf("\n");

    /* the sampler's extra pass for the mask: real masks of json_object, at the start (few
     * tokens: '{' and whitespace) and inside a string (most of the vocabulary) */
    float *row = malloc((size_t)n_vocab * sizeof *row);
    for (int32_t i = 0; i < n_vocab; i++) row[i] = (float)(rnd() % 2000) / 100.0f;
    struct grammar *g;
    struct grammar_matcher *m;
    const uint32_t *masks[2];
    uint32_t *copies[2];
    int32_t n_allowed[2];
    grammar_compile_json_schema(NULL, 0, &g, err, sizeof err);
    grammar_matcher_create(g, v, &m);
    for (int k = 0; k < 2; k++) {
        grammar_matcher_mask(m, &masks[k], &n_allowed[k]);
        copies[k] = malloc((size_t)v->n_words * sizeof(uint32_t));
        memcpy(copies[k], masks[k], (size_t)v->n_words * sizeof(uint32_t));
        if (k == 0) /* {"a": " */
            for (const char *p = "{\"a\": \""; *p; p++)
                grammar_matcher_accept(m, (int32_t)tokenizer_find(tok, p, 1));
    }
    struct sampler_scratch *sc;
    struct sampler sp;
    struct sampler_params p;
    sampler_params_default(&p);
    p.top_k = 40;
    p.temperature = 0.8f;
    sampler_scratch_create(n_vocab, &sc);
    sampler_init(&sp, &p, n_vocab);
    uint64_t tt[3] = {0, 0, 0};
    struct sampler_result out;
    for (int rep = 0; rep < 200; rep++)
        for (int k = 0; k < 3; k++) {
            uint64_t a = clock_now_ns();
            sampler_sample_masked(&sp, sc, row, n_vocab, k ? copies[k - 1] : NULL, NULL, 0, NULL, 0,
                                  &out);
            tt[k] += clock_now_ns() - a;
        }
    printf("\nsampler_sample (T=0.8, top_k=40), mean of 200 calls: %.0f us without a mask, %.0f "
           "us with json_object's first mask (%d tokens allowed), %.0f us with its mask inside a "
           "string (%d allowed).\n",
           (double)tt[0] / 200e3, (double)tt[1] / 200e3, n_allowed[0], (double)tt[2] / 200e3,
           n_allowed[1]);
    grammar_matcher_free(m);
    grammar_release(g);
    free(copies[0]);
    free(copies[1]);
    sampler_scratch_free(sc);
    free(row);
    grammar_vocab_free(v);
    tokenizer_free(tok);
    gguf_close(f);
    return 0;
}
