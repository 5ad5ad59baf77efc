/* check.cu: the GPU check driver (built by scripts/build_cuda.sh, run by scripts/gpu_check.sh), linked with the
 * CPU library (the C files of native/), whose functions are the twins.
 *
 *   dg_cuda_check kernels      every kernel against its CPU twin, with the tolerance printed on each line
 *   dg_cuda_check decode       a tiny random model: device encode + decode against dg_encode + dg_decode
 *   dg_cuda_check throughput [BUDGET_GIB...]   the real 30-layer shape, random Q4_K_M blocks made on the device
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

#include <algorithm>
#include <numeric>
#include <vector>

#include "dg_cuda.h"
extern "C" {
#include "../attention.h"
#include "../matmul.h"
#include "../ops.h"
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

        for (int kind : {DGC_GEMM_PLAIN, DGC_GEMM_TF32})
            for (int resident : {-1, 2}) {
                if (kind == DGC_GEMM_TF32 && resident != -1) continue;
                dgc_model *dm = dgc_model_upload(m, kind, resident, err, sizeof err);
                if (!dm) { fprintf(stderr, "error: %s\n", err); exit(2); }
                dgc_cache *dc = dgc_cache_new(dm, 256, err, sizeof err);
                if (!dc) { fprintf(stderr, "error: %s\n", err); exit(2); }
                MUST(dgc_encode(dm, dc, prompt.data(), 25, err, sizeof err));
                MUST(dgc_encode(dm, dc, prompt.data() + 25, P - 25, err, sizeof err));
                std::vector<float> g1(C * V), g2(C * V), g3(C * V);
                if (kind == DGC_GEMM_TF32) MUST(dgc_model_profile(dm, 1, err, sizeof err));   /* must not change bits */
                MUST(dgc_decode(dm, dc, canvas.data(), C, NULL, 0, g1.data(), err, sizeof err));
                /* the device step stats turn the logits into the scaled self-conditioning input in place */
                std::vector<int32_t> amax(C), amax_cpu(C);
                std::vector<float> ent(C), ent_cpu(C);
                std::vector<uint8_t> acc(C), acc_cpu(C);
                MUST(dgc_model_step_stats(dm, C, temp, 0.1f, amax.data(), ent.data(), acc.data(), err, sizeof err));
                MUST(dgc_decode(dm, dc, canvas.data(), C, NULL, 1, g2.data(), err, sizeof err));
                MUST(dgc_decode(dm, dc, canvas.data(), C, sc.data(), 0, g3.data(), err, sizeof err));
                if (kind == DGC_GEMM_TF32) {
                    char prof[1024];
                    dgc_model_profile_report(dm, prof, sizeof prof);
                    printf("INFO tiny model, %s: %s\n", type_name(type), prof);
                }
                dgc_cache_free(dc);
                dgc_model_free(dm);
                std::vector<float> g1s(C * V);
                for (int64_t i = 0; i < C * V; i++) g1s[i] = g1[i] / temp;
                step_stats_cpu(g1s, C, V, 0.1f, amax_cpu, ent_cpu, acc_cpu);
                const double e1 = max_diff(g1, cpu1) / scale1, e2 = max_diff(g2, cpu2) / scale2,
                             e3 = max_diff(g3, cpu2) / scale2;
                const double tol = kind == DGC_GEMM_PLAIN ? 2e-5 : 2e-2;
                int same_argmax = 0;
                for (int64_t t = 0; t < C; t++) {
                    int64_t a = 0, b = 0;
                    for (int64_t v = 1; v < V; v++) {
                        if (g1[t * V + v] > g1[t * V + a]) a = v;
                        if (cpu1[t * V + v] > cpu1[t * V + b]) b = v;
                    }
                    same_argmax += a == b;
                }
                char name[80];
                snprintf(name, sizeof name, "decode %s %s%s", kind == DGC_GEMM_PLAIN ? "plain" : "tf32",
                         type_name(type), resident == -1 ? "" : " streamed");
                verdict(e1 <= tol && e2 <= tol && e3 <= tol, name,
                        "max diff / max|logit|: no sc %.2e, sc on device %.2e, sc from host %.2e; argmax equal at "
                        "%d/%lld (tolerance %.0e)", e1, e2, e3, same_argmax, (long long)C, tol);
                snprintf(name, sizeof name, "decode step stats %s %s", kind == DGC_GEMM_PLAIN ? "plain" : "tf32",
                         type_name(type));
                verdict(amax == amax_cpu && acc == acc_cpu, name, "device stats of the device logits: argmax %s, "
                        "accept %s", amax == amax_cpu ? "equal" : "DIFFER", acc == acc_cpu ? "equal" : "DIFFER");
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
    m.theta_full = 1e6f; m.theta_sliding = 1e4f; m.softcap = 30.0f; m.embed_scale = 53.0f; m.n_threads = 1;
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

/* One canvas of C tokens at `steps` forced steps after a P-token prompt, at a device budget: the expert layers
 * that do not fit are streamed from pinned host memory before each use (not overlapped with compute). */
