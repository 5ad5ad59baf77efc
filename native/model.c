/* model.c: the DiffusionGemma forward pass (encoder and decoder over one weight set) and its KV cache.
 *
 * Read top to bottom: the cache, the scratch buffers of one call, then one function per stage
 * (embed, decoder input with self-conditioning, attention block, dense MLP, MoE, head) and the two
 * passes that string them together, dg_encode and dg_decode. The math is docs/diffusiongemma.md
 * sections 4 and 5, in fp32; the ops live in ops.c, matmul.c and attention.c, on the threads of pool.c.
 */
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dgguf.h"
#include "attention.h"
#include "matmul.h"
#include "ops.h"
#include "pool.h"

#define FAIL(code, ...) do { snprintf(err, errlen, __VA_ARGS__); return (code); } while (0)

static int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

enum { MOE_CHUNK = 256 };   /* tokens per MoE pass: bounds the expert slot buffers */
static int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

/* ---- the KV cache ----------------------------------------------------------------------------------- */

/* One layer's keys (normed + roped) and values (rms-normed), [cap, n_kv, head_dim] each. Rows 0..n-1 hold
 * positions length-n .. length-1: every position for full layers, the last W-1 for sliding layers. */
typedef struct {
    int sliding, n_kv, head_dim;
    int64_t cap, n;
    float *k, *v;
} cache_layer;

struct dg_cache {
    int n_layers, window;
    int64_t capacity, length;
    int broken;                  /* a failed encode left the layers inconsistent */
    cache_layer *layers;
    dg_pool *pool;               /* the sequence's worker threads, started once */
    pthread_mutex_t in_use;      /* one pass at a time: the pool and the layers are not shared */
};

static int64_t kv_width(const cache_layer *cl) { return (int64_t)cl->n_kv * cl->head_dim; }

dg_cache *dg_cache_new(const dg_model *m, int64_t capacity, char *err, size_t errlen) {
    if (dg_check_model(m, err, errlen) != DG_OK) return NULL;
    if (capacity < 1) {
        snprintf(err, errlen, "cache capacity %lld is not positive", (long long)capacity);
        return NULL;
    }
    dg_cache *c = calloc(1, sizeof *c);
    if (!c) goto oom;
    pthread_mutex_init(&c->in_use, NULL);
    c->layers = calloc((size_t)m->n_layers, sizeof *c->layers);
    c->pool = pool_new(m->n_threads);
    if (!c->layers || !c->pool) goto oom;
    c->n_layers = m->n_layers;
    c->window = m->sliding_window;
    c->capacity = capacity;
    for (int l = 0; l < m->n_layers; l++) {
        const dg_layer *ly = &m->layers[l];
        cache_layer *cl = &c->layers[l];
        cl->sliding = ly->sliding;
        cl->n_kv = ly->n_kv_heads;
        cl->head_dim = ly->head_dim;
        cl->cap = ly->sliding ? min64(m->sliding_window - 1, capacity) : capacity;
        const double bytes = (double)max64(cl->cap, 1) * (double)kv_width(cl) * sizeof(float);
        if (bytes > (double)(SIZE_MAX / 4)) goto oom;
        cl->k = malloc((size_t)bytes);
        cl->v = malloc((size_t)bytes);
        if (!cl->k || !cl->v) goto oom;
    }
    return c;
oom:
    dg_cache_free(c);
    snprintf(err, errlen, "out of memory for a KV cache of %lld positions", (long long)capacity);
    return NULL;
}

void dg_cache_free(dg_cache *c) {
    if (!c) return;
    if (c->layers)
        for (int l = 0; l < c->n_layers; l++) {
            free(c->layers[l].k);
            free(c->layers[l].v);
        }
    free(c->layers);
    pool_free(c->pool);
    pthread_mutex_destroy(&c->in_use);
    free(c);
}

int64_t dg_cache_length(const dg_cache *c) { return c ? c->length : 0; }

