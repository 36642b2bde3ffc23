/* Request coalescing for the prefix cache: a request whose prompt shares whole blocks with what
 * a running request is still computing waits for those blocks to be published instead of
 * computing them a second time. Sixteen clients that open with the same system prompt at once
 * then cost one prefill of it, and the n choices of one prompt (OpenAI `n`) share its blocks.
 *
 * The wait is bounded by the leader's progress: a running request computes prompt chunks every
 * step, and its blocks are published at the end of the step that completes them
 * (kv_seq_commit). A leader that is preempted or finishes stops being a reason to wait. Engine
 * thread only, like everything that reads the running set. */
#include "sched/sched_impl.h"

#include "kv/kv.h"

/* Tokens r and p agree on from the start, looking at no more than n. */
static int common_prefix(const int32_t *a, const int32_t *b, int n)
{
    int i = 0;
    while (i < n && a[i] == b[i]) i++;
    return i;
}

int sched_prefix_should_wait(const struct sched *s, const struct req *r, int64_t cached)
{
    if (!s->p.prefix_cache) return 0;
    const int bs = kv_block_size(model_ctx_kv(s->ctx));
    /* Like kv_seq_attach_prefix: never the block of r's last token. */
    const int usable = (r->n_prompt + r->n_gen - 1) / bs * bs;
    if (usable < cached + bs) return 0;
    for (int i = 0; i < s->p.max_running; i++) {
        const struct req *p = s->running[i];
        if (!p || p == r) continue;
        int p_total = p->n_prompt + p->n_gen;
        if (p->n_past >= p_total) continue;
        int n = usable < p_total ? usable : p_total;
        int gain = common_prefix(r->tokens, p->tokens, n) / bs * bs;
        if (gain >= cached + bs && p->n_past < gain) return 1;
    }
    return 0;
}
