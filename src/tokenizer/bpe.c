/* Byte-level BPE encoding of one raw-text fragment (llama.cpp's llm_tokenizer_bpe_session).
 *
 * 1. Pre-tokenize with a hand-written matcher for the vocabulary's split regex (no regex engine):
 *    llama3:  (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}
 *             | ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
 *    qwen2:   the same with \p{N} (one digit) instead of \p{N}{1,3}
 *    gpt2:    's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
 *    Each matcher returns what a backtracking engine would take at that position (first
 *    alternative that matches). Invalid UTF-8 bytes are single "other" units and keep their bytes
 *    (llama.cpp turns them into U+FFFD; nothing is lost here).
 * 2. Each word's bytes become GPT-2 bytes_to_unicode characters (one symbol each); with
 *    ignore_merges (llama3) a word that is itself a token is emitted directly.
 * 3. Merge the adjacent pair of lowest rank (ties: leftmost) until none applies; symbols are
 *    token ids and pairs are looked up by id in the merge hash. */
#include "tokenizer/tokenizer_impl.h"
#include "tokenizer/unicode.h"
#include "krserve.h"
#include "util/alloc.h"

#include <string.h>

void tok_bpe_tables(int16_t cp_byte[0x144], uint16_t byte_cp[256])
{
    for (int i = 0; i < 0x144; i++) cp_byte[i] = -1;
    int extra = 0;
    for (int b = 0; b < 256; b++) {
        int printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
        uint16_t cp = printable ? (uint16_t)b : (uint16_t)(0x100 + extra++);
        byte_cp[b] = cp;
        cp_byte[cp] = (int16_t)b;
    }
}

/* ---- pre-tokenizer ----------------------------------------------------------------------- */

struct cpt {
    uint32_t cp;
    uint32_t off; /* byte offset in the fragment */
    uint8_t cls;
};

static int is_nl(uint32_t cp)
{
    return cp == '\r' || cp == '\n';
}

static uint32_t ascii_lower(uint32_t cp)
{
    return cp >= 'A' && cp <= 'Z' ? cp + 32 : cp;
}

/* Contraction at i ('s 't 'm 'd 're 've 'll); ci: case-insensitive. Returns its length or 0. */
static size_t contraction(const struct cpt *c, size_t i, size_t n, int ci)
{
    if (c[i].cp != '\'' || i + 1 >= n) return 0;
    uint32_t a = ci ? ascii_lower(c[i + 1].cp) : c[i + 1].cp;
    if (a == 's' || a == 't' || a == 'm' || a == 'd') return 2;
    if (i + 2 >= n) return 0;
    uint32_t b = ci ? ascii_lower(c[i + 2].cp) : c[i + 2].cp;
    if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return 3;
    return 0;
}

/* The whitespace alternatives shared by all three regexes, for a run starting at i. */
static size_t match_space(const struct cpt *c, size_t i, size_t n, int newline_rule)
{
    size_t j = i;
    while (j < n && c[j].cls == UCLASS_SPACE) j++;
    if (newline_rule) { /* \s*[\r\n]+ : up to the last newline of the run */
        for (size_t k = j; k > i; k--)
            if (is_nl(c[k - 1].cp)) return k - i;
    }
    if (j == n) return j - i;         /* \s+(?!\S) at the end */
    if (j - i >= 2) return j - i - 1; /* \s+(?!\S): leave one space for the next word */
    return j - i;                     /* \s+ */
}

