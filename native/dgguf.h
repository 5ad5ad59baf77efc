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
    DG_TYPE_IQ4_NL = 20,
    DG_TYPE_IQ4_XS = 23,
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

/* dg_quantize_rows minimising the squared error weighted by an importance matrix (llama.cpp's imatrix):
 * imatrix[ncols], one finite non-negative importance per column (the mean squared activation it multiplies),
 * used by the K-quants, Q4_0, Q4_1, Q5_0, Q5_1, IQ4_NL and IQ4_XS; other types, and imatrix NULL, quantize as
 * dg_quantize_rows. */
int dg_quantize_rows_imatrix(int type, const float *src, void *dst, int64_t nrows, int64_t ncols,
                             const float *imatrix, char *err, size_t errlen);

/* Inverse of dg_quantize_rows: nrows * ncols floats into dst. */
int dg_dequantize_rows(int type, const void *src, float *dst, int64_t nrows, int64_t ncols,
                       char *err, size_t errlen);

/* Widen n bfloat16 values (raw uint16 bits) to float32. */
void dg_bf16_to_f32(const uint16_t *src, float *dst, int64_t n);

/* Comma-separated CPU features the dispatcher found ("avx2,fma,avx512f,avx512bw,avx512vnni,avx512bf16" or
 * "scalar"). */
const char *dg_cpu_features(void);

/* out[i] = tanh(x[i]) as the forward computes it (the gelu's and the softcap's vectorised tanh, ops.h), i < n:
 * exposed for its accuracy test. */
void dg_tanh(const float *x, float *out, int64_t n);

/* The matmul kernel in use ("reference", "avx2", "avx512": float activations; "int8-reference", "int8-avx2",
 * "int8-avx512vnni": int8 activations for quantized weights; "int8-bf16-reference", "int8-avx512bf16": the same
 * with a bfloat16 soft embedding), and a switch between them (process-wide; for tests and benchmarks). The best
 * one the CPU supports is chosen at load (docs/runtime.md, "Matmul kernels"). */
const char *dg_matmul_kernel(void);
int dg_set_matmul_kernel(const char *name, char *err, size_t errlen);

/* ------------------------------------------------------------------------------------------------------
 * Forward pass (native/model.c). Python fills these structs with pointers into the memory-mapped GGUF;
 * every size was validated against the file before the call.
 */

/* One weight tensor in its stored type: ne0 values per row (ggml order), ne1 rows, ne2 matrices (experts). */
typedef struct {
    const void *data;
    int type;
    int64_t ne0, ne1, ne2;
} dg_tensor;

typedef struct {
    int sliding;                 /* 1: sliding-window layer (own V projection); 0: full layer (V = raw K) */
    int head_dim, n_kv_heads;
    dg_tensor attn_norm, attn_q, attn_k, attn_v, attn_output, attn_q_norm, attn_k_norm, post_attention_norm;
    dg_tensor ffn_norm, ffn_gate, ffn_up, ffn_down, post_ffw_norm_1;
    dg_tensor ffn_gate_inp, ffn_gate_inp_scale, ffn_down_exps_scale;     /* router proj [H,E], scale [H], [E] */
    dg_tensor pre_ffw_norm_2, ffn_gate_up_exps, ffn_down_exps, post_ffw_norm_2, post_ffw_norm;
    float dec_scale, enc_scale;  /* layer_output_scale, enc_layer_output_scale */
} dg_layer;

typedef struct {
    int n_layers, hidden, n_heads, n_experts, top_k, expert_ff, dense_ff, vocab;
    int sliding_window;          /* W: encoder queries see keys q-W < k <= q; the decoder sees the last W-1 */
    int rope_pairs_full;         /* leading dim pairs the full layers rotate; the rest stay as they are */
    float eps, theta_full, theta_sliding, softcap, embed_scale;
    dg_tensor token_embd, output_norm, sc_pre_norm, sc_gate, sc_up, sc_down;
    const dg_layer *layers;      /* n_layers entries */
    int n_threads;
} dg_model;

