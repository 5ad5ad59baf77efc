#!/usr/bin/env python3
"""Quantizer throughput: values/s per type on one thread, and F16 MiB/s into Q4_K with N threads.

    python scripts/bench_quant.py [--rows 704 --cols 2816 --threads 2]

The threaded figure mimics the converter: each Python thread widens its F16
row chunk to float32 and calls dg_quantize_rows on it (cffi drops the GIL).
"""
from __future__ import annotations

import argparse
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from dgguf.runtime.bench import best_of
from dgguf.core import native

TYPES = {"F16": 1, "BF16": 30, "Q8_0": 8, "Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7,
         "Q2_K": 10, "Q3_K": 11, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=704)
    ap.add_argument("--cols", type=int, default=2816)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    x = (np.random.default_rng(0).standard_normal((args.rows, args.cols)) * 0.02).astype(np.float32)
    print(f"cpu features: {native.cpu_features()}   matrix {args.rows}x{args.cols}")

    speeds = {}
    for name, t in TYPES.items():
        speeds[name] = x.size / best_of(lambda: native.quantize_rows(x, t))
    for name, v in speeds.items():
        print(f"{name:5s} quantize {v / 1e6:8.1f} M values/s   ({v / speeds['Q8_0']:.2f}x Q8_0)")

    raw = np.random.default_rng(1).integers(0, 256, (args.rows, native.row_bytes(12, args.cols)), dtype=np.uint8)
    dq = x.size / best_of(lambda: native.dequantize_rows(raw, 12, args.cols))
    print(f"Q4_K  dequantize {dq / 1e6:6.1f} M values/s")

    # F16 input -> Q4_K on N threads, row chunks as the converter hands them out
    big = np.tile(x, (8, 1)).astype(np.float16)
    chunks = np.array_split(big, 8 * args.threads)

    def work(c):
        return native.quantize_rows(c.astype(np.float32), 12)

    with ThreadPoolExecutor(args.threads) as pool:
        secs = best_of(lambda: list(pool.map(work, chunks)))
    print(f"F16 -> Q4_K with {args.threads} threads: {big.nbytes / secs / 2**20:.0f} MiB/s of F16 input")


if __name__ == "__main__":
    main()
