/* quant_k.c: K-quants (256-value super-blocks of 16- or 32-value sub-blocks).
 *
 * Quantization is two-level: each sub-block gets a least-squares scale (and
 * min for the asymmetric types), then those are themselves quantized to 4, 6
 * or 8 bits against one f16 super-block scale, and the values are rounded
 * against the scales as stored.
 *
 * The sub-block search minimises plain squared error. Every sub-block of a
 * super-block is fitted at once, one sub-block per lane (the input is
 * transposed first), so the inner loops are branch-free and identical across
 * lanes: the compiler vectorises them, and the same source compiled with AVX2
 * enabled is the fast path (the search is instantiated for the scalar
 * reference, the baseline vector build and AVX2). All three do the same IEEE
 * operations in the same order, so they agree bit for bit.
 */
#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "quant_internal.h"

#define MAX_LANES 16

/* Candidate inverse scales are (nmax + delta) / range; a handful of deltas
 * around the range-filling scale, then Lloyd steps from the best fit, find the
 * least-squares optimum about as well as a dense scan at a fraction of the cost. */
typedef struct {
    const float *deltas;
    int ndeltas;
    int nrefine;
} search_plan;

#define ALWAYS_INLINE inline __attribute__((always_inline))

/* x ~ scale * l + min, l in [0, nmax], min <= 0. xt holds sb values of each of
 * ns lanes, lane-minor (xt[i * ns + s]). Outputs scale >= 0 and mins = -min >= 0. */
static ALWAYS_INLINE void fit_asym(const float *restrict xt, const int sb, const int ns, const int nmax,
                                   const search_plan plan, float *restrict scale, float *restrict mins) {
    float lo[MAX_LANES], hi[MAX_LANES], sx[MAX_LANES];
    float best_g[MAX_LANES], best_s[MAX_LANES], best_m[MAX_LANES], inv_range[MAX_LANES];
    for (int s = 0; s < ns; s++) { lo[s] = xt[s]; hi[s] = xt[s]; sx[s] = 0.0f; }
    for (int i = 0; i < sb; i++)
        for (int s = 0; s < ns; s++) {
            const float v = xt[i * ns + s];
            lo[s] = v < lo[s] ? v : lo[s];
            hi[s] = v > hi[s] ? v : hi[s];
            sx[s] += v;
        }
    const float n = (float)sb;
    for (int s = 0; s < ns; s++) {
        lo[s] = lo[s] > 0.0f ? 0.0f : lo[s];
        const float range = hi[s] - lo[s];
        inv_range[s] = range > 1e-30f ? 1.0f / range : 0.0f;   /* keeps 1/range finite */
        /* fallback: a constant fit (scale 0, min = mean if negative); gain = min * sum */
        const float m0 = sx[s] < 0.0f ? sx[s] / n : 0.0f;
        best_s[s] = 0.0f; best_m[s] = m0; best_g[s] = m0 * sx[s];
    }
    for (int k = 0; k < plan.ndeltas + plan.nrefine; k++) {
        float iscale[MAX_LANES], off[MAX_LANES];
        for (int s = 0; s < ns; s++) {
            if (k < plan.ndeltas) {
                iscale[s] = ((float)nmax + plan.deltas[k]) * inv_range[s];
                off[s] = lo[s];
            } else {
                iscale[s] = best_s[s] > 1e-30f ? 1.0f / best_s[s] : 0.0f;
                off[s] = best_m[s];
            }
        }
        float sl[MAX_LANES] = {0}, sll[MAX_LANES] = {0}, sxl[MAX_LANES] = {0};
        for (int i = 0; i < sb; i++)
            for (int s = 0; s < ns; s++) {
                const float v = xt[i * ns + s];
                float t = (v - off[s]) * iscale[s] + 0.5f;
                t = t >= 0.0f ? t : 0.0f; /* also maps NaN (inf * 0 in absurd ranges) to 0 */
                t = t > (float)nmax ? (float)nmax : t;
                const float l = (float)(int)t;
                sl[s] += l;
                sll[s] += l * l;
                sxl[s] += v * l;
            }
        for (int s = 0; s < ns; s++) {
            const float det = n * sll[s] - sl[s] * sl[s];
            float sc = det > 0.0f ? (n * sxl[s] - sx[s] * sl[s]) / det : 0.0f;
            float mn = det > 0.0f ? (sll[s] * sx[s] - sl[s] * sxl[s]) / det : 0.0f;
            /* a positive min is not storable, and det == 0 (every l equal, e.g. a
             * constant sub-block) leaves the min free: fit the scale alone */
            if (mn > 0.0f || !(det > 0.0f)) {
                mn = 0.0f;
                sc = sll[s] > 0.0f ? sxl[s] / sll[s] : 0.0f;
            }
            /* at the least-squares solution, error = sum x^2 - (sc * sxl + mn * sx) */
            const float g = sc * sxl[s] + mn * sx[s];
            const int better = sc > 0.0f && g > best_g[s];
            best_g[s] = better ? g : best_g[s];
            best_s[s] = better ? sc : best_s[s];
            best_m[s] = better ? mn : best_m[s];
        }
    }
    for (int s = 0; s < ns; s++) { scale[s] = best_s[s]; mins[s] = -best_m[s]; }
}

