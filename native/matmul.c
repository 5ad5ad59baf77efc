/* matmul.c: products of activations with a stored (quantized) weight, split across the pool's threads
 * (see matmul.h): the matmul and the MoE's grouped matmul, which pick the kernel (gemm.h: float, int8 or
 * bfloat16 activations) and prepare the activations for it once per call, and the soft embedding, a softmax
 * over the vocabulary times the embedding matrix. Every output element is computed by one thread in one
 * order, so results do not depend on the thread count.
 */
#include "matmul.h"
#include "gemm.h"
#include "imatrix.h"          /* imatrix_tap */
#include "ops.h"              /* exp_nonpositive, row_max */
#include "quant_internal.h"   /* DG_CLONES */

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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
    imatrix_tap(w, x, off);
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
enum { SOFT_BATCH = 8 };   /* SOFT_BLOCK: gemm.h */

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
    float **strips;              /* per thread, float path: the axpy function's scratch (a block of rows) */
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
            axpy(j->acc + lo * H, pb, j->batch_rows + r0 * H, nt, nv, H, j->strips[thread]);
        }
    }
}

static void soft_output(void *ctx, int64_t lo, int64_t hi, int thread) {
    soft_job *j = ctx;
    for (int64_t i = lo * j->H; i < hi * j->H; i++) j->out[i] = (float)j->acc[i] * j->scale;
}

int dg_soft_embed(const dg_tensor *w, const float *logits, int64_t n, float scale, int top_k, float *out,
                  int n_threads, char *err, size_t errlen) {
    if (!w || !w->data || !logits || !out || n < 0 || w->ne0 < 1 || w->ne1 < 1 || w->ne2 != 1) {
        snprintf(err, errlen, "dg_soft_embed: bad arguments");
        return DG_E_SHAPE;
    }
    dg_pool *p = pool_new(n_threads);
    int rc = top_k ? soft_embed_top_k(p, out, logits, w, scale, n, top_k, err, errlen)
                   : soft_embed(p, out, logits, w, scale, n, err, errlen);
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
    j.strips = bf16 ? NULL : (float **)pool_scratch(p, SCRATCH_SOFT_STRIPS, (size_t)(SOFT_BLOCK * H) * sizeof(float));
    j.pb = (float **)pool_scratch(p, SCRATCH_SOFT_PROBS, (size_t)(per_thread * SOFT_BLOCK) * sizeof(float));
    j.pw = (uint32_t **)pool_scratch(p, SCRATCH_SOFT_PAIRS, (size_t)(per_thread * SOFT_BLOCK / 2) * sizeof(uint32_t));
    if (!j.mx || !j.acc || (w->type != DG_TYPE_F32 && !bf16 && !j.rows) || (bf16 && (!j.pairs || !j.block)) ||
        (!bf16 && !j.strips) ||
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

/* ---- the soft embedding over each token's most probable rows --------------------------------------------- */

typedef struct {
    float *out;
    const float *logits;
    const dg_tensor *w;
    size_t row_bytes;
    int64_t H, V;
    float scale;
    int k;
    void **buf;                  /* per thread: k indices, H doubles, H floats (one dequantized row) */
    int *status;                 /* per thread: -1 a row would not dequantize */
} top_k_job;

/* a ranks before b: a larger logit, or an equal one at a lower row */
static int ranks_before(const float *l, int32_t a, int32_t b) { return l[a] > l[b] || (l[a] == l[b] && a < b); }

static void sift_down(int32_t *heap, int k, int i, const float *l) {   /* a heap whose root ranks last */
    for (;;) {
        int c = 2 * i + 1;
        if (c >= k) return;
        if (c + 1 < k && ranks_before(l, heap[c], heap[c + 1])) c++;
        if (!ranks_before(l, heap[i], heap[c])) return;
        const int32_t t = heap[i];
        heap[i] = heap[c];
        heap[c] = t;
        i = c;
    }
}

static int ascending(const void *a, const void *b) { return (*(const int32_t *)a > *(const int32_t *)b) -
                                                           (*(const int32_t *)a < *(const int32_t *)b); }

/* The k rows that rank first (largest logit, ties to the lower row), in ascending row order. */
static void top_rows(int32_t *idx, const float *l, int64_t V, int k) {
    for (int i = 0; i < k; i++) idx[i] = i;
    for (int i = k / 2 - 1; i >= 0; i--) sift_down(idx, k, i, l);
    for (int64_t v = k; v < V; v++)
        if (ranks_before(l, (int32_t)v, idx[0])) {
            idx[0] = (int32_t)v;
            sift_down(idx, k, 0, l);
        }
    qsort(idx, (size_t)k, sizeof *idx, ascending);
}

static void top_k_tokens(void *ctx, int64_t lo, int64_t hi, int thread) {
    top_k_job *j = ctx;
    const int64_t H = j->H;
    int32_t *idx = j->buf[thread];
    double *acc = (double *)((char *)j->buf[thread] + ((size_t)j->k * sizeof(int32_t) + 7) / 8 * 8);
    float *row = (float *)(acc + H);
    char err[8];
    for (int64_t t = lo; t < hi; t++) {
        const float *l = j->logits + t * j->V;
        top_rows(idx, l, j->V, j->k);
        float mx = l[idx[0]];
        for (int i = 1; i < j->k; i++) mx = l[idx[i]] > mx ? l[idx[i]] : mx;
        double z = 0.0;
        for (int i = 0; i < j->k; i++) z += exp_nonpositive(l[idx[i]] - mx);
        memset(acc, 0, (size_t)H * sizeof(double));
        for (int i = 0; i < j->k; i++) {
            const double pv = exp_nonpositive(l[idx[i]] - mx) / z;
            const char *src = (const char *)j->w->data + (size_t)idx[i] * j->row_bytes;
            if (dg_dequantize_rows(j->w->type, src, row, 1, H, err, sizeof err) != 0) {
                j->status[thread] = -1;
                return;
            }
            for (int64_t h = 0; h < H; h++) acc[h] += pv * row[h];
        }
        for (int64_t h = 0; h < H; h++) j->out[t * H + h] = (float)(acc[h] * j->scale);
    }
}

int soft_embed_top_k(dg_pool *p, float *out, const float *logits, const dg_tensor *w, float scale, int64_t n,
                     int top_k, char *err, size_t errlen) {
    const int64_t H = w->ne0, V = w->ne1;
    const size_t rb = checked_row_bytes("soft_embed_top_k", w, err, errlen);
    if (rb == 0) return DG_E_TYPE;
    if (top_k < 1 || top_k > V) {
        snprintf(err, errlen, "soft_embed_top_k: top_k %d is outside 1..%lld", top_k, (long long)V);
        return DG_E_SHAPE;
    }
    const int nt = pool_threads(p);
    int status[nt];
    memset(status, 0, sizeof status);
    const size_t per_thread = ((size_t)top_k * sizeof(int32_t) + 7) / 8 * 8 + (size_t)H * (sizeof(double) + sizeof(float));
    top_k_job j = {out, logits, w, rb, H, V, scale, top_k, pool_scratch(p, SCRATCH_ROWS, per_thread), status};
    if (!j.buf) {
        snprintf(err, errlen, "soft_embed_top_k: out of memory");
        return DG_E_VALUE;
    }
    parallel_for(p, n, top_k_tokens, &j);
    for (int i = 0; i < nt; i++)
        if (status[i]) {
            snprintf(err, errlen, "soft_embed_top_k: cannot dequantize a row of type %d", w->type);
            return DG_E_TYPE;
        }
    return DG_OK;
}
