"""`dgguf bench`: a decoder step and the encoder passes of a GGUF, against this machine's peaks."""
from __future__ import annotations

import json
import sys
import time

from dgguf.core.native import MAX_THREADS

from .args import positive


def run(a) -> None:
    import numpy as np

    from dgguf.runtime.bench import (best_of, denoise_step, drop_file_cache, floor_note, foreign_load,
                                     measured_peaks, part_seconds, peaks_note, rss_anon, step_floor,
                                     step_macs_by_part)
    from dgguf.runtime.model import Model

    def first_step() -> float:
        """Load the file and run one decoder step: what a user waits for before the first step is done."""
        t = time.perf_counter()
        m = Model.load(a.model, threads=a.threads, ctx=a.prompt + 2 * 4096)
        c = m.config
        cache = m.native.new_cache(a.prompt + c.canvas_length)
        cache.encode(np.zeros(a.prompt, np.int32))
        cache.decode(np.zeros(c.canvas_length, np.int32))
        m.close()
        return time.perf_counter() - t

    cold = first_step() if drop_file_cache(a.model) else None
    warm = first_step()
    m = Model.load(a.model, threads=a.threads, ctx=a.prompt + 2 * 4096)
    c = m.config
    C = c.canvas_length
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, c.vocab_size, a.prompt).astype(np.int32)
    canvas = rng.integers(0, c.vocab_size, C).astype(np.int32)
    sc = rng.standard_normal((C, c.vocab_size)).astype(np.float32)

    def best(fn):
        return best_of(fn, a.repeats)

    def encode_prompt():
        m.native.new_cache(a.prompt).encode(prompt)

    cache = m.native.new_cache(a.prompt + C)
    cache.encode(prompt)
    load = foreign_load()
    peaks = measured_peaks(m.native.threads)   # before the timing, as scripts/bench_step.py does
    logits = np.empty_like(sc)   # reused, as generation does: no fresh pages in the timing
    step = best(lambda: cache.decode(canvas, sc, out=logits))
    denoise = min(denoise_step(m, prompt, a.steps) for _ in range(a.repeats))
    enc_prompt = best(encode_prompt)
    enc_canvas = best(lambda: m.native.new_cache(C).encode(canvas))
    parts = step_macs_by_part(c, C, a.prompt)
    gops = 2 * sum(parts.values()) / step / 1e9
    floor = step_floor(m.gguf, parts, peaks)
    timed = part_seconds(m, a.repeats)
    rss = rss_anon()
    out = {"threads": m.native.threads, "canvas": C, "prompt_tokens": a.prompt, "seconds_per_step": step,
           "seconds_per_denoise_step": denoise, "seconds_prompt_encode": enc_prompt,
           "seconds_canvas_encode": enc_canvas, "step_gops": gops,
           "tokens_per_s": C / (a.steps * denoise + enc_canvas), "steps_per_canvas": a.steps,
           "foreign_load_cores": load, "peaks": peaks,
           "step_floor_seconds": sum(floor.values()) if floor else None, "step_floor_parts": floor,
           "part_seconds": timed, "seconds_first_step_cold": cold, "seconds_first_step_warm": warm,
           "rss_anon_bytes": rss}
    if a.json:
        json.dump(out, sys.stdout)
        print()
        return
    print(f"{a.model}: {m.native.threads} threads, canvas {C}, {a.prompt}-token prompt, best of {a.repeats}")
    if load is not None and load > 0.2:
        print(f"warning: other processes kept {load:.2f} cores busy before timing; the figures are low",
              file=sys.stderr)
    print(f"decoder step {step:.4f} s ({gops:.1f} GOP/s effective), denoising step with the sampler "
          f"{denoise:.4f} s ({a.steps} forced steps), prompt encode {enc_prompt:.4f} s, "
          f"canvas encode {enc_canvas:.4f} s; {out['tokens_per_s']:.1f} tok/s at {a.steps} steps per canvas")
    print(peaks_note(peaks))
    if floor:
        print(floor_note(floor, step))
    head = 2 * c.vocab_size * c.hidden_size * C
    print("over the vocabulary, each timed alone: " + ", ".join(f"{k} {v:.4f} s" for k, v in timed.items())
          + f" (the head is {head / 2 / parts['matmul']:.0%} of the matmuls' multiply-adds; the sampler runs "
          "after each decoder step)")
    print(f"first step after loading: {'-' if cold is None else f'{cold:.2f} s'} from disk (file cache dropped), "
          f"{warm:.2f} s from the page cache; anonymous memory (RssAnon, beyond the mapped file) "
          f"{'-' if rss is None else f'{rss / 2**20:.0f} MiB'}")


def add_parser(sub) -> None:
    b = sub.add_parser("bench", help="time a decoder step and the encoder passes of a GGUF")
    b.add_argument("-m", "--model", required=True)
    b.add_argument("--threads", type=positive("--threads", MAX_THREADS), default=None)
    b.add_argument("--prompt", type=positive("--prompt", 1 << 16), default=23, help="prompt tokens (random ids)")
    b.add_argument("--steps", type=positive("--steps"), default=16, help="steps per canvas for tok/s")
    b.add_argument("--repeats", type=positive("--repeats", 100), default=3)
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=run)