int dg_cache_truncate(dg_cache *c, int64_t n, char *err, size_t errlen) {
    if (!c) FAIL(DG_E_VALUE, "no cache");
    if (c->broken) FAIL(DG_E_VALUE, "the cache is unusable after a failed encode; start a new one");
    if (n < 0 || n > c->length)
        FAIL(DG_E_SHAPE, "cannot truncate a cache of %lld positions to %lld", (long long)c->length, (long long)n);
    for (int l = 0; l < c->n_layers; l++) {      /* check every layer before changing any */
        const cache_layer *cl = &c->layers[l];
        const int64_t first_held = c->length - cl->n, first_needed = n - min64(n, cl->cap);
        if (first_needed < first_held)
            FAIL(DG_E_SHAPE, "cannot truncate to %lld positions: sliding layer %d holds only positions %lld.. "
                 "(the last %lld), and position %lld would be visible", (long long)n, l, (long long)first_held,
                 (long long)cl->cap, (long long)first_needed);
    }
    for (int l = 0; l < c->n_layers; l++) {
        cache_layer *cl = &c->layers[l];
        const int64_t keep = min64(n, cl->cap), from = (n - keep) - (c->length - cl->n), w = kv_width(cl);
        memmove(cl->k, cl->k + from * w, (size_t)(keep * w) * sizeof(float));
        memmove(cl->v, cl->v + from * w, (size_t)(keep * w) * sizeof(float));
        cl->n = keep;
    }
    c->length = n;
    return DG_OK;
}

/* Append n new rows of K/V; sliding layers then keep only their last cap rows. */
static void cache_append(cache_layer *cl, const float *k, const float *v, int64_t n) {
    const int64_t w = kv_width(cl);
    if (n >= cl->cap) {
        memcpy(cl->k, k + (n - cl->cap) * w, (size_t)(cl->cap * w) * sizeof(float));
        memcpy(cl->v, v + (n - cl->cap) * w, (size_t)(cl->cap * w) * sizeof(float));
        cl->n = cl->cap;
        return;
    }
    const int64_t keep = min64(cl->n, cl->cap - n), drop = cl->n - keep;
    if (drop) {
        memmove(cl->k, cl->k + drop * w, (size_t)(keep * w) * sizeof(float));
        memmove(cl->v, cl->v + drop * w, (size_t)(keep * w) * sizeof(float));
    }
    memcpy(cl->k + keep * w, k, (size_t)(n * w) * sizeof(float));
    memcpy(cl->v + keep * w, v, (size_t)(n * w) * sizeof(float));
    cl->n = keep + n;
}

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

static int check_cache(const dg_model *m, const dg_cache *c, char *err, size_t errlen) {
    if (!c) FAIL(DG_E_VALUE, "no cache");
    if (c->broken) FAIL(DG_E_VALUE, "the cache is unusable after a failed encode; start a new one");
    if (c->n_layers != m->n_layers || c->window != m->sliding_window)
        FAIL(DG_E_SHAPE, "the cache was made for another model (%d layers, window %d)", c->n_layers, c->window);
    for (int l = 0; l < m->n_layers; l++) {
        const cache_layer *cl = &c->layers[l];
        const dg_layer *ly = &m->layers[l];
        if (cl->sliding != ly->sliding || cl->n_kv != ly->n_kv_heads || cl->head_dim != ly->head_dim)
            FAIL(DG_E_SHAPE, "the cache was made for another model (layer %d)", l);
    }
    return DG_OK;
}

static int check_ids(const dg_model *m, const int32_t *ids, int64_t n, char *err, size_t errlen) {
    if (n < 0) FAIL(DG_E_SHAPE, "negative token count %lld", (long long)n);
    if (n > 0 && !ids) FAIL(DG_E_VALUE, "no token ids");
    for (int64_t i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= m->vocab)
            FAIL(DG_E_VALUE, "token id %d at index %lld is outside the vocabulary 0..%d", ids[i], (long long)i,
                 m->vocab - 1);
    return DG_OK;
}

/* ---- scratch buffers of one pass ---------------------------------------------------------------------- */

