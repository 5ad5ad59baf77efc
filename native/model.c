/* model.c: the DiffusionGemma forward: the encoder and decoder passes over one weight set, one function per stage
 * (embed, decoder input with self-conditioning, attention block, dense MLP, experts, head), each stage a sequence
 * of a backend's kernels (backend.h), and the KV cache of the CPU forward.
 *
 * One forward, two backends. dg_encode / dg_decode run these passes "in place" on the host backend (the CPU
 * kernels of ops.c, matmul.c and attention.c on the cache's threads, the weights where the caller mapped them);
 * the hybrid executor (executor.c, dg_exec_*) runs the same passes on a device backend (the CUDA backend, or the
 * host backend standing for a device), each layer's experts resident, computed on the CPU beside the device, or
 * streamed to it, as runtime/planner.py places them. The math is docs/diffusiongemma.md sections 4 and 5, in
 * fp32; on the host backend every op gives the bits the CPU forward always gave (tests/test_gpu_exec.py holds the
 * executor to them at every placement).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dgguf.h"
#include "exec.h"
#include "matmul.h"
#include "ops.h"

#define FAIL(code, ...) do { snprintf(err, errlen, __VA_ARGS__); return (code); } while (0)
#define TRY(call) do { if ((rc = (call)) != DG_OK) return rc; } while (0)

static int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* ---- checks ----------------------------------------------------------------------------------------- */

/* A weight: data, a type whose blocks tile ne0, and the expected shape (vectors must be F32). */
static int check_tensor(const dg_tensor *t, const char *name, int layer, int64_t ne0, int64_t ne1, int64_t ne2,
                        char *err, size_t errlen) {
    char where[32] = "";
    if (layer >= 0) snprintf(where, sizeof where, "blk.%d.", layer);
    if (!t->data) FAIL(DG_E_VALUE, "tensor %s%s has no data", where, name);
    if (t->ne0 != ne0 || t->ne1 != ne1 || t->ne2 != ne2)
        FAIL(DG_E_SHAPE, "tensor %s%s has shape [%lld, %lld, %lld], expected [%lld, %lld, %lld]", where, name,
             (long long)t->ne0, (long long)t->ne1, (long long)t->ne2, (long long)ne0, (long long)ne1,
             (long long)ne2);
    if (ne1 == 1 && ne2 == 1 && t->type != DG_TYPE_F32)
        FAIL(DG_E_TYPE, "tensor %s%s is a vector of type %d; vectors must be F32", where, name, t->type);
    if (tensor_row_bytes(t) == 0)
        FAIL(DG_E_TYPE, "tensor %s%s: type %d cannot hold rows of %lld values", where, name, t->type,
             (long long)t->ne0);
    return DG_OK;
}

