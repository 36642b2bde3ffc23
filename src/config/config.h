/* config/: the server's effective configuration.
 *
 * Values come from four layers, later ones winning: built-in defaults < config/runtime.yaml (or
 * the file named by --config / $KRSERVE_CONFIG) < environment variables (the seed's MLX_* names
 * and KRSERVE_*) < command-line flags (named flags and `--set key.path=value`).
 *
 * One table of keys (config_keys.c: name, type, field offset, range, enum names, env var, flag)
 * drives the file parser, the environment, the flags, --set, validation, the dump and the JSON
 * view, so a key is declared exactly once. Every error names the key, and where the value came
 * from (file:line:column, the env var, or the flag).
 *
 * struct krs_config is plain data: strings are fixed char arrays (an empty string means null
 * where a key is nullable), so it can be copied by value and needs no cleanup beyond
 * config_free(), which only wipes the API key. This module has no side effects on the process
 * (it does not set the log level or read the model); callers apply what they load. */
#ifndef KRS_CONFIG_H
#define KRS_CONFIG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include <cJSON.h>

#define CONFIG_DEFAULT_FILE "config/runtime.yaml"
#define CONFIG_MAX_KEYS     64 /* room in the per-key origin table; >= the registry size */
#define CONFIG_MAX_WINDOWS  8  /* monitoring.metrics.windowsSec entries */
#define CONFIG_PATH_MAX     4096
#define CONFIG_STR_MAX      256

/* Where a value came from. Ordered by precedence. */
enum config_source {
    CONFIG_SRC_DEFAULT = 0,
    CONFIG_SRC_FILE = 1,
    CONFIG_SRC_ENV = 2,
    CONFIG_SRC_FLAG = 3,
};

/* performance.gpuScheduler.mode */
enum config_device {
    CONFIG_DEVICE_CPU = 0,
    CONFIG_DEVICE_CUDA = 1,
};
/* "cpu", "cuda" */
const char *config_device_name(int device);

enum config_sched_mode {
    CONFIG_SCHED_AUTO = 0,  /* continuous batching, batch limit auto-tuned */
    CONFIG_SCHED_FIXED = 1, /* continuous batching, batch limit = batchSize */
    CONFIG_SCHED_OFF = 2,   /* one request at a time (the rollback path) */
};

/* Per-key provenance, for the dump and for error messages of cross-key checks. `name` is a
 * static string (the env var or the flag), NULL for defaults and files. */
struct config_origin {
    uint8_t source; /* enum config_source */
    int line, col;  /* 1-based position in `file` when source == CONFIG_SRC_FILE */
    const char *name;
};

struct krs_config {
    struct {
        char host[CONFIG_STR_MAX];    /* default "127.0.0.1" */
        int port;                     /* [1, 65535], default 8080 */
        char api_key[CONFIG_STR_MAX]; /* "" = no authentication */
        int64_t max_body_bytes;
        int max_prompt_tokens;
        int max_tokens_limit;
        int64_t request_timeout_ms;
        int max_queue;
        int threads;        /* HTTP threads */
        int idle_timeout_s; /* close connections idle this long; 0 = never */
        int64_t drain_timeout_ms;
    } server;
    struct {
        char path[CONFIG_PATH_MAX]; /* "" = none given (callers fall back to the default model) */
        char dir[CONFIG_PATH_MAX];  /* the only directory load_model may open */
        char name[CONFIG_STR_MAX];  /* served model id; "" = file stem of path */
        int kv_cache_tokens;
        int max_batch_tokens; /* prefill token budget per step */
        int threads;          /* compute threads, 0 = all cores */
        int device;           /* enum config_device */
        int memory_budget_mb; /* CPU backend budget; 0 = available memory */
        int context_length;   /* 0 = the model's, capped by kv_cache_tokens */
    } model;
    struct {
        struct {
            bool enabled; /* false = one request at a time, whatever mode says */
            int mode;     /* enum config_sched_mode */
            int batch_size;
            double batch_window_ms;
            double p99_threshold_ms;
            struct {
                bool enabled;
                int min_batch, max_batch; /* min_batch <= max_batch */
                double ema_alpha;
                int interval;           /* steps between tuning decisions */
                double late_wait_ms;    /* queue wait that makes a request late */
                double late_p99_factor; /* late admissions: P99 within this * target */
            } auto_tune;
        } gpu_scheduler;
        struct {
            bool enabled;
            double window_min_ms, window_max_ms; /* window_min_ms <= window_max_ms */
            int priority_levels;
        } adaptive_batching;
        struct {
            bool enabled;       /* reuse the KV of repeated prompt prefixes */
            int64_t max_tokens; /* cached positions kept while unused; 0 = KV pool's room */
        } prefix_cache;
        bool dedup; /* identical concurrent deterministic requests share one generation */
    } performance;
    struct {
        struct {
            bool enabled;
            int port; /* 0 = /metrics on the main port only */
            char path[CONFIG_STR_MAX];
        } prometheus;
        struct {
            bool enabled;
            int windows_sec[CONFIG_MAX_WINDOWS]; /* strictly increasing */
            int n_windows_sec;
        } metrics;
    } monitoring;
    struct {
        int level; /* enum krs_log_level of util/log.h: debug=0 .. off=4 */
    } logging;

    char file[CONFIG_PATH_MAX];                   /* the config file applied, "" if none */
    struct config_origin origin[CONFIG_MAX_KEYS]; /* indexed like config_key_at() */
};

