/* ops.c: the ops of the forward pass (see ops.h), plain scalar C, and the thread pool they run on.
 *
 * Numerics follow transformers in fp32: rmsnorm is x * (mean(x^2) + eps)^-0.5 (then * w), softmax
 * subtracts the max, gelu is the tanh form. Sums of squares and softmax denominators are accumulated
 * in double, dot products in eight float lanes added in a fixed tree: every output element is computed
 * by one thread in one order, whatever the thread count.
 */
#define _POSIX_C_SOURCE 200809L
#include "ops.h"
#include "gemm.h"
#include "quant_internal.h"   /* DG_CLONES */

#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* ---- thread pool ------------------------------------------------------------------------------------
 * A pass makes a few hundred parallel_for calls, most of them short: sleeping on a condition variable between
 * them costs ~40 us per call (a futex wake and a join), as much as the whole one-token encoder pass does in
 * arithmetic. So workers and the caller first spin on atomics for a short while (SPIN_ROUNDS pauses, ~0.1 ms;
 * not at all when the threads outnumber the CPUs), and only then sleep; a sleeper is counted under the mutex, and
 * the other side broadcasts only when one is counted (the count and the generation are sequentially consistent,
 * so no wake-up is lost). */

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define CPU_RELAX() _mm_pause()
#elif defined(__aarch64__)
#define CPU_RELAX() __asm__ __volatile__("yield")
#else
#define CPU_RELAX() ((void)0)
#endif

enum { SPIN_ROUNDS = 4000 };   /* ~0.1 ms of pauses on Zen 4 */

struct dg_pool {
    int n;                       /* threads, the caller included */
    int spin;                    /* rounds to spin before sleeping: 0 when threads outnumber the CPUs */
    pthread_t *workers;          /* n - 1 */
    pthread_mutex_t mu;
    pthread_cond_t work, done;
    _Atomic uint64_t generation; /* bumped for every parallel_for (after the job fields are written) */
    _Atomic int pending;         /* workers still running the current job */
    _Atomic int sleeping;        /* workers waiting on `work` */
    _Atomic int caller_sleeping; /* the caller waits on `done` */
    _Atomic int stop;
    void (*fn)(void *, int64_t, int64_t, int);
    void *ctx;
    int64_t total;
    void **scratch[POOL_SLOTS];  /* per slot: a buffer per thread (pool_scratch) */
    size_t scratch_bytes[POOL_SLOTS];
    void *shared[POOL_SLOTS];    /* per slot: one buffer (pool_shared) */
    size_t shared_bytes[POOL_SLOTS];
};

typedef struct {
    dg_pool *p;
    int id;
} worker_arg;

static void chunk(int64_t total, int n, int i, int64_t *lo, int64_t *hi) {
    *lo = total * i / n;
    *hi = total * (i + 1) / n;
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
        int64_t lo, hi;
        chunk(p->total, p->n, id, &lo, &hi);
        if (lo < hi) p->fn(p->ctx, lo, hi, id);
        if (atomic_fetch_sub(&p->pending, 1) == 1 && atomic_load(&p->caller_sleeping)) {
            pthread_mutex_lock(&p->mu);
            pthread_cond_signal(&p->done);
            pthread_mutex_unlock(&p->mu);
        }
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
    const long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    p->spin = cpus > 0 && n_threads > cpus ? 0 : SPIN_ROUNDS;
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->work, NULL);
    pthread_cond_init(&p->done, NULL);
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
    free(*buf);
    *have = 0;
    if ((*buf = aligned_alloc(64, bytes))) *have = bytes;
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
        for (int i = 0; p->scratch[k] && i < p->n; i++) free(p->scratch[k][i]);
        free(p->scratch[k]);
        free(p->shared[k]);
    }
    if (p->workers) {
        pthread_mutex_lock(&p->mu);
        atomic_store(&p->stop, 1);
        pthread_cond_broadcast(&p->work);
        pthread_mutex_unlock(&p->mu);
        for (int i = 0; i < p->n - 1; i++) pthread_join(p->workers[i], NULL);
        pthread_mutex_destroy(&p->mu);
        pthread_cond_destroy(&p->work);
        pthread_cond_destroy(&p->done);
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
    p->fn = fn;                                   /* workers read these after seeing the new generation */
    p->ctx = ctx;
    p->total = n;
    atomic_store(&p->pending, p->n - 1);
    atomic_fetch_add(&p->generation, 1);
    if (atomic_load(&p->sleeping)) {
        pthread_mutex_lock(&p->mu);
        pthread_cond_broadcast(&p->work);
        pthread_mutex_unlock(&p->mu);
    }
    int64_t lo, hi;
    chunk(n, p->n, 0, &lo, &hi);
    if (lo < hi) fn(ctx, lo, hi, 0);
    for (int i = 0; i < p->spin && atomic_load(&p->pending) > 0; i++) CPU_RELAX();
    if (atomic_load(&p->pending) > 0) {
        pthread_mutex_lock(&p->mu);
        atomic_store(&p->caller_sleeping, 1);
        while (atomic_load(&p->pending) > 0) pthread_cond_wait(&p->done, &p->mu);
        atomic_store(&p->caller_sleeping, 0);
        pthread_mutex_unlock(&p->mu);
    }
}

