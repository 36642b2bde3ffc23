/* Stop-string matcher over streamed text pieces (see stop.h for the semantics).
 *
 * Owns only the embedded struct. The text seen so far is never stored: everything before the
 * held-back suffix has been emitted, and a match can only start inside held ++ new piece (the
 * held suffix is the longest one that is a prefix of some stop string). All work is
 * O(piece * strings * STOP_MAX_LEN) bytes compared, no allocation. */
#include "sampler/stop.h"

#include <string.h>

#include "krserve.h"

/* Strict UTF-8 check (no overlongs, no surrogates, <= U+10FFFF). */
static int utf8_valid(const unsigned char *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
        unsigned c = s[i];
        size_t len;
        unsigned min;
        if (c < 0x80) {
            i++;
            continue;
        } else if ((c & 0xE0) == 0xC0) {
            len = 2, min = 0x80, c &= 0x1F;
        } else if ((c & 0xF0) == 0xE0) {
            len = 3, min = 0x800, c &= 0x0F;
        } else if ((c & 0xF8) == 0xF0) {
            len = 4, min = 0x10000, c &= 0x07;
        } else {
            return 0;
        }
        if (n - i < len) return 0;
        for (size_t k = 1; k < len; k++) {
            if ((s[i + k] & 0xC0) != 0x80) return 0;
            c = (c << 6) | (s[i + k] & 0x3F);
        }
        if (c < min || c > 0x10FFFF || (c >= 0xD800 && c <= 0xDFFF)) return 0;
        i += len;
    }
    return 1;
}

int stop_matcher_init(struct stop_matcher *m, const char *const *strings, int n)
{
    if (!m || n < 0 || n > STOP_MAX_STRINGS || (n > 0 && !strings)) return KRS_ERR_INVALID;
    memset(m, 0, sizeof *m);
    for (int i = 0; i < n; i++) {
        if (!strings[i]) return KRS_ERR_INVALID;
        size_t len = strlen(strings[i]);
        if (len == 0 || len > STOP_MAX_LEN) return KRS_ERR_INVALID;
        if (!utf8_valid((const unsigned char *)strings[i], len)) return KRS_ERR_INVALID;
        memcpy(m->str[i], strings[i], len);
        m->len[i] = (uint8_t)len;
        if ((int)len > m->max_len) m->max_len = (int)len;
    }
    m->n = n;
    return KRS_OK;
}

/* The concatenation held ++ text, addressed without copying it. */
struct view {
    const char *held;
    size_t n_held;
    const char *text;
};

static inline char view_at(const struct view *v, size_t i)
{
    return i < v->n_held ? v->held[i] : v->text[i - v->n_held];
}

static int view_eq(const struct view *v, size_t pos, const char *s, size_t len)
{
    for (size_t k = 0; k < len; k++)
        if (view_at(v, pos + k) != s[k]) return 0;
    return 1;
}

static void view_copy(const struct view *v, size_t from, size_t to, char *dst)
{
    for (size_t i = from; i < to; i++) *dst++ = view_at(v, i);
}

int stop_matcher_push(struct stop_matcher *m, const char *text, size_t len, char *emit,
                      size_t emit_cap, size_t *emit_len, int *stopped)
{
    if (!m || (len > 0 && !text) || !emit_len || !stopped || (emit_cap > 0 && !emit))
        return KRS_ERR_INVALID;
    if (m->stopped) {
        *emit_len = 0;
        *stopped = 1;
        return KRS_OK;
    }
    size_t total = m->n_held + len;
    if (emit_cap < total) return KRS_ERR_FULL;
    struct view v = {m->held, m->n_held, text};

    /* The match ending first (ends <= n_held were ruled out by earlier pushes), longest on ties. */
    for (size_t end = m->n_held + 1; end <= total; end++) {
        size_t best = SIZE_MAX;
        for (int s = 0; s < m->n; s++) {
            size_t sl = m->len[s];
            if (sl > end || end - sl >= best) continue;
            if (view_eq(&v, end - sl, m->str[s], sl)) best = end - sl;
        }
        if (best != SIZE_MAX) {
            view_copy(&v, 0, best, emit);
            *emit_len = best;
            m->n_held = 0;
            m->stopped = 1;
            *stopped = 1;
            return KRS_OK;
        }
    }

    /* Hold back the longest suffix that is a proper prefix of a stop string. */
    size_t hold = 0;
    size_t max_hold = m->max_len > 0 ? (size_t)m->max_len - 1 : 0;
    if (max_hold > total) max_hold = total;
    for (size_t h = max_hold; h > 0 && !hold; h--)
        for (int s = 0; s < m->n; s++)
            if (m->len[s] > h && view_eq(&v, total - h, m->str[s], h)) {
                hold = h;
                break;
            }
    char tmp[STOP_MAX_LEN];
    view_copy(&v, total - hold, total, tmp);
    view_copy(&v, 0, total - hold, emit);
    memcpy(m->held, tmp, hold);
    m->n_held = hold;
    *emit_len = total - hold;
    *stopped = 0;
    return KRS_OK;
}

int stop_matcher_flush(struct stop_matcher *m, char *emit, size_t emit_cap, size_t *emit_len)
{
    if (!m || !emit_len || (emit_cap > 0 && !emit)) return KRS_ERR_INVALID;
    if (m->stopped) {
        *emit_len = 0;
        return KRS_OK;
    }
    if (emit_cap < m->n_held) return KRS_ERR_FULL;
    memcpy(emit, m->held, m->n_held);
    *emit_len = m->n_held;
    m->n_held = 0;
    return KRS_OK;
}
