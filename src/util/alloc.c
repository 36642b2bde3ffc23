/* Counted allocation: a size header per block and relaxed atomic counters, and the test-only
 * fault injector (one armed failure, chosen by call site or by count). Nothing here may call
 * the logger or anything else that allocates. */
#include "util/alloc.h"

#include <pthread.h>
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

/* ---- fault injection ---------------------------------------------------------------------- */

enum { FAULT_OFF = 0, FAULT_CENSUS, FAULT_NEW_SITE, FAULT_SITE, FAULT_NTH, FAULT_EVERY };

#define SITE_HASH (2 * ALLOC_FAULT_MAX_SITES)

static _Atomic int fault_mode;
static _Atomic int64_t fault_calls;     /* every allocation since arm / census start */
static _Atomic int64_t fault_site_hits; /* allocations from fault_site since arm */
static _Atomic int fault_fired;
static _Atomic uintptr_t fault_site; /* set while the mode is off, then the mode (release) */
static _Atomic int64_t fault_target; /* FAULT_SITE: skip; FAULT_NTH: n */

static pthread_mutex_t census_lock = PTHREAD_MUTEX_INITIALIZER;
static uintptr_t census_sites[ALLOC_FAULT_MAX_SITES];
static int64_t census_hits[ALLOC_FAULT_MAX_SITES];
static int census_n;
static int census_slot[SITE_HASH]; /* index + 1 into census_sites, 0 = empty */

/* Counts a call from site; returns the site's 1-based index when it is new, else 0. */
static int census_note(uintptr_t site)
{
    int added = 0;
    pthread_mutex_lock(&census_lock);
    size_t h = (size_t)((site * 0x9E3779B97F4A7C15ull) >> 20) % SITE_HASH;
    for (;;) {
        int k = census_slot[h];
        if (k == 0) {
            if (census_n < ALLOC_FAULT_MAX_SITES) {
                census_sites[census_n] = site;
                census_hits[census_n] = 1;
                census_slot[h] = ++census_n;
                added = census_n;
            }
            break;
        }
        if (census_sites[k - 1] == site) {
            census_hits[k - 1]++;
            break;
        }
        h = (h + 1) % SITE_HASH;
    }
    pthread_mutex_unlock(&census_lock);
    return added;
}

/* 1 when the allocation from `site` must fail. */
static int fault_hit(uintptr_t site)
{
    int mode = atomic_load_explicit(&fault_mode, memory_order_acquire);
    if (mode == FAULT_OFF) return 0;
    int64_t k = atomic_fetch_add_explicit(&fault_calls, 1, memory_order_relaxed) + 1;
    if (mode == FAULT_CENSUS || mode == FAULT_NEW_SITE) {
        int added = census_note(site);
        if (mode == FAULT_CENSUS || !added ||
            added != atomic_load_explicit(&fault_target, memory_order_relaxed))
            return 0;
        atomic_store_explicit(&fault_fired, 1, memory_order_relaxed);
        return 1;
    }
    if (mode == FAULT_NTH) {
        if (k != atomic_load_explicit(&fault_target, memory_order_relaxed)) return 0;
    } else if (mode == FAULT_EVERY) {
        if (k % atomic_load_explicit(&fault_target, memory_order_relaxed) != 0) return 0;
    } else {
        if (site != atomic_load_explicit(&fault_site, memory_order_relaxed)) return 0;
        if (atomic_fetch_add_explicit(&fault_site_hits, 1, memory_order_relaxed) !=
            atomic_load_explicit(&fault_target, memory_order_relaxed))
            return 0;
    }
    atomic_store_explicit(&fault_fired, 1, memory_order_relaxed);
    return 1;
}

static void fault_set(int mode, uintptr_t site, int64_t target)
{
    atomic_store_explicit(&fault_mode, FAULT_OFF, memory_order_release);
    atomic_store_explicit(&fault_site, site, memory_order_relaxed);
    atomic_store_explicit(&fault_target, target, memory_order_relaxed);
    atomic_store_explicit(&fault_calls, 0, memory_order_relaxed);
    atomic_store_explicit(&fault_site_hits, 0, memory_order_relaxed);
    atomic_store_explicit(&fault_fired, 0, memory_order_relaxed);
    atomic_store_explicit(&fault_mode, mode, memory_order_release);
}