/* ---- elementwise ops -------------------------------------------------------------------------------- */

/* The sum of squares runs in 8 double lanes (a fixed order that vectorises; each square of a float is exact in
 * double), then the lanes are added in order. */
DG_CLONES
void rmsnorm(float *out, const float *x, const float *w, int64_t n, float eps) {
    double lane[8] = {0}, ss = 0.0;
    int64_t i0 = 0;
    for (; i0 + 8 <= n; i0 += 8)
        for (int j = 0; j < 8; j++) lane[j] += (double)x[i0 + j] * x[i0 + j];
    for (int64_t i = i0; i < n; i++) lane[0] += (double)x[i] * x[i];
    for (int j = 0; j < 8; j++) ss += lane[j];
    const float ms = (float)(ss / (double)n) + eps;
    const float inv = (float)(1.0 / sqrt((double)ms));
    if (w)
        for (int64_t i = 0; i < n; i++) out[i] = x[i] * inv * w[i];
    else
        for (int64_t i = 0; i < n; i++) out[i] = x[i] * inv;
}

DG_CLONES
void softmax(float *x, int64_t n) {
    float max = x[0];
    for (int64_t i = 1; i < n; i++) max = x[i] > max ? x[i] : max;
    for (int64_t i = 0; i < n; i++) x[i] = exp_nonpositive(x[i] - max);
    double sum = 0.0;
    for (int64_t i = 0; i < n; i++) sum += x[i];
    const float s = (float)sum;
    for (int64_t i = 0; i < n; i++) x[i] /= s;
}

DG_CLONES
void gelu_tanh(float *x, int64_t n) {
    const float k = 0.7978845608028654f;   /* sqrt(2/pi) */
    for (int64_t i = 0; i < n; i++) {
        const float v = x[i];
        x[i] = 0.5f * v * (1.0f + tanh_poly(k * (v + 0.044715f * v * v * v)));
    }
}

void rope_angles(float *cs, const float *inv_freq, int64_t pos, int n_pairs) {
    for (int i = 0; i < n_pairs; i++) {
        const float angle = (float)pos * inv_freq[i];   /* fp32 product, as transformers computes freqs */
        cs[2 * i] = cosf(angle);
        cs[2 * i + 1] = sinf(angle);
    }
}

void rope_rotate(float *x, const float *cs, int d, int n_pairs) {
    const int half = d / 2;
    for (int i = 0; i < n_pairs; i++) {
        const float c = cs[2 * i], s = cs[2 * i + 1];
        const float x1 = x[i], x2 = x[i + half];
        x[i] = x1 * c - x2 * s;
        x[i + half] = x2 * c + x1 * s;
    }
}

void rope(float *x, const float *inv_freq, int64_t pos, int d, int n_pairs) {
    float cs[2 * (n_pairs > 0 ? n_pairs : 1)];
    rope_angles(cs, inv_freq, pos, n_pairs);
    rope_rotate(x, cs, d, n_pairs);
}

int rope_freqs(const dg_model *m, const dg_layer *ly, float *inv_freq) {
    const int d = ly->head_dim, pairs = ly->sliding ? d / 2 : m->rope_pairs_full;
    const double theta = ly->sliding ? m->theta_sliding : m->theta_full;
    for (int i = 0; i < pairs; i++) {
        const float expo = (float)(2 * i) / (float)d;
        inv_freq[i] = 1.0f / (float)pow(theta, (double)expo);
    }
    return pairs;
}

