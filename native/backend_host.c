/* backend_host.c: the host backend (backend.h): the device interface on host memory with the CPU kernels. It is
 * the CPU forward itself (dg_encode / dg_decode run model.c's passes on an unchecked one, in place), and the
 * stand-in device on which the hybrid executor runs, and is tested, where there is no GPU.
 *
 * It plays a device strictly: allocations count against a byte budget and fail beyond it; every byte that
 * crosses (upload, download, prefetch) is counted; and, when checking (dg_host_backend_new), every pointer a
 * kernel or copy is given must lie inside a live allocation of its side: device pointers inside this backend's
 * allocations (with the whole extent the op touches), host pointers outside them. A forward that would read
 * the mapped file from a "device" kernel, or copy to the wrong side, fails here as it would on a GPU.
 *
 * The kernels are ops.c's, matmul.c's and attention.c's functions, each output element computed by one thread in
 * a fixed order (any thread count gives the same bits); their threads' scratch is host memory outside the budget
 * (a GPU's registers and shared memory). The prefetch slots copy at once; there is nothing to overlap.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "attention.h"
#include "backend.h"
#include "matmul.h"
#include "ops.h"
#include "pool.h"
#include "quant_internal.h"

#define FAIL(code, ...) do { snprintf(err, errlen, __VA_ARGS__); return (code); } while (0)

typedef struct {
    char *ptr;                   /* DG_ALIGN-aligned, inside base (plain malloc: aligned_alloc is not everywhere) */
    void *base;
    size_t bytes;
} host_alloc_rec;

typedef struct {
    dg_pool *pool;
    int checked;                 /* check every pointer's side (a backend standing for a device) */
    host_alloc_rec *allocs;      /* sorted by address */
    int64_t n_allocs, cap_allocs;
    void *ws;
    size_t ws_bytes;
    float **rows;                /* per thread: a row of scratch (rmsnorm's accumulate, the router) */
    size_t rows_floats;
    float *att_scratch, *kv_f32;  /* attention: its threads' scratch; f16 cache rows widened */
    size_t att_floats, kv_floats;
} host_impl;

static host_impl *impl_of(dg_backend *b) { return (host_impl *)b->impl; }

/* The live allocation holding [p, p + bytes), or NULL. */
static const host_alloc_rec *find(const host_impl *h, const void *p, size_t bytes) {
    int64_t lo = 0, hi = h->n_allocs;
    const char *c = (const char *)p;
    while (lo < hi) {   /* the last allocation starting at or below p */
        const int64_t mid = (lo + hi) / 2;
        if (h->allocs[mid].ptr <= c) lo = mid + 1; else hi = mid;
    }
    if (lo == 0) return NULL;
    const host_alloc_rec *r = &h->allocs[lo - 1];
    return (c >= r->ptr && bytes <= r->bytes && (size_t)(c - r->ptr) <= r->bytes - bytes) ? r : NULL;
}

/* A device extent an op touches: inside one live allocation. */
static int dev_ok(const host_impl *h, const void *p, size_t bytes, const char *what, char *err, size_t errlen) {
    if (!h->checked) return DG_OK;
    if (!p || !find(h, p, bytes ? bytes : 1))
        FAIL(DG_E_VALUE, "host backend: %s: %zu bytes at %p are not inside device memory", what, bytes, p);
    return DG_OK;
}

/* A host extent of a copy: not device memory. */
static int host_ok(const host_impl *h, const void *p, size_t bytes, const char *what, char *err, size_t errlen) {
    if (!p && bytes) FAIL(DG_E_VALUE, "host backend: %s: no host pointer", what);
    if (h->checked && bytes && find(h, p, 1))
        FAIL(DG_E_VALUE, "host backend: %s: %p is device memory where host memory was expected", what, p);
    return DG_OK;
}

