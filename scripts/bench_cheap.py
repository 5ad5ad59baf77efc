"""The cheaper steps (--sc-top-k, --head-reuse): what each costs in agreement, and what it saves per canvas.

    python scripts/bench_cheap.py --small SMALL.gguf --text HELDOUT [--real REAL.gguf] [--threads 2]

Quality, on the small model (SMALL: models/small converted, e.g. to BF16): the same held-out prompts as `dgguf
eval` (runtime/quality.py), each generated with the exact path and with each option from the same seed.
`committed` is the position-wise agreement with the exact path (the eval's figure); the floor is the exact path
against itself, rerun (1.0 where the arithmetic is deterministic), and `other seed` the exact path against
itself with another seed, the agreement of two unrelated generations, for scale. `steps` is the option's mean
steps per canvas over the exact path's; `rows` the mean fraction of canvas positions whose logits a step
computes (head reuse; 1 otherwise).

Speed, on REAL (scripts/real_shape.py's file of the released shape): the decoder step with each option, best of
--repeats, on one prompt and canvas; head reuse is timed with the mean fraction of rows its quality run computed
(a random subset: the cost depends on their number). Per canvas = steps x (decoder step + sampler step), the
steps from the small model's runs, the sampler (runtime/bench.py part_seconds) timed at the real shape too; the
gain is the exact path's per-canvas time over the option's. The two models differ (random weights settle nothing),
which is why the row fractions and step counts come from the trained small model.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from dgguf.runtime import Model
from dgguf.runtime.bench import best_of, part_seconds
from dgguf.runtime.native_model import NativeCache
from dgguf.runtime.quality import held_out_prompts, position_agreement

OPTIONS = {"exact": {}, "sc-top-k 32": {"sc_top_k": 32}, "sc-top-k 64": {"sc_top_k": 64},
           "sc-top-k 128": {"sc_top_k": 128}, "sc-top-k 256": {"sc_top_k": 256},
           "head-reuse 0.001": {"head_reuse": 0.001}, "head-reuse 0.01": {"head_reuse": 0.01},
           "head-reuse 0.1": {"head_reuse": 0.1}, "sc-top-k 128 + head-reuse 0.001": {"sc_top_k": 128,
                                                                                     "head_reuse": 0.001},
           "sc-top-k 64 + head-reuse 0.01": {"sc_top_k": 64, "head_reuse": 0.01}}


class RowCounter:
    """Wraps NativeCache.decode to record the fraction of canvas rows each decoder pass computes the logits of."""

    def __init__(self):
        self.fractions: list[float] = []
        self._decode = NativeCache.decode

    def __enter__(self):
        decode, fractions = self._decode, self.fractions

        def counted(cache, ids, sc_logits=None, out=None, sc_top_k=0, head_rows=None):
            fractions.append(1.0 if head_rows is None else float(np.mean(head_rows)))
            return decode(cache, ids, sc_logits, out, sc_top_k, head_rows)
        NativeCache.decode = counted
        return self

    def __exit__(self, *exc):
        NativeCache.decode = self._decode


def quality(path: Path, text: str, threads: int, prompts: int, new_tokens: int, seed: int) -> dict:
    """Per option: committed agreement with the exact path, steps ratio, steps per canvas and rows computed."""
    m = Model.load(path, threads=threads)
    tok = m.tokenizer
    ids = held_out_prompts(tok.encode(text, bos=False), tok.bos_id, prompts, m.config.canvas_length)

    def run(opts, shift=0):
        with RowCounter() as rows:
            res = [m.generate(p, max_new_tokens=new_tokens, seed=seed + shift + i, **opts) for i, p in enumerate(ids)]
        return res, float(np.mean(rows.fractions))

    def agreement(a, b):
        return float(np.mean([position_agreement(x.ids, y.ids) for x, y in zip(a, b)]))

    def steps(res):
        return float(np.mean([s for r in res for s in r.stats.steps_per_canvas]))

    exact, _ = run({})
    out = {"floor": agreement(exact, run({})[0]), "other seed": agreement(exact, run({}, 1000)[0])}
    for name, opts in OPTIONS.items():
        res, rows = run(opts)
        out[name] = {"committed": agreement(exact, res), "steps_per_canvas": steps(res),
                     "steps_ratio": steps(res) / steps(exact), "rows": rows}
    m.close()
    return out


def speed(path: Path, threads: int, repeats: int, q: dict) -> dict:
    """Per option: the decoder step at the real shape (head reuse at its measured row fraction) and the gain per
    canvas against the exact path."""
    m = Model.load(path, threads=threads)
    c = m.config
    C, V = c.canvas_length, c.vocab_size
    rng = np.random.default_rng(0)
    cache = m.native.new_cache(23 + C)
    cache.encode(rng.integers(0, V, 23).astype(np.int32))
    canvas = rng.integers(0, V, C).astype(np.int32)
    sc = rng.standard_normal((C, V)).astype(np.float32)
    logits = np.empty_like(sc)
    cache.decode(canvas, sc, out=logits)   # the rows head reuse keeps come from a full step
    sampler = part_seconds(m, repeats)["sampler"]
    out = {"sampler": sampler}
    for name, opts in OPTIONS.items():
        rows = None
        if "head_reuse" in opts:
            rows = np.zeros(C, dtype=bool)
            rows[rng.permutation(C)[:round(q[name]["rows"] * C)]] = True
        step = best_of(lambda: cache.decode(canvas, sc, out=logits, sc_top_k=opts.get("sc_top_k", 0),
                                            head_rows=rows), repeats)
        out[name] = {"step": step, "canvas": q[name]["steps_per_canvas"] * (step + sampler)}
    for name in OPTIONS:
        out[name]["gain"] = out["exact"]["canvas"] / out[name]["canvas"]
    m.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", type=Path, required=True, help="the small model's GGUF (quality runs)")
    ap.add_argument("--text", type=Path, required=True, help="held-out text (scripts/train_small.py --write-heldout)")
    ap.add_argument("--real", type=Path, help="a GGUF of the released shape (scripts/real_shape.py; speed runs)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    a = ap.parse_args()
    q = quality(a.small, a.text.read_text(encoding="utf-8"), a.threads, a.prompts, a.new_tokens, a.seed)
    print(f"{a.small}: {a.prompts} prompts x {a.new_tokens} tokens, {a.threads} threads; exact path against itself: "
          f"{q['floor']:.3f} rerun, {q['other seed']:.3f} with another seed")
    s = speed(a.real, a.threads, a.repeats, q) if a.real else None
    if s:
        print(f"{a.real}: sampler step {s['sampler']:.3f} s; per canvas = steps x (decoder step + sampler step)")
    print(f"{'option':34} {'committed':>9} {'steps':>6} {'rows':>5}" + (f" {'s/step':>7} {'s/canvas':>8} {'gain':>5}"
                                                                       if s else ""))
    for name in OPTIONS:
        r = q[name]
        line = f"{name:34} {r['committed']:9.3f} {r['steps_ratio']:6.3f} {r['rows']:5.2f}"
        if s:
            line += f" {s[name]['step']:7.3f} {s[name]['canvas']:8.2f} {s[name]['gain']:5.2f}"
        print(line)
    if a.json:
        a.json.write_text(json.dumps({"quality": q, "speed": s}, indent=1))


if __name__ == "__main__":
    main()
