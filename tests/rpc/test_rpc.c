/* rpc/: the transport-independent API as the HTTP front end uses it (wait_streams = 1) and as
 * stdio does (wait_streams = 0), with a capturing sink, on the default model.
 *
 * Checked: with wait_streams = 1 every notification is written before rpc_handle returns and
 * the response precedes its stream's notifications; chunk texts concatenate to the
 * non-streaming text; JSON-RPC batch arrays answer in one array in request order, notifications
 * omitted (an all-notification batch writes nothing); malformed input gives exactly one error;
 * invalid UTF-8 in text becomes U+FFFD so every message is valid JSON; rpc_free cancels live
 * streams. Model-dependent tests are skipped when the default model is absent. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <cjson/cJSON.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config/config.h"
#include "engine/engine.h"
#include "krserve.h"
#include "rpc/rpc.h"
#include "rpc/rpc_impl.h"
#include "rpc/rpc_test_util.h"
#include "test_model_path.h"

static struct capture cap = {.lock = PTHREAD_MUTEX_INITIALIZER};
static const struct rpc_sink sink = {cap_write, &cap};
static struct engine_registry *reg;

static int setup(void **state)
{
    (void)state;
    const char *src = getenv("KRS_SOURCE_DIR");
    char path[CONFIG_PATH_MAX + 32], err[256];
    struct krs_config cfg;
    config_defaults(&cfg);
    snprintf(cfg.model.dir, sizeof cfg.model.dir, "%s/models", src ? src : ".");
    cfg.performance.gpu_scheduler.mode = CONFIG_SCHED_FIXED;
    test_model_path(path, sizeof path); /* KRS_TEST_MODEL: the sanitizer runs' tiny model */
    if (engine_registry_create(&cfg, &reg)) return -1;
    if (engine_registry_load(reg, NULL, path, 0, err, sizeof err)) {
        engine_registry_destroy(reg);
        reg = NULL;
    }
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    cap_reset(&cap);
    engine_registry_destroy(reg);
    return 0;
}

static cJSON *msg_at(int i)
{
    assert_true(i < cap.n);
    cJSON *j = cJSON_Parse(cap.msgs[i]);
    assert_non_null(j);
    return j;
}

static int handle(struct rpc_ctx *ctx, const char *s, int wait)
{
    return rpc_handle(ctx, s, strlen(s), &sink, wait);
}

static int error_code_of(const cJSON *m)
{
    const cJSON *e = cJSON_GetObjectItem(m, "error");
    return e ? cJSON_GetObjectItem(e, "code")->valueint : 0;
}

/* No model needed: protocol-level errors. */
static void test_protocol_errors(void **state)
{
    (void)state;
    struct engine_registry *empty;
    struct krs_config cfg;
    config_defaults(&cfg);
    assert_int_equal(engine_registry_create(&cfg, &empty), KRS_OK);
    struct rpc_ctx *ctx;
    assert_int_equal(rpc_create(empty, &ctx), KRS_OK);
    static const struct {
        const char *in;
        int code;
    } cases[] = {
        {"", -32700},
        {"{\"jsonrpc\":\"2.0\",", -32700},
        {"\xff\xfe{}", -32700},
        {"[]", -32600},
        {"42", -32600},
        {"{\"jsonrpc\":\"1.0\",\"id\":1,\"method\":\"runtime/info\"}", -32600},
        {"{\"jsonrpc\":\"2.0\",\"id\":{},\"method\":\"runtime/info\"}", -32600},
        {"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":7}", -32600},
        {"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"x\"}", -32601},
        {"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"tokenize\",\"params\":[1]}", -32602},
        {"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"generate\",\"params\":{\"prompt\":\"x\"}}",
         -32005},
        {"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"tokenize\",\"params\":{\"text\":\"x\"}}",
         -32005},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        cap_reset(&cap);
        assert_int_equal(handle(ctx, cases[i].in, 1), KRS_OK);
        assert_int_equal(cap.n, 1);
        cJSON *m = msg_at(0);
        if (error_code_of(m) != cases[i].code)
            fail_msg("input %zu '%s': got %s", i, cases[i].in, cap.msgs[0]);
        cJSON_Delete(m);
    }
    /* Deep nesting is a parse error, not a crash. */
    char deep[4000];
    memset(deep, '[', sizeof deep - 1);
    deep[sizeof deep - 1] = '\0';
    cap_reset(&cap);
    handle(ctx, deep, 1);
    assert_int_equal(cap.n, 1);
    /* Notifications alone: nothing written, object or batch. */
    cap_reset(&cap);
    handle(ctx, "{\"jsonrpc\":\"2.0\",\"method\":\"runtime/info\"}", 1);
    handle(ctx,
           "[{\"jsonrpc\":\"2.0\",\"method\":\"runtime/info\"},{\"jsonrpc\":\"2.0\","
           "\"method\":\"nope\"}]",
           1);
    assert_int_equal(cap.n, 0);
    assert_int_equal(rpc_handle(NULL, "{}", 2, &sink, 1), KRS_ERR_INVALID);
    rpc_free(ctx);
    engine_registry_destroy(empty);
    cap_reset(&cap);
}