/* x ~ scale * l, l in [-nmax, nmax - 1]; the scale's sign puts the largest
 * magnitude on the -nmax side, which has the extra level. */
static ALWAYS_INLINE void fit_sym(const float *restrict xt, const int sb, const int ns, const int nmax,
                                  const search_plan plan, float *restrict scale) {
    float amax[MAX_LANES], vmax[MAX_LANES], best_g[MAX_LANES], best_s[MAX_LANES];
    for (int s = 0; s < ns; s++) { amax[s] = 0.0f; vmax[s] = 0.0f; best_g[s] = 0.0f; best_s[s] = 0.0f; }
    for (int i = 0; i < sb; i++)
        for (int s = 0; s < ns; s++) {
            const float v = xt[i * ns + s];
            const float a = fabsf(v);
            const int bigger = a > amax[s];
            amax[s] = bigger ? a : amax[s];
            vmax[s] = bigger ? v : vmax[s];
        }
    float inv_max[MAX_LANES];
    for (int s = 0; s < ns; s++) inv_max[s] = amax[s] > 1e-30f ? -1.0f / vmax[s] : 0.0f;
    const float top = (float)(2 * nmax - 1);
    for (int k = 0; k < plan.ndeltas + plan.nrefine; k++) {
        float iscale[MAX_LANES];
        for (int s = 0; s < ns; s++)
            iscale[s] = k < plan.ndeltas ? ((float)nmax + plan.deltas[k]) * inv_max[s]
                                         : (fabsf(best_s[s]) > 1e-30f ? 1.0f / best_s[s] : 0.0f);
        float sll[MAX_LANES] = {0}, sxl[MAX_LANES] = {0};
        for (int i = 0; i < sb; i++)
            for (int s = 0; s < ns; s++) {
                const float v = xt[i * ns + s];
                float t = v * iscale[s] + ((float)nmax + 0.5f);
                t = t >= 0.0f ? t : 0.0f;
                t = t > top ? top : t;
                const float l = (float)(int)t - (float)nmax;
                sll[s] += l * l;
                sxl[s] += v * l;
            }
        for (int s = 0; s < ns; s++) {
            const float sc = sll[s] > 0.0f ? sxl[s] / sll[s] : 0.0f;
            const float g = sc * sxl[s];
            const int better = g > best_g[s];
            best_g[s] = better ? g : best_g[s];
            best_s[s] = better ? sc : best_s[s];
        }
    }
    for (int s = 0; s < ns; s++) scale[s] = best_s[s];
}


/* ---- the same searches on 8 lanes at a time (GCC vector extensions) ----------
 * Lane for lane these do exactly the operations of fit_asym / fit_sym above, so
 * results are identical; compiled for the baseline ISA they become SSE2/NEON
 * pairs, inside the AVX2 instantiation single 256-bit instructions. */

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

/* Macros rather than functions: a function passing 32-byte vectors by value
 * makes GCC warn about the AVX calling convention even when always inlined. */
#define VSPLAT(f) ((v8f){(f), (f), (f), (f), (f), (f), (f), (f)})
#define VLOAD(dst, p) memcpy(&(dst), (p), sizeof(v8f))
#define VSTORE(p, v) do { const v8f v_ = (v); memcpy((p), &v_, sizeof(v8f)); } while (0)
#define VSEL(m, a, b) ((v8f)(((m) & (v8i)(a)) | (~(m) & (v8i)(b))))
/* (float)(int)t, for t already clamped to [0, top] */
#define VTRUNC(t) __builtin_convertvector(__builtin_convertvector((t), v8i), v8f)

