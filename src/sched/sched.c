/* The engine thread and the scheduler API around it.
 *
 * Only the engine thread touches the model context, the KV cache, the sampler scratch and the
 * priority queues. Other threads reach it through the inbox (submit, mode changes, drain) and
 * the registry (cancel by id, listing), each under its own mutex, and read its published
 * state under state_lock. Requests are allocated by the submitting thread and freed by the
 * engine when they finish; nothing is allocated inside a step. */
#include "sched/sched_impl.h"

#include "backend/backend.h"
#include "krserve.h"
#include "kv/kv.h"
#include "metrics/metrics.h"
#include "model/model.h"
#include "util/alloc.h"
#include "util/clock.h"
#include "util/log.h"
#include "util/threadpool.h"

#include <math.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define BACKGROUND_AGING_NS                                                                        \
    (2000ull * 1000000ull) /* background waits at most ~2 s behind default */
#define IDLE_WAIT_MS 100   /* heartbeat period while idle */

static const char *const mode_names[] = {"auto", "fixed", "off"};
static const char *const prio_names[] = {"urgent", "default", "background"};
static const char *const finish_names[] = {"none", "stop", "length", "cancelled", "error"};

const char *sched_mode_name(enum sched_mode m)
{
    return (unsigned)m < 3 ? mode_names[m] : "?";
}

const char *sched_priority_name(enum sched_priority p)
{
    return (unsigned)p < 3 ? prio_names[p] : "?";
}

const char *sched_finish_name(enum sched_finish f)
{
    return (unsigned)f < 5 ? finish_names[f] : "?";
}

int sched_parse_mode(const char *s, enum sched_mode *out)
{
    if (!strcmp(s, "on")) s = "auto";
    for (int i = 0; i < 3; i++)
        if (!strcmp(s, mode_names[i])) {
            *out = (enum sched_mode)i;
            return KRS_OK;
        }
    return KRS_ERR_INVALID;
}

int sched_parse_priority(const char *s, enum sched_priority *out)
{
    for (int i = 0; i < 3; i++)
        if (!strcmp(s, prio_names[i])) {
            *out = (enum sched_priority)i;
            return KRS_OK;
        }
    return KRS_ERR_INVALID;
}

void sched_params_default(struct sched_params *p)
{
    memset(p, 0, sizeof *p);
    p->max_running = 32;
    p->max_queue = 256;
    p->max_batch_tokens = 512;
    p->kv_tokens = 16384;
    snprintf(p->device, sizeof p->device, "cpu");
    p->mode = SCHED_MODE_AUTO;
    p->fixed_batch = 4;
    p->auto_min_batch = 1;
    p->auto_max_batch = 32;
    p->ema_alpha = 0.3;
    p->tune_interval = 10;
    p->late_wait_ms = 100.0;
    p->late_p99_factor = 2.0;
    p->p99_target_ms = 100.0;
    p->adaptive_window = 1;
    p->window_min_ms = 0.75;
    p->window_max_ms = 3.0;
    p->stream_capacity = 256;
    p->background_aging_ms = 2000;
    p->prefix_cache = 1;
    p->dedup = 0;
}

static enum metrics_sched_mode metrics_mode(enum sched_mode m)
{
    return m == SCHED_MODE_OFF     ? METRICS_MODE_OFF
           : m == SCHED_MODE_FIXED ? METRICS_MODE_FIXED
                                   : METRICS_MODE_ON;
}

/* ---- requests ------------------------------------------------------------------------- */

static void req_free(struct req *r)
{
    if (!r) return;
    alloc_free(r->tokens);
    alloc_free(r->bias);
    alloc_free(r->stop_ids);
    grammar_matcher_free(r->gm);
    grammar_release(r->grammar);
    alloc_free(r);
}

static uint64_t random_seed(uint64_t id)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return ((uint64_t)ts.tv_nsec << 20) ^ (uint64_t)ts.tv_sec ^ (id * 0x9E3779B97F4A7C15ull);
}

/* The model's token texts for grammar matchers, built once on first use (any thread). */
static int grammar_vocab(struct sched *s, const struct grammar_vocab **out)
{
    int rc = KRS_OK;
    pthread_mutex_lock(&s->gvocab_lock);
    if (!s->gvocab) rc = grammar_vocab_create(s->tok, &s->gvocab);
    *out = s->gvocab;
    pthread_mutex_unlock(&s->gvocab_lock);
    return rc;
}

static int req_create(struct sched *s, const struct sched_request *in, uint64_t id,
                      struct req **out)
{
    *out = NULL;
    int max_ctx = model_ctx_max_ctx(s->ctx);
    if (!in->prompt || in->n_prompt <= 0 || in->max_tokens <= 0 || in->n_stop < 0 ||
        in->n_stop > SCHED_MAX_STOP || in->n_stop_ids < 0 || (unsigned)in->priority > 2)
        return KRS_ERR_INVALID;
    /* Rejected, never shortened: the front ends check the same limit (engine_gen_build). */
    if (in->n_prompt >= max_ctx || in->max_tokens > max_ctx - in->n_prompt) return KRS_ERR_INVALID;
    struct req *r = alloc_calloc(1, sizeof *r);
    if (!r) return KRS_ERR_NOMEM;
    int rc = KRS_ERR_NOMEM;
    r->id = id;
    r->priority = in->priority;
    r->slot = -1;
    r->n_prompt = in->n_prompt;
    r->max_tokens = in->max_tokens;
    r->tokens = alloc_malloc(((size_t)r->n_prompt + (size_t)r->max_tokens) * sizeof(int32_t));
    if (!r->tokens) goto fail;
    int32_t n_vocab = (int32_t)model_hparams(s->model)->n_vocab;
    for (int i = 0; i < in->n_prompt; i++) {
        if (in->prompt[i] < 0 || in->prompt[i] >= n_vocab) {
            rc = KRS_ERR_INVALID;
            goto fail;
        }
        r->tokens[i] = in->prompt[i];
    }
    struct sampler_params sp = in->sampling;
    if (sp.n_logit_bias > 0) {
        r->bias = alloc_malloc((size_t)sp.n_logit_bias * sizeof *r->bias);
        if (!r->bias) goto fail;
        memcpy(r->bias, sp.logit_bias, (size_t)sp.n_logit_bias * sizeof *r->bias);
        sp.logit_bias = r->bias;
    }
    if (!in->has_seed) sp.seed = random_seed(id);
    if ((rc = sampler_init(&r->sampler, &sp, n_vocab))) goto fail;
    rc = KRS_ERR_NOMEM;
    if (in->n_stop_ids > 0) {
        r->stop_ids = alloc_malloc((size_t)in->n_stop_ids * sizeof(int32_t));
        if (!r->stop_ids) goto fail;
        memcpy(r->stop_ids, in->stop_ids, (size_t)in->n_stop_ids * sizeof(int32_t));
        r->n_stop_ids = in->n_stop_ids;
    }
    if ((rc = stop_matcher_init(&r->stop, in->stop, in->n_stop))) goto fail;
    if (in->grammar) {
        const struct grammar_vocab *gv = NULL;
        if ((rc = grammar_vocab(s, &gv)) || (rc = grammar_matcher_create(in->grammar, gv, &r->gm)))
            goto fail;
        r->grammar = grammar_retain(in->grammar);
    }
    tokenizer_detok_init(&r->detok, 0);
    r->ignore_eos = in->ignore_eos;
    r->dedup_hash = sched_dedup_hash(s, r, in->has_seed);
    r->t_submit = clock_now_ns();
    r->deadline = in->timeout_ms ? r->t_submit + in->timeout_ms * 1000000ull : 0;
    if ((rc = stream_create(s->p.stream_capacity, id, &r->stream))) goto fail;
    *out = r;
    return KRS_OK;
fail:
    req_free(r);
    return rc;
}

/* ---- registry ------------------------------------------------------------------------- */

static int registry_add(struct sched *s, struct req *r)
{
    pthread_mutex_lock(&s->reg_lock);
    int rc = KRS_ERR_FULL;
    if (s->n_live < s->max_live) {
        s->live[s->n_live++] = r;
        rc = KRS_OK;
    }
    pthread_mutex_unlock(&s->reg_lock);
    return rc;
}

