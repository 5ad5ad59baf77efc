/* attention.h: attention over a pass's queries (native/attention.c). Internal to the native library; Python
 * calls it through dgguf.h's dg_attention.
 */
#ifndef DGGUF_ATTENTION_H
#define DGGUF_ATTENTION_H

#include <stdint.h>

#include "pool.h"

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
