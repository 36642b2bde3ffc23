/* gguf/: the reader against files built here by a tiny independent writer (every value type,
 * string arrays, v2 and v3, alignments, tensors of several types), then a table of malformed
 * variants, and every strict prefix of a valid file (must be KRS_ERR_FORMAT, never a crash,
 * never a leak). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "gguf/gguf.h"
#include "krserve.h"
#include "util/alloc.h"

/* ---- a tiny GGUF writer -------------------------------------------------------------------- */

struct wb {
    uint8_t *p;
    size_t n, cap;
};

static void w_bytes(struct wb *b, const void *src, size_t n)
{
    if (b->n + n > b->cap) {
        b->cap = (b->n + n) * 2 + 64;
        b->p = realloc(b->p, b->cap);
        assert_non_null(b->p);
    }
    if (n) memcpy(b->p + b->n, src, n);
    b->n += n;
}

static void w_le(struct wb *b, uint64_t v, int n)
{
    uint8_t t[8];
    for (int i = 0; i < n; i++) t[i] = (uint8_t)(v >> (8 * i));
    w_bytes(b, t, (size_t)n);
}
static void w_u32(struct wb *b, uint32_t v)
{
    w_le(b, v, 4);
}
static void w_u64(struct wb *b, uint64_t v)
{
    w_le(b, v, 8);
}
static void w_strn(struct wb *b, const char *s, size_t n)
{
    w_u64(b, n);
    w_bytes(b, s, n);
}
static void w_str(struct wb *b, const char *s)
{
    w_strn(b, s, strlen(s));
}
static void w_pad(struct wb *b, size_t align)
{
    while (b->n % align) w_le(b, 0, 1);
}
static void w_header(struct wb *b, uint32_t version, uint64_t n_tensors, uint64_t n_kv)
{
    w_bytes(b, "GGUF", 4);
    w_u32(b, version);
    w_u64(b, n_tensors);
    w_u64(b, n_kv);
}
static void kv_u32(struct wb *b, const char *key, uint32_t v)
{
    w_str(b, key);
    w_u32(b, GGUF_TYPE_UINT32);
    w_u32(b, v);
}
static void kv_raw(struct wb *b, const char *key, uint32_t type, uint64_t v, int n)
{
    w_str(b, key);
    w_u32(b, type);
    w_le(b, v, n);
}
static void kv_string(struct wb *b, const char *key, const char *v)
{
    w_str(b, key);
    w_u32(b, GGUF_TYPE_STRING);
    w_str(b, v);
}
static void kv_array_head(struct wb *b, const char *key, uint32_t elem, uint64_t n)
{
    w_str(b, key);
    w_u32(b, GGUF_TYPE_ARRAY);
    w_u32(b, elem);
    w_u64(b, n);
}

static uint32_t f32_bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}
static uint64_t f64_bits(double f)
{
    uint64_t u;
    memcpy(&u, &f, 8);
    return u;
}

/* Tensors: (name, dims, type) with block sizes from the spec (independent of gguf.c). */
struct tspec {
    const char *name;
    uint32_t n_dims;
    int64_t ne[4];
    uint32_t type;
};

static uint64_t spec_nbytes(const struct tspec *t)
{
    static const struct {
        uint32_t id, blck, size;
    } sizes[] = {{0, 1, 4},      {1, 1, 2},      {2, 32, 18},    {3, 32, 20},    {6, 32, 22},
                 {7, 32, 24},    {8, 32, 34},    {9, 32, 36},    {10, 256, 84},  {11, 256, 110},
                 {12, 256, 144}, {13, 256, 176}, {14, 256, 210}, {15, 256, 292}, {24, 1, 1},
                 {25, 1, 2},     {26, 1, 4},     {27, 1, 8},     {28, 1, 8},     {30, 1, 2}};
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
        if (sizes[i].id != t->type) continue;
        uint64_t n = (uint64_t)t->ne[0] / sizes[i].blck * sizes[i].size;
        for (uint32_t d = 1; d < t->n_dims; d++) n *= (uint64_t)t->ne[d];
        return n;
    }
    fail_msg("no size for type %u", t->type);
    return 0;
}

/* Writes tensor infos (offsets sequential, each padded to `align`) and the data section, whose
 * byte j of tensor i is (i * 31 + j) & 0xff. No padding after the last tensor, so every strict
 * prefix of the file is invalid. */
static void w_tensors(struct wb *b, const struct tspec *ts, int nt, size_t align)
{
    uint64_t off = 0;
    for (int i = 0; i < nt; i++) {
        w_str(b, ts[i].name);
        w_u32(b, ts[i].n_dims);
        for (uint32_t d = 0; d < ts[i].n_dims; d++) w_u64(b, (uint64_t)ts[i].ne[d]);
        w_u32(b, ts[i].type);
        w_u64(b, off);
        off += (spec_nbytes(&ts[i]) + align - 1) / align * align;
    }
    if (nt) w_pad(b, align);
    for (int i = 0; i < nt; i++) {
        if (i) w_pad(b, align);
        uint64_t n = spec_nbytes(&ts[i]);
        for (uint64_t j = 0; j < n; j++) w_le(b, (uint64_t)((i * 31 + j) & 0xff), 1);
    }
}

static void wb_free(struct wb *b)
{
    free(b->p);
    memset(b, 0, sizeof *b);
}

