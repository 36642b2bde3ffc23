/* Thread pool: a generation word publishes each job (counter, how many threads take part, and
 * whether the job is dynamic); workers spin then sleep on a condvar.
 * A static job: the caller spins on `pending` until every worker has finished its share.
 * A dynamic job (pool_run_dynamic): workers join through `join` (the job's counter, a closed
 * bit and how many joined, one word); once the caller's own share is done it closes the job and
 * waits for those that joined. A worker that had not joined by then skips the job without
 * touching it: the CAS on `join` fails on the closed bit or on a newer job's counter. */
#include "util/threadpool.h"

#include "util/alloc.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <unistd.h>

#define SPIN_ITERS      20000
#define GEN_ACTIVE_MASK 0xFFFFu
#define GEN_DYNAMIC     0x10000u /* the job is dynamic */
#define GEN_STEP        0x20000u
#define JOIN_CLOSED     0x80000000u /* join: the caller closed the job */
#define JOIN_COUNT      0x7FFFFFFFu /* join: workers that joined */

struct worker {
    struct pool *pool;
    int ith;
    pthread_t thread;
};

struct pool {
    int n;
    struct worker *workers; /* [n - 1] */
    pthread_mutex_t lock;
    pthread_cond_t wake;
    /* (job counter << 16) | threads taking part: one word, so that a worker that reads a job's
     * counter reads its thread count with it, never the next job's. */
    _Atomic uint64_t gen;
    _Atomic int pending;
    _Atomic uint64_t join; /* dynamic job: (job counter << 32) | closed | joined */
    _Atomic int done;      /* dynamic job: joined workers that finished */
    _Atomic int stop;
    int sleepers; /* guarded by lock */
    pool_task_fn fn;
    void *ctx;
};

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static void *worker_main(void *arg)
{
    struct worker *w = arg;
    struct pool *p = w->pool;
    uint64_t seen = 0;
    for (;;) {
        uint64_t g = atomic_load_explicit(&p->gen, memory_order_acquire);
        for (int i = 0; g == seen && i < SPIN_ITERS; i++) {
            cpu_relax();
            g = atomic_load_explicit(&p->gen, memory_order_acquire);
        }
        if (g == seen) {
            pthread_mutex_lock(&p->lock);
            p->sleepers++;
            while ((g = atomic_load_explicit(&p->gen, memory_order_acquire)) == seen &&
                   !atomic_load(&p->stop))
                pthread_cond_wait(&p->wake, &p->lock);
            p->sleepers--;
            pthread_mutex_unlock(&p->lock);
        }
        if (atomic_load(&p->stop)) break;
        seen = g;
        int active = (int)(g & GEN_ACTIVE_MASK);
        if (w->ith >= active) continue; /* not part of this (small) job */
        if (g & GEN_DYNAMIC) {
            const uint64_t tag = (g / GEN_STEP) << 32;
            uint64_t j = atomic_load_explicit(&p->join, memory_order_acquire);
            int joined = 0;
            while ((j & ~(uint64_t)0xFFFFFFFFu) == tag && !(j & JOIN_CLOSED)) {
                if (atomic_compare_exchange_weak_explicit(&p->join, &j, j + 1, memory_order_acq_rel,
                                                          memory_order_acquire)) {
                    joined = 1;
                    break;
                }
            }
            if (!joined) continue; /* late: the caller finished the job without us */
            p->fn(p->ctx, w->ith, active);
            atomic_fetch_add_explicit(&p->done, 1, memory_order_release);
            continue;
        }
        p->fn(p->ctx, w->ith, active);
        atomic_fetch_sub_explicit(&p->pending, 1, memory_order_acq_rel);
    }
    return NULL;
}