typedef struct {
    dg_pool *pool;
    int64_t n;                                 /* tokens in this pass */
    float *h;                                  /* residual stream [n, H] */
    float *x, *tmp, *h1, *h2;                  /* [n, H] */
    float *q, *att;                            /* [n, n_heads * d_max] */
    float *k, *v;                              /* [n, kv_max]: this pass's keys and values */
    float *g, *u;                              /* [n, F] (dense MLP) or [chunk * top_k, 2I] (expert slots) */
    float *xs, *ys;                            /* expert slots: [chunk * top_k, H] in and out */
    int *sel;                                  /* [chunk * top_k] the token of each slot */
    int *slot_of;                              /* [chunk * top_k] each token's slots, ascending */
    float *sel_w;                              /* [chunk * top_k] its routing weight */
    float *router;                             /* [n, E] */
    int *top_idx;                              /* [n, top_k] */
    float *top_w;                              /* [n, top_k] */
    float *inv_freq;                           /* [d_max / 2] */
    float *attn_scratch;                       /* [threads, attention_scratch(max keys, d_max)] */
} run_state;

/* The pass's buffers, carved out of one block the cache's pool keeps from pass to pass. */
static int run_state_new(run_state *s, const dg_model *m, const dg_cache *c, int64_t n, char *err, size_t errlen) {
    memset(s, 0, sizeof *s);
    const int64_t H = m->hidden, I = m->expert_ff, slots = min64(n, MOE_CHUNK) * m->top_k;
    const int64_t wide = max64(n * m->dense_ff, slots * 2 * I);
    int64_t d_max = 0, kv_max = 0, held_max = 0;
    for (int l = 0; l < m->n_layers; l++) {
        d_max = max64(d_max, m->layers[l].head_dim);
        kv_max = max64(kv_max, (int64_t)m->layers[l].n_kv_heads * m->layers[l].head_dim);
        held_max = max64(held_max, c->layers[l].n);
    }
    s->n = n;
    s->pool = c->pool;
    const int nt = pool_threads(s->pool);
    struct { void *p; int64_t count; } parts[] = {   /* 4-byte elements (float or int) */
        {&s->h, n * H}, {&s->x, n * H}, {&s->tmp, n * H}, {&s->h1, n * H}, {&s->h2, n * H},
        {&s->q, n * m->n_heads * d_max}, {&s->att, n * m->n_heads * d_max}, {&s->k, n * kv_max},
        {&s->v, n * kv_max}, {&s->g, wide}, {&s->u, wide}, {&s->xs, slots * H}, {&s->ys, slots * H},
        {&s->sel, slots}, {&s->slot_of, slots}, {&s->sel_w, slots}, {&s->router, n * m->n_experts},
        {&s->top_idx, n * m->top_k}, {&s->top_w, n * m->top_k}, {&s->inv_freq, d_max / 2},
        {&s->attn_scratch, nt * attention_scratch(held_max + n, (int)d_max)},
    };
    const int np = (int)(sizeof parts / sizeof parts[0]);
    size_t bytes[np], total = 0;
    for (int i = 0; i < np; i++) total += bytes[i] = ((size_t)max64(parts[i].count, 1) * 4 + 63) / 64 * 64;
    char *block = pool_shared(s->pool, SHARED_PASS, total);
    if (!block) FAIL(DG_E_VALUE, "out of memory for the scratch buffers of %lld tokens", (long long)n);
    for (int i = 0; i < np; i++) {
        *(void **)parts[i].p = block;
        block += bytes[i];
    }
    return DG_OK;
}

/* ---- stages ----------------------------------------------------------------------------------------- */

/* h[t] = E[ids[t]] * embed_scale, each embedding row dequantized from its stored type. */
static int embed(const dg_model *m, float *h, const int32_t *ids, int64_t n, char *err, size_t errlen) {
    const dg_tensor *E = &m->token_embd;
    const size_t rb = tensor_row_bytes(E);
    for (int64_t t = 0; t < n; t++) {
        float *row = h + t * m->hidden;
        int rc = dg_dequantize_rows(E->type, (const char *)E->data + (size_t)ids[t] * rb, row, 1, m->hidden,
                                    err, errlen);
        if (rc != DG_OK) return rc;
        for (int i = 0; i < m->hidden; i++) row[i] *= m->embed_scale;
    }
    return DG_OK;
}

