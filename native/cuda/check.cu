/* check.cu: the GPU check driver (built by scripts/build_cuda.sh, run by scripts/gpu_check.sh), linked with the
 * CPU library (the C files of native/), whose functions are the twins.
 *
 *   dg_cuda_check kernels      every kernel against its CPU twin, with the tolerance printed on each line
 *   dg_cuda_check decode       a tiny random model: the hybrid executor (native/executor.c) on the CUDA backend at
 *                              several placements against dg_encode + dg_decode, and on the host backend (bits)
 *   dg_cuda_check real SPEC... the real 30-layer shape, random Q4_K_M blocks, on the executor: SPEC is
 *                              NAME:BUDGET_BYTES:PLACEMENT:PREDICTED_S (PLACEMENT one letter a layer: G resident,
 *                              C CPU, S streamed; scripts/gpu_check.sh takes them from the planner), seconds per
 *                              decoder step measured beside the prediction
 *   dg_cuda_check types        the real shape's Q4_K_M tensor types (no GPU needed; tests compare them with
 *                              convert/presets.py)
 *
 * Lines start with PASS, FAIL, INFO or RESULT; the exit status is 1 when any check failed, 2 on an error.
 */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <numeric>
#include <vector>

#include "dg_cuda.h"
extern "C" {
#include "../attention.h"
#include "../backend.h"
#include "../matmul.h"
#include "../ops.h"
#include "../quant_internal.h"
}

static char err[512];
static int failures = 0;

