/* `krserve inspect [MODEL] [--json] [-m MODEL]`: what a GGUF file contains.
 *
 * Text mode prints the file header, the architecture's hyper-parameters (every `<arch>.*` key),
 * a tokenizer summary, the remaining metadata (long arrays summarised), a tensor table and
 * totals. --json emits the same as one JSON object; integers are written as exact decimal text
 * (u64 values beyond 2^53 survive) and floats with round-trip precision. Only reads the file
 * through gguf/; a missing or malformed model is one line on stderr and exit code 1. */
#include "cli/cli.h"
#include "gguf/gguf.h"
#include "krserve.h"
#include "util/alloc.h"

#include <cjson/cJSON.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define SHORT_ARRAY     8    /* text mode: arrays up to this length are printed inline */
#define JSON_FULL_ARRAY 1024 /* json: arrays up to this length carry their values */
#define TEXT_MAX_STR    72   /* text mode: longer strings are cut */

/* ---- value decoding ------------------------------------------------------------------------ */

static uint64_t rd_le(const uint8_t *p, int n)
{
    uint64_t v = 0;
    for (int i = n - 1; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}

/* Formats one fixed-size value of type t at p as JSON-compatible text ("true", "12", "-3",
 * "0.5", "null" for non-finite floats). */
static void fmt_num(enum gguf_type t, const uint8_t *p, char *buf, size_t n)
{
    uint64_t raw = rd_le(p, (int)gguf_type_size(t));
    switch (t) {
    case GGUF_TYPE_BOOL:
        snprintf(buf, n, "%s", raw ? "true" : "false");
        break;
    case GGUF_TYPE_UINT8:
    case GGUF_TYPE_UINT16:
    case GGUF_TYPE_UINT32:
    case GGUF_TYPE_UINT64:
        snprintf(buf, n, "%" PRIu64, raw);
        break;
    case GGUF_TYPE_INT8:
        snprintf(buf, n, "%d", (int)(int8_t)(uint8_t)raw);
        break;
    case GGUF_TYPE_INT16:
        snprintf(buf, n, "%d", (int)(int16_t)(uint16_t)raw);
        break;
    case GGUF_TYPE_INT32:
        snprintf(buf, n, "%" PRId32, (int32_t)(uint32_t)raw);
        break;
    case GGUF_TYPE_INT64: {
        int64_t v;
        memcpy(&v, &raw, 8);
        snprintf(buf, n, "%" PRId64, v);
        break;
    }
    case GGUF_TYPE_FLOAT32: {
        uint32_t b = (uint32_t)raw;
        float v;
        memcpy(&v, &b, 4);
        if (isfinite(v)) {
            /* shortest text that reads back as the same float */
            for (int prec = 6; prec <= 9; prec++) {
                snprintf(buf, n, "%.*g", prec, (double)v);
                if (strtof(buf, NULL) == v) break;
            }
        } else
            snprintf(buf, n, "null");
        break;
    }
    case GGUF_TYPE_FLOAT64: {
        double v;
        memcpy(&v, &raw, 8);
        if (isfinite(v)) {
            for (int prec = 15; prec <= 17; prec++) {
                snprintf(buf, n, "%.*g", prec, v);
                if (strtod(buf, NULL) == v) break;
            }
        } else
            snprintf(buf, n, "null");
        break;
    }
    default:
        snprintf(buf, n, "null");
    }
    /* A float always reads back as a float (and -0.0 keeps its sign): "3" -> "3.0". */
    if ((t == GGUF_TYPE_FLOAT32 || t == GGUF_TYPE_FLOAT64) && strcmp(buf, "null") &&
        !strpbrk(buf, ".e") && strlen(buf) + 3 <= n)
        strcat(buf, ".0");
}

/* Raw pointer to a scalar kv's value (re-derived through the public getters). */
static int kv_scalar_text(const struct gguf_file *f, uint64_t i, char *buf, size_t n)
{
    enum gguf_type t = gguf_kv_type(f, i);
    const char *key = gguf_kv_key(f, i);
    uint8_t tmp[8];
    switch (t) {
    case GGUF_TYPE_BOOL: {
        int b;
        if (gguf_get_bool(f, key, &b)) return -1;
        tmp[0] = (uint8_t)b;
        break;
    }
    case GGUF_TYPE_FLOAT32: {
        float v;
        if (gguf_get_f32(f, key, &v)) return -1;
        memcpy(tmp, &v, 4);
        break;
    }
    case GGUF_TYPE_FLOAT64: {
        double v;
        if (gguf_kv_num(f, i, &v)) return -1;
        memcpy(tmp, &v, 8);
        break;
    }
    case GGUF_TYPE_INT8:
    case GGUF_TYPE_INT16:
    case GGUF_TYPE_INT32:
    case GGUF_TYPE_INT64: {
        int64_t v;
        if (gguf_get_i64(f, key, &v)) return -1;
        snprintf(buf, n, "%" PRId64, v);
        return 0;
    }
    default: {
        uint64_t v;
        if (gguf_get_u64(f, key, &v)) return -1;
        snprintf(buf, n, "%" PRIu64, v);
        return 0;
    }
    }
    for (int k = (int)gguf_type_size(t); k < 8; k++) tmp[k] = 0;
    fmt_num(t, tmp, buf, n);
    return 0;
}

/* Prints s[0..len) quoted with C-style escapes, cut after `max` bytes (0 = no cut). */
static void print_str(FILE *o, const char *s, size_t len, size_t max)
{
    size_t n = max && len > max ? max : len;
    fputc('"', o);
    for (size_t k = 0; k < n; k++) {
        unsigned char c = (unsigned char)s[k];
        if (c == '"' || c == '\\')
            fprintf(o, "\\%c", c);
        else if (c == '\n')
            fputs("\\n", o);
        else if (c == '\t')
            fputs("\\t", o);
        else if (c < 0x20 || c == 0x7f)
            fprintf(o, "\\x%02x", c);
        else
            fputc(c, o);
    }
    fputc('"', o);
    if (n < len) fprintf(o, "... (%zu bytes)", len);
}

static void print_value(FILE *o, const struct gguf_file *f, uint64_t i)
{
    enum gguf_type t = gguf_kv_type(f, i);
    char buf[64];
    if (t == GGUF_TYPE_STRING) {
        const char *s;
        size_t len;
        gguf_kv_str(f, i, &s, &len);
        print_str(o, s, len, TEXT_MAX_STR);
        return;
    }
    if (t != GGUF_TYPE_ARRAY) {
        if (kv_scalar_text(f, i, buf, sizeof buf) == 0) fputs(buf, o);
        return;
    }
    enum gguf_type et;
    uint64_t cnt;
    gguf_kv_array_info(f, i, &et, &cnt);
    if (cnt > SHORT_ARRAY) {
        fprintf(o, "[array of %" PRIu64 " %s]", cnt, gguf_type_name(et));
        return;
    }
    const void *data = NULL;
    if (et != GGUF_TYPE_STRING) gguf_get_array(f, gguf_kv_key(f, i), NULL, NULL, &data);
    fputc('[', o);
    for (uint64_t j = 0; j < cnt; j++) {
        if (j) fputs(", ", o);
        if (et == GGUF_TYPE_STRING) {
            const char *s;
            size_t len;
            gguf_kv_array_str(f, i, j, &s, &len);
            print_str(o, s, len, 24);
        } else {
            fmt_num(et, (const uint8_t *)data + j * (uint64_t)(int)gguf_type_size(et), buf,
                    sizeof buf);
            fputs(buf, o);
        }
    }
    fputc(']', o);
}

/* ---- JSON ---------------------------------------------------------------------------------- */

static cJSON *json_strn(const char *s, size_t len)
{
    char *tmp = alloc_strndup(s, len);
    if (!tmp) return NULL;
    cJSON *j = cJSON_CreateString(tmp);
    alloc_free(tmp);
    return j;
}

static cJSON *json_raw_num(enum gguf_type t, const uint8_t *p)
{
    char buf[64];
    fmt_num(t, p, buf, sizeof buf);
    return cJSON_CreateRaw(buf);
}

static cJSON *json_kv(const struct gguf_file *f, uint64_t i)
{
    enum gguf_type t = gguf_kv_type(f, i);
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "key", gguf_kv_key(f, i));
    cJSON_AddStringToObject(o, "type", gguf_type_name(t));
    if (t == GGUF_TYPE_STRING) {
        const char *s;
        size_t len;
        gguf_kv_str(f, i, &s, &len);
        cJSON_AddItemToObject(o, "value", json_strn(s, len));
    } else if (t != GGUF_TYPE_ARRAY) {
        char buf[64];
        if (kv_scalar_text(f, i, buf, sizeof buf) == 0)
            cJSON_AddItemToObject(o, "value", cJSON_CreateRaw(buf));
    } else {
        enum gguf_type et;
        uint64_t cnt;
        gguf_kv_array_info(f, i, &et, &cnt);
        cJSON_AddStringToObject(o, "elem", gguf_type_name(et));
        cJSON_AddNumberToObject(o, "count", (double)cnt);
        if (cnt <= JSON_FULL_ARRAY) {
            cJSON *arr = cJSON_AddArrayToObject(o, "value");
            const void *data = NULL;
            if (et != GGUF_TYPE_STRING) gguf_get_array(f, gguf_kv_key(f, i), NULL, NULL, &data);
            for (uint64_t j = 0; j < cnt; j++) {
                if (et == GGUF_TYPE_STRING) {
                    const char *s;
                    size_t len;
                    gguf_kv_array_str(f, i, j, &s, &len);
                    cJSON_AddItemToArray(arr, json_strn(s, len));
                } else {
                    cJSON_AddItemToArray(
                        arr, json_raw_num(et, (const uint8_t *)data + j * (int)gguf_type_size(et)));
                }
            }
        }
    }
    return o;
}

