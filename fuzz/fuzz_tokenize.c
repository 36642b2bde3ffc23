/* libFuzzer driver for the tokenizer: arbitrary bytes (invalid UTF-8 included) through encode,
 * whole-sequence decode, the streaming detokenizer and the chat templates.
 *
 * Vocabularies are built in memory as GGUF images on first use: a tiny SPM (bytes, a few merges,
 * CONTROL and USER_DEFINED tokens, add_space_prefix) and a tiny byte-level BPE (all 256 byte
 * characters, merges, a CONTROL token) for each pre-tokenizer (llama-bpe, qwen2, gpt-2). Setting
 * KRS_FUZZ_MODEL=path/to/model.gguf adds that model's tokenizer (e.g. the default Gemma 3).
 *
 * Input byte 0 picks the vocabulary and flags; the rest is the text. Checked: no crash, no hang,
 * streaming decode == decode, byte-level BPE decode(encode(x)) == x with parse_special off,
 * KRS_ERR_FULL sizing agrees with the real count. */
#include "gguf/gguf.h"
#include "krserve.h"
#include "tokenizer/tokenizer.h"
#include "util/alloc.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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
        if (!w->p) abort();
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
static void kv_bool(struct gw *w, const char *k, int v)
{
    uint8_t b = (uint8_t)v;
    gw_str(w, k), gw_u32(w, GGUF_TYPE_BOOL), gw_bytes(w, &b, 1), w->n_kv++;
}
static void kv_strs(struct gw *w, const char *k, char **v, size_t n)
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

#define MAXTOK 512
static char *toks[MAXTOK];
static float scores[MAXTOK];
static int32_t types[MAXTOK];
static size_t ntok;

static void add(const char *s, float score, int type)
{
    toks[ntok] = strdup(s);
    scores[ntok] = score;
    types[ntok] = type;
    ntok++;
}

static void reset(void)
{
    for (size_t i = 0; i < ntok; i++) free(toks[i]);
    ntok = 0;
}

static struct tokenizer *from_image(uint8_t *img, size_t size)
{
    struct gguf_file *f;
    struct tokenizer *tok;
    char err[256];
    if (gguf_open_memory(img, size, &f, err, sizeof err)) {
        fprintf(stderr, "fuzz_tokenize: %s\n", err);
        abort();
    }
    if (tokenizer_load(f, &tok, err, sizeof err)) {
        fprintf(stderr, "fuzz_tokenize: %s\n", err);
        abort();
    }
    gguf_close(f);
    free(img);
    return tok;
}

static struct tokenizer *tiny_spm(void)
{
    static const char *pieces[] = {"\xE2\x96\x81",
                                   "a",
                                   "b",
                                   "\xE2\x96\x81"
                                   "a",
                                   "ab",
                                   "\xE2\x96\x81"
                                   "ab",
                                   "\xC3\xA9",
                                   "\xE2\x96\x81\xE2\x96\x81",
                                   "a\xE2\x96\x81"
                                   "b",
                                   "ba"};
    char hex[8];
    reset();
    add("<unk>", 0, 2), add("<s>", 0, 3), add("</s>", 0, 3);
    for (int i = 0; i < 256; i++) snprintf(hex, sizeof hex, "<0x%02X>", i), add(hex, 0, 6);
    for (size_t i = 0; i < sizeof pieces / sizeof *pieces; i++) add(pieces[i], -(float)i, 1);
    add("<start_of_turn>", 0, 3), add("<end_of_turn>", 0, 3), add("\n\n", 0, 4);
    add("<start", 0, 4), add("", 0, 1), add("unused", 0, 5);
    struct gw w = {0};
    kv_str(&w, "general.architecture", "llama");
    kv_str(&w, "tokenizer.ggml.model", "llama");
    kv_strs(&w, "tokenizer.ggml.tokens", toks, ntok);
    kv_arr(&w, "tokenizer.ggml.scores", GGUF_TYPE_FLOAT32, scores, ntok);
    kv_arr(&w, "tokenizer.ggml.token_type", GGUF_TYPE_INT32, types, ntok);
    kv_bool(&w, "tokenizer.ggml.add_space_prefix", 1);
    kv_bool(&w, "tokenizer.ggml.add_eos_token", 1);
    size_t size;
    uint8_t *img = gw_finish(&w, &size);
    return from_image(img, size);
}

