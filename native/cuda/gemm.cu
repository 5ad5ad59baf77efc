/* gemm.cu: matmul against a stored (quantized) weight, dense and grouped by expert, and the soft embedding.
 *
 * Two flavours of each, chosen per call:
 * - plain: each weight row is dequantized once into shared memory and every output is dot_ref's fixed order
 *   (eight float lanes, no fused multiply-add), so it has the CPU reference kernel's bits (twin: matmul);
 * - tf32: tensor cores (wmma m16n16k8, TF32 inputs, fp32 accumulation) on tiles of 64 weight rows x 32
 *   values dequantized into shared memory, BM tokens at a time (64, or 16 for the small expert groups).
 *   TF32 keeps 10 mantissa bits: each product carries ~2^-10 relative error, so |tf32 - fp32| stays below
 *   ~2e-3 of sum |x_i w_i| (check.cu holds it to that).
 */
#include <mma.h>

#include <algorithm>

#include "common.cuh"

using namespace nvcuda;

/* One matmul or a group of them (one per expert). Tokens of matrix e are rows [begin, end) of out: dense, e = 0
 * and [0, ntok); grouped, [group_off[e], group_off[e + 1]). Token row p reads x row x_rows ? x_rows[p] : p. */
struct gemm_args {
    float *out;
    int64_t ldo;
    const float *x;
    int64_t ldx;
    const int32_t *x_rows;
    const uint8_t *w;
    size_t row_bytes, mat_bytes;
    int64_t nrows, K, ntok;
    const int32_t *group_off;
};

__device__ __forceinline__ void token_range(const gemm_args &a, int e, int64_t *begin, int64_t *end) {
    if (a.group_off) {
        *begin = a.group_off[e];
        *end = a.group_off[e + 1];
    } else {
        *begin = 0;
        *end = a.ntok;
    }
}

/* dot_ref (gemm.c) in the same order: eight lanes, then ((0+4) + (1+5)) + ((2+6) + (3+7)). */
__device__ float dot_ref_dev(const float *a, const float *b, int64_t n) {
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++) acc[j] = __fadd_rn(acc[j], __fmul_rn(a[i + j], b[i + j]));
    for (int j = 0; i < n; i++, j++) acc[j] = __fadd_rn(acc[j], __fmul_rn(a[i], b[i]));
    return __fadd_rn(__fadd_rn(__fadd_rn(acc[0], acc[4]), __fadd_rn(acc[1], acc[5])),
                     __fadd_rn(__fadd_rn(acc[2], acc[6]), __fadd_rn(acc[3], acc[7])));
}

/* Block (row r, -, matrix e): dequantize weight row r once into shared memory, then every token of the group. */
template <int T> __global__ void matmul_plain(gemm_args a) {
    extern __shared__ float wrow[];
    const int64_t r = blockIdx.x;
    const int e = blockIdx.z;
    int64_t begin, end;
    token_range(a, e, &begin, &end);
    if (begin >= end) return;
    dq_row<T>(a.w + (size_t)e * a.mat_bytes + (size_t)r * a.row_bytes, a.K, wrow);
    __syncthreads();
    for (int64_t p = begin + threadIdx.x; p < end; p += blockDim.x) {
        const int64_t xr = a.x_rows ? a.x_rows[p] : p;
        a.out[p * a.ldo + r] = dot_ref_dev(a.x + xr * a.ldx, wrow, a.K);
    }
}

enum { BN = 64, BK = 32, LDS = BK + 4, GEMM_THREADS = 128 };

/* acc[f] += A rows 16f..16f+15 (a: [BM][LDS], TF32 values) times the warp's 16 columns of B over one BK step;
 * B's value (k, n) is at b[k * k_stride + n * ldb] (col_major: k_stride 1) or b[k * ldb + n] (row_major). */
