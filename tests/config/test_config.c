/* config/: defaults, YAML file, environment, flags, --set, precedence, every error class (each
 * must name the key and, for files, path:line:column), the dump and the JSON view. Expected
 * values are written out here from the schema, not read back from the key registry. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "config/config.h"
#include "krserve.h"

static char tmpdir[256], origcwd[1024];

/* Runs in a fresh temporary directory so that no ./config/runtime.yaml is picked up unasked. */
static int setup(void **state)
{
    snprintf(tmpdir, sizeof tmpdir, "/tmp/krs_config_test_XXXXXX");
    if (!getcwd(origcwd, sizeof origcwd) || !mkdtemp(tmpdir)) return -1;
    return chdir(tmpdir);
}

static int teardown(void **state)
{
    if (chdir(origcwd)) return -1;
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmpdir);
    return system(cmd) == 0 ? 0 : -1;
}

/* Writes `text` to tmpdir/name and returns the path (static buffer per call site is enough). */
static const char *write_file(const char *name, const char *text)
{
    static char path[8][512];
    static int slot;
    char *p = path[slot++ % 8];
    snprintf(p, 512, "%s/%s", tmpdir, name);
    FILE *f = fopen(p, "w");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
    return p;
}

static char *no_env[] = {NULL};

/* config_load with an explicit file, env and flags (argv without a program name). */
static int load(struct krs_config *cfg, const char *file, char **envp, int argc, char **argv,
                char *err)
{
    return config_load(cfg, file, envp ? envp : no_env, argc, argv, NULL, NULL, err, 1024);
}

static void test_defaults(void **state)
{
    struct krs_config c;
    config_defaults(&c);
    assert_string_equal(c.server.host, "127.0.0.1");
    assert_int_equal(c.server.port, 8080);
    assert_string_equal(c.server.api_key, "");
    assert_int_equal(c.server.max_body_bytes, 1048576);
    assert_int_equal(c.server.max_prompt_tokens, 8192);
    assert_int_equal(c.server.max_tokens_limit, 4096);
    assert_int_equal(c.server.request_timeout_ms, 600000);
    assert_int_equal(c.server.max_queue, 256);
    assert_int_equal(c.server.threads, 8);
    assert_int_equal(c.server.drain_timeout_ms, 30000);
    assert_string_equal(c.model.path, "");
    assert_string_equal(c.model.dir, "models");
    assert_string_equal(c.model.name, "");
    assert_int_equal(c.model.kv_cache_tokens, 16384);
    assert_int_equal(c.model.max_batch_tokens, 512);
    assert_int_equal(c.model.threads, 0);
    assert_int_equal(c.model.context_length, 0);
    assert_true(c.performance.gpu_scheduler.enabled);
    assert_int_equal(c.performance.gpu_scheduler.mode, CONFIG_SCHED_AUTO);
    assert_int_equal(c.performance.gpu_scheduler.batch_size, 4);
    assert_true(c.performance.gpu_scheduler.batch_window_ms == 2.0);
    assert_true(c.performance.gpu_scheduler.p99_threshold_ms == 100.0);
    assert_true(c.performance.gpu_scheduler.auto_tune.enabled);
    assert_int_equal(c.performance.gpu_scheduler.auto_tune.min_batch, 1);
    assert_int_equal(c.performance.gpu_scheduler.auto_tune.max_batch, 32);
    assert_true(c.performance.gpu_scheduler.auto_tune.ema_alpha == 0.3);
    assert_int_equal(c.performance.gpu_scheduler.auto_tune.interval, 10);
    assert_true(c.performance.adaptive_batching.enabled);
    assert_true(c.performance.adaptive_batching.window_min_ms == 0.75);
    assert_true(c.performance.adaptive_batching.window_max_ms == 3.0);
    assert_int_equal(c.performance.adaptive_batching.priority_levels, 3);
    assert_true(c.monitoring.prometheus.enabled);
    assert_int_equal(c.monitoring.prometheus.port, 0);
    assert_string_equal(c.monitoring.prometheus.path, "/metrics");
    assert_true(c.monitoring.metrics.enabled);
    assert_int_equal(c.monitoring.metrics.n_windows_sec, 3);
    assert_int_equal(c.monitoring.metrics.windows_sec[0], 5);
    assert_int_equal(c.monitoring.metrics.windows_sec[1], 30);
    assert_int_equal(c.monitoring.metrics.windows_sec[2], 60);
    assert_int_equal(c.logging.level, 1); /* info, as util/log.h's KRS_LOG_INFO */
    assert_string_equal(c.file, "");
    assert_int_equal(config_key_count(), 45);
    assert_true(c.performance.gpu_scheduler.auto_tune.late_wait_ms == 100.0);
    assert_true(c.performance.gpu_scheduler.auto_tune.late_p99_factor == 2.0);
    assert_true(c.performance.prefix_cache.enabled);
    assert_int_equal(c.performance.prefix_cache.max_tokens, 0);
    assert_false(c.performance.dedup);
    assert_int_equal(c.model.device, CONFIG_DEVICE_CPU);
    assert_int_equal(c.model.memory_budget_mb, 0);
    assert_int_equal(c.server.idle_timeout_s, 60);
    for (size_t i = 0; i < config_key_count(); i++)
        assert_int_equal(c.origin[i].source, CONFIG_SRC_DEFAULT);
    char err[1024];
    assert_int_equal(config_validate(&c, err, sizeof err), KRS_OK);
    assert_int_equal(config_effective_sched_mode(&c), CONFIG_SCHED_AUTO);
}

/* Every registered key can be set from a file at its own position, its env var and flag are
 * unique, and its default text is accepted by config_set. */
