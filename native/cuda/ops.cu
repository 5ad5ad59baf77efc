/* ops.cu: the forward's other ops on the device (twins in native/ops.c, native/attention.c,
 * native/model.c and runtime/sampler.py), the scratch arena and the device / memory helpers.
 *
 * Numerics: sums of squares and softmax denominators in double as the CPU does (so rmsnorm and the router
 * weights come out with the CPU's bits unless a double sum rounds differently); tanh, cos and sin in double,
 * rounded to float (glibc's float functions are within an ulp of that); products spelled __fmul_rn so nvcc
 * fuses nothing the CPU does not. Attention uses an online softmax (running max, one pass over key chunks):
 * a different summation order from the CPU's two-pass softmax, so it is held to a tolerance, not to bits.
 */
#include <cuda_fp16.h>
#include <float.h>

#include "common.cuh"

/* ---- devices, memory, scratch --------------------------------------------------------------------------- */

/* No driver, an old driver or no device is not an error here: count 0, with the reason in err. */
extern "C" int dgc_device_count(int *count, char *err, size_t errlen) {
    *count = 0;
    const cudaError_t e = cudaGetDeviceCount(count);
    if (e == cudaErrorNoDevice || e == cudaErrorInsufficientDriver || e == cudaErrorInitializationError) {
        cudaGetLastError();
        *count = 0;
        snprintf(err, errlen, "no GPU: %s", cudaGetErrorString(e));
        return DG_OK;
    }
    CU(e);
    return DG_OK;
}

extern "C" int dgc_device_info(int device, char *name, size_t namelen, int *cc_major, int *cc_minor,
                               size_t *total_bytes, char *err, size_t errlen) {
    cudaDeviceProp p;
    CU(cudaGetDeviceProperties(&p, device));
    snprintf(name, namelen, "%s", p.name);
    *cc_major = p.major;
    *cc_minor = p.minor;
    *total_bytes = p.totalGlobalMem;
    return DG_OK;
}

extern "C" int dgc_malloc(void **ptr, size_t bytes, char *err, size_t errlen) {
    *ptr = NULL;
    const cudaError_t e = cudaMalloc(ptr, bytes ? bytes : 1);
    if (e != cudaSuccess) {
        cudaGetLastError();   /* an allocation failure is not sticky: clear it */
        FAIL(DG_E_CUDA, "cudaMalloc of %.1f MiB failed: %s", (double)bytes / 1048576.0, cudaGetErrorString(e));
    }
    return DG_OK;
}

extern "C" void dgc_free(void *ptr) {
    if (ptr) cudaFree(ptr);
}

extern "C" int dgc_upload(void *dst, const void *src, size_t bytes, char *err, size_t errlen) {
    CU(cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice));
    return DG_OK;
}

extern "C" int dgc_download(void *dst, const void *src, size_t bytes, char *err, size_t errlen) {
    CU(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost));
    return DG_OK;
}

extern "C" int dgc_synchronize(char *err, size_t errlen) {
    CU(cudaDeviceSynchronize());
    CU(cudaGetLastError());
    return DG_OK;
}

static void *scratch_ptr[SCR_SLOTS];
static size_t scratch_size[SCR_SLOTS];
static void *bound_ws;            /* the executor's workspace (dgc_bind_workspace): every slot is it */
static size_t bound_bytes;

extern "C" void dgc_bind_workspace(void *ws, size_t bytes) {
    bound_ws = ws;
    bound_bytes = ws ? bytes : 0;
}

int scratch(int slot, size_t bytes, void **ptr, char *err, size_t errlen) {
    if (bound_ws) {   /* sized by dg_workspace_bytes; each op asks once, so one region serves every slot */
        if (bytes > bound_bytes)
            FAIL(DG_E_VALUE, "the workspace of %zu bytes is too small for %zu (dg_workspace_bytes is out of date)",
                 bound_bytes, bytes);
        *ptr = bound_ws;
        return DG_OK;
    }
    if (bytes > scratch_size[slot]) {
        CU(cudaDeviceSynchronize());   /* a kernel may still read the old buffer */
        cudaFree(scratch_ptr[slot]);
        scratch_ptr[slot] = NULL;
        scratch_size[slot] = 0;
        int rc = dgc_malloc(&scratch_ptr[slot], bytes, err, errlen);
        if (rc != DG_OK) return rc;
        scratch_size[slot] = bytes;
    }
    *ptr = scratch_ptr[slot];
    return DG_OK;
}

