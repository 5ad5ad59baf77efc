/* dg_cuda.h: the contract of the CUDA library (the .cu files of native/cuda, built by scripts/build_cuda.sh).
 *
 * Same rules as native/dgguf.h: explicit sizes, 0 or a negative status, a one-line message in err, never an
 * abort. Pointers documented as "device" are cudaMalloc'd memory; dg_tensor (from dgguf.h) is reused with its
 * data pointer on the device. One host thread drives the library at a time (kernels share one scratch arena).
 *
 * Every kernel has a CPU twin in native/ (named beside it); native/cuda/check.cu compares them.
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

/* ---- the forward on the device (model.cu), mirroring native/model.c -------------------------------------- */

typedef struct dgc_model dgc_model;
typedef struct dgc_cache dgc_cache;

/* Copies every weight of m (host pointers) to the device. Expert tensors of layers >= expert_layers_on_device
 * (-1: all on the device) stay on the host and are copied in before each use (streamed, not overlapped). */
dgc_model *dgc_model_upload(const dg_model *m, int gemm_kind, int expert_layers_on_device, char *err,
                            size_t errlen);
/* A model of m's shapes and types (m's data pointers are ignored) with random weights made on the device;
 * streamed expert layers are generated on the device and copied to pinned host memory. */
dgc_model *dgc_model_random(const dg_model *m, int gemm_kind, int expert_layers_on_device, uint64_t seed,
                            char *err, size_t errlen);
void dgc_model_free(dgc_model *m);
/* Device bytes of the weights (resident part) and host bytes of the streamed experts. */
void dgc_model_bytes(const dgc_model *m, size_t *device_bytes, size_t *streamed_bytes);
void dgc_model_set_gemm(dgc_model *m, int gemm_kind);
/* Stage timing of decoder passes (CUDA events between stages): on resets the totals; the report is one line,
 * milliseconds a pass per stage (input, projections, attention, dense MLP, router, experts, head). */
int dgc_model_profile(dgc_model *m, int on, char *err, size_t errlen);
int dgc_model_profile_report(const dgc_model *m, char *buf, size_t len);

dgc_cache *dgc_cache_new(dgc_model *m, int64_t capacity, char *err, size_t errlen);
void dgc_cache_free(dgc_cache *c);
int64_t dgc_cache_length(const dgc_cache *c);

/* Twin: dg_encode. ids (host) [n]. */
int dgc_encode(dgc_model *m, dgc_cache *c, const int32_t *ids, int64_t n, char *err, size_t errlen);

/* Twin: dg_decode. ids (host) [n]. Self-conditioning: sc_host [n, vocab] (host) when not NULL; else, when
 * sc_device, the model's logits buffer as dgc_step_stats left it (the previous step's scaled logits); else none.
 * The softcapped logits stay on the device in the model's buffer; logits_host (may be NULL) gets a copy. */
int dgc_decode(dgc_model *m, const dgc_cache *c, const int32_t *ids, int64_t n, const float *sc_host,
               int sc_device, float *logits_host, char *err, size_t errlen);

/* dgc_step_stats on the model's logits buffer of the last decode (n rows); results copied to the host arrays. */
int dgc_model_step_stats(dgc_model *m, int64_t n, float temp, float bound, int32_t *argmax, float *entropy,
                         uint8_t *accept, char *err, size_t errlen);

#ifdef __cplusplus
}
#endif

#endif