static void test_json_string_sanitises(void **state)
{
    (void)state;
    static const struct {
        const char *in;
        size_t n;
        const char *out;
    } cases[] = {
        {"abc", 3, "abc"},
        {"\xc3\xa9", 2, "\xc3\xa9"},
        {"\xc3", 1, "\xef\xbf\xbd"},
        {"a\0b", 3,
         "a\xef\xbf\xbd"
         "b"},
        {"\xed\xa0\x80", 3, "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd"}, /* surrogate */
        {"\xf0\x9f\x98\x80", 4, "\xf0\x9f\x98\x80"},
        {"\xc0\xaf", 2, "\xef\xbf\xbd\xef\xbf\xbd"}, /* overlong */
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        cJSON *j = rpc_json_string(cases[i].in, cases[i].n);
        assert_string_equal(j->valuestring, cases[i].out);
        cJSON_Delete(j);
    }
}

static const char *text_of(const cJSON *m, const char *obj)
{
    return cJSON_GetObjectItem(cJSON_GetObjectItem(m, obj), "text")->valuestring;
}

static void test_wait_streams_order(void **state)
{
    (void)state;
    if (!reg) skip();
    struct rpc_ctx *ctx;
    assert_int_equal(rpc_create(reg, &ctx), KRS_OK);
    cap_reset(&cap);
    handle(ctx,
           "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"generate\",\"params\":{\"prompt\":\"One, "
           "two, three, four,\",\"max_tokens\":10,\"temperature\":0,\"stream\":false}}",
           1);
    assert_int_equal(cap.n, 1);
    cJSON *m = msg_at(0);
    char full[1024];
    snprintf(full, sizeof full, "%s", text_of(m, "result"));
    cJSON_Delete(m);

    cap_reset(&cap);
    handle(ctx,
           "{\"jsonrpc\":\"2.0\",\"id\":2,\"method\":\"generate\",\"params\":{\"prompt\":\"One, "
           "two, three, four,\",\"max_tokens\":10,\"temperature\":0,\"stream_id\":\"w\"}}",
           1);
    /* Everything is written before rpc_handle returns: response, chunks, stats, event. */
    assert_true(cap.n >= 13);
    m = msg_at(0);
    assert_string_equal(
        cJSON_GetObjectItem(cJSON_GetObjectItem(m, "result"), "stream_id")->valuestring, "w");
    cJSON_Delete(m);
    char joined[1024] = "";
    for (int i = 1; i < cap.n - 2; i++) {
        m = msg_at(i);
        assert_string_equal(cJSON_GetObjectItem(m, "method")->valuestring, "stream.chunk");
        const cJSON *p = cJSON_GetObjectItem(m, "params");
        assert_int_equal(cJSON_GetObjectItem(p, "index")->valueint, i - 1);
        strncat(joined, cJSON_GetObjectItem(p, "text")->valuestring,
                sizeof joined - strlen(joined) - 1);
        cJSON_Delete(m);
    }
    assert_string_equal(joined, full);
    m = msg_at(cap.n - 2);
    assert_string_equal(cJSON_GetObjectItem(m, "method")->valuestring, "stream.stats");
    assert_int_equal(
        cJSON_GetObjectItem(cJSON_GetObjectItem(m, "params"), "generated_tokens")->valueint, 10);
    cJSON_Delete(m);
    m = msg_at(cap.n - 1);
    assert_string_equal(cJSON_GetObjectItem(cJSON_GetObjectItem(m, "params"), "event")->valuestring,
                        "completed");
    cJSON_Delete(m);
    rpc_free(ctx);
    cap_reset(&cap);
}