static ALWAYS_INLINE void fit_asym_v8(const float *restrict xt, const int sb, const int ns, const int nmax,
                                      const search_plan plan, float *restrict scale, float *restrict mins) {
    const v8f zero = VSPLAT(0.0f), half = VSPLAT(0.5f), vnmax = VSPLAT((float)nmax), n = VSPLAT((float)sb);
    for (int g = 0; g < ns; g += 8) {
        v8f lo; VLOAD(lo, xt + g);
        v8f hi = lo, sx = zero;
        for (int i = 0; i < sb; i++) {
            v8f v; VLOAD(v, xt + i * ns + g);
            lo = VSEL(v < lo, v, lo);
            hi = VSEL(v > hi, v, hi);
            sx += v;
        }
        lo = VSEL(lo > zero, zero, lo);
        const v8f range = hi - lo;
        const v8f inv_range = VSEL(range > VSPLAT(1e-30f), VSPLAT(1.0f) / range, zero);
        const v8f m0 = VSEL(sx < zero, sx / n, zero);
        v8f best_s = zero, best_m = m0, best_g = m0 * sx;
        for (int k = 0; k < plan.ndeltas + plan.nrefine; k++) {
            v8f iscale, off;
            if (k < plan.ndeltas) {
                iscale = VSPLAT((float)nmax + plan.deltas[k]) * inv_range;
                off = lo;
            } else {
                iscale = VSEL(best_s > VSPLAT(1e-30f), VSPLAT(1.0f) / best_s, zero);
                off = best_m;
            }
            v8f sl = zero, sll = zero, sxl = zero;
            for (int i = 0; i < sb; i++) {
                v8f v; VLOAD(v, xt + i * ns + g);
                v8f t = (v - off) * iscale + half;
                t = VSEL(t >= zero, t, zero);
                t = VSEL(t > vnmax, vnmax, t);
                const v8f l = VTRUNC(t);
                sl += l;
                sll += l * l;
                sxl += v * l;
            }
            const v8f det = n * sll - sl * sl;
            v8f sc = VSEL(det > zero, (n * sxl - sx * sl) / det, zero);
            v8f mn = VSEL(det > zero, (sll * sx - sl * sxl) / det, zero);
            const v8i refit = (mn > zero) | ~(det > zero);
            mn = VSEL(refit, zero, mn);
            sc = VSEL(refit, VSEL(sll > zero, sxl / sll, zero), sc);
            const v8f gain = sc * sxl + mn * sx;
            const v8i better = (sc > zero) & (gain > best_g);
            best_g = VSEL(better, gain, best_g);
            best_s = VSEL(better, sc, best_s);
            best_m = VSEL(better, mn, best_m);
        }
        VSTORE(scale + g, best_s);
        VSTORE(mins + g, -best_m);
    }
}

static ALWAYS_INLINE void fit_sym_v8(const float *restrict xt, const int sb, const int ns, const int nmax,
                                     const search_plan plan, float *restrict scale) {
    const v8f zero = VSPLAT(0.0f), top = VSPLAT((float)(2 * nmax - 1)), bias = VSPLAT((float)nmax + 0.5f);
    const v8f vnmax = VSPLAT((float)nmax), tiny = VSPLAT(1e-30f), one = VSPLAT(1.0f);
    for (int g = 0; g < ns; g += 8) {
        v8f amax = zero, vmax = zero;
        for (int i = 0; i < sb; i++) {
            v8f v; VLOAD(v, xt + i * ns + g);
            const v8f a = (v8f)((v8i)v & ~(v8i)VSPLAT(-0.0f));   /* |v| */
            const v8i bigger = a > amax;
            amax = VSEL(bigger, a, amax);
            vmax = VSEL(bigger, v, vmax);
        }
        const v8f inv_max = VSEL(amax > tiny, -one / vmax, zero);
        v8f best_g = zero, best_s = zero;
        for (int k = 0; k < plan.ndeltas + plan.nrefine; k++) {
            v8f iscale;
            if (k < plan.ndeltas) {
                iscale = VSPLAT((float)nmax + plan.deltas[k]) * inv_max;
            } else {
                const v8f abs_s = (v8f)((v8i)best_s & ~(v8i)VSPLAT(-0.0f));
                iscale = VSEL(abs_s > tiny, one / best_s, zero);
            }
            v8f sll = zero, sxl = zero;
            for (int i = 0; i < sb; i++) {
                v8f v; VLOAD(v, xt + i * ns + g);
                v8f t = v * iscale + bias;
                t = VSEL(t >= zero, t, zero);
                t = VSEL(t > top, top, t);
                const v8f l = VTRUNC(t) - vnmax;
                sll += l * l;
                sxl += v * l;
            }
            const v8f sc = VSEL(sll > zero, sxl / sll, zero);
            const v8f gain = sc * sxl;
            const v8i better = gain > best_g;
            best_g = VSEL(better, gain, best_g);
            best_s = VSEL(better, sc, best_s);
        }
        VSTORE(scale + g, best_s);
    }
}

