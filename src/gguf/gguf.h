/* GGUF v2/v3 reader over a read-only mmap (or a caller-owned memory buffer).
 *
 * gguf_open validates the whole header up front: every count, length, offset and size is
 * checked against the file size with overflow-safe arithmetic, so that after a successful open
 * every pointer handed out by this module lies inside the mapping. A malformed or truncated
 * file returns KRS_ERR_FORMAT with a message naming the problem (and its byte offset) in `err`;
 * it never crashes, hangs or allocates more than a small multiple of the file size.
 *
 * Ownership: the gguf_file owns the mapping and its index; every pointer returned by the getters
 * (strings, arrays, tensor data, tensor infos) stays valid until gguf_close. Strings from the
 * file are NOT NUL-terminated: they come back as (pointer, length). Tensor names are the
 * exception: they are copied NUL-terminated into the index (names are short, <= 64 bytes). */
#ifndef KRS_GGUF_H
#define KRS_GGUF_H

#include <stddef.h>
#include <stdint.h>

enum gguf_type {
    GGUF_TYPE_UINT8 = 0,
    GGUF_TYPE_INT8 = 1,
    GGUF_TYPE_UINT16 = 2,
    GGUF_TYPE_INT16 = 3,
    GGUF_TYPE_UINT32 = 4,
    GGUF_TYPE_INT32 = 5,
    GGUF_TYPE_FLOAT32 = 6,
    GGUF_TYPE_BOOL = 7,
    GGUF_TYPE_STRING = 8,
    GGUF_TYPE_ARRAY = 9,
    GGUF_TYPE_UINT64 = 10,
    GGUF_TYPE_INT64 = 11,
    GGUF_TYPE_FLOAT64 = 12,
};

#define GGUF_MAX_DIMS 4
#define GGUF_MAX_NAME 64

struct gguf_tensor {
    char name[GGUF_MAX_NAME + 1]; /* NUL-terminated copy */
    uint32_t n_dims;
    int64_t ne[GGUF_MAX_DIMS]; /* ne[0] contiguous; unused dims are 1 */
    uint32_t type;             /* ggml type id (see quant/quant.h) */
    uint64_t offset;           /* relative to the data section */
    uint64_t nbytes;
    const void *data; /* inside the mapping; aligned to the file's alignment */
};

struct gguf_file;

/* Opens and validates `path` (read-only MAP_PRIVATE mapping). Accepted: GGUF v2 and v3 (v2 is
 * laid out as v3); v1 and newer versions are KRS_ERR_UNSUPPORTED. Validated: magic, counts
 * against the file size, every value type (nested arrays rejected), unique non-empty keys,
 * general.alignment (non-zero power of two, default 32), tensor names (<= 64 bytes, unique),
 * n_dims <= 4, dims >= 0, ne[0] a multiple of the type's block size, overflow-free byte sizes,
 * offsets aligned and data inside the file. On failure returns a status (KRS_ERR_IO,
 * KRS_ERR_FORMAT, KRS_ERR_UNSUPPORTED for a valid header with e.g. an unknown tensor type,
 * KRS_ERR_NOMEM) and writes a one-line reason into err (may be NULL). The caller owns *out
 * (gguf_close). */
int gguf_open(const char *path, struct gguf_file **out, char *err, size_t errlen);
/* Same over a caller-owned buffer, which must outlive the gguf_file (used by the fuzzer and
 * tests). */
int gguf_open_memory(const void *data, size_t size, struct gguf_file **out, char *err,
                     size_t errlen);
void gguf_close(struct gguf_file *f);

uint32_t gguf_version(const struct gguf_file *f);
uint32_t gguf_alignment(const struct gguf_file *f);
uint64_t gguf_file_size(const struct gguf_file *f);
uint64_t gguf_data_offset(const struct gguf_file *f);

/* Metadata by index: 0 <= i < gguf_kv_count. */
uint64_t gguf_kv_count(const struct gguf_file *f);
/* Key of kv i, NUL-terminated (copied into the index at open). */
const char *gguf_kv_key(const struct gguf_file *f, uint64_t i);
enum gguf_type gguf_kv_type(const struct gguf_file *f, uint64_t i);
/* For arrays: element type and count. Returns KRS_ERR_INVALID when kv i is not an array. */
int gguf_kv_array_info(const struct gguf_file *f, uint64_t i, enum gguf_type *elem,
                       uint64_t *count);
/* Index of `key`, or -1. */
int64_t gguf_find_key(const struct gguf_file *f, const char *key);

/* Typed getters by key. Return KRS_OK, KRS_ERR_NOT_FOUND (no such key) or KRS_ERR_INVALID
 * (wrong type, or a value out of the target's range). Integer getters accept any integer type
 * (and bool) whose value fits; gguf_get_f32 accepts FLOAT32 and FLOAT64. */
int gguf_get_u32(const struct gguf_file *f, const char *key, uint32_t *out);
int gguf_get_i64(const struct gguf_file *f, const char *key, int64_t *out);
int gguf_get_u64(const struct gguf_file *f, const char *key, uint64_t *out);
int gguf_get_f32(const struct gguf_file *f, const char *key, float *out);
int gguf_get_bool(const struct gguf_file *f, const char *key, int *out);
int gguf_get_str(const struct gguf_file *f, const char *key, const char **s, size_t *len);

/* Arrays. gguf_get_array gives the raw little-endian elements of a fixed-size-element array
 * (not strings): *data points at count * element_size bytes inside the mapping (unaligned). */
int gguf_get_array(const struct gguf_file *f, const char *key, enum gguf_type *elem,
                   uint64_t *count, const void **data);
/* Element j of a string array (index built at open, O(1)). */
int gguf_get_array_str(const struct gguf_file *f, const char *key, uint64_t j, const char **s,
                       size_t *len);
/* Same by kv index, for callers iterating big arrays (avoids the key lookup per element). */
int gguf_kv_array_str(const struct gguf_file *f, uint64_t i, uint64_t j, const char **s,
                      size_t *len);
/* Element j of any numeric array converted to double (for printing and small arrays). */
int gguf_kv_array_num(const struct gguf_file *f, uint64_t i, uint64_t j, double *out);
/* Scalar by kv index converted to double / string (for printing). */
int gguf_kv_num(const struct gguf_file *f, uint64_t i, double *out);
int gguf_kv_str(const struct gguf_file *f, uint64_t i, const char **s, size_t *len);

/* Tensors. */
uint64_t gguf_tensor_count(const struct gguf_file *f);
const struct gguf_tensor *gguf_tensor_at(const struct gguf_file *f, uint64_t i);
/* NULL when absent. */
const struct gguf_tensor *gguf_find_tensor(const struct gguf_file *f, const char *name);

/* Name of a metadata value type: "u8", "i32", "f32", "string", "array", ...; "unknown" for
 * others. Never NULL. */
const char *gguf_type_name(enum gguf_type t);
/* Bytes of one fixed-size metadata value of type t; 0 for STRING, ARRAY and unknown types. */
uint32_t gguf_type_size(uint32_t t);

/* ggml tensor types as this module knows them (independent of quant/, used for size checks):
 * name ("Q4_K", "F32", ...; "unknown" for ids that are not ggml types; never NULL), and
 * elements / bytes per block. gguf_ggml_type_size returns KRS_ERR_FORMAT for an id that is not
 * a ggml type, KRS_ERR_UNSUPPORTED for a ggml type whose block size this module does not know. */
const char *gguf_ggml_type_name(uint32_t type);
int gguf_ggml_type_size(uint32_t type, uint32_t *blck, uint32_t *size);

#endif