static void registry_remove(struct sched *s, struct req *r)
{
    pthread_mutex_lock(&s->reg_lock);
    for (int i = 0; i < s->n_live; i++)
        if (s->live[i] == r) {
            s->live[i] = s->live[--s->n_live];
            break;
        }
    pthread_mutex_unlock(&s->reg_lock);
}

/* ---- queues (engine thread) ----------------------------------------------------------- */

static void queue_push(struct sched *s, struct req *r, int front)
{
    int q = r->priority;
    __atomic_store_n(&r->state, REQ_QUEUED, __ATOMIC_RELAXED);
    if (front) {
        r->next = s->q_head[q];
        s->q_head[q] = r;
        if (!s->q_tail[q]) s->q_tail[q] = r;
    } else {
        r->next = NULL;
        if (s->q_tail[q])
            s->q_tail[q]->next = r;
        else
            s->q_head[q] = r;
        s->q_tail[q] = r;
    }
    s->q_len[q]++;
}

static struct req *queue_pop(struct sched *s, int q)
{
    struct req *r = s->q_head[q];
    if (!r) return NULL;
    s->q_head[q] = r->next;
    if (!s->q_head[q]) s->q_tail[q] = NULL;
    r->next = NULL;
    s->q_len[q]--;
    return r;
}

static void queue_remove(struct sched *s, struct req *r)
{
    int q = r->priority;
    struct req **pp = &s->q_head[q], *prev = NULL;
    while (*pp && *pp != r) {
        prev = *pp;
        pp = &(*pp)->next;
    }
    if (!*pp) return;
    *pp = r->next;
    if (s->q_tail[q] == r) s->q_tail[q] = prev;
    r->next = NULL;
    s->q_len[q]--;
}

/* The queue the next admission comes from: urgent first, then default, then background —
 * except that a background request that has waited background_aging_ms competes with default
 * by submit time, so background never starves. */
static int queue_pick(struct sched *s, uint64_t now)
{
    const uint64_t aging_ns = (uint64_t)s->p.background_aging_ms * 1000000u;
    if (s->q_head[SCHED_PRIO_URGENT]) return SCHED_PRIO_URGENT;
    struct req *d = s->q_head[SCHED_PRIO_DEFAULT], *b = s->q_head[SCHED_PRIO_BACKGROUND];
    if (b && (!d || (now - b->t_submit >= aging_ns && b->t_submit < d->t_submit)))
        return SCHED_PRIO_BACKGROUND;
    return d ? SCHED_PRIO_DEFAULT : -1;
}

static int queued_total(const struct sched *s)
{
    return s->q_len[0] + s->q_len[1] + s->q_len[2];
}

/* ---- finishing ------------------------------------------------------------------------ */

static enum metrics_finish_reason metrics_reason(enum sched_finish f)
{
    switch (f) {
    case SCHED_FINISH_STOP:
        return METRICS_FINISH_STOP;
    case SCHED_FINISH_LENGTH:
        return METRICS_FINISH_LENGTH;
    case SCHED_FINISH_CANCELLED:
        return METRICS_FINISH_CANCELLED;
    default:
        return METRICS_FINISH_ERROR;
    }
}

static void release_slot(struct sched *s, struct req *r)
{
    if (r->slot < 0) return;
    kv_seq_release(model_ctx_kv(s->ctx), r->slot);
    s->running[r->slot] = NULL;
    s->n_running--;
    r->slot = -1;
}

/* Ends r's generation exactly once: flushes held-back text (unless cancelled/error), then ends
 * r's dedup followers and r itself with `why` (sched_end_one). r must already be out of every
 * queue. */
static void finish(struct sched *s, struct req *r, enum sched_finish why, const char *reason)
{
    uint64_t now = clock_now_ns();
    struct sched_event ev;
    if (why == SCHED_FINISH_STOP || why == SCHED_FINISH_LENGTH) {
        size_t n1 = 0, n2 = 0;
        char tail[8 + STOP_MAX_LEN];
        tokenizer_detok_flush(&r->detok, tail, sizeof tail, &n1);
        if (why != SCHED_FINISH_STOP || !r->stop.stopped) {
            /* Bytes the detokenizer held back go through the stop matcher as well. */
            size_t m = 0;
            int stopped = 0;
            char out[2 * STOP_MAX_LEN + 8];
            if (n1) stop_matcher_push(&r->stop, tail, n1, out, sizeof out, &m, &stopped);
            if (!stopped) stop_matcher_flush(&r->stop, out + m, sizeof out - m, &n2);
            if (m + n2 > 0) {
                memset(&ev, 0, sizeof ev);
                ev.kind = SCHED_EV_TOKEN;
                ev.token = -1;
                ev.text_len = (uint16_t)(m + n2);
                memcpy(ev.text, out, m + n2);
                stream_push_many(r->stream, &ev, 1); /* best effort: FINISH slot stays free */
                for (struct req *f = r->followers; f; f = f->next_follower)
                    stream_push_many(f->stream, &ev, 1);
            }
        }
    }
    for (struct req *f; (f = r->followers);) {
        sched_dedup_detach(f);
        __atomic_store_n(&f->n_gen, r->n_gen, __ATOMIC_RELAXED);
        sched_end_one(s, f, why, reason, now);
    }
    sched_end_one(s, r, why, reason, now);
}

void sched_end_one(struct sched *s, struct req *r, enum sched_finish why, const char *reason,
                   uint64_t now)
{
    struct sched_event ev;
    memset(&ev, 0, sizeof ev);
    ev.kind = SCHED_EV_FINISH;
    ev.finish = why;
    snprintf(ev.reason, sizeof ev.reason, "%s", reason ? reason : sched_finish_name(why));
    ev.n_prompt_tokens = r->n_prompt;
    ev.n_gen_tokens = r->n_gen;
    ev.n_cached_tokens = r->n_cached;
    ev.queue_ms =
        r->t_admit ? clock_ns_to_ms(r->t_admit - r->t_submit) : clock_ns_to_ms(now - r->t_submit);
    ev.ttft_ms = r->t_first ? clock_ns_to_ms(r->t_first - r->t_submit) : 0;
    ev.total_ms = clock_ns_to_ms(now - r->t_submit);
    if (s->metrics) {
        struct metrics_request_record rec = {
            .priority = (enum metrics_priority)r->priority,
            .reason = metrics_reason(why),
            .prompt_tokens = (uint32_t)r->n_prompt,
            .generated_tokens = (uint32_t)r->n_gen,
            .e2e_ns = now - r->t_submit,
        };
        metrics_record_finish(s->metrics, &rec, now);
    }
    /* Count before the reader can see FINISH, so that counters balance for anyone who has. */
    pthread_mutex_lock(&s->state_lock);
    s->pub.finished[why]++;
    pthread_mutex_unlock(&s->state_lock);
    stream_push_finish(r->stream, &ev);
    release_slot(s, r);
    registry_remove(s, r);
    KRS_LOG_DEBUGF("request %llu finished: %s (%s), %d prompt + %d generated tokens",
                   (unsigned long long)r->id, sched_finish_name(why), ev.reason, r->n_prompt,
                   r->n_gen);
    if (r->gm) {
        struct grammar_matcher_stats gs;
        grammar_matcher_get_stats(r->gm, &gs);
        KRS_LOG_DEBUGF("request %llu grammar: %llu masks (%llu cached, %llu from the shared "
                       "cache), %.2f ms computing them, %llu states, %llu flushes",
                       (unsigned long long)r->id, (unsigned long long)gs.masks,
                       (unsigned long long)gs.mask_hits, (unsigned long long)gs.mask_shared,
                       (double)gs.mask_ns / 1e6, (unsigned long long)gs.states,
                       (unsigned long long)gs.flushes);
    }
    stream_unref(r->stream);
    req_free(r);
}

/* Cancellation reasons visible from outside the engine; NULL when r should go on. */
static const char *cancel_reason(const struct req *r, uint64_t now)
{
    if (atomic_load(&r->cancel)) return "cancelled by request";
    if (atomic_load(&r->stream->reader_gone)) return "client disconnected";
    if (r->deadline && now >= r->deadline) return "request timeout";
    return NULL;
}

/* Cancels r alone. A dedup follower leaves its leader; a leader with followers hands its
 * generation to the oldest one (sched_dedup_promote), which takes r's place in the running
 * table or its queue. Returns whoever carries r's generation on (NULL when nobody). */