static ALWAYS_INLINE void round_asym_v8(const float *restrict x, uint8_t *restrict L, const int n, const int nmax,
                                        const float d, const float m) {
    const float idf = d != 0.0f ? 1.0f / d : 0.0f;
    const v8f id = VSPLAT(idf), vm = VSPLAT(m), half = VSPLAT(0.5f), zero = VSPLAT(0.0f), top = VSPLAT((float)nmax);
    for (int i = 0; i < n; i += 8) {
        v8f xv; VLOAD(xv, x + i);
        v8f t = (xv + vm) * id + half;
        t = VSEL(t >= zero, t, zero);
        t = VSEL(t > top, top, t);
        const v8i q = __builtin_convertvector(t, v8i);
        for (int j = 0; j < 8; j++) L[i + j] = (uint8_t)q[j];
    }
}

static ALWAYS_INLINE void round_sym_v8(const float *restrict x, uint8_t *restrict L, const int n, const int nmax,
                                       const float d) {
    const float idf = d != 0.0f ? 1.0f / d : 0.0f;
    const v8f id = VSPLAT(idf), bias = VSPLAT((float)nmax + 0.5f), zero = VSPLAT(0.0f), top = VSPLAT((float)(2 * nmax - 1));
    for (int i = 0; i < n; i += 8) {
        v8f xv; VLOAD(xv, x + i);
        v8f t = xv * id + bias;
        t = VSEL(t >= zero, t, zero);
        t = VSEL(t > top, top, t);
        const v8i q = __builtin_convertvector(t, v8i);
        for (int j = 0; j < 8; j++) L[i + j] = (uint8_t)q[j];
    }
}

/* VEC is a compile-time constant in each instantiation: 0 = scalar reference, 1 = vectors. */
#define FIT_ASYM(VEC, ...) ((VEC) ? fit_asym_v8(__VA_ARGS__) : fit_asym(__VA_ARGS__))
#define FIT_SYM(VEC, ...) ((VEC) ? fit_sym_v8(__VA_ARGS__) : fit_sym(__VA_ARGS__))
#define ROUND_ASYM(VEC, ...) ((VEC) ? round_asym_v8(__VA_ARGS__) : round_asym(__VA_ARGS__))
#define ROUND_SYM(VEC, ...) ((VEC) ? round_sym_v8(__VA_ARGS__) : round_sym(__VA_ARGS__))

/* Lane-minor copy of one super-block: xt[i * ns + s] = x[s * sb + i]. */
static ALWAYS_INLINE void transpose(const float *restrict x, float *restrict xt, const int sb, const int ns) {
    for (int s = 0; s < ns; s++)
        for (int i = 0; i < sb; i++) xt[i * ns + s] = x[s * sb + i];
}

/* Round (x + m) / d to [0, nmax] (asymmetric) given the stored scale d and min m. */
static ALWAYS_INLINE void round_asym(const float *restrict x, uint8_t *restrict L, const int n, const int nmax,
                                     const float d, const float m) {
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    for (int i = 0; i < n; i++) {
        float t = (x[i] + m) * id + 0.5f;
        t = t >= 0.0f ? t : 0.0f;
        t = t > (float)nmax ? (float)nmax : t;
        L[i] = (uint8_t)(int)t;
    }
}

/* Round x / d to [-nmax, nmax - 1], stored with +nmax offset. */
static ALWAYS_INLINE void round_sym(const float *restrict x, uint8_t *restrict L, const int n, const int nmax,
                                    const float d) {
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    const float top = (float)(2 * nmax - 1);
    for (int i = 0; i < n; i++) {
        float t = x[i] * id + ((float)nmax + 0.5f);
        t = t >= 0.0f ? t : 0.0f;
        t = t > top ? top : t;
        L[i] = (uint8_t)(int)t;
    }
}

/* Nearest integer in [lo, hi]; clamps in float first so the conversion is always defined. */
static inline int nearest_clamped(float v, int lo, int hi) {
    v = floorf(v + 0.5f);
    v = v >= (float)lo ? v : (float)lo;
    v = v <= (float)hi ? v : (float)hi;
    return (int)v;
}

/* Quantize non-negative per-sub-block values to [0, qmax] against one f16 scale;
 * returns the stored scale as a float. */
