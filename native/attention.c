/* attention.c: one layer's attention over a pass's queries, the cached keys and the pass's own keys
 * (attention.h, attention_layer), in two kernels chosen process-wide (dg_set_attention_kernel):
 *
 * - "per-query", the reference: one (token, head) at a time through attention() (scores through the
 *   matmul tile kernel, softmax, one axpy per key).
 * - "blocked", the default: work items are (kv head, 64 query rows), the rows being the (token, head) pairs of
 *   the query heads that share the kv head, so every key and value row loaded serves up to 64 queries. Per item:
 *   S^T = K . Q^T over the item's keys (the union of its rows' key ranges) as a register-tiled GEMM with the
 *   queries in vector lanes, summed in double (a float product is exact there, so a score is q . k rounded once
 *   to float); keys outside a row's own range are set to -inf; a softmax per row (max first, exp, the sum in
 *   double, then p = e / sum); O = P . V, register-tiled in float, keys ascending (cache rows, then
 *   the pass's rows).
 *
 * The blocked kernel has a plain reference and AVX2 and AVX-512 variants, at the level of the active matmul
 * kernel. All three make the same steps in the same order (a double sum over the head dimension for each score,
 * one plain-C softmax with ops.h's exp, fused multiply-adds over the keys for each output), so they give the
 * same bits, and every output
 * row is computed by one item, so any thread count does too. Against the per-query reference (float scores in 16
 * lanes, expf) they differ in the last bits; tests/test_attention.py holds both to float64. Why double scores: the
 * parity model with sharp attention (tests/test_forward.py, "decisive") turns score noise of a few float ulps
 * into logit noise at its bound, and float sums in several orders landed on either side of it.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "attention.h"
#include "compat.h"           /* dg_fmaf */
#include "gemm.h"             /* the per-query reference's tile and axpy */
#include "ops.h"              /* exp_nonpositive, softmax */
#include "quant_internal.h"   /* DG_CLONES */

enum { ROWS = 64 };          /* query rows per item: a multiple of 16 (AVX-512 lanes) */
enum { KT = 3 };             /* keys per score tile */

static int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
static int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

/* The first cached row and the first pass row query token t sees (window: keys p - W < k <= p), and one past
 * its last pass row. Cached rows hold positions pos0 - held .. pos0 - 1, so the window start is t - W + 1 + held
 * in cache rows. */
static int64_t first_cached(const attn_layer *a, int64_t t) {
    return a->window ? min64(a->held, max64(0, t - a->window + 1 + a->held)) : 0;
}
static int64_t first_own(const attn_layer *a, int64_t t) { return a->window ? max64(0, t - a->window + 1) : 0; }
static int64_t end_own(const attn_layer *a, int64_t t) { return a->causal ? t + 1 : a->n; }

/* ---- per-query reference ------------------------------------------------------------------------------- */

/* Scores of one query against n key rows (stride floats apart), four keys at a time through the matmul kernel. */
static void scores_of(float *scores, const float *q, const float *k, int64_t n, int64_t stride, int d,
                      tile_fn tile) {
    for (int64_t j = 0; j < n; j += 4) {
        const int nr = (int)(n - j < 4 ? n - j : 4);
        const float *rows[4];
        for (int r = 0; r < nr; r++) rows[r] = k + (j + r) * stride;
        tile(scores + j, 0, q, 1, rows, nr, d);
    }
}

void attention(float *out, const float *q, const float *ka, const float *va, int64_t na,
               const float *kb, const float *vb, int64_t nb, int64_t stride, int d, float *scores) {
    const tile_fn tile = matmul_tile();
    const axpy_f32_fn axpy = attention_axpy();
    scores_of(scores, q, ka, na, stride, d, tile);
    scores_of(scores + na, q, kb, nb, stride, d, tile);
    softmax(scores, na + nb);
    for (int i = 0; i < d; i++) out[i] = 0.0f;
    for (int64_t j = 0; j < na; j++) axpy(out, scores[j], va + j * stride, d);
    for (int64_t j = 0; j < nb; j++) axpy(out, scores[na + j], vb + j * stride, d);
}