static void throughput(double budget_gib, int steps) {
    dg_model m;
    std::vector<dg_layer> layers;
    build_real_shape(m, layers);
    const int64_t C = 256, P = 512, cap = P + 2 * C;
    size_t experts = 0, per_layer = 0, others = bytes_of(m.token_embd) + bytes_of(m.sc_gate) + bytes_of(m.sc_up) +
                                                bytes_of(m.sc_down);
    for (auto &ly : layers) {
        per_layer = std::max(per_layer, bytes_of(ly.ffn_gate_up_exps) + bytes_of(ly.ffn_down_exps));
        experts += bytes_of(ly.ffn_gate_up_exps) + bytes_of(ly.ffn_down_exps);
        const dg_tensor *ts[] = {&ly.attn_q, &ly.attn_k, &ly.attn_v, &ly.attn_output, &ly.ffn_gate, &ly.ffn_up,
                                 &ly.ffn_down, &ly.ffn_gate_inp};
        for (auto *t : ts) others += bytes_of(*t);
    }
    /* pass buffers (logits [C, V] dominate), the cache and the kernels' scratch: measured below, estimated here */
    const double overhead = 1.5 * (1 << 30);
    const double budget = budget_gib * (1 << 30);
    int resident = 0;
    while (resident < m.n_layers) {
        const double need = others + overhead + (double)per_layer * (resident + 1) +
                            (resident + 1 < m.n_layers ? per_layer : 0);   /* + the streaming stage */
        if (need > budget) break;
        resident++;
    }
    printf("INFO budget %.0f GiB: weights %.2f GiB (experts %.2f GiB, %.3f GiB a layer), %d of %d expert layers "
           "resident, %d streamed\n", budget_gib, (others + experts) / 1073741824.0, experts / 1073741824.0,
           per_layer / 1073741824.0, resident, m.n_layers, m.n_layers - resident);
    if (others + overhead + 2.0 * per_layer > budget) {
        printf("RESULT budget %.0f GiB: does not fit even one resident expert layer plus the stage; skipped\n",
               budget_gib);
        return;
    }
    size_t free0, total;
    cudaMemGetInfo(&free0, &total);
    const double t_build = now();
    dgc_model *dm = dgc_model_random(&m, DGC_GEMM_TF32, resident, 1234, err, sizeof err);
    if (!dm) { fprintf(stderr, "error: %s\n", err); exit(2); }
    dgc_cache *dc = dgc_cache_new(dm, cap, err, sizeof err);
    if (!dc) { fprintf(stderr, "error: %s\n", err); exit(2); }
    printf("INFO random weights made on the device in %.1f s\n", now() - t_build);
    std::vector<int32_t> prompt(P), canvas(C), amax(C);
    std::vector<float> ent(C);
    std::vector<uint8_t> acc(C);
    for (auto &t : prompt) t = (int32_t)((frand() + 1.0f) * 0.5f * (m.vocab - 1));
    for (auto &t : canvas) t = (int32_t)((frand() + 1.0f) * 0.5f * (m.vocab - 1));
    double t0 = now();
    MUST(dgc_encode(dm, dc, prompt.data(), P, err, sizeof err));
    const double t_prompt = now() - t0;
    /* warm-up step (kernel loading, first-touch), not timed */
    MUST(dgc_decode(dm, dc, canvas.data(), C, NULL, 0, NULL, err, sizeof err));
    size_t free1;
    cudaMemGetInfo(&free1, &total);
    MUST(dgc_model_profile(dm, 1, err, sizeof err));
    double t_dec = 0, t_stats = 0;
    for (int s = steps; s >= 1; s--) {
        t0 = now();
        MUST(dgc_decode(dm, dc, canvas.data(), C, NULL, s != steps, NULL, err, sizeof err));
        const double t1 = now();
        const float temp = 0.4f + 0.4f * s / steps;
        MUST(dgc_model_step_stats(dm, C, temp, 0.1f, amax.data(), ent.data(), acc.data(), err, sizeof err));
        t_stats += now() - t1;
        t_dec += t1 - t0;
        for (int64_t i = 0; i < C; i++) if (acc[i]) canvas[i] = amax[i];
    }
    t0 = now();
    MUST(dgc_encode(dm, dc, canvas.data(), C, err, sizeof err));
    const double t_commit = now() - t0, t_canvas = t_dec + t_stats + t_commit;
    size_t dev_bytes, streamed;
    dgc_model_bytes(dm, &dev_bytes, &streamed);
    printf("RESULT budget %.0f GiB: device memory used %.2f GiB (weights %.2f GiB), streamed %.2f GiB a step; "
           "decoder step %.4f s, step stats %.4f s, canvas encode %.4f s, prompt encode (%lld tokens) %.3f s\n",
           budget_gib, (free0 - free1) / 1073741824.0, dev_bytes / 1073741824.0, streamed / 1073741824.0,
           t_dec / steps, t_stats / steps, t_commit, (long long)P, t_prompt);
    char prof[1024];
    dgc_model_profile_report(dm, prof, sizeof prof);
    printf("INFO budget %.0f GiB: %s\n", budget_gib, prof);
    printf("RESULT budget %.0f GiB: %d steps per canvas of %lld: %.3f s per canvas = %.1f tok/s\n", budget_gib, steps,
           (long long)C, t_canvas, C / t_canvas);
    fflush(stdout);
    dgc_cache_free(dc);
    dgc_model_free(dm);
    dgc_release_scratch();
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
    } else if (!strcmp(what, "throughput")) {
        const int steps = 16;
        if (argc == 2) throughput(1e9, steps);
        for (int i = 2; i < argc; i++) throughput(atof(argv[i]), steps);
    } else {
        fprintf(stderr, "usage: %s kernels | decode | throughput [BUDGET_GIB...] | types\n", argv[0]);
        return 2;
    }
    MUST(dgc_synchronize(err, sizeof err));
    printf("%s %s: %d check(s) failed\n", failures ? "FAIL" : "PASS", what, failures);
    return failures ? 1 : 0;
}