int dg_check_model(const dg_model *m, char *err, size_t errlen) {
    if (!m || !m->layers) FAIL(DG_E_VALUE, "no model");
    if (m->n_layers < 1 || m->hidden < 1 || m->n_heads < 1 || m->n_experts < 1 || m->top_k < 1 ||
        m->top_k > m->n_experts || m->expert_ff < 1 || m->dense_ff < 1 || m->vocab < 1 || m->sliding_window < 1)
        FAIL(DG_E_SHAPE, "model sizes out of range (layers %d, hidden %d, heads %d, experts %d top %d, "
             "window %d)", m->n_layers, m->hidden, m->n_heads, m->n_experts, m->top_k, m->sliding_window);
    const int64_t H = m->hidden, V = m->vocab, F = m->dense_ff, I = m->expert_ff, E = m->n_experts;
    int rc;
#define CHECK(t, name, l, a, b, c) if ((rc = check_tensor(&(t), name, l, a, b, c, err, errlen)) != DG_OK) return rc
    CHECK(m->token_embd, "token_embd.weight", -1, H, V, 1);
    CHECK(m->output_norm, "output_norm.weight", -1, H, 1, 1);
    CHECK(m->sc_pre_norm, "self_cond_pre_norm.weight", -1, H, 1, 1);
    CHECK(m->sc_gate, "self_cond_gate.weight", -1, H, F, 1);
    CHECK(m->sc_up, "self_cond_up.weight", -1, H, F, 1);
    CHECK(m->sc_down, "self_cond_down.weight", -1, F, H, 1);
    for (int l = 0; l < m->n_layers; l++) {
        const dg_layer *ly = &m->layers[l];
        const int64_t d = ly->head_dim, kv = ly->n_kv_heads;
        if (d < 2 || d % 2 || kv < 1 || m->n_heads % kv)
            FAIL(DG_E_SHAPE, "layer %d: head_dim %d / %d KV heads do not fit %d heads", l, ly->head_dim,
                 ly->n_kv_heads, m->n_heads);
        if (!ly->sliding && (m->rope_pairs_full < 0 || m->rope_pairs_full > d / 2))
            FAIL(DG_E_SHAPE, "layer %d: %d rotated pairs for head_dim %lld", l, m->rope_pairs_full, (long long)d);
        CHECK(ly->attn_norm, "attn_norm.weight", l, H, 1, 1);
        CHECK(ly->attn_q, "attn_q.weight", l, H, m->n_heads * d, 1);
        CHECK(ly->attn_k, "attn_k.weight", l, H, kv * d, 1);
        if (ly->sliding) CHECK(ly->attn_v, "attn_v.weight", l, H, kv * d, 1);
        CHECK(ly->attn_output, "attn_output.weight", l, m->n_heads * d, H, 1);
        CHECK(ly->attn_q_norm, "attn_q_norm.weight", l, d, 1, 1);
        CHECK(ly->attn_k_norm, "attn_k_norm.weight", l, d, 1, 1);
        CHECK(ly->post_attention_norm, "post_attention_norm.weight", l, H, 1, 1);
        CHECK(ly->ffn_norm, "ffn_norm.weight", l, H, 1, 1);
        CHECK(ly->ffn_gate, "ffn_gate.weight", l, H, F, 1);
        CHECK(ly->ffn_up, "ffn_up.weight", l, H, F, 1);
        CHECK(ly->ffn_down, "ffn_down.weight", l, F, H, 1);
        CHECK(ly->post_ffw_norm_1, "post_ffw_norm_1.weight", l, H, 1, 1);
        CHECK(ly->ffn_gate_inp, "ffn_gate_inp.weight", l, H, E, 1);
        CHECK(ly->ffn_gate_inp_scale, "ffn_gate_inp.scale", l, H, 1, 1);
        CHECK(ly->ffn_down_exps_scale, "ffn_down_exps.scale", l, E, 1, 1);
        CHECK(ly->pre_ffw_norm_2, "pre_ffw_norm_2.weight", l, H, 1, 1);
        CHECK(ly->ffn_gate_up_exps, "ffn_gate_up_exps.weight", l, H, 2 * I, E);
        CHECK(ly->ffn_down_exps, "ffn_down_exps.weight", l, I, H, E);
        CHECK(ly->post_ffw_norm_2, "post_ffw_norm_2.weight", l, H, 1, 1);
        CHECK(ly->post_ffw_norm, "post_ffw_norm.weight", l, H, 1, 1);
    }
#undef CHECK
    return DG_OK;
}

int exec_check_ids(const dg_model *m, const int32_t *ids, int64_t n, char *err, size_t errlen) {
    if (n < 0) FAIL(DG_E_SHAPE, "negative token count %lld", (long long)n);
    if (n > 0 && !ids) FAIL(DG_E_VALUE, "no token ids");
    for (int64_t i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= m->vocab)
            FAIL(DG_E_VALUE, "token id %d at index %lld is outside the vocabulary 0..%d", ids[i], (long long)i,
                 m->vocab - 1);
    return DG_OK;
}

/* ---- the KV cache of the CPU forward ------------------------------------------------------------------------ */

