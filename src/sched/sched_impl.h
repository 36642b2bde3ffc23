/* Private structures of the scheduler: requests, streams and the engine state. */
#ifndef KRS_SCHED_IMPL_H
#define KRS_SCHED_IMPL_H

#include "sched/sched.h"

#include "controller/controller.h"
#include "grammar/grammar.h"
#include "model/model.h"
#include "sampler/sampler.h"
#include "sampler/stop.h"
#include "tokenizer/tokenizer.h"

#include <pthread.h>
#include <stdatomic.h>

struct sched_stream {
    pthread_mutex_t lock;
    pthread_cond_t cv;
    struct sched_event *ring; /* [cap] */
    int cap, head, count;
    int finish_pushed; /* the FINISH event is in the ring (or was read) */
    int finish_read;
    int refs; /* engine + reader; freed at 0 */
    _Atomic int reader_gone;
    void (*notify)(void *);
    void *notify_arg;
    int notifying; /* notify callbacks running now (sched_stream_release waits for 0) */
    uint64_t id;
};

/* Stream side used by the engine. push returns KRS_ERR_FULL when fewer than n+1 slots are
 * free (one is always kept for FINISH). */
int stream_create(int cap, uint64_t id, struct sched_stream **out);
int stream_push_many(struct sched_stream *st, const struct sched_event *ev, int n);
void stream_push_finish(struct sched_stream *st, const struct sched_event *ev);
void stream_unref(struct sched_stream *st);

enum req_state { REQ_QUEUED = 0, REQ_RUNNING = 1, REQ_SHARED = 2 /* dedup follower */ };

struct req {
    uint64_t id;
    struct req *next; /* queue link */
    enum sched_priority priority;
    enum req_state state;
    int32_t *tokens; /* [n_prompt + max_tokens]: prompt then generated */
    int n_prompt, n_gen, max_tokens;
    int n_past;   /* tokens already in the KV cache */
    int n_cached; /* prompt tokens the prefix cache supplied at the first admission */
    int slot;     /* KV sequence slot while running, else -1 */
    uint64_t admit_order;
    int late_admit; /* admitted by the late limits past the batch limit (sched_admit.c) */
    struct sampler sampler;
    struct sampler_logit_bias *bias; /* owned copy */
    struct detok_state detok;
    struct stop_matcher stop;
    int32_t *stop_ids; /* owned copy */
    int n_stop_ids;
    int ignore_eos;
    uint64_t t_submit, t_admit, t_first, t_last, deadline;
    int preempted;
    _Atomic int cancel; /* set by sched_cancel from any thread */
    struct sched_stream *stream;
    struct grammar_matcher *gm; /* owned; NULL = unconstrained */
    /* Dedup (sched_dedup.c). A leader computes; its followers get copies of its events and are
     * in no queue and hold no KV slot, only the registry. */
    struct grammar *grammar; /* own reference, compared by dedup; NULL = unconstrained */
    uint64_t dedup_hash;     /* hash of everything that decides the output; 0 = not eligible */
    struct req *leader;      /* follower: whose generation it shares; NULL otherwise */
    struct req *followers;   /* leader: first follower (oldest), linked by next_follower */
    struct req *next_follower;
};

struct backend_sample_row;
struct sched;

/* sched_dedup.c (engine thread unless noted). */
/* The dedup hash of a request being built (any thread): 0 when dedup is off or the output is
 * not deterministic (sampling without an explicit seed). r's prompt, sampler, stop and grammar
 * must be set. */
uint64_t sched_dedup_hash(const struct sched *s, const struct req *r, int has_seed);
/* Looks for a live leader r can follow (same generation, nothing generated yet); links r to it
 * and returns it, or NULL. The caller takes r out of the waiting count. */
struct req *sched_dedup_find_leader(struct sched *s, struct req *r);
/* Leader l was admitted for the first time: its followers count as admitted now too. */
void sched_dedup_admitted(struct sched *s, struct req *l, uint64_t now);
/* Copies a step's events of leader l to its followers (their n_gen follows l's); a follower
 * whose stream is full ends alone with "client too slow". */
void sched_dedup_fanout(struct sched *s, struct req *l, const struct sched_event *ev, int n,
                        uint64_t now);
/* Leader l stops sharing (it is cancelled alone): its oldest follower takes over the
 * generation (tokens, KV slot, sampler, detokenizer, stop and grammar state are swapped) and
 * leads the others. Returns the new leader; the caller puts it where l was (slot or queue) and
 * then ends l. l must have followers. */
struct req *sched_dedup_promote(struct req *l);
/* Unlinks follower f from its leader. */
void sched_dedup_detach(struct req *f);

/* sched.c: ends r alone (never its followers) with FINISH `why`; r must be out of every queue
 * and list. Frees r. */
void sched_end_one(struct sched *s, struct req *r, enum sched_finish why, const char *reason,
                   uint64_t now);

/* sched_prefix.c: 1 when r (whose cached prefix is `cached` positions) should stay queued
 * because a running request is computing at least one more whole block of r's tokens. */
int sched_prefix_should_wait(const struct sched *s, const struct req *r, int64_t cached);