/* ---- a file with every value type --------------------------------------------------------- */

#define N_ALL_KV 23
static const char *const str_arr[] = {"alpha", "", "gamma \xce\xb3", "a b"};

static void w_all_kvs(struct wb *b)
{
    kv_raw(b, "t.u8", GGUF_TYPE_UINT8, 200, 1);
    kv_raw(b, "t.i8", GGUF_TYPE_INT8, (uint8_t)-5, 1);
    kv_raw(b, "t.u16", GGUF_TYPE_UINT16, 65000, 2);
    kv_raw(b, "t.i16", GGUF_TYPE_INT16, (uint16_t)-30000, 2);
    kv_raw(b, "t.u32", GGUF_TYPE_UINT32, 4000000000u, 4);
    kv_raw(b, "t.i32", GGUF_TYPE_INT32, (uint32_t)-2000000000, 4);
    kv_raw(b, "t.f32", GGUF_TYPE_FLOAT32, f32_bits(1.5e-6f), 4);
    kv_raw(b, "t.bool", GGUF_TYPE_BOOL, 1, 1);
    kv_raw(b, "t.bool0", GGUF_TYPE_BOOL, 0, 1);
    kv_string(b, "t.str", "hello world");
    kv_raw(b, "t.u64", GGUF_TYPE_UINT64, (1ull << 63) + 5, 8);
    kv_raw(b, "t.i64", GGUF_TYPE_INT64, (uint64_t)(-((int64_t)1 << 40)), 8);
    kv_raw(b, "t.f64", GGUF_TYPE_FLOAT64, f64_bits(-2.25e100), 8);
    kv_string(b, "t.empty_str", "");
    kv_array_head(b, "a.u8", GGUF_TYPE_UINT8, 3);
    w_bytes(b, "\x01\x02\xff", 3);
    kv_array_head(b, "a.i16", GGUF_TYPE_INT16, 2);
    w_le(b, (uint16_t)-7, 2);
    w_le(b, 300, 2);
    kv_array_head(b, "a.i32", GGUF_TYPE_INT32, 3);
    for (int i = 0; i < 3; i++) w_le(b, (uint32_t)(i * 1000 - 1000), 4);
    kv_array_head(b, "a.f32", GGUF_TYPE_FLOAT32, 2);
    w_u32(b, f32_bits(0.25f));
    w_u32(b, f32_bits(-3.0f));
    kv_array_head(b, "a.bool", GGUF_TYPE_BOOL, 3);
    w_bytes(b, "\x01\x00\x01", 3);
    kv_array_head(b, "a.u64", GGUF_TYPE_UINT64, 1);
    w_u64(b, 1ull << 60);
    kv_array_head(b, "a.f64", GGUF_TYPE_FLOAT64, 1);
    w_u64(b, f64_bits(3.125));
    kv_array_head(b, "a.str", GGUF_TYPE_STRING, 4);
    for (int i = 0; i < 4; i++) w_str(b, str_arr[i]);
    kv_array_head(b, "a.empty", GGUF_TYPE_INT32, 0);
}

static const struct tspec std_tensors[] = {
    {"f32.vec", 1, {7, 1, 1, 1}, 0},     {"f16.mat", 2, {3, 5, 1, 1}, 1},
    {"q4_0.mat", 2, {64, 3, 1, 1}, 2},   {"q8_0.mat", 3, {32, 2, 2, 1}, 8},
    {"q4_k.mat", 2, {256, 2, 1, 1}, 12}, {"q6_k.mat", 4, {256, 1, 1, 2}, 14},
    {"bf16.vec", 1, {9, 1, 1, 1}, 30},   {"i8.vec", 1, {5, 1, 1, 1}, 24},
    {"q5_0.vec", 1, {32, 1, 1, 1}, 6},   {"empty", 2, {0, 4, 1, 1}, 0},
    {"scalar", 0, {1, 1, 1, 1}, 0},      {"q5_k.mat", 1, {256, 1, 1, 1}, 13},
};
#define N_STD_TENSORS ((int)(sizeof std_tensors / sizeof std_tensors[0]))

/* A complete valid file: all kvs (+ general.alignment when align != 32 or force_key) and the
 * standard tensors. */
static void build_valid(struct wb *b, uint32_t version, size_t align, int align_key)
{
    w_header(b, version, N_STD_TENSORS, N_ALL_KV + (align_key ? 1 : 0));
    w_all_kvs(b);
    if (align_key) kv_u32(b, "general.alignment", (uint32_t)align);
    w_tensors(b, std_tensors, N_STD_TENSORS, align);
}

static struct gguf_file *open_ok(const struct wb *b)
{
    struct gguf_file *f = NULL;
    char err[256];
    int rc = gguf_open_memory(b->p, b->n, &f, err, sizeof err);
    if (rc != KRS_OK) fail_msg("open failed: %d %s", rc, err);
    return f;
}

