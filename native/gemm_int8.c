/* gemm_int8.c: matmul against quantized weights with int8 activations (integer dot products).
 *
 * The activations of each token are quantized per 32 values to int8 with a float scale dx (round to nearest
 * even of x / dx, dx = max|x| / 127), and every stored weight type is read as unsigned integer levels q with a
 * float scale per 32 (or 16) values and, for the asymmetric types, a float min: w = ws * (q - zero) + wm. A dot
 * product then splits into exact integer sums per block, c = sum q * qx - zero * sum qx, and float terms:
 *     sum_blocks  (ws * dx) * c  +  wm * (dx * sum qx).
 *
 * Layout ("lane per block"): 16 blocks of 32 values make a group of 512; in both the unpacked weight row and the
 * quantized activation, byte 64 j + 4 L + i of a group holds value 4 j + i of block L (dword j of every block
 * sits in one 64-byte vector). One vector multiply-add of dword j (VNNI dpbusd: u8 x s8, four products summed
 * into each 32-bit lane) then adds block L's four products into lane L, so 8 of them give the 16 block sums of
 * a group with no horizontal work; the float terms run once per group, 16 blocks wide. Types with a scale per
 * 16 values ("split": Q6_K, Q3_K, Q2_K) sum dwords 0-3 and 4-7 separately.
 *
 * Weight rows are unpacked into that layout per block of rows into a per-thread buffer (the mapped file is
 * never copied whole); activations are quantized once per matmul. Every lane of a group is always computed
 * (missing blocks are zeros), and each output is
 *     acc[L] = fma((float)c, ws[L] * dx[L], acc[L]) [, fma(dx * sum qx, wm[L], acc[L])]   over groups in order,
 *     out = ((acc[0..7] + acc[8..15]) folded in halves down to one float,
 * in every variant (reference, AVX2, AVX-512 VNNI): integer sums are exact, so the variants agree bit for bit.
 */
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>

#include "compat.h"   /* dg_fmaf */
#include "gemm.h"
#include "quant_internal.h"

/* ---- the integer view of each stored type ------------------------------------------------------------------
 * levels(): the natural-order levels of `lanes` 32-value blocks starting at src (lanes <= 16; K-quants come in
 * 8-lane super-blocks), their scales (sa: per 32 values, or per first 16 with sb for the second 16) and mins
 * (wa, wb: the additive term per value). Levels go to lev[32 L + v]. */

#define INLINE static inline __attribute__((always_inline))

/* Eight bytes at a time ("SWAR"): shifts move bits across byte boundaries, the byte masks cut them off again. */
#define BYTES(b) (0x0101010101010101ull * (b))
INLINE uint64_t ld64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }
INLINE void st64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }

struct int8_type {
    int type;
    int64_t block, block_bytes;  /* values and bytes per stored block */
    int zero;                    /* w = ws * (q - zero) + wm */
    int split;                   /* a scale per 16 values */
    int mins;                    /* wm != 0 */
    int wide;                    /* levels up to 255 (AVX2's 16-bit pair sums would saturate) */
};

INLINE void levels_q8_0(const void *src, int lanes, uint8_t *restrict lev, float *sa, float *sb, float *wa, float *wb) {
    const block_q8_0 *x = src;
    for (int b = 0; b < lanes; b++) {
        sa[b] = dg_f16_to_f32(x[b].d);
        memcpy(lev + 32 * b, x[b].qs, 32);
    }
    for (int i = 0; i < 32 * lanes; i++) lev[i] ^= 0x80;   /* q + 128 */
}

/* Nibbles: byte i of a block's 16 holds value i (low) and value i + 16 (high); split eight bytes at a time. */
INLINE void split_nibbles(uint8_t *restrict lev, const uint8_t *qs) {
    for (int k = 0; k < 2; k++) {
        const uint64_t v = ld64(qs + 8 * k);
        st64(lev + 8 * k, v & BYTES(0x0f));
        st64(lev + 16 + 8 * k, (v >> 4) & BYTES(0x0f));
    }
}

INLINE void levels_q4_0(const void *src, int lanes, uint8_t *restrict lev, float *sa, float *sb, float *wa, float *wb) {
    const block_q4_0 *x = src;
    for (int b = 0; b < lanes; b++) {
        sa[b] = dg_f16_to_f32(x[b].d);
        split_nibbles(lev + 32 * b, x[b].qs);
    }
}

INLINE void levels_q4_1(const void *src, int lanes, uint8_t *restrict lev, float *sa, float *sb, float *wa, float *wb) {
    const block_q4_1 *x = src;
    for (int b = 0; b < lanes; b++) {
        sa[b] = dg_f16_to_f32(x[b].d);
        wa[b] = dg_f16_to_f32(x[b].m);
        split_nibbles(lev + 32 * b, x[b].qs);
    }
}

/* Q5_0 / Q5_1: nibbles plus the fifth bit, bit v of the little-endian qh word: each qh byte spreads to eight
 * level bytes through a table (bit i -> 16 in byte i). */
static uint64_t fifth_bit_table[256];
static pthread_once_t fifth_bit_once = PTHREAD_ONCE_INIT;

static void fill_fifth_bits(void) {
    for (int v = 0; v < 256; v++) {
        uint64_t t = 0;
        for (int i = 0; i < 8; i++) t |= (uint64_t)(((v >> i) & 1) << 4) << (8 * i);
        fifth_bit_table[v] = t;
    }
}

static const uint64_t *fifth_bits(void) {
    pthread_once(&fifth_bit_once, fill_fifth_bits);
    return fifth_bit_table;
}

INLINE void add_fifth_bits(uint8_t *restrict lev, const uint8_t qh[4], const uint64_t *table) {
    for (int k = 0; k < 4; k++) st64(lev + 8 * k, ld64(lev + 8 * k) | table[qh[k]]);
}

INLINE void levels_q5_0(const void *src, int lanes, uint8_t *restrict lev, float *sa, float *sb, float *wa, float *wb) {
    const block_q5_0 *x = src;
    const uint64_t *table = fifth_bits();
    for (int b = 0; b < lanes; b++) {
        sa[b] = dg_f16_to_f32(x[b].d);
        split_nibbles(lev + 32 * b, x[b].qs);
    }
    for (int b = 0; b < lanes; b++) add_fifth_bits(lev + 32 * b, x[b].qh, table);
}

INLINE void levels_q5_1(const void *src, int lanes, uint8_t *restrict lev, float *sa, float *sb, float *wa, float *wb) {
    const block_q5_1 *x = src;
    const uint64_t *table = fifth_bits();
    for (int b = 0; b < lanes; b++) {
        sa[b] = dg_f16_to_f32(x[b].d);
        wa[b] = dg_f16_to_f32(x[b].m);
        split_nibbles(lev + 32 * b, x[b].qs);
    }
    for (int b = 0; b < lanes; b++) add_fifth_bits(lev + 32 * b, x[b].qh, table);
}

/* Q4_K / Q5_K: sub-block s (32 values) has scale d * ls[s] and min -dmin * lm[s]; its nibbles are the low (s
 * even) or high (s odd) halves of qs[32 (s / 2) + l]; Q5_K adds bit s of qh[l]. */
INLINE void levels_k4(const uint16_t *d, const uint16_t *dmin, const uint8_t *scales, const uint8_t *qs,
                      const uint8_t *qh, uint8_t *restrict lev, float *sa, float *wa) {
    uint8_t ls[8], lm[8];
    unpack_scales_k4(scales, ls, lm);
    const float dd = dg_f16_to_f32(*d), dm = dg_f16_to_f32(*dmin);
    for (int s = 0; s < 8; s++) {
        sa[s] = dd * (float)ls[s];
        wa[s] = -(dm * (float)lm[s]);
        const uint8_t *q = qs + 32 * (s / 2);
        const int shift = 4 * (s % 2);
        for (int l = 0; l < 32; l++)
            lev[32 * s + l] = (uint8_t)(((q[l] >> shift) & 0x0f) | (qh ? ((qh[l] >> s) & 1) << 4 : 0));
    }
}

INLINE void levels_q4_K(const void *src, int lanes, uint8_t *restrict lev, float *sa, float *sb, float *wa, float *wb) {
    const block_q4_K *x = src;
    for (int b = 0; b < lanes / 8; b++)
        levels_k4(&x[b].d, &x[b].dmin, x[b].scales, x[b].qs, NULL, lev + 256 * b, sa + 8 * b, wa + 8 * b);
}

INLINE void levels_q5_K(const void *src, int lanes, uint8_t *restrict lev, float *sa, float *sb, float *wa, float *wb) {
    const block_q5_K *x = src;
    for (int b = 0; b < lanes / 8; b++)
        levels_k4(&x[b].d, &x[b].dmin, x[b].scales, x[b].qs, x[b].qh, lev + 256 * b, sa + 8 * b, wa + 8 * b);
}

/* Q6_K: value 128 h + 32 k + l (k < 4, l < 32) is nibble k / 2 of ql[64 h + 32 (k % 2) + l] with bits 2k..2k+1
 * of qh[32 h + l] on top; 16-value sub-block v / 16 has scale d * sc[v / 16]. */