static struct req *cancel_one(struct sched *s, struct req *r, const char *why, uint64_t now)
{
    struct req *next = NULL;
    int queued = r->slot < 0 && !r->leader;
    if (r->leader) {
        sched_dedup_detach(r);
    } else if (!r->followers) {
        if (queued) {
            queue_remove(s, r);
            pthread_mutex_lock(&s->lock);
            s->n_waiting--;
            pthread_mutex_unlock(&s->lock);
        }
        finish(s, r, SCHED_FINISH_CANCELLED, why);
        return NULL;
    } else {
        struct req **pp = &s->q_head[r->priority];
        while (queued && *pp != r) pp = &(*pp)->next;
        next = sched_dedup_promote(r);
        if (next->slot >= 0) s->running[next->slot] = next;
        if (queued) {
            *pp = next;
            if (s->q_tail[next->priority] == r) s->q_tail[next->priority] = next;
        }
        KRS_LOG_DEBUGF("request %llu hands its generation to request %llu",
                       (unsigned long long)r->id, (unsigned long long)next->id);
    }
    sched_end_one(s, r, SCHED_FINISH_CANCELLED, why, now);
    return next;
}

/* Ends the followers of leader l whose own cancellation reason holds. */
static void reap_followers(struct sched *s, struct req *l, uint64_t now)
{
    for (struct req *f = l->followers, *next; f; f = next) {
        next = f->next_follower;
        const char *why = cancel_reason(f, now);
        if (why) cancel_one(s, f, why, now);
    }
}

/* ---- inbox ---------------------------------------------------------------------------- */

static void set_limit_for_mode(struct sched *s, uint64_t now)
{
    switch (s->mode) {
    case SCHED_MODE_OFF:
        s->limit = 1;
        break;
    case SCHED_MODE_FIXED:
        s->limit = s->p.fixed_batch;
        break;
    case SCHED_MODE_AUTO:
        s->limit = (int)controller_limit(&s->ctrl);
        break;
    }
    if (s->limit > s->p.max_running) s->limit = s->p.max_running;
    if (s->limit < 1) s->limit = 1;
    (void)now;
}

/* Moves new requests into the priority queues and applies mode changes. Returns 1 when the
 * engine should stop. */
static int drain_inbox(struct sched *s, uint64_t now)
{
    pthread_mutex_lock(&s->lock);
    struct req *list = s->inbox_head;
    s->inbox_head = s->inbox_tail = NULL;
    int stop = s->stop;
    int mode_pending = s->mode_pending;
    enum sched_mode new_mode = s->new_mode;
    int cancel_all = s->cancel_all;
    char cancel_reason[sizeof s->cancel_reason];
    memcpy(cancel_reason, s->cancel_reason, sizeof cancel_reason);
    s->cancel_all = 0;
    int new_fixed = s->new_fixed;
    s->mode_pending = 0;
    pthread_mutex_unlock(&s->lock);

    while (list) {
        struct req *r = list;
        list = r->next;
        /* Inter-arrival EMA drives the admission window. */
        if (s->last_arrival_ns) {
            double gap = (double)(r->t_submit - s->last_arrival_ns);
            s->gap_ema_ns = s->gap_ema_ns > 0 ? 0.7 * s->gap_ema_ns + 0.3 * gap : gap;
        }
        s->last_arrival_ns = r->t_submit;
        if (sched_dedup_find_leader(s, r)) { /* shares a generation: waits on no queue */
            pthread_mutex_lock(&s->lock);
            s->n_waiting--;
            pthread_mutex_unlock(&s->lock);
            continue;
        }
        queue_push(s, r, 0);
    }
    if (cancel_all) {
        for (int i = 0; i < s->p.max_running; i++)
            if (s->running[i]) finish(s, s->running[i], SCHED_FINISH_CANCELLED, cancel_reason);
        for (int q = 0; q < 3; q++) {
            struct req *r;
            while ((r = queue_pop(s, q))) {
                pthread_mutex_lock(&s->lock);
                s->n_waiting--;
                pthread_mutex_unlock(&s->lock);
                finish(s, r, SCHED_FINISH_CANCELLED, cancel_reason);
            }
        }
    }
    if (mode_pending) {
        enum sched_mode old = s->mode;
        s->mode = new_mode;
        if (new_fixed > 0) s->p.fixed_batch = new_fixed;
        controller_set_enabled(&s->ctrl, new_mode == SCHED_MODE_AUTO, now);
        set_limit_for_mode(s, now);
        if (s->metrics) metrics_set_mode(s->metrics, metrics_mode(s->mode));
        KRS_LOG_INFOF("scheduler mode %s -> %s (batch limit %d)", sched_mode_name(old),
                      sched_mode_name(s->mode), s->limit);
    }
    return stop;
}

/* ---- one step ------------------------------------------------------------------------- */

static int free_slot(const struct sched *s)
{
    for (int i = 0; i < s->p.max_running; i++)
        if (!s->running[i]) return i;
    return -1;
}

/* Preempts the lowest-priority, most recently admitted running request (never `keep`), back
 * to the front of its queue; its KV is freed and recomputed when it is admitted again.
 * Returns 0 when there is nothing to preempt. When min_prio >= 0 only requests of priority
 * strictly lower than min_prio (numerically greater) qualify. */
static int preempt_one(struct sched *s, const struct req *keep, int min_prio)
{
    struct req *victim = NULL;
    for (int i = 0; i < s->p.max_running; i++) {
        struct req *r = s->running[i];
        if (!r || r == keep) continue;
        if (min_prio >= 0 && (int)r->priority <= min_prio) continue;
        if (!victim || r->priority > victim->priority ||
            (r->priority == victim->priority && r->admit_order > victim->admit_order))
            victim = r;
    }
    if (!victim) return 0;
    release_slot(s, victim);
    __atomic_store_n(&victim->n_past, 0, __ATOMIC_RELAXED);
    victim->preempted = 1;
    queue_push(s, victim, 1);
    pthread_mutex_lock(&s->state_lock);
    s->pub.preemptions++;
    pthread_mutex_unlock(&s->state_lock);
    if (s->metrics) metrics_record_preemption(s->metrics);
    KRS_LOG_INFOF("preempted request %llu (%s) to free KV blocks", (unsigned long long)victim->id,
                  sched_priority_name(victim->priority));
    return 1;
}

static int blocks_fit(struct sched *s, int slot, int64_t begin, int64_t end)
{
    int64_t need_full, need_swa;
    struct kv_cache *kv = model_ctx_kv(s->ctx);
    kv_seq_blocks_needed(kv, slot, begin, end, &need_full, &need_swa);
    struct kv_stats st;
    kv_get_stats(kv, &st);
    return need_full <= st.full.blocks_free && need_swa <= st.swa.blocks_free;
}

static void admit(struct sched *s, uint64_t now)
{
    struct admit_budget budget;
    admit_budget_init(s, &budget, now);
    for (;;) {
        int q = queue_pick(s, now);
        if (q < 0) return;
        struct req *r = s->q_head[q];
        int slot = free_slot(s);
        int room = slot >= 0 && admit_room(s, r, &budget);
        if (!room) {
            /* Urgent work may take a background request's place. */
            if (q == SCHED_PRIO_URGENT && preempt_one(s, NULL, SCHED_PRIO_DEFAULT)) continue;
            return;
        }
        /* The prefix cache supplies what it holds of the prompt (and, after a preemption, of
         * the tokens generated so far); only the rest is computed. */
        struct kv_cache *kv = model_ctx_kv(s->ctx);
        int64_t cached = 0;
        kv_seq_attach_prefix(kv, slot, r->tokens, r->n_prompt + r->n_gen, &cached);
        int first = r->n_prompt + r->n_gen - (int)cached;
        if (first > s->p.max_batch_tokens) first = s->p.max_batch_tokens;
        if (sched_prefix_should_wait(s, r, cached)) {
            kv_seq_release(kv, slot);
            return; /* a running request is computing more of r's prefix: attach it then */
        }
        if (!blocks_fit(s, slot, cached, cached + first)) {
            kv_seq_release(kv, slot);
            if (q == SCHED_PRIO_URGENT && preempt_one(s, NULL, SCHED_PRIO_DEFAULT)) continue;
            return; /* wait for blocks to come back */
        }
        queue_pop(s, q);
        __atomic_store_n(&r->state, REQ_RUNNING, __ATOMIC_RELAXED);
        r->slot = slot;
        __atomic_store_n(&r->n_past, (int)cached, __ATOMIC_RELAXED);
        r->admit_order = ++s->admit_counter;
        r->late_admit = budget.past_limit;
        if (r->late_admit && s->metrics) metrics_record_late_admission(s->metrics);
        s->running[slot] = r;
        s->n_running++;
        if (!r->t_admit) {
            r->t_admit = now;
            r->n_cached = (int)cached;
            sched_dedup_admitted(s, r, now);
            if (s->metrics) {
                metrics_record_admit(s->metrics, now - r->t_submit);
                if (s->p.prefix_cache)
                    metrics_record_prefix_lookup(s->metrics, (uint32_t)r->n_prompt,
                                                 (uint32_t)cached);
            }
        }
        pthread_mutex_lock(&s->lock);
        s->n_waiting--;
        pthread_mutex_unlock(&s->lock);
    }
}

