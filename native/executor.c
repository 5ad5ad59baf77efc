/* executor.c: the hybrid executor (dgguf.h): the DiffusionGemma forward (model.c's passes) on a device backend
 * (backend.h), with each layer's experts resident, computed on the CPU beside the device, or streamed to the
 * device every pass. This file places: the groups, the uploads, the caches, the pieces and counters of the passes.
 *
 * What lives where:
 * - device, allocated once (one allocation per group, items at DG_ALIGN offsets; runtime/planner.py computes the
 *   same bytes): the embedding (token embedding, head, soft embedding), globals (output norm, self-conditioning,
 *   RoPE tables), every layer's non-expert weights, the buffers of one pass of max_tokens tokens (logits only for
 *   decoder passes; encodes longer than max_tokens go in pieces), the kernels' workspace, the resident expert
 *   layers, streaming's two staging slots, and each KV cache;
 * - host: the caller's weights (the mapped file), which CPU and streamed experts read, and four host_alloc
 *   buffers through which a CPU layer's inputs and output cross.
 * What crosses per pass, and when: the token ids up at the start; a decoder pass's self-conditioning logits up
 * before its input stage and its logits down after the head; per CPU expert layer, after the router, the MoE
 * input [n, H], the chosen experts and weights [n, K] down (while the device runs the dense MLP), the MoE output
 * [n, H] up; per streamed layer its expert tensors up into a staging slot, two layers ahead (double buffered:
 * slot s is refilled once the layer that used it is done). The encoder's last layer stops at its K/V, so a
 * streamed or CPU last layer costs an encode nothing.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "exec.h"
#include "matmul.h"
#include "ops.h"

#define FAIL(code, ...) do { snprintf(err, errlen, __VA_ARGS__); return (code); } while (0)
#define TRY(call) do { if ((rc = (call)) != DG_OK) return rc; } while (0)

static int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
static int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

/* ---- sizes ------------------------------------------------------------------------------------------------ */

static size_t tensor_bytes(const dg_tensor *t) { return tensor_row_bytes(t) * (size_t)t->ne1 * (size_t)t->ne2; }

static void dims(const dg_model *m, int64_t *d_max, int64_t *kv_max) {
    *d_max = *kv_max = 0;
    for (int l = 0; l < m->n_layers; l++) {
        *d_max = max64(*d_max, m->layers[l].head_dim);
        *kv_max = max64(*kv_max, (int64_t)m->layers[l].n_kv_heads * m->layers[l].head_dim);
    }
}

void dg_workspace_layout(const dg_model *m, int64_t max_tokens, int64_t moe_chunk, int elem, dg_workspace_parts *p) {
    const int64_t T = max_tokens, P = min64(T, moe_chunk) * m->top_k, E = m->n_experts, H = m->hidden,
                  I = m->expert_ff;
    p->moe_ints = dg_align((size_t)(2 * (E + 1) + 3 * P) * 4);
    p->moe_gate_up = dg_align((size_t)(P * 2 * I) * 4);
    p->moe_act = dg_align((size_t)(P * I) * 4);
    p->moe_out = dg_align((size_t)(P * H) * 4);
    p->soft_stats = dg_align((size_t)(2 * T) * 4);
    p->soft_parts = dg_align((size_t)(DG_SOFT_SLICES * T * H) * 4);
    p->kv_move = 0;
    for (int l = 0; l < m->n_layers; l++)
        if (m->layers[l].sliding)
            p->kv_move = (size_t)max64((int64_t)p->kv_move, (int64_t)dg_align(
                (size_t)(max64(m->sliding_window - 1, 1) * m->layers[l].n_kv_heads * m->layers[l].head_dim * elem)));
}

size_t dg_workspace_bytes(const dg_model *m, int64_t max_tokens, int64_t moe_chunk, int elem) {
    dg_workspace_parts p;
    dg_workspace_layout(m, max_tokens, moe_chunk, elem, &p);
    const size_t moe = p.moe_ints + p.moe_gate_up + p.moe_act + p.moe_out, soft = p.soft_stats + p.soft_parts;
    return moe > soft ? (moe > p.kv_move ? moe : p.kv_move) : (soft > p.kv_move ? soft : p.kv_move);
}

