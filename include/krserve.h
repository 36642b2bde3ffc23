/* kr-serve public API.
 *
 * Status codes shared by every module: functions return enum krs_status (0 = success) and hand
 * results back through out-parameters. Module headers under src/<module>/ hold the rest of the
 * library API; this header is the stable entry point for C programs embedding the engine. */
#ifndef KRSERVE_H
#define KRSERVE_H

#ifdef __cplusplus
extern "C" {
#endif

enum krs_status {
    KRS_OK = 0,
    KRS_ERR_INVALID = 1,     /* bad argument or request */
    KRS_ERR_NOMEM = 2,       /* allocation failed */
    KRS_ERR_IO = 3,          /* open/read/mmap failed (errno kept where useful) */
    KRS_ERR_FORMAT = 4,      /* malformed or truncated input file */
    KRS_ERR_UNSUPPORTED = 5, /* valid but not supported (architecture, tensor type, ...) */
    KRS_ERR_AGAIN = 6,       /* temporarily impossible: try again later (e.g. no free KV block) */
    KRS_ERR_NOT_FOUND = 7,   /* no such key, tensor, request or model */
    KRS_ERR_CANCELLED = 8,   /* the operation was cancelled */
    KRS_ERR_FULL = 9,        /* a bounded queue or buffer is full (overload) */
    KRS_ERR_STATE = 10,      /* not allowed in the current state (draining, not loaded, ...) */
    KRS_ERR_INTERNAL = 11,   /* a bug: an invariant did not hold */
};

/* Static string naming the status ("ok", "invalid argument", ...). Never NULL. */
const char *krs_status_str(int status);

/* The library version, e.g. "0.1.0". */
const char *krs_version(void);

#ifdef __cplusplus
}
#endif

#endif
