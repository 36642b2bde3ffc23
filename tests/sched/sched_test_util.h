/* Helpers shared by the scheduler tests (test_sched.c, test_sched_dedup.c): the model (the
 * default one, or KRS_TEST_MODEL), requests from text, reading a stream to its end, and the
 * idle / KV / counter checks. Functions are static inline so a test may leave some unused. */
#ifndef KRS_TESTS_SCHED_TEST_UTIL_H
#define KRS_TESTS_SCHED_TEST_UTIL_H

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "krserve.h"
#include "test_model_path.h"
#include "model/model.h"
#include "sched/sched.h"
#include "tokenizer/tokenizer.h"
#include "util/clock.h"

static struct model *model;
static struct tokenizer *tok;

static inline int setup(void **state)
{
    char path[4096], err[256];
    /* KRS_TEST_MODEL swaps in a tiny model (the TSan run uses one to stay fast). */
    test_model_path(path, sizeof path);
    if (model_load(path, &model, err, sizeof err) != KRS_OK) return 0;
    if (tokenizer_load(model_gguf(model), &tok, err, sizeof err) != KRS_OK) {
        model_free(model);
        model = NULL;
    }
    return 0;
}

static inline int teardown(void **state)
{
    tokenizer_free(tok);
    model_free(model);
    return 0;
}

struct result {
    int32_t tokens[64];
    int n;
    enum sched_finish finish;
    char text[2048];
    size_t text_len;
    double total_ms; /* submit -> finish, from the FINISH event */
    double queue_ms; /* submit -> admission */
    int cached;      /* prompt tokens the prefix cache supplied */
    char reason[96]; /* the FINISH event's detail */
};

static inline void make_request(struct sched_request *r, int32_t *ids, int *n_ids,
                                const char *prompt, int max_tokens)
{
    size_t n = 0;
    assert_int_equal(tokenizer_encode(tok, prompt, strlen(prompt), 1, 0, ids, 256, &n), KRS_OK);
    *n_ids = (int)n;
    memset(r, 0, sizeof *r);
    r->prompt = ids;
    r->n_prompt = (int)n;
    r->max_tokens = max_tokens;
    sampler_params_default(&r->sampling);
    r->sampling.temperature = 0.0f; /* greedy unless a test says otherwise */
    r->priority = SCHED_PRIO_DEFAULT;
}

/* Reads a stream to its end. */
static inline void collect(struct sched_stream *st, struct result *res)
{
    memset(res, 0, sizeof *res);
    struct sched_event ev;
    for (;;) {
        int rc = sched_stream_read(st, &ev, 60000);
        assert_int_equal(rc, KRS_OK);
        if (ev.kind == SCHED_EV_FINISH) {
            res->finish = ev.finish;
            res->total_ms = ev.total_ms;
            res->queue_ms = ev.queue_ms;
            res->cached = ev.n_cached_tokens;
            memcpy(res->reason, ev.reason, sizeof res->reason);
            break;
        }
        if (ev.token >= 0 && res->n < 64) res->tokens[res->n++] = ev.token;
        memcpy(res->text + res->text_len, ev.text, ev.text_len);
        res->text_len += ev.text_len;
    }
    sched_stream_release(st);
}

/* The parameters most tests share; a test changes what it exercises. */
static inline void test_params(struct sched_params *p, int kv_tokens, enum sched_mode mode)
{
    sched_params_default(p);
    p->background_aging_ms = 600000; /* tests of ordering must not see aging */
    p->max_running = 8;
    p->max_batch_tokens = 64;
    p->kv_tokens = kv_tokens;
    p->max_ctx = 256;
    p->mode = mode;
}

static inline struct sched *create_sched(const struct sched_params *p, struct metrics *metrics)
{
    struct sched *s;
    char err[256];
    assert_int_equal(sched_create(model, tok, p, metrics, &s, err, sizeof err), KRS_OK);
    return s;
}

static inline struct sched *make_sched(int kv_tokens, enum sched_mode mode, int stream_cap,
                                       struct metrics *metrics)
{
    struct sched_params p;
    test_params(&p, kv_tokens, mode);
    p.stream_capacity = stream_cap;
    return create_sched(&p, metrics);
}

static inline void run_alone(struct sched *s, const struct sched_request *r, struct result *res)
{
    struct sched_stream *st;
    uint64_t id;
    assert_int_equal(sched_submit(s, r, &st, &id), KRS_OK);
    collect(st, res);
}

static inline void wait_idle(struct sched *s)
{
    for (int i = 0; i < 6000; i++) {
        struct sched_state st;
        sched_get_state(s, &st);
        uint64_t done = 0;
        for (int f = 0; f < 5; f++) done += st.finished[f];
        if (st.idle && st.running == 0 && st.queued[0] + st.queued[1] + st.queued[2] == 0 &&
            done == st.submitted)
            return;
        clock_sleep_us(5000);
    }
    fail_msg("scheduler did not become idle");
}

static inline void assert_kv_all_free(struct sched *s)
{
    wait_idle(s);
    struct sched_state st;
    sched_get_state(s, &st);
    assert_int_equal(st.kv_blocks_free, st.kv_blocks_total);
}

static inline void assert_counters_balance(struct sched *s)
{
    struct sched_state st;
    sched_get_state(s, &st);
    uint64_t done = 0;
    for (int i = 0; i < 5; i++) done += st.finished[i];
    assert_int_equal(st.submitted, done);
}

#endif
