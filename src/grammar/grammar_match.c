/* The per-sequence matcher: where the output is in the grammar, and which tokens may come next.
 *
 * Parsing. A grammar position is a set of parse stacks (llama.cpp's algorithm): each stack lists
 * grammar positions, its top a terminal to match next; an empty stack means the text so far is
 * a complete sentence. Advancing by a code point keeps the stacks whose top matches, pops that
 * terminal and expands rule references at the new top depth-first (no left recursion: checked
 * at compile time), giving the next set. Text arrives as bytes: between code points the
 * position is an interned state; inside a UTF-8 sequence it is a "virtual" value (the state
 * before the sequence, the bits so far, the bytes left), never interned, kept only when some
 * stack can match a code point with that prefix.
 *
 * Speed. Each distinct state (the sorted, deduplicated set of stacks) is interned once and gets
 * a numeric id; transitions by byte are filled in lazily and cached (a lazily built DFA over
 * the grammar's states) for ASCII. Most states treat every code point >= 0x80 alike (a JSON
 * string takes them all, structure takes none): such a state stores its one non-ASCII
 * successor; the others look code points up by their "signature" (which stacks' tops match). The
 * mask of a state walks the vocabulary sorted by bytes: neighbours share the states of their common
 * prefix and a dead prefix skips every token below it, so a miss costs a few table lookups per
 * distinct trie byte.
 *
 * Mask keys. Masks are cached (MASK_SLOTS, clock eviction) under a key coarser than the state.
 * Every token but the few "long" ones (grammar_impl.h) touches at most L = vocab->key_lead
 * terminals, so only the first L code points of what each stack can still derive decide which
 * of them are allowed; the long ones are left out of cached masks, checked one by one (the
 * result kept per state) and, when some are allowed, added to a copy of the cached mask. A
 * stack's key is the sequence of grammar elements it will match, read from the top down,
 * stopping (CUT) once the elements before the next one need L code points at least (rule_min),
 * or at the stack's end (EOS); a reference to a quantifier's counter rule O_j (at most j more
 * items, grammar_impl.h) is written as O_min(j, B), B being the code points left at that
 * element, since at most B items can be touched. A state's key is its stacks' keys, sorted and
 * deduplicated. Two states with the same key have the same cached mask, so a string's counter
 * far from maxLength, the item index of a long array, or the rest of the document below the
 * current value do not make new masks. Each state's key id is computed once (st->mkey). Keys
 * name rule ids and terminals, never state ids, so they also index the mask cache shared by
 * every matcher of the vocabulary (grammar_cache.c), asked on a local miss.
 *
 * Memory is reserved at creation; when a table fills up everything is flushed and rebuilt from
 * the current state. Must not allocate after grammar_matcher_create. */
#include "grammar/grammar_impl.h"

#include "krserve.h"
#include "util/alloc.h"
#include "util/clock.h"

#include <stdlib.h>
#include <string.h>

#define MAX_STATES  16000 /* ids fit int16 */
#define HASH_SIZE   32768 /* power of two, >= 2 * MAX_STATES */
#define KEY_WORDS   (256 * 1024)
#define TRANS_CAP   (1024 * 1024)
#define SIG_SIZE    8192 /* power of two */
#define MASK_SLOTS  16
#define MAX_MKEYS   MAX_STATES
#define MKEY_HASH   32768 /* power of two, >= 2 * MAX_MKEYS */
#define MKEY_WORDS  (256 * 1024)
#define DESC_WORDS  (64 * 1024) /* one state's stack keys while they are built */
#define MK_CUT      0xFFFFFFFFu /* stack key ends: what follows is out of a token's reach */
#define MK_EOS      0xFFFFFFFEu /* stack key ends: the stack ends */
#define MAX_STACKS  512
#define MAX_DEPTH   1024
#define BUILD_WORDS (64 * 1024)
#define UNKNOWN     (-1)
#define DEAD        (-2)
#define NA_UNKNOWN  0
#define NA_UNIFORM  1 /* every code point >= 0x80 leads to na_next */
#define NA_MIXED    2

/* Positions: >= 0 an interned state; VPART bit set: inside a UTF-8 sequence. */
#define VPART                (1ll << 62)
#define VP_MAKE(b, cp, r, t) (VPART | (int64_t)(b) << 32 | (int64_t)(cp) << 8 | (r) << 4 | (t))
#define VP_BASE(v)           ((int32_t)((v) >> 32 & 0xFFFF))
#define VP_CP(v)             ((uint32_t)((v) >> 8 & 0x1FFFFF))
#define VP_REM(v)            ((int)((v) >> 4 & 0xF))
#define VP_TOTAL(v)          ((int)((v)&0xF))

struct mstate {
    uint32_t key_off, key_len; /* [len, pos...] per stack, stacks sorted */
    uint32_t hash;
    int32_t trans; /* offset in the transition pool (128 ASCII entries), or -1 */
    uint8_t accepting, na_kind, plain_kind;
    int32_t mkey;       /* mask key id, -1: not computed yet */
    uint8_t long_known; /* long_set is valid */
    uint64_t long_set;  /* bit i: vocab->long_ids[i] is allowed here */
    int32_t plain_next; /* NA_UNIFORM plain_kind: the state after any plain character */
    int32_t na_next;    /* NA_UNIFORM: the state after any code point >= 0x80 (or DEAD) */
    uint32_t n_term;    /* stacks with a terminal on top */
};

struct mkey {
    uint32_t off, len; /* words in the key pool */
    uint32_t hash;
    int32_t mask_slot; /* -1: no cached mask */
    int shared;        /* 1: a grammar-level key, looked up in and put to vocab->shared */
};

