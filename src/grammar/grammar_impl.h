/* Private to grammar/: the compiled grammar and the sorted vocabulary.
 *
 * A grammar is a flat array of elements. Rule r starts at el[rule_start[r]]; its alternatives
 * follow one another, each ended by G_ALT, the last by G_END. Terminals match one Unicode code
 * point: G_LIT (val = the code point) or G_CLASS (val = index into classes). A position in the
 * grammar is an index into el; a parse stack is a list of positions, the top being the next
 * element to match (the matcher, grammar_match.c, keeps a set of such stacks). */
#ifndef KRS_GRAMMAR_IMPL_H
#define KRS_GRAMMAR_IMPL_H

#include "grammar/grammar.h"

#include <stdatomic.h>
#include <stdint.h>

enum { G_END = 0, G_ALT = 1, G_REF = 2, G_LIT = 3, G_CLASS = 4 };

struct gel {
    uint32_t type;
    uint32_t val;
};

struct gclass {
    uint32_t off, n; /* ranges[off .. off + n) */
    uint32_t neg;    /* 1: matches every code point outside the ranges */
};

struct grange {
    uint32_t lo, hi; /* inclusive */
};

struct grammar {
    _Atomic int refs;
    struct gel *el;
    uint32_t n_el;
    uint32_t *rule_start; /* [n_rules] */
    uint32_t n_rules;
    uint32_t root;
    struct gclass *classes;
    uint32_t n_classes;
    struct grange *ranges;
    uint32_t n_ranges;
    char *text;         /* the GBNF source (NUL-terminated) */
    uint64_t text_hash; /* FNV-1a of text: the shared mask cache's first comparison */
    /* For the matcher's mask keys (grammar_match.c, "Mask keys"): */
    uint32_t *rule_min;   /* [n_rules] fewest code points the rule derives (capped) */
    uint32_t *rule_level; /* [n_rules] k for the counter rule O_k of a bounded quantifier
                           * (O_k ::= sym O_(k-1) | ; at most k more syms), else 0. The rules
                           * O_1 .. O_n of one quantifier have consecutive ids. */
};

#define GRAMMAR_MIN_CAP (1u << 20) /* rule_min saturates here */

/* 1 when terminal element e matches code point cp. */
static inline int grammar_el_match(const struct grammar *g, const struct gel *e, uint32_t cp)
{
    if (e->type == G_LIT) return e->val == cp;
    const struct gclass *c = &g->classes[e->val];
    int in = 0;
    for (uint32_t i = 0; i < c->n && !in; i++)
        in = cp >= g->ranges[c->off + i].lo && cp <= g->ranges[c->off + i].hi;
    return in != (int)c->neg;
}

/* 1 when terminal e matches some code point in [lo, hi]. Exact for literals and positive
 * classes; for negated classes, 0 only when one excluded range covers [lo, hi]. */
static inline int grammar_el_match_range(const struct grammar *g, const struct gel *e, uint32_t lo,
                                         uint32_t hi)
{
    if (e->type == G_LIT) return e->val >= lo && e->val <= hi;
    const struct gclass *c = &g->classes[e->val];
    for (uint32_t i = 0; i < c->n; i++) {
        const struct grange *r = &g->ranges[c->off + i];
        if (c->neg && r->lo <= lo && r->hi >= hi) return 0;
        if (!c->neg && r->lo <= hi && r->hi >= lo) return 1;
    }
    return (int)c->neg;
}

/* Tokens sorted by their bytes, so that tokens sharing a prefix are neighbours: the mask walk
 * reuses the automaton states of the common prefix (lcp) and skips every token below a dead
 * prefix. */
struct grammar_toklist {
    int32_t n;
    int32_t *order; /* [n] token ids, by bytes */
    uint8_t *bytes; /* the tokens' texts again, in list order: a walk reads them in sequence */
    uint32_t *off;  /* [n] offsets into bytes */
    uint16_t *len;  /* [n] */
    uint16_t *lcp;  /* [n] common prefix with the previous entry */
    /* The implicit trie's nodes: entry i opens the nodes of its bytes lcp[i] .. len[i] - 1
     * (the prefixes b[0..d] for d in that range); node_end[node_off[i] + d - lcp[i]] is the
     * first entry past that node's subtree, so a walk that dies at byte d of entry i skips
     * every token below the dead prefix in one step. */
    uint32_t *node_off; /* [n] */
    int32_t *node_end;  /* [sum of len - lcp] */
};

/* "Plain" tokens: complete UTF-8 made only of printable ASCII other than '"' and '\', and
 * non-ASCII code points (most of a vocabulary). Where the grammar takes any such character
 * the same way (inside a JSON string), they need no walk: plain_le[l - 1] holds the plain
 * tokens of at most l code points. */
#define GRAMMAR_PLAIN_LEVELS 16
#define GRAMMAR_LONG_MAX     64