/* ---- the executor ------------------------------------------------------------------------------------------ */

typedef exec_block block;

static int64_t cache_elem(const dg_exec *x) { return exec_cache_elem(x); }

/* One allocation for a list of items, each at a DG_ALIGN offset: sizes[i] bytes for *ptrs[i]. */
static int alloc_block(dg_backend *b, block *blk, void **const *ptrs, const size_t *sizes, int count, char *err,
                       size_t errlen) {
    size_t total = 0;
    for (int i = 0; i < count; i++) total += dg_align(sizes[i]);
    blk->bytes = (int64_t)total;
    int rc = b->alloc(b, total, &blk->ptr, err, errlen);
    if (rc != DG_OK) return rc;
    char *at = blk->ptr;
    for (int i = 0; i < count; i++) {
        *ptrs[i] = at;
        at += dg_align(sizes[i]);
    }
    return DG_OK;
}

static void free_block(dg_backend *b, block *blk) {
    if (blk->ptr) b->release(b, blk->ptr, (size_t)blk->bytes);
    blk->ptr = NULL;
}

/* The tensors of a layer the device needs besides the experts, in dg_layer's order. */
static int layer_weights(dg_layer *ly, dg_tensor **out) {
    dg_tensor *all[] = {&ly->attn_norm, &ly->attn_q, &ly->attn_k, &ly->attn_v, &ly->attn_output, &ly->attn_q_norm,
                        &ly->attn_k_norm, &ly->post_attention_norm, &ly->ffn_norm, &ly->ffn_gate, &ly->ffn_up,
                        &ly->ffn_down, &ly->post_ffw_norm_1, &ly->ffn_gate_inp, &ly->ffn_gate_inp_scale,
                        &ly->ffn_down_exps_scale, &ly->pre_ffw_norm_2, &ly->post_ffw_norm_2, &ly->post_ffw_norm};
    int n = 0;
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
        if (all[i] != &ly->attn_v || ly->sliding) out[n++] = all[i];
    return n;
}

enum { MAX_WEIGHTS = 32 };

/* Places tensors (device copies of the host ones) in one block and uploads them. */
static int place_tensors(dg_exec *x, block *blk, dg_tensor **ts, int count, char *err, size_t errlen) {
    void *dst[MAX_WEIGHTS];
    void **ptrs[MAX_WEIGHTS];
    size_t sizes[MAX_WEIGHTS];
    int rc;
    for (int i = 0; i < count; i++) {
        ptrs[i] = &dst[i];
        sizes[i] = tensor_bytes(ts[i]);
    }
    TRY(alloc_block(x->dev, blk, ptrs, sizes, count, err, errlen));
    for (int i = 0; i < count; i++) {
        TRY(x->dev->upload(x->dev, dst[i], ts[i]->data, sizes[i], err, errlen));
        x->load_h2d += (int64_t)sizes[i];
        ts[i]->data = dst[i];
    }
    return DG_OK;
}

void dg_exec_free(dg_exec *x) {
    if (!x) return;
    if (x->dev) {
        x->dev->sync(x->dev, (char[8]){0}, 8);
        for (int g = 0; g < DG_GROUPS; g++) free_block(x->dev, &x->group[g]);
        if (x->expert_blocks)
            for (int l = 0; l < x->m.n_layers; l++) free_block(x->dev, &x->expert_blocks[l]);
        free_block(x->dev, &x->stage[0]);
        if (x->host && x->experts)
            for (int l = 0; l < x->m.n_layers; l++)
                if (x->experts[l] == DG_EXPERTS_STREAM) {
                    x->dev->unpin(x->dev, x->host->layers[l].ffn_gate_up_exps.data);
                    x->dev->unpin(x->dev, x->host->layers[l].ffn_down_exps.data);
                }
        void *host[] = {x->cx, x->cw, x->cy, x->cidx};
        for (size_t i = 0; i < sizeof host / sizeof host[0]; i++)
            if (host[i]) x->dev->host_release(x->dev, host[i]);
    }
    if (x->cpu) {
        if (x->cpu_ws) x->cpu->release(x->cpu, x->cpu_ws, x->cpu_ws_bytes);
        dg_backend_free(x->cpu);
    }
    if (x->dev) free_block(x->dev, &x->head);
    free(x->expert_blocks);
    free(x->experts);
    if (!x->in_place) free(x->layers);   /* in place: the caller's */
    free(x->inv_freq);
    free(x->pairs);
    free(x->stream_order);
    pthread_mutex_destroy(&x->in_use);
    free(x);
}