static void check_all_kvs(const struct gguf_file *f)
{
    uint32_t u32;
    int64_t i64;
    uint64_t u64;
    float f32;
    int bl;
    const char *s;
    size_t len;
    double d;

    assert_int_equal(gguf_get_u32(f, "t.u8", &u32), KRS_OK);
    assert_int_equal(u32, 200);
    assert_int_equal(gguf_get_i64(f, "t.i8", &i64), KRS_OK);
    assert_int_equal(i64, -5);
    assert_int_equal(gguf_get_u32(f, "t.i8", &u32), KRS_ERR_INVALID); /* negative */
    assert_int_equal(gguf_get_u32(f, "t.u16", &u32), KRS_OK);
    assert_int_equal(u32, 65000);
    assert_int_equal(gguf_get_i64(f, "t.i16", &i64), KRS_OK);
    assert_int_equal(i64, -30000);
    assert_int_equal(gguf_get_u32(f, "t.u32", &u32), KRS_OK);
    assert_int_equal(u32, 4000000000u);
    assert_int_equal(gguf_get_i64(f, "t.i32", &i64), KRS_OK);
    assert_int_equal(i64, -2000000000);
    assert_int_equal(gguf_get_f32(f, "t.f32", &f32), KRS_OK);
    assert_true(f32 == 1.5e-6f);
    assert_int_equal(gguf_get_u32(f, "t.f32", &u32), KRS_ERR_INVALID);
    assert_int_equal(gguf_get_bool(f, "t.bool", &bl), KRS_OK);
    assert_int_equal(bl, 1);
    assert_int_equal(gguf_get_bool(f, "t.bool0", &bl), KRS_OK);
    assert_int_equal(bl, 0);
    assert_int_equal(gguf_get_bool(f, "t.u8", &bl), KRS_ERR_INVALID);
    assert_int_equal(gguf_get_str(f, "t.str", &s, &len), KRS_OK);
    assert_int_equal(len, 11);
    assert_memory_equal(s, "hello world", 11);
    assert_int_equal(gguf_get_str(f, "t.empty_str", &s, &len), KRS_OK);
    assert_int_equal(len, 0);
    assert_int_equal(gguf_get_str(f, "t.u8", &s, &len), KRS_ERR_INVALID);
    assert_int_equal(gguf_get_u64(f, "t.u64", &u64), KRS_OK);
    assert_true(u64 == (1ull << 63) + 5);
    assert_int_equal(gguf_get_i64(f, "t.u64", &i64), KRS_ERR_INVALID); /* > INT64_MAX */
    assert_int_equal(gguf_get_u32(f, "t.u64", &u32), KRS_ERR_INVALID);
    assert_int_equal(gguf_get_i64(f, "t.i64", &i64), KRS_OK);
    assert_true(i64 == -((int64_t)1 << 40));
    assert_int_equal(gguf_get_u64(f, "t.i64", &u64), KRS_ERR_INVALID);
    assert_int_equal(gguf_get_f32(f, "t.f64", &f32), KRS_OK);
    assert_true(f32 == (float)-2.25e100); /* -inf: out of float range, converted as C does */
    assert_int_equal(gguf_get_u32(f, "missing.key", &u32), KRS_ERR_NOT_FOUND);
    assert_int_equal(gguf_get_str(f, "missing.key", &s, &len), KRS_ERR_NOT_FOUND);
    assert_int_equal(gguf_get_u32(f, "t.bool", &u32), KRS_OK); /* bool is an integer 0/1 */
    assert_int_equal(u32, 1);

    /* by index */
    int64_t k = gguf_find_key(f, "t.f64");
    assert_true(k >= 0);
    assert_string_equal(gguf_kv_key(f, (uint64_t)k), "t.f64");
    assert_int_equal(gguf_kv_type(f, (uint64_t)k), GGUF_TYPE_FLOAT64);
    assert_int_equal(gguf_kv_num(f, (uint64_t)k, &d), KRS_OK);
    assert_true(d == -2.25e100);
    assert_int_equal(gguf_kv_num(f, (uint64_t)gguf_find_key(f, "t.str"), &d), KRS_ERR_INVALID);
    assert_int_equal(gguf_kv_array_info(f, (uint64_t)k, NULL, NULL), KRS_ERR_INVALID);

    /* arrays */
    enum gguf_type et;
    uint64_t cnt;
    const void *data;
    assert_int_equal(gguf_get_array(f, "a.u8", &et, &cnt, &data), KRS_OK);
    assert_int_equal(et, GGUF_TYPE_UINT8);
    assert_int_equal(cnt, 3);
    assert_memory_equal(data, "\x01\x02\xff", 3);
    assert_int_equal(gguf_get_array(f, "a.i32", &et, &cnt, &data), KRS_OK);
    assert_int_equal(cnt, 3);
    int32_t i32s[3];
    memcpy(i32s, data, sizeof i32s);
    assert_int_equal(i32s[0], -1000);
    assert_int_equal(i32s[2], 1000);
    k = gguf_find_key(f, "a.i16");
    assert_int_equal(gguf_kv_array_num(f, (uint64_t)k, 0, &d), KRS_OK);
    assert_true(d == -7);
    assert_int_equal(gguf_kv_array_num(f, (uint64_t)k, 1, &d), KRS_OK);
    assert_true(d == 300);
    assert_int_equal(gguf_kv_array_num(f, (uint64_t)k, 2, &d), KRS_ERR_INVALID);
    k = gguf_find_key(f, "a.f32");
    assert_int_equal(gguf_kv_array_num(f, (uint64_t)k, 1, &d), KRS_OK);
    assert_true(d == -3.0);
    k = gguf_find_key(f, "a.bool");
    assert_int_equal(gguf_kv_array_num(f, (uint64_t)k, 1, &d), KRS_OK);
    assert_true(d == 0);
    k = gguf_find_key(f, "a.u64");
    assert_int_equal(gguf_kv_array_num(f, (uint64_t)k, 0, &d), KRS_OK);
    assert_true(d == (double)(1ull << 60));
    k = gguf_find_key(f, "a.f64");
    assert_int_equal(gguf_kv_array_num(f, (uint64_t)k, 0, &d), KRS_OK);
    assert_true(d == 3.125);
    assert_int_equal(gguf_get_array(f, "a.empty", &et, &cnt, &data), KRS_OK);
    assert_int_equal(et, GGUF_TYPE_INT32);
    assert_int_equal(cnt, 0);
    assert_int_equal(gguf_get_array(f, "t.u8", &et, &cnt, &data), KRS_ERR_INVALID);

    /* string arrays */
    assert_int_equal(gguf_get_array(f, "a.str", &et, &cnt, &data), KRS_ERR_INVALID);
    k = gguf_find_key(f, "a.str");
    assert_int_equal(gguf_kv_array_info(f, (uint64_t)k, &et, &cnt), KRS_OK);
    assert_int_equal(et, GGUF_TYPE_STRING);
    assert_int_equal(cnt, 4);
    for (uint64_t j = 0; j < 4; j++) {
        assert_int_equal(gguf_get_array_str(f, "a.str", j, &s, &len), KRS_OK);
        assert_int_equal(len, strlen(str_arr[j]));
        assert_memory_equal(s, str_arr[j], len);
        assert_int_equal(gguf_kv_array_str(f, (uint64_t)k, j, &s, &len), KRS_OK);
        assert_int_equal(len, strlen(str_arr[j]));
    }
    assert_int_equal(gguf_get_array_str(f, "a.str", 4, &s, &len), KRS_ERR_INVALID);
    assert_int_equal(gguf_get_array_str(f, "a.i32", 0, &s, &len), KRS_ERR_INVALID);
    assert_int_equal(gguf_get_array_str(f, "nope", 0, &s, &len), KRS_ERR_NOT_FOUND);
    assert_int_equal(gguf_kv_array_num(f, (uint64_t)k, 0, &d), KRS_ERR_INVALID);
}