/* A library call that must succeed: otherwise the message and exit status 2. */
#define MUST(call)                                                                              \
    do {                                                                                        \
        if ((call) != 0) {                                                                      \
            fprintf(stderr, "error: %s: %s (%s:%d)\n", #call, err, __FILE__, __LINE__);         \
            exit(2);                                                                            \
        }                                                                                       \
    } while (0)

static void verdict(bool ok, const char *name, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void verdict(bool ok, const char *name, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    printf("%s %-34s ", ok ? "PASS" : "FAIL", name);
    vprintf(fmt, ap);
    printf("\n");
    fflush(stdout);
    va_end(ap);
    failures += !ok;
}

/* ---- host helpers ------------------------------------------------------------------------------------------- */

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;
static float frand(void) {   /* uniform [-1, 1) */
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (float)((rng_state >> 40) * (1.0 / 8388608.0)) - 1.0f;
}
static std::vector<float> randv(size_t n, float amp) {
    std::vector<float> v(n);
    for (auto &x : v) x = amp * frand();
    return v;
}

template <typename T> struct dev {
    T *p = nullptr;
    size_t n = 0;
    explicit dev(size_t count) : n(count) { MUST(dgc_malloc((void **)&p, count * sizeof(T), err, sizeof err)); }
    dev(const std::vector<T> &h) : dev(h.size()) { MUST(dgc_upload(p, h.data(), n * sizeof(T), err, sizeof err)); }
    ~dev() { dgc_free(p); }
    std::vector<T> get() const {
        std::vector<T> h(n);
        MUST(dgc_synchronize(err, sizeof err));
        MUST(dgc_download(h.data(), p, n * sizeof(T), err, sizeof err));
        return h;
    }
};

static double max_abs(const std::vector<float> &a) {
    double m = 0;
    for (float x : a) m = std::max(m, (double)fabsf(x));
    return m;
}
static double max_diff(const std::vector<float> &a, const std::vector<float> &b) {
    double m = 0;
    for (size_t i = 0; i < a.size(); i++) m = std::max(m, (double)fabsf(a[i] - b[i]));
    return m;
}
static size_t bit_diffs(const std::vector<float> &a, const std::vector<float> &b) {
    size_t c = 0;
    for (size_t i = 0; i < a.size(); i++) c += memcmp(&a[i], &b[i], 4) != 0;
    return c;
}

static const struct { int type; const char *name; } TYPES[] = {
    {DG_TYPE_F32, "F32"}, {DG_TYPE_F16, "F16"}, {DG_TYPE_BF16, "BF16"}, {DG_TYPE_Q8_0, "Q8_0"},
    {DG_TYPE_Q4_0, "Q4_0"}, {DG_TYPE_Q4_1, "Q4_1"}, {DG_TYPE_Q5_0, "Q5_0"}, {DG_TYPE_Q5_1, "Q5_1"},
    {DG_TYPE_Q2_K, "Q2_K"}, {DG_TYPE_Q3_K, "Q3_K"}, {DG_TYPE_Q4_K, "Q4_K"}, {DG_TYPE_Q5_K, "Q5_K"},
    {DG_TYPE_Q6_K, "Q6_K"}};

static const char *type_name(int type) {
    for (auto &t : TYPES) if (t.type == type) return t.name;
    return "?";
}

/* A host weight [rows, cols] of a type: quantized from random floats. */
struct host_weight {
    std::vector<uint8_t> bytes;
    std::vector<float> deq;   /* what the CPU dequantizes it to */
    dg_tensor t;
};
static host_weight make_weight(int type, int64_t cols, int64_t rows, int64_t mats, float amp) {
    host_weight w;
    int64_t bs, ts;
    MUST(dg_type_size(type, &bs, &ts, err, sizeof err));
    const int64_t nr = rows * mats;
    std::vector<float> src = randv((size_t)(nr * cols), amp);
    w.bytes.resize((size_t)(nr * (cols / bs) * ts));
    MUST(dg_quantize_rows(type, src.data(), w.bytes.data(), nr, cols, err, sizeof err));
    w.deq.resize(src.size());
    MUST(dg_dequantize_rows(type, w.bytes.data(), w.deq.data(), nr, cols, err, sizeof err));
    w.t = {w.bytes.data(), type, cols, rows, mats};
    return w;
}

/* ---- kernels ----------------------------------------------------------------------------------------------------- */

static void check_dequantize(void) {
    for (auto &ty : TYPES) {
        const int64_t cols = ty.type == DG_TYPE_F32 || ty.type == DG_TYPE_F16 || ty.type == DG_TYPE_BF16 ? 100 : 512;
        host_weight w = make_weight(ty.type, cols, 7, 1, 2.0f);
        dev<uint8_t> src(w.bytes);
        dev<float> out(w.deq.size());
        MUST(dgc_dequantize_rows(ty.type, src.p, out.p, 7, cols, err, sizeof err));
        const size_t diffs = bit_diffs(out.get(), w.deq);
        char name[64];
        snprintf(name, sizeof name, "dequantize %s", ty.name);
        verdict(diffs == 0, name, "bits differ in %zu of %zu values (tolerance: bit-identical)", diffs, w.deq.size());
    }
}

static void check_matmul(void) {
    MUST(dg_set_matmul_kernel("reference", err, sizeof err));
    for (auto &ty : TYPES) {
        const int64_t K = 512, R = 200;
        host_weight w = make_weight(ty.type, K, R, 2, 0.5f);
        dev<uint8_t> wd(w.bytes);
        dg_tensor td = w.t;
        td.data = wd.p;
        for (int64_t n : {1, 7, 100}) {
            std::vector<float> x = randv((size_t)(n * K), 1.0f), cpu((size_t)(n * R));
            MUST(dg_matmul(&w.t, 1, x.data(), n, cpu.data(), 1, err, sizeof err));
            dev<float> xd(x), out((size_t)(n * R));
            /* the TF32 bound, per output: 2e-3 * sum |x_i w_i| */
            std::vector<double> mag((size_t)(n * R));
            for (int64_t t = 0; t < n; t++)
                for (int64_t r = 0; r < R; r++) {
                    double s = 0;
                    for (int64_t i = 0; i < K; i++) s += fabs((double)x[t * K + i] * w.deq[(R + r) * K + i]);
                    mag[t * R + r] = s;
                }
            char name[64];
            MUST(dgc_matmul(DGC_GEMM_PLAIN, &td, 1, xd.p, n, out.p, err, sizeof err));
            const size_t diffs = bit_diffs(out.get(), cpu);
            snprintf(name, sizeof name, "matmul plain %s n=%lld", ty.name, (long long)n);
            verdict(diffs == 0, name, "bits differ in %zu of %zu (tolerance: bit-identical to the CPU reference "
                    "kernel)", diffs, cpu.size());
            MUST(dgc_matmul(DGC_GEMM_TF32, &td, 1, xd.p, n, out.p, err, sizeof err));
            std::vector<float> got = out.get();
            double worst = 0;
            for (size_t i = 0; i < got.size(); i++)
                worst = std::max(worst, fabs((double)got[i] - cpu[i]) / (mag[i] + 1e-30));
            snprintf(name, sizeof name, "matmul tf32 %s n=%lld", ty.name, (long long)n);
            verdict(worst <= 2e-3, name, "max |diff| / sum|x w| = %.2e (tolerance 2e-3)", worst);
        }
    }
}

static void check_elementwise(void) {
    {   /* rmsnorm, weighted, times mul, and accumulate */
        const int64_t rows = 5, W = 2816;
        std::vector<float> x = randv(rows * W, 3.0f), w = randv(W, 1.0f), acc0 = randv(rows * W, 1.0f);
        std::vector<float> cpu(rows * W), cpu_acc = acc0;
        for (int64_t r = 0; r < rows; r++) {
            rmsnorm(&cpu[r * W], &x[r * W], w.data(), W, 1e-6f);
            for (int64_t i = 0; i < W; i++) cpu[r * W + i] *= 0.25f;
            for (int64_t i = 0; i < W; i++) cpu_acc[r * W + i] += cpu[r * W + i];
        }
        dev<float> xd(x), wd(w), out(rows * W), accd(acc0);
        MUST(dgc_rmsnorm(out.p, xd.p, wd.p, rows, W, 1e-6f, 0.25f, 0, err, sizeof err));
        MUST(dgc_rmsnorm(accd.p, xd.p, wd.p, rows, W, 1e-6f, 0.25f, 1, err, sizeof err));
        const double e1 = max_diff(out.get(), cpu) / max_abs(cpu), e2 = max_diff(accd.get(), cpu_acc) / max_abs(cpu_acc);
        verdict(e1 <= 1e-6 && e2 <= 1e-6, "rmsnorm", "max rel diff %.2e, accumulate %.2e, bits differ in %zu "
                "(tolerance 1e-6 of the largest value: double sums may round differently)", e1, e2,
                bit_diffs(out.get(), cpu));
    }
    for (int pairs : {32, 8}) {   /* sliding (all pairs) and proportional (leading pairs) RoPE */
        const int n = 4, heads = 3, d = 64;
        const int64_t pos0 = 100000;
        std::vector<float> x = randv(n * heads * d, 2.0f), cpu = x, f(pairs);
        for (int i = 0; i < pairs; i++) f[i] = 1.0f / powf(10000.0f, (float)(2 * i) / d);
        for (int t = 0; t < n; t++)
            for (int h = 0; h < heads; h++) rope(&cpu[(t * heads + h) * d], f.data(), pos0 + t, d, pairs);
        dev<float> xd(x), fd(f);
        MUST(dgc_rope(xd.p, fd.p, n, heads, d, pairs, pos0, err, sizeof err));
        const double e = max_diff(xd.get(), cpu) / max_abs(cpu);
        char name[64];
        snprintf(name, sizeof name, "rope %d of 32 pairs", pairs);
        verdict(e <= 2e-6, name, "max rel diff %.2e at positions near 1e5 (tolerance 2e-6: cos/sin within an ulp)", e);
    }
    {
        const int64_t n = 9, W = 704;
        std::vector<float> g = randv(n * W, 4.0f), u = randv(n * W, 2.0f), cpu = g;
        gelu_tanh(cpu.data(), n * W);
        for (int64_t i = 0; i < n * W; i++) cpu[i] *= u[i];
        dev<float> gd(g), ud(u);
        MUST(dgc_gelu_mul(gd.p, W, gd.p, W, ud.p, W, n, W, err, sizeof err));
        const double e = max_diff(gd.get(), cpu) / max_abs(cpu);
        verdict(e <= 1e-6, "gelu_mul", "max rel diff %.2e (tolerance 1e-6)", e);
    }
    {
        std::vector<float> x = randv(4096, 80.0f), cpu = x;
        softcap(NULL, cpu.data(), 1, 4096, 30.0f);
        dev<float> xd(x);
        MUST(dgc_softcap(xd.p, 4096, 30.0f, err, sizeof err));
        const double e = max_diff(xd.get(), cpu);
        verdict(e <= 30.0 * 1e-6, "softcap", "max diff %.2e (tolerance 3e-5 = 1e-6 of the cap)", e);
    }
}

/* The CPU twin of one attention call: model.c's key ranges, attention.c's attention per (query, head). */
static std::vector<float> attention_cpu(const std::vector<float> &q, const std::vector<float> &ck,
                                        const std::vector<float> &cv, int64_t held, const std::vector<float> &k,
                                        const std::vector<float> &v, int64_t n, int nh, int nkv, int d, int64_t pos0,
                                        int64_t window, int causal) {
    std::vector<float> out((size_t)(n * nh * d)), scores((size_t)(held + n));
    const int64_t stride = (int64_t)nkv * d;
    for (int64_t t = 0; t < n; t++)
        for (int h = 0; h < nh; h++) {
            const int g = h / (nh / nkv);
            const int64_t p = pos0 + t;
            int64_t a_lo = 0, b_lo = 0, b_hi = causal ? t + 1 : n;
            if (window) {
                a_lo = std::max<int64_t>(0, (p - window + 1) - (pos0 - held));
                b_lo = std::max<int64_t>(0, t - window + 1);
            }
            const int64_t na = std::max<int64_t>(0, held - a_lo);
            attention(&out[(t * nh + h) * d], &q[(t * nh + h) * d], ck.data() + a_lo * stride + g * d,
                      cv.data() + a_lo * stride + g * d, na, k.data() + b_lo * stride + g * d,
                      v.data() + b_lo * stride + g * d, b_hi - b_lo, stride, d, scores.data());
        }
    return out;
}

static void check_attention(void) {
    struct { int64_t held, n; int nh, nkv, d; int64_t window; int causal; const char *what; } cases[] = {
        {37, 20, 4, 2, 64, 0, 0, "decoder"},
        {37, 20, 4, 2, 64, 8, 1, "encoder sliding"},
        {0, 45, 4, 4, 64, 0, 1, "encoder causal, empty cache"},
        {50, 16, 8, 1, 512, 0, 0, "decoder d=512 GQA 8"},
    };
    for (auto &c : cases) {
        const int64_t pos0 = c.held + 3, kvn = (int64_t)c.nkv * c.d;
        std::vector<float> q = randv(c.n * c.nh * c.d, 0.3f), ck = randv(std::max<int64_t>(c.held, 1) * kvn, 0.3f),
                           cv = randv(std::max<int64_t>(c.held, 1) * kvn, 1.0f), k = randv(c.n * kvn, 0.3f),
                           v = randv(c.n * kvn, 1.0f);
        std::vector<float> cpu = attention_cpu(q, ck, cv, c.held, k, v, c.n, c.nh, c.nkv, c.d, pos0, c.window, c.causal);
        dev<float> qd(q), ckd(ck), cvd(cv), kd(k), vd(v), out(cpu.size());
        MUST(dgc_attention(out.p, qd.p, ckd.p, cvd.p, c.held, kd.p, vd.p, c.n, c.nh, c.nkv, c.d, pos0, c.window,
                           c.causal, err, sizeof err));
        const double e = max_diff(out.get(), cpu);
        char name[64];
        snprintf(name, sizeof name, "attention %s", c.what);
        verdict(e <= 1e-5, name, "max diff %.2e, values |v| < 1 (tolerance 1e-5: online softmax order)", e);
        /* the f16 cache: stored by dgc_kv_store (bits of dg_f32_to_f16), read widened; the twin reads the same
         * halves widened on the host (the host backend's attention) */
        const int64_t cn = std::max<int64_t>(c.held, 1) * kvn;
        std::vector<uint16_t> kh(cn), vh(cn);
        std::vector<float> kw(cn), vw(cn);
        for (int64_t i = 0; i < cn; i++) {
            kh[i] = dg_f32_to_f16(ck[i]);
            vh[i] = dg_f32_to_f16(cv[i]);
            kw[i] = dg_f16_to_f32(kh[i]);
            vw[i] = dg_f16_to_f32(vh[i]);
        }
        dev<uint16_t> khd(cn), vhd(cn);
        MUST(dgc_kv_store(khd.p, ckd.p, cn, 1, err, sizeof err));
        MUST(dgc_kv_store(vhd.p, cvd.p, cn, 1, err, sizeof err));
        const bool same = khd.get() == kh && vhd.get() == vh;
        snprintf(name, sizeof name, "kv_store f16 %s", c.what);
        verdict(same, name, "halves %s (tolerance: bit-identical to dg_f32_to_f16)", same ? "identical" : "DIFFER");
        std::vector<float> cpu16 = attention_cpu(q, kw, vw, c.held, k, v, c.n, c.nh, c.nkv, c.d, pos0, c.window,
                                                 c.causal);
        MUST(dgc_attention_kv(out.p, qd.p, khd.p, vhd.p, 1, c.held, kd.p, vd.p, c.n, c.nh, c.nkv, c.d, pos0, c.window,
                              c.causal, err, sizeof err));
        const double e16 = max_diff(out.get(), cpu16);
        snprintf(name, sizeof name, "attention f16 cache %s", c.what);
        verdict(e16 <= 1e-5, name, "max diff %.2e against the twin on the same halves (tolerance 1e-5)", e16);
    }
}

/* model.c's route after the router matmul, on the host. */
static void route_cpu(std::vector<int32_t> &idx, std::vector<float> &w, std::vector<float> p, const float *scale,
                      int64_t n, int E, int K) {
    std::vector<int> ti(K);
    for (int64_t t = 0; t < n; t++) {
        float *pt = &p[t * E];
        softmax(pt, E);
        topk(ti.data(), pt, E, K);
        float sum = 0;
        for (int k = 0; k < K; k++) sum += pt[ti[k]];
        for (int k = 0; k < K; k++) {
            idx[t * K + k] = ti[k];
            w[t * K + k] = pt[ti[k]] / sum * scale[ti[k]];
        }
    }
}

static void check_router_and_moe(void) {
    const int64_t n = 37, H = 256, I = 64;
    const int E = 8, K = 2;
    std::vector<float> logits = randv(n * E, 3.0f), scale = randv(E, 0.5f);
    for (auto &s : scale) s += 1.0f;
    logits[5 * E + 1] = logits[5 * E + 6];   /* a tie: the lower index first */
    std::vector<int32_t> idx(n * K);
    std::vector<float> w(n * K);
    route_cpu(idx, w, logits, scale.data(), n, E, K);
    dev<float> ld(logits), sd(scale), wd(n * K);
    dev<int32_t> id(n * K);
    MUST(dgc_route(id.p, wd.p, ld.p, sd.p, n, E, K, err, sizeof err));
    const std::vector<int32_t> gi = id.get();
    const double ew = max_diff(wd.get(), w);
    verdict(gi == idx && ew <= 1e-6, "route softmax+top-k", "experts %s, max weight diff %.2e (tolerance: same "
            "experts, 1e-6)", gi == idx ? "equal" : "DIFFER", ew);

    for (int gu_type : {DG_TYPE_Q4_K, DG_TYPE_Q8_0}) {
        host_weight gu = make_weight(gu_type, H, 2 * I, E, 0.1f), dn = make_weight(DG_TYPE_Q8_0, I, H, E, 0.1f);
        std::vector<float> x = randv(n * H, 1.0f), cpu(n * H, 0.0f);
        for (int e = 0; e < E; e++) {   /* model.c's moe loop */
            std::vector<float> xs, ws;
            std::vector<int64_t> toks;
            for (int64_t t = 0; t < n; t++)
                for (int k = 0; k < K; k++)
                    if (idx[t * K + k] == e) {
                        toks.push_back(t);
                        ws.push_back(w[t * K + k]);
                        xs.insert(xs.end(), &x[t * H], &x[t * H] + H);
                    }
            const int64_t cnt = (int64_t)toks.size();
            if (!cnt) continue;
            std::vector<float> g(cnt * 2 * I), a(cnt * I), y(cnt * H);
            MUST(dg_matmul(&gu.t, e, xs.data(), cnt, g.data(), 1, err, sizeof err));
            for (int64_t c = 0; c < cnt; c++) {
                gelu_tanh(&g[c * 2 * I], I);
                for (int64_t i = 0; i < I; i++) a[c * I + i] = g[c * 2 * I + i] * g[c * 2 * I + I + i];
            }
            MUST(dg_matmul(&dn.t, e, a.data(), cnt, y.data(), 1, err, sizeof err));
            for (int64_t c = 0; c < cnt; c++)
                for (int64_t i = 0; i < H; i++) cpu[toks[c] * H + i] += y[c * H + i] * ws[c];
        }
        dev<uint8_t> gub(gu.bytes), dnb(dn.bytes);
        dg_tensor gut = gu.t, dnt = dn.t;
        gut.data = gub.p;
        dnt.data = dnb.p;
        dev<float> xd(x), out(n * H);
        const double scale_of = max_abs(cpu);
        for (int kind : {DGC_GEMM_PLAIN, DGC_GEMM_TF32}) {
            MUST(dgc_moe(kind, out.p, xd.p, id.p, wd.p, n, K, &gut, &dnt, err, sizeof err));
            const double e = max_diff(out.get(), cpu) / scale_of, tol = kind == DGC_GEMM_PLAIN ? 1e-6 : 1e-2;
            char name[64];
            snprintf(name, sizeof name, "moe %s gate_up %s", kind == DGC_GEMM_PLAIN ? "plain" : "tf32",
                     type_name(gu_type));
            verdict(e <= tol, name, "max diff / max |out| = %.2e (tolerance %.0e%s)", e, tol,
                    kind == DGC_GEMM_PLAIN ? ": gelu's tanh within an ulp" : ": TF32 through two matmuls");
        }
    }
}

static void check_soft_embed(void) {
    const int64_t n = 5, V = 1000, H = 256;
    for (int type : {DG_TYPE_Q8_0, DG_TYPE_Q4_K, DG_TYPE_F16}) {
        host_weight E = make_weight(type, H, V, 1, 0.5f);
        std::vector<float> logits = randv(n * V, 6.0f), cpu(n * H);
        MUST(soft_embed(NULL, cpu.data(), logits.data(), &E.t, 53.0f, n, err, sizeof err));
        dev<uint8_t> eb(E.bytes);
        dg_tensor et = E.t;
        et.data = eb.p;
        dev<float> ld(logits), out(n * H);
        for (int kind : {DGC_GEMM_PLAIN, DGC_GEMM_TF32}) {
            MUST(dgc_soft_embed(kind, out.p, ld.p, &et, 53.0f, n, err, sizeof err));
            const double e = max_diff(out.get(), cpu) / (53.0 * max_abs(E.deq));
            const double tol = kind == DGC_GEMM_PLAIN ? 1e-6 : 2e-3;
            char name[64];
            snprintf(name, sizeof name, "soft_embed %s %s", kind == DGC_GEMM_PLAIN ? "plain" : "tf32", type_name(type));
            verdict(e <= tol, name, "max diff / (scale max|E|) = %.2e (tolerance %.0e)", e, tol);
        }
    }
}

/* runtime/sampler.py's token_stats and accept_mask on the host (the spec this twin follows). */
static void step_stats_cpu(const std::vector<float> &scaled, int64_t n, int64_t V, float bound,
                           std::vector<int32_t> &amax, std::vector<float> &ent, std::vector<uint8_t> &acc) {
    for (int64_t t = 0; t < n; t++) {
        const float *x = &scaled[t * V];
        int64_t a = 0;
        for (int64_t v = 1; v < V; v++) if (x[v] > x[a]) a = v;
        double total = 0, ez = 0;
        for (int64_t v = 0; v < V; v++) {
            const double z = (double)x[v] - x[a], e = exp(z);
            total += e;
            ez += e * z;
        }
        amax[t] = (int32_t)a;
        ent[t] = (float)(log(total) - ez / total);
    }
    std::vector<int64_t> order(n);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int64_t i, int64_t j) { return ent[i] < ent[j]; });
    double cum = 0;
    for (int64_t r = 0; r < n; r++) {
        cum += ent[order[r]];
        acc[order[r]] = ((float)cum - ent[order[r]]) <= bound;
    }
}