static dg_exec *fail_new(dg_exec *x) {
    dg_exec_free(x);
    return NULL;
}

dg_exec *dg_exec_new(const dg_model *m, dg_backend *dev, const dg_exec_config *cfg, char *err, size_t errlen) {
    if (dg_check_model(m, err, errlen) != DG_OK) return NULL;
    if (!dev || !cfg || !cfg->experts || cfg->max_tokens < 1) {
        snprintf(err, errlen, "executor: no backend, configuration or placement, or max_tokens < 1");
        return NULL;
    }
    for (int l = 0; l < m->n_layers; l++)
        if (cfg->experts[l] < DG_EXPERTS_DEVICE || cfg->experts[l] > DG_EXPERTS_STREAM) {
            snprintf(err, errlen, "executor: layer %d: placement %d is not DG_EXPERTS_*", l, cfg->experts[l]);
            return NULL;
        }
    dg_exec *x = calloc(1, sizeof *x);
    if (!x) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    pthread_mutex_init(&x->in_use, NULL);
    const int L = m->n_layers;
    x->host = m;
    x->m = *m;
    x->dev = dev;
    x->kv_f16 = cfg->kv_f16 != 0;
    x->T = cfg->max_tokens;
    x->layers = malloc((size_t)L * sizeof(dg_layer));
    x->experts = malloc((size_t)L * sizeof(int32_t));
    x->expert_blocks = calloc((size_t)L, sizeof(block));
    x->inv_freq = calloc((size_t)L, sizeof(float *));
    x->pairs = calloc((size_t)L, sizeof(int));
    x->stream_order = calloc((size_t)L, sizeof(int));
    if (!x->layers || !x->experts || !x->expert_blocks || !x->inv_freq || !x->pairs || !x->stream_order) {
        snprintf(err, errlen, "out of memory");
        return fail_new(x);
    }
    memcpy(x->layers, m->layers, (size_t)L * sizeof(dg_layer));
    memcpy(x->experts, cfg->experts, (size_t)L * sizeof(int32_t));
    x->m.layers = x->layers;
    dg_model *dm = &x->m;
    const int64_t T = x->T, H = m->hidden, K = m->top_k;

    /* embedding, globals (RoPE tables last), layers */
    dg_tensor *ts[MAX_WEIGHTS];
    ts[0] = &dm->token_embd;
    if (place_tensors(x, &x->group[DG_GROUP_EMBEDDING], ts, 1, err, errlen) != DG_OK) return fail_new(x);
    {
        dg_tensor *gl[] = {&dm->output_norm, &dm->sc_pre_norm, &dm->sc_gate, &dm->sc_up, &dm->sc_down};
        void *dst[6];
        void **ptrs[6];
        size_t sizes[6];
        int64_t rope_floats = 0;
        for (int l = 0; l < L; l++) rope_floats += m->layers[l].head_dim / 2;
        for (int i = 0; i < 6; i++) {
            ptrs[i] = &dst[i];
            sizes[i] = i < 5 ? tensor_bytes(gl[i]) : (size_t)rope_floats * 4;
        }
        if (alloc_block(dev, &x->group[DG_GROUP_GLOBALS], ptrs, sizes, 6, err, errlen) != DG_OK) return fail_new(x);
        for (int i = 0; i < 5; i++) {
            if (dev->upload(dev, dst[i], gl[i]->data, sizes[i], err, errlen) != DG_OK) return fail_new(x);
            x->load_h2d += (int64_t)sizes[i];
            gl[i]->data = dst[i];
        }
        float *table = malloc((size_t)max64(rope_floats, 1) * 4), *at = dst[5];
        if (!table) {
            snprintf(err, errlen, "out of memory");
            return fail_new(x);
        }
        int64_t o = 0;
        for (int l = 0; l < L; l++) {
            memset(table + o, 0, (size_t)(m->layers[l].head_dim / 2) * 4);
            x->pairs[l] = rope_freqs(m, &m->layers[l], table + o);
            x->inv_freq[l] = at + o;
            o += m->layers[l].head_dim / 2;
        }
        const int rc = dev->upload(dev, dst[5], table, sizes[5], err, errlen);
        free(table);
        if (rc != DG_OK) return fail_new(x);
        x->load_h2d += (int64_t)sizes[5];
    }
    {
        int count = 0;
        dg_tensor **all = calloc((size_t)L * MAX_WEIGHTS, sizeof *all);
        void **dst = calloc((size_t)L * MAX_WEIGHTS, sizeof *dst);
        void ***ptrs = calloc((size_t)L * MAX_WEIGHTS, sizeof *ptrs);
        size_t *sizes = calloc((size_t)L * MAX_WEIGHTS, sizeof *sizes);
        int rc = (all && dst && ptrs && sizes) ? DG_OK : DG_E_VALUE;
        if (rc != DG_OK) snprintf(err, errlen, "out of memory");
        for (int l = 0; rc == DG_OK && l < L; l++) count += layer_weights(&x->layers[l], all + count);
        for (int i = 0; rc == DG_OK && i < count; i++) {
            ptrs[i] = &dst[i];
            sizes[i] = tensor_bytes(all[i]);
        }
        if (rc == DG_OK) rc = alloc_block(dev, &x->group[DG_GROUP_LAYERS], ptrs, sizes, count, err, errlen);
        for (int i = 0; rc == DG_OK && i < count; i++) {
            rc = dev->upload(dev, dst[i], all[i]->data, sizes[i], err, errlen);
            x->load_h2d += (int64_t)sizes[i];
            all[i]->data = dst[i];
        }
        free(all);
        free(dst);
        free(ptrs);
        free(sizes);
        if (rc != DG_OK) return fail_new(x);
    }
    x->T = 0;
    if (exec_ensure_buffers(x, cfg->max_tokens, err, errlen) != DG_OK) return fail_new(x);
    /* experts: resident layers in their own blocks; the staging slots, sized for the largest streamed layer */
    int n_stream = 0, n_cpu = 0;
    for (int l = 0; l < L; l++) {
        dg_layer *ly = &x->layers[l];
        if (x->experts[l] == DG_EXPERTS_DEVICE) {
            dg_tensor *ex[] = {&ly->ffn_gate_up_exps, &ly->ffn_down_exps};
            if (place_tensors(x, &x->expert_blocks[l], ex, 2, err, errlen) != DG_OK) return fail_new(x);
            x->group[DG_GROUP_EXPERTS].bytes += x->expert_blocks[l].bytes;
        } else if (x->experts[l] == DG_EXPERTS_STREAM) {
            n_stream++;
            x->stage_bytes = max64(x->stage_bytes, (int64_t)(dg_align(tensor_bytes(&ly->ffn_gate_up_exps)) +
                                                             dg_align(tensor_bytes(&ly->ffn_down_exps))));
            dev->pin(dev, ly->ffn_gate_up_exps.data, tensor_bytes(&ly->ffn_gate_up_exps));
            dev->pin(dev, ly->ffn_down_exps.data, tensor_bytes(&ly->ffn_down_exps));
        } else {
            n_cpu++;
        }
    }
    if (n_stream) {
        const int slots = n_stream < DG_BACKEND_SLOTS ? n_stream : DG_BACKEND_SLOTS;
        void *p[DG_BACKEND_SLOTS] = {NULL, NULL};
        void **ptrs[] = {&p[0], &p[1]};
        const size_t sizes[] = {(size_t)x->stage_bytes, (size_t)x->stage_bytes};
        if (alloc_block(dev, &x->stage[0], ptrs, sizes, slots, err, errlen) != DG_OK) return fail_new(x);
        x->group[DG_GROUP_STAGING].bytes = x->stage[0].bytes;
        x->stage[1].ptr = p[1];   /* a view into stage[0]'s block: never freed itself */
    }
    if (n_cpu) {
        char cerr[256];
        x->cpu = host_backend_make(0, m->n_threads, 0, cerr, sizeof cerr);
        if (!x->cpu) {
            snprintf(err, errlen, "executor: the CPU side: %s", cerr);
            return fail_new(x);
        }
        dg_workspace_parts p;
        dg_workspace_layout(m, T, DG_EXEC_MOE_CHUNK, (int)cache_elem(x), &p);
        x->cpu_ws_bytes = p.moe_ints + p.moe_gate_up + p.moe_act + p.moe_out;
        if (x->cpu->alloc(x->cpu, x->cpu_ws_bytes, &x->cpu_ws, err, errlen) != DG_OK) return fail_new(x);
        x->cpu->bind_workspace(x->cpu, x->cpu_ws, x->cpu_ws_bytes);
        if (dev->host_alloc(dev, (size_t)(T * H * 4), (void **)&x->cx, err, errlen) != DG_OK ||
            dev->host_alloc(dev, (size_t)(T * H * 4), (void **)&x->cy, err, errlen) != DG_OK ||
            dev->host_alloc(dev, (size_t)(T * K * 4), (void **)&x->cw, err, errlen) != DG_OK ||
            dev->host_alloc(dev, (size_t)(T * K * 4), (void **)&x->cidx, err, errlen) != DG_OK)
            return fail_new(x);
    }
    if (dev->sync(dev, err, errlen) != DG_OK) return fail_new(x);
    return x;
}

