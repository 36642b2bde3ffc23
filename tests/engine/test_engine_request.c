/* The front door (engine_request.c): shared fields read from JSON with one set of names,
 * aliases and ranges; defaults and limits applied against one context limit; errors as a field
 * and a reason. Pure: no model, the limits are made up. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "engine/engine.h"
#include "krserve.h"

static const struct engine_limits LIM = {
    .max_ctx = 100,
    .n_vocab = 1000,
    .max_prompt_tokens = 80,
    .max_tokens_limit = 50,
    .timeout_ms = 60000,
    .default_max_tokens = 16,
};
static const int32_t PROMPT[10] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10};

/* The JSON of the last parse: g's strings point into it, so it lives until the next parse. */
static cJSON *tree;

/* Parses json into g (engine_gen_init'd); returns the status, err filled on failure. */
static int parse(const char *json, struct engine_gen *g, struct engine_req_error *err)
{
    cJSON_Delete(tree);
    tree = cJSON_Parse(json);
    assert_non_null(tree);
    engine_gen_init(g);
    memset(err, 0, sizeof *err);
    return engine_gen_from_json(tree, g, err);
}

static int teardown(void **state)
{
    (void)state;
    cJSON_Delete(tree);
    tree = NULL;
    return 0;
}

/* Parses and builds with the default prompt of 10 tokens. */
static int build(const char *json, const struct engine_limits *lim, struct sched_request *r,
                 struct engine_req_error *err)
{
    struct engine_gen g;
    int rc = parse(json, &g, err);
    if (!rc) rc = engine_gen_build(&g, lim, PROMPT, 10, "prompt", r, err);
    engine_gen_free(&g);
    return rc;
}

static void expect_bad(const char *json, const char *field)
{
    struct engine_gen g;
    struct engine_req_error err;
    assert_int_equal(parse(json, &g, &err), KRS_ERR_INVALID);
    assert_int_equal(err.fault, ENGINE_REQ_BAD_VALUE);
    assert_string_equal(err.field, field);
    assert_non_null(strstr(err.reason, field)); /* the reason names the field */
    engine_gen_free(&g);
}

static void test_defaults(void **state)
{
    (void)state;
    struct sched_request r;
    struct engine_req_error err;
    assert_int_equal(build("{}", &LIM, &r, &err), KRS_OK);
    assert_int_equal(r.max_tokens, 16);
    assert_int_equal(r.priority, SCHED_PRIO_DEFAULT);
    assert_true(r.sampling.temperature == 1.0f && r.sampling.top_p == 1.0f);
    assert_int_equal(r.timeout_ms, 60000);
    assert_int_equal(r.has_seed, 0);
    assert_ptr_equal(r.prompt, PROMPT);
    assert_int_equal(r.n_prompt, 10);
    /* default 0 = the rest of the context, capped by the server limit */
    struct engine_limits lim = LIM;
    lim.default_max_tokens = 0;
    assert_int_equal(build("{}", &lim, &r, &err), KRS_OK);
    assert_int_equal(r.max_tokens, 50);
    lim.max_tokens_limit = 0;
    assert_int_equal(build("{}", &lim, &r, &err), KRS_OK);
    assert_int_equal(r.max_tokens, 90);
}

static void test_priority_aliases(void **state)
{
    (void)state;
    static const struct {
        const char *name;
        enum sched_priority p;
    } cases[] = {
        {"urgent", SCHED_PRIO_URGENT},         {"high", SCHED_PRIO_URGENT},
        {"default", SCHED_PRIO_DEFAULT},       {"normal", SCHED_PRIO_DEFAULT},
        {"background", SCHED_PRIO_BACKGROUND}, {"low", SCHED_PRIO_BACKGROUND},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        char json[64];
        snprintf(json, sizeof json, "{\"priority\": \"%s\"}", cases[i].name);
        struct sched_request r;
        struct engine_req_error err;
        assert_int_equal(build(json, &LIM, &r, &err), KRS_OK);
        assert_int_equal(r.priority, cases[i].p);
        enum sched_priority p;
        assert_int_equal(engine_parse_priority(cases[i].name, &p), KRS_OK);
        assert_int_equal(p, cases[i].p);
    }
    expect_bad("{\"priority\": \"asap\"}", "priority");
    expect_bad("{\"priority\": 1}", "priority");
    enum sched_priority p;
    assert_int_equal(engine_parse_priority(NULL, &p), KRS_ERR_INVALID);
}

