/* Warm-up: throwaway steps of the shapes serving will run, before the server says it is ready.
 *
 * On a GPU the first step of a new shape pays one-time costs: the CUDA runtime loads kernels
 * lazily on first launch, and cuBLAS picks and loads a kernel per problem size. On the H200 a
 * fresh server's first 29-token prompt took 114 ms to its first token and its repeat 4 ms
 * (bench/gpu/ttft_probe.py), so without this the first users of each prompt length wait for
 * it. The ladder walks prompt lengths from 1 to the step's token budget in steps of about an
 * eighth (the libraries choose kernels by size class, not by exact size) and decode batches
 * from 1 to the sequence slots; each shape runs once, the KV it wrote is released uncommitted
 * (nothing enters the prefix cache). The CPU backend loads nothing lazily: no warm-up there. */
#include "model/model_impl.h"

#include "backend/backend.h"
#include "krserve.h"
#include "kv/kv.h"
#include "util/alloc.h"
#include "util/log.h"
#include "util/clock.h"

#include <string.h>

static int next_size(int n)
{
    int step = n / 8;
    return n + (step > 1 ? step : 1);
}

/* One step of n tokens: a prompt of n tokens on slot 0 (prompt = 1) or one token on each of
 * slots 0..n-1 (decode), logits for the last prompt token or for every decode token. */
struct warm_buf {
    int32_t *tok, *pos, *seq;        /* [max_tokens] */
    uint8_t *want;                   /* [max_tokens] */
    struct backend_sample_row *rows; /* [max_tokens] */
};

static int warm_step(struct model_ctx *c, const struct warm_buf *w, int n, int prompt)
{
    const int32_t n_vocab = c->m->hp.n_vocab;
    int32_t *tok = w->tok, *pos = w->pos, *seq = w->seq;
    uint8_t *want = w->want;
    int rc = KRS_OK;
    for (int i = 0; i < n; i++) {
        tok[i] = (int32_t)((7919ll * (i + 1)) % n_vocab);
        pos[i] = prompt ? i : 0;
        seq[i] = prompt ? 0 : i;
        want[i] = !prompt || i == n - 1;
    }
    for (int s = 0; s < (prompt ? 1 : n); s++)
        if ((rc = kv_seq_reserve(c->kv, s, 0, prompt ? n : 1))) goto out;
    struct model_batch b = {n, tok, pos, seq, want};
    const float *logits;
    int n_out;
    if (model_ctx_samples_on_device(c)) {
        const int rows = prompt ? 1 : n;
        for (int r = 0; r < rows; r++) w->rows[r] = (struct backend_sample_row){.top_p = 1};
        const int32_t *ids;
        rc = model_forward_sampled(c, &b, w->rows, NULL, 0, NULL, &ids, &logits, &n_out);
    } else {
        rc = model_forward(c, &b, &logits, &n_out);
    }
out:
    for (int s = 0; s < (prompt ? 1 : n); s++) kv_seq_release(c->kv, s);
    return rc;
}

int model_ctx_warmup(struct model_ctx *c)
{
    if (!strcmp(model_ctx_backend_name(c), "cpu")) return KRS_OK;
    const uint64_t t0 = clock_now_ns();
    int steps = 0, rc = KRS_ERR_NOMEM;
    const size_t n = (size_t)c->max_tokens;
    struct warm_buf w = {alloc_calloc(n, sizeof(int32_t)), alloc_calloc(n, sizeof(int32_t)),
                         alloc_calloc(n, sizeof(int32_t)), alloc_calloc(n, 1),
                         alloc_calloc(n, sizeof(struct backend_sample_row))};
    /* injected forward faults ($KRSERVE_FAULT_FORWARD_AFTER) count serving's forwards only */
    const int64_t fault_after = c->fault_after;
    c->fault_after = -1;
    if (!w.tok || !w.pos || !w.seq || !w.want || !w.rows) goto out;
    const int max_prompt = c->max_tokens < c->max_ctx ? c->max_tokens : c->max_ctx;
    for (int t = 1; t <= max_prompt; t = next_size(t), steps++) {
        /* a pool too small for this length (KRS_ERR_AGAIN) ends the ladder, not the load */
        if ((rc = warm_step(c, &w, t, 1)) == KRS_ERR_AGAIN) break;
        if (rc) goto out;
    }
    const int max_decode = c->max_seqs < c->max_logits ? c->max_seqs : c->max_logits;
    for (int t = 1; t <= max_decode && t <= c->max_tokens; t = next_size(t), steps++) {
        if ((rc = warm_step(c, &w, t, 0)) == KRS_ERR_AGAIN) break;
        if (rc) goto out;
    }
    rc = KRS_OK;
    KRS_LOG_INFOF("warm-up: %d step shapes on %s in %.0f ms", steps, model_ctx_backend_name(c),
                  (double)(clock_now_ns() - t0) / 1e6);
out:
    c->fault_after = fault_after;
    if (rc) KRS_LOG_ERRORF("warm-up failed: %s", krs_status_str(rc));
    alloc_free(w.tok);
    alloc_free(w.pos);
    alloc_free(w.seq);
    alloc_free(w.want);
    alloc_free(w.rows);
    return rc;
}