static void test_registry_round_trip(void **state)
{
    char err[1024], yaml[1024], val[4096];
    for (size_t i = 0; i < config_key_count(); i++) {
        const struct config_key *k = config_key_at(i);
        struct krs_config c;
        config_defaults(&c);
        assert_int_equal(config_set(&c, k->name, k->def, CONFIG_SRC_FLAG, err, sizeof err), KRS_OK);
        for (size_t j = 0; j < i; j++) {
            const struct config_key *o = config_key_at(j);
            assert_string_not_equal(o->name, k->name);
            if (k->env && o->env) assert_string_not_equal(o->env, k->env);
            if (k->flag && o->flag) assert_string_not_equal(o->flag, k->flag);
        }
        /* Nest "a.b.c" as a:\n  b:\n    c: <default> and read it back. */
        size_t n = 0;
        int depth = 0;
        const char *p = k->name, *dot;
        while ((dot = strchr(p, '.'))) {
            n += (size_t)snprintf(yaml + n, sizeof yaml - n, "%*s%.*s:\n", depth * 2, "",
                                  (int)(dot - p), p);
            depth++;
            p = dot + 1;
        }
        config_format_value(&c, k->name, val, sizeof val);
        if (k->type == CONFIG_T_STRING && !k->def[0]) snprintf(val, sizeof val, "null");
        snprintf(yaml + n, sizeof yaml - n, "%*s%s: %s\n", depth * 2, "", p, val);
        const char *path = write_file("rt.yaml", yaml);
        struct krs_config d;
        config_defaults(&d);
        int rc = config_apply_file(&d, path, err, sizeof err);
        if (rc) fprintf(stderr, "%s\n%s\n", yaml, err);
        assert_int_equal(rc, KRS_OK);
        assert_int_equal(d.origin[i].source, CONFIG_SRC_FILE);
        assert_int_equal(d.origin[i].line, depth + 1);
        assert_int_equal(d.origin[i].col, depth * 2 + (int)strlen(p) + 3);
        char v1[4096], v2[4096];
        config_format_value(&c, k->name, v1, sizeof v1);
        config_format_value(&d, k->name, v2, sizeof v2);
        assert_string_equal(v1, v2);
    }
}

static void test_file_parse(void **state)
{
    const char *path = write_file("a.yaml", "# comment\n"
                                            "server:\n"
                                            "  host: 0.0.0.0\n"
                                            "  port: 9001\n"
                                            "  apiKey: \"s3cret\"\n"
                                            "model:\n"
                                            "  path: models/x.gguf\n"
                                            "performance:\n"
                                            "  gpuScheduler:\n"
                                            "    mode: fixed\n"
                                            "    batchWindowMs: 1.5\n"
                                            "    autoTune: {enabled: off, maxBatch: 16}\n"
                                            "monitoring:\n"
                                            "  prometheus:\n"
                                            "  metrics:\n"
                                            "    windowsSec:\n"
                                            "      - 10\n"
                                            "      - 120\n"
                                            "logging:\n"
                                            "  level: DEBUG\n");
    struct krs_config c;
    char err[1024];
    assert_int_equal(load(&c, path, NULL, 0, NULL, err), KRS_OK);
    assert_string_equal(c.file, path);
    assert_string_equal(c.server.host, "0.0.0.0");
    assert_int_equal(c.server.port, 9001);
    assert_string_equal(c.server.api_key, "s3cret");
    assert_string_equal(c.model.path, "models/x.gguf");
    assert_int_equal(c.performance.gpu_scheduler.mode, CONFIG_SCHED_FIXED);
    assert_true(c.performance.gpu_scheduler.batch_window_ms == 1.5);
    assert_false(c.performance.gpu_scheduler.auto_tune.enabled);
    assert_int_equal(c.performance.gpu_scheduler.auto_tune.max_batch, 16);
    assert_int_equal(c.monitoring.metrics.n_windows_sec, 2);
    assert_int_equal(c.monitoring.metrics.windows_sec[0], 10);
    assert_int_equal(c.monitoring.metrics.windows_sec[1], 120);
    assert_int_equal(c.monitoring.metrics.windows_sec[2], 0);
    assert_int_equal(c.logging.level, 0);
    assert_int_equal(config_source_of(&c, "server.port"), CONFIG_SRC_FILE);
    assert_int_equal(config_source_of(&c, "server.threads"), CONFIG_SRC_DEFAULT);
    assert_int_equal(config_source_of(&c, "no.such"), -1);
    int port = config_key_find("server.port");
    assert_int_equal(c.origin[port].line, 4);
    assert_int_equal(c.origin[port].col, 9);
    assert_int_equal(config_effective_sched_mode(&c), CONFIG_SCHED_FIXED);

    /* Empty and comment-only files mean defaults; an explicit null clears a nullable key. */
    struct krs_config d;
    assert_int_equal(load(&d, write_file("e.yaml", ""), NULL, 0, NULL, err), KRS_OK);
    assert_int_equal(d.server.port, 8080);
    assert_int_equal(load(&d, write_file("e2.yaml", "# nothing\n---\n"), NULL, 0, NULL, err),
                     KRS_OK);
    assert_int_equal(load(&d, write_file("n.yaml", "server:\n  apiKey: ~\nmodel:\n  name: null\n"),
                          NULL, 0, NULL, err),
                     KRS_OK);
    assert_string_equal(d.server.api_key, "");
    assert_int_equal(config_source_of(&d, "server.apiKey"), CONFIG_SRC_FILE);
    char *key_env[] = {"KRSERVE_API_KEY=k1", NULL};
    assert_int_equal(load(&d, write_file("n2.yaml", "model:\n  name:\n"), key_env, 0, NULL, err),
                     KRS_OK);
    assert_string_equal(d.model.name, "");
    assert_int_equal(config_source_of(&d, "model.name"), CONFIG_SRC_FILE);
    assert_string_equal(d.server.api_key, "k1");
    char *clear[] = {"--set", "server.apiKey="};
    assert_int_equal(load(&d, NULL, key_env, 2, clear, err), KRS_OK);
    assert_string_equal(d.server.api_key, "");
    assert_int_equal(config_source_of(&d, "server.apiKey"), CONFIG_SRC_FLAG);
    /* A quoted "null" is a string, not null. */
    assert_int_equal(
        load(&d, write_file("q.yaml", "model:\n  name: \"null\"\n"), NULL, 0, NULL, err), KRS_OK);
    assert_string_equal(d.model.name, "null");
}

