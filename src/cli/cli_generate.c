/* `krserve generate`: text generation from the command line through the scheduler (the same
 * engine the server uses). One prompt streams its text as it is produced and ends with a timing
 * line; --batch FILE runs every line of FILE as its own request concurrently and prints one
 * output line per prompt, in input order. */
#include "cli/cli.h"
#include "krserve.h"
#include "engine/engine.h"
#include "model/model.h"
#include "sched/sched.h"
#include "tokenizer/tokenizer.h"
#include "util/alloc.h"
#include "util/clock.h"
#include "util/log.h"

#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct gen_opts {
    const char *model, *prompt, *batch_file, *system, *template_name;
    int chat, threads;
    const char *device;    /* NULL: $KRSERVE_DEVICE, else cpu */
    struct engine_gen gen; /* the shared fields, checked by the engine's request builder */
    struct engine_limits lim;
};

#define DEFAULT_N_PREDICT 128

static void usage(void)
{
    printf(
        "usage: krserve generate [-m MODEL] (-p PROMPT | --batch FILE) [-n N] [--temperature T]\n"
        "                        [--top-k K] [--top-p P] [--min-p P] [--repeat-penalty R]\n"
        "                        [--seed S] [--chat] [--system TEXT] [--template NAME]\n"
        "                        [--ignore-eos] [--priority P] [--threads N]\n"
        "                        [--device cpu|cuda]\n"
        "  -p PROMPT      generate a continuation, streamed as it is produced\n"
        "  --batch FILE   one prompt per line, all run concurrently; one output line each\n"
        "  --chat         wrap the prompt in the model's chat template (user message)\n"
        "  defaults: -n 128 (capped by the room left in the context), --temperature 0.8,\n"
        "  --top-p 0.95; ranges and priority names as in the HTTP and JSON-RPC APIs\n");
}

/* Tokenizes a prompt (as a chat user message when opts->chat). Caller frees *ids. */
static int make_prompt(const struct tokenizer *tok, const struct gen_opts *o, const char *text,
                       int32_t **ids, int *n)
{
    char err[256] = "";
    char *chat = NULL;
    size_t chat_len = 0, len = strlen(text), cap, got = 0;
    int rc;
    if (o->chat) {
        struct chat_message msgs[2];
        size_t nm = 0;
        if (o->system) msgs[nm++] = (struct chat_message){"system", o->system};
        msgs[nm++] = (struct chat_message){"user", text};
        if ((rc = chat_apply(tok, o->template_name, msgs, nm, 1, &chat, &chat_len, err,
                             sizeof err))) {
            fprintf(stderr, "krserve generate: chat template: %s\n", err);
            return rc;
        }
        text = chat;
        len = chat_len;
    }
    cap = len + 16;
    *ids = alloc_malloc(cap * sizeof(int32_t));
    if (!*ids) {
        alloc_free(chat);
        return KRS_ERR_NOMEM;
    }
    rc = tokenizer_encode(tok, text, len, !o->chat, o->chat, *ids, cap, &got);
    alloc_free(chat);
    if (rc) {
        alloc_free(*ids);
        *ids = NULL;
        fprintf(stderr, "krserve generate: tokenize: %s\n", krs_status_str(rc));
        return rc;
    }
    *n = (int)got;
    return KRS_OK;
}

/* The scheduler request for one prompt, through the engine's request builder. */
static int fill_request(struct sched_request *r, const struct gen_opts *o, const int32_t *ids,
                        int n)
{
    struct engine_req_error re;
    if (engine_gen_build(&o->gen, &o->lim, ids, n, "prompt", r, &re)) {
        fprintf(stderr, "krserve generate: %s\n", re.reason);
        return KRS_ERR_INVALID;
    }
    return KRS_OK;
}

