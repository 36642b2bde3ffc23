/* Tokenizer core: loading the vocabulary from GGUF metadata, the text -> id hash, the special-token
 * partition (llama.cpp's tokenizer_st_partition), the encode driver, decoding and the streaming
 * detokenizer. The merge algorithms live in spm.c and bpe.c, chat templates in chat.c.
 *
 * Load copies everything into memory owned by the tokenizer (one text arena plus flat arrays), so
 * the gguf_file may be closed afterwards. After load nothing is mutated: encode allocates its own
 * scratch per call, which makes concurrent use from several threads safe. */
#include "tokenizer/tokenizer_impl.h"
#include "tokenizer/unicode.h"
#include "gguf/gguf.h"
#include "krserve.h"
#include "util/alloc.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void set_err(char *err, size_t errlen, const char *fmt, ...)
{
    if (!err || !errlen) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

/* ---- hashing ----------------------------------------------------------------------------- */

uint64_t tok_hash(const char *s, size_t len)
{
    /* FNV-1a over 8-byte words (then the tail), finished with a murmur-style mix. */
    uint64_t h = 0xcbf29ce484222325ull ^ (len * 0x9E3779B97F4A7C15ull);
    const unsigned char *p = (const unsigned char *)s;
    while (len >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        h = (h ^ w) * 0x100000001b3ull;
        h ^= h >> 29;
        p += 8, len -= 8;
    }
    while (len--) h = (h ^ *p++) * 0x100000001b3ull;
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdull;
    h ^= h >> 33;
    return h;
}

int32_t tok_lookup(const struct tokenizer *tok, const char *s, size_t len)
{
    uint64_t h = tok_hash(s, len);
    uint32_t i = (uint32_t)h & tok->map_mask, tag = (uint32_t)(h >> 32);
    for (;;) {
        struct tok_slot sl = tok->map[i];
        if (sl.id < 0) return -1;
        if (sl.tag == tag && tok->len[sl.id] == len &&
            memcmp(tok->text + tok->off[sl.id], s, len) == 0)
            return sl.id;
        i = (i + 1) & tok->map_mask;
    }
}

/* ---- loading ----------------------------------------------------------------------------- */

static int load_vocab(struct tokenizer *tok, const struct gguf_file *f, char *err, size_t errlen)
{
    int64_t ki = gguf_find_key(f, "tokenizer.ggml.tokens");
    enum gguf_type elem;
    uint64_t count;
    if (ki < 0 || gguf_kv_array_info(f, (uint64_t)ki, &elem, &count) != KRS_OK ||
        elem != GGUF_TYPE_STRING || count == 0 || count > INT32_MAX) {
        set_err(err, errlen, "tokenizer.ggml.tokens missing or not a non-empty string array");
        return KRS_ERR_FORMAT;
    }
    uint32_t n = (uint32_t)count;
    uint64_t total = 0;
    for (uint32_t i = 0; i < n; i++) {
        const char *s;
        size_t l;
        if (gguf_kv_array_str(f, (uint64_t)ki, i, &s, &l) != KRS_OK) return KRS_ERR_FORMAT;
        total += l + 1;
    }
    if (total > UINT32_MAX) {
        set_err(err, errlen, "vocabulary text too large");
        return KRS_ERR_FORMAT;
    }
    tok->n_vocab = n;
    tok->text = alloc_malloc(total ? total : 1);
    tok->off = alloc_malloc(sizeof *tok->off * n);
    tok->len = alloc_malloc(sizeof *tok->len * n);
    tok->scores = alloc_calloc(n, sizeof *tok->scores);
    tok->types = alloc_malloc(n);
    uint32_t cap = 16;
    while (cap < 2ull * n) cap <<= 1;
    tok->map = alloc_malloc(sizeof *tok->map * cap);
    if (!tok->text || !tok->off || !tok->len || !tok->scores || !tok->types || !tok->map)
        return KRS_ERR_NOMEM;
    tok->map_mask = cap - 1;
    for (uint32_t i = 0; i < cap; i++) tok->map[i] = (struct tok_slot){-1, 0};
    uint32_t pos = 0;
    for (uint32_t i = 0; i < n; i++) {
        const char *s;
        size_t l;
        gguf_kv_array_str(f, (uint64_t)ki, i, &s, &l);
        memcpy(tok->text + pos, s, l);
        tok->text[pos + l] = '\0';
        tok->off[i] = pos;
        tok->len[i] = (uint32_t)l;
        pos += (uint32_t)l + 1;
        if (l > tok->max_piece) tok->max_piece = l;
        /* Insert; a later duplicate replaces an earlier one (llama.cpp's token_to_id). */
        uint64_t hash = tok_hash(s, l);
        uint32_t h = (uint32_t)hash & tok->map_mask, tag = (uint32_t)(hash >> 32);
        for (;;) {
            int32_t id = tok->map[h].id;
            if (id < 0 || (tok->len[id] == l && memcmp(tok->text + tok->off[id], s, l) == 0)) {
                tok->map[h] = (struct tok_slot){(int32_t)i, tag};
                break;
            }
            h = (h + 1) & tok->map_mask;
        }
    }
    if (tok->max_piece < 1) tok->max_piece = 1;

    const void *data;
    if (gguf_get_array(f, "tokenizer.ggml.scores", &elem, &count, &data) == KRS_OK) {
        if (elem != GGUF_TYPE_FLOAT32 || count != n) {
            set_err(err, errlen, "tokenizer.ggml.scores: expected %u float32", n);
            return KRS_ERR_FORMAT;
        }
        memcpy(tok->scores, data, sizeof(float) * n);
    }
    memset(tok->types, TOKEN_TYPE_NORMAL, n);
    if (gguf_get_array(f, "tokenizer.ggml.token_type", &elem, &count, &data) == KRS_OK) {
        if ((elem != GGUF_TYPE_INT32 && elem != GGUF_TYPE_UINT32) || count != n) {
            set_err(err, errlen, "tokenizer.ggml.token_type: expected %u int32", n);
            return KRS_ERR_FORMAT;
        }
        const unsigned char *p = data;
        for (uint32_t i = 0; i < n; i++) {
            int32_t t;
            memcpy(&t, p + 4ull * i, 4);
            tok->types[i] = (t >= 0 && t <= TOKEN_TYPE_BYTE) ? (uint8_t)t : TOKEN_TYPE_UNDEFINED;
        }
    }
    return KRS_OK;
}

static int32_t special_id(const struct gguf_file *f, const char *key, int32_t dflt, uint32_t n)
{
    uint32_t v;
    int rc = gguf_get_u32(f, key, &v);
    if (rc == KRS_ERR_NOT_FOUND) return dflt < (int32_t)n ? dflt : -1;
    if (rc != KRS_OK || v >= n) return -1; /* out of range: ignored, as llama.cpp does */
    return (int32_t)v;
}

static int get_flag(const struct gguf_file *f, const char *key, int dflt)
{
    int v;
    return gguf_get_bool(f, key, &v) == KRS_OK ? (v != 0) : dflt;
}

static int str_is(const char *s, size_t len, const char *lit)
{
    return strlen(lit) == len && memcmp(s, lit, len) == 0;
}

static int cand_cmp(const void *a, const void *b, void *ctx)
{
    const struct tokenizer *tok = ctx;
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    if (tok->len[x] != tok->len[y]) return tok->len[x] > tok->len[y] ? -1 : 1;
    return x < y ? -1 : (x > y);
}

static int build_specials(struct tokenizer *tok)
{
    uint32_t n = 0;
    size_t nodes = 1;
    for (uint32_t i = 0; i < tok->n_vocab; i++) {
        uint8_t t = tok->types[i];
        if ((t == TOKEN_TYPE_CONTROL || t == TOKEN_TYPE_USER_DEFINED || t == TOKEN_TYPE_UNKNOWN) &&
            tok->len[i] > 0) {
            n++;
            nodes += tok->len[i];
        }
    }
    if (!n) return KRS_OK;
    if (nodes > UINT32_MAX) return KRS_ERR_UNSUPPORTED;
    tok->cand = alloc_malloc(sizeof *tok->cand * n);
    tok->trie = alloc_malloc(sizeof *tok->trie * nodes);
    if (!tok->cand || !tok->trie) return KRS_ERR_NOMEM;
    n = 0;
    for (uint32_t i = 0; i < tok->n_vocab; i++) {
        uint8_t t = tok->types[i];
        if ((t == TOKEN_TYPE_CONTROL || t == TOKEN_TYPE_USER_DEFINED || t == TOKEN_TYPE_UNKNOWN) &&
            tok->len[i] > 0)
            tok->cand[n++] = (int32_t)i;
    }
    qsort_r(tok->cand, n, sizeof *tok->cand, cand_cmp, tok);
    tok->n_cand = n;
    tok->trie[0] = (struct tok_trie_node){0, 0, -1, 0};
    tok->n_trie = 1;
    for (uint32_t c = 0; c < n; c++) {
        const uint8_t *s = (const uint8_t *)tok->text + tok->off[tok->cand[c]];
        uint32_t l = tok->len[tok->cand[c]];
        uint32_t node = 0;
        for (uint32_t k = 0; k < l; k++) {
            uint32_t child = node == 0 ? tok->root[s[k]] : tok->trie[node].child;
            while (child && tok->trie[child].byte != s[k]) child = tok->trie[child].sibling;
            if (!child) {
                child = tok->n_trie++;
                tok->trie[child] = (struct tok_trie_node){0, 0, -1, s[k]};
                if (node == 0) {
                    tok->root[s[k]] = child;
                } else {
                    tok->trie[child].sibling = tok->trie[node].child;
                    tok->trie[node].child = child;
                }
            }
            node = child;
        }
        if (tok->trie[node].cand < 0) tok->trie[node].cand = (int32_t)c;
    }
    return KRS_OK;
}

#define TOK_MAX_INNER 256

static int build_inner_spaces(struct tokenizer *tok)
{
    uint32_t n = 0;
    for (int pass = 0; pass < 2; pass++) {
        n = 0;
        for (uint32_t id = 0; id < tok->n_vocab; id++) {
            const char *s = tok->text + tok->off[id];
            uint32_t l = tok->len[id];
            for (uint32_t k = 1; k + 3 <= l; k++) {
                if (memcmp(s + k, "\xE2\x96\x81", 3)) continue;
                if (pass) tok->inner[n] = (struct tok_inner){(int32_t)id, k};
                n++;
            }
        }
        if (n > TOK_MAX_INNER) return KRS_OK; /* too many to check: no splitting */
        if (!pass && n) {
            tok->inner = alloc_malloc(sizeof *tok->inner * n);
            if (!tok->inner) return KRS_ERR_NOMEM;
        }
    }
    tok->n_inner = n;
    tok->spm_split = 1;
    return KRS_OK;
}

static int build_merges(struct tokenizer *tok, const struct gguf_file *f, char *err, size_t errlen)
{
    int64_t ki = gguf_find_key(f, "tokenizer.ggml.merges");
    enum gguf_type elem;
    uint64_t count;
    if (ki < 0) return KRS_OK; /* a BPE without merges: every word falls back to characters */
    if (gguf_kv_array_info(f, (uint64_t)ki, &elem, &count) != KRS_OK || elem != GGUF_TYPE_STRING ||
        count > INT32_MAX) {
        set_err(err, errlen, "tokenizer.ggml.merges is not a string array");
        return KRS_ERR_FORMAT;
    }
    if (!count) return KRS_OK;
    uint32_t cap = 16;
    while (cap < 2ull * count) cap <<= 1;
    tok->merges = alloc_calloc(cap, sizeof *tok->merges);
    if (!tok->merges) return KRS_ERR_NOMEM;
    tok->merges_mask = cap - 1;
    size_t bufcap = 256;
    char *buf = alloc_malloc(bufcap);
    if (!buf) return KRS_ERR_NOMEM;
    for (uint64_t r = 0; r < count; r++) {
        const char *s;
        size_t l;
        gguf_kv_array_str(f, (uint64_t)ki, r, &s, &l);
        /* "left right": split at the first space after index 0 (llama-vocab.cpp). */
        const char *sp = l > 1 ? memchr(s + 1, ' ', l - 1) : NULL;
        if (!sp) continue;
        size_t ll = (size_t)(sp - s), rl = l - ll - 1;
        int32_t a = tok_lookup(tok, s, ll), b = tok_lookup(tok, sp + 1, rl);
        if (a < 0 || b < 0) continue; /* a merge of non-tokens can never apply to ids */
        if (ll + rl > bufcap) {
            char *nb = alloc_realloc(buf, ll + rl);
            if (!nb) {
                alloc_free(buf);
                return KRS_ERR_NOMEM;
            }
            buf = nb, bufcap = ll + rl;
        }
        memcpy(buf, s, ll);
        memcpy(buf + ll, sp + 1, rl);
        uint64_t key = (((uint64_t)(uint32_t)a << 32) | (uint32_t)b) + 1;
        uint32_t h = (uint32_t)tok_hash((const char *)&key, 8) & tok->merges_mask;
        while (tok->merges[h].key && tok->merges[h].key != key) h = (h + 1) & tok->merges_mask;
        if (tok->merges[h].key) continue; /* duplicate: the lower rank stays */
        tok->merges[h].key = key;
        tok->merges[h].rank = (int32_t)r;
        tok->merges[h].result = tok_lookup(tok, buf, ll + rl);
    }
    alloc_free(buf);
    return KRS_OK;
}

static const char *const eog_texts[] = {"<end_of_turn>", "<|eot_id|>",      "<|im_end|>",
                                        "<|endoftext|>", "<|end_of_text|>", "<|eom_id|>",
                                        "<|end|>"};

static void add_eog(struct tokenizer *tok, int32_t id)
{
    if (id < 0) return;
    for (size_t i = 0; i < tok->n_eog; i++)
        if (tok->eog[i] == id) return;
    if (tok->n_eog < TOK_MAX_EOG) tok->eog[tok->n_eog++] = id;
}

int tokenizer_load(const struct gguf_file *f, struct tokenizer **out, char *err, size_t errlen)
{
    *out = NULL;
    int rc;
    struct tokenizer *tok = alloc_calloc(1, sizeof *tok);
    if (!tok) return KRS_ERR_NOMEM;

    const char *model, *pre = NULL;
    size_t model_len, pre_len = 0;
    if (gguf_get_str(f, "tokenizer.ggml.model", &model, &model_len) != KRS_OK) {
        set_err(err, errlen, "tokenizer.ggml.model missing");
        rc = KRS_ERR_FORMAT;
        goto out;
    }
    if (str_is(model, model_len, "llama")) {
        tok->kind = TOK_SPM;
    } else if (str_is(model, model_len, "gpt2")) {
        tok->kind = TOK_BPE;
    } else {
        set_err(err, errlen, "unsupported tokenizer.ggml.model '%.*s' (supported: llama, gpt2)",
                (int)(model_len > 64 ? 64 : model_len), model);
        rc = KRS_ERR_UNSUPPORTED;
        goto out;
    }
    int default_add_bos = tok->kind == TOK_SPM;
    if (tok->kind == TOK_BPE) {
        gguf_get_str(f, "tokenizer.ggml.pre", &pre, &pre_len);
        static const char *const llama3[] = {"llama3",    "llama-v3", "llama-bpe",
                                             "smaug-bpe", "falcon3",  "pixtral"};
        static const char *const qwen2[] = {"qwen2", "deepseek-r1-qwen", "megrez"};
        tok->pre = PRE_GPT2;
        int known = !pre || str_is(pre, pre_len, "default") || str_is(pre, pre_len, "gpt-2") ||
                    str_is(pre, pre_len, "gpt2");
        for (size_t i = 0; i < sizeof llama3 / sizeof *llama3; i++)
            if (pre && str_is(pre, pre_len, llama3[i])) tok->pre = PRE_LLAMA3, known = 1;
        for (size_t i = 0; i < sizeof qwen2 / sizeof *qwen2; i++)
            if (pre && str_is(pre, pre_len, qwen2[i])) tok->pre = PRE_QWEN2, known = 1;
        if (!known) {
            set_err(err, errlen, "unsupported tokenizer.ggml.pre '%.*s'",
                    (int)(pre_len > 64 ? 64 : pre_len), pre);
            rc = KRS_ERR_UNSUPPORTED;
            goto out;
        }
        if (tok->pre == PRE_LLAMA3) tok->ignore_merges = 1, default_add_bos = 1;
    }

    rc = load_vocab(tok, f, err, errlen);
    if (rc) goto out;
    uint32_t n = tok->n_vocab;
    int spm = tok->kind == TOK_SPM;
    tok->bos = special_id(f, "tokenizer.ggml.bos_token_id", spm ? 1 : -1, n);
    tok->eos = special_id(f, "tokenizer.ggml.eos_token_id", spm ? 2 : -1, n);
    tok->unk = special_id(f, "tokenizer.ggml.unknown_token_id", spm ? 0 : -1, n);
    tok->eot = special_id(f, "tokenizer.ggml.eot_token_id", -1, n);
    tok->eom = special_id(f, "tokenizer.ggml.eom_token_id", -1, n);
    tok->add_bos = get_flag(f, "tokenizer.ggml.add_bos_token", default_add_bos);
    tok->add_eos = get_flag(f, "tokenizer.ggml.add_eos_token", 0);
    tok->add_space_prefix = spm ? get_flag(f, "tokenizer.ggml.add_space_prefix", 1) : 0;

    add_eog(tok, tok->eos);
    add_eog(tok, tok->eot);
    add_eog(tok, tok->eom);
    for (size_t i = 0; i < sizeof eog_texts / sizeof *eog_texts; i++)
        add_eog(tok, tok_lookup(tok, eog_texts[i], strlen(eog_texts[i])));

    if (spm) {
        rc = build_inner_spaces(tok);
        if (rc) goto out;
        for (int c = 0; c < 256; c++) {
            char hex[8];
            snprintf(hex, sizeof hex, "<0x%02X>", c);
            int32_t id = tok_lookup(tok, hex, 6);
            if (id < 0) {
                char one = (char)c;
                id = tok_lookup(tok, &one, 1);
            }
            tok->byte_tok[c] = id >= 0 ? id : tok->unk;
        }
    } else {
        tok_bpe_tables(tok->bpe_cp_byte, tok->bpe_byte_cp);
        for (int c = 0; c < 256; c++) {
            uint32_t cp = tok->bpe_byte_cp[c];
            char u[2] = {(char)(0xC0 | (cp >> 6)), (char)(0x80 | (cp & 0x3F))};
            tok->byte_tok[c] = cp < 0x80 ? tok_lookup(tok, (const char *)&(char){(char)cp}, 1)
                                         : tok_lookup(tok, u, 2);
        }
        rc = build_merges(tok, f, err, errlen);
        if (rc) goto out;
    }
    rc = build_specials(tok);
    if (rc) goto out;

    const char *tmpl;
    size_t tmpl_len;
    if (gguf_get_str(f, "tokenizer.chat_template", &tmpl, &tmpl_len) == KRS_OK) {
        tok->chat_template = alloc_strndup(tmpl, tmpl_len);
        if (!tok->chat_template) {
            rc = KRS_ERR_NOMEM;
            goto out;
        }
    }
out:
    if (rc) {
        if (rc == KRS_ERR_NOMEM) set_err(err, errlen, "out of memory loading the tokenizer");
        tokenizer_free(tok);
        return rc;
    }
    *out = tok;
    return KRS_OK;
}

void tokenizer_free(struct tokenizer *tok)
{
    if (!tok) return;
    alloc_free(tok->text);
    alloc_free(tok->off);
    alloc_free(tok->len);
    alloc_free(tok->scores);
    alloc_free(tok->types);
    alloc_free(tok->map);
    alloc_free(tok->cand);
    alloc_free(tok->trie);
    alloc_free(tok->merges);
    alloc_free(tok->inner);
    alloc_free(tok->chat_template);
    alloc_free(tok);
}

/* ---- accessors --------------------------------------------------------------------------- */

uint32_t tokenizer_n_vocab(const struct tokenizer *tok)
{
    return tok->n_vocab;
}

int32_t tokenizer_bos(const struct tokenizer *tok)
{
    return tok->bos;
}

int32_t tokenizer_eos(const struct tokenizer *tok)
{
    return tok->eos;
}

int tokenizer_is_eog(const struct tokenizer *tok, int32_t id)
{
    for (size_t i = 0; i < tok->n_eog; i++)
        if (tok->eog[i] == id) return 1;
    return 0;
}

const int32_t *tokenizer_eog_ids(const struct tokenizer *tok, size_t *n)
{
    *n = tok->n_eog;
    return tok->eog;
}

int32_t tokenizer_find(const struct tokenizer *tok, const char *s, size_t len)
{
    return tok_lookup(tok, s, len);
}

const char *tokenizer_token_text(const struct tokenizer *tok, int32_t id, size_t *len)
{
    if (id < 0 || (uint32_t)id >= tok->n_vocab) return NULL;
    if (len) *len = tok->len[id];
    return tok->text + tok->off[id];
}

int tokenizer_token_type(const struct tokenizer *tok, int32_t id)
{
    if (id < 0 || (uint32_t)id >= tok->n_vocab) return TOKEN_TYPE_UNDEFINED;
    return tok->types[id];
}

size_t tokenizer_max_piece(const struct tokenizer *tok)
{
    return tok->max_piece;
}

/* ---- encode ------------------------------------------------------------------------------ */

struct frag {
    size_t start, len;
    int32_t id; /* -1: raw text */
};

struct frag_buf {
    struct frag *v;
    size_t n, cap;
};

static int frag_add(struct frag_buf *b, size_t start, size_t len, int32_t id)
{
    if (b->n == b->cap) {
        size_t cap = b->cap ? b->cap * 2 : 64;
        struct frag *v = alloc_realloc(b->v, cap * sizeof *v);
        if (!v) return KRS_ERR_NOMEM;
        b->v = v, b->cap = cap;
    }
    b->v[b->n++] = (struct frag){start, len, id};
    return KRS_OK;
}

static int cand_allowed(const struct tokenizer *tok, uint32_t c, int parse_special)
{
    return parse_special || tok->types[tok->cand[c]] == TOKEN_TYPE_USER_DEFINED;
}

/* Splits text into raw and special-token fragments exactly as llama.cpp's
 * tokenizer_st_partition: candidates longest first, each one cut out of every remaining raw
 * fragment left to right. A trie pass first finds which candidates occur at all, so the cost is
 * proportional to the text times the number of candidates actually present. */
static int partition(const struct tokenizer *tok, const char *text, size_t len, int parse_special,
                     struct frag_buf *cur)
{
    int rc = KRS_OK;
    struct frag_buf next = {0};
    uint8_t *present = NULL;
    cur->n = 0;
    rc = frag_add(cur, 0, len, -1);
    if (rc || !tok->n_cand) return rc;
    present = alloc_calloc(tok->n_cand, 1);
    if (!present) return KRS_ERR_NOMEM;
    size_t n_present = 0;
    const uint8_t *s = (const uint8_t *)text;
    for (size_t i = 0; i < len; i++) {
        uint32_t node = tok->root[s[i]];
        size_t k = i;
        while (node) {
            int32_t c = tok->trie[node].cand;
            if (c >= 0 && !present[c] && cand_allowed(tok, (uint32_t)c, parse_special)) {
                present[c] = 1;
                n_present++;
            }
            if (++k >= len) break;
            node = tok->trie[node].child;
            while (node && tok->trie[node].byte != s[k]) node = tok->trie[node].sibling;
        }
    }
    for (uint32_t c = 0; c < tok->n_cand && n_present; c++) {
        if (!present[c]) continue;
        n_present--;
        int32_t id = tok->cand[c];
        const char *ct = tok->text + tok->off[id];
        size_t cl = tok->len[id];
        next.n = 0;
        for (size_t fi = 0; fi < cur->n; fi++) {
            struct frag fr = cur->v[fi];
            if (fr.id >= 0) {
                if ((rc = frag_add(&next, fr.start, fr.len, fr.id))) goto out;
                continue;
            }
            size_t pos = fr.start, end = fr.start + fr.len;
            while (end - pos >= cl) {
                const char *m = memmem(text + pos, end - pos, ct, cl);
                if (!m) break;
                size_t at = (size_t)(m - text);
                if (at > pos && (rc = frag_add(&next, pos, at - pos, -1))) goto out;
                if ((rc = frag_add(&next, at, cl, id))) goto out;
                pos = at + cl;
            }
            if (pos < end && (rc = frag_add(&next, pos, end - pos, -1))) goto out;
        }
        struct frag_buf t = *cur;
        *cur = next;
        next = t;
    }
out:
    alloc_free(next.v);
    alloc_free(present);
    return rc;
}

int tokenizer_encode(const struct tokenizer *tok, const char *text, size_t len, int add_special,
                     int parse_special, int32_t *ids, size_t cap, size_t *n_out)
{
    struct tok_sink out = {ids, ids ? cap : 0, 0};
    struct frag_buf frags = {0};
    int rc = KRS_OK;
    if (!text && len) return KRS_ERR_INVALID;
    if (add_special && tok->add_bos && tok->bos >= 0) tok_sink_push(&out, tok->bos);
    if (len) {
        rc = partition(tok, text, len, parse_special, &frags);
        if (rc) goto out;
        int prev_special = 1;
        for (size_t i = 0; i < frags.n; i++) {
            struct frag fr = frags.v[i];
            if (fr.id >= 0) {
                tok_sink_push(&out, fr.id);
                prev_special = 1;
                continue;
            }
            if (tok->kind == TOK_SPM)
                rc = tok_spm_encode(tok, text + fr.start, fr.len,
                                    tok->add_space_prefix && prev_special, &out);
            else
                rc = tok_bpe_encode(tok, text + fr.start, fr.len, &out);
            if (rc) goto out;
            prev_special = 0;
        }
    }
    if (add_special && tok->add_eos && tok->eos >= 0) tok_sink_push(&out, tok->eos);
out:
    alloc_free(frags.v);
    *n_out = out.n;
    if (!rc && out.n > cap) rc = KRS_ERR_FULL;
    return rc;
}

/* ---- decode ------------------------------------------------------------------------------ */

/* Bytes go to buf[0..cap); n counts every byte (also past cap); the first `skip` bytes of the
 * piece are dropped (the leading-space rule). */
struct piece_out {
    char *buf;
    size_t cap, n, skip;
};

static void put(struct piece_out *o, const void *src, size_t len)
{
    const char *p = src;
    if (o->skip) {
        size_t k = o->skip < len ? o->skip : len;
        o->skip -= k, p += k, len -= k;
    }
    if (o->n < o->cap) memcpy(o->buf + o->n, p, o->n + len <= o->cap ? len : o->cap - o->n);
    o->n += len;
}

static void piece(const struct tokenizer *tok, int32_t id, int render_special, struct piece_out *o)
{
    const char *s = tok->text + tok->off[id];
    size_t l = tok->len[id];
    switch (tok->types[id]) {
    case TOKEN_TYPE_CONTROL:
    case TOKEN_TYPE_UNKNOWN:
        if (render_special) put(o, s, l);
        return;
    case TOKEN_TYPE_USER_DEFINED:
        put(o, s, l);
        return;
    case TOKEN_TYPE_BYTE:
        if (tok->kind == TOK_SPM && l == 6) {
            char b = (char)strtol((char[3]){s[3], s[4], 0}, NULL, 16);
            put(o, &b, 1);
        }
        return;
    case TOKEN_TYPE_NORMAL:
        break;
    default:
        return;
    }
    if (tok->kind == TOK_SPM) {
        size_t i = 0;
        while (i < l) {
            if (i + 3 <= l && memcmp(s + i, "\xE2\x96\x81", 3) == 0) {
                put(o, " ", 1);
                i += 3;
            } else {
                size_t j = i + 1;
                while (j < l && (uint8_t)s[j] != 0xE2) j++;
                put(o, s + i, j - i);
                i = j;
            }
        }
        return;
    }
    for (size_t i = 0; i < l;) {
        size_t cl;
        uint32_t cp = unicode_decode((const uint8_t *)s + i, l - i, &cl);
        if (cp < 0x144 && tok->bpe_cp_byte[cp] >= 0) {
            char b = (char)tok->bpe_cp_byte[cp];
            put(o, &b, 1);
        } else {
            put(o, s + i, cl); /* not in the byte alphabet: keep the text */
        }
        i += cl;
    }
}

/* 1 when the piece of id starts with a space (for the leading-space rule). */
static int piece_starts_with_space(const struct tokenizer *tok, int32_t id, int render_special)
{
    char c;
    struct piece_out o = {&c, 1, 0, 0};
    piece(tok, id, render_special, &o);
    return o.n > 0 && c == ' ';
}

int tokenizer_token_piece(const struct tokenizer *tok, int32_t id, int render_special, char *buf,
                          size_t cap, size_t *n_out)
{
    *n_out = 0;
    if (id < 0 || (uint32_t)id >= tok->n_vocab) return KRS_ERR_INVALID;
    struct piece_out o = {buf, buf ? cap : 0, 0, 0};
    piece(tok, id, render_special, &o);
    *n_out = o.n;
    return o.n > cap ? KRS_ERR_FULL : KRS_OK;
}

int tokenizer_decode(const struct tokenizer *tok, const int32_t *ids, size_t n, int render_special,
                     char *buf, size_t cap, size_t *n_out)
{
    struct piece_out o = {buf, buf ? cap : 0, 0, 0};
    size_t strip_at = (n > 1 && ids[0] == tok->bos) ? 1 : 0;
    for (size_t i = 0; i < n; i++) {
        if (ids[i] < 0 || (uint32_t)ids[i] >= tok->n_vocab) {
            *n_out = o.n;
            return KRS_ERR_INVALID;
        }
        if (i == strip_at && tok->add_space_prefix &&
            piece_starts_with_space(tok, ids[i], render_special))
            o.skip = 1;
        piece(tok, ids[i], render_special, &o);
    }
    *n_out = o.n;
    return o.n > cap ? KRS_ERR_FULL : KRS_OK;
}

/* ---- streaming --------------------------------------------------------------------------- */

void tokenizer_detok_init(struct detok_state *st, int render_special)
{
    memset(st, 0, sizeof *st);
    st->render_special = (uint8_t)(render_special != 0);
}

int tokenizer_detok_push(const struct tokenizer *tok, struct detok_state *st, int32_t id, char *buf,
                         size_t cap, size_t *n_out)
{
    *n_out = 0;
    if (id < 0 || (uint32_t)id >= tok->n_vocab) return KRS_ERR_INVALID;
    size_t skip = 0;
    int strip_now = 0;
    if (tok->add_space_prefix && !st->strip_done && !(st->n_seen == 0 && id == tok->bos)) {
        strip_now = 1;
        skip = piece_starts_with_space(tok, id, st->render_special);
    }
    struct piece_out o = {buf, buf ? cap : 0, st->n_pending, skip};
    piece(tok, id, st->render_special, &o);
    if (o.n > o.cap) {
        *n_out = o.n;
        return KRS_ERR_FULL;
    }
    memcpy(buf, st->pending, st->n_pending);
    if (strip_now) st->strip_done = 1;
    if (st->n_seen < 2) st->n_seen++;
    size_t done = unicode_complete_prefix((const uint8_t *)buf, o.n);
    st->n_pending = (uint8_t)(o.n - done);
    memcpy(st->pending, buf + done, o.n - done);
    *n_out = done;
    return KRS_OK;
}

int tokenizer_detok_flush(struct detok_state *st, char *buf, size_t cap, size_t *n_out)
{
    *n_out = st->n_pending;
    if (st->n_pending > cap) return KRS_ERR_FULL;
    memcpy(buf, st->pending, st->n_pending);
    st->n_pending = 0;
    return KRS_OK;
}