static void test_precedence(void **state)
{
    const char *path = write_file("p.yaml", "server:\n  port: 9001\n  host: 10.0.0.1\n"
                                            "performance:\n  gpuScheduler:\n    batchSize: 8\n");
    char *env[] = {"MLX_GPU_SCHEDULER_BATCH_SIZE=16", "KRSERVE_PORT=9002",
                   "KRSERVE_MODEL=", "UNRELATED=1", NULL};
    struct krs_config c;
    char err[1024];
    /* env overrides file */
    assert_int_equal(load(&c, path, env, 0, NULL, err), KRS_OK);
    assert_int_equal(c.performance.gpu_scheduler.batch_size, 16);
    assert_int_equal(c.server.port, 9002);
    assert_string_equal(c.server.host, "10.0.0.1");
    assert_string_equal(c.model.path, ""); /* empty env var = unset */
    int bs = config_key_find("performance.gpuScheduler.batchSize");
    assert_int_equal(c.origin[bs].source, CONFIG_SRC_ENV);
    assert_string_equal(c.origin[bs].name, "MLX_GPU_SCHEDULER_BATCH_SIZE");
    assert_int_equal(config_source_of(&c, "server.host"), CONFIG_SRC_FILE);

    /* flags override env */
    char *argv[] = {"--port",      "9003",
                    "--set",       "performance.gpuScheduler.batchSize=2",
                    "--host=::1",  "-m",
                    "m.gguf",      "--log-level",
                    "warn",        "--kv-tokens=4096",
                    "--threads",   "3",
                    "--model-dir", "/srv/models",
                    "--api-key",   "k"};
    assert_int_equal(load(&c, path, env, 16, argv, err), KRS_OK);
    assert_int_equal(c.server.port, 9003);
    assert_int_equal(c.performance.gpu_scheduler.batch_size, 2);
    assert_string_equal(c.server.host, "::1");
    assert_string_equal(c.model.path, "m.gguf");
    assert_int_equal(c.logging.level, 2);
    assert_int_equal(c.model.kv_cache_tokens, 4096);
    assert_int_equal(c.model.threads, 3);
    assert_string_equal(c.model.dir, "/srv/models");
    assert_string_equal(c.server.api_key, "k");
    int port = config_key_find("server.port"), mp = config_key_find("model.path");
    assert_int_equal(c.origin[port].source, CONFIG_SRC_FLAG);
    assert_string_equal(c.origin[port].name, "--port");
    assert_string_equal(c.origin[mp].name, "-m");
    assert_string_equal(c.origin[bs].name, "--set");

    /* The process environment is used when envp is NULL. */
    setenv("KRSERVE_PORT", "9444", 1);
    assert_int_equal(config_load(&c, path, NULL, 0, NULL, NULL, NULL, err, sizeof err), KRS_OK);
    assert_int_equal(c.server.port, 9444);
    unsetenv("KRSERVE_PORT");
}

/* One case: the YAML text, and the exact error expected after "PATH:". */
struct file_case {
    const char *yaml;
    const char *expect;
};