/* Adds r's next tokens to the batch (up to `budget`), reserving KV; preempts others when
 * blocks run out. Returns tokens added (0 if r could not be scheduled this step). */
static int schedule_req(struct sched *s, struct req *r, int budget, int *T)
{
    int total = r->n_prompt + r->n_gen;
    int n = total - r->n_past;
    if (n > budget) n = budget;
    if (n <= 0) return 0;
    struct kv_cache *kv = model_ctx_kv(s->ctx);
    while (kv_seq_reserve(kv, r->slot, r->n_past, r->n_past + n) == KRS_ERR_AGAIN) {
        if (!preempt_one(s, r, -1)) return 0;
    }
    for (int i = 0; i < n; i++) {
        int t = (*T)++;
        s->b_tokens[t] = r->tokens[r->n_past + i];
        s->b_pos[t] = r->n_past + i;
        s->b_seq[t] = r->slot;
        s->b_want[t] = r->n_past + i == total - 1;
    }
    return n;
}

static int is_stop_token(const struct sched *s, const struct req *r, int32_t tok)
{
    if (!r->ignore_eos && tokenizer_is_eog(s->tok, tok)) return 1;
    for (int i = 0; i < r->n_stop_ids; i++)
        if (r->stop_ids[i] == tok) return 1;
    return 0;
}

/* Appends the sampled token to *rp, streams its text (to its dedup followers too), and decides
 * whether the generation is done. Returns SCHED_FINISH_NONE to go on. A leader whose own stream
 * is full is cancelled alone and *rp becomes the follower that carries the generation on. */
static enum sched_finish accept_token(struct sched *s, struct req **rp,
                                      const struct sampler_result *res, uint64_t now,
                                      const char **reason)
{
    struct req *r = *rp;
    r->tokens[r->n_prompt + r->n_gen] = res->token;
    __atomic_store_n(&r->n_gen, r->n_gen + 1, __ATOMIC_RELAXED); /* read by listings */
    if (!r->t_first) {
        r->t_first = now;
        if (s->metrics) metrics_record_first_token(s->metrics, now - r->t_submit);
    } else if (s->metrics) {
        metrics_record_inter_token(s->metrics, now - r->t_last);
    }
    r->t_last = now;
    if (r->gm) {
        if (grammar_matcher_accept(r->gm, res->token)) {
            *reason = "grammar: sampled token outside the grammar";
            return SCHED_FINISH_ERROR;
        }
        if (tokenizer_is_eog(s->tok, res->token)) { /* allowed: the output is complete */
            *reason = "stop token";
            return SCHED_FINISH_STOP;
        }
    }
    if (is_stop_token(s, r, res->token)) {
        *reason = "stop token";
        return SCHED_FINISH_STOP;
    }
    size_t n_piece = 0, n_emit = 0;
    int stopped = 0;
    char *piece = s->text_buf, *emit = s->text_buf + s->text_cap / 2;
    tokenizer_detok_push(s->tok, &r->detok, res->token, piece, s->text_cap / 2, &n_piece);
    stop_matcher_push(&r->stop, piece, n_piece, emit, s->text_cap / 2, &n_emit, &stopped);

    /* One TOKEN event carries the id, logprobs and the first text bytes; long text continues
     * in text-only events. */
    struct sched_event evs[8];
    int n_ev = 0;
    size_t off = 0;
    do {
        struct sched_event *ev = &evs[n_ev];
        memset(ev, 0, offsetof(struct sched_event, text));
        ev->kind = SCHED_EV_TOKEN;
        ev->token = n_ev == 0 ? res->token : -1;
        if (n_ev == 0) {
            ev->logprob = res->logprob;
            ev->n_top = res->n_top;
            memcpy(ev->top, res->top, (size_t)res->n_top * sizeof res->top[0]);
        }
        size_t chunk = n_emit - off > SCHED_EV_TEXT_MAX ? SCHED_EV_TEXT_MAX : n_emit - off;
        /* Never split a UTF-8 sequence across events. */
        while (chunk > 0 && off + chunk < n_emit &&
               ((unsigned char)emit[off + chunk] & 0xC0) == 0x80)
            chunk--;
        ev->text_len = (uint16_t)chunk;
        memcpy(ev->text, emit + off, chunk);
        off += chunk;
        n_ev++;
    } while (off < n_emit && n_ev < 8);
    sched_dedup_fanout(s, r, evs, n_ev, now);
    if (stream_push_many(r->stream, evs, n_ev) != KRS_OK) {
        *reason = "stream buffer full: client too slow";
        if (!r->followers) return SCHED_FINISH_CANCELLED;
        *rp = r = cancel_one(s, r, *reason, now);
    }
    if (stopped) {
        *reason = "stop string";
        return SCHED_FINISH_STOP;
    }
    if (r->gm && grammar_matcher_done(r->gm)) {
        *reason = "grammar complete";
        return SCHED_FINISH_STOP;
    }
    if (r->n_gen >= r->max_tokens) {
        *reason = "max tokens";
        return SCHED_FINISH_LENGTH;
    }
    return SCHED_FINISH_NONE;
}

/* in_step: the engine thread runs a step right after this (its heartbeat then stays at the
 * step's start until the step ends: /health tells a long step from a stuck engine). */
static void publish(struct sched *s, uint64_t now, int idle, int in_step)
{
    struct kv_stats st;
    kv_get_stats(model_ctx_kv(s->ctx), &st);
    int64_t total = st.full.blocks_total + st.swa.blocks_total;
    int64_t free_blocks = st.full.blocks_free + st.swa.blocks_free;
    /* The memory query may cost a driver call: refreshed once a second, not every loop. */
    if (!s->mem_at_ns || now - s->mem_at_ns > 1000000000ull) {
        model_ctx_memory(s->ctx, &s->mem);
        s->mem_at_ns = now;
    }
    const struct model_ctx_memory mem = s->mem;
    pthread_mutex_lock(&s->state_lock);
    s->pub.mode = s->mode;
    s->pub.batch_limit = s->limit;
    s->pub.running = s->n_running;
    for (int q = 0; q < 3; q++) s->pub.queued[q] = s->q_len[q];
    s->pub.heartbeat_ns = now;
    s->pub.in_step = in_step;
    s->pub.idle = idle;
    s->pub.kv_blocks_total = total;
    s->pub.kv_blocks_free = free_blocks;
    s->pub.window_ms = s->window_ns / 1e6;
    snprintf(s->pub.device, sizeof s->pub.device, "%s", model_ctx_backend_name(s->ctx));
    s->pub.mem_weights = mem.weights;
    s->pub.mem_kv = mem.kv;
    s->pub.mem_activations = mem.activations;
    s->pub.mem_free = mem.free_bytes;
    s->pub.mem_total = mem.total;
    if (s->device_failed)
        snprintf(s->pub.device_error, sizeof s->pub.device_error, "%s", s->device_error);
    s->pub_ctrl = s->ctrl;
    pthread_mutex_unlock(&s->state_lock);
    if (s->metrics) {
        for (int q = 0; q < 3; q++)
            metrics_set_queue_depth(s->metrics, (enum metrics_priority)q, s->q_len[q]);
        metrics_set_batch(s->metrics, (uint32_t)s->n_running, (uint32_t)s->limit);
        metrics_set_kv_blocks(s->metrics, (uint32_t)(total - free_blocks), (uint32_t)free_blocks);
        metrics_set_prefix_cache(s->metrics, st.full.blocks_cached + st.swa.blocks_cached,
                                 st.full.blocks_evictable + st.swa.blocks_evictable,
                                 st.full.evictions + st.swa.evictions);
        metrics_set_device_memory(s->metrics, mem.weights, mem.kv, mem.activations, mem.free_bytes,
                                  mem.total);
    }
}

