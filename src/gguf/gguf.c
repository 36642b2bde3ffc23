/* GGUF v2/v3 parser: validates the whole header at open and builds the lookup index.
 *
 * Owns: the mapping (gguf_open) or a borrowed buffer (gguf_open_memory), the KV table (keys
 * copied NUL-terminated into one arena), per-string-array offset tables, the tensor table, and
 * two open-addressing hash indexes (keys, tensor names). Everything is allocated at open;
 * getters never allocate.
 *
 * Safety contract: every read goes through rd_* which checks the remaining bytes first; every
 * count is checked against the remaining bytes (using the smallest encoding an element can
 * have) BEFORE anything is allocated for it, so allocations are bounded by a small multiple of
 * the file size. Sizes are computed with explicit overflow checks. The file is little-endian
 * (values are assembled byte by byte, so this also works on a big-endian host). */
#include "gguf/gguf.h"
#include "krserve.h"
#include "util/alloc.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define GGUF_MAGIC         0x46554747u /* "GGUF" read as a little-endian u32 */
#define GGUF_DEFAULT_ALIGN 32u
#define GGUF_MAX_KEY       65535u
/* Smallest possible encodings, used to bound counts before allocating. */
#define MIN_KV_BYTES     14u /* key len 8 + 1 key byte + type 4 + 1 value byte */
#define MIN_TENSOR_BYTES 24u /* name len 8 + n_dims 4 + type 4 + offset 8 */

/* ---- ggml tensor types -------------------------------------------------------------------- */

struct ggml_type_info {
    const char *name; /* NULL: id not a ggml type (never assigned or removed) */
    uint32_t blck;    /* elements per block; 0: known type whose size we do not know */
    uint32_t size;    /* bytes per block */
};

/* ggml type ids 0..42 (ggml.h). Sizes: MODEL-FORMATS.md section 2 and gguf-py 0.19
 * GGML_QUANT_SIZES (Q8_1 is 36 bytes: ggml-common.h; gguf-py's 40 is stale). */
static const struct ggml_type_info ggml_types[] = {
    [0] = {"F32", 1, 4},         [1] = {"F16", 1, 2},         [2] = {"Q4_0", 32, 18},
    [3] = {"Q4_1", 32, 20},      [6] = {"Q5_0", 32, 22},      [7] = {"Q5_1", 32, 24},
    [8] = {"Q8_0", 32, 34},      [9] = {"Q8_1", 32, 36},      [10] = {"Q2_K", 256, 84},
    [11] = {"Q3_K", 256, 110},   [12] = {"Q4_K", 256, 144},   [13] = {"Q5_K", 256, 176},
    [14] = {"Q6_K", 256, 210},   [15] = {"Q8_K", 256, 292},   [16] = {"IQ2_XXS", 256, 66},
    [17] = {"IQ2_XS", 256, 74},  [18] = {"IQ3_XXS", 256, 98}, [19] = {"IQ1_S", 256, 50},
    [20] = {"IQ4_NL", 32, 18},   [21] = {"IQ3_S", 256, 110},  [22] = {"IQ2_S", 256, 82},
    [23] = {"IQ4_XS", 256, 136}, [24] = {"I8", 1, 1},         [25] = {"I16", 1, 2},
    [26] = {"I32", 1, 4},        [27] = {"I64", 1, 8},        [28] = {"F64", 1, 8},
    [29] = {"IQ1_M", 256, 56},   [30] = {"BF16", 1, 2},       [34] = {"TQ1_0", 256, 54},
    [35] = {"TQ2_0", 256, 66},   [39] = {"MXFP4", 32, 17},    [40] = {"NVFP4", 64, 36},
    [41] = {"Q1_0", 128, 18},    [42] = {"Q2_0", 0, 0},
};
#define N_GGML_TYPES (sizeof ggml_types / sizeof ggml_types[0])

const char *gguf_ggml_type_name(uint32_t type)
{
    if (type < N_GGML_TYPES && ggml_types[type].name) return ggml_types[type].name;
    return "unknown";
}

int gguf_ggml_type_size(uint32_t type, uint32_t *blck, uint32_t *size)
{
    if (type >= N_GGML_TYPES || !ggml_types[type].name) return KRS_ERR_FORMAT;
    if (!ggml_types[type].blck) return KRS_ERR_UNSUPPORTED;
    *blck = ggml_types[type].blck;
    *size = ggml_types[type].size;
    return KRS_OK;
}

/* ---- metadata value types ------------------------------------------------------------------ */

static const char *const type_names[] = {
    "u8", "i8", "u16", "i16", "u32", "i32", "f32", "bool", "string", "array", "u64", "i64", "f64",
};

const char *gguf_type_name(enum gguf_type t)
{
    if ((unsigned)t < sizeof type_names / sizeof type_names[0]) return type_names[t];
    return "unknown";
}

