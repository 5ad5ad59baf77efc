/* backend.h: the device interface the forward runs on (native/executor.c): memory, copies and each kernel of a
 * pass, as a table of functions. Internal to the native libraries; Python sees only dgguf.h's dg_backend handle.
 *
 * Two implementations:
 * - the host backend (backend_host.c): the CPU twins on host memory that stands for device memory, with a byte
 *   budget it enforces, counters of every byte that crosses, and a check that every pointer a kernel or a copy
 *   is given lies inside the side (device or host) it must be on; CI runs the hybrid executor on it;
 * - the CUDA backend (native/cuda/backend_cuda.cu, in libdgcuda.so): the kernels of native/cuda on one stream,
 *   plus a copy stream for prefetches.
 *
 * "Device" pointers are those alloc handed out; "host" pointers are the caller's. Kernels run in the order they
 * are issued; a host-visible result is ready after download (synchronous), wait_downloads or sync. Every
 * function returns DG_OK or a negative status with a one-line message in err.
 */
#ifndef DGGUF_BACKEND_H
#define DGGUF_BACKEND_H

#include <stddef.h>
#include <stdint.h>

#include "dgguf.h"

enum { DG_BACKEND_SLOTS = 2 };   /* prefetch slots: streaming's double buffer */

struct dg_backend {
    const char *name;                  /* "host" or "cuda" */
    dg_backend_stats stats;            /* kept by the backend (dgguf.h) */
    void (*destroy)(dg_backend *b);

    /* ---- memory and copies ---- */
    int (*alloc)(dg_backend *b, size_t bytes, void **ptr, char *err, size_t errlen);
    void (*release)(dg_backend *b, void *ptr, size_t bytes);
    /* Host memory the backend copies to and from asynchronously (CUDA: page-locked); not device bytes. */
    int (*host_alloc)(dg_backend *b, size_t bytes, void **ptr, char *err, size_t errlen);
    void (*host_release)(dg_backend *b, void *ptr);
    /* Makes host memory that prefetch will read from fast to copy (CUDA: registered as page-locked, read-only;
     * the host backend: nothing). Best effort: a failure leaves the copies slower, never wrong. */
    void (*pin)(dg_backend *b, const void *host, size_t bytes);
    void (*unpin)(dg_backend *b, const void *host);
    int (*upload)(dg_backend *b, void *dst, const void *src, size_t bytes, char *err, size_t errlen);
    int (*download)(dg_backend *b, void *dst, const void *src, size_t bytes, char *err, size_t errlen);
    /* A download ordered after the kernels issued so far, into host_alloc memory; wait_downloads returns when
     * every such download has landed (the kernels issued after it may still run: the CPU works beside them). */
    int (*download_async)(dg_backend *b, void *dst, const void *src, size_t bytes, char *err, size_t errlen);
    int (*wait_downloads)(dg_backend *b, char *err, size_t errlen);
    /* An upload into prefetch slot `slot` (< DG_BACKEND_SLOTS), started once every kernel issued so far is done
     * (so it may overwrite what they read); await_slot orders the kernels issued after it behind that upload. */
    int (*prefetch)(dg_backend *b, int slot, void *dst, const void *src, size_t bytes, char *err, size_t errlen);
    int (*await_slot)(dg_backend *b, int slot, char *err, size_t errlen);
    int (*sync)(dg_backend *b, char *err, size_t errlen);
    /* Scratch the kernels below may use (moe, soft_embed, copy between overlapping ranges), made once by the
     * executor (its size is part of the plan: docs/planner.md, "workspace"). */
    void (*bind_workspace)(dg_backend *b, void *ws, size_t bytes);