struct sched {
    const struct model *model;
    const struct tokenizer *tok;
    struct metrics *metrics;
    struct sched_params p;
    struct model_ctx *ctx;
    /* Sampling runs on the scheduler's own pool (pool_size threads), one scratch per thread;
     * results per row. The compute threads are the backend's and never sample. */
    struct pool *sample_pool;
    struct sampler_scratch **scratch; /* [n_scratch] */
    int n_scratch;
    int n_sample_rows;           /* rows of the step being sampled */
    _Atomic int next_sample_row; /* the next row a sampling thread claims */
    struct sampler_result *res;  /* [max_running] */
    int *res_rc;                 /* [max_running] */
    const float *cur_logits;     /* this step's logits, for the sampling workers */
    /* Device sampling (model_ctx_samples_on_device): per-row inputs and the logit edits of a
     * step, reserved for max_running rows and the model's edit capacity; NULL on the CPU. */
    int device_failed; /* a forward failed for a device reason (sticky) */
    char device_error[128];
    struct model_ctx_memory mem; /* last memory query (publish), and when */
    uint64_t mem_at_ns;
    struct backend_sample_row *dev_rows; /* [max_running] */
    struct sampler_edit *dev_edits;      /* [dev_edits_cap] */
    const uint32_t **dev_masks;          /* [max_running] grammar masks (matcher-owned) or NULL */
    int dev_max_masks;                   /* masked rows one device call may carry */
    int sampling_overlap;                /* 1: sampling is prepared while the device runs */
    int dev_any_mask;                    /* this step's rows include a masked one */
    int dev_edits_cap;
    int dev_n_edits;
    struct controller ctrl;
    pthread_t thread;
    /* Token texts for grammar matchers, built on the first constrained request. */
    pthread_mutex_t gvocab_lock;
    struct grammar_vocab *gvocab;

    /* Inbox: guarded by lock; the engine sleeps on wake. */
    pthread_mutex_t lock;
    pthread_cond_t wake;
    struct req *inbox_head, *inbox_tail;
    int stop;
    int cancel_all; /* end every request with cancel_reason at the next step */
    char cancel_reason[96];
    int draining;
    int mode_pending;
    enum sched_mode new_mode;
    int new_fixed;
    int n_waiting; /* inbox + queued, for the max_queue bound */
    uint64_t next_id;

    /* Registry of live requests (id -> req) for cancel and listing; guarded by reg_lock. */
    pthread_mutex_t reg_lock;
    struct req **live; /* [max_live] */
    int n_live, max_live;

    /* Engine-thread state. */
    struct req *q_head[3], *q_tail[3];
    int q_len[3];
    struct req **running; /* [max_running] by slot, NULL = free */
    int n_running;
    enum sched_mode mode;
    int limit;
    uint64_t admit_counter;
    uint64_t last_arrival_ns;
    double gap_ema_ns;
    double window_ns;
    int32_t *b_tokens, *b_pos, *b_seq; /* [max_batch_tokens] */
    uint8_t *b_want;
    struct req **b_rows; /* [max_running] req of each logits row */
    char *text_buf;      /* detok / stop scratch */
    size_t text_cap;

    /* Published state, guarded by state_lock. */
    pthread_mutex_t state_lock;
    struct sched_state pub;
    struct controller pub_ctrl; /* copy of ctrl as of the last publish */
};

/* sched_admit.c: admission and prompt-chunk policy (engine thread). */
struct admit_budget {
    uint64_t now;          /* the admission round's clock */
    int prefill_left;      /* prompt tokens the next step can still start */
    int late_prefill_left; /* ... for a late request (controller_late_prefill_budget) */
    int max_running;       /* sequences that may run (sched_admit_limit) */
    int late_max_running;  /* ... when the request is late (controller_late_admit_limit) */
    int past_limit;        /* set by admit_room: the request it let in needed the late limits */
};
/* The prompt tokens a step may carry next to n_decode decoding sequences, at most max_tokens;
 * `late`: against the late bound (a prompt whose first token is late, sched_is_late). */
int sched_prefill_budget(const struct sched *s, int n_decode, int max_tokens, int late);
/* Whether r, not yet past its first token, has waited the controller's late_wait_ms since it
 * was submitted (auto mode only). */
int sched_is_late(const struct sched *s, const struct req *r, uint64_t now);
/* Whether a running request still computing its prompt is late (sched_is_late). */
int sched_prompt_late(const struct sched *s, uint64_t now);
/* The most sequences that may run at once now: the batch limit, or in auto mode while the
 * engine is not saturated what the controller says it can take (controller_admit_limit); at
 * most max_running. */
int sched_admit_limit(const struct sched *s);
/* Starts an admission round at `now`: what the next step's prefill budget leaves for new
 * prompts, and the limits for requests on time and late. */
void admit_budget_init(const struct sched *s, struct admit_budget *b, uint64_t now);
/* The running sequences past the batch limit that late admissions put there (at most what runs
 * over the limit): the controller does not count them as what the limit let run. */
int sched_late_running(const struct sched *s);
/* Whether queued r may take a free slot now (batch limit, prefill budget; the late ones if r
 * is late); charges its prompt to b when it may. */
int admit_room(const struct sched *s, const struct req *r, struct admit_budget *b);

#endif