static void test_ranges(void **state)
{
    (void)state;
    expect_bad("{\"temperature\": 2.5}", "temperature");
    expect_bad("{\"temperature\": -0.1}", "temperature");
    expect_bad("{\"temperature\": \"hot\"}", "temperature");
    expect_bad("{\"top_p\": 0}", "top_p");
    expect_bad("{\"top_p\": 1.5}", "top_p");
    expect_bad("{\"top_k\": -1}", "top_k");
    expect_bad("{\"top_k\": 1.5}", "top_k");
    expect_bad("{\"min_p\": 2}", "min_p");
    expect_bad("{\"repetition_penalty\": 0}", "repetition_penalty");
    expect_bad("{\"repetition_context_size\": -2}", "repetition_context_size");
    expect_bad("{\"presence_penalty\": 3}", "presence_penalty");
    expect_bad("{\"frequency_penalty\": -3}", "frequency_penalty");
    expect_bad("{\"seed\": 1.5}", "seed");
    expect_bad("{\"max_tokens\": 0}", "max_tokens");
    expect_bad("{\"max_completion_tokens\": -4}", "max_completion_tokens");
    expect_bad("{\"stop\": 5}", "stop");
    expect_bad("{\"stop\": [\"a\",\"b\",\"c\",\"d\",\"e\",\"f\",\"g\",\"h\",\"i\"]}", "stop");
    expect_bad("{\"stop\": [\"\"]}", "stop");
    expect_bad("{\"stop\": \"\xff\xfe\"}", "stop");
    expect_bad("{\"stop_token_ids\": [-1]}", "stop_token_ids");
    expect_bad("{\"logit_bias\": {\"12\": 101}}", "logit_bias");
    expect_bad("{\"logit_bias\": {\"x\": 1}}", "logit_bias");
    expect_bad("{\"ignore_eos\": 1}", "ignore_eos");
    expect_bad("{\"timeout\": 0}", "timeout");
    expect_bad("{\"timeout\": 1, \"timeout_ms\": 1000}", "timeout");
    expect_bad("{\"timeout_ms\": 0}", "timeout_ms");
    /* null is "not given" */
    struct sched_request r;
    struct engine_req_error err;
    assert_int_equal(
        build("{\"temperature\": null, \"stop\": null, \"seed\": null}", &LIM, &r, &err), KRS_OK);
    assert_true(r.sampling.temperature == 1.0f);
}

static void test_values_and_aliases(void **state)
{
    (void)state;
    struct engine_gen g;
    struct engine_req_error err;
    int prc = parse("{\"max_tokens\": 5, \"max_completion_tokens\": 7, \"temperature\": 0,"
                    " \"top_k\": 40, \"seed\": -3, \"stop\": \"END\","
                    " \"stop_token_ids\": [5, 6], \"logit_bias\": {\"12\": -100},"
                    " \"timeout\": 1.5, \"ignore_eos\": true,"
                    " \"repetition_context_size\": -1}",
                    &g, &err);
    if (prc) print_error("%s: %s\n", err.field, err.reason);
    assert_int_equal(prc, KRS_OK);
    struct sched_request r;
    prc = engine_gen_build(&g, &LIM, PROMPT, 10, "prompt", &r, &err);
    if (prc) print_error("%s: %s\n", err.field, err.reason);
    assert_int_equal(prc, KRS_OK);
    assert_int_equal(r.max_tokens, 7); /* max_completion_tokens wins */
    assert_true(r.sampling.temperature == 0.0f);
    assert_int_equal(r.sampling.top_k, 40);
    assert_int_equal(r.has_seed, 1);
    assert_int_equal((int64_t)r.sampling.seed, -3);
    assert_int_equal(r.n_stop, 1);
    assert_string_equal(r.stop[0], "END");
    assert_int_equal(r.n_stop_ids, 2);
    assert_int_equal(r.stop_ids[1], 6);
    assert_int_equal(r.sampling.n_logit_bias, 1);
    assert_int_equal(r.sampling.logit_bias[0].token, 12);
    assert_int_equal(r.timeout_ms, 1500);
    assert_int_equal(r.ignore_eos, 1);
    assert_int_equal(r.sampling.penalty_last_n, -1);
    engine_gen_free(&g);
    assert_int_equal(build("{\"timeout_ms\": 250}", &LIM, &r, &err), KRS_OK);
    assert_int_equal(r.timeout_ms, 250);
}