    /* ---- kernels: every pointer is device memory ---- */
    /* dst = src, bytes of device memory; the ranges may overlap. */
    int (*copy)(dg_backend *b, void *dst, const void *src, size_t bytes, char *err, size_t errlen);
    /* h[t] = E[ids[t]] * scale (ids: device int32 [n]). */
    int (*embed)(dg_backend *b, float *h, const dg_tensor *E, const int32_t *ids, int64_t n, float scale,
                 char *err, size_t errlen);
    /* out[t, r] = x[t, :] . W[r, :], out [n, w->ne1]; exact: the backend's exact kernel (the router's: its
     * scores pick experts), else its fast one. */
    int (*matmul)(dg_backend *b, float *out, const float *x, const dg_tensor *w, int64_t n, int exact,
                  char *err, size_t errlen);
    /* Rows [rows, width]: y = x / sqrt(mean(x^2) + eps) (* w[i] when w) * mul; accumulate: out += y, else out = y
     * (out may alias x then). */
    int (*rmsnorm)(dg_backend *b, float *out, const float *x, const float *w, int64_t rows, int64_t width,
                   float eps, float mul, int accumulate, char *err, size_t errlen);
    /* x [n, heads, d] in place, token t at position pos0 + t, the first `pairs` pairs rotated. */
    int (*rope)(dg_backend *b, float *x, const float *inv_freq, int64_t n, int heads, int d, int pairs,
                int64_t pos0, char *err, size_t errlen);
    /* g = gelu_tanh(g) * u over [n, width]. */
    int (*gelu_mul)(dg_backend *b, float *g, const float *u, int64_t n, int64_t width, char *err, size_t errlen);
    int (*softcap)(dg_backend *b, float *x, int64_t rows, int64_t width, float cap, char *err, size_t errlen);
    int (*add)(dg_backend *b, float *y, const float *x, int64_t count, char *err, size_t errlen);
    int (*scale)(dg_backend *b, float *x, float s, int64_t count, char *err, size_t errlen);
    /* dst[i] = src[i] as a cache element (f16: rounded to half, else float), count values. */
    int (*kv_store)(dg_backend *b, void *dst, const float *src, int64_t count, int f16, char *err, size_t errlen);
    /* One layer's attention: queries q [n, nh, d] at positions pos0.. see the held cached rows ck, cv [held, nkv,
     * d] (elements f16 or float) and this pass's k, v [n, nkv, d]; window > 0 keeps keys p - window < k <= p,
     * causal keeps own rows up to the query's. out [n, nh, d]. */
    int (*attention)(dg_backend *b, float *out, const float *q, const void *ck, const void *cv, int f16,
                     int64_t held, const float *k, const float *v, int64_t n, int nh, int nkv, int d, int64_t pos0,
                     int64_t window, int causal, char *err, size_t errlen);
    /* Router logits [n, E] -> softmax, top K (ties: lower index), weights renormalised then * exp_scale[e]. */
    int (*route)(dg_backend *b, int32_t *top_idx, float *top_w, const float *logits, const float *exp_scale,
                 int64_t n, int E, int K, char *err, size_t errlen);
    /* out[t] = sum over t's experts e (ascending) of w * down_e(gelu(gate_e(x)) * up_e(x)), n <= the moe chunk of
     * the workspace (executor.c: MOE_CHUNK). */
    int (*moe)(dg_backend *b, float *out, const float *x, const int32_t *top_idx, const float *top_w, int64_t n,
               int K, const dg_tensor *gate_up, const dg_tensor *down, char *err, size_t errlen);
    /* out[t, :] = scale * softmax(logits[t, :]) @ E, logits [n, E->ne1]; top_k > 0: over each row's top_k most
     * probable rows of E only, renormalised (matmul.h soft_embed_top_k; the CUDA backend has none: DG_E_TYPE). */
    int (*soft_embed)(dg_backend *b, float *out, const float *logits, const dg_tensor *E, float scale, int64_t n,
                      int top_k, char *err, size_t errlen);

    void *impl;                        /* the implementation's state */
};

/* The host backend (backend_host.c). checked: it stands for a device (budget enforced when > 0, every pointer's
 * side checked); unchecked: the executor's CPU side, whose kernels read the caller's memory (the mapped file). */
dg_backend *host_backend_make(int64_t budget, int n_threads, int checked, char *err, size_t errlen);

/* The workspace the kernels above need for passes of up to max_tokens tokens (moe chunks of moe_chunk tokens)
 * on a model of m's shapes with a KV cache of elem-byte elements: the largest of the MoE's slots, the soft
 * embedding's partial sums and one sliding cache layer of W - 1 rows (a copy between overlapping ranges goes
 * through it). Every backend gets the same size; runtime/planner.py computes it too. */
size_t dg_workspace_bytes(const dg_model *m, int64_t max_tokens, int64_t moe_chunk, int elem);

/* Sizes of the parts of the workspace, for the implementations (bytes, each a multiple of DG_ALIGN). */
typedef struct {
    size_t moe_ints, moe_gate_up, moe_act, moe_out;   /* moe: int32 [2 (E + 1) + 3 P], f32 [P, 2I], [P, I], [P, H] */
    size_t soft_stats, soft_parts;                    /* soft_embed: f32 [2 n], [DG_SOFT_SLICES, n, H] */
    size_t kv_move;                                   /* the largest sliding cache layer's K (or V) */
} dg_workspace_parts;
void dg_workspace_layout(const dg_model *m, int64_t max_tokens, int64_t moe_chunk, int elem, dg_workspace_parts *p);

enum { DG_ALIGN = DG_EXEC_ALIGN, DG_SOFT_SLICES = DG_EXEC_SOFT_SLICES };   /* dgguf.h */

static inline size_t dg_align(size_t bytes) { return (bytes + DG_ALIGN - 1) / DG_ALIGN * DG_ALIGN; }

#endif
