/* grammar/: the GBNF compiler (syntax and the checks it must refuse), the JSON Schema compiler
 * on accept/reject corpora in the style of the JSON Schema test suite (for the supported subset:
 * the accepted texts are written the way the grammar writes JSON), unsupported keywords named in
 * the error, and the matcher's masks: on a byte vocabulary every mask bit must agree with
 * accepting that byte, and on the default model's 262,144-token vocabulary random walks through
 * the allowed tokens must end in text that cJSON parses, with the rejected tokens refused. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gguf/gguf.h"
#include "grammar/grammar.h"
#include "grammar/grammar_impl.h"
#include "krserve.h"
#include "tokenizer/tokenizer.h"
#include "util/alloc.h"

/* ---- a byte vocabulary: token b (< 256) is byte b, 256 is end of generation, then a few
 * multi-byte tokens ---- */

#define EOG_TOKEN GRAMMAR_BYTE_EOG
static const char *const MULTI[] = {"{\"",      "\":",      "true", "null", "  ",
                                    "\xc3\xa9", "\xe4\xb8", "\xad", "\"}",  "12"};
#define N_MULTI (sizeof MULTI / sizeof MULTI[0])

static struct grammar_vocab *byte_vocab(void)
{
    struct grammar_vocab *v = NULL;
    assert_int_equal(grammar_vocab_create_bytes(MULTI, N_MULTI, &v), KRS_OK);
    return v;
}

static int bit(const uint32_t *mask, int32_t t)
{
    return (int)(mask[t >> 5] >> (t & 31) & 1);
}

/* Feeds s byte by byte; checks at each step that the mask bit of the byte agrees with accept;
 * returns 1 when all bytes are accepted and the end is accepting (and EOG is in the mask). */
static int run_text(struct grammar *g, const struct grammar_vocab *v, const char *s)
{
    struct grammar_matcher *m = NULL;
    assert_int_equal(grammar_matcher_create(g, v, &m), KRS_OK);
    int ok = 1;
    for (const unsigned char *p = (const unsigned char *)s; *p && ok; p++) {
        const uint32_t *mask;
        int32_t n;
        assert_int_equal(grammar_matcher_mask(m, &mask, &n), KRS_OK);
        int allowed = bit(mask, *p);
        int rc = grammar_matcher_accept(m, *p);
        assert_int_equal(allowed, rc == KRS_OK);
        ok = rc == KRS_OK;
    }
    if (ok) {
        const uint32_t *mask;
        int32_t n;
        int acc = grammar_matcher_accepting(m);
        assert_int_equal(grammar_matcher_mask(m, &mask, &n), KRS_OK);
        assert_int_equal(bit(mask, EOG_TOKEN), acc);
        ok = acc;
        if (acc) assert_int_equal(grammar_matcher_accept(m, EOG_TOKEN), KRS_OK);
    }
    grammar_matcher_free(m);
    return ok;
}

static struct grammar *gbnf(const char *text)
{
    struct grammar *g = NULL;
    char err[256];
    int rc = grammar_compile_gbnf(text, strlen(text), &g, err, sizeof err);
    if (rc) fail_msg("grammar did not compile: %s\n%s", err, text);
    return g;
}

static void test_gbnf_basics(void **state)
{
    (void)state;
    struct grammar_vocab *v = byte_vocab();
    struct grammar *g = gbnf("root ::= \"a\" b* c? d{2,3}\nb ::= [xy]\nc ::= \"c\" | \"C\"\n"
                             "d ::= [0-9]\n# comment\n");
    assert_true(run_text(g, v, "a12"));
    assert_true(run_text(g, v, "axyxC123"));
    assert_false(run_text(g, v, "a1"));
    assert_false(run_text(g, v, "a1234"));
    assert_false(run_text(g, v, "b12"));
    grammar_release(g);
    g = gbnf("root ::= ( [^\\n]+ \"\\n\" ){1,} \"end\" | .{2}");
    assert_true(run_text(g, v, "hi\nthere\nend"));
    assert_true(run_text(g, v, "\xc3\xa9\xe4\xb8\xad"));
    assert_false(run_text(g, v, "\xc3"));
    assert_false(run_text(g, v, "\nend"));
    grammar_release(g);
    g = gbnf("root ::= \"\\u00e9\" [\\x41-\\x43]");
    assert_true(run_text(g, v,
                         "\xc3\xa9"
                         "B"));
    assert_false(run_text(g, v,
                          "\xc3\xa9"
                          "D"));
    grammar_release(g);
    grammar_vocab_free(v);
}