extern "C" void dgc_release_scratch(void) {
    cudaDeviceSynchronize();
    for (int i = 0; i < SCR_SLOTS; i++) {
        cudaFree(scratch_ptr[i]);
        scratch_ptr[i] = NULL;
        scratch_size[i] = 0;
    }
}

/* ---- block reductions ------------------------------------------------------------------------------------- */

/* Sum over the block (blockDim.x a multiple of 32, <= 1024); every thread gets the total. */
__device__ double block_sum(double v) {
    __shared__ double part[32];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nw = blockDim.x / 32;
    for (int o = 16; o; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();   /* part may still be read by a previous call */
    if (lane == 0) part[warp] = v;
    __syncthreads();
    double s = 0.0;
    for (int i = 0; i < nw; i++) s += part[i];
    return s;
}

/* ---- rmsnorm, elementwise --------------------------------------------------------------------------------- */

__global__ void rmsnorm_rows(float *out, const float *x, const float *w, int64_t width, float eps, float mul,
                             int accumulate) {
    const float *xr = x + (int64_t)blockIdx.x * width;
    float *o = out + (int64_t)blockIdx.x * width;
    double ss = 0.0;
    for (int64_t i = threadIdx.x; i < width; i += blockDim.x) ss += (double)xr[i] * xr[i];
    ss = block_sum(ss);
    const float ms = __fadd_rn((float)(ss / (double)width), eps);
    const float inv = (float)(1.0 / sqrt((double)ms));
    for (int64_t i = threadIdx.x; i < width; i += blockDim.x) {
        float y = __fmul_rn(xr[i], inv);
        if (w) y = __fmul_rn(y, w[i]);
        if (mul != 1.0f) y = __fmul_rn(y, mul);
        o[i] = accumulate ? __fadd_rn(o[i], y) : y;
    }
}

extern "C" int dgc_rmsnorm(float *out, const float *x, const float *w, int64_t rows, int64_t width, float eps,
                           float mul, int accumulate, char *err, size_t errlen) {
    if (rows < 0 || width < 1) FAIL(DG_E_SHAPE, "dgc_rmsnorm: shape [%lld, %lld]", (long long)rows,
                                    (long long)width);
    if (accumulate && out == x) FAIL(DG_E_VALUE, "dgc_rmsnorm: accumulating output aliases the input");
    if (rows == 0) return DG_OK;
    if (rows > INT32_MAX) FAIL(DG_E_SHAPE, "dgc_rmsnorm: %lld rows", (long long)rows);
    rmsnorm_rows<<<(unsigned)rows, 256>>>(out, x, w, width, eps, mul, accumulate);
    LAUNCHED();
    return DG_OK;
}

/* Block (token t, head); thread i < n_pairs turns pair (i, i + d/2) by (pos0 + t) * inv_freq[i]. */
__global__ void rope_heads(float *x, const float *inv_freq, int heads, int d, int n_pairs, int64_t pos0) {
    const int64_t t = blockIdx.x / heads;
    float *h = x + (int64_t)blockIdx.x * d;
    for (int i = threadIdx.x; i < n_pairs; i += blockDim.x) {
        const float angle = __fmul_rn((float)(pos0 + t), inv_freq[i]);
        const float c = (float)cos((double)angle), s = (float)sin((double)angle);
        const float x1 = h[i], x2 = h[i + d / 2];
        h[i] = __fsub_rn(__fmul_rn(x1, c), __fmul_rn(x2, s));
        h[i + d / 2] = __fadd_rn(__fmul_rn(x2, c), __fmul_rn(x1, s));
    }
}

extern "C" int dgc_rope(float *x, const float *inv_freq, int64_t n, int heads, int d, int n_pairs, int64_t pos0,
                        char *err, size_t errlen) {
    if (n < 0 || heads < 1 || d < 2 || d % 2 || n_pairs < 0 || n_pairs > d / 2 || pos0 < 0)
        FAIL(DG_E_SHAPE, "dgc_rope: %lld tokens, %d heads of %d, %d pairs", (long long)n, heads, d, n_pairs);
    if (n == 0 || n_pairs == 0) return DG_OK;
    rope_heads<<<(unsigned)(n * heads), 128>>>(x, inv_freq, heads, d, n_pairs, pos0);
    LAUNCHED();
    return DG_OK;
}

/* gelu_tanh as ops.c writes it: 0.5f * v * (1 + tanh(k * (v + 0.044715f * v * v * v))), left to right. */
__device__ __forceinline__ float gelu_dev(float v) {
    const float k = 0.7978845608028654f;
    const float cube = __fmul_rn(__fmul_rn(__fmul_rn(0.044715f, v), v), v);
    const float th = (float)tanh((double)__fmul_rn(k, __fadd_rn(v, cube)));
    return __fmul_rn(__fmul_rn(0.5f, v), __fadd_rn(1.0f, th));
}

__global__ void gelu_mul_rows(float *out, int64_t ldo, const float *g, int64_t ldg, const float *u, int64_t ldu,
                              int64_t n, int64_t width) {
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n * width) return;
    const int64_t t = i / width, c = i % width;
    out[t * ldo + c] = __fmul_rn(gelu_dev(g[t * ldg + c]), u[t * ldu + c]);
}