uint32_t gguf_type_size(uint32_t t)
{
    switch (t) {
    case GGUF_TYPE_UINT8:
    case GGUF_TYPE_INT8:
    case GGUF_TYPE_BOOL:
        return 1;
    case GGUF_TYPE_UINT16:
    case GGUF_TYPE_INT16:
        return 2;
    case GGUF_TYPE_UINT32:
    case GGUF_TYPE_INT32:
    case GGUF_TYPE_FLOAT32:
        return 4;
    case GGUF_TYPE_UINT64:
    case GGUF_TYPE_INT64:
    case GGUF_TYPE_FLOAT64:
        return 8;
    default:
        return 0;
    }
}

/* ---- the file object ----------------------------------------------------------------------- */

struct gguf_kv {
    const char *key; /* into key_arena, NUL-terminated */
    uint64_t key_off, key_len;
    uint32_t type;
    uint32_t elem;      /* arrays: element type */
    uint64_t count;     /* arrays: element count */
    uint64_t off;       /* scalar: value; string: its u64 length; array: first element */
    uint64_t *str_offs; /* string arrays: file offset of each element's u64 length */
};

struct gguf_file {
    const uint8_t *base;
    uint64_t size;
    int mapped;
    uint32_t version;
    uint32_t alignment;
    uint64_t data_off;
    uint64_t n_kv;
    struct gguf_kv *kv;
    char *key_arena;
    uint64_t n_tensors;
    struct gguf_tensor *tensors;
    uint64_t *kv_hash; /* slot = index + 1, 0 = empty */
    uint64_t kv_mask;
    uint64_t *t_hash;
    uint64_t t_mask;
};

/* ---- little-endian reads ------------------------------------------------------------------- */