/* A sequence's cache and what its passes run on: an unchecked host backend (the sequence's worker threads, started
 * once) and an in-place executor over the model given at creation (later calls pass a model of the same sizes). */
struct dg_cache {
    dg_backend *host;
    dg_exec *x;
    dg_exec_cache *kv;
};

void dg_cache_free(dg_cache *c) {
    if (!c) return;
    dg_exec_cache_free(c->kv);
    dg_exec_free(c->x);
    dg_backend_free(c->host);
    free(c);
}

dg_cache *dg_cache_new(const dg_model *m, int64_t capacity, char *err, size_t errlen) {
    if (dg_check_model(m, err, errlen) != DG_OK) return NULL;
    if (capacity < 1) {
        snprintf(err, errlen, "cache capacity %lld is not positive", (long long)capacity);
        return NULL;
    }
    char e[256];
    dg_cache *c = calloc(1, sizeof *c);
    if (c && (c->host = host_backend_make(0, m->n_threads, 0, e, sizeof e)) &&
        (c->x = exec_new_in_place(m, c->host, e, sizeof e)) && (c->kv = dg_exec_cache_new(c->x, capacity, e, sizeof e)))
        return c;
    dg_cache_free(c);
    snprintf(err, errlen, "out of memory for a KV cache of %lld positions", (long long)capacity);
    return NULL;
}

int64_t dg_cache_length(const dg_cache *c) { return c ? c->kv->length : 0; }

int dg_cache_truncate(dg_cache *c, int64_t n, char *err, size_t errlen) {
    if (!c) FAIL(DG_E_VALUE, "no cache");
    return dg_exec_cache_truncate(c->kv, n, err, errlen);
}

/* The cache was made for a model of m's sizes. */
static int check_cache(const dg_model *m, const dg_cache *c, char *err, size_t errlen) {
    if (!c) FAIL(DG_E_VALUE, "no cache");
    const dg_model *made = &c->x->m;
    if (made->n_layers != m->n_layers || made->sliding_window != m->sliding_window)
        FAIL(DG_E_SHAPE, "the cache was made for another model (%d layers, window %d)", made->n_layers,
             made->sliding_window);
    for (int l = 0; l < m->n_layers; l++) {
        const exec_cache_layer *cl = &c->kv->layers[l];
        const dg_layer *ly = &m->layers[l];
        if (cl->sliding != ly->sliding || cl->n_kv != ly->n_kv_heads || cl->head_dim != ly->head_dim)
            FAIL(DG_E_SHAPE, "the cache was made for another model (layer %d)", l);
    }
    if (made->hidden != m->hidden || made->n_heads != m->n_heads || made->vocab != m->vocab ||
        made->n_experts != m->n_experts || made->top_k != m->top_k || made->expert_ff != m->expert_ff ||
        made->dense_ff != m->dense_ff)
        FAIL(DG_E_SHAPE, "the cache was made for another model (its sizes differ)");
    return DG_OK;
}

/* ---- stages ----------------------------------------------------------------------------------------------- */

/* Append n new rows of K/V; sliding layers then keep only their last cap rows. */
static int cache_append(dg_exec *x, exec_cache_layer *cl, const float *k, const float *v, int64_t n, char *err,
                        size_t errlen) {
    dg_backend *b = x->dev;
    const int64_t w = (int64_t)cl->n_kv * cl->head_dim, rb = exec_kv_row_bytes(x, cl);
    int rc;
    if (n >= cl->cap) {
        TRY(b->kv_store(b, cl->k, k + (n - cl->cap) * w, cl->cap * w, x->kv_f16, err, errlen));
        TRY(b->kv_store(b, cl->v, v + (n - cl->cap) * w, cl->cap * w, x->kv_f16, err, errlen));
        cl->n = cl->cap;
        return DG_OK;
    }
    const int64_t keep = min64(cl->n, cl->cap - n), drop = cl->n - keep;
    if (drop && keep) {
        TRY(b->copy(b, cl->k, cl->k + drop * rb, (size_t)(keep * rb), err, errlen));
        TRY(b->copy(b, cl->v, cl->v + drop * rb, (size_t)(keep * rb), err, errlen));
    }
    TRY(b->kv_store(b, cl->k + keep * rb, k, n * w, x->kv_f16, err, errlen));
    TRY(b->kv_store(b, cl->v + keep * rb, v, n * w, x->kv_f16, err, errlen));
    cl->n = keep + n;
    return DG_OK;
}

