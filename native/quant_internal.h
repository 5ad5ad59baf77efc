/* quant_internal.h: block layouts and helpers shared by quant.c and quant_k.c.
 *
 * Block structs mirror ggml's on-disk byte layout exactly (little-endian,
 * no padding); the _Static_asserts pin the sizes GGUF readers expect.
 * Half-precision fields are stored as raw uint16 bits.
 */
#ifndef DGGUF_QUANT_INTERNAL_H
#define DGGUF_QUANT_INTERNAL_H

#include <stdint.h>
#include <string.h>

/* The CUDA sources (native/cuda) include this header as C++ device code: the block layouts and the half
 * conversion are shared, not copied. */
#ifdef __CUDACC__
#define DG_HOST_DEVICE __host__ __device__
#else
#define DG_HOST_DEVICE
#endif
#ifdef __cplusplus
#define DG_STATIC_ASSERT static_assert
#else
#define DG_STATIC_ASSERT _Static_assert
#endif

#define QK4_0 32
#define QK4_1 32
#define QK5_0 32
#define QK5_1 32
#define QK8_0 32
#define QK_K 256
#define K_SCALE_SIZE 12

typedef struct {
    uint16_t d;              /* scale (f16) */
    uint8_t qs[QK4_0 / 2];   /* nibbles: value j in low half of byte j, value j+16 in the high half */
} block_q4_0;
DG_STATIC_ASSERT(sizeof(block_q4_0) == 18, "block_q4_0 layout");

typedef struct {
    uint16_t d;              /* scale (f16) */
    uint16_t m;              /* min (f16) */
    uint8_t qs[QK4_1 / 2];
} block_q4_1;
DG_STATIC_ASSERT(sizeof(block_q4_1) == 20, "block_q4_1 layout");

typedef struct {
    uint16_t d;
    uint8_t qh[4];           /* 5th bit of each value, little-endian uint32 */
    uint8_t qs[QK5_0 / 2];
} block_q5_0;
DG_STATIC_ASSERT(sizeof(block_q5_0) == 22, "block_q5_0 layout");

typedef struct {
    uint16_t d;
    uint16_t m;
    uint8_t qh[4];
    uint8_t qs[QK5_1 / 2];
} block_q5_1;
DG_STATIC_ASSERT(sizeof(block_q5_1) == 24, "block_q5_1 layout");

typedef struct {
    uint16_t d;
    int8_t qs[QK8_0];
} block_q8_0;
DG_STATIC_ASSERT(sizeof(block_q8_0) == 34, "block_q8_0 layout");

/* 2-bit: 16 sub-blocks of 16, 4-bit scale (low nibble) and 4-bit min (high nibble) each. */
typedef struct {
    uint8_t scales[QK_K / 16];
    uint8_t qs[QK_K / 4];
    uint16_t d;
    uint16_t dmin;
} block_q2_K;
DG_STATIC_ASSERT(sizeof(block_q2_K) == 84, "block_q2_K layout");

/* 3-bit: 2 low bits in qs, high bit in hmask (set means "no -4 offset"), 16 signed 6-bit scales. */
typedef struct {
    uint8_t hmask[QK_K / 8];
    uint8_t qs[QK_K / 4];
    uint8_t scales[12];
    uint16_t d;
} block_q3_K;
DG_STATIC_ASSERT(sizeof(block_q3_K) == 110, "block_q3_K layout");

/* 4-bit: 8 sub-blocks of 32, 6-bit scale and 6-bit min each, packed into 12 bytes. */
typedef struct {
    uint16_t d;
    uint16_t dmin;
    uint8_t scales[K_SCALE_SIZE];
    uint8_t qs[QK_K / 2];
} block_q4_K;
DG_STATIC_ASSERT(sizeof(block_q4_K) == 144, "block_q4_K layout");

typedef struct {
    uint16_t d;
    uint16_t dmin;
    uint8_t scales[K_SCALE_SIZE];
    uint8_t qh[QK_K / 8];
    uint8_t qs[QK_K / 2];
} block_q5_K;
DG_STATIC_ASSERT(sizeof(block_q5_K) == 176, "block_q5_K layout");