/* out = down(gelu(gate(x)) * up(x)): the gated GELU MLP of the dense FFN and of self-conditioning. */
static int gated_mlp(run_state *s, float *out, const float *x, const dg_tensor *gate, const dg_tensor *up,
                     const dg_tensor *down, int64_t n, char *err, size_t errlen) {
    int rc;
    if ((rc = matmul(s->pool, s->g, x, gate, 0, n, err, errlen)) != DG_OK) return rc;
    if ((rc = matmul(s->pool, s->u, x, up, 0, n, err, errlen)) != DG_OK) return rc;
    gelu_mul(s->pool, s->g, s->u, n, gate->ne1);
    return matmul(s->pool, out, s->g, down, 0, n, err, errlen);
}

/* Decoder input: h = rms(e + SC(s)), s = softmax(sc_logits) @ E * embed_scale,
 * SC(s) = down(gelu(gate(rms_w(s, pre_norm))) * up(rms_w(s, pre_norm))). No sc_logits: h = rms(e). */
static int decoder_input(const dg_model *m, run_state *s, const int32_t *ids, const float *sc_logits,
                         int sc_top_k, char *err, size_t errlen) {
    const int64_t n = s->n, H = m->hidden;
    int rc;
    if ((rc = embed(m, s->h, ids, n, err, errlen)) != DG_OK) return rc;
    if (sc_logits) {
        rc = sc_top_k ? soft_embed_top_k(s->pool, s->x, sc_logits, &m->token_embd, m->embed_scale, n, sc_top_k, err,
                                         errlen)
                      : soft_embed(s->pool, s->x, sc_logits, &m->token_embd, m->embed_scale, n, err, errlen);
        if (rc != DG_OK) return rc;
        rmsnorm_rows(s->pool, s->x, s->x, m->sc_pre_norm.data, n, H, m->eps);
        if ((rc = gated_mlp(s, s->tmp, s->x, &m->sc_gate, &m->sc_up, &m->sc_down, n, err, errlen)) != DG_OK)
            return rc;
        for (int64_t i = 0; i < n * H; i++) s->h[i] += s->tmp[i];
    }
    rmsnorm_rows(s->pool, s->h, s->h, NULL, n, H, m->eps);
    return DG_OK;
}

/* The per-token stages around the matmuls run on the pool too: each token's values come from one thread, in the
 * order of the serial loop, so the bits never depend on the thread count. */
typedef struct {
    const dg_model *m;
    const dg_layer *ly;
    run_state *s;
    float scalar;
    int64_t t0;                  /* attention: the pass's first position; moe: the chunk's first token */
    int pairs;                   /* attention: RoPE pairs of the layer */
    int kv_only;                 /* attention: no queries (the encoder's last layer) */
} token_job;

/* Per token: q heads rms_w(q, q_norm) then RoPE; k heads the same with k_norm; v heads rms (no weight). */
static void qkv_heads(void *ctx, int64_t lo, int64_t hi, int thread) {
    const token_job *j = ctx;
    const dg_layer *ly = j->ly;
    const run_state *s = j->s;
    const int64_t d = ly->head_dim, nh = j->m->n_heads, nkv = ly->n_kv_heads;
    const float eps = j->m->eps;
    float cs[2 * (j->pairs > 0 ? j->pairs : 1)];
    for (int64_t t = lo; t < hi; t++) {
        rope_angles(cs, s->inv_freq, j->t0 + t, j->pairs);
        for (int64_t hd = 0; hd < (j->kv_only ? 0 : nh); hd++) {
            float *q = s->q + (t * nh + hd) * d;
            rmsnorm(q, q, ly->attn_q_norm.data, d, eps);
            rope_rotate(q, cs, (int)d, j->pairs);
        }
        for (int64_t hd = 0; hd < nkv; hd++) {
            float *k = s->k + (t * nkv + hd) * d, *v = s->v + (t * nkv + hd) * d;
            rmsnorm(k, k, ly->attn_k_norm.data, d, eps);
            rope_rotate(k, cs, (int)d, j->pairs);
            rmsnorm(v, v, NULL, d, eps);
        }
    }
}

