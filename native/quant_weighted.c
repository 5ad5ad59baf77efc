/* quant_weighted.c: quantizers that minimise an importance-weighted squared error, and the IQ4_XS type.
 *
 * With an importance matrix (llama.cpp's imatrix: per column of a weight, the mean squared activation that
 * column multiplies), the error of value i counts with weight w_i = imp_i * sqrt(sigma2 + x_i^2), sigma2 twice
 * the block's mean square: llama.cpp's weighting, which adds the value's own magnitude to the activation
 * statistics. Every search here is a weighted least-squares fit:
 *   - each sub-block's scale (and min) from candidate roundings, each refitted in closed form, then Lloyd steps;
 *   - the sub-block scales quantized against the super-block scale, then each sub-block's scale code (and min
 *     code) moved by one step where that lowers the sub-block's weighted error, for a few super-block scales;
 *   - the values rounded to the nearest level of the stored scales (which is optimal for any weights).
 * Plain (unweighted) K-quants and legacy types stay in quant_k.c / quant.c; IQ4_XS without an importance
 * matrix runs the same search here with unit weights (so it minimises the plain squared error).
 */
#include <math.h>
#include <string.h>

#include "dgguf.h"
#include "quant_internal.h"

/* Relative steps of the candidate inverse scales around the range-filling one, and Lloyd refinements. */
#define N_DELTAS 21
#define DELTA_STEP 0.1f
#define N_REFINE 3

static inline float clampf(float v, float lo, float hi) { return v < lo ? lo : v > hi ? hi : v; }

/* w_i = imp_i * sqrt(sigma2 + x_i^2), sigma2 = 2 * mean(x^2) over the n values; imp NULL: w_i = 1. */
static void value_weights(const float *x, const float *imp, int64_t n, float *w) {
    if (!imp) {
        for (int64_t i = 0; i < n; i++) w[i] = 1.0f;
        return;
    }
    double s2 = 0.0;
    for (int64_t i = 0; i < n; i++) s2 += (double)x[i] * x[i];
    const float sigma2 = (float)(2.0 * s2 / (double)n);
    for (int64_t i = 0; i < n; i++) w[i] = imp[i] * sqrtf(sigma2 + x[i] * x[i]);
}

/* ---- sub-block fits ----------------------------------------------------------------------------------- */

/* x ~ s * l + m, l in [0, nmax]: the weighted least-squares s > 0 and m over candidate roundings. free_min: m of
 * either sign (Q4_1, Q5_1); else m <= 0 (the K-quants store -m as a non-negative min). */
static void fit_asym_w(const float *x, const float *w, int n, int nmax, int free_min, float *scale, float *min) {
    float lo = x[0], hi = x[0], sw = 0.0f, swx = 0.0f;
    for (int i = 0; i < n; i++) {
        lo = x[i] < lo ? x[i] : lo;
        hi = x[i] > hi ? x[i] : hi;
        sw += w[i];
        swx += w[i] * x[i];
    }
    if (!free_min && lo > 0.0f) lo = 0.0f;
    /* fallback: the constant fit (m = weighted mean, kept only if storable) */
    float best_m = sw > 0.0f ? swx / sw : 0.0f;
    if (!free_min && best_m > 0.0f) best_m = 0.0f;
    float best_s = 0.0f, best_g = best_m * swx;
    const float range = hi - lo;
    if (range > 1e-30f && sw > 0.0f) {
        for (int k = 0; k < N_DELTAS + N_REFINE; k++) {
            float iscale, off;
            if (k < N_DELTAS) {
                iscale = ((float)nmax + DELTA_STEP * (float)(k - N_DELTAS / 2)) / range;
                off = lo;
            } else {
                if (!(best_s > 1e-30f)) break;
                iscale = 1.0f / best_s;
                off = best_m;
            }
            float swl = 0.0f, swll = 0.0f, swxl = 0.0f;
            for (int i = 0; i < n; i++) {
                const float l = (float)(int)clampf((x[i] - off) * iscale + 0.5f, 0.0f, (float)nmax);
                swl += w[i] * l;
                swll += w[i] * l * l;
                swxl += w[i] * x[i] * l;
            }
            const float det = sw * swll - swl * swl;
            float s = 0.0f, m = 0.0f;
            if (det > 0.0f) {
                s = (sw * swxl - swx * swl) / det;
                m = (swll * swx - swl * swxl) / det;
            }
            if (!(det > 0.0f) || (!free_min && m > 0.0f)) {
                m = 0.0f;
                s = swll > 0.0f ? swxl / swll : 0.0f;
            }
            const float g = s * swxl + m * swx;   /* error = sum w x^2 - g at the least-squares solution */
            if (s > 0.0f && g > best_g) { best_g = g; best_s = s; best_m = m; }
        }
    }
    *scale = best_s;
    *min = best_m;
}