/* 6-bit: 4 low bits in ql, 2 high bits in qh, 16 int8 scales. */
typedef struct {
    uint8_t ql[QK_K / 2];
    uint8_t qh[QK_K / 4];
    int8_t scales[QK_K / 16];
    uint16_t d;
} block_q6_K;
DG_STATIC_ASSERT(sizeof(block_q6_K) == 210, "block_q6_K layout");

/* IQ4_XS: 8 sub-blocks of 32, each value a 4-bit index into the non-linear table below, times the sub-block's
 * scale d * (ls - 32), ls 6 bits: low 4 in scales_l (sub-block s: nibble s % 2 of byte s / 2), high 2 in bits
 * 2s..2s+1 of scales_h. Sub-block s's indices are qs[16 s + j] (value j low nibble, value j + 16 high nibble). */
typedef struct {
    uint16_t d;
    uint16_t scales_h;
    uint8_t scales_l[QK_K / 64];
    uint8_t qs[QK_K / 2];
} block_iq4_xs;
DG_STATIC_ASSERT(sizeof(block_iq4_xs) == 136, "block_iq4_xs layout");

/* IQ4_NL: 32 values, each a 4-bit index into the table below, times d (value j low nibble of qs[j], value
 * j + 16 its high nibble). */
typedef struct {
    uint16_t d;
    uint8_t qs[16];
} block_iq4_nl;
DG_STATIC_ASSERT(sizeof(block_iq4_nl) == 18, "block_iq4_nl layout");

/* IQ4_NL / IQ4_XS's sixteen levels (ggml's kvalues_iq4nl), ascending. */
static const int8_t IQ4_LEVELS[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

/* Sub-block s's 6-bit scale code (0..63; the scale is d * (code - 32)). */
DG_HOST_DEVICE static inline int iq4_xs_scale(const block_iq4_xs *b, int s) {
    return ((b->scales_l[s / 2] >> (4 * (s % 2))) & 0xf) | ((b->scales_h >> (2 * s)) & 3) << 4;
}

DG_HOST_DEVICE static inline uint32_t dg_f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
DG_HOST_DEVICE static inline float dg_bits_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

/* IEEE half -> float (exact). */
DG_HOST_DEVICE static inline float dg_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    if (exp == 0x1f) return dg_bits_f32(sign | 0x7f800000 | (man << 13));
    if (exp == 0) {
        /* subnormal (or zero): man * 2^-24, exact in float */
        float v = (float)man * (1.0f / 16777216.0f);
        return sign ? -v : v;
    }
    return dg_bits_f32(sign | ((exp + 112) << 23) | (man << 13));
}

/* float -> IEEE half, round to nearest even, overflow to inf. NaNs keep their
 * top payload bits (and never collapse to inf), as numpy's astype(float16) does,
 * so F16 output is byte-identical to gguf-py. */
static inline uint16_t dg_f32_to_f16(float f) {
    uint32_t x = dg_f32_bits(f);
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000);
    uint32_t ax = x & 0x7fffffff;
    if (ax >= 0x7f800000) {
        if (ax == 0x7f800000) return sign | 0x7c00;
        uint16_t r = (uint16_t)(0x7c00 | ((ax & 0x7fffff) >> 13));
        if (r == 0x7c00) r++;
        return sign | r;
    }
    if (ax >= 0x477ff000) return sign | 0x7c00;          /* >= 65520 rounds to inf */
    if (ax >= 0x38800000) {                               /* normal half */
        uint32_t m = ax - (112u << 23);
        return sign | (uint16_t)((m + 0x0fff + ((m >> 13) & 1)) >> 13);
    }
    if (ax <= 0x33000000) return sign;                    /* <= 2^-25 rounds to zero */
    uint32_t mant = (ax & 0x7fffff) | 0x800000;
    int shift = 126 - (int)(ax >> 23);                    /* 14..24 */
    uint32_t r = mant >> shift, rem = mant & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (r & 1))) r++;
    return sign | (uint16_t)r;
}

