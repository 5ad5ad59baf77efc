/* sample.c: the sampler's per-step reductions over a canvas's logits, rows in parallel.
 *
 * One pass per row replaces numpy's scale / max / exp / entropy / inverse-CDF chain (runtime/sampler.py keeps
 * those as the reference; tests compare). exp is ops.h's float polynomial, so every clone computes the same bits
 * and results never depend on the CPU.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dgguf.h"
#include "ops.h"
#include "pool.h"
#include "quant_internal.h"   /* DG_CLONES */

enum { LANES = 16 };           /* partial sums per row: a fixed order the compiler can keep in vector registers */
enum { CDF_BLOCK = 256 };      /* values whose mass the inverse CDF adds at once */

typedef struct {
    const float *logits;
    int64_t V;
    float temp;
    const double *uniforms;
    float *scaled, **scratch;
    int64_t *argmax, *sampled;
    float *entropy;
} step_ctx;

/* scaled = logits / temp (logits may be scaled itself); returns the max. GCC does not vectorise a float max
 * without -ffinite-math-only, so the LANES running maxima are one vector (GCC's vector extension, lowered to what
 * each clone has) and the select is spelled out on the bits: exactly s > m ? s : m per lane. */
typedef float lanes_f __attribute__((vector_size(4 * LANES)));
typedef int32_t lanes_i __attribute__((vector_size(4 * LANES)));

DG_CLONES
static float scale_and_max(float *scaled, const float *logits, int64_t V, float temp) {
    lanes_f m;
    for (int j = 0; j < LANES; j++) m[j] = -INFINITY;
    int64_t v = 0;
    for (; v + LANES <= V; v += LANES) {
        lanes_f s;
        memcpy(&s, logits + v, sizeof s);
        s = s / temp;
        memcpy(scaled + v, &s, sizeof s);
        const lanes_i larger = s > m;
        m = (lanes_f)(((lanes_i)s & larger) | ((lanes_i)m & ~larger));
    }
    for (; v < V; v++) {
        scaled[v] = logits[v] / temp;
        m[0] = scaled[v] > m[0] ? scaled[v] : m[0];
    }
    float mx = m[0];
    for (int j = 1; j < LANES; j++) mx = m[j] > mx ? m[j] : mx;
    return mx;
}

/* The first index holding mx (as argmax returns; V - 1 when none does), found a block at a time. */
DG_CLONES
static int64_t first_index(const float *x, int64_t V, float mx) {
    int64_t v = 0;
    for (; v + 4 * LANES <= V; v += 4 * LANES) {
        int hit = 0;
        for (int j = 0; j < 4 * LANES; j++) hit |= x[v + j] == mx;
        if (hit) break;
    }
    while (v < V - 1 && x[v] != mx) v++;
    return v;
}

/* Sum of e[0..n) in LANES double lanes: a block's mass, for skipping whole blocks of the inverse CDF. */
DG_CLONES
static double block_mass(const float *e, int64_t n) {
    double s[LANES] = {0};
    for (int64_t v = 0; v < n; v++) s[v % LANES] += e[v];
    double t = 0;
    for (int j = 0; j < LANES; j++) t += s[j];
    return t;
}

/* e[v] = exp(scaled[v] - mx); *Z = sum e, *S = sum e * (scaled - mx), both in double over LANES fixed lanes. */
DG_CLONES
static void exp_sums(float *e, const float *scaled, int64_t V, float mx, double *Z, double *S) {
    for (int64_t v = 0; v < V; v++) e[v] = exp_nonpositive(scaled[v] - mx);
    double z[LANES] = {0}, s[LANES] = {0};
    int64_t v = 0;
    for (; v + LANES <= V; v += LANES)
        for (int j = 0; j < LANES; j++) {
            z[j] += e[v + j];
            s[j] += (double)e[v + j] * (scaled[v + j] - mx);
        }
    for (; v < V; v++) {
        z[0] += e[v];
        s[0] += (double)e[v] * (scaled[v] - mx);
    }
    double zt = 0, st = 0;
    for (int j = 0; j < LANES; j++) { zt += z[j]; st += s[j]; }
    *Z = zt;
    *S = st;
}

static void step_rows(void *arg, int64_t lo, int64_t hi, int thread) {
    const step_ctx *c = arg;
    const int64_t V = c->V;
    float *e = c->scratch[thread];
    for (int64_t r = lo; r < hi; r++) {
        float *scaled = c->scaled + r * V;
        float mx = scale_and_max(scaled, c->logits + r * V, V, c->temp);
        int64_t am = first_index(scaled, V, mx);
        double Z, S;
        exp_sums(e, scaled, V, mx, &Z, &S);
        c->argmax[r] = am;
        c->entropy[r] = (float)(log(Z) - S / Z);
        if (c->uniforms) {                                   /* first v whose cumulative sum exceeds u * Z */
            double target = c->uniforms[r] * Z, cum = 0;
            int64_t v = 0;
            for (double b; v + CDF_BLOCK < V && cum + (b = block_mass(e + v, CDF_BLOCK)) <= target; v += CDF_BLOCK)
                cum += b;                                    /* whole blocks below the target, then one by one */
            for (; v < V - 1; v++) {
                cum += e[v];
                if (cum > target) break;
            }
            c->sampled[r] = v;
        }
    }
}

int dg_sample_step(const float *logits, int64_t n, int64_t V, float temp, const double *uniforms, float *scaled,
                   int64_t *argmax, float *entropy, int64_t *sampled, int n_threads, char *err, size_t errlen) {
    if (n < 1 || V < 1 || !(temp > 0.0f) || !isfinite(temp) || (uniforms && !sampled)) {
        snprintf(err, errlen, "sample_step: bad arguments (n %lld, vocab %lld, temperature %g)", (long long)n,
                 (long long)V, (double)temp);
        return DG_E_VALUE;
    }
    dg_pool *pool = pool_new(n_threads);
    int nt = pool_threads(pool);
    float **scratch = calloc((size_t)nt, sizeof(float *));
    int ok = scratch != NULL;
    for (int i = 0; ok && i < nt; i++) ok = (scratch[i] = malloc((size_t)V * sizeof(float))) != NULL;
    if (ok) {
        step_ctx c = { logits, V, temp, uniforms, scaled, scratch, argmax, sampled, entropy };
        parallel_for(pool, n, step_rows, &c);
    }
    for (int i = 0; scratch && i < nt; i++) free(scratch[i]);
    free(scratch);
    pool_free(pool);
    if (!ok) {
        snprintf(err, errlen, "sample_step: out of memory for %d rows of %lld floats", nt, (long long)V);
        return DG_E_VALUE;
    }
    return DG_OK;
}