/* x ~ s * l, l in [-nmax, nmax - 1]: the weighted least-squares s (either sign) over candidate roundings that
 * put the largest magnitude on either end. */
static float fit_sym_w(const float *x, const float *w, int n, int nmax) {
    float amax = 0.0f, vmax = 0.0f;
    for (int i = 0; i < n; i++)
        if (fabsf(x[i]) > amax) { amax = fabsf(x[i]); vmax = x[i]; }
    if (!(amax > 1e-30f)) return 0.0f;
    float best_s = 0.0f, best_g = 0.0f;
    const float top = (float)(2 * nmax - 1);
    for (int k = 0; k < 2 * N_DELTAS + N_REFINE; k++) {
        float iscale;
        if (k < N_DELTAS) iscale = -((float)nmax + DELTA_STEP * (float)(k - N_DELTAS / 2)) / vmax;
        else if (k < 2 * N_DELTAS) iscale = ((float)(nmax - 1) + DELTA_STEP * (float)(k - N_DELTAS - N_DELTAS / 2)) / vmax;
        else if (fabsf(best_s) > 1e-30f) iscale = 1.0f / best_s;
        else break;
        float swll = 0.0f, swxl = 0.0f;
        for (int i = 0; i < n; i++) {
            const float l = (float)(int)clampf(x[i] * iscale + ((float)nmax + 0.5f), 0.0f, top) - (float)nmax;
            swll += w[i] * l * l;
            swxl += w[i] * x[i] * l;
        }
        const float s = swll > 0.0f ? swxl / swll : 0.0f;
        if (s * swxl > best_g) { best_g = s * swxl; best_s = s; }
    }
    return best_s;
}

/* Weighted error of rounding x to d * l - m, l in [0, nmax] (levels to L). */
static float err_asym(const float *x, const float *w, int n, int nmax, float d, float m, uint8_t *L) {
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    float e = 0.0f;
    for (int i = 0; i < n; i++) {
        const int l = (int)clampf((x[i] + m) * id + 0.5f, 0.0f, (float)nmax);
        const float r = x[i] - (d * (float)l - m);
        e += w[i] * r * r;
        L[i] = (uint8_t)l;
    }
    return e;
}

/* Weighted error of rounding x to d * (l - nmax), l in [0, 2 nmax - 1] (levels to L). */
static float err_sym(const float *x, const float *w, int n, int nmax, float d, uint8_t *L) {
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    float e = 0.0f;
    for (int i = 0; i < n; i++) {
        const int l = (int)clampf(x[i] * id + ((float)nmax + 0.5f), 0.0f, (float)(2 * nmax - 1));
        const float r = x[i] - d * (float)(l - nmax);
        e += w[i] * r * r;
        L[i] = (uint8_t)l;
    }
    return e;
}

static inline int nearest_int(float v, int lo, int hi) { return (int)clampf(floorf(v + 0.5f), (float)lo, (float)hi); }

/* Super-block scale candidates, as factors of the one that maps the largest sub-block scale to the top code. */
static const float SUPER_FACTORS[] = {1.0f, 0.96f, 0.92f, 1.04f};
#define N_SUPER ((int)(sizeof SUPER_FACTORS / sizeof SUPER_FACTORS[0]))