typedef struct {
    const attn_layer *a;
    float *scratch;
    int64_t per_thread;
} attn_job;

/* Items are (token, head) pairs: each computes one head's output for one query. */
static void per_query_items(void *ctx, int64_t lo, int64_t hi, int thread) {
    const attn_job *j = ctx;
    const attn_layer *a = j->a;
    const int d = a->d, group = a->n_heads / a->n_kv;
    const int64_t stride = (int64_t)a->n_kv * d;
    float *scores = j->scratch + thread * j->per_thread;
    for (int64_t it = lo; it < hi; it++) {
        const int64_t t = it / a->n_heads;
        const int head = (int)(it % a->n_heads), g = head / group;
        const int64_t a_lo = first_cached(a, t), b_lo = first_own(a, t), b_hi = end_own(a, t);
        attention(a->out + (t * a->n_heads + head) * d, a->q + (t * a->n_heads + head) * d,
                  a->ck + a_lo * stride + g * d, a->cv + a_lo * stride + g * d, a->held - a_lo,
                  a->k + b_lo * stride + g * d, a->v + b_lo * stride + g * d, b_hi - b_lo, stride, d, scores);
    }
}

/* ---- blocked kernels ------------------------------------------------------------------------------------
 * st is [nk, ROWS] (key j's scores in row j, one lane per query), qt is [d, ROWS] doubles (the queries
 * transposed, lanes past the item's rows zero), nv the 16-lane groups in use. */

/* st[j, r] = k_j . q_r for j < nk key rows stride floats apart: summed in double, c ascending, then rounded. */
typedef void (*scores_fn)(float *st, const double *qt, int nv, const float *k, int64_t nk, int64_t stride, int d);
/* out[r] += sum over j < nk (ascending) of st[j, r] v_j, r < nr, one fused multiply-add per key. */
typedef void (*values_fn)(float *const *out, int nr, const float *st, const float *v, int64_t nk, int64_t stride,
                          int d);

typedef struct {
    scores_fn scores;
    values_fn values;
} blocked_kernel;

/* Per lane r < nr: e = exp(s - max over the column) (ops.h's exp, 0 for -inf scores), summed in double, then
 * st = e / sum. Plain C over the lanes, which vectorises in every target clone and gives every kernel the same
 * bits. */
DG_CLONES
static void softmax_columns(float *st, int nr, int64_t nk) {
    float max[ROWS];
    double sum[ROWS];
    for (int r = 0; r < nr; r++) {
        max[r] = st[r];
        sum[r] = 0.0;
    }
    for (int64_t j = 1; j < nk; j++)
        for (int r = 0; r < nr; r++) max[r] = st[j * ROWS + r] > max[r] ? st[j * ROWS + r] : max[r];
    for (int64_t j = 0; j < nk; j++)
        for (int r = 0; r < nr; r++) {
            const float e = exp_nonpositive(st[j * ROWS + r] - max[r]);
            st[j * ROWS + r] = e;
            sum[r] += e;
        }
    float total[ROWS];
    for (int r = 0; r < nr; r++) total[r] = (float)sum[r];
    for (int64_t j = 0; j < nk; j++)
        for (int r = 0; r < nr; r++) st[j * ROWS + r] /= total[r];
}

static void scores_ref(float *st, const double *qt, int nv, const float *k, int64_t nk, int64_t stride, int d) {
    for (int64_t j = 0; j < nk; j++)
        for (int r = 0; r < 16 * nv; r++) {
            double acc = 0.0;
            for (int c = 0; c < d; c++) acc += (double)k[j * stride + c] * qt[c * ROWS + r];
            st[j * ROWS + r] = (float)acc;
        }
}

static void values_ref(float *const *out, int nr, const float *st, const float *v, int64_t nk, int64_t stride,
                       int d) {
    for (int r = 0; r < nr; r++)
        for (int c = 0; c < d; c++) {
            float acc = out[r][c];
            for (int64_t j = 0; j < nk; j++) acc = dg_fmaf(st[j * ROWS + r], v[j * stride + c], acc);
            out[r][c] = acc;
        }
}

