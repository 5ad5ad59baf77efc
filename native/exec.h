/* exec.h: the executor's state, shared by the forward (model.c: the passes, one function per stage, on a backend)
 * and the placement (executor.c: groups, uploads, caches, the dg_exec_* API). Internal to the native libraries.
 *
 * One forward, two uses: dg_encode / dg_decode (the CPU forward) run it "in place" on an unchecked host backend
 * (the weights where the caller mapped them, buffers grown to each pass, the self-conditioning input read and the
 * logits written where the caller keeps them); dg_exec_* run it on a device backend with the weights placed as a
 * plan says (runtime/planner.py).
 */
#ifndef DGGUF_EXEC_H
#define DGGUF_EXEC_H

#include <pthread.h>

#include "backend.h"

typedef struct {
    int64_t bytes;
    void *ptr;
} exec_block;

struct dg_exec {
    dg_model m;                  /* sizes, and tensors whose data are backend pointers (CPU/streamed experts: host) */
    dg_layer *layers;            /* m.layers: a copy (placed), or the caller's (in place) */
    const dg_model *host;        /* the caller's: host pointers */
    dg_backend *dev, *cpu;       /* cpu: the CPU side (an unchecked host backend), for CPU expert layers */
    int32_t *experts;            /* DG_EXPERTS_* per layer */
    int *stream_order;           /* a pass's streamed layers */
    int kv_f16;
    int in_place;                /* the CPU forward (dg_cache): see the top */
    int64_t T;                   /* tokens the buffers hold (in place: grown to the longest pass) */
    exec_block group[DG_GROUPS]; /* DG_GROUP_EXPERTS and DG_GROUP_KV_CACHE: byte totals only (ptr unused) */
    exec_block *expert_blocks;   /* per layer: its resident experts */
    exec_block stage[DG_BACKEND_SLOTS];
    int64_t stage_bytes;
    float **inv_freq;            /* per layer, backend memory */
    int *pairs;
    /* pass buffers (backend memory) */
    int32_t *ids, *top_idx;
    float *h, *x, *xm, *tmp, *h1, *h2, *q, *att, *k, *v, *g, *u, *router, *top_w, *logits;
    exec_block head;             /* in place: the logits of a head over some rows only */
    /* the CPU side: host buffers (dev's host_alloc), its workspace */
    float *cx, *cw, *cy;
    int32_t *cidx;
    void *cpu_ws;
    size_t cpu_ws_bytes;
    int64_t load_h2d, pass_h2d, pass_d2h;
    pthread_mutex_t in_use;      /* one pass at a time: the buffers are shared by every cache */
    int live_caches;
};

typedef struct {
    int sliding, n_kv, head_dim;
    int64_t cap, n;
    char *k, *v;                 /* backend memory, [cap, n_kv, head_dim] elements */
} exec_cache_layer;

struct dg_exec_cache {
    dg_exec *x;
    int64_t capacity, length;
    int broken;                  /* a failed encode left the layers inconsistent */
    exec_cache_layer *layers;
    exec_block mem;
};

static inline int64_t exec_cache_elem(const dg_exec *x) { return x->kv_f16 ? 2 : 4; }
static inline int64_t exec_kv_row_bytes(const dg_exec *x, const exec_cache_layer *cl) {
    return (int64_t)cl->n_kv * cl->head_dim * exec_cache_elem(x);
}

/* model.c: the passes. An encoder pass of n <= x->T tokens appends to c; a decoder pass of n <= x->T tokens
 * writes logits (host; with head_rows only the flagged rows). Both expect x->in_use held and the inputs checked. */
int exec_encode_pass(dg_exec *x, dg_exec_cache *c, const int32_t *ids, int64_t n, char *err, size_t errlen);
int exec_decode_pass(dg_exec *x, const dg_exec_cache *c, const int32_t *ids, int64_t n, const float *sc,
                     int sc_top_k, const uint8_t *head_rows, float *logits, char *err, size_t errlen);
int exec_check_ids(const dg_model *m, const int32_t *ids, int64_t n, char *err, size_t errlen);

/* executor.c: the in-place executor of the CPU forward (x->m is m, no copy; nothing uploaded), the buffers for a
 * pass of n tokens (in place: grown; else n must fit), the RoPE tables of m (in place: every pass, from the m
 * given), and the passes under the lock with their counters (encodes in pieces of x->T unless in place). */
dg_exec *exec_new_in_place(const dg_model *m, dg_backend *host, char *err, size_t errlen);
int exec_ensure_buffers(dg_exec *x, int64_t n, char *err, size_t errlen);
int exec_encode(dg_exec_cache *c, const dg_model *m, const int32_t *ids, int64_t n, char *err, size_t errlen);
int exec_decode(const dg_exec_cache *c, const dg_model *m, const int32_t *ids, int64_t n, const float *sc,
                int sc_top_k, const uint8_t *head_rows, float *logits, char *err, size_t errlen);

#endif
