#!/usr/bin/env python3
"""Evidence that the small model (models/small, scripts/train_small.py) denoises, and its sampler calibration.

    python scripts/evaluate_small.py [--model models/small] [--threads 2] [--calibrate]

Prints, on the held-out files of the pinned corpus:
  1. held-out canvas loss (nats/token, first denoising step, no self-conditioning) per noise level for the HF
     checkpoint (transformers, fp32) and its dgguf Q8_0 / Q4_K_M conversions, beside a unigram baseline: the
     cross-entropy of the training files' token distribution (add-one smoothed) on the same clean tokens;
  2. steps per canvas with the adaptive stop on (dgguf runtime, Q8_0, the model's generation_config defaults),
     over held-out prompts: median, mean, share of canvases that ran to the maximum;
  3. the share of generated token 4-grams that occur in the training files (text resembling the corpus);
  4. a generated sample for the prompt "def ".
--calibrate also prints that table for a grid of sampler settings (what GENERATION_DEFAULTS was chosen from).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

SCRIPTS = Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPTS))

import train_small  # noqa: E402


N_PROMPTS = 16
NEW_TOKENS = 64
# Sampler settings tried by --calibrate (transformers' names; unset ones keep the file's defaults).
GRID = [
    dict(max_denoising_steps=48, t_min=0.4, t_max=0.8, entropy_bound=0.1, confidence_threshold=0.005),  # release
    dict(max_denoising_steps=32, t_min=0.4, t_max=0.8, entropy_bound=0.1, confidence_threshold=0.005),
    dict(max_denoising_steps=32, t_min=0.4, t_max=0.8, entropy_bound=0.3, confidence_threshold=0.02),
    dict(max_denoising_steps=32, t_min=0.3, t_max=0.7, entropy_bound=0.1, confidence_threshold=0.05),
    dict(max_denoising_steps=32, t_min=0.2, t_max=0.6, entropy_bound=0.1, confidence_threshold=0.02),
    dict(max_denoising_steps=32, t_min=0.2, t_max=0.6, entropy_bound=0.05, confidence_threshold=0.05),
    dict(max_denoising_steps=32, t_min=0.1, t_max=0.5, entropy_bound=0.1, confidence_threshold=0.02),  # chosen
    dict(max_denoising_steps=48, t_min=0.1, t_max=0.5, entropy_bound=0.1, confidence_threshold=0.02),
    dict(max_denoising_steps=16, t_min=0.1, t_max=0.5, entropy_bound=0.1, confidence_threshold=0.02),
]


def ngram_codes(ids: np.ndarray, vocab: int, n: int = 4) -> np.ndarray:
    """Each n-gram of `ids` as one int64 (base-vocab digits)."""
    if len(ids) < n:
        return np.zeros(0, dtype=np.int64)
    codes = np.zeros(len(ids) - n + 1, dtype=np.int64)
    for k in range(n):
        codes = codes * vocab + ids[k:len(ids) - n + 1 + k]
    return codes


class Evidence:
    def __init__(self, model_dir: Path, threads: int):
        import torch
        from tokenizers import Tokenizer

        torch.set_num_threads(threads)
        self.model_dir, self.threads = model_dir, threads
        self.spec = train_small.SMALL
        corpus = train_small.read_corpus(train_small.stdlib_root(), train_small.MANIFEST)
        self.tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self.train_files = train_small.encode_files(self.tok, corpus["train"])
        self.heldout = train_small.heldout_set(train_small.encode_files(self.tok, corpus["heldout"]), self.spec)
        stream = np.concatenate([f.numpy() for f in self.train_files])
        self.unigram = np.bincount(stream, minlength=self.spec.vocab_size) + 1.0
        self.unigram /= self.unigram.sum()
        self.train_4grams = np.unique(np.concatenate([ngram_codes(f.numpy(), self.spec.vocab_size)
                                                      for f in self.train_files]))

    def unigram_loss(self) -> float:
        clean = self.heldout[1].numpy().ravel()
        return float(-np.log(self.unigram[clean]).mean())

    def hf_loss(self) -> dict[str, float]:
        import torch
        from transformers import DiffusionGemmaForBlockDiffusion
        model = DiffusionGemmaForBlockDiffusion.from_pretrained(self.model_dir, dtype=torch.float32).eval()
        return train_small.heldout_loss(model, self.heldout)

    def gguf_loss(self, m) -> dict[str, float]:
        """The same canvases through dgguf's runtime."""
        ctx, clean, noisy = self.heldout
        out = {}
        for t, canvas in noisy.items():
            total = 0.0
            for i in range(len(ctx)):
                logits = m.canvas_logits(ctx[i].numpy(), canvas[i].numpy()).astype(np.float64)
                logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
                total += float((logz - logits[np.arange(len(logits)), clean[i].numpy()]).sum())
            out[f"{t:g}"] = total / clean.numel()
        return out

    def reference_hits(self) -> tuple[float, float]:
        """4-gram hit rates of the held-out canvases themselves and of as many tokens drawn from the unigram."""
        clean = self.heldout[1].numpy()
        real = np.concatenate([np.isin(ngram_codes(row, self.spec.vocab_size), self.train_4grams) for row in clean])
        draws = np.random.default_rng(0).choice(self.spec.vocab_size, size=clean.shape, p=self.unigram)
        drawn = np.concatenate([np.isin(ngram_codes(row, self.spec.vocab_size), self.train_4grams) for row in draws])
        return float(real.mean()), float(drawn.mean())

    def prompts(self) -> list[list[int]]:
        """<bos> + the first 32 context tokens of held-out windows."""
        return [row[:33].tolist() for row in self.heldout[0][:N_PROMPTS]]

    def sampling(self, m, **overrides) -> dict:
        steps, hits, total, distinct = [], 0, 0, []
        for seed, prompt in enumerate(self.prompts()):
            res = m.generate(prompt, max_new_tokens=NEW_TOKENS, seed=seed, **overrides)
            steps += res.stats.steps_per_canvas
            ids = np.array([i for i in res.ids if i != train_small.PAD_ID], dtype=np.int64)
            codes = ngram_codes(ids, self.spec.vocab_size)
            hits += int(np.isin(codes, self.train_4grams).sum())
            total += len(codes)
            distinct.append(len(set(ids.tolist())) / max(len(ids), 1))
        cap = m.sampler_config(**overrides).steps
        return {"median": statistics.median(steps), "mean": statistics.fmean(steps), "max": cap,
                "at_max": sum(s == cap for s in steps) / len(steps), "canvases": len(steps),
                "4gram_hits": hits / max(total, 1), "distinct": statistics.fmean(distinct)}


