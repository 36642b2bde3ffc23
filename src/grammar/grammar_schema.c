/* JSON Schema -> GBNF (then grammar_compile_gbnf).
 *
 * Supported (docs/api.md lists it for users): type (one or a list), properties + required
 * (properties come in the schema's order; optional ones may be left out; properties beyond
 * those declared are never generated, which every additionalProperties value allows),
 * additionalProperties (false, true or a schema) for objects without properties, items,
 * prefixItems, minItems/maxItems, enum, const, anyOf, local $ref (#/$defs/..., #/definitions/...,
 * "#"; recursion allowed), minLength/maxLength, format date / time / date-time / uuid,
 * minimum/maximum/exclusiveMinimum/exclusiveMaximum on integers, and integer-valued
 * minimum/maximum on numbers, pattern (the regex subset in grammar_regex.c). Annotations (title,
 * description, default, examples, ...) are ignored. Anything else is KRS_ERR_UNSUPPORTED naming the
 * keyword: a schema is never half applied.
 *
 * The output is JSON with bounded whitespace (at most a newline and 20 spaces or tabs between
 * tokens) and bounded numbers (at most 16 integer digits, 15 fraction digits, 2 exponent
 * digits), so that a model cannot pad forever. \u escapes never produce lone surrogates, so
 * every escape counts as one character for minLength/maxLength. */
#include "grammar/grammar_impl.h"

#include "krserve.h"
#include "util/alloc.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#define MAX_NEST  64
#define MAX_COUNT 10000
#define MAX_MAG   1e15

static const char LIBRARY[] =
    "ws ::= ( \" \" | \"\\n\" [ \\t]{0,20} )?\n"
    "string ::= \"\\\"\" char* \"\\\"\"\n"
    "char ::= [^\"\\\\\\x00-\\x1F] | \"\\\\\" ( [\"\\\\/bfnrt] | \"u\" hex4 )\n"
    "hex4 ::= [0-9a-cA-CeEfF] [0-9a-fA-F]{3} | [dD] [0-7] [0-9a-fA-F]{2}\n"
    "uint ::= \"0\" | [1-9] [0-9]{0,15}\n"
    "integer ::= \"-\"? uint\n"
    "frac ::= ( \".\" [0-9]{1,15} )?\n"
    "number ::= \"-\"? uint frac ( [eE] [-+]? [0-9]{1,2} )?\n"
    "boolean ::= \"true\" | \"false\"\n"
    "null ::= \"null\"\n"
    "value ::= object | array | string | number | boolean | null\n"
    "object ::= \"{\" ws ( member ( \",\" ws member )* )? \"}\"\n"
    "member ::= string ws \":\" ws value ws\n"
    "array ::= \"[\" ws ( value ws ( \",\" ws value ws )* )? \"]\"\n"
    /* real calendar dates only (February stops at 28: no leap-year rule in a grammar) */
    "date ::= [12] [0-9]{3} \"-\" ( ( \"0\" [13578] | \"1\" [02] ) \"-\" d31 | ( \"0\" [469] | "
    "\"11\" ) \"-\" d30 | \"02-\" d28 )\n"
    "d28 ::= \"0\" [1-9] | \"1\" [0-9] | \"2\" [0-8]\n"
    "d30 ::= d28 | \"29\" | \"30\"\n"
    "d31 ::= d30 | \"31\"\n"
    "time ::= ( [01] [0-9] | \"2\" [0-3] ) \":\" [0-5] [0-9] \":\" [0-5] [0-9] ( \".\" [0-9]{1,6} "
    ")? ( \"Z\" | [+-] ( [01] [0-9] | \"2\" [0-3] ) \":\" [0-5] [0-9] )\n"
    "uuid ::= hex{8} \"-\" hex{4} \"-\" hex{4} \"-\" hex{4} \"-\" hex{12}\n"
    "hex ::= [0-9a-f]\n";

struct sbuf {
    char *s;
    size_t n, cap;
    int oom;
};

static void sb_putn(struct sbuf *b, const char *s, size_t n)
{
    if (b->oom) return;
    if (b->n + n + 1 > b->cap) {
        size_t nc = b->cap ? b->cap : 1024;
        while (nc < b->n + n + 1) nc *= 2;
        char *ns = alloc_realloc(b->s, nc);
        if (!ns) {
            b->oom = 1;
            return;
        }
        b->s = ns;
        b->cap = nc;
    }
    memcpy(b->s + b->n, s, n);
    b->n += n;
    b->s[b->n] = '\0';
}

