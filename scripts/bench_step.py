"""Seconds per denoising step: dgguf's native runtime against transformers, same checkpoint, same threads.

    python scripts/bench_step.py [--dir DIR] [--threads 2] [--types F32,Q8_0,Q4_K_M] [--repeats 3]

The model is a random DiffusionGemma of the mid-size shape the CPU-speed issue names (236M parameters: hidden
1024, 6 layers [5 sliding + 1 full], 16 heads, 32 experts top-4 of width 256, dense 768, vocab 32768, canvas
256). After a 23-token prompt, two figures per file, best of N:
  decoder step:   one decoder pass over a full canvas with self-conditioning (cache.decode);
  denoise step:   a canvas generated with 16 forced steps, per step: the decoder pass plus the sampler, the
                  self-conditioning hand-off and the draws (the issue's "sampler included" figure).
Tokens/s is for 16 forced steps per canvas: C / (16 x denoise step + one canvas encode). transformers runs the
same step (model(input_ids, decoder_input_ids, self_conditioning_logits)) in fp32 and bf16 on the same threads,
and its backbone alone in fp32 (DiffusionGemmaModel: prompt encode and canvas decoder layers, no
self-conditioning, no head). Each file is timed under the default matmul kernel (int8 activations where the CPU
has an int8 kernel) and under the best float-activation kernel, in the same run.

What limits a step: the machine's peaks are measured first, on the same threads (runtime/bench.py
measured_peaks), and each decoder step is set against its floor, the time its multiply-adds would take at those
peaks (runtime/bench.py step_floor: each part at the peak of the instructions that run it). The one-token
encode's GB/s is set against the DRAM read peak (weights that stay in the last-level cache can pass it).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from dgguf.runtime.bench import (best_of, denoise_step, floor_note, load_note, measured_peaks, one_token_bytes,
                                 peaks_note, step_floor, step_macs_by_part)
from synthetic import text_config, write_checkpoint

STEPS = 16
PROMPT_LEN = 23


def mid_shape() -> dict:
    return text_config(vocab=32768, hidden=1024, dense=768, expert=256, layers=6, heads=16, kv=4, head_dim=128,
                       global_kv=1, global_head_dim=256, experts=32, top_k=4, window=1024)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/dgguf-bench"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--types", default="F32,Q8_0,Q4_K_M")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()

    import torch
    from transformers import DiffusionGemmaForBlockDiffusion

    from dgguf.core import native
    from dgguf.format.gguf_file import read_gguf
    from dgguf.convert.quantize import convert_checkpoint
    from dgguf.runtime import Model

    torch.set_num_threads(a.threads)
    src = a.dir / "mid-F32"
    if not (src / "model.safetensors").exists():
        write_checkpoint(src, mid_shape(), "F32")
    rng = np.random.default_rng(0)
    prompt = rng.integers(3, 512, PROMPT_LEN).astype(np.int32)
    print(f"before timing: {load_note()}")
    peaks = measured_peaks(a.threads)
    print(f"{peaks_note(peaks)} ({a.threads} threads, {native.matmul_kernel()} kernel)")

    ref = DiffusionGemmaForBlockDiffusion.from_pretrained(src, dtype=torch.float32).eval()
    C, V = ref.config.canvas_length, ref.config.text_config.vocab_size
    canvas = rng.integers(0, V, C).astype(np.int32)
    sc = (rng.standard_normal((C, V)) * 2).astype(np.float32)
    logits = np.empty_like(sc)   # decoder steps write here, as generation does: no fresh pages in the timing
    ids_t, canvas_t, sc_t = (torch.from_numpy(prompt.astype(np.int64))[None],
                             torch.from_numpy(canvas.astype(np.int64))[None], torch.from_numpy(sc)[None])
    ref_times = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        model = ref.to(dtype)
        with torch.inference_mode():
            run = lambda: model(input_ids=ids_t, decoder_input_ids=canvas_t,
                                self_conditioning_logits=sc_t.to(dtype))
            run()
            ref_times[name] = best_of(run, a.repeats)
    model = ref.to(torch.float32)
    with torch.inference_mode():
        backbone = lambda: model.model(input_ids=ids_t, decoder_input_ids=canvas_t)
        backbone()
        ref_times["backbone"] = best_of(backbone, a.repeats)
    print(f"transformers step (prompt encode + canvas decode, {a.threads} threads): "
          f"fp32 {ref_times['fp32']:.3f} s, bf16 {ref_times['bf16']:.3f} s; backbone alone fp32 "
          f"{ref_times['backbone']:.3f} s")

    default = native.matmul_kernel()
    kernels = [default, native.float_kernel()]
    for t in a.types.split(","):
        path = a.dir / f"mid-{t}.gguf"
        if not path.exists():
            convert_checkpoint(src, path, t)
        for kernel in dict.fromkeys(kernels):
            native.set_matmul_kernel(kernel)
            m = Model.load(path, threads=a.threads)
            cache = m.native.new_cache(PROMPT_LEN + C)

            def encode(c, ids):   # from an empty cache each time, so best-of leaves out the first call's page faults
                c.truncate(0)
                c.encode(ids)
            enc = best_of(lambda: encode(cache, prompt), a.repeats)
            step = best_of(lambda: cache.decode(canvas, sc, out=logits), a.repeats)
            denoise = min(denoise_step(m, prompt, STEPS) for _ in range(a.repeats))
            fresh = m.native.new_cache(C)
            canvas_encode = best_of(lambda: encode(fresh, canvas), a.repeats)
            tok_s = C / (STEPS * denoise + canvas_encode)
            one = m.native.new_cache(PROMPT_LEN + 1)
            one.encode(prompt)

            def one_token():
                one.truncate(PROMPT_LEN)
                one.encode(prompt[:1])
            token = best_of(one_token, 4 * a.repeats)
            weights = one_token_bytes(read_gguf(path), m.config)
            parts = step_macs_by_part(m.config, C, PROMPT_LEN)
            gops = 2 * sum(parts.values()) / step / 1e9
            floor = step_floor(m.gguf, parts, peaks)
            gbs = weights / token / 1e9
            print(f"dgguf {t:>7} {kernel:>15}: decoder step {step:.3f} s ({gops:.0f} GOP/s effective), denoise step "
                  f"{denoise:.3f} s, prompt encode {enc:.3f} s, canvas encode {canvas_encode:.3f} s, {tok_s:.1f} "
                  f"tok/s at {STEPS} steps; denoise step vs transformers fp32 {ref_times['fp32'] / denoise:.2f}x, "
                  f"bf16 {ref_times['bf16'] / denoise:.2f}x, fp32 backbone {ref_times['backbone'] / denoise:.2f}x "
                  f"(>1: dgguf faster); one-token encode {token * 1e3:.2f} ms, {gbs:.1f} GB/s of the "
                  f"{weights / 1e6:.1f} MB of weights it reads ({gbs / peaks['read']:.2f} of the DRAM read peak)")
            if floor:
                print(f"    {floor_note(floor, step)}")
            m.close()
            if kernel == default and a.threads > 1:
                m1 = Model.load(path, threads=1)
                c1 = m1.native.new_cache(PROMPT_LEN + C)
                c1.encode(prompt)
                step1 = best_of(lambda: c1.decode(canvas, sc, out=logits), a.repeats)
                print(f"    decoder step on 1 thread {step1:.3f} s: {step1 / step:.2f}x speed-up on {a.threads}")
                m1.close()
    native.set_matmul_kernel(default)
    print(f"after timing: {load_note()}")


if __name__ == "__main__":
    main()
