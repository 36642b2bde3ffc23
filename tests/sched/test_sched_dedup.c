/* sched/sched_dedup.c: identical concurrent requests share one generation.
 *
 * Each test runs the scheduler in mode off (one request at a time) behind a long "blocker"
 * request, so that the requests it submits are all queued, nothing generated yet, when they
 * arrive: whether they join is then decided by dedup alone, not by timing. Outputs are compared
 * with the same request run alone on a dedup-off engine. Covered: identical greedy and
 * same-seed requests share (and differing or unseeded sampled ones do not), each keeps its own
 * id and usage; a cancelled or disconnected follower ends alone; a leader cancelled while
 * queued, while generating, or whose reader is too slow hands the generation over and the
 * others still get every token; a leader preempted mid-generation (tiny KV pool) keeps its
 * followers and they get the output of the request alone; with dedup off nothing is shared;
 * counters balance and every KV block comes back. Skipped when the model is absent. */
#include "sched/sched_test_util.h"

#include "metrics/metrics.h"

#define PROMPT   "The quick brown fox jumps over the lazy dog because"
#define MAX_TOK  16
#define LONG_TOK 48

static struct sched *dedup_sched(int dedup, int stream_cap, struct metrics *m)
{
    struct sched_params p;
    test_params(&p, 4096, SCHED_MODE_OFF);
    p.stream_capacity = stream_cap;
    p.dedup = dedup;
    return create_sched(&p, m);
}

/* Starts the blocker: a different prompt generating long enough for the test to submit; with
 * wait, returns once it runs. */
static struct sched_stream *start_blocker(struct sched *s, int wait)
{
    static int32_t ids[256];
    struct sched_request r;
    int n;
    make_request(&r, ids, &n, "Write a long story about a lighthouse keeper:", 200);
    /* The scheduler refuses what does not fit its context (it never shortens max_tokens). */
    if (r.max_tokens > sched_max_ctx(s) - n) r.max_tokens = sched_max_ctx(s) - n;
    r.ignore_eos = 1;
    struct sched_stream *st;
    uint64_t id;
    assert_int_equal(sched_submit(s, &r, &st, &id), KRS_OK);
    struct sched_event ev; /* running: the others queue behind it */
    if (wait) assert_int_equal(sched_stream_read(st, &ev, 60000), KRS_OK);
    return st;
}

static void stop_blocker(struct sched *s, struct sched_stream *st)
{
    sched_stream_release(st); /* cancelled at the next step */
    (void)s;
}

/* Waits until n live requests follow a leader (the engine has taken in what was submitted). */
static void wait_shared(struct sched *s, int n)
{
    struct sched_request_info info[32];
    for (int k = 0; k < 6000; k++) {
        int live = sched_list_requests(s, info, 32), shared = 0;
        for (int i = 0; i < live && i < 32; i++) shared += !strcmp(info[i].state, "shared");
        if (shared == n) return;
        clock_sleep_us(1000);
    }
    fail_msg("%d requests never became followers", n);
}

static void assert_same(const struct result *got, const struct result *ref)
{
    assert_int_equal(got->finish, ref->finish);
    assert_int_equal(got->n, ref->n);
    assert_memory_equal(got->tokens, ref->tokens, sizeof(int32_t) * (size_t)ref->n);
    assert_int_equal(got->text_len, ref->text_len);
    assert_memory_equal(got->text, ref->text, ref->text_len);
}

static uint64_t dedup_count(struct sched *s)
{
    struct sched_state st;
    sched_get_state(s, &st);
    return st.deduped;
}

/* The reference: r alone on a dedup-off engine. */
static void reference(const struct sched_request *r, struct result *ref)
{
    struct sched *s = dedup_sched(0, 256, NULL);
    run_alone(s, r, ref);
    sched_destroy(s);
}

/* PROMPT, greedy, max_tok tokens exactly; *ref gets its output alone. */
static void prompt_request(struct sched_request *r, int32_t *ids, int max_tok, struct result *ref)
{
    int n;
    make_request(r, ids, &n, PROMPT, max_tok);
    r->ignore_eos = 1;
    if (ref) reference(r, ref);
}

/* The end of every test: the dedup count, every KV block back, requests in = requests out. */
static void finish_sched(struct sched *s, uint64_t deduped)
{
    assert_int_equal(dedup_count(s), deduped);
    assert_kv_all_free(s);
    assert_counters_balance(s);
    sched_destroy(s);
}