/* A UTF-8 prefix that no continuation byte can complete (past U+10FFFF, overlong, a surrogate)
 * must be refused at the byte that makes it so, also in states that take every non-ASCII code
 * point alike (inside a string): allowing it left the sequence at a dead end, no token allowed. */
static void test_utf8_dead_prefixes(void **state)
{
    (void)state;
    struct grammar_vocab *v = byte_vocab();
    static const char *const grammars[] = {"root ::= \"\\\"\" [^\"]* \"\\\"\"",
                                           "root ::= \"\\\"\" [^\"\\u00e9]* \"\\\"\""};
    static const unsigned char bad[][2] = {{0xF4, 0x90}, {0xF4, 0xBF}, {0xF0, 0x80}, {0xF0, 0x8F},
                                           {0xE0, 0x80}, {0xE0, 0x9F}, {0xED, 0xA0}, {0xED, 0xBF}};
    static const unsigned char good[][2] = {{0xF4, 0x8F}, {0xF0, 0x90}, {0xE0, 0xA0}, {0xED, 0x9F}};
    for (size_t gi = 0; gi < sizeof grammars / sizeof grammars[0]; gi++) {
        struct grammar *g = gbnf(grammars[gi]);
        for (size_t k = 0; k < sizeof bad / sizeof bad[0] + sizeof good / sizeof good[0]; k++) {
            int ok = k >= sizeof bad / sizeof bad[0];
            const unsigned char *b = ok ? good[k - sizeof bad / sizeof bad[0]] : bad[k];
            struct grammar_matcher *m = NULL;
            const uint32_t *mask;
            int32_t n;
            assert_int_equal(grammar_matcher_create(g, v, &m), KRS_OK);
            assert_int_equal(grammar_matcher_accept(m, '"'), KRS_OK);
            assert_int_equal(grammar_matcher_accept(m, b[0]), KRS_OK);
            assert_int_equal(grammar_matcher_mask(m, &mask, &n), KRS_OK);
            assert_int_equal(bit(mask, b[1]), ok);
            assert_int_equal(grammar_matcher_accept(m, b[1]), ok ? KRS_OK : KRS_ERR_INVALID);
            if (ok) { /* and the sequence can be completed */
                assert_int_equal(grammar_matcher_mask(m, &mask, &n), KRS_OK);
                assert_true(n > 0);
            }
            grammar_matcher_free(m);
        }
        grammar_release(g);
    }
    grammar_vocab_free(v);
}