static size_t match_llama3(const struct cpt *c, size_t i, size_t n, size_t max_digits)
{
    size_t m = contraction(c, i, n, 1);
    if (m) return m;
    size_t j;
    /* [^\r\n\p{L}\p{N}]?\p{L}+ */
    if (c[i].cls == UCLASS_LETTER || (c[i].cls != UCLASS_NUMBER && !is_nl(c[i].cp) && i + 1 < n &&
                                      c[i + 1].cls == UCLASS_LETTER)) {
        j = i + 1;
        while (j < n && c[j].cls == UCLASS_LETTER) j++;
        return j - i;
    }
    /* \p{N}{1,max} */
    if (c[i].cls == UCLASS_NUMBER) {
        j = i + 1;
        while (j < n && j - i < max_digits && c[j].cls == UCLASS_NUMBER) j++;
        return j - i;
    }
    /*  ?[^\s\p{L}\p{N}]+[\r\n]* */
    size_t k = (c[i].cp == ' ' && i + 1 < n && c[i + 1].cls == UCLASS_OTHER) ? i + 1 : i;
    if (c[k].cls == UCLASS_OTHER) {
        j = k + 1;
        while (j < n && c[j].cls == UCLASS_OTHER) j++;
        while (j < n && is_nl(c[j].cp)) j++;
        return j - i;
    }
    return match_space(c, i, n, 1);
}

static size_t match_gpt2(const struct cpt *c, size_t i, size_t n)
{
    size_t m = contraction(c, i, n, 0);
    if (m) return m;
    size_t k = (c[i].cp == ' ' && i + 1 < n && c[i + 1].cls != UCLASS_SPACE) ? i + 1 : i;
    uint8_t cls = c[k].cls;
    if (cls != UCLASS_SPACE) { /*  ?\p{L}+ |  ?\p{N}+ |  ?[^\s\p{L}\p{N}]+ */
        size_t j = k + 1;
        while (j < n && c[j].cls == cls) j++;
        return j - i;
    }
    return match_space(c, i, n, 0);
}

/* ---- merging ----------------------------------------------------------------------------- */

struct bpe_sym {
    int32_t prev, next;
    int32_t id; /* token id of the symbol's text, -1 when it is none */
    uint32_t start, n;
};

struct bpe_pair {
    int32_t rank;
    int32_t left, right;
    uint32_t size;
};

static int pair_before(const struct bpe_pair *a, const struct bpe_pair *b)
{
    return a->rank < b->rank || (a->rank == b->rank && a->left < b->left);
}

static void heap_push(struct bpe_pair *h, size_t *n, struct bpe_pair p)
{
    size_t i = (*n)++;
    while (i > 0) {
        size_t q = (i - 1) / 2;
        if (!pair_before(&p, &h[q])) break;
        h[i] = h[q];
        i = q;
    }
    h[i] = p;
}

static struct bpe_pair heap_pop(struct bpe_pair *h, size_t *n)
{
    struct bpe_pair top = h[0], last = h[--(*n)];
    size_t i = 0;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= *n) break;
        if (c + 1 < *n && pair_before(&h[c + 1], &h[c])) c++;
        if (!pair_before(&h[c], &last)) break;
        h[i] = h[c];
        i = c;
    }
    h[i] = last;
    return top;
}

static const struct tok_merge *find_merge(const struct tokenizer *tok, int32_t a, int32_t b)
{
    if (!tok->merges_mask || a < 0 || b < 0) return NULL;
    uint64_t key = (((uint64_t)(uint32_t)a << 32) | (uint32_t)b) + 1;
    uint32_t h = (uint32_t)tok_hash((const char *)&key, 8) & tok->merges_mask;
    while (tok->merges[h].key) {
        if (tok->merges[h].key == key) return &tok->merges[h];
        h = (h + 1) & tok->merges_mask;
    }
    return NULL;
}

struct bpe_work {
    const struct tokenizer *tok;
    struct bpe_sym *sym;
    struct bpe_pair *heap;
    size_t n_heap;
    char *mapped; /* the word in the byte alphabet (for ignore_merges) */
};

static void try_pair(struct bpe_work *w, int32_t left, int32_t right)
{
    if (left < 0 || right < 0) return;
    const struct tok_merge *m = find_merge(w->tok, w->sym[left].id, w->sym[right].id);
    if (!m) return;
    heap_push(w->heap, &w->n_heap,
              (struct bpe_pair){m->rank, left, right, w->sym[left].n + w->sym[right].n});
}