struct sig_entry {
    uint64_t sig;
    int16_t state, next;
};

struct grammar_matcher {
    struct grammar *g;
    const struct grammar_vocab *v;
    struct mstate *st;
    int32_t n_st;
    int16_t *hash; /* [HASH_SIZE] state ids, -1 empty */
    uint32_t *keys;
    uint32_t n_keys;
    int16_t *trans;
    uint32_t n_trans;
    struct sig_entry *sig; /* [SIG_SIZE], state -1 = empty */
    uint32_t n_sig;
    int overflow; /* a table filled up: flush before going on */
    /* stack building scratch */
    uint32_t *build; /* [BUILD_WORDS] result stacks as [len, pos...] */
    uint32_t n_build, n_build_stacks;
    uint32_t *stack;    /* [MAX_DEPTH] the stack being expanded */
    uint32_t *sort_off; /* [MAX_STACKS] */
    /* masks */
    /* mask keys ("Mask keys" above) */
    struct mkey *mk; /* [MAX_MKEYS] */
    int32_t n_mk;
    int32_t *mk_hash; /* [MKEY_HASH] key ids, -1 empty */
    uint32_t *mk_words;
    uint32_t n_mk_words;
    uint32_t *desc;     /* [DESC_WORDS] stack keys being built, each [len, words...] */
    uint32_t *desc_off; /* [MAX_STACKS] */
    int key_mode;       /* 2: keys as above, shared; 1: not shared; 0: per state (bench) */
    int32_t last_slot;  /* the slot of the last mask handed out, -1: none */
    uint32_t *patch;    /* [n_words] a cached mask plus the allowed long tokens */
    int patch_slot;     /* patch = slot patch_slot (filled patch_gen) + patch_set; -1: none */
    uint32_t patch_gen;
    uint64_t patch_set;
    uint32_t slot_gen[MASK_SLOTS]; /* bumped whenever a slot is filled */
    /* masks */
    int32_t n_words;
    uint32_t *masks; /* [MASK_SLOTS][n_words] */
    int32_t slot_key[MASK_SLOTS];
    int32_t slot_allowed[MASK_SLOTS];
    uint8_t slot_ref[MASK_SLOTS];
    int clock_hand;
    int64_t *walk; /* [max_len + 1] positions along the current token */
    int64_t cur;
    int finished; /* an end-of-generation token was accepted */
    struct grammar_matcher_stats stats;
};

/* ---- interning ---- */

static uint32_t hash_words(const uint32_t *w, uint32_t n, uint32_t seed)
{
    uint64_t h = 0x9E3779B97F4A7C15ull ^ seed;
    for (uint32_t i = 0; i < n; i++) {
        h ^= w[i];
        h *= 0xff51afd7ed558ccdull;
        h ^= h >> 32;
    }
    return (uint32_t)h;
}

static int32_t new_state(struct grammar_matcher *m, uint32_t h)
{
    if (m->n_st >= MAX_STATES) {
        m->overflow = 1;
        return DEAD;
    }
    int32_t id = m->n_st++;
    memset(&m->st[id], 0, sizeof m->st[id]);
    m->st[id].hash = h;
    m->st[id].trans = -1;
    m->st[id].mkey = -1;
    m->stats.states++;
    for (uint32_t i = h & (HASH_SIZE - 1);; i = (i + 1) & (HASH_SIZE - 1))
        if (m->hash[i] < 0) {
            m->hash[i] = (int16_t)id;
            break;
        }
    return id;
}

/* Interns the stacks in m->build as a FULL state; DEAD when there are none. */
static int32_t intern_full(struct grammar_matcher *m);

/* Stacks [len, pos...] compared by length, then positions. */
static int cmp_stacks(const uint32_t *a, const uint32_t *b)
{
    if (a[0] != b[0]) return a[0] < b[0] ? -1 : 1;
    for (uint32_t i = 1; i <= a[0]; i++)
        if (a[i] != b[i]) return a[i] < b[i] ? -1 : 1;
    return 0;
}

/* Sorts off[0..n), offsets of [len, words...] lists in w, by cmp_stacks (insertion sort: the
 * lists are few). */
static void sort_stacks(const uint32_t *w, uint32_t *off, uint32_t n)
{
    for (uint32_t i = 1; i < n; i++) {
        uint32_t x = off[i], j = i;
        while (j > 0 && cmp_stacks(w + off[j - 1], w + x) > 0) {
            off[j] = off[j - 1];
            j--;
        }
        off[j] = x;
    }
}