#define DEV(p, bytes, what) do { int rc_ = dev_ok(h, (p), (size_t)(bytes), (what), err, errlen); \
                                 if (rc_ != DG_OK) return rc_; } while (0)
#define HOST(p, bytes, what) do { int rc_ = host_ok(h, (p), (size_t)(bytes), (what), err, errlen); \
                                  if (rc_ != DG_OK) return rc_; } while (0)

static size_t tensor_bytes(const dg_tensor *t) { return tensor_row_bytes(t) * (size_t)t->ne1 * (size_t)t->ne2; }

static int weight_ok(const host_impl *h, const dg_tensor *w, const char *what, char *err, size_t errlen) {
    if (!w || tensor_row_bytes(w) == 0) FAIL(DG_E_TYPE, "host backend: %s: bad weight", what);
    return dev_ok(h, w->data, tensor_bytes(w), what, err, errlen);
}
#define WEIGHT(w, what) do { int rc_ = weight_ok(h, (w), (what), err, errlen); if (rc_ != DG_OK) return rc_; } while (0)

/* ---- memory --------------------------------------------------------------------------------------------- */

static int h_alloc(dg_backend *b, size_t bytes, void **ptr, char *err, size_t errlen) {
    host_impl *h = impl_of(b);
    *ptr = NULL;
    const size_t size = dg_align(bytes ? bytes : 1);
    dg_backend_stats *st = &b->stats;
    if (st->budget > 0 && (int64_t)size > st->budget - st->allocated)
        FAIL(DG_E_VALUE, "device budget exceeded: %lld bytes held + %lld requested > budget %lld",
             (long long)st->allocated, (long long)size, (long long)st->budget);
    if (h->n_allocs == h->cap_allocs) {
        const int64_t cap = h->cap_allocs ? 2 * h->cap_allocs : 64;
        host_alloc_rec *a = realloc(h->allocs, (size_t)cap * sizeof *a);
        if (!a) FAIL(DG_E_VALUE, "host backend: out of memory");
        h->allocs = a;
        h->cap_allocs = cap;
    }
    void *base = malloc(size + DG_ALIGN);
    if (!base) FAIL(DG_E_VALUE, "host backend: out of host memory for %zu bytes", size);
    char *p = (char *)base + (DG_ALIGN - (uintptr_t)base % DG_ALIGN) % DG_ALIGN;
    int64_t i = h->n_allocs;
    while (i > 0 && h->allocs[i - 1].ptr > p) {
        h->allocs[i] = h->allocs[i - 1];
        i--;
    }
    h->allocs[i] = (host_alloc_rec){p, base, size};
    h->n_allocs++;
    st->allocated += (int64_t)size;
    st->allocations++;
    if (st->allocated > st->peak) st->peak = st->allocated;
    *ptr = p;
    return DG_OK;
}

static void h_release(dg_backend *b, void *ptr, size_t bytes) {
    host_impl *h = impl_of(b);
    if (!ptr) return;
    for (int64_t i = 0; i < h->n_allocs; i++)
        if (h->allocs[i].ptr == ptr) {
            b->stats.allocated -= (int64_t)h->allocs[i].bytes;
            b->stats.allocations--;
            free(h->allocs[i].base);
            memmove(&h->allocs[i], &h->allocs[i + 1], (size_t)(h->n_allocs - i - 1) * sizeof h->allocs[0]);
            h->n_allocs--;
            break;
        }
    if (h->ws == ptr) {
        h->ws = NULL;
        h->ws_bytes = 0;
    }
}

static int h_host_alloc(dg_backend *b, size_t bytes, void **ptr, char *err, size_t errlen) {
    *ptr = malloc(bytes ? bytes : 1);
    if (!*ptr) FAIL(DG_E_VALUE, "host backend: out of host memory for %zu bytes", bytes);
    return DG_OK;
}

static void h_host_release(dg_backend *b, void *ptr) { free(ptr); }
static void h_pin(dg_backend *b, const void *host, size_t bytes) {}
static void h_unpin(dg_backend *b, const void *host) {}