INLINE void levels_q6_K(const void *src, int lanes, uint8_t *restrict lev, float *sa, float *sb, float *wa, float *wb) {
    const block_q6_K *x = src;
    for (int b = 0; b < lanes / 8; b++, lev += 256, sa += 8, sb += 8) {
        const float d = dg_f16_to_f32(x[b].d);
        for (int s = 0; s < 8; s++) {
            sa[s] = d * (float)x[b].scales[2 * s];
            sb[s] = d * (float)x[b].scales[2 * s + 1];
        }
        for (int h = 0; h < 2; h++)
            for (int k = 0; k < 4; k++) {
                const uint8_t *ql = x[b].ql + 64 * h + 32 * (k % 2), *qh = x[b].qh + 32 * h;
                for (int c = 0; c < 4; c++)
                    st64(lev + 128 * h + 32 * k + 8 * c, ((ld64(ql + 8 * c) >> (4 * (k / 2))) & BYTES(0x0f)) |
                                                             ((ld64(qh + 8 * c) >> (2 * k)) & BYTES(3)) << 4);
            }
    }
}

/* Q3_K: value 128 h + 32 j + 16 g + l has low bits 2j..2j+1 of qs[32 h + 16 g + l] and a third bit 4 h + j of
 * hmask[16 g + l] (level = low | bit << 2, w = scale * (level - 4)); sub-block v / 16 has a signed 6-bit scale. */
INLINE void levels_q3_K(const void *src, int lanes, uint8_t *restrict lev, float *sa, float *sb, float *wa, float *wb) {
    const block_q3_K *x = src;
    for (int b = 0; b < lanes / 8; b++, lev += 256, sa += 8, sb += 8) {
        const float d = dg_f16_to_f32(x[b].d);
        float dl[16];
        q3_K_scales(x[b].scales, d, dl);
        for (int s = 0; s < 8; s++) {
            sa[s] = dl[2 * s];
            sb[s] = dl[2 * s + 1];
        }
        for (int h = 0; h < 2; h++)
            for (int j = 0; j < 4; j++)
                for (int g = 0; g < 2; g++) {
                    const uint8_t *q = x[b].qs + 32 * h + 16 * g, *m = x[b].hmask + 16 * g;
                    for (int c = 0; c < 2; c++)
                        st64(lev + 128 * h + 32 * j + 16 * g + 8 * c, ((ld64(q + 8 * c) >> (2 * j)) & BYTES(3)) |
                                                                          ((ld64(m + 8 * c) >> (4 * h + j)) & BYTES(1)) << 2);
                }
    }
}

/* Q2_K: value 128 h + 32 j + 16 g + l is bits 2j..2j+1 of qs[32 h + 16 g + l]; sub-block v / 16 has scale
 * d * (sc & 15) and min -dmin * (sc >> 4). */
INLINE void levels_q2_K(const void *src, int lanes, uint8_t *restrict lev, float *sa, float *sb, float *wa, float *wb) {
    const block_q2_K *x = src;
    for (int b = 0; b < lanes / 8; b++, lev += 256, sa += 8, sb += 8, wa += 8, wb += 8) {
        const float d = dg_f16_to_f32(x[b].d), dmin = dg_f16_to_f32(x[b].dmin);
        for (int s = 0; s < 16; s++) {
            const uint8_t sc = x[b].scales[s];
            float *scale = s % 2 ? sb : sa, *min = s % 2 ? wb : wa;
            scale[s / 2] = d * (float)(sc & 0xf);
            min[s / 2] = -(dmin * (float)(sc >> 4));
        }
        for (int h = 0; h < 2; h++)
            for (int j = 0; j < 4; j++)
                for (int g = 0; g < 2; g++) {
                    const uint8_t *q = x[b].qs + 32 * h + 16 * g;
                    for (int c = 0; c < 2; c++)
                        st64(lev + 128 * h + 32 * j + 16 * g + 8 * c, (ld64(q + 8 * c) >> (2 * j)) & BYTES(3));
                }
    }
}

/* IQ4_XS: the table's signed level + 128 (0..241, a wide type), sub-block s of 32 at scale d * (code - 32). */
INLINE void levels_iq4_xs(const void *src, int lanes, uint8_t *restrict lev, float *sa, float *sb, float *wa, float *wb) {
    const block_iq4_xs *x = src;
    for (int b = 0; b < lanes / 8; b++, lev += 256, sa += 8) {
        const float d = dg_f16_to_f32(x[b].d);
        for (int s = 0; s < 8; s++) {
            sa[s] = d * (float)(iq4_xs_scale(&x[b], s) - 32);
            const uint8_t *q = x[b].qs + 16 * s;
            for (int j = 0; j < 16; j++) {
                lev[32 * s + j] = (uint8_t)(IQ4_LEVELS[q[j] & 0xf] + 128);
                lev[32 * s + j + 16] = (uint8_t)(IQ4_LEVELS[q[j] >> 4] + 128);
            }
        }
    }
}

/* IQ4_NL: the same levels, one f16 scale per block of 32. */
INLINE void levels_iq4_nl(const void *src, int lanes, uint8_t *restrict lev, float *sa, float *sb, float *wa, float *wb) {
    const block_iq4_nl *x = src;
    for (int b = 0; b < lanes; b++, lev += 32) {
        sa[b] = dg_f16_to_f32(x[b].d);
        for (int j = 0; j < 16; j++) {
            lev[j] = (uint8_t)(IQ4_LEVELS[x[b].qs[j] & 0xf] + 128);
            lev[j + 16] = (uint8_t)(IQ4_LEVELS[x[b].qs[j] >> 4] + 128);
        }
    }
}

static const int8_type INT8_TYPES[] = {
    {DG_TYPE_Q8_0, QK8_0, sizeof(block_q8_0), 128, 0, 0, 1},
    {DG_TYPE_Q4_0, QK4_0, sizeof(block_q4_0), 8, 0, 0, 0},
    {DG_TYPE_Q4_1, QK4_1, sizeof(block_q4_1), 0, 0, 1, 0},
    {DG_TYPE_Q5_0, QK5_0, sizeof(block_q5_0), 16, 0, 0, 0},
    {DG_TYPE_Q5_1, QK5_1, sizeof(block_q5_1), 0, 0, 1, 0},
    {DG_TYPE_Q2_K, QK_K, sizeof(block_q2_K), 0, 1, 1, 0},
    {DG_TYPE_Q3_K, QK_K, sizeof(block_q3_K), 4, 1, 0, 0},
    {DG_TYPE_Q4_K, QK_K, sizeof(block_q4_K), 0, 0, 1, 0},
    {DG_TYPE_Q5_K, QK_K, sizeof(block_q5_K), 0, 0, 1, 0},
    {DG_TYPE_Q6_K, QK_K, sizeof(block_q6_K), 32, 1, 0, 0},
    {DG_TYPE_IQ4_XS, QK_K, sizeof(block_iq4_xs), 128, 0, 0, 1},
    {DG_TYPE_IQ4_NL, 32, sizeof(block_iq4_nl), 128, 0, 0, 1},
};

/* The levels, scales and mins of `lanes` blocks of t at src (inlined into each instruction-set build below). */
INLINE void levels(const int8_type *t, const void *src, int lanes, uint8_t *restrict lev, float *sa, float *sb,
                   float *wa, float *wb) {
    switch (t->type) {
    case DG_TYPE_Q8_0: levels_q8_0(src, lanes, lev, sa, sb, wa, wb); break;
    case DG_TYPE_Q4_0: levels_q4_0(src, lanes, lev, sa, sb, wa, wb); break;
    case DG_TYPE_Q4_1: levels_q4_1(src, lanes, lev, sa, sb, wa, wb); break;
    case DG_TYPE_Q5_0: levels_q5_0(src, lanes, lev, sa, sb, wa, wb); break;
    case DG_TYPE_Q5_1: levels_q5_1(src, lanes, lev, sa, sb, wa, wb); break;
    case DG_TYPE_Q2_K: levels_q2_K(src, lanes, lev, sa, sb, wa, wb); break;
    case DG_TYPE_Q3_K: levels_q3_K(src, lanes, lev, sa, sb, wa, wb); break;
    case DG_TYPE_Q4_K: levels_q4_K(src, lanes, lev, sa, sb, wa, wb); break;
    case DG_TYPE_Q5_K: levels_q5_K(src, lanes, lev, sa, sb, wa, wb); break;
    case DG_TYPE_Q6_K: levels_q6_K(src, lanes, lev, sa, sb, wa, wb); break;
    case DG_TYPE_IQ4_XS: levels_iq4_xs(src, lanes, lev, sa, sb, wa, wb); break;
    case DG_TYPE_IQ4_NL: levels_iq4_nl(src, lanes, lev, sa, sb, wa, wb); break;
    }
}