static int32_t intern_full(struct grammar_matcher *m)
{
    uint32_t n = m->n_build_stacks;
    if (!n || m->overflow) return DEAD;
    /* sort (insertion sort: few stacks) and dedupe into the key */
    uint32_t *off = m->sort_off;
    for (uint32_t i = 0, p = 0; i < n; i++) {
        off[i] = p;
        p += 1 + m->build[p];
    }
    const uint32_t *bw = m->build;
    sort_stacks(bw, off, n);
    /* key into the pool tail (not committed until it is known to be new) */
    uint32_t start = m->n_keys, k = start, n_term = 0, accepting = 0;
    for (uint32_t i = 0; i < n; i++) {
        if (i > 0 && !cmp_stacks(bw + off[i - 1], bw + off[i])) continue;
        const uint32_t *s = m->build + off[i];
        if (k + 1 + s[0] > KEY_WORDS) {
            m->overflow = 1;
            return DEAD;
        }
        memcpy(m->keys + k, s, (1 + s[0]) * sizeof *s);
        k += 1 + s[0];
        if (s[0])
            n_term++;
        else
            accepting = 1;
    }
    uint32_t len = k - start, h = hash_words(m->keys + start, len, 0);
    for (uint32_t i = h & (HASH_SIZE - 1); m->hash[i] >= 0; i = (i + 1) & (HASH_SIZE - 1)) {
        const struct mstate *s = &m->st[m->hash[i]];
        if (s->hash == h && s->key_len == len &&
            !memcmp(m->keys + s->key_off, m->keys + start, len * sizeof(uint32_t)))
            return m->hash[i];
    }
    int32_t id = new_state(m, h);
    if (id < 0) return DEAD;
    m->n_keys = k;
    struct mstate *s = &m->st[id];
    s->key_off = start;
    s->key_len = len;
    s->n_term = n_term;
    s->accepting = (uint8_t)accepting;
    return id;
}

/* ---- expansion ---- */

static void add_build(struct grammar_matcher *m, const uint32_t *s, uint32_t len)
{
    if (m->n_build + 1 + len > BUILD_WORDS || m->n_build_stacks >= MAX_STACKS) {
        m->overflow = 1;
        return;
    }
    m->build[m->n_build] = len;
    memcpy(m->build + m->n_build + 1, s, len * sizeof *s);
    m->n_build += 1 + len;
    m->n_build_stacks++;
}

static int is_end(const struct gel *e)
{
    return e->type == G_END || e->type == G_ALT;
}

/* Expands stack[0..len) until every resulting stack has a terminal on top (or is empty), adding
 * them to the build. Leaves stack[0..len) as it found it (callees reuse the same array). */
static void expand(struct grammar_matcher *m, uint32_t len)
{
    const struct grammar *g = m->g;
    uint32_t *s = m->stack;
    if (m->overflow) return;
    if (len == 0) {
        add_build(m, s, 0);
        return;
    }
    uint32_t top = s[len - 1];
    const struct gel *e = &g->el[top];
    if (e->type != G_REF) {
        add_build(m, s, len);
        return;
    }
    uint32_t blen = len - 1;
    if (!is_end(&g->el[top + 1])) s[blen++] = top + 1;
    if (blen + 1 >= MAX_DEPTH) {
        m->overflow = 1;
        return;
    }
    for (uint32_t a = g->rule_start[e->val];;) {
        if (is_end(&g->el[a])) {
            expand(m, blen);
        } else {
            s[blen] = a;
            expand(m, blen + 1);
        }
        while (!is_end(&g->el[a])) a++;
        if (g->el[a].type == G_END) break;
        a++;
    }
    s[len - 1] = top; /* callers rely on stack[0..len) being unchanged */
}

/* The state after code point cp from FULL state id (uncached). */
static int32_t advance_cp(struct grammar_matcher *m, int32_t id, uint32_t cp)
{
    const struct grammar *g = m->g;
    m->n_build = m->n_build_stacks = 0;
    const struct mstate *s = &m->st[id];
    const uint32_t *k = m->keys + s->key_off, *end = k + s->key_len;
    for (; k < end; k += 1 + k[0]) {
        uint32_t len = k[0];
        if (!len || !grammar_el_match(g, &g->el[k[len]], cp)) continue;
        memcpy(m->stack, k + 1, (len - 1) * sizeof *k);
        uint32_t nl = len - 1, next = k[len] + 1;
        if (!is_end(&g->el[next])) m->stack[nl++] = next;
        expand(m, nl);
    }
    return intern_full(m);
}

/* *sig: bit i set when the top of the i-th non-empty stack of state id matches cp. 0 when the
 * state has more than 64 such stacks (no signature). */
static int stack_sig(const struct grammar_matcher *m, int32_t id, uint32_t cp, uint64_t *sig)
{
    const struct grammar *g = m->g;
    const struct mstate *s = &m->st[id];
    if (s->n_term > 64) return 0;
    uint64_t x = 0;
    int bit = 0;
    const uint32_t *k = m->keys + s->key_off, *end = k + s->key_len;
    for (; k < end; k += 1 + k[0]) {
        if (!k[0]) continue;
        if (grammar_el_match(g, &g->el[k[k[0]]], cp)) x |= 1ull << bit;
        bit++;
    }
    *sig = x;
    return 1;
}

/* Same as advance_cp, cached by which stacks' tops match cp (for cp >= 0x80). */
static int32_t advance_sig(struct grammar_matcher *m, int32_t id, uint32_t cp)
{
    uint64_t sig;
    if (!stack_sig(m, id, cp, &sig)) return advance_cp(m, id, cp);
    if (!sig) return DEAD;
    uint32_t h = hash_words((const uint32_t *)&sig, 2, (uint32_t)id) & (SIG_SIZE - 1);
    for (uint32_t i = h;; i = (i + 1) & (SIG_SIZE - 1)) {
        struct sig_entry *e = &m->sig[i];
        if (e->state == id && e->sig == sig) return e->next;
        if (e->state < 0) {
            int32_t next = advance_cp(m, id, cp);
            if (m->n_sig < SIG_SIZE / 2 && !m->overflow) {
                *e = (struct sig_entry){sig, (int16_t)id, (int16_t)next};
                m->n_sig++;
            }
            return next;
        }
    }
}