static int h_upload(dg_backend *b, void *dst, const void *src, size_t bytes, char *err, size_t errlen) {
    host_impl *h = impl_of(b);
    DEV(dst, bytes, "upload");
    HOST(src, bytes, "upload source");
    memcpy(dst, src, bytes);
    b->stats.h2d += (int64_t)bytes;
    b->stats.h2d_copies++;
    return DG_OK;
}

static int h_download(dg_backend *b, void *dst, const void *src, size_t bytes, char *err, size_t errlen) {
    host_impl *h = impl_of(b);
    DEV(src, bytes, "download");
    HOST(dst, bytes, "download destination");
    memcpy(dst, src, bytes);
    b->stats.d2h += (int64_t)bytes;
    b->stats.d2h_copies++;
    return DG_OK;
}

static int h_wait(dg_backend *b, char *err, size_t errlen) { return DG_OK; }

static int h_prefetch(dg_backend *b, int slot, void *dst, const void *src, size_t bytes, char *err, size_t errlen) {
    if (slot < 0 || slot >= DG_BACKEND_SLOTS) FAIL(DG_E_VALUE, "host backend: prefetch slot %d", slot);
    return h_upload(b, dst, src, bytes, err, errlen);
}

static int h_await(dg_backend *b, int slot, char *err, size_t errlen) {
    if (slot < 0 || slot >= DG_BACKEND_SLOTS) FAIL(DG_E_VALUE, "host backend: prefetch slot %d", slot);
    return DG_OK;
}

static void h_bind(dg_backend *b, void *ws, size_t bytes) {
    impl_of(b)->ws = ws;
    impl_of(b)->ws_bytes = bytes;
}

/* Per-thread rows of at least `floats` floats. */
static int ensure_rows(host_impl *h, size_t floats, char *err, size_t errlen) {
    if (floats <= h->rows_floats) return DG_OK;
    const int nt = pool_threads(h->pool);
    for (int i = 0; i < nt; i++) {
        free(h->rows[i]);
        h->rows[i] = malloc(floats * sizeof(float));
        if (!h->rows[i]) {
            h->rows_floats = 0;
            FAIL(DG_E_VALUE, "host backend: out of memory");
        }
    }
    h->rows_floats = floats;
    return DG_OK;
}

static int grow(float **buf, size_t *have, size_t floats, char *err, size_t errlen) {
    if (floats <= *have) return DG_OK;
    free(*buf);
    *have = 0;
    if (!(*buf = malloc(floats * sizeof(float)))) FAIL(DG_E_VALUE, "host backend: out of memory");
    *have = floats;
    return DG_OK;
}

/* ---- kernels ------------------------------------------------------------------------------------------ */

static int h_copy(dg_backend *b, void *dst, const void *src, size_t bytes, char *err, size_t errlen) {
    host_impl *h = impl_of(b);
    DEV(dst, bytes, "copy");
    DEV(src, bytes, "copy source");
    memmove(dst, src, bytes);
    return DG_OK;
}

static int h_embed(dg_backend *b, float *out, const dg_tensor *E, const int32_t *ids, int64_t n, float scale,
                   char *err, size_t errlen) {
    host_impl *h = impl_of(b);
    WEIGHT(E, "embed");
    DEV(ids, n * 4, "embed ids");
    DEV(out, n * E->ne0 * 4, "embed output");
    const size_t rb = tensor_row_bytes(E);
    for (int64_t t = 0; t < n; t++) {
        if (ids[t] < 0 || ids[t] >= E->ne1) FAIL(DG_E_VALUE, "embed: token id %d", ids[t]);
        float *row = out + t * E->ne0;
        int rc = dg_dequantize_rows(E->type, (const char *)E->data + (size_t)ids[t] * rb, row, 1, E->ne0, err, errlen);
        if (rc != DG_OK) return rc;
        for (int64_t i = 0; i < E->ne0; i++) row[i] *= scale;
    }
    return DG_OK;
}

