/* ops.h: the forward pass's ops (native/ops.c), one function per op, arguments in the order
 * out, in, weights, sizes. Internal to the native library; Python never calls these.
 *
 * Every op computes each output element in one thread with a fixed summation order, so results are
 * bit-identical for any thread count.
 */
#ifndef DGGUF_OPS_H
#define DGGUF_OPS_H

#include <stddef.h>
#include <stdint.h>

#include "dgguf.h"

/* ---- threads: a pool that lives for one dg_encode / dg_decode call ---------------------------------- */

typedef struct dg_pool dg_pool;

/* n_threads <= 1 (or a failed start) gives a pool that runs everything on the caller. */
dg_pool *pool_new(int n_threads);
void pool_free(dg_pool *p);
int pool_threads(const dg_pool *p);
/* Calls fn(ctx, lo, hi, thread) over contiguous chunks of [0, n), one per thread, and waits for all. */
void parallel_for(dg_pool *p, int64_t n, void (*fn)(void *ctx, int64_t lo, int64_t hi, int thread), void *ctx);

/* ---- elementwise and per-row ops -------------------------------------------------------------------- */

/* out = x / sqrt(mean(x^2) + eps) * w, with w == NULL for the weightless norm. out may alias x. */
void rmsnorm(float *out, const float *x, const float *w, int64_t n, float eps);
/* softmax over n values, in place (max subtracted first). */
void softmax(float *x, int64_t n);
/* gelu with the tanh approximation (torch's gelu(approximate="tanh")), in place. */
void gelu_tanh(float *x, int64_t n);
/* NeoX rotate-half RoPE of one head of d values at position pos: pair (i, i + d/2) turns by
 * pos * inv_freq[i] for i < n_pairs; the other pairs are left as they are. In place. */
void rope(float *x, const float *inv_freq, int64_t pos, int d, int n_pairs);
/* RoPE inverse frequencies of layer ly as transformers computes them in fp32: theta^-(2i/d) for the rotated
 * pairs (all d/2 on sliding layers, m->rope_pairs_full on full layers). Returns the number of pairs.
 * Shared with the CUDA forward (native/cuda), which uploads the same values. */
int rope_freqs(const dg_model *m, const dg_layer *ly, float *inv_freq);
/* g = gelu_tanh(g) * u over rows [n, width], rows split across the pool's threads. */
void gelu_mul(dg_pool *p, float *g, const float *u, int64_t n, int64_t width);
/* x = cap * tanh(x / cap) over rows [n, width], rows split across the pool's threads. */
void softcap(dg_pool *p, float *x, int64_t n, int64_t width, float cap);
/* Indices of the k largest of x[n] (ties: the lower index first), largest first. */
void topk(int *idx, const float *x, int n, int k);

/* ---- matmul against a stored weight ------------------------------------------------------------------ */

/* Bytes of one row of w (ne0 values in w->type); 0 when the type is unknown or ne0 is not whole blocks. */
size_t tensor_row_bytes(const dg_tensor *w);

/* out[t, r] = sum_i x[t, i] * W[mat][r, i] for t < n, r < w->ne1, i < w->ne0: out is [n, ne1], x [n, ne0].
 * Each block of weight rows is dequantized (float kernels) or unpacked to integer levels (int8 kernels, which
 * quantize x once per call) and reused across the n tokens; rows are split across threads. */
int matmul(dg_pool *p, float *out, const float *x, const dg_tensor *w, int64_t mat, int64_t n,
           char *err, size_t errlen);
/* The same for every matrix e of w (ne2 of them) against its own tokens, rows off[e] .. off[e + 1] - 1 of x and
 * out (off has ne2 + 1 entries, non-decreasing, off[0] = 0): the MoE's experts in one pass. Work is cut into
 * blocks of rows of one matrix, weighted by the matrix's token count, and the threads share the total evenly
 * (whole experts or expert x row blocks); each output comes from one block, so any thread count gives the same
 * bits. */
int matmul_grouped(dg_pool *p, float *out, const float *x, const dg_tensor *w, const int64_t *off,
                   char *err, size_t errlen);

/* out[t, :] = sum_v p[t, v] * W[v, :] * scale, p = softmax(logits[t, :]) (computed on the fly, logits [n, ne1]):
 * the soft embedding of a distribution over W's rows; out is [n, ne0]. */
int soft_embed(dg_pool *p, float *out, const float *logits, const dg_tensor *w, float scale, int64_t n,
               char *err, size_t errlen);

/* ---- attention --------------------------------------------------------------------------------------- */

/* One query head: out[d] = sum_j softmax_j(q . k_j) v_j over the keys of two segments, first na rows of
 * (ka, va) then nb rows of (kb, vb); rows are stride floats apart. scores holds na + nb floats. */
void attention(float *out, const float *q, const float *ka, const float *va, int64_t na,
               const float *kb, const float *vb, int64_t nb, int64_t stride, int d, float *scores);

/* One layer's attention over a pass's n queries: query token t sees the held cached key rows (the positions just
 * before the pass) and then the pass's own rows, and with window > 0 only keys p - window < k <= p (p its
 * position), with causal only own rows up to its own. Query head h uses kv head h / (n_heads / n_kv); rows of
 * q and out are n_heads * d floats, of keys and values n_kv * d. Scores are q . k (scale 1). */
typedef struct {
    const float *q;             /* [n, n_heads, d] */
    const float *ck, *cv;       /* [held, n_kv, d] */
    const float *k, *v;         /* [n, n_kv, d] */
    float *out;                 /* [n, n_heads, d] */
    int64_t n, held, window;
    int causal, n_heads, n_kv, d;
} attn_layer;

/* Scratch floats per thread that attention_layer needs for up to max_keys keys of up to d_max values. */
int64_t attention_scratch(int64_t max_keys, int d_max);
/* The active attention kernel (attention.c) on the pool; scratch holds pool_threads(p) * attention_scratch(held
 * + n, d) floats. */
void attention_layer(dg_pool *p, const attn_layer *a, float *scratch);

#endif
