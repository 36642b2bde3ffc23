/* GBNF text -> struct grammar (grammar_impl.h).
 *
 * The dialect is llama.cpp's: rules `name ::= alternatives`, sequences of "literals", [classes]
 * ([^...] negated, ranges a-z, escapes \n \r \t \\ \" \] \[ \- \xHH \uHHHH \UHHHHHHHH), `.`
 * (any code point), rule names, ( groups ), and the quantifiers * + ? {m} {m,} {m,n}; `#` starts
 * a comment. A rule's body runs until the next `name ::=`, so newlines are free. The start rule
 * is `root`. Groups and quantifiers become helper rules (x* -> R ::= x R | ; x{2,4} -> x x O2,
 * O2 ::= x O1 | , O1 ::= x | ), so the matcher only ever sees rules, references and terminals.
 *
 * Rejected at compile time, with the rule named: undefined rules, left recursion (the matcher
 * expands rules depth-first and would not terminate) and rules that derive no finite text (a
 * sequence could never be completed). Must not: accept anything it does not fully understand. */
#include "grammar/grammar_impl.h"

#include "krserve.h"
#include "util/alloc.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#define MAX_REPEAT 4096
#define MAX_DEPTH  256

struct brule {
    char *name;
    struct gel *el;
    uint32_t n, cap;
    int defined;
    uint32_t level; /* k for a quantifier's counter rule O_k (grammar_impl.h), else 0 */
};

struct builder {
    struct brule *rules;
    uint32_t n_rules, cap_rules;
    struct gclass *classes;
    uint32_t n_classes, cap_classes;
    struct grange *ranges;
    uint32_t n_ranges, cap_ranges;
    const char *p, *end;
    char *err;
    size_t errlen;
    int failed;
    uint32_t n_synth;
};

static int bfail(struct builder *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int bfail(struct builder *b, const char *fmt, ...)
{
    if (!b->failed && b->err && b->errlen) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(b->err, b->errlen, fmt, ap);
        va_end(ap);
    }
    b->failed = 1;
    return KRS_ERR_INVALID;
}

static int grow(void **arr, uint32_t *cap, uint32_t need, size_t elsz)
{
    if (need <= *cap) return KRS_OK;
    uint32_t nc = *cap ? *cap : 16;
    while (nc < need) nc *= 2;
    void *na = alloc_realloc(*arr, (size_t)nc * elsz);
    if (!na) return KRS_ERR_NOMEM;
    *arr = na;
    *cap = nc;
    return KRS_OK;
}

static int rule_push(struct builder *b, uint32_t r, uint32_t type, uint32_t val)
{
    struct brule *ru = &b->rules[r];
    if (ru->n >= 1u << 24) return bfail(b, "grammar too large");
    if (grow((void **)&ru->el, &ru->cap, ru->n + 1, sizeof *ru->el))
        return bfail(b, "out of memory");
    ru->el[ru->n++] = (struct gel){type, val};
    return KRS_OK;
}

static int rule_new(struct builder *b, const char *name, size_t nlen, uint32_t *out)
{
    if (b->n_rules >= 1u << 20) return bfail(b, "too many rules");
    if (grow((void **)&b->rules, &b->cap_rules, b->n_rules + 1, sizeof *b->rules))
        return bfail(b, "out of memory");
    struct brule *r = &b->rules[b->n_rules];
    memset(r, 0, sizeof *r);
    r->name = alloc_strndup(name, nlen);
    if (!r->name) return bfail(b, "out of memory");
    *out = b->n_rules++;
    return KRS_OK;
}

static int rule_synth(struct builder *b, uint32_t parent, uint32_t *out)
{
    char name[96];
    snprintf(name, sizeof name, "%.60s~%u", b->rules[parent].name, ++b->n_synth);
    int rc = rule_new(b, name, strlen(name), out);
    if (!rc) b->rules[*out].defined = 1;
    return rc;
}

static int rule_find(struct builder *b, const char *name, size_t nlen, uint32_t *out)
{
    for (uint32_t i = 0; i < b->n_rules; i++)
        if (strlen(b->rules[i].name) == nlen && !memcmp(b->rules[i].name, name, nlen)) {
            *out = i;
            return KRS_OK;
        }
    return rule_new(b, name, nlen, out);
}

