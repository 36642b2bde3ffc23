/* Counted allocation: a size header per block and relaxed atomic counters. */
#include "util/alloc.h"

#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#define HDR 16u

static _Atomic int64_t bytes_in_use, blocks_in_use, bytes_peak, oom_events;

static void count_add(int64_t bytes, int64_t blocks)
{
    int64_t now = atomic_fetch_add_explicit(&bytes_in_use, bytes, memory_order_relaxed) + bytes;
    atomic_fetch_add_explicit(&blocks_in_use, blocks, memory_order_relaxed);
    int64_t peak = atomic_load_explicit(&bytes_peak, memory_order_relaxed);
    while (now > peak && !atomic_compare_exchange_weak_explicit(
                             &bytes_peak, &peak, now, memory_order_relaxed, memory_order_relaxed)) {
    }
}

static void *finish(unsigned char *raw, size_t size)
{
    if (!raw) {
        atomic_fetch_add_explicit(&oom_events, 1, memory_order_relaxed);
        return NULL;
    }
    memcpy(raw, &size, sizeof size);
    count_add((int64_t)size, 1);
    return raw + HDR;
}

void *alloc_malloc(size_t size)
{
    if (size > SIZE_MAX - HDR) return finish(NULL, 0);
    return finish(malloc(size + HDR), size);
}

void *alloc_calloc(size_t n, size_t size)
{
    if (size && n > (SIZE_MAX - HDR) / size) return finish(NULL, 0);
    return finish(calloc(1, n * size + HDR), n * size);
}

void *alloc_realloc(void *ptr, size_t size)
{
    if (!ptr) return alloc_malloc(size);
    if (size > SIZE_MAX - HDR) return finish(NULL, 0);
    unsigned char *raw = (unsigned char *)ptr - HDR;
    size_t old;
    memcpy(&old, raw, sizeof old);
    unsigned char *nraw = realloc(raw, size + HDR);
    if (!nraw) {
        atomic_fetch_add_explicit(&oom_events, 1, memory_order_relaxed);
        return NULL;
    }
    memcpy(nraw, &size, sizeof size);
    count_add((int64_t)size - (int64_t)old, 0);
    return nraw + HDR;
}

char *alloc_strndup(const char *s, size_t n)
{
    size_t len = strnlen(s, n);
    char *d = alloc_malloc(len + 1);
    if (!d) return NULL;
    memcpy(d, s, len);
    d[len] = '\0';
    return d;
}

char *alloc_strdup(const char *s)
{
    return alloc_strndup(s, SIZE_MAX);
}

void alloc_free(void *ptr)
{
    if (!ptr) return;
    unsigned char *raw = (unsigned char *)ptr - HDR;
    size_t size;
    memcpy(&size, raw, sizeof size);
    count_add(-(int64_t)size, -1);
    free(raw);
}

void *alloc_aligned(size_t alignment, size_t size)
{
    if (alignment < HDR) alignment = HDR;
    if (size > SIZE_MAX - alignment) return finish(NULL, 0);
    void *raw = NULL;
    if (posix_memalign(&raw, alignment, size + alignment) != 0) return finish(NULL, 0);
    unsigned char *user = (unsigned char *)raw + alignment;
    /* Header just before the user pointer: size, then the raw pointer. */
    memcpy(user - HDR, &size, sizeof size);
    memcpy(user - HDR + sizeof size, &raw, sizeof raw);
    count_add((int64_t)size, 1);
    return user;
}

void alloc_aligned_free(void *ptr)
{
    if (!ptr) return;
    unsigned char *user = ptr;
    size_t size;
    void *raw;
    memcpy(&size, user - HDR, sizeof size);
    memcpy(&raw, user - HDR + sizeof size, sizeof raw);
    count_add(-(int64_t)size, -1);
    free(raw);
}

void alloc_get_stats(struct alloc_stats *out)
{
    out->bytes_in_use = atomic_load_explicit(&bytes_in_use, memory_order_relaxed);
    out->blocks_in_use = atomic_load_explicit(&blocks_in_use, memory_order_relaxed);
    out->bytes_peak = atomic_load_explicit(&bytes_peak, memory_order_relaxed);
    out->oom_events = atomic_load_explicit(&oom_events, memory_order_relaxed);
}