static void test_file_errors(void **state)
{
    static const struct file_case cases[] = {
        /* wrong type */
        {"performance:\n  gpuScheduler:\n    autoTune:\n      maxBatch: lots\n",
         "4:17: performance.gpuScheduler.autoTune.maxBatch: expected an integer in [1, 1024], "
         "got \"lots\""},
        {"monitoring:\n  metrics:\n    enabled: maybe\n",
         "3:14: monitoring.metrics.enabled: expected a boolean (true/false, on/off, yes/no, 1/0), "
         "got \"maybe\""},
        {"performance:\n  adaptiveBatching:\n    windowMinMs: fast\n",
         "3:18: performance.adaptiveBatching.windowMinMs: expected a number in [0, 1000], got "
         "\"fast\""},
        {"server:\n  port:\n", "2:8: server.port: expected an integer in [1, 65535], got null"},
        {"server:\n  port: [1, 2]\n", "2:9: server.port: expected a single value, got a list"},
        /* out of range */
        {"server:\n  port: 70000\n",
         "2:9: server.port: expected an integer in [1, 65535], got \"70000\""},
        {"server:\n  port: 0\n", "2:9: server.port: expected an integer in [1, 65535], got \"0\""},
        {"server:\n  port: 99999999999999999999999\n",
         "2:9: server.port: expected an integer in [1, 65535], got \"99999999999999999999999\""},
        {"performance:\n  gpuScheduler:\n    autoTune:\n      emaAlpha: 1.5\n",
         "4:17: performance.gpuScheduler.autoTune.emaAlpha: expected a number in [0.01, 1], got "
         "\"1.5\""},
        {"performance:\n  gpuScheduler:\n    autoTune:\n      emaAlpha: .nan\n",
         "4:17: performance.gpuScheduler.autoTune.emaAlpha: expected a number in [0.01, 1], got "
         "\".nan\""},
        /* unknown key / section */
        {"server:\n  prot: 1\n", "2:3: server.prot: unknown key (did you mean server.port?)"},
        {"bogus:\n  a: 1\n", "1:1: bogus: unknown key"},
        {"performance:\n  gpuScheduler:\n    batchsize: 4\n",
         "3:5: performance.gpuScheduler.batchsize: unknown key (did you mean "
         "performance.gpuScheduler.batchSize?)"},
        {"server: 5\n", "1:9: server: expected a section (a mapping of keys), got a scalar"},
        /* bad enum */
        {"performance:\n  gpuScheduler:\n    mode: turbo\n",
         "3:11: performance.gpuScheduler.mode: expected one of auto|fixed|off, got \"turbo\""},
        {"logging:\n  level: verbose\n",
         "2:10: logging.level: expected one of debug|info|warn|error|off, got \"verbose\""},
        /* strings */
        {"monitoring:\n  prometheus:\n    path: metrics\n",
         "3:11: monitoring.prometheus.path: must start with '/', got \"metrics\""},
        {"server:\n  host: \"\"\n",
         "2:9: server.host: expected a non-empty string of at most 255 bytes, got \"\""},
        /* lists */
        {"monitoring:\n  metrics:\n    windowsSec: [5, 5]\n",
         "3:17: monitoring.metrics.windowsSec: entries must be strictly increasing (5 after 5)"},
        {"monitoring:\n  metrics:\n    windowsSec: [5, x]\n",
         "3:21: monitoring.metrics.windowsSec: expected a list of integers in [1, 86400], got "
         "\"x\""},
        {"monitoring:\n  metrics:\n    windowsSec: []\n",
         "3:17: monitoring.metrics.windowsSec: expected 1 to 8 entries, got 0"},
        {"monitoring:\n  metrics:\n    windowsSec: [1,2,3,4,5,6,7,8,9]\n",
         "3:17: monitoring.metrics.windowsSec: expected 1 to 8 entries, got 9"},
        /* structure */
        {"server:\n  port: 1\nserver:\n  host: a\n",
         "3:1: server: duplicate key (first at line 1)"},
        {"hello\n", "1:1: the top level must be a mapping of sections"},
        {"server:\n  port: 1\n---\nserver:\n  port: 2\n", "4:1: only one YAML document is allowed"},
        {"server: [1, 2\n", "2:1: YAML syntax error: did not find expected ',' or ']' while "
                            "parsing a flow sequence"},
    };
    char err[1024], expect[1200];
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const char *path = write_file("bad.yaml", cases[i].yaml);
        struct krs_config c;
        int rc = load(&c, path, NULL, 0, NULL, err);
        snprintf(expect, sizeof expect, "%s:%s", path, cases[i].expect);
        if (rc == KRS_OK || strcmp(err, expect) != 0)
            fprintf(stderr, "case %zu:\n  got      %s\n  expected %s\n", i, err, expect);
        assert_int_not_equal(rc, KRS_OK);
        assert_string_equal(err, expect);
    }
}

static void test_cross_key_errors(void **state)
{
    char err[1024], expect[1200];
    struct krs_config c;
    const char *p1 = write_file("x1.yaml", "performance:\n  gpuScheduler:\n    autoTune:\n"
                                           "      minBatch: 8\n      maxBatch: 4\n");
    assert_int_equal(load(&c, p1, NULL, 0, NULL, err), KRS_ERR_INVALID);
    snprintf(expect, sizeof expect,
             "%s:5:17: performance.gpuScheduler.autoTune.maxBatch: must be >= "
             "performance.gpuScheduler.autoTune.minBatch (8, file %s:4:17), got 4",
             p1, p1);
    assert_string_equal(err, expect);

    const char *p2 = write_file("x2.yaml", "performance:\n  adaptiveBatching:\n"
                                           "    windowMinMs: 5\n");
    assert_int_equal(load(&c, p2, NULL, 0, NULL, err), KRS_ERR_INVALID);
    snprintf(expect, sizeof expect,
             "%s:3:18: performance.adaptiveBatching.windowMinMs: must be <= "
             "performance.adaptiveBatching.windowMaxMs (3.0, default), got 5.0",
             p2);
    assert_string_equal(err, expect);

    /* The env-set key is blamed over the default one. */
    char *env[] = {"MLX_AUTO_TUNE_MIN_BATCH=40", NULL};
    assert_int_equal(load(&c, NULL, env, 0, NULL, err), KRS_ERR_INVALID);
    assert_string_equal(err, "env MLX_AUTO_TUNE_MIN_BATCH: performance.gpuScheduler.autoTune."
                             "minBatch: must be <= performance.gpuScheduler.autoTune.maxBatch "
                             "(32, default), got 40");
    char *env2[] = {"MLX_BATCH_WINDOW_MIN_MS=2", "MLX_BATCH_WINDOW_MAX_MS=1", NULL};
    assert_int_equal(load(&c, NULL, env2, 0, NULL, err), KRS_ERR_INVALID);
    assert_string_equal(err, "env MLX_BATCH_WINDOW_MAX_MS: performance.adaptiveBatching."
                             "windowMaxMs: must be >= performance.adaptiveBatching.windowMinMs "
                             "(2.0, env MLX_BATCH_WINDOW_MIN_MS), got 1.0");

    char *a1[] = {"--set", "model.contextLength=32768"};
    assert_int_equal(load(&c, NULL, NULL, 2, a1, err), KRS_ERR_INVALID);
    assert_string_equal(err, "flag --set: model.contextLength: must be <= model.kvCacheTokens "
                             "(16384, default), got 32768");
    char *a2[] = {"--set", "model.contextLength=16384"};
    assert_int_equal(load(&c, NULL, NULL, 2, a2, err), KRS_OK);

    char *a3[] = {"--set", "monitoring.prometheus.port=8080"};
    assert_int_equal(load(&c, NULL, NULL, 2, a3, err), KRS_ERR_INVALID);
    assert_string_equal(err, "flag --set: monitoring.prometheus.port: must be 0 or different "
                             "from server.port (8080, default), got 8080");
    char *a4[] = {"--set", "monitoring.prometheus.port=9090"};
    assert_int_equal(load(&c, NULL, NULL, 2, a4, err), KRS_OK);
    assert_int_equal(c.monitoring.prometheus.port, 9090);
}

