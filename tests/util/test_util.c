/* util/: counted allocation, logging sink and threshold, monotonic clock, thread pool. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdatomic.h>
#include <stdio.h>
#include <string.h>

#include "util/alloc.h"
#include "util/clock.h"
#include "util/log.h"
#include "util/threadpool.h"

static void test_alloc_counts(void **state)
{
    struct alloc_stats a, b, c;
    alloc_get_stats(&a);
    void *p = alloc_malloc(1000);
    void *q = alloc_aligned(64, 4096);
    assert_non_null(p);
    assert_non_null(q);
    assert_int_equal((uintptr_t)q % 64, 0);
    alloc_get_stats(&b);
    assert_int_equal(b.bytes_in_use - a.bytes_in_use, 1000 + 4096);
    assert_int_equal(b.blocks_in_use - a.blocks_in_use, 2);
    p = alloc_realloc(p, 50);
    alloc_get_stats(&c);
    assert_int_equal(c.bytes_in_use - a.bytes_in_use, 50 + 4096);
    alloc_free(p);
    alloc_aligned_free(q);
    alloc_get_stats(&c);
    assert_int_equal(c.bytes_in_use, a.bytes_in_use);
    assert_int_equal(c.blocks_in_use, a.blocks_in_use);
    /* Overflowing requests fail cleanly and are counted. */
    assert_null(alloc_calloc(SIZE_MAX / 2, 4));
    alloc_get_stats(&c);
    assert_int_equal(c.oom_events, a.oom_events + 1);
}

/* Two distinct allocation sites (noinline, and no tail call: each keeps its own return
 * address whoever calls it). */
static __attribute__((noinline)) void *site_a(size_t n)
{
    void *volatile p = alloc_malloc(n);
    return p;
}
static __attribute__((noinline)) char *site_b(const char *s)
{
    char *volatile p = alloc_strdup(s);
    return p;
}

static void test_alloc_fault_injection(void **state)
{
    struct alloc_stats a, b;
    alloc_get_stats(&a);
    /* Census: both sites, in order of first use, with their hit counts. */
    alloc_fault_census_start();
    void *p[4];
    p[0] = site_a(8);
    p[1] = site_b("x");
    p[2] = site_a(8);
    p[3] = site_b("y");
    uintptr_t sites[8];
    int64_t hits[8];
    int n = alloc_fault_census_stop(sites, hits, 8);
    assert_int_equal(n, 2);
    assert_int_equal(hits[0], 2);
    assert_int_equal(hits[1], 2);
    assert_true(sites[0] != sites[1]);
    for (int i = 0; i < 4; i++) alloc_free(p[i]);

    /* By site: the second call from site_b fails, nothing else. */
    alloc_fault_arm_site(sites[1], 1);
    p[0] = site_b("first");
    p[1] = site_a(16);
    p[2] = site_b("second");
    p[3] = site_b("third");
    assert_int_equal(alloc_fault_calls(), 4);
    assert_true(alloc_fault_disarm());
    assert_non_null(p[0]);
    assert_non_null(p[1]);
    assert_null(p[2]);
    assert_non_null(p[3]);
    for (int i = 0; i < 4; i++) alloc_free(p[i]);

    /* By count: the 3rd allocation from any site fails, including realloc and aligned. */
    alloc_fault_arm_nth(3);
    p[0] = site_a(8);
    p[1] = alloc_realloc(p[0], 64);
    p[2] = alloc_aligned(64, 128);
    assert_non_null(p[1]);
    assert_null(p[2]);
    assert_true(alloc_fault_disarm());
    alloc_free(p[1]);
    /* A failed realloc keeps the old block. */
    p[0] = site_a(8);
    alloc_fault_arm_nth(1);
    assert_null(alloc_realloc(p[0], 4096));
    assert_true(alloc_fault_disarm());
    alloc_free(p[0]);

    /* By new site: the first call of the 2nd distinct site met from now fails, once. */
    alloc_fault_arm_new_site(2);
    p[0] = site_a(8);
    p[1] = site_a(8);
    p[2] = site_b("new");
    p[3] = site_b("again");
    assert_true(alloc_fault_disarm());
    assert_int_equal(alloc_fault_census_count(), 2);
    assert_non_null(p[0]);
    assert_non_null(p[1]);
    assert_null(p[2]);
    assert_non_null(p[3]);
    for (int i = 0; i < 4; i++) alloc_free(p[i]);

    /* Armed but never reached: reported as not fired; disarmed: nothing fails. */
    alloc_fault_arm_nth(1000);
    p[0] = site_a(8);
    assert_false(alloc_fault_disarm());
    assert_non_null(p[0]);
    alloc_free(p[0]);

    alloc_get_stats(&b);
    assert_int_equal(b.blocks_in_use, a.blocks_in_use);
    assert_int_equal(b.bytes_in_use, a.bytes_in_use);
    assert_int_equal(b.oom_events, a.oom_events + 4);
}

static int sink_calls;
static char sink_last[256];
static void sink(void *user, enum krs_log_level level, const char *msg)
{
    (void)user;
    (void)level;
    sink_calls++;
    snprintf(sink_last, sizeof sink_last, "%s", msg);
}

static int evaluated;
static int side_effect(void)
{
    return ++evaluated;
}

static void test_log_threshold_and_sink(void **state)
{
    log_set_sink(sink, NULL);
    log_set_level(KRS_LOG_WARN);
    KRS_LOG_INFOF("hidden %d", side_effect());
    assert_int_equal(evaluated, 0); /* arguments below the threshold are not evaluated */
    KRS_LOG_WARNF("shown %d", 7);
    assert_int_equal(sink_calls, 1);
    assert_string_equal(sink_last, "shown 7");
    enum krs_log_level l;
    assert_int_equal(log_parse_level("debug", &l), 0);
    assert_int_equal(l, KRS_LOG_DEBUG);
    assert_int_equal(log_parse_level("loud", &l), -1);
    log_set_sink(NULL, NULL);
    log_set_level(KRS_LOG_INFO);
}