struct grammar_vocab {
    int32_t n_vocab;
    int32_t n_words;             /* mask words: ceil(n_vocab / 32) */
    struct grammar_toklist all;  /* every token with text */
    struct grammar_toklist rest; /* the tokens with text that are not plain */
    uint8_t *bytes;              /* concatenated texts */
    uint32_t *tok_off;           /* [n_vocab] by token id: offset into bytes */
    uint16_t *tok_len;           /* [n_vocab] 0 = empty text */
    uint8_t *eog;                /* [n_vocab] 1 = end of generation */
    int32_t *eog_ids;            /* [n_eog] the end-of-generation tokens */
    int32_t n_eog;
    uint8_t *plain_cps;  /* [n_vocab] code points of a plain token (max 255), else 0 */
    uint32_t *plain_le;  /* [GRAMMAR_PLAIN_LEVELS][n_words] */
    int32_t *plain_long; /* plain tokens of more than GRAMMAR_PLAIN_LEVELS code points */
    int32_t n_plain_long;
    int32_t max_plain;                     /* most code points of a plain token */
    int32_t plain_n[GRAMMAR_PLAIN_LEVELS]; /* tokens set in each plain_le level */
    /* A token's "lead": the most grammar terminals it can touch from a state between code
     * points (its bytes that start a code point, not 0x80..0xBF, plus one when it starts with
     * a continuation byte). max_lead: the vocabulary's largest. The few tokens (at most
     * GRAMMAR_LONG_MAX) whose lead is above key_lead are "long": they are in no list and no
     * plain mask, and the matcher checks them one by one at every mask, so that its mask keys
     * (grammar_match.c) need only reach key_lead code points (Gemma: 16, not 31, for the 45
     * runs of newlines, tabs and spaces). */
    int32_t max_lead, key_lead;
    uint8_t *tok_long; /* [n_vocab] 1 = long */
    int32_t *long_ids; /* [n_long] */
    int32_t n_long;
    uint16_t max_len;
    /* The mask cache shared by the matchers of this vocabulary (grammar_cache.c): internally
     * locked, the one mutable part of a vocabulary. */
    struct grammar_mask_cache *shared;
};

/* A JSON Schema "pattern" as a GBNF expression for the JSON-encoded content of a matching
 * string (grammar_regex.c). *out: alloc'd, the caller frees it. KRS_ERR_UNSUPPORTED with the
 * feature named in err. */
int grammar_regex_to_gbnf(const char *pattern, char **out, char *err, size_t errlen);

/* A vocabulary from explicit token texts (tests, benches): text[t][0..len[t]), eog[t] (may be
 * NULL). Everything is copied. */
int grammar_vocab_create_raw(int32_t n, const char *const *text, const size_t *len,
                             const uint8_t *eog, struct grammar_vocab **out);
/* The byte vocabulary of the tests and the fuzzer: token b < 256 is byte b, token 256 the end
 * of generation (no text), then multi[0..n_multi) (NUL-terminated texts). */
#define GRAMMAR_BYTE_EOG 256
int grammar_vocab_create_bytes(const char *const *multi, size_t n_multi,
                               struct grammar_vocab **out);

/* The shared mask cache (grammar_cache.c). create: masks of n_words words. get: 1 and the
 * mask copied to mask[0..n_words) when grammar text g->text has one for key[0..len) (hash h),
 * else 0. put: keeps a copy (taking a reference on g). Both are safe from any thread. */
struct grammar_mask_cache;
int grammar_mask_cache_create(int32_t n_words, struct grammar_mask_cache **out);
void grammar_mask_cache_free(struct grammar_mask_cache *c);
void grammar_mask_cache_clear(struct grammar_mask_cache *c); /* tests and benches */
int grammar_mask_cache_get(struct grammar_mask_cache *c, const struct grammar *g,
                           const uint32_t *key, uint32_t len, uint32_t h, uint32_t *mask,
                           int32_t *n_allowed);
void grammar_mask_cache_put(struct grammar_mask_cache *c, struct grammar *g, const uint32_t *key,
                            uint32_t len, uint32_t h, const uint32_t *mask, int32_t n_allowed);

/* Test and bench hooks of the matcher (grammar_match.c). mask_fresh computes the current
 * position's mask into out (n_words words) from the automaton, bypassing every mask cache:
 * what a cache hit must equal. set_key_mode 0 keys the mask cache by state alone and does not
 * share (the matcher before mask keys, for before/after measurements), 1 by mask key without
 * the shared cache, 2 by mask key with it (the default); it drops the matcher's cached masks. */
int grammar_matcher_mask_fresh(struct grammar_matcher *m, uint32_t *out, int32_t *n_allowed);
void grammar_matcher_set_key_mode(struct grammar_matcher *m, int mode);

#endif
