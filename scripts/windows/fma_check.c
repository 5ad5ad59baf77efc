/* dg_fmaf (native/compat.h) over many inputs: random bit patterns (every class: NaN, inf, subnormal, zero),
 * products and addends of overlapping magnitude (cancellation), exact float midpoints pushed by a far smaller
 * addend (where rounding the double sum to float is wrong), subnormal and overflowing results, and every triple
 * of special values. Prints the number of cases and a hash of every result's bits (NaNs counted as one pattern),
 * how many results the double sum rounded to float gets wrong, and, with a C library's fmaf linked in
 * (-DWITH_LIBM_FMAF), how many differ from it (bits; any NaN equals any NaN).
 * tests/test_fmaf.py runs it against glibc; scripts/check_windows.sh runs the Windows build under Wine and
 * requires the same hash. Usage: fma_check [cases] */
#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "compat.h"

static uint64_t state = 0x9e3779b97f4a7c15ull;
static uint32_t next32(void) {   /* xorshift64* */
    state ^= state >> 12;
    state ^= state << 25;
    state ^= state >> 27;
    return (uint32_t)((state * 0x2545f4914f6cdd1dull) >> 32);
}

static float from_bits(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static uint32_t bits_of(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return isnan(f) ? 0x7fc00000u : u;
}

/* sign, biased exponent e (1..254: normal; 0: subnormal), random mantissa with only the top `keep` bits random */
static float make(int e, int keep) {
    uint32_t m = next32() & 0x7fffffu;
    if (keep < 23) m &= ~((1u << (23 - keep)) - 1);
    return from_bits((next32() & 0x80000000u) | (uint32_t)e << 23 | m);
}

static int rand_exp(int lo, int hi) { return lo + (int)(next32() % (uint32_t)(hi - lo + 1)); }

static uint64_t hash = 1469598103934665603ull, cases = 0, soft_differ = 0, naive_differ = 0;
#ifdef WITH_LIBM_FMAF
static uint64_t differ = 0;
#endif

static void check(float a, float b, float c) {
    const float got = dg_fmaf(a, b, c), soft = dg_fmaf_soft(a, b, c);
    const uint32_t g = bits_of(got);
    for (int i = 0; i < 4; i++) hash = (hash ^ ((g >> (8 * i)) & 0xff)) * 1099511628211ull;
    soft_differ += bits_of(soft) != g;
    const double p = (double)a * (double)b, s = p + (double)c;   /* the sum rounded twice: what the cases catch */
    naive_differ += bits_of((float)s) != g;
#ifdef WITH_LIBM_FMAF
    differ += bits_of(fmaf(a, b, c)) != g;
#endif
    cases++;
}

int main(int argc, char **argv) {
    const long n = argc > 1 ? atol(argv[1]) : 4000000;
    const float special[] = {0.0f, -0.0f, 1.0f, -1.0f, 0.5f, 3.0f, INFINITY, -INFINITY, NAN, FLT_MAX, -FLT_MAX,
                             FLT_MIN, -FLT_MIN, FLT_TRUE_MIN, -FLT_TRUE_MIN, FLT_EPSILON, 1.0f + FLT_EPSILON,
                             1.0f - FLT_EPSILON / 2, 0x1.fffffep+63f, 0x1p-75f, 0x1.8p-126f, 0x1p64f};
    const int ns = (int)(sizeof special / sizeof *special);
    for (int i = 0; i < ns; i++)
        for (int j = 0; j < ns; j++)
            for (int k = 0; k < ns; k++) check(special[i], special[j], special[k]);
    for (long i = 0; i < n; i++) {
        float a, b, c;
        switch (i % 6) {
        case 0:   /* any bits */
            a = from_bits(next32()), b = from_bits(next32()), c = from_bits(next32());
            break;
        case 1: { /* product and addend of overlapping magnitude: cancellation, carries */
            const int ea = rand_exp(60, 190), eb = rand_exp(60, 190), ec = ea + eb - 127 + rand_exp(-30, 30);
            a = make(ea, 23), b = make(eb, 23), c = ec >= 1 && ec <= 254 ? make(ec, 23) : 0.0f;
            break;
        }
        case 2: { /* short mantissas: products of at most 26 bits, often a float midpoint, plus a far smaller
                   * addend (or zero): the double sum is the midpoint, the exact sum is not */
            const int ea = rand_exp(100, 150), eb = rand_exp(100, 150);
            a = make(ea, 12), b = make(eb, 12);
            const int ec = ea + eb - 127 - rand_exp(24, 80);
            c = i % 12 == 2 ? 0.0f : ec >= 1 ? make(ec, 23) : FLT_TRUE_MIN;
            break;
        }
        case 3: { /* results in and around the subnormal range */
            const int ea = rand_exp(1, 70), eb = rand_exp(20, 127);
            a = make(ea, i % 4 == 3 ? 10 : 23), b = make(eb, 23), c = make(rand_exp(0, 3), 23);
            break;
        }
        case 4: { /* results around FLT_MAX: overflow to inf or not */
            const int ea = rand_exp(120, 254), eb = 254 + 127 - ea + rand_exp(-1, 1);
            a = make(ea, 23), b = make(eb < 1 ? 1 : eb > 254 ? 254 : eb, 23), c = make(rand_exp(230, 254), 23);
            break;
        }
        default: { /* the reference kernels' own operands: int8 dot sums times scales, accumulated */
            a = (float)((int32_t)(next32() % 2000001u) - 1000000), b = make(rand_exp(100, 130), 23);
            c = make(rand_exp(110, 150), 23);
            break;
        }
        }
        check(a, b, c);
    }
    printf("cases %llu hash %016llx\n", (unsigned long long)cases, (unsigned long long)hash);
    printf("dg_fmaf_soft differs from dg_fmaf: %llu\n", (unsigned long long)soft_differ);
    printf("the double sum rounded to float differs: %llu\n", (unsigned long long)naive_differ);
#ifdef WITH_LIBM_FMAF
    printf("libm fmaf differs: %llu\n", (unsigned long long)differ);
#endif
    return 0;
}