/* h[t] = E[ids[t]] * embed_scale, the ids uploaded first. */
static int embed(dg_exec *x, const int32_t *ids, int64_t n, char *err, size_t errlen) {
    dg_backend *b = x->dev;
    int rc;
    TRY(b->upload(b, x->ids, ids, (size_t)n * 4, err, errlen));
    return b->embed(b, x->h, &x->m.token_embd, x->ids, n, x->m.embed_scale, err, errlen);
}

/* out = down(gelu(gate(in)) * up(in)): the gated GELU MLP of the dense FFN and of self-conditioning. */
static int gated_mlp(dg_exec *x, float *out, const float *in, const dg_tensor *gate, const dg_tensor *up,
                     const dg_tensor *down, int64_t n, char *err, size_t errlen) {
    dg_backend *b = x->dev;
    int rc;
    TRY(b->matmul(b, x->g, in, gate, n, 0, err, errlen));
    TRY(b->matmul(b, x->u, in, up, n, 0, err, errlen));
    TRY(b->gelu_mul(b, x->g, x->u, n, gate->ne1, err, errlen));
    return b->matmul(b, out, x->g, down, n, 0, err, errlen);
}

/* Decoder input: h = rms(e + SC(s)), s = softmax(sc) @ E * embed_scale (sc_top_k > 0: over each position's sc_top_k
 * most probable tokens), SC(s) = down(gelu(gate(rms_w(s, pre_norm))) * up(rms_w(s, pre_norm))). No sc: h = rms(e).
 * On a device the self-conditioning input is uploaded into the logits buffer, which the head overwrites later. */
static int decoder_input(dg_exec *x, const int32_t *ids, int64_t n, const float *sc, int sc_top_k, char *err,
                         size_t errlen) {
    dg_backend *b = x->dev;
    const dg_model *m = &x->m;
    const int64_t H = m->hidden;
    int rc;
    TRY(embed(x, ids, n, err, errlen));
    if (sc) {
        if (!x->in_place) {
            TRY(b->upload(b, x->logits, sc, (size_t)(n * m->vocab) * 4, err, errlen));
            sc = x->logits;
        }
        TRY(b->soft_embed(b, x->x, sc, &m->token_embd, m->embed_scale, n, sc_top_k, err, errlen));
        TRY(b->rmsnorm(b, x->x, x->x, m->sc_pre_norm.data, n, H, m->eps, 1.0f, 0, err, errlen));
        TRY(gated_mlp(x, x->tmp, x->x, &m->sc_gate, &m->sc_up, &m->sc_down, n, err, errlen));
        TRY(b->add(b, x->h, x->tmp, n * H, err, errlen));
    }
    return b->rmsnorm(b, x->h, x->h, NULL, n, H, m->eps, 1.0f, 0, err, errlen);
}

/* Attention block. x = rms_w(h, attn_norm); q, k = rope(rms_w(proj, norm)); v = rms(v_proj or raw k); scores q.k
 * (scale 1); h += rms_w(o_proj(attn), post_attention_norm). Encoder (write != NULL): causal (+ the window on sliding
 * layers), then appends K/V to the cache; kv_only (the last encoder layer) computes only K/V and stops there.
 * Decoder: sees the cached keys plus every key of this pass. */