static void check_std_tensors(const struct gguf_file *f, const struct wb *b, size_t align)
{
    assert_int_equal(gguf_tensor_count(f), N_STD_TENSORS);
    assert_int_equal(gguf_alignment(f), align);
    assert_int_equal(gguf_data_offset(f) % align, 0);
    uint64_t off = 0;
    for (int i = 0; i < N_STD_TENSORS; i++) {
        const struct gguf_tensor *t = gguf_tensor_at(f, (uint64_t)i);
        assert_non_null(t);
        assert_ptr_equal(gguf_find_tensor(f, std_tensors[i].name), t);
        assert_string_equal(t->name, std_tensors[i].name);
        assert_int_equal(t->n_dims, std_tensors[i].n_dims);
        for (int d = 0; d < 4; d++)
            assert_int_equal(t->ne[d], d < (int)t->n_dims ? std_tensors[i].ne[d] : 1);
        assert_int_equal(t->type, std_tensors[i].type);
        assert_int_equal(t->offset, off);
        assert_int_equal(t->nbytes, spec_nbytes(&std_tensors[i]));
        assert_ptr_equal(t->data, b->p + gguf_data_offset(f) + off);
        const uint8_t *p = t->data;
        for (uint64_t j = 0; j < t->nbytes; j++)
            assert_int_equal(p[j], (uint8_t)((i * 31 + j) & 0xff));
        off += (t->nbytes + align - 1) / align * align;
    }
    assert_null(gguf_tensor_at(f, N_STD_TENSORS));
    assert_null(gguf_find_tensor(f, "nope"));
    assert_null(gguf_find_tensor(f, "f32.ve"));
    const struct gguf_tensor *last = gguf_tensor_at(f, N_STD_TENSORS - 1);
    assert_int_equal(gguf_data_offset(f) + last->offset + last->nbytes, b->n);
}

static void test_all_types_v2_v3(void **state)
{
    for (uint32_t version = 2; version <= 3; version++) {
        struct wb b = {0};
        build_valid(&b, version, 32, 0);
        struct gguf_file *f = open_ok(&b);
        assert_int_equal(gguf_version(f), version);
        assert_int_equal(gguf_file_size(f), b.n);
        assert_int_equal(gguf_kv_count(f), N_ALL_KV);
        check_all_kvs(f);
        check_std_tensors(f, &b, 32);
        gguf_close(f);
        wb_free(&b);
    }
}

static void test_alignments(void **state)
{
    static const size_t aligns[] = {1, 8, 16, 32, 64, 4096};
    for (size_t a = 0; a < sizeof aligns / sizeof aligns[0]; a++) {
        for (int key = 0; key < 2; key++) {
            if (!key && aligns[a] != 32) continue;
            struct wb b = {0};
            build_valid(&b, 3, aligns[a], key);
            struct gguf_file *f = open_ok(&b);
            check_std_tensors(f, &b, aligns[a]);
            check_all_kvs(f);
            gguf_close(f);
            wb_free(&b);
        }
    }
    /* Alignment of another integer type is accepted. */
    struct wb b = {0};
    w_header(&b, 3, 1, 1);
    kv_raw(&b, "general.alignment", GGUF_TYPE_UINT64, 64, 8);
    w_tensors(&b, std_tensors, 1, 64);
    struct gguf_file *f = open_ok(&b);
    assert_int_equal(gguf_alignment(f), 64);
    gguf_close(f);
    wb_free(&b);
}