static void test_clock_monotonic(void **state)
{
    uint64_t a = clock_now_ns();
    clock_sleep_us(2000);
    uint64_t b = clock_now_ns();
    assert_true(b - a >= 2000000u);
}

struct sum_ctx {
    long n;
    _Atomic long total;
    _Atomic int calls[8];
};

static void sum_task(void *p, int ith, int nth)
{
    struct sum_ctx *ctx = p;
    long b, e, s = 0;
    pool_split(ctx->n, ith, nth, &b, &e);
    for (long i = b; i < e; i++) s += i;
    atomic_fetch_add(&ctx->total, s);
    atomic_fetch_add(&ctx->calls[ith], 1);
}

static void test_pool_runs_every_share(void **state)
{
    struct pool *pool;
    assert_int_equal(pool_create(4, &pool), 0);
    assert_int_equal(pool_size(pool), 4);
    for (int round = 0; round < 2000; round++) {
        struct sum_ctx ctx = {.n = 1000 + round};
        pool_run(pool, sum_task, &ctx);
        assert_int_equal(atomic_load(&ctx.total), ctx.n * (ctx.n - 1) / 2);
        for (int t = 0; t < 4; t++) assert_int_equal(atomic_load(&ctx.calls[t]), 1);
        if (round == 1000) clock_sleep_us(20000); /* let workers fall asleep once */
    }
    pool_destroy(pool);
}

/* Jobs on 1..4 of 4 threads, sizes changing every call: each share runs exactly once, threads
 * past n_active never run (a worker that skipped one job must not run the next one twice). */
static void test_pool_run_n_alternating_sizes(void **state)
{
    struct pool *pool;
    assert_int_equal(pool_create(4, &pool), 0);
    for (int round = 0; round < 20000; round++) {
        int n_active = 1 + (round * 7 + round / 3) % 4;
        struct sum_ctx ctx = {.n = 100 + round % 50};
        pool_run_n(pool, n_active, sum_task, &ctx);
        assert_int_equal(atomic_load(&ctx.total), ctx.n * (ctx.n - 1) / 2);
        for (int t = 0; t < 4; t++) assert_int_equal(atomic_load(&ctx.calls[t]), t < n_active);
        if (round == 10000) clock_sleep_us(20000); /* let workers fall asleep once */
    }
    pool_destroy(pool);
}

/* A dynamic job: units claimed from a counter by whoever takes part. */
struct claim_ctx {
    long units;
    _Atomic long next;
    _Atomic int hits[256];
    _Atomic int calls[8];
    int slow_ith; /* this thread, once it has joined, stalls before claiming */
};

static void claim_task(void *p, int ith, int nth)
{
    struct claim_ctx *ctx = p;
    (void)nth;
    atomic_fetch_add(&ctx->calls[ith], 1);
    if (ith == ctx->slow_ith) clock_sleep_us(200);
    for (;;) {
        long u = atomic_fetch_add(&ctx->next, 1);
        if (u >= ctx->units) break;
        atomic_fetch_add(&ctx->hits[u], 1);
    }
}

/* Every unit is done exactly once, by any subset of the threads: each thread runs at most
 * once and never past n_active; the caller always takes part; a thread that joined and stalls
 * is waited for (its claims are done before the call returns). Dynamic and static jobs
 * alternate, so a worker that skipped a dynamic job still runs its static share. */
static void test_pool_dynamic_jobs(void **state)
{
    struct pool *pool;
    assert_int_equal(pool_create(4, &pool), 0);
    for (int round = 0; round < 20000; round++) {
        int n_active = 1 + (round * 5 + round / 7) % 4;
        struct claim_ctx ctx = {.units = 1 + round % 256, .slow_ith = round % 97 == 0 ? 1 : -1};
        pool_run_dynamic(pool, n_active, claim_task, &ctx);
        for (long u = 0; u < ctx.units; u++) assert_int_equal(atomic_load(&ctx.hits[u]), 1);
        assert_int_equal(atomic_load(&ctx.calls[0]), 1);
        for (int t = 1; t < 4; t++) assert_true(atomic_load(&ctx.calls[t]) <= (t < n_active));
        if (round % 3 == 0) {
            struct sum_ctx sc = {.n = 100 + round % 50};
            pool_run_n(pool, n_active, sum_task, &sc);
            assert_int_equal(atomic_load(&sc.total), sc.n * (sc.n - 1) / 2);
            for (int t = 0; t < 4; t++) assert_int_equal(atomic_load(&sc.calls[t]), t < n_active);
        }
        if (round == 10000) clock_sleep_us(20000); /* let workers fall asleep once */
    }
    pool_destroy(pool);
}

static void test_pool_split_covers_range(void **state)
{
    for (int nth = 1; nth <= 7; nth++) {
        long next = 0;
        for (int i = 0; i < nth; i++) {
            long b, e;
            pool_split(10, i, nth, &b, &e);
            assert_int_equal(b, next);
            next = e;
        }
        assert_int_equal(next, 10);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_alloc_counts),
        cmocka_unit_test(test_alloc_fault_injection),
        cmocka_unit_test(test_log_threshold_and_sink),
        cmocka_unit_test(test_clock_monotonic),
        cmocka_unit_test(test_pool_runs_every_share),
        cmocka_unit_test(test_pool_run_n_alternating_sizes),
        cmocka_unit_test(test_pool_dynamic_jobs),
        cmocka_unit_test(test_pool_split_covers_range),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