void dg_exec_get_stats(const dg_exec *x, dg_exec_stats *out) {
    memset(out, 0, sizeof *out);
    if (!x) return;
    for (int g = 0; g < DG_GROUPS; g++) out->group[g] = x->group[g].bytes;
    out->load_h2d = x->load_h2d;
    out->pass_h2d = x->pass_h2d;
    out->pass_d2h = x->pass_d2h;
    for (int l = 0; l < x->m.n_layers; l++) {
        out->device_layers += x->experts[l] == DG_EXPERTS_DEVICE;
        out->cpu_layers += x->experts[l] == DG_EXPERTS_CPU;
        out->stream_layers += x->experts[l] == DG_EXPERTS_STREAM;
    }
}

int64_t dg_exec_expert_bytes(const dg_exec *x, int layer) {
    return x && layer >= 0 && layer < x->m.n_layers ? x->expert_blocks[layer].bytes : 0;
}

/* The pass buffers and the workspace for n tokens: made once (placed), or grown to the longest pass (in place,
 * where the caller's arrays hold the self-conditioning input and the logits: no [n, V] buffer). */
int exec_ensure_buffers(dg_exec *x, int64_t n, char *err, size_t errlen) {
    if (n <= x->T) return DG_OK;
    if (!x->in_place && x->T)
        FAIL(DG_E_SHAPE, "a pass of %lld tokens: the executor's buffers hold %lld", (long long)n, (long long)x->T);
    dg_backend *dev = x->dev;
    const dg_model *m = &x->m;
    free_block(dev, &x->group[DG_GROUP_BUFFERS]);
    free_block(dev, &x->group[DG_GROUP_WORKSPACE]);
    x->group[DG_GROUP_BUFFERS].bytes = x->group[DG_GROUP_WORKSPACE].bytes = 0;
    x->T = 0;
    const int64_t T = n, H = m->hidden, V = m->vocab, K = m->top_k, E = m->n_experts, F = m->dense_ff;
    int64_t d_max, kv_max;
    dims(m, &d_max, &kv_max);
    void **ptrs[] = {(void **)&x->ids, (void **)&x->top_idx, (void **)&x->h, (void **)&x->x, (void **)&x->xm,
                     (void **)&x->tmp, (void **)&x->h1, (void **)&x->h2, (void **)&x->q, (void **)&x->att,
                     (void **)&x->k, (void **)&x->v, (void **)&x->g, (void **)&x->u, (void **)&x->router,
                     (void **)&x->top_w, (void **)&x->logits};
    const size_t sizes[] = {T * 4, T * K * 4, T * H * 4, T * H * 4, T * H * 4, T * H * 4, T * H * 4, T * H * 4,
                            T * m->n_heads * d_max * 4, T * m->n_heads * d_max * 4, T * kv_max * 4, T * kv_max * 4,
                            T * F * 4, T * F * 4, T * E * 4, T * K * 4, x->in_place ? 0 : T * V * 4};
    int rc = alloc_block(dev, &x->group[DG_GROUP_BUFFERS], ptrs, sizes, (int)(sizeof sizes / sizeof sizes[0]), err,
                         errlen);
    if (rc != DG_OK) return rc;
    void *ws;
    void **wptrs[] = {&ws};
    const size_t wsize[] = {dg_workspace_bytes(m, T, DG_EXEC_MOE_CHUNK, (int)cache_elem(x))};
    if ((rc = alloc_block(dev, &x->group[DG_GROUP_WORKSPACE], wptrs, wsize, 1, err, errlen)) != DG_OK) return rc;
    dev->bind_workspace(dev, ws, wsize[0]);
    x->T = T;
    return DG_OK;
}