/* h += rms_w(o, post_attention_norm) per token. */
static void attention_output(void *ctx, int64_t lo, int64_t hi, int thread) {
    const token_job *j = ctx;
    const int64_t H = j->m->hidden;
    for (int64_t t = lo; t < hi; t++) {
        float *o = j->s->tmp + t * H, *h = j->s->h + t * H;
        rmsnorm(o, o, j->ly->post_attention_norm.data, H, j->m->eps);
        for (int64_t i = 0; i < H; i++) h[i] += o[i];
    }
}

/* Attention block. x = rms_w(h, attn_norm); q, k = rope(rms_w(proj, norm)); v = rms(v_proj or raw k);
 * scores q.k (scale 1); h += rms_w(o_proj(attn), post_attention_norm).
 * Encoder (cache != NULL): causal (+ window on sliding layers), then appends K/V to the cache; kv_only
 * (the last encoder layer) computes only K/V and stops there. Decoder: sees the cached keys plus every key of
 * this pass. */
static int attention_block(const dg_model *m, const dg_layer *ly, run_state *s, const cache_layer *cl,
                           cache_layer *write, int64_t pos0, int kv_only, char *err, size_t errlen) {
    const int64_t n = s->n, H = m->hidden, d = ly->head_dim, nh = m->n_heads, nkv = ly->n_kv_heads;
    int rc;
    rmsnorm_rows(s->pool, s->x, s->h, ly->attn_norm.data, n, H, m->eps);
    if (!kv_only && (rc = matmul(s->pool, s->q, s->x, &ly->attn_q, 0, n, err, errlen)) != DG_OK) return rc;
    if ((rc = matmul(s->pool, s->k, s->x, &ly->attn_k, 0, n, err, errlen)) != DG_OK) return rc;
    if (ly->sliding) {
        if ((rc = matmul(s->pool, s->v, s->x, &ly->attn_v, 0, n, err, errlen)) != DG_OK) return rc;
    } else {
        memcpy(s->v, s->k, (size_t)(n * nkv * d) * sizeof(float));   /* K = V: the raw projection */
    }
    token_job j = {m, ly, s, 0.0f, pos0, rope_freqs(m, ly, s->inv_freq), kv_only};
    parallel_for(s->pool, n, qkv_heads, &j);
    if (kv_only) {
        cache_append(write, s->k, s->v, n);
        return DG_OK;
    }
    const int64_t window = (write && ly->sliding) ? m->sliding_window : 0;
    const attn_layer a = {s->q, cl->k, cl->v, s->k, s->v, s->att, n, cl->n, window, write != NULL, (int)nh, (int)nkv,
                          (int)d};
    attention_layer(s->pool, &a, s->attn_scratch);
    if (write) cache_append(write, s->k, s->v, n);
    if ((rc = matmul(s->pool, s->tmp, s->att, &ly->attn_output, 0, n, err, errlen)) != DG_OK) return rc;
    parallel_for(s->pool, n, attention_output, &j);
    return DG_OK;
}

/* r = rms(h) * scale * H^-0.5 */
static void router_input(void *ctx, int64_t lo, int64_t hi, int thread) {
    const token_job *j = ctx;
    const int64_t H = j->m->hidden;
    const float root = (float)pow((double)H, -0.5), *scale = j->ly->ffn_gate_inp_scale.data;
    for (int64_t t = lo; t < hi; t++) {
        float *r = j->s->x + t * H;
        rmsnorm(r, j->s->h + t * H, NULL, H, j->m->eps);
        for (int64_t i = 0; i < H; i++) r[i] = r[i] * scale[i] * root;
    }
}

static void router_select(void *ctx, int64_t lo, int64_t hi, int thread) {
    const token_job *j = ctx;
    const int64_t E = j->m->n_experts, K = j->m->top_k;
    const float *exp_scale = j->ly->ffn_down_exps_scale.data;
    for (int64_t t = lo; t < hi; t++) {
        float *p = j->s->router + t * E, *w = j->s->top_w + t * K;
        int *idx = j->s->top_idx + t * K;
        softmax(p, E);
        topk(idx, p, (int)E, (int)K);
        float sum = 0.0f;
        for (int64_t k = 0; k < K; k++) sum += p[idx[k]];
        for (int64_t k = 0; k < K; k++) w[k] = p[idx[k]] / sum * exp_scale[idx[k]];
    }
}

