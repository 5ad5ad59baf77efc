/* dg_cuda.h: the contract of the CUDA library (the .cu files of native/cuda, built by scripts/build_cuda.sh).
 *
 * Same rules as native/dgguf.h: explicit sizes, 0 or a negative status, a one-line message in err, never an
 * abort. Pointers documented as "device" are cudaMalloc'd memory; dg_tensor (from dgguf.h) is reused with its
 * data pointer on the device. One host thread drives the library at a time (kernels share one scratch arena).
 *
 * Every kernel has a CPU twin in native/ (named beside it); native/cuda/check.cu compares them. The forward is
 * native/executor.c's, on the backend below (one forward for both backends; no copy of model.c here).
 */
#ifndef DG_CUDA_H
#define DG_CUDA_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#include "../dgguf.h"

enum { DG_E_CUDA = -4 };        /* a CUDA call failed: no device, out of device memory, a launch error */

/* Matmul flavours: the plain kernel (fp32 FMA-free dot products in dot_ref's order: the same bits as the CPU
 * reference kernel) and the tensor-core kernel (TF32 inputs, fp32 accumulation). */
enum { DGC_GEMM_PLAIN = 0, DGC_GEMM_TF32 = 1 };

/* ---- devices and memory --------------------------------------------------------------------------------- */

int dgc_device_count(int *count, char *err, size_t errlen);
int dgc_device_info(int device, char *name, size_t namelen, int *cc_major, int *cc_minor, size_t *total_bytes,
                    char *err, size_t errlen);
int dgc_malloc(void **ptr, size_t bytes, char *err, size_t errlen);
void dgc_free(void *ptr);
int dgc_upload(void *dst, const void *src, size_t bytes, char *err, size_t errlen);
int dgc_download(void *dst, const void *src, size_t bytes, char *err, size_t errlen);
/* Waits for every launched kernel; reports the first asynchronous error. */
int dgc_synchronize(char *err, size_t errlen);
/* Frees the scratch arena the kernels share (it grows on demand). */
void dgc_release_scratch(void);

/* ---- kernels on device pointers --------------------------------------------------------------------------- */

/* Twin: dg_dequantize_rows (bit-identical). src [nrows rows of ncols values in type], dst [nrows, ncols]. */
int dgc_dequantize_rows(int type, const void *src, float *dst, int64_t nrows, int64_t ncols, char *err,
                        size_t errlen);

/* Twin: matmul (ops.c). out[t, r] = x[t, :] . W[mat][r, :], x [n, ne0], out [n, ne1]. kind DGC_GEMM_*. */
int dgc_matmul(int kind, const dg_tensor *w, int64_t mat, const float *x, int64_t n, float *out, char *err,
               size_t errlen);

/* Twin: rmsnorm. Rows [rows, width]: y = x / sqrt(mean(x^2) + eps) (* w[i] when w) * mul; accumulate: out += y
 * (out must not alias x then), else out = y (out may alias x). */
int dgc_rmsnorm(float *out, const float *x, const float *w, int64_t rows, int64_t width, float eps, float mul,
                int accumulate, char *err, size_t errlen);

/* Twin: rope. x [n, heads, d] in place; token t at position pos0 + t; inv_freq [n_pairs]. */
int dgc_rope(float *x, const float *inv_freq, int64_t n, int heads, int d, int n_pairs, int64_t pos0, char *err,
             size_t errlen);

/* Twin: gelu_tanh then multiply. out[t, i] = gelu(g[t, i]) * u[t, i], rows [n, width] with leading dimensions
 * ldo, ldg, ldu (out may equal g with ldo == ldg). */
int dgc_gelu_mul(float *out, int64_t ldo, const float *g, int64_t ldg, const float *u, int64_t ldu, int64_t n,
                 int64_t width, char *err, size_t errlen);

/* Twin: softcap. x = cap * tanh(x / cap) over count values. */
int dgc_softcap(float *x, int64_t count, float cap, char *err, size_t errlen);

/* Elementwise helpers of the forward: y += x, and x *= s, over count values. */
int dgc_add(float *y, const float *x, int64_t count, char *err, size_t errlen);
int dgc_scale(float *x, float s, int64_t count, char *err, size_t errlen);

