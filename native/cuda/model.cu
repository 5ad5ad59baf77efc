/* model.cu: the DiffusionGemma forward on the device, stage for stage the one in native/model.c (its twin):
 * the weights, a device KV cache (full layers: every position; sliding layers: the last W-1), the buffers of
 * one pass (allocated once, grown when a longer pass comes) and the two passes, dgc_encode and dgc_decode.
 * The [n, vocab] logits stay on the device: the sampler's reductions read them there and the next step's
 * self-conditioning reads their scaled copy; they reach the host only when asked for.
 *
 * The router matmul always runs the plain kernel: its scores pick the experts, and TF32 rounding could pick
 * others than the CPU does (the rest of the forward follows the model's matmul kind).
 */
#include <math.h>
#include <algorithm>
#include <stdlib.h>
#include <string.h>

#include "common.cuh"
extern "C" {
#include "../ops.h"
}

enum { MAX_ALLOCS = 1024, MAX_PAIRS = 256 };

/* Where a decoder pass spends its time (dgc_model_profile): events between stages, read after the pass. */
enum { PROF_INPUT, PROF_PROJ, PROF_ATTENTION, PROF_DENSE, PROF_ROUTER, PROF_EXPERTS, PROF_HEAD, PROF_STAGES };
static const char *const PROF_NAMES[PROF_STAGES] = {"input+self-conditioning", "q/k/v/o projections+norms+rope",
                                                    "attention", "dense mlp+norms", "router",
                                                    "experts (+ streaming)", "head+softcap"};
enum { PROF_MARKS = 512 };   /* head_dim <= 512, as dgc_attention allows */

struct dgc_model {
    dg_model m;                  /* sizes, and tensors whose data are device pointers (streamed experts: host) */
    dg_layer *layers;
    int gemm;
    int profile;                 /* time the stages of decoder passes */
    cudaEvent_t marks[PROF_MARKS];
    int mark_stage[PROF_MARKS], n_marks, profiled_passes;
    double stage_ms[PROF_STAGES];
    int expert_layers_on_device; /* layers at or above stream their experts through gate_up_stage/down_stage */
    void *gate_up_stage, *down_stage;
    float **inv_freq;            /* per layer, device [pairs] */
    int *pairs;
    void *allocs[MAX_ALLOCS];    /* device memory to free */
    int n_allocs;
    void *pinned;                /* the streamed experts' host copy (dgc_model_random) */
    size_t device_bytes, streamed_bytes;
    /* buffers of one pass, for up to cap tokens */
    int64_t cap;
    float *h, *x, *tmp, *h1, *h2, *q, *att, *k, *v, *g, *u, *router, *top_w, *logits, *entropy;
    int32_t *ids, *top_idx, *argmax;
    uint8_t *accept;
    int64_t logits_rows;         /* rows the last decode left in logits */
};

typedef struct {
    int sliding, n_kv, head_dim;
    int64_t cap, n;
    float *k, *v;
} dev_cache_layer;

struct dgc_cache {
    int n_layers, window;
    int64_t capacity, length;
    int broken;
    dev_cache_layer *layers;
};

static size_t tensor_bytes(const dg_tensor *t) { return row_bytes_of(t->type, t->ne0) * t->ne1 * t->ne2; }

static int track(dgc_model *dm, size_t bytes, void **ptr, char *err, size_t errlen) {
    if (dm->n_allocs == MAX_ALLOCS) FAIL(DG_E_VALUE, "too many device allocations");
    int rc = dgc_malloc(ptr, bytes, err, errlen);
    if (rc == DG_OK) dm->allocs[dm->n_allocs++] = *ptr;
    return rc;
}

/* The tensors of a layer, in one list, to walk them all. */
static dg_tensor *layer_tensors(dg_layer *ly, int *count) {
    static const size_t first = offsetof(dg_layer, attn_norm), last = offsetof(dg_layer, post_ffw_norm);
    *count = (int)((last - first) / sizeof(dg_tensor)) + 1;
    return (dg_tensor *)((char *)ly + first);
}

static bool is_expert(const dg_layer *ly, const dg_tensor *t) {
    return t == &ly->ffn_gate_up_exps || t == &ly->ffn_down_exps;
}

/* A weight on the device: copied from the host (src), or random (src NULL). */
static int place(dgc_model *dm, dg_tensor *t, const void *src, uint64_t seed, char *err, size_t errlen) {
    const size_t bytes = tensor_bytes(t);
    if (bytes == 0) FAIL(DG_E_TYPE, "a tensor of type %d cannot hold rows of %lld values", t->type,
                         (long long)t->ne0);
    void *d;
    int rc = track(dm, bytes, &d, err, errlen);
    if (rc != DG_OK) return rc;
    if (src) {
        rc = dgc_upload(d, src, bytes, err, errlen);
    } else {
        const float amp = (t->ne1 == 1 && t->ne2 == 1) ? 0.1f : 1.0f / sqrtf((float)t->ne0);
        rc = dgc_fill_random(t->type, d, t->ne1 * t->ne2, t->ne0, seed, amp, err, errlen);
    }
    t->data = d;
    dm->device_bytes += bytes;
    return rc;
}

