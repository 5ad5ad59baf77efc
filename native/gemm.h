/* gemm.h: the matmul inner kernels (native/gemm.c: float activations; native/gemm_int8.c: int8 activations),
 * internal to the native library. */
#ifndef DGGUF_GEMM_H
#define DGGUF_GEMM_H

#include <stdint.h>

#include "dgguf.h"

/* out[t * ldo + r] = x[t, :] . w[r][:] for t < nt, r < nr (nr <= 4), rows and tokens k floats long. */
typedef void (*tile_fn)(float *out, int64_t ldo, const float *x, int64_t nt, const float *const *w, int nr,
                        int64_t k);

/* The soft embedding's block of vocabulary rows: the axpy functions below take nv <= SOFT_BLOCK rows. */
enum { SOFT_BLOCK = 128 };

/* acc[t * h + i] += sum over v < nv (ascending) of p[t * nv + v] * w[v * h + i], in double, t < nt, i < h.
 * scratch: SOFT_BLOCK * h floats the function may use (the AVX2 kernel's copy of the block). */
typedef void (*axpy_fn)(double *acc, const float *p, const float *w, int64_t nt, int64_t nv, int64_t h,
                        float *scratch);

/* acc[t * h + i] += float sum over word m < np (ascending) of the bfloat16 pairs p[t * np + m] . w[m * h + i]
 * (gemm.c: "soft-embedding accumulation in bfloat16 pairs"), t < nt, i < h. */
typedef void (*axpy_bf16_fn)(double *acc, const uint32_t *p, const uint32_t *w, int64_t nt, int64_t np, int64_t h);
/* out[i] = bf16(even[i]) | bf16(odd[i]) << 16 (odd NULL: 0), i < n: rows 2m and 2m + 1 as words. */
void pack_bf16_rows(uint32_t *out, const float *even, const float *odd, int64_t n);
/* out[m] = bf16(x[2m]) | bf16(x[2m + 1]) << 16, m < ceil(n / 2) (a missing odd value is 0). */
void pack_bf16_pairs(uint32_t *out, const float *x, int64_t n);

/* y[i] += a * x[i], i < n. */
typedef void (*axpy_f32_fn)(float *y, float a, const float *x, int64_t n);

/* The reference dot product (8 lanes, fixed order). */
float dot_ref(const float *a, const float *b, int64_t n);

/* ---- int8 activations against quantized weights (gemm_int8.c) ----------------------------------------------
 * K values are cut into groups of 512 (16 blocks of 32, the last group zero-padded), stored lane per block: byte
 * 64 j + 4 L + i of a group is value 4 j + i of block L. */
enum { INT8_GROUP = 512, INT8_ROWS = 32 };

/* One group of a quantized activation row: int8 values, the scale of each block, and the terms of the weight
 * type's offset (ia, ib: -zero * sum of qx over the block or its two halves) and mins (ma, mb: dx * sum qx). */
typedef struct {
    _Alignas(64) int8_t qs[INT8_GROUP];
    float d[16];
    int32_t ia[16], ib[16];
    float ma[16], mb[16];
} act_group;

/* One group of an unpacked weight row: unsigned levels, scales per block (sa) or per half block (sa, sb), mins. */
typedef struct {
    _Alignas(64) uint8_t qs[INT8_GROUP];
    float sa[16], sb[16];
    float wa[16], wb[16];
} wgt_group;

typedef struct int8_type int8_type;

/* The integer view of a stored type, or NULL when the type has none (F32, F16, BF16). */
const int8_type *int8_type_of(int type);
int64_t int8_groups(int64_t k);

/* One stored row of k values into int8_groups(k) groups. */
typedef void (*int8_unpack_fn)(const int8_type *t, const void *row, int64_t k, wgt_group *out);
/* One token's k floats into int8_groups(k) groups, with the terms type t needs. */
typedef void (*int8_quantize_fn)(const int8_type *t, const float *x, int64_t k, act_group *out);
/* out[i * ldo + r] = x[i] . w[r] for i < nt tokens, r < nr (nr <= INT8_ROWS) unpacked rows, k values each
 * (int8_groups(k) groups). */
typedef void (*int8_tile_fn)(float *out, int64_t ldo, const act_group *x, int64_t nt, const wgt_group *const *w,
                             int nr, int64_t k, const int8_type *t);

/* The tile's results for nt < INT8_FEW tokens straight from nr (<= INT8_ROWS) stored rows, row_bytes apart, of
 * k values each: no row buffer. */
typedef void (*int8_rows_fn)(float *out, int64_t ldo, const act_group *x, int64_t nt, const void *rows,
                             size_t row_bytes, int nr, int64_t k, const int8_type *t);