static void check_step_stats(void) {
    const int64_t n = 256, V = 5000;
    std::vector<float> logits = randv(n * V, 30.0f);
    for (int64_t t = 0; t < n; t += 3) logits[t * V + (t * 7) % V] = 80.0f;   /* confident rows */
    logits[3 * V + 10] = logits[3 * V + 20] = 90.0f;                          /* a tied maximum */
    const float temp = 0.775f, bound = 0.1f;
    std::vector<float> scaled(logits.size());
    for (size_t i = 0; i < logits.size(); i++) scaled[i] = logits[i] / temp;
    std::vector<int32_t> amax(n);
    std::vector<float> ent(n);
    std::vector<uint8_t> acc(n);
    step_stats_cpu(scaled, n, V, bound, amax, ent, acc);
    dev<float> ld(logits), ed(n);
    dev<int32_t> ad(n);
    dev<uint8_t> cd(n);
    MUST(dgc_step_stats(ld.p, n, V, temp, bound, ad.p, ed.p, cd.p, err, sizeof err));
    const double e = max_diff(ed.get(), ent);
    const bool same_scaled = bit_diffs(ld.get(), scaled) == 0;
    const auto ga = ad.get();
    const auto gc = cd.get();
    const long accepted = std::count(acc.begin(), acc.end(), 1);
    verdict(ga == amax && gc == acc && e <= 1e-5 && same_scaled, "step stats (argmax, entropy, accept)",
            "argmax %s, accept %s (%ld accepted), max entropy diff %.2e, scaled logits %s (tolerance: equal, "
            "1e-5 nats, bit-identical)", ga == amax ? "equal" : "DIFFER", gc == acc ? "equal" : "DIFFER", accepted,
            e, same_scaled ? "identical" : "DIFFER");
}