static void test_env_and_flag_errors(void **state)
{
    char err[1024];
    struct krs_config c;
    char *env[] = {"MLX_AUTO_TUNE_MAX_BATCH=lots", NULL};
    assert_int_equal(load(&c, NULL, env, 0, NULL, err), KRS_ERR_INVALID);
    assert_string_equal(err, "env MLX_AUTO_TUNE_MAX_BATCH: performance.gpuScheduler.autoTune."
                             "maxBatch: expected an integer in [1, 1024], got \"lots\"");
    char *env2[] = {"KRSERVE_LOG_LEVEL=loud", NULL};
    assert_int_equal(load(&c, NULL, env2, 0, NULL, err), KRS_ERR_INVALID);
    assert_string_equal(err, "env KRSERVE_LOG_LEVEL: logging.level: expected one of "
                             "debug|info|warn|error|off, got \"loud\"");

    char *a1[] = {"--port", "http"};
    assert_int_equal(load(&c, NULL, NULL, 2, a1, err), KRS_ERR_INVALID);
    assert_string_equal(
        err, "flag --port: server.port: expected an integer in [1, 65535], got \"http\"");
    char *a2[] = {"--port"};
    assert_int_equal(load(&c, NULL, NULL, 1, a2, err), KRS_ERR_INVALID);
    assert_string_equal(err, "--port: missing value");
    char *a3[] = {"--frobnicate"};
    assert_int_equal(load(&c, NULL, NULL, 1, a3, err), KRS_ERR_INVALID);
    assert_string_equal(err, "unknown option '--frobnicate'");
    char *a4[] = {"--set", "server.prot=1"};
    assert_int_equal(load(&c, NULL, NULL, 2, a4, err), KRS_ERR_NOT_FOUND);
    assert_string_equal(err, "flag --set: server.prot: unknown key (did you mean server.port?)");
    char *a5[] = {"--set", "server.port"};
    assert_int_equal(load(&c, NULL, NULL, 2, a5, err), KRS_ERR_INVALID);
    assert_string_equal(err, "--set: expected key.path=value, got \"server.port\"");
    char *a6[] = {"--set=performance.gpuScheduler.mode=sometimes"};
    assert_int_equal(load(&c, NULL, NULL, 1, a6, err), KRS_ERR_INVALID);
    assert_string_equal(err, "flag --set: performance.gpuScheduler.mode: expected one of "
                             "auto|fixed|off, got \"sometimes\"");

    /* Non-config arguments are handed back in order when the caller asks for them. */
    char *a7[] = {"--print", "--port", "9000", "extra", "--json"};
    char *rest[5];
    int n_rest = -1;
    assert_int_equal(config_load(&c, NULL, no_env, 5, a7, rest, &n_rest, err, sizeof err), KRS_OK);
    assert_int_equal(n_rest, 3);
    assert_string_equal(rest[0], "--print");
    assert_string_equal(rest[1], "extra");
    assert_string_equal(rest[2], "--json");
    assert_int_equal(c.server.port, 9000);
}

static void test_bool_spellings(void **state)
{
    static const struct {
        const char *text;
        bool value;
    } ok[] = {{"true", true}, {"false", false}, {"on", true},  {"off", false},
              {"1", true},    {"0", false},     {"yes", true}, {"no", false},
              {"TRUE", true}, {"Off", false},   {"Yes", true}, {"NO", false}};
    char err[1024], envvar[64], yaml[128];
    for (size_t i = 0; i < sizeof ok / sizeof ok[0]; i++) {
        struct krs_config c;
        snprintf(envvar, sizeof envvar, "MLX_METRICS_ENABLED=%s", ok[i].text);
        char *env[] = {envvar, NULL};
        assert_int_equal(load(&c, NULL, env, 0, NULL, err), KRS_OK);
        assert_int_equal(c.monitoring.metrics.enabled, ok[i].value);
        snprintf(yaml, sizeof yaml, "monitoring:\n  prometheus:\n    enabled: %s\n", ok[i].text);
        assert_int_equal(load(&c, write_file("b.yaml", yaml), NULL, 0, NULL, err), KRS_OK);
        assert_int_equal(c.monitoring.prometheus.enabled, ok[i].value);
        assert_int_equal(config_set(&c, "performance.adaptiveBatching.enabled", ok[i].text,
                                    CONFIG_SRC_FLAG, err, sizeof err),
                         KRS_OK);
        assert_int_equal(c.performance.adaptive_batching.enabled, ok[i].value);
    }
    static const char *const bad[] = {"2", "enable", "y", "t", "", " on", "truee"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        struct krs_config c;
        config_defaults(&c);
        assert_int_equal(
            config_set(&c, "monitoring.metrics.enabled", bad[i], CONFIG_SRC_ENV, err, sizeof err),
            KRS_ERR_INVALID);
        assert_non_null(strstr(err, "monitoring.metrics.enabled: expected a boolean"));
    }
}