static int h_matmul(dg_backend *b, float *out, const float *x, const dg_tensor *w, int64_t n, int exact, char *err,
                    size_t errlen) {
    host_impl *h = impl_of(b);
    WEIGHT(w, "matmul");
    DEV(x, n * w->ne0 * 4, "matmul input");
    DEV(out, n * w->ne1 * 4, "matmul output");
    return matmul(h->pool, out, x, w, 0, n, err, errlen);
}

typedef struct {
    host_impl *h;
    float *out;
    const float *x, *w;
    int64_t width;
    float eps, mul;
    int accumulate;
} norm_job;

/* y = rmsnorm(x) (* w, inside rmsnorm), then * mul, then out += y or out = y: one order for every use. */
static void norm_rows(void *ctx, int64_t lo, int64_t hi, int thread) {
    const norm_job *j = ctx;
    for (int64_t t = lo; t < hi; t++) {
        float *o = j->out + t * j->width, *y = j->accumulate ? j->h->rows[thread] : o;
        rmsnorm(y, j->x + t * j->width, j->w, j->width, j->eps);
        if (j->mul != 1.0f)
            for (int64_t i = 0; i < j->width; i++) y[i] = y[i] * j->mul;
        if (j->accumulate)
            for (int64_t i = 0; i < j->width; i++) o[i] += y[i];
    }
}

static int h_rmsnorm(dg_backend *b, float *out, const float *x, const float *w, int64_t rows, int64_t width, float eps,
                     float mul, int accumulate, char *err, size_t errlen) {
    host_impl *h = impl_of(b);
    if (rows < 0 || width < 1) FAIL(DG_E_SHAPE, "rmsnorm: [%lld, %lld]", (long long)rows, (long long)width);
    if (accumulate && out == x) FAIL(DG_E_VALUE, "rmsnorm: accumulating output aliases the input");
    DEV(out, rows * width * 4, "rmsnorm output");
    DEV(x, rows * width * 4, "rmsnorm input");
    if (w) DEV(w, width * 4, "rmsnorm weight");
    if (accumulate) {
        int rc = ensure_rows(h, (size_t)width, err, errlen);
        if (rc != DG_OK) return rc;
    }
    norm_job j = {h, out, x, w, width, eps, mul, accumulate};
    parallel_for(h->pool, rows, norm_rows, &j);
    return DG_OK;
}

typedef struct {
    float *x;
    const float *inv_freq;
    int64_t pos0;
    int heads, d, pairs;
} rope_job;

/* A token's angles once, for all its heads (rope_angles, then rope_rotate per head: rope()'s bits). */
static void rope_tokens(void *ctx, int64_t lo, int64_t hi, int thread) {
    const rope_job *j = ctx;
    float cs[2 * (j->pairs > 0 ? j->pairs : 1)];
    for (int64_t t = lo; t < hi; t++) {
        rope_angles(cs, j->inv_freq, j->pos0 + t, j->pairs);
        for (int hd = 0; hd < j->heads; hd++) rope_rotate(j->x + (t * j->heads + hd) * j->d, cs, j->d, j->pairs);
    }
}

static int h_rope(dg_backend *b, float *x, const float *inv_freq, int64_t n, int heads, int d, int pairs,
                  int64_t pos0, char *err, size_t errlen) {
    host_impl *h = impl_of(b);
    if (n < 0 || heads < 1 || d < 2 || d % 2 || pairs < 0 || pairs > d / 2 || pos0 < 0)
        FAIL(DG_E_SHAPE, "rope: %lld tokens, %d heads of %d, %d pairs", (long long)n, heads, d, pairs);
    DEV(x, n * heads * d * 4, "rope");
    if (pairs) DEV(inv_freq, pairs * 4, "rope frequencies");
    rope_job j = {x, inv_freq, pos0, heads, d, pairs};
    parallel_for(h->pool, n, rope_tokens, &j);
    return DG_OK;
}