static const blocked_kernel BLOCKED_REFERENCE = {scores_ref, values_ref};

#if defined(__x86_64__)
#include <immintrin.h>

/* ---- AVX-512 ---------------------------------------------------------------------------------------------- */

/* KT keys x 64 lanes (24 zmm of doubles at nv = 4); keys past the end repeat the last one and are not stored. */
__attribute__((target("avx512f"), always_inline)) static inline void scores_avx512_nv(
        float *st, const double *qt, const float *k, int64_t nk, int64_t stride, int d, const int NV) {
    for (int64_t j0 = 0; j0 < nk; j0 += KT) {
        const float *ks[KT];
        for (int i = 0; i < KT; i++) ks[i] = k + min64(j0 + i, nk - 1) * stride;
        __m512d acc[KT][8];
        for (int i = 0; i < KT; i++)
            for (int u = 0; u < 2 * NV; u++) acc[i][u] = _mm512_setzero_pd();
        for (int c = 0; c < d; c++) {
            __m512d q[8];
            for (int u = 0; u < 2 * NV; u++) q[u] = _mm512_loadu_pd(qt + c * ROWS + 8 * u);
            for (int i = 0; i < KT; i++) {
                const __m512d kc = _mm512_set1_pd((double)ks[i][c]);
                for (int u = 0; u < 2 * NV; u++) acc[i][u] = _mm512_fmadd_pd(kc, q[u], acc[i][u]);
            }
        }
        for (int i = 0; i < KT && j0 + i < nk; i++)
            for (int u = 0; u < 2 * NV; u++) _mm256_storeu_ps(st + (j0 + i) * ROWS + 8 * u, _mm512_cvtpd_ps(acc[i][u]));
    }
}

__attribute__((target("avx512f"))) static void scores_avx512(float *st, const double *qt, int nv, const float *k,
                                                             int64_t nk, int64_t stride, int d) {
    switch (nv) {
    case 1: scores_avx512_nv(st, qt, k, nk, stride, d, 1); break;
    case 2: scores_avx512_nv(st, qt, k, nk, stride, d, 2); break;
    case 3: scores_avx512_nv(st, qt, k, nk, stride, d, 3); break;
    default: scores_avx512_nv(st, qt, k, nk, stride, d, 4); break;
    }
}

/* 6 rows x 64 columns of accumulators (24 zmm); rows past nr repeat the last one and are not stored; the
 * column tail goes 16 (then fewer, masked) at a time. */
__attribute__((target("avx512f"))) static void values_avx512(float *const *out, int nr, const float *st,
                                                             const float *v, int64_t nk, int64_t stride, int d) {
    enum { RT = 6 };
    for (int r0 = 0; r0 < nr; r0 += RT) {
        int rs[RT];
        for (int i = 0; i < RT; i++) rs[i] = r0 + i < nr ? r0 + i : nr - 1;
        int c = 0;
        for (; c + 64 <= d; c += 64) {
            __m512 acc[RT][4];
            for (int i = 0; i < RT; i++)
                for (int u = 0; u < 4; u++) acc[i][u] = _mm512_loadu_ps(out[rs[i]] + c + 16 * u);
            for (int64_t j = 0; j < nk; j++) {
                __m512 vv[4];
                for (int u = 0; u < 4; u++) vv[u] = _mm512_loadu_ps(v + j * stride + c + 16 * u);
                for (int i = 0; i < RT; i++) {
                    const __m512 p = _mm512_set1_ps(st[j * ROWS + rs[i]]);
                    for (int u = 0; u < 4; u++) acc[i][u] = _mm512_fmadd_ps(p, vv[u], acc[i][u]);
                }
            }
            for (int i = 0; i < RT && r0 + i < nr; i++)
                for (int u = 0; u < 4; u++) _mm512_storeu_ps(out[r0 + i] + c + 16 * u, acc[i][u]);
        }
        for (; c < d; c += 16) {
            const __mmask16 m = d - c >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (d - c)) - 1);
            __m512 acc[RT];
            for (int i = 0; i < RT; i++) acc[i] = _mm512_maskz_loadu_ps(m, out[rs[i]] + c);
            for (int64_t j = 0; j < nk; j++) {
                const __m512 vv = _mm512_maskz_loadu_ps(m, v + j * stride + c);
                for (int i = 0; i < RT; i++) acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(st[j * ROWS + rs[i]]), vv, acc[i]);
            }
            for (int i = 0; i < RT && r0 + i < nr; i++) _mm512_mask_storeu_ps(out[r0 + i] + c, m, acc[i]);
        }
    }
}