static cJSON *json_u64(uint64_t v)
{
    char buf[32];
    snprintf(buf, sizeof buf, "%" PRIu64, v);
    return cJSON_CreateRaw(buf);
}

/* ---- summary pieces shared by both outputs ------------------------------------------------- */

struct type_total {
    uint64_t count, bytes;
};

static const char *token_text(const struct gguf_file *f, uint32_t id, size_t *len)
{
    const char *s = NULL;
    if (gguf_get_array_str(f, "tokenizer.ggml.tokens", id, &s, len)) return NULL;
    return s;
}

static const char *const special_ids[][2] = {
    {"bos", "tokenizer.ggml.bos_token_id"},     {"eos", "tokenizer.ggml.eos_token_id"},
    {"unk", "tokenizer.ggml.unknown_token_id"}, {"pad", "tokenizer.ggml.padding_token_id"},
    {"eot", "tokenizer.ggml.eot_token_id"},
};
static const char *const tok_flags[][2] = {
    {"add_bos", "tokenizer.ggml.add_bos_token"},
    {"add_eos", "tokenizer.ggml.add_eos_token"},
    {"add_space_prefix", "tokenizer.ggml.add_space_prefix"},
};

static uint64_t array_count(const struct gguf_file *f, const char *key)
{
    int64_t i = gguf_find_key(f, key);
    uint64_t n = 0;
    if (i < 0 || gguf_kv_array_info(f, (uint64_t)i, NULL, &n)) return 0;
    return n;
}

