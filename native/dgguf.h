/* dgguf.h: the whole contract between Python (cffi) and the native library.
 *
 * Every function takes explicit sizes, returns 0 on success or a negative
 * DG_E* code, and writes a one-line message into err (errlen bytes) on
 * failure. Library code never aborts or exits.
 */
#ifndef DGGUF_H
#define DGGUF_H

#include <stddef.h>
#include <stdint.h>

/* ggml type numbers, as stored in GGUF tensor infos. */
enum dg_type {
    DG_TYPE_F32  = 0,
    DG_TYPE_F16  = 1,
    DG_TYPE_Q4_0 = 2,
    DG_TYPE_Q4_1 = 3,
    DG_TYPE_Q5_0 = 6,
    DG_TYPE_Q5_1 = 7,
    DG_TYPE_Q8_0 = 8,
    DG_TYPE_Q2_K = 10,
    DG_TYPE_Q3_K = 11,
    DG_TYPE_Q4_K = 12,
    DG_TYPE_Q5_K = 13,
    DG_TYPE_Q6_K = 14,
    DG_TYPE_BF16 = 30
};

enum dg_status {
    DG_OK = 0,
    DG_E_TYPE = -1,   /* unknown or unsupported type */
    DG_E_SHAPE = -2,  /* row length not a multiple of the block size, or a negative size */
    DG_E_VALUE = -3   /* non-finite input where the format cannot hold it */
};

/* Block size (values per block) and bytes per block of a type. */
int dg_type_size(int type, int64_t *block_size, int64_t *type_size, char *err, size_t errlen);

/* Quantize nrows rows of ncols floats each (row-major) into dst, which must hold
 * nrows * (ncols / block_size) * type_size bytes. Reference quality (no importance matrix). */
int dg_quantize_rows(int type, const float *src, void *dst, int64_t nrows, int64_t ncols,
                     char *err, size_t errlen);

/* Inverse of dg_quantize_rows: nrows * ncols floats into dst. */
int dg_dequantize_rows(int type, const void *src, float *dst, int64_t nrows, int64_t ncols,
                       char *err, size_t errlen);

/* Widen n bfloat16 values (raw uint16 bits) to float32. */
void dg_bf16_to_f32(const uint16_t *src, float *dst, int64_t n);

/* Comma-separated CPU features the dispatcher found ("avx2,fma,avx512f,avx512vnni" or "scalar"). */
const char *dg_cpu_features(void);

#endif