extern "C" int dgc_gelu_mul(float *out, int64_t ldo, const float *g, int64_t ldg, const float *u, int64_t ldu,
                            int64_t n, int64_t width, char *err, size_t errlen) {
    if (n < 0 || width < 1 || ldo < width || ldg < width || ldu < width)
        FAIL(DG_E_SHAPE, "dgc_gelu_mul: [%lld, %lld] with strides %lld %lld %lld", (long long)n,
             (long long)width, (long long)ldo, (long long)ldg, (long long)ldu);
    if (out != g && out < g + n * ldg && g < out + n * ldo) FAIL(DG_E_VALUE, "dgc_gelu_mul: out overlaps g");
    if (n == 0) return DG_OK;
    gelu_mul_rows<<<(unsigned)cdiv(n * width, 256), 256>>>(out, ldo, g, ldg, u, ldu, n, width);
    LAUNCHED();
    return DG_OK;
}

__global__ void softcap_values(float *x, int64_t count, float cap) {
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < count) x[i] = __fmul_rn((float)tanh((double)(x[i] / cap)), cap);
}

extern "C" int dgc_softcap(float *x, int64_t count, float cap, char *err, size_t errlen) {
    if (count < 0 || !(cap > 0.0f)) FAIL(DG_E_VALUE, "dgc_softcap: %lld values, cap %g", (long long)count,
                                         (double)cap);
    if (count == 0) return DG_OK;
    softcap_values<<<(unsigned)cdiv(count, 256), 256>>>(x, count, cap);
    LAUNCHED();
    return DG_OK;
}

__global__ void add_values(float *y, const float *x, int64_t count) {
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < count) y[i] = __fadd_rn(y[i], x[i]);
}

__global__ void scale_values(float *x, float s, int64_t count) {
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < count) x[i] = __fmul_rn(x[i], s);
}

extern "C" int dgc_add(float *y, const float *x, int64_t count, char *err, size_t errlen) {
    if (count < 0) FAIL(DG_E_SHAPE, "dgc_add: %lld values", (long long)count);
    if (count == 0) return DG_OK;
    add_values<<<(unsigned)cdiv(count, 256), 256>>>(y, x, count);
    LAUNCHED();
    return DG_OK;
}

extern "C" int dgc_scale(float *x, float s, int64_t count, char *err, size_t errlen) {
    if (count < 0) FAIL(DG_E_SHAPE, "dgc_scale: %lld values", (long long)count);
    if (count == 0) return DG_OK;
    scale_values<<<(unsigned)cdiv(count, 256), 256>>>(x, s, count);
    LAUNCHED();
    return DG_OK;
}

/* ---- attention -------------------------------------------------------------------------------------------- */

enum { ATT_QT = 8, ATT_KC = 32, ATT_MAXD = 512 };   /* queries per block (one warp each), keys per chunk */

/* The keys query t sees, as model.c's attention_items computes them: cache rows [a_lo, held) and new rows
 * [b_lo, b_hi). In one key index j over both (cache first): j in [a_lo, held) or [held + b_lo, held + b_hi). */
struct key_range { int64_t a_lo, b_lo, b_hi; };

