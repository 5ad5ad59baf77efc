/* compat.h: what POSIX and Windows (mingw-w64) spell differently, and an fmaf that is the same everywhere.
 * Internal to the native library; Python never calls these.
 *
 * Windows x64 builds with mingw-w64's GCC (the same compiler as Linux: vector extensions, target attributes,
 * __builtin_cpu_supports, VLAs, C11 atomics; winpthreads gives pthreads). What differs there:
 * - no ifunc, so no target_clones: quant_internal.h's DG_CLONES is empty on Windows (those loops compile for
 *   baseline x86-64; they give the same bits, see there) while the matmul and attention kernels keep their run
 *   time dispatch (cpu.c's probe, gemm.c's table);
 * - no sysconf(_SC_NPROCESSORS_ONLN) and no aligned_alloc: dg_cpu_count, dg_aligned_alloc, dg_aligned_free
 *   (cpu.c); memory from dg_aligned_alloc must go back through dg_aligned_free (_aligned_free on Windows);
 * - mingw's fmaf is not correctly rounded (glibc's is), and the reference kernels' bits must equal the SIMD
 *   kernels' hardware FMA on every platform: dg_fmaf below.
 */
#ifndef DGGUF_COMPAT_H
#define DGGUF_COMPAT_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

long dg_cpu_count(void);                            /* online CPUs; <= 0 when unknown */
void *dg_aligned_alloc(size_t align, size_t bytes); /* bytes a multiple of align (a power of two) */
void dg_aligned_free(void *p);

/* a * b + c rounded once to nearest even, as IEEE 754's fusedMultiplyAdd (hardware FMA, glibc's fmaf): without
 * libm. The float product is exact in double (24 + 24 bits), so only s = p + c rounds, and rounding s to float is
 * right unless s is a float midpoint that is not exact (x = p + c lies off it, while s sits on it): every other
 * double lies on the same side of each midpoint as x (midpoints are doubles and s is the double nearest x). A
 * midpoint of the normal float range has 25 significant bits, its low 29 bits a 1 and 28 zeros. Such an s, and any
 * below FLT_MIN (subnormal midpoints have fewer bits; zero too), is rounded to odd at double precision instead
 * (TwoSum gives the sum's exact error e; a nonzero e steps an even s one ulp toward x), then to float: rounding to
 * odd with 2 or more extra bits, then to nearest, is rounding to nearest of the exact value (Boldo & Melquiond),
 * overflow included. Infinities and NaNs pass through the double operations as fmaf's do. Each step is its own
 * statement so that no compiler contracts them (-std=c11 keeps them unfused anyway). The common case is a branch
 * that predicts well, two conversions and an add: faster than a call to glibc's fmaf. */
static inline float dg_fmaf_soft(float a, float b, float c) {
    const double p = (double)a * (double)b;
    const double s = p + (double)c;
    uint64_t bits;
    memcpy(&bits, &s, sizeof bits);
    if ((bits & 0x1fffffffu) != 0x10000000u && (bits & 0x7fffffffffffffffull) >= 0x3810000000000000ull)
        return (float)s;                          /* not a midpoint, |s| >= 2^-126: the common case */
    const double sp = s - p;
    const double ep = p - (s - sp);
    const double ec = (double)c - sp;
    const double e = ep + ec;
    if (e != 0.0 && (bits & 0x7ff0000000000000ull) != 0x7ff0000000000000ull && !(bits & 1)) {
        /* s != 0 here (an exact zero sum has e == 0); |s| one ulp up or down, toward x */
        if ((e > 0) == (s > 0)) bits++;
        else bits--;
        double odd;
        memcpy(&odd, &bits, sizeof odd);
        return (float)odd;
    }
    return (float)s;
}

/* Where the compiler targets an FMA instruction (aarch64, -mfma), that instruction is the same rounding. */
static inline float dg_fmaf(float a, float b, float c) {
#if defined(__FP_FAST_FMAF)
    return __builtin_fmaf(a, b, c);
#else
    return dg_fmaf_soft(a, b, c);
#endif
}

#endif
