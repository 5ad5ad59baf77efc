/* quant.c: the type table, float/legacy (32-value block) quantizers and the row dispatchers.
 *
 * The legacy quantizers reproduce gguf-py's numpy arithmetic step by step
 * (float32 ops in the same order, the same rounding, numpy's cast rules), so
 * their bytes equal gguf.quants.quantize. K-quants live in quant_k.c.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dgguf.h"
#include "quant_internal.h"

/* numpy's float32 -> uint8/int8 cast on x86: through int32 (cvttss2si), keeping the
 * low byte; NaN, inf and anything outside int32 become 0. Only reached with
 * non-integral or wild values when a block's scale is so tiny its inverse is inf. */
static inline uint8_t np_cast_u8(float f) {
    if (!(fabsf(f) < 2147483648.0f)) return 0;
    return (uint8_t)(uint32_t)(int32_t)f;
}

/* gguf-py's np_roundf: a = |n|; b = floor(a) + floor(2 * (a - floor(a))); sign(n) * b,
 * i.e. round half away from zero. Below 2^23 floor of a non-negative float is its
 * int32 truncation (no libm call on baseline x86); above, a is already integral and
 * numpy's formula returns n itself, as does NaN/inf (which the cast then zeroes). */
static inline float np_roundf(float n) {
    const float a = fabsf(n);
    if (!(a < 8388608.0f)) return n;
    const float fl = (float)(int32_t)a;
    const float b = fl + (float)(int32_t)(2.0f * (a - fl));
    return n < 0 ? -b : b;
}

/* ---- F32 / F16 / BF16 ------------------------------------------------------ */

static void quantize_row_f32(const float *x, void *dst, int64_t n) { memcpy(dst, x, (size_t)n * 4); }
static void dequantize_row_f32(const void *src, float *y, int64_t n) { memcpy(y, src, (size_t)n * 4); }

static void quantize_row_f16(const float *x, void *dst, int64_t n) {
    uint16_t *h = dst;
    for (int64_t i = 0; i < n; i++) h[i] = dg_f32_to_f16(x[i]);
}
static void dequantize_row_f16(const void *src, float *y, int64_t n) {
    const uint16_t *h = src;
    for (int64_t i = 0; i < n; i++) y[i] = dg_f16_to_f32(h[i]);
}

/* Round to nearest even; NaNs are forced quiet first so rounding cannot turn them into inf. */
static void quantize_row_bf16(const float *x, void *dst, int64_t n) {
    uint16_t *h = dst;
    for (int64_t i = 0; i < n; i++) {
        uint32_t u = dg_f32_bits(x[i]);
        if ((u & 0x7fffffff) > 0x7f800000) u = (u & 0xffff0000u) | 0x00400000u;
        h[i] = (uint16_t)(((uint64_t)u + 0x7fff + ((u >> 16) & 1)) >> 16);
    }
}
static void dequantize_row_bf16(const void *src, float *y, int64_t n) { dg_bf16_to_f32(src, y, n); }

void dg_bf16_to_f32(const uint16_t *src, float *dst, int64_t n) {
    for (int64_t i = 0; i < n; i++) dst[i] = dg_bits_f32((uint32_t)src[i] << 16);
}

/* ---- Q8_0 ------------------------------------------------------------------ */

static void quantize_row_q8_0(const float *x, void *dst, int64_t n) {
    block_q8_0 *y = dst;
    for (int64_t b = 0; b < n / QK8_0; b++, x += QK8_0) {
        float amax = 0.0f;
        for (int j = 0; j < QK8_0; j++) amax = fabsf(x[j]) > amax ? fabsf(x[j]) : amax;   /* inputs are finite */
        const float d = amax / 127.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        y[b].d = dg_f32_to_f16(d);
        for (int j = 0; j < QK8_0; j++) y[b].qs[j] = (int8_t)np_cast_u8(np_roundf(x[j] * id));
    }
}

DG_CLONES static void dequantize_row_q8_0(const void *src, float *restrict y, int64_t n) {
    const block_q8_0 *x = src;
    for (int64_t b = 0; b < n / QK8_0; b++, y += QK8_0) {
        const float d = dg_f16_to_f32(x[b].d);
        for (int j = 0; j < QK8_0; j++) y[j] = (float)x[b].qs[j] * d;
    }
}