static int h_gelu_mul(dg_backend *b, float *g, const float *u, int64_t n, int64_t width, char *err, size_t errlen) {
    host_impl *h = impl_of(b);
    DEV(g, n * width * 4, "gelu_mul");
    DEV(u, n * width * 4, "gelu_mul input");
    gelu_mul(h->pool, g, u, n, width);
    return DG_OK;
}

static int h_softcap(dg_backend *b, float *x, int64_t rows, int64_t width, float cap, char *err, size_t errlen) {
    host_impl *h = impl_of(b);
    if (!(cap > 0.0f)) FAIL(DG_E_VALUE, "softcap: cap %g", (double)cap);
    DEV(x, rows * width * 4, "softcap");
    softcap(h->pool, x, rows, width, cap);
    return DG_OK;
}

static int h_add(dg_backend *b, float *y, const float *x, int64_t count, char *err, size_t errlen) {
    host_impl *h = impl_of(b);
    DEV(y, count * 4, "add");
    DEV(x, count * 4, "add input");
    for (int64_t i = 0; i < count; i++) y[i] += x[i];
    return DG_OK;
}

static int h_scale(dg_backend *b, float *x, float s, int64_t count, char *err, size_t errlen) {
    host_impl *h = impl_of(b);
    DEV(x, count * 4, "scale");
    for (int64_t i = 0; i < count; i++) x[i] = x[i] * s;
    return DG_OK;
}

static int h_kv_store(dg_backend *b, void *dst, const float *src, int64_t count, int f16, char *err, size_t errlen) {
    host_impl *h = impl_of(b);
    DEV(dst, count * (f16 ? 2 : 4), "kv_store");
    DEV(src, count * 4, "kv_store input");
    if (!f16) {
        memmove(dst, src, (size_t)count * 4);
        return DG_OK;
    }
    uint16_t *d = dst;
    for (int64_t i = 0; i < count; i++) d[i] = dg_f32_to_f16(src[i]);
    return DG_OK;
}

static int h_attention(dg_backend *b, float *out, const float *q, const void *ck, const void *cv, int f16,
                       int64_t held, const float *k, const float *v, int64_t n, int nh, int nkv, int d, int64_t pos0,
                       int64_t window, int causal, char *err, size_t errlen) {
    host_impl *h = impl_of(b);
    if (n < 0 || held < 0 || nh < 1 || nkv < 1 || nh % nkv || d < 1 || window < 0 || pos0 < held)
        FAIL(DG_E_SHAPE, "attention: %lld queries, %lld held, %d heads / %d KV of %d", (long long)n,
             (long long)held, nh, nkv, d);
    const int64_t w = (int64_t)nkv * d;
    DEV(out, n * nh * d * 4, "attention output");
    DEV(q, n * nh * d * 4, "attention queries");
    DEV(k, n * w * 4, "attention keys");
    DEV(v, n * w * 4, "attention values");
    if (held) {
        DEV(ck, held * w * (f16 ? 2 : 4), "attention cached keys");
        DEV(cv, held * w * (f16 ? 2 : 4), "attention cached values");
    }
    const float *ckf = ck, *cvf = cv;
    int rc;
    if (f16 && held) {   /* the twin reads floats: widen the held rows (exactly; half fits in float) */
        if ((rc = grow(&h->kv_f32, &h->kv_floats, (size_t)(2 * held * w), err, errlen)) != DG_OK) return rc;
        const uint16_t *a = ck, *c = cv;
        for (int64_t i = 0; i < held * w; i++) {
            h->kv_f32[i] = dg_f16_to_f32(a[i]);
            h->kv_f32[held * w + i] = dg_f16_to_f32(c[i]);
        }
        ckf = h->kv_f32;
        cvf = h->kv_f32 + held * w;
    }
    const size_t need = (size_t)pool_threads(h->pool) * (size_t)attention_scratch(held + n, d);
    if ((rc = grow(&h->att_scratch, &h->att_floats, need, err, errlen)) != DG_OK) return rc;
    const attn_layer a = {q, ckf, cvf, k, v, out, n, held, window, causal, nh, nkv, d};
    attention_layer(h->pool, &a, h->att_scratch);
    return DG_OK;
}