static void test_no_tensors_no_kv(void **state)
{
    struct wb b = {0};
    w_header(&b, 3, 0, 0);
    struct gguf_file *f = open_ok(&b);
    assert_int_equal(gguf_kv_count(f), 0);
    assert_int_equal(gguf_tensor_count(f), 0);
    assert_int_equal(gguf_data_offset(f), 24);
    assert_int_equal(gguf_find_key(f, "x"), -1);
    assert_null(gguf_find_tensor(f, "x"));
    gguf_close(f);
    wb_free(&b);
}

/* Many keys and tensors: every lookup finds the right one (hash index), absent names do not. */
static void test_many_lookups(void **state)
{
    enum { NK = 3000, NT = 1500 };
    struct wb b = {0};
    w_header(&b, 3, NT, NK);
    char key[64];
    for (int i = 0; i < NK; i++) {
        snprintf(key, sizeof key, "k.%d.x", i);
        kv_u32(&b, key, (uint32_t)i * 7);
    }
    static struct tspec ts[NT];
    static char names[NT][32];
    for (int i = 0; i < NT; i++) {
        snprintf(names[i], sizeof names[i], "blk.%d.w", i);
        ts[i] = (struct tspec){names[i], 1, {1, 1, 1, 1}, 0};
    }
    w_tensors(&b, ts, NT, 32);
    struct gguf_file *f = open_ok(&b);
    for (int i = 0; i < NK; i++) {
        snprintf(key, sizeof key, "k.%d.x", i);
        uint32_t v;
        assert_int_equal(gguf_find_key(f, key), i);
        assert_int_equal(gguf_get_u32(f, key, &v), KRS_OK);
        assert_int_equal(v, (uint32_t)i * 7);
        snprintf(key, sizeof key, "k.%d.y", i);
        assert_int_equal(gguf_find_key(f, key), -1);
    }
    for (int i = 0; i < NT; i++) {
        const struct gguf_tensor *t = gguf_find_tensor(f, names[i]);
        assert_non_null(t);
        assert_ptr_equal(t, gguf_tensor_at(f, (uint64_t)i));
        assert_int_equal(t->offset, (uint64_t)i * 32);
    }
    assert_null(gguf_find_tensor(f, "blk.1500.w"));
    gguf_close(f);
    wb_free(&b);
}

/* Every strict prefix of a valid file is KRS_ERR_FORMAT with a message; nothing leaks. */
static void test_truncated_prefixes(void **state)
{
    for (uint32_t version = 2; version <= 3; version++) {
        struct wb b = {0};
        build_valid(&b, version, 64, 1);
        struct alloc_stats before, after;
        alloc_get_stats(&before);
        for (size_t n = 0; n < b.n; n++) {
            uint8_t *copy = malloc(n ? n : 1); /* exact size so ASan sees over-reads */
            memcpy(copy, b.p, n);
            struct gguf_file *f = (struct gguf_file *)1;
            char err[256] = "";
            int rc = gguf_open_memory(copy, n, &f, err, sizeof err);
            if (rc != KRS_ERR_FORMAT) fail_msg("prefix %zu of %zu: rc %d (%s)", n, b.n, rc, err);
            assert_null(f);
            assert_true(strlen(err) > 0);
            free(copy);
        }
        alloc_get_stats(&after);
        assert_int_equal(after.blocks_in_use, before.blocks_in_use);
        assert_int_equal(after.bytes_in_use, before.bytes_in_use);
        struct gguf_file *f = open_ok(&b);
        gguf_close(f);
        wb_free(&b);
    }
}

/* ---- malformed variants -------------------------------------------------------------------- */

struct bad {
    const char *what;
    void (*build)(struct wb *b);
    int rc;
    const char *msg; /* substring expected in the error */
};

static void one_tensor(struct wb *b, const char *name, uint32_t n_dims, const uint64_t *ne,
                       uint32_t type, uint64_t off, size_t data_bytes)
{
    w_str(b, name);
    w_u32(b, n_dims);
    for (uint32_t d = 0; d < n_dims; d++) w_u64(b, ne[d]);
    w_u32(b, type);
    w_u64(b, off);
    w_pad(b, 32);
    for (size_t i = 0; i < data_bytes; i++) w_le(b, 0, 1);
}