static void bpe_word(struct bpe_work *w, const uint8_t *s, size_t n, struct tok_sink *out)
{
    const struct tokenizer *tok = w->tok;
    if (tok->ignore_merges) {
        size_t m = 0;
        for (size_t i = 0; i < n; i++) {
            uint32_t cp = tok->bpe_byte_cp[s[i]];
            if (cp < 0x80) {
                w->mapped[m++] = (char)cp;
            } else {
                w->mapped[m++] = (char)(0xC0 | (cp >> 6));
                w->mapped[m++] = (char)(0x80 | (cp & 0x3F));
            }
        }
        int32_t id = tok_lookup(tok, w->mapped, m);
        if (id >= 0) {
            tok_sink_push(out, id);
            return;
        }
    }
    struct bpe_sym *sym = w->sym;
    for (size_t i = 0; i < n; i++)
        sym[i] =
            (struct bpe_sym){(int32_t)i - 1, (int32_t)i + 1, tok->byte_tok[s[i]], (uint32_t)i, 1};
    sym[n - 1].next = -1;
    w->n_heap = 0;
    for (size_t i = 1; i < n; i++) try_pair(w, (int32_t)i - 1, (int32_t)i);
    while (w->n_heap) {
        struct bpe_pair p = heap_pop(w->heap, &w->n_heap);
        struct bpe_sym *l = &sym[p.left], *r = &sym[p.right];
        if (l->n == 0 || r->n == 0 || l->n + r->n != p.size) continue;
        const struct tok_merge *m = find_merge(tok, l->id, r->id);
        l->id = m ? m->result : -1;
        l->n += r->n;
        r->n = 0;
        l->next = r->next;
        if (r->next >= 0) sym[r->next].prev = p.left;
        try_pair(w, l->prev, p.left);
        try_pair(w, p.left, l->next);
    }
    for (int32_t i = 0; i >= 0; i = sym[i].next) {
        if (sym[i].id >= 0) {
            tok_sink_push(out, sym[i].id);
            continue;
        }
        /* No token for this symbol (a merge whose result is missing): fall back to one token
         * per byte, skipping bytes the vocabulary lacks (llama.cpp does the same). */
        for (uint32_t k = 0; k < sym[i].n; k++) {
            int32_t b = tok->byte_tok[s[sym[i].start + k]];
            if (b >= 0) tok_sink_push(out, b);
        }
    }
}

int tok_bpe_encode(const struct tokenizer *tok, const char *text, size_t len, struct tok_sink *out)
{
    int rc = KRS_OK;
    const uint8_t *s = (const uint8_t *)text;
    struct cpt *c = alloc_malloc(sizeof *c * (len + 1));
    struct bpe_work w = {tok, NULL, NULL, 0, NULL};
    w.sym = alloc_malloc(sizeof *w.sym * (len + 1));
    w.heap = alloc_malloc(sizeof *w.heap * (3 * len + 1));
    w.mapped = alloc_malloc(2 * len + 1);
    if (!c || !w.sym || !w.heap || !w.mapped) {
        rc = KRS_ERR_NOMEM;
        goto out;
    }
    size_t n = 0;
    for (size_t off = 0; off < len;) {
        size_t cl;
        uint32_t cp = unicode_decode(s + off, len - off, &cl);
        c[n++] = (struct cpt){cp, (uint32_t)off, (uint8_t)unicode_class(cp)};
        off += cl;
    }
    c[n].off = (uint32_t)len;
    for (size_t i = 0; i < n;) {
        size_t m;
        if (tok->pre == PRE_LLAMA3)
            m = match_llama3(c, i, n, 3);
        else if (tok->pre == PRE_QWEN2)
            m = match_llama3(c, i, n, 1);
        else
            m = match_gpt2(c, i, n);
        if (m == 0) m = 1; /* unreachable: every class has an alternative */
        bpe_word(&w, s + c[i].off, c[i + m].off - c[i].off, out);
        i += m;
    }
out:
    alloc_free(c);
    alloc_free(w.sym);
    alloc_free(w.heap);
    alloc_free(w.mapped);
    return rc;
}