const int8_type *int8_type_of(int type) {
    for (size_t i = 0; i < sizeof INT8_TYPES / sizeof INT8_TYPES[0]; i++)
        if (INT8_TYPES[i].type == type) return &INT8_TYPES[i];
    return NULL;
}

int64_t int8_groups(int64_t k) { return (k + INT8_GROUP - 1) / INT8_GROUP; }

/* ---- unpacking weights and quantizing activations --------------------------------------------------------- */

/* One block of 32 activations: dx = max|x| / 127 and qx = round-to-nearest-even(x * (1 / dx)), with the sums of
 * qx over its two halves. */
INLINE void quant_block_ref(const float *xb, int8_t *restrict q, float *dx, int32_t *lo, int32_t *hi) {
    float amax = 0.0f, nonfinite = 0.0f;   /* x * 0 is NaN for inf and NaN, +-0 otherwise */
    for (int i = 0; i < 32; i++) {
        const float a = fabsf(xb[i]);
        amax = a > amax ? a : amax;
        nonfinite += xb[i] * 0.0f;
    }
    /* a non-finite value makes the block's scale NaN, and so every output of the token */
    const float d = amax / 127.0f + nonfinite, id = d != 0.0f ? 1.0f / d : 0.0f;
    for (int i = 0; i < 32; i++) {
        const float r = nearbyintf(xb[i] * id);
        q[i] = (int8_t)(fabsf(r) <= 127.0f ? r : 0.0f);   /* NaN: 0, a defined cast */
    }
    *lo = *hi = 0;
    for (int i = 0; i < 16; i++) *lo += q[i];
    for (int i = 16; i < 32; i++) *hi += q[i];
    *dx = d;
}

/* Natural order (block L at byte 32 L) to lane-per-block order (dword j of block L at dword 16 j + L). */
INLINE void to_lanes_ref(uint8_t *restrict out, const uint8_t *restrict lev) {
    for (int j = 0; j < 8; j++)
        for (int l = 0; l < 16; l++) memcpy(out + 64 * j + 4 * l, lev + 32 * l + 4 * j, 4);
}

/* The same permutation of 128 dwords, in three rounds of two-vector shuffles: vector k starts as blocks 2k and
 * 2k + 1, and each round swaps one bit of the vector number with one bit of the lane (the last round also puts
 * the lanes in block order). */
#if defined(__x86_64__)
#include <immintrin.h>

static const int32_t LANE_SWAP[3][2][16] = {
    {{0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30}, {1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31}},
    {{0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29}, {2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31}},
    {{0, 8, 1, 9, 2, 10, 3, 11, 16, 24, 17, 25, 18, 26, 19, 27}, {4, 12, 5, 13, 6, 14, 7, 15, 20, 28, 21, 29, 22, 30, 23, 31}},
};

INLINE __attribute__((target("avx512f"))) void lanes_avx512(__m512i v[8]) {
    for (int s = 0; s < 3; s++) {
        const int vb = 1 << s;
        const __m512i i0 = _mm512_loadu_si512(LANE_SWAP[s][0]), i1 = _mm512_loadu_si512(LANE_SWAP[s][1]);
        for (int k = 0; k < 8; k++)
            if (!(k & vb)) {
                const __m512i a = v[k], b = v[k | vb];
                v[k] = _mm512_permutex2var_epi32(a, i0, b);
                v[k | vb] = _mm512_permutex2var_epi32(a, i1, b);
            }
    }
}

INLINE __attribute__((target("avx512f"))) void to_lanes_avx512(uint8_t *restrict out, const uint8_t *restrict lev) {
    __m512i v[8];
    for (int k = 0; k < 8; k++) v[k] = _mm512_loadu_si512(lev + 64 * k);
    lanes_avx512(v);
    for (int j = 0; j < 8; j++) _mm512_storeu_si512(out + 64 * j, v[j]);
}

/* quant_block_ref with two vectors: the same products, maximum, division and rounding (in the current rounding
 * mode, as nearbyintf), so the same bytes; a block holding inf or NaN goes through quant_block_ref. */
INLINE __attribute__((target("avx512f,avx512bw"))) void quant_block_avx512(const float *xb, int8_t *restrict q,
                                                                          float *dx, int32_t *lo, int32_t *hi) {
    const __m512 a = _mm512_loadu_ps(xb), b = _mm512_loadu_ps(xb + 16), zero = _mm512_setzero_ps();
    const __m512 za = _mm512_mul_ps(a, zero), zb = _mm512_mul_ps(b, zero);
    if (_mm512_cmp_ps_mask(za, za, _CMP_UNORD_Q) | _mm512_cmp_ps_mask(zb, zb, _CMP_UNORD_Q)) {
        quant_block_ref(xb, q, dx, lo, hi);
        return;
    }
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
    const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;   /* + nonfinite: + 0 */
    __m512i qi[2];
    for (int h = 0; h < 2; h++) {
        const __m512 r = _mm512_roundscale_ps(_mm512_mul_ps(h ? b : a, _mm512_set1_ps(id)),
                                              _MM_FROUND_CUR_DIRECTION | _MM_FROUND_NO_EXC);
        const __mmask16 keep = _mm512_cmp_ps_mask(_mm512_abs_ps(r), _mm512_set1_ps(127.0f), _CMP_LE_OQ);
        qi[h] = _mm512_maskz_cvtps_epi32(keep, r);
        _mm_storeu_si128((__m128i *)(q + 16 * h), _mm512_cvtepi32_epi8(qi[h]));
    }
    *lo = _mm512_reduce_add_epi32(qi[0]);
    *hi = _mm512_reduce_add_epi32(qi[1]);
    *dx = d;
}

/* ---- groups of the preset types straight from the stored bytes -----------------------------------------------
 * The same levels as levels_*() above, built 64 bytes (two blocks, natural order) per vector with shifts and
 * masks instead of byte loops, then permuted in registers; the scales and mins are the same float products,
 * 16 lanes at a time. Every stored int8 type has this path: Q8_0, Q4_0 and the K-quants' fallbacks for rows
 * not a multiple of 256 long (Q4_1, Q5_0, Q5_1: the real model's expert down projections, 704 long, are Q5_0 in
 * Q4_K_M) take groups of an even number of blocks, the K-quants whole super-blocks; other groups (an odd number
 * of blocks) return 0 and go through levels(). */
#define AVX512_BW __attribute__((target("avx512f,avx512bw,avx512vl")))

/* Bytes lo (low 32) and hi (high 32) of one vector. */
INLINE AVX512_BW __m512i halves(const void *lo, const void *hi) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)lo)),
                              _mm256_loadu_si256((const __m256i *)hi), 1);
}

/* Each 64-bit lane of v shifted right by a (lanes 0-3) or b (lanes 4-7), then masked bytewise. */
INLINE AVX512_BW __m512i shift_mask(__m512i v, int a, int b, int mask) {
    const __m512i shifted = _mm512_srlv_epi64(v, _mm512_set_epi64(b, b, b, b, a, a, a, a));
    return _mm512_and_si512(shifted, _mm512_set1_epi8((char)mask));
}

/* Lanes 0-7 a, lanes 8-15 b: one float per super-block of a group. */
INLINE AVX512_BW __m512 pair(float a, float b) {
    return _mm512_mask_blend_ps(0xff00, _mm512_set1_ps(a), _mm512_set1_ps(b));
}

/* The f16 scales of the first `lanes` of 16 Q8_0 / Q4_0 blocks `stride` bytes apart (the scale first in each), 0
 * past them: four to a 64-bit word (a gather is slower), then the hardware conversion, exact as dg_f16_to_f32 is. */
INLINE AVX512_BW __m512 f16_scales(const uint8_t *blocks, int stride, int lanes) {
    uint64_t h[4] = {0};
    for (int b = 0; b < lanes; b++) {
        uint16_t d;
        memcpy(&d, blocks + b * stride, 2);
        h[b / 4] |= (uint64_t)d << (16 * (b % 4));
    }
    return _mm512_cvtph_ps(_mm256_set_epi64x((long long)h[3], (long long)h[2], (long long)h[1], (long long)h[0]));
}

/* unpack_scales_k4 for the two super-blocks of a group, 16 lanes (sub-block s = L % 8 of super-block L / 8) from
 * the 12 scale bytes of each (read as 16: the bytes after them are still in the block). */
static const int32_t K4_PICK[4][16] = {
    {0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27},   /* in[s] or in[s + 4]: low bits of ls */
    {0, 1, 2, 3, 0, 1, 2, 3, 16, 17, 18, 19, 16, 17, 18, 19},     /* in[s - 4]: top bits of ls (s >= 4) */
    {4, 5, 6, 7, 8, 9, 10, 11, 20, 21, 22, 23, 24, 25, 26, 27},   /* in[s + 4]: low bits of lm */
    {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23},     /* in[s]: top bits of lm (s >= 4) */
};

