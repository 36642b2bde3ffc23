/* kv/: the prefix cache — publish, attach, sharing, LRU eviction, the size cap, sliding-window
 * groups, and an invariant check under random traffic. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdlib.h>
#include <string.h>

#include "krserve.h"
#include "kv/kv.h"

#define BS 4

/* Layers 0, 1 and 3 slide when n_swa > 0; layer 2 is always a full layer. */
static struct kv_cache *make(int64_t tokens, int64_t swa_tokens, int n_swa, int64_t cap)
{
    static const uint8_t swa[4] = {1, 1, 0, 1};
    struct kv_config cfg = {
        .n_layers = 4,
        .layer_is_swa = swa,
        .n_swa = n_swa,
        .n_kv_heads = 2,
        .head_dim = 8,
        .block_size = BS,
        .n_tokens = tokens,
        .n_tokens_swa = swa_tokens,
        .max_seqs = 4,
        .max_ctx = 256,
        .prefix_cache = 1,
        .prefix_salt = 42,
        .prefix_max_tokens = cap,
    };
    struct kv_cache *kv;
    assert_int_equal(kv_create(&cfg, &kv), KRS_OK);
    return kv;
}

/* Runs seq over tokens[0..n) the way the scheduler does: chunks of `chunk`, commit after each. */
static void compute(struct kv_cache *kv, int seq, const int32_t *tokens, int64_t from, int64_t n,
                    int chunk)
{
    for (int64_t p = from; p < n; p += chunk) {
        int64_t e = p + chunk < n ? p + chunk : n;
        assert_int_equal(kv_seq_reserve(kv, seq, p, e), KRS_OK);
        kv_seq_commit(kv, seq, tokens, e);
    }
}

static void fill(int32_t *t, int n, int seed)
{
    for (int i = 0; i < n; i++) t[i] = 100 + (seed * 7919 + i * 31) % 1000;
}

static void test_attach_shares_published_blocks(void **state)
{
    struct kv_cache *kv = make(64, 0, 0, 0);
    int32_t a[16], b[16];
    fill(a, 16, 1);
    memcpy(b, a, sizeof b);
    b[13] = 7; /* b diverges inside block 3 */
    int64_t got;
    assert_int_equal(kv_seq_attach_prefix(kv, 0, a, 10, &got), KRS_OK);
    assert_int_equal(got, 0); /* empty cache */
    compute(kv, 0, a, 0, 10, 3);
    struct kv_stats st;
    kv_get_stats(kv, &st);
    assert_int_equal(st.full.blocks_cached, 2); /* blocks 0, 1; block 2 is partial */
    assert_int_equal(kv_seq_attach_prefix(kv, 1, b, 16, &got), KRS_OK);
    assert_int_equal(got, 8);
    const int32_t *t0 = kv_seq_table(kv, 0, 0), *t1 = kv_seq_table(kv, 0, 1);
    assert_int_equal(t1[0], t0[0]);
    assert_int_equal(t1[1], t0[1]);
    assert_int_equal(t1[2], -1);
    int64_t full, swa;
    kv_seq_blocks_held(kv, 1, &full, &swa);
    assert_int_equal(full, 2);
    /* Seq 1 computes on from 8 into blocks of its own; seq 0 finishes block 2 and 3. */
    compute(kv, 1, b, 8, 16, 8);
    assert_true(kv_seq_table(kv, 0, 1)[2] != t0[2] || t0[2] < 0);
    compute(kv, 0, a, 10, 16, 6);
    /* Block 2 of a and b hold the same tokens after the same prefix: one entry, and the second
     * publisher keeps its block private. Block 3 differs. */
    kv_get_stats(kv, &st);
    assert_int_equal(st.full.blocks_cached, 2 + 1 + 2);
    assert_int_equal(st.prefix.lookups, 2);
    assert_int_equal(st.prefix.hits, 1);
    assert_int_equal(st.prefix.hit_tokens, 8);
    /* A sequence that holds blocks cannot attach. */
    assert_int_equal(kv_seq_attach_prefix(kv, 1, b, 16, &got), KRS_ERR_INVALID);
    kv_seq_release(kv, 0);
    kv_seq_release(kv, 1);
    kv_get_stats(kv, &st);
    assert_int_equal(st.full.blocks_free, st.full.blocks_total);
    assert_int_equal(st.full.blocks_evictable, st.full.blocks_cached);
    /* Everything cached: a third sequence attaches a's whole 16 tokens but the last block
     * (at least one token is always left to compute). */
    assert_int_equal(kv_seq_attach_prefix(kv, 2, a, 16, &got), KRS_OK);
    assert_int_equal(got, 12);
    assert_int_equal(kv_seq_attach_prefix(kv, 3, a, 17, &got), KRS_OK);
    assert_int_equal(got, 16);
    kv_free(kv);
}