static void test_gpu_scheduler_off(void **state)
{
    char err[1024];
    struct krs_config c;
    char *off[] = {"MLX_GPU_SCHEDULER=off", NULL};
    assert_int_equal(load(&c, NULL, off, 0, NULL, err), KRS_OK);
    assert_false(c.performance.gpu_scheduler.enabled);
    assert_int_equal(c.performance.gpu_scheduler.mode, CONFIG_SCHED_AUTO); /* untouched */
    assert_int_equal(config_effective_sched_mode(&c), CONFIG_SCHED_OFF);
    int k = config_key_find("performance.gpuScheduler.enabled");
    assert_string_equal(c.origin[k].name, "MLX_GPU_SCHEDULER");

    char *on_fixed[] = {"MLX_GPU_SCHEDULER=on", NULL};
    char *a[] = {"--set", "performance.gpuScheduler.mode=fixed"};
    assert_int_equal(load(&c, NULL, on_fixed, 2, a, err), KRS_OK);
    assert_int_equal(config_effective_sched_mode(&c), CONFIG_SCHED_FIXED);
    char *no_tune[] = {"MLX_AUTO_TUNE=off", NULL};
    assert_int_equal(load(&c, NULL, no_tune, 0, NULL, err), KRS_OK);
    assert_int_equal(config_effective_sched_mode(&c), CONFIG_SCHED_FIXED);
    char *a2[] = {"--set", "performance.gpuScheduler.mode=off"};
    assert_int_equal(load(&c, NULL, NULL, 2, a2, err), KRS_OK);
    assert_int_equal(config_effective_sched_mode(&c), CONFIG_SCHED_OFF);

    /* Every MLX_* variable of the seed reaches its key. */
    char *all[] = {"MLX_GPU_SCHEDULER_BATCH_SIZE=6",
                   "MLX_GPU_SCHEDULER_WINDOW_MS=1.25",
                   "MLX_GPU_SCHEDULER_P99_THRESHOLD_MS=50",
                   "MLX_AUTO_TUNE=no",
                   "MLX_AUTO_TUNE_MIN_BATCH=2",
                   "MLX_AUTO_TUNE_MAX_BATCH=8",
                   "MLX_AUTO_TUNE_EMA_ALPHA=0.5",
                   "MLX_AUTO_TUNE_INTERVAL=20",
                   "MLX_ENABLE_ADAPTIVE_BATCHING=false",
                   "MLX_BATCH_WINDOW_MIN_MS=0.5",
                   "MLX_BATCH_WINDOW_MAX_MS=4",
                   "MLX_PROMETHEUS_PORT=9090",
                   "MLX_METRICS_ENABLED=0",
                   "KRSERVE_HOST=0.0.0.0",
                   "KRSERVE_API_KEY=abc",
                   "KRSERVE_MODEL=models/m.gguf",
                   NULL};
    assert_int_equal(load(&c, NULL, all, 0, NULL, err), KRS_OK);
    assert_int_equal(c.performance.gpu_scheduler.batch_size, 6);
    assert_true(c.performance.gpu_scheduler.batch_window_ms == 1.25);
    assert_true(c.performance.gpu_scheduler.p99_threshold_ms == 50);
    assert_false(c.performance.gpu_scheduler.auto_tune.enabled);
    assert_int_equal(c.performance.gpu_scheduler.auto_tune.min_batch, 2);
    assert_int_equal(c.performance.gpu_scheduler.auto_tune.max_batch, 8);
    assert_true(c.performance.gpu_scheduler.auto_tune.ema_alpha == 0.5);
    assert_int_equal(c.performance.gpu_scheduler.auto_tune.interval, 20);
    assert_false(c.performance.adaptive_batching.enabled);
    assert_true(c.performance.adaptive_batching.window_min_ms == 0.5);
    assert_true(c.performance.adaptive_batching.window_max_ms == 4);
    assert_int_equal(c.monitoring.prometheus.port, 9090);
    assert_false(c.monitoring.metrics.enabled);
    assert_string_equal(c.server.host, "0.0.0.0");
    assert_string_equal(c.server.api_key, "abc");
    assert_string_equal(c.model.path, "models/m.gguf");
    config_free(&c);
    assert_string_equal(c.server.api_key, "");
}