/* Checks every size, shape and type of m against each other (what dg_cache_new, dg_encode and dg_decode check
 * first); data pointers are only checked to be non-NULL, never read. */
int dg_check_model(const dg_model *m, char *err, size_t errlen);

/* The KV cache of one sequence, owned by native code. Full layers keep every position up to capacity;
 * sliding layers keep the last W-1 positions (all that a later query can see). */
typedef struct dg_cache dg_cache;

dg_cache *dg_cache_new(const dg_model *m, int64_t capacity, char *err, size_t errlen);
void dg_cache_free(dg_cache *c);
int64_t dg_cache_length(const dg_cache *c);            /* positions encoded so far */
/* Forget everything after the first n positions (n <= length; sliding layers must still hold them). */
int dg_cache_truncate(dg_cache *c, int64_t n, char *err, size_t errlen);

/* Encoder pass: ids[n] at positions length..length+n-1, causal (+ sliding window), encoder layer scalars;
 * appends K/V to the cache. No head, no logits. */
int dg_encode(const dg_model *m, dg_cache *c, const int32_t *ids, int64_t n, char *err, size_t errlen);

/* out[t, r] = x[t, :] . W[mat][r, :] for t < n, r < w->ne1 (x is [n, ne0]), with the active matmul kernel on
 * n_threads threads: the forward's matmul, exposed for kernel tests and benchmarks. */
int dg_matmul(const dg_tensor *w, int64_t mat, const float *x, int64_t n, float *out, int n_threads,
              char *err, size_t errlen);

/* out[t, :] = scale * sum_v softmax(logits[t, :])[v] * W[v, :] for t < n (logits [n, ne1], out [n, ne0]): the
 * self-conditioning soft embedding, with the active kernel on n_threads threads, exposed for kernel tests. The
 * int8-*bf16 kernels round the probabilities and a quantized W to bfloat16 here (docs/runtime.md). top_k > 0:
 * over each token's top_k most probable rows only, renormalised (an approximation; dg_decode's sc_top_k). */
int dg_soft_embed(const dg_tensor *w, const float *logits, int64_t n, float scale, int top_k, float *out,
                  int n_threads, char *err, size_t errlen);

/* Importance-matrix statistics (native/imatrix.c): while a table is installed, every matmul input meeting one of
 * its weights (matched by data pointer, as in the dg_tensor) adds, per matrix m < ne2 (expert), the squares of
 * its values column by column to sum2[m * ne0 + j] and its number of rows to count[m]. n = 0 or entries NULL
 * uninstalls it. The caller keeps the table and its arrays alive while installed; process-wide. */
typedef struct {
    const void *data;
    int64_t ne0, ne2;
    double *sum2;                /* [ne2, ne0] */
    double *count;               /* [ne2] */
} dg_imatrix_entry;
int dg_imatrix_collect(dg_imatrix_entry *entries, int64_t n, char *err, size_t errlen);

/* The attention kernel in use: "blocked" (the default; (kv head, 64 query rows) items, register-tiled scores and
 * values, at the matmul kernel's instruction set) or "per-query" (one (token, head) at a time: the reference), and
 * a switch between them (process-wide; for tests and benchmarks). docs/attention.md. */
const char *dg_attention_kernel(void);
int dg_set_attention_kernel(const char *name, char *err, size_t errlen);

/* One layer's attention with the active kernels on n_threads threads, as the forward runs it: queries q [n,
 * n_heads, head_dim] see the held cached rows ck, cv [held, n_kv, head_dim] and then their pass's rows k, v [n,
 * n_kv, head_dim]; window > 0 keeps keys p - window < k <= p, causal keeps own rows up to the query's. Writes
 * out [n, n_heads, head_dim]. Exposed for kernel tests and benchmarks. */
int dg_attention(const float *q, const float *ck, const float *cv, int64_t held, const float *k, const float *v,
                 int64_t n, int n_heads, int n_kv, int head_dim, int64_t window, int causal, float *out,
                 int n_threads, char *err, size_t errlen);

