"""Seconds of attention per pass, blocked kernel against the per-query reference, in the same run.

    python scripts/bench_attention.py [--threads 2] [--repeats 5] [--gguf FILE]

Attention alone (dg_attention on random inputs) for the mid shape of bench_step.py (16 heads; 5 sliding layers
with 4 KV heads of 128, 1 full layer with 1 KV head of 256, window 1024), summed over the 6 layers:
  decode-23     a 256-token canvas decoded after a 23-token prompt (bench_step.py's step)
  encode-256    that canvas encoded (causal, window) after the prompt
  decode-3000   a 256-token canvas decoded after 3000 tokens of context (sliding layers hold the last 1023)
With --gguf (a mid-shape file such as /tmp/dgguf-bench/mid-Q4_K_M.gguf), also the whole decoder step of
bench_step.py under each kernel. Best of N, the kernels alternating.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from dgguf.core import native
from dgguf.runtime.bench import load_note

HEADS, WINDOW, CANVAS, PROMPT = 16, 1024, 256, 23
SLIDING, FULL = (4, 128), (1, 256)      # (kv heads, head_dim)


def layers(n, held_full, held_sliding, causal):
    """[(arrays, window, causal)] for the 6 layers of one pass."""
    rng = np.random.default_rng(0)
    out = []
    for (kv, d), held, window, count in ((SLIDING, held_sliding, WINDOW if causal else 0, 5),
                                         (FULL, held_full, 0, 1)):
        f = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
        args = (f(n, HEADS, d), f(held, kv, d), f(held, kv, d), f(n, kv, d), f(n, kv, d))
        out += [(args, window, causal)] * count
    return out


def best(fn, kernels, repeats):
    times = {k: float("inf") for k in kernels}
    for _ in range(repeats):
        for k in kernels:
            native.set_attention_kernel(k)
            t = time.perf_counter()
            fn()
            times[k] = min(times[k], time.perf_counter() - t)
    native.set_attention_kernel("blocked")
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--gguf", type=Path)
    a = ap.parse_args()
    kernels = ("per-query", "blocked")
    print(f"before timing: {load_note()}; matmul kernel {native.matmul_kernel()}, {a.threads} threads")
    passes = {"decode-23": layers(CANVAS, PROMPT, PROMPT, False),
              "encode-256": layers(CANVAS, PROMPT, PROMPT, True),
              "decode-3000": layers(CANVAS, 3000, WINDOW - 1, False)}
    for name, ls in passes.items():
        run = lambda: [native.attention(*args, window=w, causal=c, threads=a.threads) for args, w, c in ls]  # noqa: E731
        t = best(run, kernels, a.repeats)
        print(f"attention {name:12s} per-query {t['per-query']:.4f} s  blocked {t['blocked']:.4f} s  "
              f"ratio {t['per-query'] / t['blocked']:.2f}x")
    if a.gguf:
        from dgguf.runtime import Model
        m = Model.load(a.gguf, threads=a.threads)
        rng = np.random.default_rng(0)
        V = m.config.vocab_size
        canvas = rng.integers(0, V, CANVAS).astype(np.int32)
        sc = (rng.standard_normal((CANVAS, V)) * 2).astype(np.float32)
        cache = m.native.new_cache(PROMPT + CANVAS)
        cache.encode(rng.integers(3, 512, PROMPT).astype(np.int32))
        t = best(lambda: cache.decode(canvas, sc), kernels, a.repeats)
        print(f"decoder step {a.gguf.name}: per-query {t['per-query']:.4f} s  blocked {t['blocked']:.4f} s  "
              f"ratio {t['per-query'] / t['blocked']:.3f}x")
    print(f"after timing: {load_note()}")


if __name__ == "__main__":
    main()
