/* gemm.c: the float matmul inner kernel, out[t, r] = x[t, :] . w[r, :] over a block of weight rows already in
 * float32, and the kernel table (which adds the int8-activation kernels of gemm_int8.c). Three float variants:
 * the plain reference (dot_ref's 8 lanes), AVX2+FMA and AVX-512. The SIMD kernels compute a tile of 4 rows x
 * 4 tokens with one vector accumulator per output over the row length, so each output depends only on its own row and token: results do not depend on how rows
 * are split across threads or grouped into tiles. Variants differ from each other in the last bits (fused
 * multiply-add, lane order); tests hold every variant to the same bounds against transformers.
 */
#include <float.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gemm.h"
#include "quant_internal.h"   /* DG_CLONES */

/* ---- reference --------------------------------------------------------------------------------------- */

/* Eight independent float lanes, added pairwise at the end: a fixed order the compiler can vectorise. */
float dot_ref(const float *a, const float *b, int64_t n) {
    float acc[8] = {0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++) acc[j] += a[i + j] * b[i + j];
    for (int j = 0; i < n; i++, j++) acc[j] += a[i] * b[i];
    return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

float fold16(const float *a) {
    float h[8];
    for (int i = 0; i < 8; i++) h[i] = a[i] + a[i + 8];
    for (int i = 0; i < 4; i++) h[i] = h[i] + h[i + 4];
    for (int i = 0; i < 2; i++) h[i] = h[i] + h[i + 2];
    return h[0] + h[1];
}

static void tile_ref(float *out, int64_t ldo, const float *x, int64_t nt, const float *const *w, int nr,
                     int64_t k) {
    for (int64_t t = 0; t < nt; t++)
        for (int r = 0; r < nr; r++) out[t * ldo + r] = dot_ref(x + t * k, w[r], k);
}

#if defined(__x86_64__)
#include <immintrin.h>

/* ---- AVX-512: 4 rows x 4 tokens, 16 lanes, masked tail ------------------------------------------------ */

__attribute__((target("avx512f"))) static void tile_avx512(float *out, int64_t ldo, const float *x, int64_t nt,
                                                           const float *const *w, int nr, int64_t k) {
    for (int64_t t0 = 0; t0 < nt; t0 += 4) {
        /* Rows and tokens past the end repeat the last one; their results are not stored. */
        const float *xs[4], *ws[4];
        for (int i = 0; i < 4; i++) {
            xs[i] = x + (t0 + i < nt ? t0 + i : nt - 1) * k;
            ws[i] = w[i < nr ? i : nr - 1];
        }
        __m512 acc[4][4];
        for (int i = 0; i < 4; i++)
            for (int r = 0; r < 4; r++) acc[i][r] = _mm512_setzero_ps();
        int64_t c = 0;
        for (; c + 16 <= k; c += 16) {
            __m512 wv[4];
            for (int r = 0; r < 4; r++) wv[r] = _mm512_loadu_ps(ws[r] + c);
            for (int i = 0; i < 4; i++) {
                __m512 xv = _mm512_loadu_ps(xs[i] + c);
                for (int r = 0; r < 4; r++) acc[i][r] = _mm512_fmadd_ps(xv, wv[r], acc[i][r]);
            }
        }
        if (c < k) {
            __mmask16 m = (__mmask16)((1u << (k - c)) - 1);
            __m512 wv[4];
            for (int r = 0; r < 4; r++) wv[r] = _mm512_maskz_loadu_ps(m, ws[r] + c);
            for (int i = 0; i < 4; i++) {
                __m512 xv = _mm512_maskz_loadu_ps(m, xs[i] + c);
                for (int r = 0; r < 4; r++) acc[i][r] = _mm512_fmadd_ps(xv, wv[r], acc[i][r]);
            }
        }
        for (int i = 0; i < 4 && t0 + i < nt; i++)
            for (int r = 0; r < nr; r++) out[(t0 + i) * ldo + r] = _mm512_reduce_add_ps(acc[i][r]);
    }
}

/* ---- AVX2 + FMA: 2 rows x 4 tokens (16 ymm registers), 8 lanes, masked tail --------------------------- */

__attribute__((target("avx2,fma"))) static float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

__attribute__((target("avx2,fma"))) static void tile_avx2(float *out, int64_t ldo, const float *x, int64_t nt,
                                                          const float *const *w, int nr, int64_t k) {
    static const int32_t lanes[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
    for (int r0 = 0; r0 < nr; r0 += 2) {
        const float *ws[2] = {w[r0], w[r0 + 1 < nr ? r0 + 1 : r0]};
        for (int64_t t0 = 0; t0 < nt; t0 += 4) {
            const float *xs[4];
            for (int i = 0; i < 4; i++) xs[i] = x + (t0 + i < nt ? t0 + i : nt - 1) * k;
            __m256 acc[4][2];
            for (int i = 0; i < 4; i++) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
            int64_t c = 0;
            for (; c + 8 <= k; c += 8) {
                __m256 w0 = _mm256_loadu_ps(ws[0] + c), w1 = _mm256_loadu_ps(ws[1] + c);
                for (int i = 0; i < 4; i++) {
                    __m256 xv = _mm256_loadu_ps(xs[i] + c);
                    acc[i][0] = _mm256_fmadd_ps(xv, w0, acc[i][0]);
                    acc[i][1] = _mm256_fmadd_ps(xv, w1, acc[i][1]);
                }
            }
            if (c < k) {
                __m256i m = _mm256_loadu_si256((const __m256i *)(lanes + 8 - (k - c)));
                __m256 w0 = _mm256_maskload_ps(ws[0] + c, m), w1 = _mm256_maskload_ps(ws[1] + c, m);
                for (int i = 0; i < 4; i++) {
                    __m256 xv = _mm256_maskload_ps(xs[i] + c, m);
                    acc[i][0] = _mm256_fmadd_ps(xv, w0, acc[i][0]);
                    acc[i][1] = _mm256_fmadd_ps(xv, w1, acc[i][1]);
                }
            }
            for (int i = 0; i < 4 && t0 + i < nt; i++)
                for (int r = 0; r < 2 && r0 + r < nr; r++) out[(t0 + i) * ldo + r0 + r] = hsum256(acc[i][r]);
        }
    }
}
#endif

/* ---- soft-embedding accumulation: acc[t][h] += sum_v p[t][v] * w[v][h], v ascending ------------------------
 * The reference accumulates every product in double (a float times a float is exact there). */

/* Columns [h0, h) of the accumulation; the SIMD variant hands its tail columns here. */
static void axpy_cols(double *acc, const float *p, const float *w, int64_t nt, int64_t nv, int64_t h0, int64_t h) {
    for (int64_t t = 0; t < nt; t++)
        for (int64_t v = 0; v < nv; v++) {
            const double pv = p[t * nv + v];
            for (int64_t i = h0; i < h; i++) acc[t * h + i] += pv * (double)w[v * h + i];
        }
}

static void axpy_ref(double *acc, const float *p, const float *w, int64_t nt, int64_t nv, int64_t h, float *scratch) {
    axpy_cols(acc, p, w, nt, nv, 0, h);
}

#if defined(__x86_64__)
/* 6 tokens x 32 columns: the block's products are summed in float (12 zmm accumulators, fused multiply-adds,
 * v ascending) and each block sum is then added to the double accumulator. Blocks are at most SOFT_BLOCK rows,
 * so the float partial sums stay short; this differs from the reference in the last bits only. */
/* d[0..15] += s, widened to double: a block's float sums into the double accumulator. */
static inline __attribute__((always_inline, target("avx512f"))) void add_block_sum(double *d, __m512 s) {
    _mm512_storeu_pd(d, _mm512_add_pd(_mm512_loadu_pd(d), _mm512_cvtps_pd(_mm512_castps512_ps256(s))));
    _mm512_storeu_pd(d + 8, _mm512_add_pd(_mm512_loadu_pd(d + 8),
                                          _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(s), 1)))));
}

