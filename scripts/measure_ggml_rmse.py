#!/usr/bin/env python3
"""Measure llama.cpp's reference quantizers' RMSE on the seeded test matrices.

Reproduces tests/fixtures/ggml_rmse.json, the bar tests/test_quant.py holds our
quantizers to. ggml itself is not vendored: this script fetches the
llama-cpp-python sdist (or uses --ggml-src, a ggml/src directory already
unpacked), compiles ggml-quants.c with a small driver written below, runs each
type's quantize_row_*_ref + dequantize_row_* on the matrices and records the
RMSE. Only numbers are written.

    python scripts/measure_ggml_rmse.py [--ggml-src DIR] [--out tests/fixtures/ggml_rmse.json]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

SDIST = "llama-cpp-python==0.3.36"

# ggml type names whose ref quantizer/dequantizer the driver calls, by matrix shape.
# 2816-wide rows hold 256-value super-blocks; 704-wide rows do not, and the
# K-types fall back to these 32-block types there (Q2_K/Q3_K->Q4_0, Q4_K->Q5_0,
# Q5_K->Q5_1, Q6_K->Q8_0).
K_TYPES = ["q2_K", "q3_K", "q4_K", "q5_K", "q6_K"]
FALLBACK_TYPES = ["q4_0", "q5_0", "q5_1", "q8_0"]
BLOCK_BYTES = {"q2_K": (256, 84), "q3_K": (256, 110), "q4_K": (256, 144), "q5_K": (256, 176),
               "q6_K": (256, 210), "q4_0": (32, 18), "q5_0": (32, 22), "q5_1": (32, 24), "q8_0": (32, 34)}


def test_matrices() -> dict[str, np.ndarray]:
    """The seeded matrices, weight-like scale (sigma 0.02). tests/test_quant.py builds the same."""
    gauss = np.random.default_rng(20240601).standard_normal((704, 2816)).astype(np.float32) * np.float32(0.02)
    student = (np.random.default_rng(20240602).standard_t(4, (704, 2816)) * 0.02).astype(np.float32)
    return {
        "gauss_704x2816": gauss,
        "student4_704x2816": student,
        "gauss_2816x704": gauss.reshape(2816, 704),
        "student4_2816x704": student.reshape(2816, 704),
    }


DRIVER = r"""
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

/* ggml-quants.o needs these from ggml.c; the ref paths never reach them. */
void ggml_abort(const char *file, int line, const char *fmt, ...) { fprintf(stderr, "abort %s:%d\n", file, line); exit(3); }
size_t ggml_row_size(int type, int64_t ne) { (void)type; (void)ne; exit(4); }
const char *ggml_type_name(int type) { (void)type; return "?"; }
size_t ggml_type_size(int type) { (void)type; exit(5); }

#define DECL(T) void quantize_row_##T##_ref(const float *, void *, int64_t); \
                void dequantize_row_##T(const void *, float *, int64_t);
DECL(q2_K) DECL(q3_K) DECL(q4_K) DECL(q5_K) DECL(q6_K) DECL(q4_0) DECL(q5_0) DECL(q5_1) DECL(q8_0)

typedef struct { const char *name; void (*q)(const float *, void *, int64_t); void (*dq)(const void *, float *, int64_t); } ent;
#define E(T) {#T, quantize_row_##T##_ref, dequantize_row_##T}
static const ent TYPES[] = {E(q2_K), E(q3_K), E(q4_K), E(q5_K), E(q6_K), E(q4_0), E(q5_0), E(q5_1), E(q8_0)};

int main(int argc, char **argv) {
    /* argv: file nrows ncols type row_bytes */
    FILE *f = fopen(argv[1], "rb");
    int64_t nr = atoll(argv[2]), nc = atoll(argv[3]), rb = atoll(argv[5]);
    float *x = malloc(sizeof(float) * nr * nc), *y = malloc(sizeof(float) * nc);
    unsigned char *q = malloc(rb * nr);
    if (fread(x, sizeof(float), nr * nc, f) != (size_t)(nr * nc)) return 2;
    const ent *t = NULL;
    for (size_t i = 0; i < sizeof(TYPES) / sizeof(TYPES[0]); i++)
        if (!strcmp(TYPES[i].name, argv[4])) t = &TYPES[i];
    if (!t) return 6;
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (int64_t r = 0; r < nr; r++) t->q(x + r * nc, q + r * rb, nc);
    clock_gettime(CLOCK_MONOTONIC, &b);
    double err = 0;
    for (int64_t r = 0; r < nr; r++) {
        t->dq(q + r * rb, y, nc);
        for (int64_t i = 0; i < nc; i++) { double e = (double)y[i] - x[r * nc + i]; err += e * e; }
    }
    double secs = (b.tv_sec - a.tv_sec) + 1e-9 * (b.tv_nsec - a.tv_nsec);
    printf("%.9e %.6e\n", sqrt(err / (double)(nr * nc)), (double)(nr * nc) / secs);
    return 0;
}
"""


def fetch_ggml_src(tmp: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                    "-d", str(tmp), SDIST], check=True)
    sdist = next(tmp.glob("llama_cpp_python-*.tar.gz"))
    with tarfile.open(sdist) as tf:
        tf.extractall(tmp, filter="data")
    return next(tmp.glob("llama_cpp_python-*/vendor/llama.cpp/ggml/src"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ggml-src", type=Path, help="an unpacked llama.cpp ggml/src directory (skips the download)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "tests/fixtures/ggml_rmse.json")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        src = args.ggml_src or fetch_ggml_src(tmp)
        (tmp / "driver.c").write_text(DRIVER.replace("#include <time.h>", "#include <time.h>\n#include <string.h>"))
        exe = tmp / "driver"
        # -std=c11 keeps floating-point contraction off, so the numbers do not depend on the CPU.
        subprocess.run(["gcc", "-std=c11", "-D_POSIX_C_SOURCE=200809L", "-O2", "-I", str(src), "-I", str(src / "../include"),
                        str(src / "ggml-quants.c"), str(tmp / "driver.c"), "-lm", "-o", str(exe)], check=True)

        result: dict = {"source": SDIST, "matrices": {}, "rmse": {}}
        for name, m in test_matrices().items():
            result["matrices"][name] = hashlib.sha256(m.tobytes()).hexdigest()
            path = tmp / f"{name}.bin"
            m.tofile(path)
            types = K_TYPES if m.shape[1] % 256 == 0 else FALLBACK_TYPES
            for t in types:
                bs, ts = BLOCK_BYTES[t]
                out = subprocess.run([str(exe), str(path), str(m.shape[0]), str(m.shape[1]), t, str(m.shape[1] // bs * ts)],
                                     check=True, capture_output=True, text=True).stdout.split()
                rmse, speed = float(out[0]), float(out[1])
                result["rmse"].setdefault(name, {})[t.upper()] = rmse
                print(f"{name:20s} {t.upper():5s} rmse {rmse:.6e}  ggml ref {speed / 1e6:6.1f} M values/s")
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