/* One registered key (read-only; from config_key_at / config_key_find). */
enum config_type {
    CONFIG_T_BOOL,   /* bool; true/false/on/off/yes/no/1/0, any case */
    CONFIG_T_INT,    /* int or int64_t (by field size), range-checked */
    CONFIG_T_DOUBLE, /* finite double, range-checked */
    CONFIG_T_STRING, /* char array; nullable keys take null (YAML) or "" (env/flags) */
    CONFIG_T_ENUM,   /* int index into enum_names */
    CONFIG_T_INTLIST /* YAML sequence, or "5,30,60" / "[5, 30, 60]" from env/flags */
};

struct config_key {
    const char *name; /* "performance.gpuScheduler.batchSize" */
    const char *def;  /* the default, in the text form config_set takes ("" = null) */
    enum config_type type;
    size_t offset, size; /* of the field in struct krs_config */
    double min, max;     /* INT/DOUBLE: value range; STRING: max length; INTLIST: element range */
    const char *const *enum_names; /* NULL-terminated, ENUM only */
    bool nullable;                 /* STRING only */
    const char *env;               /* environment variable, or NULL */
    const char *flag;              /* long flag ("--port"), or NULL */
    const char *short_flag;        /* "-m", or NULL */
    const char *help;              /* one line for docs and --help */
    /* Extra check on a parsed value (NULL = none): returns 0 if fine, else writes the reason
     * ("must start with '/'") to msg. */
    int (*check)(const void *field, char *msg, size_t len);
};

/* Number of keys, and the key at index i (0 <= i < config_key_count()), or NULL. */
size_t config_key_count(void);
const struct config_key *config_key_at(size_t i);
/* Index of the key named `name`, or -1. */
int config_key_find(const char *name);

/* Fills *cfg with the defaults, every source CONFIG_SRC_DEFAULT. Cannot fail. */
void config_defaults(struct krs_config *cfg);

/* Sets one key from its text form (as in env or --set), recording `source` (name NULL).
 * Returns KRS_OK, KRS_ERR_NOT_FOUND (unknown key) or KRS_ERR_INVALID (bad value); on error *cfg
 * is unchanged and err holds "key: expected ..., got \"...\"". Does not run cross-key checks
 * (config_validate does). */
int config_set(struct krs_config *cfg, const char *key, const char *value,
               enum config_source source, char *err, size_t errlen);

/* Applies a YAML file. A missing file is KRS_ERR_IO; syntax errors, unknown keys and bad values
 * are KRS_ERR_FORMAT / KRS_ERR_INVALID with "path:line:col: key: message" in err. Records the
 * path in cfg->file. Values set before the error stay set (callers discard cfg on error). */
int config_apply_file(struct krs_config *cfg, const char *path, char *err, size_t errlen);

/* Applies the environment: envp is a NULL-terminated "NAME=value" array, or NULL for the
 * process environment. Empty variables count as unset. */
int config_apply_env(struct krs_config *cfg, char **envp, char *err, size_t errlen);

/* Applies flags argv[0..argc-1] (--host H, --host=H, -m FILE, --set key=value, ...). --config
 * FILE is skipped here (config_load reads it). Arguments that are not config flags go to
 * rest[*n_rest++] in order when rest is non-NULL (rest needs room for argc entries); with rest
 * NULL they are errors. */
int config_apply_flags(struct krs_config *cfg, int argc, char **argv, char **rest, int *n_rest,
                       char *err, size_t errlen);

/* Cross-key checks (autoTune.minBatch <= maxBatch, windowMinMs <= windowMaxMs, contextLength
 * <= kvCacheTokens, prometheus.port != server.port). The error names the key that was set by
 * the higher-precedence source, with its origin. */
int config_validate(const struct krs_config *cfg, char *err, size_t errlen);

/* The whole pipeline: config_defaults, then the file (`file` if non-NULL, overridden by a
 * --config flag in argv, else $KRSERVE_CONFIG, else ./config/runtime.yaml if it exists, else
 * none), then env, then flags, then config_validate. rest/n_rest as in config_apply_flags. */
int config_load(struct krs_config *cfg, const char *file, char **envp, int argc, char **argv,
                char **rest, int *n_rest, char *err, size_t errlen);

/* Source of key `name` (CONFIG_SRC_*), or -1 for an unknown key. */
int config_source_of(const struct krs_config *cfg, const char *name);

/* Text form of a key's value as the dump prints it ("8", "2.0", "on"... see config.c), written
 * to buf (NUL-terminated, truncated to len). Strings print unquoted, null as "null", the API key
 * as "<redacted>" when set. Returns KRS_OK or KRS_ERR_NOT_FOUND. */
int config_format_value(const struct krs_config *cfg, const char *name, char *buf, size_t len);

/* Prints "key = value  # source" for every key, in registry order. */
void config_dump(const struct krs_config *cfg, FILE *f);

/* The configuration as a nested cJSON object following the YAML layout (API key redacted),
 * plus a flat "sources" object {key: "default"|"file path:l:c"|"env NAME"|"flag --x"} when
 * with_sources. The caller owns *out (cJSON_Delete). Returns KRS_OK or KRS_ERR_NOMEM. */
int config_to_json(const struct krs_config *cfg, bool with_sources, cJSON **out);

/* The scheduler mode the engine should run: OFF when gpuScheduler.enabled is false or mode is
 * off; FIXED when mode is fixed, or auto with autoTune disabled; AUTO otherwise. */
enum config_sched_mode config_effective_sched_mode(const struct krs_config *cfg);

/* Wipes the API key. The struct holds no heap memory. */
void config_free(struct krs_config *cfg);

#endif
