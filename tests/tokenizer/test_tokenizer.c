/* tokenizer/: properties that need no external oracle (the Hugging Face comparisons live in
 * test_tokenizer_py.py):
 *   - streaming detokenization == whole-sequence decode, for random id sequences rich in byte
 *     tokens and multi-byte characters split across tokens; never half a UTF-8 sequence emitted
 *     while more bytes could complete it;
 *   - decode(encode(x)) == x for random bytes (invalid UTF-8 included) and parse_special off;
 *   - KRS_ERR_FULL sizing, special ids, EOG set by text, special-token gating, chat errors;
 *   - a tiny in-memory GGUF vocabulary (SPM with add_space_prefix, and byte-level BPE) so the
 *     module is exercised even without the default model;
 *   - no leak: allocation counters return to where they started. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gguf/gguf.h"
#include "krserve.h"
#include "tokenizer/tokenizer.h"
#include "util/alloc.h"

/* ---- tiny GGUF writer (in memory) ---------------------------------------------------------- */

struct gw {
    uint8_t *p;
    size_t n, cap;
    uint64_t n_kv;
};

static void gw_bytes(struct gw *w, const void *s, size_t n)
{
    if (w->n + n > w->cap) {
        w->cap = (w->n + n) * 2 + 64;
        w->p = realloc(w->p, w->cap);
        assert_non_null(w->p);
    }
    memcpy(w->p + w->n, s, n);
    w->n += n;
}
static void gw_u32(struct gw *w, uint32_t v)
{
    gw_bytes(w, &v, 4);
}
static void gw_u64(struct gw *w, uint64_t v)
{
    gw_bytes(w, &v, 8);
}
static void gw_str(struct gw *w, const char *s)
{
    gw_u64(w, strlen(s));
    gw_bytes(w, s, strlen(s));
}
static void kv_str(struct gw *w, const char *k, const char *v)
{
    gw_str(w, k), gw_u32(w, GGUF_TYPE_STRING), gw_str(w, v), w->n_kv++;
}
static void kv_u32(struct gw *w, const char *k, uint32_t v)
{
    gw_str(w, k), gw_u32(w, GGUF_TYPE_UINT32), gw_u32(w, v), w->n_kv++;
}
static void kv_bool(struct gw *w, const char *k, int v)
{
    uint8_t b = (uint8_t)v;
    gw_str(w, k), gw_u32(w, GGUF_TYPE_BOOL), gw_bytes(w, &b, 1), w->n_kv++;
}
static void kv_strs(struct gw *w, const char *k, const char *const *v, size_t n)
{
    gw_str(w, k), gw_u32(w, GGUF_TYPE_ARRAY), gw_u32(w, GGUF_TYPE_STRING), gw_u64(w, n);
    for (size_t i = 0; i < n; i++) gw_str(w, v[i]);
    w->n_kv++;
}
static void kv_arr(struct gw *w, const char *k, uint32_t type, const void *v, size_t n)
{
    gw_str(w, k), gw_u32(w, GGUF_TYPE_ARRAY), gw_u32(w, type), gw_u64(w, n);
    gw_bytes(w, v, 4 * n);
    w->n_kv++;
}
/* Header goes in front once all kvs are written. */
static uint8_t *gw_finish(struct gw *w, size_t *size)
{
    struct gw h = {0};
    gw_bytes(&h, "GGUF", 4);
    gw_u32(&h, 3);
    gw_u64(&h, 0);
    gw_u64(&h, w->n_kv);
    gw_bytes(&h, w->p, w->n);
    free(w->p);
    *size = h.n;
    return h.p;
}