/* Router on the raw residual: r = rms(h) * scale * H^-0.5, p = softmax(r . W), top-k, weights renormalised
 * to sum 1 and then multiplied by the per-expert scale. */
static int route(const dg_model *m, const dg_layer *ly, run_state *s, char *err, size_t errlen) {
    token_job j = {m, ly, s, 0.0f, 0, 0, 0};
    parallel_for(s->pool, s->n, router_input, &j);
    int rc = matmul(s->pool, s->router, s->x, &ly->ffn_gate_inp, 0, s->n, err, errlen);
    if (rc != DG_OK) return rc;
    parallel_for(s->pool, s->n, router_select, &j);
    return DG_OK;
}

/* act[c] = gelu(gate[c]) * up[c] for slots [lo, hi), gate and up the two halves of each row of g ([2I]). */
typedef struct {
    const run_state *s;
    int64_t I;
} gated_job;

static void gated_slots(void *ctx, int64_t lo, int64_t hi, int thread) {
    const gated_job *j = ctx;
    for (int64_t c = lo; c < hi; c++) {
        float *gu = j->s->g + c * 2 * j->I, *a = j->s->u + c * j->I;
        gelu_tanh(gu, j->I);
        for (int64_t i = 0; i < j->I; i++) a[i] = gu[i] * gu[j->I + i];
    }
}

static void gather_slots(void *ctx, int64_t lo, int64_t hi, int thread) {
    const token_job *j = ctx;
    const int64_t H = j->m->hidden;
    for (int64_t c = lo; c < hi; c++) memcpy(j->s->xs + c * H, j->s->x + j->s->sel[c] * H, (size_t)H * sizeof(float));
}

/* h2[t] = sum of w * y over token t's slots, ascending (its experts in ascending order). */
static void combine_slots(void *ctx, int64_t lo, int64_t hi, int thread) {
    const token_job *j = ctx;
    const run_state *s = j->s;
    const int64_t H = j->m->hidden, K = j->m->top_k;
    for (int64_t i = lo; i < hi; i++) {
        float *out = s->h2 + (j->t0 + i) * H;
        memset(out, 0, (size_t)H * sizeof(float));
        for (int64_t k = 0; k < K; k++) {
            const int c = s->slot_of[i * K + k];
            const float *y = s->ys + (int64_t)c * H;
            for (int64_t d = 0; d < H; d++) out[d] += y[d] * s->sel_w[c];
        }
    }
}

/* MoE into s->h2: moe[t] = sum over t's experts e (ascending) of w * down_e(gelu(gate_e(xe)) * up_e(xe)),
 * xe = rms_w(h, pre_ffw_norm_2); gate_up_exps matrix e holds the gate rows, then the up rows. Tokens go in chunks
 * of MOE_CHUNK (the slot buffers stay that size however long the pass); in a chunk the (token, expert) pairs are
 * grouped by expert into slots (expert e's tokens, ascending, in slots off[e] .. off[e + 1] - 1), and each
 * projection runs every expert in one grouped matmul, its experts and row blocks shared across threads. */
static int moe(const dg_model *m, const dg_layer *ly, run_state *s, char *err, size_t errlen) {
    const int64_t n = s->n, H = m->hidden, I = m->expert_ff, K = m->top_k, E = m->n_experts;
    int rc;
    if ((rc = route(m, ly, s, err, errlen)) != DG_OK) return rc;
    rmsnorm_rows(s->pool, s->x, s->h, ly->pre_ffw_norm_2.data, n, H, m->eps);
    int64_t off[E + 1];
    for (int64_t t0 = 0; t0 < n; t0 += MOE_CHUNK) {
        const int64_t t1 = min64(n, t0 + MOE_CHUNK);
        int filled[t1 - t0];
        memset(filled, 0, sizeof filled);
        off[0] = 0;
        for (int64_t e = 0; e < E; e++) {
            int64_t c = off[e];
            for (int64_t t = t0; t < t1; t++)
                for (int64_t k = 0; k < K; k++)
                    if (s->top_idx[t * K + k] == e) {
                        s->sel[c] = (int)t;
                        s->sel_w[c] = s->top_w[t * K + k];
                        s->slot_of[(t - t0) * K + filled[t - t0]++] = (int)c;
                        c++;
                    }
            off[e + 1] = c;
        }
        token_job tj = {m, ly, s, 0.0f, t0, 0, 0};
        parallel_for(s->pool, off[E], gather_slots, &tj);
        if ((rc = matmul_grouped(s->pool, s->g, s->xs, &ly->ffn_gate_up_exps, off, err, errlen)) != DG_OK)
            return rc;
        gated_job gj = {s, I};
        parallel_for(s->pool, off[E], gated_slots, &gj);
        if ((rc = matmul_grouped(s->pool, s->ys, s->u, &ly->ffn_down_exps, off, err, errlen)) != DG_OK) return rc;
        parallel_for(s->pool, t1 - t0, combine_slots, &tj);
    }
    return DG_OK;
}

