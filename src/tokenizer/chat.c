/* Chat templates: renders OpenAI-style messages the way the reference Jinja templates do, without
 * a Jinja engine. Each family below is a direct transcription of one template's logic (quoted
 * above its function); tests/tokenizer/test_tokenizer_py.py renders the same messages with jinja2
 * as transformers does and compares the bytes.
 *
 * Jinja's `trim` filter and Python's str.strip() drop Unicode whitespace (str.isspace) at both
 * ends; strip_span reproduces that. Nothing here allocates except the growing output buffer. */
#include "tokenizer/tokenizer_impl.h"
#include "tokenizer/unicode.h"
#include "krserve.h"
#include "util/alloc.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

static void set_err(char *err, size_t errlen, const char *fmt, ...)
{
    if (!err || !errlen) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

struct sbuf {
    char *p;
    size_t n, cap;
    int oom;
};

static void sb_put(struct sbuf *b, const char *s, size_t len)
{
    if (b->oom) return;
    if (b->n + len + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->n + len + 1) cap *= 2;
        char *p = alloc_realloc(b->p, cap);
        if (!p) {
            b->oom = 1;
            return;
        }
        b->p = p, b->cap = cap;
    }
    memcpy(b->p + b->n, s, len);
    b->n += len;
    b->p[b->n] = '\0';
}

static void sb_str(struct sbuf *b, const char *s)
{
    sb_put(b, s, strlen(s));
}

/* Python str.strip(): the span of s without leading/trailing Unicode whitespace. */
static void sb_stripped(struct sbuf *b, const char *s)
{
    const uint8_t *u = (const uint8_t *)s;
    size_t n = strlen(s), first = n, last = 0;
    for (size_t i = 0; i < n;) {
        size_t cl;
        uint32_t cp = unicode_decode(u + i, n - i, &cl);
        if (!unicode_is_py_space(cp)) {
            if (first == n) first = i;
            last = i + cl;
        }
        i += cl;
    }
    if (first < last) sb_put(b, s + first, last - first);
}

static const char *token_text_or_empty(const struct tokenizer *tok, int32_t id, size_t *len)
{
    const char *s = tokenizer_token_text(tok, id, len);
    if (!s) *len = 0;
    return s ? s : "";
}

static int is_role(const struct chat_message *m, const char *role)
{
    return strcmp(m->role, role) == 0;
}

#define ALTERNATE_ERR "Conversation roles must alternate user/assistant/user/assistant/..."

/* Gemma 3 (tokenizer_config.json of the -it models):
 *   {{ bos_token }}; a leading system message becomes first_user_prefix = content + '\n\n';
 *   for each remaining message: roles must alternate (user at even positions), assistant ->
 *   'model'; '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first) +
 *   content|trim + '<end_of_turn>\n'; generation prompt '<start_of_turn>model\n'. */
static int render_gemma(const struct tokenizer *tok, const struct chat_message *m, size_t n,
                        int gen, struct sbuf *b, char *err, size_t errlen)
{
    size_t bl;
    const char *bos = token_text_or_empty(tok, tok->bos, &bl);
    sb_put(b, bos, bl);
    const char *prefix = NULL;
    size_t start = 0;
    if (is_role(&m[0], "system")) prefix = m[0].content, start = 1;
    for (size_t i = start; i < n; i++) {
        size_t k = i - start;
        if (is_role(&m[i], "user") != (k % 2 == 0)) {
            set_err(err, errlen, ALTERNATE_ERR);
            return KRS_ERR_INVALID;
        }
        sb_str(b, "<start_of_turn>");
        sb_str(b, is_role(&m[i], "assistant") ? "model" : m[i].role);
        sb_str(b, "\n");
        if (k == 0 && prefix) {
            sb_str(b, prefix);
            sb_str(b, "\n\n");
        }
        sb_stripped(b, m[i].content);
        sb_str(b, "<end_of_turn>\n");
    }
    if (gen) sb_str(b, "<start_of_turn>model\n");
    return KRS_OK;
}

