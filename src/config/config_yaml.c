/* The YAML layer: reads config/runtime.yaml with libyaml's document loader and walks its
 * mappings against the key registry. Owns only the translation from YAML nodes to
 * config_set_at calls and the file:line:column of every error; value rules live in
 * config_keys.c. */
#include "config/config_impl.h"
#include "krserve.h"

#include <errno.h>
#include <string.h>
#include <yaml.h>

struct walk {
    struct krs_config *cfg;
    yaml_document_t *doc;
    const char *path;
    char *err;
    size_t errlen;
};

static void at(struct walk *w, yaml_mark_t m, const char *msg)
{
    snprintf(w->err, w->errlen, "%s:%zu:%zu: %s", w->path, m.line + 1, m.column + 1, msg);
}

static const char *scalar(const yaml_node_t *n)
{
    return (const char *)n->data.scalar.value;
}

static bool is_null_scalar(const yaml_node_t *n)
{
    if (n->type != YAML_SCALAR_NODE || n->data.scalar.style != YAML_PLAIN_SCALAR_STYLE)
        return false;
    const char *s = scalar(n);
    return !*s || !strcmp(s, "~") || !strcmp(s, "null") || !strcmp(s, "Null") || !strcmp(s, "NULL");
}

static const char *kind_name(const yaml_node_t *n)
{
    switch (n->type) {
    case YAML_MAPPING_NODE:
        return "a mapping";
    case YAML_SEQUENCE_NODE:
        return "a list";
    default:
        return "a scalar";
    }
}

/* True when `name` is a proper prefix section of some key ("performance.gpuScheduler"). */
static bool is_section(const char *name)
{
    size_t n = strlen(name);
    for (size_t i = 0; i < config_key_count(); i++) {
        const char *k = config_key_at(i)->name;
        if (!strncmp(k, name, n) && k[n] == '.') return true;
    }
    return false;
}

static struct config_origin origin_of(yaml_mark_t m)
{
    struct config_origin o = {CONFIG_SRC_FILE, (int)m.line + 1, (int)m.column + 1, NULL};
    return o;
}

static int set_list(struct walk *w, int idx, const char *name, yaml_node_t *val)
{
    int v[CONFIG_MAX_WINDOWS];
    int n = 0;
    char msg[512];
    for (yaml_node_item_t *it = val->data.sequence.items.start; it < val->data.sequence.items.top;
         it++) {
        yaml_node_t *e = yaml_document_get_node(w->doc, *it);
        if (e->type != YAML_SCALAR_NODE) {
            snprintf(msg, sizeof msg, "%s: list entries must be integers, got %s", name,
                     kind_name(e));
            at(w, e->start_mark, msg);
            return KRS_ERR_INVALID;
        }
        int x;
        if (config_parse_list_elem(idx, scalar(e), &x, msg, sizeof msg)) {
            at(w, e->start_mark, msg);
            return KRS_ERR_INVALID;
        }
        if (n < CONFIG_MAX_WINDOWS) v[n] = x;
        n++;
    }
    struct config_origin o = origin_of(val->start_mark);
    if (config_set_list_at(w->cfg, idx, v, n, &o, msg, sizeof msg)) {
        at(w, val->start_mark, msg);
        return KRS_ERR_INVALID;
    }
    return KRS_OK;
}