/* The same block content after a different prefix is a different block. */
static void test_chain_identity(void **state)
{
    struct kv_cache *kv = make(64, 0, 0, 0);
    int32_t a[12], b[12];
    fill(a, 12, 2);
    memcpy(b, a, sizeof b);
    b[0] = 9999;
    compute(kv, 0, a, 0, 12, 12);
    kv_seq_release(kv, 0);
    int64_t got;
    assert_int_equal(kv_seq_attach_prefix(kv, 1, b, 12, &got), KRS_OK);
    assert_int_equal(got, 0);
    assert_int_equal(kv_seq_attach_prefix(kv, 2, a, 5, &got), KRS_OK);
    assert_int_equal(got, 4);
    assert_int_equal(kv_seq_attach_prefix(kv, 3, a, 4, &got), KRS_OK);
    assert_int_equal(got, 0); /* 4 tokens: one block, which would leave nothing to compute */
    kv_free(kv);
}

/* A reserve that needs memory evicts the least recently used unheld block, the end of a chain
 * before its beginning; attaching then finds the shorter prefix. */
static void test_eviction_under_pressure(void **state)
{
    struct kv_cache *kv = make(32, 0, 0, 0); /* 8 blocks */
    int32_t a[32], c[32];
    fill(a, 32, 3);
    fill(c, 32, 4);
    compute(kv, 0, a, 0, 24, 8); /* 6 blocks */
    kv_seq_release(kv, 0);
    struct kv_stats st;
    kv_get_stats(kv, &st);
    assert_int_equal(st.full.blocks_free, 8);
    assert_int_equal(st.full.blocks_evictable, 6);
    /* 4 blocks for c: 2 free ones, then 2 evicted from a's tail (blocks 5 and 4). */
    compute(kv, 1, c, 0, 16, 16);
    kv_get_stats(kv, &st);
    assert_int_equal(st.full.evictions, 2);
    int64_t got;
    assert_int_equal(kv_seq_attach_prefix(kv, 2, a, 24, &got), KRS_OK);
    assert_int_equal(got, 16);
    /* Held blocks are never evicted: 8 total, 4 held by c, 4 by seq 2 → nothing left. */
    assert_int_equal(kv_seq_reserve(kv, 3, 0, 4), KRS_ERR_AGAIN);
    kv_seq_release(kv, 1);
    kv_seq_release(kv, 2);
    kv_get_stats(kv, &st);
    assert_int_equal(st.full.blocks_free, 8);
    assert_int_equal(st.full.blocks_cached, 8);
    kv_free(kv);
}

static void test_size_cap(void **state)
{
    struct kv_cache *kv = make(64, 0, 0, 2 * BS);
    int32_t a[24];
    fill(a, 24, 5);
    compute(kv, 0, a, 0, 24, 24);
    struct kv_stats st;
    kv_get_stats(kv, &st);
    assert_int_equal(st.full.blocks_cached, 6); /* held blocks are not capped */
    kv_seq_release(kv, 0);
    kv_get_stats(kv, &st);
    assert_int_equal(st.full.blocks_evictable, 2);
    assert_int_equal(st.full.evictions, 4);
    int64_t got;
    assert_int_equal(kv_seq_attach_prefix(kv, 1, a, 24, &got), KRS_OK);
    assert_int_equal(got, 2 * BS); /* the chain's beginning survived */
    kv_free(kv);
}