static void ffn_output(void *ctx, int64_t lo, int64_t hi, int thread) {
    const token_job *j = ctx;
    const dg_layer *ly = j->ly;
    const int64_t H = j->m->hidden;
    const float eps = j->m->eps;
    for (int64_t t = lo; t < hi; t++) {
        float *h1 = j->s->h1 + t * H, *h2 = j->s->h2 + t * H, *h = j->s->h + t * H;
        rmsnorm(h1, h1, ly->post_ffw_norm_1.data, H, eps);
        rmsnorm(h2, h2, ly->post_ffw_norm_2.data, H, eps);
        for (int64_t i = 0; i < H; i++) h1[i] += h2[i];
        rmsnorm(h1, h1, ly->post_ffw_norm.data, H, eps);
        for (int64_t i = 0; i < H; i++) h[i] = (h[i] + h1[i]) * j->scalar;
    }
}

/* Feed-forward: the dense MLP and the MoE both read the residual h;
 * h = (h + rms_w(rms_w(dense, post_ffw_norm_1) + rms_w(moe, post_ffw_norm_2), post_ffw_norm)) * scalar, the
 * layer's output scale (the encoder's or the decoder's). */
static int ffn_block(const dg_model *m, const dg_layer *ly, run_state *s, float scalar, char *err, size_t errlen) {
    const int64_t n = s->n, H = m->hidden;
    int rc;
    rmsnorm_rows(s->pool, s->x, s->h, ly->ffn_norm.data, n, H, m->eps);
    if ((rc = gated_mlp(s, s->h1, s->x, &ly->ffn_gate, &ly->ffn_up, &ly->ffn_down, n, err, errlen)) != DG_OK)
        return rc;
    if ((rc = moe(m, ly, s, err, errlen)) != DG_OK) return rc;
    token_job j = {m, ly, s, scalar, 0, 0, 0};
    parallel_for(s->pool, n, ffn_output, &j);
    return DG_OK;
}

/* logits = softcap * tanh(rms_w(h, output_norm) . E^T / softcap), E the tied embedding in its stored type; with
 * rows, only for the flagged rows (gathered into one matmul, which reads E once, then put in their places). */
static int head(const dg_model *m, run_state *s, float *logits, const uint8_t *rows, char *err, size_t errlen) {
    const int64_t n = s->n, H = m->hidden, V = m->vocab;
    int64_t k = n;
    if (rows) {
        k = 0;
        for (int64_t t = 0; t < n; t++)
            if (rows[t]) memcpy(s->tmp + k++ * H, s->h + t * H, (size_t)H * sizeof(float));
        if (k == 0) return DG_OK;
    }
    rmsnorm_rows(s->pool, s->x, k == n ? s->h : s->tmp, m->output_norm.data, k, H, m->eps);
    float *out = k == n ? logits : pool_shared(s->pool, SHARED_HEAD, (size_t)(k * V) * sizeof(float));
    if (!out) FAIL(DG_E_VALUE, "out of memory for the logits of %lld rows", (long long)k);
    int rc = matmul(s->pool, out, s->x, &m->token_embd, 0, k, err, errlen);
    if (rc != DG_OK) return rc;
    if (m->softcap > 0.0f) softcap(s->pool, out, k, V, m->softcap);
    if (out != logits)
        for (int64_t t = 0, r = 0; t < n; t++)
            if (rows[t]) memcpy(logits + t * V, out + r++ * V, (size_t)V * sizeof(float));
    return DG_OK;
}