static int walk_mapping(struct walk *w, yaml_node_t *map, const char *prefix)
{
    char name[256], msg[640];
    yaml_node_pair_t *first = map->data.mapping.pairs.start;
    for (yaml_node_pair_t *p = first; p < map->data.mapping.pairs.top; p++) {
        yaml_node_t *key = yaml_document_get_node(w->doc, p->key);
        yaml_node_t *val = yaml_document_get_node(w->doc, p->value);
        if (key->type != YAML_SCALAR_NODE) {
            at(w, key->start_mark, "keys must be plain names");
            return KRS_ERR_FORMAT;
        }
        int n = snprintf(name, sizeof name, "%s%s%s", prefix, *prefix ? "." : "", scalar(key));
        if (n < 0 || (size_t)n >= sizeof name) {
            at(w, key->start_mark, "key too long");
            return KRS_ERR_INVALID;
        }
        for (yaml_node_pair_t *q = first; q < p; q++) {
            yaml_node_t *k2 = yaml_document_get_node(w->doc, q->key);
            if (k2->type == YAML_SCALAR_NODE && !strcmp(scalar(k2), scalar(key))) {
                snprintf(msg, sizeof msg, "%s: duplicate key (first at line %zu)", name,
                         k2->start_mark.line + 1);
                at(w, key->start_mark, msg);
                return KRS_ERR_INVALID;
            }
        }

        int idx = config_key_find(name);
        if (idx >= 0) {
            const struct config_key *k = config_key_at((size_t)idx);
            if (k->type == CONFIG_T_INTLIST && val->type == YAML_SEQUENCE_NODE) {
                int rc = set_list(w, idx, name, val);
                if (rc) return rc;
                continue;
            }
            if (val->type != YAML_SCALAR_NODE) {
                snprintf(msg, sizeof msg, "%s: expected a single value, got %s", name,
                         kind_name(val));
                at(w, val->start_mark, msg);
                return KRS_ERR_INVALID;
            }
            struct config_origin o = origin_of(val->start_mark);
            if (config_set_at(w->cfg, idx, scalar(val), is_null_scalar(val), &o, msg, sizeof msg)) {
                at(w, val->start_mark, msg);
                return KRS_ERR_INVALID;
            }
        } else if (is_section(name)) {
            if (val->type == YAML_MAPPING_NODE) {
                int rc = walk_mapping(w, val, name);
                if (rc) return rc;
            } else if (!is_null_scalar(val)) { /* "monitoring:" with nothing under it is fine */
                snprintf(msg, sizeof msg, "%s: expected a section (a mapping of keys), got %s",
                         name, kind_name(val));
                at(w, val->start_mark, msg);
                return KRS_ERR_INVALID;
            }
        } else {
            const char *s = config_suggest(name);
            if (s)
                snprintf(msg, sizeof msg, "%s: unknown key (did you mean %s?)", name, s);
            else
                snprintf(msg, sizeof msg, "%s: unknown key", name);
            at(w, key->start_mark, msg);
            return KRS_ERR_INVALID;
        }
    }
    return KRS_OK;
}

int config_apply_file(struct krs_config *cfg, const char *path, char *err, size_t errlen)
{
    int rc = KRS_OK;
    bool parser_ok = false, doc_ok = false;
    yaml_parser_t parser;
    yaml_document_t doc;

    if (strlen(path) >= sizeof cfg->file) {
        snprintf(err, errlen, "%s: config path too long", path);
        return KRS_ERR_INVALID;
    }
    FILE *fp = fopen(path, "rb");
    if (!fp) {
        snprintf(err, errlen, "%s: cannot open config file: %s", path, strerror(errno));
        return KRS_ERR_IO;
    }
    snprintf(cfg->file, sizeof cfg->file, "%s", path);
    struct walk w = {cfg, &doc, cfg->file, err, errlen};

    if (!yaml_parser_initialize(&parser)) {
        rc = KRS_ERR_NOMEM;
        snprintf(err, errlen, "%s: out of memory", path);
        goto out;
    }
    parser_ok = true;
    yaml_parser_set_input_file(&parser, fp);
    if (!yaml_parser_load(&parser, &doc)) {
        char msg[256];
        snprintf(msg, sizeof msg, "YAML syntax error: %s%s%s",
                 parser.problem ? parser.problem : "unknown", parser.context ? " " : "",
                 parser.context ? parser.context : "");
        at(&w, parser.problem_mark, msg);
        rc = KRS_ERR_FORMAT;
        goto out;
    }
    doc_ok = true;
    yaml_node_t *root = yaml_document_get_root_node(&doc);
    if (root) { /* an empty file (or only comments) means defaults */
        if (root->type != YAML_MAPPING_NODE && !is_null_scalar(root)) {
            at(&w, root->start_mark, "the top level must be a mapping of sections");
            rc = KRS_ERR_FORMAT;
            goto out;
        }
        if (root->type == YAML_MAPPING_NODE) rc = walk_mapping(&w, root, "");
        if (rc) goto out;
    }
    yaml_document_delete(&doc);
    doc_ok = false;
    /* A second document ("---" followed by more keys) would be silently ignored: refuse it. */
    if (!yaml_parser_load(&parser, &doc)) {
        at(&w, parser.problem_mark, "YAML syntax error");
        rc = KRS_ERR_FORMAT;
        goto out;
    }
    doc_ok = true;
    root = yaml_document_get_root_node(&doc);
    if (root) {
        at(&w, root->start_mark, "only one YAML document is allowed");
        rc = KRS_ERR_FORMAT;
    }
out:
    if (doc_ok) yaml_document_delete(&doc);
    if (parser_ok) yaml_parser_delete(&parser);
    fclose(fp);
    return rc;
}
