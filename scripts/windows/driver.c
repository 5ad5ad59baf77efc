/* driver.c: the Windows check's driver (scripts/check_windows.sh). Built for Windows x64 against dgguf.dll and
 * run under Wine, and built natively from the same sources on Linux:
 *
 *   driver kernels KERNEL...   every stored type quantized and dequantized, then each matmul kernel named (those
 *                              the CPU lacks are said so), the soft embedding and both attention kernels, on shapes
 *                              with tails everywhere, 1 and 2 threads; one line per result with a hash of its
 *                              bits (check_windows.sh diffs the Linux and the Wine output), and in-process the
 *                              reference equalities tests/test_kernels.py and test_attention.py hold: every int8
 *                              kernel equals int8-reference on quantized weights, every bf16 kernel equals
 *                              int8-bf16-reference on BF16 weights, the blocked attention gives the same bits at
 *                              every kernel level, any thread count the same bits. Exit 1 on a difference.
 *   driver forward FILE [REL]  the forward that scripts/windows/export_model.py wrote (structs, tensors, inputs and
 *                              the Linux build's logits): dg_encode, dg_decode without and with self-conditioning,
 *                              compared with the Linux logits: equal bits, or with REL every |difference| within
 *                              REL times the largest |logit| (see compare()). Exit 1 otherwise.
 */
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dgguf.h"

#define ERRLEN 512

static uint64_t rng_state = 0x853c49e6748fea9bull;
static float uniform(void) {   /* [-1, 1) */
    rng_state = rng_state * 6364136223846793005ull + 1442695040888963407ull;
    return (float)((int32_t)(rng_state >> 32)) / 2147483648.0f;
}

static uint64_t hash_bytes(const void *p, size_t n) {
    const uint8_t *b = p;
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++) h = (h ^ b[i]) * 1099511628211ull;
    return h;
}

static void *xmalloc(size_t n) {
    void *p = malloc(n ? n : 1);
    if (!p) {
        fprintf(stderr, "driver: out of memory (%zu bytes)\n", n);
        exit(2);
    }
    return p;
}

static int failures = 0;
static void fail(const char *what) {
    printf("FAIL %s\n", what);
    failures++;
}

/* ---- kernels ------------------------------------------------------------------------------------------------ */

static const struct { int type; const char *name; int quantized; } TYPES[] = {
    {0, "F32", 0}, {1, "F16", 0}, {30, "BF16", 0}, {8, "Q8_0", 1}, {2, "Q4_0", 1}, {3, "Q4_1", 1}, {6, "Q5_0", 1},
    {7, "Q5_1", 1}, {10, "Q2_K", 1}, {11, "Q3_K", 1}, {12, "Q4_K", 1}, {13, "Q5_K", 1}, {14, "Q6_K", 1},
    {20, "IQ4_NL", 1}, {23, "IQ4_XS", 1}};
enum { N_TYPES = sizeof TYPES / sizeof *TYPES };
/* (tokens, rows, K): token tails of every tile, rows not a multiple of 4 or 32, K tails of float lanes and of
 * int8 groups (512 values); K-quants take the multiples of 256. */
static const int64_t SHAPES[][3] = {{1, 1, 32}, {7, 9, 96}, {17, 33, 544}, {5, 3, 2816}, {40, 70, 1280},
                                    {2, 37, 2816}, {25, 5, 1536}};
enum { N_SHAPES = sizeof SHAPES / sizeof *SHAPES };

static int set_kernel(const char *name) {
    char err[ERRLEN];
    return dg_set_matmul_kernel(name, err, ERRLEN) == 0;
}

/* the in-process reference of a matmul kernel on a type, or NULL where only the cross-platform hash applies */
static const char *matmul_reference(const char *kernel, int t) {
    if (strncmp(kernel, "int8", 4) != 0) return NULL;
    if (TYPES[t].quantized) return "int8-reference";
    if (TYPES[t].type == 30 && strstr(kernel, "bf16")) return "int8-bf16-reference";
    return NULL;
}