static void test_set_and_ranges(void **state)
{
    struct krs_config c, before;
    char err[1024];
    config_defaults(&c);
    assert_int_equal(
        config_set(&c, "performance.gpuScheduler.batchSize", "8", CONFIG_SRC_FLAG, err, sizeof err),
        KRS_OK);
    assert_int_equal(c.performance.gpu_scheduler.batch_size, 8);
    assert_int_equal(config_source_of(&c, "performance.gpuScheduler.batchSize"), CONFIG_SRC_FLAG);
    assert_int_equal(config_set(&c, "server.nope", "1", CONFIG_SRC_FLAG, err, sizeof err),
                     KRS_ERR_NOT_FOUND);
    assert_string_equal(err, "server.nope: unknown key");
    assert_int_equal(config_set(&c, "server", "1", CONFIG_SRC_FLAG, err, sizeof err),
                     KRS_ERR_NOT_FOUND);
    /* A rejected value leaves the struct unchanged, list keys included. */
    before = c;
    assert_int_equal(
        config_set(&c, "monitoring.metrics.windowsSec", "1,2,x", CONFIG_SRC_FLAG, err, sizeof err),
        KRS_ERR_INVALID);
    assert_int_equal(
        config_set(&c, "monitoring.metrics.windowsSec", "3,2", CONFIG_SRC_FLAG, err, sizeof err),
        KRS_ERR_INVALID);
    assert_int_equal(config_set(&c, "server.port", "65536", CONFIG_SRC_ENV, err, sizeof err),
                     KRS_ERR_INVALID);
    assert_memory_equal(&c, &before, sizeof c);
    assert_int_equal(config_set(&c, "monitoring.metrics.windowsSec", "[ 1, 10 ,100 ]",
                                CONFIG_SRC_FLAG, err, sizeof err),
                     KRS_OK);
    assert_int_equal(c.monitoring.metrics.n_windows_sec, 3);
    assert_int_equal(c.monitoring.metrics.windows_sec[2], 100);

    static const struct {
        const char *key, *value;
        int rc;
    } ranges[] = {
        {"server.port", "1", KRS_OK},
        {"server.port", "65535", KRS_OK},
        {"server.port", "65536", KRS_ERR_INVALID},
        {"server.port", "-1", KRS_ERR_INVALID},
        {"server.port", "8080.0", KRS_ERR_INVALID},
        {"server.port", " 80", KRS_ERR_INVALID},
        {"server.maxBodyBytes", "1073741824", KRS_OK},
        {"server.maxBodyBytes", "1073741825", KRS_ERR_INVALID},
        {"server.drainTimeoutMs", "0", KRS_OK},
        {"model.threads", "0", KRS_OK},
        {"model.kvCacheTokens", "-1", KRS_ERR_INVALID},
        {"model.kvCacheTokens", "0", KRS_OK},
        {"model.device", "cuda", KRS_OK},
        {"model.device", "tpu", KRS_ERR_INVALID},
        {"performance.gpuScheduler.autoTune.emaAlpha", "1", KRS_OK},
        {"performance.gpuScheduler.autoTune.emaAlpha", "0", KRS_ERR_INVALID},
        {"performance.gpuScheduler.autoTune.emaAlpha", "1e-1", KRS_OK},
        {"performance.gpuScheduler.autoTune.emaAlpha", "0x1p-2", KRS_ERR_INVALID},
        {"performance.gpuScheduler.autoTune.emaAlpha", "inf", KRS_ERR_INVALID},
        {"performance.gpuScheduler.batchWindowMs", "0", KRS_OK},
        {"performance.gpuScheduler.batchWindowMs", "1000.5", KRS_ERR_INVALID},
        {"performance.adaptiveBatching.priorityLevels", "4", KRS_ERR_INVALID},
        {"monitoring.prometheus.port", "0", KRS_OK},
        {"monitoring.metrics.windowsSec", "86401", KRS_ERR_INVALID},
        {"monitoring.metrics.windowsSec", "1,2,3,4,5,6,7,8", KRS_OK},
        {"monitoring.metrics.windowsSec", "1,2,3,4,5,6,7,8,9", KRS_ERR_INVALID},
        {"monitoring.prometheus.path", "/a b", KRS_ERR_INVALID},
        {"server.host", "a/b", KRS_ERR_INVALID},
        {"server.apiKey", "", KRS_OK}, /* empty = null for nullable strings */
        {"model.dir", "", KRS_ERR_INVALID},
        {"logging.level", "ERROR", KRS_OK},
    };
    for (size_t i = 0; i < sizeof ranges / sizeof ranges[0]; i++) {
        config_defaults(&c);
        int rc = config_set(&c, ranges[i].key, ranges[i].value, CONFIG_SRC_FLAG, err, sizeof err);
        if (rc != ranges[i].rc)
            fprintf(stderr, "%s=%s: %d %s\n", ranges[i].key, ranges[i].value, rc, err);
        assert_int_equal(rc, ranges[i].rc);
        if (rc) assert_memory_equal(err, ranges[i].key, strlen(ranges[i].key));
    }
    char longhost[400];
    memset(longhost, 'h', sizeof longhost - 1);
    longhost[sizeof longhost - 1] = '\0';
    assert_int_equal(config_set(&c, "server.host", longhost, CONFIG_SRC_FLAG, err, sizeof err),
                     KRS_ERR_INVALID);
    assert_non_null(strstr(err, "server.host: expected a non-empty string of at most 255 bytes"));
    longhost[255] = '\0';
    assert_int_equal(config_set(&c, "server.host", longhost, CONFIG_SRC_FLAG, err, sizeof err),
                     KRS_OK);
}

static void test_file_resolution(void **state)
{
    char err[1024], cwd[1024], dir[600];
    struct krs_config c;
    const char *a = write_file("ra.yaml", "server:\n  port: 1111\n");
    const char *b = write_file("rb.yaml", "server:\n  port: 2222\n");
    char envc[600];
    snprintf(envc, sizeof envc, "KRSERVE_CONFIG=%s", a);
    char *env[] = {envc, NULL};
    assert_int_equal(load(&c, NULL, env, 0, NULL, err), KRS_OK);
    assert_int_equal(c.server.port, 1111);
    assert_string_equal(c.file, a);
    char *fl[] = {"--config", (char *)b};
    assert_int_equal(load(&c, NULL, env, 2, fl, err), KRS_OK);
    assert_int_equal(c.server.port, 2222);
    assert_int_equal(load(&c, a, NULL, 2, fl, err), KRS_OK); /* flag beats the argument */
    assert_int_equal(c.server.port, 2222);
    char last[700];
    snprintf(last, sizeof last, "--config=%s", a);
    char *fl2[] = {"--config", (char *)b, last};
    assert_int_equal(load(&c, NULL, NULL, 3, fl2, err), KRS_OK); /* the last --config wins */
    assert_int_equal(c.server.port, 1111);
    char missing[600];
    snprintf(missing, sizeof missing, "%s/none.yaml", tmpdir);
    char *fm[] = {"--config", missing};
    assert_int_equal(load(&c, NULL, env, 2, fm, err), KRS_ERR_IO);
    char expect[800];
    snprintf(expect, sizeof expect, "%s: cannot open config file: No such file or directory",
             missing);
    assert_string_equal(err, expect);

    /* Without any of those: ./config/runtime.yaml if it exists, else defaults. */
    assert_non_null(getcwd(cwd, sizeof cwd));
    snprintf(dir, sizeof dir, "%s/cwd", tmpdir);
    assert_int_equal(mkdir(dir, 0755), 0);
    assert_int_equal(chdir(dir), 0);
    assert_int_equal(load(&c, NULL, NULL, 0, NULL, err), KRS_OK);
    assert_string_equal(c.file, "");
    assert_int_equal(c.server.port, 8080);
    assert_int_equal(mkdir("config", 0755), 0);
    FILE *f = fopen("config/runtime.yaml", "w");
    assert_non_null(f);
    fputs("server:\n  port: 3333\n", f);
    fclose(f);
    assert_int_equal(load(&c, NULL, NULL, 0, NULL, err), KRS_OK);
    assert_string_equal(c.file, "config/runtime.yaml");
    assert_int_equal(c.server.port, 3333);
    assert_int_equal(chdir(cwd), 0);
}

