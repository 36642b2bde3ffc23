/* `krserve tokenize`: text -> token ids with the model's tokenizer, and chat-template rendering.
 * Also the bridge the Python tests use to compare against Hugging Face (--json, --batch, --chat):
 * inputs can come as hex so that arbitrary bytes survive the trip. */
#include "cli/cli.h"
#include "gguf/gguf.h"
#include "krserve.h"
#include "tokenizer/tokenizer.h"
#include "util/alloc.h"

#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void usage(FILE *f)
{
    fprintf(
        f,
        "usage: krserve tokenize [-m MODEL] [options] [TEXT]\n"
        "  -m FILE            model (default: $KRSERVE_MODEL or models/default.gguf)\n"
        "  --pieces           print one 'id<TAB>piece' line per token\n"
        "  --json             print {\"ids\": [...], \"pieces_hex\": [...], \"decoded_hex\": ...}\n"
        "  --no-special       do not add BOS/EOS\n"
        "  --parse-special    turn special-token text (<start_of_turn>, ...) into tokens\n"
        "  --stdin | -f FILE  read the text from stdin / a file instead of TEXT\n"
        "  --batch            stdin has one hex-encoded text per line; one JSON line each\n"
        "  --chat FILE.json   render messages ([{\"role\",\"content\"}...] or {\"messages\":\n"
        "                     [...], \"add_generation_prompt\": bool}) with the chat\n"
        "                     template, then tokenize it (no BOS added, specials parsed)\n"
        "  --template NAME    chat template family (gemma, llama3, chatml, qwen2, llama2)\n"
        "  --no-gen-prompt    do not append the assistant generation prompt\n"
        "  --render           with --chat: print the rendered text only\n");
}

static char *read_all(FILE *f, size_t *len)
{
    size_t cap = 1 << 16, n = 0;
    char *buf = alloc_malloc(cap);
    if (!buf) return NULL;
    for (;;) {
        if (n == cap) {
            char *nb = alloc_realloc(buf, cap * 2);
            if (!nb) {
                alloc_free(buf);
                return NULL;
            }
            buf = nb, cap *= 2;
        }
        size_t r = fread(buf + n, 1, cap - n, f);
        if (r == 0) break;
        n += r;
    }
    *len = n;
    return buf;
}

static void print_hex(const char *s, size_t n)
{
    static const char hx[] = "0123456789abcdef";
    for (size_t i = 0; i < n; i++) {
        putchar(hx[(unsigned char)s[i] >> 4]);
        putchar(hx[(unsigned char)s[i] & 15]);
    }
}

