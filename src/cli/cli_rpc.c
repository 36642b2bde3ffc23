/* `krserve rpc`: the JSON-RPC protocol (src/rpc/) over stdio. One JSON message per line in on
 * stdin; one JSON message per line out on stdout (responses and stream notifications, written
 * whole under a lock); logs go to stderr only. At end of input it waits for outstanding
 * streams to finish, then exits. This file only wires transport and startup; it must not
 * interpret messages. */
#include "cli/cli.h"
#include "config/config.h"
#include "engine/engine.h"
#include "krserve.h"
#include "rpc/rpc.h"
#include "util/alloc.h"
#include "util/log.h"

#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>

static void usage(FILE *f)
{
    fprintf(f, "usage: krserve rpc [-m MODEL] [--config FILE] [config flags...]\n\n"
               "Serves the JSON-RPC 2.0 protocol (docs/rpc.md) on stdin/stdout: one JSON message\n"
               "per line in, one per line out. The model (-m, $KRSERVE_MODEL, model.path or the\n"
               "default model) is loaded under the id model.name or its file stem; load_model\n"
               "opens only files inside model.dir (--model-dir). Logs go to stderr.\n");
}

struct stdout_sink {
    pthread_mutex_t lock;
    int broken;
};

static void stdout_write(void *user, const char *json, size_t len)
{
    struct stdout_sink *s = user;
    pthread_mutex_lock(&s->lock);
    if (!s->broken) {
        if (fwrite(json, 1, len, stdout) != len || fputc('\n', stdout) == EOF ||
            fflush(stdout) != 0)
            s->broken = 1;
    }
    pthread_mutex_unlock(&s->lock);
}

int cli_rpc(int argc, char **argv)
{
    int rc = 1, n_rest = 0;
    char err[1024];
    struct krs_config cfg;
    struct engine_registry *reg = NULL;
    struct rpc_ctx *ctx = NULL;
    char *line = NULL;
    size_t cap = 0;
    struct stdout_sink out = {.broken = 0};
    pthread_mutex_init(&out.lock, NULL);
    char **rest = alloc_calloc((size_t)argc + 1, sizeof *rest);
    if (!rest) goto done;
    for (int i = 1; i < argc; i++)
        if (!strcmp(argv[i], "-h") || !strcmp(argv[i], "--help")) {
            usage(stdout);
            rc = 0;
            goto done;
        }
    if (config_load(&cfg, NULL, NULL, argc - 1, argv + 1, rest, &n_rest, err, sizeof err)) {
        fprintf(stderr, "krserve rpc: %s\n", err);
        rc = 2;
        goto done;
    }
    if (n_rest > 0) {
        fprintf(stderr, "krserve rpc: unknown option '%s'\n", rest[0]);
        usage(stderr);
        rc = 2;
        goto done;
    }
    log_set_level((enum krs_log_level)cfg.logging.level);
    const char *path = cli_model_path(cfg.model.path[0] ? cfg.model.path : NULL);
    if (!path) goto done;
    if (engine_registry_create(&cfg, &reg)) goto done;
    if (engine_registry_load(reg, cfg.model.name[0] ? cfg.model.name : NULL, path, 0, err,
                             sizeof err)) {
        fprintf(stderr, "krserve rpc: cannot load %s: %s\n", path, err);
        goto done;
    }
    if (rpc_create(reg, &ctx)) goto done;
    signal(SIGPIPE, SIG_IGN);
    KRS_LOG_INFOF("rpc: serving JSON-RPC on stdio");

    struct rpc_sink sink = {stdout_write, &out};
    long n;
    while ((n = cli_read_line(stdin, &line, &cap)) >= 0) {
        size_t len = (size_t)n;
        while (len > 0 && (line[len - 1] == '\r' || line[len - 1] == ' ')) len--;
        if (len == 0) continue;
        rpc_handle(ctx, line, len, &sink, 0); /* errors, out of memory too, are answers */
    }
    if (n == -2) KRS_LOG_ERRORF("rpc: out of memory reading input");
    rpc_wait_idle(ctx);
    rc = 0;
done:
    rpc_free(ctx);
    engine_registry_destroy(reg);
    alloc_free(line);
    alloc_free(rest);
    pthread_mutex_destroy(&out.lock);
    return rc;
}
