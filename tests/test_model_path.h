/* The model a C test runs on: $KRS_TEST_MODEL when set (the sanitizer runs swap in a tiny
 * generated model to stay fast), else the default model under $KRS_SOURCE_DIR (or "."). Shared
 * by the tests that load a model; header-only so each test stays one file. */
#ifndef KRS_TESTS_TEST_MODEL_PATH_H
#define KRS_TESTS_TEST_MODEL_PATH_H

#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>

static inline void test_model_path(char *out, size_t cap)
{
    const char *override = getenv("KRS_TEST_MODEL");
    const char *src = getenv("KRS_SOURCE_DIR");
    if (override && *override)
        snprintf(out, cap, "%s", override);
    else
        snprintf(out, cap, "%s/models/default.gguf", src ? src : ".");
}

#endif
