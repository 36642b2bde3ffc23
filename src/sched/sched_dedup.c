/* Request dedup (performance.dedup): identical concurrent requests whose output is
 * deterministic share one generation.
 *
 * Two requests are identical when everything that decides their tokens and text is: prompt
 * tokens, max_tokens (as clamped to the context), every sampling parameter (the seed only when
 * the temperature is not 0: greedy ignores it), logit bias, stop ids and strings, ignore_eos,
 * the grammar's text, and the priority (a follower must not be served at another priority than
 * it asked for). Deterministic means greedy or an explicit seed: sampling with a random seed is
 * never shared, since two such requests are expected to differ.
 *
 * A new request joins a leader that is queued or still computing its prompt (no token
 * generated yet), so that the follower's stream gets every event from the first. The leader
 * alone sits in a queue or a KV slot and computes; each of its events is copied to its
 * followers' streams, and when it ends the followers end with it (same finish reason, each with
 * its own usage and timings). A follower that is cancelled (by id, its client gone, its
 * timeout, its stream full) ends alone. A leader that is cancelled alone hands its generation
 * to its oldest follower: the two requests swap their generation state (tokens, KV slot,
 * sampler and RNG, detokenizer, stop matcher, grammar matcher), so the follower goes on exactly
 * where the leader was, and the old leader ends with its own identity.
 *
 * The hash is computed by the submitting thread; matching, fan-out and hand-over run on the
 * engine thread, walk the running table and the queues, and allocate nothing. */
#include "sched/sched_impl.h"

#include "krserve.h"
#include "metrics/metrics.h"
#include "util/clock.h"
#include "util/log.h"

#include <string.h>

static uint64_t mix(uint64_t h, const void *p, size_t n)
{
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++) h = (h ^ b[i]) * 0x100000001b3ull; /* FNV-1a */
    return h;
}

/* The sampling parameters that decide the output, in a fixed layout (no padding, no
 * pointers). */
struct dedup_sampling {
    float temperature, top_p, min_p, repetition_penalty, presence_penalty, frequency_penalty;
    int32_t top_k, penalty_last_n, n_logit_bias, n_top_logprobs, skip_logprob, pad;
    uint64_t seed;
};

static void sampling_key(const struct sampler_params *p, struct dedup_sampling *k)
{
    memset(k, 0, sizeof *k);
    k->temperature = p->temperature;
    k->top_p = p->top_p;
    k->min_p = p->min_p;
    k->repetition_penalty = p->repetition_penalty;
    k->presence_penalty = p->presence_penalty;
    k->frequency_penalty = p->frequency_penalty;
    k->top_k = p->top_k;
    k->penalty_last_n = p->penalty_last_n;
    k->n_logit_bias = p->n_logit_bias;
    k->n_top_logprobs = p->n_top_logprobs;
    k->skip_logprob = p->skip_logprob;
    k->seed = p->temperature > 0.0f ? p->seed : 0; /* greedy draws nothing from it */
}

uint64_t sched_dedup_hash(const struct sched *s, const struct req *r, int has_seed)
{
    const struct sampler_params *sp = &r->sampler.params;
    if (!s->p.dedup || (sp->temperature > 0.0f && !has_seed)) return 0;
    struct dedup_sampling k;
    sampling_key(sp, &k);
    uint64_t h = 1469598103934665603ull;
    h = mix(h, &k, sizeof k);
    h = mix(h, r->tokens, (size_t)r->n_prompt * sizeof *r->tokens);
    int32_t ints[5] = {r->n_prompt, r->max_tokens, r->ignore_eos, (int32_t)r->priority,
                       r->n_stop_ids};
    h = mix(h, ints, sizeof ints);
    if (sp->n_logit_bias) h = mix(h, r->bias, (size_t)sp->n_logit_bias * sizeof *r->bias);
    if (r->n_stop_ids) h = mix(h, r->stop_ids, (size_t)r->n_stop_ids * sizeof *r->stop_ids);
    for (int i = 0; i < r->stop.n; i++) h = mix(h, r->stop.str[i], r->stop.len[i] + 1u);
    if (r->grammar) {
        const char *g = grammar_source(r->grammar);
        h = mix(h, g, strlen(g) + 1);
    }
    return h | 1; /* 0 means "not eligible" */
}

/* Everything sched_dedup_hash covers, compared exactly. */
static int same_generation(const struct req *a, const struct req *b)
{
    const struct sampler_params *pa = &a->sampler.params, *pb = &b->sampler.params;
    struct dedup_sampling ka, kb;
    sampling_key(pa, &ka);
    sampling_key(pb, &kb);
    if (a->dedup_hash != b->dedup_hash || memcmp(&ka, &kb, sizeof ka) ||
        a->n_prompt != b->n_prompt || a->max_tokens != b->max_tokens ||
        a->ignore_eos != b->ignore_eos || a->priority != b->priority ||
        a->n_stop_ids != b->n_stop_ids || a->stop.n != b->stop.n || !a->grammar != !b->grammar)
        return 0;
    if (memcmp(a->tokens, b->tokens, (size_t)a->n_prompt * sizeof *a->tokens) ||
        (pa->n_logit_bias &&
         memcmp(a->bias, b->bias, (size_t)pa->n_logit_bias * sizeof *a->bias)) ||
        (a->n_stop_ids &&
         memcmp(a->stop_ids, b->stop_ids, (size_t)a->n_stop_ids * sizeof *a->stop_ids)))
        return 0;
    for (int i = 0; i < a->stop.n; i++)
        if (a->stop.len[i] != b->stop.len[i] ||
            memcmp(a->stop.str[i], b->stop.str[i], a->stop.len[i]))
            return 0;
    return !a->grammar || a->grammar == b->grammar ||
           !strcmp(grammar_source(a->grammar), grammar_source(b->grammar));
}