/* ---- asymmetric K-quants (Q2_K: 16 x 16 values, 4-bit codes; Q4_K, Q5_K: 8 x 32, 6-bit codes) ---------- */

/* Scales and mins of ns sub-blocks of sb values as codes ls, lm in [0, qmax] against the f16 super-block
 * scales *d16, *m16, each sub-block's codes the best of their rounded values +-1; levels to L. */
static void asym_superblock(const float *x, const float *w, int ns, int sb, int nmax, int qmax, uint16_t *d16,
                            uint16_t *m16, uint8_t *ls, uint8_t *lm, uint8_t *L) {
    float scale[16], mins[16];
    float smax = 0.0f, mmax = 0.0f;
    for (int s = 0; s < ns; s++) {
        float m;
        fit_asym_w(x + s * sb, w + s * sb, sb, nmax, 0, &scale[s], &m);
        mins[s] = -m;
        smax = scale[s] > smax ? scale[s] : smax;
        mmax = mins[s] > mmax ? mins[s] : mmax;
    }
    float best = INFINITY;
    uint8_t tl[QK_K], tls[16], tlm[16];
    for (int c = 0; c < N_SUPER; c++) {
        const uint16_t cd = dg_f32_to_f16(smax * SUPER_FACTORS[c] / (float)qmax);
        const uint16_t cm = dg_f32_to_f16(mmax / (float)qmax);
        const float d = dg_f16_to_f32(cd), dm = dg_f16_to_f32(cm);
        if (c > 0 && !(d > 0.0f)) break;
        float total = 0.0f;
        for (int s = 0; s < ns; s++) {
            const int l0 = d > 0.0f ? nearest_int(scale[s] / d, 0, qmax) : 0;
            const int m0 = dm > 0.0f ? nearest_int(mins[s] / dm, 0, qmax) : 0;
            float bs = INFINITY;
            uint8_t lt[32];
            for (int a = l0 - 1; a <= l0 + 1; a++)
                for (int b = m0 - 1; b <= m0 + 1; b++) {
                    if (a < 0 || a > qmax || b < 0 || b > qmax) continue;
                    const float e = err_asym(x + s * sb, w + s * sb, sb, nmax, d * (float)a, dm * (float)b, lt);
                    if (e < bs) {
                        bs = e;
                        tls[s] = (uint8_t)a;
                        tlm[s] = (uint8_t)b;
                        memcpy(tl + s * sb, lt, (size_t)sb);
                    }
                }
            total += bs;
        }
        if (total < best) {
            best = total;
            *d16 = cd;
            *m16 = cm;
            memcpy(ls, tls, (size_t)ns);
            memcpy(lm, tlm, (size_t)ns);
            memcpy(L, tl, (size_t)(ns * sb));
        }
    }
}

static void q2_K_w(const float *x, void *dst, int64_t n, const float *imp) {
    block_q2_K *y = dst;
    for (int64_t b = 0; b < n / QK_K; b++, x += QK_K) {
        float w[QK_K];
        uint8_t ls[16], lm[16], L[QK_K];
        value_weights(x, imp ? imp + b * QK_K : NULL, QK_K, w);
        asym_superblock(x, w, 16, 16, 3, 15, &y[b].d, &y[b].dmin, ls, lm, L);
        for (int s = 0; s < 16; s++) y[b].scales[s] = (uint8_t)(ls[s] | lm[s] << 4);
        dg_pack_q2_K(&y[b], L);
    }
}

static void q4_K_w(const float *x, void *dst, int64_t n, const float *imp) {
    block_q4_K *y = dst;
    for (int64_t b = 0; b < n / QK_K; b++, x += QK_K) {
        float w[QK_K];
        uint8_t ls[8], lm[8], L[QK_K];
        value_weights(x, imp ? imp + b * QK_K : NULL, QK_K, w);
        asym_superblock(x, w, 8, 32, 15, 63, &y[b].d, &y[b].dmin, ls, lm, L);
        dg_pack_scales_k4(y[b].scales, ls, lm);
        dg_pack_q4_K(&y[b], L);
    }
}