/* Row-wise elementwise ops run on the pool: each element depends only on itself, so any split gives the
 * same bits. */
typedef struct {
    float *x;
    const float *y;
    int64_t width;
    float cap;
} rows_job;

static void gelu_mul_rows(void *ctx, int64_t lo, int64_t hi, int thread) {
    const rows_job *j = ctx;
    const int64_t a = lo * j->width, b = hi * j->width;
    gelu_tanh(j->x + a, b - a);
    for (int64_t i = a; i < b; i++) j->x[i] *= j->y[i];
}

void gelu_mul(dg_pool *p, float *g, const float *u, int64_t n, int64_t width) {
    rows_job j = {g, u, width, 0.0f};
    parallel_for(p, n, gelu_mul_rows, &j);
}

typedef struct {
    float *out;
    const float *x, *w;
    int64_t width;
    float eps;
} norm_job;

static void rmsnorm_items(void *ctx, int64_t lo, int64_t hi, int thread) {
    const norm_job *j = ctx;
    for (int64_t t = lo; t < hi; t++) rmsnorm(j->out + t * j->width, j->x + t * j->width, j->w, j->width, j->eps);
}

void rmsnorm_rows(dg_pool *p, float *out, const float *x, const float *w, int64_t n, int64_t width, float eps) {
    norm_job j = {out, x, w, width, eps};
    parallel_for(p, n, rmsnorm_items, &j);
}

DG_CLONES
static void softcap_values(float *x, int64_t n, float cap) {
    for (int64_t i = 0; i < n; i++) x[i] = tanh_poly(x[i] / cap) * cap;
}

static void softcap_rows(void *ctx, int64_t lo, int64_t hi, int thread) {
    const rows_job *j = ctx;
    softcap_values(j->x + lo * j->width, (hi - lo) * j->width, j->cap);
}

void softcap(dg_pool *p, float *x, int64_t n, int64_t width, float cap) {
    rows_job j = {x, NULL, width, cap};
    parallel_for(p, n, softcap_rows, &j);
}

DG_CLONES
void dg_tanh(const float *x, float *out, int64_t n) {
    for (int64_t i = 0; i < n; i++) out[i] = tanh_poly(x[i]);
}

void topk(int *idx, const float *x, int n, int k) {
    for (int j = 0; j < k; j++) {
        int best = -1;
        for (int i = 0; i < n; i++) {
            int taken = 0;
            for (int t = 0; t < j; t++) taken |= idx[t] == i;
            if (taken) continue;
            if (best < 0 || x[i] > x[best]) best = i;   /* strict: ties keep the lower index */
        }
        idx[j] = best;
    }
}

/* ---- matmul ----------------------------------------------------------------------------------------- */

size_t tensor_row_bytes(const dg_tensor *w) {
    int64_t bs, ts;
    char err[8];
    if (dg_type_size(w->type, &bs, &ts, err, sizeof err) != 0 || bs <= 0 || w->ne0 % bs) return 0;
    return (size_t)(w->ne0 / bs * ts);
}

/* What a worker needs beside its job: a buffer for weight rows (dequantized floats or unpacked int8 groups), and
 * where it reports a failure (-1: a row would not dequantize, -2: out of memory). */
typedef struct {
    void **rowbuf;               /* per thread */
    int *status;                 /* per thread */
} weight_scratch;

/* Bytes per row of w, or 0 with the error written when w's type cannot hold its rows. */
static size_t checked_row_bytes(const char *op, const dg_tensor *w, char *err, size_t errlen) {
    const size_t rb = tensor_row_bytes(w);
    if (rb == 0)
        snprintf(err, errlen, "%s: weight of type %d cannot hold rows of %lld values", op, w->type,
                 (long long)w->ne0);
    return rb;
}

/* Runs fn over [0, n) on the pool with buf_bytes of scratch per thread (sc lives in job), then turns the
 * workers' statuses into one error. */