template <int BM, typename BLayout>
__device__ __forceinline__ void mma_tile(wmma::fragment<wmma::accumulator, 16, 16, 8, float> *acc,
                                         const float (*a)[LDS], const float *b, int k_stride, int ldb) {
    for (int kk = 0; kk < BK; kk += 8) {
        wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, BLayout> bf;
        wmma::load_matrix_sync(bf, b + kk * k_stride, ldb);
        for (int f = 0; f < BM / 16; f++) {
            wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major> af;
            wmma::load_matrix_sync(af, &a[f * 16][kk], LDS);
            wmma::mma_sync(acc[f], af, bf, acc[f]);
        }
    }
}

/* Block (row tile, token tile, matrix e), 4 warps; warp w owns weight rows 16w..16w+15 of the tile and all BM
 * tokens. Needs K % 32 == 0 (every quantized row is whole 32-blocks; the dispatcher sends the rest to plain). */
template <int T, int BM> __global__ void __launch_bounds__(GEMM_THREADS) matmul_tf32(gemm_args a) {
    __shared__ __align__(32) float xs[BM][LDS];
    __shared__ __align__(32) float ws[BN][LDS];
    __shared__ __align__(32) float cs[BM][BN + 4];
    const int e = blockIdx.z, warp = threadIdx.x / 32;
    const int64_t r0 = (int64_t)blockIdx.x * BN;
    int64_t begin, end;
    token_range(a, e, &begin, &end);
    const int64_t t0 = begin + (int64_t)blockIdx.y * BM;
    if (t0 >= end) return;
    const uint8_t *wmat = a.w + (size_t)e * a.mat_bytes;

    wmma::fragment<wmma::accumulator, 16, 16, 8, float> acc[BM / 16];
    for (int f = 0; f < BM / 16; f++) wmma::fill_fragment(acc[f], 0.0f);

    for (int64_t k0 = 0; k0 < a.K; k0 += BK) {
        for (int idx = threadIdx.x; idx < BM * BK; idx += GEMM_THREADS) {
            const int i = idx / BK, j = idx % BK;
            const int64_t p = t0 + i;
            float v = 0.0f;
            if (p < end) v = a.x[(a.x_rows ? a.x_rows[p] : p) * a.ldx + k0 + j];
            xs[i][j] = wmma::__float_to_tf32(v);
        }
        {   /* 64 rows x 32 values = 128 chunks of 16: thread -> row tid / 2, half tid % 2 */
            const int r = threadIdx.x / 2, c = (threadIdx.x % 2) * 16;
            float v[16];
            if (r0 + r < a.nrows)
                dq16<T>(wmat + (size_t)(r0 + r) * a.row_bytes, k0 + c, v);
            else
                for (int i = 0; i < 16; i++) v[i] = 0.0f;
            for (int i = 0; i < 16; i++) ws[r][c + i] = wmma::__float_to_tf32(v[i]);
        }
        __syncthreads();
        mma_tile<BM, wmma::col_major>(acc, xs, &ws[warp * 16][0], 1, LDS);
        __syncthreads();
    }
    for (int f = 0; f < BM / 16; f++)
        wmma::store_matrix_sync(&cs[f * 16][warp * 16], acc[f], BN + 4, wmma::mem_row_major);
    __syncthreads();
    for (int idx = threadIdx.x; idx < BM * BN; idx += GEMM_THREADS) {
        const int i = idx / BN, r = idx % BN;
        if (t0 + i < end && r0 + r < a.nrows) a.out[(t0 + i) * a.ldo + r0 + r] = cs[i][r];
    }
}

static int max_dynamic_smem(void) {
    int dev = 0, bytes = 48 << 10;
    if (cudaGetDevice(&dev) == cudaSuccess) cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
    return bytes;
}

/* Launches a (grouped) matmul: groups matrices, max_tokens the most tokens any one of them may have, tokens the
 * total over the groups. */