__attribute__((target("avx512f"))) static void axpy_avx512(double *acc, const float *p, const float *w,
                                                           int64_t nt, int64_t nv, int64_t h, float *scratch) {
    enum { TT = 6 };
    const int64_t hv = h / 32 * 32;
    for (int64_t t0 = 0; t0 < nt; t0 += TT) {
        int64_t ts[TT];
        for (int i = 0; i < TT; i++) ts[i] = t0 + i < nt ? t0 + i : t0;
        for (int64_t c = 0; c < hv; c += 32) {
            __m512 a[TT][2];
            for (int i = 0; i < TT; i++) a[i][0] = a[i][1] = _mm512_setzero_ps();
            for (int64_t v = 0; v < nv; v++) {
                const float *wr = w + v * h + c;
                const __m512 w0 = _mm512_loadu_ps(wr), w1 = _mm512_loadu_ps(wr + 16);
                for (int i = 0; i < TT; i++) {
                    const __m512 pv = _mm512_set1_ps(p[ts[i] * nv + v]);
                    a[i][0] = _mm512_fmadd_ps(pv, w0, a[i][0]);
                    a[i][1] = _mm512_fmadd_ps(pv, w1, a[i][1]);
                }
            }
            for (int i = 0; i < TT && t0 + i < nt; i++)
                for (int q = 0; q < 2; q++) add_block_sum(acc + ts[i] * h + c + 16 * q, a[i][q]);
        }
    }
    if (hv < h) axpy_cols(acc, p, w, nt, nv, hv, h);
}
#endif