static const blocked_kernel BLOCKED_AVX512 = {scores_avx512, values_avx512};

/* ---- AVX2 + FMA ------------------------------------------------------------------------------------------- */

/* KT keys x 16 lanes (12 ymm of doubles), one 16-lane group at a time. */
__attribute__((target("avx2,fma"))) static void scores_avx2(float *st, const double *qt, int nv, const float *k,
                                                            int64_t nk, int64_t stride, int d) {
    for (int v = 0; v < nv; v++)
        for (int64_t j0 = 0; j0 < nk; j0 += KT) {
            const float *ks[KT];
            for (int i = 0; i < KT; i++) ks[i] = k + min64(j0 + i, nk - 1) * stride;
            __m256d acc[KT][4];
            for (int i = 0; i < KT; i++)
                for (int u = 0; u < 4; u++) acc[i][u] = _mm256_setzero_pd();
            for (int c = 0; c < d; c++) {
                __m256d kc[KT];
                for (int i = 0; i < KT; i++) kc[i] = _mm256_set1_pd((double)ks[i][c]);
                for (int u = 0; u < 4; u++) {
                    const __m256d q = _mm256_loadu_pd(qt + c * ROWS + 16 * v + 4 * u);
                    for (int i = 0; i < KT; i++) acc[i][u] = _mm256_fmadd_pd(kc[i], q, acc[i][u]);
                }
            }
            for (int i = 0; i < KT && j0 + i < nk; i++)
                for (int u = 0; u < 4; u++)
                    _mm_storeu_ps(st + (j0 + i) * ROWS + 16 * v + 4 * u, _mm256_cvtpd_ps(acc[i][u]));
        }
}