static int run_with_rows(dg_pool *p, const char *op, const dg_tensor *w, size_t buf_bytes, int64_t n,
                         void (*fn)(void *, int64_t, int64_t, int), void *job, weight_scratch *sc,
                         char *err, size_t errlen) {
    const int nt = pool_threads(p);
    int status[nt];
    memset(status, 0, sizeof status);
    sc->status = status;
    sc->rowbuf = pool_scratch(p, SCRATCH_ROWS, buf_bytes);
    if (!sc->rowbuf) {
        snprintf(err, errlen, "%s: out of memory", op);
        return DG_E_VALUE;
    }
    parallel_for(p, n, fn, job);
    for (int i = 0; i < nt; i++) {
        if (status[i] == -2) {
            snprintf(err, errlen, "%s: out of memory", op);
            return DG_E_VALUE;
        }
        if (status[i]) {
            snprintf(err, errlen, "%s: cannot dequantize a row of type %d", op, w->type);
            return DG_E_TYPE;
        }
    }
    return DG_OK;
}

enum { TILE_ROWS = 4 };   /* rows per item for the float kernels; INT8_ROWS for the int8 ones */

/* The grouped matmul's work: items of up to `rows` rows of one matrix, each weighted by its token count. */
typedef struct {
    float *out;
    const float *x;
    const act_group *xq;         /* int8 path: x quantized, ng groups per token */
    const uint32_t *xb;          /* bfloat16 path (BF16 weights): x in bfloat16 pairs, ncols / 2 words a token */
    bf16_tile_fn bf16;
    const int64_t *off;          /* tokens of matrix e: off[e] .. off[e + 1] - 1 */
    const char *base;            /* first row of the first matrix */
    size_t row_bytes;
    int type;
    int64_t ncols, nrows, ng, rows;
    tile_fn tile;
    const int8_kernel *k8;       /* NULL: float activations */
    const int8_type *t8;
    int64_t n_items;
    const int64_t *start;        /* work before item i (token-rows); the total at n_items */
    const int32_t *mat;          /* matrix of item i */
    const int64_t *row;          /* first row of item i */
    weight_scratch sc;           /* `rows` rows per thread */
} matmul_job;

/* Items whose start lies in [lo, hi): each item is one thread's whole, so any split gives the same bits. */
static void matmul_items(void *ctx, int64_t lo, int64_t hi, int thread) {
    matmul_job *j = ctx;
    char err[8];
    int64_t a = 0, b = j->n_items;               /* first item starting at or after lo */
    while (a < b) {
        const int64_t m = (a + b) / 2;
        if (j->start[m] < lo) a = m + 1; else b = m;
    }
    for (int64_t it = a; it < j->n_items && j->start[it] < hi; it++) {
        const int64_t e = j->mat[it], r0 = j->row[it], t0 = j->off[e], nt = j->off[e + 1] - t0;
        const int nr = (int)(j->nrows - r0 < j->rows ? j->nrows - r0 : j->rows);
        const char *src = j->base + ((size_t)e * (size_t)j->nrows + (size_t)r0) * j->row_bytes;
        float *out = j->out + t0 * j->nrows + r0;
        if (j->k8 && j->k8->rows && nt < INT8_FEW) {
            j->k8->rows(out, j->nrows, j->xq + t0 * j->ng, nt, src, j->row_bytes, nr, j->ncols, j->t8);
            continue;
        }
        if (j->bf16) {                           /* the stored rows are the kernel's words */
            const int64_t np = j->ncols / 2;
            const uint32_t *rows[INT8_ROWS];
            for (int i = 0; i < nr; i++) rows[i] = (const uint32_t *)(const void *)(src + (size_t)i * j->row_bytes);
            j->bf16(out, j->nrows, j->xb + t0 * np, nt, rows, nr, np);
            continue;
        }
        if (j->k8) {
            wgt_group *buf = j->sc.rowbuf[thread];
            const wgt_group *rows[INT8_ROWS];
            for (int i = 0; i < nr; i++) {
                rows[i] = buf + i * j->ng;
                j->k8->unpack(j->t8, src + (size_t)i * j->row_bytes, j->ncols, buf + i * j->ng);
            }
            j->k8->tile(out, j->nrows, j->xq + t0 * j->ng, nt, rows, nr, j->ncols, j->t8);
            continue;
        }
        const float *rows[TILE_ROWS];
        for (int i = 0; i < nr; i++) {
            rows[i] = (const float *)(src + (size_t)i * j->row_bytes);
            if (j->type != DG_TYPE_F32) {
                float *buf = (float *)j->sc.rowbuf[thread] + (size_t)i * (size_t)j->ncols;
                if (dg_dequantize_rows(j->type, src + (size_t)i * j->row_bytes, buf, 1, j->ncols, err, sizeof err) != 0) {
                    j->sc.status[thread] = -1;
                    return;
                }
                rows[i] = buf;
            }
        }
        j->tile(out, j->nrows, j->x + t0 * j->ncols, nt, rows, nr, j->ncols);
    }
}