/* ---- a tiny model in memory --------------------------------------------------------------------------------- */

struct tiny_model {
    std::vector<host_weight> weights;
    std::vector<dg_layer> layers;
    dg_model m;
};

static dg_tensor add(tiny_model &tm, int type, int64_t cols, int64_t rows, int64_t mats, float amp, float base) {
    host_weight w = make_weight(type, cols, rows, mats, amp);
    if (base != 0.0f)   /* norm weights near 1: F32, set directly */
        for (size_t i = 0; i < w.deq.size(); i++) ((float *)w.bytes.data())[i] += base;
    tm.weights.push_back(std::move(w));
    dg_tensor t = tm.weights.back().t;
    t.data = nullptr;   /* pointers are fixed once the vector stops moving */
    return t;
}

/* 4 layers (sliding, full, sliding, full), hidden 256, 4 heads (sliding 64 x 2 KV, full 128 x 1 KV), 8 experts
 * top 2 of width 256, dense 256, vocabulary 512, window 16: the real model's structure at a size the CPU runs. */
static void build_tiny(tiny_model &tm, int type) {
    tm.weights.reserve(200);
    const int64_t H = 256, F = 256, I = 256, E = 8, V = 512;
    dg_model &m = tm.m;
    memset(&m, 0, sizeof m);
    m.n_layers = 4; m.hidden = (int)H; m.n_heads = 4; m.n_experts = (int)E; m.top_k = 2; m.expert_ff = (int)I;
    m.dense_ff = (int)F; m.vocab = (int)V; m.sliding_window = 16; m.rope_pairs_full = 16; m.eps = 1e-6f;
    m.theta_full = 1e6f; m.theta_sliding = 1e4f; m.softcap = 30.0f; m.embed_scale = 16.0f; m.n_threads = 1;
    std::vector<dg_tensor *> fix;
    const float a = 1.0f / 16.0f;   /* 1 / sqrt(H) */
    m.token_embd = add(tm, type, H, V, 1, 0.1f, 0);   /* logits of a few units: softcap far from saturation */
    m.output_norm = add(tm, DG_TYPE_F32, H, 1, 1, 0.1f, 1.0f);
    m.sc_pre_norm = add(tm, DG_TYPE_F32, H, 1, 1, 0.1f, 1.0f);
    m.sc_gate = add(tm, type, H, F, 1, a, 0);
    m.sc_up = add(tm, type, H, F, 1, a, 0);
    m.sc_down = add(tm, type, F, H, 1, a, 0);
    tm.layers.resize(4);
    for (int l = 0; l < 4; l++) {
        dg_layer &ly = tm.layers[l];
        memset(&ly, 0, sizeof ly);
        ly.sliding = l % 2 == 0;
        ly.head_dim = ly.sliding ? 64 : 128;
        ly.n_kv_heads = ly.sliding ? 2 : 1;
        const int64_t d = ly.head_dim, kv = ly.n_kv_heads;
        ly.attn_norm = add(tm, DG_TYPE_F32, H, 1, 1, 0.1f, 1.0f);
        ly.attn_q = add(tm, type, H, 4 * d, 1, a, 0);
        ly.attn_k = add(tm, type, H, kv * d, 1, a, 0);
        if (ly.sliding) ly.attn_v = add(tm, type, H, kv * d, 1, a, 0);
        ly.attn_output = add(tm, DG_TYPE_Q8_0, 4 * d, H, 1, a, 0);
        ly.attn_q_norm = add(tm, DG_TYPE_F32, d, 1, 1, 0.1f, 1.0f);
        ly.attn_k_norm = add(tm, DG_TYPE_F32, d, 1, 1, 0.1f, 1.0f);
        ly.post_attention_norm = add(tm, DG_TYPE_F32, H, 1, 1, 0.1f, 1.0f);
        ly.ffn_norm = add(tm, DG_TYPE_F32, H, 1, 1, 0.1f, 1.0f);
        ly.ffn_gate = add(tm, type, H, F, 1, a, 0);
        ly.ffn_up = add(tm, type, H, F, 1, a, 0);
        ly.ffn_down = add(tm, type, F, H, 1, a, 0);
        ly.post_ffw_norm_1 = add(tm, DG_TYPE_F32, H, 1, 1, 0.1f, 1.0f);
        ly.ffn_gate_inp = add(tm, DG_TYPE_F32, H, E, 1, 1.0f, 0);
        ly.ffn_gate_inp_scale = add(tm, DG_TYPE_F32, H, 1, 1, 0.1f, 1.0f);
        ly.ffn_down_exps_scale = add(tm, DG_TYPE_F32, E, 1, 1, 0.1f, 1.0f);
        ly.pre_ffw_norm_2 = add(tm, DG_TYPE_F32, H, 1, 1, 0.1f, 1.0f);
        ly.ffn_gate_up_exps = add(tm, type, H, 2 * I, E, a, 0);
        ly.ffn_down_exps = add(tm, type, I, H, E, a, 0);
        ly.post_ffw_norm_2 = add(tm, DG_TYPE_F32, H, 1, 1, 0.1f, 1.0f);
        ly.post_ffw_norm = add(tm, DG_TYPE_F32, H, 1, 1, 0.1f, 1.0f);
        ly.dec_scale = 0.5f + 0.1f * l;
        ly.enc_scale = 0.9f - 0.1f * l;
    }
    /* weights were added in this order; hand out their data pointers in the same order */
    size_t next = 0;
    auto bind = [&](dg_tensor &t) { t.data = tm.weights[next++].bytes.data(); };
    bind(m.token_embd); bind(m.output_norm); bind(m.sc_pre_norm); bind(m.sc_gate); bind(m.sc_up); bind(m.sc_down);
    for (auto &ly : tm.layers) {
        bind(ly.attn_norm); bind(ly.attn_q); bind(ly.attn_k);
        if (ly.sliding) bind(ly.attn_v);
        bind(ly.attn_output); bind(ly.attn_q_norm); bind(ly.attn_k_norm); bind(ly.post_attention_norm);
        bind(ly.ffn_norm); bind(ly.ffn_gate); bind(ly.ffn_up); bind(ly.ffn_down); bind(ly.post_ffw_norm_1);
        bind(ly.ffn_gate_inp); bind(ly.ffn_gate_inp_scale); bind(ly.ffn_down_exps_scale); bind(ly.pre_ffw_norm_2);
        bind(ly.ffn_gate_up_exps); bind(ly.ffn_down_exps); bind(ly.post_ffw_norm_2); bind(ly.post_ffw_norm);
    }
    m.layers = tm.layers.data();
}

