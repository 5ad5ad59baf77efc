/* backend_cuda.cu: native/backend.h's device interface on the CUDA kernels of this directory, for the hybrid
 * executor (native/executor.c). Twin: the host backend (native/backend_host.c); check.cu runs the executor on both.
 *
 * Kernels and the copies ordered with them run on the legacy default stream ("compute"); prefetches (streamed
 * experts) run on a non-blocking copy stream, each started behind an event recorded on compute when it is issued
 * (so it may overwrite what earlier kernels read) and awaited by compute through the slot's event. Downloads for
 * the CPU side go on compute and signal one event, which the host waits for while the device goes on with the
 * kernels issued after them. Uploads and plain downloads return when their data has landed.
 *
 * Device memory is counted exactly as the host backend counts it (each allocation rounded up to DG_ALIGN) and is
 * limited to the budget; the kernels' scratch is the executor's workspace (dgc_bind_workspace), never allocated.
 */
#include <stdlib.h>
#include <string.h>

#include <vector>

#include "common.cuh"

namespace {

struct pinned_range {
    void *base;
};

struct cuda_impl {
    int device, gemm;
    cudaStream_t copy;
    cudaEvent_t issued[DG_BACKEND_SLOTS], ready[DG_BACKEND_SLOTS], downloads;
    void *ws;
    size_t ws_bytes;
    std::vector<void *> pinned;   /* bases registered by pin */
};

cuda_impl *impl_of(dg_backend *b) { return (cuda_impl *)b->impl; }

/* h[t] = E[ids[t]] * scale, a block per token. */
template <int T> __global__ void embed_rows(float *h, const uint8_t *E, size_t rb, const int32_t *ids, int64_t H,
                                            float scale) {
    float *row = h + (int64_t)blockIdx.x * H;
    dq_row<T>(E + (size_t)ids[blockIdx.x] * rb, H, row);
    __syncthreads();
    for (int64_t i = threadIdx.x; i < H; i += blockDim.x) row[i] = __fmul_rn(row[i], scale);
}

int c_alloc(dg_backend *b, size_t bytes, void **ptr, char *err, size_t errlen) {
    *ptr = NULL;
    const size_t size = dg_align(bytes ? bytes : 1);
    dg_backend_stats *st = &b->stats;
    if (st->budget > 0 && (int64_t)size > st->budget - st->allocated)
        FAIL(DG_E_VALUE, "device budget exceeded: %lld bytes held + %lld requested > budget %lld",
             (long long)st->allocated, (long long)size, (long long)st->budget);
    int rc = dgc_malloc(ptr, size, err, errlen);
    if (rc != DG_OK) return rc;
    st->allocated += (int64_t)size;
    st->allocations++;
    if (st->allocated > st->peak) st->peak = st->allocated;
    return DG_OK;
}

void c_release(dg_backend *b, void *ptr, size_t bytes) {
    if (!ptr) return;
    cudaStreamSynchronize(0);   /* a kernel may still read it */
    if (impl_of(b)->ws == ptr) {
        dgc_bind_workspace(NULL, 0);
        impl_of(b)->ws = NULL;
    }
    cudaFree(ptr);
    b->stats.allocated -= (int64_t)dg_align(bytes ? bytes : 1);
    b->stats.allocations--;
}

int c_host_alloc(dg_backend *b, size_t bytes, void **ptr, char *err, size_t errlen) {
    CU(cudaMallocHost(ptr, bytes ? bytes : 1));
    return DG_OK;
}

void c_host_release(dg_backend *b, void *ptr) {
    if (ptr) cudaFreeHost(ptr);
}

/* Page-lock [host, host + bytes) for the copy engine, read-only (the mapped file); best effort: a range that will
 * not register (another tensor registered its first page, no support for file mappings) stays pageable, and
 * its copies are staged by the driver, slower but the same bytes. */
void c_pin(dg_backend *b, const void *host, size_t bytes) {
    const uintptr_t page = 4096, lo = (uintptr_t)host / page * page, hi = ((uintptr_t)host + bytes + page - 1) / page * page;
    if (cudaHostRegister((void *)lo, hi - lo, cudaHostRegisterReadOnly | cudaHostRegisterPortable) == cudaSuccess)
        impl_of(b)->pinned.push_back((void *)lo);
    else
        cudaGetLastError();
}

void c_unpin(dg_backend *b, const void *host) {
    const uintptr_t lo = (uintptr_t)host / 4096 * 4096;
    auto &v = impl_of(b)->pinned;
    for (size_t i = 0; i < v.size(); i++)
        if ((uintptr_t)v[i] == lo) {
            cudaHostUnregister(v[i]);
            v.erase(v.begin() + (long)i);
            return;
        }
}

int c_upload(dg_backend *b, void *dst, const void *src, size_t bytes, char *err, size_t errlen) {
    CU(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, 0));
    CU(cudaStreamSynchronize(0));
    b->stats.h2d += (int64_t)bytes;
    b->stats.h2d_copies++;
    return DG_OK;
}

