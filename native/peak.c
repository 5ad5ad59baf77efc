/* peak.c: the machine's arithmetic and read-bandwidth peaks, measured in the benchmarks' own run, so that they
 * report each kernel as a fraction of what this CPU does (scripts/bench_kernels.py, bench_step.py, dgguf bench)
 * rather than of constants from another machine.
 *
 * An arithmetic peak is one instruction of the active matmul kernel's kind, repeated on ACC independent
 * accumulators (more than its latency times its throughput, so the loop runs at throughput) and nothing else:
 *   fp32  FMA (AVX-512 or AVX2: the float tiles' instruction), acc = acc * m + m;
 *   int8  AVX-512 VNNI dpbusd, acc += four u8 x s8 products per lane; AVX2: maddubs, madd, add (the int8-avx2
 *         tile's three steps per 32 products);
 *   bf16  VDPBF16PS, acc += two bfloat16 products per lane.
 * With m = 1 every lane ends at an exact count (below 2^24 for the float ones), and the lanes' sum comes back as
 * a check: a loop the compiler shortened would give another sum. */
#include <stdio.h>
#include <string.h>

#include "dgguf.h"
#include "pool.h"
#include "quant_internal.h"   /* DG_CLONES */

enum { ACC = 12, PEAK_MAX_ROUNDS = 1 << 22 };   /* bf16 lanes reach 2^23: exact in float */

typedef double (*peak_fn)(int64_t rounds, float m);   /* returns the sum of every accumulator lane */

typedef struct {
    const char *kind;
    const char *kernel_prefix;   /* the active matmul kernel's name starts with it */
    peak_fn fn;
    int ops_per_round;           /* operations (2 per multiply-add) per round, all accumulators */
} peak_loop;

#if defined(__x86_64__)
#include <immintrin.h>

__attribute__((target("avx512f"))) static double fp32_avx512(int64_t rounds, float m) {
    const __m512 mv = _mm512_set1_ps(m);
    __m512 acc[ACC];
    for (int i = 0; i < ACC; i++) acc[i] = _mm512_setzero_ps();
    for (int64_t r = 0; r < rounds; r++)
        for (int i = 0; i < ACC; i++) acc[i] = _mm512_fmadd_ps(acc[i], mv, mv);
    double s = 0.0;
    for (int i = 0; i < ACC; i++) s += _mm512_reduce_add_ps(acc[i]);
    return s;
}

__attribute__((target("avx2,fma"))) static double fp32_avx2(int64_t rounds, float m) {
    const __m256 mv = _mm256_set1_ps(m);
    __m256 acc[ACC];
    for (int i = 0; i < ACC; i++) acc[i] = _mm256_setzero_ps();
    for (int64_t r = 0; r < rounds; r++)
        for (int i = 0; i < ACC; i++) acc[i] = _mm256_fmadd_ps(acc[i], mv, mv);
    double s = 0.0;
    float lanes[8];
    for (int i = 0; i < ACC; i++) {
        _mm256_storeu_ps(lanes, acc[i]);
        for (int l = 0; l < 8; l++) s += lanes[l];
    }
    return s;
}

__attribute__((target("avx512f,avx512vnni"))) static double int8_avx512vnni(int64_t rounds, float m) {
    const __m512i q = _mm512_set1_epi8((char)(int)m);
    __m512i acc[ACC];
    for (int i = 0; i < ACC; i++) acc[i] = _mm512_setzero_si512();
    for (int64_t r = 0; r < rounds; r++)
        for (int i = 0; i < ACC; i++) acc[i] = _mm512_dpbusd_epi32(acc[i], q, q);
    double s = 0.0;
    for (int i = 0; i < ACC; i++) s += (double)_mm512_reduce_add_epi32(acc[i]);
    return s;
}

__attribute__((target("avx2"))) static double int8_avx2(int64_t rounds, float m) {
    const __m256i q = _mm256_set1_epi8((char)(int)m), ones = _mm256_set1_epi16(1);
    __m256i acc[ACC];
    for (int i = 0; i < ACC; i++) acc[i] = _mm256_setzero_si256();
    for (int64_t r = 0; r < rounds; r++)
        for (int i = 0; i < ACC; i++)
            acc[i] = _mm256_add_epi32(acc[i], _mm256_madd_epi16(_mm256_maddubs_epi16(q, q), ones));
    double s = 0.0;
    int32_t lanes[8];
    for (int i = 0; i < ACC; i++) {
        _mm256_storeu_si256((__m256i *)lanes, acc[i]);
        for (int l = 0; l < 8; l++) s += lanes[l];
    }
    return s;
}

