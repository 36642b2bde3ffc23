/* Per-request token stream: a bounded ring of events between the engine (producer) and one
 * reader. The engine never waits: a push that does not fit fails, and the engine cancels the
 * request. One slot is always kept free for the FINISH event so that every request can end.
 * The stream is freed when both sides have let go (refcount).
 *
 * The notify callback runs without the stream's lock; `notifying` counts the calls in progress
 * so that sched_stream_release can wait for them: once it returns, the reader's callback
 * argument is never touched again and may be freed. (The pusher holds its own reference, so the
 * stream outlives the call.) */
#include "sched/sched_impl.h"

#include "krserve.h"
#include "util/alloc.h"
#include "util/clock.h"

#include <errno.h>
#include <string.h>
#include <time.h>

int stream_create(int cap, uint64_t id, struct sched_stream **out)
{
    *out = NULL;
    if (cap < 2) cap = 2;
    struct sched_stream *st = alloc_calloc(1, sizeof *st);
    if (!st) return KRS_ERR_NOMEM;
    st->ring = alloc_calloc((size_t)cap, sizeof *st->ring);
    if (!st->ring) {
        alloc_free(st);
        return KRS_ERR_NOMEM;
    }
    st->cap = cap;
    st->refs = 2;
    st->id = id;
    pthread_mutex_init(&st->lock, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&st->cv, &ca);
    pthread_condattr_destroy(&ca);
    *out = st;
    return KRS_OK;
}

static void stream_free(struct sched_stream *st)
{
    pthread_mutex_destroy(&st->lock);
    pthread_cond_destroy(&st->cv);
    alloc_free(st->ring);
    alloc_free(st);
}

void stream_unref(struct sched_stream *st)
{
    pthread_mutex_lock(&st->lock);
    int left = --st->refs;
    pthread_mutex_unlock(&st->lock);
    if (left == 0) stream_free(st);
}

static void notify(struct sched_stream *st)
{
    pthread_cond_broadcast(&st->cv);
    void (*fn)(void *) = st->notify;
    void *arg = st->notify_arg;
    if (fn) st->notifying++;
    pthread_mutex_unlock(&st->lock);
    if (!fn) return;
    fn(arg);
    pthread_mutex_lock(&st->lock);
    if (--st->notifying == 0) pthread_cond_broadcast(&st->cv);
    pthread_mutex_unlock(&st->lock);
}

int stream_push_many(struct sched_stream *st, const struct sched_event *ev, int n)
{
    pthread_mutex_lock(&st->lock);
    if (st->count + n > st->cap - 1) {
        pthread_mutex_unlock(&st->lock);
        return KRS_ERR_FULL;
    }
    for (int i = 0; i < n; i++) {
        st->ring[(st->head + st->count) % st->cap] = ev[i];
        st->count++;
    }
    notify(st);
    return KRS_OK;
}

void stream_push_finish(struct sched_stream *st, const struct sched_event *ev)
{
    pthread_mutex_lock(&st->lock);
    /* The reserved slot guarantees room. */
    st->ring[(st->head + st->count) % st->cap] = *ev;
    st->count++;
    st->finish_pushed = 1;
    notify(st);
}

static int pop_locked(struct sched_stream *st, struct sched_event *ev)
{
    *ev = st->ring[st->head];
    st->head = (st->head + 1) % st->cap;
    st->count--;
    if (ev->kind == SCHED_EV_FINISH) st->finish_read = 1;
    return KRS_OK;
}

int sched_stream_read(struct sched_stream *st, struct sched_event *ev, int timeout_ms)
{
    struct timespec deadline;
    if (timeout_ms >= 0) {
        uint64_t t = clock_now_ns() + (uint64_t)timeout_ms * 1000000u;
        deadline.tv_sec = (time_t)(t / 1000000000u);
        deadline.tv_nsec = (long)(t % 1000000000u);
    }
    pthread_mutex_lock(&st->lock);
    int rc = KRS_OK;
    while (st->count == 0) {
        if (st->finish_read) {
            rc = KRS_ERR_STATE;
            goto out;
        }
        if (timeout_ms < 0) {
            pthread_cond_wait(&st->cv, &st->lock);
        } else if (pthread_cond_timedwait(&st->cv, &st->lock, &deadline) == ETIMEDOUT &&
                   st->count == 0) {
            rc = KRS_ERR_AGAIN;
            goto out;
        }
    }
    rc = pop_locked(st, ev);
out:
    pthread_mutex_unlock(&st->lock);
    return rc;
}

int sched_stream_try_read(struct sched_stream *st, struct sched_event *ev)
{
    pthread_mutex_lock(&st->lock);
    int rc = st->count ? pop_locked(st, ev) : (st->finish_read ? KRS_ERR_STATE : KRS_ERR_AGAIN);
    pthread_mutex_unlock(&st->lock);
    return rc;
}

void sched_stream_set_notify(struct sched_stream *st, void (*fn)(void *), void *arg)
{
    pthread_mutex_lock(&st->lock);
    st->notify = fn;
    st->notify_arg = arg;
    pthread_mutex_unlock(&st->lock);
}

uint64_t sched_stream_id(const struct sched_stream *st)
{
    return st->id;
}

void sched_stream_release(struct sched_stream *st)
{
    if (!st) return;
    pthread_mutex_lock(&st->lock);
    st->notify = NULL;
    while (st->notifying > 0) pthread_cond_wait(&st->cv, &st->lock);
    pthread_mutex_unlock(&st->lock);
    atomic_store(&st->reader_gone, 1);
    stream_unref(st);
}