def fmt_losses(name: str, losses: dict[str, float]) -> str:
    return f"{name:<22}" + "".join(f"{losses[f'{t:g}']:>9.3f}" for t in train_small.EVAL_NOISE)


def fmt_sampling(s: dict) -> str:
    return (f"median {s['median']:g}, mean {s['mean']:.2f} (max {s['max']}, {s['at_max']:.0%} of {s['canvases']} "
            f"canvases at the max); 4-gram hits {s['4gram_hits']:.1%}; distinct tokens {s['distinct']:.1%}")


def evaluate(a) -> None:
    from dgguf.convert.quantize import convert_checkpoint
    from dgguf.runtime import Model

    ev = Evidence(a.model, a.threads)
    n_tokens = ev.heldout[1].numel()
    print(f"held-out canvas loss, nats/token over {n_tokens} tokens ({len(ev.heldout[0])} canvases of "
          f"{ev.spec.canvas_length} after {ev.heldout[0].shape[1]} context tokens), by noise level:")
    print(f"{'':<22}" + "".join(f"{'t=' + format(t, 'g'):>9}" for t in train_small.EVAL_NOISE))
    print(fmt_losses("unigram baseline", {f"{t:g}": ev.unigram_loss() for t in train_small.EVAL_NOISE}))
    print(fmt_losses("HF checkpoint (fp32)", ev.hf_loss()))
    with tempfile.TemporaryDirectory() as tmp:
        models = {}
        for qtype in ("Q8_0", "Q4_K_M"):
            path = convert_checkpoint(a.model, Path(tmp) / f"small-{qtype}.gguf", qtype, threads=a.threads)
            models[qtype] = Model.load(path, threads=a.threads)
            print(fmt_losses(f"dgguf {qtype}", ev.gguf_loss(models[qtype])))
        m = models["Q8_0"]
        print(f"\nsteps per canvas, adaptive stop on, {N_PROMPTS} held-out prompts x {NEW_TOKENS} tokens, "
              f"Q8_0, file defaults {m.config.sampler}:")
        print("  " + fmt_sampling(ev.sampling(m)))
        real, drawn = ev.reference_hits()
        print(f"  4-gram hits of the held-out canvases themselves {real:.1%}, of unigram draws {drawn:.1%}")
        if a.calibrate:
            print("\ncalibration (same prompts and seeds):")
            for overrides in GRID:
                print(f"  {overrides}\n      {fmt_sampling(ev.sampling(m, **overrides))}")
        res = m.generate(m.tokenizer.encode("def "), max_new_tokens=NEW_TOKENS, seed=0)
        print(f"\nsample (prompt 'def ', seed 0, Q8_0, steps per canvas {res.stats.steps_per_canvas}):")
        print("def " + m.tokenizer.decode(res.ids))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=SCRIPTS.parent / "models" / "small")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--calibrate", action="store_true", help="also print the sampler-settings table")
    return train_small.user_errors(evaluate, p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