typedef struct {
    act_group *xq;
    const float *x;
    int64_t ncols, ng;
    const int8_kernel *k8;
    const int8_type *t8;
} quantize_job;

static void quantize_tokens(void *ctx, int64_t lo, int64_t hi, int thread) {
    const quantize_job *j = ctx;
    for (int64_t t = lo; t < hi; t++) j->k8->quantize(j->t8, j->x + t * j->ncols, j->ncols, j->xq + t * j->ng);
}

typedef struct {
    uint32_t *xb;
    const float *x;
    int64_t ncols;
} pack_job;

static void pack_tokens(void *ctx, int64_t lo, int64_t hi, int thread) {
    const pack_job *j = ctx;
    for (int64_t t = lo; t < hi; t++) pack_bf16_pairs(j->xb + t * (j->ncols / 2), j->x + t * j->ncols, j->ncols);
}

int dg_matmul(const dg_tensor *w, int64_t mat, const float *x, int64_t n, float *out, int n_threads,
              char *err, size_t errlen) {
    if (!w || !w->data || !x || !out || n < 0 || w->ne0 < 1 || w->ne1 < 1 || w->ne2 < 1) {
        snprintf(err, errlen, "dg_matmul: bad arguments");
        return DG_E_SHAPE;
    }
    dg_pool *p = pool_new(n_threads);
    int rc = matmul(p, out, x, w, mat, n, err, errlen);
    pool_free(p);
    return rc;
}

int matmul(dg_pool *p, float *out, const float *x, const dg_tensor *w, int64_t mat, int64_t n,
           char *err, size_t errlen) {
    if (mat < 0 || mat >= w->ne2) {
        snprintf(err, errlen, "matmul: matrix %lld of %lld", (long long)mat, (long long)w->ne2);
        return DG_E_SHAPE;
    }
    int64_t off[w->ne2 + 1];
    for (int64_t e = 0; e <= w->ne2; e++) off[e] = e > mat ? n : 0;
    return matmul_grouped(p, out, x, w, off, err, errlen);
}

int matmul_grouped(dg_pool *p, float *out, const float *x, const dg_tensor *w, const int64_t *off,
                   char *err, size_t errlen) {
    const size_t rb = checked_row_bytes("matmul", w, err, errlen);
    if (rb == 0) return DG_E_TYPE;
    const int64_t E = w->ne2, R = w->ne1, K = w->ne0, n = off[E];
    if (n <= 0) return DG_OK;
    const int8_kernel *k8 = matmul_int8();
    const int8_type *t8 = k8 ? int8_type_of(w->type) : NULL;
    if (!t8) k8 = NULL;
    /* BF16 rows of an even length are read in place as bfloat16 pairs where the kernel has a bf16 tile */
    const bf16_tile_fn bf16 = w->type == DG_TYPE_BF16 && K % 2 == 0 ? matmul_bf16() : NULL;
    const int64_t rows = k8 || bf16 ? INT8_ROWS : TILE_ROWS, per_mat = (R + rows - 1) / rows;
    const int64_t ng = int8_groups(K);
    int64_t *start = malloc((size_t)(E * per_mat + 1) * sizeof *start), *row = malloc((size_t)(E * per_mat) * sizeof *row);
    int32_t *mats = malloc((size_t)(E * per_mat) * sizeof *mats);
    act_group *xq = k8 ? pool_shared(p, SHARED_MATMUL_ACT, (size_t)n * (size_t)ng * sizeof *xq) : NULL;
    uint32_t *xb = bf16 ? pool_shared(p, SHARED_MATMUL_ACT, (size_t)n * (size_t)(K / 2) * sizeof *xb) : NULL;
    int rc = DG_OK;
    if (!start || !row || !mats || (k8 && !xq) || (bf16 && !xb)) {
        snprintf(err, errlen, "matmul: out of memory");
        rc = DG_E_VALUE;
        goto done;
    }
    int64_t items = 0, work = 0;
    for (int64_t e = 0; e < E; e++)
        for (int64_t r0 = 0; r0 < R && off[e + 1] > off[e]; r0 += rows, items++) {
            start[items] = work;
            mats[items] = (int32_t)e;
            row[items] = r0;
            work += (off[e + 1] - off[e]) * (R - r0 < rows ? R - r0 : rows);
        }
    start[items] = work;
    if (k8) {
        quantize_job q = {xq, x, K, ng, k8, t8};
        parallel_for(p, n, quantize_tokens, &q);
    }
    if (bf16) {
        pack_job q = {xb, x, K};
        parallel_for(p, n, pack_tokens, &q);
    }
    matmul_job j = {out, x, xq, xb, bf16, off, w->data, rb, w->type, K, R, ng, rows, matmul_tile(), k8, t8,
                    items, start, mats, row, {0}};
    int64_t most = 0;            /* tokens of the busiest matrix: with few, the int8 rows path needs no buffer */
    for (int64_t e = 0; e < E; e++) most = off[e + 1] - off[e] > most ? off[e + 1] - off[e] : most;
    const size_t buf = bf16 || (k8 && k8->rows && most < INT8_FEW) ? 0
                       : (size_t)rows * (k8 ? (size_t)ng * sizeof(wgt_group) : (size_t)K * sizeof(float));
    rc = run_with_rows(p, "matmul", w, buf, work, matmul_items, &j, &j.sc, err, errlen);
done:
    free(start);
    free(row);
    free(mats);
    return rc;
}