/* ---- Q4_0 / Q5_0: symmetric, scale from the signed value of largest magnitude ---- */

/* First index of the largest |x| (numpy argmax semantics), returned as the signed value. */
static inline float signed_absmax(const float *x, int n) {
    float amax = -1.0f, max = 0.0f;
    for (int j = 0; j < n; j++)
        if (fabsf(x[j]) > amax) { amax = fabsf(x[j]); max = x[j]; }
    return max;
}

/* The 32 levels of one block, in gguf-py's arithmetic: q = min(top, trunc((x - sub) * id + add)). The
 * symmetric types pass sub = 0 (x - 0 is x, bit for bit) and add = offset + 0.5. */
static void block_levels(const float *x, float sub, float id, float add, uint8_t top, uint8_t q[32]) {
    for (int j = 0; j < 32; j++) {
        uint8_t v = np_cast_u8(truncf((x[j] - sub) * id + add));
        q[j] = v > top ? top : v;
    }
}

/* Low nibbles: value j and value j + 16 share byte j. */
static void pack_nibbles(uint8_t qs[16], const uint8_t q[32]) {
    for (int j = 0; j < 16; j++) qs[j] = (uint8_t)((q[j] & 0x0f) | (q[j + 16] << 4));
}

/* Fifth bits, bit j of a little-endian uint32. */
static void pack_high_bits(uint8_t qh[4], const uint8_t q[32]) {
    uint32_t h = 0;
    for (int j = 0; j < 32; j++) h |= (uint32_t)(q[j] >> 4) << j;
    for (int k = 0; k < 4; k++) qh[k] = (uint8_t)(h >> (8 * k));
}

static void quantize_row_q4_0(const float *x, void *dst, int64_t n) {
    block_q4_0 *y = dst;
    for (int64_t b = 0; b < n / QK4_0; b++, x += QK4_0) {
        const float d = signed_absmax(x, QK4_0) / -8.0f;
        uint8_t q[QK4_0];
        block_levels(x, 0.0f, d != 0.0f ? 1.0f / d : 0.0f, 8.5f, 15, q);
        y[b].d = dg_f32_to_f16(d);
        pack_nibbles(y[b].qs, q);
    }
}

DG_CLONES static void dequantize_row_q4_0(const void *src, float *restrict y, int64_t n) {
    const block_q4_0 *x = src;
    for (int64_t b = 0; b < n / QK4_0; b++, y += QK4_0) {
        const float d = dg_f16_to_f32(x[b].d);
        for (int j = 0; j < QK4_0 / 2; j++) {
            y[j] = d * (float)((x[b].qs[j] & 0x0f) - 8);
            y[j + QK4_0 / 2] = d * (float)((x[b].qs[j] >> 4) - 8);
        }
    }
}

static void quantize_row_q5_0(const float *x, void *dst, int64_t n) {
    block_q5_0 *y = dst;
    for (int64_t b = 0; b < n / QK5_0; b++, x += QK5_0) {
        const float d = signed_absmax(x, QK5_0) / -16.0f;
        uint8_t q[QK5_0];
        block_levels(x, 0.0f, d != 0.0f ? 1.0f / d : 0.0f, 16.5f, 31, q);
        y[b].d = dg_f32_to_f16(d);
        pack_high_bits(y[b].qh, q);
        pack_nibbles(y[b].qs, q);
    }
}

static inline uint32_t load_qh(const uint8_t qh[4]) {
    return (uint32_t)qh[0] | (uint32_t)qh[1] << 8 | (uint32_t)qh[2] << 16 | (uint32_t)qh[3] << 24;
}

DG_CLONES static void dequantize_row_q5_0(const void *src, float *restrict y, int64_t n) {
    const block_q5_0 *x = src;
    for (int64_t b = 0; b < n / QK5_0; b++, y += QK5_0) {
        const float d = dg_f16_to_f32(x[b].d);
        const uint32_t qh = load_qh(x[b].qh);
        for (int j = 0; j < QK5_0 / 2; j++) {
            int lo = (x[b].qs[j] & 0x0f) | (int)((qh >> j) & 1) << 4;
            int hi = (x[b].qs[j] >> 4) | (int)((qh >> (j + 16)) & 1) << 4;
            y[j] = d * (float)(lo - 16);
            y[j + QK5_0 / 2] = d * (float)(hi - 16);
        }
    }
}