enum { INT8_FEW = 4 };   /* nt fits one AVX-512 tile of 4 tokens */

/* One instruction set's int8 functions; every one gives the reference's bits. rows may be NULL (unpack, then
 * tile). */
typedef struct {
    int8_tile_fn tile;
    int8_unpack_fn unpack;
    int8_quantize_fn quantize;
    int8_rows_fn rows;
} int8_kernel;

extern const int8_kernel INT8_REFERENCE;
#if defined(__x86_64__)
extern const int8_kernel INT8_AVX2, INT8_AVX512VNNI;
#endif

/* The fixed 16-lane fold the int8 and bfloat16 tiles end with: (a[0..7] + a[8..15]), then halves down to one
 * float. */
float fold16(const float *a);

/* ---- bfloat16 activations against BF16 weights (gemm.c) ---------------------------------------------------
 * A stored BF16 row already is bfloat16 pairs (word m: value 2m low, 2m + 1 high); the activations are rounded
 * to the same pairs once per matmul (pack_bf16_pairs). Each output sums its words in 16 float lanes as VDPBF16PS
 * does (lane m % 16 takes word m; denormal inputs read as zero, the odd product added before the even one, each
 * sum rounded with denormal results flushed to zero; zero words past the row up to a multiple of 16), then
 * fold16. out[i * ldo + r] = x[i] . w[r] for i < nt tokens, r < nr (<= INT8_ROWS) rows of np words. */
typedef void (*bf16_tile_fn)(float *out, int64_t ldo, const uint32_t *x, int64_t nt, const uint32_t *const *w,
                             int nr, int64_t np);
/* The active kernel's, or NULL: BF16 weights go through the float tile. */
bf16_tile_fn matmul_bf16(void);

#if defined(__x86_64__)
#include <immintrin.h>

/* The end of fold16 for a 4-row x 4-token tile at once, from u[q] holding row q's partial sums after the
 * distance-8 and distance-4 steps in 128-bit lane c for token c: the distance-2 and distance-1 steps for all 16
 * outputs (the reference's pairs, so its bits), stored as tokens' rows of 4 (nt, nr <= 4 of them). */
static inline __attribute__((always_inline, target("avx512f,avx512vl"))) void store_folded_avx512(
    float *out, int64_t ldo, const __m512 *u, int nt, int nr) {
    __m512 w[2];
    for (int m = 0; m < 2; m++)
        w[m] = _mm512_add_ps(_mm512_shuffle_ps(u[2 * m], u[2 * m + 1], 0x44),
                             _mm512_shuffle_ps(u[2 * m], u[2 * m + 1], 0xee));
    float f[16] __attribute__((aligned(64)));   /* lane 4 i + r: row r, token i */
    _mm512_store_ps(f, _mm512_add_ps(_mm512_shuffle_ps(w[0], w[1], 0x88), _mm512_shuffle_ps(w[0], w[1], 0xdd)));
    const __mmask8 rows = (__mmask8)((1u << (nr < 4 ? nr : 4)) - 1);
    for (int i = 0; i < nt; i++) _mm_mask_storeu_ps(out + i * ldo, rows, _mm_load_ps(f + 4 * i));
}

/* fold16 of the 16 accumulators of a 4-row x 4-token tile (acc[4 * r + i]) at once, each step one pair of
 * shuffles and an add for all of them, then stored. One output at a time, the folds and scattered stores took a
 * quarter of a K = 256 int8 matmul. */
static inline __attribute__((always_inline, target("avx512f,avx512vl"))) void store_tile_avx512(
    float *out, int64_t ldo, const __m512 *acc, int nt, int nr) {
    __m512 s[8], u[4];
    for (int p = 0; p < 8; p++)
        s[p] = _mm512_add_ps(_mm512_shuffle_f32x4(acc[2 * p], acc[2 * p + 1], 0x44),
                             _mm512_shuffle_f32x4(acc[2 * p], acc[2 * p + 1], 0xee));
    for (int q = 0; q < 4; q++)   /* 128-bit lane c of u[q]: accumulator 4 q + c */
        u[q] = _mm512_add_ps(_mm512_shuffle_f32x4(s[2 * q], s[2 * q + 1], 0x88),
                             _mm512_shuffle_f32x4(s[2 * q], s[2 * q + 1], 0xdd));
    store_folded_avx512(out, ldo, u, nt, nr);
}
#endif

/* The active kernels. */
tile_fn matmul_tile(void);
/* NULL when the active kernel keeps float activations for every weight type. */
const int8_kernel *matmul_int8(void);
axpy_fn soft_embed_axpy(void);
/* NULL when the active kernel keeps the soft embedding in float. */
axpy_bf16_fn soft_embed_bf16(void);
axpy_f32_fn attention_axpy(void);

#endif
