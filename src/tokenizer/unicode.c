/* UTF-8 decoding and code-point classes for the tokenizer (see unicode.h). The class table is
 * generated (unicode_tables.c); this file only searches it, with an ASCII fast path. */
#include "tokenizer/unicode.h"

static uint8_t ascii_class[128];
static int ascii_ready;

static int class_search(uint32_t cp)
{
    size_t lo = 0, hi = unicode_ranges_count;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (cp < unicode_ranges[mid].lo)
            hi = mid;
        else if (cp > unicode_ranges[mid].hi)
            lo = mid + 1;
        else
            return (int)unicode_ranges[mid].cls;
    }
    return UCLASS_OTHER;
}

int unicode_class(uint32_t cp)
{
    if (cp < 128) {
        /* Benign race: every thread computes the same bytes. */
        if (!ascii_ready) {
            for (uint32_t c = 0; c < 128; c++) ascii_class[c] = (uint8_t)class_search(c);
            ascii_ready = 1;
        }
        return ascii_class[cp];
    }
    if (cp >= 0x110000) return UCLASS_OTHER;
    return class_search(cp);
}

uint32_t unicode_decode(const uint8_t *s, size_t n, size_t *len)
{
    uint8_t c = s[0];
    if (c < 0x80) {
        *len = 1;
        return c;
    }
    size_t need;
    uint32_t cp, min;
    if (c >= 0xC2 && c <= 0xDF) {
        need = 2, cp = c & 0x1F, min = 0x80;
    } else if (c >= 0xE0 && c <= 0xEF) {
        need = 3, cp = c & 0x0F, min = 0x800;
    } else if (c >= 0xF0 && c <= 0xF4) {
        need = 4, cp = c & 0x07, min = 0x10000;
    } else {
        goto invalid;
    }
    if (n < need) goto invalid;
    for (size_t i = 1; i < need; i++) {
        if ((s[i] & 0xC0) != 0x80) goto invalid;
        cp = (cp << 6) | (s[i] & 0x3F);
    }
    if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) goto invalid;
    *len = need;
    return cp;
invalid:
    *len = 1;
    return 0x110000u + c;
}

size_t unicode_complete_prefix(const uint8_t *s, size_t n)
{
    /* Look at most 3 bytes back for a lead byte whose sequence is not finished yet. */
    for (size_t back = 1; back <= 3 && back <= n; back++) {
        uint8_t c = s[n - back];
        if ((c & 0xC0) == 0x80) continue; /* continuation: keep looking for the lead */
        size_t need = 0;
        if (c >= 0xC2 && c <= 0xDF)
            need = 2;
        else if (c >= 0xE0 && c <= 0xEF)
            need = 3;
        else if (c >= 0xF0 && c <= 0xF4)
            need = 4;
        if (need > back) {
            /* Incomplete: hold it back only if what is there is a valid start. */
            size_t dummy;
            uint8_t probe[4] = {c, 0x80, 0x80, 0x80};
            for (size_t i = 1; i < back; i++) probe[i] = s[n - back + i];
            /* Complete the sequence with the smallest continuations that keep it valid. */
            if (c == 0xE0 && back == 1) probe[1] = 0xA0;
            if (c == 0xF0 && back == 1) probe[1] = 0x90;
            if (unicode_decode(probe, need, &dummy) < 0x110000u) return n - back;
        }
        return n;
    }
    return n;
}

int unicode_is_py_space(uint32_t cp)
{
    switch (cp) {
    case 0x09:
    case 0x0A:
    case 0x0B:
    case 0x0C:
    case 0x0D:
    case 0x1C:
    case 0x1D:
    case 0x1E:
    case 0x1F:
    case 0x20:
    case 0x85:
    case 0xA0:
    case 0x1680:
    case 0x2028:
    case 0x2029:
    case 0x202F:
    case 0x205F:
    case 0x3000:
        return 1;
    default:
        return cp >= 0x2000 && cp <= 0x200A;
    }
}