static void test_identical_requests_share_one_generation(void **state)
{
    if (!model) skip();
    static int32_t ids[256];
    struct sched_request greedy, seeded, unseeded;
    prompt_request(&greedy, ids, MAX_TOK, NULL);
    seeded = greedy;
    seeded.sampling.temperature = 0.9f;
    seeded.sampling.seed = 4242;
    seeded.has_seed = 1;
    unseeded = seeded;
    unseeded.has_seed = 0;
    static struct result ref_g, ref_s, got[9];
    reference(&greedy, &ref_g);
    reference(&seeded, &ref_s);
    assert_int_equal(ref_g.n, MAX_TOK);

    struct metrics *m;
    assert_int_equal(metrics_create(clock_now_ns(), &m), KRS_OK);
    struct sched *s = dedup_sched(1, 256, m);
    struct sched_stream *blocker = start_blocker(s, 1);
    /* 4 greedy, 3 seeded (same seed), 2 sampled without a seed. */
    const struct sched_request *reqs[9] = {&greedy, &greedy, &greedy,   &greedy,  &seeded,
                                           &seeded, &seeded, &unseeded, &unseeded};
    struct sched_stream *st[9];
    uint64_t id[9];
    for (int i = 0; i < 9; i++) assert_int_equal(sched_submit(s, reqs[i], &st[i], &id[i]), KRS_OK);
    wait_shared(s, 5);
    stop_blocker(s, blocker);
    for (int i = 0; i < 9; i++) collect(st[i], &got[i]);
    for (int i = 0; i < 4; i++) assert_same(&got[i], &ref_g);
    for (int i = 4; i < 7; i++) assert_same(&got[i], &ref_s);
    for (int i = 0; i < 9; i++)
        for (int j = 0; j < i; j++) assert_true(id[i] != id[j]);
    /* Three greedy and two seeded followers; the unseeded pair computes twice. */
    struct metrics_snapshot *snap = calloc(1, sizeof *snap);
    assert_non_null(snap);
    assert_int_equal(metrics_snapshot(m, clock_now_ns(), snap), KRS_OK);
    assert_int_equal(snap->dedup_requests, 5);
    assert_int_equal(snap->finished_total, 10);
    free(snap);
    finish_sched(s, 5);
    metrics_destroy(m);
}

static void test_dedup_off_shares_nothing(void **state)
{
    if (!model) skip();
    static int32_t ids[256];
    struct sched_request r;
    static struct result ref, got[3];
    prompt_request(&r, ids, MAX_TOK, &ref);
    struct sched *s = dedup_sched(0, 256, NULL);
    struct sched_stream *blocker = start_blocker(s, 1);
    struct sched_stream *st[3];
    uint64_t id;
    for (int i = 0; i < 3; i++) assert_int_equal(sched_submit(s, &r, &st[i], &id), KRS_OK);
    stop_blocker(s, blocker);
    for (int i = 0; i < 3; i++) {
        collect(st[i], &got[i]);
        assert_same(&got[i], &ref);
    }
    finish_sched(s, 0);
}

/* Followers cancelled by id and by their reader walking away end alone; the leader and the
 * remaining follower get every token. */
static void test_cancelled_follower_ends_alone(void **state)
{
    if (!model) skip();
    static int32_t ids[256];
    struct sched_request r;
    static struct result ref, got[4];
    prompt_request(&r, ids, MAX_TOK, &ref);
    struct sched *s = dedup_sched(1, 256, NULL);
    struct sched_stream *blocker = start_blocker(s, 1);
    struct sched_stream *st[4];
    uint64_t id[4];
    for (int i = 0; i < 4; i++) assert_int_equal(sched_submit(s, &r, &st[i], &id[i]), KRS_OK);
    wait_shared(s, 3);
    assert_int_equal(sched_cancel(s, id[1]), KRS_OK); /* a follower, while its leader queues */
    stop_blocker(s, blocker);
    collect(st[1], &got[1]);
    assert_int_equal(got[1].finish, SCHED_FINISH_CANCELLED);
    /* Another follower disconnects once the generation has started. */
    struct sched_event ev;
    assert_int_equal(sched_stream_read(st[2], &ev, 60000), KRS_OK);
    sched_stream_release(st[2]);
    collect(st[0], &got[0]);
    collect(st[3], &got[3]);
    assert_same(&got[0], &ref);
    assert_same(&got[3], &ref);
    wait_idle(s);
    assert_int_equal(sched_cancel(s, id[2]), KRS_ERR_NOT_FOUND);
    finish_sched(s, 3);
}

/* A leader cancelled while queued, one cancelled mid-generation, and one whose reader is too
 * slow: each time a follower carries the generation on and every remaining stream gets the
 * whole output. */