/* ---- the two passes ----------------------------------------------------------------------------------- */

int dg_encode(const dg_model *m, dg_cache *c, const int32_t *ids, int64_t n, char *err, size_t errlen) {
    int rc;
    if ((rc = dg_check_model(m, err, errlen)) != DG_OK || (rc = check_cache(m, c, err, errlen)) != DG_OK ||
        (rc = check_ids(m, ids, n, err, errlen)) != DG_OK)
        return rc;
    if (n == 0) return DG_OK;
    if (n > c->capacity - c->length)
        FAIL(DG_E_SHAPE, "encoding %lld tokens after %lld would exceed the cache capacity of %lld positions",
             (long long)n, (long long)c->length, (long long)c->capacity);
    if (pthread_mutex_trylock(&c->in_use) != 0) FAIL(DG_E_VALUE, "the cache is in use by another call");
    run_state s;
    if ((rc = run_state_new(&s, m, c, n, err, errlen)) != DG_OK) {
        pthread_mutex_unlock(&c->in_use);
        return rc;
    }
    const int64_t pos0 = c->length;
    if ((rc = embed(m, s.h, ids, n, err, errlen)) != DG_OK) goto done;
    for (int l = 0; l < m->n_layers; l++) {
        const dg_layer *ly = &m->layers[l];
        cache_layer *cl = &c->layers[l];
        const int last = l == m->n_layers - 1;     /* only its K/V matter: skip its attention output and FFN */
        if ((rc = attention_block(m, ly, &s, cl, cl, pos0, last, err, errlen)) != DG_OK) break;
        if (last) break;
        if ((rc = ffn_block(m, ly, &s, ly->enc_scale, err, errlen)) != DG_OK) break;
    }
done:
    if (rc == DG_OK)
        c->length += n;
    else
        c->broken = 1;   /* some layers may already hold the new positions */
    pthread_mutex_unlock(&c->in_use);
    return rc;
}

int dg_decode(const dg_model *m, const dg_cache *c, const int32_t *ids, int64_t n, const float *sc_logits,
              int sc_top_k, const uint8_t *head_rows, float *logits, char *err, size_t errlen) {
    int rc;
    if ((rc = dg_check_model(m, err, errlen)) != DG_OK || (rc = check_cache(m, c, err, errlen)) != DG_OK ||
        (rc = check_ids(m, ids, n, err, errlen)) != DG_OK)
        return rc;
    if (n == 0) return DG_OK;
    if (!logits) FAIL(DG_E_VALUE, "no logits buffer");
    if (sc_top_k < 0 || sc_top_k > m->vocab)
        FAIL(DG_E_SHAPE, "sc_top_k %d is outside 0..%d (0: the whole vocabulary)", sc_top_k, m->vocab);
    /* The cache's contents stay const; its lock and worker pool are the only state a pass takes over. */
    pthread_mutex_t *in_use = &((dg_cache *)c)->in_use;
    if (pthread_mutex_trylock(in_use) != 0) FAIL(DG_E_VALUE, "the cache is in use by another call");
    run_state s;
    if ((rc = run_state_new(&s, m, c, n, err, errlen)) != DG_OK) {
        pthread_mutex_unlock(in_use);
        return rc;
    }
    if ((rc = decoder_input(m, &s, ids, sc_logits, sc_top_k, err, errlen)) != DG_OK) goto done;
    for (int l = 0; l < m->n_layers; l++) {
        const dg_layer *ly = &m->layers[l];
        if ((rc = attention_block(m, ly, &s, &c->layers[l], NULL, c->length, 0, err, errlen)) != DG_OK) goto done;
        if ((rc = ffn_block(m, ly, &s, ly->dec_scale, err, errlen)) != DG_OK) goto done;
    }
    rc = head(m, &s, logits, head_rows, err, errlen);
done:
    pthread_mutex_unlock(in_use);
    return rc;
}