dg_exec *exec_new_in_place(const dg_model *m, dg_backend *host, char *err, size_t errlen) {
    dg_exec *x = calloc(1, sizeof *x);
    const int L = m->n_layers;
    if (!x) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    pthread_mutex_init(&x->in_use, NULL);
    x->in_place = 1;
    x->host = m;
    x->m = *m;
    x->layers = (dg_layer *)m->layers;
    x->dev = host;
    x->experts = calloc((size_t)L, sizeof(int32_t));          /* every layer's experts "resident": in place */
    x->expert_blocks = calloc((size_t)L, sizeof(block));
    x->stream_order = calloc((size_t)L, sizeof(int));
    x->inv_freq = calloc((size_t)L, sizeof(float *));
    x->pairs = calloc((size_t)L, sizeof(int));
    if (!x->experts || !x->expert_blocks || !x->stream_order || !x->inv_freq || !x->pairs) {
        snprintf(err, errlen, "out of memory");
        return fail_new(x);
    }
    int64_t rope_floats = 0;
    for (int l = 0; l < L; l++) rope_floats += m->layers[l].head_dim / 2;
    float *table;
    void **ptrs[] = {(void **)&table};
    const size_t sizes[] = {(size_t)rope_floats * 4};
    if (alloc_block(host, &x->group[DG_GROUP_GLOBALS], ptrs, sizes, 1, err, errlen) != DG_OK) return fail_new(x);
    for (int l = 0, o = 0; l < L; o += m->layers[l].head_dim / 2, l++) x->inv_freq[l] = table + o;
    return x;
}