static inline float quantize_scales_unsigned(const float *v, uint8_t *q, int ns, int qmax, uint16_t *d16) {
    float vmax = 0.0f;
    for (int s = 0; s < ns; s++) vmax = v[s] > vmax ? v[s] : vmax;
    if (!(vmax > 0.0f)) {
        memset(q, 0, (size_t)ns);
        *d16 = 0;
        return 0.0f;
    }
    *d16 = dg_f32_to_f16(vmax / (float)qmax);
    const float d = dg_f16_to_f32(*d16);
    const float id = d > 0.0f ? 1.0f / d : 0.0f;
    for (int s = 0; s < ns; s++) {
        q[s] = (uint8_t)nearest_clamped(v[s] * id, 0, qmax);
    }
    return d;
}

/* Quantize signed per-sub-block scales to [-half, half-1] against one f16 scale set from the scale of largest
 * magnitude (so that one maps to -half exactly); returns the stored scale as a float. */
static inline float quantize_scales_signed(const float *v, int8_t *q, int ns, int half, uint16_t *d16) {
    float vmax = 0.0f, amax = 0.0f;
    for (int s = 0; s < ns; s++)
        if (fabsf(v[s]) > amax) { amax = fabsf(v[s]); vmax = v[s]; }
    float d = 0.0f;
    *d16 = 0;
    if (amax > 0.0f) {
        *d16 = dg_f32_to_f16(vmax / (float)-half);
        d = dg_f16_to_f32(*d16);
    }
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    for (int s = 0; s < ns; s++) q[s] = (int8_t)nearest_clamped(v[s] * id, -half, half - 1);
    return d;
}

/* ---- per-type search plans -------------------------------------------------- */

static const float DELTAS_Q2[] = {-0.5f, -0.25f, 0.0f, 0.25f, 0.5f, 0.75f, 1.0f};
static const float DELTAS_Q3[] = {-0.5f, -0.25f, 0.0f, 0.25f, 0.5f};
static const float DELTAS_Q4[] = {-1.0f, -0.75f, -0.5f, -0.25f, 0.0f, 0.25f, 0.5f, 0.75f, 1.0f};
static const float DELTAS_Q5[] = {-0.5f, -0.25f, 0.0f, 0.25f, 0.5f, 0.75f, 1.0f};
static const float DELTAS_Q6[] = {-0.5f, -0.25f, 0.0f, 0.25f, 0.5f};

#define PLAN(d, r) ((search_plan){(d), (int)(sizeof(d) / sizeof((d)[0])), (r)})

/* ---- packing a super-block's levels (L: one unsigned level per value, in value order) ---- */

void dg_pack_q2_K(block_q2_K *y, const uint8_t *L) {
    for (int h = 0; h < 2; h++)
        for (int l = 0; l < 32; l++) {
            const uint8_t *q = L + 128 * h + l;
            y->qs[32 * h + l] = (uint8_t)(q[0] | q[32] << 2 | q[64] << 4 | q[96] << 6);
        }
}

void dg_pack_q3_K(block_q3_K *y, const int8_t *sc, const uint8_t *L) {
    memset(y->scales, 0, sizeof(y->scales));
    for (int s = 0; s < 16; s++) {
        const int u = sc[s] + 32;
        y->scales[s % 8] |= (uint8_t)((u & 0xf) << (4 * (s / 8)));
        y->scales[8 + s % 4] |= (uint8_t)((u >> 4) << (2 * (s / 4)));
    }
    memset(y->hmask, 0, sizeof(y->hmask));
    for (int j = 0; j < 8; j++)
        for (int l = 0; l < 32; l++) y->hmask[l] |= (uint8_t)((L[32 * j + l] >> 2) << j);
    for (int h = 0; h < 2; h++)
        for (int l = 0; l < 32; l++) {
            const uint8_t *q = L + 128 * h + l;
            y->qs[32 * h + l] = (uint8_t)((q[0] & 3) | (q[32] & 3) << 2 | (q[64] & 3) << 4 | (q[96] & 3) << 6);
        }
}

void dg_pack_q4_K(block_q4_K *y, const uint8_t *L) {
    for (int c = 0; c < 4; c++)
        for (int l = 0; l < 32; l++) y->qs[32 * c + l] = (uint8_t)(L[64 * c + l] | L[64 * c + 32 + l] << 4);
}

void dg_pack_q5_K(block_q5_K *y, const uint8_t *L) {
    for (int c = 0; c < 4; c++)
        for (int l = 0; l < 32; l++)
            y->qs[32 * c + l] = (uint8_t)((L[64 * c + l] & 0xf) | (L[64 * c + 32 + l] & 0xf) << 4);
    for (int l = 0; l < 32; l++) {
        uint8_t h = 0;
        for (int j = 0; j < 8; j++) h |= (uint8_t)((L[32 * j + l] >> 4) << j);
        y->qh[l] = h;
    }
}

