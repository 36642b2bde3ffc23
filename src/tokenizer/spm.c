/* SentencePiece-BPE encoding of one raw-text fragment, llama.cpp's llm_tokenizer_spm_session:
 * ' ' -> U+2581 (plus one leading U+2581 when asked), split into UTF-8 characters, then repeatedly
 * merge the adjacent pair whose concatenation is a token with the highest score (ties: leftmost),
 * and finally emit each symbol's token or, when it is no token, its bytes as <0xHH> tokens.
 *
 * A merged symbol is always a token (a pair is queued only when its text is one, and a queued
 * pair's text is fixed by its left start and size), so llama.cpp's rev_merge re-segmentation
 * never fires for merged symbols and single characters have no merge history: it is omitted.
 * Speed without changing results: a pair can cross an escaped space only if its text, a token,
 * has U+2581 past its first byte; the vocabulary has few such tokens (Gemma 3: one), so the
 * text is cut before every escaped space where none of them matches, and each piece is merged
 * on its own with a small heap. Merges in different pieces never interact and the order within
 * a piece is unchanged, so the output is identical.
 * One deliberate difference: llama.cpp groups characters by the lead byte alone, so an invalid
 * byte such as 0xFF swallows the next 3 bytes (possibly half of an escaped space) and decoding no
 * longer gives the input back. Here characters are validated and every invalid byte is its own
 * symbol (then a <0xHH> token), so decode(encode(x)) == x for any bytes. Valid UTF-8 is split
 * identically.
 * All scratch is allocated once per fragment (never per merge). */
#include "tokenizer/tokenizer_impl.h"
#include "tokenizer/unicode.h"
#include "krserve.h"
#include "util/alloc.h"

#include <string.h>

struct spm_sym {
    int32_t prev, next;
    uint32_t start, n; /* n == 0: merged away */
};

struct spm_bigram {
    float score;
    int32_t left, right;
    uint32_t size;
};

/* Max-heap order: higher score first, then smaller left index. */
static int bigram_before(const struct spm_bigram *a, const struct spm_bigram *b)
{
    return a->score > b->score || (a->score == b->score && a->left < b->left);
}

static void heap_push(struct spm_bigram *h, size_t *n, struct spm_bigram b)
{
    size_t i = (*n)++;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (!bigram_before(&b, &h[p])) break;
        h[i] = h[p];
        i = p;
    }
    h[i] = b;
}

static struct spm_bigram heap_pop(struct spm_bigram *h, size_t *n)
{
    struct spm_bigram top = h[0], last = h[--(*n)];
    size_t i = 0;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= *n) break;
        if (c + 1 < *n && bigram_before(&h[c + 1], &h[c])) c++;
        if (!bigram_before(&h[c], &last)) break;
        h[i] = h[c];
        i = c;
    }
    h[i] = last;
    return top;
}

struct spm_work {
    const struct tokenizer *tok;
    const char *s;
    struct spm_sym *sym;
    struct spm_bigram *heap;
    size_t n_heap;
};

static void try_add(struct spm_work *w, int32_t left, int32_t right)
{
    if (left < 0 || right < 0) return;
    uint32_t size = w->sym[left].n + w->sym[right].n;
    int32_t id = tok_lookup(w->tok, w->s + w->sym[left].start, size);
    if (id < 0) return;
    heap_push(w->heap, &w->n_heap, (struct spm_bigram){w->tok->scores[id], left, right, size});
}

/* 1 when no pair can join the symbols on both sides of byte offset pos: the symbol there is an
 * escaped space and no token with an inner U+2581 matches the text across it. */
static int split_before(const struct tokenizer *tok, const char *s, size_t elen, uint32_t pos)
{
    if (!tok->spm_split || elen - pos < 3 || memcmp(s + pos, "\xE2\x96\x81", 3) != 0) return 0;
    for (uint32_t k = 0; k < tok->n_inner; k++) {
        const struct tok_inner *in = &tok->inner[k];
        uint32_t l = tok->len[in->id];
        if (in->at > pos || pos - in->at + l > elen) continue;
        if (memcmp(s + pos - in->at, tok->text + tok->off[in->id], l) == 0) return 0;
    }
    return 1;
}