/* In place, the model of this call: its sizes were checked against the cache's; its tensors and scalars are used
 * as given, and its RoPE tables computed from it, as model.c always did per pass. */
static void rebind(dg_exec *x, const dg_model *m) {
    if (!x->in_place || !m) return;
    x->m = *m;
    x->layers = (dg_layer *)m->layers;
    x->host = m;
    for (int l = 0; l < m->n_layers; l++) x->pairs[l] = rope_freqs(m, &m->layers[l], x->inv_freq[l]);
}

/* ---- the KV cache ------------------------------------------------------------------------------------------- */

dg_exec_cache *dg_exec_cache_new(dg_exec *x, int64_t capacity, char *err, size_t errlen) {
    if (!x || capacity < 1) {
        snprintf(err, errlen, "cache capacity %lld is not positive", (long long)capacity);
        return NULL;
    }
    const int L = x->m.n_layers;
    dg_exec_cache *c = calloc(1, sizeof *c);
    void **dst = calloc((size_t)(2 * L), sizeof *dst);
    void ***ptrs = calloc((size_t)(2 * L), sizeof *ptrs);
    size_t *sizes = calloc((size_t)(2 * L), sizeof *sizes);
    if (!c || !dst || !ptrs || !sizes || !(c->layers = calloc((size_t)L, sizeof *c->layers))) {
        snprintf(err, errlen, "out of memory");
        goto fail;
    }
    c->x = x;
    c->capacity = capacity;
    for (int l = 0; l < L; l++) {
        const dg_layer *ly = &x->m.layers[l];
        exec_cache_layer *cl = &c->layers[l];
        cl->sliding = ly->sliding;
        cl->n_kv = ly->n_kv_heads;
        cl->head_dim = ly->head_dim;
        cl->cap = ly->sliding ? min64(x->m.sliding_window - 1, capacity) : capacity;
        ptrs[2 * l] = &dst[2 * l];
        ptrs[2 * l + 1] = &dst[2 * l + 1];
        sizes[2 * l] = sizes[2 * l + 1] = (size_t)(max64(cl->cap, 1) * cl->n_kv * cl->head_dim * cache_elem(x));
    }
    if (alloc_block(x->dev, &c->mem, ptrs, sizes, 2 * L, err, errlen) != DG_OK) goto fail;
    for (int l = 0; l < L; l++) {
        c->layers[l].k = dst[2 * l];
        c->layers[l].v = dst[2 * l + 1];
    }
    x->group[DG_GROUP_KV_CACHE].bytes += c->mem.bytes;
    x->live_caches++;
    free(dst);
    free(ptrs);
    free(sizes);
    return c;
fail:
    if (c) free(c->layers);
    free(c);
    free(dst);
    free(ptrs);
    free(sizes);
    return NULL;
}