/* ---- soft embedding --------------------------------------------------------------------------------- */

/* The vocabulary goes in batches of SOFT_BATCH blocks of SOFT_BLOCK rows. The threads first dequantize a batch
 * together (a block each) into one shared buffer, then split the tokens: each token's probabilities for a block
 * are formed and the block is accumulated into that token's double sums, blocks in ascending order, so the bits
 * do not depend on the thread count; a block of rows stays in L2 while a thread sweeps its tokens over it. */
enum { SOFT_BLOCK = 128, SOFT_BATCH = 8 };

static int64_t min_i64(int64_t a, int64_t b) { return a < b ? a : b; }

typedef struct {
    float *out;
    const float *logits;
    const dg_tensor *w;
    size_t row_bytes;
    int64_t H, V;
    float scale;
    axpy_bf16_fn bf16;           /* non-NULL: accumulate in bfloat16 pairs (gemm.h) */
    float *mx, *sum;             /* [n] softmax statistics */
    double *acc;                 /* [n, H] */
    float *rows;                 /* shared, float path: the batch's rows (F32: unused, rows are read in place) */
    uint32_t *pairs;             /* shared, bf16 path: the batch's rows in bfloat16 pairs */
    float **block;               /* per thread, bf16 path: two rows dequantized, to be paired */
    const float *batch_rows;     /* float path: the batch's rows, in rows or the mapped F32 tensor */
    int64_t v0;                  /* the batch's first row */
    float **pb;                  /* per thread: probabilities [tokens, SOFT_BLOCK] */
    uint32_t **pw;               /* per thread: their bfloat16 pairs */
    int *status;                 /* per thread: -1 a row would not dequantize */
} soft_job;

/* Max and sum of exp(l - max) of each of nt rows of V logits; the sum in LANES double lanes in a fixed order. */
DG_CLONES
static void softmax_stats(float *mx, float *sum, const float *logits, int64_t nt, int64_t V) {
    enum { LANES = 16 };
    for (int64_t t = 0; t < nt; t++) {
        const float *l = logits + t * V;
        const float m = row_max(l, V);
        double z[LANES] = {0}, total = 0.0;
        int64_t v = 0;
        for (; v + LANES <= V; v += LANES)
            for (int j = 0; j < LANES; j++) z[j] += exp_nonpositive(l[v + j] - m);
        for (; v < V; v++) z[0] += exp_nonpositive(l[v] - m);
        for (int j = 0; j < LANES; j++) total += z[j];
        mx[t] = m;
        sum[t] = (float)total;
    }
}

DG_CLONES
static void probabilities(float *p, const float *l, int64_t nv, float mx, float sum) {
    for (int64_t v = 0; v < nv; v++) p[v] = exp_nonpositive(l[v] - mx) / sum;
}

static void soft_stats(void *ctx, int64_t lo, int64_t hi, int thread) {
    soft_job *j = ctx;
    softmax_stats(j->mx + lo, j->sum + lo, j->logits + lo * j->V, hi - lo, j->V);
}

