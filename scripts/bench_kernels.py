"""Matmul throughput per stored type and column (token) count: float activations against int8 activations, and
both against numpy in the same run.

    python scripts/bench_kernels.py [--threads 2] [--rows 2816] [--k 2816] [--columns 16,32,64,256] [--repeats 5]

For each type and column count: GOP/s (2 x rows x K x columns per second) of the best float-activation kernel
(weights dequantized per row block, float tiles) and of the best int8 kernel (activations rounded to int8 per 32
values, integer dot products; quantized types only), their ratio, the ratio of the int8 figure to numpy's float32
GEMM (BLAS) on the same shape with the weights already in float32, and the fraction of this machine class's peaks
(2 cores: INT8 VNNI ~2,090 GOP/s, FP32 FMA ~525 GFLOP/s; measured on a quiet machine, so foreign load lowers the
fractions, not the ratios). Best of N; prints the load average.
"""
from __future__ import annotations

import argparse

import numpy as np

from dgguf.runtime.bench import best_of, load_note
from dgguf.convert import native
from dgguf.convert.quant_types import TENSOR_TYPES

TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K"]
INT8_PEAK, FP32_PEAK = 2090.0, 525.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, default=2816)
    ap.add_argument("--k", type=int, default=2816)
    ap.add_argument("--columns", default="16,32,64,256")
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    kernels = native.matmul_kernels()
    float_k = [k for k in kernels if not k.startswith("int8")][-1]
    int8_k = [k for k in kernels if k.startswith("int8")][-1]
    print(f"cpu {native.cpu_features()}; float kernel {float_k}, int8 kernel {int8_k}; threads {a.threads}; "
          f"{a.rows}x{a.k}; {load_note()}")
    rng = np.random.default_rng(0)
    w = rng.standard_normal((a.rows, a.k)).astype(np.float32)
    before = native.matmul_kernel()
    print(f"{'type':>5} {'cols':>5} {'float GOP/s':>12} {'int8 GOP/s':>11} {'int8/float':>11} {'int8/numpy':>11} "
          f"{'of INT8 peak':>13} {'float of FP32 peak':>19}")
    try:
        for name in a.types.split(","):
            t = TENSOR_TYPES[name]
            raw = native.quantize_rows(w, t.ggml)
            wf = native.dequantize_rows(raw, t.ggml, a.k)
            for cols in (int(c) for c in a.columns.split(",")):
                x = rng.standard_normal((cols, a.k)).astype(np.float32)
                ops = 2 * a.rows * a.k * cols / 1e9
                run = lambda: native.matmul(raw, t.ggml, (a.rows, a.k), x, a.threads)
                native.set_matmul_kernel(float_k)
                fl = ops / best_of(run, a.repeats)
                native.set_matmul_kernel(int8_k)
                i8 = ops / best_of(run, a.repeats)
                blas = ops / best_of(lambda: x @ wf.T, a.repeats)
                quantized = name not in ("F32", "F16", "BF16")
                int8_cells = (f"{i8:>11.1f} {i8 / fl:>11.2f} {i8 / blas:>11.2f} {i8 / INT8_PEAK:>13.3f}" if quantized
                              else f"{'-':>11} {'-':>11} {'-':>11} {'-':>13}")
                print(f"{name:>5} {cols:>5} {fl:>12.1f} {int8_cells} {fl / FP32_PEAK:>19.3f}", flush=True)
    finally:
        native.set_matmul_kernel(before)
    print(f"after: {load_note()}")


if __name__ == "__main__":
    main()
