"""Matmul kernel throughput per stored type and column (token) count, against baselines in the same run.

    python scripts/bench_kernels.py [--threads 2] [--rows 2816] [--k 2816] [--repeats 5]

For each type: GOP/s (2 x rows x K x columns per second) of dgguf's active kernel and of the plain reference,
and the ratio to numpy's float32 GEMM (BLAS) on the same shape with the weights already in float32, and to numpy
GEMM on 2048^3 (a practical float32 figure for this machine; the FMA peak of this machine class, ~525 GFLOP/s on
2 cores, is higher: numpy's OpenBLAS runs below it here). Best of N; warns when the load average shows foreign
load.
"""
from __future__ import annotations

import argparse

import numpy as np

from dgguf.runtime.bench import best_of, load_note
from dgguf.convert import native
from dgguf.convert.quant_types import TENSOR_TYPES

TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q5_0", "Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K"]
COLUMNS = [16, 32, 256]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, default=2816)
    ap.add_argument("--k", type=int, default=2816)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    print(f"cpu {native.cpu_features()}; kernel {native.matmul_kernel()}; threads {a.threads}; {load_note()}")
    rng = np.random.default_rng(0)
    big = rng.standard_normal((2048, 2048)).astype(np.float32)
    peak = 2 * 2048 ** 3 / best_of(lambda: big @ big, a.repeats) / 1e9
    print(f"numpy GEMM 2048^3: {peak:.0f} GFLOP/s")
    w = rng.standard_normal((a.rows, a.k)).astype(np.float32)
    fast = native.matmul_kernel()
    print(f"{'type':>5} {'cols':>5} {'dgguf GOP/s':>12} {'reference':>10} {'numpy same shape':>17} "
          f"{'vs numpy':>9} {'vs 2048^3':>9}")
    for name in TYPES:
        t = TENSOR_TYPES[name]
        raw = native.quantize_rows(w, t.ggml)
        wf = native.dequantize_rows(raw, t.ggml, a.k)
        for cols in COLUMNS:
            x = rng.standard_normal((cols, a.k)).astype(np.float32)
            ops = 2 * a.rows * a.k * cols / 1e9
            native.set_matmul_kernel(fast)
            ours = ops / best_of(lambda: native.matmul(raw, t.ggml, (a.rows, a.k), x, a.threads), a.repeats)
            native.set_matmul_kernel("reference")
            ref = ops / best_of(lambda: native.matmul(raw, t.ggml, (a.rows, a.k), x, a.threads), a.repeats // 2)
            native.set_matmul_kernel(fast)
            blas = ops / best_of(lambda: x @ wf.T, a.repeats)
            print(f"{name:>5} {cols:>5} {ours:>12.1f} {ref:>10.1f} {blas:>17.1f} {ours / blas:>9.2f} "
                  f"{ours / peak:>9.2f}")


if __name__ == "__main__":
    main()