/* Common to upload and random: copy the structs, place every tensor, the stages and the RoPE tables. */
static dgc_model *build(const dg_model *m, int gemm_kind, int expert_layers_on_device, bool random,
                        uint64_t seed, char *err, size_t errlen) {
    if (!m || !m->layers || m->n_layers < 1) {
        snprintf(err, errlen, "no model");
        return NULL;
    }
    if (gemm_kind != DGC_GEMM_PLAIN && gemm_kind != DGC_GEMM_TF32) {
        snprintf(err, errlen, "unknown matmul kind %d", gemm_kind);
        return NULL;
    }
    dgc_model *dm = (dgc_model *)calloc(1, sizeof *dm);
    if (!dm) { snprintf(err, errlen, "out of memory"); return NULL; }
    dm->m = *m;
    dm->gemm = gemm_kind;
    dm->n_marks = -1;
    dm->layers = (dg_layer *)calloc((size_t)m->n_layers, sizeof(dg_layer));
    dm->inv_freq = (float **)calloc((size_t)m->n_layers, sizeof(float *));
    dm->pairs = (int *)calloc((size_t)m->n_layers, sizeof(int));
    if (!dm->layers || !dm->inv_freq || !dm->pairs) { snprintf(err, errlen, "out of memory"); goto fail; }
    memcpy(dm->layers, m->layers, (size_t)m->n_layers * sizeof(dg_layer));
    dm->m.layers = dm->layers;
    dm->expert_layers_on_device = expert_layers_on_device < 0 || expert_layers_on_device > m->n_layers
                                      ? m->n_layers : expert_layers_on_device;
    {
        /* random models get placeholder data so dg_check_model can check shapes and types before anything */
        dg_model probe = dm->m;
        static const char placeholder = 0;
        if (random) {
            dg_tensor *g[] = {&probe.token_embd, &probe.output_norm, &probe.sc_pre_norm, &probe.sc_gate,
                              &probe.sc_up, &probe.sc_down};
            for (dg_tensor *t : g) t->data = &placeholder;
            for (int l = 0; l < m->n_layers; l++) {
                int nt;
                dg_tensor *ts = layer_tensors(&dm->layers[l], &nt);
                for (int i = 0; i < nt; i++) if (ts[i].ne0 > 0) ts[i].data = &placeholder;
            }
        }
        if (dg_check_model(&probe, err, errlen) != DG_OK) goto fail;
    }
    {
        uint64_t s = seed;
        dg_tensor *g[] = {&dm->m.token_embd, &dm->m.output_norm, &dm->m.sc_pre_norm, &dm->m.sc_gate,
                          &dm->m.sc_up, &dm->m.sc_down};
        for (dg_tensor *t : g)
            if (place(dm, t, random ? NULL : t->data, s++, err, errlen) != DG_OK) goto fail;
        size_t stage_gu = 0, stage_down = 0;
        for (int l = 0; l < m->n_layers; l++) {
            dg_layer *ly = &dm->layers[l];
            const bool streamed = l >= dm->expert_layers_on_device;
            int nt;
            dg_tensor *ts = layer_tensors(ly, &nt);
            for (int i = 0; i < nt; i++) {
                dg_tensor *t = &ts[i];
                if (!ly->sliding && t == &ly->attn_v) continue;          /* full layers: V is the raw K */
                if (streamed && is_expert(ly, t)) {
                    (t == &ly->ffn_gate_up_exps ? stage_gu : stage_down) =
                        std::max(t == &ly->ffn_gate_up_exps ? stage_gu : stage_down, tensor_bytes(t));
                    dm->streamed_bytes += tensor_bytes(t);
                    continue;
                }
                if (place(dm, t, random ? NULL : t->data, s++, err, errlen) != DG_OK) goto fail;
            }
            float host_freq[MAX_PAIRS];
            if (ly->head_dim / 2 > MAX_PAIRS) { snprintf(err, errlen, "head_dim %d", ly->head_dim); goto fail; }
            dm->pairs[l] = rope_freqs(&dm->m, ly, host_freq);
            if (track(dm, (size_t)(dm->pairs[l] + 1) * sizeof(float), (void **)&dm->inv_freq[l], err, errlen) !=
                    DG_OK ||
                dgc_upload(dm->inv_freq[l], host_freq, (size_t)dm->pairs[l] * sizeof(float), err, errlen) != DG_OK)
                goto fail;
        }
        if (stage_gu) {
            if (track(dm, stage_gu, &dm->gate_up_stage, err, errlen) != DG_OK ||
                track(dm, stage_down, &dm->down_stage, err, errlen) != DG_OK)
                goto fail;
            dm->device_bytes += stage_gu + stage_down;
        }
        if (random && stage_gu) {
            /* every streamed layer shares one host copy (the transfer is what is timed, not the values) */
            const dg_layer *ly = &dm->layers[dm->expert_layers_on_device];
            dg_tensor gu = ly->ffn_gate_up_exps, dn = ly->ffn_down_exps;
            gu.data = dm->gate_up_stage;
            dn.data = dm->down_stage;
            const float amp_gu = 1.0f / sqrtf((float)gu.ne0), amp_dn = 1.0f / sqrtf((float)dn.ne0);
            cudaError_t e = cudaHostAlloc(&dm->pinned, stage_gu + stage_down, cudaHostAllocDefault);
            if (e != cudaSuccess) {
                snprintf(err, errlen, "cudaHostAlloc of %.1f MiB failed: %s", (stage_gu + stage_down) / 1048576.0,
                         cudaGetErrorString(e));
                dm->pinned = NULL;
                goto fail;
            }
            if (dgc_fill_random(gu.type, dm->gate_up_stage, gu.ne1 * gu.ne2, gu.ne0, s++, amp_gu, err, errlen) != DG_OK ||
                dgc_fill_random(dn.type, dm->down_stage, dn.ne1 * dn.ne2, dn.ne0, s++, amp_dn, err, errlen) != DG_OK ||
                dgc_download(dm->pinned, gu.data, tensor_bytes(&gu), err, errlen) != DG_OK ||
                dgc_download((char *)dm->pinned + stage_gu, dn.data, tensor_bytes(&dn), err, errlen) != DG_OK)
                goto fail;
            for (int l = dm->expert_layers_on_device; l < m->n_layers; l++) {
                dm->layers[l].ffn_gate_up_exps.data = dm->pinned;
                dm->layers[l].ffn_down_exps.data = (char *)dm->pinned + stage_gu;
            }
        }
    }
    if (dgc_synchronize(err, errlen) != DG_OK) goto fail;
    return dm;
fail:
    dgc_model_free(dm);
    return NULL;
}

