/* JSON Schema "pattern" (an ECMA-262 regex, searched, not anchored) -> a GBNF expression for the
 * JSON-encoded content of a string that matches it.
 *
 * Supported: literals (UTF-8), escapes \d \D \w \W \s \S \. \\ \/ \- \n \t \r \xHH \uHHHH and
 * escaped punctuation, classes [...] with ranges and ^, `.`, groups ( ) and (?: ), |, the
 * quantifiers * + ? {m} {m,} {m,n} (lazy forms accepted: the same strings), ^ at the start and
 * $ at the end. A side without its anchor may hold any text (the pattern is searched).
 * Refused with the feature named: backreferences, lookarounds, \b, anchors elsewhere, named
 * groups. Output is a sound restriction, never a superset: characters JSON must escape are only
 * written where the pattern names them literally ("\"" -> \", "\\" -> \\, control characters
 * as \n-style escapes); classes and `.` leave out '"', '\\' and control characters. */
#include "grammar/grammar_impl.h"

#include "krserve.h"
#include "util/alloc.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#define MAX_REPEAT 1000
#define MAX_DEPTH  64
/* what a class may hold: neither '"' nor '\\' nor a control character */
#define SAFE_NEG "\"\\\\\\x00-\\x1F"

struct rx {
    const char *p, *end;
    char *out;
    size_t n, cap;
    int oom, rc;
    char *err;
    size_t errlen;
};

static void put(struct rx *r, const char *s, size_t n)
{
    if (r->oom) return;
    if (r->n + n + 1 > r->cap) {
        size_t nc = r->cap ? r->cap * 2 : 256;
        while (nc < r->n + n + 1) nc *= 2;
        char *o = alloc_realloc(r->out, nc);
        if (!o) {
            r->oom = 1;
            return;
        }
        r->out = o;
        r->cap = nc;
    }
    memcpy(r->out + r->n, s, n);
    r->n += n;
    r->out[r->n] = '\0';
}

static void puts_(struct rx *r, const char *s)
{
    put(r, s, strlen(s));
}

