/* `krserve eval-logits`: runs the model on explicit token ids and dumps raw logits or greedy
 * continuations. A developer tool and the C side of the model-oracle tests. */
#include "cli/cli.h"
#include "krserve.h"
#include "kv/kv.h"
#include "model/model.h"
#include "util/alloc.h"

#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int parse_ids(const char *s, int32_t **out, int *n)
{
    int cap = 16, len = 0;
    int32_t *ids = alloc_malloc((size_t)cap * sizeof *ids);
    if (!ids) return KRS_ERR_NOMEM;
    while (*s) {
        char *end;
        long v = strtol(s, &end, 10);
        if (end == s || v < 0 || v > INT32_MAX) {
            alloc_free(ids);
            return KRS_ERR_INVALID;
        }
        if (len == cap) {
            cap *= 2;
            int32_t *grown = alloc_realloc(ids, (size_t)cap * sizeof *ids);
            if (!grown) {
                alloc_free(ids);
                return KRS_ERR_NOMEM;
            }
            ids = grown;
        }
        ids[len++] = (int32_t)v;
        s = end;
        while (*s == ',' || *s == ' ') s++;
    }
    *out = ids;
    *n = len;
    return len ? KRS_OK : KRS_ERR_INVALID;
}

static int argmax(const float *x, int n)
{
    int best = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[best]) best = i;
    return best;
}

/* Feeds tokens[0..n) at positions start.. in chunks; logits rows for every position when
 * `all`, else only for the last; rows are written to `sink` (file) or kept in *last. */
static int run_tokens(struct model_ctx *ctx, const int32_t *tokens, int n, int start, int all,
                      FILE *sink, int n_vocab, int *greedy_next)
{
    int chunk = model_ctx_max_batch_tokens(ctx);
    if (all && chunk > 64) chunk = 64; /* max_logits rows per forward */
    int32_t pos[512], seq[512];
    uint8_t want[512];
    for (int off = 0; off < n; off += chunk) {
        int T = n - off < chunk ? n - off : chunk;
        for (int t = 0; t < T; t++) {
            pos[t] = start + off + t;
            seq[t] = 0;
            want[t] = all || off + t == n - 1;
        }
        int rc = kv_seq_reserve(model_ctx_kv(ctx), 0, start + off, start + off + T);
        if (rc) return rc;
        struct model_batch b = {T, tokens + off, pos, seq, want};
        const float *logits;
        int n_out;
        if ((rc = model_forward(ctx, &b, &logits, &n_out))) return rc;
        kv_seq_trim(model_ctx_kv(ctx), 0, start + off + T);
        if (sink &&
            fwrite(logits, sizeof(float) * (size_t)n_vocab, (size_t)n_out, sink) != (size_t)n_out)
            return KRS_ERR_IO;
        if (n_out > 0) *greedy_next = argmax(logits + (size_t)(n_out - 1) * n_vocab, n_vocab);
    }
    return KRS_OK;
}

int cli_eval(int argc, char **argv)
{
    static const struct option opts[] = {
        {"model", required_argument, 0, 'm'},
        {"tokens", required_argument, 0, 't'},
        {"out", required_argument, 0, 'o'},
        {"all", no_argument, 0, 'a'},
        {"greedy", required_argument, 0, 'g'},
        {"threads", required_argument, 0, 'j'},
        {"device", required_argument, 0, 'D'},
        {"help", no_argument, 0, 'h'},
        {0, 0, 0, 0},
    };
    const char *model_arg = NULL, *tokens_arg = NULL, *out_path = NULL;
    const char *device = getenv("KRSERVE_DEVICE"); /* --device overrides */
    int all = 0, greedy = 0, threads = 0, c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "m:t:o:ag:j:h", opts, NULL)) != -1) {
        switch (c) {
        case 'm':
            model_arg = optarg;
            break;
        case 't':
            tokens_arg = optarg;
            break;
        case 'o':
            out_path = optarg;
            break;
        case 'a':
            all = 1;
            break;
        case 'g':
            greedy = atoi(optarg);
            break;
        case 'j':
            threads = atoi(optarg);
            break;
        case 'D':
            device = optarg;
            break;
        case 'h':
            printf("usage: krserve eval-logits [-m MODEL] --tokens ID,ID,... [--out FILE [--all]] "
                   "[--greedy N] [--threads N] [--device cpu|cuda]\n"
                   "  --out FILE  raw float32 logits [rows, n_vocab]: every position with --all, "
                   "else the last\n"
                   "  --greedy N  print N greedy continuation ids, comma-separated\n");
            return 0;
        default:
            return 2;
        }
    }
    if (!tokens_arg) {
        fprintf(stderr, "krserve eval-logits: --tokens is required\n");
        return 2;
    }
    const char *path = cli_model_path(model_arg);
    if (!path) return 1;
    int32_t *tokens = NULL;
    int n = 0, rc, status = 1;
    struct model *m = NULL;
    struct model_ctx *ctx = NULL;
    FILE *sink = NULL;
    char err[256] = "";
    if ((rc = parse_ids(tokens_arg, &tokens, &n))) {
        fprintf(stderr, "krserve eval-logits: --tokens: expected comma-separated ids\n");
        goto out;
    }
    if ((rc = model_load(path, &m, err, sizeof err))) {
        fprintf(stderr, "krserve: %s: %s\n", path, err);
        goto out;
    }
    const struct model_hparams *hp = model_hparams(m);
    struct model_ctx_params cp = {
        .max_batch_tokens = 256,
        .max_seqs = 1,
        .max_logits = 64,
        .kv_tokens = n + greedy + 16,
        .max_ctx = n + greedy + 16,
        .n_threads = threads,
        .device = device,
    };
    if ((rc = model_ctx_create(m, &cp, &ctx, err, sizeof err))) {
        fprintf(stderr, "krserve: %s\n", err);
        goto out;
    }
    if (out_path && !(sink = fopen(out_path, "wb"))) {
        perror(out_path);
        goto out;
    }
    int next = 0;
    if ((rc = run_tokens(ctx, tokens, n, 0, all, sink, hp->n_vocab, &next))) {
        fprintf(stderr, "krserve eval-logits: forward failed: %s\n", krs_status_str(rc));
        goto out;
    }
    for (int i = 0; i < greedy; i++) {
        printf(i ? ",%d" : "%d", next);
        int32_t tok = next;
        if ((rc = run_tokens(ctx, &tok, 1, n + i, 0, NULL, hp->n_vocab, &next))) {
            fprintf(stderr, "\nkrserve eval-logits: forward failed: %s\n", krs_status_str(rc));
            goto out;
        }
    }
    if (greedy) printf("\n");
    status = 0;
out:
    if (sink && fclose(sink) && status == 0) status = 1;
    model_ctx_free(ctx);
    model_free(m);
    alloc_free(tokens);
    return status;
}