static uint64_t le(const uint8_t *p, int n)
{
    uint64_t v = 0;
    for (int i = n - 1; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}

struct rd {
    const uint8_t *p;
    uint64_t size;
    uint64_t pos;
    char *err;
    size_t errlen;
};

static int rd_fail(struct rd *r, int rc, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static int rd_fail(struct rd *r, int rc, const char *fmt, ...)
{
    if (r->err && r->errlen) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(r->err, r->errlen, fmt, ap);
        va_end(ap);
    }
    return rc;
}

static uint64_t rd_left(const struct rd *r)
{
    return r->size - r->pos;
}

static int rd_need(struct rd *r, uint64_t n, const char *what)
{
    if (n > rd_left(r))
        return rd_fail(r, KRS_ERR_FORMAT,
                       "truncated: %s at offset %" PRIu64 " needs %" PRIu64
                       " bytes, file size %" PRIu64,
                       what, r->pos, n, r->size);
    return KRS_OK;
}

static int rd_uint(struct rd *r, int n, uint64_t *v, const char *what)
{
    int rc = rd_need(r, (uint64_t)n, what);
    if (rc) return rc;
    *v = le(r->p + r->pos, n);
    r->pos += (uint64_t)n;
    return KRS_OK;
}

/* A string: u64 length + bytes. On success *off is the offset of the bytes. */
static int rd_str(struct rd *r, uint64_t *off, uint64_t *len, const char *what)
{
    uint64_t at = r->pos;
    int rc = rd_uint(r, 8, len, what);
    if (rc) return rc;
    if (*len > rd_left(r))
        return rd_fail(r, KRS_ERR_FORMAT,
                       "truncated: %s at offset %" PRIu64 " has length %" PRIu64
                       " but only %" PRIu64 " bytes remain (file size %" PRIu64 ")",
                       what, at, *len, rd_left(r), r->size);
    *off = r->pos;
    r->pos += *len;
    return KRS_OK;
}

/* ---- hashing ------------------------------------------------------------------------------- */

static uint64_t hash_bytes(const void *s, size_t n)
{
    const uint8_t *p = s;
    uint64_t h = 1469598103934665603ull; /* FNV-1a */
    for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * 1099511628211ull;
    return h;
}

static int hash_alloc(uint64_t n, uint64_t **tab, uint64_t *mask)
{
    uint64_t cap = 8;
    while (cap < 2 * n) cap <<= 1;
    *tab = alloc_calloc((size_t)cap, sizeof **tab);
    if (!*tab) return KRS_ERR_NOMEM;
    *mask = cap - 1;
    return KRS_OK;
}

/* ---- parsing ------------------------------------------------------------------------------- */

static int parse_kv(struct gguf_file *f, struct rd *r, uint64_t i)
{
    struct gguf_kv *kv = &f->kv[i];
    uint64_t at = r->pos, t, v;
    int rc = rd_str(r, &kv->key_off, &kv->key_len, "kv key");
    if (rc) return rc;
    if (kv->key_len == 0)
        return rd_fail(r, KRS_ERR_FORMAT, "kv %" PRIu64 " at offset %" PRIu64 ": empty key", i, at);
    if (kv->key_len > GGUF_MAX_KEY)
        return rd_fail(r, KRS_ERR_FORMAT,
                       "kv %" PRIu64 " at offset %" PRIu64 ": key length %" PRIu64 " exceeds %u", i,
                       at, kv->key_len, GGUF_MAX_KEY);
    if (memchr(r->p + kv->key_off, 0, (size_t)kv->key_len))
        return rd_fail(r, KRS_ERR_FORMAT,
                       "kv %" PRIu64 " at offset %" PRIu64 ": key contains a NUL byte", i, at);
    const int klen = kv->key_len > 200 ? 200 : (int)kv->key_len;
    const char *kp = (const char *)r->p + kv->key_off;
    uint64_t tpos = r->pos;
    if ((rc = rd_uint(r, 4, &t, "kv value type"))) return rc;
    kv->type = (uint32_t)t;
    if (t > GGUF_TYPE_FLOAT64)
        return rd_fail(r, KRS_ERR_FORMAT,
                       "key '%.*s': unknown value type %" PRIu64 " at offset %" PRIu64, klen, kp, t,
                       tpos);
    if (t == GGUF_TYPE_STRING) {
        kv->off = r->pos;
        uint64_t so, sl;
        return rd_str(r, &so, &sl, "string value");
    }
    if (t != GGUF_TYPE_ARRAY) {
        kv->off = r->pos;
        if ((rc = rd_need(r, gguf_type_size((uint32_t)t), "scalar value"))) return rc;
        r->pos += gguf_type_size((uint32_t)t);
        return KRS_OK;
    }
    uint64_t epos = r->pos;
    if ((rc = rd_uint(r, 4, &t, "array element type"))) return rc;
    if ((rc = rd_uint(r, 8, &v, "array length"))) return rc;
    kv->elem = (uint32_t)t;
    kv->count = v;
    if (t == GGUF_TYPE_ARRAY)
        return rd_fail(r, KRS_ERR_FORMAT,
                       "key '%.*s': nested arrays are not supported (offset %" PRIu64 ")", klen, kp,
                       epos);
    if (t > GGUF_TYPE_FLOAT64)
        return rd_fail(r, KRS_ERR_FORMAT,
                       "key '%.*s': unknown array element type %" PRIu64 " at offset %" PRIu64,
                       klen, kp, t, epos);
    kv->off = r->pos;
    uint64_t esz = t == GGUF_TYPE_STRING ? 8 : gguf_type_size((uint32_t)t);
    if (v > rd_left(r) / esz)
        return rd_fail(r, KRS_ERR_FORMAT,
                       "key '%.*s': array of %" PRIu64 " %s at offset %" PRIu64
                       " does not fit in the %" PRIu64 " remaining bytes",
                       klen, kp, v, gguf_type_name((enum gguf_type)t), epos, rd_left(r));
    if (t != GGUF_TYPE_STRING) {
        r->pos += v * esz;
        return KRS_OK;
    }
    kv->str_offs = alloc_calloc((size_t)(v ? v : 1), sizeof *kv->str_offs);
    if (!kv->str_offs) return rd_fail(r, KRS_ERR_NOMEM, "out of memory (string array)");
    for (uint64_t j = 0; j < v; j++) {
        uint64_t so, sl;
        kv->str_offs[j] = r->pos;
        if ((rc = rd_str(r, &so, &sl, "array string"))) return rc;
    }
    return KRS_OK;
}

static int index_keys(struct gguf_file *f, struct rd *r)
{
    uint64_t total = 0;
    for (uint64_t i = 0; i < f->n_kv; i++) total += f->kv[i].key_len + 1;
    f->key_arena = alloc_malloc((size_t)(total ? total : 1));
    if (!f->key_arena) return rd_fail(r, KRS_ERR_NOMEM, "out of memory (keys)");
    int rc = hash_alloc(f->n_kv, &f->kv_hash, &f->kv_mask);
    if (rc) return rd_fail(r, rc, "out of memory (key index)");
    char *p = f->key_arena;
    for (uint64_t i = 0; i < f->n_kv; i++) {
        struct gguf_kv *kv = &f->kv[i];
        memcpy(p, f->base + kv->key_off, (size_t)kv->key_len);
        p[kv->key_len] = '\0';
        kv->key = p;
        p += kv->key_len + 1;
        uint64_t h = hash_bytes(kv->key, (size_t)kv->key_len) & f->kv_mask;
        while (f->kv_hash[h]) {
            const struct gguf_kv *o = &f->kv[f->kv_hash[h] - 1];
            if (o->key_len == kv->key_len && !memcmp(o->key, kv->key, (size_t)kv->key_len))
                return rd_fail(r, KRS_ERR_FORMAT,
                               "duplicate key '%.200s' (kv %" PRIu64 " at offset %" PRIu64 ")",
                               kv->key, i, kv->key_off - 8);
            h = (h + 1) & f->kv_mask;
        }
        f->kv_hash[h] = i + 1;
    }
    return KRS_OK;
}

static int set_alignment(struct gguf_file *f, struct rd *r)
{
    f->alignment = GGUF_DEFAULT_ALIGN;
    int64_t i = gguf_find_key(f, "general.alignment");
    if (i < 0) return KRS_OK;
    uint64_t a;
    const struct gguf_kv *kv = &f->kv[i];
    if (gguf_get_u64(f, "general.alignment", &a) != KRS_OK || kv->type == GGUF_TYPE_BOOL)
        return rd_fail(r, KRS_ERR_FORMAT,
                       "general.alignment (offset %" PRIu64 ") must be an unsigned integer, not %s",
                       kv->off, gguf_type_name((enum gguf_type)kv->type));
    if (a == 0 || (a & (a - 1)) || a > (1u << 30))
        return rd_fail(r, KRS_ERR_FORMAT,
                       "general.alignment = %" PRIu64 " (offset %" PRIu64
                       ") is not a power of two in [1, 2^30]",
                       a, kv->off);
    f->alignment = (uint32_t)a;
    return KRS_OK;
}

static int parse_tensor(struct gguf_file *f, struct rd *r, uint64_t i)
{
    struct gguf_tensor *t = &f->tensors[i];
    uint64_t at = r->pos, noff, nlen, v;
    int rc = rd_str(r, &noff, &nlen, "tensor name");
    if (rc) return rc;
    if (nlen > GGUF_MAX_NAME)
        return rd_fail(r, KRS_ERR_FORMAT,
                       "tensor %" PRIu64 " at offset %" PRIu64 ": name length %" PRIu64
                       " exceeds %d",
                       i, at, nlen, GGUF_MAX_NAME);
    if (memchr(r->p + noff, 0, (size_t)nlen))
        return rd_fail(r, KRS_ERR_FORMAT,
                       "tensor %" PRIu64 " at offset %" PRIu64 ": name contains a NUL byte", i, at);
    memcpy(t->name, r->p + noff, (size_t)nlen);
    t->name[nlen] = '\0';
    uint64_t dpos = r->pos;
    if ((rc = rd_uint(r, 4, &v, "tensor n_dims"))) return rc;
    if (v > GGUF_MAX_DIMS)
        return rd_fail(r, KRS_ERR_FORMAT,
                       "tensor '%s': n_dims %" PRIu64 " at offset %" PRIu64 " exceeds %d", t->name,
                       v, dpos, GGUF_MAX_DIMS);
    t->n_dims = (uint32_t)v;
    for (int d = 0; d < GGUF_MAX_DIMS; d++) t->ne[d] = 1;
    for (uint32_t d = 0; d < t->n_dims; d++) {
        uint64_t epos = r->pos;
        if ((rc = rd_uint(r, 8, &v, "tensor dimension"))) return rc;
        if (v > (uint64_t)INT64_MAX)
            return rd_fail(r, KRS_ERR_FORMAT,
                           "tensor '%s': dimension %u at offset %" PRIu64 " is negative", t->name,
                           d, epos);
        t->ne[d] = (int64_t)v;
    }
    uint64_t tpos = r->pos;
    if ((rc = rd_uint(r, 4, &v, "tensor type"))) return rc;
    t->type = (uint32_t)v;
    if ((rc = rd_uint(r, 8, &t->offset, "tensor offset"))) return rc;
    uint32_t blck = 0, tsize = 0;
    rc = v > UINT32_MAX ? KRS_ERR_FORMAT : gguf_ggml_type_size(t->type, &blck, &tsize);
    if (rc == KRS_ERR_FORMAT)
        return rd_fail(r, rc, "tensor '%s': unknown ggml type id %" PRIu64 " at offset %" PRIu64,
                       t->name, v, tpos);
    if (rc)
        return rd_fail(r, rc,
                       "tensor '%s': ggml type %s (id %u) is not supported (offset %" PRIu64 ")",
                       t->name, gguf_ggml_type_name(t->type), t->type, tpos);
    if (t->ne[0] % blck)
        return rd_fail(r, KRS_ERR_FORMAT,
                       "tensor '%s': ne[0] = %" PRId64 " is not a multiple of the %s block size %u",
                       t->name, t->ne[0], gguf_ggml_type_name(t->type), blck);
    /* Element count must fit int64 and byte size uint64 (overflow-checked products). */
    uint64_t nel = 1, nbytes = (uint64_t)t->ne[0] / blck * tsize;
    if ((uint64_t)t->ne[0] / blck > UINT64_MAX / tsize) goto overflow;
    for (int d = 0; d < GGUF_MAX_DIMS; d++) {
        uint64_t n = (uint64_t)t->ne[d];
        if (n && nel > (uint64_t)INT64_MAX / n) goto overflow;
        nel *= n;
        if (d > 0) {
            if (n && nbytes > UINT64_MAX / n) goto overflow;
            nbytes *= n;
        }
    }
    t->nbytes = nbytes;
    return KRS_OK;
overflow:
    return rd_fail(r, KRS_ERR_FORMAT,
                   "tensor '%s': shape [%" PRId64 ", %" PRId64 ", %" PRId64 ", %" PRId64
                   "] overflows (info at offset %" PRIu64 ")",
                   t->name, t->ne[0], t->ne[1], t->ne[2], t->ne[3], at);
}

static int index_tensors(struct gguf_file *f, struct rd *r)
{
    int rc = hash_alloc(f->n_tensors, &f->t_hash, &f->t_mask);
    if (rc) return rd_fail(r, rc, "out of memory (tensor index)");
    for (uint64_t i = 0; i < f->n_tensors; i++) {
        struct gguf_tensor *t = &f->tensors[i];
        size_t n = strlen(t->name);
        uint64_t h = hash_bytes(t->name, n) & f->t_mask;
        while (f->t_hash[h]) {
            if (!strcmp(f->tensors[f->t_hash[h] - 1].name, t->name))
                return rd_fail(r, KRS_ERR_FORMAT, "duplicate tensor name '%s' (tensor %" PRIu64 ")",
                               t->name, i);
            h = (h + 1) & f->t_mask;
        }
        f->t_hash[h] = i + 1;
    }
    return KRS_OK;
}

static int check_tensor_data(struct gguf_file *f, struct rd *r)
{
    for (uint64_t i = 0; i < f->n_tensors; i++) {
        struct gguf_tensor *t = &f->tensors[i];
        uint64_t abs = f->data_off + t->offset;
        if (t->offset % f->alignment)
            return rd_fail(r, KRS_ERR_FORMAT,
                           "tensor '%s': offset %" PRIu64 " is not a multiple of the alignment %u",
                           t->name, t->offset, f->alignment);
        if (t->offset > f->size - f->data_off || t->nbytes > f->size - abs)
            return rd_fail(r, KRS_ERR_FORMAT,
                           "tensor '%s': data [offset %" PRIu64 ", %" PRIu64
                           " bytes] past end of file (size %" PRIu64 ")",
                           t->name, t->offset > UINT64_MAX - f->data_off ? t->offset : abs,
                           t->nbytes, f->size);
        t->data = f->base + abs;
    }
    return KRS_OK;
}

static int parse(struct gguf_file *f, char *err, size_t errlen)
{
    struct rd r = {f->base, f->size, 0, err, errlen};
    uint64_t magic, ver, nt, nkv;
    int rc;
    if ((rc = rd_uint(&r, 4, &magic, "magic"))) return rc;
    if (magic != GGUF_MAGIC)
        return rd_fail(&r, KRS_ERR_FORMAT,
                       "not a GGUF file: bad magic %02x %02x %02x %02x at offset 0", f->base[0],
                       f->base[1], f->base[2], f->base[3]);
    if ((rc = rd_uint(&r, 4, &ver, "version"))) return rc;
    if (ver == 0 || (ver & 0xFFFF) == 0)
        return rd_fail(&r, KRS_ERR_FORMAT, "invalid GGUF version 0x%08" PRIx64 " at offset 4%s",
                       ver, ver ? " (big-endian file?)" : "");
    if (ver == 1)
        return rd_fail(&r, KRS_ERR_UNSUPPORTED,
                       "GGUF version 1 is not supported (only v2 and v3); re-convert the model");
    if (ver > 3)
        return rd_fail(&r, KRS_ERR_UNSUPPORTED,
                       "GGUF version %" PRIu64 " is newer than supported (v2, v3)", ver);
    f->version = (uint32_t)ver;
    if ((rc = rd_uint(&r, 8, &nt, "tensor count"))) return rc;
    if ((rc = rd_uint(&r, 8, &nkv, "kv count"))) return rc;
    if (nt > (uint64_t)INT64_MAX || nkv > (uint64_t)INT64_MAX)
        return rd_fail(&r, KRS_ERR_FORMAT, "negative tensor count or kv count at offset 8");
    if (nkv > rd_left(&r) / MIN_KV_BYTES)
        return rd_fail(&r, KRS_ERR_FORMAT,
                       "kv count %" PRIu64 " (offset 16) cannot fit in the %" PRIu64
                       " remaining bytes",
                       nkv, rd_left(&r));
    if (nt > (rd_left(&r) - nkv * MIN_KV_BYTES) / MIN_TENSOR_BYTES)
        return rd_fail(&r, KRS_ERR_FORMAT,
                       "tensor count %" PRIu64 " (offset 8) cannot fit in the %" PRIu64
                       " remaining bytes",
                       nt, rd_left(&r));
    f->kv = alloc_calloc((size_t)(nkv ? nkv : 1), sizeof *f->kv);
    f->tensors = alloc_calloc((size_t)(nt ? nt : 1), sizeof *f->tensors);
    if (!f->kv || !f->tensors) return rd_fail(&r, KRS_ERR_NOMEM, "out of memory (header)");
    for (uint64_t i = 0; i < nkv; i++) {
        f->n_kv = i + 1; /* so that gguf_close frees str_offs of a partial kv */
        if ((rc = parse_kv(f, &r, i))) return rc;
    }
    if ((rc = index_keys(f, &r))) return rc;
    if ((rc = set_alignment(f, &r))) return rc;
    if (nt > rd_left(&r) / MIN_TENSOR_BYTES)
        return rd_fail(&r, KRS_ERR_FORMAT,
                       "tensor count %" PRIu64 " cannot fit in the %" PRIu64
                       " bytes after the metadata (offset %" PRIu64 ")",
                       nt, rd_left(&r), r.pos);
    for (uint64_t i = 0; i < nt; i++)
        if ((rc = parse_tensor(f, &r, i))) return rc;
    f->n_tensors = nt;
    if ((rc = index_tensors(f, &r))) return rc;
    f->data_off = r.pos;
    if (nt > 0) {
        uint64_t a = f->alignment;
        f->data_off = (r.pos + a - 1) / a * a;
        if (f->data_off > f->size)
            return rd_fail(&r, KRS_ERR_FORMAT,
                           "truncated: data section at offset %" PRIu64
                           " (end of tensor infos %" PRIu64 " aligned to %u) past end of file "
                           "(size %" PRIu64 ")",
                           f->data_off, r.pos, f->alignment, f->size);
    }
    return check_tensor_data(f, &r);
}

static int open_common(const void *data, size_t size, int mapped, struct gguf_file **out, char *err,
                       size_t errlen)
{
    if (err && errlen) err[0] = '\0';
    struct gguf_file *f = alloc_calloc(1, sizeof *f);
    if (!f) {
        if (mapped) munmap((void *)data, size);
        if (err && errlen) snprintf(err, errlen, "out of memory");
        return KRS_ERR_NOMEM;
    }
    f->base = data;
    f->size = size;
    f->mapped = mapped;
    int rc = parse(f, err, errlen);
    if (rc) {
        gguf_close(f);
        return rc;
    }
    *out = f;
    return KRS_OK;
}

int gguf_open_memory(const void *data, size_t size, struct gguf_file **out, char *err,
                     size_t errlen)
{
    if (!out || (!data && size)) return KRS_ERR_INVALID;
    *out = NULL;
    static const uint8_t empty[1];
    return open_common(data ? data : empty, size, 0, out, err, errlen);
}

int gguf_open(const char *path, struct gguf_file **out, char *err, size_t errlen)
{
    if (!path || !out) return KRS_ERR_INVALID;
    *out = NULL;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        if (err && errlen) snprintf(err, errlen, "%s: %s", path, strerror(errno));
        return KRS_ERR_IO;
    }
    struct stat st;
    if (fstat(fd, &st) != 0) {
        int e = errno;
        close(fd);
        if (err && errlen) snprintf(err, errlen, "%s: %s", path, strerror(e));
        return KRS_ERR_IO;
    }
    if (!S_ISREG(st.st_mode)) {
        close(fd);
        if (err && errlen) snprintf(err, errlen, "%s: not a regular file", path);
        return KRS_ERR_IO;
    }
    if (st.st_size < 4) {
        close(fd);
        if (err && errlen)
            snprintf(err, errlen, "%s: not a GGUF file: only %lld bytes", path,
                     (long long)st.st_size);
        return KRS_ERR_FORMAT;
    }
    size_t size = (size_t)st.st_size;
    void *p = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
    int e = errno;
    close(fd);
    if (p == MAP_FAILED) {
        if (err && errlen) snprintf(err, errlen, "%s: mmap: %s", path, strerror(e));
        return KRS_ERR_IO;
    }
    return open_common(p, size, 1, out, err, errlen);
}