/* ---- Q4_1 / Q5_1: scale and min ----------------------------------------------- */

static inline void minmax(const float *x, int n, float *mn, float *mx) {
    float lo = x[0], hi = x[0];
    for (int j = 1; j < n; j++) { lo = x[j] < lo ? x[j] : lo; hi = x[j] > hi ? x[j] : hi; }
    *mn = lo; *mx = hi;
}

static void quantize_row_q4_1(const float *x, void *dst, int64_t n) {
    block_q4_1 *y = dst;
    for (int64_t b = 0; b < n / QK4_1; b++, x += QK4_1) {
        float mn, mx;
        minmax(x, QK4_1, &mn, &mx);
        const float d = (mx - mn) / 15.0f;
        uint8_t q[QK4_1];
        block_levels(x, mn, d != 0.0f ? 1.0f / d : 0.0f, 0.5f, 15, q);
        y[b].d = dg_f32_to_f16(d);
        y[b].m = dg_f32_to_f16(mn);
        pack_nibbles(y[b].qs, q);
    }
}

DG_CLONES static void dequantize_row_q4_1(const void *src, float *restrict y, int64_t n) {
    const block_q4_1 *x = src;
    for (int64_t b = 0; b < n / QK4_1; b++, y += QK4_1) {
        const float d = dg_f16_to_f32(x[b].d), m = dg_f16_to_f32(x[b].m);
        for (int j = 0; j < QK4_1 / 2; j++) {
            y[j] = d * (float)(x[b].qs[j] & 0x0f) + m;
            y[j + QK4_1 / 2] = d * (float)(x[b].qs[j] >> 4) + m;
        }
    }
}

static void quantize_row_q5_1(const float *x, void *dst, int64_t n) {
    block_q5_1 *y = dst;
    for (int64_t b = 0; b < n / QK5_1; b++, x += QK5_1) {
        float mn, mx;
        minmax(x, QK5_1, &mn, &mx);
        const float d = (mx - mn) / 31.0f;
        uint8_t q[QK5_1];
        block_levels(x, mn, d != 0.0f ? 1.0f / d : 0.0f, 0.5f, 31, q);
        y[b].d = dg_f32_to_f16(d);
        y[b].m = dg_f32_to_f16(mn);
        pack_high_bits(y[b].qh, q);
        pack_nibbles(y[b].qs, q);
    }
}

DG_CLONES static void dequantize_row_q5_1(const void *src, float *restrict y, int64_t n) {
    const block_q5_1 *x = src;
    for (int64_t b = 0; b < n / QK5_1; b++, y += QK5_1) {
        const float d = dg_f16_to_f32(x[b].d), m = dg_f16_to_f32(x[b].m);
        const uint32_t qh = load_qh(x[b].qh);
        for (int j = 0; j < QK5_1 / 2; j++) {
            int lo = (x[b].qs[j] & 0x0f) | (int)((qh >> j) & 1) << 4;
            int hi = (x[b].qs[j] >> 4) | (int)((qh >> (j + 16)) & 1) << 4;
            y[j] = d * (float)lo + m;
            y[j + QK5_1 / 2] = d * (float)hi + m;
        }
    }
}

/* ---- type table and dispatch ------------------------------------------------ */

typedef struct {
    int type;
    const char *name;
    int64_t block_size;
    int64_t type_size;
    int holds_nonfinite;     /* float formats store inf/NaN; quantized ones reject them */
    dg_quantize_fn quantize;
    dg_dequantize_fn dequantize;
} dg_type_traits;