/* Merges symbols [a, b) (no pair joins them to anything outside) and emits their tokens. */
static void spm_segment(struct spm_work *w, int32_t a, int32_t b, struct tok_sink *out)
{
    const struct tokenizer *tok = w->tok;
    struct spm_sym *sym = w->sym;
    if (a >= b) return;
    sym[a].prev = -1;
    sym[b - 1].next = -1;
    w->n_heap = 0;
    for (int32_t i = a + 1; i < b; i++) try_add(w, i - 1, i);
    while (w->n_heap) {
        struct spm_bigram bg = heap_pop(w->heap, &w->n_heap);
        struct spm_sym *l = &sym[bg.left], *r = &sym[bg.right];
        if (l->n == 0 || r->n == 0 || l->n + r->n != bg.size) continue;
        l->n += r->n;
        r->n = 0;
        l->next = r->next;
        if (r->next >= 0) sym[r->next].prev = bg.left;
        try_add(w, l->prev, bg.left);
        try_add(w, bg.left, l->next);
    }
    for (int32_t i = a; i >= 0; i = sym[i].next) {
        int32_t id = tok_lookup(tok, w->s + sym[i].start, sym[i].n);
        if (id >= 0) {
            tok_sink_push(out, id);
            continue;
        }
        for (uint32_t k = 0; k < sym[i].n; k++) {
            int32_t bt = tok->byte_tok[(uint8_t)w->s[sym[i].start + k]];
            if (bt >= 0) tok_sink_push(out, bt);
        }
    }
}

int tok_spm_encode(const struct tokenizer *tok, const char *text, size_t len, int prefix_space,
                   struct tok_sink *out)
{
    int rc = KRS_OK;
    /* Escaped copy: every ' ' becomes the 3 bytes of U+2581. */
    size_t spaces = prefix_space ? 1 : 0;
    for (size_t i = 0; i < len; i++) spaces += text[i] == ' ';
    size_t elen = len + 2 * spaces + (prefix_space ? 1 : 0);
    if (elen > UINT32_MAX / 2) return KRS_ERR_INVALID;
    char *s = alloc_malloc(elen ? elen : 1);
    struct spm_sym *sym = alloc_malloc(sizeof *sym * (elen ? elen : 1));
    /* Pushes: at most n-1 initial pairs plus 2 per merge (at most n-1 merges). */
    struct spm_bigram *heap = alloc_malloc(sizeof *heap * (3 * elen + 1));
    if (!s || !sym || !heap) {
        rc = KRS_ERR_NOMEM;
        goto out;
    }
    size_t e = 0;
    if (prefix_space) memcpy(s + e, "\xE2\x96\x81", 3), e += 3;
    for (size_t i = 0; i < len; i++) {
        if (text[i] == ' ')
            memcpy(s + e, "\xE2\x96\x81", 3), e += 3;
        else
            s[e++] = text[i];
    }

    int32_t n_sym = 0;
    for (size_t off = 0; off < elen;) {
        size_t cl;
        unicode_decode((const uint8_t *)s + off, elen - off, &cl);
        sym[n_sym] = (struct spm_sym){n_sym - 1, n_sym + 1, (uint32_t)off, (uint32_t)cl};
        n_sym++;
        off += cl;
    }
    if (n_sym) sym[n_sym - 1].next = -1;

    struct spm_work w = {tok, s, sym, heap, 0};
    int32_t seg = 0;
    for (int32_t i = 1; i <= n_sym; i++) {
        if (i < n_sym && !split_before(tok, s, elen, sym[i].start)) continue;
        spm_segment(&w, seg, i, out);
        seg = i;
    }
out:
    alloc_free(s);
    alloc_free(sym);
    alloc_free(heap);
    return rc;
}