extern "C" dgc_model *dgc_model_upload(const dg_model *m, int gemm_kind, int expert_layers_on_device, char *err,
                                       size_t errlen) {
    return build(m, gemm_kind, expert_layers_on_device, false, 0, err, errlen);
}

extern "C" dgc_model *dgc_model_random(const dg_model *m, int gemm_kind, int expert_layers_on_device,
                                       uint64_t seed, char *err, size_t errlen) {
    return build(m, gemm_kind, expert_layers_on_device, true, seed, err, errlen);
}

extern "C" void dgc_model_free(dgc_model *dm) {
    if (!dm) return;
    cudaDeviceSynchronize();
    for (int i = 0; i < dm->n_allocs; i++) cudaFree(dm->allocs[i]);
    if (dm->pinned) cudaFreeHost(dm->pinned);
    void *buffers[] = {dm->h, dm->x, dm->tmp, dm->h1, dm->h2, dm->q, dm->att, dm->k, dm->v, dm->g, dm->u, dm->router,
                       dm->top_w, dm->logits, dm->entropy, dm->ids, dm->top_idx, dm->argmax, dm->accept};
    for (void *b : buffers) cudaFree(b);
    for (int i = 0; i < PROF_MARKS; i++) if (dm->marks[i]) cudaEventDestroy(dm->marks[i]);
    free(dm->layers);
    free(dm->inv_freq);
    free(dm->pairs);
    free(dm);
}

extern "C" void dgc_model_bytes(const dgc_model *dm, size_t *device_bytes, size_t *streamed_bytes) {
    *device_bytes = dm->device_bytes;
    *streamed_bytes = dm->streamed_bytes;
}

extern "C" void dgc_model_set_gemm(dgc_model *dm, int gemm_kind) { dm->gemm = gemm_kind; }

extern "C" int dgc_model_profile(dgc_model *dm, int on, char *err, size_t errlen) {
    for (int i = 0; on && i < PROF_MARKS; i++)
        if (!dm->marks[i]) CU(cudaEventCreate(&dm->marks[i]));
    dm->profile = on;
    dm->profiled_passes = 0;
    for (double &ms : dm->stage_ms) ms = 0.0;
    return DG_OK;
}