static int launch_matmul(int kind, int type, const gemm_args &a, int groups, int64_t max_tokens, int64_t tokens,
                         char *err, size_t errlen) {
    if (max_tokens <= 0 || a.nrows <= 0) return DG_OK;
    if (kind == DGC_GEMM_TF32 && a.K % BK == 0) {
        const bool small = tokens <= 32 * (int64_t)groups;   /* few tokens a group: a 16-token tile wastes less */
        const int bm = small ? 16 : 64;
        const dim3 grid((unsigned)cdiv(a.nrows, BN), (unsigned)cdiv(max_tokens, bm), (unsigned)groups);
        if (grid.y > 65535u || grid.z > 65535u) FAIL(DG_E_SHAPE, "matmul: %lld tokens in %d groups is too many",
                                                     (long long)max_tokens, groups);
        switch (type) {
#define CASE(T) case T: if (small) matmul_tf32<T, 16><<<grid, GEMM_THREADS>>>(a); \
                        else matmul_tf32<T, 64><<<grid, GEMM_THREADS>>>(a); break;
            DG_ALL_TYPES(CASE)
#undef CASE
        default: FAIL(DG_E_TYPE, "matmul: type %d is not supported", type);
        }
    } else if (kind == DGC_GEMM_PLAIN || kind == DGC_GEMM_TF32) {
        const size_t smem = (size_t)a.K * sizeof(float);
        if (smem > (size_t)max_dynamic_smem()) FAIL(DG_E_SHAPE, "matmul: rows of %lld values do not fit in "
                                                    "shared memory", (long long)a.K);
        const dim3 grid((unsigned)a.nrows, 1, (unsigned)groups);
        switch (type) {
#define CASE(T) case T: CU(cudaFuncSetAttribute(matmul_plain<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, \
                                                (int)smem)); \
                        matmul_plain<T><<<grid, 128, smem>>>(a); break;
            DG_ALL_TYPES(CASE)
#undef CASE
        default: FAIL(DG_E_TYPE, "matmul: type %d is not supported", type);
        }
    } else {
        FAIL(DG_E_VALUE, "matmul: unknown kernel kind %d", kind);
    }
    LAUNCHED();
    return DG_OK;
}

extern "C" int dgc_matmul(int kind, const dg_tensor *w, int64_t mat, const float *x, int64_t n, float *out,
                          char *err, size_t errlen) {
    if (!w || !w->data || !x || !out || n < 0) FAIL(DG_E_VALUE, "dgc_matmul: bad arguments");
    const size_t rb = row_bytes_of(w->type, w->ne0);
    if (rb == 0) FAIL(DG_E_TYPE, "dgc_matmul: weight of type %d cannot hold rows of %lld values", w->type,
                      (long long)w->ne0);
    if (mat < 0 || mat >= w->ne2) FAIL(DG_E_SHAPE, "dgc_matmul: matrix %lld of %lld", (long long)mat,
                                       (long long)w->ne2);
    gemm_args a = {out, w->ne1, x, w->ne0, NULL, (const uint8_t *)w->data + (size_t)mat * w->ne1 * rb, rb, 0,
                   w->ne1, w->ne0, n, NULL};
    return launch_matmul(kind, w->type, a, 1, n, n, err, errlen);
}

int grouped_matmul(int kind, const dg_tensor *w, const float *x, int64_t ldx, const int32_t *x_rows,
                   const int32_t *group_off, int64_t max_tokens, int64_t tokens, float *out, char *err,
                   size_t errlen) {
    const size_t rb = row_bytes_of(w->type, w->ne0);
    if (rb == 0) FAIL(DG_E_TYPE, "grouped matmul: type %d, rows of %lld", w->type, (long long)w->ne0);
    gemm_args a = {out, w->ne1, x, ldx, x_rows, (const uint8_t *)w->data, rb, rb * (size_t)w->ne1, w->ne1,
                   w->ne0, 0, group_off};
    return launch_matmul(kind, w->type, a, (int)w->ne2, max_tokens, tokens, err, errlen);
}

/* ---- soft embedding: out[t, :] = scale * softmax(logits[t, :]) @ W ------------------------------------------ */