static int attention_block(dg_exec *x, int l, int64_t n, const exec_cache_layer *cl, exec_cache_layer *write,
                           int64_t pos0, int kv_only, char *err, size_t errlen) {
    dg_backend *b = x->dev;
    const dg_model *m = &x->m;
    const dg_layer *ly = &m->layers[l];
    const int64_t H = m->hidden, d = ly->head_dim, nh = m->n_heads, nkv = ly->n_kv_heads;
    int rc;
    TRY(b->rmsnorm(b, x->x, x->h, ly->attn_norm.data, n, H, m->eps, 1.0f, 0, err, errlen));
    if (!kv_only) TRY(b->matmul(b, x->q, x->x, &ly->attn_q, n, 0, err, errlen));
    TRY(b->matmul(b, x->k, x->x, &ly->attn_k, n, 0, err, errlen));
    if (ly->sliding)
        TRY(b->matmul(b, x->v, x->x, &ly->attn_v, n, 0, err, errlen));
    else
        TRY(b->copy(b, x->v, x->k, (size_t)(n * nkv * d) * sizeof(float), err, errlen));   /* K = V: the raw K */
    if (!kv_only) {
        TRY(b->rmsnorm(b, x->q, x->q, ly->attn_q_norm.data, n * nh, d, m->eps, 1.0f, 0, err, errlen));
        TRY(b->rope(b, x->q, x->inv_freq[l], n, (int)nh, (int)d, x->pairs[l], pos0, err, errlen));
    }
    TRY(b->rmsnorm(b, x->k, x->k, ly->attn_k_norm.data, n * nkv, d, m->eps, 1.0f, 0, err, errlen));
    TRY(b->rope(b, x->k, x->inv_freq[l], n, (int)nkv, (int)d, x->pairs[l], pos0, err, errlen));
    TRY(b->rmsnorm(b, x->v, x->v, NULL, n * nkv, d, m->eps, 1.0f, 0, err, errlen));
    if (kv_only) return cache_append(x, write, x->k, x->v, n, err, errlen);
    const int64_t window = (write && ly->sliding) ? m->sliding_window : 0;
    TRY(b->attention(b, x->att, x->q, cl->k, cl->v, x->kv_f16, cl->n, x->k, x->v, n, (int)nh, (int)nkv, (int)d, pos0,
                     window, write != NULL, err, errlen));
    if (write) TRY(cache_append(x, write, x->k, x->v, n, err, errlen));
    TRY(b->matmul(b, x->tmp, x->att, &ly->attn_output, n, 0, err, errlen));
    return b->rmsnorm(b, x->h, x->tmp, ly->post_attention_norm.data, n, H, m->eps, 1.0f, 1, err, errlen);
}

/* The streamed layers a pass uses, in order: slot i % 2 holds the i-th; `next` is the first not yet prefetched,
 * `done` the first not yet used. At most two are in flight: the i + 2-th goes into slot i % 2 once the i-th is
 * done with it. */
typedef struct {
    int *layers;
    int count, next, done;
} stream_queue;

static int prefetch_next(dg_exec *x, stream_queue *sq, char *err, size_t errlen) {
    const int i = sq->next++, l = sq->layers[i], slot = i % DG_BACKEND_SLOTS;
    const dg_layer *hl = &x->host->layers[l];
    const size_t gu = tensor_row_bytes(&hl->ffn_gate_up_exps) * (size_t)(hl->ffn_gate_up_exps.ne1 * hl->ffn_gate_up_exps.ne2),
                 dn = tensor_row_bytes(&hl->ffn_down_exps) * (size_t)(hl->ffn_down_exps.ne1 * hl->ffn_down_exps.ne2);
    char *at = x->stage[slot].ptr;
    int rc;
    TRY(x->dev->prefetch(x->dev, slot, at, hl->ffn_gate_up_exps.data, gu, err, errlen));
    return x->dev->prefetch(x->dev, slot, at + dg_align(gu), hl->ffn_down_exps.data, dn, err, errlen);
}