static void bad_magic(struct wb *b)
{
    w_bytes(b, "GGUG", 4);
    w_u32(b, 3);
    w_u64(b, 0);
    w_u64(b, 0);
}
static void bad_v1(struct wb *b)
{
    w_header(b, 1, 0, 0);
}
static void bad_v4(struct wb *b)
{
    w_header(b, 4, 0, 0);
}
static void bad_v0(struct wb *b)
{
    w_header(b, 0, 0, 0);
}
static void bad_bigendian(struct wb *b)
{
    w_header(b, 0x03000000u, 0, 0);
}
static void bad_neg_count(struct wb *b)
{
    w_header(b, 3, (uint64_t)-1, 0);
}
static void bad_huge_kv(struct wb *b)
{
    w_header(b, 3, 0, 1ull << 40);
    kv_u32(b, "a", 1);
}
static void bad_huge_tensors(struct wb *b)
{
    w_header(b, 3, 1ull << 50, 1);
    kv_u32(b, "a", 1);
}
static void bad_tensors_after_kv(struct wb *b)
{
    /* count fits the whole file but not what is left after the metadata */
    w_header(b, 3, 3, 1);
    kv_string(b, "a", "a string long enough to leave less than 72 bytes after it.........");
}
static void bad_huge_string(struct wb *b)
{
    w_header(b, 3, 0, 1);
    w_str(b, "k");
    w_u32(b, GGUF_TYPE_STRING);
    w_u64(b, UINT64_MAX);
    w_bytes(b, "abc", 3);
}
static void bad_huge_key(struct wb *b)
{
    w_header(b, 3, 0, 1);
    w_u64(b, 1ull << 62);
    w_bytes(b, "abcdefghijklmnop", 16);
}
static void bad_huge_array(struct wb *b)
{
    w_header(b, 3, 0, 1);
    kv_array_head(b, "k", GGUF_TYPE_UINT32, (1ull << 62) + 1); /* * 4 wraps to 4 */
    w_u32(b, 1);
}
static void bad_huge_str_array(struct wb *b)
{
    w_header(b, 3, 0, 1);
    kv_array_head(b, "k", GGUF_TYPE_STRING, 1ull << 61);
    w_str(b, "x");
}
static void bad_empty_key(struct wb *b)
{
    w_header(b, 3, 0, 1);
    kv_u32(b, "", 1);
}
static void bad_nul_key(struct wb *b)
{
    w_header(b, 3, 0, 1);
    w_strn(b, "a\0b", 3);
    w_u32(b, GGUF_TYPE_UINT8);
    w_le(b, 1, 1);
}
static void bad_value_type(struct wb *b)
{
    w_header(b, 3, 0, 1);
    kv_raw(b, "k", 13, 0, 8);
}
static void bad_elem_type(struct wb *b)
{
    w_header(b, 3, 0, 1);
    kv_array_head(b, "k", 99, 1);
    w_u64(b, 0);
}
static void bad_nested(struct wb *b)
{
    w_header(b, 3, 0, 1);
    kv_array_head(b, "k", GGUF_TYPE_ARRAY, 1);
    w_u32(b, GGUF_TYPE_UINT8);
    w_u64(b, 1);
    w_le(b, 0, 1);
}
static void bad_dup_key(struct wb *b)
{
    w_header(b, 3, 0, 3);
    kv_u32(b, "x.a", 1);
    kv_u32(b, "x.b", 1);
    kv_string(b, "x.a", "again");
}
static void bad_align0(struct wb *b)
{
    w_header(b, 3, 0, 1);
    kv_u32(b, "general.alignment", 0);
}
static void bad_align48(struct wb *b)
{
    w_header(b, 3, 0, 1);
    kv_u32(b, "general.alignment", 48);
}
static void bad_align_str(struct wb *b)
{
    w_header(b, 3, 0, 1);
    kv_string(b, "general.alignment", "32");
}
static void bad_align_neg(struct wb *b)
{
    w_header(b, 3, 0, 1);
    kv_raw(b, "general.alignment", GGUF_TYPE_INT32, (uint32_t)-32, 4);
}
static void bad_dup_tensor(struct wb *b)
{
    static const struct tspec ts[] = {{"w", 1, {4, 1, 1, 1}, 0}, {"w", 1, {4, 1, 1, 1}, 0}};
    w_header(b, 3, 2, 0);
    w_tensors(b, ts, 2, 32);
}
static void bad_long_name(struct wb *b)
{
    char name[66];
    memset(name, 'n', 65);
    name[65] = '\0';
    static const uint64_t ne[] = {1};
    w_header(b, 3, 1, 0);
    one_tensor(b, name, 1, ne, 0, 0, 4);
}
static void bad_ndims(struct wb *b)
{
    static const uint64_t ne[] = {1, 1, 1, 1, 1};
    w_header(b, 3, 1, 0);
    one_tensor(b, "w", 5, ne, 0, 0, 4);
}
static void bad_neg_dim(struct wb *b)
{
    static const uint64_t ne[] = {4, (uint64_t)-2};
    w_header(b, 3, 1, 0);
    one_tensor(b, "w", 2, ne, 0, 0, 64);
}
static void bad_overflow_dims(struct wb *b)
{
    static const uint64_t ne[] = {1ull << 40, 1ull << 40};
    w_header(b, 3, 1, 0);
    one_tensor(b, "w", 2, ne, 0, 0, 64);
}
static void bad_overflow_bytes(struct wb *b)
{
    /* elements fit int64 (2^61), bytes (x4) do not fit... nor the file */
    static const uint64_t ne[] = {1ull << 31, 1ull << 30};
    w_header(b, 3, 1, 0);
    one_tensor(b, "w", 2, ne, 0, 0, 64);
}
static void bad_block_multiple(struct wb *b)
{
    static const uint64_t ne[] = {33, 1};
    w_header(b, 3, 1, 0);
    one_tensor(b, "w", 2, ne, 2, 0, 64);
}
static void bad_misaligned(struct wb *b)
{
    static const uint64_t ne[] = {4};
    w_header(b, 3, 1, 0);
    one_tensor(b, "w", 1, ne, 0, 8, 64);
}
static void bad_past_eof(struct wb *b)
{
    static const uint64_t ne[] = {100};
    w_header(b, 3, 1, 0);
    one_tensor(b, "w", 1, ne, 0, 0, 399);
}
static void bad_offset_wrap(struct wb *b)
{
    static const uint64_t ne[] = {4};
    w_header(b, 3, 1, 0);
    one_tensor(b, "w", 1, ne, 0, UINT64_MAX - 31, 64);
}
static void bad_type_removed(struct wb *b)
{
    static const uint64_t ne[] = {32};
    w_header(b, 3, 1, 0);
    one_tensor(b, "w", 1, ne, 4, 0, 64);
}
static void bad_type_43(struct wb *b)
{
    static const uint64_t ne[] = {32};
    w_header(b, 3, 1, 0);
    one_tensor(b, "w", 1, ne, 43, 0, 64);
}
static void bad_type_huge(struct wb *b)
{
    static const uint64_t ne[] = {32};
    w_header(b, 3, 1, 0);
    one_tensor(b, "w", 1, ne, 0xFFFFFFFFu, 0, 64);
}
static void bad_type_nosize(struct wb *b)
{
    static const uint64_t ne[] = {256};
    w_header(b, 3, 1, 0);
    one_tensor(b, "blk.0.q2", 1, ne, 42, 0, 256);
}
static void bad_data_off_past_eof(struct wb *b)
{
    /* tensor infos end, but the padding to the data section is missing */
    static const uint64_t ne[] = {0};
    w_header(b, 3, 1, 1);
    kv_u32(b, "general.alignment", 4096);
    w_str(b, "w");
    w_u32(b, 1);
    w_u64(b, ne[0]);
    w_u32(b, 0);
    w_u64(b, 0);
}