/* ---- lexing ---- */

static int is_name_char(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' ||
           c == '_';
}

static void skip_space(struct builder *b)
{
    while (b->p < b->end) {
        char c = *b->p;
        if (c == ' ' || c == '\t' || c == '\n' || c == '\r') {
            b->p++;
        } else if (c == '#') {
            while (b->p < b->end && *b->p != '\n') b->p++;
        } else {
            break;
        }
    }
}

static size_t name_len(const char *p, const char *end)
{
    size_t n = 0;
    while (p + n < end && is_name_char(p[n])) n++;
    return n;
}

/* 1 when the text at p is `name ::=` (a new rule begins). */
static int at_rule_def(struct builder *b)
{
    const char *save = b->p;
    size_t n = name_len(b->p, b->end);
    int yes = 0;
    if (n) {
        b->p += n;
        skip_space(b);
        yes = b->end - b->p >= 3 && !memcmp(b->p, "::=", 3);
    }
    b->p = save;
    return yes;
}

static int hex_val(char c)
{
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* One UTF-8 code point at b->p (advanced). */
static int decode_utf8(struct builder *b, uint32_t *cp)
{
    const unsigned char *s = (const unsigned char *)b->p;
    size_t avail = (size_t)(b->end - b->p);
    unsigned c = s[0];
    int len = c < 0x80                 ? 1
              : c >= 0xC2 && c <= 0xDF ? 2
              : c >= 0xE0 && c <= 0xEF ? 3
              : c >= 0xF0 && c <= 0xF4 ? 4
                                       : 0;
    if (!len || (size_t)len > avail) return bfail(b, "invalid UTF-8 in grammar");
    uint32_t v = len == 1 ? c : len == 2 ? c & 0x1F : len == 3 ? c & 0x0F : c & 0x07;
    for (int i = 1; i < len; i++) {
        if ((s[i] & 0xC0) != 0x80) return bfail(b, "invalid UTF-8 in grammar");
        v = (v << 6) | (s[i] & 0x3F);
    }
    b->p += len;
    *cp = v;
    return KRS_OK;
}

/* A character of a literal or class, escapes decoded. */
static int parse_char(struct builder *b, uint32_t *cp)
{
    if (b->p >= b->end) return bfail(b, "unexpected end of grammar");
    if (*b->p != '\\') return decode_utf8(b, cp);
    b->p++;
    if (b->p >= b->end) return bfail(b, "unexpected end of grammar after '\\'");
    char c = *b->p++;
    int nhex = 0;
    switch (c) {
    case 'n':
        *cp = '\n';
        return KRS_OK;
    case 'r':
        *cp = '\r';
        return KRS_OK;
    case 't':
        *cp = '\t';
        return KRS_OK;
    case '\\':
    case '"':
    case '[':
    case ']':
    case '-':
    case '/':
    case '^':
        *cp = (uint32_t)c;
        return KRS_OK;
    case 'x':
        nhex = 2;
        break;
    case 'u':
        nhex = 4;
        break;
    case 'U':
        nhex = 8;
        break;
    default:
        return bfail(b, "unknown escape '\\%c' in grammar", c);
    }
    uint32_t v = 0;
    for (int i = 0; i < nhex; i++) {
        int h = b->p < b->end ? hex_val(*b->p) : -1;
        if (h < 0) return bfail(b, "bad \\%c escape in grammar", c);
        v = v * 16 + (uint32_t)h;
        b->p++;
    }
    if (v > 0x10FFFF) return bfail(b, "code point beyond U+10FFFF in grammar");
    *cp = v;
    return KRS_OK;
}

static int class_add(struct builder *b, int neg, uint32_t *out)
{
    if (grow((void **)&b->classes, &b->cap_classes, b->n_classes + 1, sizeof *b->classes))
        return bfail(b, "out of memory");
    b->classes[b->n_classes] = (struct gclass){b->n_ranges, 0, (uint32_t)neg};
    *out = b->n_classes++;
    return KRS_OK;
}

static int range_add(struct builder *b, uint32_t lo, uint32_t hi)
{
    if (grow((void **)&b->ranges, &b->cap_ranges, b->n_ranges + 1, sizeof *b->ranges))
        return bfail(b, "out of memory");
    b->ranges[b->n_ranges++] = (struct grange){lo, hi};
    b->classes[b->n_classes - 1].n++;
    return KRS_OK;
}

/* ---- parsing ---- */

static int parse_alternates(struct builder *b, uint32_t r, int depth);

/* Copies el[from, to) of rule src onto the end of rule dst. */
static int copy_slice(struct builder *b, uint32_t dst, uint32_t src, uint32_t from, uint32_t to)
{
    for (uint32_t i = from; i < to; i++) {
        struct gel e = b->rules[src].el[i]; /* by value: rule_push may move the array */
        if (rule_push(b, dst, e.type, e.val)) return KRS_ERR_INVALID;
    }
    return KRS_OK;
}

/* R ::= sym R | (empty): x* */
static int make_star(struct builder *b, uint32_t r, uint32_t start, uint32_t end, uint32_t *out)
{
    uint32_t s;
    if (rule_synth(b, r, &s) || copy_slice(b, s, r, start, end) || rule_push(b, s, G_REF, s) ||
        rule_push(b, s, G_ALT, 0) || rule_push(b, s, G_END, 0))
        return KRS_ERR_INVALID;
    *out = s;
    return KRS_OK;
}

/* Applies quantifier {min, max} (max < 0: unbounded) to el[start, end) of rule r. */
static int repeat(struct builder *b, uint32_t r, uint32_t start, int min, int max)
{
    uint32_t end = b->rules[r].n, ref;
    if (end == start) return bfail(b, "quantifier without an expression");
    /* the symbol is rebuilt after the copies: keep it in a helper rule */
    uint32_t sym;
    if (rule_synth(b, r, &sym) || copy_slice(b, sym, r, start, end) || rule_push(b, sym, G_END, 0))
        return KRS_ERR_INVALID;
    b->rules[r].n = start;
    for (int i = 0; i < min; i++)
        if (rule_push(b, r, G_REF, sym)) return KRS_ERR_INVALID;
    if (max < 0) {
        uint32_t sref_start = b->rules[r].n;
        if (rule_push(b, r, G_REF, sym)) return KRS_ERR_INVALID;
        if (make_star(b, r, sref_start, sref_start + 1, &ref)) return KRS_ERR_INVALID;
        b->rules[r].n = sref_start;
        return rule_push(b, r, G_REF, ref);
    }
    /* O1 ::= sym | ; Ok ::= sym O(k-1) | */
    uint32_t prev = 0;
    for (int k = 1; k <= max - min; k++) {
        uint32_t o;
        if (rule_synth(b, r, &o) || rule_push(b, o, G_REF, sym)) return KRS_ERR_INVALID;
        if (k > 1 && rule_push(b, o, G_REF, prev)) return KRS_ERR_INVALID;
        if (rule_push(b, o, G_ALT, 0) || rule_push(b, o, G_END, 0)) return KRS_ERR_INVALID;
        /* O_1 .. O_k get consecutive ids (nothing else is created in this loop): the matcher
         * finds O_j as O_k - (k - j) */
        b->rules[o].level = (uint32_t)k;
        prev = o;
    }
    if (max > min) return rule_push(b, r, G_REF, prev);
    return KRS_OK;
}

static int parse_int(struct builder *b, int *out)
{
    int v = 0, n = 0;
    while (b->p < b->end && *b->p >= '0' && *b->p <= '9' && n < 9) {
        v = v * 10 + (*b->p++ - '0');
        n++;
    }
    if (!n) return bfail(b, "expected a number in {m,n}");
    *out = v;
    return KRS_OK;
}

static int parse_sequence(struct builder *b, uint32_t r, int depth)
{
    for (;;) {
        skip_space(b);
        if (b->p >= b->end || *b->p == '|' || *b->p == ')' || at_rule_def(b)) return KRS_OK;
        uint32_t start = b->rules[r].n;
        char c = *b->p;
        if (c == '"') {
            b->p++;
            while (b->p < b->end && *b->p != '"') {
                uint32_t cp;
                if (parse_char(b, &cp) || rule_push(b, r, G_LIT, cp)) return KRS_ERR_INVALID;
            }
            if (b->p >= b->end) return bfail(b, "unterminated string literal in grammar");
            b->p++;
            if (b->rules[r].n == start) continue; /* "" matches nothing: no symbol */
        } else if (c == '[') {
            b->p++;
            int neg = b->p < b->end && *b->p == '^';
            if (neg) b->p++;
            uint32_t cls;
            if (class_add(b, neg, &cls)) return KRS_ERR_INVALID;
            while (b->p < b->end && *b->p != ']') {
                uint32_t lo, hi;
                if (parse_char(b, &lo)) return KRS_ERR_INVALID;
                hi = lo;
                if (b->end - b->p >= 2 && b->p[0] == '-' && b->p[1] != ']') {
                    b->p++;
                    if (parse_char(b, &hi)) return KRS_ERR_INVALID;
                    if (hi < lo) return bfail(b, "bad character range in grammar");
                }
                if (range_add(b, lo, hi)) return KRS_ERR_INVALID;
            }
            if (b->p >= b->end) return bfail(b, "unterminated character class in grammar");
            b->p++;
            if (rule_push(b, r, G_CLASS, cls)) return KRS_ERR_INVALID;
        } else if (c == '.') {
            b->p++;
            uint32_t cls;
            if (class_add(b, 1, &cls) || rule_push(b, r, G_CLASS, cls)) return KRS_ERR_INVALID;
        } else if (c == '(') {
            b->p++;
            if (depth >= MAX_DEPTH) return bfail(b, "grammar nested too deeply");
            uint32_t g;
            if (rule_synth(b, r, &g) || parse_alternates(b, g, depth + 1)) return KRS_ERR_INVALID;
            skip_space(b);
            if (b->p >= b->end || *b->p != ')') return bfail(b, "missing ')' in grammar");
            b->p++;
            if (rule_push(b, r, G_REF, g)) return KRS_ERR_INVALID;
        } else if (is_name_char(c)) {
            size_t n = name_len(b->p, b->end);
            uint32_t ref;
            if (rule_find(b, b->p, n, &ref) || rule_push(b, r, G_REF, ref)) return KRS_ERR_INVALID;
            b->p += n;
        } else {
            return bfail(b, "unexpected '%c' in grammar", c);
        }
        /* quantifier */
        skip_space(b);
        if (b->p >= b->end) continue;
        c = *b->p;
        int min = -1, max = -1;
        if (c == '*') {
            min = 0;
        } else if (c == '+') {
            min = 1;
        } else if (c == '?') {
            min = 0, max = 1;
        } else if (c == '{') {
            b->p++;
            skip_space(b);
            if (parse_int(b, &min)) return KRS_ERR_INVALID;
            skip_space(b);
            max = min;
            if (b->p < b->end && *b->p == ',') {
                b->p++;
                skip_space(b);
                max = -1;
                if (b->p < b->end && *b->p != '}' && parse_int(b, &max)) return KRS_ERR_INVALID;
                skip_space(b);
            }
            if (b->p >= b->end || *b->p != '}') return bfail(b, "missing '}' in grammar");
            if ((max >= 0 && max < min) || min > MAX_REPEAT || max > MAX_REPEAT)
                return bfail(b, "bad repetition {%d,%d} in grammar", min, max);
        } else {
            continue;
        }
        b->p++;
        if (repeat(b, r, start, min, max)) return KRS_ERR_INVALID;
    }
}

static int parse_alternates(struct builder *b, uint32_t r, int depth)
{
    for (;;) {
        if (parse_sequence(b, r, depth)) return KRS_ERR_INVALID;
        skip_space(b);
        if (b->p < b->end && *b->p == '|') {
            b->p++;
            if (rule_push(b, r, G_ALT, 0)) return KRS_ERR_INVALID;
            continue;
        }
        return rule_push(b, r, G_END, 0);
    }
}

/* ---- checks ---- */

/* Fixed points: nullable (derives the empty text) and productive (derives some finite text). */
static void rule_props(const struct grammar *g, uint8_t *nullable, uint8_t *productive)
{
    for (int changed = 1; changed;) {
        changed = 0;
        for (uint32_t r = 0; r < g->n_rules; r++) {
            uint32_t i = g->rule_start[r];
            for (;;) { /* each alternative */
                int all_null = 1, all_prod = 1;
                for (; g->el[i].type != G_ALT && g->el[i].type != G_END; i++) {
                    if (g->el[i].type == G_REF) {
                        all_null &= nullable[g->el[i].val];
                        all_prod &= productive[g->el[i].val];
                    } else {
                        all_null = 0;
                    }
                }
                if (all_null && !nullable[r]) nullable[r] = 1, changed = 1;
                if (all_prod && !productive[r]) productive[r] = 1, changed = 1;
                if (g->el[i++].type == G_END) break;
            }
        }
    }
}

/* DFS over "r can start with rule x" edges; 1 when a cycle (left recursion) is found. */
static int left_cycle(const struct grammar *g, const uint8_t *nullable, uint32_t r, uint8_t *color,
                      uint32_t *bad)
{
    color[r] = 1;
    uint32_t i = g->rule_start[r];
    for (;;) {
        for (; g->el[i].type != G_ALT && g->el[i].type != G_END; i++) {
            if (g->el[i].type != G_REF) break;
            uint32_t x = g->el[i].val;
            if (color[x] == 1) {
                *bad = x;
                return 1;
            }
            if (!color[x] && left_cycle(g, nullable, x, color, bad)) return 1;
            if (!nullable[x]) break;
        }
        while (g->el[i].type != G_ALT && g->el[i].type != G_END) i++;
        if (g->el[i++].type == G_END) break;
    }
    color[r] = 2;
    return 0;
}

/* Fixed point: the fewest code points each rule derives (every terminal is one code point),
 * saturating at GRAMMAR_MIN_CAP. Runs after check(): every rule derives some finite text. */
static void rule_mins(struct grammar *g)
{
    for (uint32_t r = 0; r < g->n_rules; r++) g->rule_min[r] = GRAMMAR_MIN_CAP;
    for (int changed = 1; changed;) {
        changed = 0;
        for (uint32_t r = 0; r < g->n_rules; r++) {
            uint32_t i = g->rule_start[r];
            for (;;) { /* each alternative */
                uint32_t sum = 0;
                for (; g->el[i].type != G_ALT && g->el[i].type != G_END; i++) {
                    sum += g->el[i].type == G_REF ? g->rule_min[g->el[i].val] : 1;
                    if (sum > GRAMMAR_MIN_CAP) sum = GRAMMAR_MIN_CAP;
                }
                if (sum < g->rule_min[r]) g->rule_min[r] = sum, changed = 1;
                if (g->el[i++].type == G_END) break;
            }
        }
    }
}

static int check(struct grammar *g, struct builder *b)
{
    uint8_t *nullable = alloc_calloc(g->n_rules, 3);
    if (!nullable) return bfail(b, "out of memory");
    uint8_t *productive = nullable + g->n_rules, *color = productive + g->n_rules;
    int rc = KRS_OK;
    rule_props(g, nullable, productive);
    for (uint32_t r = 0; r < g->n_rules && !rc; r++)
        if (!productive[r])
            rc = bfail(b, "grammar rule '%s' can never be completed", b->rules[r].name);
    uint32_t bad = 0;
    for (uint32_t r = 0; r < g->n_rules && !rc; r++)
        if (!color[r] && left_cycle(g, nullable, r, color, &bad))
            rc = bfail(b, "grammar rule '%s' is left-recursive", b->rules[bad].name);
    alloc_free(nullable);
    if (!rc) rule_mins(g);
    return rc;
}

/* ---- public ---- */

static void builder_free(struct builder *b)
{
    for (uint32_t i = 0; i < b->n_rules; i++) {
        alloc_free(b->rules[i].name);
        alloc_free(b->rules[i].el);
    }
    alloc_free(b->rules);
    alloc_free(b->classes);
    alloc_free(b->ranges);
}

struct grammar *grammar_retain(struct grammar *g)
{
    if (g) atomic_fetch_add(&g->refs, 1);
    return g;
}

const char *grammar_source(const struct grammar *g)
{
    return g->text;
}

void grammar_release(struct grammar *g)
{
    if (!g || atomic_fetch_sub(&g->refs, 1) != 1) return;
    alloc_free(g->el);
    alloc_free(g->rule_start);
    alloc_free(g->rule_min);
    alloc_free(g->rule_level);
    alloc_free(g->classes);
    alloc_free(g->ranges);
    alloc_free(g->text);
    alloc_free(g);
}

int grammar_compile_gbnf(const char *text, size_t len, struct grammar **out, char *err,
                         size_t errlen)
{
    *out = NULL;
    if (err && errlen) err[0] = '\0';
    struct builder b = {.p = text, .end = text + len, .err = err, .errlen = errlen};
    struct grammar *g = NULL;
    int rc = KRS_ERR_INVALID;
    if (!text) goto out;
    for (;;) {
        skip_space(&b);
        if (b.p >= b.end) break;
        size_t n = name_len(b.p, b.end);
        if (!n) {
            bfail(&b, "expected a rule name in grammar, found '%c'", *b.p);
            goto out;
        }
        uint32_t r;
        if (rule_find(&b, b.p, n, &r)) goto out;
        if (b.rules[r].defined) {
            bfail(&b, "grammar rule '%s' is defined twice", b.rules[r].name);
            goto out;
        }
        b.rules[r].defined = 1;
        b.p += n;
        skip_space(&b);
        if (b.end - b.p < 3 || memcmp(b.p, "::=", 3)) {
            bfail(&b, "expected '::=' after grammar rule '%s'", b.rules[r].name);
            goto out;
        }
        b.p += 3;
        if (parse_alternates(&b, r, 0)) goto out;
        skip_space(&b);
        if (b.p < b.end && *b.p == ')') {
            bfail(&b, "unbalanced ')' in grammar");
            goto out;
        }
    }
    uint32_t root = UINT32_MAX;
    for (uint32_t i = 0; i < b.n_rules; i++) {
        if (!b.rules[i].defined) {
            bfail(&b, "grammar rule '%s' is not defined", b.rules[i].name);
            goto out;
        }
        if (!strcmp(b.rules[i].name, "root")) root = i;
    }
    if (root == UINT32_MAX) {
        bfail(&b, "grammar has no 'root' rule");
        goto out;
    }
    rc = KRS_ERR_NOMEM;
    g = alloc_calloc(1, sizeof *g);
    if (!g) goto out;
    atomic_init(&g->refs, 1);
    uint64_t total = 0;
    for (uint32_t i = 0; i < b.n_rules; i++) total += b.rules[i].n;
    g->el = alloc_malloc((size_t)(total + 1) * sizeof *g->el);
    g->rule_start = alloc_malloc((size_t)b.n_rules * sizeof *g->rule_start);
    g->rule_min = alloc_malloc((size_t)b.n_rules * sizeof *g->rule_min);
    g->rule_level = alloc_malloc((size_t)b.n_rules * sizeof *g->rule_level);
    g->classes = alloc_malloc((size_t)(b.n_classes + 1) * sizeof *g->classes);
    g->ranges = alloc_malloc((size_t)(b.n_ranges + 1) * sizeof *g->ranges);
    g->text = alloc_strndup(text, len);
    g->text_hash = 0xCBF29CE484222325ull;
    for (size_t i = 0; i < len; i++)
        g->text_hash = (g->text_hash ^ (uint8_t)text[i]) * 0x100000001B3ull;
    if (!g->el || !g->rule_start || !g->rule_min || !g->rule_level || !g->classes || !g->ranges ||
        !g->text)
        goto out;
    for (uint32_t i = 0; i < b.n_rules; i++) {
        g->rule_start[i] = g->n_el;
        g->rule_level[i] = b.rules[i].level;
        if (b.rules[i].n) memcpy(g->el + g->n_el, b.rules[i].el, b.rules[i].n * sizeof *g->el);
        g->n_el += b.rules[i].n;
    }
    g->el[g->n_el] = (struct gel){G_END, 0}; /* sentinel: a position past the last rule */
    g->n_rules = b.n_rules;
    g->root = root;
    if (b.n_classes) memcpy(g->classes, b.classes, b.n_classes * sizeof *g->classes);
    g->n_classes = b.n_classes;
    if (b.n_ranges) memcpy(g->ranges, b.ranges, b.n_ranges * sizeof *g->ranges);
    g->n_ranges = b.n_ranges;
    rc = check(g, &b);
out:
    if (rc && !b.failed && rc != KRS_ERR_NOMEM) bfail(&b, "invalid grammar");
    if (rc == KRS_ERR_NOMEM && err && errlen) snprintf(err, errlen, "out of memory");
    builder_free(&b);
    if (rc) {
        grammar_release(g);
        return rc;
    }
    *out = g;
    return KRS_OK;
}
