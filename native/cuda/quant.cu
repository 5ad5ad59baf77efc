/* quant.cu: dequantization on the device (twin: dg_dequantize_rows, bit-identical) and random blocks
 * generated on the device (for the throughput driver, which never uploads the real model's 15 GB). */
#include <cuda_fp16.h>

#include "common.cuh"

/* One thread per 16-value chunk. */
template <int T>
__global__ void dequantize_chunks(const uint8_t *src, float *dst, int64_t nrows, int64_t ncols, size_t rb) {
    const int64_t chunks = ncols / 16, i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= nrows * chunks) return;
    const int64_t r = i / chunks, k = (i % chunks) * 16;
    dq16<T>(src + (size_t)r * rb, k, dst + r * ncols + k);
}

template <int T>
__global__ void dequantize_values(const uint8_t *src, float *dst, int64_t nrows, int64_t ncols, size_t rb) {
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= nrows * ncols) return;
    const int64_t r = i / ncols, k = i % ncols;
    dst[i] = dq1<T>(src + (size_t)r * rb, k);
}

extern "C" int dgc_dequantize_rows(int type, const void *src, float *dst, int64_t nrows, int64_t ncols, char *err,
                                   size_t errlen) {
    if (nrows < 0 || ncols < 1) FAIL(DG_E_SHAPE, "dgc_dequantize_rows: shape [%lld, %lld]", (long long)nrows,
                                     (long long)ncols);
    const size_t rb = row_bytes_of(type, ncols);
    if (rb == 0) FAIL(DG_E_TYPE, "dgc_dequantize_rows: type %d cannot hold rows of %lld values", type,
                      (long long)ncols);
    if (nrows == 0) return DG_OK;
    const uint8_t *s = (const uint8_t *)src;
    const int threads = 256;
    if (ncols % 16 == 0) {
        const int64_t blocks = cdiv(nrows * (ncols / 16), threads);
        switch (type) {
#define CASE(T) case T: dequantize_chunks<T><<<(unsigned)blocks, threads>>>(s, dst, nrows, ncols, rb); break;
            DG_ALL_TYPES(CASE)
#undef CASE
        }
    } else {
        if (!is_float_type(type)) FAIL(DG_E_SHAPE, "dgc_dequantize_rows: %lld columns", (long long)ncols);
        const int64_t blocks = cdiv(nrows * ncols, threads);
        switch (type) {
        case DG_TYPE_F32: dequantize_values<DG_TYPE_F32><<<(unsigned)blocks, threads>>>(s, dst, nrows, ncols, rb); break;
        case DG_TYPE_F16: dequantize_values<DG_TYPE_F16><<<(unsigned)blocks, threads>>>(s, dst, nrows, ncols, rb); break;
        default: dequantize_values<DG_TYPE_BF16><<<(unsigned)blocks, threads>>>(s, dst, nrows, ncols, rb); break;
        }
    }
    LAUNCHED();
    return DG_OK;
}

/* ---- random blocks ------------------------------------------------------------------------------------ */

