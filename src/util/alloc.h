/* Counted allocation. All heap memory of kr-serve goes through these wrappers so that the bytes
 * and blocks in use are known at any time (exported as metrics, checked by leak tests).
 *
 * A 16-byte header in front of every block records its size; alignment of the returned pointer
 * is 16 bytes (enough for SSE; kernels that need 64-byte alignment use alloc_aligned).
 * Failure returns NULL and counts an OOM event; callers turn that into a status. */
#ifndef KRS_UTIL_ALLOC_H
#define KRS_UTIL_ALLOC_H

#include <stddef.h>
#include <stdint.h>

void *alloc_malloc(size_t size);
void *alloc_calloc(size_t n, size_t size); /* overflow-checked */
void *alloc_realloc(void *ptr, size_t size);
char *alloc_strdup(const char *s);
char *alloc_strndup(const char *s, size_t n);
void alloc_free(void *ptr);

/* Aligned blocks (alignment a power of two >= 16); freed only with alloc_aligned_free. */
void *alloc_aligned(size_t alignment, size_t size);
void alloc_aligned_free(void *ptr);

struct alloc_stats {
    int64_t bytes_in_use;
    int64_t blocks_in_use;
    int64_t bytes_peak;
    int64_t oom_events;
};
void alloc_get_stats(struct alloc_stats *out);

#endif