/* A placement string (one letter a layer: G resident, C CPU, S streamed) as DG_EXPERTS_*. */
static std::vector<int32_t> placement(const char *p, int n_layers) {
    std::vector<int32_t> out;
    for (const char *c = p; *c; c++)
        out.push_back(*c == 'G' ? DG_EXPERTS_DEVICE : *c == 'C' ? DG_EXPERTS_CPU : *c == 'S' ? DG_EXPERTS_STREAM : -1);
    if ((int)out.size() != n_layers || std::count(out.begin(), out.end(), -1)) {
        fprintf(stderr, "error: placement '%s' is not one of G, C, S for each of %d layers\n", p, n_layers);
        exit(2);
    }
    return out;
}

struct exec_run {
    std::vector<float> l1, l2;          /* no self-conditioning; self-conditioning from sc */
    int64_t h2d, d2h;                   /* the second decoder pass's copies */
};

/* Two encoder passes and two decoder passes on the executor over backend b. */
static exec_run run_exec(const dg_model *m, dg_backend *b, const std::vector<int32_t> &experts, int kv_f16,
                         const std::vector<int32_t> &prompt, const std::vector<int32_t> &canvas,
                         const std::vector<float> &sc) {
    const int64_t C = (int64_t)canvas.size(), V = m->vocab;
    dg_exec_config cfg = {C, kv_f16, experts.data()};
    dg_exec *x = dg_exec_new(m, b, &cfg, err, sizeof err);
    if (!x) { fprintf(stderr, "error: dg_exec_new: %s\n", err); exit(2); }
    dg_exec_cache *c = dg_exec_cache_new(x, 256, err, sizeof err);
    if (!c) { fprintf(stderr, "error: dg_exec_cache_new: %s\n", err); exit(2); }
    MUST(dg_exec_encode(c, prompt.data(), 25, err, sizeof err));
    MUST(dg_exec_encode(c, prompt.data() + 25, (int64_t)prompt.size() - 25, err, sizeof err));
    exec_run r;
    r.l1.resize(C * V);
    r.l2.resize(C * V);
    MUST(dg_exec_decode(c, canvas.data(), C, NULL, 0, NULL, r.l1.data(), err, sizeof err));
    MUST(dg_exec_decode(c, canvas.data(), C, sc.data(), 0, NULL, r.l2.data(), err, sizeof err));
    dg_exec_stats st;
    dg_exec_get_stats(x, &st);
    r.h2d = st.pass_h2d;
    r.d2h = st.pass_d2h;
    dg_exec_cache_free(c);
    dg_exec_free(x);
    return r;
}

