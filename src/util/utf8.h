/* UTF-8 validation shared by every layer that takes text from outside (the request builder,
 * the HTTP parser). Pure functions, no allocation. */
#ifndef KRS_UTIL_UTF8_H
#define KRS_UTIL_UTF8_H

#include <stddef.h>

/* 1 when s[0..n) is valid UTF-8 (no overlongs, no surrogates, <= U+10FFFF), else 0. */
int utf8_valid(const char *s, size_t n);

#endif