static void q5_K_w(const float *x, void *dst, int64_t n, const float *imp) {
    block_q5_K *y = dst;
    for (int64_t b = 0; b < n / QK_K; b++, x += QK_K) {
        float w[QK_K];
        uint8_t ls[8], lm[8], L[QK_K];
        value_weights(x, imp ? imp + b * QK_K : NULL, QK_K, w);
        asym_superblock(x, w, 8, 32, 31, 63, &y[b].d, &y[b].dmin, ls, lm, L);
        dg_pack_scales_k4(y[b].scales, ls, lm);
        dg_pack_q5_K(&y[b], L);
    }
}

/* ---- symmetric K-quants (Q3_K: 16 x 16, nmax 4, 6-bit signed codes; Q6_K: nmax 32, 8-bit codes) -------- */

/* Signed codes sc in [-half, half - 1] against the f16 super-block scale *d16 (the largest-magnitude sub-block
 * scale maps to -half), each the best of its rounded value +-1; levels to L. */
static void sym_superblock(const float *x, const float *w, int nmax, int half, uint16_t *d16, int8_t *sc,
                           uint8_t *L) {
    float scale[16], amax = 0.0f, vmax = 0.0f;
    for (int s = 0; s < 16; s++) {
        scale[s] = fit_sym_w(x + 16 * s, w + 16 * s, 16, nmax);
        if (fabsf(scale[s]) > amax) { amax = fabsf(scale[s]); vmax = scale[s]; }
    }
    float best = INFINITY;
    uint8_t tl[QK_K];
    int8_t tsc[16];
    for (int c = 0; c < N_SUPER; c++) {
        const uint16_t cd = dg_f32_to_f16(vmax * SUPER_FACTORS[c] / (float)-half);
        const float d = dg_f16_to_f32(cd);
        if (c > 0 && !(d != 0.0f)) break;
        float total = 0.0f;
        for (int s = 0; s < 16; s++) {
            const int q0 = d != 0.0f ? nearest_int(scale[s] / d, -half, half - 1) : 0;
            float bs = INFINITY;
            uint8_t lt[16];
            for (int q = q0 - 1; q <= q0 + 1; q++) {
                if (q < -half || q > half - 1) continue;
                const float e = err_sym(x + 16 * s, w + 16 * s, 16, nmax, d * (float)q, lt);
                if (e < bs) {
                    bs = e;
                    tsc[s] = (int8_t)q;
                    memcpy(tl + 16 * s, lt, 16);
                }
            }
            total += bs;
        }
        if (total < best) {
            best = total;
            *d16 = cd;
            memcpy(sc, tsc, sizeof tsc);
            memcpy(L, tl, sizeof tl);
        }
    }
}

static void q3_K_w(const float *x, void *dst, int64_t n, const float *imp) {
    block_q3_K *y = dst;
    for (int64_t b = 0; b < n / QK_K; b++, x += QK_K) {
        float w[QK_K];
        int8_t sc[16];
        uint8_t L[QK_K];
        value_weights(x, imp ? imp + b * QK_K : NULL, QK_K, w);
        sym_superblock(x, w, 4, 32, &y[b].d, sc, L);
        dg_pack_q3_K(&y[b], sc, L);
    }
}

static void q6_K_w(const float *x, void *dst, int64_t n, const float *imp) {
    block_q6_K *y = dst;
    for (int64_t b = 0; b < n / QK_K; b++, x += QK_K) {
        float w[QK_K];
        uint8_t L[QK_K];
        value_weights(x, imp ? imp + b * QK_K : NULL, QK_K, w);
        sym_superblock(x, w, 32, 128, &y[b].d, y[b].scales, L);
        dg_pack_q6_K(&y[b], L);
    }
}

