/* matmul.h: products of activations with a stored weight (native/matmul.c), split across the pool's threads:
 * the matmul, the MoE's grouped matmul and the soft embedding. Internal to the native library; Python calls
 * them through dgguf.h's dg_matmul and dg_soft_embed.
 */
#ifndef DGGUF_MATMUL_H
#define DGGUF_MATMUL_H

#include <stddef.h>
#include <stdint.h>

#include "dgguf.h"
#include "pool.h"

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
/* The same over each token's top_k most probable rows only, their probabilities renormalised to sum to 1: p[t, v]
 * = exp(l[v] - max) / sum over the top_k of exp(l[u] - max). Ties at the cut keep the lower row; the rows are
 * summed in ascending order in double, then scaled and rounded once, so the thread count never changes a bit. */
int soft_embed_top_k(dg_pool *p, float *out, const float *logits, const dg_tensor *w, float scale, int64_t n,
                     int top_k, char *err, size_t errlen);

#endif
