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

static void list_free(struct grammar_toklist *l)
{
    alloc_free(l->order);
    alloc_free(l->off);
    alloc_free(l->bytes);
    alloc_free(l->len);
    alloc_free(l->lcp);
    alloc_free(l->node_off);
    alloc_free(l->node_end);
}

void grammar_vocab_free(struct grammar_vocab *v)
{
    if (!v) return;
    list_free(&v->all);
    list_free(&v->rest);
    alloc_free(v->bytes);
    alloc_free(v->tok_off);
    alloc_free(v->tok_len);
    alloc_free(v->eog);
    alloc_free(v->eog_ids);
    alloc_free(v->plain_cps);
    alloc_free(v->plain_le);
    alloc_free(v->plain_long);
    alloc_free(v->tok_long);
    alloc_free(v->long_ids);
    grammar_mask_cache_free(v->shared);
    alloc_free(v);
}

int32_t grammar_vocab_size(const struct grammar_vocab *v)
{
    return v->n_vocab;
}

/* Code points of a plain token (see grammar_impl.h), 0 when it is not plain. */
static int plain_count(const uint8_t *s, size_t n)
{
    int cps = 0;
    for (size_t i = 0; i < n;) {
        unsigned c = s[i];
        size_t len = c < 0x80                 ? 1
                     : c >= 0xC2 && c <= 0xDF ? 2
                     : c >= 0xE0 && c <= 0xEF ? 3
                     : c >= 0xF0 && c <= 0xF4 ? 4
                                              : 0;
        if (!len || i + len > n) return 0;
        if (len == 1 && (c < 0x20 || c > 0x7E || c == '"' || c == '\\')) return 0;
        uint32_t cp = len == 1 ? c : c & (0x7Fu >> len);
        for (size_t k = 1; k < len; k++) {
            if ((s[i + k] & 0xC0) != 0x80) return 0;
            cp = cp << 6 | (s[i + k] & 0x3Fu);
        }
        static const uint32_t min_cp[5] = {0, 0, 0x80, 0x800, 0x10000};
        if (cp < min_cp[len] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return 0;
        i += len;
        cps++;
    }
    return cps > 255 ? 255 : cps;
}

/* The trie nodes of sorted list l and where each one's subtree ends (grammar_impl.h): a node
 * stays open while the following entries share its prefix (lcp > its depth). */
static int list_nodes(const struct grammar_vocab *v, struct grammar_toklist *l)
{
    size_t n_nodes = 0;
    for (int32_t i = 0; i < l->n; i++) n_nodes += (size_t)(l->len[i] - l->lcp[i]);
    l->node_off = alloc_malloc((size_t)l->n * sizeof *l->node_off + 1);
    l->node_end = alloc_malloc(n_nodes * sizeof *l->node_end + 1);
    uint32_t *open = alloc_malloc(((size_t)v->max_len + 1) * sizeof *open); /* by depth */
    int rc = KRS_ERR_NOMEM;
    if (!l->node_off || !l->node_end || !open || n_nodes > UINT32_MAX) goto out;
    uint32_t depth = 0, off = 0;
    for (int32_t i = 0; i < l->n; i++) {
        for (uint32_t d = l->lcp[i]; d < depth; d++) l->node_end[open[d]] = i;
        l->node_off[i] = off;
        for (uint32_t d = l->lcp[i]; d < l->len[i]; d++) open[d] = off++;
        depth = l->len[i];
    }
    for (uint32_t d = 0; d < depth; d++) l->node_end[open[d]] = l->n;
    rc = KRS_OK;
out:
    alloc_free(open);
    return rc;
}

/* Fills l with the tokens t (with text) for which want(t) holds, sorted, with common prefixes. */
static int list_build(const struct grammar_vocab *v, struct grammar_toklist *l, int plain_only_not)
{
    size_t n = (size_t)v->n_vocab;
    l->order = alloc_malloc(n * sizeof *l->order + 1);
    l->off = alloc_malloc(n * sizeof *l->off + 1);
    l->len = alloc_malloc(n * sizeof *l->len + 1);
    l->lcp = alloc_malloc(n * sizeof *l->lcp + 1);
    if (!l->order || !l->off || !l->len || !l->lcp) return KRS_ERR_NOMEM;
    for (int32_t t = 0; t < v->n_vocab; t++)
        if (v->tok_len[t] && !v->tok_long[t] && (!plain_only_not || !v->plain_cps[t]))
            l->order[l->n++] = t;
    static pthread_mutex_t sort_lock = PTHREAD_MUTEX_INITIALIZER;
    pthread_mutex_lock(&sort_lock);
    sort_vocab = v;
    qsort(l->order, (size_t)l->n, sizeof *l->order, cmp_tok);
    pthread_mutex_unlock(&sort_lock);
    size_t total = 0;
    for (int32_t i = 0; i < l->n; i++) total += v->tok_len[l->order[i]];
    l->bytes = alloc_malloc(total + 1);
    if (!l->bytes || total > UINT32_MAX) return KRS_ERR_NOMEM;
    size_t used = 0;
    for (int32_t i = 0; i < l->n; i++) {
        int32_t t = l->order[i];
        l->off[i] = (uint32_t)used;
        l->len[i] = v->tok_len[t];
        memcpy(l->bytes + used, v->bytes + v->tok_off[t], l->len[i]);
        used += l->len[i];
        uint16_t c = 0;
        if (i > 0) {
            const uint8_t *a = l->bytes + l->off[i - 1], *b = l->bytes + l->off[i];
            uint16_t m = l->len[i - 1] < l->len[i] ? l->len[i - 1] : l->len[i];
            while (c < m && a[c] == b[c]) c++;
        }
        l->lcp[i] = c;
    }
    return list_nodes(v, l);
}

/* Each token's lead (grammar_impl.h), max_lead, key_lead (the least lead with at most
 * GRAMMAR_LONG_MAX tokens above it, at least 1) and the long tokens. */
static int vocab_leads(struct grammar_vocab *v)
{
    size_t n = (size_t)v->n_vocab;
    uint16_t *lead = alloc_malloc(n * sizeof *lead);
    int32_t *above = alloc_calloc((size_t)v->max_len + 2, sizeof *above); /* [l]: lead == l */
    v->tok_long = alloc_calloc(n, 1);
    v->long_ids = alloc_malloc(GRAMMAR_LONG_MAX * sizeof *v->long_ids);
    int rc = KRS_ERR_NOMEM;
    if (!lead || !above || !v->tok_long || !v->long_ids) goto out;
    for (size_t t = 0; t < n; t++) {
        const uint8_t *b = v->bytes + v->tok_off[t];
        uint16_t x = v->tok_len[t] && (b[0] & 0xC0) == 0x80;
        for (uint32_t i = 0; i < v->tok_len[t]; i++) x += (b[i] & 0xC0) != 0x80;
        lead[t] = x;
        above[x]++;
        if (x > v->max_lead) v->max_lead = x;
    }
    int32_t k = v->max_lead, count = 0; /* count: tokens with lead > k */
    while (k > 1 && count + above[k] <= GRAMMAR_LONG_MAX) count += above[k--];
    v->key_lead = k > 1 ? k : 1;
    for (size_t t = 0; t < n; t++)
        if (lead[t] > v->key_lead) {
            v->tok_long[t] = 1;
            v->long_ids[v->n_long++] = (int32_t)t;
        }
    rc = KRS_OK;
out:
    alloc_free(lead);
    alloc_free(above);
    return rc;
}

/* Everything derived from the token texts: leads, plain tokens, their masks, both sorted lists
 * (long tokens are in neither). */
static int vocab_finish(struct grammar_vocab *v)
{
    v->n_words = (v->n_vocab + 31) / 32;
    size_t nw = (size_t)v->n_words;
    v->plain_cps = alloc_calloc((size_t)v->n_vocab, 1);
    v->plain_le = alloc_calloc(GRAMMAR_PLAIN_LEVELS * nw, sizeof *v->plain_le);
    v->plain_long = alloc_malloc((size_t)v->n_vocab * sizeof *v->plain_long);
    if (!v->plain_cps || !v->plain_le || !v->plain_long || vocab_leads(v)) return KRS_ERR_NOMEM;
    for (int32_t t = 0; t < v->n_vocab; t++) {
        int c =
            v->eog[t] || v->tok_long[t] ? 0 : plain_count(v->bytes + v->tok_off[t], v->tok_len[t]);
        v->plain_cps[t] = (uint8_t)c;
        if (c > v->max_plain) v->max_plain = c;
        if (c > GRAMMAR_PLAIN_LEVELS) v->plain_long[v->n_plain_long++] = t;
        for (int l = c; c && l <= GRAMMAR_PLAIN_LEVELS; l++) {
            v->plain_le[(size_t)(l - 1) * nw + (size_t)(t >> 5)] |= 1u << (t & 31);
            v->plain_n[l - 1]++;
        }
    }
    v->eog_ids = alloc_malloc((size_t)v->n_vocab * sizeof *v->eog_ids);
    if (!v->eog_ids) return KRS_ERR_NOMEM;
    for (int32_t t = 0; t < v->n_vocab; t++)
        if (v->eog[t]) v->eog_ids[v->n_eog++] = t;
    int rc = list_build(v, &v->all, 0);
    if (!rc) rc = list_build(v, &v->rest, 1);
    if (!rc) rc = grammar_mask_cache_create(v->n_words, &v->shared);
    return rc;
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
    if (!v->bytes || !v->tok_off || !v->tok_len || !v->eog) {
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

int grammar_vocab_create_bytes(const char *const *multi, size_t n_multi, struct grammar_vocab **out)
{
    *out = NULL;
    size_t n = GRAMMAR_BYTE_EOG + 1 + n_multi;
    static const char bytes[256] = {
#define B4(i)  (char)(i), (char)((i) + 1), (char)((i) + 2), (char)((i) + 3)
#define B16(i) B4(i), B4((i) + 4), B4((i) + 8), B4((i) + 12)
#define B64(i) B16(i), B16((i) + 16), B16((i) + 32), B16((i) + 48)
        B64(0), B64(64), B64(128), B64(192)
#undef B64
#undef B16
#undef B4
    };
    const char **text = alloc_malloc(n * sizeof *text);
    size_t *len = alloc_malloc(n * sizeof *len);
    uint8_t *eog = alloc_calloc(n, 1);
    int rc = KRS_ERR_NOMEM;
    if (!text || !len || !eog || n > INT32_MAX) goto out;
    for (size_t i = 0; i < n; i++) {
        text[i] = i < 256 ? &bytes[i] : i == GRAMMAR_BYTE_EOG ? "" : multi[i - 257];
        len[i] = i < 256 ? 1 : strlen(text[i]);
    }
    eog[GRAMMAR_BYTE_EOG] = 1;
    rc = grammar_vocab_create_raw((int32_t)n, text, len, eog, out);
out:
    alloc_free(text);
    alloc_free(len);
    alloc_free(eog);
    return rc;
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