/* ---- legacy 32-value blocks (weights over the whole row, as llama.cpp's) -------------------------------- */

static void pack_legacy(uint8_t qs[16], uint8_t *qh, const uint8_t L[32]) {
    for (int j = 0; j < 16; j++) qs[j] = (uint8_t)((L[j] & 0xf) | (L[j + 16] & 0xf) << 4);
    if (qh) {
        uint32_t h = 0;
        for (int j = 0; j < 32; j++) h |= (uint32_t)(L[j] >> 4) << j;
        for (int k = 0; k < 4; k++) qh[k] = (uint8_t)(h >> (8 * k));
    }
}

/* Q4_0 / Q5_0: x ~ d (l - nmax). The scale is fitted, stored as f16, and the values rounded against it. */
static void legacy_sym(const float *x, const float *w, int nmax, uint16_t *d16, uint8_t qs[16], uint8_t *qh) {
    uint8_t L[32];
    *d16 = dg_f32_to_f16(fit_sym_w(x, w, 32, nmax));
    err_sym(x, w, 32, nmax, dg_f16_to_f32(*d16), L);
    pack_legacy(qs, qh, L);
}

/* Q4_1 / Q5_1: x ~ d l + m, m of either sign. */
static void legacy_asym(const float *x, const float *w, int nmax, uint16_t *d16, uint16_t *m16, uint8_t qs[16],
                        uint8_t *qh) {
    uint8_t L[32];
    float s, m;
    fit_asym_w(x, w, 32, nmax, 1, &s, &m);
    *d16 = dg_f32_to_f16(s);
    *m16 = dg_f32_to_f16(m);
    err_asym(x, w, 32, nmax, dg_f16_to_f32(*d16), -dg_f16_to_f32(*m16), L);
    pack_legacy(qs, qh, L);
}

/* sigma2 for a legacy row: the row's mean square (llama.cpp's choice for these types). */
static float row_sigma2(const float *x, int64_t n) {
    double s2 = 0.0;
    for (int64_t i = 0; i < n; i++) s2 += (double)x[i] * x[i];
    return (float)(s2 / (double)n);
}

#define LEGACY_ROW(NAME, BLOCK, BODY)                                                 \
    static void NAME(const float *x, void *dst, int64_t n, const float *imp) {       \
        BLOCK *y = dst;                                                              \
        const float sigma2 = row_sigma2(x, n);                                       \
        for (int64_t b = 0; b < n / 32; b++) {                                       \
            const float *xb = x + 32 * b;                                            \
            float wb[32];                                                            \
            for (int i = 0; i < 32; i++) wb[i] = imp[32 * b + i] * sqrtf(sigma2 + xb[i] * xb[i]); \
            BLOCK *yb = y + b;                                                       \
            BODY;                                                                    \
        }                                                                            \
    }

LEGACY_ROW(q4_0_w, block_q4_0, legacy_sym(xb, wb, 8, &yb->d, yb->qs, NULL))
LEGACY_ROW(q5_0_w, block_q5_0, legacy_sym(xb, wb, 16, &yb->d, yb->qs, yb->qh))
LEGACY_ROW(q4_1_w, block_q4_1, legacy_asym(xb, wb, 15, &yb->d, &yb->m, yb->qs, NULL))
LEGACY_ROW(q5_1_w, block_q5_1, legacy_asym(xb, wb, 31, &yb->d, &yb->m, yb->qs, yb->qh))

/* ---- IQ4_XS ------------------------------------------------------------------------------------------- */

/* Index of the level nearest v (in level units): how many midpoints between neighbouring levels lie below v
 * (branch-free, so the loops over values vectorise). */
static const float IQ4_MIDS[15] = {-115.5f, -93.5f, -74.0f, -57.0f, -42.0f, -28.5f, -16.0f, -4.5f,
                                   7.0f, 19.0f, 31.5f, 45.5f, 61.0f, 79.0f, 101.0f};

