/* pool.c: the thread pool the forward pass runs on (parallel_for: [0, n) in contiguous pieces that the
 * threads claim as they come) and the scratch buffers it keeps from call to call, per thread (pool_scratch)
 * or shared (pool_shared). See pool.h.
 */
#include "pool.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>

#include "compat.h"

/* ---- thread pool ------------------------------------------------------------------------------------
 * A pass makes a few hundred parallel_for calls, most of them short: sleeping on a condition variable between
 * them costs ~40 us per call (a futex wake and a join), as much as the whole one-token encoder pass does in
 * arithmetic. So workers and the caller first spin on atomics for a short while (SPIN_ROUNDS pauses, ~0.1 ms;
 * not at all when the threads outnumber the CPUs), and only then sleep; a sleeper is counted under the mutex, and
 * the other side broadcasts only when one is counted (the count and the generation are sequentially consistent,
 * so no wake-up is lost).
 *
 * Work is cut into PIECES_PER_THREAD pieces per thread, claimed one at a time: on a machine where other
 * processes hold the cores, a worker that is not running claims nothing and the others (the caller included)
 * take its share, instead of the whole pass waiting for its next time slice. Every job computes each item of
 * [0, n) from that item alone (per-thread buffers are scratch), so any cut gives the same bits. */

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define CPU_RELAX() _mm_pause()
#elif defined(__aarch64__)
#define CPU_RELAX() __asm__ __volatile__("yield")
#else
#define CPU_RELAX() ((void)0)
#endif

enum { SPIN_ROUNDS = 4000,      /* ~0.1 ms of pauses on Zen 4 */
       PIECES_PER_THREAD = 4 };

struct dg_pool {
    int n;                       /* threads, the caller included */
    int spin;                    /* rounds to spin before sleeping: 0 when threads outnumber the CPUs */
    pthread_t *workers;          /* n - 1 */
    pthread_mutex_t mu;
    pthread_cond_t work, done_cv;
    _Atomic uint64_t generation; /* bumped for every parallel_for (after the job fields are written) */
    _Atomic uint64_t claim;      /* the current job: generation (bits 32-63), pieces (16-31), next unclaimed (0-15) */
    _Atomic int64_t done;        /* pieces of the current job finished */
    _Atomic int sleeping;        /* workers waiting on `work` */
    _Atomic int caller_sleeping; /* the caller waits on `done` */
    _Atomic int stop;
    void (*fn)(void *, int64_t, int64_t, int);
    void *ctx;
    int64_t total, pieces;
    void **scratch[POOL_SLOTS];  /* per slot: a buffer per thread (pool_scratch) */
    size_t scratch_bytes[POOL_SLOTS];
    void *shared[POOL_SLOTS];    /* per slot: one buffer (pool_shared) */
    size_t shared_bytes[POOL_SLOTS];
};

typedef struct {
    dg_pool *p;
    int id;
} worker_arg;

static void chunk(int64_t total, int64_t n, int64_t i, int64_t *lo, int64_t *hi) {
    *lo = total * i / n;
    *hi = total * (i + 1) / n;
}

/* Claims the next piece of job `gen`; 0 when the job has none left or is no longer current. The piece count is
 * read from the claim word itself: a worker late from the last job must not compare its exhausted counter with
 * the next job's count while the caller is writing that job's fields (it would claim a piece of no job, run it
 * with the new job's arguments and count it as one of the new job's pieces, so the caller could return while a
 * real piece still runs on its stack). */
static int claim_piece(dg_pool *p, uint32_t gen, int64_t *piece) {
    uint64_t v = atomic_load(&p->claim);
    for (;;) {
        if ((uint32_t)(v >> 32) != gen || (v & 0xffff) >= ((v >> 16) & 0xffff)) return 0;
        if (atomic_compare_exchange_weak(&p->claim, &v, v + 1)) {
            *piece = (int64_t)(v & 0xffff);
            return 1;
        }
    }
}

/* Runs pieces of job `gen` until none is left; whoever finishes the last one wakes a sleeping caller. */
static void run_pieces(dg_pool *p, uint32_t gen, int thread) {
    int64_t piece, lo, hi;
    while (claim_piece(p, gen, &piece)) {
        chunk(p->total, p->pieces, piece, &lo, &hi);
        if (lo < hi) p->fn(p->ctx, lo, hi, thread);
        if (atomic_fetch_add(&p->done, 1) + 1 == p->pieces && atomic_load(&p->caller_sleeping)) {
            pthread_mutex_lock(&p->mu);
            pthread_cond_signal(&p->done_cv);
            pthread_mutex_unlock(&p->mu);
        }
    }
}

/* Waits until the generation moves past seen (or stop); returns the new generation. */
static uint64_t wait_for_work(dg_pool *p, uint64_t seen) {
    for (int i = 0; i < p->spin; i++) {
        uint64_t g = atomic_load(&p->generation);
        if (g != seen || atomic_load(&p->stop)) return g;
        CPU_RELAX();
    }
    pthread_mutex_lock(&p->mu);
    atomic_fetch_add(&p->sleeping, 1);
    while (atomic_load(&p->generation) == seen && !atomic_load(&p->stop)) pthread_cond_wait(&p->work, &p->mu);
    atomic_fetch_sub(&p->sleeping, 1);
    pthread_mutex_unlock(&p->mu);
    return atomic_load(&p->generation);
}