/* Drops cancelled / timed-out / abandoned requests, queued, running or following (a leader
 * cancelled while followers remain hands its generation over: cancel_one). */
static void reap_cancelled(struct sched *s, uint64_t now)
{
    for (int q = 0; q < 3; q++) {
        for (struct req *r = s->q_head[q], *next; r; r = next) {
            next = r->next;
            reap_followers(s, r, now);
            const char *why = cancel_reason(r, now);
            if (why) cancel_one(s, r, why, now);
        }
    }
    for (int i = 0; i < s->p.max_running; i++) {
        struct req *r = s->running[i];
        if (!r) continue;
        reap_followers(s, r, now);
        for (const char *why; r && (why = cancel_reason(r, now));)
            r = cancel_one(s, r, why, now); /* the new leader may be cancelled as well */
    }
}

/* The admission window: with an idle engine and requests arriving close together, wait up to
 * the window so they start in one batch. The window follows the arrival rate (twice the mean
 * gap, clamped to [min, max]); a lone request (previous arrival longer ago than max) waits 0. */
static uint64_t window_wait_ns(struct sched *s, uint64_t now)
{
    s->window_ns = 0;
    if (!s->p.adaptive_window || s->mode == SCHED_MODE_OFF || s->n_running > 0) return 0;
    int q = queue_pick(s, now);
    if (q < 0 || queued_total(s) >= sched_admit_limit(s)) return 0;
    double max_ns = s->p.window_max_ms * 1e6, min_ns = s->p.window_min_ms * 1e6;
    if (s->gap_ema_ns <= 0 || s->gap_ema_ns > max_ns) return 0;
    double w = 2.0 * s->gap_ema_ns;
    if (w < min_ns) w = min_ns;
    if (w > max_ns) w = max_ns;
    s->window_ns = w;
    uint64_t oldest = UINT64_MAX;
    for (int i = 0; i < 3; i++)
        if (s->q_head[i] && s->q_head[i]->t_submit < oldest) oldest = s->q_head[i]->t_submit;
    uint64_t until = oldest + (uint64_t)w;
    return until > now ? until - now : 0;
}

static void wait_for_work(struct sched *s, uint64_t wait_ns)
{
    struct timespec ts;
    uint64_t t = clock_now_ns() + wait_ns;
    ts.tv_sec = (time_t)(t / 1000000000u);
    ts.tv_nsec = (long)(t % 1000000000u);
    pthread_mutex_lock(&s->lock);
    if (!s->inbox_head && !s->stop && !s->mode_pending && !s->cancel_all)
        pthread_cond_timedwait(&s->wake, &s->lock, &ts);
    pthread_mutex_unlock(&s->lock);
}

/* Sampling threads claim rows one at a time: they are few (one per sequence) and uneven
 * (top-p sorts). Each reads only its row's request, which no other thread touches during the
 * step; worker ith uses scratch ith. */
static void sample_rows(void *arg, int ith, int nth)
{
    struct sched *s = arg;
    const int n_vocab = model_hparams(s->model)->n_vocab;
    (void)nth;
    for (int row; (row = atomic_fetch_add_explicit(&s->next_sample_row, 1, memory_order_relaxed)) <
                  s->n_sample_rows;) {
        struct req *r = s->b_rows[row];
        const uint32_t *allow = NULL;
        if (r->gm) {
            int32_t n_allowed = 0;
            int rc = grammar_matcher_mask(r->gm, &allow, &n_allowed);
            if (rc || n_allowed == 0) {
                s->res_rc[row] = rc ? rc : KRS_ERR_STATE;
                continue;
            }
        }
        s->res_rc[row] = sampler_sample_masked(
            &r->sampler, s->scratch[ith], s->cur_logits + (size_t)row * n_vocab, n_vocab, allow,
            r->tokens, r->n_prompt, r->tokens + r->n_prompt, r->n_gen, &s->res[row]);
    }
}

/* The grammar masks of this step's rows for device sampling, threads claiming rows as in
 * sample_rows: dev_masks[row] (NULL without a grammar) and res_rc[row] (KRS_ERR_STATE when the
 * grammar allows no token). A mask costs tens to hundreds of microseconds on one core and the
 * next step's masks need this step's tokens, so on a GPU they are on the critical path. */
static void mask_rows(void *arg, int ith, int nth)
{
    struct sched *s = arg;
    (void)ith;
    (void)nth;
    for (int row; (row = atomic_fetch_add_explicit(&s->next_sample_row, 1, memory_order_relaxed)) <
                  s->n_sample_rows;) {
        struct req *r = s->b_rows[row];
        s->dev_masks[row] = NULL;
        s->res_rc[row] = KRS_OK;
        if (!r->gm) continue;
        int32_t n_allowed = 0;
        int rc = grammar_matcher_mask(r->gm, &s->dev_masks[row], &n_allowed);
        s->res_rc[row] = rc ? rc : n_allowed == 0 ? KRS_ERR_STATE : KRS_OK;
    }
}

/* The layouts sampler/ writes and backend/ reads are the same four fields. */
_Static_assert(
    sizeof(struct sampler_edit) == sizeof(struct backend_logit_edit) &&
        offsetof(struct sampler_edit, token) == offsetof(struct backend_logit_edit, token) &&
        offsetof(struct sampler_edit, pre_add) == offsetof(struct backend_logit_edit, pre_add) &&
        offsetof(struct sampler_edit, rep) == offsetof(struct backend_logit_edit, rep) &&
        offsetof(struct sampler_edit, post_add) == offsetof(struct backend_logit_edit, post_add),
    "sampler_edit and backend_logit_edit differ");

/* 1 when this step's n_rows rows can sample on the device: device sampling is on, no row asks
 * for top logprobs (they need the whole row) and the rows with a grammar mask fit. */
static int can_sample_on_device(const struct sched *s, int n_rows)
{
    if (!s->dev_rows) return 0;
    int n_masked = 0;
    for (int row = 0; row < n_rows; row++) {
        const struct req *r = s->b_rows[row];
        if (r->sampler.params.n_top_logprobs > 0) return 0;
        n_masked += r->gm != NULL;
    }
    return n_masked <= s->dev_max_masks;
}

/* Fills the device-sampling inputs of this step's n_rows rows (can_sample_on_device said yes)
 * and returns 1, or returns 0 when the step samples on the host after all: the edits do not
 * fit, or a grammar allows no token (then nothing was drawn from any RNG, so the host path
 * draws exactly as it would have). A row with a grammar hands its token mask (cached by the
 * matcher) to the device. Runs while the device computes the step's logits. */
static int prepare_device_sampling(struct sched *s, int n_rows)
{
    int n_edits = 0, n_masked = 0;
    for (int row = 0; row < n_rows; row++) n_masked += s->b_rows[row]->gm != NULL;
    /* the masks go to the device with their rows; computed in parallel on the sampling pool,
     * idle while the device runs the step */
    s->n_sample_rows = n_rows;
    atomic_store_explicit(&s->next_sample_row, 0, memory_order_relaxed);
    if (n_masked > 1)
        pool_run_n(s->sample_pool, n_masked, mask_rows, s);
    else
        mask_rows(s, 0, 1);
    for (int row = 0; row < n_rows; row++) {
        struct req *r = s->b_rows[row];
        const struct sampler_params *sp = &r->sampler.params;
        if (s->res_rc[row]) return 0; /* the host path samples (and reports a dead end) */
        int32_t n;
        if (sampler_edits(&r->sampler, s->scratch[0], r->tokens, r->n_prompt,
                          r->tokens + r->n_prompt, r->n_gen, s->dev_edits + n_edits,
                          s->dev_edits_cap - n_edits, &n))
            return 0;
        s->dev_rows[row] = (struct backend_sample_row){
            .temperature = sp->temperature,
            .top_k = sp->top_k,
            .top_p = sp->top_p,
            .min_p = sp->min_p,
            .edit_begin = n_edits,
            .n_edits = n,
        };
        n_edits += n;
    }
    for (int row = 0; row < n_rows; row++) {
        /* Rounded to float a draw just below 1 becomes 1: keep it inside [0, 1). */
        float u = (float)sampler_next_uniform(&s->b_rows[row]->sampler);
        s->dev_rows[row].u = u < 1.0f ? u : nextafterf(1.0f, 0.0f);
    }
    s->dev_n_edits = n_edits;
    s->dev_any_mask = n_masked > 0;
    return 1;
}