/* SPM vocab: specials, bytes, a few pieces with scores. */
static uint8_t *tiny_spm(size_t *size)
{
    static const char *extra[] = {"\xE2\x96\x81",
                                  "a",
                                  "b",
                                  "\xE2\x96\x81"
                                  "a",
                                  "ab",
                                  "\xE2\x96\x81"
                                  "ab",
                                  "<start_of_turn>",
                                  "\n\n"};
    static const float extra_score[] = {-1, -2, -3, -4, -5, -0.5f, 0, 0};
    static const int32_t extra_type[] = {1, 1, 1, 1, 1, 1, 3, 4};
    const char *tokens[3 + 256 + 8];
    char bytes[256][8];
    float scores[3 + 256 + 8] = {0};
    int32_t types[3 + 256 + 8];
    tokens[0] = "<unk>", tokens[1] = "<s>", tokens[2] = "</s>";
    types[0] = 2, types[1] = 3, types[2] = 3;
    for (int i = 0; i < 256; i++) {
        snprintf(bytes[i], sizeof bytes[i], "<0x%02X>", i);
        tokens[3 + i] = bytes[i];
        types[3 + i] = 6;
    }
    for (int i = 0; i < 8; i++) {
        tokens[259 + i] = extra[i];
        scores[259 + i] = extra_score[i];
        types[259 + i] = extra_type[i];
    }
    struct gw w = {0};
    kv_str(&w, "general.architecture", "llama");
    kv_str(&w, "tokenizer.ggml.model", "llama");
    kv_strs(&w, "tokenizer.ggml.tokens", tokens, 267);
    kv_arr(&w, "tokenizer.ggml.scores", GGUF_TYPE_FLOAT32, scores, 267);
    kv_arr(&w, "tokenizer.ggml.token_type", GGUF_TYPE_INT32, types, 267);
    kv_u32(&w, "tokenizer.ggml.bos_token_id", 1);
    kv_u32(&w, "tokenizer.ggml.eos_token_id", 2);
    kv_bool(&w, "tokenizer.ggml.add_space_prefix", 1);
    return gw_finish(&w, size);
}

struct fixture {
    struct gguf_file *f;
    struct tokenizer *tok;
    uint8_t *mem;
    struct alloc_stats before;
};

static struct tokenizer *load_default(void)
{
    char path[4096];
    const char *src = getenv("KRS_SOURCE_DIR");
    snprintf(path, sizeof path, "%s/models/default.gguf", src ? src : ".");
    struct gguf_file *f;
    char err[256];
    if (gguf_open(path, &f, err, sizeof err) != KRS_OK) return NULL;
    struct tokenizer *tok = NULL;
    int rc = tokenizer_load(f, &tok, err, sizeof err);
    gguf_close(f); /* the tokenizer must not need the file any more */
    assert_int_equal(rc, KRS_OK);
    return tok;
}

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static uint32_t rnd(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (uint32_t)(rng_state >> 11);
}

static void check_stream_equals_decode(const struct tokenizer *tok, const int32_t *ids, size_t n,
                                       int render)
{
    size_t need;
    int rc = tokenizer_decode(tok, ids, n, render, NULL, 0, &need);
    assert_true(rc == KRS_OK || rc == KRS_ERR_FULL);
    char *full = malloc(need + 1);
    assert_int_equal(tokenizer_decode(tok, ids, n, render, full, need + 1, &need), KRS_OK);
    char *stream = malloc(need + 8);
    size_t cap = tokenizer_max_piece(tok) + 4, got = 0, m;
    char *buf = malloc(cap);
    struct detok_state st;
    tokenizer_detok_init(&st, render);
    for (size_t i = 0; i < n; i++) {
        assert_int_equal(tokenizer_detok_push(tok, &st, ids[i], buf, cap, &m), KRS_OK);
        assert_true(got + m <= need);
        memcpy(stream + got, buf, m);
        got += m;
        assert_true(st.n_pending <= 3);
    }
    assert_int_equal(tokenizer_detok_flush(&st, buf, cap, &m), KRS_OK);
    memcpy(stream + got, buf, m);
    got += m;
    assert_int_equal(got, need);
    assert_memory_equal(stream, full, need);
    free(full);
    free(stream);
    free(buf);
}

static int setup_default(void **state)
{
    struct fixture *fx = calloc(1, sizeof *fx);
    alloc_get_stats(&fx->before);
    fx->tok = load_default();
    *state = fx;
    return 0;
}