typedef struct {
    host_impl *h;
    int32_t *idx;
    float *w;
    const float *logits, *exp_scale;
    int E, K;
} route_job;

/* The router after its matmul: softmax, top K (ties: the lower index), the K weights renormalised to sum 1, then
 * times the per-expert scale; on a copy of the row. */
static void route_tokens(void *ctx, int64_t lo, int64_t hi, int thread) {
    const route_job *j = ctx;
    float *p = j->h->rows[thread];
    int idx[j->K];
    for (int64_t t = lo; t < hi; t++) {
        memcpy(p, j->logits + t * j->E, (size_t)j->E * sizeof(float));
        softmax(p, j->E);
        topk(idx, p, j->E, j->K);
        float sum = 0.0f;
        for (int k = 0; k < j->K; k++) sum += p[idx[k]];
        for (int k = 0; k < j->K; k++) {
            j->idx[t * j->K + k] = idx[k];
            j->w[t * j->K + k] = p[idx[k]] / sum * j->exp_scale[idx[k]];
        }
    }
}

static int h_route(dg_backend *b, int32_t *top_idx, float *top_w, const float *logits, const float *exp_scale,
                   int64_t n, int E, int K, char *err, size_t errlen) {
    host_impl *h = impl_of(b);
    if (n < 0 || E < 1 || K < 1 || K > E) FAIL(DG_E_SHAPE, "route: %lld tokens, top %d of %d", (long long)n, K, E);
    DEV(top_idx, n * K * 4, "route experts");
    DEV(top_w, n * K * 4, "route weights");
    DEV(logits, n * E * 4, "route logits");
    DEV(exp_scale, E * 4, "route scales");
    int rc = ensure_rows(h, (size_t)E, err, errlen);
    if (rc != DG_OK) return rc;
    route_job j = {h, top_idx, top_w, logits, exp_scale, E, K};
    parallel_for(h->pool, n, route_tokens, &j);
    return DG_OK;
}

/* The MoE of one chunk: pairs grouped by expert (ascending; tokens ascending within an expert) into slots,
 * the slots' inputs gathered, two grouped matmuls, and each token's outputs added in ascending expert order. The
 * workspace holds the offsets, the slots' tokens, weights and places, and [P, 2I], [P, I], [P, H] floats (the last
 * first the gathered inputs, then the outputs). */
typedef struct {
    const float *x;
    float *xs, *gu, *act, *out;
    const float *ys, *sel_w;
    const int32_t *sel, *slot_of;
    int64_t H, I, K;
} moe_job;

static void moe_gather(void *ctx, int64_t lo, int64_t hi, int thread) {
    const moe_job *j = ctx;
    for (int64_t c = lo; c < hi; c++) memcpy(j->xs + c * j->H, j->x + j->sel[c] * j->H, (size_t)j->H * sizeof(float));
}

static void moe_gated(void *ctx, int64_t lo, int64_t hi, int thread) {
    const moe_job *j = ctx;
    for (int64_t c = lo; c < hi; c++) {
        float *gu = j->gu + c * 2 * j->I, *a = j->act + c * j->I;
        gelu_tanh(gu, j->I);
        for (int64_t i = 0; i < j->I; i++) a[i] = gu[i] * gu[j->I + i];
    }
}