/* Sliding layers: a trimmed block stays cached, an attach takes only the window's blocks, and a
 * missing window block shortens the usable prefix. */
static void test_sliding_window(void **state)
{
    struct kv_cache *kv = make(256, 64, 6, 0);
    int32_t a[40];
    fill(a, 40, 6);
    compute(kv, 0, a, 0, 30, 5);
    int64_t full, swa;
    kv_seq_blocks_held(kv, 0, &full, &swa);
    assert_int_equal(full, 8);
    assert_int_equal(swa, 2); /* the next query (30) sees 25..30: blocks 6, 7 */
    struct kv_stats st;
    kv_get_stats(kv, &st);
    assert_int_equal(st.swa.blocks_cached, 7); /* blocks 0..6 complete, trimmed ones kept */
    kv_seq_release(kv, 0);
    int64_t got;
    assert_int_equal(kv_seq_attach_prefix(kv, 1, a, 40, &got), KRS_OK);
    assert_int_equal(got, 28);
    kv_seq_blocks_held(kv, 1, &full, &swa);
    assert_int_equal(full, 7);
    /* Position 28 sees 23..28: sliding blocks 5 and 6 only. */
    assert_int_equal(swa, 2);
    assert_int_equal(kv_seq_table(kv, 1, 1)[4], -1);
    assert_true(kv_seq_table(kv, 1, 1)[5] >= 0);
    for (int l = 0; l < 4; l++) assert_int_equal(kv_seq_holds(kv, l, 1, 27), 1);
    kv_seq_release(kv, 1);
    /* Take the whole sliding pool: every cached sliding block is evicted, so no prefix is
     * usable any more although the full-layer blocks are all there. */
    assert_int_equal(kv_seq_reserve(kv, 2, 0, 8), KRS_OK);
    kv_get_stats(kv, &st);
    assert_int_equal(kv_seq_reserve(kv, 3, 60, 60 + st.swa.blocks_free * BS - 8), KRS_OK);
    kv_get_stats(kv, &st);
    assert_int_equal(st.swa.blocks_free, 0);
    assert_int_equal(kv_seq_attach_prefix(kv, 1, a, 40, &got), KRS_OK);
    assert_int_equal(got, 0);
    kv_free(kv);
}

static void test_disabled(void **state)
{
    struct kv_config cfg = {.n_layers = 2,
                            .n_kv_heads = 1,
                            .head_dim = 4,
                            .block_size = BS,
                            .n_tokens = 64,
                            .max_seqs = 2,
                            .max_ctx = 64};
    struct kv_cache *kv;
    assert_int_equal(kv_create(&cfg, &kv), KRS_OK);
    int32_t a[16];
    fill(a, 16, 7);
    compute(kv, 0, a, 0, 16, 16);
    kv_seq_release(kv, 0);
    int64_t got;
    assert_int_equal(kv_seq_attach_prefix(kv, 1, a, 16, &got), KRS_OK);
    assert_int_equal(got, 0);
    struct kv_stats st;
    kv_get_stats(kv, &st);
    assert_int_equal(st.full.blocks_cached, 0);
    assert_int_equal(st.prefix.enabled, 0);
    kv_free(kv);
}

/* Random traffic over a few prompt families, against a shadow of what each physical block
 * holds: the block accounting always adds up, a sequence never writes a block another table
 * holds, and every attached block holds exactly the KV of the attaching prompt's prefix. */
static uint64_t shadow[2][512]; /* prefix hash of a complete block's content, 0 = partial */

static uint64_t prefix_hash(const int32_t *t, int64_t n)
{
    uint64_t h = 1469598103934665603ull;
    for (int64_t i = 0; i < n; i++) h = (h ^ (uint32_t)t[i]) * 1099511628211ull;
    return h | 1;
}

static int held_elsewhere(struct kv_cache *kv, int g, int seq, int32_t phys)
{
    for (int s = 0; s < 4; s++) {
        if (s == seq) continue;
        const int32_t *t = kv_seq_table(kv, g, s);
        for (int b = 0; b < kv_max_blocks(kv); b++)
            if (t[b] == phys) return 1;
    }
    return 0;
}