/* Decoder pass over a canvas ids[n] at positions length..length+n-1: bidirectional over the cached context
 * (full layers: all of it; sliding layers: the last W-1 positions) plus the canvas, decoder layer scalars,
 * self-conditioning from sc_logits [n, vocab] (NULL: none, i.e. the first step), final norm, tied head,
 * softcap. Writes logits [n, vocab]. Reads the cache, never writes it.
 * Cheaper steps, both off by default (exact): sc_top_k > 0 takes the self-conditioning soft embedding over each
 * position's sc_top_k most probable tokens only (renormalised); head_rows (NULL: every row) flags the rows whose
 * logits are computed, the others keep what `logits` holds (the previous step's, when a caller reuses it). */
int dg_decode(const dg_model *m, const dg_cache *c, const int32_t *ids, int64_t n, const float *sc_logits,
              int sc_top_k, const uint8_t *head_rows, float *logits, char *err, size_t errlen);

/* One sampler step (native/sample.c) over rows of softcapped logits [n, V]: scaled = logits / temp (written to
 * scaled [n, V], the next step's self-conditioning input); per row the first argmax and the entropy (nats) of
 * softmax(scaled); and, when uniforms != NULL, sampled[r] = the first token whose cumulative probability mass
 * exceeds uniforms[r] (inverse-CDF sampling). Rows run on n_threads threads; results do not depend on it. */
int dg_sample_step(const float *logits, int64_t n, int64_t V, float temp, const double *uniforms, float *scaled,
                   int64_t *argmax, float *entropy, int64_t *sampled, int n_threads, char *err, size_t errlen);

/* ------------------------------------------------------------------------------------------------------
 * Peaks (native/peak.c), for the benchmarks' fractions. dg_peak: `rounds` rounds of the active matmul kernel's
 * instruction of one kind ("fp32" FMA, "int8" dot products, "bf16" VDPBF16PS) on ACC accumulators in each of
 * n_threads threads, nothing else; *ops is the operations done (2 per multiply-add) and *check the sum of every
 * accumulator lane, which equals *ops / 2 (each multiply-add adds 1 x 1). DG_E_TYPE where the kernel has no such
 * instruction. rounds is 1..2^22 (the float counts stay exact). dg_read_words: the sum of n 64-bit words,
 * read on n_threads threads (a slice each), for read bandwidth. */
int dg_peak(const char *kind, int64_t rounds, int n_threads, double *ops, double *check, char *err, size_t errlen);
int dg_read_words(const uint64_t *words, int64_t n, int n_threads, uint64_t *sum, char *err, size_t errlen);

/* ------------------------------------------------------------------------------------------------------
 * The hybrid executor (native/executor.c, docs/cuda.md): the forward on a device backend, with each layer's
 * experts resident on the device, computed on the CPU, or streamed to the device every pass, as a plan
 * (runtime/planner.py) places them. Backends: the host backend below (the CPU twins on host memory standing for
 * device memory, with a byte budget it enforces: how CI runs the executor) and the CUDA backend
 * (dgc_backend_new in libdgcuda.so, native/cuda/dg_cuda.h; Python hands its pointer over).
 */
typedef struct dg_backend dg_backend;

/* What a backend counts: device bytes held now, at most, and the limit (0: none); live allocations; bytes and
 * copies host -> device and device -> host since it was made. */
typedef struct {
    int64_t allocated, peak, budget, allocations;
    int64_t h2d, d2h, h2d_copies, d2h_copies;
} dg_backend_stats;

/* budget_bytes: the device bytes allocations may total (an allocation beyond it fails, naming both);
 * n_threads: the CPU twins' threads. */
dg_backend *dg_host_backend_new(int64_t budget_bytes, int n_threads, char *err, size_t errlen);
void dg_backend_free(dg_backend *b);
void dg_backend_get_stats(const dg_backend *b, dg_backend_stats *out);
const char *dg_backend_name(const dg_backend *b);