static void moe_combine(void *ctx, int64_t lo, int64_t hi, int thread) {
    const moe_job *j = ctx;
    for (int64_t t = lo; t < hi; t++) {
        float *o = j->out + t * j->H;
        memset(o, 0, (size_t)j->H * sizeof(float));
        for (int64_t k = 0; k < j->K; k++) {
            const int32_t c = j->slot_of[t * j->K + k];
            const float *y = j->ys + (int64_t)c * j->H;
            for (int64_t d = 0; d < j->H; d++) o[d] += y[d] * j->sel_w[c];
        }
    }
}

static int h_moe(dg_backend *b, float *out, const float *x, const int32_t *top_idx, const float *top_w, int64_t n,
                 int K, const dg_tensor *gate_up, const dg_tensor *down, char *err, size_t errlen) {
    host_impl *h = impl_of(b);
    const int64_t H = gate_up->ne0, I = gate_up->ne1 / 2, E = gate_up->ne2, P = n * K;
    if (n < 0 || K < 1 || K > E || gate_up->ne1 % 2 || down->ne0 != I || down->ne1 != H || down->ne2 != E)
        FAIL(DG_E_SHAPE, "moe: gate_up [%lld, %lld, %lld], down [%lld, %lld, %lld], top %d", (long long)gate_up->ne0,
             (long long)gate_up->ne1, (long long)gate_up->ne2, (long long)down->ne0, (long long)down->ne1,
             (long long)down->ne2, K);
    if (n == 0) return DG_OK;
    WEIGHT(gate_up, "moe gate_up");
    WEIGHT(down, "moe down");
    DEV(out, n * H * 4, "moe output");
    DEV(x, n * H * 4, "moe input");
    DEV(top_idx, P * 4, "moe experts");
    DEV(top_w, P * 4, "moe weights");
    const size_t ints = dg_align((size_t)(2 * (E + 1) + 3 * P) * 4), gus = dg_align((size_t)(P * 2 * I) * 4),
                 acts = dg_align((size_t)(P * I) * 4), outs = dg_align((size_t)(P * H) * 4);
    if (!h->ws || h->ws_bytes < ints + gus + acts + outs)
        FAIL(DG_E_VALUE, "moe: %lld tokens need %zu bytes of workspace, %zu bound", (long long)n,
             ints + gus + acts + outs, h->ws_bytes);
    char *ws = h->ws;
    int64_t *off = (int64_t *)ws;
    int32_t *sel = (int32_t *)(off + E + 1), *slot_of = sel + P;
    float *sel_w = (float *)(slot_of + P), *gu = (float *)(ws + ints), *act = (float *)(ws + ints + gus),
          *xs = (float *)(ws + ints + gus + acts);
    for (int64_t t = 0; t < n; t++)
        for (int64_t k = 0; k < K; k++)
            if (top_idx[t * K + k] < 0 || top_idx[t * K + k] >= E)
                FAIL(DG_E_VALUE, "moe: expert %d of token %lld", top_idx[t * K + k], (long long)t);
    int filled[n];
    memset(filled, 0, sizeof filled);
    off[0] = 0;
    for (int64_t e = 0; e < E; e++) {
        int64_t c = off[e];
        for (int64_t t = 0; t < n; t++)
            for (int64_t k = 0; k < K; k++)
                if (top_idx[t * K + k] == e) {
                    sel[c] = (int32_t)t;
                    sel_w[c] = top_w[t * K + k];
                    slot_of[t * K + filled[t]++] = (int32_t)c;
                    c++;
                }
        off[e + 1] = c;
    }
    moe_job j = {x, xs, gu, act, out, xs, sel_w, sel, slot_of, H, I, K};
    parallel_for(h->pool, P, moe_gather, &j);
    int rc = matmul_grouped(h->pool, gu, xs, gate_up, off, err, errlen);
    if (rc != DG_OK) return rc;
    parallel_for(h->pool, P, moe_gated, &j);
    if ((rc = matmul_grouped(h->pool, xs, act, down, off, err, errlen)) != DG_OK) return rc;   /* outputs over inputs */
    parallel_for(h->pool, n, moe_combine, &j);
    return DG_OK;
}