static int kernel_index(char **kernels, int nk, const char *name) {
    for (int i = 0; i < nk; i++)
        if (strcmp(kernels[i], name) == 0) return i;
    return -1;
}

static void check_matmul(char **kernels, int nk, const int *usable) {
    char err[ERRLEN], what[256];
    for (int t = 0; t < N_TYPES; t++) {
        int64_t bs, ts;
        if (dg_type_size(TYPES[t].type, &bs, &ts, err, ERRLEN)) {
            printf("type %s: %s\n", TYPES[t].name, err);
            failures++;
            continue;
        }
        for (int s = 0; s < N_SHAPES; s++) {
            const int64_t n = SHAPES[s][0], rows = SHAPES[s][1], k = SHAPES[s][2];
            if (k % bs) continue;
            float *w = xmalloc((size_t)(rows * k) * 4), *wf = xmalloc((size_t)(rows * k) * 4);
            float *x = xmalloc((size_t)(n * k) * 4);
            for (int64_t i = 0; i < rows * k; i++) w[i] = uniform() * (1.0f + (float)(i % 7));
            for (int64_t i = 0; i < n; i++) {
                const float scale = 0.01f + 5.0f * (uniform() + 1.0f);
                for (int64_t j = 0; j < k; j++) x[i * k + j] = j < k / 2 && j % 7 == 0 ? 0.0f : uniform() * scale;
            }
            const size_t nb = (size_t)(rows * (k / bs) * ts);
            uint8_t *q = xmalloc(nb);
            if (dg_quantize_rows(TYPES[t].type, w, q, rows, k, err, ERRLEN) ||
                dg_dequantize_rows(TYPES[t].type, q, wf, rows, k, err, ERRLEN)) {
                printf("quantize %s: %s\n", TYPES[t].name, err);
                failures++;
                continue;
            }
            printf("quant %-5s %" PRId64 "x%" PRId64 " bytes %016" PRIx64 " values %016" PRIx64 "\n", TYPES[t].name,
                   rows, k, hash_bytes(q, nb), hash_bytes(wf, (size_t)(rows * k) * 4));
            const dg_tensor wt = {q, TYPES[t].type, k, rows, 1};
            float **outs = xmalloc(sizeof(float *) * (size_t)nk);
            float *two = xmalloc((size_t)(n * rows) * 4);
            for (int kk = 0; kk < nk; kk++) {
                outs[kk] = NULL;
                if (!usable[kk]) continue;
                set_kernel(kernels[kk]);
                outs[kk] = xmalloc((size_t)(n * rows) * 4);
                if (dg_matmul(&wt, 0, x, n, outs[kk], 1, err, ERRLEN) || dg_matmul(&wt, 0, x, n, two, 2, err, ERRLEN)) {
                    printf("matmul %s %s: %s\n", kernels[kk], TYPES[t].name, err);
                    failures++;
                    continue;
                }
                snprintf(what, sizeof what, "matmul %s %s %" PRId64 "x%" PRId64 "x%" PRId64, kernels[kk],
                         TYPES[t].name, n, rows, k);
                printf("%s %016" PRIx64 "\n", what, hash_bytes(outs[kk], (size_t)(n * rows) * 4));
                if (memcmp(two, outs[kk], (size_t)(n * rows) * 4)) fail(strcat(what, ": 2 threads differ from 1"));
            }
            for (int kk = 0; kk < nk; kk++) {
                const char *ref = outs[kk] ? matmul_reference(kernels[kk], t) : NULL;
                const int r = ref ? kernel_index(kernels, nk, ref) : -1;
                if (r < 0 || !outs[r] || r == kk) continue;
                snprintf(what, sizeof what, "matmul %s %s %" PRId64 "x%" PRId64 "x%" PRId64 ": differs from %s",
                         kernels[kk], TYPES[t].name, n, rows, k, ref);
                if (memcmp(outs[kk], outs[r], (size_t)(n * rows) * 4)) fail(what);
            }
            for (int kk = 0; kk < nk; kk++) free(outs[kk]);
            free(outs), free(two), free(q), free(w), free(wf), free(x);
        }
    }
}

