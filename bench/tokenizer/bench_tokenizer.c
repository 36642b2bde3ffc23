/* Tokenizer throughput on one core: load time of the default model's vocabulary, then encode
 * 1 MB of English-like text (deterministic word salad with punctuation and newlines) a few times
 * and report the best run, plus whole-sequence and streaming decode of the result.
 * usage: bench_tokenizer [MODEL.gguf] [MB] */
#include "gguf/gguf.h"
#include "krserve.h"
#include "tokenizer/tokenizer.h"
#include "util/alloc.h"
#include "util/clock.h"

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

static const char *words[] = {
    "the",       "of",        "and",       "to",         "in",         "a",        "is",
    "that",      "for",       "it",        "as",         "was",        "with",     "be",
    "by",        "on",        "not",       "he",         "I",          "this",     "are",
    "or",        "his",       "from",      "at",         "which",      "but",      "have",
    "an",        "had",       "they",      "you",        "were",       "their",    "one",
    "all",       "we",        "can",       "her",        "has",        "there",    "been",
    "model",     "server",    "request",   "latency",    "throughput", "token",    "batch",
    "memory",    "question",  "answer",    "government", "history",    "between",  "important",
    "different", "following", "something", "thousand",   "beautiful",  "mountain", "river",
    "London",    "Tuesday",   "2024",      "42",         "3.14",       "don't",    "it's",
};

int main(int argc, char **argv)
{
    const char *path = argc > 1 ? argv[1] : "models/default.gguf";
    size_t mb = argc > 2 ? (size_t)atoi(argv[2]) : 1;
    size_t target = mb << 20;
    char err[256];
    struct gguf_file *f;
    if (gguf_open(path, &f, err, sizeof err)) {
        fprintf(stderr, "bench_tokenizer: %s: %s\n", path, err);
        return 1;
    }
    struct tokenizer *tok;
    double t0 = now_s();
    if (tokenizer_load(f, &tok, err, sizeof err)) {
        fprintf(stderr, "bench_tokenizer: %s\n", err);
        return 1;
    }
    double t_load = now_s() - t0;
    gguf_close(f);

    char *text = malloc(target + 64);
    size_t len = 0, nw = sizeof words / sizeof *words;
    uint64_t s = 12345;
    int sentence = 0;
    while (len < target) {
        s = s * 6364136223846793005ull + 1442695040888963407ull;
        const char *w = words[(s >> 33) % nw];
        size_t wl = strlen(w);
        if (len) text[len++] = ' ';
        memcpy(text + len, w, wl);
        if (sentence == 0 && text[len] >= 'a' && text[len] <= 'z') text[len] -= 32;
        len += wl;
        if (++sentence > 8 + (int)((s >> 20) % 12)) {
            text[len++] = (s >> 40) % 5 ? '.' : ',';
            if ((s >> 45) % 7 == 0) text[len++] = '\n';
            sentence = 0;
        }
    }
    size_t cap = len + 16, n = 0;
    int32_t *ids = malloc(cap * sizeof *ids);
    double best = 1e9;
    for (int r = 0; r < 3; r++) {
        t0 = now_s();
        int rc = tokenizer_encode(tok, text, len, 1, 0, ids, cap, &n);
        double dt = now_s() - t0;
        if (rc) {
            fprintf(stderr, "encode: %s\n", krs_status_str(rc));
            return 1;
        }
        if (dt < best) best = dt;
    }
    char *out = malloc(len + 64);
    size_t m;
    t0 = now_s();
    tokenizer_decode(tok, ids, n, 0, out, len + 64, &m);
    double t_dec = now_s() - t0;
    struct detok_state st;
    tokenizer_detok_init(&st, 0);
    char piece[1024];
    size_t total = 0;
    t0 = now_s();
    for (size_t i = 0; i < n; i++) {
        tokenizer_detok_push(tok, &st, ids[i], piece, sizeof piece, &m);
        total += m;
    }
    double t_stream = now_s() - t0;
    printf("model        %s (vocab %u)\n", path, tokenizer_n_vocab(tok));
    printf("load         %.1f ms\n", t_load * 1e3);
    printf("encode       %.2f MB in %.3f s (best of 3): %.2f MB/s, %zu tokens, %.2f bytes/token\n",
           (double)len / (1 << 20), best, (double)len / (1 << 20) / best, n, (double)len / n);
    printf("decode       %.3f s; streaming %.3f s (%.0f ns/token)\n", t_dec, t_stream,
           t_stream * 1e9 / (double)n);
    (void)total;
    tokenizer_free(tok);
    free(text);
    free(ids);
    free(out);
    return 0;
}