static int hexval(int c)
{
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* Encodes text; on success *ids (alloc_free) holds *n ids. */
static int encode(const struct tokenizer *tok, const char *text, size_t len, int add_special,
                  int parse_special, int32_t **ids, size_t *n)
{
    size_t cap = len + 8;
    *ids = alloc_malloc(cap * sizeof **ids);
    if (!*ids) return KRS_ERR_NOMEM;
    int rc = tokenizer_encode(tok, text, len, add_special, parse_special, *ids, cap, n);
    if (rc == KRS_ERR_FULL) {
        alloc_free(*ids);
        cap = *n;
        *ids = alloc_malloc(cap * sizeof **ids);
        if (!*ids) return KRS_ERR_NOMEM;
        rc = tokenizer_encode(tok, text, len, add_special, parse_special, *ids, cap, n);
    }
    if (rc) {
        alloc_free(*ids);
        *ids = NULL;
    }
    return rc;
}

static int print_json(const struct tokenizer *tok, const int32_t *ids, size_t n)
{
    char *buf = NULL;
    size_t need, cap = tokenizer_max_piece(tok) + 16;
    int rc = KRS_OK;
    buf = alloc_malloc(cap);
    if (!buf) return KRS_ERR_NOMEM;
    printf("{\"ids\": [");
    for (size_t i = 0; i < n; i++) printf("%s%d", i ? ", " : "", ids[i]);
    printf("], \"pieces_hex\": [");
    for (size_t i = 0; i < n; i++) {
        tokenizer_token_piece(tok, ids[i], 1, buf, cap, &need);
        printf("%s\"", i ? ", " : "");
        print_hex(buf, need);
        printf("\"");
    }
    printf("], \"decoded_hex\": \"");
    rc = tokenizer_decode(tok, ids, n, 0, NULL, 0, &need);
    if (rc == KRS_ERR_FULL || rc == KRS_OK) {
        alloc_free(buf);
        buf = alloc_malloc(need + 1);
        if (!buf) return KRS_ERR_NOMEM;
        rc = tokenizer_decode(tok, ids, n, 0, buf, need + 1, &need);
        print_hex(buf, need);
    }
    printf("\"}\n");
    alloc_free(buf);
    return rc;
}

/* Reads the --chat file into messages; returns the cJSON root (cJSON_Delete) or NULL. */
static cJSON *load_chat(const char *path, struct chat_message **msgs, size_t *n, int *gen)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "krserve tokenize: cannot open %s\n", path);
        return NULL;
    }
    size_t len;
    char *text = read_all(f, &len);
    fclose(f);
    if (!text) return NULL;
    cJSON *root = cJSON_ParseWithLength(text, len);
    alloc_free(text);
    if (!root) {
        fprintf(stderr, "krserve tokenize: %s is not valid JSON\n", path);
        return NULL;
    }
    cJSON *arr = root;
    if (cJSON_IsObject(root)) {
        arr = cJSON_GetObjectItemCaseSensitive(root, "messages");
        cJSON *g = cJSON_GetObjectItemCaseSensitive(root, "add_generation_prompt");
        if (cJSON_IsBool(g)) *gen = cJSON_IsTrue(g);
    }
    if (!cJSON_IsArray(arr)) {
        fprintf(stderr, "krserve tokenize: %s: expected an array of messages\n", path);
        cJSON_Delete(root);
        return NULL;
    }
    *n = (size_t)cJSON_GetArraySize(arr);
    *msgs = alloc_calloc(*n ? *n : 1, sizeof **msgs);
    if (!*msgs) {
        cJSON_Delete(root);
        return NULL;
    }
    size_t i = 0;
    cJSON *m;
    cJSON_ArrayForEach(m, arr)
    {
        cJSON *role = cJSON_GetObjectItemCaseSensitive(m, "role");
        cJSON *content = cJSON_GetObjectItemCaseSensitive(m, "content");
        (*msgs)[i].role = cJSON_IsString(role) ? role->valuestring : NULL;
        (*msgs)[i].content = cJSON_IsString(content) ? content->valuestring : NULL;
        i++;
    }
    return root;
}