static void check_soft_embed(char **kernels, int nk, const int *usable) {
    char err[ERRLEN];
    const int64_t n = 13, V = 517, K = 256;
    for (int t = 0; t < N_TYPES; t++) {
        int64_t bs, ts;
        dg_type_size(TYPES[t].type, &bs, &ts, err, ERRLEN);
        float *w = xmalloc((size_t)(V * K) * 4), *logits = xmalloc((size_t)(n * V) * 4);
        float *out = xmalloc((size_t)(n * K) * 4);
        for (int64_t i = 0; i < V * K; i++) w[i] = uniform();
        for (int64_t i = 0; i < n * V; i++) logits[i] = 8.0f * uniform();
        uint8_t *q = xmalloc((size_t)(V * (K / bs) * ts));
        dg_quantize_rows(TYPES[t].type, w, q, V, K, err, ERRLEN);
        const dg_tensor wt = {q, TYPES[t].type, K, V, 1};
        for (int kk = 0; kk < nk; kk++) {
            if (!usable[kk]) continue;
            set_kernel(kernels[kk]);
            if (dg_soft_embed(&wt, logits, n, 1.5f, 0, out, 2, err, ERRLEN)) {
                printf("soft_embed %s %s: %s\n", kernels[kk], TYPES[t].name, err);
                failures++;
                continue;
            }
            printf("soft_embed %s %s %016" PRIx64 "\n", kernels[kk], TYPES[t].name,
                   hash_bytes(out, (size_t)(n * K) * 4));
        }
        free(w), free(logits), free(out), free(q);
    }
}

static void check_attention(char **kernels, int nk, const int *usable) {
    /* n, held, heads, kv heads, head dim, window, causal */
    static const int64_t CASES[][7] = {{9, 20, 4, 2, 64, 0, 1}, {70, 5, 8, 1, 128, 16, 0}, {3, 0, 2, 2, 256, 0, 1}};
    static const char *const ATTENTION[] = {"per-query", "blocked"};
    char err[ERRLEN], what[256];
    for (int c = 0; c < 3; c++) {
        const int64_t n = CASES[c][0], held = CASES[c][1];
        const int heads = (int)CASES[c][2], kv = (int)CASES[c][3], d = (int)CASES[c][4];
        const size_t qn = (size_t)(n * heads * d), cn = (size_t)((held ? held : 1) * kv * d), pn = (size_t)(n * kv * d);
        float *q = xmalloc(qn * 4), *ck = xmalloc(cn * 4), *cv = xmalloc(cn * 4), *k = xmalloc(pn * 4);
        float *v = xmalloc(pn * 4), *out = xmalloc(qn * 4), *blocked_ref = xmalloc(qn * 4);
        for (size_t i = 0; i < qn; i++) q[i] = 3.0f * uniform();
        for (size_t i = 0; i < cn; i++) ck[i] = uniform(), cv[i] = uniform();
        for (size_t i = 0; i < pn; i++) k[i] = uniform(), v[i] = uniform();
        int have_ref = 0;
        for (int kk = 0; kk < nk; kk++) {
            if (!usable[kk]) continue;
            set_kernel(kernels[kk]);
            for (int a = 0; a < 2; a++) {
                if (dg_set_attention_kernel(ATTENTION[a], err, ERRLEN) ||
                    dg_attention(q, ck, cv, held, k, v, n, heads, kv, d, CASES[c][5], (int)CASES[c][6], out, 2, err,
                                 ERRLEN)) {
                    printf("attention %s %s: %s\n", kernels[kk], ATTENTION[a], err);
                    failures++;
                    continue;
                }
                snprintf(what, sizeof what, "attention %s %s case %d", kernels[kk], ATTENTION[a], c);
                printf("%s %016" PRIx64 "\n", what, hash_bytes(out, qn * 4));
                if (a == 1 && !have_ref) {   /* the first kernel named (the reference) sets the blocked bits */
                    memcpy(blocked_ref, out, qn * 4);
                    have_ref = 1;
                } else if (a == 1 && memcmp(out, blocked_ref, qn * 4)) {
                    fail(strcat(what, ": differs from the first kernel's blocked attention"));
                }
            }
        }
        free(q), free(ck), free(cv), free(k), free(v), free(out), free(blocked_ref);
    }
}