static const struct bad bads[] = {
    {"bad magic", bad_magic, KRS_ERR_FORMAT, "magic"},
    {"v1", bad_v1, KRS_ERR_UNSUPPORTED, "version 1"},
    {"v4", bad_v4, KRS_ERR_UNSUPPORTED, "version 4"},
    {"v0", bad_v0, KRS_ERR_FORMAT, "version"},
    {"big-endian", bad_bigendian, KRS_ERR_FORMAT, "big-endian"},
    {"negative count", bad_neg_count, KRS_ERR_FORMAT, "negative"},
    {"huge kv count", bad_huge_kv, KRS_ERR_FORMAT, "kv count"},
    {"huge tensor count", bad_huge_tensors, KRS_ERR_FORMAT, "tensor count"},
    {"tensor count after kv", bad_tensors_after_kv, KRS_ERR_FORMAT, "tensor count"},
    {"huge string", bad_huge_string, KRS_ERR_FORMAT, "string value"},
    {"huge key", bad_huge_key, KRS_ERR_FORMAT, "kv key"},
    {"huge array", bad_huge_array, KRS_ERR_FORMAT, "does not fit"},
    {"huge string array", bad_huge_str_array, KRS_ERR_FORMAT, "does not fit"},
    {"empty key", bad_empty_key, KRS_ERR_FORMAT, "empty key"},
    {"NUL in key", bad_nul_key, KRS_ERR_FORMAT, "NUL"},
    {"value type 13", bad_value_type, KRS_ERR_FORMAT, "unknown value type 13"},
    {"element type 99", bad_elem_type, KRS_ERR_FORMAT, "unknown array element type 99"},
    {"nested array", bad_nested, KRS_ERR_FORMAT, "nested"},
    {"duplicate key", bad_dup_key, KRS_ERR_FORMAT, "duplicate key 'x.a'"},
    {"alignment 0", bad_align0, KRS_ERR_FORMAT, "power of two"},
    {"alignment 48", bad_align48, KRS_ERR_FORMAT, "power of two"},
    {"alignment string", bad_align_str, KRS_ERR_FORMAT, "general.alignment"},
    {"alignment negative", bad_align_neg, KRS_ERR_FORMAT, "general.alignment"},
    {"duplicate tensor", bad_dup_tensor, KRS_ERR_FORMAT, "duplicate tensor name 'w'"},
    {"long tensor name", bad_long_name, KRS_ERR_FORMAT, "name length 65"},
    {"n_dims 5", bad_ndims, KRS_ERR_FORMAT, "n_dims 5"},
    {"negative dim", bad_neg_dim, KRS_ERR_FORMAT, "negative"},
    {"overflowing dims", bad_overflow_dims, KRS_ERR_FORMAT, "overflow"},
    {"overflowing bytes", bad_overflow_bytes, KRS_ERR_FORMAT, "past end of file"},
    {"ne[0] not whole blocks", bad_block_multiple, KRS_ERR_FORMAT, "multiple of the Q4_0"},
    {"misaligned offset", bad_misaligned, KRS_ERR_FORMAT, "offset 8 is not a multiple"},
    {"tensor past EOF", bad_past_eof, KRS_ERR_FORMAT, "400 bytes] past end of file"},
    {"offset wraps", bad_offset_wrap, KRS_ERR_FORMAT, "past end of file"},
    {"removed type id 4", bad_type_removed, KRS_ERR_FORMAT, "unknown ggml type id 4"},
    {"type id 43", bad_type_43, KRS_ERR_FORMAT, "unknown ggml type id 43"},
    {"type id 2^32-1", bad_type_huge, KRS_ERR_FORMAT, "unknown ggml type id 4294967295"},
    {"type without size", bad_type_nosize, KRS_ERR_UNSUPPORTED,
     "'blk.0.q2': ggml type Q2_0 (id 42)"},
    {"data section past EOF", bad_data_off_past_eof, KRS_ERR_FORMAT, "data section"},
};