static void shape_text(const struct gguf_tensor *t, char *buf, size_t n)
{
    size_t k = (size_t)snprintf(buf, n, "[");
    for (uint32_t d = 0; d < t->n_dims && k < n; d++)
        k += (size_t)snprintf(buf + k, n - k, "%s%" PRId64, d ? ", " : "", t->ne[d]);
    if (k < n) snprintf(buf + k, n - k, "]");
}

static uint64_t tensor_params(const struct gguf_tensor *t)
{
    uint64_t p = 1;
    for (int d = 0; d < GGUF_MAX_DIMS; d++) p *= (uint64_t)t->ne[d];
    return p;
}

/* ---- text output --------------------------------------------------------------------------- */

static void human_bytes(uint64_t b, char *buf, size_t n)
{
    if (b >= (1ull << 30))
        snprintf(buf, n, "%.2f GiB", (double)b / (double)(1ull << 30));
    else if (b >= (1ull << 20))
        snprintf(buf, n, "%.1f MiB", (double)b / (double)(1ull << 20));
    else if (b >= 1024)
        snprintf(buf, n, "%.1f KiB", (double)b / 1024.0);
    else
        snprintf(buf, n, "%" PRIu64 " B", b);
}

static void print_text(FILE *o, const char *path, const struct gguf_file *f, const char *arch,
                       size_t arch_len, struct type_total *by_type)
{
    char hb[32];
    human_bytes(gguf_file_size(f), hb, sizeof hb);
    fprintf(o, "file          %s\n", path);
    fprintf(o,
            "format        GGUF v%u, %" PRIu64 " bytes (%s), alignment %u, data at %" PRIu64 "\n",
            gguf_version(f), gguf_file_size(f), hb, gguf_alignment(f), gguf_data_offset(f));
    if (arch)
        fprintf(o, "architecture  %.*s\n", (int)arch_len, arch);
    else
        fprintf(o, "architecture  (none)\n");
    const char *name;
    size_t name_len;
    if (gguf_get_str(f, "general.name", &name, &name_len) == KRS_OK)
        fprintf(o, "name          %.*s\n", (int)name_len, name);

    const uint64_t n_kv = gguf_kv_count(f);
    if (arch) {
        fprintf(o, "\nhyper-parameters (%.*s.*)\n", (int)arch_len, arch);
        int n_hp = 0;
        for (uint64_t i = 0; i < n_kv; i++) {
            const char *k = gguf_kv_key(f, i);
            if (strncmp(k, arch, arch_len) || k[arch_len] != '.') continue;
            n_hp++;
            fprintf(o, "  %-40s ", k + arch_len + 1);
            print_value(o, f, i);
            fputc('\n', o);
        }
        if (!n_hp) fprintf(o, "  (none)\n");
    }

    fprintf(o, "\ntokenizer\n");
    const char *s;
    size_t len;
    fprintf(o, "  model %s", gguf_get_str(f, "tokenizer.ggml.model", &s, &len) ? "(none)" : "");
    if (!gguf_get_str(f, "tokenizer.ggml.model", &s, &len)) fprintf(o, "%.*s", (int)len, s);
    fprintf(o, ", pre %s", gguf_get_str(f, "tokenizer.ggml.pre", &s, &len) ? "(none)" : "");
    if (!gguf_get_str(f, "tokenizer.ggml.pre", &s, &len)) fprintf(o, "%.*s", (int)len, s);
    fprintf(o, ", vocab %" PRIu64 ", merges %" PRIu64 "\n", array_count(f, "tokenizer.ggml.tokens"),
            array_count(f, "tokenizer.ggml.merges"));
    fprintf(o, " ");
    int n_special = 0;
    for (size_t k = 0; k < sizeof special_ids / sizeof special_ids[0]; k++) {
        uint32_t id;
        if (gguf_get_u32(f, special_ids[k][1], &id)) continue;
        n_special++;
        const char *tt = token_text(f, id, &len);
        fprintf(o, " %s %u ", special_ids[k][0], id);
        if (tt)
            print_str(o, tt, len, 24);
        else
            fputs("(out of vocab)", o);
    }
    fprintf(o, "%s\n ", n_special ? "" : " no special token ids");
    for (size_t k = 0; k < sizeof tok_flags / sizeof tok_flags[0]; k++) {
        int b;
        if (gguf_get_bool(f, tok_flags[k][1], &b) == KRS_OK)
            fprintf(o, " %s %s", tok_flags[k][0], b ? "true" : "false");
        else
            fprintf(o, " %s (unset)", tok_flags[k][0]);
    }
    fprintf(o, "\n  chat template %s\n",
            gguf_find_key(f, "tokenizer.chat_template") >= 0 ? "present" : "absent");

    fprintf(o, "\nmetadata\n");
    for (uint64_t i = 0; i < n_kv; i++) {
        const char *k = gguf_kv_key(f, i);
        if (arch && !strncmp(k, arch, arch_len) && k[arch_len] == '.') continue;
        fprintf(o, "  %-40s %-6s ", k, gguf_type_name(gguf_kv_type(f, i)));
        print_value(o, f, i);
        fputc('\n', o);
    }

    const uint64_t nt = gguf_tensor_count(f);
    fprintf(o, "\ntensors\n  %-40s %-8s %-22s %14s %14s\n", "name", "type", "shape", "offset",
            "bytes");
    uint64_t total = 0, params = 0;
    for (uint64_t i = 0; i < nt; i++) {
        const struct gguf_tensor *t = gguf_tensor_at(f, i);
        char shape[128];
        shape_text(t, shape, sizeof shape);
        fprintf(o, "  %-40s %-8s %-22s %14" PRIu64 " %14" PRIu64 "\n", t->name,
                gguf_ggml_type_name(t->type), shape, t->offset, t->nbytes);
        total += t->nbytes;
        params += tensor_params(t);
    }
    human_bytes(total, hb, sizeof hb);
    fprintf(o, "\ntotals\n  tensors %" PRIu64 ", bytes %" PRIu64 " (%s), params %" PRIu64 "\n", nt,
            total, hb, params);
    for (uint32_t ty = 0; ty < 64; ty++) {
        if (!by_type[ty].count) continue;
        human_bytes(by_type[ty].bytes, hb, sizeof hb);
        fprintf(o, "  %-8s %5" PRIu64 " tensors %14" PRIu64 " bytes (%s)\n",
                gguf_ggml_type_name(ty), by_type[ty].count, by_type[ty].bytes, hb);
    }
}