static void census_clear(void)
{
    pthread_mutex_lock(&census_lock);
    census_n = 0;
    memset(census_slot, 0, sizeof census_slot);
    pthread_mutex_unlock(&census_lock);
}

void alloc_fault_census_start(void)
{
    census_clear();
    fault_set(FAULT_CENSUS, 0, 0);
}

void alloc_fault_arm_new_site(int64_t n)
{
    census_clear();
    fault_set(n > 0 ? FAULT_NEW_SITE : FAULT_CENSUS, 0, n);
}

int alloc_fault_census_count(void)
{
    pthread_mutex_lock(&census_lock);
    int n = census_n;
    pthread_mutex_unlock(&census_lock);
    return n;
}

int alloc_fault_census_stop(uintptr_t *sites, int64_t *hits, int cap)
{
    atomic_store_explicit(&fault_mode, FAULT_OFF, memory_order_release);
    pthread_mutex_lock(&census_lock);
    int n = census_n;
    for (int i = 0; i < n && i < cap; i++) {
        sites[i] = census_sites[i];
        if (hits) hits[i] = census_hits[i];
    }
    pthread_mutex_unlock(&census_lock);
    return n;
}

void alloc_fault_arm_site(uintptr_t site, int64_t skip)
{
    fault_set(FAULT_SITE, site, skip);
}

void alloc_fault_arm_nth(int64_t n)
{
    fault_set(FAULT_NTH, 0, n);
}

void alloc_fault_arm_every(int64_t k)
{
    fault_set(k > 0 ? FAULT_EVERY : FAULT_OFF, 0, k);
}

int alloc_fault_arm_from_env(void)
{
    const char *every = getenv("KRSERVE_FAULT_ALLOC_EVERY");
    const char *site = getenv("KRSERVE_FAULT_ALLOC_SITE");
    if (every && *every) {
        alloc_fault_arm_every(strtoll(every, NULL, 10));
        return 1;
    }
    if (site && *site) {
        alloc_fault_arm_new_site(strtoll(site, NULL, 10));
        return 1;
    }
    return 0;
}

int alloc_fault_disarm(void)
{
    atomic_store_explicit(&fault_mode, FAULT_OFF, memory_order_release);
    return atomic_load_explicit(&fault_fired, memory_order_relaxed);
}

int64_t alloc_fault_calls(void)
{
    return atomic_load_explicit(&fault_calls, memory_order_relaxed);
}

/* ---- counted allocation --------------------------------------------------------------------- */

#define CALLER() ((uintptr_t)__builtin_return_address(0))

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

static void *malloc_at(size_t size, uintptr_t site)
{
    if (size > SIZE_MAX - HDR || fault_hit(site)) return finish(NULL, 0);
    return finish(malloc(size + HDR), size);
}

void *alloc_malloc(size_t size)
{
    return malloc_at(size, CALLER());
}

void *alloc_calloc(size_t n, size_t size)
{
    if ((size && n > (SIZE_MAX - HDR) / size) || fault_hit(CALLER())) return finish(NULL, 0);
    return finish(calloc(1, n * size + HDR), n * size);
}

void *alloc_realloc(void *ptr, size_t size)
{
    if (!ptr) return malloc_at(size, CALLER());
    if (size > SIZE_MAX - HDR || fault_hit(CALLER())) return finish(NULL, 0);
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

static char *strndup_at(const char *s, size_t n, uintptr_t site)
{
    size_t len = strnlen(s, n);
    char *d = malloc_at(len + 1, site);
    if (!d) return NULL;
    memcpy(d, s, len);
    d[len] = '\0';
    return d;
}

char *alloc_strndup(const char *s, size_t n)
{
    return strndup_at(s, n, CALLER());
}

char *alloc_strdup(const char *s)
{
    return strndup_at(s, SIZE_MAX, CALLER());
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
    if (size > SIZE_MAX - alignment || fault_hit(CALLER())) return finish(NULL, 0);
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