#if defined(__x86_64__)
/* AVX2: the same float block sums as axpy_avx512, column for column (each column's products are fused into its
 * own float sum, v ascending, then added to the double accumulator), so the two kernels give the same bits;
 * 6 tokens x 16 columns at a time (12 ymm accumulators), the columns past the last multiple of 32 in
 * axpy_cols as axpy_avx512 does. The block is first copied into scratch as 16-column strips, each [nv][16]
 * contiguous: read in place, a strip's lines sit h floats apart, which at h = 1024 or 2816 maps them to 1-4 of
 * L1's 64 sets, so every token group would fetch them again (1.5x slower at h = 2816, 64 tokens, this
 * Zen 3). Tokens go in the outer loop, so a group's accumulator rows stream along the columns. */
static inline __attribute__((always_inline, target("avx2,fma"))) void add_block_sum8(double *d, __m256 s) {
    _mm256_storeu_pd(d, _mm256_add_pd(_mm256_loadu_pd(d), _mm256_cvtps_pd(_mm256_castps256_ps128(s))));
    _mm256_storeu_pd(d + 4, _mm256_add_pd(_mm256_loadu_pd(d + 4), _mm256_cvtps_pd(_mm256_extractf128_ps(s, 1))));
}

__attribute__((target("avx2,fma"))) static void axpy_avx2(double *acc, const float *p, const float *w, int64_t nt,
                                                         int64_t nv, int64_t h, float *strips) {
    enum { TT = 6 };
    const int64_t hv = h / 32 * 32;
    for (int64_t v = 0; v < nv; v++)
        for (int64_t c = 0; c < hv; c += 16) {
            float *d = strips + c * nv + v * 16;
            _mm256_storeu_ps(d, _mm256_loadu_ps(w + v * h + c));
            _mm256_storeu_ps(d + 8, _mm256_loadu_ps(w + v * h + c + 8));
        }
    for (int64_t t0 = 0; t0 < nt; t0 += TT) {
        int64_t ts[TT];
        for (int i = 0; i < TT; i++) ts[i] = t0 + i < nt ? t0 + i : t0;
        for (int64_t c = 0; c < hv; c += 16) {
            const float *strip = strips + c * nv;
            __m256 a[TT][2];
            for (int i = 0; i < TT; i++) a[i][0] = a[i][1] = _mm256_setzero_ps();
            for (int64_t v = 0; v < nv; v++) {
                const __m256 w0 = _mm256_loadu_ps(strip + v * 16), w1 = _mm256_loadu_ps(strip + v * 16 + 8);
                for (int i = 0; i < TT; i++) {
                    const __m256 pv = _mm256_broadcast_ss(p + ts[i] * nv + v);
                    a[i][0] = _mm256_fmadd_ps(pv, w0, a[i][0]);
                    a[i][1] = _mm256_fmadd_ps(pv, w1, a[i][1]);
                }
            }
            for (int i = 0; i < TT && t0 + i < nt; i++)
                for (int q = 0; q < 2; q++) add_block_sum8(acc + ts[i] * h + c + 8 * q, a[i][q]);
        }
    }
    if (hv < h) axpy_cols(acc, p, w, nt, nv, hv, h);
}
#endif

/* ---- soft-embedding accumulation in bfloat16 pairs ---------------------------------------------------------
 * The int8 kernels' path for quantized embeddings: probabilities and weights rounded to bfloat16 (round to
 * nearest even, denormals to zero, as VCVTNEPS2BF16 does), two vocabulary rows v = 2m, 2m + 1 per 32-bit word
 * (low half even). Products of two bfloat16 values are exact in float; per word the odd product is added before
 * the even one (VDPBF16PS's order), each sum rounded to float with denormal results flushed to zero; pairs go in
 * ascending order and each block's float sum is added to the double accumulator. */

