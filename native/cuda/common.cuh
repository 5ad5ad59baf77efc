/* common.cuh: what the CUDA sources share: error macros, the type switch, the scratch arena and the device
 * dequantizers (16 consecutive values of a row at a time, bit-identical to quant.c / quant_k.c).
 *
 * Bit-identity: the CPU dequantizers compile with -std=c11, so no multiply-add is fused; nvcc fuses by
 * default, so every product and sum here is spelled __fmul_rn / __fadd_rn / __fsub_rn (never contracted).
 */
#ifndef DG_CUDA_COMMON_CUH
#define DG_CUDA_COMMON_CUH

#include <cuda_runtime.h>
#include <stdio.h>

#include "dg_cuda.h"
extern "C" {
#include "../backend.h"
#include "../quant_internal.h"
}

#define FAIL(code, ...) do { snprintf(err, errlen, __VA_ARGS__); return (code); } while (0)

/* Every CUDA call is checked: the message names the call and where it was made. */
#define CU(call)                                                                                              \
    do {                                                                                                      \
        cudaError_t e_ = (call);                                                                              \
        if (e_ != cudaSuccess)                                                                                \
            FAIL(DG_E_CUDA, "%s failed: %s (%s:%d)", #call, cudaGetErrorString(e_), __FILE__, __LINE__);     \
    } while (0)

/* After a launch: a bad configuration is reported here; faults inside the kernel at the next synchronize. */
#define LAUNCHED() CU(cudaGetLastError())

/* The types the library reads, for a switch over template instantiations. */
#define DG_ALL_TYPES(X)                                                                                       \
    X(DG_TYPE_F32) X(DG_TYPE_F16) X(DG_TYPE_BF16) X(DG_TYPE_Q8_0) X(DG_TYPE_Q4_0) X(DG_TYPE_Q4_1)            \
    X(DG_TYPE_Q5_0) X(DG_TYPE_Q5_1) X(DG_TYPE_Q2_K) X(DG_TYPE_Q3_K) X(DG_TYPE_Q4_K) X(DG_TYPE_Q5_K)          \
    X(DG_TYPE_Q6_K)

static inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

/* Bytes of one row of ncols values in type (0: unknown type or ncols not whole blocks). */
static inline size_t row_bytes_of(int type, int64_t ncols) {
    int64_t bs, ts;
    char e[8];
    if (dg_type_size(type, &bs, &ts, e, sizeof e) != 0 || ncols < 1 || ncols % bs) return 0;
    return (size_t)(ncols / bs * ts);
}

/* Scratch arena (ops.cu): slot i holds at least bytes; contents do not survive another call for the same slot. */
enum { SCR_A, SCR_B, SCR_C, SCR_D, SCR_E, SCR_F, SCR_G, SCR_H, SCR_SLOTS };
int scratch(int slot, size_t bytes, void **ptr, char *err, size_t errlen);

/* gemm.cu: out rows [group_off[e], group_off[e+1]) = x rows (x_rows[row], or row itself when NULL) times matrix e
 * of w, for every e < w->ne2; max_tokens bounds any one group, tokens is the total (dgc_moe's two matmuls). */
int grouped_matmul(int kind, const dg_tensor *w, const float *x, int64_t ldx, const int32_t *x_rows,
                   const int32_t *group_off, int64_t max_tokens, int64_t tokens, float *out, char *err,
                   size_t errlen);

/* ---- device dequantizers: y[0..15] = values k..k+15 of a row (k a multiple of 16) ------------------------- */

__device__ __forceinline__ float h2f(uint16_t h) { return dg_f16_to_f32(h); }

template <int T> __device__ __forceinline__ void dq16(const uint8_t *row, int64_t k, float *y);

template <> __device__ __forceinline__ void dq16<DG_TYPE_F32>(const uint8_t *row, int64_t k, float *y) {
    const float *r = (const float *)row + k;
    for (int i = 0; i < 16; i++) y[i] = r[i];
}

template <> __device__ __forceinline__ void dq16<DG_TYPE_F16>(const uint8_t *row, int64_t k, float *y) {
    const uint16_t *r = (const uint16_t *)row + k;
    for (int i = 0; i < 16; i++) y[i] = h2f(r[i]);
}

template <> __device__ __forceinline__ void dq16<DG_TYPE_BF16>(const uint8_t *row, int64_t k, float *y) {
    const uint16_t *r = (const uint16_t *)row + k;
    for (int i = 0; i < 16; i++) y[i] = __uint_as_float((uint32_t)r[i] << 16);
}

template <> __device__ __forceinline__ void dq16<DG_TYPE_Q8_0>(const uint8_t *row, int64_t k, float *y) {
    const block_q8_0 *b = (const block_q8_0 *)row + k / QK8_0;
    const int j0 = (int)(k % QK8_0);
    const float d = h2f(b->d);
    for (int i = 0; i < 16; i++) y[i] = __fmul_rn((float)b->qs[j0 + i], d);
}

/* Q4_0 / Q4_1: values 0..15 are the low nibbles of qs, 16..31 the high nibbles. */
template <> __device__ __forceinline__ void dq16<DG_TYPE_Q4_0>(const uint8_t *row, int64_t k, float *y) {
    const block_q4_0 *b = (const block_q4_0 *)row + k / QK4_0;
    const int shift = (k % QK4_0) ? 4 : 0;
    const float d = h2f(b->d);
    for (int i = 0; i < 16; i++) y[i] = __fmul_rn(d, (float)(((b->qs[i] >> shift) & 0xf) - 8));
}

template <> __device__ __forceinline__ void dq16<DG_TYPE_Q4_1>(const uint8_t *row, int64_t k, float *y) {
    const block_q4_1 *b = (const block_q4_1 *)row + k / QK4_1;
    const int shift = (k % QK4_1) ? 4 : 0;
    const float d = h2f(b->d), m = h2f(b->m);
    for (int i = 0; i < 16; i++) y[i] = __fadd_rn(__fmul_rn(d, (float)((b->qs[i] >> shift) & 0xf)), m);
}

/* Q5_0 / Q5_1: value j's fifth bit is bit j of the little-endian qh. */
__device__ __forceinline__ uint32_t load_qh32(const uint8_t *qh) {
    return (uint32_t)qh[0] | (uint32_t)qh[1] << 8 | (uint32_t)qh[2] << 16 | (uint32_t)qh[3] << 24;
}

template <> __device__ __forceinline__ void dq16<DG_TYPE_Q5_0>(const uint8_t *row, int64_t k, float *y) {
    const block_q5_0 *b = (const block_q5_0 *)row + k / QK5_0;
    const int j0 = (int)(k % QK5_0), shift = j0 ? 4 : 0;
    const uint32_t qh = load_qh32(b->qh);
    const float d = h2f(b->d);
    for (int i = 0; i < 16; i++) {
        const int q = ((b->qs[i] >> shift) & 0xf) | (int)((qh >> (j0 + i)) & 1) << 4;
        y[i] = __fmul_rn(d, (float)(q - 16));
    }
}

template <> __device__ __forceinline__ void dq16<DG_TYPE_Q5_1>(const uint8_t *row, int64_t k, float *y) {
    const block_q5_1 *b = (const block_q5_1 *)row + k / QK5_1;
    const int j0 = (int)(k % QK5_1), shift = j0 ? 4 : 0;
    const uint32_t qh = load_qh32(b->qh);
    const float d = h2f(b->d), m = h2f(b->m);
    for (int i = 0; i < 16; i++) {
        const int q = ((b->qs[i] >> shift) & 0xf) | (int)((qh >> (j0 + i)) & 1) << 4;
        y[i] = __fadd_rn(__fmul_rn(d, (float)q), m);
    }
}

/* Q2_K / Q3_K: chunk c = v / 16 of the 256 values is (h, j, g) = (c / 8, (c % 8) / 2, c % 2); its 2-bit
 * values are bits 2j..2j+1 of qs[32h + 16g + l]; its scale is scales[c] (Q3_K: the 6-bit signed scale c). */
template <> __device__ __forceinline__ void dq16<DG_TYPE_Q2_K>(const uint8_t *row, int64_t k, float *y) {
    const block_q2_K *b = (const block_q2_K *)row + k / QK_K;
    const int c = (int)(k % QK_K) / 16, h = c / 8, j = (c % 8) / 2, g = c % 2;
    const uint8_t sc = b->scales[c];
    const float dl = __fmul_rn(h2f(b->d), (float)(sc & 0xf)), ml = __fmul_rn(h2f(b->dmin), (float)(sc >> 4));
    const uint8_t *q = b->qs + 32 * h + 16 * g;
    for (int l = 0; l < 16; l++) y[l] = __fsub_rn(__fmul_rn(dl, (float)((q[l] >> (2 * j)) & 3)), ml);
}

template <> __device__ __forceinline__ void dq16<DG_TYPE_Q3_K>(const uint8_t *row, int64_t k, float *y) {
    const block_q3_K *b = (const block_q3_K *)row + k / QK_K;
    const int c = (int)(k % QK_K) / 16, h = c / 8, j = (c % 8) / 2, g = c % 2;
    const int lo = (b->scales[c % 8] >> (4 * (c / 8))) & 0xf, hi = (b->scales[8 + c % 4] >> (2 * (c / 4))) & 3;
    const float dl = __fmul_rn(h2f(b->d), (float)((lo | hi << 4) - 32));
    const uint8_t *q = b->qs + 32 * h + 16 * g, *m = b->hmask + 16 * g;
    for (int l = 0; l < 16; l++) {
        const int v = ((q[l] >> (2 * j)) & 3) - (((m[l] >> (4 * h + j)) & 1) ? 0 : 4);
        y[l] = __fmul_rn(dl, (float)v);
    }
}

/* Q4_K / Q5_K: sub-block s = v / 32 uses the nibbles of qs[32 (s / 2) + l] (low for even s), Q5_K's fifth bit
 * is bit s of qh[l]; its scale dl and min ml come from the shared 12-byte packing. */
__device__ __forceinline__ void k4_sub_scale(uint16_t d, uint16_t dmin, const uint8_t *scales, int s, float *dl,
                                             float *ml) {
    uint8_t ls[8], lm[8];
    unpack_scales_k4(scales, ls, lm);
    *dl = __fmul_rn(h2f(d), (float)ls[s]);
    *ml = __fmul_rn(h2f(dmin), (float)lm[s]);
}

template <> __device__ __forceinline__ void dq16<DG_TYPE_Q4_K>(const uint8_t *row, int64_t k, float *y) {
    const block_q4_K *b = (const block_q4_K *)row + k / QK_K;
    const int v = (int)(k % QK_K), s = v / 32, l0 = v % 32, shift = 4 * (s % 2);
    float dl, ml;
    k4_sub_scale(b->d, b->dmin, b->scales, s, &dl, &ml);
    const uint8_t *qs = b->qs + 32 * (s / 2) + l0;
    for (int i = 0; i < 16; i++) y[i] = __fsub_rn(__fmul_rn(dl, (float)((qs[i] >> shift) & 0xf)), ml);
}

template <> __device__ __forceinline__ void dq16<DG_TYPE_Q5_K>(const uint8_t *row, int64_t k, float *y) {
    const block_q5_K *b = (const block_q5_K *)row + k / QK_K;
    const int v = (int)(k % QK_K), s = v / 32, l0 = v % 32, shift = 4 * (s % 2);
    float dl, ml;
    k4_sub_scale(b->d, b->dmin, b->scales, s, &dl, &ml);
    const uint8_t *qs = b->qs + 32 * (s / 2) + l0, *qh = b->qh + l0;
    for (int i = 0; i < 16; i++) {
        const int q = ((qs[i] >> shift) & 0xf) | ((qh[i] >> s) & 1) << 4;
        y[i] = __fsub_rn(__fmul_rn(dl, (float)q), ml);
    }
}

/* Q6_K: half h (128 values) uses ql + 64h, qh + 32h, scales + 8h; its quarter qd (32 values) takes the low
 * (qd < 2) or high nibble of ql[l + 32 (qd % 2)] and bits 2qd..2qd+1 of qh[l]; scale index g + 2qd, g = l / 16. */
template <> __device__ __forceinline__ void dq16<DG_TYPE_Q6_K>(const uint8_t *row, int64_t k, float *y) {
    const block_q6_K *b = (const block_q6_K *)row + k / QK_K;
    const int v = (int)(k % QK_K), h = v / 128, qd = (v % 128) / 32, l0 = v % 32;
    const uint8_t *ql = b->ql + 64 * h + 32 * (qd % 2) + l0, *qh = b->qh + 32 * h + l0;
    const float s = __fmul_rn(h2f(b->d), (float)b->scales[8 * h + l0 / 16 + 2 * qd]);
    const int shift = qd < 2 ? 0 : 4;
    for (int i = 0; i < 16; i++) {
        const int q = ((ql[i] >> shift) & 0xf) | ((qh[i] >> (2 * qd)) & 3) << 4;
        y[i] = __fmul_rn(s, (float)(q - 32));
    }
}

/* Float types may have rows that are not whole 16-value chunks; they are converted one value at a time. */
template <int T> __device__ __forceinline__ float dq1(const uint8_t *row, int64_t k) {
    if (T == DG_TYPE_F32) return ((const float *)row)[k];
    if (T == DG_TYPE_F16) return h2f(((const uint16_t *)row)[k]);
    return __uint_as_float((uint32_t)((const uint16_t *)row)[k] << 16);
}

static inline bool is_float_type(int type) {
    return type == DG_TYPE_F32 || type == DG_TYPE_F16 || type == DG_TYPE_BF16;
}

/* The whole row (ncols values) into y, shared by the block's threads. */
template <int T> __device__ void dq_row(const uint8_t *row, int64_t ncols, float *y) {
    if (ncols % 16 == 0 || !(T == DG_TYPE_F32 || T == DG_TYPE_F16 || T == DG_TYPE_BF16)) {
        for (int64_t c = threadIdx.x; c < ncols / 16; c += blockDim.x) dq16<T>(row, 16 * c, y + 16 * c);
    } else {
        for (int64_t k = threadIdx.x; k < ncols; k += blockDim.x) y[k] = dq1<T>(row, k);
    }
}

#endif