void gguf_close(struct gguf_file *f)
{
    if (!f) return;
    if (f->kv)
        for (uint64_t i = 0; i < f->n_kv; i++) alloc_free(f->kv[i].str_offs);
    alloc_free(f->kv);
    alloc_free(f->key_arena);
    alloc_free(f->tensors);
    alloc_free(f->kv_hash);
    alloc_free(f->t_hash);
    if (f->mapped) munmap((void *)f->base, (size_t)f->size);
    alloc_free(f);
}

/* ---- accessors ----------------------------------------------------------------------------- */

uint32_t gguf_version(const struct gguf_file *f)
{
    return f->version;
}
uint32_t gguf_alignment(const struct gguf_file *f)
{
    return f->alignment;
}
uint64_t gguf_file_size(const struct gguf_file *f)
{
    return f->size;
}
uint64_t gguf_data_offset(const struct gguf_file *f)
{
    return f->data_off;
}
uint64_t gguf_kv_count(const struct gguf_file *f)
{
    return f->n_kv;
}

const char *gguf_kv_key(const struct gguf_file *f, uint64_t i)
{
    return i < f->n_kv ? f->kv[i].key : NULL;
}

enum gguf_type gguf_kv_type(const struct gguf_file *f, uint64_t i)
{
    return i < f->n_kv ? (enum gguf_type)f->kv[i].type : (enum gguf_type) - 1;
}