void dg_exec_cache_free(dg_exec_cache *c) {
    if (!c) return;
    dg_exec *x = c->x;
    x->dev->sync(x->dev, (char[8]){0}, 8);
    free_block(x->dev, &c->mem);
    x->group[DG_GROUP_KV_CACHE].bytes -= c->mem.bytes;
    x->live_caches--;
    free(c->layers);
    free(c);
}

int64_t dg_exec_cache_length(const dg_exec_cache *c) { return c ? c->length : 0; }

int dg_exec_cache_truncate(dg_exec_cache *c, int64_t n, char *err, size_t errlen) {
    if (!c) FAIL(DG_E_VALUE, "no cache");
    if (c->broken) FAIL(DG_E_VALUE, "the cache is unusable after a failed encode; start a new one");
    if (n < 0 || n > c->length)
        FAIL(DG_E_SHAPE, "cannot truncate a cache of %lld positions to %lld", (long long)c->length, (long long)n);
    dg_exec *x = c->x;
    const int L = x->m.n_layers;
    for (int l = 0; l < L; l++) {   /* check every layer before changing any */
        const exec_cache_layer *cl = &c->layers[l];
        const int64_t first_held = c->length - cl->n, first_needed = n - min64(n, cl->cap);
        if (first_needed < first_held)
            FAIL(DG_E_SHAPE, "cannot truncate to %lld positions: sliding layer %d holds only positions %lld.. "
                 "(the last %lld), and position %lld would be visible", (long long)n, l, (long long)first_held,
                 (long long)cl->cap, (long long)first_needed);
    }
    if (pthread_mutex_trylock(&x->in_use) != 0) FAIL(DG_E_VALUE, "the cache is in use by another call");
    int rc = DG_OK;
    for (int l = 0; l < L && rc == DG_OK; l++) {
        exec_cache_layer *cl = &c->layers[l];
        const int64_t keep = min64(n, cl->cap), from = (n - keep) - (c->length - cl->n), rb = exec_kv_row_bytes(x, cl);
        if (from && keep) {
            rc = x->dev->copy(x->dev, cl->k, cl->k + from * rb, (size_t)(keep * rb), err, errlen);
            if (rc == DG_OK) rc = x->dev->copy(x->dev, cl->v, cl->v + from * rb, (size_t)(keep * rb), err, errlen);
        }
        cl->n = keep;
    }
    if (rc == DG_OK) rc = x->dev->sync(x->dev, err, errlen);
    if (rc == DG_OK)
        c->length = n;
    else
        c->broken = 1;
    pthread_mutex_unlock(&x->in_use);
    return rc;
}

/* ---- the passes, under the lock ------------------------------------------------------------------------------ */

static void count_start(dg_exec *x, int64_t *h2d, int64_t *d2h) {
    *h2d = x->dev->stats.h2d;
    *d2h = x->dev->stats.d2h;
    x->pass_h2d = x->pass_d2h = 0;
}