__device__ __forceinline__ key_range keys_of(int64_t t, int64_t n, int64_t held, int64_t pos0, int64_t window,
                                             int causal) {
    key_range r = {0, 0, causal ? t + 1 : n};
    if (window) {
        const int64_t p = pos0 + t;
        r.a_lo = max((int64_t)0, (p - window + 1) - (pos0 - held));
        r.b_lo = max((int64_t)0, t - window + 1);
    }
    r.a_lo = min(r.a_lo, held);
    return r;
}

/* A cache element as float: the cache holds float or f16 (the executor's kv_f16; widening is exact). */
__device__ __forceinline__ float kv_val(float v) { return v; }
__device__ __forceinline__ float kv_val(uint16_t v) { return h2f(v); }

/* Rows j0..j0+ATT_KC-1 of the keys (or values) of one KV head into shared memory, rows d + 1 apart: index j is
 * cached row j below held, else row j - held of this pass; rows at or past j_hi are zeros. */
template <typename KV>
__device__ __forceinline__ void load_chunk(float *dst, const KV *cached, const float *fresh, int64_t j0,
                                           int64_t j_hi, int64_t held, int64_t stride, int64_t col0, int d) {
    for (int i = threadIdx.x; i < ATT_KC * d; i += blockDim.x) {
        const int64_t j = j0 + i / d;
        float val = 0.0f;
        if (j < j_hi)
            val = j < held ? kv_val(cached[j * stride + col0 + i % d]) : fresh[(j - held) * stride + col0 + i % d];
        dst[(i / d) * (d + 1) + i % d] = val;
    }
}

/* Block (ATT_QT consecutive queries, head); warp w is query t0 + w. Keys stream through shared memory in chunks
 * of ATT_KC (lane j scores key j of the chunk), with a running max and sum per query; each lane keeps d / 32
 * output values. Shared: the block's queries [QT][d], one key or value chunk [KC][d + 1] (padded: lanes read
 * different rows without bank conflicts). */
template <typename KV>
__global__ void __launch_bounds__(ATT_QT * 32)
attention_heads(float *out, const float *q, const KV *cache_k, const KV *cache_v, int64_t held,
                const float *k, const float *v, int64_t n, int n_heads, int n_kv, int d, int64_t pos0,
                int64_t window, int causal) {
    extern __shared__ float sm[];
    float *qs = sm, *kv = sm + ATT_QT * d;
    const int lane = threadIdx.x % 32, w = threadIdx.x / 32, head = blockIdx.y, g = head / (n_heads / n_kv);
    const int64_t t0 = (int64_t)blockIdx.x * ATT_QT, t = t0 + w, stride = (int64_t)n_kv * d;
    const int ld = d + 1, per_lane = d / 32;
    const bool live = t < n;
    for (int i = threadIdx.x; i < ATT_QT * d; i += blockDim.x) {
        const int64_t tq = t0 + i / d;
        qs[i] = tq < n ? q[(tq * n_heads + head) * d + i % d] : 0.0f;
    }
    /* the union of the block's key ranges */
    const int64_t t_last = min(n, t0 + ATT_QT) - 1;
    const key_range first = keys_of(t0, n, held, pos0, window, causal);
    const key_range last = keys_of(t_last, n, held, pos0, window, causal);
    const int64_t j_lo = first.a_lo < held ? first.a_lo : held + first.b_lo;
    const int64_t j_hi = held + last.b_hi;
    const key_range mine = keys_of(live ? t : t_last, n, held, pos0, window, causal);

    float m = -INFINITY, l = 0.0f, acc[ATT_MAXD / 32];
    for (int i = 0; i < per_lane; i++) acc[i] = 0.0f;
    for (int64_t j0 = j_lo; j0 < j_hi; j0 += ATT_KC) {
        __syncthreads();   /* the previous chunk's values are consumed (and qs is written, first time) */
        load_chunk(kv, cache_k, k, j0, j_hi, held, stride, g * d, d);
        __syncthreads();
        const int64_t j = j0 + lane;
        const bool seen = live && j < j_hi &&
                          (j < held ? j >= mine.a_lo : (j - held >= mine.b_lo && j - held < mine.b_hi));
        float s = -INFINITY;
        if (seen) {
            const float *qv = qs + w * d, *kr = kv + lane * ld;
            float dot = 0.0f;
            for (int i = 0; i < d; i++) dot = fmaf(qv[i], kr[i], dot);
            s = dot;
        }
        float cmax = s;
        for (int o = 16; o; o /= 2) cmax = fmaxf(cmax, __shfl_xor_sync(0xffffffffu, cmax, o));
        const float m_new = fmaxf(m, cmax);
        const float corr = m_new == -INFINITY ? 1.0f : expf(m - m_new);
        const float p = seen ? expf(s - m_new) : 0.0f;
        float psum = p;
        for (int o = 16; o; o /= 2) psum += __shfl_xor_sync(0xffffffffu, psum, o);
        l = l * corr + psum;
        m = m_new;
        __syncthreads();   /* every warp is done with the keys */
        load_chunk(kv, cache_v, v, j0, j_hi, held, stride, g * d, d);
        __syncthreads();
        for (int i = 0; i < per_lane; i++) acc[i] *= corr;
        for (int c = 0; c < ATT_KC; c++) {
            const float pc = __shfl_sync(0xffffffffu, p, c);
            if (pc != 0.0f)
                for (int i = 0; i < per_lane; i++) acc[i] = fmaf(pc, kv[c * ld + lane + 32 * i], acc[i]);
        }
    }
    if (live)
        for (int i = 0; i < per_lane; i++) out[(t * n_heads + head) * d + lane + 32 * i] = acc[i] / l;
}