static void test_malformed(void **state)
{
    struct alloc_stats before, after;
    alloc_get_stats(&before);
    for (size_t i = 0; i < sizeof bads / sizeof bads[0]; i++) {
        struct wb b = {0};
        bads[i].build(&b);
        uint8_t *copy = malloc(b.n);
        memcpy(copy, b.p, b.n);
        struct gguf_file *f = (struct gguf_file *)1;
        char err[256] = "";
        int rc = gguf_open_memory(copy, b.n, &f, err, sizeof err);
        if (rc != bads[i].rc || !strstr(err, bads[i].msg))
            fail_msg("%s: rc %d (want %d), err '%s' (want '%s')", bads[i].what, rc, bads[i].rc, err,
                     bads[i].msg);
        assert_null(f);
        assert_null(strchr(err, '\n'));
        /* every prefix of a malformed file fails too, without crashing */
        for (size_t n = 0; n < b.n; n++) {
            rc = gguf_open_memory(copy, n, &f, NULL, 0);
            assert_int_not_equal(rc, KRS_OK);
        }
        free(copy);
        wb_free(&b);
    }
    alloc_get_stats(&after);
    assert_int_equal(after.blocks_in_use, before.blocks_in_use);
}

/* Boundary cases that must be accepted. */
static void test_edges_accepted(void **state)
{
    struct wb b = {0};
    char name[65];
    memset(name, 'n', 64);
    name[64] = '\0';
    static const uint64_t ne[] = {4};
    w_header(&b, 3, 1, 1);
    kv_raw(&b, "bool.two", GGUF_TYPE_BOOL, 2, 1); /* nonzero bool reads as true */
    one_tensor(&b, name, 1, ne, 0, 0, 16);
    struct gguf_file *f = open_ok(&b);
    const struct gguf_tensor *t = gguf_find_tensor(f, name);
    assert_non_null(t);
    assert_int_equal(strlen(t->name), 64);
    int v;
    assert_int_equal(gguf_get_bool(f, "bool.two", &v), KRS_OK);
    assert_int_equal(v, 1);
    gguf_close(f);
    wb_free(&b);
}

static void test_type_table(void **state)
{
    uint32_t blck, size;
    assert_string_equal(gguf_ggml_type_name(12), "Q4_K");
    assert_string_equal(gguf_ggml_type_name(30), "BF16");
    assert_string_equal(gguf_ggml_type_name(5), "unknown");
    assert_string_equal(gguf_ggml_type_name(1000), "unknown");
    assert_int_equal(gguf_ggml_type_size(14, &blck, &size), KRS_OK);
    assert_int_equal(blck, 256);
    assert_int_equal(size, 210);
    assert_int_equal(gguf_ggml_type_size(9, &blck, &size), KRS_OK);
    assert_int_equal(size, 36);
    assert_int_equal(gguf_ggml_type_size(31, &blck, &size), KRS_ERR_FORMAT);
    assert_int_equal(gguf_ggml_type_size(42, &blck, &size), KRS_ERR_UNSUPPORTED);
    assert_string_equal(gguf_type_name(GGUF_TYPE_STRING), "string");
    assert_string_equal(gguf_type_name((enum gguf_type)77), "unknown");
}

/* gguf_open over real files: mmap path, missing file, empty file, directory. */
static void test_open_file(void **state)
{
    char path[] = "/tmp/krs_gguf_test_XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    struct wb b = {0};
    build_valid(&b, 3, 32, 0);
    assert_int_equal(write(fd, b.p, b.n), (ssize_t)b.n);
    close(fd);
    struct gguf_file *f = NULL;
    char err[256];
    assert_int_equal(gguf_open(path, &f, err, sizeof err), KRS_OK);
    assert_int_equal(gguf_file_size(f), b.n);
    check_all_kvs(f);
    const struct gguf_tensor *t = gguf_find_tensor(f, "q8_0.mat");
    assert_non_null(t);
    assert_int_equal((uintptr_t)t->data % 32, 0);
    gguf_close(f);

    assert_int_equal(truncate(path, 0), 0);
    assert_int_equal(gguf_open(path, &f, err, sizeof err), KRS_ERR_FORMAT);
    assert_null(f);
    unlink(path);
    assert_int_equal(gguf_open(path, &f, err, sizeof err), KRS_ERR_IO);
    assert_non_null(strstr(err, path));
    assert_int_equal(gguf_open("/tmp", &f, err, sizeof err), KRS_ERR_IO);
    assert_int_equal(gguf_open_memory(NULL, 0, &f, err, sizeof err), KRS_ERR_FORMAT);
    wb_free(&b);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_all_types_v2_v3),    cmocka_unit_test(test_alignments),
        cmocka_unit_test(test_no_tensors_no_kv),   cmocka_unit_test(test_many_lookups),
        cmocka_unit_test(test_truncated_prefixes), cmocka_unit_test(test_malformed),
        cmocka_unit_test(test_edges_accepted),     cmocka_unit_test(test_type_table),
        cmocka_unit_test(test_open_file),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