extern "C" int dgc_model_profile_report(const dgc_model *dm, char *buf, size_t len) {
    double total = 0.0;
    for (double ms : dm->stage_ms) total += ms;
    const int passes = dm->profiled_passes > 0 ? dm->profiled_passes : 1;
    int at = snprintf(buf, len, "%d decoder pass(es), ms a pass:", dm->profiled_passes);
    for (int i = 0; i < PROF_STAGES && at >= 0 && (size_t)at < len; i++)
        at += snprintf(buf + at, len - at, " %s %.2f (%.0f%%)%s", PROF_NAMES[i], dm->stage_ms[i] / passes,
                       total > 0 ? 100.0 * dm->stage_ms[i] / total : 0.0, i + 1 < PROF_STAGES ? "," : "");
    return DG_OK;
}

/* The time since the previous mark belongs to stage (a no-op unless this decoder pass is profiled). */
static int mark(dgc_model *dm, int stage, char *err, size_t errlen) {
    if (!dm->profile || dm->n_marks < 0) return DG_OK;
    if (dm->n_marks == PROF_MARKS) FAIL(DG_E_VALUE, "profile: more than %d stages in a pass", PROF_MARKS);
    CU(cudaEventRecord(dm->marks[dm->n_marks], 0));
    dm->mark_stage[dm->n_marks++] = stage;
    return DG_OK;
}

/* After a synchronized pass: add each interval to its stage. */
static int collect_marks(dgc_model *dm, char *err, size_t errlen) {
    for (int i = 1; i < dm->n_marks; i++) {
        float ms;
        CU(cudaEventElapsedTime(&ms, dm->marks[i - 1], dm->marks[i]));
        dm->stage_ms[dm->mark_stage[i]] += ms;
    }
    if (dm->n_marks > 0) dm->profiled_passes++;
    dm->n_marks = -1;
    return DG_OK;
}

/* ---- buffers of one pass ------------------------------------------------------------------------------------ */

static int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

/* Pass buffers for n tokens (grown, never shrunk; they live in their own allocations outside dm->allocs). */
static int ensure_buffers(dgc_model *dm, int64_t n, char *err, size_t errlen) {
    if (n <= dm->cap) return DG_OK;
    const dg_model *m = &dm->m;
    int64_t d_max = 0, kv_max = 0;
    for (int l = 0; l < m->n_layers; l++) {
        d_max = max64(d_max, m->layers[l].head_dim);
        kv_max = max64(kv_max, (int64_t)m->layers[l].n_kv_heads * m->layers[l].head_dim);
    }
    float **fs[] = {&dm->h, &dm->x, &dm->tmp, &dm->h1, &dm->h2, &dm->q, &dm->att, &dm->k, &dm->v, &dm->g, &dm->u,
                    &dm->router, &dm->top_w, &dm->logits, &dm->entropy};
    const int64_t H = m->hidden, counts[] = {H, H, H, H, H, m->n_heads * d_max, m->n_heads * d_max, kv_max, kv_max,
                                             m->dense_ff, m->dense_ff, m->n_experts, m->top_k, m->vocab, 1};
    for (float **p : fs) { cudaFree(*p); *p = NULL; }
    cudaFree(dm->ids); cudaFree(dm->top_idx); cudaFree(dm->argmax); cudaFree(dm->accept);
    dm->ids = dm->top_idx = dm->argmax = NULL;
    dm->accept = NULL;
    dm->cap = 0;
    dm->logits_rows = 0;
    int rc;
    for (size_t i = 0; i < sizeof fs / sizeof fs[0]; i++)
        if ((rc = dgc_malloc((void **)fs[i], (size_t)(n * counts[i]) * sizeof(float), err, errlen)) != DG_OK)
            return rc;
    if ((rc = dgc_malloc((void **)&dm->ids, (size_t)n * sizeof(int32_t), err, errlen)) != DG_OK ||
        (rc = dgc_malloc((void **)&dm->top_idx, (size_t)(n * m->top_k) * sizeof(int32_t), err, errlen)) != DG_OK ||
        (rc = dgc_malloc((void **)&dm->argmax, (size_t)n * sizeof(int32_t), err, errlen)) != DG_OK ||
        (rc = dgc_malloc((void **)&dm->accept, (size_t)n, err, errlen)) != DG_OK)
        return rc;
    dm->cap = n;
    return DG_OK;
}

/* ---- the cache ------------------------------------------------------------------------------------------------ */