static int kernels_main(int nk, char **kernels) {
    char err[ERRLEN];
    int *usable = xmalloc(sizeof(int) * (size_t)(nk ? nk : 1));
    const char *start = dg_matmul_kernel();
    char initial[64];
    snprintf(initial, sizeof initial, "%s", start);
    printf("cpu features %s; default kernel %s\n", dg_cpu_features(), initial);
    for (int i = 0; i < nk; i++) {
        usable[i] = dg_set_matmul_kernel(kernels[i], err, ERRLEN) == 0;
        if (!usable[i]) printf("kernel %s: %s\n", kernels[i], err);
    }
    check_matmul(kernels, nk, usable);
    check_soft_embed(kernels, nk, usable);
    check_attention(kernels, nk, usable);
    set_kernel(initial);
    free(usable);
    printf("kernels: %d failure(s)\n", failures);
    return failures ? 1 : 0;
}

/* ---- forward ------------------------------------------------------------------------------------------------ */

static FILE *in_file;
static const char *in_name;
static void read_exact(void *p, size_t n) {
    if (fread(p, 1, n, in_file) != n) {
        fprintf(stderr, "driver: %s is truncated\n", in_name);
        exit(2);
    }
}
static uint64_t read_u64(void) {
    uint8_t b[8];
    read_exact(b, 8);
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = v << 8 | b[i];
    return v;
}

/* 64-byte aligned (as the mapped GGUF's 32-byte aligned tensors, and more); never freed: the process ends */
static void *aligned_copy(size_t n) {
    uint8_t *p = xmalloc(n + 64);
    return p + (64 - (uintptr_t)p % 64) % 64;
}

/* The Linux logits came from the same C with the same kernels and the same bits everywhere but in libm: glibc's and
 * mingw-w64's cosf and sinf (the RoPE tables, ops.c) differ in the last bit for about 1% of angles, which moves
 * logits by an ulp or two. So the Wine run is held to rel times the largest |logit| (check_windows.sh: 2e-5, the
 * fp32 noise bound of tests/test_forward.py's REL_TOL), the native run to equal bits (rel 0). */
static int compare(const char *what, const float *got, const float *want, size_t count, double rel) {
    size_t differ = 0;
    double max_diff = 0, max_abs = 0;
    for (size_t i = 0; i < count; i++) {
        if (memcmp(&got[i], &want[i], 4)) differ++;
        const double dlt = fabs((double)got[i] - (double)want[i]);
        if (!(dlt <= max_diff)) max_diff = dlt;   /* NaN too */
        if (fabs((double)want[i]) > max_abs) max_abs = fabs((double)want[i]);
    }
    const int ok = rel > 0 ? max_diff <= rel * max_abs : differ == 0;
    printf("forward %s: %zu of %zu logits differ from Linux's, max |diff| %.3g (max |logit| %.3g, bound %.3g): %s\n",
           what, differ, count, max_diff, max_abs, rel * max_abs, ok ? "ok" : "FAIL");
    return ok;
}