INLINE AVX512_BW void scales_k4(const uint8_t *sc0, const uint8_t *sc1, __m512 dd, __m512 dm, __mmask16 lanes,
                                wgt_group *o) {
    const __m512i in0 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)sc0));
    const __m512i in1 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)sc1));
    __m512i pick[4];
    for (int i = 0; i < 4; i++) pick[i] = _mm512_permutex2var_epi32(in0, _mm512_loadu_si512(K4_PICK[i]), in1);
    const __mmask16 high = 0xf0f0;   /* s >= 4 */
    const __m512i low = _mm512_mask_blend_epi32(high, _mm512_set1_epi32(63), _mm512_set1_epi32(15));
    const __m512i four = _mm512_maskz_mov_epi32(high, _mm512_set1_epi32(4));
    const __m512i ls = _mm512_or_si512(_mm512_and_si512(pick[0], low),
                                       _mm512_maskz_slli_epi32(high, _mm512_srli_epi32(pick[1], 6), 4));
    const __m512i lm = _mm512_or_si512(_mm512_and_si512(_mm512_srlv_epi32(pick[2], four), low),
                                       _mm512_maskz_slli_epi32(high, _mm512_srli_epi32(pick[3], 6), 4));
    _mm512_store_ps(o->sa, _mm512_maskz_mul_ps(lanes, dd, _mm512_cvtepi32_ps(ls)));
    const __m512i wm = _mm512_castps_si512(_mm512_mul_ps(dm, _mm512_cvtepi32_ps(lm)));   /* -(dm * lm) */
    _mm512_store_ps(o->wa, _mm512_castsi512_ps(_mm512_maskz_xor_epi32(lanes, wm, _mm512_set1_epi32(INT32_MIN))));
}

/* Q3_K's scale s: low 4 bits from byte s % 8 (shifted by 4 (s / 8)), top 2 from byte 8 + s % 4 (by 2 (s / 4)). */
static const int32_t Q3_LO[16] = {0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7};
static const int32_t Q3_LO_SHIFT[16] = {0, 0, 0, 0, 0, 0, 0, 0, 4, 4, 4, 4, 4, 4, 4, 4};
static const int32_t Q3_HI[16] = {8, 9, 10, 11, 8, 9, 10, 11, 8, 9, 10, 11, 8, 9, 10, 11};
static const int32_t Q3_HI_SHIFT[16] = {0, 0, 0, 0, 2, 2, 2, 2, 4, 4, 4, 4, 6, 6, 6, 6};

static const int32_t EVEN_ODD[2][16] = {
    {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30},
    {1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31},
};

/* One function per layout family, chosen by group_avx512_levels() at the end: each fills v[0 .. lanes / 2) (two
 * blocks of 32 values a vector; the caller has zeroed v, so missing blocks are level 0, scale 0) and the group's
 * scales and mins for the first `lanes` blocks, or returns 0, having written nothing, when the group is not whole
 * for its layout. */

/* ---- the 32-value block types (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1): groups of an even number of blocks ---- */

INLINE int legacy_type(int type) {
    return type == DG_TYPE_Q8_0 || type == DG_TYPE_Q4_0 || type == DG_TYPE_Q4_1 || type == DG_TYPE_Q5_0 ||
           type == DG_TYPE_Q5_1;
}

INLINE AVX512_BW int levels_q8_0_avx512(const void *src, int lanes, __m512i v[8], wgt_group *o) {
    if (lanes % 2) return 0;
    const block_q8_0 *x = src;
    for (int k = 0; k < lanes / 2; k++)
        v[k] = _mm512_xor_si512(halves(x[2 * k].qs, x[2 * k + 1].qs), _mm512_set1_epi8((char)0x80));
    _mm512_store_ps(o->sa, f16_scales(src, sizeof *x, lanes));
    return 1;
}

/* Q4_0, Q4_1, Q5_0, Q5_1: the scale first in every block; then the min (Q4_1, Q5_1), the fifth bits (Q5_0,
 * Q5_1), the nibbles. */
INLINE AVX512_BW int levels_nibbles_avx512(int type, const void *src, int lanes, __m512i v[8], wgt_group *o) {
    if (lanes % 2) return 0;
    const int mins = type == DG_TYPE_Q4_1 || type == DG_TYPE_Q5_1;
    const int five = type == DG_TYPE_Q5_0 || type == DG_TYPE_Q5_1;
    const size_t stride = type == DG_TYPE_Q4_0 ? sizeof(block_q4_0) : type == DG_TYPE_Q4_1 ? sizeof(block_q4_1)
                        : type == DG_TYPE_Q5_0 ? sizeof(block_q5_0) : sizeof(block_q5_1);
    const size_t qh = 2 + 2 * (size_t)mins, qs = qh + 4 * (size_t)five;
    const uint8_t *x = src;
    for (int k = 0; k < lanes / 2; k++) {
        const uint8_t *b0 = x + 2 * (size_t)k * stride, *b1 = b0 + stride;
        /* 16 bytes of each block twice: low nibbles are values 0-15, high nibbles 16-31 */
        const __m512i a = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(b0 + qs)));
        const __m512i ab = _mm512_mask_broadcast_i32x4(a, 0xff00, _mm_loadu_si128((const __m128i *)(b1 + qs)));
        v[k] = _mm512_and_si512(_mm512_srlv_epi64(ab, _mm512_set_epi64(4, 4, 0, 0, 4, 4, 0, 0)),
                                _mm512_set1_epi8(0x0f));
        if (five) {   /* bit v of a block's qh word is value v's fifth bit: a byte mask, 16 where set */
            uint32_t h0, h1;
            memcpy(&h0, b0 + qh, 4);
            memcpy(&h1, b1 + qh, 4);
            v[k] = _mm512_mask_mov_epi8(v[k], (__mmask64)(h0 | (uint64_t)h1 << 32),
                                        _mm512_or_si512(v[k], _mm512_set1_epi8(0x10)));
        }
    }
    _mm512_store_ps(o->sa, f16_scales(src, (int)stride, lanes));
    if (mins) _mm512_store_ps(o->wa, f16_scales(x + 2, (int)stride, lanes));
    return 1;
}

/* ---- the K-quants (Q2_K .. Q6_K): whole super-blocks of 256 values (8 lanes), one or two to a group ---- */

/* Q4_K / Q5_K. */
INLINE AVX512_BW int levels_k4_avx512(int type, const void *src, int lanes, __m512i v[8], wgt_group *o) {
    if (lanes % 8) return 0;
    const __mmask16 in = (__mmask16)((1u << lanes) - 1);
    const int five = type == DG_TYPE_Q5_K, last = lanes / 8 - 1;   /* the super-blocks present: 0..last */
    const block_q4_K *x4 = src;
    const block_q5_K *x5 = src;
    for (int b = 0; b <= last; b++) {
        const uint8_t *qs = five ? x5[b].qs : x4[b].qs;
        /* sub-blocks 2p and 2p + 1 are the low and high nibbles of the same 32 bytes */
        for (int p = 0; p < 4; p++) {
            __m512i lv = shift_mask(halves(qs + 32 * p, qs + 32 * p), 0, 4, 0x0f);
            if (five) {
                const __m512i h = shift_mask(halves(x5[b].qh, x5[b].qh), 2 * p, 2 * p + 1, 1);
                lv = _mm512_or_si512(lv, _mm512_slli_epi64(h, 4));
            }
            v[4 * b + p] = lv;
        }
    }
    if (five)
        scales_k4(x5[0].scales, x5[last].scales, pair(dg_f16_to_f32(x5[0].d), dg_f16_to_f32(x5[last].d)),
                  pair(dg_f16_to_f32(x5[0].dmin), dg_f16_to_f32(x5[last].dmin)), in, o);
    else
        scales_k4(x4[0].scales, x4[last].scales, pair(dg_f16_to_f32(x4[0].d), dg_f16_to_f32(x4[last].d)),
                  pair(dg_f16_to_f32(x4[0].dmin), dg_f16_to_f32(x4[last].dmin)), in, o);
    return 1;
}

