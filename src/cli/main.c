/* krserve: a thin dispatcher over libkrserve's sub-commands. */
#include "cli/cli.h"
#include "krserve.h"
#include "util/alloc.h"
#include "util/log.h"

#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <stdlib.h>
#include <unistd.h>

struct command {
    const char *name;
    int (*run)(int argc, char **argv);
    const char *help;
};

static int cli_version(int argc, char **argv)
{
    printf("krserve %s\n", krs_version());
    return 0;
}

/* One line per sub-command; keep alphabetical. */
static const struct command commands[] = {
    {"config", cli_config, "show the effective configuration (--print) and its sources"},
    {"eval-logits", cli_eval, "run a model on token ids: dump logits or greedy ids"},
    {"generate", cli_generate, "generate text from a prompt (or a file of prompts with --batch)"},
    {"inspect", cli_inspect, "show a GGUF model's metadata and tensors"},
    {"rpc", cli_rpc, "serve the JSON-RPC 2.0 protocol on stdin/stdout (docs/rpc.md)"},
    {"serve", cli_serve, "run the HTTP server (OpenAI API, JSON-RPC, metrics, admin)"},
    {"tokenize", cli_tokenize, "tokenize text or render a chat template (--chat)"},
    {"version", cli_version, "print the version"},
};

long cli_read_line(FILE *f, char **buf, size_t *cap)
{
    size_t n = 0;
    int ch;
    while ((ch = fgetc(f)) != EOF) {
        if (n + 2 > *cap) {
            size_t nc = *cap ? *cap * 2 : 4096;
            char *nb = alloc_realloc(*buf, nc);
            if (!nb) return -2;
            *buf = nb, *cap = nc;
        }
        if (ch == '\n') break;
        (*buf)[n++] = (char)ch;
    }
    if (ch == EOF && n == 0) return -1;
    if (*buf) (*buf)[n] = '\0';
    return (long)n;
}

static char default_model_buf[4200];

const char *cli_model_path(const char *explicit_path)
{
    const char *path = explicit_path;
    if (!path || !*path) path = getenv("KRSERVE_MODEL");
    if (!path || !*path) {
        /* The default model lives beside the binary's source tree (build/krserve ->
         * models/default.gguf) so that it is found from any working directory. */
        char exe[4096];
        ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
        path = CLI_DEFAULT_MODEL;
        if (n > 0) {
            exe[n] = '\0';
            char *slash = strrchr(exe, '/');
            if (slash) *slash = '\0';
            slash = strrchr(exe, '/');
            if (slash) *slash = '\0';
            snprintf(default_model_buf, sizeof default_model_buf, "%s/%s", exe, CLI_DEFAULT_MODEL);
            struct stat st;
            if (stat(default_model_buf, &st) == 0) path = default_model_buf;
        }
    }
    struct stat st;
    if (stat(path, &st) != 0) {
        fprintf(stderr,
                "krserve: model not found: %s (run `make model` to install the default Gemma 3 "
                "270M model, or pass -m FILE / set KRSERVE_MODEL)\n",
                path);
        return NULL;
    }
    return path;
}

static void usage(FILE *f)
{
    fprintf(f, "usage: krserve <command> [options]\n\ncommands:\n");
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
        fprintf(f, "  %-10s %s\n", commands[i].name, commands[i].help);
    fprintf(f, "\n`krserve <command> --help` describes each command.\n");
}

int main(int argc, char **argv)
{
    log_init_from_env();
    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    if (!strcmp(argv[1], "-h") || !strcmp(argv[1], "--help") || !strcmp(argv[1], "help")) {
        usage(stdout);
        return 0;
    }
    if (!strcmp(argv[1], "--version")) return cli_version(argc - 1, argv + 1);
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
        if (!strcmp(argv[1], commands[i].name)) return commands[i].run(argc - 1, argv + 1);
    fprintf(stderr, "krserve: unknown command '%s'\n", argv[1]);
    usage(stderr);
    return 2;
}
