/* engine_sched_params: configuration keys -> scheduler parameters, including the GPU's
 * batch defaults (used only where the batch keys were left at their defaults). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <string.h>

#include "config/config.h"
#include "engine/engine.h"
#include "krserve.h"
#include "sched/sched.h"

static void test_cpu_defaults(void **state)
{
    struct krs_config cfg;
    config_defaults(&cfg);
    struct sched_params p;
    engine_sched_params(&cfg, &p);
    assert_string_equal(p.device, "cpu");
    assert_int_equal(p.auto_max_batch, 32);
    assert_int_equal(p.fixed_batch, 4);
    assert_int_equal(p.max_running, 32);
    assert_int_equal(p.kv_tokens, 16384);
}

static void test_cuda_batch_defaults(void **state)
{
    struct krs_config cfg;
    char err[256];
    config_defaults(&cfg);
    assert_int_equal(config_set(&cfg, "model.device", "cuda", CONFIG_SRC_FLAG, err, sizeof err),
                     KRS_OK);
    struct sched_params p;
    engine_sched_params(&cfg, &p);
    assert_string_equal(p.device, "cuda");
    assert_int_equal(p.auto_max_batch, 256);
    assert_int_equal(p.fixed_batch, 32);
    assert_int_equal(p.max_running, 256);
    /* A value the user set wins over the GPU default, from any source. */
    assert_int_equal(config_set(&cfg, "performance.gpuScheduler.autoTune.maxBatch", "48",
                                CONFIG_SRC_ENV, err, sizeof err),
                     KRS_OK);
    assert_int_equal(config_set(&cfg, "performance.gpuScheduler.batchSize", "8", CONFIG_SRC_FILE,
                                err, sizeof err),
                     KRS_OK);
    engine_sched_params(&cfg, &p);
    assert_int_equal(p.auto_max_batch, 48);
    assert_int_equal(p.fixed_batch, 8);
    assert_int_equal(p.max_running, 48);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_cpu_defaults),
        cmocka_unit_test(test_cuda_batch_defaults),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
