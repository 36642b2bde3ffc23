/* libFuzzer target: gguf_open_memory over arbitrary bytes, then every accessor over everything
 * the file claims to hold (keys, scalars, every array element, every tensor and its bytes), so
 * that ASan/UBSan see any pointer the reader hands out that lies outside the input. */
#include "gguf/gguf.h"
#include "krserve.h"

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static volatile uint64_t sink;

static void touch(const void *p, size_t n)
{
    const uint8_t *b = p;
    uint64_t h = 0;
    for (size_t i = 0; i < n; i++) h = h * 31 + b[i];
    sink += h;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    /* Exact-size copy so that reads past the end hit ASan's redzone. */
    uint8_t *buf = malloc(size ? size : 1);
    if (!buf) return 0;
    if (size) memcpy(buf, data, size);
    struct gguf_file *f = NULL;
    char err[256];
    int rc = gguf_open_memory(buf, size, &f, err, sizeof err);
    if (rc != KRS_OK) {
        if (f || !memchr(err, '\0', sizeof err) || !err[0])
            abort(); /* failure = message, no file */
        free(buf);
        return 0;
    }
    const uint64_t n_kv = gguf_kv_count(f);
    for (uint64_t i = 0; i < n_kv; i++) {
        const char *key = gguf_kv_key(f, i);
        touch(key, strlen(key) + 1);
        if (gguf_find_key(f, key) != (int64_t)i) abort();
        enum gguf_type t = gguf_kv_type(f, i);
        double d;
        const char *s;
        size_t len;
        uint32_t u32;
        int64_t i64;
        uint64_t u64;
        float f32;
        int b;
        (void)gguf_get_u32(f, key, &u32);
        (void)gguf_get_i64(f, key, &i64);
        (void)gguf_get_u64(f, key, &u64);
        (void)gguf_get_f32(f, key, &f32);
        (void)gguf_get_bool(f, key, &b);
        if (gguf_kv_num(f, i, &d) == KRS_OK) sink += (uint64_t)(d == d);
        if (gguf_kv_str(f, i, &s, &len) == KRS_OK) touch(s, len);
        if (t != GGUF_TYPE_ARRAY) continue;
        enum gguf_type et;
        uint64_t cnt;
        if (gguf_kv_array_info(f, i, &et, &cnt) != KRS_OK) abort();
        const void *arr;
        if (gguf_get_array(f, key, NULL, NULL, &arr) == KRS_OK) {
            for (uint64_t j = 0; j < cnt; j++)
                if (gguf_kv_array_num(f, i, j, &d) != KRS_OK) abort();
        }
        for (uint64_t j = 0; j < cnt && et == GGUF_TYPE_STRING; j++) {
            if (gguf_kv_array_str(f, i, j, &s, &len) != KRS_OK) abort();
            touch(s, len);
            if (j < 4 && gguf_get_array_str(f, key, j, &s, &len) != KRS_OK) abort();
        }
        if (gguf_kv_array_str(f, i, cnt, &s, &len) == KRS_OK) abort();
    }
    const uint64_t n_t = gguf_tensor_count(f);
    for (uint64_t i = 0; i < n_t; i++) {
        const struct gguf_tensor *t = gguf_tensor_at(f, i);
        if (gguf_find_tensor(f, t->name) != t) abort();
        if (t->nbytes) {
            /* first and last byte are enough: the range is contiguous */
            touch(t->data, 1);
            touch((const uint8_t *)t->data + t->nbytes - 1, 1);
        }
        if ((uintptr_t)((const uint8_t *)t->data - buf) % gguf_alignment(f)) abort();
    }
    gguf_close(f);
    free(buf);
    return 0;
}
