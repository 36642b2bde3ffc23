/* Logging: threshold check in the macro, formatting here, delivery through one sink. */
#include "util/log.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

int krs_log_threshold = KRS_LOG_INFO;

static pthread_mutex_t sink_lock = PTHREAD_MUTEX_INITIALIZER;
static krs_log_sink_fn sink_fn;
static void *sink_user;

static const char *const level_names[] = {"debug", "info", "warn", "error", "off"};

const char *log_level_name(enum krs_log_level level)
{
    if ((int)level < 0 || level > KRS_LOG_OFF) return "?";
    return level_names[level];
}

void log_set_level(enum krs_log_level level)
{
    krs_log_threshold = (int)level;
}

int log_parse_level(const char *name, enum krs_log_level *out)
{
    for (int i = 0; i <= KRS_LOG_OFF; i++) {
        if (strcmp(name, level_names[i]) == 0) {
            *out = (enum krs_log_level)i;
            return 0;
        }
    }
    return -1;
}

void log_init_from_env(void)
{
    const char *v = getenv("KRS_LOG_LEVEL");
    enum krs_log_level level;
    if (v && log_parse_level(v, &level) == 0) log_set_level(level);
}

void log_set_sink(krs_log_sink_fn sink, void *user)
{
    pthread_mutex_lock(&sink_lock);
    sink_fn = sink;
    sink_user = user;
    pthread_mutex_unlock(&sink_lock);
}

void log_write(enum krs_log_level level, const char *fmt, ...)
{
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);

    pthread_mutex_lock(&sink_lock);
    if (sink_fn) {
        sink_fn(sink_user, level, msg);
    } else {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        struct tm tm;
        gmtime_r(&ts.tv_sec, &tm);
        fprintf(stderr, "%02d:%02d:%02d.%03ld %-5s %s\n", tm.tm_hour, tm.tm_min, tm.tm_sec,
                ts.tv_nsec / 1000000, log_level_name(level), msg);
    }
    pthread_mutex_unlock(&sink_lock);
}