static void test_cancelled_leader_hands_over(void **state)
{
    if (!model) skip();
    static int32_t ids[256];
    struct sched_request r;
    static struct result ref, got[3];
    prompt_request(&r, ids, LONG_TOK, &ref); /* long enough to cancel in the middle */

    /* Queued leader. */
    struct sched *s = dedup_sched(1, 256, NULL);
    struct sched_stream *blocker = start_blocker(s, 1);
    struct sched_stream *st[3];
    uint64_t id[3];
    for (int i = 0; i < 3; i++) assert_int_equal(sched_submit(s, &r, &st[i], &id[i]), KRS_OK);
    wait_shared(s, 2);
    assert_int_equal(sched_cancel(s, id[0]), KRS_OK);
    stop_blocker(s, blocker);
    for (int i = 0; i < 3; i++) collect(st[i], &got[i]);
    assert_int_equal(got[0].finish, SCHED_FINISH_CANCELLED);
    assert_same(&got[1], &ref);
    assert_same(&got[2], &ref);

    /* Leader cancelled after its first tokens (it holds the KV slot then). */
    blocker = start_blocker(s, 1);
    for (int i = 0; i < 3; i++) assert_int_equal(sched_submit(s, &r, &st[i], &id[i]), KRS_OK);
    wait_shared(s, 2);
    stop_blocker(s, blocker);
    struct sched_event ev;
    for (int k = 0; k < 2; k++) assert_int_equal(sched_stream_read(st[0], &ev, 60000), KRS_OK);
    assert_int_equal(sched_cancel(s, id[0]), KRS_OK);
    for (int i = 0; i < 3; i++) collect(st[i], &got[i]);
    assert_int_equal(got[0].finish, SCHED_FINISH_CANCELLED);
    assert_true(got[0].n < LONG_TOK);
    assert_same(&got[1], &ref);
    assert_same(&got[2], &ref);
    finish_sched(s, 4);

    /* A leader nobody reads: its stream (4 events) fills and it is cancelled as too slow; the
     * follower, read as tokens come, gets them all. The follower's reader races the engine: on a
     * loaded machine it can fall 4 events behind and be cancelled as too slow itself, which says
     * nothing about the handover, so that outcome (and only that one) runs the scenario again. */
    int attempts = 0;
    for (;;) {
        s = dedup_sched(1, 4, NULL);
        blocker = start_blocker(s, 0); /* its own unread stream ends it after 3 tokens */
        for (int i = 0; i < 2; i++) assert_int_equal(sched_submit(s, &r, &st[i], &id[i]), KRS_OK);
        wait_shared(s, 1);
        stop_blocker(s, blocker);
        collect(st[1], &got[1]);
        collect(st[0], &got[0]);
        assert_int_equal(got[0].finish, SCHED_FINISH_CANCELLED);
        int follower_lagged =
            got[1].finish == SCHED_FINISH_CANCELLED && strstr(got[1].reason, "too slow");
        if (!follower_lagged || ++attempts == 5) break;
        printf("follower fell behind the engine (%d tokens read); again\n", got[1].n);
        finish_sched(s, 1);
    }
    assert_same(&got[1], &ref);
    finish_sched(s, 1);
}

/* A KV pool too small for everything (8 blocks of 16 positions): three distinct requests and a
 * leader with two followers run together, and the leader, admitted last, is preempted in the
 * middle of its generation and recomputed; every stream still gets the output of its request
 * alone. */
static void test_preempted_leader_keeps_its_followers(void **state)
{
    if (!model) skip();
    static const char *const others[3] = {"The capital of France is",
                                          "def fibonacci(n):", "Water boils at a temperature of"};
    static int32_t ids[4][256];
    struct sched_request r[4];
    static struct result ref[4], got[6];
    for (int i = 0; i < 4; i++) {
        int n;
        make_request(&r[i], ids[i], &n, i < 3 ? others[i] : PROMPT, 30);
        r[i].ignore_eos = 1;
        reference(&r[i], &ref[i]);
    }
    struct sched_params p;
    test_params(&p, 128, SCHED_MODE_OFF);
    p.dedup = 1;
    struct sched *s = create_sched(&p, NULL);
    struct sched_stream *blocker = start_blocker(s, 1);
    struct sched_stream *st[6];
    uint64_t id;
    for (int i = 0; i < 6; i++)
        assert_int_equal(sched_submit(s, &r[i < 3 ? i : 3], &st[i], &id), KRS_OK);
    wait_shared(s, 2);
    assert_int_equal(sched_set_mode(s, SCHED_MODE_FIXED, 6), KRS_OK);
    stop_blocker(s, blocker);
    for (int i = 0; i < 6; i++) {
        collect(st[i], &got[i]);
        assert_same(&got[i], &ref[i < 3 ? i : 3]);
    }
    struct sched_state ss;
    sched_get_state(s, &ss);
    printf("%llu preemptions\n", (unsigned long long)ss.preemptions);
    assert_true(ss.preemptions > 0);
    finish_sched(s, 2);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_identical_requests_share_one_generation),
        cmocka_unit_test(test_dedup_off_shares_nothing),
        cmocka_unit_test(test_cancelled_follower_ends_alone),
        cmocka_unit_test(test_cancelled_leader_hands_over),
        cmocka_unit_test(test_preempted_leader_keeps_its_followers),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