/* Feeds one step to the controller, applies its limit in auto mode, and logs and counts
 * every tuning event it recorded. */
static void observe_step(struct sched *s, uint64_t step_ns, int n_decode, int n_prefill)
{
    uint64_t now = clock_now_ns(), oldest = now;
    for (int q = 0; q < 3; q++)
        if (s->q_head[q] && s->q_head[q]->t_submit < oldest) oldest = s->q_head[q]->t_submit;
    struct controller_step st = {.latency_ns = step_ns,
                                 .n_decode = (uint32_t)n_decode,
                                 .n_prefill = (uint32_t)n_prefill,
                                 .queued = (uint32_t)queued_total(s),
                                 .oldest_wait_ns = now - oldest,
                                 .n_late = (uint32_t)sched_late_running(s),
                                 .now_ns = now};
    uint64_t before = s->ctrl.adjustments;
    uint32_t n_ev = s->ctrl.ev_count, head = s->ctrl.ev_head;
    uint32_t limit = controller_observe(&s->ctrl, &st);
    if (s->metrics && s->ctrl.adjustments != before)
        metrics_record_tuning_adjustments(s->metrics, s->ctrl.adjustments - before);
    if (s->ctrl.ev_count != n_ev || s->ctrl.ev_head != head) {
        const struct controller_event *e =
            &s->ctrl.events[(s->ctrl.ev_head + s->ctrl.ev_count - 1) % CONTROLLER_EVENTS];
        KRS_LOG_INFOF("controller %s: %s", controller_event_name(e->kind), e->reason);
    }
    if (s->mode == SCHED_MODE_AUTO)
        s->limit = limit < (uint32_t)s->p.max_running ? (int)limit : s->p.max_running;
}

static void step(struct sched *s, uint64_t t0)
{
    int T = 0, budget = s->p.max_batch_tokens, n_decode = 0;
    /* Decodes first (one token each), then prompt chunks by priority within the prefill
     * budget (sched_admit.c), which keeps the decodes' step latency under target. */
    for (int pass = 0; pass < 4; pass++) {
        if (pass == 1) {
            n_decode = T;
            int pf = sched_prefill_budget(s, n_decode, budget, sched_prompt_late(s, t0));
            budget = pf < budget ? pf : budget;
        }
        for (int i = 0; i < s->p.max_running && budget > 0; i++) {
            struct req *r = s->running[i];
            if (!r) continue;
            int pending = r->n_prompt + r->n_gen - r->n_past;
            if ((pass == 0) != (pending == 1)) continue;
            if (pass > 0 && (int)r->priority != pass - 1) continue;
            budget -= schedule_req(s, r, budget, &T);
        }
    }
    if (T == 0) return;
    /* A preemption during scheduling may have removed a request whose tokens are already in
     * the batch: drop those tokens. */
    int w = 0;
    for (int t = 0; t < T; t++) {
        struct req *r = s->running[s->b_seq[t]];
        if (!r || s->b_pos[t] >= r->n_prompt + r->n_gen) continue;
        if (r->n_past > s->b_pos[t]) continue;
        s->b_tokens[w] = s->b_tokens[t];
        s->b_pos[w] = s->b_pos[t];
        s->b_seq[w] = s->b_seq[t];
        s->b_want[w] = s->b_want[t];
        w++;
    }
    T = w;
    if (T == 0) return;
    int n_rows = 0;
    for (int t = 0; t < T; t++)
        if (s->b_want[t]) s->b_rows[n_rows++] = s->running[s->b_seq[t]];

    struct model_batch b = {T, s->b_tokens, s->b_pos, s->b_seq, s->b_want};
    const float *logits = NULL;
    const int32_t *ids = NULL;
    const float *logprobs = NULL;
    int n_out = 0;
    /* The step starts on the device first; the host then prepares its sampling (grammar masks,
     * logit edits, draws) while the device computes. */
    int on_device = can_sample_on_device(s, n_rows), prepared = 0;
    if (on_device && !s->sampling_overlap)
        on_device = prepared = prepare_device_sampling(s, n_rows);
    int rc = model_forward_begin(s->ctx, &b, &n_out);
    if (!rc) {
        if (on_device && (prepared || prepare_device_sampling(s, n_rows)))
            rc = model_forward_end_sampled(
                s->ctx, s->dev_rows, (const struct backend_logit_edit *)s->dev_edits,
                s->dev_n_edits, s->dev_any_mask ? s->dev_masks : NULL, &ids, &logprobs);
        else
            rc = model_forward_end(s->ctx, &logits);
    }
    uint64_t now = clock_now_ns();
    if (rc) {
        KRS_LOG_ERRORF("forward failed: %s", krs_status_str(rc));
        /* A malformed batch is this step's problem; anything else (a device error, memory)
         * means the device may be unusable: /health reports it until the process restarts. */
        if (rc != KRS_ERR_INVALID && !s->device_failed) {
            s->device_failed = 1;
            snprintf(s->device_error, sizeof s->device_error, "%s forward failed: %s",
                     model_ctx_backend_name(s->ctx), krs_status_str(rc));
            /* Published now, before the requests below end: a client that sees its error and
             * asks /health at once must find the engine unhealthy already. */
            pthread_mutex_lock(&s->state_lock);
            snprintf(s->pub.device_error, sizeof s->pub.device_error, "%s", s->device_error);
            pthread_mutex_unlock(&s->state_lock);
        }
        for (int i = 0; i < s->p.max_running; i++)
            if (s->running[i]) finish(s, s->running[i], SCHED_FINISH_ERROR, "forward pass failed");
        return;
    }
    /* Advance positions for every request in the batch. */
    int batch_seqs = 0;
    for (int i = 0; i < s->p.max_running; i++) {
        struct req *r = s->running[i];
        if (!r) continue;
        int advanced = 0;
        for (int t = 0; t < T; t++)
            if (s->b_seq[t] == i) advanced++;
        if (advanced) batch_seqs++;
        __atomic_store_n(&r->n_past, r->n_past + advanced, __ATOMIC_RELAXED);
        kv_seq_commit(model_ctx_kv(s->ctx), r->slot, r->tokens, r->n_past);
    }
    /* Rows are independent (each request has its own sampler and RNG), so they are sampled in
     * parallel; tokens are then accepted in row order on this thread. */
    if (ids) {
        for (int row = 0; row < n_out; row++) {
            s->res[row] = (struct sampler_result){.token = ids[row], .logprob = logprobs[row]};
            s->res_rc[row] = KRS_OK;
        }
    } else {
        s->cur_logits = logits;
        s->n_sample_rows = n_out;
        atomic_store_explicit(&s->next_sample_row, 0, memory_order_relaxed);
        if (n_out == 1)
            sample_rows(s, 0, 1);
        else if (n_out > 1)
            pool_run_n(s->sample_pool, n_out, sample_rows, s);
    }
    for (int row = 0; row < n_out; row++) {
        struct req *r = s->b_rows[row];
        if (s->res_rc[row]) {
            finish(s, r, SCHED_FINISH_ERROR,
                   !r->gm                            ? "sampling failed"
                   : s->res_rc[row] == KRS_ERR_STATE ? "grammar: no token can continue the output"
                   : s->res_rc[row] == KRS_ERR_INTERNAL ? "grammar too complex for the matcher"
                                                        : "sampling failed");
            continue;
        }
        const char *reason = NULL;
        enum sched_finish f = accept_token(s, &r, &s->res[row], now, &reason);
        /* Counted before finish() so that a reader who saw FINISH sees every token counted. */
        if (s->metrics) metrics_record_tokens(s->metrics, 1, now);
        if (f != SCHED_FINISH_NONE) finish(s, r, f, reason);
    }
    uint64_t step_ns = clock_now_ns() - t0;
    if (s->metrics) {
        metrics_record_step(s->metrics, step_ns, (uint32_t)batch_seqs);
    }
    /* Every step feeds the controller: the decodes and prompt tokens it carried (it fits
     * its step-time model on the decode-only ones and learns a prompt token's cost from the
     * others) and how long the queue has waited. */
    observe_step(s, step_ns, n_decode < T ? n_decode : T, T - (n_decode < T ? n_decode : T));
    pthread_mutex_lock(&s->state_lock);
    s->pub.steps++;
    pthread_mutex_unlock(&s->state_lock);
}