/* Q2_K / Q3_K. */
INLINE AVX512_BW int levels_q2_q3_K_avx512(int type, const void *src, int lanes, __m512i v[8], wgt_group *o) {
    if (lanes % 8) return 0;
    const __mmask16 in = (__mmask16)((1u << lanes) - 1);
    const int three = type == DG_TYPE_Q3_K, last = lanes / 8 - 1;
    const block_q2_K *x2 = src;
    const block_q3_K *x3 = src;
    for (int b = 0; b <= last; b++)
        /* blocks 2m, 2m + 1 of a super-block (h = m / 2, j = 2 (m % 2) and j + 1): bits 2j.. of
         * qs[32 h .. 32 h + 31]; Q3_K's third bit is bit 4 h + j of hmask[0 .. 31] */
        for (int m = 0; m < 4; m++) {
            const int h = m / 2, j = 2 * (m % 2);
            const uint8_t *qs = three ? x3[b].qs + 32 * h : x2[b].qs + 32 * h;
            v[4 * b + m] = shift_mask(halves(qs, qs), 2 * j, 2 * j + 2, 3);
            if (three) {
                const __m512i hb = shift_mask(halves(x3[b].hmask, x3[b].hmask), 4 * h + j, 4 * h + j + 1, 1);
                v[4 * b + m] = _mm512_or_si512(v[4 * b + m], _mm512_slli_epi64(hb, 2));
            }
        }
    /* 16 scales per super-block (Q2_K: a byte each, the scale its low nibble, the min its high one; Q3_K:
     * signed 6-bit, unpacked first); sub-block 2L to lane L of sa and wa, 2L + 1 to sb and wb */
    __m512i c[2];
    for (int b = 0; b < 2; b++) {
        const int sb = b ? last : 0;
        if (three) {   /* q3_K_scales, 16 lanes: the 12 bytes read masked (the block ends 2 bytes later) */
            const __m512i in = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(0x0fff, x3[sb].scales));
            const __m512i lo = _mm512_srlv_epi32(_mm512_permutexvar_epi32(_mm512_loadu_si512(Q3_LO), in),
                                                 _mm512_loadu_si512(Q3_LO_SHIFT));
            const __m512i hi = _mm512_srlv_epi32(_mm512_permutexvar_epi32(_mm512_loadu_si512(Q3_HI), in),
                                                 _mm512_loadu_si512(Q3_HI_SHIFT));
            const __m512i top = _mm512_slli_epi32(_mm512_and_si512(hi, _mm512_set1_epi32(3)), 4);
            c[b] = _mm512_sub_epi32(_mm512_or_si512(_mm512_and_si512(lo, _mm512_set1_epi32(15)), top),
                                    _mm512_set1_epi32(32));
        } else {
            c[b] = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)x2[sb].scales));
        }
    }
    const __m512i even = _mm512_permutex2var_epi32(c[0], _mm512_loadu_si512(EVEN_ODD[0]), c[1]);
    const __m512i odd = _mm512_permutex2var_epi32(c[0], _mm512_loadu_si512(EVEN_ODD[1]), c[1]);
    const __m512 d = three ? pair(dg_f16_to_f32(x3[0].d), dg_f16_to_f32(x3[last].d))
                           : pair(dg_f16_to_f32(x2[0].d), dg_f16_to_f32(x2[last].d));
    const __m512i low = _mm512_set1_epi32(three ? -1 : 15);
    _mm512_store_ps(o->sa, _mm512_maskz_mul_ps(in, d, _mm512_cvtepi32_ps(_mm512_and_si512(even, low))));
    _mm512_store_ps(o->sb, _mm512_maskz_mul_ps(in, d, _mm512_cvtepi32_ps(_mm512_and_si512(odd, low))));
    if (!three) {   /* -(dmin * m) */
        const __m512 dm = pair(dg_f16_to_f32(x2[0].dmin), dg_f16_to_f32(x2[last].dmin));
        const __m512i sign = _mm512_set1_epi32(INT32_MIN);
        const __m512 ma = _mm512_mul_ps(dm, _mm512_cvtepi32_ps(_mm512_srli_epi32(even, 4)));
        const __m512 mb = _mm512_mul_ps(dm, _mm512_cvtepi32_ps(_mm512_srli_epi32(odd, 4)));
        _mm512_store_ps(o->wa, _mm512_castsi512_ps(_mm512_maskz_xor_epi32(in, _mm512_castps_si512(ma), sign)));
        _mm512_store_ps(o->wb, _mm512_castsi512_ps(_mm512_maskz_xor_epi32(in, _mm512_castps_si512(mb), sign)));
    }
    return 1;
}

/* Q6_K. */
INLINE AVX512_BW int levels_q6_K_avx512(const void *src, int lanes, __m512i v[8], wgt_group *o) {
    if (lanes % 8) return 0;
    const __mmask16 in = (__mmask16)((1u << lanes) - 1);
    const block_q6_K *x = src;
    const int last = lanes / 8 - 1;
    for (int b = 0; b <= last; b++)
        /* sub-blocks 2m, 2m + 1 (h = m / 2): one nibble of ql[64 h .. 64 h + 63], two bits of qh[32 h ..] */
        for (int m = 0; m < 4; m++) {
            const int h = m / 2, k0 = 2 * (m % 2);
            const __m512i lo = shift_mask(_mm512_loadu_si512(x[b].ql + 64 * h), 4 * (m % 2), 4 * (m % 2), 0x0f);
            const __m512i hi = shift_mask(halves(x[b].qh + 32 * h, x[b].qh + 32 * h), 2 * k0, 2 * k0 + 2, 3);
            v[4 * b + m] = _mm512_or_si512(lo, _mm512_slli_epi64(hi, 4));
        }
    /* the 16 signed scales of each super-block, read 16 bytes wide; sa takes the even ones, sb the odd */
    const __m512 s0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)x[0].scales)));
    const __m512 s1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)x[last].scales)));
    const __m512 d = pair(dg_f16_to_f32(x[0].d), dg_f16_to_f32(x[last].d));
    const __m512 even = _mm512_permutex2var_ps(s0, _mm512_loadu_si512(EVEN_ODD[0]), s1);
    const __m512 odd = _mm512_permutex2var_ps(s0, _mm512_loadu_si512(EVEN_ODD[1]), s1);
    _mm512_store_ps(o->sa, _mm512_maskz_mul_ps(in, d, even));
    _mm512_store_ps(o->sb, _mm512_maskz_mul_ps(in, d, odd));
    return 1;
}

/* The levels, scales and mins of `lanes` blocks of a type (a constant once inlined) through its family above; 0
 * for a type or group length it does not take. */
INLINE AVX512_BW int group_avx512_levels(int type, const void *src, int lanes, __m512i v[8], wgt_group *o) {
    for (int k = 0; k < 8; k++) v[k] = _mm512_setzero_si512();
    switch (type) {
    case DG_TYPE_Q8_0: return levels_q8_0_avx512(src, lanes, v, o);
    case DG_TYPE_Q4_0:
    case DG_TYPE_Q4_1:
    case DG_TYPE_Q5_0:
    case DG_TYPE_Q5_1: return levels_nibbles_avx512(type, src, lanes, v, o);
    case DG_TYPE_Q2_K:
    case DG_TYPE_Q3_K: return levels_q2_q3_K_avx512(type, src, lanes, v, o);
    case DG_TYPE_Q4_K:
    case DG_TYPE_Q5_K: return levels_k4_avx512(type, src, lanes, v, o);
    case DG_TYPE_Q6_K: return levels_q6_K_avx512(src, lanes, v, o);
    }
    return 0;
}

#endif

/* Rows of at most 256 values fill at most 8 lanes of their one group. The AVX-512 kernel then lets two rows share
 * a group (see "paired rows" below), and for that every such activation group holds its lanes 0-7 again in lanes
 * 8-15, scales and offset terms included; every other kernel multiplies the copies by the zero levels and scales
 * of the missing blocks, which adds +0 to lanes that hold +0. */
static void pair_lanes(act_group *o) {
    for (int j = 0; j < 8; j++) memcpy(o->qs + 64 * j + 32, o->qs + 64 * j, 32);
    memcpy(o->d + 8, o->d, 8 * sizeof(float));
    memcpy(o->ia + 8, o->ia, 8 * sizeof(int32_t));
    memcpy(o->ib + 8, o->ib, 8 * sizeof(int32_t));
    memcpy(o->ma + 8, o->ma, 8 * sizeof(float));
    memcpy(o->mb + 8, o->mb, 8 * sizeof(float));
}

/* Each instruction set gets its own build of the row functions from the same C (the same integer and float
 * operations, so the same bytes); only the lane permutation has a hand-written AVX-512 form (and the AVX-512 rows
 * of the preset types their own path, below). */
#define DEFINE_ROW_FNS(SUFFIX, ATTR, TO_LANES, QUANT_BLOCK)                                                    \
    /* Group g of a stored row of k values. */                                                                 \
    ATTR static inline void unpack_group_##SUFFIX(const int8_type *t, const void *row, int64_t k, int64_t g,   \
                                                  wgt_group *o) {                                              \
        const int lanes = (int)(k - g * INT8_GROUP >= INT8_GROUP ? 16 : (k - g * INT8_GROUP) / 32);            \
        const uint8_t *src = (const uint8_t *)row + g * (INT8_GROUP / t->block) * t->block_bytes;              \
        uint8_t lev[INT8_GROUP] __attribute__((aligned(64)));                                                   \
        if (lanes < 16) {                                                                                       \
            memset(lev, 0, sizeof lev);                                                                         \
            memset(o, 0, sizeof *o);                                                                            \
        }                                                                                                       \
        levels(t, src, lanes, lev, o->sa, o->sb, o->wa, o->wb);                                                 \
        TO_LANES(o->qs, lev);                                                                                   \
    }                                                                                                           \
    /* One token: each block through QUANT_BLOCK, then the integer and float terms of the type's offset and    \
     * mins. */                                                                                                 \
    ATTR static void quantize_row_##SUFFIX(const int8_type *t, const float *x, int64_t k, act_group *out) {   \
        const int64_t ng = int8_groups(k);                                                                      \
        for (int64_t g = 0; g < ng; g++) {                                                                      \
            act_group *o = out + g;                                                                             \
            const int lanes = (int)(k - g * INT8_GROUP >= INT8_GROUP ? 16 : (k - g * INT8_GROUP) / 32);        \
            int8_t q[INT8_GROUP] __attribute__((aligned(64)));                                                  \
            if (lanes < 16) {                                                                                   \
                memset(o, 0, sizeof *o);                                                                        \
                memset(q + 32 * lanes, 0, (size_t)(16 - lanes) * 32);                                           \
            }                                                                                                   \
            for (int l = 0; l < lanes; l++) {                                                                   \
                float d;                                                                                        \
                int32_t lo, hi;                                                                                 \
                QUANT_BLOCK(x + g * INT8_GROUP + 32 * l, q + 32 * l, &d, &lo, &hi);                             \
                const int32_t first = t->split ? lo : lo + hi;                                                  \
                o->d[l] = d;                                                                                    \
                o->ia[l] = -t->zero * first;                                                                    \
                o->ib[l] = -t->zero * hi;                                                                       \
                o->ma[l] = d * (float)first;                                                                    \
                o->mb[l] = d * (float)hi;                                                                       \
            }                                                                                                   \
            TO_LANES((uint8_t *)o->qs, (const uint8_t *)q);                                                     \
            if (k <= INT8_GROUP / 2) pair_lanes(o);                                                             \
        }                                                                                                       \
    }