static const dg_type_traits TYPES[] = {
    {DG_TYPE_F32,  "F32",  1,     4,                  1, quantize_row_f32,     dequantize_row_f32},
    {DG_TYPE_F16,  "F16",  1,     2,                  1, quantize_row_f16,     dequantize_row_f16},
    {DG_TYPE_BF16, "BF16", 1,     2,                  1, quantize_row_bf16,    dequantize_row_bf16},
    {DG_TYPE_Q4_0, "Q4_0", QK4_0, sizeof(block_q4_0), 0, quantize_row_q4_0,    dequantize_row_q4_0},
    {DG_TYPE_Q4_1, "Q4_1", QK4_1, sizeof(block_q4_1), 0, quantize_row_q4_1,    dequantize_row_q4_1},
    {DG_TYPE_Q5_0, "Q5_0", QK5_0, sizeof(block_q5_0), 0, quantize_row_q5_0,    dequantize_row_q5_0},
    {DG_TYPE_Q5_1, "Q5_1", QK5_1, sizeof(block_q5_1), 0, quantize_row_q5_1,    dequantize_row_q5_1},
    {DG_TYPE_Q8_0, "Q8_0", QK8_0, sizeof(block_q8_0), 0, quantize_row_q8_0,    dequantize_row_q8_0},
    {DG_TYPE_Q2_K, "Q2_K", QK_K,  sizeof(block_q2_K), 0, dg_quantize_row_q2_K, dg_dequantize_row_q2_K},
    {DG_TYPE_Q3_K, "Q3_K", QK_K,  sizeof(block_q3_K), 0, dg_quantize_row_q3_K, dg_dequantize_row_q3_K},
    {DG_TYPE_Q4_K, "Q4_K", QK_K,  sizeof(block_q4_K), 0, dg_quantize_row_q4_K, dg_dequantize_row_q4_K},
    {DG_TYPE_Q5_K, "Q5_K", QK_K,  sizeof(block_q5_K), 0, dg_quantize_row_q5_K, dg_dequantize_row_q5_K},
    {DG_TYPE_Q6_K, "Q6_K", QK_K,  sizeof(block_q6_K), 0, dg_quantize_row_q6_K, dg_dequantize_row_q6_K},
    {DG_TYPE_IQ4_XS, "IQ4_XS", QK_K, sizeof(block_iq4_xs), 0, dg_quantize_row_iq4_xs, dg_dequantize_row_iq4_xs},
    {DG_TYPE_IQ4_NL, "IQ4_NL", 32, sizeof(block_iq4_nl), 0, dg_quantize_row_iq4_nl, dg_dequantize_row_iq4_nl},
};

static const dg_type_traits *find_type(int type, char *err, size_t errlen) {
    for (size_t i = 0; i < sizeof(TYPES) / sizeof(TYPES[0]); i++)
        if (TYPES[i].type == type) return &TYPES[i];
    if (err && errlen) snprintf(err, errlen, "ggml type %d is not supported", type);
    return NULL;
}

int dg_type_size(int type, int64_t *block_size, int64_t *type_size, char *err, size_t errlen) {
    const dg_type_traits *t = find_type(type, err, errlen);
    if (!t) return DG_E_TYPE;
    *block_size = t->block_size;
    *type_size = t->type_size;
    return DG_OK;
}

static int check_shape(const dg_type_traits *t, int64_t nrows, int64_t ncols, char *err, size_t errlen) {
    if (nrows < 0 || ncols < 0) {
        snprintf(err, errlen, "negative shape [%lld, %lld]", (long long)nrows, (long long)ncols);
        return DG_E_SHAPE;
    }
    if (ncols % t->block_size) {
        snprintf(err, errlen, "row length %lld is not a multiple of the %s block size %lld",
                 (long long)ncols, t->name, (long long)t->block_size);
        return DG_E_SHAPE;
    }
    if (nrows && ncols > INT64_MAX / 4 / nrows) {
        snprintf(err, errlen, "shape [%lld, %lld] is too large", (long long)nrows, (long long)ncols);
        return DG_E_SHAPE;
    }
    return DG_OK;
}

/* Row kernels access block fields directly, so they need float-aligned input and
 * half-aligned blocks; numpy slices of byte buffers may break that, and those rows
 * go through an aligned bounce buffer instead. */
#define MISALIGNED(p, a) (((uintptr_t)(p)) & ((a) - 1))

int dg_quantize_rows(int type, const float *src, void *dst, int64_t nrows, int64_t ncols,
                     char *err, size_t errlen) {
    return dg_quantize_rows_imatrix(type, src, dst, nrows, ncols, NULL, err, errlen);
}