int c_download(dg_backend *b, void *dst, const void *src, size_t bytes, char *err, size_t errlen) {
    CU(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, 0));
    CU(cudaStreamSynchronize(0));
    b->stats.d2h += (int64_t)bytes;
    b->stats.d2h_copies++;
    return DG_OK;
}

int c_download_async(dg_backend *b, void *dst, const void *src, size_t bytes, char *err, size_t errlen) {
    CU(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, 0));
    CU(cudaEventRecord(impl_of(b)->downloads, 0));
    b->stats.d2h += (int64_t)bytes;
    b->stats.d2h_copies++;
    return DG_OK;
}

int c_wait_downloads(dg_backend *b, char *err, size_t errlen) {
    CU(cudaEventSynchronize(impl_of(b)->downloads));
    return DG_OK;
}

int c_prefetch(dg_backend *b, int slot, void *dst, const void *src, size_t bytes, char *err, size_t errlen) {
    cuda_impl *c = impl_of(b);
    if (slot < 0 || slot >= DG_BACKEND_SLOTS) FAIL(DG_E_VALUE, "cuda backend: prefetch slot %d", slot);
    CU(cudaEventRecord(c->issued[slot], 0));
    CU(cudaStreamWaitEvent(c->copy, c->issued[slot], 0));
    CU(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, c->copy));
    CU(cudaEventRecord(c->ready[slot], c->copy));
    b->stats.h2d += (int64_t)bytes;
    b->stats.h2d_copies++;
    return DG_OK;
}

int c_await(dg_backend *b, int slot, char *err, size_t errlen) {
    if (slot < 0 || slot >= DG_BACKEND_SLOTS) FAIL(DG_E_VALUE, "cuda backend: prefetch slot %d", slot);
    CU(cudaStreamWaitEvent(0, impl_of(b)->ready[slot], 0));
    return DG_OK;
}

int c_sync(dg_backend *b, char *err, size_t errlen) {
    CU(cudaStreamSynchronize(impl_of(b)->copy));
    CU(cudaStreamSynchronize(0));
    CU(cudaGetLastError());
    return DG_OK;
}

void c_bind(dg_backend *b, void *ws, size_t bytes) {
    impl_of(b)->ws = ws;
    impl_of(b)->ws_bytes = bytes;
    dgc_bind_workspace(ws, bytes);
}

/* Overlapping device ranges go through the workspace (a device copy must not overlap itself). */
int c_copy(dg_backend *b, void *dst, const void *src, size_t bytes, char *err, size_t errlen) {
    if (bytes == 0 || dst == src) return DG_OK;
    const char *d = (const char *)dst, *s = (const char *)src;
    if (d + bytes <= s || s + bytes <= d) {
        CU(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, 0));
        return DG_OK;
    }
    cuda_impl *c = impl_of(b);
    if (!c->ws || c->ws_bytes < bytes)
        FAIL(DG_E_VALUE, "cuda backend: an overlapping copy of %zu bytes needs that much workspace (%zu bound)", bytes,
             c->ws_bytes);
    CU(cudaMemcpyAsync(c->ws, src, bytes, cudaMemcpyDeviceToDevice, 0));
    CU(cudaMemcpyAsync(dst, c->ws, bytes, cudaMemcpyDeviceToDevice, 0));
    return DG_OK;
}

