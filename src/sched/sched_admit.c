/* Admission and prompt-chunk policy of the engine thread.
 *
 * A queued request starts when the engine can take it, not when a tuning window allows it: it
 * is admitted as soon as a KV slot is free, its first chunk's KV blocks fit (checked by the
 * caller) and its prompt can start in the next step, i.e. the step's prefill budget is not
 * already spent on prompts that are running. The batch limit (the controller's in auto mode)
 * bounds how many sequences run at once; in auto mode that limit sits at what the engine can
 * take without breaking the step-latency target (controller.h), so it only makes requests wait
 * when the engine is saturated.
 *
 * The prefill budget of a step is the controller's (auto mode): the prompt tokens that fit
 * next to the running decodes under the step-latency target, so that a long prompt arriving
 * does not stretch every stream's inter-token gap; in fixed and off modes it is the whole
 * token budget (model.maxBatchTokens), as before.
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
}

int admit_room(const struct sched *s, const struct req *r, struct admit_budget *b)
{
    if (s->n_running >= s->limit || b->prefill_left <= 0) return 0;
    int pending = r->n_prompt + r->n_gen - r->n_past;
    b->prefill_left -= pending;
    return 1;
}
