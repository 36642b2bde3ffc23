/* `krserve serve`: loads the startup model into an engine registry, runs the HTTP server, and
 * handles signals through a signalfd (no work in signal handlers): SIGTERM/SIGINT drain (stop
 * taking work, let running requests finish within server.drainTimeoutMs, stop listening, answer
 * the HTTP requests already received, exit 0), SIGHUP
 * re-reads the configuration and applies what is safe at run time. */
#include "cli/cli.h"
#include "config/config.h"
#include "engine/engine.h"
#include "krserve.h"
#include "server/server.h"
#include "util/alloc.h"
#include "util/clock.h"
#include "util/log.h"

#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/signalfd.h>
#include <unistd.h>

static void usage(FILE *f)
{
    fprintf(f, "usage: krserve serve [-m MODEL] [--host H] [--port P] [--config FILE] [flags]\n"
               "  Serves the OpenAI-compatible API, JSON-RPC, monitoring and admin routes.\n"
               "  Every configuration key can be set with --set key.path=value; `krserve config\n"
               "  --help` lists the named flags. SIGTERM/SIGINT drain and exit, SIGHUP reloads.\n");
}

static int load_config(int argc, char **argv, struct krs_config *cfg, int quiet)
{
    char err[512];
    char *rest[256];
    int n_rest = 0;
    if (argc > 256) argc = 256;
    int rc = config_load(cfg, NULL, NULL, argc, argv, rest, &n_rest, err, sizeof err);
    if (rc) {
        fprintf(stderr, "krserve serve: %s\n", err);
        return 2;
    }
    for (int i = 0; i < n_rest; i++) {
        if (!strcmp(rest[i], "-h") || !strcmp(rest[i], "--help")) {
            if (!quiet) usage(stdout);
            return 1;
        }
        fprintf(stderr, "krserve serve: unknown argument '%s'\n", rest[i]);
        if (!quiet) usage(stderr);
        return 2;
    }
    return 0;
}

int cli_serve(int argc, char **argv)
{
    struct krs_config cfg;
    int rc = load_config(argc - 1, argv + 1, &cfg, 0);
    if (rc) return rc == 1 ? 0 : 2;
    log_set_level((enum krs_log_level)cfg.logging.level);

    const char *path = cfg.model.path[0] ? cfg.model.path : cli_model_path(NULL);
    if (!path) return 1;

    /* Block the signals before any thread starts so that every thread inherits the mask and
     * only the signalfd sees them. */
    sigset_t mask;
    sigemptyset(&mask);
    sigaddset(&mask, SIGTERM);
    sigaddset(&mask, SIGINT);
    sigaddset(&mask, SIGHUP);
    sigaddset(&mask, SIGPIPE);
    pthread_sigmask(SIG_BLOCK, &mask, NULL);
    sigdelset(&mask, SIGPIPE);
    int sfd = signalfd(-1, &mask, SFD_CLOEXEC);
    if (sfd < 0) {
        perror("krserve serve: signalfd");
        return 1;
    }

    struct engine_registry *reg = NULL;
    struct server *srv = NULL;
    int exit_code = 1;
    char err[512] = "";
    if (engine_registry_create(&cfg, &reg)) {
        fprintf(stderr, "krserve serve: out of memory\n");
        goto out;
    }
    /* Listen first, then load: while the model loads, /health answers 200, /ready 503
     * ("loading model") and API requests 503, so an orchestrator sees a live process that is
     * not ready yet instead of a refused connection. */
    engine_registry_hold_loading(reg, +1);
    if ((rc = server_start(&cfg, reg, &srv, err, sizeof err))) {
        fprintf(stderr, "krserve serve: %s\n", err);
        goto out;
    }
    rc = engine_registry_load(reg, cfg.model.name[0] ? cfg.model.name : NULL, path, 0, err,
                              sizeof err);
    engine_registry_hold_loading(reg, -1);
    if (rc) {
        fprintf(stderr, "krserve serve: cannot load %s: %s\n", path,
                err[0] ? err : krs_status_str(rc));
        goto out;
    }
    char names[1][ENGINE_NAME_MAX];
    engine_registry_list(reg, names, 1);
    printf("listening on http://%s:%d (model '%s')\n", cfg.server.host, cfg.server.port, names[0]);
    if (cfg.monitoring.prometheus.port > 0 && cfg.monitoring.prometheus.enabled)
        printf("metrics on http://%s:%d%s\n", cfg.server.host, cfg.monitoring.prometheus.port,
               cfg.monitoring.prometheus.path);
    fflush(stdout);
    int faults = alloc_fault_arm_from_env(); /* tests only: $KRSERVE_FAULT_ALLOC_* */

    for (;;) {
        struct signalfd_siginfo si;
        ssize_t n = read(sfd, &si, sizeof si);
        if (n != (ssize_t)sizeof si) continue;
        if (si.ssi_signo == SIGHUP) {
            struct krs_config nc;
            if (load_config(argc - 1, argv + 1, &nc, 1) == 0) {
                KRS_LOG_INFOF("SIGHUP: configuration re-read");
                server_reload(srv, &nc);
                config_free(&nc);
            } else {
                KRS_LOG_ERRORF("SIGHUP: configuration invalid; keeping the current one");
            }
            continue;
        }
        break; /* SIGTERM / SIGINT */
    }

    if (faults) { /* injected failures are for serving, not for the shutdown */
        int fired = alloc_fault_disarm();
        fprintf(stderr, "fault injection: %d allocation sites met, injected failure %s\n",
                alloc_fault_census_count(), fired ? "fired" : "not reached");
    }
    KRS_LOG_INFOF("shutdown: draining (%d in flight, up to %lld ms)", server_inflight(srv),
                  (long long)cfg.server.drain_timeout_ms);
    server_begin_drain(srv);
    uint64_t deadline = clock_now_ns() + (uint64_t)cfg.server.drain_timeout_ms * 1000000ull;
    struct pollfd pfd = {.fd = sfd, .events = POLLIN};
    while (server_inflight(srv) > 0 && clock_now_ns() < deadline) {
        /* A second SIGTERM/SIGINT ends the wait at once. */
        if (poll(&pfd, 1, 20) > 0) {
            struct signalfd_siginfo si;
            if (read(sfd, &si, sizeof si) == (ssize_t)sizeof si && si.ssi_signo != SIGHUP) break;
        }
    }
    if (server_inflight(srv) > 0) {
        KRS_LOG_WARNF("shutdown: %d requests still running; cancelling", server_inflight(srv));
        server_cancel_all(srv, "shutdown");
        uint64_t hard = clock_now_ns() + 5000000000ull;
        while (server_inflight(srv) > 0 && clock_now_ns() < hard) clock_sleep_us(10000);
    }
    /* Every generation has ended; answer what was already received before closing. */
    server_finish_drain(srv, 5000);
    KRS_LOG_INFOF("shutdown: done");
    exit_code = 0;
out:
    server_stop(srv);
    engine_registry_destroy(reg);
    close(sfd);
    config_free(&cfg);
    return exit_code;
}