/* The hybrid executor on the tiny model: the CUDA backend at resident, CPU and streamed placements against the CPU
 * forward (dg_encode + dg_decode), and the host backend at the same placements (bit-identical to it, and the same
 * copies as the CUDA backend made). */
static void check_decode(void) {
    MUST(dg_set_matmul_kernel("reference", err, sizeof err));
    for (int type : {DG_TYPE_Q8_0, DG_TYPE_Q4_K}) {
        tiny_model tm;
        build_tiny(tm, type);
        const dg_model *m = &tm.m;
        const int64_t P = 40, C = 32, V = m->vocab;   /* a context 2.5 windows long */
        std::vector<int32_t> prompt(P), canvas(C);
        for (auto &t : prompt) t = (int32_t)((frand() + 1.0f) * 0.5f * (V - 1));
        for (auto &t : canvas) t = (int32_t)((frand() + 1.0f) * 0.5f * (V - 1));
        dg_cache *cc = dg_cache_new(m, 256, err, sizeof err);
        if (!cc) { fprintf(stderr, "error: %s\n", err); exit(2); }
        MUST(dg_encode(m, cc, prompt.data(), 25, err, sizeof err));   /* two encoder passes, as generation does */
        MUST(dg_encode(m, cc, prompt.data() + 25, P - 25, err, sizeof err));
        std::vector<float> cpu1(C * V), cpu2(C * V), sc(C * V);
        MUST(dg_decode(m, cc, canvas.data(), C, NULL, 0, NULL, cpu1.data(), err, sizeof err));
        const float temp = 0.8f;
        for (int64_t i = 0; i < C * V; i++) sc[i] = cpu1[i] / temp;
        MUST(dg_decode(m, cc, canvas.data(), C, sc.data(), 0, NULL, cpu2.data(), err, sizeof err));
        dg_cache_free(cc);
        const double scale1 = max_abs(cpu1), scale2 = max_abs(cpu2);
        struct { const char *where; int kind, kv_f16; } runs[] = {
            {"GGGG", DGC_GEMM_PLAIN, 0}, {"GCSC", DGC_GEMM_PLAIN, 0}, {"SGCS", DGC_GEMM_PLAIN, 0},
            {"SSSS", DGC_GEMM_PLAIN, 0}, {"GGGG", DGC_GEMM_TF32, 0}, {"GCSC", DGC_GEMM_TF32, 1}};
        for (auto &r : runs) {
            const std::vector<int32_t> experts = placement(r.where, m->n_layers);
            dg_backend *cb = dgc_backend_new(0, r.kind, 0, err, sizeof err);
            if (!cb) { fprintf(stderr, "error: dgc_backend_new: %s\n", err); exit(2); }
            exec_run g = run_exec(m, cb, experts, r.kv_f16, prompt, canvas, sc);
            dg_backend_stats cs;
            dg_backend_get_stats(cb, &cs);
            dg_backend_free(cb);
            dg_backend *hb = dg_host_backend_new(0, 1, err, sizeof err);
            exec_run h = run_exec(m, hb, experts, r.kv_f16, prompt, canvas, sc);
            dg_backend_free(hb);
            const double e1 = max_diff(g.l1, cpu1) / scale1, e2 = max_diff(g.l2, cpu2) / scale2;
            /* plain: the runtime's fp32 bound; TF32: its rounding; an f16 cache: the halves' rounding too */
            const double tol = r.kind == DGC_GEMM_PLAIN ? 2e-5 : 2e-2;
            int same_argmax = 0;
            for (int64_t t = 0; t < C; t++) {
                int64_t a = 0, b = 0;
                for (int64_t v = 1; v < V; v++) {
                    if (g.l1[t * V + v] > g.l1[t * V + a]) a = v;
                    if (cpu1[t * V + v] > cpu1[t * V + b]) b = v;
                }
                same_argmax += a == b;
            }
            char name[96];
            snprintf(name, sizeof name, "executor cuda %s %s %s kv %s", r.where,
                     r.kind == DGC_GEMM_PLAIN ? "plain" : "tf32", type_name(type), r.kv_f16 ? "f16" : "f32");
            verdict(e1 <= tol && e2 <= tol && cs.allocated == 0, name,
                    "max diff / max|logit|: no sc %.2e, sc %.2e; argmax equal at %d/%lld (tolerance %.0e); device "
                    "bytes left %lld, peak %lld", e1, e2, same_argmax, (long long)C, tol, (long long)cs.allocated,
                    (long long)cs.peak);
            const bool bits = !r.kv_f16 && bit_diffs(h.l1, cpu1) == 0 && bit_diffs(h.l2, cpu2) == 0;
            snprintf(name, sizeof name, "executor host %s %s kv %s", r.where, type_name(type), r.kv_f16 ? "f16" : "f32");
            verdict((bits || r.kv_f16) && h.h2d == g.h2d && h.d2h == g.d2h, name,
                    "logits %s the CPU forward's; a decoder step's copies: host backend %lld up %lld down, cuda "
                    "%lld up %lld down", r.kv_f16 ? "(f16 cache: not compared with)" : bits ? "bit-identical to" :
                    "DIFFER from", (long long)h.h2d, (long long)h.d2h, (long long)g.h2d, (long long)g.d2h);
        }
    }
}

/* ---- the real shape ------------------------------------------------------------------------------------------- */

/* llama.cpp's use_more_bits (convert/presets.py _more_bits). */
static bool more_bits(int i, int n) { return i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2; }

/* A 256-block type on a row that cannot hold whole 256-blocks falls back (format/quant_types.py FALLBACK). */
static int fit(int type, int64_t cols) {
    if (cols % 256 == 0 || type == DG_TYPE_Q8_0 || type == DG_TYPE_Q5_0 || type == DG_TYPE_F32) return type;
    switch (type) {
    case DG_TYPE_Q4_K: return DG_TYPE_Q5_0;
    case DG_TYPE_Q5_K: return DG_TYPE_Q5_1;
    case DG_TYPE_Q6_K: return DG_TYPE_Q8_0;
    default: return DG_TYPE_Q4_0;
    }
}

/* google/diffusiongemma-26B-A4B-it's text shape (../shared/fixtures/real-config) with llama-quantize's Q4_K_M
 * choices for it (convert/presets.py; tests/test_cuda.py compares this table with presets.py). */
