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
 * A request that has waited the controller's late_wait_ms in the queue is admitted against the
 * late limits (controller_late_admit_limit, controller_late_prefill_budget: the step P99 may
 * then reach late_p99_factor * target), and a step carrying the prompt of a request whose
 * first token is that late sizes its prompt chunks against the late budget: a request in the
 * queue makes no progress at all, a stream slowed by half still does.
 *
 * Engine thread only; reads the running table, allocates nothing. */
#include "sched/sched_impl.h"

int sched_prefill_budget(const struct sched *s, int n_decode, int max_tokens, int late)
{
    if (max_tokens <= 0) return 0;
    if (s->mode != SCHED_MODE_AUTO) return max_tokens;
    if (late)
        return (int)controller_late_prefill_budget(&s->ctrl, (uint32_t)n_decode,
                                                   (uint32_t)max_tokens);
    return (int)controller_prefill_budget(&s->ctrl, (uint32_t)n_decode, (uint32_t)max_tokens);
}

int sched_is_late(const struct sched *s, const struct req *r, uint64_t now)
{
    return s->mode == SCHED_MODE_AUTO && !r->t_first &&
           now - r->t_submit >= controller_late_wait_ns(&s->ctrl);
}

int sched_prompt_late(const struct sched *s, uint64_t now)
{
    for (int i = 0; i < s->p.max_running; i++) {
        const struct req *r = s->running[i];
        if (r && r->n_prompt + r->n_gen - r->n_past > 1 && sched_is_late(s, r, now)) return 1;
    }
    return 0;
}

void admit_budget_init(const struct sched *s, struct admit_budget *b, uint64_t now)
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
    const int max_tokens = s->p.max_batch_tokens - n_decode;
    b->now = now;
    b->prefill_left = sched_prefill_budget(s, n_decode, max_tokens, 0) - pending_prompt;
    b->late_prefill_left = sched_prefill_budget(s, n_decode, max_tokens, 1) - pending_prompt;
    b->max_running = sched_admit_limit(s);
    b->late_max_running = b->max_running;
    if (s->mode == SCHED_MODE_AUTO) {
        uint32_t late = controller_late_admit_limit(&s->ctrl);
        if (late > (uint32_t)s->p.max_running) late = (uint32_t)s->p.max_running;
        if ((int)late > b->late_max_running) b->late_max_running = (int)late;
    }
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
    const int late = sched_is_late(s, r, b->now);
    if (s->n_running >= (late ? b->late_max_running : b->max_running)) return 0;
    if ((late ? b->late_prefill_left : b->prefill_left) <= 0) return 0;
    int pending = r->n_prompt + r->n_gen - r->n_past;
    b->prefill_left -= pending;
    b->late_prefill_left -= pending;
    b->past_limit = s->n_running >= b->max_running || b->prefill_left + pending <= 0;
    return 1;
}

int sched_late_running(const struct sched *s)
{
    int n = 0;
    for (int i = 0; i < s->p.max_running; i++)
        if (s->running[i] && s->running[i]->late_admit) n++;
    int over = s->n_running - s->limit;
    return over <= 0 ? 0 : n < over ? n : over;
}