extern "C" dgc_cache *dgc_cache_new(dgc_model *dm, int64_t capacity, char *err, size_t errlen) {
    if (!dm || capacity < 1) {
        snprintf(err, errlen, "cache capacity %lld is not positive", (long long)capacity);
        return NULL;
    }
    const dg_model *m = &dm->m;
    dgc_cache *c = (dgc_cache *)calloc(1, sizeof *c);
    if (!c || !(c->layers = (dev_cache_layer *)calloc((size_t)m->n_layers, sizeof(dev_cache_layer)))) {
        free(c);
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    c->n_layers = m->n_layers;
    c->window = m->sliding_window;
    c->capacity = capacity;
    for (int l = 0; l < m->n_layers; l++) {
        const dg_layer *ly = &m->layers[l];
        dev_cache_layer *cl = &c->layers[l];
        cl->sliding = ly->sliding;
        cl->n_kv = ly->n_kv_heads;
        cl->head_dim = ly->head_dim;
        cl->cap = ly->sliding ? std::min<int64_t>(m->sliding_window - 1, capacity) : capacity;
        const size_t bytes = (size_t)max64(cl->cap, 1) * cl->n_kv * cl->head_dim * sizeof(float);
        if (dgc_malloc((void **)&cl->k, bytes, err, errlen) != DG_OK ||
            dgc_malloc((void **)&cl->v, bytes, err, errlen) != DG_OK) {
            dgc_cache_free(c);
            return NULL;
        }
    }
    return c;
}

extern "C" void dgc_cache_free(dgc_cache *c) {
    if (!c) return;
    cudaDeviceSynchronize();
    for (int l = 0; l < c->n_layers; l++) {
        cudaFree(c->layers[l].k);
        cudaFree(c->layers[l].v);
    }
    free(c->layers);
    free(c);
}

extern "C" int64_t dgc_cache_length(const dgc_cache *c) { return c ? c->length : 0; }

/* model.c's cache_append: n new rows; sliding layers keep their last cap rows (the kept rows move to the front
 * through a scratch buffer, since device copies must not overlap). */
static int cache_append(dev_cache_layer *cl, const float *k, const float *v, int64_t n, char *err, size_t errlen) {
    const int64_t w = (int64_t)cl->n_kv * cl->head_dim;
    if (n >= cl->cap) {
        CU(cudaMemcpy(cl->k, k + (n - cl->cap) * w, (size_t)(cl->cap * w) * sizeof(float), cudaMemcpyDeviceToDevice));
        CU(cudaMemcpy(cl->v, v + (n - cl->cap) * w, (size_t)(cl->cap * w) * sizeof(float), cudaMemcpyDeviceToDevice));
        cl->n = cl->cap;
        return DG_OK;
    }
    const int64_t keep = std::min(cl->n, cl->cap - n), drop = cl->n - keep;
    if (drop && keep) {
        void *tmp;
        int rc = scratch(SCR_G, (size_t)(keep * w) * sizeof(float), &tmp, err, errlen);
        if (rc != DG_OK) return rc;
        float *rows[2] = {cl->k, cl->v};
        for (float *r : rows) {
            CU(cudaMemcpy(tmp, r + drop * w, (size_t)(keep * w) * sizeof(float), cudaMemcpyDeviceToDevice));
            CU(cudaMemcpy(r, tmp, (size_t)(keep * w) * sizeof(float), cudaMemcpyDeviceToDevice));
        }
    }
    CU(cudaMemcpy(cl->k + keep * w, k, (size_t)(n * w) * sizeof(float), cudaMemcpyDeviceToDevice));
    CU(cudaMemcpy(cl->v + keep * w, v, (size_t)(n * w) * sizeof(float), cudaMemcpyDeviceToDevice));
    cl->n = keep + n;
    return DG_OK;
}

/* ---- stages --------------------------------------------------------------------------------------------------- */

/* h[t] = E[ids[t]] * embed_scale. */
template <int T> __global__ void embed_rows(float *h, const uint8_t *E, size_t rb, const int32_t *ids, int64_t H,
                                            float scale) {
    float *row = h + (int64_t)blockIdx.x * H;
    dq_row<T>(E + (size_t)ids[blockIdx.x] * rb, H, row);
    __syncthreads();
    for (int64_t i = threadIdx.x; i < H; i += blockDim.x) row[i] = __fmul_rn(row[i], scale);
}

static int embed(dgc_model *dm, int64_t n, char *err, size_t errlen) {
    const dg_tensor *E = &dm->m.token_embd;
    const size_t rb = row_bytes_of(E->type, E->ne0);
    switch (E->type) {
#define CASE(T) case T: embed_rows<T><<<(unsigned)n, 128>>>(dm->h, (const uint8_t *)E->data, rb, dm->ids, E->ne0, \
                                                            dm->m.embed_scale); break;
        DG_ALL_TYPES(CASE)
#undef CASE
    default: FAIL(DG_E_TYPE, "token_embd: type %d", E->type);
    }
    LAUNCHED();
    return DG_OK;
}

#define TRY(call) do { if ((rc = (call)) != DG_OK) return rc; } while (0)

static int mm(dgc_model *dm, float *out, const float *x, const dg_tensor *w, int64_t n, char *err, size_t errlen) {
    return dgc_matmul(dm->gemm, w, 0, x, n, out, err, errlen);
}