/* Per token: the max logit and the float sum of exp(l - max) accumulated in double, as soft_embed does. */
__global__ void softmax_stats(const float *logits, int64_t V, float *mx, float *sum) {
    __shared__ float smax[32];
    __shared__ double ssum[32];
    const float *l = logits + (int64_t)blockIdx.x * V;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nw = blockDim.x / 32;
    float m = -INFINITY;
    for (int64_t v = threadIdx.x; v < V; v += blockDim.x) m = fmaxf(m, l[v]);
    for (int o = 16; o; o /= 2) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    if (lane == 0) smax[warp] = m;
    __syncthreads();
    m = smax[0];
    for (int i = 1; i < nw; i++) m = fmaxf(m, smax[i]);
    double s = 0.0;
    for (int64_t v = threadIdx.x; v < V; v += blockDim.x) s += (double)expf(l[v] - m);
    for (int o = 16; o; o /= 2) s += __shfl_xor_sync(0xffffffffu, s, o);
    if (lane == 0) ssum[warp] = s;
    __syncthreads();
    if (threadIdx.x == 0) {
        double t = 0.0;
        for (int i = 0; i < nw; i++) t += ssum[i];
        mx[blockIdx.x] = m;
        sum[blockIdx.x] = (float)t;
    }
}

/* Plain: thread (token t, 16 columns), v ascending, double accumulation of float p times float w. */
template <int T>
__global__ void soft_embed_plain(float *out, const float *logits, const uint8_t *w, size_t rb, int64_t V,
                                 int64_t H, int64_t n, const float *mx, const float *sum, float scale) {
    const int64_t chunks = H / 16, i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n * chunks) return;
    const int64_t t = i / chunks, c = (i % chunks) * 16;
    const float *l = logits + t * V;
    double acc[16];
    for (int j = 0; j < 16; j++) acc[j] = 0.0;
    for (int64_t v = 0; v < V; v++) {
        const double p = (double)(expf(l[v] - mx[t]) / sum[t]);
        float wv[16];
        dq16<T>(w + (size_t)v * rb, c, wv);
        for (int j = 0; j < 16; j++) acc[j] = fma(p, (double)wv[j], acc[j]);   /* exact product: fma == add */
    }
    for (int j = 0; j < 16; j++) out[t * H + c + j] = __fmul_rn((float)acc[j], scale);
}

/* TF32, split over the vocabulary: block (64 columns, BM tokens, slice s) sums vocabulary rows
 * [s * chunk, (s + 1) * chunk) into part[s]; soft_embed_reduce adds the slices in order. */
template <int T>
__global__ void __launch_bounds__(GEMM_THREADS)
soft_embed_tf32(float *part, const float *logits, const uint8_t *w, size_t rb, int64_t V, int64_t H, int64_t n,
                const float *mx, const float *sum, int64_t chunk) {
    enum { BM = 64 };
    __shared__ __align__(32) float ps[BM][LDS];
    __shared__ __align__(32) float es[BK][BN + 4];
    __shared__ __align__(32) float cs[BM][BN + 4];
    const int warp = threadIdx.x / 32;
    const int64_t c0 = (int64_t)blockIdx.x * BN, t0 = (int64_t)blockIdx.y * BM;
    const int64_t v_lo = (int64_t)blockIdx.z * chunk, v_hi = min(V, v_lo + chunk);
    wmma::fragment<wmma::accumulator, 16, 16, 8, float> acc[BM / 16];
    for (int f = 0; f < BM / 16; f++) wmma::fill_fragment(acc[f], 0.0f);
    for (int64_t v0 = v_lo; v0 < v_hi; v0 += BK) {
        for (int idx = threadIdx.x; idx < BM * BK; idx += GEMM_THREADS) {
            const int i = idx / BK, j = idx % BK;
            const int64_t t = t0 + i, v = v0 + j;
            float p = 0.0f;
            if (t < n && v < v_hi) p = expf(logits[t * V + v] - mx[t]) / sum[t];
            ps[i][j] = wmma::__float_to_tf32(p);
        }
        {   /* 32 vocabulary rows x 64 columns = 128 chunks of 16: thread -> row tid / 4, chunk tid % 4 */
            const int r = threadIdx.x / 4, c = (threadIdx.x % 4) * 16;
            float e[16];
            if (v0 + r < v_hi && c0 + c < H)
                dq16<T>(w + (size_t)(v0 + r) * rb, c0 + c, e);
            else
                for (int i = 0; i < 16; i++) e[i] = 0.0f;
            for (int i = 0; i < 16; i++) es[r][c + i] = wmma::__float_to_tf32(e[i]);
        }
        __syncthreads();
        mma_tile<BM, wmma::row_major>(acc, ps, &es[0][warp * 16], BN + 4, BN + 4);
        __syncthreads();
    }
    for (int f = 0; f < BM / 16; f++)
        wmma::store_matrix_sync(&cs[f * 16][warp * 16], acc[f], BN + 4, wmma::mem_row_major);
    __syncthreads();
    float *dst = part + (int64_t)blockIdx.z * n * H;
    for (int idx = threadIdx.x; idx < BM * BN; idx += GEMM_THREADS) {
        const int i = idx / BN, c = idx % BN;
        if (t0 + i < n && c0 + c < H) dst[(t0 + i) * H + c0 + c] = cs[i][c];
    }
}