/* Blocks [lo, hi) of the batch: dequantized into the shared rows, or (bf16 path, quantized types only) into
 * the thread's block buffer and paired into the shared pairs. */
static void soft_rows(void *ctx, int64_t lo, int64_t hi, int thread) {
    soft_job *j = ctx;
    const int64_t H = j->H;
    char err[8];
    for (int64_t b = lo; b < hi; b++) {
        const int64_t r0 = b * SOFT_BLOCK, nv = min_i64(SOFT_BLOCK, j->V - j->v0 - r0);
        const char *src = (const char *)j->w->data + (size_t)(j->v0 + r0) * j->row_bytes;
        if (j->w->type == DG_TYPE_F32) continue;
        if (!j->bf16) {
            if (dg_dequantize_rows(j->w->type, src, j->rows + r0 * H, nv, H, err, sizeof err) != 0) {
                j->status[thread] = -1;
                return;
            }
            continue;
        }
        /* two rows at a time, so they are paired while still in L1 */
        float *wb = j->block[thread];
        uint32_t *ww = j->pairs + r0 / 2 * H;
        for (int64_t m = 0; m < (nv + 1) / 2; m++) {
            const int64_t two = min_i64(2, nv - 2 * m);
            if (dg_dequantize_rows(j->w->type, src + (size_t)(2 * m) * j->row_bytes, wb, two, H, err, sizeof err)) {
                j->status[thread] = -1;
                return;
            }
            pack_bf16_rows(ww + m * H, wb, two == 2 ? wb + H : NULL, H);
        }
    }
}

/* Tokens [lo, hi) over every block of the batch, in order. */
static void soft_tokens(void *ctx, int64_t lo, int64_t hi, int thread) {
    soft_job *j = ctx;
    const int64_t H = j->H, nt = hi - lo, nb = min_i64(SOFT_BATCH * SOFT_BLOCK, j->V - j->v0);
    float *pb = j->pb[thread];
    uint32_t *pw = j->pw[thread];
    const axpy_fn axpy = soft_embed_axpy();
    for (int64_t r0 = 0; r0 < nb; r0 += SOFT_BLOCK) {
        const int64_t nv = min_i64(SOFT_BLOCK, nb - r0), np = (nv + 1) / 2;
        for (int64_t t = 0; t < nt; t++)
            probabilities(pb + t * nv, j->logits + (lo + t) * j->V + j->v0 + r0, nv, j->mx[lo + t], j->sum[lo + t]);
        if (j->bf16) {
            for (int64_t t = 0; t < nt; t++) pack_bf16_pairs(pw + t * np, pb + t * nv, nv);
            j->bf16(j->acc + lo * H, pw, j->pairs + r0 / 2 * H, nt, np, H);
        } else {
            axpy(j->acc + lo * H, pb, j->batch_rows + r0 * H, nt, nv, H);
        }
    }
}

static void soft_output(void *ctx, int64_t lo, int64_t hi, int thread) {
    soft_job *j = ctx;
    for (int64_t i = lo * j->H; i < hi * j->H; i++) j->out[i] = (float)j->acc[i] * j->scale;
}

int dg_soft_embed(const dg_tensor *w, const float *logits, int64_t n, float scale, float *out, int n_threads,
                  char *err, size_t errlen) {
    if (!w || !w->data || !logits || !out || n < 0 || w->ne0 < 1 || w->ne1 < 1 || w->ne2 != 1) {
        snprintf(err, errlen, "dg_soft_embed: bad arguments");
        return DG_E_SHAPE;
    }
    dg_pool *p = pool_new(n_threads);
    int rc = soft_embed(p, out, logits, w, scale, n, err, errlen);
    pool_free(p);
    return rc;
}