static inline int iq4_nearest(float v) {
    int q = 0;
    for (int k = 0; k < 15; k++) q += v > IQ4_MIDS[k];
    return q;
}

/* x ~ s * LEVEL[q]: the weighted least-squares s over candidate roundings mapping the largest magnitude to
 * either end of the table, then Lloyd steps. */
static float iq4_fit(const float *x, const float *w, int n) {
    float amax = 0.0f, vmax = 0.0f;
    for (int i = 0; i < n; i++)
        if (fabsf(x[i]) > amax) { amax = fabsf(x[i]); vmax = x[i]; }
    if (!(amax > 1e-30f)) return 0.0f;
    float best_s = 0.0f, best_g = 0.0f;
    enum { STEPS = 9 };
    for (int k = 0; k < 2 * STEPS + N_REFINE; k++) {
        float iscale;
        if (k < STEPS) iscale = ((float)IQ4_LEVELS[0] + (float)(k - STEPS / 2)) / vmax;
        else if (k < 2 * STEPS) iscale = ((float)IQ4_LEVELS[15] + (float)(k - STEPS - STEPS / 2)) / vmax;
        else if (fabsf(best_s) > 1e-30f) iscale = 1.0f / best_s;
        else break;
        float svv = 0.0f, sxv = 0.0f;
        for (int i = 0; i < n; i++) {
            const float v = (float)IQ4_LEVELS[iq4_nearest(x[i] * iscale)];
            svv += w[i] * v * v;
            sxv += w[i] * x[i] * v;
        }
        const float s = svv > 0.0f ? sxv / svv : 0.0f;
        if (s * sxv > best_g) { best_g = s * sxv; best_s = s; }
    }
    return best_s;
}

static float iq4_err(const float *x, const float *w, int n, float d, uint8_t *q) {
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    float e = 0.0f;
    for (int i = 0; i < n; i++) {
        q[i] = (uint8_t)iq4_nearest(x[i] * id);
        const float r = x[i] - d * (float)IQ4_LEVELS[q[i]];
        e += w[i] * r * r;
    }
    return e;
}

static void iq4_xs_w(const float *x, void *dst, int64_t n, const float *imp) {
    block_iq4_xs *y = dst;
    for (int64_t b = 0; b < n / QK_K; b++, x += QK_K) {
        float w[QK_K], scale[8], amax = 0.0f, vmax = 0.0f;
        value_weights(x, imp ? imp + b * QK_K : NULL, QK_K, w);
        for (int s = 0; s < 8; s++) {
            scale[s] = iq4_fit(x + 32 * s, w + 32 * s, 32);
            if (fabsf(scale[s]) > amax) { amax = fabsf(scale[s]); vmax = scale[s]; }
        }
        float best = INFINITY;
        uint8_t q[QK_K], bq[QK_K];
        int codes[8], bcodes[8] = {0};
        uint16_t bd = 0;
        for (int c = 0; c < N_SUPER; c++) {
            const uint16_t cd = dg_f32_to_f16(vmax * SUPER_FACTORS[c] / -32.0f);
            const float d = dg_f16_to_f32(cd);
            if (c > 0 && !(d != 0.0f)) break;
            float total = 0.0f;
            for (int s = 0; s < 8; s++) {
                const int l0 = d != 0.0f ? nearest_int(scale[s] / d, -32, 31) : 0;
                float bs = INFINITY;
                uint8_t qt[32];
                for (int l = l0 - 1; l <= l0 + 1; l++) {
                    if (l < -32 || l > 31) continue;
                    const float e = iq4_err(x + 32 * s, w + 32 * s, 32, d * (float)l, qt);
                    if (e < bs) {
                        bs = e;
                        codes[s] = l + 32;
                        memcpy(q + 32 * s, qt, 32);
                    }
                }
                total += bs;
            }
            if (total < best) {
                best = total;
                bd = cd;
                memcpy(bcodes, codes, sizeof codes);
                memcpy(bq, q, sizeof q);
            }
        }
        y[b].d = bd;
        y[b].scales_h = 0;
        memset(y[b].scales_l, 0, sizeof y[b].scales_l);
        for (int s = 0; s < 8; s++) {
            y[b].scales_l[s / 2] |= (uint8_t)((bcodes[s] & 0xf) << (4 * (s % 2)));
            y[b].scales_h |= (uint16_t)((bcodes[s] >> 4) << (2 * s));
            for (int j = 0; j < 16; j++)
                y[b].qs[16 * s + j] = (uint8_t)(bq[32 * s + j] | bq[32 * s + j + 16] << 4);
        }
    }
}