static void test_batch_array_waits(void **state)
{
    (void)state;
    if (!reg) skip();
    struct rpc_ctx *ctx;
    assert_int_equal(rpc_create(reg, &ctx), KRS_OK);
    cap_reset(&cap);
    handle(ctx,
           "[{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"generate\",\"params\":{\"prompt\":\"The "
           "quick brown fox\",\"max_tokens\":4,\"temperature\":0,\"stream\":false}},"
           "{\"jsonrpc\":\"2.0\",\"id\":2,\"method\":\"generate\",\"params\":{\"prompt\":\"Hi\","
           "\"max_tokens\":3,\"stream_id\":\"s2\"}},"
           "{\"jsonrpc\":\"2.0\",\"id\":3,\"method\":\"batch_generate\",\"params\":{\"requests\":"
           "[{\"prompt\":\"a\",\"max_tokens\":2},{\"prompt\":\"b\",\"max_tokens\":2,"
           "\"top_k\":-1}]}}]",
           1);
    /* The array comes first (it announces s2), then s2's notifications. */
    cJSON *arr = msg_at(0);
    assert_true(cJSON_IsArray(arr));
    assert_int_equal(cJSON_GetArraySize(arr), 3);
    const cJSON *r0 = cJSON_GetArrayItem(arr, 0), *r2 = cJSON_GetArrayItem(arr, 2);
    assert_int_equal(cJSON_GetObjectItem(r0, "id")->valueint, 1);
    assert_int_equal(
        cJSON_GetObjectItem(cJSON_GetObjectItem(cJSON_GetObjectItem(r0, "result"), "usage"),
                            "completion_tokens")
            ->valueint,
        4);
    const cJSON *res = cJSON_GetObjectItem(cJSON_GetObjectItem(r2, "result"), "results");
    assert_int_equal(cJSON_GetArraySize(res), 2);
    assert_true(cJSON_IsTrue(cJSON_GetObjectItem(cJSON_GetArrayItem(res, 0), "success")));
    assert_true(cJSON_IsFalse(cJSON_GetObjectItem(cJSON_GetArrayItem(res, 1), "success")));
    cJSON_Delete(arr);
    cJSON *last = msg_at(cap.n - 1);
    assert_string_equal(cJSON_GetObjectItem(last, "method")->valuestring, "stream.event");
    cJSON_Delete(last);
    rpc_free(ctx);
    cap_reset(&cap);
}

static void test_free_cancels_streams(void **state)
{
    (void)state;
    if (!reg) skip();
    struct rpc_ctx *ctx;
    assert_int_equal(rpc_create(reg, &ctx), KRS_OK);
    cap_reset(&cap);
    handle(ctx,
           "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"generate\",\"params\":{\"prompt\":\"Tell "
           "me a story\",\"max_tokens\":2000,\"ignore_eos\":true}}",
           0);
    rpc_free(ctx); /* cancels; returns once the stream has written its last message */
    cJSON *last = msg_at(cap.n - 1);
    const cJSON *p = cJSON_GetObjectItem(last, "params");
    assert_string_equal(cJSON_GetObjectItem(p, "event")->valuestring, "cancelled");
    cJSON_Delete(last);
    cap_reset(&cap);
}

/* Many concurrent streams (stdio style, one message each): every stream is read by the ctx's
 * one pump, so starting them adds no thread; each one's response comes before its chunks, the
 * chunk indices are contiguous and it ends with stats and a "completed" event. */
#define N_STREAMS 64

struct many {
    pthread_mutex_t lock;
    int answered[N_STREAMS]; /* the response {stream_id} was written */
    int next_index[N_STREAMS];
    int generated[N_STREAMS];
    int completed[N_STREAMS];
    int problems;
};