int cli_tokenize(int argc, char **argv)
{
    const char *model = NULL, *file = NULL, *chat = NULL, *tmpl = NULL, *text_arg = NULL;
    int pieces = 0, json = 0, add_special = 1, parse_special = 0, from_stdin = 0, batch = 0;
    int gen = 1, render = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "-m") && i + 1 < argc)
            model = argv[++i];
        else if ((!strcmp(a, "-f") || !strcmp(a, "--file")) && i + 1 < argc)
            file = argv[++i];
        else if (!strcmp(a, "--chat") && i + 1 < argc)
            chat = argv[++i];
        else if (!strcmp(a, "--template") && i + 1 < argc)
            tmpl = argv[++i];
        else if (!strcmp(a, "--pieces"))
            pieces = 1;
        else if (!strcmp(a, "--json"))
            json = 1;
        else if (!strcmp(a, "--no-special"))
            add_special = 0;
        else if (!strcmp(a, "--parse-special"))
            parse_special = 1;
        else if (!strcmp(a, "--stdin"))
            from_stdin = 1;
        else if (!strcmp(a, "--batch"))
            batch = 1;
        else if (!strcmp(a, "--no-gen-prompt"))
            gen = 0;
        else if (!strcmp(a, "--render"))
            render = 1;
        else if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage(stdout);
            return 0;
        } else if (a[0] == '-' && a[1]) {
            fprintf(stderr, "krserve tokenize: unknown option %s\n", a);
            usage(stderr);
            return 2;
        } else if (!text_arg)
            text_arg = a;
        else {
            fprintf(stderr, "krserve tokenize: one TEXT only (quote it)\n");
            return 2;
        }
    }
    if (!text_arg && !file && !from_stdin && !batch && !chat) {
        usage(stderr);
        return 2;
    }
    const char *path = cli_model_path(model);
    if (!path) return 1;

    int ret = 1, rc;
    char err[256] = "";
    struct gguf_file *gf = NULL;
    struct tokenizer *tok = NULL;
    char *text = NULL, *line = NULL;
    int32_t *ids = NULL;
    size_t len = 0, n = 0;
    cJSON *chat_root = NULL;
    struct chat_message *msgs = NULL;

    rc = gguf_open(path, &gf, err, sizeof err);
    if (rc) {
        fprintf(stderr, "krserve tokenize: %s: %s\n", path, err);
        goto out;
    }
    rc = tokenizer_load(gf, &tok, err, sizeof err);
    gguf_close(gf);
    if (rc) {
        fprintf(stderr, "krserve tokenize: %s: %s\n", path, err);
        goto out;
    }

    if (batch) {
        size_t lcap = 0;
        long r;
        char *raw = NULL;
        while ((r = cli_read_line(stdin, &raw, &lcap)) >= 0) {
            while (r > 0 && raw[r - 1] == '\r') r--;
            alloc_free(line);
            line = alloc_malloc((size_t)r / 2 + 1);
            if (!line) {
                r = -2;
                break;
            }
            size_t m = 0;
            for (long k = 0; k + 1 < r; k += 2)
                line[m++] = (char)(hexval(raw[k]) * 16 + hexval(raw[k + 1]));
            rc = encode(tok, line, m, add_special, parse_special, &ids, &n);
            if (rc) break;
            print_json(tok, ids, n);
            alloc_free(ids);
            ids = NULL;
        }
        alloc_free(raw);
        if (r == -2) rc = KRS_ERR_NOMEM;
        if (rc) {
            fprintf(stderr, "krserve tokenize: %s\n", krs_status_str(rc));
            goto out;
        }
        ret = 0;
        goto out;
    }

    if (chat) {
        chat_root = load_chat(chat, &msgs, &n, &gen);
        if (!chat_root) goto out;
        rc = chat_apply(tok, tmpl, msgs, n, gen, &text, &len, err, sizeof err);
        if (rc) {
            fprintf(stderr, "krserve tokenize: chat template: %s (%s)\n", err, krs_status_str(rc));
            ret = rc == KRS_ERR_INVALID ? 3 : 1;
            goto out;
        }
        if (render) {
            fwrite(text, 1, len, stdout);
            ret = 0;
            goto out;
        }
        add_special = 0;
        parse_special = 1;
    } else if (file || from_stdin) {
        FILE *f = from_stdin ? stdin : fopen(file, "rb");
        if (!f) {
            fprintf(stderr, "krserve tokenize: cannot open %s\n", file);
            goto out;
        }
        text = read_all(f, &len);
        if (!from_stdin) fclose(f);
        if (!text) goto out;
    } else {
        len = strlen(text_arg);
        text = alloc_strndup(text_arg, len);
        if (!text) goto out;
    }

    rc = encode(tok, text, len, add_special, parse_special, &ids, &n);
    if (rc) {
        fprintf(stderr, "krserve tokenize: %s\n", krs_status_str(rc));
        goto out;
    }
    if (json) {
        print_json(tok, ids, n);
    } else if (pieces) {
        size_t cap = tokenizer_max_piece(tok) + 1, need;
        char *buf = alloc_malloc(cap);
        if (!buf) goto out;
        for (size_t i = 0; i < n; i++) {
            tokenizer_token_piece(tok, ids[i], 1, buf, cap, &need);
            printf("%d\t", ids[i]);
            for (size_t k = 0; k < need; k++) {
                unsigned char c = (unsigned char)buf[k];
                if (c == '\n')
                    fputs("\\n", stdout);
                else if (c == '\t')
                    fputs("\\t", stdout);
                else if (c < 0x20 || c == 0x7f)
                    printf("\\x%02x", c);
                else
                    putchar(c);
            }
            putchar('\n');
        }
        alloc_free(buf);
    } else {
        for (size_t i = 0; i < n; i++) printf("%s%d", i ? " " : "", ids[i]);
        printf("\n");
    }
    ret = 0;
out:
    alloc_free(ids);
    alloc_free(text);
    alloc_free(line);
    alloc_free(msgs);
    if (chat_root) cJSON_Delete(chat_root);
    tokenizer_free(tok);
    return ret;
}