/* ---- JSON output --------------------------------------------------------------------------- */

static cJSON *build_json(const char *path, const struct gguf_file *f, const char *arch,
                         size_t arch_len, struct type_total *by_type)
{
    cJSON *root = cJSON_CreateObject();
    cJSON_AddStringToObject(root, "file", path);
    cJSON_AddNumberToObject(root, "version", gguf_version(f));
    cJSON_AddItemToObject(root, "size", json_u64(gguf_file_size(f)));
    cJSON_AddNumberToObject(root, "alignment", gguf_alignment(f));
    cJSON_AddItemToObject(root, "data_offset", json_u64(gguf_data_offset(f)));
    if (arch)
        cJSON_AddItemToObject(root, "architecture", json_strn(arch, arch_len));
    else
        cJSON_AddNullToObject(root, "architecture");

    const uint64_t n_kv = gguf_kv_count(f);
    cJSON *hp = cJSON_AddObjectToObject(root, "hparams");
    cJSON *meta = cJSON_AddArrayToObject(root, "metadata");
    for (uint64_t i = 0; i < n_kv; i++) {
        cJSON *kv = json_kv(f, i);
        const char *k = gguf_kv_key(f, i);
        if (arch && !strncmp(k, arch, arch_len) && k[arch_len] == '.') {
            cJSON *v = cJSON_GetObjectItemCaseSensitive(kv, "value");
            if (v) cJSON_AddItemReferenceToObject(hp, k + arch_len + 1, v);
        }
        cJSON_AddItemToArray(meta, kv);
    }

    cJSON *tok = cJSON_AddObjectToObject(root, "tokenizer");
    const char *s;
    size_t len;
    if (!gguf_get_str(f, "tokenizer.ggml.model", &s, &len))
        cJSON_AddItemToObject(tok, "model", json_strn(s, len));
    if (!gguf_get_str(f, "tokenizer.ggml.pre", &s, &len))
        cJSON_AddItemToObject(tok, "pre", json_strn(s, len));
    cJSON_AddNumberToObject(tok, "vocab_size", (double)array_count(f, "tokenizer.ggml.tokens"));
    cJSON_AddNumberToObject(tok, "merges", (double)array_count(f, "tokenizer.ggml.merges"));
    for (size_t k = 0; k < sizeof special_ids / sizeof special_ids[0]; k++) {
        uint32_t id;
        char name[32];
        if (gguf_get_u32(f, special_ids[k][1], &id)) continue;
        snprintf(name, sizeof name, "%s_id", special_ids[k][0]);
        cJSON_AddNumberToObject(tok, name, id);
        const char *tt = token_text(f, id, &len);
        snprintf(name, sizeof name, "%s_token", special_ids[k][0]);
        if (tt)
            cJSON_AddItemToObject(tok, name, json_strn(tt, len));
        else
            cJSON_AddNullToObject(tok, name);
    }
    for (size_t k = 0; k < sizeof tok_flags / sizeof tok_flags[0]; k++) {
        int b;
        if (gguf_get_bool(f, tok_flags[k][1], &b) == KRS_OK)
            cJSON_AddBoolToObject(tok, tok_flags[k][0], b);
    }
    cJSON_AddBoolToObject(tok, "chat_template", gguf_find_key(f, "tokenizer.chat_template") >= 0);

    cJSON *tens = cJSON_AddArrayToObject(root, "tensors");
    uint64_t total = 0, params = 0;
    for (uint64_t i = 0; i < gguf_tensor_count(f); i++) {
        const struct gguf_tensor *t = gguf_tensor_at(f, i);
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "name", t->name);
        cJSON_AddStringToObject(o, "type", gguf_ggml_type_name(t->type));
        cJSON_AddNumberToObject(o, "type_id", t->type);
        cJSON *sh = cJSON_AddArrayToObject(o, "shape");
        for (uint32_t d = 0; d < t->n_dims; d++)
            cJSON_AddItemToArray(sh, json_u64((uint64_t)t->ne[d]));
        cJSON_AddItemToObject(o, "offset", json_u64(t->offset));
        cJSON_AddItemToObject(o, "nbytes", json_u64(t->nbytes));
        cJSON_AddItemToArray(tens, o);
        total += t->nbytes;
        params += tensor_params(t);
    }
    cJSON *tot = cJSON_AddObjectToObject(root, "totals");
    cJSON_AddItemToObject(tot, "tensors", json_u64(gguf_tensor_count(f)));
    cJSON_AddItemToObject(tot, "bytes", json_u64(total));
    cJSON_AddItemToObject(tot, "params", json_u64(params));
    cJSON *bt = cJSON_AddObjectToObject(tot, "by_type");
    for (uint32_t ty = 0; ty < 64; ty++) {
        if (!by_type[ty].count) continue;
        cJSON *o = cJSON_AddObjectToObject(bt, gguf_ggml_type_name(ty));
        cJSON_AddItemToObject(o, "tensors", json_u64(by_type[ty].count));
        cJSON_AddItemToObject(o, "bytes", json_u64(by_type[ty].bytes));
    }
    return root;
}

