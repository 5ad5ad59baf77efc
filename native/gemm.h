/* gemm.h: the matmul inner kernel (native/gemm.c), internal to the native library. */
#ifndef DGGUF_GEMM_H
#define DGGUF_GEMM_H

#include <stdint.h>

#include "dgguf.h"

/* out[t * ldo + r] = x[t, :] . w[r][:] for t < nt, r < nr (nr <= 4), rows and tokens k floats long. */
typedef void (*tile_fn)(float *out, int64_t ldo, const float *x, int64_t nt, const float *const *w, int nr,
                        int64_t k);

/* acc[t * h + i] += sum over v < nv (ascending) of p[t * nv + v] * w[v * h + i], in double, t < nt, i < h. */
typedef void (*axpy_fn)(double *acc, const float *p, const float *w, int64_t nt, int64_t nv, int64_t h);

/* y[i] += a * x[i], i < n. */
typedef void (*axpy_f32_fn)(float *y, float a, const float *x, int64_t n);

/* The reference dot product (8 lanes, fixed order). */
float dot_ref(const float *a, const float *b, int64_t n);

/* The active kernels. */
tile_fn matmul_tile(void);
axpy_fn soft_embed_axpy(void);
axpy_f32_fn attention_axpy(void);

#endif