DEFINE_ROW_FNS(ref, , to_lanes_ref, quant_block_ref)
#if defined(__x86_64__)
DEFINE_ROW_FNS(avx2, __attribute__((target("avx2,fma"))), to_lanes_ref, quant_block_ref)
DEFINE_ROW_FNS(avx512, __attribute__((target("avx512f,avx512bw,avx512vl"))), to_lanes_avx512, quant_block_avx512)
#endif

static void unpack_row_ref(const int8_type *t, const void *row, int64_t k, wgt_group *out) {
    for (int64_t g = 0; g < int8_groups(k); g++) unpack_group_ref(t, row, k, g, out + g);
}

#if defined(__x86_64__)
__attribute__((target("avx2,fma"))) static void unpack_row_avx2(const int8_type *t, const void *row, int64_t k,
                                                                 wgt_group *out) {
    for (int64_t g = 0; g < int8_groups(k); g++) unpack_group_avx2(t, row, k, g, out + g);
}

/* Group g of a stored row through group_avx512_levels() where it takes the type (a constant; 0 for none) and the
 * group's length (a constant 16 for whole groups keeps the vectors in registers), else through levels(). */
INLINE AVX512_BW void group_avx512_row(const int8_type *t, const int type, const void *row, int64_t k, int64_t g,
                                       wgt_group *o) {
    const int lanes = (int)(k - g * INT8_GROUP >= INT8_GROUP ? 16 : (k - g * INT8_GROUP) / 32);
    const int64_t per_group = legacy_type(type) ? 16 : type ? 2 : INT8_GROUP / t->block;
    const uint8_t *src = (const uint8_t *)row + g * per_group * t->block_bytes;   /* no division for known types */
    __m512i v[8];
    if (type && (lanes == 16 ? group_avx512_levels(type, src, 16, v, o) : group_avx512_levels(type, src, lanes, v, o))) {
        lanes_avx512(v);
        for (int j = 0; j < 8; j++) _mm512_store_si512(o->qs + 64 * j, v[j]);
    } else {
        unpack_group_avx512(t, row, k, g, o);
    }
}

/* The types group_avx512_levels() takes, with their split and mins flags: X(type, split, mins). */
#define AVX512_LEVEL_TYPES(X)                                                                               \
    X(DG_TYPE_Q8_0, 0, 0) X(DG_TYPE_Q4_0, 0, 0) X(DG_TYPE_Q4_1, 0, 1) X(DG_TYPE_Q5_0, 0, 0) X(DG_TYPE_Q5_1, 0, 1) \
    X(DG_TYPE_Q2_K, 1, 1) X(DG_TYPE_Q3_K, 1, 0) X(DG_TYPE_Q4_K, 0, 1) X(DG_TYPE_Q5_K, 0, 1) X(DG_TYPE_Q6_K, 1, 0)

INLINE AVX512_BW void unpack_row_typed(const int8_type *t, const int type, const void *row, int64_t k,
                                       wgt_group *out) {
    for (int64_t g = 0; g < int8_groups(k); g++) group_avx512_row(t, type, row, k, g, out + g);
}

AVX512_BW static void unpack_row_avx512(const int8_type *t, const void *row, int64_t k, wgt_group *out) {
#define UNPACK_CASE(TYPE, SPLIT, MINS) case TYPE: unpack_row_typed(t, TYPE, row, k, out); return;
    switch (t->type) { AVX512_LEVEL_TYPES(UNPACK_CASE) }
#undef UNPACK_CASE
    unpack_row_typed(t, 0, row, k, out);
}
#endif

/* ---- the reference kernel ---------------------------------------------------------------------------------- */

/* Sum over dwords j0..j1-1 of lane l: the integer products of one block (or half block). */
static int32_t lane_dot(const wgt_group *w, const act_group *x, int l, int j0, int j1) {
    int32_t s = 0;
    for (int j = j0; j < j1; j++)
        for (int i = 0; i < 4; i++) s += (int32_t)w->qs[64 * j + 4 * l + i] * (int32_t)x->qs[64 * j + 4 * l + i];
    return s;
}

static float dot_int8_ref(const wgt_group *w, const act_group *x, int64_t ng, const int8_type *t) {
    float acc[16] = {0};
    for (int64_t g = 0; g < ng; g++, w++, x++)
        for (int l = 0; l < 16; l++) {
            if (t->split) {
                acc[l] = dg_fmaf((float)(x->ia[l] + lane_dot(w, x, l, 0, 4)), w->sa[l] * x->d[l], acc[l]);
                acc[l] = dg_fmaf((float)(x->ib[l] + lane_dot(w, x, l, 4, 8)), w->sb[l] * x->d[l], acc[l]);
            } else {
                acc[l] = dg_fmaf((float)(x->ia[l] + lane_dot(w, x, l, 0, 8)), w->sa[l] * x->d[l], acc[l]);
            }
            if (t->mins) {
                acc[l] = dg_fmaf(x->ma[l], w->wa[l], acc[l]);
                if (t->split) acc[l] = dg_fmaf(x->mb[l], w->wb[l], acc[l]);
            }
        }
    return fold16(acc);
}

static void int8_tile_ref(float *out, int64_t ldo, const act_group *x, int64_t nt, const wgt_group *const *w, int nr,
                          int64_t k, const int8_type *t) {
    const int64_t ng = int8_groups(k);
    for (int64_t i = 0; i < nt; i++)
        for (int r = 0; r < nr; r++) out[i * ldo + r] = dot_int8_ref(w[r], x + i * ng, ng, t);
}

#if defined(__x86_64__)

/* ---- AVX-512 VNNI ---------------------------------------------------------------------------------------------
 * Tiles of 4 rows x TT tokens run over all groups at once: the 16 integer sums of a group in registers with 4
 * weight vectors and one activation vector, the 16 float accumulators in a 1 KB array that stays in L1 (a
 * 32 KB buffer of a whole row block's accumulators, swept group by group, took up to 35% more time; 4 x 3 tiles
 * with every accumulator in registers, 4 x 2 and 4 x 5 or 6 were slower too). Tokens go in chunks of TC (their
 * activations stay in L2); within a chunk each block of 4 rows (in L1) meets every token tile. The per-lane
 * order (groups ascending; halves, then mins) is the reference's. Padded rows and tokens repeat the last one
 * into accumulators of their own (never stored). */

enum { TR = 4, TT = 4, TC = 48 };

/* One group of a 4-row x tt-token tile (tt <= TT); acc[r * TT + i] is row r, token i. split and mins are
 * constants once inlined, and so is tt in the tiles. */
static inline __attribute__((always_inline, target("avx512f,avx512bw,avx512vl,avx512vnni"))) void group_avx512(
    __m512 *acc, const wgt_group *const *w, const act_group *const *x, const int tt, const int split,
    const int mins) {
    for (int half = 0; half <= split; half++) {
        const int j0 = split ? 4 * half : 0, j1 = split ? j0 + 4 : 8;
        __m512i c[TT][TR];
        for (int i = 0; i < tt; i++) {
            const __m512i init = _mm512_load_si512(half ? x[i]->ib : x[i]->ia);
            for (int r = 0; r < TR; r++) c[i][r] = init;
        }
        for (int j = j0; j < j1; j++) {
            __m512i wv[TR];
            for (int r = 0; r < TR; r++) wv[r] = _mm512_load_si512(w[r]->qs + 64 * j);
            for (int i = 0; i < tt; i++) {
                const __m512i xv = _mm512_load_si512(x[i]->qs + 64 * j);
                for (int r = 0; r < TR; r++) c[i][r] = _mm512_dpbusd_epi32(c[i][r], wv[r], xv);
            }
        }
        for (int i = 0; i < tt; i++) {
            const __m512 dx = _mm512_load_ps(x[i]->d);
            for (int r = 0; r < TR; r++) {
                const __m512 s = _mm512_mul_ps(_mm512_load_ps(half ? w[r]->sb : w[r]->sa), dx);
                acc[r * TT + i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(c[i][r]), s, acc[r * TT + i]);
            }
        }
    }
    if (mins)
        for (int half = 0; half <= split; half++)
            for (int i = 0; i < tt; i++) {
                const __m512 m = _mm512_load_ps(half ? x[i]->mb : x[i]->ma);
                for (int r = 0; r < TR; r++)
                    acc[r * TT + i] = _mm512_fmadd_ps(m, _mm512_load_ps(half ? w[r]->wb : w[r]->wa), acc[r * TT + i]);
            }
}

