/* ops.c: the elementwise and per-row ops of the forward pass (see ops.h), plain scalar C.
 *
 * Numerics follow transformers in fp32: rmsnorm is x * (mean(x^2) + eps)^-0.5 (then * w), softmax
 * subtracts the max, gelu is the tanh form. Sums of squares and softmax denominators are accumulated
 * in double: every output element is computed by one thread in one order, whatever the thread count.
 */
#include "ops.h"
#include "quant_internal.h"   /* DG_CLONES */

#include <math.h>

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