int gguf_kv_array_info(const struct gguf_file *f, uint64_t i, enum gguf_type *elem, uint64_t *count)
{
    if (i >= f->n_kv || f->kv[i].type != GGUF_TYPE_ARRAY) return KRS_ERR_INVALID;
    if (elem) *elem = (enum gguf_type)f->kv[i].elem;
    if (count) *count = f->kv[i].count;
    return KRS_OK;
}

int64_t gguf_find_key(const struct gguf_file *f, const char *key)
{
    if (!f || !key || !f->kv_hash) return -1;
    size_t n = strlen(key);
    uint64_t h = hash_bytes(key, n) & f->kv_mask;
    while (f->kv_hash[h]) {
        const struct gguf_kv *kv = &f->kv[f->kv_hash[h] - 1];
        if (kv->key_len == n && !memcmp(kv->key, key, n)) return (int64_t)(f->kv_hash[h] - 1);
        h = (h + 1) & f->kv_mask;
    }
    return -1;
}

/* Value of a fixed-size scalar of type t at p, as one of three representations. */
enum numkind { NUM_U, NUM_I, NUM_F };
struct num {
    enum numkind kind;
    uint64_t u;
    int64_t i;
    double d;
};

static int read_num(uint32_t t, const uint8_t *p, struct num *n)
{
    uint32_t sz = gguf_type_size(t);
    if (!sz) return KRS_ERR_INVALID;
    uint64_t raw = le(p, (int)sz);
    switch (t) {
    case GGUF_TYPE_UINT8:
    case GGUF_TYPE_UINT16:
    case GGUF_TYPE_UINT32:
    case GGUF_TYPE_UINT64:
        n->kind = NUM_U, n->u = raw, n->d = (double)raw;
        break;
    case GGUF_TYPE_BOOL:
        n->kind = NUM_U, n->u = raw != 0, n->d = (double)n->u;
        break;
    case GGUF_TYPE_INT8:
        n->kind = NUM_I, n->i = (int8_t)(uint8_t)raw, n->d = (double)n->i;
        break;
    case GGUF_TYPE_INT16:
        n->kind = NUM_I, n->i = (int16_t)(uint16_t)raw, n->d = (double)n->i;
        break;
    case GGUF_TYPE_INT32:
        n->kind = NUM_I, n->i = (int32_t)(uint32_t)raw, n->d = (double)n->i;
        break;
    case GGUF_TYPE_INT64: {
        int64_t v;
        memcpy(&v, &raw, 8);
        n->kind = NUM_I, n->i = v, n->d = (double)v;
        break;
    }
    case GGUF_TYPE_FLOAT32: {
        uint32_t b = (uint32_t)raw;
        float v;
        memcpy(&v, &b, 4);
        n->kind = NUM_F, n->d = v;
        break;
    }
    default: { /* FLOAT64 */
        double v;
        memcpy(&v, &raw, 8);
        n->kind = NUM_F, n->d = v;
        break;
    }
    }
    return KRS_OK;
}

