/* Constrained-decoding cost on one core, for the default model's vocabulary (262,144 tokens):
 * building the vocabulary table once, then per generated token the mask (cache hit or miss),
 * the accept, and the extra time of sampler_sample_masked over sampler_sample. Tokens are
 * chosen at random among the allowed ones (more distinct grammar states than a model's text, so
 * a pessimistic miss rate). Prints a markdown report (bench/results/grammar.md).
 * Each case runs at batch 1 and batch 16, with the mask cache keyed by state (the matcher
 * before mask keys), by mask key, and by mask key with the shared cache, on the same walks (the
 * masks must be the same).
 * Usage: bench_grammar [model.gguf] [walks at batch 1] [groups of 16 at batch 16] */
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
    uint64_t n, hits, shared, states, flushes, steps;
    uint64_t digest; /* FNV-1a over every mask word of every step: equal digests, equal masks */
    uint64_t *mask_ns, *accept_ns;
    uint64_t *step_ns; /* per step: the masks of every live row of the batch, one after another */
};

/* `groups` times: `batch` matchers walk side by side, one token each per step (as the
 * scheduler's rows do); key_mode as in grammar_matcher_set_key_mode. */
static void run(const struct grammar_vocab *v, struct grammar *g, int groups, int batch,
                int key_mode, int max_tokens, struct result *res)
{
    int32_t n_vocab = grammar_vocab_size(v);
    int32_t *allowed = malloc((size_t)n_vocab * sizeof *allowed);
    struct grammar_matcher *m[64];
    int live[64];
    for (int grp = 0; grp < groups; grp++) {
        for (int b = 0; b < batch; b++) {
            if (grammar_matcher_create(g, v, &m[b])) exit(1);
            grammar_matcher_set_key_mode(m[b], key_mode);
            live[b] = 1;
        }
        for (int step = 0; step < max_tokens; step++) {
            uint64_t step_ns = 0;
            int any = 0;
            for (int b = 0; b < batch; b++) {
                if (!live[b]) continue;
                any = 1;
                const uint32_t *mask;
                int32_t n = 0, k = 0, eog = -1;
                uint64_t t0 = clock_now_ns();
                int rc = grammar_matcher_mask(m[b], &mask, &n);
                uint64_t t1 = clock_now_ns();
                if (rc || n == 0) {
                    fprintf(stderr, "row %d step %d: mask rc %d, %d allowed\n", b, step, rc, n);
                    exit(1);
                }
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
                if (grammar_matcher_accept(m[b], t)) exit(1);
                uint64_t t3 = clock_now_ns();
                res->mask_ns[res->n] = t1 - t0;
                res->accept_ns[res->n] = t3 - t2;
                res->n++;
                step_ns += t1 - t0;
                if (v->eog[t] || grammar_matcher_done(m[b])) live[b] = 0;
            }
            if (!any) break;
            res->step_ns[res->steps++] = step_ns;
        }
        for (int b = 0; b < batch; b++) {
            struct grammar_matcher_stats st;
            grammar_matcher_get_stats(m[b], &st);
            res->hits += st.mask_hits;
            res->shared += st.mask_shared;
            res->states += st.states;
            res->flushes += st.flushes;
            grammar_matcher_free(m[b]);
        }
    }
    free(allowed);
}

static const char *const MODES[3] = {"state", "mask", "mask+shared"};

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
    int groups16 = argc > 3 ? atoi(argv[3]) : 1;
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
    printf(
        "`bench/grammar/bench_grammar.c` on `%s` (n_vocab %d, max_lead %d), one core; batch 1: "
        "%d walks, batch 16: %d groups of 16 matchers stepping side by side (per step: the "
        "16 rows' masks one after another). Tokens drawn uniformly among the allowed ones. "
        "Keys: `state` = each matcher's mask cache keyed by its state (before), `mask` = by mask "
        "key, `mask+shared` = by mask key and shared by the matchers of the vocabulary (after; "
        "emptied before each row of the table). Hit rate counts both caches. Vocabulary table "
        "built once per model: %.0f ms.\n\n",
        path, n_vocab, v->max_lead, walks, groups16, vocab_ms);
    uint64_t digests[sizeof cases / sizeof cases[0]];
    printf("| case | batch | keys | tokens | mask hit rate | mask mean us | mask p50 us | mask p99 "
           "us | step masks mean us | step masks p99 us | accept mean us | states/matcher "
           "|\n|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        struct grammar *g;
        const char *s = cases[c].schema;
        if (grammar_compile_json_schema(s, s ? strlen(s) : 0, &g, err, sizeof err)) {
            fprintf(stderr, "%s\n", err);
            return 1;
        }
        uint64_t ref = 0, walk_seed = 0;
        for (int cfg = 0; cfg < 6; cfg++) {
            int batch = cfg < 3 ? 1 : 16, groups = batch == 1 ? walks : groups16;
            int key_mode = cfg % 3;
            grammar_mask_cache_clear(v->shared); /* each configuration starts cold */
            size_t cap = (size_t)groups * (size_t)batch * (size_t)cases[c].max_tokens;
            struct result r = {.digest = 0xCBF29CE484222325ull};
            r.mask_ns = malloc(cap * sizeof *r.mask_ns);
            r.accept_ns = malloc(cap * sizeof *r.accept_ns);
            r.step_ns = malloc(cap * sizeof *r.step_ns);
            if (key_mode == 0)
                walk_seed = rng;
            else
                rng = walk_seed; /* the same walks with the other keys */
            run(v, g, groups, batch, key_mode, cases[c].max_tokens, &r);
            if (key_mode == 0) {
                ref = r.digest;
                if (batch == 1) digests[c] = r.digest;
            } else if (r.digest != ref) {
                fprintf(stderr, "%s: masks differ between state and mask keys\n", cases[c].name);
                return 1;
            }
            double mm = mean(r.mask_ns, r.n), am = mean(r.accept_ns, r.n);
            double sm = mean(r.step_ns, r.steps);
            printf("| %s | %d | %s | %llu | %.1f %% | %.1f | %.1f | %.0f | %.0f | %.0f | %.1f | "
                   "%.0f |\n",
                   cases[c].name, batch, MODES[key_mode], (unsigned long long)r.n,
                   100.0 * (double)(r.hits + r.shared) / (double)r.n, mm, pct(r.mask_ns, r.n, 0.5),
                   pct(r.mask_ns, r.n, 0.99), sm, pct(r.step_ns, r.steps, 0.99), am,
                   (double)r.states / (groups * batch));
            free(r.mask_ns);
            free(r.accept_ns);
            free(r.step_ns);
        }
        grammar_release(g);
    }

    printf("\nmask digests (FNV-1a of every mask of the batch-1 walks, per case):");
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
