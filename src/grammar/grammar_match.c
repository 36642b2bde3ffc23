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
 * distinct trie byte; masks are cached per state (MASK_SLOTS, clock eviction), so a state the
 * sequence returns to (inside a string, between list items) costs nothing.
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
    int16_t mask_slot;  /* -1: no cached mask */
    int32_t plain_next; /* NA_UNIFORM plain_kind: the state after any plain character */
    int32_t na_next;    /* NA_UNIFORM: the state after any code point >= 0x80 (or DEAD) */
    uint32_t n_term;    /* stacks with a terminal on top */
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
    int32_t n_words;
    uint32_t *masks; /* [MASK_SLOTS][n_words] */
    int32_t slot_state[MASK_SLOTS];
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
    m->st[id].mask_slot = -1;
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
    for (uint32_t i = 1; i < n; i++) {
        uint32_t x = off[i], j = i;
        while (j > 0 && cmp_stacks(bw + off[j - 1], bw + x) > 0) {
            off[j] = off[j - 1];
            j--;
        }
        off[j] = x;
    }
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

static void reset_tables(struct grammar_matcher *m)
{
    m->n_st = 0;
    m->n_keys = 0;
    m->n_trans = 0;
    m->n_sig = 0;
    m->overflow = 0;
    memset(m->hash, 0xFF, HASH_SIZE * sizeof *m->hash);
    for (int i = 0; i < SIG_SIZE; i++) m->sig[i].state = -1;
    for (int i = 0; i < MASK_SLOTS; i++) m->slot_state[i] = -1;
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

/* Sets the bits of the tokens of list l whose bytes the grammar takes from `from`. */
static void walk_list(struct grammar_matcher *m, const struct grammar_toklist *l, int64_t from,
                      uint32_t *mask)
{
    const struct grammar_vocab *v = m->v;
    int64_t *st = m->walk;
    st[0] = from;
    uint32_t valid = 0;
    for (int32_t i = 0; i < l->n && !m->overflow; i++) {
        uint32_t d = l->lcp[i] < valid ? l->lcp[i] : valid, len = l->len[i];
        const uint8_t *b = v->bytes + l->off[i];
        while (d < len) {
            int64_t ns = step_byte(m, st[d], b[d]);
            if (ns < 0) break;
            st[++d] = ns;
        }
        valid = d;
        if (d == len) {
            int32_t t = l->order[i];
            mask[t >> 5] |= 1u << (t & 31);
        } else if (d >= l->lcp[i]) { /* always: the walk resumes at the shared prefix */
            i = l->node_end[l->node_off[i] + d - l->lcp[i]] - 1;
        } else {
            while (i + 1 < l->n && l->lcp[i + 1] > d) i++;
        }
    }
}

/* Set bits of mask[0..nw). Bit arithmetic rather than __builtin_popcount, which without
 * -mpopcnt is a libgcc call per word (8,192 words per mask); this loop vectorises. */
static int32_t count_bits(const uint32_t *mask, size_t nw)
{
    uint32_t total = 0;
    for (size_t w = 0; w < nw; w++) {
        uint32_t x = mask[w];
        x = x - (x >> 1 & 0x55555555u);
        x = (x & 0x33333333u) + (x >> 2 & 0x33333333u);
        x = (x + (x >> 4)) & 0x0F0F0F0Fu;
        total += x * 0x01010101u >> 24;
    }
    return (int32_t)total;
}

static void walk_mask(struct grammar_matcher *m, int64_t from, uint32_t *mask, int32_t *n_allowed)
{
    const struct grammar_vocab *v = m->v;
    size_t nw = (size_t)v->n_words;
    memset(mask, 0, nw * sizeof *mask);
    int32_t run = from & VPART ? -1 : plain_run(m, (int32_t)from, v->max_plain);
    if (m->overflow) return;
    if (run < 0) {
        walk_list(m, &v->all, from, mask);
    } else {
        /* plain tokens of at most `run` code points all fit; walk only the others */
        walk_list(m, &v->rest, from, mask);
        if (run > 0) {
            int32_t lv = run < GRAMMAR_PLAIN_LEVELS ? run : GRAMMAR_PLAIN_LEVELS;
            const uint32_t *pm = v->plain_le + (size_t)(lv - 1) * nw;
            for (size_t w = 0; w < nw; w++) mask[w] |= pm[w];
            for (int32_t i = 0; i < v->n_plain_long; i++) {
                int32_t t = v->plain_long[i];
                if (v->plain_cps[t] <= run) mask[t >> 5] |= 1u << (t & 31);
            }
        }
    }
    if (!(from & VPART) && m->st[from].accepting)
        for (int32_t i = 0; i < v->n_eog; i++) {
            int32_t t = v->eog_ids[i];
            mask[t >> 5] |= 1u << (t & 31);
        }
    *n_allowed = count_bits(mask, nw);
}

int grammar_matcher_mask(struct grammar_matcher *m, const uint32_t **mask, int32_t *n_allowed)
{
    m->stats.masks++;
    if (m->finished) return KRS_ERR_STATE;
    int16_t cached = m->cur & VPART ? -1 : m->st[m->cur].mask_slot;
    if (cached >= 0) {
        m->stats.mask_hits++;
        m->slot_ref[cached] = 1;
        *mask = m->masks + (size_t)cached * (size_t)m->n_words;
        *n_allowed = m->slot_allowed[cached];
        return KRS_OK;
    }
    uint64_t t0 = clock_now_ns();
    int slot;
    for (;;) { /* clock eviction */
        slot = m->clock_hand;
        m->clock_hand = (m->clock_hand + 1) % MASK_SLOTS;
        if (!m->slot_ref[slot]) break;
        m->slot_ref[slot] = 0;
    }
    uint32_t *out = m->masks + (size_t)slot * (size_t)m->n_words;
    for (int attempt = 0;; attempt++) {
        if (m->slot_state[slot] >= 0) m->st[m->slot_state[slot]].mask_slot = -1;
        m->slot_state[slot] = -1;
        walk_mask(m, m->cur, out, n_allowed);
        if (!m->overflow) break;
        if (attempt || flush(m)) return KRS_ERR_INTERNAL;
    }
    if (!(m->cur & VPART)) { /* inside a UTF-8 sequence: rare, not cached */
        m->slot_state[slot] = (int32_t)m->cur;
        m->st[m->cur].mask_slot = (int16_t)slot;
    }
    m->slot_allowed[slot] = *n_allowed;
    m->slot_ref[slot] = 1;
    m->stats.mask_ns += clock_now_ns() - t0;
    *mask = out;
    return KRS_OK;
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
    if (!m->st || !m->hash || !m->keys || !m->trans || !m->sig || !m->build || !m->stack ||
        !m->sort_off || !m->masks || !m->walk) {
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