__device__ __forceinline__ uint64_t splitmix64(uint64_t x) {
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

/* Uniform in [0, 1) from (seed, index). */
__device__ __forceinline__ float uniform01(uint64_t seed, uint64_t i) {
    return (float)(splitmix64(seed ^ splitmix64(i)) >> 40) * (1.0f / 16777216.0f);
}

__device__ __forceinline__ void put_half(uint8_t *p, float v) {
    const uint16_t h = __half_as_ushort(__float2half_rn(v));
    p[0] = (uint8_t)h;
    p[1] = (uint8_t)(h >> 8);
}

/* Where a block keeps its f16 scale (d) and its min (dmin / m; -1: none), the levels a unit scale spans (so
 * values land near +-amp) and the min as a multiple of d that centres them. */
struct scale_fields { int d, m; float levels, min_ratio; };

static scale_fields fields_of(int type) {
    switch (type) {
    case DG_TYPE_Q8_0: return {0, -1, 127.0f, 0.0f};
    case DG_TYPE_Q4_0: return {0, -1, 8.0f, 0.0f};
    case DG_TYPE_Q4_1: return {0, 2, 15.0f, -7.5f};
    case DG_TYPE_Q5_0: return {0, -1, 16.0f, 0.0f};
    case DG_TYPE_Q5_1: return {0, 2, 31.0f, -15.5f};
    case DG_TYPE_Q2_K: return {(int)offsetof(block_q2_K, d), (int)offsetof(block_q2_K, dmin), 45.0f, 1.5f};
    case DG_TYPE_Q3_K: return {(int)offsetof(block_q3_K, d), -1, 128.0f, 0.0f};
    case DG_TYPE_Q4_K: return {0, 2, 945.0f, 7.5f};
    case DG_TYPE_Q5_K: return {0, 2, 1953.0f, 15.5f};
    default: return {(int)offsetof(block_q6_K, d), -1, 1024.0f, 0.0f};   /* Q6_K */
    }
}

/* One thread per block: hashed bytes, then the scale fields. */
__global__ void fill_blocks(uint8_t *data, int64_t nblocks, int type_size, scale_fields f, uint64_t seed,
                            float amp) {
    const int64_t b = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (b >= nblocks) return;
    uint8_t *p = data + b * type_size;
    for (int i = 0; i < type_size; i += 8) {
        const uint64_t r = splitmix64(seed + (uint64_t)b * 64 + (uint64_t)i);
        for (int j = 0; j < 8 && i + j < type_size; j++) p[i + j] = (uint8_t)(r >> (8 * j));
    }
    const float d = amp / f.levels * (0.5f + 0.5f * uniform01(seed ^ 0x5ca1eull, (uint64_t)b));
    put_half(p + f.d, d);
    if (f.m >= 0) put_half(p + f.m, f.min_ratio * d);
}

/* One thread per value: amp * [-1, 1), plus `base`. */
__global__ void fill_floats(uint8_t *data, int64_t count, int type, uint64_t seed, float amp, float base) {
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= count) return;
    const float v = base + amp * (2.0f * uniform01(seed, (uint64_t)i) - 1.0f);
    if (type == DG_TYPE_F32) {
        ((float *)data)[i] = v;
    } else if (type == DG_TYPE_F16) {
        put_half(data + 2 * i, v);
    } else {   /* BF16: round to nearest even (v is finite) */
        const uint32_t u = __float_as_uint(v);
        ((uint16_t *)data)[i] = (uint16_t)((u + 0x7fffu + ((u >> 16) & 1)) >> 16);
    }
}

extern "C" int dgc_fill_random(int type, void *data, int64_t nrows, int64_t ncols, uint64_t seed, float amp,
                               char *err, size_t errlen) {
    const size_t rb = row_bytes_of(type, ncols);
    if (rb == 0 || nrows < 0) FAIL(DG_E_TYPE, "dgc_fill_random: type %d, shape [%lld, %lld]", type,
                                   (long long)nrows, (long long)ncols);
    if (nrows == 0) return DG_OK;
    const int threads = 256;
    if (is_float_type(type)) {
        const int64_t count = nrows * ncols;
        const float base = (type == DG_TYPE_F32 && nrows == 1) ? 1.0f : 0.0f;   /* norm weights near 1 */
        fill_floats<<<(unsigned)cdiv(count, threads), threads>>>((uint8_t *)data, count, type, seed, amp, base);
    } else {
        int64_t bs, ts;
        dg_type_size(type, &bs, &ts, err, errlen);
        const int64_t nblocks = nrows * (ncols / bs);
        fill_blocks<<<(unsigned)cdiv(nblocks, threads), threads>>>((uint8_t *)data, nblocks, (int)ts,
                                                                    fields_of(type), seed, amp);
    }
    LAUNCHED();
    return DG_OK;
}