static void *worker_main(void *arg) {
    worker_arg *a = arg;
    dg_pool *p = a->p;
    const int id = a->id;
    free(a);
    uint64_t seen = 0;
    for (;;) {
        seen = wait_for_work(p, seen);
        if (atomic_load(&p->stop)) break;
        run_pieces(p, (uint32_t)seen, id);
    }
    return NULL;
}

dg_pool *pool_new(int n_threads) {
    dg_pool *p = calloc(1, sizeof *p);
    if (!p) return NULL;
    p->n = 1;
    if (n_threads <= 1) return p;
    p->workers = calloc((size_t)n_threads - 1, sizeof *p->workers);
    if (!p->workers) return p;
    /* a spinning thread would hold a CPU that a working one is waiting for */
    const long cpus = dg_cpu_count();
    p->spin = cpus > 0 && n_threads > cpus ? 0 : SPIN_ROUNDS;
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->work, NULL);
    pthread_cond_init(&p->done_cv, NULL);
    for (int i = 1; i < n_threads; i++) {
        worker_arg *a = malloc(sizeof *a);
        if (!a) break;
        a->p = p;
        a->id = i;
        if (pthread_create(&p->workers[i - 1], NULL, worker_main, a) != 0) {
            free(a);
            break;
        }
        p->n = i + 1;
    }
    return p;
}

static size_t round64(size_t bytes) { return (bytes + 63) / 64 * 64; }

/* Keeps *buf if it holds `bytes` and is not over 4x that (a long prompt's buffers are not kept for the canvases);
 * otherwise replaces it. */
static void *fit(void **buf, size_t *have, size_t bytes) {
    bytes = round64(bytes ? bytes : 64);
    if (*buf && bytes <= *have && bytes >= *have / 4) return *buf;
    dg_aligned_free(*buf);
    *have = 0;
    if ((*buf = dg_aligned_alloc(64, bytes))) *have = bytes;
    return *buf;
}

void **pool_scratch(dg_pool *p, int slot, size_t bytes) {
    if (!p || slot < 0 || slot >= POOL_SLOTS) return NULL;
    if (!p->scratch[slot] && !(p->scratch[slot] = calloc((size_t)p->n, sizeof(void *)))) return NULL;
    size_t have = p->scratch_bytes[slot];
    for (int i = 0; i < p->n; i++) {
        size_t h = have;
        if (!fit(&p->scratch[slot][i], &h, bytes)) {
            p->scratch_bytes[slot] = 0;       /* the others are refitted next time */
            return NULL;
        }
        p->scratch_bytes[slot] = h;
    }
    return p->scratch[slot];
}

void *pool_shared(dg_pool *p, int slot, size_t bytes) {
    if (!p || slot < 0 || slot >= POOL_SLOTS) return NULL;
    return fit(&p->shared[slot], &p->shared_bytes[slot], bytes);
}

void pool_free(dg_pool *p) {
    if (!p) return;
    for (int k = 0; k < POOL_SLOTS; k++) {
        for (int i = 0; p->scratch[k] && i < p->n; i++) dg_aligned_free(p->scratch[k][i]);
        free(p->scratch[k]);
        dg_aligned_free(p->shared[k]);
    }
    if (p->workers) {
        pthread_mutex_lock(&p->mu);
        atomic_store(&p->stop, 1);
        pthread_cond_broadcast(&p->work);
        pthread_mutex_unlock(&p->mu);
        for (int i = 0; i < p->n - 1; i++) pthread_join(p->workers[i], NULL);
        pthread_mutex_destroy(&p->mu);
        pthread_cond_destroy(&p->work);
        pthread_cond_destroy(&p->done_cv);
        free(p->workers);
    }
    free(p);
}

int pool_threads(const dg_pool *p) { return p ? p->n : 1; }

void parallel_for(dg_pool *p, int64_t n, void (*fn)(void *, int64_t, int64_t, int), void *ctx) {
    if (n <= 0) return;
    if (!p || p->n == 1 || n == 1) {
        fn(ctx, 0, n, 0);
        return;
    }
    p->fn = fn;                                   /* workers read these after claiming a piece of this job */
    p->ctx = ctx;
    p->total = n;
    const int64_t most = (int64_t)PIECES_PER_THREAD * p->n < 0xffff ? (int64_t)PIECES_PER_THREAD * p->n : 0xffff;
    p->pieces = n < most ? n : most;
    atomic_store(&p->done, 0);
    const uint32_t gen = (uint32_t)(atomic_load(&p->generation) + 1);
    atomic_store(&p->claim, (uint64_t)gen << 32 | (uint64_t)p->pieces << 16);  /* opens the job's pieces */
    atomic_store(&p->generation, gen);            /* and wakes the workers */
    if (atomic_load(&p->sleeping)) {
        pthread_mutex_lock(&p->mu);
        pthread_cond_broadcast(&p->work);
        pthread_mutex_unlock(&p->mu);
    }
    run_pieces(p, gen, 0);
    for (int i = 0; i < p->spin && atomic_load(&p->done) < p->pieces; i++) CPU_RELAX();
    if (atomic_load(&p->done) < p->pieces) {       /* a worker is still inside a piece it claimed */
        pthread_mutex_lock(&p->mu);
        atomic_store(&p->caller_sleeping, 1);
        while (atomic_load(&p->done) < p->pieces) pthread_cond_wait(&p->done_cv, &p->mu);
        atomic_store(&p->caller_sleeping, 0);
        pthread_mutex_unlock(&p->mu);
    }
}
