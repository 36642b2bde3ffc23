/* config/ internals shared by config_keys.c (registry, value parsing), config_yaml.c (file) and
 * config.c (env, flags, validation, dump, JSON). Not part of the public API. */
#ifndef KRS_CONFIG_IMPL_H
#define KRS_CONFIG_IMPL_H

#include "config/config.h"

/* Parses `text` for key idx and stores it with origin *o. is_null: the value is a YAML null
 * (only nullable strings take it). For INTLIST keys `text` is "5,30,60" or "[5, 30, 60]".
 * On error writes "key: message" to err and leaves *cfg unchanged. */
int config_set_at(struct krs_config *cfg, int idx, const char *text, bool is_null,
                  const struct config_origin *o, char *err, size_t errlen);

/* One element of an INTLIST key: writes "key: message" to err on error. */
int config_parse_list_elem(int idx, const char *text, int *out, char *err, size_t errlen);

/* Stores a whole INTLIST value (count and order checked). */
int config_set_list_at(struct krs_config *cfg, int idx, const int *v, int n,
                       const struct config_origin *o, char *err, size_t errlen);

/* "default", "file PATH:L:C", "env NAME", "flag --x" for key idx. */
void config_origin_str(const struct krs_config *cfg, int idx, char *buf, size_t len);

/* "PATH:L:C: ", "NAME=value: "-style prefix for errors about key idx ("" for defaults). */
void config_origin_prefix(const struct krs_config *cfg, int idx, char *buf, size_t len);

/* Case-insensitive equality for ASCII words. */
bool config_word_eq(const char *a, const char *b);

/* The registered key closest to `name` (edit distance <= 2), or NULL. */
const char *config_suggest(const char *name);

#endif
