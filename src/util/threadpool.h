/* A persistent worker thread pool for data-parallel kernels.
 *
 * pool_run(pool, fn, ctx) calls fn(ctx, ith, nth) once for every ith in [0, nth), where
 * nth = pool_size(pool); the calling thread runs ith = 0 itself, workers run the rest, and
 * pool_run returns when all have finished. Threads are created once by pool_create; no thread
 * is created per call. Workers spin briefly after each job (kernels arrive back to back during
 * a forward pass) and then sleep on a condition variable, so an idle pool costs no CPU.
 *
 * One caller at a time: pool_run is not reentrant and must not be called concurrently on the
 * same pool (the engine thread owns its pool). */
#ifndef KRS_UTIL_THREADPOOL_H
#define KRS_UTIL_THREADPOOL_H

struct pool;
typedef void (*pool_task_fn)(void *ctx, int ith, int nth);

/* n_threads <= 0 means one per online CPU. Returns 0 or -1 (out of memory / thread failure).
 * The caller owns *out and frees it with pool_destroy. */
int pool_create(int n_threads, struct pool **out);
void pool_destroy(struct pool *pool);
int pool_size(const struct pool *pool);
void pool_run(struct pool *pool, pool_task_fn fn, void *ctx);
/* pool_run on the first n_active threads only (clamped to [1, pool_size]): fn(ctx, ith,
 * n_active) for ith < n_active. For jobs too small to pay for waking every thread: the call
 * then waits for n_active - 1 workers instead of all of them. */
void pool_run_n(struct pool *pool, int n_active, pool_task_fn fn, void *ctx);
/* pool_run_n for jobs whose threads claim their work from a shared counter, so that any subset
 * of them, the caller alone included, does all of it. fn(ctx, ith, n_active) runs on the
 * caller (ith 0) and on each worker (ith < n_active) that starts before the caller's own fn
 * has returned; the call returns once those have finished. A worker that was late (descheduled,
 * still waking) skips the job instead of holding the step up. Each ith runs at most once. */
void pool_run_dynamic(struct pool *pool, int n_active, pool_task_fn fn, void *ctx);

/* Splits [0, n) into nth nearly equal chunks; chunk ith is [*begin, *end). */
static inline void pool_split(long n, int ith, int nth, long *begin, long *end)
{
    long per = n / nth, extra = n % nth;
    *begin = ith * per + (ith < extra ? ith : extra);
    *end = *begin + per + (ith < extra ? 1 : 0);
}

#endif