static void test_gbnf_errors(void **state)
{
    (void)state;
    static const struct {
        const char *text, *want;
    } cases[] = {
        {"root ::= foo", "'foo' is not defined"},
        {"root ::= root \"a\" | \"b\"", "left-recursive"},
        {"root ::= a\na ::= b? a \"x\" | \"y\"\nb ::= \"z\"", "left-recursive"},
        {"root ::= \"a\" root", "can never be completed"},
        {"a ::= \"x\"", "no 'root'"},
        {"root ::= \"x", "unterminated"},
        {"root ::= [a-", "unterminated"},
        {"root ::= ( \"x\"", "missing ')'"},
        {"root ::= \"x\"{3,1}", "bad repetition"},
        {"root ::= \"\\q\"", "unknown escape"},
        {"root ::= \"a\"\nroot ::= \"b\"", "defined twice"},
        {"root = \"a\"", "expected '::='"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        struct grammar *g = NULL;
        char err[256] = "";
        int rc = grammar_compile_gbnf(cases[i].text, strlen(cases[i].text), &g, err, sizeof err);
        if (rc != KRS_ERR_INVALID || !strstr(err, cases[i].want))
            fail_msg("case %zu: rc %d err '%s', want '%s'", i, rc, err, cases[i].want);
        assert_null(g);
    }
}

/* ---- JSON Schema corpora ---- */

struct schema_case {
    const char *schema;
    const char *valid[6];
    const char *invalid[8];
};

static const struct schema_case SCHEMA_CASES[] = {
    {"{\"type\":\"object\",\"properties\":{\"name\":{\"type\":\"string\"},\"age\":{\"type\":"
     "\"integer\"}},\"required\":[\"name\"]}",
     {"{\"name\":\"Bo\"}", "{\"name\":\"Bo\",\"age\":42}",
      "{ \"name\": \"\\u00e9\\n\", \"age\": -7 }", "{\"name\":\"\xc3\xa9\"}"},
     {"{}", "{\"age\":1}", "{\"age\":1,\"name\":\"x\"}", "{\"name\":1}", "{\"name\":\"x\",}",
      "{\"name\":\"x\",\"age\":1.5}", "{\"name\":\"x\",\"other\":1}", "{\"name\":\"\\ud800\"}"}},
    {"{\"type\":\"array\",\"items\":{\"type\":\"boolean\"},\"minItems\":1,\"maxItems\":3}",
     {"[true]", "[true,false,true]", "[ true , false ]"},
     {"[]", "[true,true,true,true]", "[1]", "[true,]"}},
    {"{\"enum\":[\"red\",\"green\",null,3]}",
     {"\"red\"", "null", "3"},
     {"\"blue\"", "\"re\"", "4"}},
    {"{\"const\":{\"a\":[1,2]}}", {"{\"a\":[1,2]}"}, {"{\"a\":[1]}", "{\"a\": [1,2]}"}},
    {"{\"anyOf\":[{\"type\":\"integer\"},{\"type\":\"string\",\"maxLength\":2}]}",
     {"12", "\"ab\"", "\"\""},
     {"\"abc\"", "1.5", "true"}},
    {"{\"type\":\"integer\",\"minimum\":-15,\"maximum\":120}",
     {"-15", "0", "7", "99", "120", "-9"},
     {"-16", "121", "200", "-100", "007", "1000"}},
    {"{\"type\":\"integer\",\"exclusiveMinimum\":10}",
     {"11", "99", "12345"},
     {"10", "9", "-1", "0"}},
    {"{\"type\":\"number\",\"minimum\":0,\"maximum\":1}",
     {"0", "0.5", "1", "1.000", "0.999"},
     {"-0.1", "1.5", "1.01", "2"}},
    {"{\"type\":\"number\",\"minimum\":-2,\"maximum\":-1}",
     {"-1", "-1.5", "-2", "-2.0"},
     {"-0.5", "-2.5", "0", "1"}},
    {"{\"type\":\"string\",\"minLength\":2,\"maxLength\":3}",
     {"\"ab\"", "\"\\n\\t\"", "\"\xc3\xa9\xc3\xa9\xc3\xa9\""},
     {"\"a\"", "\"abcd\""}},
    {"{\"type\":\"string\",\"format\":\"date-time\"}",
     {"\"2024-02-28T12:30:00Z\"", "\"1999-12-31T23:59:59.123+01:00\"",
      "\"2000-01-31T00:00:00-05:30\""},
     {"\"2024-13-01T00:00:00Z\"", "\"2024-02-29\"", "\"2024-02-29T00:00:00Z\"",
      "\"2024-04-31T00:00:00Z\"", "\"0999-01-01T00:00:00Z\""}},
    {"{\"type\":\"string\",\"format\":\"uuid\"}",
     {"\"123e4567-e89b-12d3-a456-426614174000\""},
     {"\"123e4567e89b12d3a456426614174000\""}},
    {"{\"$defs\":{\"node\":{\"type\":\"object\",\"properties\":{\"v\":{\"type\":\"integer\"},"
     "\"next\":{\"anyOf\":[{\"$ref\":\"#/$defs/node\"},{\"type\":\"null\"}]}},\"required\":[\"v\","
     "\"next\"]}},\"$ref\":\"#/$defs/node\"}",
     {"{\"v\":1,\"next\":null}", "{\"v\":1,\"next\":{\"v\":2,\"next\":null}}"},
     {"{\"v\":1}", "{\"v\":1,\"next\":{}}"}},
    {"{\"type\":\"array\",\"prefixItems\":[{\"type\":\"string\"},{\"type\":\"integer\"}],"
     "\"items\":false}",
     {"[\"a\",1]", "[\"a\"]", "[]"},
     {"[1]", "[\"a\",1,2]"}},
    {"{\"type\":[\"string\",\"null\"]}", {"\"x\"", "null"}, {"1", "{}"}},
    {"{\"type\":\"string\",\"pattern\":\"^[a-z]{2,4}-\\\\d+$\"}",
     {"\"ab-1\"", "\"abcd-123\""},
     {"\"a-1\"", "\"ab-\"", "\"AB-1\"", "\"abcde-1\"", "\"ab-1x\""}},
    {"{\"type\":\"string\",\"pattern\":\"^(cat|dog)s?$\"}",
     {"\"cat\"", "\"dogs\""},
     {"\"cow\"", "\"cats!\"", "\"\""}},
    {"{\"type\":\"string\",\"pattern\":\"x\\\\.y\"}",
     {"\"aax.ybb\"", "\"x.y\""},
     {"\"xzy\"", "\"x\""}},
    {"{\"type\":\"string\",\"pattern\":\"^a\\\"[^b]$\"}",
     {"\"a\\\"c\""},
     {"\"a\\\"b\"", "\"a\\\"\\\"\""}},
    {"{\"type\":\"object\",\"additionalProperties\":{\"type\":\"integer\"}}",
     {"{}", "{\"a\":1,\"b\":2}"},
     {"{\"a\":\"x\"}"}},
    {NULL, {"{}", "{\"a\":[1,{\"b\":null}],\"c\":\"d\"}", "{\n  \"a\": true\n}"}, {"[]", "1", "{"}},
};

static void test_schema_corpus(void **state)
{
    (void)state;
    struct grammar_vocab *v = byte_vocab();
    for (size_t i = 0; i < sizeof SCHEMA_CASES / sizeof SCHEMA_CASES[0]; i++) {
        const struct schema_case *c = &SCHEMA_CASES[i];
        struct grammar *g = NULL;
        char err[256];
        int rc = grammar_compile_json_schema(c->schema, c->schema ? strlen(c->schema) : 0, &g, err,
                                             sizeof err);
        if (rc) fail_msg("schema %zu: %s", i, err);
        for (int k = 0; k < 6 && c->valid[k]; k++)
            if (!run_text(g, v, c->valid[k]))
                fail_msg("schema %zu rejects %s\n%s", i, c->valid[k], g->text);
        for (int k = 0; k < 8 && c->invalid[k]; k++)
            if (run_text(g, v, c->invalid[k])) fail_msg("schema %zu accepts %s", i, c->invalid[k]);
        grammar_release(g);
    }
    grammar_vocab_free(v);
}

static void test_schema_unsupported(void **state)
{
    (void)state;
    static const struct {
        const char *schema, *want;
        int rc;
    } cases[] = {
        {"{\"type\":\"string\",\"pattern\":\"^(?=a)\"}", "lookarounds", KRS_ERR_UNSUPPORTED},
        {"{\"type\":\"string\",\"pattern\":\"(a)\\\\1\"}", "backreferences", KRS_ERR_UNSUPPORTED},
        {"{\"type\":\"string\",\"pattern\":\"a^b\"}", "anchors", KRS_ERR_UNSUPPORTED},
        {"{\"type\":\"string\",\"pattern\":\"a\",\"maxLength\":3}", "'pattern' together",
         KRS_ERR_UNSUPPORTED},
        {"{\"allOf\":[{\"type\":\"string\"}]}", "'allOf'", KRS_ERR_UNSUPPORTED},
        {"{\"oneOf\":[{\"type\":\"string\"}]}", "'oneOf'", KRS_ERR_UNSUPPORTED},
        {"{\"type\":\"array\",\"uniqueItems\":true}", "'uniqueItems'", KRS_ERR_UNSUPPORTED},
        {"{\"type\":\"object\",\"minProperties\":1}", "'minProperties'", KRS_ERR_UNSUPPORTED},
        {"{\"type\":\"number\",\"multipleOf\":2}", "'multipleOf'", KRS_ERR_UNSUPPORTED},
        {"{\"type\":\"number\",\"minimum\":0.5}", "'minimum'", KRS_ERR_UNSUPPORTED},
        {"{\"type\":\"string\",\"format\":\"email\"}", "'email'", KRS_ERR_UNSUPPORTED},
        {"{\"$ref\":\"https://x/y\"}", "$ref", KRS_ERR_UNSUPPORTED},
        {"{\"not\":{}}", "'not'", KRS_ERR_UNSUPPORTED},
        {"{\"type\":\"strin\"}", "unknown JSON Schema type", KRS_ERR_INVALID},
        {"{\"type\":\"integer\",\"minimum\":5,\"maximum\":1}", "minimum is above", KRS_ERR_INVALID},
        {"[1", "not valid JSON", KRS_ERR_INVALID},
        {"{\"type\":\"object\",\"properties\":{},\"required\":[\"a\"]}", "'a'",
         KRS_ERR_UNSUPPORTED},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        struct grammar *g = NULL;
        char err[256] = "";
        int rc = grammar_compile_json_schema(cases[i].schema, strlen(cases[i].schema), &g, err,
                                             sizeof err);
        if (rc != cases[i].rc || !strstr(err, cases[i].want))
            fail_msg("case %zu: rc %d err '%s', want '%s'", i, rc, err, cases[i].want);
        assert_null(g);
    }
}

/* ---- the mask cache: every mask handed out equals a fresh computation ---- */

static uint32_t xrnd(uint64_t *x)
{
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    return (uint32_t)(*x >> 32);
}

struct sbuf {
    char s[8192];
    size_t n;
};

static void sb_add(struct sbuf *b, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int k = vsnprintf(b->s + b->n, sizeof b->s - b->n, fmt, ap);
    va_end(ap);
    if (k > 0) b->n += (size_t)k < sizeof b->s - b->n ? (size_t)k : sizeof b->s - b->n - 1;
}

/* A random schema of the supported subset, with counters large and small (maxLength and
 * maxItems up to 40: on either side of the vocabulary's longest token). */
static void gen_schema(struct sbuf *b, uint64_t *x, int depth)
{
    static const char *const words[] = {"a", "bc", "red", "x y", "\\u00e9t\u00e9"};
    static const char *const simple[] = {"{\"type\":\"boolean\"}", "{\"type\":\"number\"}",
                                         "{\"type\":\"null\"}"};
    int kind = (int)(xrnd(x) % (depth > 2 ? 4 : 7));
    switch (kind) {
    case 0: {
        int lo = (int)(xrnd(x) % 4), hi = lo + (int)(xrnd(x) % 40);
        if (xrnd(x) & 1)
            sb_add(b, "{\"type\":\"string\",\"minLength\":%d,\"maxLength\":%d}", lo, hi);
        else
            sb_add(b, "{\"type\":\"string\"}");
        break;
    }
    case 1:
        if (xrnd(x) & 1)
            sb_add(b, "{\"type\":\"integer\",\"minimum\":%d,\"maximum\":%d}", -(int)(xrnd(x) % 50),
                   (int)(xrnd(x) % 2000));
        else
            sb_add(b, "{\"type\":\"integer\"}");
        break;
    case 2:
        sb_add(b, "%s", simple[xrnd(x) % 3]);
        break;
    case 3: {
        sb_add(b, "{\"enum\":[");
        int n = 1 + (int)(xrnd(x) % 4);
        for (int i = 0; i < n; i++)
            sb_add(b, "%s\"%s\"", i ? "," : "", words[xrnd(x) % (sizeof words / sizeof *words)]);
        sb_add(b, "]}");
        break;
    }
    case 4: {
        int lo = (int)(xrnd(x) % 3), hi = lo + (int)(xrnd(x) % 38);
        sb_add(b, "{\"type\":\"array\",\"minItems\":%d,\"maxItems\":%d,\"items\":", lo, hi);
        gen_schema(b, x, depth + 1);
        sb_add(b, "}");
        break;
    }
    case 5: {
        int n = 1 + (int)(xrnd(x) % 3);
        sb_add(b, "{\"type\":\"object\",\"properties\":{");
        for (int i = 0; i < n; i++) {
            sb_add(b, "%s\"p%d\":", i ? "," : "", i);
            gen_schema(b, x, depth + 1);
        }
        sb_add(b, "},\"required\":[");
        for (int i = 0, first = 1; i < n; i++)
            if (xrnd(x) & 1) {
                sb_add(b, "%s\"p%d\"", first ? "" : ",", i);
                first = 0;
            }
        sb_add(b, "]}");
        break;
    }
    default:
        sb_add(b, "{\"anyOf\":[");
        gen_schema(b, x, depth + 1);
        sb_add(b, ",");
        gen_schema(b, x, depth + 1);
        sb_add(b, "]}");
    }
}

/* Walks matcher m `steps` tokens at random (favouring the end past half), checking each mask
 * it hands out against grammar_matcher_mask_fresh: byte-identical, the same count. */
static void walk_checked(struct grammar_matcher *m, const struct grammar_vocab *v, uint64_t *x,
                         int steps, uint32_t *fresh, int32_t *allowed)
{
    for (int step = 0; step < steps; step++) {
        const uint32_t *mask;
        int32_t n = 0, nf = -1, k = 0, eog = -1;
        assert_int_equal(grammar_matcher_mask(m, &mask, &n), KRS_OK);
        assert_int_equal(grammar_matcher_mask_fresh(m, fresh, &nf), KRS_OK);
        assert_int_equal(n, nf);
        assert_memory_equal(mask, fresh, (size_t)v->n_words * sizeof *mask);
        for (int32_t t = 0; t < v->n_vocab; t++)
            if (bit(mask, t)) {
                allowed[k++] = t;
                if (v->eog[t]) eog = t;
            }
        assert_int_equal(k, n);
        if (!k) return;
        int32_t t = allowed[xrnd(x) % (uint32_t)k];
        if (step > steps / 2 && eog >= 0) t = eog;
        assert_int_equal(grammar_matcher_accept(m, t), KRS_OK);
        if (v->eog[t] || grammar_matcher_done(m)) return;
    }
}

/* Random schemas over random vocabularies (bytes plus JSON-ish words up to 12 bytes, so the
 * longest token sits inside the schemas' counters). Per seed, three matchers share the
 * vocabulary's mask cache, two on one compiled grammar and one on a second compile of the same
 * text; the cache also carries masks from earlier seeds' grammars (which must never match). */
static void test_mask_cache_random(void **state)
{
    (void)state;
    static const char alpha[] = "{}[]\":, 0123456789abcdeftrunl-.\\";
    uint64_t x = 0x9E3779B97F4A7C15ull;
    struct grammar_matcher_stats total = {0};
    char words[96][16];
    const char *multi[96];
    for (int vv = 0; vv < 3; vv++) {
        for (int i = 0; i < 96; i++) {
            int len = 2 + (int)(xrnd(&x) % (vv == 0 ? 4 : 11));
            for (int j = 0; j < len; j++) words[i][j] = alpha[xrnd(&x) % (sizeof alpha - 1)];
            words[i][len] = '\0';
            multi[i] = words[i];
        }
        struct grammar_vocab *v = NULL;
        assert_int_equal(grammar_vocab_create_bytes(multi, 96, &v), KRS_OK);
        uint32_t *fresh = malloc((size_t)v->n_words * sizeof *fresh);
        int32_t *allowed = malloc((size_t)v->n_vocab * sizeof *allowed);
        assert_non_null(fresh);
        assert_non_null(allowed);
        for (int seed = 0; seed < 60; seed++) {
            struct sbuf b = {.n = 0};
            gen_schema(&b, &x, 0);
            struct grammar *g[2] = {NULL, NULL};
            char err[256];
            for (int i = 0; i < 2; i++)
                if (grammar_compile_json_schema(b.s, b.n, &g[i], err, sizeof err))
                    fail_msg("%s: %s", b.s, err);
            struct grammar_matcher *m[3];
            for (int i = 0; i < 3; i++)
                assert_int_equal(grammar_matcher_create(g[i == 2], v, &m[i]), KRS_OK);
            for (int i = 0; i < 3; i++) {
                walk_checked(m[i], v, &x, 120, fresh, allowed);
                struct grammar_matcher_stats st;
                grammar_matcher_get_stats(m[i], &st);
                total.masks += st.masks;
                total.mask_hits += st.mask_hits;
                total.mask_shared += st.mask_shared;
                total.mask_keys += st.mask_keys;
                total.states += st.states;
                grammar_matcher_free(m[i]);
            }
            grammar_release(g[0]);
            grammar_release(g[1]);
        }
        free(fresh);
        free(allowed);
        grammar_vocab_free(v);
    }
    /* the caches were exercised: local hits, shared hits, and fewer keys than states */
    print_message("mask cache: %llu masks, %llu local hits, %llu shared, %llu keys, %llu states\n",
                  (unsigned long long)total.masks, (unsigned long long)total.mask_hits,
                  (unsigned long long)total.mask_shared, (unsigned long long)total.mask_keys,
                  (unsigned long long)total.states);
    assert_true(total.mask_hits > total.masks / 10);
    assert_true(total.mask_shared > total.masks / 10);
    assert_true(total.mask_keys < total.states);
}

/* A string's counter far from maxLength: the states differ, the mask key does not. In the byte
 * vocabulary below every token but "ab" touches one terminal at most, so "ab" is the one long
 * token (checked at each call) and keys reach 1 code point: positions 0..9 of a {0,10} string
 * share one key and one cached mask, the bound gets its own; "ab" is allowed while 2 letters
 * are left. */
static void test_mask_key_counter(void **state)
{
    (void)state;
    static const char *const multi[] = {"ab"};
    struct grammar_vocab *v = NULL;
    assert_int_equal(grammar_vocab_create_bytes(multi, 1, &v), KRS_OK);
    assert_int_equal(v->max_lead, 2);
    assert_int_equal(v->key_lead, 1); /* "ab" is the one long token */
    assert_int_equal(v->n_long, 1);
    struct grammar *g = gbnf("root ::= \"\\\"\" [a-z]{0,10} \"\\\"\"");
    struct grammar_matcher *m = NULL;
    assert_int_equal(grammar_matcher_create(g, v, &m), KRS_OK);
    grammar_matcher_set_key_mode(m, 1); /* this matcher's own cache only */
    const uint32_t *mask;
    int32_t n;
    assert_int_equal(grammar_matcher_accept(m, '"'), KRS_OK);
    for (int i = 0; i < 10; i++) {
        assert_int_equal(grammar_matcher_mask(m, &mask, &n), KRS_OK);
        assert_int_equal(bit(mask, '"'), 1);
        assert_int_equal(bit(mask, 257), i <= 8); /* "ab" fits while 2 letters are left */
        assert_int_equal(bit(mask, 'a'), 1);
        assert_int_equal(grammar_matcher_accept(m, 'a'), KRS_OK);
    }
    assert_int_equal(grammar_matcher_mask(m, &mask, &n), KRS_OK);
    assert_int_equal(bit(mask, 'a'), 0);
    struct grammar_matcher_stats st;
    grammar_matcher_get_stats(m, &st);
    /* 11 masks inside the string: remaining 10..1 share a key (>= key_lead), then 0; "ab" is
     * checked at each call */
    assert_int_equal(st.masks, 11);
    assert_int_equal(st.mask_hits, 9);
    assert_int_equal(st.mask_same, 9);
    grammar_matcher_free(m);
    grammar_release(g);
    grammar_vocab_free(v);
}

/* ---- the default model's vocabulary ---- */

struct model_fx {
    struct gguf_file *f;
    struct tokenizer *tok;
    struct grammar_vocab *v;
};

static int setup_model(void **state)
{
    static struct model_fx fx;
    char path[1024], err[256];
    const char *src = getenv("KRS_SOURCE_DIR");
    snprintf(path, sizeof path, "%s/models/default.gguf", src ? src : ".");
    memset(&fx, 0, sizeof fx);
    if (gguf_open(path, &fx.f, err, sizeof err) == KRS_OK &&
        tokenizer_load(fx.f, &fx.tok, err, sizeof err) == KRS_OK)
        assert_int_equal(grammar_vocab_create(fx.tok, &fx.v), KRS_OK);
    *state = &fx;
    return 0;
}

static int teardown_model(void **state)
{
    struct model_fx *fx = *state;
    grammar_vocab_free(fx->v);
    tokenizer_free(fx->tok);
    if (fx->f) gguf_close(fx->f);
    return 0;
}

static uint64_t rng = 0x2545F4914F6CDD1Dull;
static uint32_t rnd(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (uint32_t)(rng >> 32);
}

/* Random walks: pick uniformly among the allowed tokens (preferring to finish after a while),
 * check a disallowed token is refused, and parse the result. */
static void walk(struct model_fx *fx, struct grammar *g, int n_walks, int max_tokens)
{
    int32_t n_vocab = grammar_vocab_size(fx->v);
    int32_t *allowed = malloc((size_t)n_vocab * sizeof *allowed);
    char *text = malloc(1 << 16);
    assert_non_null(allowed);
    for (int w = 0; w < n_walks; w++) {
        struct grammar_matcher *m = NULL;
        assert_int_equal(grammar_matcher_create(g, fx->v, &m), KRS_OK);
        size_t n_text = 0;
        int done = 0;
        for (int step = 0; step < max_tokens && !done; step++) {
            const uint32_t *mask;
            int32_t n = 0, k = 0;
            assert_int_equal(grammar_matcher_mask(m, &mask, &n), KRS_OK);
            assert_true(n > 0);
            int32_t eog = -1, bad = -1;
            for (int32_t t = 0; t < n_vocab; t++) {
                if (bit(mask, t)) {
                    allowed[k++] = t;
                    if (fx->v->eog[t]) eog = t;
                } else if (bad < 0 && fx->v->tok_len[t] && (rnd() & 1023) == 0) {
                    bad = t;
                }
            }
            assert_int_equal(k, n);
            if (bad >= 0) assert_int_equal(grammar_matcher_accept(m, bad), KRS_ERR_INVALID);
            /* past half the budget, favour short tokens and the end so walks finish */
            int32_t t = allowed[rnd() % (uint32_t)k];
            if (step > max_tokens / 2) {
                if (eog >= 0) t = eog;
                for (int tries = 0; tries < 64 && fx->v->tok_len[t] > 1 && eog < 0; tries++)
                    t = allowed[rnd() % (uint32_t)k];
            }
            assert_int_equal(grammar_matcher_accept(m, t), KRS_OK);
            if (fx->v->eog[t]) break;
            memcpy(text + n_text, fx->v->bytes + fx->v->tok_off[t], fx->v->tok_len[t]);
            n_text += fx->v->tok_len[t];
            done = grammar_matcher_done(m);
        }
        text[n_text] = '\0';
        if (grammar_matcher_accepting(m) || grammar_matcher_done(m)) {
            cJSON *j = cJSON_Parse(text);
            if (!j) fail_msg("walk %d produced unparseable text: %s", w, text);
            cJSON_Delete(j);
        }
        grammar_matcher_free(m);
    }
    free(allowed);
    free(text);
}

static void test_model_walks(void **state)
{
    struct model_fx *fx = *state;
    if (!fx->v) skip();
    struct grammar *g = NULL;
    char err[256];
    const char *schema =
        "{\"type\":\"object\",\"properties\":{\"name\":{\"type\":\"string\",\"maxLength\":12},"
        "\"tags\":{\"type\":\"array\",\"items\":{\"enum\":[\"a\",\"b\"]},\"maxItems\":3},"
        "\"n\":{\"type\":\"integer\",\"minimum\":0,\"maximum\":999},\"ok\":{\"type\":\"boolean\"}},"
        "\"required\":[\"name\",\"n\"]}";
    assert_int_equal(grammar_compile_json_schema(schema, strlen(schema), &g, err, sizeof err),
                     KRS_OK);
    walk(fx, g, 20, 200);
    grammar_release(g);
    assert_int_equal(grammar_compile_json_schema(NULL, 0, &g, err, sizeof err), KRS_OK);
    walk(fx, g, 10, 60);
    grammar_release(g);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_gbnf_basics),
        cmocka_unit_test(test_utf8_dead_prefixes),
        cmocka_unit_test(test_gbnf_errors),
        cmocka_unit_test(test_schema_corpus),
        cmocka_unit_test(test_schema_unsupported),
        cmocka_unit_test(test_mask_cache_random),
        cmocka_unit_test(test_mask_key_counter),
        cmocka_unit_test_setup_teardown(test_model_walks, setup_model, teardown_model),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