/* Twin: model.c's attention_items + ops.c attention. One pass of n queries q [n, n_heads, d] at positions
 * pos0..pos0+n-1 over the held cached keys/values [held, n_kv, d] (positions pos0-held..pos0-1) and this pass's
 * keys/values k, v [n, n_kv, d]. causal: a query sees new keys up to itself; window > 0: keys p-window < k <= p.
 * Decoder: causal 0, window 0 (every cached and every new key). out [n, n_heads, d]. d <= 512. */
int dgc_attention(float *out, const float *q, const float *cache_k, const float *cache_v, int64_t held,
                  const float *k, const float *v, int64_t n, int n_heads, int n_kv, int d, int64_t pos0,
                  int64_t window, int causal, char *err, size_t errlen);

/* Twin: model.c's route after the router matmul. logits [n, E] -> softmax, top-k (ties: lower index), weights
 * renormalised to sum 1 then times exp_scale[e]. top_idx, top_w [n, K]. */
int dgc_route(int32_t *top_idx, float *top_w, const float *logits, const float *exp_scale, int64_t n, int E,
              int K, char *err, size_t errlen);

/* Twin: model.c's moe after routing. out[t] = sum over t's experts e (ascending) of w * down_e(gelu(gate_e(x))
 * * up_e(x)); tokens are grouped by expert on the device, each expert's weights read once per token tile.
 * x [n, H], out [n, H]; gate_up [H, 2I, E] (gate rows first), down [I, H, E]. */
int dgc_moe(int kind, float *out, const float *x, const int32_t *top_idx, const float *top_w, int64_t n, int K,
            const dg_tensor *gate_up, const dg_tensor *down, char *err, size_t errlen);

/* Twin: soft_embed. out[t, :] = scale * softmax(logits[t, :]) @ W, logits [n, W->ne1], out [n, W->ne0]. */
int dgc_soft_embed(int kind, float *out, const float *logits, const dg_tensor *w, float scale, int64_t n,
                   char *err, size_t errlen);

/* Twin: runtime/sampler.py entropy_bound_accept. logits [n, vocab] are divided by temp in place (they become
 * the next step's self-conditioning input); then per row the first maximal index, the entropy (float64 sums,
 * rounded to float32) and the accept mask (ranked by entropy, ties by position; accepted while the sum of the
 * entropies ranked before <= bound). argmax, entropy, accept: device [n]. n <= 4096. */
int dgc_step_stats(float *logits, int64_t n, int64_t vocab, float temp, float bound, int32_t *argmax,
                   float *entropy, uint8_t *accept, char *err, size_t errlen);

/* Random blocks of a type, generated on the device: every byte hashed from (seed, index), then the scale
 * fields set to small finite values (so every value dequantizes finite); float types get values in
 * [-amp, amp) (F32 vectors: 1 + [-amp, amp)). data holds nrows rows of ncols values. */
int dgc_fill_random(int type, void *data, int64_t nrows, int64_t ncols, uint64_t seed, float amp, char *err,
                    size_t errlen);

/* Twin: the host backend's kv_store (backend_host.c). dst = src as cache elements: float, or f16 rounded to nearest
 * even (dg_f32_to_f16's bits). */
int dgc_kv_store(void *dst, const float *src, int64_t count, int f16, char *err, size_t errlen);

/* dgc_attention over a cache of float (f16 0) or f16 elements (f16 1: uint16 halves, widened exactly). */
int dgc_attention_kv(float *out, const float *q, const void *cache_k, const void *cache_v, int f16, int64_t held,
                     const float *k, const float *v, int64_t n, int n_heads, int n_kv, int d, int64_t pos0,
                     int64_t window, int causal, char *err, size_t errlen);

/* The kernels' scratch becomes ws (bytes) for every slot (each op asks once), instead of the growing arena; NULL
 * unbinds. The executor binds its workspace (dg_workspace_bytes) so that no kernel allocates. */
void dgc_bind_workspace(void *ws, size_t bytes);

/* ---- the backend (backend_cuda.cu): native/backend.h's interface on these kernels -------------------------- */

/* The CUDA backend on `device`: GEMMs of kind gemm_kind (DGC_GEMM_*; the router always runs the plain kernel),
 * device allocations limited to budget_bytes (0: none; beyond it an allocation fails naming both). The forward
 * runs on native/executor.c (dgguf.h's dg_exec_*); free it with dg_backend_free. NULL with the reason in err. */
dg_backend *dgc_backend_new(int device, int gemm_kind, int64_t budget_bytes, char *err, size_t errlen);

#ifdef __cplusplus
}
#endif

#endif
