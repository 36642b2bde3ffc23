/* Code-point helpers for the tokenizer: UTF-8 decoding that never fails (invalid bytes come back
 * as single "other" units) and the letter / number / White_Space classes the BPE pre-tokenizer
 * regexes use. Private to src/tokenizer/ (not part of the public tokenizer.h API). */
#ifndef KRS_TOKENIZER_UNICODE_H
#define KRS_TOKENIZER_UNICODE_H

#include <stddef.h>
#include <stdint.h>

enum {
    UCLASS_OTHER = 0,
    UCLASS_LETTER = 1, /* \p{L} */
    UCLASS_NUMBER = 2, /* \p{N} */
    UCLASS_SPACE = 4,  /* \s (White_Space) */
};

struct unicode_range {
    uint32_t lo, hi;
    uint32_t cls;
};

extern const struct unicode_range unicode_ranges[];
extern const size_t unicode_ranges_count;

/* Class of code point cp (UCLASS_*). Invalid units (see unicode_decode) are UCLASS_OTHER. */
int unicode_class(uint32_t cp);

/* Decodes one code point at s[0..n) (n >= 1). Writes its byte length to *len (1..4). A byte that
 * does not start a valid, complete, shortest-form sequence comes back as 0x110000 + byte with
 * *len = 1, so that callers keep every original byte. */
uint32_t unicode_decode(const uint8_t *s, size_t n, size_t *len);

/* Length of the longest prefix of s[0..n) that does not end inside an incomplete (but so far
 * valid) UTF-8 sequence: the bytes after it (at most 3) could still be completed by more input. */
size_t unicode_complete_prefix(const uint8_t *s, size_t n);

/* Python's str.isspace() for a code point (used by chat templates' trim / strip). */
int unicode_is_py_space(uint32_t cp);

#endif
