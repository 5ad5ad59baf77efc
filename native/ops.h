/* ops.h: the forward pass's elementwise and per-row ops (native/ops.c), one function per op, arguments in the
 * order out, in, weights, sizes, and the float exp and tanh they (and the matmul, attention and sampler code)
 * share. Internal to the native library; Python never calls these.
 *
 * Every op computes each output element in one thread with a fixed summation order, so results are
 * bit-identical for any thread count.
 */
#ifndef DGGUF_OPS_H
#define DGGUF_OPS_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "dgguf.h"
#include "pool.h"

/* ---- float exp and tanh as plain C polynomials ------------------------------------------------------------
 * Selects instead of branches, so the loops that call them vectorise; evaluated with unfused operations
 * (-std=c11), so every target clone computes the same bits and results never depend on the CPU. */

/* exp(x) for x <= 0: x = n ln2 + r with |r| <= ln2 / 2, exp(r) by its degree-7 Taylor polynomial (measured
 * within 0.84 x 2^-23 relative over [-80, 0]), times 2^n built in the exponent bits; 0 below the float range. */
static inline float exp_nonpositive(float x) {
    float xc = x < -87.0f ? -87.0f : x;               /* selects, not branches: the loops stay vectorizable */
    float y = xc * 1.44269504f;
    int n = (int)floorf(y + 0.5f);                    /* nearest; a bare (int) cast would stop vectorization */
    float r = (xc - (float)n * 0.693145752f) - (float)n * 1.42860677e-6f;   /* ln2 split in two for accuracy */
    float p = 1.0f + r * (1.0f + r * (0.5f + r * (1.6666667e-1f + r * (4.1666668e-2f + r * (8.3333338e-3f +
              r * (1.3888889e-3f + r * 1.9841270e-4f))))));
    union { uint32_t u; float f; } scale = { .u = (uint32_t)(n + 127) << 23 };
    return x < -87.0f ? 0.0f : p * scale.f;
}

/* The largest of x[0..n) (n >= 1), as the serial m = x[v] > m ? x[v] : m from m = x[0] finds it (a NaN first
 * value gives NaN, later NaNs are passed over), in 16 running maxima: GCC does not vectorise a float max without
 * -ffinite-math-only, so the lanes are one vector of GCC's vector extension and the select is spelled out on the
 * bits. Call it from target clones (DG_CLONES) to get each one's vectors. */
typedef float max_lanes_f __attribute__((vector_size(64)));
typedef int32_t max_lanes_i __attribute__((vector_size(64)));

static inline float row_max(const float *x, int64_t n) {
    max_lanes_f m;
    for (int j = 0; j < 16; j++) m[j] = x[0];
    int64_t v = 0;
    for (; v + 16 <= n; v += 16) {
        max_lanes_f s;
        memcpy(&s, x + v, sizeof s);
        const max_lanes_i larger = s > m;
        m = (max_lanes_f)(((max_lanes_i)s & larger) | ((max_lanes_i)m & ~larger));
    }
    float mx = m[0];
    for (int j = 1; j < 16; j++) mx = m[j] > mx ? m[j] : mx;
    for (; v < n; v++) mx = x[v] > mx ? x[v] : mx;
    return mx;
}

/* tanh(x), measured within 1.5 ulp: below |x| = 0.625, |x| + |x|^3 P(x^2) with P a degree-4 fit of (tanh x - x) / x^3
 * made for this file; above, (1 - e) / (1 + e) with e = exp(-2|x|); the sign of x put back; +-1 from |x| = 9.1,
 * where tanh rounds to 1 in float; NaN stays NaN. libm's tanhf does not vectorise, and the gelu and the softcap
 * call it for every value of a pass. */
static inline float tanh_poly(float x) {
    const float a = fabsf(x), s = x * x, ac = a < 9.1f ? a : 9.1f;
    const float small = a + a * s * (-3.333328664e-01f + s * (1.333151162e-01f + s * (-5.374461040e-02f +
                        s * (2.065297961e-02f + s * -5.718812346e-03f))));
    const float e = exp_nonpositive(-2.0f * ac), large = (1.0f - e) / (1.0f + e);
    const float y = a < 0.625f ? small : (a < 9.1f ? large : 1.0f);
    return a == a ? copysignf(y, x) : x;
}

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
/* The same in two halves, so a token's angles serve all its heads: cs[2i], cs[2i + 1] = cos, sin of
 * pos * inv_freq[i] for i < n_pairs; then the rotation of one head with them. */
void rope_angles(float *cs, const float *inv_freq, int64_t pos, int n_pairs);
void rope_rotate(float *x, const float *cs, int d, int n_pairs);
/* RoPE inverse frequencies of layer ly as transformers computes them in fp32: theta^-(2i/d) for the rotated
 * pairs (all d/2 on sliding layers, m->rope_pairs_full on full layers). Returns the number of pairs.
 * Shared with the CUDA forward (native/cuda), which uploads the same values. */
int rope_freqs(const dg_model *m, const dg_layer *ly, float *inv_freq);
/* rmsnorm of each of n rows of width values (out may alias x), rows split across the pool's threads. */
void rmsnorm_rows(dg_pool *p, float *out, const float *x, const float *w, int64_t n, int64_t width, float eps);
/* g = gelu_tanh(g) * u over rows [n, width], rows split across the pool's threads. */
void gelu_mul(dg_pool *p, float *g, const float *u, int64_t n, int64_t width);
/* x = cap * tanh(x / cap) over rows [n, width], rows split across the pool's threads. */
void softcap(dg_pool *p, float *x, int64_t n, int64_t width, float cap);
/* Indices of the k largest of x[n] (ties: the lower index first), largest first. */
void topk(int *idx, const float *x, int n, int k);

#endif