static int teardown(void **state)
{
    struct fixture *fx = *state;
    tokenizer_free(fx->tok);
    if (fx->f) gguf_close(fx->f);
    free(fx->mem);
    struct alloc_stats after;
    alloc_get_stats(&after);
    assert_int_equal(after.blocks_in_use, fx->before.blocks_in_use);
    free(fx);
    return 0;
}

static void test_default_specials(void **state)
{
    struct fixture *fx = *state;
    if (!fx->tok) skip();
    const struct tokenizer *tok = fx->tok;
    assert_int_equal(tokenizer_n_vocab(tok), 262144);
    assert_int_equal(tokenizer_bos(tok), 2);
    assert_int_equal(tokenizer_eos(tok), 1);
    int32_t eot = tokenizer_find(tok, "<end_of_turn>", 13);
    assert_true(eot > 0);
    assert_true(tokenizer_is_eog(tok, eot));
    assert_true(tokenizer_is_eog(tok, 1));
    assert_false(tokenizer_is_eog(tok, 2));
    assert_false(tokenizer_is_eog(tok, tokenizer_find(tok, "<start_of_turn>", 15)));

    const char *text = "<start_of_turn>user\nHi<end_of_turn>";
    int32_t ids[64];
    size_t n;
    assert_int_equal(tokenizer_encode(tok, text, strlen(text), 1, 1, ids, 64, &n), KRS_OK);
    assert_int_equal(ids[0], 2);
    assert_int_equal(ids[1], tokenizer_find(tok, "<start_of_turn>", 15));
    assert_int_equal(ids[n - 1], eot);
    assert_int_equal(tokenizer_encode(tok, text, strlen(text), 0, 0, ids, 64, &n), KRS_OK);
    for (size_t i = 0; i < n; i++) assert_int_not_equal(tokenizer_token_type(tok, ids[i]), 3);

    /* KRS_ERR_FULL reports the size needed, and the same ids come back with room. */
    size_t need;
    assert_int_equal(tokenizer_encode(tok, text, strlen(text), 1, 1, ids, 2, &need), KRS_ERR_FULL);
    assert_true(need > 2);
    assert_int_equal(tokenizer_encode(tok, text, strlen(text), 1, 1, NULL, 0, &need), KRS_ERR_FULL);
    assert_int_equal(tokenizer_encode(tok, "", 0, 1, 0, ids, 64, &n), KRS_OK);
    assert_int_equal(n, 1);

    /* rendered specials only on request */
    char buf[64];
    assert_int_equal(tokenizer_decode(tok, ids, 1, 0, buf, sizeof buf, &n), KRS_OK);
    assert_int_equal(n, 0);
    assert_int_equal(tokenizer_decode(tok, ids, 1, 1, buf, sizeof buf, &n), KRS_OK);
    assert_int_equal(n, 5);
    assert_memory_equal(buf, "<bos>", 5);
}

static void test_default_roundtrip_random_bytes(void **state)
{
    struct fixture *fx = *state;
    if (!fx->tok) skip();
    static const char *pieces[] = {" ",   "  ", "\n",   "\t",       "a",
                                   "the", "é",  "世界", "🙂",     "<start_of_turn>",
                                   "<b>", "x",  "\xff", "\xe4\xb8", "\x80"};
    int32_t *ids = malloc(sizeof *ids * 4096);
    char text[1024], out[4096];
    for (int iter = 0; iter < 300; iter++) {
        size_t len = 0;
        while (len < 200) {
            const char *p = pieces[rnd() % (sizeof pieces / sizeof *pieces)];
            if (rnd() % 4 == 0) {
                text[len++] = (char)(rnd() & 0xff);
            } else {
                memcpy(text + len, p, strlen(p));
                len += strlen(p);
            }
        }
        if (memmem(text, len, "\xE2\x96\x81", 3)) continue; /* literal U+2581: see header */
        size_t n, m;
        assert_int_equal(tokenizer_encode(fx->tok, text, len, 0, 0, ids, 4096, &n), KRS_OK);
        assert_int_equal(tokenizer_decode(fx->tok, ids, n, 0, out, sizeof out, &m), KRS_OK);
        assert_int_equal(m, len);
        assert_memory_equal(out, text, len);
        check_stream_equals_decode(fx->tok, ids, n, 0);
    }
    free(ids);
}

