/* sched/sched_admit.c: the admission policy against a controller in a known state, without an
 * engine. A request on time waits at the batch limit; one that has waited late_wait_ms takes
 * a slot up to controller_late_admit_limit and no further; fixed mode knows no late
 * admission; a running prompt that is late sizes the step's chunk against the late bound;
 * the requests past the limit by late admission are what the controller is told of. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <string.h>

#include "krserve.h"
#include "sched/sched_impl.h"

#define MAX_RUNNING 16
#define MS          1000000ull

static struct sched s;
static struct req reqs[MAX_RUNNING + 1];
static struct req *running[MAX_RUNNING];

/* A tuning controller after one window of 10 decode steps at batch 4, 90 ms each, with
 * requests queued: no slope yet, so the limit probes one up (5), and the late limit is the
 * measured step scaled to twice the 100 ms target (8). */
static void setup_sched(enum sched_mode mode)
{
    memset(&s, 0, sizeof s);
    memset(reqs, 0, sizeof reqs);
    memset(running, 0, sizeof running);
    sched_params_default(&s.p);
    s.p.max_running = MAX_RUNNING;
    s.p.max_batch_tokens = 512;
    s.running = running;
    s.mode = mode;
    struct controller_config cc;
    controller_config_default(&cc);
    cc.max_batch = MAX_RUNNING;
    cc.initial_batch = 4;
    cc.enabled = mode == SCHED_MODE_AUTO;
    assert_int_equal(controller_init(&s.ctrl, &cc, 0), KRS_OK);
    uint64_t now = 0;
    for (int i = 0; i < 10; i++) {
        now += 90 * MS;
        struct controller_step st = {.latency_ns = 90 * MS,
                                     .n_decode = 4,
                                     .queued = 5,
                                     .oldest_wait_ns = 10 * MS,
                                     .now_ns = now};
        controller_observe(&s.ctrl, &st);
    }
    s.limit = mode == SCHED_MODE_AUTO ? (int)controller_limit(&s.ctrl) : 4;
}

/* n decoding requests in slots 0..n-1 (their prompts done) */
static void run_decoding(int n)
{
    for (int i = 0; i < n; i++) {
        reqs[i].n_prompt = 20;
        reqs[i].n_gen = 3;
        reqs[i].n_past = 22;
        reqs[i].t_submit = 1;
        reqs[i].t_first = 2;
        running[i] = &reqs[i];
    }
    for (int i = n; i < MAX_RUNNING; i++) running[i] = NULL;
    s.n_running = n;
}

static struct req *queued(uint64_t submitted)
{
    struct req *r = &reqs[MAX_RUNNING];
    memset(r, 0, sizeof *r);
    r->n_prompt = 20;
    r->t_submit = submitted;
    return r;
}

static void test_late_request_passes_the_limit(void **state)
{
    (void)state;
    setup_sched(SCHED_MODE_AUTO);
    const uint64_t now = 10000 * MS;
    const int lim = sched_admit_limit(&s);
    const int late_lim = (int)controller_late_admit_limit(&s.ctrl);
    assert_int_equal(lim, 5);
    assert_int_equal(late_lim, 8);
    assert_int_equal(controller_late_wait_ns(&s.ctrl), 100 * MS);

    struct admit_budget b;
    run_decoding(lim);
    admit_budget_init(&s, &b, now);
    assert_int_equal(admit_room(&s, queued(now - 50 * MS), &b), 0); /* on time: waits */
    admit_budget_init(&s, &b, now);
    assert_int_equal(admit_room(&s, queued(now - 150 * MS), &b), 1); /* late: admitted */
    assert_true(b.past_limit);
    assert_true(sched_is_late(&s, queued(now - 150 * MS), now));

    run_decoding(late_lim);
    admit_budget_init(&s, &b, now);
    assert_int_equal(admit_room(&s, queued(now - 5000 * MS), &b), 0); /* the late bound */

    run_decoding(lim - 1); /* room under the limit: no late leave needed */
    admit_budget_init(&s, &b, now);
    assert_int_equal(admit_room(&s, queued(now - 150 * MS), &b), 1);
    assert_false(b.past_limit);
}

static void test_fixed_mode_has_no_late_admission(void **state)
{
    (void)state;
    setup_sched(SCHED_MODE_FIXED);
    const uint64_t now = 10000 * MS;
    struct admit_budget b;
    run_decoding(4);
    admit_budget_init(&s, &b, now);
    assert_int_equal(b.late_max_running, 4);
    assert_int_equal(admit_room(&s, queued(now - 5000 * MS), &b), 0);
    assert_false(sched_is_late(&s, queued(now - 5000 * MS), now));
}

static void test_late_prompt_gets_the_late_chunk(void **state)
{
    (void)state;
    setup_sched(SCHED_MODE_AUTO);
    /* a window of steps carrying 20 prompt tokens at 1 ms each beside the 4 decodes: the
     * controller learns a prompt token's cost (until then a chunk is min_prefill_chunk) */
    uint64_t t = 900 * MS;
    for (int i = 0; i < 10; i++) {
        const int pf = i % 2 ? 20 : 0;
        t += (90 + pf) * MS;
        struct controller_step st = {.latency_ns = (90 + (uint64_t)pf) * MS,
                                     .n_decode = 4,
                                     .n_prefill = (uint32_t)pf,
                                     .now_ns = t};
        controller_observe(&s.ctrl, &st);
    }
    const uint64_t now = 10000 * MS;
    run_decoding(4);
    /* a fifth request still computing its prompt, submitted 150 ms ago, no first token */
    struct req *p = &reqs[4];
    p->n_prompt = 200;
    p->n_past = 16;
    p->t_submit = now - 150 * MS;
    running[4] = p;
    s.n_running = 5;
    assert_true(sched_prompt_late(&s, now));
    int on_time = sched_prefill_budget(&s, 4, 508, 0), late = sched_prefill_budget(&s, 4, 508, 1);
    assert_int_equal(late, (int)controller_late_prefill_budget(&s.ctrl, 4, 508));
    /* (0.9 * 100 ms - the 90 ms decode line leaves the minimum chunk; 0.9 * 200 - 90 leaves
     * about 90 tokens at 1 ms) */
    assert_int_equal(on_time, (int)s.ctrl.cfg.min_prefill_chunk);
    assert_true(late >= 60 && late <= 95);
    p->t_first = now - 10 * MS; /* past its first token: late no more */
    assert_false(sched_prompt_late(&s, now));
}

static void test_late_running_counts_past_the_limit(void **state)
{
    (void)state;
    setup_sched(SCHED_MODE_AUTO);
    run_decoding(8);
    for (int i = 5; i < 8; i++) reqs[i].late_admit = 1;
    assert_int_equal(sched_late_running(&s), 3); /* 8 run, limit 5 */
    s.limit = 7;
    assert_int_equal(sched_late_running(&s), 1); /* only what runs past the limit */
    s.limit = 8;
    assert_int_equal(sched_late_running(&s), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_late_request_passes_the_limit),
        cmocka_unit_test(test_fixed_mode_has_no_late_admission),
        cmocka_unit_test(test_late_prompt_gets_the_late_chunk),
        cmocka_unit_test(test_late_running_counts_past_the_limit),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