/* 1 when some stack of FULL state id can match a code point in [lo, hi]. */
static int viable(const struct grammar_matcher *m, int32_t id, uint32_t lo, uint32_t hi)
{
    const struct grammar *g = m->g;
    const struct mstate *s = &m->st[id];
    const uint32_t *k = m->keys + s->key_off, *end = k + s->key_len;
    for (; k < end; k += 1 + k[0])
        if (k[0] && grammar_el_match_range(g, &g->el[k[k[0]]], lo, hi)) return 1;
    return 0;
}

/* Whether every code point >= 0x80 leads the same way from state id; if so, where. */
static int na_uniform(struct grammar_matcher *m, int32_t id)
{
    struct mstate *s = &m->st[id];
    if (s->na_kind != NA_UNKNOWN) return s->na_kind == NA_UNIFORM;
    const struct grammar *g = m->g;
    int uniform = 1;
    const uint32_t *k = m->keys + s->key_off, *end = k + s->key_len;
    for (; k < end && uniform; k += 1 + k[0]) {
        if (!k[0]) continue;
        const struct gel *e = &g->el[k[k[0]]];
        int any = grammar_el_match_range(g, e, 0x80, 0x10FFFF);
        int all = 0;
        if (e->type == G_CLASS) {
            const struct gclass *c = &g->classes[e->val];
            if (c->neg) {
                all = 1;
                for (uint32_t i = 0; i < c->n; i++) all &= g->ranges[c->off + i].hi < 0x80;
            } else {
                for (uint32_t i = 0; i < c->n; i++)
                    all |= g->ranges[c->off + i].lo <= 0x80 && g->ranges[c->off + i].hi >= 0x10FFFF;
            }
        }
        uniform = !any || all;
    }
    int32_t next = DEAD;
    if (uniform) next = advance_cp(m, id, 0x80);
    if (m->overflow) return uniform;
    s = &m->st[id];
    s->na_kind = uniform ? NA_UNIFORM : NA_MIXED;
    s->na_next = next;
    return uniform;
}

/* 1 when a code point with the bits `cp` so far (rem bytes left, total long) can follow id. */
static int partial_viable(struct grammar_matcher *m, int32_t id, uint32_t cp, int rem, int total)
{
    static const uint32_t min_cp[5] = {0, 0, 0x80, 0x800, 0x10000};
    uint32_t lo = cp << (6 * rem), hi = lo | ((1u << (6 * rem)) - 1);
    if (lo < min_cp[total]) lo = min_cp[total];
    if (hi > 0x10FFFF) hi = 0x10FFFF;
    /* no valid code point starts this way (overlong, past U+10FFFF, a surrogate): checked
     * before the uniform shortcut, which would otherwise admit a prefix no byte completes */
    if (lo > hi || (lo >= 0xD800 && hi <= 0xDFFF)) return 0;
    if (na_uniform(m, id)) return m->st[id].na_next >= 0;
    return viable(m, id, lo, hi);
}