static inline uint32_t bf16_bits(float x) {
    uint32_t b;
    memcpy(&b, &x, 4);
    const uint32_t e = b & 0x7f800000u;
    if (e == 0) return (b >> 16) & 0x8000u;                       /* zero or denormal: signed zero */
    if (e == 0x7f800000u && (b & 0x7fffffu)) return (b >> 16) | 0x40u;   /* NaN stays a (quiet) NaN */
    return (b + 0x7fffu + ((b >> 16) & 1u)) >> 16;
}

DG_CLONES
void pack_bf16_rows(uint32_t *out, const float *even, const float *odd, int64_t n) {
    for (int64_t i = 0; i < n; i++) out[i] = bf16_bits(even[i]) | (odd ? bf16_bits(odd[i]) << 16 : 0u);
}

DG_CLONES
void pack_bf16_pairs(uint32_t *out, const float *x, int64_t n) {
    for (int64_t m = 0; m < n / 2; m++) out[m] = bf16_bits(x[2 * m]) | bf16_bits(x[2 * m + 1]) << 16;
    if (n % 2) out[n / 2] = bf16_bits(x[n - 1]);
}

static inline float bf16_lo(uint32_t w) { uint32_t b = w << 16; float f; memcpy(&f, &b, 4); return f; }
static inline float bf16_hi(uint32_t w) { uint32_t b = w & 0xffff0000u; float f; memcpy(&f, &b, 4); return f; }
static inline float ftz(float x) { return fabsf(x) < FLT_MIN ? copysignf(0.0f, x) : x; }

static void axpy_bf16_cols(double *acc, const uint32_t *p, const uint32_t *w, int64_t nt, int64_t np, int64_t h0,
                           int64_t h) {
    for (int64_t t = 0; t < nt; t++)
        for (int64_t i = h0; i < h; i++) {
            float s = 0.0f;
            for (int64_t m = 0; m < np; m++) {
                const uint32_t a = p[t * np + m], b = w[m * h + i];
                s = ftz(s + bf16_hi(a) * bf16_hi(b));
                s = ftz(s + bf16_lo(a) * bf16_lo(b));
            }
            acc[t * h + i] += s;
        }
}

static void axpy_bf16_ref(double *acc, const uint32_t *p, const uint32_t *w, int64_t nt, int64_t np, int64_t h) {
    axpy_bf16_cols(acc, p, w, nt, np, 0, h);
}

#if defined(__x86_64__)
/* 6 tokens x 32 columns, as axpy_avx512, one VDPBF16PS per pair of rows. */
__attribute__((target("avx512f,avx512bf16"))) static void axpy_bf16_avx512(double *acc, const uint32_t *p,
                                                                           const uint32_t *w, int64_t nt,
                                                                           int64_t np, int64_t h) {
    enum { TT = 6 };
    const int64_t hv = h / 32 * 32;
    for (int64_t t0 = 0; t0 < nt; t0 += TT) {
        int64_t ts[TT];
        for (int i = 0; i < TT; i++) ts[i] = t0 + i < nt ? t0 + i : t0;
        for (int64_t c = 0; c < hv; c += 32) {
            __m512 a[TT][2];
            for (int i = 0; i < TT; i++) a[i][0] = a[i][1] = _mm512_setzero_ps();
            for (int64_t m = 0; m < np; m++) {
                const uint32_t *wr = w + m * h + c;
                const __m512bh w0 = (__m512bh)_mm512_loadu_si512(wr), w1 = (__m512bh)_mm512_loadu_si512(wr + 16);
                for (int i = 0; i < TT; i++) {
                    const __m512bh pv = (__m512bh)_mm512_set1_epi32((int)p[ts[i] * np + m]);
                    a[i][0] = _mm512_dpbf16_ps(a[i][0], pv, w0);
                    a[i][1] = _mm512_dpbf16_ps(a[i][1], pv, w1);
                }
            }
            for (int i = 0; i < TT && t0 + i < nt; i++)
                for (int q = 0; q < 2; q++) add_block_sum(acc + ts[i] * h + c + 16 * q, a[i][q]);
        }
    }
    if (hv < h) axpy_bf16_cols(acc, p, w, nt, np, hv, h);
}
#endif

/* ---- bfloat16 matmul of BF16 weights (gemm.h) ---------------------------------------------------------- */

