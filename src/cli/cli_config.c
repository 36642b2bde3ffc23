/* `krserve config --print|--json [--config FILE] [flags...]`: loads the configuration exactly as
 * the server does (defaults < file < env < flags) and prints the effective values with where
 * each came from. Exit 0 on a valid configuration, 1 with the error on an invalid one, 2 on a
 * usage error. */
#include "cli/cli.h"
#include "config/config.h"
#include "krserve.h"
#include "util/alloc.h"

#include <stdio.h>
#include <string.h>

static void config_usage(FILE *f)
{
    fprintf(f, "usage: krserve config --print|--json [--config FILE] [flags...]\n\n"
               "Shows the effective configuration and the source of every value.\n"
               "flags: --config FILE, --set key.path=value");
    for (size_t i = 0; i < config_key_count(); i++) {
        const struct config_key *k = config_key_at(i);
        if (k->flag)
            fprintf(f, ", %s%s%s (%s)", k->short_flag ? k->short_flag : "",
                    k->short_flag ? "/" : "", k->flag, k->name);
    }
    fprintf(f, "\nprecedence: flags > environment > file > defaults\n");
}

int cli_config(int argc, char **argv)
{
    int mode = 0; /* 1 = text, 2 = JSON */
    int rc = 2, n_rest = 0;
    char err[1024];
    struct krs_config cfg;
    char **rest = alloc_calloc((size_t)argc + 1, sizeof *rest);
    if (!rest) return 1;
    config_defaults(&cfg);
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "-h") || !strcmp(argv[i], "--help")) {
            config_usage(stdout);
            rc = 0;
            goto out;
        }
    }

    if (config_load(&cfg, NULL, NULL, argc - 1, argv + 1, rest, &n_rest, err, sizeof err)) {
        fprintf(stderr, "krserve config: %s\n", err);
        rc = 1;
        goto out;
    }
    for (int i = 0; i < n_rest; i++) {
        if (!strcmp(rest[i], "--print")) {
            mode = 1;
        } else if (!strcmp(rest[i], "--json")) {
            mode = 2;
        } else {
            fprintf(stderr, "krserve config: unknown option '%s'\n", rest[i]);
            config_usage(stderr);
            goto out;
        }
    }
    if (!mode) {
        config_usage(stderr);
        goto out;
    }
    if (mode == 1) {
        config_dump(&cfg, stdout);
    } else {
        cJSON *j = NULL;
        char *text = NULL;
        if (config_to_json(&cfg, true, &j) || !(text = cJSON_Print(j))) {
            cJSON_Delete(j);
            fprintf(stderr, "krserve config: out of memory\n");
            rc = 1;
            goto out;
        }
        printf("%s\n", text);
        cJSON_free(text);
        cJSON_Delete(j);
    }
    rc = 0;
out:
    config_free(&cfg);
    alloc_free(rest);
    return rc;
}