static void build_real_shape(dg_model &m, std::vector<dg_layer> &layers) {
    const int64_t H = 2816, F = 2112, I = 704, E = 128, V = 262144, L = 30;
    memset(&m, 0, sizeof m);
    m.n_layers = (int)L; m.hidden = (int)H; m.n_heads = 16; m.n_experts = (int)E; m.top_k = 8; m.expert_ff = (int)I;
    m.dense_ff = (int)F; m.vocab = (int)V; m.sliding_window = 1024; m.rope_pairs_full = 64; m.eps = 1e-6f;
    m.theta_full = 1e6f; m.theta_sliding = 1e4f; m.softcap = 30.0f; m.embed_scale = 53.0f;
    m.n_threads = (int)std::max(1L, sysconf(_SC_NPROCESSORS_ONLN));   /* the CPU side of CPU expert layers */
    auto T = [](int type, int64_t ne0, int64_t ne1, int64_t ne2) { return dg_tensor{nullptr, fit(type, ne0), ne0, ne1, ne2}; };
    auto vec = [](int64_t ne0) { return dg_tensor{nullptr, DG_TYPE_F32, ne0, 1, 1}; };
    m.token_embd = T(DG_TYPE_Q6_K, H, V, 1);
    m.output_norm = vec(H);
    m.sc_pre_norm = vec(H);
    m.sc_gate = T(DG_TYPE_Q4_K, H, F, 1);
    m.sc_up = T(DG_TYPE_Q4_K, H, F, 1);
    m.sc_down = T(DG_TYPE_Q4_K, F, H, 1);
    layers.assign(L, dg_layer{});
    int n_v = 0, i_v = 0;
    for (int l = 0; l < L; l++) n_v += (l + 1) % 6 != 0;
    for (int l = 0; l < L; l++) {
        dg_layer &ly = layers[l];
        ly.sliding = (l + 1) % 6 != 0;
        ly.head_dim = ly.sliding ? 256 : 512;
        ly.n_kv_heads = ly.sliding ? 8 : 2;
        const int64_t d = ly.head_dim, kv = ly.n_kv_heads;
        const int down = more_bits(l, (int)L) ? DG_TYPE_Q6_K : DG_TYPE_Q4_K;
        ly.attn_norm = vec(H);
        ly.attn_q = T(DG_TYPE_Q4_K, H, 16 * d, 1);
        ly.attn_k = T(DG_TYPE_Q4_K, H, kv * d, 1);
        if (ly.sliding) ly.attn_v = T(more_bits(i_v++, n_v) ? DG_TYPE_Q6_K : DG_TYPE_Q4_K, H, kv * d, 1);
        ly.attn_output = T(DG_TYPE_Q4_K, 16 * d, H, 1);
        ly.attn_q_norm = vec(d);
        ly.attn_k_norm = vec(d);
        ly.post_attention_norm = vec(H);
        ly.ffn_norm = vec(H);
        ly.ffn_gate = T(DG_TYPE_Q4_K, H, F, 1);
        ly.ffn_up = T(DG_TYPE_Q4_K, H, F, 1);
        ly.ffn_down = T(down, F, H, 1);
        ly.post_ffw_norm_1 = vec(H);
        ly.ffn_gate_inp = dg_tensor{nullptr, DG_TYPE_F32, H, E, 1};
        ly.ffn_gate_inp_scale = vec(H);
        ly.ffn_down_exps_scale = vec(E);
        ly.pre_ffw_norm_2 = vec(H);
        ly.ffn_gate_up_exps = T(DG_TYPE_Q4_K, H, 2 * I, E);
        ly.ffn_down_exps = T(down, I, H, E);
        ly.post_ffw_norm_2 = vec(H);
        ly.post_ffw_norm = vec(H);
        ly.dec_scale = ly.enc_scale = 1.0f;
    }
    m.layers = layers.data();
}

static void print_types(void) {
    dg_model m;
    std::vector<dg_layer> layers;
    build_real_shape(m, layers);
    printf("token_embd.weight %s\n", type_name(m.token_embd.type));
    printf("self_cond_gate.weight %s\nself_cond_up.weight %s\nself_cond_down.weight %s\n", type_name(m.sc_gate.type),
           type_name(m.sc_up.type), type_name(m.sc_down.type));
    for (int l = 0; l < m.n_layers; l++) {
        const dg_layer &ly = layers[l];
        printf("blk.%d.attn_q.weight %s\nblk.%d.attn_k.weight %s\n", l, type_name(ly.attn_q.type), l,
               type_name(ly.attn_k.type));
        if (ly.sliding) printf("blk.%d.attn_v.weight %s\n", l, type_name(ly.attn_v.type));
        printf("blk.%d.attn_output.weight %s\nblk.%d.ffn_gate.weight %s\nblk.%d.ffn_up.weight %s\n"
               "blk.%d.ffn_down.weight %s\nblk.%d.ffn_gate_inp.weight %s\nblk.%d.ffn_gate_up_exps.weight %s\n"
               "blk.%d.ffn_down_exps.weight %s\n", l, type_name(ly.attn_output.type), l, type_name(ly.ffn_gate.type),
               l, type_name(ly.ffn_up.type), l, type_name(ly.ffn_down.type), l, type_name(ly.ffn_gate_inp.type), l,
               type_name(ly.ffn_gate_up_exps.type), l, type_name(ly.ffn_down_exps.type));
    }
}