static int find_scalar(const struct gguf_file *f, const char *key, struct num *n)
{
    int64_t i = gguf_find_key(f, key);
    if (i < 0) return KRS_ERR_NOT_FOUND;
    const struct gguf_kv *kv = &f->kv[i];
    return read_num(kv->type, f->base + kv->off, n);
}

int gguf_get_i64(const struct gguf_file *f, const char *key, int64_t *out)
{
    struct num n;
    int rc = find_scalar(f, key, &n);
    if (rc) return rc;
    if (n.kind == NUM_F || (n.kind == NUM_U && n.u > (uint64_t)INT64_MAX)) return KRS_ERR_INVALID;
    *out = n.kind == NUM_U ? (int64_t)n.u : n.i;
    return KRS_OK;
}

int gguf_get_u64(const struct gguf_file *f, const char *key, uint64_t *out)
{
    struct num n;
    int rc = find_scalar(f, key, &n);
    if (rc) return rc;
    if (n.kind == NUM_F || (n.kind == NUM_I && n.i < 0)) return KRS_ERR_INVALID;
    *out = n.kind == NUM_U ? n.u : (uint64_t)n.i;
    return KRS_OK;
}

int gguf_get_u32(const struct gguf_file *f, const char *key, uint32_t *out)
{
    uint64_t v;
    int rc = gguf_get_u64(f, key, &v);
    if (rc) return rc;
    if (v > UINT32_MAX) return KRS_ERR_INVALID;
    *out = (uint32_t)v;
    return KRS_OK;
}