static int run_single(struct sched *s, const struct tokenizer *tok, const struct gen_opts *o)
{
    int32_t *ids = NULL;
    int n = 0, rc;
    if ((rc = make_prompt(tok, o, o->prompt, &ids, &n))) return 1;
    struct sched_request r;
    if (fill_request(&r, o, ids, n)) {
        alloc_free(ids);
        return 2;
    }
    struct sched_stream *st;
    uint64_t id;
    if ((rc = sched_submit(s, &r, &st, &id))) {
        fprintf(stderr, "krserve generate: %s\n", krs_status_str(rc));
        alloc_free(ids);
        return 1;
    }
    if (!o->chat) fputs(o->prompt, stdout);
    fflush(stdout);
    struct sched_event ev;
    int status = 0;
    while (sched_stream_read(st, &ev, -1) == KRS_OK) {
        if (ev.kind == SCHED_EV_TOKEN) {
            fwrite(ev.text, 1, ev.text_len, stdout);
            fflush(stdout);
            continue;
        }
        double decode_s = (ev.total_ms - ev.ttft_ms) / 1e3;
        fprintf(stdout, "\n");
        fprintf(stderr,
                "[%s] prompt %d tokens in %.0f ms (%.1f tok/s), generated %d tokens (%.1f tok/s "
                "decode), total %.0f ms\n",
                ev.reason, ev.n_prompt_tokens, ev.ttft_ms,
                ev.ttft_ms > 0 ? ev.n_prompt_tokens / (ev.ttft_ms / 1e3) : 0.0, ev.n_gen_tokens,
                decode_s > 0 && ev.n_gen_tokens > 1 ? (ev.n_gen_tokens - 1) / decode_s : 0.0,
                ev.total_ms);
        status = ev.finish == SCHED_FINISH_ERROR;
        break;
    }
    sched_stream_release(st);
    alloc_free(ids);
    return status;
}

/* Output escaping for --batch: one line per prompt, newlines shown as \n. */
static void put_escaped(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        if (s[i] == '\n')
            fputs("\\n", stdout);
        else if (s[i] == '\\')
            fputs("\\\\", stdout);
        else
            putchar(s[i]);
    }
}

static int run_batch(struct sched *s, const struct tokenizer *tok, const struct gen_opts *o)
{
    FILE *f = fopen(o->batch_file, "r");
    if (!f) {
        perror(o->batch_file);
        return 1;
    }
    enum { MAX_PROMPTS = 1024 };
    struct item {
        int32_t *ids;
        struct sched_stream *st;
        char *text;
        size_t len, cap;
        int ok;
    } *items = alloc_calloc(MAX_PROMPTS, sizeof *items);
    char *line = NULL;
    size_t lcap = 0;
    int n_items = 0, status = 0;
    uint64_t t0 = clock_now_ns();
    long got = 0;
    while (items && n_items < MAX_PROMPTS && (got = cli_read_line(f, &line, &lcap)) >= 0) {
        while (got > 0 && (line[got - 1] == '\n' || line[got - 1] == '\r')) line[--got] = '\0';
        if (got == 0) continue;
        struct item *it = &items[n_items++];
        int n;
        if (make_prompt(tok, o, line, &it->ids, &n)) continue;
        struct sched_request r;
        if (fill_request(&r, o, it->ids, n)) continue; /* reported; its line says <error> */
        uint64_t id;
        int rc = sched_submit(s, &r, &it->st, &id);
        if (rc) fprintf(stderr, "prompt %d: %s\n", n_items, krs_status_str(rc));
    }
    alloc_free(line);
    fclose(f);
    if (!items) {
        fprintf(stderr, "krserve generate: out of memory\n");
        return 1;
    }
    if (got == -2) { /* the prompts read so far still run and print */
        fprintf(stderr, "krserve generate: out of memory reading %s; later lines skipped\n",
                o->batch_file);
        status = 1;
    }
    int total_tokens = 0;
    for (int i = 0; i < n_items; i++) {
        struct item *it = &items[i];
        struct sched_event ev;
        while (it->st && sched_stream_read(it->st, &ev, -1) == KRS_OK) {
            if (ev.kind == SCHED_EV_FINISH) {
                it->ok = ev.finish == SCHED_FINISH_STOP || ev.finish == SCHED_FINISH_LENGTH;
                total_tokens += ev.n_gen_tokens;
                break;
            }
            if (it->len + ev.text_len + 1 > it->cap) {
                size_t cap = (it->cap + ev.text_len + 1) * 2;
                char *grown = alloc_realloc(it->text, cap);
                if (!grown) break;
                it->text = grown;
                it->cap = cap;
            }
            memcpy(it->text + it->len, ev.text, ev.text_len);
            it->len += ev.text_len;
        }
        if (it->ok)
            put_escaped(it->text ? it->text : "", it->len);
        else {
            fputs("<error>", stdout);
            status = 1;
        }
        putchar('\n');
        sched_stream_release(it->st);
        alloc_free(it->ids);
        alloc_free(it->text);
    }
    double secs = (double)(clock_now_ns() - t0) / 1e9;
    fprintf(stderr, "%d prompts, %d tokens generated in %.2f s (%.1f tok/s aggregate)\n", n_items,
            total_tokens, secs, total_tokens / secs);
    alloc_free(items);
    return status;
}

