/* Quantize a deterministic matrix with every type; print a hash of the bytes and of the dequantized floats.
 * scripts/check_arm64.sh runs it natively and as an arm64 binary under qemu: the hashes must agree. */
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <string.h>
#include "dgguf.h"
int main(void) {
    int types[] = {0,1,30,2,3,6,7,8,10,11,12,13,14};
    int64_t rows = 16, cols = 2816;
    float *x = malloc(rows*cols*4), *y = malloc(rows*cols*4);
    uint32_t s = 12345;
    for (int64_t i = 0; i < rows*cols; i++) { s = s*1664525u + 1013904223u; x[i] = ((int32_t)s / 2147483648.0f) * 0.05f; }
    char err[256];
    for (unsigned t = 0; t < sizeof types/sizeof *types; t++) {
        int64_t bs, ts; dg_type_size(types[t], &bs, &ts, err, 256);
        size_t nb = rows*(cols/bs)*ts; uint8_t *q = malloc(nb);
        if (dg_quantize_rows(types[t], x, q, rows, cols, err, 256)) { printf("err %s\n", err); return 1; }
        dg_dequantize_rows(types[t], q, y, rows, cols, err, 256);
        uint64_t h = 1469598103934665603ull;
        for (size_t i = 0; i < nb; i++) h = (h ^ q[i]) * 1099511628211ull;
        const uint8_t *yb = (const uint8_t *)y;
        for (size_t i = 0; i < (size_t)(rows*cols*4); i++) h = (h ^ yb[i]) * 1099511628211ull;
        printf("type %2d %016llx\n", types[t], (unsigned long long)h);
        free(q);
    }
    return 0;
}