int c_embed(dg_backend *b, float *h, const dg_tensor *E, const int32_t *ids, int64_t n, float scale, char *err,
            size_t errlen) {
    const size_t rb = row_bytes_of(E->type, E->ne0);
    if (rb == 0) FAIL(DG_E_TYPE, "embed: type %d, rows of %lld", E->type, (long long)E->ne0);
    if (n == 0) return DG_OK;
    switch (E->type) {
#define CASE(T) case T: embed_rows<T><<<(unsigned)n, 128>>>(h, (const uint8_t *)E->data, rb, ids, E->ne0, scale); break;
        DG_ALL_TYPES(CASE)
#undef CASE
    default: FAIL(DG_E_TYPE, "embed: type %d", E->type);
    }
    LAUNCHED();
    return DG_OK;
}

int c_matmul(dg_backend *b, float *out, const float *x, const dg_tensor *w, int64_t n, int exact, char *err,
             size_t errlen) {
    return dgc_matmul(exact ? DGC_GEMM_PLAIN : impl_of(b)->gemm, w, 0, x, n, out, err, errlen);
}

int c_rmsnorm(dg_backend *b, float *out, const float *x, const float *w, int64_t rows, int64_t width, float eps,
              float mul, int accumulate, char *err, size_t errlen) {
    return dgc_rmsnorm(out, x, w, rows, width, eps, mul, accumulate, err, errlen);
}

int c_rope(dg_backend *b, float *x, const float *inv_freq, int64_t n, int heads, int d, int pairs, int64_t pos0,
           char *err, size_t errlen) {
    return dgc_rope(x, inv_freq, n, heads, d, pairs, pos0, err, errlen);
}

int c_gelu_mul(dg_backend *b, float *g, const float *u, int64_t n, int64_t width, char *err, size_t errlen) {
    return dgc_gelu_mul(g, width, g, width, u, width, n, width, err, errlen);
}

int c_softcap(dg_backend *b, float *x, int64_t rows, int64_t width, float cap, char *err, size_t errlen) {
    return dgc_softcap(x, rows * width, cap, err, errlen);
}

int c_add(dg_backend *b, float *y, const float *x, int64_t count, char *err, size_t errlen) {
    return dgc_add(y, x, count, err, errlen);
}

int c_scale(dg_backend *b, float *x, float s, int64_t count, char *err, size_t errlen) {
    return dgc_scale(x, s, count, err, errlen);
}

int c_kv_store(dg_backend *b, void *dst, const float *src, int64_t count, int f16, char *err, size_t errlen) {
    return dgc_kv_store(dst, src, count, f16, err, errlen);
}

int c_attention(dg_backend *b, float *out, const float *q, const void *ck, const void *cv, int f16, int64_t held,
                const float *k, const float *v, int64_t n, int nh, int nkv, int d, int64_t pos0, int64_t window,
                int causal, char *err, size_t errlen) {
    return dgc_attention_kv(out, q, ck, cv, f16, held, k, v, n, nh, nkv, d, pos0, window, causal, err, errlen);
}

int c_route(dg_backend *b, int32_t *top_idx, float *top_w, const float *logits, const float *exp_scale, int64_t n,
            int E, int K, char *err, size_t errlen) {
    return dgc_route(top_idx, top_w, logits, exp_scale, n, E, K, err, errlen);
}

int c_moe(dg_backend *b, float *out, const float *x, const int32_t *top_idx, const float *top_w, int64_t n, int K,
          const dg_tensor *gate_up, const dg_tensor *down, char *err, size_t errlen) {
    return dgc_moe(impl_of(b)->gemm, out, x, top_idx, top_w, n, K, gate_up, down, err, errlen);
}

