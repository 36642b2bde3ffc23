/* model/: batch invariance and KV accounting on the default model (Gemma 3 270M).
 *
 * A sequence's logits must not depend on what else shares its batch: sequence A is run alone
 * (prompt prefill, then decode steps) and again inside batches of 8 sequences of different
 * lengths that mix prefill chunks and decodes. Skipped when the default model is absent. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "krserve.h"
#include "kv/kv.h"
#include "model/model.h"
#include "test_model_path.h"
#include "util/alloc.h"

static struct model *model;
static char model_path[4096];

static int setup(void **state)
{
    test_model_path(model_path, sizeof model_path);
    char err[256];
    if (model_load(model_path, &model, err, sizeof err) != KRS_OK) model = NULL;
    return 0;
}

static int teardown(void **state)
{
    model_free(model);
    return 0;
}

#define NSEQ  8
#define NSTEP 4

static int32_t tok_of(int s, int i)
{
    int n_vocab = model_hparams(model)->n_vocab;
    int span = n_vocab > 50100 ? 50000 : n_vocab - 100; /* skip the special/byte ids */
    return (int32_t)((1000 + 37 * s + 11 * i) % span + 100);
}

/* Runs A (seq 0: prompt of 13 tokens then NSTEP decodes of fixed ids) in a context; when
 * `crowd` is set, seven more sequences of other lengths share every batch: some prefill in
 * chunks while A decodes. Writes A's logits for each decode step into out[NSTEP][n_vocab]. */
static void run_a(struct model_ctx *ctx, int crowd, float *out)
{
    const int n_vocab = model_hparams(model)->n_vocab;
    struct kv_cache *kv = model_ctx_kv(ctx);
    int plen[NSEQ] = {13, 5, 40, 1, 22, 9, 31, 17};
    int done[NSEQ] = {0};
    int32_t tokens[256], pos[256], seq[256];
    uint8_t want[256];
    for (int step = 0; step <= NSTEP; step++) {
        int T = 0, a_row = -1, rows = 0;
        for (int s = 0; s < (crowd ? NSEQ : 1); s++) {
            /* A: its whole prompt at step 0, then one token per step. Others: chunks of up to
             * 7 prompt tokens, then decodes. */
            int n = s == 0 ? (step == 0 ? plen[0] : 1) : (done[s] < plen[s] ? 7 : 1);
            if (s && done[s] < plen[s] && done[s] + n > plen[s]) n = plen[s] - done[s];
            assert_int_equal(kv_seq_reserve(kv, s, done[s], done[s] + n), KRS_OK);
            for (int i = 0; i < n; i++) {
                tokens[T] = tok_of(s, done[s] + i);
                pos[T] = done[s] + i;
                seq[T] = s;
                want[T] = i == n - 1;
                if (want[T] && s == 0) a_row = rows;
                rows += want[T];
                T++;
            }
            done[s] += n;
        }
        struct model_batch b = {T, tokens, pos, seq, want};
        const float *logits;
        int n_out;
        assert_int_equal(model_forward(ctx, &b, &logits, &n_out), KRS_OK);
        assert_int_equal(n_out, rows);
        if (step > 0)
            memcpy(out + (size_t)(step - 1) * n_vocab, logits + (size_t)a_row * n_vocab,
                   (size_t)n_vocab * sizeof(float));
        for (int s = 0; s < (crowd ? NSEQ : 1); s++) kv_seq_trim(kv, s, done[s]);
    }
    for (int s = 0; s < NSEQ; s++) kv_seq_release(kv, s);
    struct kv_stats st;
    kv_get_stats(kv, &st);
    assert_int_equal(st.full.blocks_free, st.full.blocks_total);
    assert_int_equal(st.swa.blocks_free, st.swa.blocks_total);
}

static void test_batch_invariance(void **state)
{
    if (!model) skip();
    const int n_vocab = model_hparams(model)->n_vocab;
    struct model_ctx_params p = {
        .max_batch_tokens = 128, .max_seqs = NSEQ, .kv_tokens = 2048, .max_ctx = 512};
    struct model_ctx *ctx;
    char err[256];
    assert_int_equal(model_ctx_create(model, &p, &ctx, err, sizeof err), KRS_OK);
    float *alone = alloc_malloc((size_t)NSTEP * n_vocab * sizeof(float));
    float *crowd = alloc_malloc((size_t)NSTEP * n_vocab * sizeof(float));
    run_a(ctx, 0, alone);
    run_a(ctx, 1, crowd);
    for (int st = 0; st < NSTEP; st++) {
        double num = 0, den = 0;
        for (int i = 0; i < n_vocab; i++) {
            double d = crowd[(size_t)st * n_vocab + i] - alone[(size_t)st * n_vocab + i];
            num += d * d;
            den += (double)alone[(size_t)st * n_vocab + i] * alone[(size_t)st * n_vocab + i];
        }
        double nerr = sqrt(num / den);
        printf("decode step %d: normalised error alone vs batch of %d = %.3g\n", st, NSEQ, nerr);
        assert_true(nerr <= 1e-6);
    }
    alloc_free(alone);
    alloc_free(crowd);
    model_ctx_free(ctx);
}

