/* cpu.c: run-time CPU feature detection for the kernel dispatchers. */
#include "dgguf.h"

const char *dg_cpu_features(void) {
#if defined(__x86_64__) || defined(__i386__)
    static char buf[96];
    if (buf[0]) return buf;
    __builtin_cpu_init();
    int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    int avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
    int vnni = avx512 && __builtin_cpu_supports("avx512vnni");
    char *p = buf;
    const char *names[] = {"avx2,fma", ",avx512f,avx512bw", ",avx512vnni"};
    int have[] = {avx2, avx512, vnni};
    for (int i = 0; i < 3 && have[i]; i++)
        for (const char *s = names[i]; *s; s++) *p++ = *s;
    if (p == buf)
        for (const char *s = "scalar"; *s; s++) *p++ = *s;
    *p = 0;
    return buf;
#else
    return "scalar";
#endif
}