void dg_pack_q6_K(block_q6_K *y, const uint8_t *L) {
    for (int h = 0; h < 2; h++)
        for (int l = 0; l < 32; l++) {
            const uint8_t *q = L + 128 * h + l;
            y->ql[64 * h + l] = (uint8_t)((q[0] & 0xf) | (q[64] & 0xf) << 4);
            y->ql[64 * h + 32 + l] = (uint8_t)((q[32] & 0xf) | (q[96] & 0xf) << 4);
            y->qh[32 * h + l] = (uint8_t)((q[0] >> 4) | (q[32] >> 4) << 2 | (q[64] >> 4) << 4 | (q[96] >> 4) << 6);
        }
}

/* ---- block kernels (instantiated for each ISA) ------------------------------ */

static ALWAYS_INLINE void q2_K_block(const float *restrict x, block_q2_K *restrict y, const int vec) {
    float xt[QK_K], scale[16], mins[16];
    uint8_t ls[16], lm[16], L[QK_K];
    transpose(x, xt, 16, 16);
    FIT_ASYM(vec, xt, 16, 16, 3, PLAN(DELTAS_Q2, 2), scale, mins);
    uint16_t d16, m16;
    const float d = quantize_scales_unsigned(scale, ls, 16, 15, &d16);
    const float dm = quantize_scales_unsigned(mins, lm, 16, 15, &m16);
    y->d = d16;
    y->dmin = m16;
    for (int s = 0; s < 16; s++) {
        y->scales[s] = (uint8_t)(ls[s] | (lm[s] << 4));
        ROUND_ASYM(vec, x + 16 * s, L + 16 * s, 16, 3, d * (float)ls[s], dm * (float)lm[s]);
    }
    dg_pack_q2_K(y, L);
}

static ALWAYS_INLINE void q3_K_block(const float *restrict x, block_q3_K *restrict y, const int vec) {
    float xt[QK_K], scale[16];
    uint8_t L[QK_K];
    transpose(x, xt, 16, 16);
    FIT_SYM(vec, xt, 16, 16, 4, PLAN(DELTAS_Q3, 2), scale);
    int8_t sc[16];
    const float d = quantize_scales_signed(scale, sc, 16, 32, &y->d);
    for (int s = 0; s < 16; s++) ROUND_SYM(vec, x + 16 * s, L + 16 * s, 16, 4, d * (float)sc[s]);
    dg_pack_q3_K(y, sc, L);
}

/* Q4_K and Q5_K share the 12-byte packing of eight 6-bit scales and mins (unpack_scales_k4 in quant_internal.h). */
void dg_pack_scales_k4(uint8_t *out, const uint8_t *ls, const uint8_t *lm) {
    for (int j = 0; j < 4; j++) {
        out[j] = (uint8_t)(ls[j] | (ls[j + 4] >> 4) << 6);
        out[j + 4] = (uint8_t)(lm[j] | (lm[j + 4] >> 4) << 6);
        out[j + 8] = (uint8_t)((ls[j + 4] & 0xf) | (lm[j + 4] & 0xf) << 4);
    }
}

/* Shared by Q4_K (nmax 15) and Q5_K (nmax 31): fills d, dmin, scales and L. */
static ALWAYS_INLINE void k4_common(const float *restrict x, uint16_t *d16, uint16_t *m16, uint8_t *scales,
                                    uint8_t *restrict L, const int nmax, const search_plan plan, const int vec) {
    float xt[QK_K], scale[8], mins[8];
    uint8_t ls[8], lm[8];
    transpose(x, xt, 32, 8);
    FIT_ASYM(vec, xt, 32, 8, nmax, plan, scale, mins);
    const float d = quantize_scales_unsigned(scale, ls, 8, 63, d16);
    const float dm = quantize_scales_unsigned(mins, lm, 8, 63, m16);
    dg_pack_scales_k4(scales, ls, lm);
    for (int s = 0; s < 8; s++) ROUND_ASYM(vec, x + 32 * s, L + 32 * s, 32, nmax, d * (float)ls[s], dm * (float)lm[s]);
}

static ALWAYS_INLINE void q4_K_block(const float *restrict x, block_q4_K *restrict y, const int vec) {
    uint8_t L[QK_K];
    k4_common(x, &y->d, &y->dmin, y->scales, L, 15, PLAN(DELTAS_Q4, 2), vec);
    dg_pack_q4_K(y, L);
}