static void tile_bf16_ref(float *out, int64_t ldo, const uint32_t *x, int64_t nt, const uint32_t *const *w, int nr,
                          int64_t np) {
    const int64_t padded = (np + 15) / 16 * 16;
    for (int64_t t = 0; t < nt; t++)
        for (int r = 0; r < nr; r++) {
            float acc[16] = {0};
            for (int64_t m = 0; m < padded; m++) {
                const uint32_t a = m < np ? x[t * np + m] : 0, b = m < np ? w[r][m] : 0;
                float *s = &acc[m % 16];
                *s = ftz(*s + ftz(bf16_hi(a)) * ftz(bf16_hi(b)));   /* inputs too: denormals read as zero */
                *s = ftz(*s + ftz(bf16_lo(a)) * ftz(bf16_lo(b)));
            }
            out[t * ldo + r] = fold16(acc);
        }
}

#if defined(__x86_64__)
/* Tiles of 4 rows x 4 tokens, one VDPBF16PS per word vector; tokens in chunks of 48 (their words stay in L2),
 * each block of 4 rows meeting every token tile of a chunk. Padded rows and tokens repeat the last one. */
__attribute__((target("avx512f,avx512vl,avx512bf16"))) static void tile_bf16_avx512(
    float *out, int64_t ldo, const uint32_t *x, int64_t nt, const uint32_t *const *w, int nr, int64_t np) {
    enum { TC = 48 };
    for (int64_t t0 = 0; t0 < nt; t0 += TC) {
        const int64_t tc = nt - t0 < TC ? nt - t0 : TC;
        for (int r0 = 0; r0 < nr; r0 += 4) {
            const uint32_t *ws[4];
            for (int r = 0; r < 4; r++) ws[r] = w[r0 + r < nr ? r0 + r : nr - 1];
            for (int64_t i0 = 0; i0 < tc; i0 += 4) {
                const uint32_t *xs[4];
                for (int i = 0; i < 4; i++) xs[i] = x + (t0 + (i0 + i < tc ? i0 + i : tc - 1)) * np;
                __m512 acc[16];
                for (int a = 0; a < 16; a++) acc[a] = _mm512_setzero_ps();
                for (int64_t m = 0; m < np; m += 16) {
                    const __mmask16 in = np - m >= 16 ? 0xffff : (__mmask16)((1u << (np - m)) - 1);
                    __m512bh wv[4];
                    for (int r = 0; r < 4; r++) wv[r] = (__m512bh)_mm512_maskz_loadu_epi32(in, ws[r] + m);
                    for (int i = 0; i < 4; i++) {
                        const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi32(in, xs[i] + m);
                        for (int r = 0; r < 4; r++) acc[4 * r + i] = _mm512_dpbf16_ps(acc[4 * r + i], xv, wv[r]);
                    }
                }
                store_tile_avx512(out + (t0 + i0) * ldo + r0, ldo, acc, (int)(tc - i0 < 4 ? tc - i0 : 4), nr - r0);
            }
        }
    }
}
#endif

/* ---- y += a * x (attention's weighted sum of values) --------------------------------------------------- */

static void axpy_f32_ref(float *y, float a, const float *x, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] += a * x[i];
}

#if defined(__x86_64__)
__attribute__((target("avx2,fma"))) static void axpy_f32_avx2(float *y, float a, const float *x, int64_t n) {
    const __m256 av = _mm256_set1_ps(a);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
    for (; i < n; i++) y[i] += a * x[i];
}

__attribute__((target("avx512f"))) static void axpy_f32_avx512(float *y, float a, const float *x, int64_t n) {
    const __m512 av = _mm512_set1_ps(a);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(y + i, _mm512_fmadd_ps(av, _mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i)));
    if (i < n) {
        const __mmask16 m = (__mmask16)((1u << (n - i)) - 1);
        _mm512_mask_storeu_ps(y + i, m, _mm512_fmadd_ps(av, _mm512_maskz_loadu_ps(m, x + i),
                                                        _mm512_maskz_loadu_ps(m, y + i)));
    }
}
#endif

/* ---- dispatch ---------------------------------------------------------------------------------------- */

typedef struct {
    const char *name;
    tile_fn fn;
    axpy_fn axpy;
    axpy_f32_fn axpy_f32;
    const int8_kernel *int8;    /* NULL: float activations for every weight type */
    axpy_bf16_fn axpy_bf16;     /* non-NULL: quantized embeddings' soft embedding in bfloat16 pairs */
    bf16_tile_fn bf16;          /* non-NULL: BF16 weights against bfloat16 activations */
    const char *needs;          /* features in dg_cpu_features(), or NULL */
    int automatic;              /* a candidate for the default */
} kernel;