static void *engine_main(void *arg)
{
    struct sched *s = arg;
    uint64_t degradations = 0;
    for (;;) {
        uint64_t now = clock_now_ns();
        if (drain_inbox(s, now)) break;
        reap_cancelled(s, now);
        uint64_t wait = window_wait_ns(s, now);
        if (wait > 0) {
            publish(s, now, 0, 0);
            wait_for_work(s, wait);
            continue;
        }
        admit(s, now);
        int idle = s->n_running == 0;
        publish(s, now, idle && queued_total(s) == 0, !idle);
        if (idle) {
            /* Nothing can run: sleep until new work (or a heartbeat tick). Queued requests
             * that do not fit wait for blocks, which only running requests give back. */
            wait_for_work(s, (uint64_t)IDLE_WAIT_MS * 1000000u);
            continue;
        }
        step(s, now);
        pthread_mutex_lock(&s->state_lock);
        s->pub.in_step = 0;
        pthread_mutex_unlock(&s->state_lock);
        if (s->metrics && s->ctrl.degradations != degradations) {
            struct controller_snapshot snap;
            controller_state(&s->ctrl, &snap);
            if (snap.n_events)
                metrics_record_degradation(s->metrics, snap.events[snap.n_events - 1].reason,
                                           clock_now_ns());
            degradations = s->ctrl.degradations;
        }
    }
    /* Shutdown: every unfinished request ends. */
    for (int i = 0; i < s->p.max_running; i++)
        if (s->running[i]) finish(s, s->running[i], SCHED_FINISH_CANCELLED, "shutdown");
    for (int q = 0; q < 3; q++) {
        struct req *r;
        while ((r = queue_pop(s, q))) finish(s, r, SCHED_FINISH_CANCELLED, "shutdown");
    }
    pthread_mutex_lock(&s->lock);
    struct req *list = s->inbox_head;
    s->inbox_head = s->inbox_tail = NULL;
    pthread_mutex_unlock(&s->lock);
    while (list) {
        struct req *r = list;
        list = r->next;
        finish(s, r, SCHED_FINISH_CANCELLED, "shutdown");
    }
    return NULL;
}

/* ---- public API ----------------------------------------------------------------------- */

/* Frees everything sched_create reserved (the engine thread must not be running). */
static void free_resources(struct sched *s)
{
    model_ctx_free(s->ctx);
    pool_destroy(s->sample_pool);
    for (int i = 0; i < s->n_scratch; i++) sampler_scratch_free(s->scratch[i]);
    alloc_free(s->scratch);
    alloc_free(s->res);
    alloc_free(s->res_rc);
    alloc_free(s->dev_rows);
    alloc_free(s->dev_edits);
    alloc_free(s->dev_masks);
    alloc_free(s->live);
    alloc_free(s->running);
    alloc_free(s->b_tokens);
    alloc_free(s->b_pos);
    alloc_free(s->b_seq);
    alloc_free(s->b_want);
    alloc_free(s->b_rows);
    alloc_free(s->text_buf);
    grammar_vocab_free(s->gvocab);
    pthread_mutex_destroy(&s->gvocab_lock);
    pthread_cond_destroy(&s->wake);
    pthread_mutex_destroy(&s->lock);
    pthread_mutex_destroy(&s->reg_lock);
    pthread_mutex_destroy(&s->state_lock);
    alloc_free(s);
}

int sched_create(const struct model *model, const struct tokenizer *tok,
                 const struct sched_params *p, struct metrics *metrics, struct sched **out,
                 char *err, size_t errlen)
{
    *out = NULL;
    if (p->max_running < 1 || p->max_queue < 0 || p->max_batch_tokens < 1 ||
        p->stream_capacity < 4 || p->fixed_batch < 1) {
        snprintf(err, errlen, "invalid scheduler parameters");
        return KRS_ERR_INVALID;
    }
    struct sched *s = alloc_calloc(1, sizeof *s);
    if (!s) return KRS_ERR_NOMEM;
    int rc;
    s->model = model;
    s->tok = tok;
    s->metrics = metrics;
    s->p = *p;
    pthread_mutex_init(&s->lock, NULL);
    pthread_mutex_init(&s->reg_lock, NULL);
    pthread_mutex_init(&s->state_lock, NULL);
    pthread_mutex_init(&s->gvocab_lock, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&s->wake, &ca);
    pthread_condattr_destroy(&ca);

    struct model_ctx_params mp = {
        .max_batch_tokens = p->max_batch_tokens,
        .max_seqs = p->max_running,
        .kv_tokens = p->kv_tokens,
        .max_ctx = p->max_ctx,
        .n_threads = p->n_threads,
        .device = p->device,
        .mem_budget = p->mem_budget,
        .prefix_cache = p->prefix_cache,
        .prefix_cache_max_tokens = p->prefix_cache_max_tokens,
    };
    if ((rc = model_ctx_create(model, &mp, &s->ctx, err, errlen))) goto fail;
    if ((rc = model_ctx_warmup(s->ctx))) {
        snprintf(err, errlen, "warm-up step failed: %s", krs_status_str(rc));
        goto fail;
    }
    if (pool_create(p->n_threads, &s->sample_pool)) {
        rc = KRS_ERR_NOMEM;
        snprintf(err, errlen, "sampling threads: cannot start");
        goto fail;
    }
    if (model_ctx_samples_on_device(s->ctx)) {
        s->dev_edits_cap = model_ctx_max_sample_edits(s->ctx);
        s->dev_rows = alloc_calloc((size_t)p->max_running, sizeof *s->dev_rows);
        s->dev_edits = alloc_calloc((size_t)s->dev_edits_cap, sizeof *s->dev_edits);
        s->dev_masks = alloc_calloc((size_t)p->max_running, sizeof *s->dev_masks);
        /* Grammar masks go to the device with the step (the row samples there like any
         * other); KRS_DEVICE_GRAMMAR_MASK=0 samples constrained rows on the host instead. */
        const char *dm = getenv("KRS_DEVICE_GRAMMAR_MASK");
        s->dev_max_masks = dm && !strcmp(dm, "0") ? 0 : model_ctx_max_mask_rows(s->ctx);
        /* KRS_SAMPLING_OVERLAP=0 prepares a step's sampling before the device starts it. */
        const char *ov = getenv("KRS_SAMPLING_OVERLAP");
        s->sampling_overlap = !(ov && !strcmp(ov, "0"));
        if (!s->dev_rows || !s->dev_edits || !s->dev_masks) {
            rc = KRS_ERR_NOMEM;
            snprintf(err, errlen, "out of memory");
            goto fail;
        }
    }
    int n_scratch = pool_size(s->sample_pool);
    s->scratch = alloc_calloc((size_t)n_scratch, sizeof *s->scratch);
    s->res = alloc_calloc((size_t)p->max_running, sizeof *s->res);
    s->res_rc = alloc_calloc((size_t)p->max_running, sizeof *s->res_rc);
    if (!s->scratch || !s->res || !s->res_rc) {
        rc = KRS_ERR_NOMEM;
        snprintf(err, errlen, "out of memory");
        goto fail;
    }
    for (; s->n_scratch < n_scratch; s->n_scratch++) {
        rc = sampler_scratch_create((int32_t)model_hparams(model)->n_vocab,
                                    &s->scratch[s->n_scratch]);
        if (rc) {
            snprintf(err, errlen, "sampler scratch: %s", krs_status_str(rc));
            goto fail;
        }
    }
    struct controller_config cc;
    controller_config_default(&cc);
    cc.min_batch = (uint32_t)p->auto_min_batch;
    cc.max_batch =
        (uint32_t)(p->auto_max_batch < p->max_running ? p->auto_max_batch : p->max_running);
    if (cc.min_batch > cc.max_batch) cc.min_batch = cc.max_batch;
    cc.fixed_batch = (uint32_t)p->fixed_batch;
    /* Auto mode starts where fixed mode would run and tunes from there: starting at 1 would
     * serialise the first requests of a burst for several tuning windows. */
    cc.initial_batch = cc.fixed_batch < cc.min_batch   ? cc.min_batch
                       : cc.fixed_batch > cc.max_batch ? cc.max_batch
                                                       : cc.fixed_batch;
    cc.ema_alpha = p->ema_alpha;
    cc.interval = (uint32_t)p->tune_interval;
    cc.p99_target_ms = p->p99_target_ms;
    cc.late_wait_ms = p->late_wait_ms;
    cc.late_p99_factor = p->late_p99_factor;
    cc.enabled = p->mode == SCHED_MODE_AUTO;
    if ((rc = controller_init(&s->ctrl, &cc, clock_now_ns()))) {
        snprintf(err, errlen, "invalid auto-tune parameters");
        goto fail;
    }
    rc = KRS_ERR_NOMEM;
    s->max_live = p->max_running + p->max_queue + 64;
    s->live = alloc_calloc((size_t)s->max_live, sizeof *s->live);
    s->running = alloc_calloc((size_t)p->max_running, sizeof *s->running);
    s->b_tokens = alloc_calloc((size_t)p->max_batch_tokens, sizeof(int32_t));
    s->b_pos = alloc_calloc((size_t)p->max_batch_tokens, sizeof(int32_t));
    s->b_seq = alloc_calloc((size_t)p->max_batch_tokens, sizeof(int32_t));
    s->b_want = alloc_calloc((size_t)p->max_batch_tokens, 1);
    s->b_rows = alloc_calloc((size_t)p->max_running, sizeof *s->b_rows);
    s->text_cap = 2 * (tokenizer_max_piece(tok) + 8 + STOP_MAX_LEN);
    s->text_buf = alloc_malloc(s->text_cap);
    if (!s->live || !s->running || !s->b_tokens || !s->b_pos || !s->b_seq || !s->b_want ||
        !s->b_rows || !s->text_buf)
        goto fail;
    s->mode = p->mode;
    set_limit_for_mode(s, clock_now_ns());
    if (metrics) metrics_set_mode(metrics, metrics_mode(s->mode));
    /* The state is readable (KV totals included) as soon as sched_create returns, before the
     * engine thread's first loop. */
    publish(s, clock_now_ns(), 1, 0);
    if (pthread_create(&s->thread, NULL, engine_main, s)) {
        snprintf(err, errlen, "cannot start the engine thread");
        rc = KRS_ERR_INTERNAL;
        goto fail;
    }
    *out = s;
    return KRS_OK;
fail:
    free_resources(s);
    return rc;
}