static size_t bytes_of(const dg_tensor &t) {
    int64_t bs, ts;
    if (t.ne0 == 0 || dg_type_size(t.type, &bs, &ts, err, sizeof err) != 0) return 0;
    return (size_t)(t.ne0 / bs * ts) * t.ne1 * t.ne2;
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* Host copies of the real shape's weights with random blocks made on the device (dgc_fill_random) and downloaded:
 * one buffer per distinct (type, shape), shared by every layer that has such a tensor (the executor copies each
 * resident tensor to its own place, and every streamed layer crosses PCIe in full, so timings are a real model's;
 * only the host memory is saved). */
struct shared_weights {
    std::vector<std::pair<std::vector<int64_t>, void *>> bufs;
    ~shared_weights() { for (auto &b : bufs) free(b.second); }
    void *get(const dg_tensor &t, uint64_t seed) {
        const std::vector<int64_t> key = {t.type, t.ne0, t.ne1, t.ne2};
        for (auto &b : bufs) if (b.first == key) return b.second;
        const size_t bytes = bytes_of(t);
        void *host = malloc(bytes), *d = NULL;
        if (!host) { fprintf(stderr, "error: out of host memory for %zu bytes\n", bytes); exit(2); }
        const float amp = (t.ne1 == 1 && t.ne2 == 1) ? 0.1f : 1.0f / sqrtf((float)t.ne0);
        MUST(dgc_malloc(&d, bytes, err, sizeof err));
        MUST(dgc_fill_random(t.type, d, t.ne1 * t.ne2, t.ne0, seed, amp, err, sizeof err));
        MUST(dgc_download(host, d, bytes, err, sizeof err));
        dgc_free(d);
        bufs.push_back({key, host});
        return host;
    }
};

static void fill_real_shape(dg_model &m, std::vector<dg_layer> &layers, shared_weights &w) {
    uint64_t seed = 1234;
    dg_tensor *g[] = {&m.token_embd, &m.output_norm, &m.sc_pre_norm, &m.sc_gate, &m.sc_up, &m.sc_down};
    for (auto *t : g) t->data = w.get(*t, seed++);
    for (auto &ly : layers) {
        dg_tensor *ts[] = {&ly.attn_norm, &ly.attn_q, &ly.attn_k, &ly.attn_v, &ly.attn_output, &ly.attn_q_norm,
                           &ly.attn_k_norm, &ly.post_attention_norm, &ly.ffn_norm, &ly.ffn_gate, &ly.ffn_up,
                           &ly.ffn_down, &ly.post_ffw_norm_1, &ly.ffn_gate_inp, &ly.ffn_gate_inp_scale,
                           &ly.ffn_down_exps_scale, &ly.pre_ffw_norm_2, &ly.ffn_gate_up_exps, &ly.ffn_down_exps,
                           &ly.post_ffw_norm_2, &ly.post_ffw_norm};
        for (auto *t : ts)
            if (t->ne0) t->data = w.get(*t, seed++);
    }
}

/* One canvas of C = 256 tokens at 16 forced steps after a 512-token prompt (cache of 1024 positions, f16), as
 * `dgguf run --gpu` runs it: each decoder pass uploads the self-conditioning logits and downloads the logits
 * (the sampler is the host's and is not timed here). spec: NAME:BUDGET_BYTES:PLACEMENT:PREDICTED_S. */
static void real_run(const char *spec, dg_model &m, std::vector<dg_layer> &layers) {
    char name[64], where[128];
    long long budget;
    double predicted;
    if (sscanf(spec, "%63[^:]:%lld:%127[GCS]:%lf", name, &budget, where, &predicted) != 4) {
        fprintf(stderr, "error: real: '%s' is not NAME:BUDGET_BYTES:PLACEMENT:PREDICTED_S\n", spec);
        exit(2);
    }
    const std::vector<int32_t> experts = placement(where, m.n_layers);
    const int64_t C = 256, P = 512, V = m.vocab, cap = 1024;
    const int steps = 16;
    size_t free0, total;
    cudaMemGetInfo(&free0, &total);
    dg_backend *b = dgc_backend_new(0, DGC_GEMM_TF32, budget, err, sizeof err);
    if (!b) { fprintf(stderr, "error: dgc_backend_new: %s\n", err); exit(2); }
    double t0 = now();
    dg_exec_config cfg = {C, 1, experts.data()};
    dg_exec *x = dg_exec_new(&m, b, &cfg, err, sizeof err);
    if (!x) {
        printf("FAIL real %s: the executor does not fit: %s\n", name, err);
        failures++;
        dg_backend_free(b);
        return;
    }
    dg_exec_cache *c = dg_exec_cache_new(x, cap, err, sizeof err);
    if (!c) {
        printf("FAIL real %s: the KV cache does not fit: %s\n", name, err);
        failures++;
        dg_exec_free(x);
        dg_backend_free(b);
        return;
    }
    const double t_load = now() - t0;
    std::vector<int32_t> prompt(P), canvas(C);
    for (auto &t : prompt) t = (int32_t)((frand() + 1.0f) * 0.5f * (V - 1));
    for (auto &t : canvas) t = (int32_t)((frand() + 1.0f) * 0.5f * (V - 1));
    std::vector<float> logits(C * V), sc(C * V);
    t0 = now();
    MUST(dg_exec_encode(c, prompt.data(), P, err, sizeof err));
    const double t_prompt = now() - t0;
    MUST(dg_exec_decode(c, canvas.data(), C, NULL, 0, NULL, logits.data(), err, sizeof err));   /* warm-up */
    double t_dec = 0;
    for (int s = 0; s < steps; s++) {
        for (int64_t i = 0; i < C * V; i++) sc[i] = logits[i] * 1.25f;
        t0 = now();
        MUST(dg_exec_decode(c, canvas.data(), C, sc.data(), 0, NULL, logits.data(), err, sizeof err));
        t_dec += now() - t0;
        for (int64_t t = 0; t < C; t++) {   /* commit the argmax, as a sampler would */
            int64_t a = 0;
            for (int64_t v = 1; v < V; v++) if (logits[t * V + v] > logits[t * V + a]) a = v;
            canvas[t] = (int32_t)a;
        }
    }
    dg_exec_stats st;
    dg_exec_get_stats(x, &st);
    t0 = now();
    MUST(dg_exec_encode(c, canvas.data(), C, err, sizeof err));
    const double t_enc = now() - t0, step = t_dec / steps;
    dg_backend_stats bs;
    dg_backend_get_stats(b, &bs);
    size_t free1;
    cudaMemGetInfo(&free1, &total);
    bool finite = true;
    for (float v : logits) finite &= std::isfinite(v);
    printf("INFO real %s: %lld resident, %lld CPU, %lld streamed expert layers; device bytes %.3f GiB of a %.3f GiB "
           "budget (peak %.3f), cudaMemGetInfo says %.3f GiB used; load %.1f s, prompt encode (%lld tokens) %.3f s; "
           "a step copies %.1f MiB up, %.1f MiB down\n", name, (long long)st.device_layers, (long long)st.cpu_layers,
           (long long)st.stream_layers, bs.allocated / 1073741824.0, budget / 1073741824.0, bs.peak / 1073741824.0,
           (free0 - free1) / 1073741824.0, t_load, (long long)P, t_prompt, st.pass_h2d / 1048576.0,
           st.pass_d2h / 1048576.0);
    printf("RESULT real %s: measured %.4f s/step, predicted %.4f s/step (measured/predicted %.2f); canvas encode %.4f "
           "s; %.1f tok/s at %d steps (sampler not included)\n", name, step, predicted, step / predicted, t_enc,
           C / (steps * step + t_enc), steps);
    verdict(finite && bs.peak <= budget, "real shape run", "%s: logits finite %s, peak %lld <= budget %lld", name,
            finite ? "yes" : "NO", (long long)bs.peak, budget);
    fflush(stdout);
    dg_exec_cache_free(c);
    dg_exec_free(x);
    dg_backend_free(b);
}

int main(int argc, char **argv) {
    const char *what = argc > 1 ? argv[1] : "";
    if (!strcmp(what, "types")) {
        print_types();
        return 0;
    }
    int count = 0;
    MUST(dgc_device_count(&count, err, sizeof err));
    if (count < 1) { fprintf(stderr, "error: no CUDA device (%s)\n", err); return 2; }
    char name[256];
    int major, minor;
    size_t total;
    MUST(dgc_device_info(0, name, sizeof name, &major, &minor, &total, err, sizeof err));
    printf("INFO device 0: %s, compute capability %d.%d, %.1f GiB\n", name, major, minor, total / 1073741824.0);
    if (!strcmp(what, "kernels")) {
        check_dequantize();
        check_matmul();
        check_elementwise();
        check_attention();
        check_router_and_moe();
        check_soft_embed();
        check_step_stats();
    } else if (!strcmp(what, "decode")) {
        check_decode();
    } else if (!strcmp(what, "real")) {
        dg_model m;
        std::vector<dg_layer> layers;
        build_real_shape(m, layers);
        shared_weights w;
        const double t0 = now();
        fill_real_shape(m, layers, w);
        printf("INFO real shape: random weights made in %.1f s\n", now() - t0);
        for (int i = 2; i < argc; i++) real_run(argv[i], m, layers);
    } else {
        fprintf(stderr, "usage: %s kernels | decode | real NAME:BUDGET:PLACEMENT:PREDICTED... | types\n", argv[0]);
        return 2;
    }
    MUST(dgc_synchronize(err, sizeof err));
    printf("%s %s: %d check(s) failed\n", failures ? "FAIL" : "PASS", what, failures);
    return failures ? 1 : 0;
}
