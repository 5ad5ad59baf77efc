"""`dgguf eval`: how far a quantized GGUF is from its reference on a held-out text."""
from __future__ import annotations

import json
import sys

from dgguf.core.native import MAX_THREADS

from .args import add_cheaper_steps, cheaper_steps, integer, positive, read_text


def run(a) -> None:
    from dgguf.runtime.model import Model
    from dgguf.runtime.quality import evaluate, file_stats
    text = read_text(a.text, "--text")
    ref = Model.load(a.ref, threads=a.threads, ctx=a.ctx)
    quant = Model.load(a.model, threads=a.threads, ctx=a.ctx)
    rep = evaluate(ref, quant, text, seed=a.seed, max_tokens=a.max_tokens, prompts=a.prompts,
                   new_tokens=a.new_tokens, options=cheaper_steps(a))
    out = {"model": a.model, "ref": a.ref, **file_stats(a.model), **rep.as_dict()}
    if a.json:
        json.dump(out, sys.stdout)
        print()
        return
    print(f"{a.model} against {a.ref}: {rep.tokens} held-out tokens, {rep.positions} canvas positions")
    print(f"size {out['size_bytes'] / 2**20:.2f} MiB, {out['bits_per_weight']:.2f} bits per weight")
    print(f"kl mean {rep.kl_mean:.3g} p99 {rep.kl_p99:.3g} nats, top1 {rep.top1:.4f}")
    for n in rep.by_noise:
        print(f"  noise {n.t:.2f}: kl mean {n.kl_mean:.3g} p99 {n.kl_p99:.3g}, top1 {n.top1:.4f}")
    print(f"committed {rep.committed:.4f}, steps_ratio {rep.steps_ratio:.3f} "
          f"({rep.quant_steps_per_canvas:.2f} / {rep.ref_steps_per_canvas:.2f} steps per canvas), "
          f"{rep.quant_seconds_per_step:.4f} s/step")


def add_parser(sub) -> None:
    e = sub.add_parser("eval", help="divergence of a quantized GGUF from its reference on a held-out text")
    e.add_argument("-m", "--model", required=True, help="the GGUF to judge")
    e.add_argument("--ref", required=True, help="the reference GGUF (same model, BF16/F32)")
    e.add_argument("--text", required=True, help="held-out UTF-8 text file")
    e.add_argument("--seed", type=integer("--seed", 0, 2**32 - 1), default=0)
    e.add_argument("--threads", type=positive("--threads", MAX_THREADS), default=None)
    e.add_argument("--ctx", type=positive("--ctx"), default=None, help="context limit (default 8192)")
    e.add_argument("--max-tokens", type=positive("--max-tokens"), default=None,
                   help="score only the first N tokens of the text")
    e.add_argument("--prompts", type=positive("--prompts", 1000), default=8, help="generations compared")
    e.add_argument("--new-tokens", type=positive("--new-tokens"), default=None,
                   help="tokens per generation (default two canvases)")
    add_cheaper_steps(e)   # applied to -m's generations
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=run)