static ALWAYS_INLINE void q5_K_block(const float *restrict x, block_q5_K *restrict y, const int vec) {
    uint8_t L[QK_K];
    k4_common(x, &y->d, &y->dmin, y->scales, L, 31, PLAN(DELTAS_Q5, 2), vec);
    dg_pack_q5_K(y, L);
}

static ALWAYS_INLINE void q6_K_block(const float *restrict x, block_q6_K *restrict y, const int vec) {
    float xt[QK_K], scale[16];
    uint8_t L[QK_K];
    transpose(x, xt, 16, 16);
    FIT_SYM(vec, xt, 16, 16, 32, PLAN(DELTAS_Q6, 2), scale);
    const float d = quantize_scales_signed(scale, y->scales, 16, 128, &y->d);
    for (int s = 0; s < 16; s++) ROUND_SYM(vec, x + 16 * s, L + 16 * s, 16, 32, d * (float)y->scales[s]);
    dg_pack_q6_K(y, L);
}

/* ---- row entry points: the portable build, and an AVX2 build of the same source ---- */

#define DEFINE_ROW(T, SUFFIX, ATTR, VEC)                                               \
    ATTR static void quantize_row_##T##_##SUFFIX(const float *x, void *dst, int64_t n) { \
        block_##T *y = dst;                                                          \
        for (int64_t b = 0; b < n / QK_K; b++) T##_block(x + b * QK_K, y + b, VEC); \
    }

#define DEFINE_ALL(SUFFIX, ATTR, VEC) \
    DEFINE_ROW(q2_K, SUFFIX, ATTR, VEC) \
    DEFINE_ROW(q3_K, SUFFIX, ATTR, VEC) \
    DEFINE_ROW(q4_K, SUFFIX, ATTR, VEC) \
    DEFINE_ROW(q5_K, SUFFIX, ATTR, VEC) \
    DEFINE_ROW(q6_K, SUFFIX, ATTR, VEC)

DEFINE_ALL(ref, , 0)
DEFINE_ALL(vec, , 1)

/* DGGUF_NO_SIMD=X turns off instruction set X and everything above it, here as in the matmul kernels:
 * "avx2" leaves the baseline vector build, "avx512" (there is no AVX-512 search) the AVX2 one, and "1" the
 * plain scalar reference. Read once; tests compare all paths. */
static int level;
static pthread_once_t level_once = PTHREAD_ONCE_INIT;

static void choose_level(void) {
    const char *off = getenv("DGGUF_NO_SIMD");
    int avx2 = 0;
#if defined(__x86_64__)
    avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
    level = avx2 ? 2 : 1;
    if (off && strcmp(off, "avx2") == 0) level = 1;
    else if (off && *off && strcmp(off, "avx512") != 0 && strcmp(off, "0") != 0) level = 0;
}

static int simd_level(void) {
    pthread_once(&level_once, choose_level);
    return level;
}

#if defined(__x86_64__)
DEFINE_ALL(avx2, __attribute__((target("avx2,fma"))), 1)
#define CALL_AVX2(T) quantize_row_##T##_avx2(x, dst, n)
#else
#define CALL_AVX2(T) quantize_row_##T##_vec(x, dst, n)
#endif

#define DISPATCH(T)                                                   \
    void dg_quantize_row_##T(const float *x, void *dst, int64_t n) { \
        switch (simd_level()) {                                      \
        case 0: quantize_row_##T##_ref(x, dst, n); break;            \
        case 1: quantize_row_##T##_vec(x, dst, n); break;            \
        default: CALL_AVX2(T); break;                                \
        }                                                            \
    }

DISPATCH(q2_K)
DISPATCH(q3_K)
DISPATCH(q4_K)
DISPATCH(q5_K)
DISPATCH(q6_K)

/* ---- dequantization ---------------------------------------------------------- */

DG_CLONES void dg_dequantize_row_q2_K(const void *src, float *restrict y, int64_t n) {
    const block_q2_K *x = src;
    for (int64_t b = 0; b < n / QK_K; b++) {
        const float d = dg_f16_to_f32(x[b].d), dmin = dg_f16_to_f32(x[b].dmin);
        /* Value 128h + 32j + l is bits 2j..2j+1 of qs[32h + l]; sub-block (16 values) 8h + 2j + l/16. */
        for (int h = 0; h < 2; h++)
            for (int j = 0; j < 4; j++)
                for (int g = 0; g < 2; g++, y += 16) {
                    const uint8_t sc = x[b].scales[8 * h + 2 * j + g];
                    const float dl = d * (float)(sc & 0xf), ml = dmin * (float)(sc >> 4);
                    const uint8_t *restrict q = x[b].qs + 32 * h + 16 * g;
                    for (int l = 0; l < 16; l++) y[l] = dl * (float)((q[l] >> (2 * j)) & 3) - ml;
                }
    }
}

