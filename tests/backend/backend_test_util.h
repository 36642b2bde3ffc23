/* Helpers shared by the tests of tests/backend: a splitmix64 step for reproducible random
 * inputs and an fp16 store for hand-made quant blocks; with BACKEND_TEST_EXIT_ON_FAILURE
 * defined (the plain-main tests, not the cmocka ones, which fail through cmocka instead),
 * also an allocation and a status check that exit the binary on failure. Header-only. */
#ifndef KRS_TESTS_BACKEND_TEST_UTIL_H
#define KRS_TESTS_BACKEND_TEST_UTIL_H

#include "krserve.h"
#include "quant/quant.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

/* splitmix64: advances *s and returns the next 64 random bits. */
static inline uint64_t test_splitmix(uint64_t *s)
{
    uint64_t z = (*s += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

#ifdef BACKEND_TEST_EXIT_ON_FAILURE
static inline void *xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    if (!p) {
        fprintf(stderr, "out of memory\n");
        exit(1);
    }
    return p;
}

/* Exits the test binary with the call and its status when it does not return KRS_OK. */
#define CHECK(call)                                                                                \
    do {                                                                                           \
        int rc_ = (call);                                                                          \
        if (rc_) {                                                                                 \
            fprintf(stderr, "FAIL %s:%d: %s -> %s\n", __FILE__, __LINE__, #call,                   \
                    krs_status_str(rc_));                                                          \
            exit(1);                                                                               \
        }                                                                                          \
    } while (0)
#endif

/* Stores f as little-endian fp16 at p (a quant block's scale field). */
static inline void put_half(uint8_t *p, float f)
{
    uint16_t v = quant_f32_to_fp16(f);
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
}

#endif