int cli_generate(int argc, char **argv)
{
    static const struct option opts[] = {
        {"model", required_argument, 0, 'm'},
        {"prompt", required_argument, 0, 'p'},
        {"n-predict", required_argument, 0, 'n'},
        {"temperature", required_argument, 0, 't'},
        {"top-k", required_argument, 0, 'k'},
        {"top-p", required_argument, 0, 'P'},
        {"min-p", required_argument, 0, 'M'},
        {"repeat-penalty", required_argument, 0, 'r'},
        {"seed", required_argument, 0, 's'},
        {"chat", no_argument, 0, 'c'},
        {"system", required_argument, 0, 'S'},
        {"template", required_argument, 0, 'T'},
        {"batch", required_argument, 0, 'b'},
        {"threads", required_argument, 0, 'j'},
        {"device", required_argument, 0, 'D'},
        {"ignore-eos", no_argument, 0, 'e'},
        {"priority", required_argument, 0, 'y'},
        {"help", no_argument, 0, 'h'},
        {0, 0, 0, 0},
    };
    struct gen_opts o = {0};
    engine_gen_init(&o.gen);
    struct sampler_params *smp = &o.gen.sampling;
    smp->temperature = 0.8f;
    smp->top_p = 0.95f;
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "m:p:n:t:k:s:b:j:h", opts, NULL)) != -1) {
        switch (c) {
        case 'm':
            o.model = optarg;
            break;
        case 'p':
            o.prompt = optarg;
            break;
        case 'n': {
            char *end = NULL;
            long v = strtol(optarg, &end, 10);
            if (!*optarg || *end || v < 1 || v > 1000000000L) {
                fprintf(stderr, "krserve generate: -n must be an integer > 0\n");
                return 2;
            }
            o.gen.max_tokens = (int)v;
        } break;
        case 't':
            smp->temperature = strtof(optarg, NULL);
            break;
        case 'k':
            smp->top_k = atoi(optarg);
            break;
        case 'P':
            smp->top_p = strtof(optarg, NULL);
            break;
        case 'M':
            smp->min_p = strtof(optarg, NULL);
            break;
        case 'r':
            smp->repetition_penalty = strtof(optarg, NULL);
            break;
        case 's':
            smp->seed = strtoull(optarg, NULL, 10);
            o.gen.has_seed = 1;
            break;
        case 'c':
            o.chat = 1;
            break;
        case 'S':
            o.system = optarg;
            break;
        case 'T':
            o.template_name = optarg;
            break;
        case 'b':
            o.batch_file = optarg;
            break;
        case 'j':
            o.threads = atoi(optarg);
            break;
        case 'D':
            o.device = optarg;
            break;
        case 'e':
            o.gen.ignore_eos = 1;
            break;
        case 'y':
            if (engine_parse_priority(optarg, &o.gen.priority)) {
                fprintf(stderr, "krserve generate: --priority must be urgent, default or "
                                "background (or high, normal, low)\n");
                return 2;
            }
            break;
        case 'h':
            usage();
            return 0;
        default:
            usage();
            return 2;
        }
    }
    struct engine_req_error re;
    if (!o.prompt == !o.batch_file) {
        fprintf(stderr, "krserve generate: give exactly one of -p PROMPT or --batch FILE\n");
        return 2;
    }
    if (engine_gen_check(&o.gen, &re)) {
        fprintf(stderr, "krserve generate: %s\n", re.reason);
        return 2;
    }
    const char *path = cli_model_path(o.model);
    if (!path) return 1;
    struct model *m = NULL;
    struct tokenizer *tok = NULL;
    struct sched *s = NULL;
    char err[256] = "";
    int status = 1;
    if (model_load(path, &m, err, sizeof err) ||
        tokenizer_load(model_gguf(m), &tok, err, sizeof err)) {
        fprintf(stderr, "krserve: %s: %s\n", path, err);
        goto out;
    }
    struct krs_config cfg;
    config_defaults(&cfg);
    struct sched_params sp;
    engine_sched_params(&cfg, &sp);
    sp.n_threads = o.threads;
    if (!o.device) o.device = getenv("KRSERVE_DEVICE");
    if (o.device) snprintf(sp.device, sizeof sp.device, "%s", o.device);
    sp.kv_tokens = 8192;
    sp.max_queue = 1024;
    if (sched_create(m, tok, &sp, NULL, &s, err, sizeof err)) {
        fprintf(stderr, "krserve: %s\n", err);
        goto out;
    }
    engine_limits_of(s, tok, NULL, &o.lim);
    o.lim.default_max_tokens = DEFAULT_N_PREDICT;
    status = o.batch_file ? run_batch(s, tok, &o) : run_single(s, tok, &o);
out:
    sched_destroy(s);
    tokenizer_free(tok);
    model_free(m);
    return status;
}