enum { DG_EXPERTS_DEVICE = 0, DG_EXPERTS_CPU = 1, DG_EXPERTS_STREAM = 2 };
/* Device memory groups, each one allocation (items in it at DG_ALIGN = 256-byte offsets); the planner's names:
 * embedding, globals (output norm, self-conditioning, RoPE tables), layers (non-expert weights), buffers (one
 * pass of max_tokens), workspace (kernel scratch), staging (streaming's slots), experts (resident expert
 * layers, all of them), kv_cache (every live cache). */
enum { DG_GROUP_EMBEDDING, DG_GROUP_GLOBALS, DG_GROUP_LAYERS, DG_GROUP_BUFFERS, DG_GROUP_WORKSPACE,
       DG_GROUP_STAGING, DG_GROUP_EXPERTS, DG_GROUP_KV_CACHE, DG_GROUPS };

typedef struct {
    int64_t max_tokens;          /* tokens a pass may hold (the canvas length); longer encodes go in pieces */
    int kv_f16;                  /* the KV cache in f16 (else float32, as dg_cache) */
    const int32_t *experts;      /* n_layers entries, DG_EXPERTS_*: where each layer's experts run */
} dg_exec_config;

/* The executor's fixed sizes (runtime/planner.py uses the same): allocations and the items in them are rounded
 * up to DG_EXEC_ALIGN bytes; the MoE runs in chunks of DG_EXEC_MOE_CHUNK tokens; the soft embedding splits the
 * vocabulary into DG_EXEC_SOFT_SLICES partial sums (its workspace). */
enum { DG_EXEC_ALIGN = 256, DG_EXEC_MOE_CHUNK = 256, DG_EXEC_SOFT_SLICES = 16 };

typedef struct {
    int64_t group[DG_GROUPS];    /* device bytes per group */
    int64_t load_h2d;            /* bytes uploaded while the executor was made (the resident weights) */
    int64_t pass_h2d, pass_d2h;  /* bytes moved by the last pass (an encode: all of its pieces) */
    int64_t stream_layers, cpu_layers, device_layers;
} dg_exec_stats;

typedef struct dg_exec dg_exec;
typedef struct dg_exec_cache dg_exec_cache;

/* Places m's weights on dev as cfg says (m's data pointers are host memory, e.g. the mapped file; they must
 * outlive the executor: CPU and streamed experts are read from them) and allocates the pass buffers. dev is
 * borrowed: it must outlive the executor. n_threads of m: the CPU side's threads (CPU experts). */
dg_exec *dg_exec_new(const dg_model *m, dg_backend *dev, const dg_exec_config *cfg, char *err, size_t errlen);
void dg_exec_free(dg_exec *x);
void dg_exec_get_stats(const dg_exec *x, dg_exec_stats *out);
/* Device bytes of layer l's experts when resident, else 0. */
int64_t dg_exec_expert_bytes(const dg_exec *x, int layer);
/* A device KV cache of one sequence (as dg_cache: full layers every position, sliding layers the last W-1). */
dg_exec_cache *dg_exec_cache_new(dg_exec *x, int64_t capacity, char *err, size_t errlen);
void dg_exec_cache_free(dg_exec_cache *c);
int64_t dg_exec_cache_length(const dg_exec_cache *c);
int dg_exec_cache_truncate(dg_exec_cache *c, int64_t n, char *err, size_t errlen);
/* dg_encode on the executor: pieces of at most max_tokens tokens, one encoder pass each. */
int dg_exec_encode(dg_exec_cache *c, const int32_t *ids, int64_t n, char *err, size_t errlen);
/* dg_decode on the executor (n <= max_tokens): sc_logits [n, vocab] host or NULL; logits [n, vocab] host; sc_top_k
 * and head_rows as dg_decode's (the CUDA backend has no top-k soft embedding: sc_top_k > 0 fails there). */
int dg_exec_decode(const dg_exec_cache *c, const int32_t *ids, int64_t n, const float *sc_logits, int sc_top_k,
                   const uint8_t *head_rows, float *logits, char *err, size_t errlen);

#endif