void dg_quantize_row_iq4_xs(const float *x, void *dst, int64_t n) { iq4_xs_w(x, dst, n, NULL); }

/* IQ4_NL: blocks of 32 at one f16 scale (the fallback of IQ4_XS for rows that are not whole super-blocks). */
static void iq4_nl_w(const float *x, void *dst, int64_t n, const float *imp) {
    block_iq4_nl *y = dst;
    const float sigma2 = imp ? row_sigma2(x, n) : 0.0f;
    for (int64_t b = 0; b < n / 32; b++, x += 32) {
        float w[32];
        uint8_t q[32];
        for (int i = 0; i < 32; i++) w[i] = imp ? imp[32 * b + i] * sqrtf(sigma2 + x[i] * x[i]) : 1.0f;
        y[b].d = dg_f32_to_f16(iq4_fit(x, w, 32));
        iq4_err(x, w, 32, dg_f16_to_f32(y[b].d), q);
        for (int j = 0; j < 16; j++) y[b].qs[j] = (uint8_t)(q[j] | q[j + 16] << 4);
    }
}

void dg_quantize_row_iq4_nl(const float *x, void *dst, int64_t n) { iq4_nl_w(x, dst, n, NULL); }

void dg_dequantize_row_iq4_nl(const void *src, float *restrict y, int64_t n) {
    const block_iq4_nl *x = src;
    for (int64_t b = 0; b < n / 32; b++, y += 32) {
        const float d = dg_f16_to_f32(x[b].d);
        for (int j = 0; j < 16; j++) {
            y[j] = d * (float)IQ4_LEVELS[x[b].qs[j] & 0xf];
            y[j + 16] = d * (float)IQ4_LEVELS[x[b].qs[j] >> 4];
        }
    }
}

void dg_dequantize_row_iq4_xs(const void *src, float *restrict y, int64_t n) {
    const block_iq4_xs *x = src;
    for (int64_t b = 0; b < n / QK_K; b++) {
        const float d = dg_f16_to_f32(x[b].d);
        for (int s = 0; s < 8; s++, y += 32) {
            const float dl = d * (float)(iq4_xs_scale(&x[b], s) - 32);
            const uint8_t *q = x[b].qs + 16 * s;
            for (int j = 0; j < 16; j++) {
                y[j] = dl * (float)IQ4_LEVELS[q[j] & 0xf];
                y[j + 16] = dl * (float)IQ4_LEVELS[q[j] >> 4];
            }
        }
    }
}

/* ---- dispatch ----------------------------------------------------------------------------------------- */

dg_quantize_w_fn dg_weighted_quantizer(int type) {
    switch (type) {
    case DG_TYPE_Q2_K: return q2_K_w;
    case DG_TYPE_Q3_K: return q3_K_w;
    case DG_TYPE_Q4_K: return q4_K_w;
    case DG_TYPE_Q5_K: return q5_K_w;
    case DG_TYPE_Q6_K: return q6_K_w;
    case DG_TYPE_Q4_0: return q4_0_w;
    case DG_TYPE_Q5_0: return q5_0_w;
    case DG_TYPE_Q4_1: return q4_1_w;
    case DG_TYPE_Q5_1: return q5_1_w;
    case DG_TYPE_IQ4_XS: return iq4_xs_w;
    case DG_TYPE_IQ4_NL: return iq4_nl_w;
    }
    return NULL;
}