int gguf_get_f32(const struct gguf_file *f, const char *key, float *out)
{
    struct num n;
    int64_t i = gguf_find_key(f, key);
    if (i < 0) return KRS_ERR_NOT_FOUND;
    uint32_t t = f->kv[i].type;
    if (t != GGUF_TYPE_FLOAT32 && t != GGUF_TYPE_FLOAT64) return KRS_ERR_INVALID;
    read_num(t, f->base + f->kv[i].off, &n);
    *out = (float)n.d;
    return KRS_OK;
}

int gguf_get_bool(const struct gguf_file *f, const char *key, int *out)
{
    int64_t i = gguf_find_key(f, key);
    if (i < 0) return KRS_ERR_NOT_FOUND;
    if (f->kv[i].type != GGUF_TYPE_BOOL) return KRS_ERR_INVALID;
    *out = f->base[f->kv[i].off] != 0;
    return KRS_OK;
}

int gguf_kv_str(const struct gguf_file *f, uint64_t i, const char **s, size_t *len)
{
    if (i >= f->n_kv || f->kv[i].type != GGUF_TYPE_STRING) return KRS_ERR_INVALID;
    const uint8_t *p = f->base + f->kv[i].off;
    *len = (size_t)le(p, 8);
    *s = (const char *)p + 8;
    return KRS_OK;
}