void sched_destroy(struct sched *s)
{
    if (!s) return;
    pthread_mutex_lock(&s->lock);
    s->stop = 1;
    pthread_cond_signal(&s->wake);
    pthread_mutex_unlock(&s->lock);
    pthread_join(s->thread, NULL);
    free_resources(s);
}

int sched_submit(struct sched *s, const struct sched_request *in, struct sched_stream **out_stream,
                 uint64_t *out_id)
{
    *out_stream = NULL;
    pthread_mutex_lock(&s->lock);
    int rc = KRS_OK;
    if (s->draining || s->stop)
        rc = KRS_ERR_STATE;
    else if (s->n_waiting >= s->p.max_queue)
        rc = KRS_ERR_FULL;
    uint64_t id = ++s->next_id;
    if (!rc) s->n_waiting++; /* hold the place while the request is built */
    pthread_mutex_unlock(&s->lock);
    if (rc) return rc;

    struct req *r = NULL;
    if ((rc = req_create(s, in, id, &r)) || (rc = registry_add(s, r))) {
        req_free(r);
        pthread_mutex_lock(&s->lock);
        s->n_waiting--;
        pthread_mutex_unlock(&s->lock);
        return rc;
    }
    *out_stream = r->stream;
    *out_id = id;
    if (s->metrics) metrics_record_submit(s->metrics, (enum metrics_priority)r->priority);
    pthread_mutex_lock(&s->state_lock);
    s->pub.submitted++;
    pthread_mutex_unlock(&s->state_lock);
    pthread_mutex_lock(&s->lock);
    r->next = NULL;
    if (s->inbox_tail)
        s->inbox_tail->next = r;
    else
        s->inbox_head = r;
    s->inbox_tail = r;
    pthread_cond_signal(&s->wake);
    pthread_mutex_unlock(&s->lock);
    return KRS_OK;
}

int sched_cancel(struct sched *s, uint64_t id)
{
    int rc = KRS_ERR_NOT_FOUND;
    pthread_mutex_lock(&s->reg_lock);
    for (int i = 0; i < s->n_live; i++)
        if (s->live[i]->id == id) {
            atomic_store(&s->live[i]->cancel, 1);
            rc = KRS_OK;
            break;
        }
    pthread_mutex_unlock(&s->reg_lock);
    if (!rc) {
        pthread_mutex_lock(&s->lock);
        pthread_cond_signal(&s->wake);
        pthread_mutex_unlock(&s->lock);
    }
    return rc;
}

void sched_cancel_all(struct sched *s, const char *reason)
{
    pthread_mutex_lock(&s->lock);
    s->cancel_all = 1;
    snprintf(s->cancel_reason, sizeof s->cancel_reason, "%s", reason ? reason : "cancelled");
    pthread_cond_signal(&s->wake);
    pthread_mutex_unlock(&s->lock);
}

int sched_set_mode(struct sched *s, enum sched_mode mode, int fixed_batch)
{
    if ((unsigned)mode > SCHED_MODE_OFF || fixed_batch < 0) return KRS_ERR_INVALID;
    pthread_mutex_lock(&s->lock);
    s->mode_pending = 1;
    s->new_mode = mode;
    s->new_fixed = fixed_batch;
    pthread_cond_signal(&s->wake);
    pthread_mutex_unlock(&s->lock);
    return KRS_OK;
}

int sched_max_ctx(const struct sched *s)
{
    return model_ctx_max_ctx(s->ctx);
}

void sched_drain(struct sched *s)
{
    pthread_mutex_lock(&s->lock);
    s->draining = 1;
    pthread_mutex_unlock(&s->lock);
    pthread_mutex_lock(&s->state_lock);
    s->pub.draining = 1;
    pthread_mutex_unlock(&s->state_lock);
}

void sched_get_state(struct sched *s, struct sched_state *out)
{
    pthread_mutex_lock(&s->state_lock);
    *out = s->pub;
    pthread_mutex_unlock(&s->state_lock);
}

void sched_get_controller(struct sched *s, struct controller_snapshot *out)
{
    pthread_mutex_lock(&s->state_lock);
    controller_state(&s->pub_ctrl, out);
    pthread_mutex_unlock(&s->state_lock);
}

int sched_list_requests(struct sched *s, struct sched_request_info *out, int cap)
{
    uint64_t now = clock_now_ns();
    pthread_mutex_lock(&s->reg_lock);
    int n = s->n_live;
    for (int i = 0; i < n && i < cap; i++) {
        const struct req *r = s->live[i];
        /* state/n_gen are written by the engine; a slightly stale view is fine here. */
        out[i].id = r->id;
        out[i].priority = r->priority;
        out[i].n_prompt = r->n_prompt;
        out[i].n_generated = __atomic_load_n(&r->n_gen, __ATOMIC_RELAXED);
        int st = __atomic_load_n((const int *)&r->state, __ATOMIC_RELAXED);
        int past = __atomic_load_n(&r->n_past, __ATOMIC_RELAXED);
        out[i].state = st == REQ_QUEUED     ? "queued"
                       : st == REQ_SHARED   ? "shared"
                       : past < r->n_prompt ? "prefill"
                                            : "decode";
        out[i].age_ms = clock_ns_to_ms(now - r->t_submit);
    }
    pthread_mutex_unlock(&s->reg_lock);
    return n;
}