/* In order of preference for the default (later is better); the int8 kernels take quantized weights with int8
 * activations and F32/F16/BF16 weights through their level's float kernel. */
static const kernel KERNELS[] = {
    {"reference", tile_ref, axpy_ref, axpy_f32_ref, NULL, NULL, NULL, NULL, 1},
    {"int8-reference", tile_ref, axpy_ref, axpy_f32_ref, &INT8_REFERENCE, NULL, NULL, NULL, 0},
    {"int8-bf16-reference", tile_ref, axpy_ref, axpy_f32_ref, &INT8_REFERENCE, axpy_bf16_ref, tile_bf16_ref, NULL, 0},
#if defined(__x86_64__)
    {"avx2", tile_avx2, axpy_avx2, axpy_f32_avx2, NULL, NULL, NULL, "avx2", 1},
    {"int8-avx2", tile_avx2, axpy_avx2, axpy_f32_avx2, &INT8_AVX2, NULL, NULL, "avx2", 1},
    {"avx512", tile_avx512, axpy_avx512, axpy_f32_avx512, NULL, NULL, NULL, "avx512f", 1},
    {"int8-avx512vnni", tile_avx512, axpy_avx512, axpy_f32_avx512, &INT8_AVX512VNNI, NULL, NULL, "avx512vnni", 1},
    {"int8-avx512bf16", tile_avx512, axpy_avx512, axpy_f32_avx512, &INT8_AVX512VNNI, axpy_bf16_avx512,
     tile_bf16_avx512, "avx512bf16", 1},
#endif
};
enum { N_KERNELS = sizeof KERNELS / sizeof KERNELS[0] };

static const kernel *active;
static pthread_once_t choose_once = PTHREAD_ONCE_INIT;

static int supported(const kernel *k) { return !k->needs || strstr(dg_cpu_features(), k->needs) != NULL; }

/* The best kernel the CPU has. DGGUF_NO_SIMD=X, X a kernel's name, turns off that kernel and everything above it
 * ("avx512" leaves AVX2 with int8 activations, "avx2" the float reference, "int8-avx512bf16" AVX-512 VNNI without
 * the bfloat16 paths); any other non-empty value but "0" forces the reference. */
static void choose_kernel(void) {
    const char *off = getenv("DGGUF_NO_SIMD");
    const kernel *best = &KERNELS[0];
    int named = !off || !*off || strcmp(off, "0") == 0;
    for (int i = 1; i < N_KERNELS && !named; i++) named = strcmp(off, KERNELS[i].name) == 0;
    if (named)
        for (int i = 1; i < N_KERNELS; i++) {
            if (off && strcmp(off, KERNELS[i].name) == 0) break;
            if (KERNELS[i].automatic && supported(&KERNELS[i])) best = &KERNELS[i];
        }
    __atomic_store_n(&active, best, __ATOMIC_RELEASE);
}

/* The switch is process-wide and meant for tests: callers read the pointer once per op. */
static const kernel *current(void) {
    pthread_once(&choose_once, choose_kernel);
    return __atomic_load_n(&active, __ATOMIC_ACQUIRE);
}

tile_fn matmul_tile(void) { return current()->fn; }

const int8_kernel *matmul_int8(void) { return current()->int8; }

axpy_fn soft_embed_axpy(void) { return current()->axpy; }

axpy_f32_fn attention_axpy(void) { return current()->axpy_f32; }

axpy_bf16_fn soft_embed_bf16(void) { return current()->axpy_bf16; }

bf16_tile_fn matmul_bf16(void) { return current()->bf16; }

const char *dg_matmul_kernel(void) { return current()->name; }

int dg_set_matmul_kernel(const char *name, char *err, size_t errlen) {
    pthread_once(&choose_once, choose_kernel);
    for (int i = 0; i < N_KERNELS; i++)
        if (strcmp(KERNELS[i].name, name) == 0) {
            if (!supported(&KERNELS[i])) {
                snprintf(err, errlen, "matmul kernel %s needs %s, which this CPU lacks", name, KERNELS[i].needs);
                return DG_E_TYPE;
            }
            __atomic_store_n(&active, &KERNELS[i], __ATOMIC_RELEASE);
            return DG_OK;
        }
    snprintf(err, errlen, "unknown matmul kernel %s", name);
    return DG_E_TYPE;
}