static int start_streams(dg_exec *x, stream_queue *sq, int encoder, char *err, size_t errlen) {
    const int L = x->m.n_layers;
    int rc;
    sq->layers = x->stream_order;
    sq->count = sq->next = sq->done = 0;
    for (int l = 0; l < L - (encoder ? 1 : 0); l++)   /* the encoder's last layer has no FFN */
        if (x->experts[l] == DG_EXPERTS_STREAM) sq->layers[sq->count++] = l;
    while (sq->next < sq->count && sq->next < DG_BACKEND_SLOTS) TRY(prefetch_next(x, sq, err, errlen));
    return DG_OK;
}

/* MoE into h2: moe[t] = sum over t's experts e (ascending) of w * down_e(gelu(gate_e(xe)) * up_e(xe)), xe the MoE
 * input in xm; tokens in chunks of DG_EXEC_MOE_CHUNK (the workspace holds one chunk's slots). Resident and streamed
 * layers run the backend's MoE (a streamed layer from its slot, the next streamed layer prefetched into the slot
 * behind it); a CPU layer's inputs went down before the dense MLP (ffn_block): the CPU waits for them, runs the MoE
 * on the caller's weights and its output goes up. */
static int experts(dg_exec *x, int l, int64_t n, stream_queue *sq, char *err, size_t errlen) {
    dg_backend *b = x->dev;
    const dg_layer *ly = &x->m.layers[l];
    const int64_t H = x->m.hidden, K = x->m.top_k;
    int rc;
    if (x->experts[l] == DG_EXPERTS_CPU) {
        const dg_layer *hl = &x->host->layers[l];
        TRY(b->wait_downloads(b, err, errlen));
        for (int64_t t0 = 0; t0 < n; t0 += DG_EXEC_MOE_CHUNK) {
            const int64_t c = min64(DG_EXEC_MOE_CHUNK, n - t0);
            TRY(x->cpu->moe(x->cpu, x->cy + t0 * H, x->cx + t0 * H, x->cidx + t0 * K, x->cw + t0 * K, c, (int)K,
                            &hl->ffn_gate_up_exps, &hl->ffn_down_exps, err, errlen));
        }
        return b->upload(b, x->h2, x->cy, (size_t)(n * H) * 4, err, errlen);
    }
    dg_tensor gu = ly->ffn_gate_up_exps, dn = ly->ffn_down_exps;
    int slot = -1;
    if (x->experts[l] == DG_EXPERTS_STREAM) {
        const int i = sq->done++;
        if (i >= sq->next || sq->layers[i] != l) FAIL(DG_E_VALUE, "streamed layer %d was not prefetched", l);
        slot = i % DG_BACKEND_SLOTS;
        TRY(b->await_slot(b, slot, err, errlen));
        gu.data = x->stage[slot].ptr;
        dn.data = (char *)x->stage[slot].ptr + dg_align(tensor_row_bytes(&gu) * (size_t)(gu.ne1 * gu.ne2));
    }
    for (int64_t t0 = 0; t0 < n; t0 += DG_EXEC_MOE_CHUNK) {
        const int64_t c = min64(DG_EXEC_MOE_CHUNK, n - t0);
        TRY(b->moe(b, x->h2 + t0 * H, x->xm + t0 * H, x->top_idx + t0 * K, x->top_w + t0 * K, c, (int)K, &gu, &dn,
                   err, errlen));
    }
    if (slot >= 0 && sq->next < sq->count) TRY(prefetch_next(x, sq, err, errlen));   /* into the slot just used */
    return DG_OK;
}

/* Feed-forward: the dense MLP and the MoE both read the residual h;
 * h = (h + rms_w(rms_w(dense, post_ffw_norm_1) + rms_w(moe, post_ffw_norm_2), post_ffw_norm)) * scalar, the layer's
 * output scale (the encoder's or the decoder's). The router (r = rms(h) * scale * H^-0.5, p = softmax(r . W), top-k,
 * weights renormalised to sum 1, then times the per-expert scale) runs first, so that a CPU layer's inputs cross
 * while the device runs the dense MLP. */