__global__ void soft_embed_reduce(float *out, const float *part, int64_t slices, int64_t count, float scale) {
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= count) return;
    float s = 0.0f;
    for (int64_t z = 0; z < slices; z++) s = __fadd_rn(s, part[z * count + i]);
    out[i] = __fmul_rn(s, scale);
}

extern "C" int dgc_soft_embed(int kind, float *out, const float *logits, const dg_tensor *w, float scale,
                              int64_t n, char *err, size_t errlen) {
    if (!w || !w->data || !out || !logits || n < 0) FAIL(DG_E_VALUE, "dgc_soft_embed: bad arguments");
    const int64_t H = w->ne0, V = w->ne1;
    const size_t rb = row_bytes_of(w->type, H);
    if (rb == 0 || H % 16) FAIL(DG_E_TYPE, "dgc_soft_embed: type %d, rows of %lld values", w->type, (long long)H);
    if (n == 0) return DG_OK;
    /* one scratch region (dg_workspace_layout's soft part): the row statistics, then the TF32 path's partial sums
     * over DG_SOFT_SLICES slices of the vocabulary (a fixed split, so the workspace is the same on every device) */
    const int64_t chunk = cdiv(cdiv(V, DG_SOFT_SLICES), BK) * BK, used = cdiv(V, chunk);
    const size_t b_stats = dg_align((size_t)n * 2 * sizeof(float));
    void *base;
    int rc = scratch(SCR_A, b_stats + (kind == DGC_GEMM_TF32 ? (size_t)(used * n * H) * sizeof(float) : 0), &base,
                     err, errlen);
    if (rc != DG_OK) return rc;
    float *mx = (float *)base, *sum = mx + n;
    softmax_stats<<<(unsigned)n, 256>>>(logits, V, mx, sum);
    LAUNCHED();
    const uint8_t *wd = (const uint8_t *)w->data;
    if (kind == DGC_GEMM_TF32) {
        void *part = (char *)base + b_stats;
        const dim3 grid((unsigned)cdiv(H, BN), (unsigned)cdiv(n, 64), (unsigned)used);
        switch (w->type) {
#define CASE(T) case T: soft_embed_tf32<T><<<grid, GEMM_THREADS>>>((float *)part, logits, wd, rb, V, H, n, mx, \
                                                                    sum, chunk); break;
            DG_ALL_TYPES(CASE)
#undef CASE
        }
        LAUNCHED();
        soft_embed_reduce<<<(unsigned)cdiv(n * H, 256), 256>>>(out, (const float *)part, used, n * H, scale);
    } else {
        const unsigned blocks = (unsigned)cdiv(n * (H / 16), 128);
        switch (w->type) {
#define CASE(T) case T: soft_embed_plain<T><<<blocks, 128>>>(out, logits, wd, rb, V, H, n, mx, sum, scale); break;
            DG_ALL_TYPES(CASE)
#undef CASE
        }
    }
    LAUNCHED();
    return DG_OK;
}