/* out = down(gelu(gate(x)) * up(x)). */
static int gated_mlp(dgc_model *dm, float *out, const float *x, const dg_tensor *gate, const dg_tensor *up,
                     const dg_tensor *down, int64_t n, char *err, size_t errlen) {
    int rc;
    const int64_t F = gate->ne1;
    TRY(mm(dm, dm->g, x, gate, n, err, errlen));
    TRY(mm(dm, dm->u, x, up, n, err, errlen));
    TRY(dgc_gelu_mul(dm->g, F, dm->g, F, dm->u, F, n, F, err, errlen));
    return mm(dm, out, dm->g, down, n, err, errlen);
}

/* h = rms(e + SC(s)); sc: NULL none, else the device [n, vocab] logits to take softmax of. */
static int decoder_input(dgc_model *dm, int64_t n, const float *sc, char *err, size_t errlen) {
    const dg_model *m = &dm->m;
    const int64_t H = m->hidden;
    int rc;
    TRY(embed(dm, n, err, errlen));
    if (sc) {
        TRY(dgc_soft_embed(dm->gemm, dm->x, sc, &m->token_embd, m->embed_scale, n, err, errlen));
        TRY(dgc_rmsnorm(dm->x, dm->x, (const float *)m->sc_pre_norm.data, n, H, m->eps, 1.0f, 0, err, errlen));
        TRY(gated_mlp(dm, dm->tmp, dm->x, &m->sc_gate, &m->sc_up, &m->sc_down, n, err, errlen));
        TRY(dgc_add(dm->h, dm->tmp, n * H, err, errlen));
    }
    return dgc_rmsnorm(dm->h, dm->h, NULL, n, H, m->eps, 1.0f, 0, err, errlen);
}

/* model.c's attention_block: write != NULL for the encoder (causal, window on sliding layers, appends K/V);
 * kv_only stops after the append (the encoder's last layer). */
static int attention_block(dgc_model *dm, int l, int64_t n, const dev_cache_layer *cl, dev_cache_layer *write,
                           int64_t pos0, int kv_only, char *err, size_t errlen) {
    const dg_model *m = &dm->m;
    const dg_layer *ly = &m->layers[l];
    const int64_t H = m->hidden, d = ly->head_dim, nh = m->n_heads, nkv = ly->n_kv_heads;
    int rc;
    TRY(dgc_rmsnorm(dm->x, dm->h, (const float *)ly->attn_norm.data, n, H, m->eps, 1.0f, 0, err, errlen));
    TRY(mm(dm, dm->q, dm->x, &ly->attn_q, n, err, errlen));
    TRY(mm(dm, dm->k, dm->x, &ly->attn_k, n, err, errlen));
    if (ly->sliding)
        TRY(mm(dm, dm->v, dm->x, &ly->attn_v, n, err, errlen));
    else
        CU(cudaMemcpy(dm->v, dm->k, (size_t)(n * nkv * d) * sizeof(float), cudaMemcpyDeviceToDevice));
    TRY(dgc_rmsnorm(dm->q, dm->q, (const float *)ly->attn_q_norm.data, n * nh, d, m->eps, 1.0f, 0, err, errlen));
    TRY(dgc_rope(dm->q, dm->inv_freq[l], n, (int)nh, (int)d, dm->pairs[l], pos0, err, errlen));
    TRY(dgc_rmsnorm(dm->k, dm->k, (const float *)ly->attn_k_norm.data, n * nkv, d, m->eps, 1.0f, 0, err, errlen));
    TRY(dgc_rope(dm->k, dm->inv_freq[l], n, (int)nkv, (int)d, dm->pairs[l], pos0, err, errlen));
    TRY(dgc_rmsnorm(dm->v, dm->v, NULL, n * nkv, d, m->eps, 1.0f, 0, err, errlen));
    TRY(mark(dm, PROF_PROJ, err, errlen));
    if (kv_only) return cache_append(write, dm->k, dm->v, n, err, errlen);
    const int64_t window = (write && ly->sliding) ? m->sliding_window : 0;
    TRY(dgc_attention(dm->att, dm->q, cl->k, cl->v, cl->n, dm->k, dm->v, n, (int)nh, (int)nkv, (int)d, pos0, window,
                      write != NULL, err, errlen));
    TRY(mark(dm, PROF_ATTENTION, err, errlen));
    if (write) TRY(cache_append(write, dm->k, dm->v, n, err, errlen));
    TRY(mm(dm, dm->tmp, dm->att, &ly->attn_output, n, err, errlen));
    TRY(dgc_rmsnorm(dm->h, dm->tmp, (const float *)ly->post_attention_norm.data, n, H, m->eps, 1.0f, 1, err,
                    errlen));
    return mark(dm, PROF_PROJ, err, errlen);
}

