/* libFuzzer target: arbitrary bytes as a grammar and a text. The first byte picks GBNF or JSON
 * Schema; the rest is split at the first NUL into the grammar source and a text fed to a
 * matcher over a byte vocabulary (token b = byte b, token 256 = end of generation, plus a few
 * multi-byte tokens). Checks that compiling never crashes or leaks, that errors say why, and
 * that every mask bit agrees with accepting that token. */
#include "grammar/grammar.h"
#include "grammar/grammar_impl.h"
#include "krserve.h"

#include <assert.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

static const struct grammar_vocab *vocab(void)
{
    static struct grammar_vocab *v;
    static const char *const multi[] = {"{\"", "\":", "true", "\xc3\xa9", "\xe4\xb8"};
    if (!v) {
        int rc = grammar_vocab_create_bytes(multi, sizeof multi / sizeof multi[0], &v);
        assert(rc == KRS_OK);
    }
    return v;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1) return 0;
    const char *src = (const char *)data + 1;
    size_t n = size - 1;
    const char *nul = memchr(src, 0, n);
    size_t glen = nul ? (size_t)(nul - src) : n;
    const uint8_t *txt = nul ? (const uint8_t *)nul + 1 : NULL;
    size_t tlen = nul ? n - glen - 1 : 0;
    struct grammar *g = NULL;
    char err[256] = "";
    int rc = data[0] & 1 ? grammar_compile_json_schema(src, glen, &g, err, sizeof err)
                         : grammar_compile_gbnf(src, glen, &g, err, sizeof err);
    if (rc) {
        assert(!g && err[0]);
        return 0;
    }
    const struct grammar_vocab *v = vocab();
    struct grammar_matcher *m = NULL;
    if (grammar_matcher_create(g, v, &m) == KRS_OK) {
        for (size_t i = 0; i < tlen && i < 256; i++) {
            const uint32_t *mask;
            int32_t allowed;
            if (grammar_matcher_mask(m, &mask, &allowed)) break;
            int32_t t = txt[i];
            int bit = (int)(mask[t >> 5] >> (t & 31) & 1);
            int ok = grammar_matcher_accept(m, t) == KRS_OK;
            assert(bit == ok);
            if (!ok) break;
        }
        grammar_matcher_free(m);
    }
    grammar_release(g);
    return 0;
}
