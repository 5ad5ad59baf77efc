/* pool.h: the thread pool the forward pass runs on (native/pool.c) and the scratch buffers it keeps. Internal
 * to the native library; Python never calls these.
 *
 * A pass makes a few hundred parallel_for calls; the cache (model.c) keeps one pool for all its passes.
 */
#ifndef DGGUF_POOL_H
#define DGGUF_POOL_H

#include <stddef.h>
#include <stdint.h>

typedef struct dg_pool dg_pool;

/* n_threads <= 1 (or a failed start) gives a pool that runs everything on the caller. */
dg_pool *pool_new(int n_threads);
void pool_free(dg_pool *p);
int pool_threads(const dg_pool *p);
/* Buffers the pool keeps from call to call (a pass's buffers would otherwise fault in fresh pages every pass):
 * pool_scratch gives one of at least `bytes` per thread, pool_shared one in all, per slot, 64-byte aligned; a
 * slot's buffers are replaced when they are too small or over 4x the request. NULL when out of memory. A slot's
 * contents are only valid until its next request, so each user has its own slot. */
enum { SCRATCH_ROWS, SCRATCH_SOFT_PROBS, SCRATCH_SOFT_PAIRS, SCRATCH_SOFT_BLOCK, SCRATCH_SOFT_STRIPS }; /* pool_scratch */
enum { SHARED_PASS, SHARED_SOFT_STATS, SHARED_SOFT_ACC, SHARED_SOFT_ROWS, SHARED_MATMUL_ACT,     /* pool_shared */
       SHARED_HEAD };
enum { POOL_SLOTS = 6 };
void **pool_scratch(dg_pool *p, int slot, size_t bytes);
void *pool_shared(dg_pool *p, int slot, size_t bytes);
/* Calls fn(ctx, lo, hi, thread) over contiguous pieces of [0, n) (a few per thread, claimed as the threads come
 * free; `thread` says whose scratch to use) and waits for all. */
void parallel_for(dg_pool *p, int64_t n, void (*fn)(void *ctx, int64_t lo, int64_t hi, int thread), void *ctx);

#endif