static void putf(struct rx *r, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void putf(struct rx *r, const char *fmt, ...)
{
    char b[64];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(b, sizeof b, fmt, ap);
    va_end(ap);
    if (n > 0) put(r, b, (size_t)n < sizeof b ? (size_t)n : sizeof b - 1);
}

static int rfail(struct rx *r, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int rfail(struct rx *r, const char *fmt, ...)
{
    if (!r->rc) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(r->err, r->errlen, fmt, ap);
        va_end(ap);
        r->rc = KRS_ERR_UNSUPPORTED;
    }
    return r->rc;
}

static int hexv(char c)
{
    return c >= '0' && c <= '9'   ? c - '0'
           : c >= 'a' && c <= 'f' ? c - 'a' + 10
           : c >= 'A' && c <= 'F' ? c - 'A' + 10
                                  : -1;
}

/* One code point of the pattern's UTF-8. */
static int utf8(struct rx *r, uint32_t *cp)
{
    const unsigned char *s = (const unsigned char *)r->p;
    unsigned c = s[0];
    int len = c < 0x80                 ? 1
              : c >= 0xC2 && c <= 0xDF ? 2
              : c >= 0xE0 && c <= 0xEF ? 3
              : c >= 0xF0 && c <= 0xF4 ? 4
                                       : 0;
    if (!len || r->p + len > r->end) return rfail(r, "pattern: invalid UTF-8");
    uint32_t v = len == 1 ? c : c & (0x7Fu >> len);
    for (int i = 1; i < len; i++) {
        if ((s[i] & 0xC0) != 0x80) return rfail(r, "pattern: invalid UTF-8");
        v = v << 6 | (s[i] & 0x3Fu);
    }
    r->p += len;
    *cp = v;
    return KRS_OK;
}

/* The JSON text of one character of the string, as a GBNF literal. */
static void put_char(struct rx *r, uint32_t cp)
{
    if (cp == '"')
        puts_(r, " \"\\\\\\\"\"");
    else if (cp == '\\')
        puts_(r, " \"\\\\\\\\\"");
    else if (cp == '\n')
        puts_(r, " \"\\\\n\"");
    else if (cp == '\t')
        puts_(r, " \"\\\\t\"");
    else if (cp == '\r')
        puts_(r, " \"\\\\r\"");
    else if (cp < 0x20)
        putf(r, " \"\\\\u%04X\"", (unsigned)cp);
    else
        putf(r, " [\\U%08X]", (unsigned)cp);
}

/* A class item (a code point or a range) as GBNF class text, leaving out what JSON escapes. */
static void put_range(struct rx *r, uint32_t lo, uint32_t hi)
{
    if (lo < 0x20) lo = 0x20;
    if (lo > hi) return;
    /* split around '"' (0x22) and '\\' (0x5C) */
    uint32_t cuts[2] = {'"', '\\'};
    for (int k = 0; k < 2; k++) {
        if (lo <= cuts[k] && cuts[k] <= hi) {
            if (lo < cuts[k]) put_range(r, lo, cuts[k] - 1);
            if (cuts[k] < hi) put_range(r, cuts[k] + 1, hi);
            return;
        }
    }
    putf(r, "\\U%08X-\\U%08X", (unsigned)lo, (unsigned)hi);
}

/* Shorthand class letters: ranges (positive) of \d \w \s. */
static int shorthand(char c, struct rx *r, int in_class, int *negated)
{
    const char *pos = c == 'd' || c == 'D'   ? "0-9"
                      : c == 'w' || c == 'W' ? "a-zA-Z0-9_"
                      : c == 's' || c == 'S' ? " " /* tab/newline would need JSON escapes */
                                             : NULL;
    if (!pos) return 0;
    *negated = c >= 'A' && c <= 'Z';
    if (in_class && *negated)
        return rfail(r, "pattern: \\%c inside a character class is not supported", c), 1;
    if (in_class)
        puts_(r, pos);
    else if (*negated)
        putf(r, " [^%s" SAFE_NEG "]", c == 'S' ? " \\t\\n\\r" : pos);
    else
        putf(r, " [%s]", pos);
    return 1;
}

/* An escape after '\\' (p at the letter): its code point, or -1 when it was a shorthand that
 * was written already. */
static int escape(struct rx *r, int in_class, int64_t *cp)
{
    if (r->p >= r->end) return rfail(r, "pattern: ends with '\\'");
    char c = *r->p++;
    int neg;
    if (shorthand(c, r, in_class, &neg)) {
        *cp = -1;
        return r->rc;
    }
    switch (c) {
    case 'n':
        *cp = '\n';
        return KRS_OK;
    case 't':
        *cp = '\t';
        return KRS_OK;
    case 'r':
        *cp = '\r';
        return KRS_OK;
    case 'x':
    case 'u': {
        int n = c == 'x' ? 2 : 4;
        uint32_t v = 0;
        for (int i = 0; i < n; i++) {
            int h = r->p < r->end ? hexv(*r->p) : -1;
            if (h < 0) return rfail(r, "pattern: bad \\%c escape", c);
            v = v * 16 + (uint32_t)h;
            r->p++;
        }
        *cp = v;
        return KRS_OK;
    }
    case 'b':
    case 'B':
        return rfail(r, "pattern: word boundaries (\\%c) are not supported", c);
    default:
        if ((c >= '1' && c <= '9') || c == 'k')
            return rfail(r, "pattern: backreferences are not supported");
        if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9'))
            return rfail(r, "pattern: escape \\%c is not supported", c);
        *cp = (unsigned char)c; /* escaped punctuation */
        return KRS_OK;
    }
}

static int alternation(struct rx *r, int depth);

static int class_(struct rx *r)
{
    int neg = r->p < r->end && *r->p == '^';
    if (neg) r->p++;
    puts_(r, neg ? " [^" SAFE_NEG : " [");
    size_t start = r->n;
    int first = 1;
    while (r->p < r->end && (*r->p != ']' || first)) {
        first = 0;
        int64_t lo;
        uint32_t u;
        if (*r->p == '\\') {
            r->p++;
            if (escape(r, 1, &lo)) return r->rc;
            if (lo < 0) continue;
        } else {
            if (utf8(r, &u)) return r->rc;
            lo = u;
        }
        int64_t hi = lo;
        if (r->end - r->p >= 2 && r->p[0] == '-' && r->p[1] != ']') {
            r->p++;
            if (*r->p == '\\') {
                r->p++;
                if (escape(r, 1, &hi)) return r->rc;
                if (hi < 0) return rfail(r, "pattern: a range cannot end in a class shorthand");
            } else {
                if (utf8(r, &u)) return r->rc;
                hi = u;
            }
            if (hi < lo) return rfail(r, "pattern: bad range in a character class");
        }
        if (neg) {
            putf(r, "\\U%08X-\\U%08X", (unsigned)lo, (unsigned)hi);
        } else {
            put_range(r, (uint32_t)lo, (uint32_t)hi);
        }
    }
    if (r->p >= r->end) return rfail(r, "pattern: unterminated character class");
    r->p++;
    if (!neg && r->n == start) return rfail(r, "pattern: a class that allows no JSON character");
    puts_(r, "]");
    return r->rc;
}

static int atom(struct rx *r, int depth)
{
    char c = *r->p;
    if (c == '(') {
        r->p++;
        if (r->p < r->end && *r->p == '?') {
            if (r->end - r->p >= 2 && r->p[1] == ':')
                r->p += 2;
            else
                return rfail(r, "pattern: lookarounds and named groups are not supported");
        }
        if (depth >= MAX_DEPTH) return rfail(r, "pattern: nested too deeply");
        puts_(r, " (");
        if (alternation(r, depth + 1)) return r->rc;
        if (r->p >= r->end || *r->p != ')') return rfail(r, "pattern: missing ')'");
        r->p++;
        puts_(r, " )");
        return r->rc;
    }
    if (c == '[') {
        r->p++;
        return class_(r);
    }
    if (c == '.') {
        r->p++;
        puts_(r, " [^" SAFE_NEG "]");
        return r->rc;
    }
    if (c == '^' || c == '$') return rfail(r, "pattern: anchors are supported only at the ends");
    if (c == '*' || c == '+' || c == '?')
        return rfail(r, "pattern: quantifier without an expression");
    if (c == '\\') {
        r->p++;
        int64_t cp;
        if (escape(r, 0, &cp)) return r->rc;
        if (cp >= 0) put_char(r, (uint32_t)cp);
        return r->rc;
    }
    uint32_t cp;
    if (utf8(r, &cp)) return r->rc;
    put_char(r, cp);
    return r->rc;
}

static int number(struct rx *r, long *out)
{
    long v = 0;
    int n = 0;
    while (r->p < r->end && *r->p >= '0' && *r->p <= '9' && n < 6)
        v = v * 10 + (*r->p++ - '0'), n++;
    if (!n) return 0;
    *out = v;
    return 1;
}

static int sequence(struct rx *r, int depth)
{
    while (r->p < r->end && *r->p != '|' && *r->p != ')') {
        if (*r->p == '$' && r->p + 1 == r->end) return r->rc; /* the end anchor: caller */
        size_t at = r->n;
        if (atom(r, depth)) return r->rc;
        if (r->p >= r->end) break;
        char q = *r->p;
        long lo = -1, hi = -1;
        if (q == '*' || q == '+' || q == '?') {
            r->p++;
            lo = q == '+', hi = q == '?' ? 1 : -1;
        } else if (q == '{') {
            const char *save = r->p++;
            if (!number(r, &lo)) {
                r->p = save; /* a literal '{' */
                continue;
            }
            hi = lo;
            if (r->p < r->end && *r->p == ',') {
                r->p++;
                hi = -1;
                number(r, &hi);
            }
            if (r->p >= r->end || *r->p != '}') return rfail(r, "pattern: bad {m,n}");
            r->p++;
            if ((hi >= 0 && hi < lo) || lo > MAX_REPEAT || hi > MAX_REPEAT)
                return rfail(r, "pattern: repetition beyond %d", MAX_REPEAT);
        } else {
            continue;
        }
        if (r->p < r->end && *r->p == '?') r->p++; /* lazy: the same strings */
        /* wrap what the atom wrote so the quantifier applies to all of it */
        char *atom_text = alloc_strndup(r->out + at, r->n - at);
        if (!atom_text) return r->oom = 1, KRS_ERR_NOMEM;
        r->n = at;
        puts_(r, " (");
        puts_(r, atom_text);
        alloc_free(atom_text);
        if (hi < 0)
            putf(r, " ){%ld,}", lo);
        else
            putf(r, " ){%ld,%ld}", lo, hi);
    }
    return r->rc;
}

static int alternation(struct rx *r, int depth)
{
    for (;;) {
        puts_(r, " (");
        if (sequence(r, depth)) return r->rc;
        puts_(r, " )");
        if (r->p < r->end && *r->p == '|') {
            r->p++;
            puts_(r, " |");
            continue;
        }
        return r->rc;
    }
}

int grammar_regex_to_gbnf(const char *pattern, char **out, char *err, size_t errlen)
{
    *out = NULL;
    struct rx r = {.p = pattern, .end = pattern + strlen(pattern), .err = err, .errlen = errlen};
    int start = r.p < r.end && *r.p == '^';
    if (start) r.p++;
    if (!start) puts_(&r, " [^" SAFE_NEG "]*");
    puts_(&r, " (");
    alternation(&r, 0);
    puts_(&r, " )");
    int end = r.p < r.end && *r.p == '$' && r.p + 1 == r.end;
    if (!r.rc && end) r.p++;
    if (!r.rc && r.p < r.end)
        rfail(&r, *r.p == ')' ? "pattern: unbalanced ')'"
                              : "pattern: anchors are supported only at the ends");
    if (!r.rc && !end) puts_(&r, " [^" SAFE_NEG "]*");
    if (!r.rc && r.oom) r.rc = KRS_ERR_NOMEM;
    if (r.rc) {
        alloc_free(r.out);
        return r.rc;
    }
    *out = r.out;
    return KRS_OK;
}