/* ---- entry point --------------------------------------------------------------------------- */

static void inspect_usage(FILE *o)
{
    fprintf(o, "usage: krserve inspect [MODEL] [--json] [-m MODEL]\n"
               "  Prints a GGUF file's header, hyper-parameters, tokenizer summary, metadata and\n"
               "  tensors. Default model: -m, else $KRSERVE_MODEL, else " CLI_DEFAULT_MODEL ".\n"
               "  --json  one JSON object instead of text\n");
}

int cli_inspect(int argc, char **argv)
{
    const char *model = NULL;
    int json = 0;
    for (int a = 1; a < argc; a++) {
        if (!strcmp(argv[a], "--json")) {
            json = 1;
        } else if (!strcmp(argv[a], "-m") || !strcmp(argv[a], "--model")) {
            if (a + 1 >= argc) {
                fprintf(stderr, "krserve inspect: %s needs a file name\n", argv[a]);
                return 1;
            }
            model = argv[++a];
        } else if (!strcmp(argv[a], "-h") || !strcmp(argv[a], "--help")) {
            inspect_usage(stdout);
            return 0;
        } else if (argv[a][0] == '-' && argv[a][1]) {
            fprintf(stderr, "krserve inspect: unknown option '%s' (see --help)\n", argv[a]);
            return 1;
        } else if (!model) {
            model = argv[a];
        } else {
            fprintf(stderr, "krserve inspect: more than one model given ('%s')\n", argv[a]);
            return 1;
        }
    }
    const char *path = cli_model_path(model);
    if (!path) return 1;

    struct gguf_file *f = NULL;
    char err[512];
    int rc = gguf_open(path, &f, err, sizeof err);
    if (rc) {
        fprintf(stderr, "krserve inspect: %s: %s\n", path, err);
        return 1;
    }
    const char *arch = NULL;
    size_t arch_len = 0;
    if (gguf_get_str(f, "general.architecture", &arch, &arch_len)) arch = NULL;
    struct type_total by_type[64] = {{0}};
    for (uint64_t i = 0; i < gguf_tensor_count(f); i++) {
        const struct gguf_tensor *t = gguf_tensor_at(f, i);
        if (t->type < 64) {
            by_type[t->type].count++;
            by_type[t->type].bytes += t->nbytes;
        }
    }
    int ret = 0;
    if (json) {
        cJSON *root = build_json(path, f, arch, arch_len, by_type);
        char *txt = root ? cJSON_PrintUnformatted(root) : NULL;
        if (!txt) {
            fprintf(stderr, "krserve inspect: out of memory building JSON\n");
            ret = 1;
        } else {
            fputs(txt, stdout);
            fputc('\n', stdout);
            cJSON_free(txt);
        }
        cJSON_Delete(root);
    } else {
        print_text(stdout, path, f, arch, arch_len, by_type);
    }
    gguf_close(f);
    if (fflush(stdout) != 0) ret = 1;
    return ret;
}