static void sb_puts(struct sbuf *b, const char *s)
{
    sb_putn(b, s, strlen(s));
}

static void sb_printf(struct sbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void sb_printf(struct sbuf *b, const char *fmt, ...)
{
    char tmp[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    if (n < 0 || (size_t)n >= sizeof tmp) {
        b->oom = 1;
        return;
    }
    sb_putn(b, tmp, (size_t)n);
}

/* Text as a GBNF string literal (quotes included). */
static void sb_literal(struct sbuf *b, const char *s)
{
    sb_puts(b, "\"");
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        if (*p == '"' || *p == '\\')
            sb_printf(b, "\\%c", *p);
        else if (*p < 0x20)
            sb_printf(b, "\\x%02X", *p);
        else
            sb_putn(b, (const char *)p, 1);
    }
    sb_puts(b, "\"");
}

struct ctx {
    struct sbuf out; /* rules */
    const cJSON *root;
    int n_rules;
    struct ref_rule {
        const cJSON *node;
        int id;
    } refs[256];
    int n_refs;
    char *err;
    size_t errlen;
    int rc;
};

static int cfail(struct ctx *c, int rc, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int cfail(struct ctx *c, int rc, const char *fmt, ...)
{
    if (!c->rc) {
        va_list ap;
        va_start(ap, fmt);
        if (c->err && c->errlen) vsnprintf(c->err, c->errlen, fmt, ap);
        va_end(ap);
        c->rc = rc;
    }
    return c->rc;
}

static int gen_rule(struct ctx *c, const cJSON *s, int depth, int *id);

/* A JSON value as a GBNF literal of its compact text. */
static int emit_json_literal(struct ctx *c, struct sbuf *b, const cJSON *v)
{
    char *t = cJSON_PrintUnformatted(v);
    if (!t) return cfail(c, KRS_ERR_NOMEM, "out of memory");
    sb_literal(b, t);
    cJSON_free(t);
    return KRS_OK;
}

static int get_count(struct ctx *c, const cJSON *s, const char *key, long *out)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(s, key);
    if (!v) return KRS_OK;
    if (!cJSON_IsNumber(v) || v->valuedouble < 0 || v->valuedouble != floor(v->valuedouble))
        return cfail(c, KRS_ERR_INVALID, "'%s' must be a non-negative integer", key);
    if (v->valuedouble > MAX_COUNT)
        return cfail(c, KRS_ERR_UNSUPPORTED, "'%s' above %d is not supported", key, MAX_COUNT);
    *out = (long)v->valuedouble;
    return KRS_OK;
}

/* ---- integer ranges ---- */

/* Equal-length decimal strings a <= b: the numbers between them. */
static void range_same(struct sbuf *b, const char *a, const char *z, size_t len)
{
    if (!len) return;
    if (!memcmp(a, z, len)) {
        sb_puts(b, " \"");
        sb_putn(b, a, len);
        sb_puts(b, "\"");
        return;
    }
    if (len == 1) {
        sb_printf(b, " [%c-%c]", a[0], z[0]);
        return;
    }
    if (a[0] == z[0]) {
        sb_printf(b, " \"%c\"", a[0]);
        range_same(b, a + 1, z + 1, len - 1);
        return;
    }
    char nines[24], zeros[24];
    memset(nines, '9', sizeof nines);
    memset(zeros, '0', sizeof zeros);
    sb_printf(b, " ( \"%c\"", a[0]);
    range_same(b, a + 1, nines, len - 1);
    if (a[0] + 1 <= z[0] - 1) sb_printf(b, " | [%c-%c] [0-9]{%zu}", a[0] + 1, z[0] - 1, len - 1);
    sb_printf(b, " | \"%c\"", z[0]);
    range_same(b, zeros, z + 1, len - 1);
    sb_puts(b, " )");
}

/* Non-negative integers in [lo, hi] (hi < 0: unbounded), without leading zeros. */
static void range_nonneg(struct sbuf *b, long long lo, long long hi)
{
    char a[24], z[24];
    int la = snprintf(a, sizeof a, "%lld", lo);
    int lz = hi < 0 ? la : snprintf(z, sizeof z, "%lld", hi);
    sb_puts(b, " (");
    long long p10 = 1;
    for (int i = 1; i < la; i++) p10 *= 10;
    int first = 1;
    for (int len = la; len <= lz; len++, p10 *= 10) {
        long long from = len == 1 ? 0 : p10, to = p10 * 10 - 1;
        if (from < lo) from = lo;
        if (hi >= 0 && to > hi) to = hi;
        if (from > to) continue;
        snprintf(a, sizeof a, "%lld", from);
        snprintf(z, sizeof z, "%lld", to);
        if (!first) sb_puts(b, " |");
        first = 0;
        range_same(b, a, z, (size_t)len);
    }
    if (hi < 0) sb_printf(b, " | [1-9] [0-9]{%d,15}", lz);
    sb_puts(b, " )");
}

/* Integers (or numbers with integer bounds) in [lo, hi]; has_lo/has_hi say which bound exists.
 * Numbers: any fraction inside, a zero fraction at an end point. */
static void gen_bounded(struct sbuf *b, int has_lo, long long lo, int has_hi, long long hi,
                        int is_number)
{
    const char *frac = is_number ? " frac" : "";
    const char *zfrac = is_number ? " ( \".\" \"0\"{1,15} )?" : "";
    int first = 1;
    sb_puts(b, " (");
    if (!has_lo || lo < 0) { /* negative values: magnitudes */
        long long mlo = has_hi && hi < 0 ? -hi : 0, mhi = has_lo ? -lo : -1;
        if (!is_number && mlo == 0) mlo = 1;
        sb_puts(b, " \"-\" (");
        int f2 = 1;
        if (!is_number) {
            range_nonneg(b, mlo, mhi);
        } else {
            if (mhi < 0 || mlo <= mhi - 1) {
                range_nonneg(b, mlo, mhi < 0 ? -1 : mhi - 1);
                sb_puts(b, frac);
                f2 = 0;
            }
            if (mhi >= 0) {
                if (!f2) sb_puts(b, " |");
                sb_printf(b, " \"%lld\"%s", mhi, zfrac);
            }
        }
        sb_puts(b, " )");
        first = 0;
    }
    if (!has_hi || hi >= 0) {
        long long a = has_lo && lo > 0 ? lo : 0;
        if (!first) sb_puts(b, " |");
        if (!is_number || !has_hi) {
            range_nonneg(b, a, has_hi ? hi : -1);
            sb_puts(b, frac);
        } else {
            if (a <= hi - 1) {
                range_nonneg(b, a, hi - 1);
                sb_printf(b, "%s |", frac);
            }
            sb_printf(b, " \"%lld\"%s", hi, zfrac);
        }
    }
    sb_puts(b, " )");
}

static int gen_numeric(struct ctx *c, struct sbuf *b, const cJSON *s, int is_number)
{
    const char *keys[4] = {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"};
    const cJSON *v[4];
    int any = 0;
    for (int i = 0; i < 4; i++) {
        v[i] = cJSON_GetObjectItemCaseSensitive(s, keys[i]);
        if (!v[i]) continue;
        if (!cJSON_IsNumber(v[i]))
            return cfail(c, KRS_ERR_INVALID, "'%s' must be a number", keys[i]);
        if (fabs(v[i]->valuedouble) > MAX_MAG)
            return cfail(c, KRS_ERR_UNSUPPORTED, "'%s' beyond 1e15 is not supported", keys[i]);
        any = 1;
    }
    if (cJSON_GetObjectItemCaseSensitive(s, "multipleOf"))
        return cfail(c, KRS_ERR_UNSUPPORTED, "JSON Schema keyword 'multipleOf' is not supported");
    if (!any) {
        sb_puts(b, is_number ? " number" : " integer");
        return KRS_OK;
    }
    int has_lo = 0, has_hi = 0;
    long long lo = 0, hi = 0;
    for (int i = 0; i < 4; i++) {
        if (!v[i]) continue;
        double d = v[i]->valuedouble;
        int excl = i >= 2, is_lo = i % 2 == 0;
        if (is_number && (excl || d != floor(d)))
            return cfail(c, KRS_ERR_UNSUPPORTED,
                         "'%s' on type number is supported only as an integer-valued minimum or "
                         "maximum",
                         keys[i]);
        long long x = is_lo ? (long long)ceil(d) : (long long)floor(d);
        if (excl && d == floor(d)) x += is_lo ? 1 : -1;
        if (is_lo && (!has_lo || x > lo)) lo = x, has_lo = 1;
        if (!is_lo && (!has_hi || x < hi)) hi = x, has_hi = 1;
    }
    if (has_lo && has_hi && lo > hi)
        return cfail(c, KRS_ERR_INVALID, "the schema's minimum is above its maximum");
    gen_bounded(b, has_lo, lo, has_hi, hi, is_number);
    return KRS_OK;
}

/* ---- types ---- */

static int gen_string(struct ctx *c, struct sbuf *b, const cJSON *s)
{
    const cJSON *fmt = cJSON_GetObjectItemCaseSensitive(s, "format");
    const cJSON *pat = cJSON_GetObjectItemCaseSensitive(s, "pattern");
    if (pat) {
        if (!cJSON_IsString(pat)) return cfail(c, KRS_ERR_INVALID, "'pattern' must be a string");
        if (fmt || cJSON_GetObjectItemCaseSensitive(s, "minLength") ||
            cJSON_GetObjectItemCaseSensitive(s, "maxLength"))
            return cfail(c, KRS_ERR_UNSUPPORTED,
                         "'pattern' together with format, minLength or maxLength is not supported");
        char *body = NULL, why[160] = "";
        int rc = grammar_regex_to_gbnf(pat->valuestring, &body, why, sizeof why);
        if (rc) return cfail(c, rc, "%s", why[0] ? why : "pattern: out of memory");
        sb_puts(b, " \"\\\"\" (");
        sb_puts(b, body);
        sb_puts(b, " ) \"\\\"\"");
        alloc_free(body);
        return KRS_OK;
    }
    if (fmt) {
        if (!cJSON_IsString(fmt)) return cfail(c, KRS_ERR_INVALID, "'format' must be a string");
        const char *f = fmt->valuestring;
        if (!strcmp(f, "date") || !strcmp(f, "time") || !strcmp(f, "uuid"))
            sb_printf(b, " \"\\\"\" %s \"\\\"\"", f);
        else if (!strcmp(f, "date-time"))
            sb_puts(b, " \"\\\"\" date \"T\" time \"\\\"\"");
        else
            return cfail(c, KRS_ERR_UNSUPPORTED,
                         "string format '%s' is not supported (date, time, date-time, uuid are)",
                         f);
        if (cJSON_GetObjectItemCaseSensitive(s, "minLength") ||
            cJSON_GetObjectItemCaseSensitive(s, "maxLength"))
            return cfail(c, KRS_ERR_UNSUPPORTED, "minLength/maxLength together with format");
        return KRS_OK;
    }
    long lo = 0, hi = -1;
    if (get_count(c, s, "minLength", &lo) || get_count(c, s, "maxLength", &hi)) return c->rc;
    if (hi >= 0 && hi < lo)
        return cfail(c, KRS_ERR_INVALID, "the schema's minLength is above its maxLength");
    if (lo == 0 && hi < 0)
        sb_puts(b, " string");
    else if (hi < 0)
        sb_printf(b, " \"\\\"\" char{%ld,} \"\\\"\"", lo);
    else
        sb_printf(b, " \"\\\"\" char{%ld,%ld} \"\\\"\"", lo, hi);
    return KRS_OK;
}

static int gen_array(struct ctx *c, struct sbuf *b, const cJSON *s, int depth)
{
    long lo = 0, hi = -1;
    if (get_count(c, s, "minItems", &lo) || get_count(c, s, "maxItems", &hi)) return c->rc;
    if (hi >= 0 && hi < lo)
        return cfail(c, KRS_ERR_INVALID, "the schema's minItems is above its maxItems");
    const cJSON *u = cJSON_GetObjectItemCaseSensitive(s, "uniqueItems");
    if (u && !cJSON_IsFalse(u))
        return cfail(c, KRS_ERR_UNSUPPORTED, "JSON Schema keyword 'uniqueItems' is not supported");
    const cJSON *items = cJSON_GetObjectItemCaseSensitive(s, "items");
    const cJSON *prefix = cJSON_GetObjectItemCaseSensitive(s, "prefixItems");
    char item[32] = "value";
    int id;
    if (items && !cJSON_IsTrue(items)) {
        if (cJSON_IsFalse(items)) {
            if (!prefix) hi = 0;
        } else {
            if (gen_rule(c, items, depth + 1, &id)) return c->rc;
            snprintf(item, sizeof item, "s%d", id);
        }
    }
    if (cJSON_IsFalse(items) && prefix) {
        long np = cJSON_GetArraySize(prefix);
        if (hi < 0 || hi > np) hi = np;
    }
    /* prefixItems: fixed leading items, then `item` for the rest */
    int n_prefix = 0;
    char pre[64][32];
    if (prefix) {
        if (!cJSON_IsArray(prefix))
            return cfail(c, KRS_ERR_INVALID, "'prefixItems' must be an array");
        for (const cJSON *p = prefix->child; p; p = p->next) {
            if (n_prefix >= 64) return cfail(c, KRS_ERR_UNSUPPORTED, "more than 64 prefixItems");
            if (gen_rule(c, p, depth + 1, &id)) return c->rc;
            snprintf(pre[n_prefix++], sizeof pre[0], "s%d", id);
        }
    }
    if (hi == 0) {
        if (lo > 0) return cfail(c, KRS_ERR_INVALID, "the schema allows no array");
        sb_puts(b, " \"[\" ws \"]\"");
        return KRS_OK;
    }
    /* position k (0-based) is pre[k] for k < n_prefix, else item; the array has n in [lo, hi]
     * elements. Written as nested optional tails: T_k = ("," ws X_k ws T_{k+1})? */
    sb_puts(b, " \"[\" ws");
    long fixed = n_prefix; /* positions with their own rule */
    long upto = hi >= 0 && hi < fixed ? hi : fixed;
    int open = 0;
    for (long k = 0; k < upto; k++) {
        const char *x = pre[k];
        if (k >= lo) {
            sb_puts(b, " (");
            open++;
        }
        sb_printf(b, "%s %s ws", k ? " \",\" ws" : "", x);
    }
    if (hi < 0 || hi > fixed) {
        long rest_lo = lo > fixed ? lo - fixed : 0;
        long rest_hi = hi < 0 ? -1 : hi - fixed;
        if (fixed == 0) {
            /* first element without a comma */
            if (rest_lo == 0) {
                sb_puts(b, " (");
                open++;
            }
            sb_printf(b, " %s ws", item);
            rest_lo = rest_lo ? rest_lo - 1 : 0;
            rest_hi = rest_hi < 0 ? -1 : rest_hi - 1;
        }
        if (rest_hi < 0)
            sb_printf(b, " ( \",\" ws %s ws ){%ld,}", item, rest_lo);
        else if (rest_hi > 0)
            sb_printf(b, " ( \",\" ws %s ws ){%ld,%ld}", item, rest_lo, rest_hi);
    }
    for (; open > 0; open--) sb_puts(b, " )?");
    sb_puts(b, " \"]\"");
    return KRS_OK;
}

static int gen_object(struct ctx *c, struct sbuf *b, const cJSON *s, int depth)
{
    const char *bad[] = {"patternProperties",     "minProperties",    "maxProperties",
                         "dependentRequired",     "dependentSchemas", "propertyNames",
                         "unevaluatedProperties", "dependencies"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        if (cJSON_GetObjectItemCaseSensitive(s, bad[i]))
            return cfail(c, KRS_ERR_UNSUPPORTED, "JSON Schema keyword '%s' is not supported",
                         bad[i]);
    const cJSON *props = cJSON_GetObjectItemCaseSensitive(s, "properties");
    const cJSON *req = cJSON_GetObjectItemCaseSensitive(s, "required");
    const cJSON *ap = cJSON_GetObjectItemCaseSensitive(s, "additionalProperties");
    if (props && !cJSON_IsObject(props))
        return cfail(c, KRS_ERR_INVALID, "'properties' must be an object");
    if (req && !cJSON_IsArray(req)) return cfail(c, KRS_ERR_INVALID, "'required' must be an array");
    for (const cJSON *r = req ? req->child : NULL; r; r = r->next) {
        if (!cJSON_IsString(r))
            return cfail(c, KRS_ERR_INVALID, "'required' entries must be strings");
        if (!props || !cJSON_GetObjectItemCaseSensitive(props, r->valuestring))
            return cfail(c, KRS_ERR_UNSUPPORTED,
                         "required property '%.64s' is not declared in 'properties'",
                         r->valuestring);
    }
    int n = props ? cJSON_GetArraySize(props) : 0;
    if (n == 0) {
        if (cJSON_IsFalse(ap)) {
            sb_puts(b, " \"{\" ws \"}\"");
        } else if (ap && !cJSON_IsTrue(ap)) {
            int id;
            if (gen_rule(c, ap, depth + 1, &id)) return c->rc;
            sb_printf(b,
                      " \"{\" ws ( string ws \":\" ws s%d ws ( \",\" ws string ws \":\" ws s%d ws "
                      ")* )? \"}\"",
                      id, id);
        } else {
            sb_puts(b, " object");
        }
        return KRS_OK;
    }
    if (n > 256) return cfail(c, KRS_ERR_UNSUPPORTED, "more than 256 properties");
    /* kv_i, then S_i (nothing emitted yet from i on) and R_i (something emitted) as rules */
    int base = c->n_rules;
    c->n_rules += 3 * n;
    int i = 0;
    for (const cJSON *p = props->child; p; p = p->next, i++) {
        int vid;
        if (gen_rule(c, p, depth + 1, &vid)) return c->rc;
        cJSON *key = cJSON_CreateString(p->string ? p->string : "");
        if (!key) return cfail(c, KRS_ERR_NOMEM, "out of memory");
        sb_printf(&c->out, "s%d ::= ", base + 3 * i);
        emit_json_literal(c, &c->out, key);
        cJSON_Delete(key);
        sb_printf(&c->out, " ws \":\" ws s%d ws\n", vid);
    }
    i = 0;
    for (const cJSON *p = props->child; p; p = p->next, i++) {
        int required = 0;
        for (const cJSON *r = req ? req->child : NULL; r; r = r->next)
            required |= !strcmp(r->valuestring, p->string ? p->string : "");
        int kv = base + 3 * i, S = kv + 1, R = kv + 2, last = p->next == NULL;
        char rn[32] = "", sn[32] = "";
        if (!last) snprintf(rn, sizeof rn, " s%d", R + 3);
        if (!last) snprintf(sn, sizeof sn, " s%d", S + 3);
        if (required) {
            sb_printf(&c->out, "s%d ::= s%d%s\n", S, kv, rn);
            sb_printf(&c->out, "s%d ::= \",\" ws s%d%s\n", R, kv, rn);
        } else {
            sb_printf(&c->out, "s%d ::= s%d%s |%s\n", S, kv, rn, sn);
            sb_printf(&c->out, "s%d ::= ( \",\" ws s%d )?%s\n", R, kv, rn);
        }
    }
    sb_printf(b, " \"{\" ws s%d \"}\"", base + 1);
    return KRS_OK;
}

static const cJSON *resolve_ref(struct ctx *c, const char *ref)
{
    if (!strcmp(ref, "#")) return c->root;
    const char *name = NULL;
    const cJSON *defs = NULL;
    if (!strncmp(ref, "#/$defs/", 8)) {
        defs = cJSON_GetObjectItemCaseSensitive(c->root, "$defs");
        name = ref + 8;
    } else if (!strncmp(ref, "#/definitions/", 14)) {
        defs = cJSON_GetObjectItemCaseSensitive(c->root, "definitions");
        name = ref + 14;
    }
    if (!name || strchr(name, '/') || strchr(name, '~')) return NULL;
    return defs ? cJSON_GetObjectItemCaseSensitive(defs, name) : NULL;
}

static const char *const ANNOTATIONS[] = {
    "title",    "description", "default",    "examples", "$schema",     "$id",   "$comment",
    "readOnly", "writeOnly",   "deprecated", "$defs",    "definitions", "strict"};
static const char *const KNOWN[] = {"type",
                                    "properties",
                                    "required",
                                    "additionalProperties",
                                    "items",
                                    "prefixItems",
                                    "minItems",
                                    "maxItems",
                                    "uniqueItems",
                                    "enum",
                                    "const",
                                    "anyOf",
                                    "$ref",
                                    "minLength",
                                    "maxLength",
                                    "format",
                                    "pattern",
                                    "minimum",
                                    "maximum",
                                    "exclusiveMinimum",
                                    "exclusiveMaximum",
                                    "multipleOf",
                                    "patternProperties",
                                    "minProperties",
                                    "maxProperties",
                                    "dependentRequired",
                                    "dependentSchemas",
                                    "propertyNames",
                                    "unevaluatedProperties",
                                    "dependencies"};

static int is_in(const char *k, const char *const *list, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (!strcmp(k, list[i])) return 1;
    return 0;
}

static int gen_type(struct ctx *c, struct sbuf *b, const cJSON *s, const char *t, int depth)
{
    if (!strcmp(t, "string")) return gen_string(c, b, s);
    if (!strcmp(t, "integer")) return gen_numeric(c, b, s, 0);
    if (!strcmp(t, "number")) return gen_numeric(c, b, s, 1);
    if (!strcmp(t, "boolean")) return sb_puts(b, " boolean"), KRS_OK;
    if (!strcmp(t, "null")) return sb_puts(b, " null"), KRS_OK;
    if (!strcmp(t, "object")) return gen_object(c, b, s, depth);
    if (!strcmp(t, "array")) return gen_array(c, b, s, depth);
    return cfail(c, KRS_ERR_INVALID, "unknown JSON Schema type '%.32s'", t);
}

/* The body of schema s into b. */
static int gen_body(struct ctx *c, struct sbuf *b, const cJSON *s, int depth)
{
    if (depth > MAX_NEST) return cfail(c, KRS_ERR_UNSUPPORTED, "schema nested too deeply");
    if (cJSON_IsTrue(s)) return sb_puts(b, " value"), KRS_OK;
    if (cJSON_IsFalse(s)) return cfail(c, KRS_ERR_INVALID, "the schema 'false' allows nothing");
    if (!cJSON_IsObject(s)) return cfail(c, KRS_ERR_INVALID, "a schema must be an object");
    for (const cJSON *k = s->child; k; k = k->next) {
        const char *key = k->string ? k->string : "";
        if (is_in(key, ANNOTATIONS, sizeof ANNOTATIONS / sizeof *ANNOTATIONS)) continue;
        if (!is_in(key, KNOWN, sizeof KNOWN / sizeof *KNOWN))
            return cfail(c, KRS_ERR_UNSUPPORTED, "JSON Schema keyword '%.64s' is not supported",
                         key);
    }
    const cJSON *ref = cJSON_GetObjectItemCaseSensitive(s, "$ref");
    const cJSON *cst = cJSON_GetObjectItemCaseSensitive(s, "const");
    const cJSON *en = cJSON_GetObjectItemCaseSensitive(s, "enum");
    const cJSON *any = cJSON_GetObjectItemCaseSensitive(s, "anyOf");
    const cJSON *type = cJSON_GetObjectItemCaseSensitive(s, "type");
    int n_comb = !!ref + !!cst + !!en + !!any;
    if (n_comb > 1 || (n_comb && (type || cJSON_GetObjectItemCaseSensitive(s, "properties"))))
        return cfail(c, KRS_ERR_UNSUPPORTED,
                     "combining $ref, const, enum, anyOf or type in one schema is not supported");
    if (ref) {
        if (!cJSON_IsString(ref)) return cfail(c, KRS_ERR_INVALID, "'$ref' must be a string");
        const cJSON *target = resolve_ref(c, ref->valuestring);
        if (!target)
            return cfail(c, KRS_ERR_UNSUPPORTED,
                         "$ref '%.64s' is not supported (only local #/$defs/... refs)",
                         ref->valuestring);
        int id;
        if (gen_rule(c, target, depth + 1, &id)) return c->rc;
        sb_printf(b, " s%d", id);
        return KRS_OK;
    }
    if (cst) return emit_json_literal(c, b, cst);
    if (en) {
        if (!cJSON_IsArray(en) || !cJSON_GetArraySize(en))
            return cfail(c, KRS_ERR_INVALID, "'enum' must be a non-empty array");
        sb_puts(b, " (");
        for (const cJSON *v = en->child; v; v = v->next) {
            sb_puts(b, v == en->child ? " " : " | ");
            if (emit_json_literal(c, b, v)) return c->rc;
        }
        sb_puts(b, " )");
        return KRS_OK;
    }
    if (any) {
        if (!cJSON_IsArray(any) || !cJSON_GetArraySize(any))
            return cfail(c, KRS_ERR_INVALID, "'anyOf' must be a non-empty array");
        sb_puts(b, " (");
        for (const cJSON *v = any->child; v; v = v->next) {
            int id;
            if (gen_rule(c, v, depth + 1, &id)) return c->rc;
            sb_printf(b, "%s s%d", v == any->child ? "" : " |", id);
        }
        sb_puts(b, " )");
        return KRS_OK;
    }
    if (cJSON_IsString(type)) return gen_type(c, b, s, type->valuestring, depth);
    if (cJSON_IsArray(type)) {
        if (!cJSON_GetArraySize(type))
            return cfail(c, KRS_ERR_INVALID, "'type' must not be an empty list");
        sb_puts(b, " (");
        for (const cJSON *t = type->child; t; t = t->next) {
            if (!cJSON_IsString(t))
                return cfail(c, KRS_ERR_INVALID, "'type' entries must be strings");
            if (t != type->child) sb_puts(b, " |");
            if (gen_type(c, b, s, t->valuestring, depth)) return c->rc;
        }
        sb_puts(b, " )");
        return KRS_OK;
    }
    if (type) return cfail(c, KRS_ERR_INVALID, "'type' must be a string or a list of strings");
    if (cJSON_GetObjectItemCaseSensitive(s, "properties") ||
        cJSON_GetObjectItemCaseSensitive(s, "additionalProperties"))
        return gen_object(c, b, s, depth);
    if (cJSON_GetObjectItemCaseSensitive(s, "items") ||
        cJSON_GetObjectItemCaseSensitive(s, "prefixItems"))
        return gen_array(c, b, s, depth);
    for (const cJSON *k = s->child; k; k = k->next)
        if (!is_in(k->string ? k->string : "", ANNOTATIONS,
                   sizeof ANNOTATIONS / sizeof *ANNOTATIONS))
            return cfail(c, KRS_ERR_UNSUPPORTED,
                         "JSON Schema keyword '%.64s' without a 'type' is not supported",
                         k->string ? k->string : "");
    sb_puts(b, " value");
    return KRS_OK;
}

/* A rule "s<id> ::= body" for schema s; $ref targets are generated once (recursion allowed). */
static int gen_rule(struct ctx *c, const cJSON *s, int depth, int *id)
{
    for (int i = 0; i < c->n_refs; i++)
        if (c->refs[i].node == s) {
            *id = c->refs[i].id;
            return KRS_OK;
        }
    *id = c->n_rules++;
    if (c->n_refs < (int)(sizeof c->refs / sizeof c->refs[0]))
        c->refs[c->n_refs++] = (struct ref_rule){s, *id};
    struct sbuf body = {0};
    int rc = gen_body(c, &body, s, depth);
    if (!rc) {
        sb_printf(&c->out, "s%d ::=", *id);
        sb_puts(&c->out, body.s ? body.s : "");
        sb_puts(&c->out, "\n");
        if (body.oom || c->out.oom) rc = cfail(c, KRS_ERR_NOMEM, "out of memory");
    }
    alloc_free(body.s);
    return rc ? rc : c->rc;
}

int grammar_schema_to_gbnf(const char *schema, size_t len, char **out, char *err, size_t errlen)
{
    *out = NULL;
    if (err && errlen) err[0] = '\0';
    struct ctx c = {.err = err, .errlen = errlen};
    cJSON *root = NULL;
    if (schema) {
        root = cJSON_ParseWithLength(schema, len);
        if (!root) return cfail(&c, KRS_ERR_INVALID, "the schema is not valid JSON");
    }
    c.root = root;
    sb_puts(&c.out, LIBRARY);
    int id = -1;
    if (root)
        gen_rule(&c, root, 0, &id);
    else
        sb_puts(&c.out, "root ::= object\n");
    if (!c.rc && id >= 0) sb_printf(&c.out, "root ::= s%d\n", id);
    if (!c.rc && c.out.oom) cfail(&c, KRS_ERR_NOMEM, "out of memory");
    cJSON_Delete(root);
    if (c.rc) {
        alloc_free(c.out.s);
        return c.rc;
    }
    *out = c.out.s;
    return KRS_OK;
}

int grammar_compile_json_schema(const char *schema, size_t len, struct grammar **out, char *err,
                                size_t errlen)
{
    *out = NULL;
    char *text = NULL;
    int rc = grammar_schema_to_gbnf(schema, len, &text, err, errlen);
    if (rc) return rc;
    rc = grammar_compile_gbnf(text, strlen(text), out, err, errlen);
    alloc_free(text);
    return rc;
}
