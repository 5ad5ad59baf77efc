"""Matmul throughput per stored type and column (token) count: float activations against int8 activations, and
both against numpy in the same run.

    python scripts/bench_kernels.py [--threads 2] [--rows 2816] [--k 2816] [--columns 1,16,32,256] [--repeats 20]
    python scripts/bench_kernels.py --baseline DIR [--rounds 3] ...   # A/B of the int8 kernel against another build

For each type and column count: GOP/s (2 x rows x K x columns per second) of the best float-activation kernel
(weights dequantized per row block, float tiles) and of the best int8 kernel (activations rounded to int8 per 32
values, integer dot products; for BF16 weights, where the CPU has AVX512_BF16, activations rounded to bfloat16
against the stored words, VDPBF16PS), their ratio, the ratio of the int8 figure to numpy's float32 GEMM (BLAS) on
the same shape with the weights already in float32, GB/s of stored weights the int8 kernel streams (what bounds
one-token passes), and the fractions of this machine's peaks, measured first in the same run on the same threads
(runtime/bench.py measured_peaks: the kernels' own instructions in a loop that does nothing else, and a DRAM
read): the int8 figure of the int8 peak (BF16 rows: of the VDPBF16PS peak), the float figure of the FP32 FMA
peak. --int8-peak / --bf16-peak / --fp32-peak replace a measured peak. Best of N; prints the foreign load.

--baseline DIR times the int8 kernel of the dgguf installed in DIR (pip install --target DIR <checkout>) against
this one's: two child processes of this run, asked in turn for each type and column count (--rounds times, best
of all), so a change in foreign load hits both; prints both and their ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

from dgguf.runtime.bench import best_of, load_note, measured_peaks, peaks_note
from dgguf.core import native
from dgguf.format.quant_types import TENSOR_TYPES

TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K"]
FLOAT_TYPES = ("F32", "F16", "BF16")


def serve(a) -> None:
    """The --serve child: for each line "TYPE COLS" on stdin, the int8 kernel's best time and the weight's bytes."""
    native.set_matmul_kernel([k for k in native.matmul_kernels() if k.startswith("int8")][-1])
    w = np.random.default_rng(0).standard_normal((a.rows, a.k)).astype(np.float32)
    raw = {}
    for line in sys.stdin:
        name, cols = line.split()
        t = TENSOR_TYPES[name]
        raw.setdefault(name, native.quantize_rows(w, t.ggml))
        x = np.random.default_rng(1).standard_normal((int(cols), a.k)).astype(np.float32)
        s = best_of(lambda: native.matmul(raw[name], t.ggml, (a.rows, a.k), x, a.threads), a.repeats)
        print(json.dumps({"s": s, "bytes": raw[name].nbytes}), flush=True)


def ab(a) -> None:
    """The int8 kernel of --baseline against this checkout's: one child process each, asked in turn for every
    type and column count (--rounds times), so both see the same load."""
    args = [sys.executable, os.path.abspath(__file__), "--serve", f"--threads={a.threads}", f"--rows={a.rows}",
            f"--k={a.k}", f"--repeats={a.repeats}"]
    env = dict(os.environ, PYTHONPATH=os.path.abspath(a.baseline))
    children = {"base": subprocess.Popen(args, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True),
                "this": subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)}

    def ask(side: str, name: str, cols: int) -> dict:
        children[side].stdin.write(f"{name} {cols}\n")
        children[side].stdin.flush()
        return json.loads(children[side].stdout.readline())

    peak = a.int8_peak or measured_peaks(a.threads)["int8"]
    print(f"int8 kernel, this checkout against {a.baseline}; threads {a.threads}; {a.rows}x{a.k}; "
          f"best of {a.rounds} x {a.repeats}")
    print(f"{'type':>5} {'cols':>5} {'base GOP/s':>11} {'this GOP/s':>11} {'this/base':>10} {'base GB/s':>10} "
          f"{'this GB/s':>10} {'of INT8 peak':>13}")
    try:
        for name in (n for n in a.types.split(",") if n not in FLOAT_TYPES):
            for cols in (int(c) for c in a.columns.split(",")):
                best = {"base": float("inf"), "this": float("inf")}
                for _ in range(a.rounds):
                    for side in best:
                        r = ask(side, name, cols)
                        best[side] = min(best[side], r["s"])
                ops, b, t = 2 * a.rows * a.k * cols / 1e9, best["base"], best["this"]
                print(f"{name:>5} {cols:>5} {ops / b:>11.1f} {ops / t:>11.1f} {b / t:>10.2f} "
                      f"{r['bytes'] / b / 1e9:>10.1f} {r['bytes'] / t / 1e9:>10.1f} {ops / t / peak:>13.3f}",
                      flush=True)
    finally:
        for c in children.values():
            c.stdin.close()
            c.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, default=2816)
    ap.add_argument("--k", type=int, default=2816)
    ap.add_argument("--columns", default="1,16,32,256")
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--int8-peak", type=float, help="GOP/s (default: measured)")
    ap.add_argument("--bf16-peak", type=float, help="GFLOP/s (default: measured)")
    ap.add_argument("--fp32-peak", type=float, help="GFLOP/s (default: measured)")
    ap.add_argument("--baseline", help="a directory holding another dgguf build to A/B the int8 kernel against")
    ap.add_argument("--rounds", type=int, default=3, help="alternations of baseline and this build")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.serve:
        return serve(a)
    print(f"{load_note()}")
    if a.baseline:
        ab(a)
        print(f"after: {load_note()}")
        return
    kernels = native.matmul_kernels()
    float_k = native.float_kernel()
    int8_k = [k for k in kernels if k.startswith("int8")][-1]
    print(f"cpu {native.cpu_features()}; float kernel {float_k}, int8 kernel {int8_k}; threads {a.threads}; "
          f"{a.rows}x{a.k}")
    before = native.matmul_kernel()
    native.set_matmul_kernel(int8_k)   # the peaks of the int8 kernel's instructions
    measured = measured_peaks(a.threads)
    print(peaks_note(measured))
    peaks = {kind: getattr(a, f"{kind}_peak") or measured[kind] for kind in ("int8", "bf16", "fp32")}
    rng = np.random.default_rng(0)
    w = rng.standard_normal((a.rows, a.k)).astype(np.float32)
    print(f"{'type':>5} {'cols':>5} {'float GOP/s':>12} {'int8 GOP/s':>11} {'int8/float':>11} {'int8/numpy':>11} "
          f"{'int8 GB/s':>10} {'of its peak':>13} {'float of FP32 peak':>19}")
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
                s8 = best_of(run, a.repeats)
                i8 = ops / s8
                blas = ops / best_of(lambda: x @ wf.T, a.repeats)
                low = name not in FLOAT_TYPES or (name == "BF16" and "bf16" in int8_k)
                peak = peaks["bf16"] if name == "BF16" else peaks["int8"]
                int8_cells = (f"{i8:>11.1f} {i8 / fl:>11.2f} {i8 / blas:>11.2f} {raw.nbytes / s8 / 1e9:>10.1f} "
                              f"{i8 / peak:>13.3f}" if low else f"{'-':>11} {'-':>11} {'-':>11} {'-':>10} {'-':>13}")
                print(f"{name:>5} {cols:>5} {fl:>12.1f} {int8_cells} {fl / peaks['fp32']:>19.3f}", flush=True)
    finally:
        native.set_matmul_kernel(before)
    print(f"after: {load_note()}")


if __name__ == "__main__":
    main()