/* The committed config/runtime.yaml documents the defaults: loading it changes no value. */
static void test_repo_runtime_yaml(void **state)
{
    const char *src = getenv("KRS_SOURCE_DIR");
    char path[2100], err[1024], v1[4096], v2[4096];
    snprintf(path, sizeof path, "%s/config/runtime.yaml", src ? src : origcwd);
    struct krs_config c, d;
    config_defaults(&d);
    assert_int_equal(load(&c, path, NULL, 0, NULL, err), KRS_OK);
    size_t from_file = 0;
    for (size_t i = 0; i < config_key_count(); i++) {
        const char *name = config_key_at(i)->name;
        config_format_value(&c, name, v1, sizeof v1);
        config_format_value(&d, name, v2, sizeof v2);
        assert_string_equal(v1, v2);
        from_file += c.origin[i].source == CONFIG_SRC_FILE;
    }
    assert_int_equal(from_file, config_key_count()); /* every key is written out */
}

static void test_dump_and_json(void **state)
{
    char err[1024];
    struct krs_config c;
    const char *path = write_file("d.yaml", "performance:\n  gpuScheduler:\n    batchSize: 8\n");
    char *env[] = {"KRSERVE_API_KEY=topsecret", "MLX_GPU_SCHEDULER_WINDOW_MS=1", NULL};
    char *argv[] = {"--port", "9100"};
    assert_int_equal(load(&c, path, env, 2, argv, err), KRS_OK);

    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    config_dump(&c, f);
    fclose(f);
    assert_null(strstr(buf, "topsecret"));
    char line[1200];
    snprintf(line, sizeof line,
             "\nperformance.gpuScheduler.batchSize           = 8            # "
             "file %s:3:16\n",
             path);
    assert_non_null(strstr(buf, line));
    assert_non_null(strstr(buf, "\nserver.port                                  = 9100         "
                                "# flag --port\n"));
    assert_non_null(strstr(buf, "\nserver.apiKey                                = <redacted>   "
                                "# env KRSERVE_API_KEY\n"));
    assert_non_null(strstr(buf, "\nperformance.gpuScheduler.batchWindowMs       = 1.0          "
                                "# env MLX_GPU_SCHEDULER_WINDOW_MS\n"));
    assert_non_null(strstr(buf, "\nmodel.path                                   = null         "
                                "# default\n"));
    assert_non_null(strstr(buf, "\nmonitoring.metrics.windowsSec                = [5, 30, 60]  "
                                "# default\n"));
    size_t lines = 0;
    for (char *p = buf; *p; p++) lines += *p == '\n';
    assert_int_equal(lines, config_key_count() + 2);
    free(buf);

    cJSON *j = NULL;
    assert_int_equal(config_to_json(&c, true, &j), KRS_OK);
    char *text = cJSON_PrintUnformatted(j);
    assert_null(strstr(text, "topsecret"));
    cJSON_free(text);
    cJSON *gs = cJSON_GetObjectItem(cJSON_GetObjectItem(j, "performance"), "gpuScheduler");
    assert_int_equal(cJSON_GetObjectItem(gs, "batchSize")->valuedouble, 8);
    assert_true(cJSON_IsTrue(cJSON_GetObjectItem(gs, "enabled")));
    assert_string_equal(cJSON_GetObjectItem(gs, "mode")->valuestring, "auto");
    assert_true(cJSON_GetObjectItem(cJSON_GetObjectItem(gs, "autoTune"), "emaAlpha")->valuedouble ==
                0.3);
    cJSON *server = cJSON_GetObjectItem(j, "server");
    assert_int_equal(cJSON_GetObjectItem(server, "port")->valuedouble, 9100);
    assert_string_equal(cJSON_GetObjectItem(server, "apiKey")->valuestring, "<redacted>");
    assert_true(cJSON_IsNull(cJSON_GetObjectItem(cJSON_GetObjectItem(j, "model"), "path")));
    cJSON *ws = cJSON_GetObjectItem(
        cJSON_GetObjectItem(cJSON_GetObjectItem(j, "monitoring"), "metrics"), "windowsSec");
    assert_int_equal(cJSON_GetArraySize(ws), 3);
    assert_int_equal(cJSON_GetArrayItem(ws, 2)->valuedouble, 60);
    cJSON *src = cJSON_GetObjectItem(j, "sources");
    assert_string_equal(cJSON_GetObjectItem(src, "server.port")->valuestring, "flag --port");
    assert_string_equal(cJSON_GetObjectItem(src, "server.threads")->valuestring, "default");
    assert_int_equal(cJSON_GetArraySize(src), (int)config_key_count());
    cJSON_Delete(j);
    assert_int_equal(config_to_json(&c, false, &j), KRS_OK);
    assert_null(cJSON_GetObjectItem(j, "sources"));
    assert_int_equal(cJSON_GetArraySize(j), 5); /* server model performance monitoring logging */
    cJSON_Delete(j);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_defaults),
        cmocka_unit_test(test_registry_round_trip),
        cmocka_unit_test(test_file_parse),
        cmocka_unit_test(test_precedence),
        cmocka_unit_test(test_file_errors),
        cmocka_unit_test(test_cross_key_errors),
        cmocka_unit_test(test_env_and_flag_errors),
        cmocka_unit_test(test_bool_spellings),
        cmocka_unit_test(test_gpu_scheduler_off),
        cmocka_unit_test(test_set_and_ranges),
        cmocka_unit_test(test_file_resolution),
        cmocka_unit_test(test_repo_runtime_yaml),
        cmocka_unit_test(test_dump_and_json),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
