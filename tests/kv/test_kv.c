/* kv/: block accounting, all-or-nothing reserve, sliding-window trimming, row addressing. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdlib.h>

#include "krserve.h"
#include "kv/kv.h"

static struct kv_cache *make(int64_t tokens, int64_t swa_tokens, int n_swa)
{
    static const uint8_t swa[4] = {1, 1, 0, 1};
    struct kv_config cfg = {
        .n_layers = 4,
        .layer_is_swa = swa,
        .n_swa = n_swa,
        .n_kv_heads = 2,
        .head_dim = 8,
        .block_size = 4,
        .n_tokens = tokens,
        .n_tokens_swa = swa_tokens,
        .max_seqs = 4,
        .max_ctx = 256,
    };
    struct kv_cache *kv;
    assert_int_equal(kv_create(&cfg, &kv), KRS_OK);
    return kv;
}

static void test_reserve_release_accounting(void **state)
{
    struct kv_cache *kv = make(64, 0, 0); /* n_swa 0: every layer in the full group */
    struct kv_stats st;
    kv_get_stats(kv, &st);
    assert_int_equal(st.full.blocks_total, 16);
    assert_int_equal(st.swa.n_layers, 0);
    assert_int_equal(kv_seq_reserve(kv, 0, 0, 10), KRS_OK); /* 3 blocks */
    assert_int_equal(kv_seq_reserve(kv, 1, 0, 4), KRS_OK);  /* 1 block */
    kv_get_stats(kv, &st);
    assert_int_equal(st.full.blocks_free, 12);
    assert_int_equal(kv_seq_reserve(kv, 0, 10, 12), KRS_OK); /* same block */
    kv_get_stats(kv, &st);
    assert_int_equal(st.full.blocks_free, 12);
    /* All or nothing: 13 blocks do not fit into 12. */
    assert_int_equal(kv_seq_reserve(kv, 2, 0, 52), KRS_ERR_AGAIN);
    kv_get_stats(kv, &st);
    assert_int_equal(st.full.blocks_free, 12);
    assert_int_equal(kv_seq_reserve(kv, 0, 0, 300), KRS_ERR_INVALID); /* past max_ctx */
    kv_seq_release(kv, 0);
    kv_seq_release(kv, 0); /* idempotent */
    kv_seq_release(kv, 1);
    kv_get_stats(kv, &st);
    assert_int_equal(st.full.blocks_free, 16);
    kv_free(kv);
}

/* Held blocks are distinct physical blocks: no two (sequence, logical block) pairs share one,
 * and the tables stay as they were while other sequences come and go. */
static void test_tables_distinct_and_stable(void **state)
{
    struct kv_cache *kv = make(64, 0, 0);
    assert_int_equal(kv_seq_reserve(kv, 0, 0, 8), KRS_OK);
    assert_int_equal(kv_seq_reserve(kv, 1, 0, 8), KRS_OK);
    int bs = kv_block_size(kv), nb = kv_max_blocks(kv);
    int32_t seen[2][8];
    uint8_t used[64] = {0};
    for (int s = 0; s < 2; s++) {
        const int32_t *t = kv_seq_table(kv, 0, s);
        assert_non_null(t);
        for (int b = 0; b < 8 / bs; b++) {
            assert_true(t[b] >= 0 && t[b] < kv_group_blocks(kv, 0));
            assert_false(used[t[b]]);
            used[t[b]] = 1;
            seen[s][b] = t[b];
        }
        for (int b = 8 / bs; b < nb; b++) assert_int_equal(t[b], -1);
        for (int l = 0; l < 4; l++)
            for (int p = 0; p < 8; p++) assert_true(kv_seq_holds(kv, l, s, p));
    }
    assert_int_equal(kv_seq_reserve(kv, 2, 0, 16), KRS_OK);
    kv_seq_release(kv, 2);
    for (int s = 0; s < 2; s++)
        for (int b = 0; b < 8 / bs; b++) assert_int_equal(kv_seq_table(kv, 0, s)[b], seen[s][b]);
    assert_false(kv_seq_holds(kv, 0, 0, 8)); /* not reserved */
    assert_false(kv_seq_holds(kv, 0, 2, 0));
    assert_false(kv_seq_holds(kv, 0, 99, 0)); /* bad slot */
    assert_null(kv_seq_table(kv, 1, 0));      /* no sliding layers */
    kv_free(kv);
}

static void test_sliding_window_trim(void **state)
{
    struct kv_cache *kv = make(256, 64, 8); /* window 8, block 4 */
    struct kv_stats st;
    int64_t full, swa;
    /* Decode one position at a time up to 100: the sliding group never holds more than
     * ceil((window + 1) / block) + 1 blocks, the full group holds them all. */
    for (int p = 0; p < 100; p++) {
        assert_int_equal(kv_seq_reserve(kv, 0, p, p + 1), KRS_OK);
        /* Every position the window can see is held in sliding layers. */
        int64_t lo = p - 8 + 1 < 0 ? 0 : p - 8 + 1;
        for (int64_t q = lo; q <= p; q++) assert_true(kv_seq_holds(kv, 0, 0, q));
        kv_seq_trim(kv, 0, p + 1);
        kv_seq_blocks_held(kv, 0, &full, &swa);
        assert_true(swa <= 4);
        assert_int_equal(full, p / 4 + 1);
    }
    assert_true(kv_seq_holds(kv, 2, 0, 0));  /* full layer keeps everything */
    assert_false(kv_seq_holds(kv, 0, 0, 0)); /* sliding layer let it go */
    kv_seq_release(kv, 0);
    kv_get_stats(kv, &st);
    assert_int_equal(st.full.blocks_free, st.full.blocks_total);
    assert_int_equal(st.swa.blocks_free, st.swa.blocks_total);
    kv_free(kv);
}

static void test_random_mix_returns_every_block(void **state)
{
    struct kv_cache *kv = make(128, 64, 8);
    int64_t next[4] = {0};
    srand(7);
    for (int step = 0; step < 5000; step++) {
        int s = rand() % 4;
        int op = rand() % 10;
        if (op == 0) {
            kv_seq_release(kv, s);
            next[s] = 0;
        } else {
            int n = 1 + rand() % 12;
            if (next[s] + n > 256) n = (int)(256 - next[s]);
            if (n <= 0) continue;
            int rc = kv_seq_reserve(kv, s, next[s], next[s] + n);
            assert_true(rc == KRS_OK || rc == KRS_ERR_AGAIN);
            if (rc == KRS_OK) {
                next[s] += n;
                kv_seq_trim(kv, s, next[s]);
            }
        }
    }
    for (int s = 0; s < 4; s++) kv_seq_release(kv, s);
    struct kv_stats st;
    kv_get_stats(kv, &st);
    assert_int_equal(st.full.blocks_free, st.full.blocks_total);
    assert_int_equal(st.swa.blocks_free, st.swa.blocks_total);
    kv_free(kv);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_reserve_release_accounting),
        cmocka_unit_test(test_tables_distinct_and_stable),
        cmocka_unit_test(test_sliding_window_trim),
        cmocka_unit_test(test_random_mix_returns_every_block),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