static void count_end(dg_exec *x, int64_t h2d, int64_t d2h) {
    x->pass_h2d = x->dev->stats.h2d - h2d;
    x->pass_d2h = x->dev->stats.d2h - d2h;
}

int exec_encode(dg_exec_cache *c, const dg_model *m, const int32_t *ids, int64_t n, char *err, size_t errlen) {
    int rc;
    if (!c) FAIL(DG_E_VALUE, "no cache");
    dg_exec *x = c->x;
    if (c->broken) FAIL(DG_E_VALUE, "the cache is unusable after a failed encode; start a new one");
    if ((rc = exec_check_ids(m ? m : &x->m, ids, n, err, errlen)) != DG_OK) return rc;
    if (n == 0) return DG_OK;
    if (n > c->capacity - c->length)
        FAIL(DG_E_SHAPE, "encoding %lld tokens after %lld would exceed the cache capacity of %lld positions",
             (long long)n, (long long)c->length, (long long)c->capacity);
    if (pthread_mutex_trylock(&x->in_use) != 0) FAIL(DG_E_VALUE, "the cache is in use by another call");
    rebind(x, m);
    int64_t h2d, d2h;
    count_start(x, &h2d, &d2h);
    rc = x->in_place ? exec_ensure_buffers(x, n, err, errlen) : DG_OK;
    for (int64_t t0 = 0; t0 < n && rc == DG_OK; t0 += x->T) {   /* in place, one piece */
        const int64_t piece = min64(x->T, n - t0);
        rc = exec_encode_pass(x, c, ids + t0, piece, err, errlen);
        if (rc == DG_OK) c->length += piece;
    }
    if (rc != DG_OK) c->broken = 1;   /* some layers may already hold the new positions */
    count_end(x, h2d, d2h);
    pthread_mutex_unlock(&x->in_use);
    return rc;
}

int exec_decode(const dg_exec_cache *c, const dg_model *m, const int32_t *ids, int64_t n, const float *sc,
                int sc_top_k, const uint8_t *head_rows, float *logits, char *err, size_t errlen) {
    int rc;
    if (!c) FAIL(DG_E_VALUE, "no cache");
    dg_exec *x = c->x;
    const dg_model *mm = m ? m : &x->m;
    if (c->broken) FAIL(DG_E_VALUE, "the cache is unusable after a failed encode; start a new one");
    if ((rc = exec_check_ids(mm, ids, n, err, errlen)) != DG_OK) return rc;
    if (n == 0) return DG_OK;
    if (!logits) FAIL(DG_E_VALUE, "no logits buffer");
    if (sc_top_k < 0 || sc_top_k > mm->vocab)
        FAIL(DG_E_SHAPE, "sc_top_k %d is outside 0..%d (0: the whole vocabulary)", sc_top_k, mm->vocab);
    if (!x->in_place && n > x->T)
        FAIL(DG_E_SHAPE, "a decoder pass of %lld tokens: the executor's buffers hold %lld", (long long)n,
             (long long)x->T);
    if (pthread_mutex_trylock(&x->in_use) != 0) FAIL(DG_E_VALUE, "the cache is in use by another call");
    rebind(x, m);
    int64_t h2d, d2h;
    count_start(x, &h2d, &d2h);
    rc = exec_ensure_buffers(x, n, err, errlen);
    if (rc == DG_OK) rc = exec_decode_pass(x, c, ids, n, sc, sc_top_k, head_rows, logits, err, errlen);
    count_end(x, h2d, d2h);
    pthread_mutex_unlock(&x->in_use);
    return rc;
}

int dg_exec_encode(dg_exec_cache *c, const int32_t *ids, int64_t n, char *err, size_t errlen) {
    return exec_encode(c, NULL, ids, n, err, errlen);
}

int dg_exec_decode(const dg_exec_cache *c, const int32_t *ids, int64_t n, const float *sc_logits, int sc_top_k,
                   const uint8_t *head_rows, float *logits, char *err, size_t errlen) {
    return exec_decode(c, NULL, ids, n, sc_logits, sc_top_k, head_rows, logits, err, errlen);
}