/* The sixteen scales of a Q3_K super-block, d times the signed 6-bit values packed in its 12 scale bytes. */
static inline void q3_K_scales(const uint8_t scales[12], float d, float dl[16]) {
    for (int s = 0; s < 16; s++) {
        const int lo = (scales[s % 8] >> (4 * (s / 8))) & 0xf;
        const int hi = (scales[8 + s % 4] >> (2 * (s / 4))) & 3;
        dl[s] = d * (float)((lo | hi << 4) - 32);
    }
}

static inline int dg_is_finite_bits(float f) { return (dg_f32_bits(f) & 0x7f800000) != 0x7f800000; }

/* Q4_K and Q5_K: eight 6-bit scales and mins packed into 12 bytes. */
DG_HOST_DEVICE static inline void unpack_scales_k4(const uint8_t *in, uint8_t *ls, uint8_t *lm) {
    for (int j = 0; j < 4; j++) {
        ls[j] = in[j] & 63;
        lm[j] = in[j + 4] & 63;
        ls[j + 4] = (uint8_t)((in[j + 8] & 0xf) | (in[j] >> 6) << 4);
        lm[j + 4] = (uint8_t)((in[j + 8] >> 4) | (in[j + 4] >> 6) << 4);
    }
}

/* Per-CPU clones of plain loops that vectorise well (GCC picks one at load time through an ifunc): the same
 * C, so the same IEEE operations and the same bits; -std=c11 keeps multiply-adds unfused. Windows has no ifunc:
 * there (and with -DDG_NO_CLONES, to compare) these loops compile for baseline x86-64 only (compat.h). */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(_WIN32) && !defined(DG_NO_CLONES)
#define DG_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DG_CLONES
#endif

/* Row kernels: n values (a multiple of the type's block size). */
typedef void (*dg_quantize_fn)(const float *x, void *dst, int64_t n);
typedef void (*dg_dequantize_fn)(const void *src, float *y, int64_t n);

void dg_quantize_row_q2_K(const float *x, void *dst, int64_t n);
void dg_quantize_row_q3_K(const float *x, void *dst, int64_t n);
void dg_quantize_row_q4_K(const float *x, void *dst, int64_t n);
void dg_quantize_row_q5_K(const float *x, void *dst, int64_t n);
void dg_quantize_row_q6_K(const float *x, void *dst, int64_t n);
void dg_dequantize_row_q2_K(const void *src, float *y, int64_t n);
void dg_dequantize_row_q3_K(const void *src, float *y, int64_t n);
void dg_dequantize_row_q4_K(const void *src, float *y, int64_t n);
void dg_dequantize_row_q5_K(const void *src, float *y, int64_t n);
void dg_dequantize_row_q6_K(const void *src, float *y, int64_t n);
void dg_quantize_row_iq4_xs(const float *x, void *dst, int64_t n);
void dg_dequantize_row_iq4_xs(const void *src, float *y, int64_t n);
void dg_quantize_row_iq4_nl(const float *x, void *dst, int64_t n);
void dg_dequantize_row_iq4_nl(const void *src, float *y, int64_t n);

/* Importance-weighted quantizers (llama.cpp's imatrix): imp holds one non-negative importance per column of the
 * row (n values; the mean squared activation that column meets); they minimise the squared error weighted by
 * imp times how large each value is (quant_weighted.c). */
typedef void (*dg_quantize_w_fn)(const float *x, void *dst, int64_t n, const float *imp);
dg_quantize_w_fn dg_weighted_quantizer(int type);

/* A K-quant super-block's levels L (one per value, value order, unsigned) packed into its bit fields (quant_k.c);
 * Q3_K also packs its 16 signed 6-bit scales, and dg_pack_scales_k4 Q4_K/Q5_K's eight 6-bit scales and mins. */
void dg_pack_q2_K(block_q2_K *y, const uint8_t *L);
void dg_pack_q3_K(block_q3_K *y, const int8_t *sc, const uint8_t *L);
void dg_pack_q4_K(block_q4_K *y, const uint8_t *L);
void dg_pack_q5_K(block_q5_K *y, const uint8_t *L);
void dg_pack_q6_K(block_q6_K *y, const uint8_t *L);
void dg_pack_scales_k4(uint8_t *out, const uint8_t *ls, const uint8_t *lm);

#endif