static int ffn_block(dg_exec *x, int l, int64_t n, float scalar, stream_queue *sq, char *err, size_t errlen) {
    dg_backend *b = x->dev;
    const dg_model *m = &x->m;
    const dg_layer *ly = &m->layers[l];
    const int64_t H = m->hidden, K = m->top_k;
    int rc;
    const float root = (float)pow((double)H, -0.5);
    TRY(b->rmsnorm(b, x->xm, x->h, ly->ffn_gate_inp_scale.data, n, H, m->eps, root, 0, err, errlen));
    TRY(b->matmul(b, x->router, x->xm, &ly->ffn_gate_inp, n, 1, err, errlen));
    TRY(b->route(b, x->top_idx, x->top_w, x->router, ly->ffn_down_exps_scale.data, n, m->n_experts, (int)K, err,
                 errlen));
    TRY(b->rmsnorm(b, x->xm, x->h, ly->pre_ffw_norm_2.data, n, H, m->eps, 1.0f, 0, err, errlen));
    if (x->experts[l] == DG_EXPERTS_CPU) {
        TRY(b->download_async(b, x->cx, x->xm, (size_t)(n * H) * 4, err, errlen));
        TRY(b->download_async(b, x->cidx, x->top_idx, (size_t)(n * K) * 4, err, errlen));
        TRY(b->download_async(b, x->cw, x->top_w, (size_t)(n * K) * 4, err, errlen));
    }
    TRY(b->rmsnorm(b, x->x, x->h, ly->ffn_norm.data, n, H, m->eps, 1.0f, 0, err, errlen));
    TRY(gated_mlp(x, x->h1, x->x, &ly->ffn_gate, &ly->ffn_up, &ly->ffn_down, n, err, errlen));
    TRY(experts(x, l, n, sq, err, errlen));
    TRY(b->rmsnorm(b, x->h1, x->h1, ly->post_ffw_norm_1.data, n, H, m->eps, 1.0f, 0, err, errlen));
    TRY(b->rmsnorm(b, x->h2, x->h2, ly->post_ffw_norm_2.data, n, H, m->eps, 1.0f, 0, err, errlen));
    TRY(b->add(b, x->h1, x->h2, n * H, err, errlen));
    TRY(b->rmsnorm(b, x->h, x->h1, ly->post_ffw_norm.data, n, H, m->eps, 1.0f, 1, err, errlen));
    return b->scale(b, x->h, scalar, n * H, err, errlen);
}

/* logits = softcap * tanh(rms_w(h, output_norm) . E^T / softcap), E the tied embedding in its stored type; with
 * rows, only for the flagged rows (gathered, one matmul that reads E once, then put in their places; the other rows
 * of logits keep what they hold). In place the logits are written where the caller keeps them; on a device they
 * are computed in the logits buffer and downloaded. */
static int head(dg_exec *x, int64_t n, const uint8_t *rows, float *logits, char *err, size_t errlen) {
    dg_backend *b = x->dev;
    const dg_model *m = &x->m;
    const int64_t H = m->hidden, V = m->vocab;
    int rc;
    int64_t k = n;
    if (rows) {
        k = 0;
        for (int64_t t = 0; t < n; t++) k += rows[t] != 0;
        if (k == 0) return DG_OK;
        if (k < n)
            for (int64_t t = 0, r = 0; t < n; t++)
                if (rows[t]) TRY(b->copy(b, x->tmp + r++ * H, x->h + t * H, (size_t)H * sizeof(float), err, errlen));
    }
    TRY(b->rmsnorm(b, x->x, k == n ? x->h : x->tmp, m->output_norm.data, k, H, m->eps, 1.0f, 0, err, errlen));
    float *out = x->logits;
    if (x->in_place) {
        out = logits;
        if (k < n) {   /* the flagged rows' logits apart, then into their places */
            if (x->head.bytes < k * V * 4) {
                if (x->head.ptr) b->release(b, x->head.ptr, (size_t)x->head.bytes);
                x->head.ptr = NULL;
                x->head.bytes = 0;
                TRY(b->alloc(b, (size_t)(n * V * 4), &x->head.ptr, err, errlen));
                x->head.bytes = n * V * 4;
            }
            out = x->head.ptr;
        }
    }
    TRY(b->matmul(b, out, x->x, &m->token_embd, k, 0, err, errlen));
    if (m->softcap > 0.0f) TRY(b->softcap(b, out, k, V, m->softcap, err, errlen));
    if (x->in_place && out != logits) {
        for (int64_t t = 0, r = 0; t < n; t++)
            if (rows[t]) memcpy(logits + t * V, out + r++ * V, (size_t)V * sizeof(float));
        return DG_OK;
    }
    if (x->in_place) return DG_OK;
    if (k == n) return b->download(b, logits, out, (size_t)(n * V) * 4, err, errlen);
    for (int64_t t = 0, r = 0; t < n; t++)
        if (rows[t]) TRY(b->download(b, logits + t * V, out + r++ * V, (size_t)V * 4, err, errlen));
    return DG_OK;
}

