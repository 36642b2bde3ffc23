/* Admission and prompt-chunk policy of the engine thread.
 *
 * A queued request starts when the engine can take it, not when a tuning window allows it: it
 * is admitted as soon as a KV slot is free, its first chunk's KV blocks fit (checked by the
 * caller), its prompt can start in the next step (the step's prefill budget is not already
 * spent on prompts that are running) and the engine is not saturated. In auto mode the last is
 * controller_admit_limit: while the step latency is within target it is what the controller's
 * step-time model says the engine can take (before anything was measured, max_batch), so a
 * burst at low load starts prefilling at once; once the windows run over target it is the
 * batch limit, which then governs decode concurrency. In fixed and off modes the batch limit is
 * the fixed size, as configured. Priorities, aging and preemption are the caller's (admit in
 * sched.c) and do not change.
 *
 * The prefill budget of a step is the controller's (auto mode): the prompt tokens that fit
 * next to the running decodes under the step-latency target, so that a long prompt arriving
 * does not stretch every stream's inter-token gap, and the whole token budget when nothing is
 * decoding; in fixed and off modes it is the whole token budget (model.maxBatchTokens).
 *
 * Engine thread only; reads the running table, allocates nothing. */
#include "sched/sched_impl.h"

int sched_prefill_budget(const struct sched *s, int n_decode, int max_tokens)
{
    if (max_tokens <= 0) return 0;
    if (s->mode != SCHED_MODE_AUTO) return max_tokens;
    return (int)controller_prefill_budget(&s->ctrl, (uint32_t)n_decode, (uint32_t)max_tokens);
}

void admit_budget_init(const struct sched *s, struct admit_budget *b)
{
    int n_decode = 0, pending_prompt = 0;
    for (int i = 0; i < s->p.max_running; i++) {
        const struct req *r = s->running[i];
        if (!r) continue;
        int pending = r->n_prompt + r->n_gen - r->n_past;
        if (pending == 1)
            n_decode++;
        else if (pending > 1)
            pending_prompt += pending;
    }
    int budget = sched_prefill_budget(s, n_decode, s->p.max_batch_tokens - n_decode);
    b->prefill_left = budget - pending_prompt;
    b->max_running = sched_admit_limit(s);
}

int sched_admit_limit(const struct sched *s)
{
    if (s->mode != SCHED_MODE_AUTO) return s->limit;
    uint32_t lim = controller_admit_limit(&s->ctrl);
    if (lim < (uint32_t)s->limit) lim = (uint32_t)s->limit;
    return lim < (uint32_t)s->p.max_running ? (int)lim : s->p.max_running;
}

int admit_room(const struct sched *s, const struct req *r, struct admit_budget *b)
{
    if (s->n_running >= b->max_running || b->prefill_left <= 0) return 0;
    int pending = r->n_prompt + r->n_gen - r->n_past;
    b->prefill_left -= pending;
    return 1;
}
