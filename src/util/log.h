/* Levelled logging with a replaceable sink.
 *
 * KRS_LOG_* macros skip formatting (and argument evaluation) below the current threshold.
 * The default sink writes "LEVEL message" lines to stderr; tests and the server may install
 * their own. The sink is called with the formatted message, without a trailing newline, and
 * must be thread-safe (it is called from the engine and HTTP threads alike). */
#ifndef KRS_UTIL_LOG_H
#define KRS_UTIL_LOG_H

#include <stdarg.h>

enum krs_log_level {
    KRS_LOG_DEBUG = 0,
    KRS_LOG_INFO = 1,
    KRS_LOG_WARN = 2,
    KRS_LOG_ERROR = 3,
    KRS_LOG_OFF = 4,
};

typedef void (*krs_log_sink_fn)(void *user, enum krs_log_level level, const char *msg);

/* Current threshold; messages below it are dropped. Default INFO, or KRS_LOG_LEVEL env
 * (debug|info|warn|error|off) read once by log_init_from_env(). */
extern int krs_log_threshold;

void log_set_level(enum krs_log_level level);
/* Parses "debug".."off"; returns 0 on success, -1 on an unknown name. */
int log_parse_level(const char *name, enum krs_log_level *out);
void log_init_from_env(void);
/* Installs a sink (NULL restores stderr). `user` is passed back unchanged; not owned. */
void log_set_sink(krs_log_sink_fn sink, void *user);
const char *log_level_name(enum krs_log_level level);

void log_write(enum krs_log_level level, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

#define KRS_LOG(level, ...)                                                                        \
    do {                                                                                           \
        if ((int)(level) >= krs_log_threshold) log_write((level), __VA_ARGS__);                    \
    } while (0)
#define KRS_LOG_DEBUGF(...) KRS_LOG(KRS_LOG_DEBUG, __VA_ARGS__)
#define KRS_LOG_INFOF(...)  KRS_LOG(KRS_LOG_INFO, __VA_ARGS__)
#define KRS_LOG_WARNF(...)  KRS_LOG(KRS_LOG_WARN, __VA_ARGS__)
#define KRS_LOG_ERRORF(...) KRS_LOG(KRS_LOG_ERROR, __VA_ARGS__)

#endif