int dg_quantize_rows_imatrix(int type, const float *src, void *dst, int64_t nrows, int64_t ncols,
                             const float *imatrix, char *err, size_t errlen) {
    const dg_type_traits *t = find_type(type, err, errlen);
    if (!t) return DG_E_TYPE;
    int rc = check_shape(t, nrows, ncols, err, errlen);
    if (rc) return rc;
    const size_t row_bytes = (size_t)(ncols / t->block_size * t->type_size);
    if (!t->holds_nonfinite) {
        for (int64_t r = 0; r < nrows; r++) {
            /* read as bytes: src may be misaligned (it then goes through the bounce buffer below) */
            const unsigned char *x = (const unsigned char *)src + (size_t)(r * ncols) * sizeof(float);
            uint32_t bad = 0, u;
            for (int64_t i = 0; i < ncols; i++) {
                memcpy(&u, x + i * 4, 4);
                bad |= (u & 0x7f800000) == 0x7f800000;
            }
            if (bad) {
                int64_t i = 0;
                float v;
                for (;; i++) {
                    memcpy(&v, x + i * 4, 4);
                    if (!dg_is_finite_bits(v)) break;
                }
                snprintf(err, errlen, "non-finite value %g at row %lld, column %lld cannot be quantized to %s",
                         (double)v, (long long)r, (long long)i, t->name);
                return DG_E_VALUE;
            }
        }
    }
    const dg_quantize_w_fn weighted = imatrix ? dg_weighted_quantizer(type) : NULL;
    if (weighted) {
        for (int64_t i = 0; i < ncols; i++)
            if (!(imatrix[i] >= 0.0f) || !dg_is_finite_bits(imatrix[i])) {
                snprintf(err, errlen, "importance %g at column %lld is not a finite non-negative number",
                         (double)imatrix[i], (long long)i);
                return DG_E_VALUE;
            }
    }
    if (!MISALIGNED(src, 4) && !MISALIGNED(dst, 2)) {
        for (int64_t r = 0; r < nrows; r++) {
            uint8_t *out = (uint8_t *)dst + (size_t)r * row_bytes;
            if (weighted) weighted(src + r * ncols, out, ncols, imatrix);
            else t->quantize(src + r * ncols, out, ncols);
        }
        return DG_OK;
    }
    float *xb = malloc((size_t)ncols * 4 + row_bytes + 16);
    if (!xb) { snprintf(err, errlen, "out of memory for a %lld-value row", (long long)ncols); return DG_E_VALUE; }
    void *yb = (uint8_t *)xb + (((size_t)ncols * 4 + 15) & ~(size_t)15);
    for (int64_t r = 0; r < nrows; r++) {
        memcpy(xb, (const uint8_t *)src + (size_t)r * ncols * 4, (size_t)ncols * 4);
        if (weighted) weighted(xb, yb, ncols, imatrix);
        else t->quantize(xb, yb, ncols);
        memcpy((uint8_t *)dst + (size_t)r * row_bytes, yb, row_bytes);
    }
    free(xb);
    return DG_OK;
}

int dg_dequantize_rows(int type, const void *src, float *dst, int64_t nrows, int64_t ncols,
                       char *err, size_t errlen) {
    const dg_type_traits *t = find_type(type, err, errlen);
    if (!t) return DG_E_TYPE;
    int rc = check_shape(t, nrows, ncols, err, errlen);
    if (rc) return rc;
    const size_t row_bytes = (size_t)(ncols / t->block_size * t->type_size);
    if (!MISALIGNED(src, 2) && !MISALIGNED(dst, 4)) {
        for (int64_t r = 0; r < nrows; r++)
            t->dequantize((const uint8_t *)src + (size_t)r * row_bytes, dst + r * ncols, ncols);
        return DG_OK;
    }
    float *yb = malloc((size_t)ncols * 4 + row_bytes + 16);
    if (!yb) { snprintf(err, errlen, "out of memory for a %lld-value row", (long long)ncols); return DG_E_VALUE; }
    void *xb = (uint8_t *)yb + (((size_t)ncols * 4 + 15) & ~(size_t)15);
    for (int64_t r = 0; r < nrows; r++) {
        memcpy(xb, (const uint8_t *)src + (size_t)r * row_bytes, row_bytes);
        t->dequantize(xb, yb, ncols);
        memcpy((uint8_t *)dst + (size_t)r * ncols * 4, yb, (size_t)ncols * 4);
    }
    free(yb);
    return DG_OK;
}
