/* cpu.c: run-time CPU feature detection for the kernel dispatchers, and compat.h's CPU count and aligned
 * memory. */
#ifndef _WIN32
#define _POSIX_C_SOURCE 200809L   /* sysconf */
#endif
#include <pthread.h>
#include <stdlib.h>

#include "compat.h"
#include "dgguf.h"

#ifdef _WIN32
#include <malloc.h>
#include <windows.h>
#else
#include <unistd.h>
#endif

static char features[96] = "scalar";
static pthread_once_t features_once = PTHREAD_ONCE_INIT;

static void detect_features(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    int avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                 __builtin_cpu_supports("avx512vl");
    int vnni = avx512 && __builtin_cpu_supports("avx512vnni");
    int bf16 = vnni && __builtin_cpu_supports("avx512bf16");
    const char *names[] = {"avx2,fma", ",avx512f,avx512bw,avx512vl", ",avx512vnni", ",avx512bf16"};
    int have[] = {avx2, avx512, vnni, bf16};
    char *p = features;
    for (int i = 0; i < 4 && have[i]; i++)
        for (const char *s = names[i]; *s; s++) *p++ = *s;
    if (p != features) *p = 0;
#endif
}

const char *dg_cpu_features(void) {
    pthread_once(&features_once, detect_features);
    return features;
}

long dg_cpu_count(void) {
#ifdef _WIN32
    return (long)GetActiveProcessorCount(ALL_PROCESSOR_GROUPS);
#else
    return sysconf(_SC_NPROCESSORS_ONLN);
#endif
}

void *dg_aligned_alloc(size_t align, size_t bytes) {
#ifdef _WIN32
    return _aligned_malloc(bytes, align);
#else
    return aligned_alloc(align, bytes);
#endif
}

void dg_aligned_free(void *p) {
#ifdef _WIN32
    _aligned_free(p);
#else
    free(p);
#endif
}