/* Router (plain matmul, see the top), then the grouped experts into h2. Streamed experts are copied in first. */
static int moe(dgc_model *dm, int l, int64_t n, char *err, size_t errlen) {
    const dg_model *m = &dm->m;
    const dg_layer *ly = &m->layers[l];
    const int64_t H = m->hidden;
    int rc;
    const float root = (float)pow((double)H, -0.5);
    TRY(dgc_rmsnorm(dm->x, dm->h, (const float *)ly->ffn_gate_inp_scale.data, n, H, m->eps, root, 0, err, errlen));
    TRY(dgc_matmul(DGC_GEMM_PLAIN, &ly->ffn_gate_inp, 0, dm->x, n, dm->router, err, errlen));
    TRY(dgc_route(dm->top_idx, dm->top_w, dm->router, (const float *)ly->ffn_down_exps_scale.data, n,
                  m->n_experts, m->top_k, err, errlen));
    TRY(mark(dm, PROF_ROUTER, err, errlen));
    TRY(dgc_rmsnorm(dm->x, dm->h, (const float *)ly->pre_ffw_norm_2.data, n, H, m->eps, 1.0f, 0, err, errlen));
    dg_tensor gu = ly->ffn_gate_up_exps, dn = ly->ffn_down_exps;
    if (l >= dm->expert_layers_on_device) {
        CU(cudaMemcpy(dm->gate_up_stage, gu.data, tensor_bytes(&gu), cudaMemcpyHostToDevice));
        CU(cudaMemcpy(dm->down_stage, dn.data, tensor_bytes(&dn), cudaMemcpyHostToDevice));
        gu.data = dm->gate_up_stage;
        dn.data = dm->down_stage;
    }
    TRY(dgc_moe(dm->gemm, dm->h2, dm->x, dm->top_idx, dm->top_w, n, m->top_k, &gu, &dn, err, errlen));
    return mark(dm, PROF_EXPERTS, err, errlen);
}

static int ffn_block(dgc_model *dm, int l, int64_t n, char *err, size_t errlen) {
    const dg_model *m = &dm->m;
    const dg_layer *ly = &m->layers[l];
    const int64_t H = m->hidden;
    int rc;
    TRY(dgc_rmsnorm(dm->x, dm->h, (const float *)ly->ffn_norm.data, n, H, m->eps, 1.0f, 0, err, errlen));
    TRY(gated_mlp(dm, dm->h1, dm->x, &ly->ffn_gate, &ly->ffn_up, &ly->ffn_down, n, err, errlen));
    TRY(mark(dm, PROF_DENSE, err, errlen));
    TRY(moe(dm, l, n, err, errlen));
    TRY(dgc_rmsnorm(dm->h1, dm->h1, (const float *)ly->post_ffw_norm_1.data, n, H, m->eps, 1.0f, 0, err, errlen));
    TRY(dgc_rmsnorm(dm->h2, dm->h2, (const float *)ly->post_ffw_norm_2.data, n, H, m->eps, 1.0f, 0, err, errlen));
    TRY(dgc_add(dm->h1, dm->h2, n * H, err, errlen));
    TRY(dgc_rmsnorm(dm->h, dm->h1, (const float *)ly->post_ffw_norm.data, n, H, m->eps, 1.0f, 1, err, errlen));
    return mark(dm, PROF_DENSE, err, errlen);
}

static int check_pass(const dgc_model *dm, const dgc_cache *c, const int32_t *ids, int64_t n, char *err,
                      size_t errlen) {
    if (!dm || !c) FAIL(DG_E_VALUE, "no model or cache");
    if (c->broken) FAIL(DG_E_VALUE, "the cache is unusable after a failed encode; start a new one");
    if (c->n_layers != dm->m.n_layers || c->window != dm->m.sliding_window)
        FAIL(DG_E_SHAPE, "the cache was made for another model");
    if (n < 0 || (n > 0 && !ids)) FAIL(DG_E_SHAPE, "%lld token ids", (long long)n);
    for (int64_t i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= dm->m.vocab)
            FAIL(DG_E_VALUE, "token id %d at index %lld is outside the vocabulary 0..%d", ids[i], (long long)i,
                 dm->m.vocab - 1);
    return DG_OK;
}

/* ---- the two passes --------------------------------------------------------------------------------------------- */

static int encode_layers(dgc_model *dm, dgc_cache *c, int64_t n, char *err, size_t errlen) {
    const dg_model *m = &dm->m;
    const int64_t pos0 = c->length;
    int rc;
    TRY(embed(dm, n, err, errlen));
    for (int l = 0; l < m->n_layers; l++) {
        dev_cache_layer *cl = &c->layers[l];
        const int last = l == m->n_layers - 1;
        TRY(attention_block(dm, l, n, cl, cl, pos0, last, err, errlen));
        if (last) break;
        TRY(ffn_block(dm, l, n, err, errlen));
        TRY(dgc_scale(dm->h, m->layers[l].enc_scale, n * m->hidden, err, errlen));
    }
    return dgc_synchronize(err, errlen);
}

