"""Conversion throughput and peak memory on a synthetic checkpoint with the real model's layer shapes.

    python scripts/bench_convert.py [--dir DIR] [--dtype F16|BF16] [--layers 1] [--type Q4_K_M] [--threads 2]

Writes (once) a random checkpoint with real-sized tensors (hidden 2816, 128 experts of width 704, so
experts.gate_up_proj is [128, 1408, 2816]), converts it, and prints MiB/s of source input, the ratio against
llama-quantize's measured 79 MiB/s (1.92 GiB F16 → Q4_K_M in 25 s, 2 threads, this machine class), and the
peak RssAnon sampled every 20 ms against the budget of 1.5 GB + the largest source tensor.
"""
from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

from synthetic import text_config, write_checkpoint

LLAMA_QUANTIZE_MIBS = 79.0


def real_shape(layers: int, vocab: int) -> dict:
    """The release's layer shapes: hidden 2816, dense 2112, 128 experts of width 704 (top 8)."""
    return text_config(vocab=vocab, hidden=2816, dense=2112, expert=704, layers=layers, heads=16, kv=8,
                       head_dim=256, global_kv=2, global_head_dim=512, experts=128, top_k=8, window=1024)


class RssSampler(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.stop = 0, threading.Event()

    def run(self):
        while not self.stop.is_set():
            for line in open("/proc/self/status"):
                if line.startswith("RssAnon:"):
                    self.peak = max(self.peak, int(line.split()[1]) * 1024)
            time.sleep(0.02)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/dgguf-bench"))
    ap.add_argument("--dtype", choices=["F16", "BF16"], default="F16")
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--vocab", type=int, default=16384)
    ap.add_argument("--type", default="Q4_K_M")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()

    from dgguf.convert.checkpoint import read_tensors
    from dgguf.core.native import cpu_features
    from dgguf.convert.quantize import convert_checkpoint

    src = a.dir / f"synthetic-{a.dtype}-{a.layers}L"
    if not (src / "model.safetensors").exists():
        print(f"writing synthetic checkpoint to {src} ...")
        write_checkpoint(src, real_shape(a.layers, a.vocab), a.dtype)
    tensors = read_tensors(src)
    total = sum(t.nbytes for t in tensors.values())
    largest = max(t.nbytes for t in tensors.values())
    out = a.dir / f"out-{a.type}.gguf"
    sampler = RssSampler()
    base_rss = 0
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            base_rss = int(line.split()[1]) * 1024
    sampler.start()
    t0 = time.perf_counter()
    convert_checkpoint(src, out, a.type, force=True, threads=a.threads)
    dt = time.perf_counter() - t0
    sampler.stop.set()
    sampler.join()
    mibs = total / 2**20 / dt
    budget = 1.5e9 + largest
    print(f"cpu: {cpu_features()}, threads {a.threads}")
    print(f"input: {total / 2**30:.2f} GiB {a.dtype}, largest tensor {largest / 2**30:.2f} GiB; "
          f"output {out.stat().st_size / 2**30:.2f} GiB {a.type}")
    print(f"time {dt:.1f} s, {mibs:.0f} MiB/s of input = {mibs / LLAMA_QUANTIZE_MIBS:.2f}x llama-quantize's "
          f"{LLAMA_QUANTIZE_MIBS:.0f} MiB/s (target 160 MiB/s)")
    print(f"peak RssAnon {sampler.peak / 1e9:.2f} GB (process before: {base_rss / 1e9:.2f} GB); "
          f"budget 1.5 GB + largest tensor = {budget / 1e9:.2f} GB")
    out.unlink()


if __name__ == "__main__":
    main()