/* ---- the two passes --------------------------------------------------------------------------------------------- */

int exec_encode_pass(dg_exec *x, dg_exec_cache *c, const int32_t *ids, int64_t n, char *err, size_t errlen) {
    const dg_model *m = &x->m;
    const int64_t pos0 = c->length;
    stream_queue sq;
    int rc;
    TRY(start_streams(x, &sq, 1, err, errlen));
    TRY(embed(x, ids, n, err, errlen));
    for (int l = 0; l < m->n_layers; l++) {
        exec_cache_layer *cl = &c->layers[l];
        const int last = l == m->n_layers - 1;   /* only its K/V matter: skip its attention output and FFN */
        TRY(attention_block(x, l, n, cl, cl, pos0, last, err, errlen));
        if (last) break;
        TRY(ffn_block(x, l, n, m->layers[l].enc_scale, &sq, err, errlen));
    }
    return x->dev->sync(x->dev, err, errlen);
}

int exec_decode_pass(dg_exec *x, const dg_exec_cache *c, const int32_t *ids, int64_t n, const float *sc,
                     int sc_top_k, const uint8_t *head_rows, float *logits, char *err, size_t errlen) {
    const dg_model *m = &x->m;
    stream_queue sq;
    int rc;
    TRY(start_streams(x, &sq, 0, err, errlen));
    TRY(decoder_input(x, ids, n, sc, sc_top_k, err, errlen));
    for (int l = 0; l < m->n_layers; l++) {
        TRY(attention_block(x, l, n, &c->layers[l], NULL, c->length, 0, err, errlen));
        TRY(ffn_block(x, l, n, m->layers[l].dec_scale, &sq, err, errlen));
    }
    TRY(head(x, n, head_rows, logits, err, errlen));
    return x->dev->sync(x->dev, err, errlen);
}

/* Encoder pass: ids[n] at positions length..length+n-1, causal (+ sliding window), encoder layer scalars; appends
 * K/V to the cache. No head, no logits. */
int dg_encode(const dg_model *m, dg_cache *c, const int32_t *ids, int64_t n, char *err, size_t errlen) {
    int rc;
    if ((rc = dg_check_model(m, err, errlen)) != DG_OK || (rc = check_cache(m, c, err, errlen)) != DG_OK)
        return rc;
    return exec_encode(c->kv, m, ids, n, err, errlen);
}

/* Decoder pass over a canvas: reads the cache, never writes it (dgguf.h). */
int dg_decode(const dg_model *m, const dg_cache *c, const int32_t *ids, int64_t n, const float *sc_logits,
              int sc_top_k, const uint8_t *head_rows, float *logits, char *err, size_t errlen) {
    int rc;
    if ((rc = dg_check_model(m, err, errlen)) != DG_OK || (rc = check_cache(m, c, err, errlen)) != DG_OK)
        return rc;
    return exec_decode(c->kv, m, ids, n, sc_logits, sc_top_k, head_rows, logits, err, errlen);
}
