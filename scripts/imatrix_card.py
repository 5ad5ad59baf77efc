"""Canvas kl of many quants against one reference in a single pass (runtime/quality.py's canvas metrics: the same
segments, noise, seeds and definitions as `dgguf eval`, so the same kl mean and top1), for the importance-matrix
comparisons of docs/benchmarks.md.

    python scripts/imatrix_card.py --ref REF.gguf --text HELDOUT --max-tokens 16384 A.gguf B.gguf ...

The reference's logits are computed once per canvas and noise level (on the float path, as `dgguf eval` does);
every quant runs on the default kernel. Prints one JSON line per file (size, bits per weight, kl mean, kl p99,
top1) and a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np


def main() -> None:
    from dgguf.runtime.model import Model
    from dgguf.runtime.quality import (NOISE_LEVELS, exact, file_stats, kl_divergence, noise_canvas, segments,
                                       top1_agreement)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("quants", nargs="+")
    ap.add_argument("--ref", required=True)
    ap.add_argument("--text", required=True)
    ap.add_argument("--max-tokens", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    ref = Model.load(a.ref, threads=a.threads)
    quants = [Model.load(q, threads=a.threads) for q in a.quants]
    C, V = ref.config.canvas_length, ref.config.vocab_size
    ids = ref.tokenizer.encode(open(a.text, encoding="utf-8").read(), bos=False)[:a.max_tokens]
    bos = ref.tokenizer.bos_id
    segment = max(C, min([ref.ctx] + [q.ctx for q in quants] + [1024]) - 1) // C * C
    kls = [[] for _ in quants]
    agree = [[] for _ in quants]
    for si, seg in enumerate(segments(ids, segment)):
        prefix = [bos] if bos is not None else seg[:1]
        body = seg if bos is not None else seg[1:]
        if not body:
            continue
        rc = ref.native.new_cache(len(prefix) + len(body))
        qcs = [q.native.new_cache(len(prefix) + len(body)) for q in quants]
        exact(rc.encode, np.asarray(prefix, dtype=np.int32))
        for qc in qcs:
            qc.encode(np.asarray(prefix, dtype=np.int32))
        for ci, start in enumerate(range(0, len(body), C)):
            clean = np.asarray(body[start:start + C], dtype=np.int32)
            for li, t in enumerate(NOISE_LEVELS):
                rng = np.random.Generator(np.random.PCG64([a.seed, si, ci, li]))
                noisy = noise_canvas(clean, t, V, rng)
                lr = exact(rc.decode, noisy)
                for i, qc in enumerate(qcs):
                    lq = qc.decode(noisy)
                    kls[i].append(kl_divergence(lr, lq))
                    agree[i].append(top1_agreement(lr, lq))
            if start + C < len(body):
                exact(rc.encode, clean)
                for qc in qcs:
                    qc.encode(clean)
        print(f"segment {si}: {min(len(ids), (si + 1) * segment)} of {len(ids)} tokens", file=sys.stderr)
    rows = []
    for path, k, g in zip(a.quants, kls, agree):
        k, g = np.concatenate(k), np.concatenate(g)
        r = {"model": path, **file_stats(path), "kl_mean": float(k.mean()), "kl_p99": float(np.percentile(k, 99)),
             "top1": float(g.mean()), "positions": int(k.size)}
        rows.append(r)
        print(json.dumps(r))
    print("\n| file | size (MiB) | bits/weight | kl mean | kl p99 | top1 |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['size_bytes'] / 2**20:.2f} | {r['bits_per_weight']:.2f} | {r['kl_mean']:.3e} | "
              f"{r['kl_p99']:.3e} | {r['top1']:.4f} |")


if __name__ == "__main__":
    main()