/* 3 rows x 32 columns of accumulators (12 ymm); the column tail goes 8 (then fewer, masked) at a time. */
__attribute__((target("avx2,fma"))) static void values_avx2(float *const *out, int nr, const float *st,
                                                            const float *v, int64_t nk, int64_t stride, int d) {
    enum { RT = 3 };
    static const int32_t lanes[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
    for (int r0 = 0; r0 < nr; r0 += RT) {
        int rs[RT];
        for (int i = 0; i < RT; i++) rs[i] = r0 + i < nr ? r0 + i : nr - 1;
        int c = 0;
        for (; c + 32 <= d; c += 32) {
            __m256 acc[RT][4];
            for (int i = 0; i < RT; i++)
                for (int u = 0; u < 4; u++) acc[i][u] = _mm256_loadu_ps(out[rs[i]] + c + 8 * u);
            for (int64_t j = 0; j < nk; j++) {
                __m256 p[RT];
                for (int i = 0; i < RT; i++) p[i] = _mm256_broadcast_ss(st + j * ROWS + rs[i]);
                for (int u = 0; u < 4; u++) {
                    const __m256 vv = _mm256_loadu_ps(v + j * stride + c + 8 * u);
                    for (int i = 0; i < RT; i++) acc[i][u] = _mm256_fmadd_ps(p[i], vv, acc[i][u]);
                }
            }
            for (int i = 0; i < RT && r0 + i < nr; i++)
                for (int u = 0; u < 4; u++) _mm256_storeu_ps(out[r0 + i] + c + 8 * u, acc[i][u]);
        }
        for (; c < d; c += 8) {
            const __m256i m = _mm256_loadu_si256((const __m256i *)(lanes + 8 - (d - c < 8 ? d - c : 8)));
            __m256 acc[RT];
            for (int i = 0; i < RT; i++) acc[i] = _mm256_maskload_ps(out[rs[i]] + c, m);
            for (int64_t j = 0; j < nk; j++) {
                const __m256 vv = _mm256_maskload_ps(v + j * stride + c, m);
                for (int i = 0; i < RT; i++) acc[i] = _mm256_fmadd_ps(_mm256_broadcast_ss(st + j * ROWS + rs[i]), vv, acc[i]);
            }
            for (int i = 0; i < RT && r0 + i < nr; i++) _mm256_maskstore_ps(out[r0 + i] + c, m, acc[i]);
        }
    }
}

static const blocked_kernel BLOCKED_AVX2 = {scores_avx2, values_avx2};
#endif

/* The blocked kernel at the active matmul kernel's instruction set. */
static const blocked_kernel *blocked_kernel_now(void) {
#if defined(__x86_64__)
    const char *m = dg_matmul_kernel();
    if (strstr(m, "avx512")) return &BLOCKED_AVX512;
    if (strstr(m, "avx2")) return &BLOCKED_AVX2;
#endif
    return &BLOCKED_REFERENCE;
}

/* ---- blocked driver ------------------------------------------------------------------------------------- */

typedef struct {
    const attn_layer *a;
    float *scratch;
    int64_t per_thread;
    const blocked_kernel *kr;
    int64_t chunks;             /* items per kv head */
} blocked_job;

/* Item (g, c): kv head g, query rows 64 c .. 64 c + 63 of that head's rows in (token, head in group) order.
 * Chunks are taken from both ends in turn (0, last, 1, last - 1, ...) so contiguous item ranges carry similar
 * causal work. */
static void blocked_items(void *ctx, int64_t lo, int64_t hi, int thread) {
    const blocked_job *j = ctx;
    const attn_layer *a = j->a;
    const int d = a->d, group = a->n_heads / a->n_kv;
    const int64_t stride = (int64_t)a->n_kv * d, rows = a->n * group;
    double *qt = (double *)(j->scratch + thread * j->per_thread);
    float *st = j->scratch + thread * j->per_thread + 2 * (int64_t)d * ROWS;
    for (int64_t it = lo; it < hi; it++) {
        const int g = (int)(it / j->chunks);
        const int64_t c = it % j->chunks, chunk = c % 2 == 0 ? c / 2 : j->chunks - 1 - c / 2;
        const int64_t f0 = chunk * ROWS;
        const int nr = (int)min64(ROWS, rows - f0), nv = (nr + 15) / 16;
        const int64_t t0 = f0 / group, t1 = (f0 + nr - 1) / group;
        /* The item's keys: cached rows a0 .. held - 1, then own rows b0 .. b1 - 1 (every row's range is inside). */
        const int64_t a0 = first_cached(a, t0), na = a->held - a0, b0 = first_own(a, t0), b1 = end_own(a, t1);
        const int64_t nk = na + b1 - b0;
        float *out[ROWS];
        for (int r = 0; r < nr; r++) {
            const int64_t t = (f0 + r) / group, head = (int64_t)g * group + (f0 + r) % group;
            const float *q = a->q + (t * a->n_heads + head) * d;
            out[r] = a->out + (t * a->n_heads + head) * d;
            for (int i = 0; i < d; i++) qt[i * ROWS + r] = q[i];
            for (int i = 0; i < d; i++) out[r][i] = 0.0f;
        }
        for (int r = nr; r < 16 * nv; r++)
            for (int i = 0; i < d; i++) qt[i * ROWS + r] = 0.0;
        j->kr->scores(st, qt, nv, a->ck + a0 * stride + g * d, na, stride, d);
        j->kr->scores(st + na * ROWS, qt, nv, a->k + b0 * stride + g * d, b1 - b0, stride, d);
        for (int r = 0; r < nr; r++) {      /* mask: keys before the row's window, after its own position */
            const int64_t t = (f0 + r) / group, lo1 = first_cached(a, t) - a0;
            const int64_t lo2 = na + first_own(a, t) - b0, hi2 = na + end_own(a, t) - b0;
            for (int64_t k = 0; k < lo1; k++) st[k * ROWS + r] = -INFINITY;
            for (int64_t k = na; k < lo2; k++) st[k * ROWS + r] = -INFINITY;
            for (int64_t k = hi2; k < nk; k++) st[k * ROWS + r] = -INFINITY;
        }
        softmax_columns(st, 16 * nv, nk);
        j->kr->values(out, nr, st, a->cv + a0 * stride + g * d, na, stride, d);
        j->kr->values(out, nr, st + na * ROWS, a->v + b0 * stride + g * d, b1 - b0, stride, d);
    }
}

/* ---- the switch and the layer ------------------------------------------------------------------------- */

static int use_per_query;        /* process-wide, for tests and benchmarks */

const char *dg_attention_kernel(void) {
    return __atomic_load_n(&use_per_query, __ATOMIC_ACQUIRE) ? "per-query" : "blocked";
}

int dg_set_attention_kernel(const char *name, char *err, size_t errlen) {
    if (strcmp(name, "per-query") != 0 && strcmp(name, "blocked") != 0) {
        snprintf(err, errlen, "unknown attention kernel %s (per-query, blocked)", name);
        return DG_E_TYPE;
    }
    __atomic_store_n(&use_per_query, strcmp(name, "per-query") == 0, __ATOMIC_RELEASE);
    return DG_OK;
}

int64_t attention_scratch(int64_t max_keys, int d_max) {
    return (int64_t)ROWS * (2 * d_max + max_keys);   /* qt (doubles), st; the per-query kernel uses max_keys */
}

void attention_layer(dg_pool *p, const attn_layer *a, float *scratch) {
    const int64_t per_thread = attention_scratch(a->held + a->n, a->d);
    if (__atomic_load_n(&use_per_query, __ATOMIC_ACQUIRE)) {
        attn_job job = {a, scratch, per_thread};
        parallel_for(p, a->n * a->n_heads, per_query_items, &job);
        return;
    }
    const int64_t chunks = (a->n * (a->n_heads / a->n_kv) + ROWS - 1) / ROWS;
    blocked_job job = {a, scratch, per_thread, blocked_kernel_now(), chunks};
    parallel_for(p, a->n_kv * chunks, blocked_items, &job);
}

int dg_attention(const float *q, const float *ck, const float *cv, int64_t held, const float *k, const float *v,
                 int64_t n, int n_heads, int n_kv, int head_dim, int64_t window, int causal, float *out,
                 int n_threads, char *err, size_t errlen) {
    if (n < 0 || held < 0 || window < 0 || n_kv < 1 || n_heads < 1 || n_heads % n_kv || head_dim < 1) {
        snprintf(err, errlen, "attention sizes out of range (n %lld, held %lld, window %lld, heads %d / %d kv, "
                 "head_dim %d)", (long long)n, (long long)held, (long long)window, n_heads, n_kv, head_dim);
        return DG_E_SHAPE;
    }
    if (n == 0) return DG_OK;
    dg_pool *p = pool_new(n_threads);
    const int64_t per_thread = attention_scratch(held + n, head_dim);
    float *scratch = p ? malloc((size_t)(pool_threads(p) * per_thread) * sizeof(float)) : NULL;
    if (!scratch) {
        pool_free(p);
        snprintf(err, errlen, "out of memory for attention over %lld keys", (long long)(held + n));
        return DG_E_VALUE;
    }
    const attn_layer a = {q, ck, cv, k, v, out, n, held, window, causal != 0, n_heads, n_kv, head_dim};
    attention_layer(p, &a, scratch);
    free(scratch);
    pool_free(p);
    return DG_OK;
}