extern "C" int dgc_encode(dgc_model *dm, dgc_cache *c, const int32_t *ids, int64_t n, char *err, size_t errlen) {
    int rc;
    TRY(check_pass(dm, c, ids, n, err, errlen));
    if (n == 0) return DG_OK;
    if (n > c->capacity - c->length)
        FAIL(DG_E_SHAPE, "encoding %lld tokens after %lld would exceed the cache capacity of %lld positions",
             (long long)n, (long long)c->length, (long long)c->capacity);
    TRY(ensure_buffers(dm, n, err, errlen));
    CU(cudaMemcpy(dm->ids, ids, (size_t)n * sizeof(int32_t), cudaMemcpyHostToDevice));
    dm->logits_rows = 0;
    dm->n_marks = -1;   /* encoder passes are not profiled */
    if ((rc = encode_layers(dm, c, n, err, errlen)) != DG_OK) {
        c->broken = 1;
        return rc;
    }
    c->length += n;
    return DG_OK;
}

extern "C" int dgc_decode(dgc_model *dm, const dgc_cache *c, const int32_t *ids, int64_t n, const float *sc_host,
                          int sc_device, float *logits_host, char *err, size_t errlen) {
    int rc;
    TRY(check_pass(dm, c, ids, n, err, errlen));
    if (n == 0) return DG_OK;
    const dg_model *m = &dm->m;
    const int64_t V = m->vocab;
    if (!sc_host && sc_device && dm->logits_rows != n)
        FAIL(DG_E_VALUE, "no self-conditioning logits of %lld rows on the device (the last step left %lld)",
             (long long)n, (long long)dm->logits_rows);
    TRY(ensure_buffers(dm, n, err, errlen));
    CU(cudaMemcpy(dm->ids, ids, (size_t)n * sizeof(int32_t), cudaMemcpyHostToDevice));
    if (sc_host) CU(cudaMemcpy(dm->logits, sc_host, (size_t)(n * V) * sizeof(float), cudaMemcpyHostToDevice));
    dm->logits_rows = 0;
    dm->n_marks = 0;   /* this pass is profiled when profiling is on */
    TRY(mark(dm, PROF_INPUT, err, errlen));
    /* the soft embedding reads the logits buffer before the head overwrites it */
    TRY(decoder_input(dm, n, (sc_host || sc_device) ? dm->logits : NULL, err, errlen));
    TRY(mark(dm, PROF_INPUT, err, errlen));
    for (int l = 0; l < m->n_layers; l++) {
        TRY(attention_block(dm, l, n, &c->layers[l], NULL, c->length, 0, err, errlen));
        TRY(ffn_block(dm, l, n, err, errlen));
        TRY(dgc_scale(dm->h, m->layers[l].dec_scale, n * m->hidden, err, errlen));
    }
    TRY(dgc_rmsnorm(dm->x, dm->h, (const float *)m->output_norm.data, n, m->hidden, m->eps, 1.0f, 0, err, errlen));
    TRY(mm(dm, dm->logits, dm->x, &m->token_embd, n, err, errlen));
    if (m->softcap > 0.0f) TRY(dgc_softcap(dm->logits, n * V, m->softcap, err, errlen));
    TRY(mark(dm, PROF_HEAD, err, errlen));
    if (logits_host) CU(cudaMemcpy(logits_host, dm->logits, (size_t)(n * V) * sizeof(float), cudaMemcpyDeviceToHost));
    TRY(dgc_synchronize(err, errlen));
    if (dm->profile) TRY(collect_marks(dm, err, errlen));
    dm->logits_rows = n;
    return DG_OK;
}

extern "C" int dgc_model_step_stats(dgc_model *dm, int64_t n, float temp, float bound, int32_t *argmax,
                                    float *entropy, uint8_t *accept, char *err, size_t errlen) {
    int rc;
    if (!dm || n != dm->logits_rows) FAIL(DG_E_VALUE, "no decoded logits of %lld rows", (long long)n);
    TRY(dgc_step_stats(dm->logits, n, dm->m.vocab, temp, bound, dm->argmax, dm->entropy, dm->accept, err, errlen));
    CU(cudaMemcpy(argmax, dm->argmax, (size_t)n * sizeof(int32_t), cudaMemcpyDeviceToHost));
    CU(cudaMemcpy(entropy, dm->entropy, (size_t)n * sizeof(float), cudaMemcpyDeviceToHost));
    CU(cudaMemcpy(accept, dm->accept, (size_t)n, cudaMemcpyDeviceToHost));
    return DG_OK;
}
