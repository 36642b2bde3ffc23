/* The vocabulary as the matcher sees it: every token's bytes (tokenizer_token_piece without
 * specials), and the tokens sorted by those bytes with the common prefix of neighbours, which
 * turns the mask computation into a walk of an implicit token trie (grammar_match.c). Built once
 * per model; immutable afterwards. */
#include "grammar/grammar_impl.h"

#include "krserve.h"
#include "tokenizer/tokenizer.h"
#include "util/alloc.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

static const struct grammar_vocab *sort_vocab; /* qsort has no context argument */

static int cmp_tok(const void *pa, const void *pb)
{
    const struct grammar_vocab *v = sort_vocab;
    int32_t a = *(const int32_t *)pa, b = *(const int32_t *)pb;
    size_t la = v->tok_len[a], lb = v->tok_len[b];
    int c = memcmp(v->bytes + v->tok_off[a], v->bytes + v->tok_off[b], la < lb ? la : lb);
    if (c) return c;
    return la < lb ? -1 : la > lb;
}

void grammar_vocab_free(struct grammar_vocab *v)
{
    if (!v) return;
    alloc_free(v->order);
    alloc_free(v->off);
    alloc_free(v->len);
    alloc_free(v->lcp);
    alloc_free(v->bytes);
    alloc_free(v->tok_off);
    alloc_free(v->tok_len);
    alloc_free(v->eog);
    alloc_free(v);
}

int32_t grammar_vocab_size(const struct grammar_vocab *v)
{
    return v->n_vocab;
}

/* Sorts the tokens with text and computes the common prefixes. */
static int vocab_finish(struct grammar_vocab *v)
{
    static pthread_mutex_t sort_lock = PTHREAD_MUTEX_INITIALIZER;
    pthread_mutex_lock(&sort_lock);
    sort_vocab = v;
    qsort(v->order, (size_t)v->n_sorted, sizeof *v->order, cmp_tok);
    pthread_mutex_unlock(&sort_lock);
    v->off = alloc_malloc((size_t)v->n_sorted * sizeof *v->off + 1);
    v->len = alloc_malloc((size_t)v->n_sorted * sizeof *v->len + 1);
    v->lcp = alloc_malloc((size_t)v->n_sorted * sizeof *v->lcp + 1);
    if (!v->off || !v->len || !v->lcp) return KRS_ERR_NOMEM;
    for (int32_t i = 0; i < v->n_sorted; i++) {
        int32_t t = v->order[i];
        v->off[i] = v->tok_off[t];
        v->len[i] = v->tok_len[t];
        uint16_t l = 0;
        if (i > 0) {
            const uint8_t *a = v->bytes + v->off[i - 1], *b = v->bytes + v->off[i];
            uint16_t m = v->len[i - 1] < v->len[i] ? v->len[i - 1] : v->len[i];
            while (l < m && a[l] == b[l]) l++;
        }
        v->lcp[i] = l;
    }
    return KRS_OK;
}

/* Empty vocabulary of n tokens with room for `cap` bytes of text. */
static struct grammar_vocab *vocab_new(int32_t n, size_t cap)
{
    struct grammar_vocab *v = alloc_calloc(1, sizeof *v);
    if (!v) return NULL;
    v->n_vocab = n;
    v->bytes = alloc_malloc(cap ? cap : 1);
    v->tok_off = alloc_calloc((size_t)n, sizeof *v->tok_off);
    v->tok_len = alloc_calloc((size_t)n, sizeof *v->tok_len);
    v->eog = alloc_calloc((size_t)n, 1);
    v->order = alloc_malloc((size_t)n * sizeof *v->order);
    if (!v->bytes || !v->tok_off || !v->tok_len || !v->eog || !v->order) {
        grammar_vocab_free(v);
        return NULL;
    }
    return v;
}

/* Appends token t's text (tokens in id order). */
static void vocab_add(struct grammar_vocab *v, size_t *used, int32_t t, const char *s, size_t len)
{
    memcpy(v->bytes + *used, s, len);
    v->tok_off[t] = (uint32_t)*used;
    v->tok_len[t] = (uint16_t)len;
    if (len > v->max_len) v->max_len = (uint16_t)len;
    *used += len;
    if (len) v->order[v->n_sorted++] = t;
}

int grammar_vocab_create_raw(int32_t n, const char *const *text, const size_t *len,
                             const uint8_t *eog, struct grammar_vocab **out)
{
    *out = NULL;
    if (n <= 0) return KRS_ERR_INVALID;
    size_t total = 0;
    for (int32_t t = 0; t < n; t++) {
        if (len[t] > UINT16_MAX) return KRS_ERR_INVALID;
        total += len[t];
    }
    struct grammar_vocab *v = vocab_new(n, total);
    if (!v) return KRS_ERR_NOMEM;
    size_t used = 0;
    for (int32_t t = 0; t < n; t++) {
        vocab_add(v, &used, t, text[t], len[t]);
        v->eog[t] = eog ? eog[t] : 0;
    }
    if (vocab_finish(v)) {
        grammar_vocab_free(v);
        return KRS_ERR_NOMEM;
    }
    *out = v;
    return KRS_OK;
}

int grammar_vocab_create(const struct tokenizer *tok, struct grammar_vocab **out)
{
    *out = NULL;
    int32_t n = (int32_t)tokenizer_n_vocab(tok);
    if (n <= 0) return KRS_ERR_INVALID;
    size_t max_piece = tokenizer_max_piece(tok), total = 0, len = 0;
    char *buf = alloc_malloc(max_piece + 16);
    if (!buf) return KRS_ERR_NOMEM;
    for (int32_t t = 0; t < n; t++)
        if (!tokenizer_token_piece(tok, t, 0, buf, max_piece + 16, &len) && len <= UINT16_MAX)
            total += len;
    struct grammar_vocab *v = vocab_new(n, total);
    int rc = KRS_ERR_NOMEM;
    if (!v) goto out;
    size_t used = 0;
    for (int32_t t = 0; t < n; t++) {
        if (tokenizer_token_piece(tok, t, 0, buf, max_piece + 16, &len) || len > UINT16_MAX)
            len = 0;
        vocab_add(v, &used, t, buf, len);
        v->eog[t] = (uint8_t)tokenizer_is_eog(tok, t);
    }
    rc = vocab_finish(v);
out:
    alloc_free(buf);
    if (rc) {
        grammar_vocab_free(v);
        return rc;
    }
    *out = v;
    return KRS_OK;
}