static void test_context_limit(void **state)
{
    (void)state;
    struct sched_request r;
    struct engine_req_error err;
    /* exactly the context: accepted */
    struct engine_limits lim = LIM;
    lim.max_tokens_limit = 0;
    assert_int_equal(build("{\"max_tokens\": 90}", &lim, &r, &err), KRS_OK);
    assert_int_equal(r.max_tokens, 90);
    /* one beyond: refused, never shortened */
    assert_int_equal(build("{\"max_tokens\": 91}", &lim, &r, &err), KRS_ERR_INVALID);
    assert_int_equal(err.fault, ENGINE_REQ_TOO_LONG);
    assert_string_equal(err.field, "max_tokens");
    assert_non_null(strstr(err.reason, "context length 100"));
    /* the server's max_tokens limit */
    assert_int_equal(build("{\"max_tokens\": 51}", &LIM, &r, &err), KRS_ERR_INVALID);
    assert_int_equal(err.fault, ENGINE_REQ_BAD_VALUE);
    assert_string_equal(err.field, "max_tokens");
    /* a default that does not fit is shortened to the room left (never an error) */
    lim = LIM;
    lim.default_max_tokens = 95;
    lim.max_tokens_limit = 0;
    assert_int_equal(build("{}", &lim, &r, &err), KRS_OK);
    assert_int_equal(r.max_tokens, 90);
    /* the prompt itself: the context and maxPromptTokens, named by the front end's field */
    struct engine_gen g;
    engine_gen_init(&g);
    int32_t big[120] = {0};
    assert_int_equal(engine_gen_build(&g, &LIM, big, 100, "messages", &r, &err), KRS_ERR_INVALID);
    assert_int_equal(err.fault, ENGINE_REQ_TOO_LONG);
    assert_string_equal(err.field, "messages");
    lim = LIM;
    lim.max_prompt_tokens = 0;
    assert_int_equal(engine_gen_build(&g, &lim, big, 100, "prompt", &r, &err), KRS_ERR_INVALID);
    assert_int_equal(err.fault, ENGINE_REQ_TOO_LONG);
    assert_non_null(strstr(err.reason, "context length is 100"));
    assert_int_equal(engine_gen_build(&g, &lim, big, 99, "prompt", &r, &err), KRS_OK);
    assert_int_equal(r.max_tokens, 1);
    assert_int_equal(engine_gen_build(&g, &lim, big, 0, "prompt", &r, &err), KRS_ERR_INVALID);
    assert_string_equal(err.field, "prompt");
}

static void test_vocabulary_and_timeout_limits(void **state)
{
    (void)state;
    struct sched_request r;
    struct engine_req_error err;
    assert_int_equal(build("{\"logit_bias\": {\"1000\": 1}}", &LIM, &r, &err), KRS_ERR_INVALID);
    assert_string_equal(err.field, "logit_bias");
    assert_int_equal(build("{\"stop_token_ids\": [999, 1000]}", &LIM, &r, &err), KRS_ERR_INVALID);
    assert_string_equal(err.field, "stop_token_ids");
    struct engine_gen g;
    engine_gen_init(&g);
    const int32_t bad_prompt[2] = {1, 1000};
    assert_int_equal(engine_gen_build(&g, &LIM, bad_prompt, 2, "prompt", &r, &err),
                     KRS_ERR_INVALID);
    assert_string_equal(err.field, "prompt");
    assert_int_equal(build("{\"timeout\": 61}", &LIM, &r, &err), KRS_ERR_INVALID);
    assert_string_equal(err.field, "timeout");
    assert_int_equal(build("{\"timeout_ms\": 60000}", &LIM, &r, &err), KRS_OK);
}

static void test_cli_style_setters_are_checked(void **state)
{
    (void)state;
    struct engine_gen g;
    struct engine_req_error err;
    engine_gen_init(&g);
    g.sampling.temperature = 3;
    assert_int_equal(engine_gen_check(&g, &err), KRS_ERR_INVALID);
    assert_string_equal(err.field, "temperature");
    g.sampling.temperature = 0.8f;
    g.max_tokens = 0;
    assert_int_equal(engine_gen_check(&g, &err), KRS_ERR_INVALID);
    assert_string_equal(err.field, "max_tokens");
    g.max_tokens = 10;
    assert_int_equal(engine_gen_check(&g, &err), KRS_OK);
    assert_int_equal(engine_gen_from_json(NULL, &g, &err), KRS_ERR_INVALID);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_defaults),
        cmocka_unit_test(test_priority_aliases),
        cmocka_unit_test(test_ranges),
        cmocka_unit_test(test_values_and_aliases),
        cmocka_unit_test(test_context_limit),
        cmocka_unit_test(test_vocabulary_and_timeout_limits),
        cmocka_unit_test(test_cli_style_setters_are_checked),
    };
    return cmocka_run_group_tests(tests, NULL, teardown);
}