__attribute__((target("avx512f,avx512bf16"))) static double bf16_avx512(int64_t rounds, float m) {
    const __m512bh mv = _mm512_cvtne2ps_pbh(_mm512_set1_ps(m), _mm512_set1_ps(m));
    __m512 acc[ACC];
    for (int i = 0; i < ACC; i++) acc[i] = _mm512_setzero_ps();
    for (int64_t r = 0; r < rounds; r++)
        for (int i = 0; i < ACC; i++) acc[i] = _mm512_dpbf16_ps(acc[i], mv, mv);
    double s = 0.0;
    for (int i = 0; i < ACC; i++) s += _mm512_reduce_add_ps(acc[i]);
    return s;
}

static const peak_loop LOOPS[] = {
    {"fp32", "int8-avx512", fp32_avx512, ACC * 16 * 2},
    {"fp32", "avx512", fp32_avx512, ACC * 16 * 2},
    {"fp32", "int8-avx2", fp32_avx2, ACC * 8 * 2},
    {"fp32", "avx2", fp32_avx2, ACC * 8 * 2},
    {"int8", "int8-avx512", int8_avx512vnni, ACC * 64 * 2},
    {"int8", "int8-avx2", int8_avx2, ACC * 32 * 2},
    {"bf16", "int8-avx512bf16", bf16_avx512, ACC * 32 * 2},
};
#else
static const peak_loop LOOPS[] = {{NULL, NULL, NULL, 0}};
#endif

typedef struct {
    peak_fn fn;
    int64_t rounds;
    float m;
    double *check;               /* [threads] */
} peak_job;

static void peak_items(void *ctx, int64_t lo, int64_t hi, int thread) {
    const peak_job *j = ctx;
    for (int64_t i = lo; i < hi; i++) j->check[i] = j->fn(j->rounds, j->m);
}

int dg_peak(const char *kind, int64_t rounds, int n_threads, double *ops, double *check, char *err,
            size_t errlen) {
    if (rounds < 1 || rounds > PEAK_MAX_ROUNDS || n_threads < 1 || n_threads > 256) {
        snprintf(err, errlen, "dg_peak: rounds %lld (1..%d) or threads %d (1..256) out of range", (long long)rounds,
                 PEAK_MAX_ROUNDS, n_threads);
        return DG_E_SHAPE;
    }
    const char *kernel = dg_matmul_kernel();
    const peak_loop *loop = NULL;
    for (size_t i = 0; i < sizeof LOOPS / sizeof LOOPS[0] && !loop; i++)
        if (LOOPS[i].kind && strcmp(LOOPS[i].kind, kind) == 0 &&
            strncmp(kernel, LOOPS[i].kernel_prefix, strlen(LOOPS[i].kernel_prefix)) == 0)
            loop = &LOOPS[i];
    if (!loop) {
        snprintf(err, errlen, "dg_peak: no %s instruction under the %s kernel (fp32, int8, bf16)", kind, kernel);
        return DG_E_TYPE;
    }
    dg_pool *p = pool_new(n_threads);
    double per_thread[256];
    if (!p) {
        snprintf(err, errlen, "dg_peak: cannot start %d threads", n_threads);
        return DG_E_VALUE;
    }
    peak_job job = {loop->fn, rounds, 1.0f, per_thread};
    parallel_for(p, n_threads, peak_items, &job);   /* one item per thread */
    pool_free(p);
    *check = 0.0;
    for (int i = 0; i < n_threads; i++) *check += per_thread[i];
    *ops = (double)loop->ops_per_round * (double)rounds * n_threads;
    return DG_OK;
}

/* ---- read bandwidth ---------------------------------------------------------------------------------------- */

typedef struct {
    const uint64_t *words;
    int64_t n;
    uint64_t *sum;               /* [threads] */
    int threads;
} read_job;

DG_CLONES
static uint64_t sum_words(const uint64_t *w, int64_t n) {
    uint64_t s = 0;
    for (int64_t i = 0; i < n; i++) s += w[i];
    return s;
}

static void read_items(void *ctx, int64_t lo, int64_t hi, int thread) {
    const read_job *j = ctx;
    for (int64_t t = lo; t < hi; t++) {
        const int64_t a = j->n * t / j->threads, b = j->n * (t + 1) / j->threads;
        j->sum[t] = sum_words(j->words + a, b - a);
    }
}

int dg_read_words(const uint64_t *words, int64_t n, int n_threads, uint64_t *sum, char *err, size_t errlen) {
    if (n < 0 || n_threads < 1 || n_threads > 256) {
        snprintf(err, errlen, "dg_read_words: %lld words on %d threads (threads 1..256)", (long long)n, n_threads);
        return DG_E_SHAPE;
    }
    dg_pool *p = pool_new(n_threads);
    uint64_t per_thread[256];
    if (!p) {
        snprintf(err, errlen, "dg_read_words: cannot start %d threads", n_threads);
        return DG_E_VALUE;
    }
    read_job job = {words, n, per_thread, n_threads};
    parallel_for(p, n_threads, read_items, &job);
    pool_free(p);
    *sum = 0;
    for (int i = 0; i < n_threads; i++) *sum += per_thread[i];
    return DG_OK;
}