static void test_unreserved_kv_is_rejected(void **state)
{
    if (!model) skip();
    struct model_ctx_params p = {.max_batch_tokens = 16, .max_seqs = 2, .kv_tokens = 256};
    struct model_ctx *ctx;
    char err[256];
    assert_int_equal(model_ctx_create(model, &p, &ctx, err, sizeof err), KRS_OK);
    int32_t tok = 2, pos = 0, seq = 1;
    uint8_t want = 1;
    struct model_batch b = {1, &tok, &pos, &seq, &want};
    const float *logits;
    int n;
    assert_int_equal(model_forward(ctx, &b, &logits, &n), KRS_ERR_INVALID);
    tok = model_hparams(model)->n_vocab; /* out of range */
    assert_int_equal(kv_seq_reserve(model_ctx_kv(ctx), 1, 0, 1), KRS_OK);
    assert_int_equal(model_forward(ctx, &b, &logits, &n), KRS_ERR_INVALID);
    tok = 2;
    assert_int_equal(model_forward(ctx, &b, &logits, &n), KRS_OK);
    assert_int_equal(n, 1);
    model_ctx_free(ctx);
}

/* model_forward_begin + model_forward_end is model_forward: the same logits for the same
 * batch; an end without a begun step (or a second end) is KRS_ERR_STATE. */
static void test_forward_in_two_halves(void **state)
{
    if (!model) skip();
    struct model_ctx_params p = {
        .max_batch_tokens = 16, .max_seqs = 1, .kv_tokens = 256, .max_logits = 4};
    struct model_ctx *ctx;
    char err[256];
    assert_int_equal(model_ctx_create(model, &p, &ctx, err, sizeof err), KRS_OK);
    const int V = model_hparams(model)->n_vocab;
    int32_t tok[4] = {2, 5, 6, 7}, pos[4] = {0, 1, 2, 3}, seq[4] = {0};
    uint8_t want[4] = {0, 1, 0, 1};
    struct model_batch b = {4, tok, pos, seq, want};
    assert_int_equal(kv_seq_reserve(model_ctx_kv(ctx), 0, 0, 4), KRS_OK);
    const float *logits;
    int n;
    assert_int_equal(model_forward_end(ctx, &logits), KRS_ERR_STATE);
    assert_null(logits);
    assert_int_equal(model_forward(ctx, &b, &logits, &n), KRS_OK);
    assert_int_equal(n, 2);
    float *whole = alloc_malloc(sizeof(float) * 2 * (size_t)V);
    assert_non_null(whole);
    memcpy(whole, logits, sizeof(float) * 2 * (size_t)V);
    n = -1;
    assert_int_equal(model_forward_begin(ctx, &b, &n), KRS_OK);
    assert_int_equal(n, 2);
    assert_int_equal(model_forward_end(ctx, &logits), KRS_OK);
    assert_memory_equal(logits, whole, sizeof(float) * 2 * (size_t)V);
    assert_int_equal(model_forward_end(ctx, &logits), KRS_ERR_STATE);
    if (!model_ctx_samples_on_device(ctx)) {
        const int32_t *ids;
        const float *lps;
        assert_int_equal(model_forward_begin(ctx, &b, &n), KRS_OK);
        assert_int_equal(model_forward_end_sampled(ctx, NULL, NULL, 0, NULL, &ids, &lps),
                         KRS_ERR_UNSUPPORTED);
        assert_int_equal(model_forward_end(ctx, &logits), KRS_OK); /* the step is still open */
        assert_memory_equal(logits, whole, sizeof(float) * 2 * (size_t)V);
    }
    alloc_free(whole);
    model_ctx_free(ctx);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_batch_invariance),
        cmocka_unit_test(test_unreserved_kv_is_rejected),
        cmocka_unit_test(test_forward_in_two_halves),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