static struct tokenizer *tiny_bpe(const char *pre)
{
    reset();
    /* bytes_to_unicode alphabet */
    int extra = 0;
    for (int b = 0; b < 256; b++) {
        int printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
        unsigned cp = printable ? (unsigned)b : 0x100u + (unsigned)extra++;
        char u[3] = {0};
        if (cp < 0x80)
            u[0] = (char)cp;
        else
            u[0] = (char)(0xC0 | (cp >> 6)), u[1] = (char)(0x80 | (cp & 0x3F));
        add(u, 0, 1);
    }
    static const char *merged[] = {"\xC4\xA0t",  "he", "\xC4\xA0the", "in",
                                   "\xC4\xA0in", "12", "123",         "\xC4\xA0\xC4\xA0"};
    static const char *merges[] = {"\xC4\xA0 t", "h e",  "\xC4\xA0t he",      "i n", "\xC4\xA0 in",
                                   "1 2",        "12 3", "\xC4\xA0 \xC4\xA0", "x y", "bad"};
    for (size_t i = 0; i < sizeof merged / sizeof *merged; i++) add(merged[i], 0, 1);
    add("<|endoftext|>", 0, 3), add("<|im_start|>", 0, 3);
    struct gw w = {0};
    kv_str(&w, "general.architecture", "llama");
    kv_str(&w, "tokenizer.ggml.model", "gpt2");
    kv_str(&w, "tokenizer.ggml.pre", pre);
    kv_strs(&w, "tokenizer.ggml.tokens", toks, ntok);
    kv_arr(&w, "tokenizer.ggml.token_type", GGUF_TYPE_INT32, types, ntok);
    kv_strs(&w, "tokenizer.ggml.merges", (char **)merges, sizeof merges / sizeof *merges);
    size_t size;
    uint8_t *img = gw_finish(&w, &size);
    return from_image(img, size);
}

static struct tokenizer *vocabs[5];
static size_t n_vocabs;

static void init(void)
{
    vocabs[n_vocabs++] = tiny_spm();
    vocabs[n_vocabs++] = tiny_bpe("llama-bpe");
    vocabs[n_vocabs++] = tiny_bpe("qwen2");
    vocabs[n_vocabs++] = tiny_bpe("gpt-2");
    reset();
    const char *model = getenv("KRS_FUZZ_MODEL");
    if (model) {
        struct gguf_file *f;
        char err[256];
        if (gguf_open(model, &f, err, sizeof err) == KRS_OK) {
            if (tokenizer_load(f, &vocabs[n_vocabs], err, sizeof err) == KRS_OK) n_vocabs++;
            gguf_close(f);
        }
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (!n_vocabs) init();
    if (size < 1) return 0;
    uint8_t ctl = data[0];
    const char *text = (const char *)data + 1;
    size_t len = size - 1;
    size_t vi = (ctl & 7) % n_vocabs;
    struct tokenizer *tok = vocabs[vi];
    int add_special = (ctl >> 3) & 1, parse_special = (ctl >> 4) & 1;
    int render = (ctl >> 5) & 1;

    size_t cap = len + 4, n = 0, need = 0;
    int32_t *ids = malloc(sizeof *ids * cap);
    int rc = tokenizer_encode(tok, text, len, add_special, parse_special, ids, cap, &n);
    if (rc == KRS_ERR_FULL) {
        free(ids);
        cap = n;
        ids = malloc(sizeof *ids * cap);
        rc = tokenizer_encode(tok, text, len, add_special, parse_special, ids, cap, &need);
        if (rc || need != n) abort();
    } else if (rc) {
        abort();
    }
    for (size_t i = 0; i < n; i++)
        if (ids[i] < 0 || (uint32_t)ids[i] >= tokenizer_n_vocab(tok)) abort();
    /* a too-small buffer reports the same count */
    if (n > 0) {
        int32_t one;
        if (tokenizer_encode(tok, text, len, add_special, parse_special, &one, 0, &need) !=
                KRS_ERR_FULL ||
            need != n)
            abort();
    }

    rc = tokenizer_decode(tok, ids, n, render, NULL, 0, &need);
    if (rc != KRS_OK && rc != KRS_ERR_FULL) abort();
    char *full = malloc(need + 1);
    size_t got;
    if (tokenizer_decode(tok, ids, n, render, full, need + 1, &got) || got != need) abort();

    /* byte-level BPE without specials must give the input back exactly */
    if (vi >= 1 && vi <= 3 && !parse_special && (need != len || memcmp(full, text, len) != 0))
        abort();

    char *stream = malloc(need + 8);
    size_t pcap = tokenizer_max_piece(tok) + 4, sn = 0, m;
    char *buf = malloc(pcap);
    struct detok_state st;
    tokenizer_detok_init(&st, render);
    for (size_t i = 0; i < n; i++) {
        if (tokenizer_detok_push(tok, &st, ids[i], buf, pcap, &m) || sn + m > need) abort();
        memcpy(stream + sn, buf, m);
        sn += m;
    }
    tokenizer_detok_flush(&st, buf, pcap, &m);
    memcpy(stream + sn, buf, m);
    sn += m;
    if (sn != need || memcmp(stream, full, need) != 0) abort();

    /* chat templates over the text as message contents (split at the first NUL) */
    char *copy = malloc(len + 1);
    memcpy(copy, text, len);
    copy[len] = '\0';
    const char *second = memchr(copy, '\0', len) ? copy + strlen(copy) + 1 : "";
    if (second > copy + len) second = "";
    struct chat_message msgs[3] = {{"system", copy}, {"user", second}, {"assistant", copy}};
    static const char *families[] = {"gemma", "llama3", "chatml", "qwen2", "llama2", NULL};
    char *out;
    size_t out_len;
    char err[128];
    rc = chat_apply(tok, families[(ctl >> 5) % 6], msgs, 1 + (size_t)(ctl >> 6) % 3, ctl & 1, &out,
                    &out_len, err, sizeof err);
    if (rc == KRS_OK) {
        if (strlen(out) != out_len) abort();
        alloc_free(out);
    }
    free(copy);
    free(ids);
    free(full);
    free(stream);
    free(buf);
    return 0;
}