/* The position after byte c from position v (DEAD when no sentence continues that way). */
static int64_t step_byte(struct grammar_matcher *m, int64_t v, uint8_t c)
{
    if (v & VPART) {
        if ((c & 0xC0) != 0x80) return DEAD;
        int32_t base = VP_BASE(v);
        uint32_t cp = VP_CP(v) << 6 | (c & 0x3Fu);
        int rem = VP_REM(v) - 1, total = VP_TOTAL(v);
        if (rem > 0)
            return partial_viable(m, base, cp, rem, total) ? VP_MAKE(base, cp, rem, total) : DEAD;
        static const uint32_t min_cp[5] = {0, 0, 0x80, 0x800, 0x10000};
        if (cp < min_cp[total] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return DEAD;
        if (na_uniform(m, base)) return m->st[base].na_next;
        return advance_sig(m, base, cp);
    }
    int32_t id = (int32_t)v;
    if (c >= 0x80) {
        int rem = c >= 0xC2 && c <= 0xDF   ? 1
                  : c >= 0xE0 && c <= 0xEF ? 2
                  : c >= 0xF0 && c <= 0xF4 ? 3
                                           : 0;
        if (!rem) return DEAD;
        uint32_t cp = c & (rem == 1 ? 0x1Fu : rem == 2 ? 0x0Fu : 0x07u);
        return partial_viable(m, id, cp, rem, rem + 1) ? VP_MAKE(id, cp, rem, rem + 1) : DEAD;
    }
    struct mstate *s = &m->st[id];
    if (s->trans < 0) {
        if (m->n_trans + 128 > TRANS_CAP) {
            m->overflow = 1;
            return DEAD;
        }
        s->trans = (int32_t)m->n_trans;
        memset(m->trans + m->n_trans, 0xFF, 128 * sizeof *m->trans); /* -1 = UNKNOWN */
        m->n_trans += 128;
    }
    int16_t t = m->trans[s->trans + c];
    if (t != UNKNOWN) return t;
    int32_t next = advance_cp(m, id, c);
    if (m->overflow) return DEAD; /* nothing cached: the tables are about to be flushed */
    m->trans[m->st[id].trans + c] = (int16_t)next;
    return next;
}

/* ---- flushing ---- */

/* Forgets every mask key and which mask slot holds which key. */
static void reset_mask_keys(struct grammar_matcher *m)
{
    m->n_mk = 0;
    m->n_mk_words = 0;
    memset(m->mk_hash, 0xFF, MKEY_HASH * sizeof *m->mk_hash);
    for (int i = 0; i < MASK_SLOTS; i++) m->slot_key[i] = -1;
    m->last_slot = -1;
    m->patch_slot = -1;
}

static void reset_tables(struct grammar_matcher *m)
{
    m->n_st = 0;
    m->n_keys = 0;
    m->n_trans = 0;
    m->n_sig = 0;
    m->overflow = 0;
    memset(m->hash, 0xFF, HASH_SIZE * sizeof *m->hash);
    for (int i = 0; i < SIG_SIZE; i++) m->sig[i].state = -1;
    reset_mask_keys(m);
}

/* Rebuilds the automaton from nothing but the current position. */
static int flush(struct grammar_matcher *m)
{
    int64_t cur = m->cur;
    int32_t base = cur & VPART ? VP_BASE(cur) : (int32_t)cur;
    const struct mstate *bs = &m->st[base];
    uint32_t len = bs->key_len;
    /* the key moves to the build buffer (it holds at most BUILD_WORDS words as a state) */
    if (len > BUILD_WORDS) return KRS_ERR_INTERNAL;
    memmove(m->build, m->keys + bs->key_off, len * sizeof *m->build);
    uint32_t n = 0;
    for (uint32_t p = 0; p < len; p += 1 + m->build[p]) n++;
    reset_tables(m);
    m->stats.flushes++;
    m->n_build = len;
    m->n_build_stacks = n;
    int32_t id = intern_full(m);
    if (id < 0) return KRS_ERR_INTERNAL;
    m->cur = cur & VPART ? VP_MAKE(id, VP_CP(cur), VP_REM(cur), VP_TOTAL(cur)) : id;
    return KRS_OK;
}

/* ---- masks ---- */

/* Whether every plain character (grammar_impl.h) leads the same way from state id, and where:
 * NA_UNIFORM with *next (DEAD when none is allowed), or NA_MIXED. */
static int plain_step(struct grammar_matcher *m, int32_t id, int32_t *next)
{
    struct mstate *s = &m->st[id];
    if (s->plain_kind == NA_UNKNOWN) {
        int kind = NA_MIXED;
        int32_t x = DEAD;
        if (na_uniform(m, id)) {
            x = m->st[id].na_next;
            kind = NA_UNIFORM;
            /* The state after a code point depends only on which stacks' tops match it: when
             * every plain ASCII character matches the same stacks as the code points >= 0x80,
             * all lead to na_next, without interning the same state 94 times. */
            uint64_t sig80;
            int same = stack_sig(m, id, 0x80, &sig80);
            for (int c = 0x20; c < 0x7F && same; c++) {
                uint64_t sig;
                if (c != '"' && c != '\\')
                    same = stack_sig(m, id, (uint32_t)c, &sig) && sig == sig80;
            }
            for (int c = 0x20; c < 0x7F && kind == NA_UNIFORM && !same; c++) {
                if (c == '"' || c == '\\') continue;
                int64_t y = step_byte(m, id, (uint8_t)c);
                if (y != x) kind = NA_MIXED;
            }
        }
        if (m->overflow) return NA_MIXED;
        s = &m->st[id];
        s->plain_kind = (uint8_t)kind;
        s->plain_next = x;
    }
    *next = s->plain_next;
    return s->plain_kind;
}

/* How many plain characters in a row state id takes whatever they are: 0..max, or -1 when
 * that depends on which characters (the plain shortcut does not apply). */
static int32_t plain_run(struct grammar_matcher *m, int32_t id, int32_t max)
{
    int32_t n = 0;
    while (n < max) {
        int32_t next;
        if (plain_step(m, id, &next) != NA_UNIFORM) return n ? -1 : -1;
        if (next < 0) return n;
        if (next == id) return max; /* a loop: any number */
        id = next;
        n++;
    }
    return n;
}

/* Sets the bits of the tokens of list l whose bytes the grammar takes from `from`; returns how
 * many bits it set that were clear. */
static int32_t walk_list(struct grammar_matcher *m, const struct grammar_toklist *l, int64_t from,
                         uint32_t *mask)
{
    int64_t *st = m->walk;
    st[0] = from;
    uint32_t valid = 0;
    int32_t added = 0;
    for (int32_t i = 0; i < l->n && !m->overflow; i++) {
        uint32_t d = l->lcp[i] < valid ? l->lcp[i] : valid, len = l->len[i];
        const uint8_t *b = l->bytes + l->off[i];
        while (d < len) {
            int64_t ns = step_byte(m, st[d], b[d]);
            if (ns < 0) break;
            st[++d] = ns;
        }
        valid = d;
        if (d == len) {
            int32_t t = l->order[i];
            added += !(mask[t >> 5] >> (t & 31) & 1);
            mask[t >> 5] |= 1u << (t & 31);
        } else if (d >= l->lcp[i]) { /* always: the walk resumes at the shared prefix */
            i = l->node_end[l->node_off[i] + d - l->lcp[i]] - 1;
        } else {
            while (i + 1 < l->n && l->lcp[i + 1] > d) i++;
        }
    }
    return added;
}

/* The mask from position `from`, computed (not cached). One pass over the mask's 32 KB: where
 * the plain shortcut applies the mask starts as a copy of the plain level (its count known),
 * otherwise cleared; every bit set afterwards is counted as it is set. */
static void walk_mask(struct grammar_matcher *m, int64_t from, uint32_t *mask, int32_t *n_allowed)
{
    const struct grammar_vocab *v = m->v;
    size_t nw = (size_t)v->n_words;
    int32_t n = 0;
    int32_t run = from & VPART ? -1 : plain_run(m, (int32_t)from, v->max_plain);
    if (m->overflow) return;
    if (run <= 0) {
        memset(mask, 0, nw * sizeof *mask);
        n = walk_list(m, run < 0 ? &v->all : &v->rest, from, mask);
    } else {
        /* plain tokens of at most `run` code points all fit; walk only the others */
        int32_t lv = run < GRAMMAR_PLAIN_LEVELS ? run : GRAMMAR_PLAIN_LEVELS;
        memcpy(mask, v->plain_le + (size_t)(lv - 1) * nw, nw * sizeof *mask);
        n = v->plain_n[lv - 1];
        for (int32_t i = 0; i < v->n_plain_long; i++) {
            int32_t t = v->plain_long[i];
            if (v->plain_cps[t] > run) continue;
            n += !(mask[t >> 5] >> (t & 31) & 1);
            mask[t >> 5] |= 1u << (t & 31);
        }
        n += walk_list(m, &v->rest, from, mask);
    }
    if (!(from & VPART) && m->st[from].accepting)
        for (int32_t i = 0; i < v->n_eog; i++) {
            int32_t t = v->eog_ids[i];
            n += !(mask[t >> 5] >> (t & 31) & 1);
            mask[t >> 5] |= 1u << (t & 31);
        }
    *n_allowed = n;
}

/* ---- mask keys ---- */

/* Appends to m->desc the key of the stack k ([len, pos...], top last); 0, or -1 when the
 * scratch is full. See "Mask keys" at the top. */
static int desc_stack(struct grammar_matcher *m, const uint32_t *k, uint32_t *n)
{
    const struct grammar *g = m->g;
    const uint32_t reach = (uint32_t)m->v->key_lead;
    uint32_t head = *n, w = head + 1, cost = 0, end = MK_EOS;
    for (uint32_t e = k[0]; e >= 1 && end == MK_EOS; e--) {
        for (uint32_t q = k[e]; !is_end(&g->el[q]); q++) {
            if (cost >= reach) {
                end = MK_CUT;
                break;
            }
            if (w + 2 > DESC_WORDS) return -1;
            const struct gel *x = &g->el[q];
            uint32_t val = x->val;
            if (x->type == G_REF && g->rule_level[val] > reach - cost) {
                /* O_j with j > B items allowed: O_B (consecutive ids, checked) */
                uint32_t j = g->rule_level[val], b = reach - cost;
                if (g->rule_level[val - (j - b)] == b) val -= j - b;
            }
            m->desc[w++] = x->type << 29 | val;
            cost += x->type == G_REF ? g->rule_min[val] : 1;
        }
    }
    m->desc[w++] = end;
    m->desc[head] = w - head - 1;
    *n = w;
    return 0;
}

/* The mask key id of FULL state id, interned on first use; -1 with m->overflow set when a
 * table is full. In key mode 0 the key is the state itself. */
static int32_t mask_key(struct grammar_matcher *m, int32_t id)
{
    if (m->st[id].mkey >= 0) return m->st[id].mkey;
    const struct mstate *s = &m->st[id];
    const uint32_t *k = m->keys + s->key_off, *end = k + s->key_len;
    uint32_t n = 0, n_desc = 0;
    int raw = !m->key_mode;
    for (; k < end && !raw; k += 1 + k[0]) {
        if (n_desc >= MAX_STACKS) {
            raw = 1;
            break;
        }
        m->desc_off[n_desc++] = n;
        raw = desc_stack(m, k, &n) != 0;
    }
    if (raw) { /* one key for this state alone: [1, id] (a stack key ends in MK_EOS or MK_CUT) */
        m->desc[0] = 1;
        m->desc[1] = (uint32_t)id;
        m->desc_off[0] = 0;
        n_desc = 1;
    }
    /* sort the stack keys (insertion sort: few stacks), then copy them, deduplicated, to the
     * pool's tail (committed only when the key is new) */
    uint32_t *off = m->desc_off;
    const uint32_t *d = m->desc;
    sort_stacks(d, off, n_desc);
    uint32_t start = m->n_mk_words, w = start;
    for (uint32_t i = 0; i < n_desc; i++) {
        const uint32_t *x = d + off[i];
        if (i > 0 && !cmp_stacks(d + off[i - 1], x)) continue;
        if (w + 1 + x[0] > MKEY_WORDS) {
            m->overflow = 1;
            return -1;
        }
        memcpy(m->mk_words + w, x, (1 + x[0]) * sizeof *x);
        w += 1 + x[0];
    }
    uint32_t len = w - start, h = hash_words(m->mk_words + start, len, 1);
    int32_t key = -1;
    uint32_t i = h & (MKEY_HASH - 1);
    for (; m->mk_hash[i] >= 0; i = (i + 1) & (MKEY_HASH - 1)) {
        const struct mkey *e = &m->mk[m->mk_hash[i]];
        if (e->hash == h && e->len == len &&
            !memcmp(m->mk_words + e->off, m->mk_words + start, len * sizeof(uint32_t))) {
            key = m->mk_hash[i];
            break;
        }
    }
    if (key < 0) {
        if (m->n_mk >= MAX_MKEYS) {
            m->overflow = 1;
            return -1;
        }
        key = m->n_mk++;
        m->mk[key] = (struct mkey){.off = start,
                                   .len = len,
                                   .hash = h,
                                   .mask_slot = -1,
                                   .shared = !raw && m->key_mode > 1};
        m->mk_hash[i] = key;
        m->n_mk_words = w;
        m->stats.mask_keys++;
    }
    m->st[id].mkey = key;
    return key;
}

/* A slot for a new mask (clock eviction), detached from the key it held. */
static int take_slot(struct grammar_matcher *m)
{
    int slot;
    for (;;) {
        slot = m->clock_hand;
        m->clock_hand = (m->clock_hand + 1) % MASK_SLOTS;
        if (!m->slot_ref[slot]) break;
        m->slot_ref[slot] = 0;
    }
    if (m->slot_key[slot] >= 0) m->mk[m->slot_key[slot]].mask_slot = -1;
    m->slot_key[slot] = -1;
    return slot;
}

/* The mask of the tokens that are not long (grammar_impl.h) at the current position, from the
 * matcher's cache, the shared cache or computed: its slot in *slot_out, its count in *n. 0, or
 * -1 when a table filled up (m->overflow: flush and retry). */
static int short_mask(struct grammar_matcher *m, int *slot_out, int32_t *n)
{
    int32_t key = m->cur & VPART ? -1 : mask_key(m, (int32_t)m->cur);
    if (m->overflow) return -1;
    if (key >= 0 && m->mk[key].mask_slot >= 0) {
        int slot = m->mk[key].mask_slot;
        m->stats.mask_hits++;
        m->stats.mask_same += slot == m->last_slot;
        m->slot_ref[slot] = 1;
        *n = m->slot_allowed[slot];
        *slot_out = slot;
        return 0;
    }
    const struct mkey *e = key >= 0 && m->mk[key].shared ? &m->mk[key] : NULL;
    int slot = take_slot(m);
    uint32_t *out = m->masks + (size_t)slot * (size_t)m->n_words;
    if (e &&
        grammar_mask_cache_get(m->v->shared, m->g, m->mk_words + e->off, e->len, e->hash, out, n)) {
        m->stats.mask_shared++;
    } else {
        uint64_t t0 = clock_now_ns();
        walk_mask(m, m->cur, out, n);
        if (m->overflow) return -1;
        if (e)
            grammar_mask_cache_put(m->v->shared, m->g, m->mk_words + e->off, e->len, e->hash, out,
                                   *n);
        m->stats.mask_ns += clock_now_ns() - t0;
    }
    if (key >= 0) { /* key < 0: inside a UTF-8 sequence, rare, not cached */
        m->slot_key[slot] = key;
        m->mk[key].mask_slot = slot;
    }
    m->slot_allowed[slot] = *n;
    m->slot_ref[slot] = 1;
    m->slot_gen[slot]++;
    *slot_out = slot;
    return 0;
}

/* The long tokens (grammar_impl.h) the grammar takes from `from`, checked one by one (kept per
 * state; `fresh`: not read from there): bit i for vocab->long_ids[i]. */
static uint64_t long_tokens(struct grammar_matcher *m, int64_t from, int fresh)
{
    const struct grammar_vocab *v = m->v;
    if (!fresh && !(from & VPART) && m->st[from].long_known) return m->st[from].long_set;
    uint64_t set = 0;
    for (int32_t i = 0; i < v->n_long && !m->overflow; i++) {
        int32_t t = v->long_ids[i];
        const uint8_t *b = v->bytes + v->tok_off[t];
        int64_t s = from;
        for (uint32_t j = 0; j < v->tok_len[t] && s >= 0; j++) s = step_byte(m, s, b[j]);
        if (s >= 0) set |= 1ull << i;
    }
    if (!(from & VPART) && !m->overflow) {
        m->st[from].long_set = set;
        m->st[from].long_known = 1;
    }
    return set;
}

/* Sets the bits of the long tokens in `set`; returns how many. */
static int32_t set_long_bits(const struct grammar_vocab *v, uint32_t *mask, uint64_t set)
{
    int32_t n = 0;
    for (; set; set &= set - 1, n++) {
        int32_t t = v->long_ids[__builtin_ctzll(set)];
        mask[t >> 5] |= 1u << (t & 31);
    }
    return n;
}

int grammar_matcher_mask(struct grammar_matcher *m, const uint32_t **mask, int32_t *n_allowed)
{
    m->stats.masks++;
    if (m->finished) return KRS_ERR_STATE;
    int slot = -1;
    int32_t n_short = 0;
    uint64_t set = 0;
    for (int attempt = 0;; attempt++) {
        if (!short_mask(m, &slot, &n_short)) {
            set = long_tokens(m, m->cur, 0);
            if (!m->overflow) break;
        }
        if (attempt || flush(m)) return KRS_ERR_INTERNAL;
    }
    m->last_slot = slot;
    *mask = m->masks + (size_t)slot * (size_t)m->n_words;
    *n_allowed = n_short + __builtin_popcountll(set);
    if (set) { /* the cached mask stays as it is: a copy with the long tokens, reused as is
                * while the slot, its contents and the long tokens are the same */
        if (m->patch_slot != slot || m->patch_gen != m->slot_gen[slot] || m->patch_set != set) {
            memcpy(m->patch, *mask, (size_t)m->n_words * sizeof *m->patch);
            set_long_bits(m->v, m->patch, set);
            m->patch_slot = slot;
            m->patch_gen = m->slot_gen[slot];
            m->patch_set = set;
        }
        *mask = m->patch;
    }
    return KRS_OK;
}

int grammar_matcher_mask_fresh(struct grammar_matcher *m, uint32_t *out, int32_t *n_allowed)
{
    if (m->finished) return KRS_ERR_STATE;
    for (int attempt = 0;; attempt++) {
        walk_mask(m, m->cur, out, n_allowed);
        uint64_t set = m->overflow ? 0 : long_tokens(m, m->cur, 1);
        if (!m->overflow) {
            *n_allowed += set_long_bits(m->v, out, set);
            return KRS_OK;
        }
        if (attempt || flush(m)) return KRS_ERR_INTERNAL;
    }
}

void grammar_matcher_set_key_mode(struct grammar_matcher *m, int mode)
{
    m->key_mode = mode;
    for (int32_t i = 0; i < m->n_st; i++) m->st[i].mkey = -1;
    reset_mask_keys(m);
}

/* ---- accept / query ---- */

int grammar_matcher_accept(struct grammar_matcher *m, int32_t token)
{
    const struct grammar_vocab *v = m->v;
    if (m->finished || token < 0 || token >= v->n_vocab) return KRS_ERR_INVALID;
    if (v->eog[token]) {
        if (!grammar_matcher_accepting(m)) return KRS_ERR_INVALID;
        m->finished = 1;
        return KRS_OK;
    }
    uint32_t len = v->tok_len[token];
    if (!len) return KRS_ERR_INVALID;
    const uint8_t *b = v->bytes + v->tok_off[token];
    for (int attempt = 0;; attempt++) {
        int64_t s = m->cur;
        for (uint32_t i = 0; i < len && s >= 0; i++) s = step_byte(m, s, b[i]);
        if (!m->overflow) {
            if (s < 0) return KRS_ERR_INVALID;
            m->cur = s;
            return KRS_OK;
        }
        if (attempt || flush(m)) return KRS_ERR_INTERNAL;
    }
}

int grammar_matcher_accepting(const struct grammar_matcher *m)
{
    return !m->finished && !(m->cur & VPART) && m->st[m->cur].accepting;
}

int grammar_matcher_done(const struct grammar_matcher *m)
{
    if (m->finished) return 1;
    if (m->cur & VPART) return 0;
    const struct mstate *s = &m->st[m->cur];
    return s->accepting && s->n_term == 0;
}

void grammar_matcher_get_stats(const struct grammar_matcher *m, struct grammar_matcher_stats *out)
{
    *out = m->stats;
}

/* ---- lifetime ---- */

void grammar_matcher_free(struct grammar_matcher *m)
{
    if (!m) return;
    alloc_free(m->st);
    alloc_free(m->hash);
    alloc_free(m->keys);
    alloc_free(m->trans);
    alloc_free(m->sig);
    alloc_free(m->build);
    alloc_free(m->stack);
    alloc_free(m->sort_off);
    alloc_free(m->masks);
    alloc_free(m->walk);
    alloc_free(m->mk);
    alloc_free(m->mk_hash);
    alloc_free(m->mk_words);
    alloc_free(m->desc);
    alloc_free(m->desc_off);
    alloc_free(m->patch);
    grammar_release(m->g);
    alloc_free(m);
}

int grammar_matcher_create(struct grammar *g, const struct grammar_vocab *v,
                           struct grammar_matcher **out)
{
    *out = NULL;
    if (!g || !v) return KRS_ERR_INVALID;
    struct grammar_matcher *m = alloc_calloc(1, sizeof *m);
    if (!m) return KRS_ERR_NOMEM;
    m->g = grammar_retain(g);
    m->v = v;
    m->n_words = v->n_words;
    m->st = alloc_malloc(MAX_STATES * sizeof *m->st);
    m->hash = alloc_malloc(HASH_SIZE * sizeof *m->hash);
    m->keys = alloc_malloc(KEY_WORDS * sizeof *m->keys);
    m->trans = alloc_malloc(TRANS_CAP * sizeof *m->trans);
    m->sig = alloc_malloc(SIG_SIZE * sizeof *m->sig);
    m->build = alloc_malloc(BUILD_WORDS * sizeof *m->build);
    m->stack = alloc_malloc(MAX_DEPTH * sizeof *m->stack);
    m->sort_off = alloc_malloc(MAX_STACKS * sizeof *m->sort_off);
    m->masks = alloc_malloc((size_t)MASK_SLOTS * (size_t)m->n_words * sizeof *m->masks);
    m->walk = alloc_malloc(((size_t)v->max_len + 1) * sizeof *m->walk);
    m->mk = alloc_malloc(MAX_MKEYS * sizeof *m->mk);
    m->mk_hash = alloc_malloc(MKEY_HASH * sizeof *m->mk_hash);
    m->mk_words = alloc_malloc(MKEY_WORDS * sizeof *m->mk_words);
    m->desc = alloc_malloc(DESC_WORDS * sizeof *m->desc);
    m->desc_off = alloc_malloc(MAX_STACKS * sizeof *m->desc_off);
    m->patch = alloc_malloc((size_t)m->n_words * sizeof *m->patch + 1);
    m->key_mode = 2;
    if (!m->st || !m->hash || !m->keys || !m->trans || !m->sig || !m->build || !m->stack ||
        !m->sort_off || !m->masks || !m->walk || !m->mk || !m->mk_hash || !m->mk_words ||
        !m->desc || !m->desc_off || !m->patch) {
        grammar_matcher_free(m);
        return KRS_ERR_NOMEM;
    }
    reset_tables(m);
    /* the start: root's alternatives expanded */
    m->n_build = m->n_build_stacks = 0;
    for (uint32_t a = g->rule_start[g->root];;) {
        if (is_end(&g->el[a])) {
            expand(m, 0);
        } else {
            m->stack[0] = a;
            expand(m, 1);
        }
        while (!is_end(&g->el[a])) a++;
        if (g->el[a].type == G_END) break;
        a++;
    }
    m->cur = intern_full(m);
    if (m->cur < 0) {
        grammar_matcher_free(m);
        return KRS_ERR_INTERNAL;
    }
    *out = m;
    return KRS_OK;
}