static void check_invariants(struct kv_cache *kv)
{
    struct kv_stats st;
    kv_get_stats(kv, &st);
    for (int g = 0; g < 2; g++) {
        int64_t total = kv_group_blocks(kv, g);
        if (!total) continue;
        int refs[512] = {0};
        for (int s = 0; s < 4; s++) {
            const int32_t *t = kv_seq_table(kv, g, s);
            int64_t n = 0, held[2];
            for (int b = 0; b < kv_max_blocks(kv); b++)
                if (t[b] >= 0) {
                    assert_true(t[b] < total);
                    refs[t[b]]++;
                    n++;
                }
            kv_seq_blocks_held(kv, s, &held[0], &held[1]);
            assert_int_equal(n, held[g]);
        }
        int64_t distinct = 0;
        for (int64_t b = 0; b < total; b++) distinct += refs[b] > 0;
        const struct kv_group_stats *gs = g ? &st.swa : &st.full;
        assert_int_equal(distinct + gs->blocks_free, total);
        assert_true(gs->blocks_evictable <= gs->blocks_cached);
    }
}

static void test_random_traffic(void **state)
{
    struct kv_cache *kv = make(160, 96, 10, 0);
    srand(1234);
    int32_t fam[3][64];
    for (int f = 0; f < 3; f++) fill(fam[f], 64, 10 + f);
    int32_t cur[4][64];
    int64_t done[4] = {0}, len[4] = {0}, attached = 0;
    for (int it = 0; it < 6000; it++) {
        int s = rand() % 4;
        if (len[s] == 0) {
            memcpy(cur[s], fam[rand() % 3], sizeof cur[s]);
            int div = rand() % 64;
            for (int i = div; i < 64; i++) cur[s][i] = 2000 + rand() % 2;
            len[s] = 1 + rand() % 63;
            int64_t got;
            assert_int_equal(kv_seq_attach_prefix(kv, s, cur[s], len[s], &got), KRS_OK);
            assert_true(got % BS == 0 && got < len[s] && got >= 0);
            for (int g = 0; g < 2; g++)
                for (int64_t j = 0; j < got / BS; j++) {
                    int32_t phys = kv_seq_table(kv, g, s)[j];
                    if (phys < 0) continue;
                    assert_true(shadow[g][phys] == prefix_hash(cur[s], (j + 1) * BS));
                }
            for (int l = 0; l < 4 && got; l++) assert_int_equal(kv_seq_holds(kv, l, s, got - 1), 1);
            attached += got;
            done[s] = got;
        } else if (done[s] < len[s]) {
            int64_t e = done[s] + 1 + rand() % 9;
            if (e > len[s]) e = len[s];
            if (kv_seq_reserve(kv, s, done[s], e) == KRS_OK) {
                for (int g = 0; g < 2; g++)
                    for (int64_t b = done[s] / BS; b <= (e - 1) / BS; b++) {
                        int32_t phys = kv_seq_table(kv, g, s)[b];
                        if (!kv_group_blocks(kv, g)) continue;
                        assert_true(phys >= 0);
                        assert_false(held_elsewhere(kv, g, s, phys));
                        shadow[g][phys] = (b + 1) * BS <= e ? prefix_hash(cur[s], (b + 1) * BS) : 0;
                    }
                kv_seq_commit(kv, s, cur[s], e);
                done[s] = e;
            } else {
                kv_seq_release(kv, s); /* "preempted" */
                len[s] = 0;
            }
        } else {
            kv_seq_release(kv, s);
            len[s] = 0;
        }
        check_invariants(kv);
    }
    struct kv_stats st;
    kv_get_stats(kv, &st);
    assert_true(st.prefix.hits > 100);
    assert_int_equal(st.prefix.hit_tokens, attached);
    assert_true(st.full.evictions > 0 && st.swa.evictions > 0);
    kv_free(kv);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_attach_shares_published_blocks),
        cmocka_unit_test(test_chain_identity),
        cmocka_unit_test(test_eviction_under_pressure),
        cmocka_unit_test(test_size_cap),
        cmocka_unit_test(test_sliding_window),
        cmocka_unit_test(test_disabled),
        cmocka_unit_test(test_random_traffic),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