static inline __attribute__((always_inline, target("avx512f,avx512bw,avx512vl,avx512vnni"))) void tile_avx512(
    float *out, int64_t ldo, const act_group *x, int64_t nt, const wgt_group *const *w, int nr, int64_t ng,
    const int tt, const int split, const int mins) {
    for (int64_t t0 = 0; t0 < nt; t0 += TC) {
        const int tc = (int)(nt - t0 < TC ? nt - t0 : TC);
        for (int r0 = 0; r0 < nr; r0 += TR) {
            const wgt_group *wr[TR];
            for (int r = 0; r < TR; r++) wr[r] = w[r0 + r < nr ? r0 + r : nr - 1];
            for (int i0 = 0; i0 < tc; i0 += tt) {
                const act_group *xr[TT];
                for (int i = 0; i < tt; i++) xr[i] = x + (t0 + (i0 + i < tc ? i0 + i : tc - 1)) * ng;
                __m512 acc[TR * TT];
                for (int i = 0; i < TR * TT; i++) acc[i] = _mm512_setzero_ps();
                for (int64_t g = 0; g < ng; g++) {
                    const wgt_group *wg[TR];
                    const act_group *xg[TT];
                    for (int r = 0; r < TR; r++) wg[r] = wr[r] + g;
                    for (int i = 0; i < tt; i++) xg[i] = xr[i] + g;
                    group_avx512(acc, wg, xg, tt, split, mins);
                }
                store_tile_avx512(out + (t0 + i0) * ldo + r0, ldo, acc, tc - i0 < tt ? tc - i0 : tt, nr - r0);
            }
        }
    }
}

/* ---- paired rows: K <= 256 ----------------------------------------------------------------------------------
 * Such a row fills lanes 0-7 of its one group at most (an expert's down projection of width 256), so the tile
 * above spends half its multiply-adds and float steps on empty lanes. Here rows 2p and 2p + 1 of a 4-row block
 * share vectors: row 2p's lanes 0-7 in lanes 0-7, row 2p + 1's in lanes 8-15, against the activations' copy of
 * their lanes 0-7 in lanes 8-15 (pair_lanes). Each lane takes the reference's float steps (block terms from +0,
 * then the mins), plus the +0 its empty lanes 8-15 add in fold16's first step; the rest of fold16 runs in each
 * half. So the bits are the reference's. */

/* Lanes 0-7 of a, then lanes 0-7 of b. */
INLINE __attribute__((target("avx512f"))) __m512i merge_lo(const void *a, const void *b) {
    return _mm512_inserti64x4(_mm512_load_si512(a), _mm256_load_si256((const __m256i *)b), 1);
}

static inline __attribute__((always_inline, target("avx512f,avx512bw,avx512vl,avx512vnni"))) void pairs_avx512(
    float *out, int64_t ldo, const act_group *x, int64_t nt, const wgt_group *const *w, int nr, const int split,
    const int mins) {
    const __m512 zero = _mm512_setzero_ps();
    for (int64_t t0 = 0; t0 < nt; t0 += TC) {
        const int tc = (int)(nt - t0 < TC ? nt - t0 : TC);
        for (int r0 = 0; r0 < nr; r0 += TR) {
            const wgt_group *wr[TR];
            for (int r = 0; r < TR; r++) wr[r] = w[r0 + r < nr ? r0 + r : nr - 1];
            __m512 sa[2], sb[2], wa[2], wb[2];   /* the pairs' scales and mins (those the type has), merged alike */
            for (int p = 0; p < 2; p++) {
                const wgt_group *e = wr[2 * p], *o = wr[2 * p + 1];
                sa[p] = _mm512_castsi512_ps(merge_lo(e->sa, o->sa));
                if (split) sb[p] = _mm512_castsi512_ps(merge_lo(e->sb, o->sb));
                if (mins) wa[p] = _mm512_castsi512_ps(merge_lo(e->wa, o->wa));
                if (split && mins) wb[p] = _mm512_castsi512_ps(merge_lo(e->wb, o->wb));
            }
            for (int i0 = 0; i0 < tc; i0 += TT) {
                const act_group *xr[TT];
                for (int i = 0; i < TT; i++) xr[i] = x + t0 + (i0 + i < tc ? i0 + i : tc - 1);
                __m512 acc[2][TT];
                for (int half = 0; half <= split; half++) {
                    const int j0 = split ? 4 * half : 0, j1 = split ? j0 + 4 : 8;
                    __m512i c[TT][2];
                    for (int i = 0; i < TT; i++) c[i][0] = c[i][1] = _mm512_load_si512(half ? xr[i]->ib : xr[i]->ia);
                    for (int j = j0; j < j1; j++) {
                        const __m512i wv[2] = {merge_lo(wr[0]->qs + 64 * j, wr[1]->qs + 64 * j),
                                               merge_lo(wr[2]->qs + 64 * j, wr[3]->qs + 64 * j)};
                        for (int i = 0; i < TT; i++) {
                            const __m512i xv = _mm512_load_si512(xr[i]->qs + 64 * j);
                            for (int p = 0; p < 2; p++) c[i][p] = _mm512_dpbusd_epi32(c[i][p], wv[p], xv);
                        }
                    }
                    for (int i = 0; i < TT; i++) {
                        const __m512 dx = _mm512_load_ps(xr[i]->d);
                        for (int p = 0; p < 2; p++)
                            acc[p][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(c[i][p]),
                                                        _mm512_mul_ps(half ? sb[p] : sa[p], dx),
                                                        half ? acc[p][i] : zero);
                    }
                }
                for (int i = 0; i < TT; i++)
                    for (int p = 0; p < 2; p++) {
                        if (mins) {
                            acc[p][i] = _mm512_fmadd_ps(_mm512_load_ps(xr[i]->ma), wa[p], acc[p][i]);
                            if (split) acc[p][i] = _mm512_fmadd_ps(_mm512_load_ps(xr[i]->mb), wb[p], acc[p][i]);
                        }
                        acc[p][i] = _mm512_add_ps(acc[p][i], zero);   /* fold16's + lane 8 + h (+0) */
                    }
                /* fold16's distance-4 step, regrouped so that 128-bit lane c of u[q] is row q, token c */
                __m512 u[TR];
                for (int q = 0; q < TR; q++) {
                    const int p = q / 2;
                    const __m512 t01 = q % 2 ? _mm512_shuffle_f32x4(acc[p][0], acc[p][1], 0xee)
                                             : _mm512_shuffle_f32x4(acc[p][0], acc[p][1], 0x44);
                    const __m512 t23 = q % 2 ? _mm512_shuffle_f32x4(acc[p][2], acc[p][3], 0xee)
                                             : _mm512_shuffle_f32x4(acc[p][2], acc[p][3], 0x44);
                    u[q] = _mm512_add_ps(_mm512_shuffle_f32x4(t01, t23, 0x88), _mm512_shuffle_f32x4(t01, t23, 0xdd));
                }
                store_folded_avx512(out + (t0 + i0) * ldo + r0, ldo, u, tc - i0 < TT ? tc - i0 : TT, nr - r0);
            }
        }
    }
}

__attribute__((noinline, target("avx512f,avx512bw,avx512vl,avx512vnni"))) static void int8_pairs_avx512vnni(
    float *out, int64_t ldo, const act_group *x, int64_t nt, const wgt_group *const *w, int nr, const int8_type *t) {
    if (t->split && t->mins) pairs_avx512(out, ldo, x, nt, w, nr, 1, 1);
    else if (t->split) pairs_avx512(out, ldo, x, nt, w, nr, 1, 0);
    else if (t->mins) pairs_avx512(out, ldo, x, nt, w, nr, 0, 1);
    else pairs_avx512(out, ldo, x, nt, w, nr, 0, 0);
}