/* dgc_attention with the cache's element: f16 (uint16 halves) or float. */
extern "C" int dgc_attention_kv(float *out, const float *q, const void *cache_k, const void *cache_v, int f16,
                                int64_t held, const float *k, const float *v, int64_t n, int n_heads, int n_kv, int d,
                                int64_t pos0, int64_t window, int causal, char *err, size_t errlen) {
    if (n < 0 || held < 0 || n_heads < 1 || n_kv < 1 || n_heads % n_kv || d < 32 || d % 32 || d > ATT_MAXD ||
        window < 0 || pos0 < held)
        FAIL(DG_E_SHAPE, "dgc_attention: %lld queries, %lld held, %d heads / %d KV of %d, window %lld",
             (long long)n, (long long)held, n_heads, n_kv, d, (long long)window);
    if (n == 0) return DG_OK;
    const size_t smem = (size_t)(ATT_QT * d + ATT_KC * (d + 1)) * sizeof(float);
    const dim3 grid((unsigned)cdiv(n, ATT_QT), (unsigned)n_heads);
    if (f16) {
        CU(cudaFuncSetAttribute(attention_heads<uint16_t>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
        attention_heads<uint16_t><<<grid, ATT_QT * 32, smem>>>(out, q, (const uint16_t *)cache_k,
                                                               (const uint16_t *)cache_v, held, k, v, n, n_heads,
                                                               n_kv, d, pos0, window, causal);
    } else {
        CU(cudaFuncSetAttribute(attention_heads<float>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
        attention_heads<float><<<grid, ATT_QT * 32, smem>>>(out, q, (const float *)cache_k, (const float *)cache_v,
                                                            held, k, v, n, n_heads, n_kv, d, pos0, window, causal);
    }
    LAUNCHED();
    return DG_OK;
}

extern "C" int dgc_attention(float *out, const float *q, const float *cache_k, const float *cache_v, int64_t held,
                             const float *k, const float *v, int64_t n, int n_heads, int n_kv, int d, int64_t pos0,
                             int64_t window, int causal, char *err, size_t errlen) {
    return dgc_attention_kv(out, q, cache_k, cache_v, 0, held, k, v, n, n_heads, n_kv, d, pos0, window, causal, err,
                            errlen);
}

/* ---- the KV cache's store: float, or f16 rounded to nearest even (as dg_f32_to_f16) -------------------------- */

__global__ void store_f16(uint16_t *dst, const float *src, int64_t count) {
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < count) dst[i] = __half_as_ushort(__float2half_rn(src[i]));
}

extern "C" int dgc_kv_store(void *dst, const float *src, int64_t count, int f16, char *err, size_t errlen) {
    if (count < 0) FAIL(DG_E_SHAPE, "dgc_kv_store: %lld values", (long long)count);
    if (count == 0) return DG_OK;
    if (!f16) {
        CU(cudaMemcpyAsync(dst, src, (size_t)count * sizeof(float), cudaMemcpyDeviceToDevice, 0));
        return DG_OK;
    }
    store_f16<<<(unsigned)cdiv(count, 256), 256>>>((uint16_t *)dst, src, count);
    LAUNCHED();
    return DG_OK;
}

/* ---- router ------------------------------------------------------------------------------------------------- */

/* Block (token), one warp: softmax over E (float exps, double sum, divide by the float sum), then K rounds of
 * "largest not yet taken, lower index on ties", the float sum of the K in order, and w = p / sum * scale. */
__global__ void route_tokens(int32_t *top_idx, float *top_w, const float *logits, const float *exp_scale, int E,
                             int K) {
    extern __shared__ float p[];
    const int lane = threadIdx.x;
    const float *l = logits + (int64_t)blockIdx.x * E;
    float m = -INFINITY;
    for (int e = lane; e < E; e += 32) m = fmaxf(m, l[e]);
    for (int o = 16; o; o /= 2) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    double s = 0.0;
    for (int e = lane; e < E; e += 32) {
        p[e] = expf(l[e] - m);
        s += p[e];
    }
    for (int o = 16; o; o /= 2) s += __shfl_xor_sync(0xffffffffu, s, o);
    const float sum = (float)s;
    for (int e = lane; e < E; e += 32) p[e] = p[e] / sum;
    __syncwarp();
    int32_t *idx = top_idx + (int64_t)blockIdx.x * K;
    for (int r = 0; r < K; r++) {
        float best = -INFINITY;
        int bi = INT32_MAX;
        for (int e = lane; e < E; e += 32) {
            bool taken = false;
            for (int u = 0; u < r; u++) taken |= idx[u] == e;
            if (!taken && (p[e] > best || (p[e] == best && e < bi))) { best = p[e]; bi = e; }
        }
        for (int o = 16; o; o /= 2) {
            const float ob = __shfl_xor_sync(0xffffffffu, best, o);
            const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
            if (ob > best || (ob == best && oi < bi)) { best = ob; bi = oi; }
        }
        if (lane == 0) idx[r] = bi;
        __syncwarp();
    }
    if (lane == 0) {
        float sk = 0.0f;
        for (int r = 0; r < K; r++) sk = __fadd_rn(sk, p[idx[r]]);
        for (int r = 0; r < K; r++) top_w[(int64_t)blockIdx.x * K + r] = __fmul_rn(p[idx[r]] / sk, exp_scale[idx[r]]);
    }
}

extern "C" int dgc_route(int32_t *top_idx, float *top_w, const float *logits, const float *exp_scale, int64_t n,
                         int E, int K, char *err, size_t errlen) {
    if (n < 0 || E < 1 || E > 8192 || K < 1 || K > E) FAIL(DG_E_SHAPE, "dgc_route: %lld tokens, top %d of %d",
                                                         (long long)n, K, E);
    if (n == 0) return DG_OK;
    route_tokens<<<(unsigned)n, 32, (size_t)E * sizeof(float)>>>(top_idx, top_w, logits, exp_scale, E, K);
    LAUNCHED();
    return DG_OK;
}

/* ---- MoE: group the (token, expert) pairs by expert, in token order within an expert (as model.c gathers
 * them), run the two grouped matmuls, and add each token's expert outputs in ascending expert order. ------- */

/* Warp e: for tokens in order, whether one of its K experts is e (ballot), giving each such pair its rank. */
__global__ void moe_count(int32_t *count, const int32_t *top_idx, int64_t n, int K) {
    const int e = blockIdx.x, lane = threadIdx.x;
    int32_t c = 0;
    for (int64_t t0 = 0; t0 < n; t0 += 32) {
        const int64_t t = t0 + lane;
        bool has = false;
        if (t < n) for (int k = 0; k < K; k++) has |= top_idx[t * K + k] == e;
        c += __popc(__ballot_sync(0xffffffffu, has));
    }
    if (lane == 0) count[e] = c;
}

__global__ void moe_offsets(int32_t *off, const int32_t *count, int E) {
    if (threadIdx.x != 0) return;
    off[0] = 0;
    for (int e = 0; e < E; e++) off[e + 1] = off[e] + count[e];
}

/* Pair slot of (token t, its k-th expert): pair_tok[slot] = t; slot_of[t * K + k] = slot. */
__global__ void moe_fill(int32_t *pair_tok, int32_t *slot_of, const int32_t *off, const int32_t *top_idx,
                         int64_t n, int K) {
    const int e = blockIdx.x, lane = threadIdx.x;
    int32_t next = off[e];
    for (int64_t t0 = 0; t0 < n; t0 += 32) {
        const int64_t t = t0 + lane;
        int kk = -1;
        if (t < n) for (int k = 0; k < K; k++) if (top_idx[t * K + k] == e) kk = k;
        const unsigned mask = __ballot_sync(0xffffffffu, kk >= 0);
        if (kk >= 0) {
            const int32_t slot = next + __popc(mask & ((1u << lane) - 1));
            pair_tok[slot] = (int32_t)t;
            slot_of[t * K + kk] = slot;
        }
        next += __popc(mask);
    }
}

/* out[t, i] = 0 + y[slot] * w over t's experts in ascending expert order (model.c's order). K <= 64. */
__global__ void moe_combine(float *out, const float *y, const int32_t *top_idx, const float *top_w,
                            const int32_t *slot_of, int64_t n, int K, int64_t H) {
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n * H) return;
    const int64_t t = i / H, c = i % H;
    const int32_t *idx = top_idx + t * K;
    float acc = 0.0f;
    int prev = -1;
    for (int r = 0; r < K; r++) {   /* the smallest expert above prev: K passes of K */
        int best = -1;
        for (int k = 0; k < K; k++)
            if (idx[k] > prev && (best < 0 || idx[k] < idx[best])) best = k;
        prev = idx[best];
        acc = __fadd_rn(acc, __fmul_rn(y[(int64_t)slot_of[t * K + best] * H + c], top_w[t * K + best]));
    }
    out[i] = acc;
}

extern "C" int dgc_moe(int kind, float *out, const float *x, const int32_t *top_idx, const float *top_w,
                       int64_t n, int K, const dg_tensor *gate_up, const dg_tensor *down, char *err,
                       size_t errlen) {
    const int64_t H = gate_up->ne0, I = gate_up->ne1 / 2, E = gate_up->ne2;
    if (n < 0 || K < 1 || K > 64 || K > E || gate_up->ne1 % 2 || down->ne0 != I || down->ne1 != H ||
        down->ne2 != E || E > 65535)
        FAIL(DG_E_SHAPE, "dgc_moe: gate_up [%lld, %lld, %lld], down [%lld, %lld, %lld], top %d",
             (long long)gate_up->ne0, (long long)gate_up->ne1, (long long)gate_up->ne2, (long long)down->ne0,
             (long long)down->ne1, (long long)down->ne2, K);
    if (n == 0) return DG_OK;
    const int64_t pairs = n * K;
    /* one scratch region, laid out as dg_workspace_layout's MoE part (backend.h): ints, gate/up, act, out */
    const size_t b_ints = dg_align((size_t)(2 * (E + 1) + 3 * pairs) * 4), b_gu = dg_align((size_t)(pairs * 2 * I) * 4),
                 b_act = dg_align((size_t)(pairs * I) * 4), b_y = dg_align((size_t)(pairs * H) * 4);
    void *base;
    int rc;
    if ((rc = scratch(SCR_C, b_ints + b_gu + b_act + b_y, &base, err, errlen)) != DG_OK) return rc;
    void *ints = base, *gu = (char *)base + b_ints, *act = (char *)base + b_ints + b_gu,
         *y = (char *)base + b_ints + b_gu + b_act;
    int32_t *count = (int32_t *)ints, *off = count + E, *pair_tok = off + E + 1, *slot_of = pair_tok + pairs;
    moe_count<<<(unsigned)E, 32>>>(count, top_idx, n, K);
    LAUNCHED();
    moe_offsets<<<1, 32>>>(off, count, (int)E);
    LAUNCHED();
    moe_fill<<<(unsigned)E, 32>>>(pair_tok, slot_of, off, top_idx, n, K);
    LAUNCHED();
    /* an expert gets at most one pair per token: n bounds every group */
    if ((rc = grouped_matmul(kind, gate_up, x, H, pair_tok, off, n, pairs, (float *)gu, err, errlen)) != DG_OK)
        return rc;
    if ((rc = dgc_gelu_mul((float *)act, I, (float *)gu, 2 * I, (float *)gu + I, 2 * I, pairs, I, err,
                           errlen)) != DG_OK)
        return rc;
    if ((rc = grouped_matmul(kind, down, (float *)act, I, NULL, off, n, pairs, (float *)y, err, errlen)) != DG_OK)
        return rc;
    moe_combine<<<(unsigned)cdiv(n * H, 256), 256>>>(out, (float *)y, top_idx, top_w, slot_of, n, K, H);
    LAUNCHED();
    return DG_OK;
}

/* ---- the sampler's per-step reductions --------------------------------------------------------------------- */

/* Block (row): scaled = logits / temp in place; first maximal index; entropy log Z - sum(e z) / Z with
 * z = x - max, e = exp(z), in double (runtime/sampler.py token_stats), rounded to float. */
__global__ void step_rows(float *logits, int64_t V, float temp, int32_t *argmax, float *entropy) {
    __shared__ float bv[32];
    __shared__ int64_t bi[32];
    float *x = logits + (int64_t)blockIdx.x * V;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nw = blockDim.x / 32;
    float best = -INFINITY;
    int64_t at = INT64_MAX;
    for (int64_t v = threadIdx.x; v < V; v += blockDim.x) {
        const float s = x[v] / temp;
        x[v] = s;
        if (s > best) { best = s; at = v; }   /* v ascends per thread: the first maximum stays */
    }
    for (int o = 16; o; o /= 2) {
        const float ob = __shfl_xor_sync(0xffffffffu, best, o);
        const int64_t oi = __shfl_xor_sync(0xffffffffu, at, o);
        if (ob > best || (ob == best && oi < at)) { best = ob; at = oi; }
    }
    if (lane == 0) { bv[warp] = best; bi[warp] = at; }
    __syncthreads();
    best = bv[0];
    at = bi[0];
    for (int i = 1; i < nw; i++)
        if (bv[i] > best || (bv[i] == best && bi[i] < at)) { best = bv[i]; at = bi[i]; }
    const double mx = best;
    double z_sum = 0.0, ez_sum = 0.0;
    for (int64_t v = threadIdx.x; v < V; v += blockDim.x) {
        const double z = (double)x[v] - mx, e = exp(z);
        z_sum += e;
        ez_sum += e * z;
    }
    z_sum = block_sum(z_sum);
    ez_sum = block_sum(ez_sum);
    if (threadIdx.x == 0) {
        argmax[blockIdx.x] = (int32_t)at;
        entropy[blockIdx.x] = (float)(log(z_sum) - ez_sum / z_sum);
    }
}

/* One block: rank entropies ascending (ties by position), prefix sums in double rounded to float, minus the
 * position's own entropy in float, compared with the float bound (runtime/sampler.py accept_mask). */
__global__ void accept_rows(const float *entropy, int n, float bound, uint8_t *accept) {
    extern __shared__ float sorted[];
    uint8_t *ok = (uint8_t *)(sorted + n);
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const float e = entropy[i];
        int rank = 0;
        for (int j = 0; j < n; j++) rank += entropy[j] < e || (entropy[j] == e && j < i);
        sorted[rank] = e;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        double cum = 0.0;
        for (int r = 0; r < n; r++) {
            cum += (double)sorted[r];
            ok[r] = __fsub_rn((float)cum, sorted[r]) <= bound;
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const float e = entropy[i];
        int rank = 0;
        for (int j = 0; j < n; j++) rank += entropy[j] < e || (entropy[j] == e && j < i);
        accept[i] = ok[rank];
    }
}

extern "C" int dgc_step_stats(float *logits, int64_t n, int64_t vocab, float temp, float bound, int32_t *argmax,
                              float *entropy, uint8_t *accept, char *err, size_t errlen) {
    if (n < 1 || n > 4096 || vocab < 1 || vocab > INT32_MAX || !(temp > 0.0f))
        FAIL(DG_E_SHAPE, "dgc_step_stats: %lld rows of %lld, temperature %g", (long long)n, (long long)vocab,
             (double)temp);
    step_rows<<<(unsigned)n, 512>>>(logits, vocab, temp, argmax, entropy);
    LAUNCHED();
    accept_rows<<<1, 256, (size_t)n * (sizeof(float) + 1)>>>(entropy, (int)n, bound, accept);
    LAUNCHED();
    return DG_OK;
}
