"""Conversion throughput and peak memory on a synthetic checkpoint with the real model's layer shapes.

    python scripts/bench_convert.py [--dir DIR] [--dtype F16|BF16] [--layers 1] [--type Q4_K_M] [--threads 2]

Writes (once) a random checkpoint with real-sized tensors (hidden 2816, 128 experts of width 704, so
experts.gate_up_proj is [128, 1408, 2816]), converts it, and prints MiB/s of source input, the ratio against
llama-quantize's measured 79 MiB/s (1.92 GiB F16 → Q4_K_M in 25 s, 2 threads, this machine class), and the
peak RssAnon sampled every 20 ms against the budget of 1.5 GB + the largest source tensor.
"""
from __future__ import annotations

import argparse
import json
import shutil
import struct
import threading
import time
from pathlib import Path

import numpy as np

FIXTURE_TOKENIZER = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "pr24423-tiny" / "hf"
LLAMA_QUANTIZE_MIBS = 79.0


def synthetic_config(layers: int, vocab: int, dtype: str) -> dict:
    full = [(i + 1) % 6 == 0 or i == layers - 1 for i in range(layers)]
    return {
        "architectures": ["DiffusionGemmaForBlockDiffusion"], "model_type": "diffusion_gemma",
        "canvas_length": 256, "dtype": dtype, "eos_token_id": [1],
        "text_config": {
            "vocab_size": vocab, "hidden_size": 2816, "intermediate_size": 2112, "moe_intermediate_size": 704,
            "num_hidden_layers": layers, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 256,
            "global_head_dim": 512, "num_global_key_value_heads": 2, "num_experts": 128, "top_k_experts": 8,
            "sliding_window": 1024, "max_position_embeddings": 262144, "rms_norm_eps": 1e-6,
            "layer_types": ["full_attention" if f else "sliding_attention" for f in full],
            "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2},
    }


def write_synthetic(out: Path, layers: int, vocab: int, dtype: str) -> None:
    """Random weights streamed straight into one safetensors file (no torch, bounded memory)."""
    from dgguf.convert.checkpoint import read_config
    from dgguf.convert.tensor_names import expected_shapes

    out.mkdir(parents=True, exist_ok=True)
    cfg_json = synthetic_config(layers, vocab, {"F16": "float16", "BF16": "bfloat16"}[dtype])
    (out / "config.json").write_text(json.dumps(cfg_json))
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(FIXTURE_TOKENIZER / f, out / f)
    cfg, _ = read_config(out)
    shapes = expected_shapes(cfg)
    header, offset = {}, 0
    for name, shape in shapes.items():
        n = int(np.prod(shape)) * 2
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    hjson = json.dumps(header).encode()
    hjson += b" " * (-len(hjson) % 8)
    rng = np.random.default_rng(0)
    with open(out / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(hjson)) + hjson)
        for name, shape in shapes.items():
            n = int(np.prod(shape))
            for s in range(0, n, 1 << 24):
                x = rng.standard_normal(min(n - s, 1 << 24), dtype=np.float32) * 0.02
                if len(shape) == 1:
                    x += 1.0
                if dtype == "F16":
                    f.write(x.astype(np.float16).tobytes())
                else:
                    f.write((x.view(np.uint32) >> 16).astype(np.uint16).tobytes())


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
    from dgguf.convert.native import cpu_features
    from dgguf.convert.quantize import convert_checkpoint

    src = a.dir / f"synthetic-{a.dtype}-{a.layers}L"
    if not (src / "model.safetensors").exists():
        print(f"writing synthetic checkpoint to {src} ...")
        write_synthetic(src, a.layers, a.vocab, a.dtype)
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