int c_soft_embed(dg_backend *b, float *out, const float *logits, const dg_tensor *E, float scale, int64_t n,
                 int top_k, char *err, size_t errlen) {
    if (top_k) FAIL(DG_E_TYPE, "sc_top_k: the CUDA backend has no top-k soft embedding; leave it at 0");
    return dgc_soft_embed(impl_of(b)->gemm, out, logits, E, scale, n, err, errlen);
}

void c_destroy(dg_backend *b) {
    if (!b) return;
    cuda_impl *c = impl_of(b);
    if (c) {
        cudaDeviceSynchronize();
        for (void *p : c->pinned) cudaHostUnregister(p);
        if (c->ws) dgc_bind_workspace(NULL, 0);
        for (int i = 0; i < DG_BACKEND_SLOTS; i++) {
            if (c->issued[i]) cudaEventDestroy(c->issued[i]);
            if (c->ready[i]) cudaEventDestroy(c->ready[i]);
        }
        if (c->downloads) cudaEventDestroy(c->downloads);
        if (c->copy) cudaStreamDestroy(c->copy);
        delete c;
    }
    free(b);
}

}  // namespace

extern "C" dg_backend *dgc_backend_new(int device, int gemm_kind, int64_t budget_bytes, char *err, size_t errlen) {
    int count = 0;
    if (dgc_device_count(&count, err, errlen) != DG_OK) return NULL;
    if (device < 0 || device >= count) {
        if (count == 0) return NULL;   /* err holds "no GPU: ..." */
        snprintf(err, errlen, "CUDA device %d: there are %d", device, count);
        return NULL;
    }
    if ((gemm_kind != DGC_GEMM_PLAIN && gemm_kind != DGC_GEMM_TF32) || budget_bytes < 0) {
        snprintf(err, errlen, "cuda backend: matmul kind %d, budget %lld", gemm_kind, (long long)budget_bytes);
        return NULL;
    }
    cudaError_t e = cudaSetDevice(device);
    if (e != cudaSuccess) {
        snprintf(err, errlen, "cudaSetDevice(%d): %s", device, cudaGetErrorString(e));
        return NULL;
    }
    dg_backend *b = (dg_backend *)calloc(1, sizeof *b);
    cuda_impl *c = new (std::nothrow) cuda_impl();
    if (!b || !c) {
        free(b);
        delete c;
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    c->device = device;
    c->gemm = gemm_kind;
    b->impl = c;
    b->name = "cuda";
    b->stats.budget = budget_bytes;
    e = cudaStreamCreateWithFlags(&c->copy, cudaStreamNonBlocking);
    for (int i = 0; e == cudaSuccess && i < DG_BACKEND_SLOTS; i++) {
        e = cudaEventCreateWithFlags(&c->issued[i], cudaEventDisableTiming);
        if (e == cudaSuccess) e = cudaEventCreateWithFlags(&c->ready[i], cudaEventDisableTiming);
    }
    if (e == cudaSuccess) e = cudaEventCreateWithFlags(&c->downloads, cudaEventDisableTiming);
    if (e != cudaSuccess) {
        snprintf(err, errlen, "cuda backend: %s", cudaGetErrorString(e));
        c_destroy(b);
        return NULL;
    }
    b->destroy = c_destroy;
    b->alloc = c_alloc;
    b->release = c_release;
    b->host_alloc = c_host_alloc;
    b->host_release = c_host_release;
    b->pin = c_pin;
    b->unpin = c_unpin;
    b->upload = c_upload;
    b->download = c_download;
    b->download_async = c_download_async;
    b->wait_downloads = c_wait_downloads;
    b->prefetch = c_prefetch;
    b->await_slot = c_await;
    b->sync = c_sync;
    b->bind_workspace = c_bind;
    b->copy = c_copy;
    b->embed = c_embed;
    b->matmul = c_matmul;
    b->rmsnorm = c_rmsnorm;
    b->rope = c_rope;
    b->gelu_mul = c_gelu_mul;
    b->softcap = c_softcap;
    b->add = c_add;
    b->scale = c_scale;
    b->kv_store = c_kv_store;
    b->attention = c_attention;
    b->route = c_route;
    b->moe = c_moe;
    b->soft_embed = c_soft_embed;
    return b;
}