/* Llama 3 Instruct:
 *   for each message: content = '<|start_header_id|>' + role + '<|end_header_id|>\n\n' +
 *   content|trim + '<|eot_id|>', the first one prefixed with bos_token; generation prompt
 *   '<|start_header_id|>assistant<|end_header_id|>\n\n'. */
static int render_llama3(const struct tokenizer *tok, const struct chat_message *m, size_t n,
                         int gen, struct sbuf *b)
{
    size_t bl;
    const char *bos = token_text_or_empty(tok, tok->bos, &bl);
    for (size_t i = 0; i < n; i++) {
        if (i == 0) sb_put(b, bos, bl);
        sb_str(b, "<|start_header_id|>");
        sb_str(b, m[i].role);
        sb_str(b, "<|end_header_id|>\n\n");
        sb_stripped(b, m[i].content);
        sb_str(b, "<|eot_id|>");
    }
    if (gen) sb_str(b, "<|start_header_id|>assistant<|end_header_id|>\n\n");
    return KRS_OK;
}

/* ChatML: '<|im_start|>' + role + '\n' + content + '<|im_end|>' + '\n' per message, generation
 * prompt '<|im_start|>assistant\n'. Qwen2 adds, when the first message is not a system one,
 * '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' in front. */
static int render_chatml(const struct chat_message *m, size_t n, int gen, int qwen_default,
                         struct sbuf *b)
{
    for (size_t i = 0; i < n; i++) {
        if (i == 0 && qwen_default && !is_role(&m[0], "system"))
            sb_str(b, "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n");
        sb_str(b, "<|im_start|>");
        sb_str(b, m[i].role);
        sb_str(b, "\n");
        sb_str(b, m[i].content);
        sb_str(b, "<|im_end|>\n");
    }
    if (gen) sb_str(b, "<|im_start|>assistant\n");
    return KRS_OK;
}

/* Llama 2 chat: a leading system message is folded into the first message as
 * '<<SYS>>\n' + system + '\n<</SYS>>\n\n' + content; roles must alternate (user at even
 * positions); user: bos_token + '[INST] ' + content.strip() + ' [/INST]'; assistant: ' ' +
 * content.strip() + ' ' + eos_token; other roles render nothing; no generation prompt. */
static int render_llama2(const struct tokenizer *tok, const struct chat_message *m, size_t n,
                         struct sbuf *b, char *err, size_t errlen)
{
    size_t bl, el;
    const char *bos = token_text_or_empty(tok, tok->bos, &bl);
    const char *eos = token_text_or_empty(tok, tok->eos, &el);
    const char *sys = NULL;
    size_t start = 0;
    if (is_role(&m[0], "system")) sys = m[0].content, start = 1;
    struct sbuf tmp = {0};
    int rc = KRS_OK;
    for (size_t i = start; i < n; i++) {
        size_t k = i - start;
        if (is_role(&m[i], "user") != (k % 2 == 0)) {
            set_err(err, errlen, ALTERNATE_ERR);
            rc = KRS_ERR_INVALID;
            goto out;
        }
        tmp.n = 0;
        if (k == 0 && sys) {
            sb_str(&tmp, "<<SYS>>\n");
            sb_str(&tmp, sys);
            sb_str(&tmp, "\n<</SYS>>\n\n");
        }
        sb_str(&tmp, m[i].content);
        if (tmp.oom) {
            rc = KRS_ERR_NOMEM;
            goto out;
        }
        if (is_role(&m[i], "user")) {
            sb_put(b, bos, bl);
            sb_str(b, "[INST] ");
            sb_stripped(b, tmp.p);
            sb_str(b, " [/INST]");
        } else if (is_role(&m[i], "assistant")) {
            sb_str(b, " ");
            sb_stripped(b, tmp.p);
            sb_str(b, " ");
            sb_put(b, eos, el);
        }
    }
out:
    alloc_free(tmp.p);
    return rc;
}

