/* quant.c: placeholder until the quantizers land (replaced wholesale). */
#include <stdio.h>
#include <string.h>
#include "dgguf.h"

int dg_type_size(int type, int64_t *block_size, int64_t *type_size, char *err, size_t errlen) {
    switch (type) {
    case DG_TYPE_F32: *block_size = 1; *type_size = 4; return DG_OK;
    default: snprintf(err, errlen, "type %d is not supported", type); return DG_E_TYPE;
    }
}
int dg_quantize_rows(int type, const float *src, void *dst, int64_t nrows, int64_t ncols, char *err, size_t errlen) {
    if (type == DG_TYPE_F32) { memcpy(dst, src, (size_t)(nrows * ncols) * 4); return DG_OK; }
    snprintf(err, errlen, "type %d is not supported", type); return DG_E_TYPE;
}
int dg_dequantize_rows(int type, const void *src, float *dst, int64_t nrows, int64_t ncols, char *err, size_t errlen) {
    if (type == DG_TYPE_F32) { memcpy(dst, src, (size_t)(nrows * ncols) * 4); return DG_OK; }
    snprintf(err, errlen, "type %d is not supported", type); return DG_E_TYPE;
}
void dg_bf16_to_f32(const uint16_t *src, float *dst, int64_t n) {
    for (int64_t i = 0; i < n; i++) { uint32_t u = (uint32_t)src[i] << 16; memcpy(dst + i, &u, 4); }
}
