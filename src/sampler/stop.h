/* Stop strings over a stream of detokenized text pieces.
 *
 * A stop_matcher is embedded by its owner (no heap) and copies the stop strings at init, so the
 * caller's strings may be freed afterwards. Pieces are pushed in order; the matcher emits text
 * as soon as it can no longer be the start of a stop string and holds back the rest (at most
 * STOP_MAX_LEN - 1 bytes).
 *
 * Semantics (independent of how the text is cut into pieces): the match is the occurrence that
 * ENDS first in the concatenated text (that is when a streaming generator can stop); among
 * occurrences ending at the same byte, the longest one (earliest start). Everything before the
 * match start is emitted, the stop string and everything after it never are. Equivalently, for
 * each stop string take its first occurrence (strstr), pick the smallest end, then the smallest
 * start.
 *
 * Works on bytes. UTF-8: stop strings must be valid UTF-8 (checked at init); when the pushed
 * pieces are valid UTF-8, every held-back boundary and match start sits on a character
 * boundary, so each emitted chunk is valid UTF-8 on its own. */
#ifndef KRS_SAMPLER_STOP_H
#define KRS_SAMPLER_STOP_H

#include <stddef.h>
#include <stdint.h>

#define STOP_MAX_STRINGS 8  /* the server rejects requests with more (400) */
#define STOP_MAX_LEN     64 /* bytes per stop string, 1..64 */

struct stop_matcher {
    int n;                                    /* number of stop strings */
    int max_len;                              /* longest stop string, bytes */
    int stopped;                              /* a stop string has matched: nothing more emitted */
    uint8_t len[STOP_MAX_STRINGS];            /* byte length of each string */
    char str[STOP_MAX_STRINGS][STOP_MAX_LEN]; /* copies, not NUL-terminated */
    char held[STOP_MAX_LEN]; /* held-back suffix (a proper prefix of a stop string) */
    size_t n_held;
};

/* Initialises `m` with `n` (0..STOP_MAX_STRINGS) NUL-terminated stop strings, each 1..
 * STOP_MAX_LEN bytes of valid UTF-8; strings are copied. Duplicates are allowed.
 * Returns KRS_OK or KRS_ERR_INVALID (m left unusable). */
int stop_matcher_init(struct stop_matcher *m, const char *const *strings, int n);

/* Pushes `len` bytes of text. Writes the bytes that are now safe to emit into `emit` (not
 * NUL-terminated) and their count into *emit_len; *stopped = 1 when a stop string has completed
 * (in this or an earlier call; later pushes then emit nothing). emit_cap must be at least
 * len + STOP_MAX_LEN - 1 (an upper bound of what can come out), else KRS_ERR_FULL and nothing
 * changes. Returns KRS_OK, KRS_ERR_INVALID (NULL arguments) or KRS_ERR_FULL. */
int stop_matcher_push(struct stop_matcher *m, const char *text, size_t len, char *emit,
                      size_t emit_cap, size_t *emit_len, int *stopped);

/* End of the stream: emits the held-back text (nothing if stopped) and empties the holder.
 * emit_cap >= STOP_MAX_LEN - 1 always suffices. Returns KRS_OK, KRS_ERR_INVALID or
 * KRS_ERR_FULL. */
int stop_matcher_flush(struct stop_matcher *m, char *emit, size_t emit_cap, size_t *emit_len);

#endif