static const struct {
    const char *name, *family;
} aliases[] = {
    {"gemma", "gemma"},    {"gemma3", "gemma"},  {"llama3", "llama3"},
    {"llama-3", "llama3"}, {"chatml", "chatml"}, {"qwen2", "qwen2"},
    {"qwen", "qwen2"},     {"llama2", "llama2"}, {"llama-2", "llama2"},
};

int chat_template_family(const struct tokenizer *tok, const char *template_name,
                         const char **family)
{
    *family = NULL;
    if (template_name) {
        for (size_t i = 0; i < sizeof aliases / sizeof *aliases; i++)
            if (!strcmp(template_name, aliases[i].name)) {
                *family = aliases[i].family;
                return KRS_OK;
            }
        return KRS_ERR_UNSUPPORTED;
    }
    const char *t = tok->chat_template;
    if (t) {
        if (strstr(t, "<start_of_turn>"))
            *family = "gemma";
        else if (strstr(t, "<|start_header_id|>"))
            *family = "llama3";
        else if (strstr(t, "<|im_start|>"))
            *family = strstr(t, "You are a helpful assistant.") ? "qwen2" : "chatml";
        else if (strstr(t, "[INST]"))
            *family = "llama2";
        return *family ? KRS_OK : KRS_ERR_UNSUPPORTED;
    }
    static const struct {
        const char *text, *family;
    } by_vocab[] = {{"<start_of_turn>", "gemma"},
                    {"<|im_start|>", "chatml"},
                    {"<|start_header_id|>", "llama3"},
                    {"[INST]", "llama2"}};
    for (size_t i = 0; i < sizeof by_vocab / sizeof *by_vocab; i++)
        if (tok_lookup(tok, by_vocab[i].text, strlen(by_vocab[i].text)) >= 0) {
            *family = by_vocab[i].family;
            return KRS_OK;
        }
    return KRS_ERR_UNSUPPORTED;
}

int chat_apply(const struct tokenizer *tok, const char *template_name,
               const struct chat_message *msgs, size_t n, int add_generation_prompt,
               char **out_text, size_t *out_len, char *err, size_t errlen)
{
    *out_text = NULL;
    if (out_len) *out_len = 0;
    const char *family;
    int rc = chat_template_family(tok, template_name, &family);
    if (rc) {
        if (template_name)
            set_err(err, errlen,
                    "unknown chat template '%s' (known: gemma, llama3, chatml, qwen2, llama2)",
                    template_name);
        else
            set_err(err, errlen,
                    "no recognisable chat template in the model (tokenizer.chat_template or "
                    "special tokens); name one explicitly (gemma, llama3, chatml, qwen2, llama2)");
        return rc;
    }
    if (!msgs || n == 0) {
        set_err(err, errlen, "no messages");
        return KRS_ERR_INVALID;
    }
    for (size_t i = 0; i < n; i++)
        if (!msgs[i].role || !msgs[i].content) {
            set_err(err, errlen, "message %zu has no role or content", i);
            return KRS_ERR_INVALID;
        }
    struct sbuf b = {0};
    sb_put(&b, "", 0);
    int gen = add_generation_prompt != 0;
    if (!strcmp(family, "gemma"))
        rc = render_gemma(tok, msgs, n, gen, &b, err, errlen);
    else if (!strcmp(family, "llama3"))
        rc = render_llama3(tok, msgs, n, gen, &b);
    else if (!strcmp(family, "chatml"))
        rc = render_chatml(msgs, n, gen, 0, &b);
    else if (!strcmp(family, "qwen2"))
        rc = render_chatml(msgs, n, gen, 1, &b);
    else
        rc = render_llama2(tok, msgs, n, &b, err, errlen);
    if (!rc && b.oom) {
        set_err(err, errlen, "out of memory rendering the chat template");
        rc = KRS_ERR_NOMEM;
    }
    if (rc) {
        alloc_free(b.p);
        return rc;
    }
    *out_text = b.p;
    if (out_len) *out_len = b.n;
    return KRS_OK;
}