/* l can take followers: a leader (not itself following) with nothing generated, still live. */
static int can_lead(const struct req *l, const struct req *r)
{
    return l && l != r && !l->leader && l->n_gen == 0 && !atomic_load(&l->cancel) &&
           !atomic_load(&l->stream->reader_gone) && same_generation(l, r);
}

static void link_follower(struct req *l, struct req *r)
{
    struct req **pp = &l->followers;
    while (*pp) pp = &(*pp)->next_follower;
    *pp = r;
    r->next_follower = NULL;
    r->leader = l;
}

struct req *sched_dedup_find_leader(struct sched *s, struct req *r)
{
    if (!r->dedup_hash) return NULL;
    struct req *l = NULL;
    for (int i = 0; i < s->p.max_running && !l; i++)
        if (can_lead(s->running[i], r)) l = s->running[i];
    for (struct req *q = s->q_head[r->priority]; q && !l; q = q->next)
        if (can_lead(q, r)) l = q;
    if (!l) return NULL;
    link_follower(l, r);
    __atomic_store_n(&r->state, REQ_SHARED, __ATOMIC_RELAXED);
    KRS_LOG_DEBUGF("request %llu shares the generation of request %llu", (unsigned long long)r->id,
                   (unsigned long long)l->id);
    uint64_t now = clock_now_ns();
    if (l->t_admit) { /* joined a running generation: admitted now */
        r->t_admit = now;
        r->n_cached = l->n_cached;
        if (s->metrics) metrics_record_admit(s->metrics, now - r->t_submit);
    }
    if (s->metrics) metrics_record_dedup(s->metrics);
    pthread_mutex_lock(&s->state_lock);
    s->pub.deduped++;
    pthread_mutex_unlock(&s->state_lock);
    return l;
}

void sched_dedup_admitted(struct sched *s, struct req *l, uint64_t now)
{
    for (struct req *f = l->followers; f; f = f->next_follower) {
        if (f->t_admit) continue;
        f->t_admit = now;
        f->n_cached = l->n_cached; /* the usage of an identical request, shared or not */
        if (s->metrics) metrics_record_admit(s->metrics, now - f->t_submit);
    }
}

void sched_dedup_fanout(struct sched *s, struct req *l, const struct sched_event *ev, int n,
                        uint64_t now)
{
    for (struct req *f = l->followers, *next; f; f = next) {
        next = f->next_follower;
        __atomic_store_n(&f->n_gen, l->n_gen, __ATOMIC_RELAXED);
        if (!f->t_first) {
            f->t_first = now;
            if (s->metrics) metrics_record_first_token(s->metrics, now - f->t_submit);
        }
        f->t_last = now;
        if (n > 0 && stream_push_many(f->stream, ev, n) != KRS_OK) {
            sched_dedup_detach(f);
            sched_end_one(s, f, SCHED_FINISH_CANCELLED, "stream buffer full: client too slow", now);
        }
    }
}

void sched_dedup_detach(struct req *f)
{
    struct req *l = f->leader;
    if (!l) return;
    struct req **pp = &l->followers;
    while (*pp && *pp != f) pp = &(*pp)->next_follower;
    if (*pp) *pp = f->next_follower;
    f->next_follower = NULL;
    f->leader = NULL;
}

static void swap_bytes(void *a, void *b, size_t n)
{
    unsigned char *x = a, *y = b;
    for (size_t i = 0; i < n; i++) {
        unsigned char t = x[i];
        x[i] = y[i];
        y[i] = t;
    }
}

#define SWAP(a, b, field) swap_bytes(&(a)->field, &(b)->field, sizeof(a)->field)

struct req *sched_dedup_promote(struct req *l)
{
    struct req *f = l->followers;
    l->followers = NULL;
    f->leader = NULL;
    f->followers = f->next_follower;
    f->next_follower = NULL;
    for (struct req *x = f->followers; x; x = x->next_follower) x->leader = f;
    /* The generation's state moves to f; l keeps f's untouched copy, freed with l. The sampler
     * points at its request's bias array, so the two move together. n_gen and n_cached are
     * already equal (the fan-out keeps them so). */
    int l_past = l->n_past, f_past = f->n_past; /* read by listings: atomic stores */
    enum req_state l_state = l->state, f_state = f->state;
    __atomic_store_n(&l->n_past, f_past, __ATOMIC_RELAXED);
    __atomic_store_n(&f->n_past, l_past, __ATOMIC_RELAXED);
    __atomic_store_n(&l->state, f_state, __ATOMIC_RELAXED);
    __atomic_store_n(&f->state, l_state, __ATOMIC_RELAXED);
    SWAP(l, f, tokens);
    SWAP(l, f, slot);
    SWAP(l, f, next);
    SWAP(l, f, admit_order);
    SWAP(l, f, preempted);
    SWAP(l, f, sampler);
    SWAP(l, f, bias);
    SWAP(l, f, detok);
    SWAP(l, f, stop);
    SWAP(l, f, gm);
    return f;
}
