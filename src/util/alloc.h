/* Counted allocation. All heap memory of kr-serve goes through these wrappers so that the bytes
 * and blocks in use are known at any time (exported as metrics, checked by leak tests).
 *
 * A 16-byte header in front of every block records its size; alignment of the returned pointer
 * is 16 bytes (enough for SSE; kernels that need 64-byte alignment use alloc_aligned).
 * Failure returns NULL and counts an OOM event; callers turn that into a status.
 *
 * Fault injection (tests): an armed failure makes one chosen allocation return NULL exactly as
 * a real out-of-memory would. A call site is told apart by its return address (the caller of
 * alloc_malloc, alloc_strdup, ...), so a test can take a census of the sites a scenario reaches
 * and then fail each of them in turn; or it fails the n-th allocation from now. Unarmed, the hook
 * costs one relaxed atomic load per allocation. Thread-safe; one armed failure at a time. */
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

/* ---- fault injection (tests only) ---- */
#define ALLOC_FAULT_MAX_SITES 4096
/* Starts recording the distinct call sites of allocations (and how often each is hit); clears
 * an earlier census. */
void alloc_fault_census_start(void);
/* Stops recording; copies up to cap sites in order of first use into sites (hits[i] calls each,
 * hits may be NULL) and returns how many were seen. */
int alloc_fault_census_stop(uintptr_t *sites, int64_t *hits, int cap);
/* Starts a fresh census and arms one failure: the first allocation from the n-th distinct site
 * the census meets fails (n >= 1; n = 0 only counts sites). For a whole process, where site
 * addresses are not known beforehand: a dry run counts the sites, then run k fails the k-th. */
void alloc_fault_arm_new_site(int64_t n);
/* Distinct sites the running (or last) census has met. */
int alloc_fault_census_count(void);
/* Arms one failure: the (skip+1)-th allocation from `site` after this call returns NULL. */
void alloc_fault_arm_site(uintptr_t site, int64_t skip);
/* Arms one failure: the n-th allocation (n >= 1) from any site after this call returns NULL. */
void alloc_fault_arm_nth(int64_t n);
/* Arms failures that repeat: every k-th allocation (k >= 1) from now fails until disarmed. */
void alloc_fault_arm_every(int64_t k);
/* For whole-process tests: arms alloc_fault_arm_every($KRSERVE_FAULT_ALLOC_EVERY), else
 * alloc_fault_arm_new_site($KRSERVE_FAULT_ALLOC_SITE), when set; returns 1 if it armed.
 * Called by `krserve serve` once it is listening. */
int alloc_fault_arm_from_env(void);
/* Disarms; returns 1 if the armed failure happened (0 if it had not yet). */
int alloc_fault_disarm(void);
/* Allocation calls since the last arm/census start (all sites). */
int64_t alloc_fault_calls(void);

#endif