static int forward_main(const char *path, double rel) {
    char err[ERRLEN], magic[8], name[2][65] = {{0}};
    in_name = path;
    if (!(in_file = fopen(path, "rb"))) {
        fprintf(stderr, "driver: cannot open %s\n", path);
        return 2;
    }
    read_exact(magic, 8);
    const uint64_t sm = read_u64(), sl = read_u64(), st = read_u64(), n_layers = read_u64();
    if (memcmp(magic, "DGWIN001", 8) || sm != sizeof(dg_model) || sl != sizeof(dg_layer) || st != sizeof(dg_tensor) ||
        n_layers == 0 || n_layers > 4096) {
        fprintf(stderr, "driver: %s: not an export of these structs (sizes %" PRIu64 " %" PRIu64 " %" PRIu64
                " here %zu %zu %zu)\n", path, sm, sl, st, sizeof(dg_model), sizeof(dg_layer), sizeof(dg_tensor));
        return 2;
    }
    dg_model model;
    dg_layer *layers = xmalloc(sizeof(dg_layer) * n_layers);
    read_exact(&model, sizeof model);
    read_exact(layers, sizeof(dg_layer) * n_layers);
    model.layers = layers;
    read_exact(name[0], 64);
    read_exact(name[1], 64);
    if (dg_set_matmul_kernel(name[0], err, ERRLEN) || dg_set_attention_kernel(name[1], err, ERRLEN)) {
        printf("forward: %s\n", err);
        return 1;
    }
    const uint64_t n_tensors = read_u64();
    for (uint64_t i = 0; i < n_tensors; i++) {
        const uint64_t owner = read_u64(), off = read_u64(), bytes = read_u64();
        uint8_t *base = owner == 0 ? (uint8_t *)&model : (uint8_t *)&layers[owner - 1];
        if (owner > n_layers || off + sizeof(dg_tensor) > (owner ? sizeof(dg_layer) : sizeof(dg_model))) {
            fprintf(stderr, "driver: %s: tensor %" PRIu64 " out of place\n", path, i);
            return 2;
        }
        void *data = aligned_copy(bytes);
        read_exact(data, bytes);
        ((dg_tensor *)(base + off))->data = data;
    }
    int64_t n_ids[2];
    int32_t *ids[2];
    for (int i = 0; i < 2; i++) {
        n_ids[i] = (int64_t)read_u64();
        ids[i] = xmalloc(sizeof(int32_t) * (size_t)n_ids[i]);
        read_exact(ids[i], sizeof(int32_t) * (size_t)n_ids[i]);
    }
    const int64_t vocab = (int64_t)read_u64(), count = n_ids[1] * vocab;
    float *want[2] = {xmalloc((size_t)count * 4), xmalloc((size_t)count * 4)}, *got = xmalloc((size_t)count * 4);
    read_exact(want[0], (size_t)count * 4);
    read_exact(want[1], (size_t)count * 4);
    fclose(in_file);
    printf("forward: %" PRIu64 " layers, %" PRIu64 " tensors, context %" PRId64 ", canvas %" PRId64 ", vocab %" PRId64
           ", kernels %s / %s, %d threads\n", n_layers, n_tensors, n_ids[0], n_ids[1], vocab, dg_matmul_kernel(),
           dg_attention_kernel(), model.n_threads);
    dg_cache *cache = dg_cache_new(&model, n_ids[0], err, ERRLEN);
    if (!cache || dg_encode(&model, cache, ids[0], n_ids[0], err, ERRLEN)) {
        printf("forward: %s\n", err);
        return 1;
    }
    int ok = 1;
    for (int step = 0; step < 2; step++) {
        if (dg_decode(&model, cache, ids[1], n_ids[1], step ? want[0] : NULL, 0, NULL, got, err, ERRLEN)) {
            printf("forward: %s\n", err);
            return 1;
        }
        ok &= compare(step ? "with self-conditioning" : "first step", got, want[step], (size_t)count, rel);
    }
    dg_cache_free(cache);
    return ok ? 0 : 1;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IONBF, 0);   /* whatever a crash leaves is printed; msvcrt has no line buffering */
    if (argc >= 2 && strcmp(argv[1], "kernels") == 0) return kernels_main(argc - 2, argv + 2);
    if ((argc == 3 || argc == 4) && strcmp(argv[1], "forward") == 0)
        return forward_main(argv[2], argc == 4 ? atof(argv[3]) : 0.0);
    fprintf(stderr, "usage: driver kernels KERNEL... | driver forward FILE [REL]\n");
    return 2;
}