int gguf_get_str(const struct gguf_file *f, const char *key, const char **s, size_t *len)
{
    int64_t i = gguf_find_key(f, key);
    if (i < 0) return KRS_ERR_NOT_FOUND;
    return gguf_kv_str(f, (uint64_t)i, s, len);
}

int gguf_get_array(const struct gguf_file *f, const char *key, enum gguf_type *elem,
                   uint64_t *count, const void **data)
{
    int64_t i = gguf_find_key(f, key);
    if (i < 0) return KRS_ERR_NOT_FOUND;
    const struct gguf_kv *kv = &f->kv[i];
    if (kv->type != GGUF_TYPE_ARRAY || kv->elem == GGUF_TYPE_STRING) return KRS_ERR_INVALID;
    if (elem) *elem = (enum gguf_type)kv->elem;
    if (count) *count = kv->count;
    if (data) *data = f->base + kv->off;
    return KRS_OK;
}

int gguf_kv_array_str(const struct gguf_file *f, uint64_t i, uint64_t j, const char **s,
                      size_t *len)
{
    if (i >= f->n_kv) return KRS_ERR_INVALID;
    const struct gguf_kv *kv = &f->kv[i];
    if (kv->type != GGUF_TYPE_ARRAY || kv->elem != GGUF_TYPE_STRING || j >= kv->count)
        return KRS_ERR_INVALID;
    const uint8_t *p = f->base + kv->str_offs[j];
    *len = (size_t)le(p, 8);
    *s = (const char *)p + 8;
    return KRS_OK;
}

int gguf_get_array_str(const struct gguf_file *f, const char *key, uint64_t j, const char **s,
                       size_t *len)
{
    int64_t i = gguf_find_key(f, key);
    if (i < 0) return KRS_ERR_NOT_FOUND;
    return gguf_kv_array_str(f, (uint64_t)i, j, s, len);
}

int gguf_kv_array_num(const struct gguf_file *f, uint64_t i, uint64_t j, double *out)
{
    if (i >= f->n_kv) return KRS_ERR_INVALID;
    const struct gguf_kv *kv = &f->kv[i];
    if (kv->type != GGUF_TYPE_ARRAY || j >= kv->count) return KRS_ERR_INVALID;
    uint32_t sz = gguf_type_size(kv->elem);
    if (!sz) return KRS_ERR_INVALID;
    struct num n;
    read_num(kv->elem, f->base + kv->off + j * sz, &n);
    *out = n.d;
    return KRS_OK;
}

int gguf_kv_num(const struct gguf_file *f, uint64_t i, double *out)
{
    if (i >= f->n_kv) return KRS_ERR_INVALID;
    struct num n;
    int rc = read_num(f->kv[i].type, f->base + f->kv[i].off, &n);
    if (rc) return rc;
    *out = n.d;
    return KRS_OK;
}

uint64_t gguf_tensor_count(const struct gguf_file *f)
{
    return f->n_tensors;
}

const struct gguf_tensor *gguf_tensor_at(const struct gguf_file *f, uint64_t i)
{
    return i < f->n_tensors ? &f->tensors[i] : NULL;
}

const struct gguf_tensor *gguf_find_tensor(const struct gguf_file *f, const char *name)
{
    if (!f || !name || !f->t_hash) return NULL;
    uint64_t h = hash_bytes(name, strlen(name)) & f->t_mask;
    while (f->t_hash[h]) {
        const struct gguf_tensor *t = &f->tensors[f->t_hash[h] - 1];
        if (!strcmp(t->name, name)) return t;
        h = (h + 1) & f->t_mask;
    }
    return NULL;
}
