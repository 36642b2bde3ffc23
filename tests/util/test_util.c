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
        cmocka_unit_test(test_log_threshold_and_sink),
        cmocka_unit_test(test_clock_monotonic),
        cmocka_unit_test(test_pool_runs_every_share),
        cmocka_unit_test(test_pool_run_n_alternating_sizes),
        cmocka_unit_test(test_pool_split_covers_range),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