static void test_default_stream_random_ids(void **state)
{
    struct fixture *fx = *state;
    if (!fx->tok) skip();
    const struct tokenizer *tok = fx->tok;
    int32_t byte0 = tokenizer_find(tok, "<0x00>", 6);
    assert_true(byte0 > 0);
    int32_t ids[256];
    for (int iter = 0; iter < 500; iter++) {
        size_t n = 1 + rnd() % 200, i = 0;
        while (i < n) {
            uint32_t r = rnd() % 10;
            if (r < 4) { /* a valid multi-byte character spelled as byte tokens */
                static const char *chars[] = {"é", "世", "🙂", "\xf0\x9f\x91\x8d"};
                const char *c = chars[rnd() % 4];
                for (size_t k = 0; c[k] && i < n; k++) ids[i++] = byte0 + (uint8_t)c[k];
            } else if (r < 6) {
                ids[i++] = byte0 + (int32_t)(rnd() % 256); /* any byte, valid or not */
            } else {
                ids[i++] = (int32_t)(rnd() % tokenizer_n_vocab(tok));
            }
        }
        check_stream_equals_decode(tok, ids, n, (int)(iter & 1));
    }
    /* A character split over byte tokens comes out only once complete. */
    struct detok_state st;
    char buf[64];
    size_t m;
    tokenizer_detok_init(&st, 0);
    const uint8_t smile[4] = {0xf0, 0x9f, 0x99, 0x82};
    for (int k = 0; k < 3; k++) {
        assert_int_equal(tokenizer_detok_push(tok, &st, byte0 + smile[k], buf, 64, &m), KRS_OK);
        assert_int_equal(m, 0);
    }
    assert_int_equal(tokenizer_detok_push(tok, &st, byte0 + smile[3], buf, 64, &m), KRS_OK);
    assert_int_equal(m, 4);
    assert_memory_equal(buf, smile, 4);
}

static void test_default_chat(void **state)
{
    struct fixture *fx = *state;
    if (!fx->tok) skip();
    struct chat_message msgs[] = {{"system", "Be helpful."}, {"user", "Hello"}};
    char *out;
    size_t len;
    char err[256];
    const char *fam;
    assert_int_equal(chat_template_family(fx->tok, NULL, &fam), KRS_OK);
    assert_string_equal(fam, "gemma");
    assert_int_equal(chat_apply(fx->tok, NULL, msgs, 2, 1, &out, &len, err, sizeof err), KRS_OK);
    const char *want =
        "<bos><start_of_turn>user\nBe helpful.\n\nHello<end_of_turn>\n<start_of_turn>model\n";
    assert_string_equal(out, want);
    assert_int_equal(len, strlen(want));
    alloc_free(out);
    struct chat_message bad[] = {{"user", "a"}, {"user", "b"}};
    assert_int_equal(chat_apply(fx->tok, NULL, bad, 2, 1, &out, &len, err, sizeof err),
                     KRS_ERR_INVALID);
    assert_non_null(strstr(err, "alternate"));
    assert_int_equal(chat_apply(fx->tok, NULL, msgs, 0, 1, &out, &len, err, sizeof err),
                     KRS_ERR_INVALID);
    assert_int_equal(chat_apply(fx->tok, "nope", msgs, 2, 1, &out, &len, err, sizeof err),
                     KRS_ERR_UNSUPPORTED);
}