int soft_embed(dg_pool *p, float *out, const float *logits, const dg_tensor *w, float scale, int64_t n,
               char *err, size_t errlen) {
    const size_t rb = checked_row_bytes("soft_embed", w, err, errlen);
    if (rb == 0) return DG_E_TYPE;
    if (n <= 0) return DG_OK;
    const int nt = pool_threads(p);
    const int64_t H = w->ne0, V = w->ne1, per_thread = (n + nt - 1) / nt;
    const int64_t batch = SOFT_BATCH * SOFT_BLOCK * H;
    /* bfloat16 pairs where the kernel has them and the embedding is quantized or BF16 (whose rows are exact in
     * bfloat16, so only the probabilities round, as the bf16 matmul rounds its activations); F32/F16 stay exact */
    const axpy_bf16_fn bf16 = int8_type_of(w->type) || w->type == DG_TYPE_BF16 ? soft_embed_bf16() : NULL;
    int status[nt];
    memset(status, 0, sizeof status);
    soft_job j = {out, logits, w, rb, H, V, scale, bf16, .status = status};
    /* every buffer is the pool's, kept from pass to pass (fresh pages cost as much as the arithmetic) */
    j.mx = pool_shared(p, SHARED_SOFT_STATS, (size_t)n * 2 * sizeof(float));
    j.acc = pool_shared(p, SHARED_SOFT_ACC, (size_t)(n * H) * sizeof(double));
    if (bf16)
        j.pairs = pool_shared(p, SHARED_SOFT_ROWS, (size_t)batch / 2 * sizeof(uint32_t));
    else if (w->type != DG_TYPE_F32)
        j.rows = pool_shared(p, SHARED_SOFT_ROWS, (size_t)batch * sizeof(float));
    j.block = bf16 ? (float **)pool_scratch(p, SCRATCH_SOFT_BLOCK, (size_t)(2 * H) * sizeof(float)) : NULL;
    j.pb = (float **)pool_scratch(p, SCRATCH_SOFT_PROBS, (size_t)(per_thread * SOFT_BLOCK) * sizeof(float));
    j.pw = (uint32_t **)pool_scratch(p, SCRATCH_SOFT_PAIRS, (size_t)(per_thread * SOFT_BLOCK / 2) * sizeof(uint32_t));
    if (!j.mx || !j.acc || (w->type != DG_TYPE_F32 && !bf16 && !j.rows) || (bf16 && (!j.pairs || !j.block)) ||
        !j.pb || !j.pw) {
        snprintf(err, errlen, "soft_embed: out of memory");
        return DG_E_VALUE;
    }
    memset(j.acc, 0, (size_t)(n * H) * sizeof(double));
    j.sum = j.mx + n;
    parallel_for(p, n, soft_stats, &j);
    for (j.v0 = 0; j.v0 < V; j.v0 += SOFT_BATCH * SOFT_BLOCK) {
        j.batch_rows = w->type == DG_TYPE_F32 ? (const float *)w->data + j.v0 * H : j.rows;
        parallel_for(p, (min_i64(SOFT_BATCH * SOFT_BLOCK, V - j.v0) + SOFT_BLOCK - 1) / SOFT_BLOCK, soft_rows, &j);
        for (int i = 0; i < nt; i++)
            if (status[i]) {
                snprintf(err, errlen, "soft_embed: cannot dequantize a row of type %d", w->type);
                return DG_E_TYPE;
            }
        parallel_for(p, n, soft_tokens, &j);
    }
    parallel_for(p, n, soft_output, &j);
    return DG_OK;
}

/* ---- attention -------------------------------------------------------------------------------------- */

/* Scores of one query against n key rows (stride floats apart), four keys at a time through the matmul kernel. */
static void scores_of(float *scores, const float *q, const float *k, int64_t n, int64_t stride, int d,
                      tile_fn tile) {
    for (int64_t j = 0; j < n; j += 4) {
        const int nr = (int)(n - j < 4 ? n - j : 4);
        const float *rows[4];
        for (int r = 0; r < nr; r++) rows[r] = k + (j + r) * stride;
        tile(scores + j, 0, q, 1, rows, nr, d);
    }
}

void attention(float *out, const float *q, const float *ka, const float *va, int64_t na,
               const float *kb, const float *vb, int64_t nb, int64_t stride, int d, float *scores) {
    const tile_fn tile = matmul_tile();
    const axpy_f32_fn axpy = attention_axpy();
    scores_of(scores, q, ka, na, stride, d, tile);
    scores_of(scores + na, q, kb, nb, stride, d, tile);
    softmax(scores, na + nb);
    for (int i = 0; i < d; i++) out[i] = 0.0f;
    for (int64_t j = 0; j < na; j++) axpy(out, scores[j], va + j * stride, d);
    for (int64_t j = 0; j < nb; j++) axpy(out, scores[na + j], vb + j * stride, d);
}