static int h_soft_embed(dg_backend *b, float *out, const float *logits, const dg_tensor *E, float scale, int64_t n,
                        int top_k, char *err, size_t errlen) {
    host_impl *h = impl_of(b);
    WEIGHT(E, "soft_embed");
    DEV(out, n * E->ne0 * 4, "soft_embed output");
    DEV(logits, n * E->ne1 * 4, "soft_embed logits");
    return top_k ? soft_embed_top_k(h->pool, out, logits, E, scale, n, top_k, err, errlen)
                 : soft_embed(h->pool, out, logits, E, scale, n, err, errlen);
}

/* ---- the backend ---------------------------------------------------------------------------------------- */

static void h_destroy(dg_backend *b) {
    if (!b) return;
    host_impl *h = impl_of(b);
    if (h) {
        for (int64_t i = 0; i < h->n_allocs; i++) free(h->allocs[i].base);
        free(h->allocs);
        if (h->rows && h->pool)
            for (int i = 0; i < pool_threads(h->pool); i++) free(h->rows[i]);
        free(h->rows);
        free(h->att_scratch);
        free(h->kv_f32);
        pool_free(h->pool);
        free(h);
    }
    free(b);
}

/* checked: a backend standing for a device (pointers checked); unchecked: the executor's CPU side, whose
 * kernels read the caller's host memory (the mapped weights). budget 0: none. */
dg_backend *host_backend_make(int64_t budget, int n_threads, int checked, char *err, size_t errlen) {
    if (budget < 0) {
        snprintf(err, errlen, "host backend: negative budget %lld", (long long)budget);
        return NULL;
    }
    dg_backend *b = calloc(1, sizeof *b);
    host_impl *h = calloc(1, sizeof *h);
    if (!b || !h) goto oom;
    b->impl = h;
    h->checked = checked;
    h->pool = pool_new(n_threads);
    if (!h->pool || !(h->rows = calloc((size_t)pool_threads(h->pool), sizeof(float *)))) goto oom;
    b->name = "host";
    b->stats.budget = budget;
    b->destroy = h_destroy;
    b->alloc = h_alloc;
    b->release = h_release;
    b->host_alloc = h_host_alloc;
    b->host_release = h_host_release;
    b->pin = h_pin;
    b->unpin = h_unpin;
    b->upload = h_upload;
    b->download = h_download;
    b->download_async = h_download;
    b->wait_downloads = h_wait;
    b->prefetch = h_prefetch;
    b->await_slot = h_await;
    b->sync = h_wait;
    b->bind_workspace = h_bind;
    b->copy = h_copy;
    b->embed = h_embed;
    b->matmul = h_matmul;
    b->rmsnorm = h_rmsnorm;
    b->rope = h_rope;
    b->gelu_mul = h_gelu_mul;
    b->softcap = h_softcap;
    b->add = h_add;
    b->scale = h_scale;
    b->kv_store = h_kv_store;
    b->attention = h_attention;
    b->route = h_route;
    b->moe = h_moe;
    b->soft_embed = h_soft_embed;
    return b;
oom:
    if (b) {
        b->impl = h;
        h_destroy(b);
    } else {
        free(h);
    }
    snprintf(err, errlen, "host backend: out of memory");
    return NULL;
}

dg_backend *dg_host_backend_new(int64_t budget_bytes, int n_threads, char *err, size_t errlen) {
    return host_backend_make(budget_bytes, n_threads, 1, err, errlen);
}

void dg_backend_free(dg_backend *b) {
    if (b && b->destroy) b->destroy(b);
}

void dg_backend_get_stats(const dg_backend *b, dg_backend_stats *out) {
    if (b && out) *out = b->stats;
}

const char *dg_backend_name(const dg_backend *b) { return b ? b->name : ""; }