/* One build per type shape. Fewer tokens than a tile are padded (matmul sends them to the rows path below). */
__attribute__((noinline, target("avx512f,avx512bw,avx512vl,avx512vnni"))) static void int8_tile_avx512vnni(
    float *out, int64_t ldo, const act_group *x, int64_t nt, const wgt_group *const *w, int nr, int64_t k,
    const int8_type *t) {
    const int64_t ng = int8_groups(k);
    if (k <= INT8_GROUP / 2) int8_pairs_avx512vnni(out, ldo, x, nt, w, nr, t);
    else if (t->split && t->mins) tile_avx512(out, ldo, x, nt, w, nr, ng, TT, 1, 1);
    else if (t->split) tile_avx512(out, ldo, x, nt, w, nr, ng, TT, 1, 0);
    else if (t->mins) tile_avx512(out, ldo, x, nt, w, nr, ng, TT, 0, 1);
    else tile_avx512(out, ldo, x, nt, w, nr, ng, TT, 0, 0);
}

/* Few tokens straight from the stored rows: each group of 4 rows is unpacked into L1 just before its dot products
 * (no row buffer), and the same group steps as the tiles above run on its 1-3 tokens. type is a constant: one
 * of the types group_avx512_levels() takes, or 0 for any type through unpack_group_avx512. */
static inline __attribute__((always_inline, target("avx512f,avx512bw,avx512vl,avx512vnni"))) void rows_avx512(
    float *out, int64_t ldo, const act_group *x, const int nt, const void *rows, size_t row_bytes, int nr,
    int64_t k, const int8_type *t, const int type, const int split, const int mins) {
    const int64_t ng = int8_groups(k);
    wgt_group w[TR];
    const wgt_group *wg[TR] = {&w[0], &w[1], &w[2], &w[3]};
    for (int r0 = 0; r0 < nr; r0 += TR) {
        const char *src[TR];
        for (int r = 0; r < TR; r++)   /* past the end: the last row again, never stored */
            src[r] = (const char *)rows + (size_t)(r0 + r < nr ? r0 + r : nr - 1) * row_bytes;
        __m512 acc[TR * TT];
        for (int i = 0; i < TR * TT; i++) acc[i] = _mm512_setzero_ps();
        for (int64_t g = 0; g < ng; g++) {
            const act_group *xg[TT];
            for (int i = 0; i < nt; i++) xg[i] = x + i * ng + g;
            for (int r = 0; r < TR; r++) group_avx512_row(t, type, src[r], k, g, &w[r]);
            group_avx512(acc, wg, xg, nt, split, mins);
        }
        store_tile_avx512(out + r0, ldo, acc, nt, nr - r0);
    }
}

__attribute__((noinline, target("avx512f,avx512bw,avx512vl,avx512vnni"))) static void int8_rows_avx512vnni(
    float *out, int64_t ldo, const act_group *x, int64_t nt, const void *rows, size_t row_bytes, int nr,
    int64_t k, const int8_type *t) {
/* one token (a constant, which keeps the integer sums in registers) or a few */
#define ROWS(TYPE, SPLIT, MINS)                                                                                 \
    (nt == 1 ? rows_avx512(out, ldo, x, 1, rows, row_bytes, nr, k, t, TYPE, SPLIT, MINS)                         \
             : rows_avx512(out, ldo, x, (int)nt, rows, row_bytes, nr, k, t, TYPE, SPLIT, MINS))
#define ROWS_CASE(TYPE, SPLIT, MINS) case TYPE: ROWS(TYPE, SPLIT, MINS); return;
    switch (t->type) { AVX512_LEVEL_TYPES(ROWS_CASE) }
#undef ROWS_CASE
#undef ROWS
    /* every int8 type has a case above; a type without one would still get the right sums, one generic build */
    rows_avx512(out, ldo, x, (int)nt, rows, row_bytes, nr, k, t, 0, t->split, t->mins);
}

/* ---- AVX2: 2 rows x 2 tokens, a group as two 8-lane halves (lanes 0-7, 8-15) ---------------------------------
 * u8 x s8 products are summed in pairs into 16 bits (maddubs), then into 32-bit lanes (madd with ones). A pair
 * of levels <= 63 against |qx| <= 127 stays below 2^15; the wide type (Q8_0, levels to 255) splits each level
 * into its low 7 bits and its top bit. The lanes come out in the same order as the AVX-512 kernel's, and the
 * float steps are the same, so the results are the same. */

__attribute__((target("avx2,fma"))) static __m256i dot4_avx2(__m256i w, __m256i x, int wide) {
    const __m256i ones = _mm256_set1_epi16(1);
    if (!wide) return _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), ones);
    const __m256i low = _mm256_and_si256(w, _mm256_set1_epi8(0x7f));
    const __m256i top = _mm256_and_si256(_mm256_srli_epi16(w, 7), _mm256_set1_epi8(1));
    return _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(low, x), ones),
                            _mm256_madd_epi16(_mm256_maddubs_epi16(top, x), _mm256_set1_epi16(128)));
}

__attribute__((target("avx2,fma"))) static float fold16_avx2(__m256 lo, __m256 hi) {
    __m256 h8 = _mm256_add_ps(lo, hi);
    __m128 h4 = _mm_add_ps(_mm256_castps256_ps128(h8), _mm256_extractf128_ps(h8, 1));
    __m128 h2 = _mm_add_ps(h4, _mm_movehl_ps(h4, h4));
    return _mm_cvtss_f32(_mm_add_ss(h2, _mm_movehdup_ps(h2)));
}

#define UR 2
#define UT 2

__attribute__((target("avx2,fma"))) static void int8_tile_avx2(
    float *out, int64_t ldo, const act_group *x, int64_t nt, const wgt_group *const *w, int nr, int64_t k,
    const int8_type *t) {
    const int64_t ng = int8_groups(k);
    for (int r0 = 0; r0 < nr; r0 += UR) {
        const wgt_group *ws[UR];
        for (int r = 0; r < UR; r++) ws[r] = w[r0 + r < nr ? r0 + r : nr - 1];
        for (int64_t t0 = 0; t0 < nt; t0 += UT) {
            const act_group *xs[UT];
            for (int i = 0; i < UT; i++) xs[i] = x + (t0 + i < nt ? t0 + i : nt - 1) * ng;
            __m256 acc[UT][UR][2];
            for (int i = 0; i < UT; i++)
                for (int r = 0; r < UR; r++) acc[i][r][0] = acc[i][r][1] = _mm256_setzero_ps();
            for (int64_t g = 0; g < ng; g++)
                for (int q = 0; q < 2; q++) {       /* lanes 8q .. 8q + 7 */
                    for (int half = 0; half < 1 + t->split; half++) {
                        const int j0 = t->split ? 4 * half : 0, j1 = t->split ? j0 + 4 : 8;
                        __m256i c[UT][UR];
                        for (int i = 0; i < UT; i++) {
                            const __m256i init = _mm256_load_si256((const __m256i *)((half ? xs[i][g].ib : xs[i][g].ia) + 8 * q));
                            for (int r = 0; r < UR; r++) c[i][r] = init;
                        }
                        for (int j = j0; j < j1; j++) {
                            __m256i wv[UR];
                            for (int r = 0; r < UR; r++) wv[r] = _mm256_load_si256((const __m256i *)(ws[r][g].qs + 64 * j + 32 * q));
                            for (int i = 0; i < UT; i++) {
                                const __m256i xv = _mm256_load_si256((const __m256i *)(xs[i][g].qs + 64 * j + 32 * q));
                                for (int r = 0; r < UR; r++) c[i][r] = _mm256_add_epi32(c[i][r], dot4_avx2(wv[r], xv, t->wide));
                            }
                        }
                        for (int i = 0; i < UT; i++) {
                            const __m256 dx = _mm256_load_ps(xs[i][g].d + 8 * q);
                            for (int r = 0; r < UR; r++) {
                                const __m256 s = _mm256_mul_ps(_mm256_load_ps((half ? ws[r][g].sb : ws[r][g].sa) + 8 * q), dx);
                                acc[i][r][q] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(c[i][r]), s, acc[i][r][q]);
                            }
                        }
                    }
                    if (t->mins)
                        for (int half = 0; half < 1 + t->split; half++)
                            for (int i = 0; i < UT; i++) {
                                const __m256 m = _mm256_load_ps((half ? xs[i][g].mb : xs[i][g].ma) + 8 * q);
                                for (int r = 0; r < UR; r++)
                                    acc[i][r][q] = _mm256_fmadd_ps(m, _mm256_load_ps((half ? ws[r][g].wb : ws[r][g].wa) + 8 * q),
                                                                   acc[i][r][q]);
                            }
                }
            for (int i = 0; i < UT && t0 + i < nt; i++)
                for (int r = 0; r < UR && r0 + r < nr; r++)
                    out[(t0 + i) * ldo + r0 + r] = fold16_avx2(acc[i][r][0], acc[i][r][1]);
        }
    }
}
#endif

const int8_kernel INT8_REFERENCE = {int8_tile_ref, unpack_row_ref, quantize_row_ref, NULL};
#if defined(__x86_64__)
const int8_kernel INT8_AVX2 = {int8_tile_avx2, unpack_row_avx2, quantize_row_avx2, NULL};
const int8_kernel INT8_AVX512VNNI = {int8_tile_avx512vnni, unpack_row_avx512, quantize_row_avx512,
                                     int8_rows_avx512vnni};
#endif