static int setup_tiny(void **state)
{
    struct fixture *fx = calloc(1, sizeof *fx);
    alloc_get_stats(&fx->before);
    size_t size;
    fx->mem = tiny_spm(&size);
    char err[256];
    assert_int_equal(gguf_open_memory(fx->mem, size, &fx->f, err, sizeof err), KRS_OK);
    assert_int_equal(tokenizer_load(fx->f, &fx->tok, err, sizeof err), KRS_OK);
    *state = fx;
    return 0;
}

static void test_tiny_spm(void **state)
{
    struct fixture *fx = *state;
    const struct tokenizer *tok = fx->tok;
    int32_t ids[64];
    size_t n;
    /* add_space_prefix: "ab ab" -> "▁ab▁ab" -> [<s>, ▁ab, ▁ab] */
    assert_int_equal(tokenizer_encode(tok, "ab ab", 5, 1, 0, ids, 64, &n), KRS_OK);
    int32_t w_ab = tokenizer_find(tok,
                                  "\xE2\x96\x81"
                                  "ab",
                                  5);
    assert_int_equal(n, 3);
    assert_int_equal(ids[0], 1);
    assert_int_equal(ids[1], w_ab);
    assert_int_equal(ids[2], w_ab);
    /* unknown characters fall back to <0xHH> bytes */
    assert_int_equal(tokenizer_encode(tok, "z", 1, 0, 0, ids, 64, &n), KRS_OK);
    assert_int_equal(n, 2);
    assert_int_equal(ids[0], tokenizer_find(tok, "\xE2\x96\x81", 3));
    assert_int_equal(ids[1], tokenizer_find(tok, "<0x7A>", 6));
    /* the leading space is dropped again on decode */
    char out[64];
    assert_int_equal(tokenizer_encode(tok, "ab zz b", 7, 1, 0, ids, 64, &n), KRS_OK);
    size_t m;
    assert_int_equal(tokenizer_decode(tok, ids, n, 0, out, sizeof out, &m), KRS_OK);
    assert_int_equal(m, 7);
    assert_memory_equal(out, "ab zz b", 7);
    check_stream_equals_decode(tok, ids, n, 0);
    /* llama.cpp: text after any special fragment (here USER_DEFINED "\n\n") gets the prefix
     * space again, so this one does not round-trip */
    assert_int_equal(tokenizer_encode(tok, "\n\nab", 4, 0, 0, ids, 64, &n), KRS_OK);
    assert_int_equal(n, 2);
    assert_int_equal(ids[0], tokenizer_find(tok, "\n\n", 2));
    assert_int_equal(ids[1], w_ab);
    check_stream_equals_decode(tok, ids, n, 0);
    /* a control token's text is text unless parse_special */
    const char *t = "<start_of_turn>";
    assert_int_equal(tokenizer_encode(tok, t, strlen(t), 0, 0, ids, 64, &n), KRS_OK);
    assert_true(n > 1);
    assert_int_equal(tokenizer_encode(tok, t, strlen(t), 0, 1, ids, 64, &n), KRS_OK);
    assert_int_equal(n, 1);
    /* decode: too small a buffer */
    assert_int_equal(tokenizer_decode(tok, ids, 1, 1, out, 3, &m), KRS_ERR_FULL);
    assert_int_equal(m, strlen(t));
    /* family from the vocabulary's <start_of_turn>; an explicit name wins */
    char *txt;
    char err[128];
    const char *fam;
    struct chat_message msg = {"user", "hi"};
    assert_int_equal(chat_template_family(tok, NULL, &fam), KRS_OK);
    assert_string_equal(fam, "gemma");
    assert_int_equal(chat_apply(tok, "llama2", &msg, 1, 1, &txt, &m, err, sizeof err), KRS_OK);
    assert_string_equal(txt, "<s>[INST] hi [/INST]");
    alloc_free(txt);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_default_specials, setup_default, teardown),
        cmocka_unit_test_setup_teardown(test_default_roundtrip_random_bytes, setup_default,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_default_stream_random_ids, setup_default, teardown),
        cmocka_unit_test_setup_teardown(test_default_chat, setup_default, teardown),
        cmocka_unit_test_setup_teardown(test_tiny_spm, setup_tiny, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