DG_CLONES void dg_dequantize_row_q3_K(const void *src, float *restrict y, int64_t n) {
    const block_q3_K *x = src;
    for (int64_t b = 0; b < n / QK_K; b++) {
        const float d = dg_f16_to_f32(x[b].d);
        float dl[16];
        q3_K_scales(x[b].scales, d, dl);
        /* Value 128h + 32j + l: low bits 2j..2j+1 of qs[32h + l], high bit 4h + j of hmask[l] (clear: -4). */
        for (int h = 0; h < 2; h++)
            for (int j = 0; j < 4; j++)
                for (int g = 0; g < 2; g++, y += 16) {
                    const float s = dl[8 * h + 2 * j + g];
                    const uint8_t *restrict q = x[b].qs + 32 * h + 16 * g, *restrict m = x[b].hmask + 16 * g;
                    for (int l = 0; l < 16; l++)
                        y[l] = s * (float)(((q[l] >> (2 * j)) & 3) - (((m[l] >> (4 * h + j)) & 1) ? 0 : 4));
                }
    }
}

DG_CLONES void dg_dequantize_row_q4_K(const void *src, float *restrict y, int64_t n) {
    const block_q4_K *x = src;
    for (int64_t b = 0; b < n / QK_K; b++, y += QK_K) {
        const float d = dg_f16_to_f32(x[b].d), dmin = dg_f16_to_f32(x[b].dmin);
        uint8_t ls[8], lm[8];
        unpack_scales_k4(x[b].scales, ls, lm);
        for (int s = 0; s < 8; s++) {
            const float dl = d * (float)ls[s], ml = dmin * (float)lm[s];
            const uint8_t *restrict qs = x[b].qs + 32 * (s / 2);
            const int shift = 4 * (s % 2);
            for (int l = 0; l < 32; l++) y[32 * s + l] = dl * (float)((qs[l] >> shift) & 0xf) - ml;
        }
    }
}

DG_CLONES void dg_dequantize_row_q5_K(const void *src, float *restrict y, int64_t n) {
    const block_q5_K *x = src;
    for (int64_t b = 0; b < n / QK_K; b++, y += QK_K) {
        const float d = dg_f16_to_f32(x[b].d), dmin = dg_f16_to_f32(x[b].dmin);
        uint8_t ls[8], lm[8];
        unpack_scales_k4(x[b].scales, ls, lm);
        for (int s = 0; s < 8; s++) {
            const float dl = d * (float)ls[s], ml = dmin * (float)lm[s];
            const uint8_t *restrict qs = x[b].qs + 32 * (s / 2), *restrict qh = x[b].qh;
            const int shift = 4 * (s % 2);
            for (int l = 0; l < 32; l++)
                y[32 * s + l] = dl * (float)(((qs[l] >> shift) & 0xf) | ((qh[l] >> s) & 1) << 4) - ml;
        }
    }
}

DG_CLONES void dg_dequantize_row_q6_K(const void *src, float *restrict y, int64_t n) {
    const block_q6_K *x = src;
    for (int64_t b = 0; b < n / QK_K; b++) {
        const float d = dg_f16_to_f32(x[b].d);
        const uint8_t *restrict ql = x[b].ql, *restrict qh = x[b].qh;
        const int8_t *restrict sc = x[b].scales;
        /* Each half of 128 values: byte l of ql/qh feeds values l, l+32, l+64 and l+96 (low nibbles then high
         * nibbles of ql, 2-bit fields of qh); l runs in halves of 16 so each value's scale is fixed and the
         * loop vectorises. */
        for (int h = 0; h < 2; h++, y += 128, ql += 64, qh += 32, sc += 8)
            for (int g = 0; g < 2; g++) {
                const float s0 = d * (float)sc[g], s2 = d * (float)sc[g + 2];
                const float s4 = d * (float)sc[g + 4], s6 = d * (float)sc[g + 6];
                for (int l = 16 * g; l < 16 * g + 16; l++) {
                    y[l] = s0 * (float)(((ql[l] & 0xf) | ((qh[l] & 3) << 4)) - 32);
                    y[l + 32] = s2 * (float)(((ql[l + 32] & 0xf) | (((qh[l] >> 2) & 3) << 4)) - 32);
                    y[l + 64] = s4 * (float)(((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32);
                    y[l + 96] = s6 * (float)(((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32);
                }
            }
    }
}