int pool_create(int n_threads, struct pool **out)
{
    *out = NULL;
    if (n_threads <= 0) {
        long cpus = sysconf(_SC_NPROCESSORS_ONLN);
        n_threads = cpus > 0 ? (int)cpus : 1;
    }
    struct pool *p = alloc_calloc(1, sizeof *p);
    if (!p) return -1;
    p->n = n_threads;
    pthread_mutex_init(&p->lock, NULL);
    pthread_cond_init(&p->wake, NULL);
    p->workers = alloc_calloc((size_t)n_threads, sizeof *p->workers);
    if (!p->workers) goto fail;
    for (int i = 1; i < n_threads; i++) {
        p->workers[i - 1].pool = p;
        p->workers[i - 1].ith = i;
        if (pthread_create(&p->workers[i - 1].thread, NULL, worker_main, &p->workers[i - 1])) {
            p->n = i; /* only join what started */
            pool_destroy(p);
            return -1;
        }
    }
    *out = p;
    return 0;
fail:
    pthread_cond_destroy(&p->wake);
    pthread_mutex_destroy(&p->lock);
    alloc_free(p);
    return -1;
}

void pool_destroy(struct pool *p)
{
    if (!p) return;
    pthread_mutex_lock(&p->lock);
    atomic_store(&p->stop, 1);
    atomic_fetch_add(&p->gen, GEN_STEP);
    pthread_cond_broadcast(&p->wake);
    pthread_mutex_unlock(&p->lock);
    for (int i = 1; i < p->n; i++) pthread_join(p->workers[i - 1].thread, NULL);
    pthread_cond_destroy(&p->wake);
    pthread_mutex_destroy(&p->lock);
    alloc_free(p->workers);
    alloc_free(p);
}

int pool_size(const struct pool *p)
{
    return p->n;
}

void pool_run(struct pool *p, pool_task_fn fn, void *ctx)
{
    pool_run_n(p, p->n, fn, ctx);
}

/* Publishes a job to the workers (the job's fields first, then the generation word). */
static void publish(struct pool *p, int n_active, pool_task_fn fn, void *ctx, int dynamic)
{
    p->fn = fn;
    p->ctx = ctx;
    pthread_mutex_lock(&p->lock);
    uint64_t g = atomic_load_explicit(&p->gen, memory_order_relaxed); /* only we write it */
    uint64_t job = g / GEN_STEP + 1;
    if (dynamic) {
        atomic_store_explicit(&p->done, 0, memory_order_relaxed);
        atomic_store_explicit(&p->join, job << 32, memory_order_relaxed);
    } else {
        atomic_store_explicit(&p->pending, n_active - 1, memory_order_relaxed);
    }
    atomic_store_explicit(&p->gen,
                          job * GEN_STEP | (dynamic ? GEN_DYNAMIC : 0u) | (uint64_t)n_active,
                          memory_order_release);
    if (p->sleepers) pthread_cond_broadcast(&p->wake);
    pthread_mutex_unlock(&p->lock);
}

/* Runs one job: fn(ctx, 0, n) here, the other shares on the workers (see the top of the file). */
static void run_job(struct pool *p, int n_active, pool_task_fn fn, void *ctx, int dynamic)
{
    if (n_active > p->n) n_active = p->n;
    if (n_active <= 1) {
        fn(ctx, 0, 1);
        return;
    }
    publish(p, n_active, fn, ctx, dynamic);
    fn(ctx, 0, n_active);
    if (!dynamic) {
        while (atomic_load_explicit(&p->pending, memory_order_acquire) > 0) cpu_relax();
        return;
    }
    /* Our share ended when the work ran out: close the job, wait for who joined. */
    uint64_t j = atomic_fetch_or_explicit(&p->join, JOIN_CLOSED, memory_order_acq_rel);
    int joined = (int)(j & JOIN_COUNT);
    while (atomic_load_explicit(&p->done, memory_order_acquire) < joined) cpu_relax();
}

void pool_run_n(struct pool *p, int n_active, pool_task_fn fn, void *ctx)
{
    run_job(p, n_active, fn, ctx, 0);
}

void pool_run_dynamic(struct pool *p, int n_active, pool_task_fn fn, void *ctx)
{
    run_job(p, n_active, fn, ctx, 1);
}