static void many_write(void *user, const char *json, size_t len)
{
    struct many *m = user;
    cJSON *j = cJSON_ParseWithLength(json, len);
    pthread_mutex_lock(&m->lock);
    const cJSON *res = cJSON_GetObjectItem(j, "result");
    const cJSON *p = cJSON_GetObjectItem(j, "params");
    const cJSON *sid = cJSON_GetObjectItem(res ? res : p, "stream_id");
    int k = -1;
    if (cJSON_IsString(sid) && sscanf(sid->valuestring, "m%d", &k) == 1 && k >= 0 &&
        k < N_STREAMS) {
        const char *method = cJSON_GetStringValue(cJSON_GetObjectItem(j, "method"));
        if (res) {
            m->answered[k]++;
        } else if (!m->answered[k] || m->completed[k]) {
            m->problems++; /* a notification before its response, or after the end */
        } else if (!strcmp(method, "stream.chunk")) {
            if (cJSON_GetObjectItem(p, "index")->valueint != m->next_index[k]) m->problems++;
            m->next_index[k]++;
        } else if (!strcmp(method, "stream.stats")) {
            m->generated[k] = cJSON_GetObjectItem(p, "generated_tokens")->valueint;
        } else if (!strcmp(method, "stream.event")) {
            if (strcmp(cJSON_GetStringValue(cJSON_GetObjectItem(p, "event")), "completed")) {
                printf("stream m%d: %.*s\n", k, (int)len, json);
                m->problems++;
            }
            m->completed[k] = 1;
        }
    } else {
        printf("unexpected: %.*s\n", (int)len, json);
        m->problems++; /* an error response or something unexpected */
    }
    pthread_mutex_unlock(&m->lock);
    cJSON_Delete(j);
}

static int thread_count(void)
{
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    int n = -1;
    while (f && fgets(line, sizeof line, f))
        if (sscanf(line, "Threads: %d", &n) == 1) break;
    if (f) fclose(f);
    return n;
}

static void test_many_concurrent_streams(void **state)
{
    (void)state;
    if (!reg) skip();
    static struct many m;
    memset(&m, 0, sizeof m);
    pthread_mutex_init(&m.lock, NULL);
    const struct rpc_sink many_sink = {many_write, &m};
    struct rpc_ctx *ctx;
    assert_int_equal(rpc_create(reg, &ctx), KRS_OK);
    int threads_before = thread_count();
    assert_true(threads_before > 0);
    for (int i = 0; i < N_STREAMS; i++) {
        char msg[512];
        snprintf(msg, sizeof msg,
                 "{\"jsonrpc\":\"2.0\",\"id\":%d,\"method\":\"generate\",\"params\":{"
                 "\"prompt\":\"Story number %d begins\",\"max_tokens\":4,\"ignore_eos\":true,"
                 "\"stream_id\":\"m%d\"}}",
                 i, i, i);
        assert_int_equal(rpc_handle(ctx, msg, strlen(msg), &many_sink, 0), KRS_OK);
    }
    /* Every stream started and (mostly) still running: no thread was added for them. */
    int threads_during = thread_count();
    int live = rpc_active_streams(ctx);
    rpc_wait_idle(ctx);
    rpc_free(ctx);
    printf("%d streams, %d live right after starting; threads %d before, %d during\n", N_STREAMS,
           live, threads_before, threads_during);
    assert_true(live > N_STREAMS / 2);
    assert_true(threads_during <= threads_before + 2);
    assert_int_equal(m.problems, 0);
    for (int i = 0; i < N_STREAMS; i++) {
        assert_int_equal(m.answered[i], 1);
        assert_int_equal(m.completed[i], 1);
        assert_int_equal(m.generated[i], 4);
        assert_true(m.next_index[i] >= 1);
    }
    pthread_mutex_destroy(&m.lock);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_protocol_errors),      cmocka_unit_test(test_json_string_sanitises),
        cmocka_unit_test(test_wait_streams_order),   cmocka_unit_test(test_batch_array_waits),
        cmocka_unit_test(test_free_cancels_streams), cmocka_unit_test(test_many_concurrent_streams),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
