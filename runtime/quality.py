"""How far a quantized GGUF is from its reference: `dgguf eval -m QUANT.gguf --ref REF.gguf --text FILE`.

Definitions (the quality card in README is made of these):
- Canvas metrics: the held-out text is cut into segments; each segment is read canvas by canvas after its clean
  prefix (BOS first when the model has one). For every noise level t, a fraction t of the canvas positions
  (round(t·C), seeded, the same for both models) is replaced by uniform random tokens; both models denoise that
  canvas once, self-conditioning off, T = 1. Over every canvas position:
    `kl`   = KL(p_ref ‖ p_quant) of softmax(logits), mean and 99th percentile, in nats;
    `top1` = fraction of positions where both argmaxes agree.
  The clean canvas is then encoded into both KV caches, so the next canvas has the true text as context.
- Generation metrics: full generations from held-out prompts with the same seed (so the same draws):
    `committed`   = position-wise agreement of the generated ids (a position one run lacks counts as a miss);
    `steps_ratio` = mean steps per canvas of the quant over the reference (adaptive stop on).
The reference runs on the best float-activation kernel, exact for F32/F16/BF16 weights (the default kernel rounds
the activations of BF16 weights to bfloat16, as llama.cpp does); the quant runs on the default kernel, as it would
for a user.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

import numpy as np

from dgguf.core import native
from dgguf.core.errors import DggufError

NOISE_LEVELS = (0.25, 0.5, 0.75, 1.0)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64."""
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def kl_divergence(ref_logits: np.ndarray, quant_logits: np.ndarray) -> np.ndarray:
    """KL(softmax(ref) ‖ softmax(quant)) per row, in nats (float64)."""
    lr, lq = log_softmax(ref_logits), log_softmax(quant_logits)
    return np.maximum((np.exp(lr) * (lr - lq)).sum(axis=-1), 0.0)   # clamp float round-off below zero


def top1_agreement(ref_logits: np.ndarray, quant_logits: np.ndarray) -> np.ndarray:
    """Per row: do the two argmaxes agree?"""
    return np.argmax(ref_logits, axis=-1) == np.argmax(quant_logits, axis=-1)


def position_agreement(a, b) -> float:
    """Fraction of positions where two id sequences agree, over the longer one (missing positions disagree)."""
    n = max(len(a), len(b))
    if n == 0:
        return 1.0
    m = min(len(a), len(b))
    return float(np.sum(np.asarray(a[:m]) == np.asarray(b[:m]))) / n


def noise_canvas(clean: np.ndarray, t: float, vocab_size: int, rng: np.random.Generator) -> np.ndarray:
    """A copy of clean with round(t·len) positions, chosen uniformly, replaced by uniform random ids."""
    out = np.array(clean, dtype=np.int32)
    k = int(round(t * len(out)))
    pos = rng.choice(len(out), size=k, replace=False)
    out[pos] = rng.integers(0, vocab_size, size=k)
    return out


@dataclass
class NoiseLevelReport:
    t: float
    positions: int
    kl_mean: float
    kl_p99: float
    top1: float


@dataclass
class QualityReport:
    tokens: int                      # held-out tokens read (canvas positions per noise level)
    positions: int                   # canvas positions scored, all noise levels together
    kl_mean: float
    kl_p99: float
    top1: float
    committed: float
    steps_ratio: float
    ref_steps_per_canvas: float
    quant_steps_per_canvas: float
    quant_seconds_per_step: float
    by_noise: list[NoiseLevelReport] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def _check_pair(ref, quant) -> None:
    a, b = ref.config, quant.config
    for name in ("vocab_size", "canvas_length"):
        if getattr(a, name) != getattr(b, name):
            raise DggufError(f"{quant.path} and {ref.path} differ in {name} "
                             f"({getattr(b, name)} vs {getattr(a, name)}): not the same model")
    if ref.gguf.get("tokenizer.ggml.tokens") != quant.gguf.get("tokenizer.ggml.tokens"):
        raise DggufError(f"{quant.path} and {ref.path} have different vocabularies: not the same model")


def exact(fn, *args, **kwargs):
    """fn(*args, **kwargs) on the best float-activation kernel (the reference's passes; see the module docstring)."""
    before = native.matmul_kernel()
    native.set_matmul_kernel(native.float_kernel())
    try:
        return fn(*args, **kwargs)
    finally:
        native.set_matmul_kernel(before)


def segments(ids: list[int], length: int) -> list[list[int]]:
    """The token stream cut into consecutive segments of at most `length` tokens."""
    return [ids[i:i + length] for i in range(0, len(ids), length)]


def canvas_metrics(ref, quant, ids: list[int], bos: int | None, seed: int, segment: int,
                   levels=NOISE_LEVELS) -> tuple[list[NoiseLevelReport], np.ndarray, np.ndarray]:
    """Per noise level: KL and top-1 over every canvas position of ids (see the module docstring)."""
    C, V = ref.config.canvas_length, ref.config.vocab_size
    kls = {t: [] for t in levels}
    agree = {t: [] for t in levels}
    for si, seg in enumerate(segments(ids, segment)):
        prefix = [bos] if bos is not None else seg[:1]
        body = seg if bos is not None else seg[1:]
        if not body:
            continue
        rc, qc = (m.native.new_cache(len(prefix) + len(body)) for m in (ref, quant))
        exact(rc.encode, np.asarray(prefix, dtype=np.int32))
        qc.encode(np.asarray(prefix, dtype=np.int32))
        for ci, start in enumerate(range(0, len(body), C)):
            clean = np.asarray(body[start:start + C], dtype=np.int32)
            for li, t in enumerate(levels):
                rng = np.random.Generator(np.random.PCG64([seed, si, ci, li]))
                noisy = noise_canvas(clean, t, V, rng)
                lr, lq = exact(rc.decode, noisy), qc.decode(noisy)
                kls[t].append(kl_divergence(lr, lq))
                agree[t].append(top1_agreement(lr, lq))
            if start + C < len(body):
                exact(rc.encode, clean)
                qc.encode(clean)
    reports = []
    for t in levels:
        k, a = np.concatenate(kls[t]), np.concatenate(agree[t])
        reports.append(NoiseLevelReport(t=t, positions=int(k.size), kl_mean=float(k.mean()),
                                        kl_p99=float(np.percentile(k, 99)), top1=float(a.mean())))
    all_kl = np.concatenate([np.concatenate(kls[t]) for t in levels])
    all_agree = np.concatenate([np.concatenate(agree[t]) for t in levels])
    return reports, all_kl, all_agree


def held_out_prompts(ids: list[int], bos: int | None, n: int, length: int) -> list[list[int]]:
    """n prompts of `length` tokens spread evenly over a held-out text's ids, each after BOS when the model has one."""
    starts = np.linspace(0, max(0, len(ids) - length), num=n, dtype=np.int64)
    return [([bos] if bos is not None else []) + ids[s:s + length] for s in starts]


def generation_metrics(ref, quant, prompts: list[list[int]], new_tokens: int, seed: int,
                       options: dict | None = None) -> dict:
    """Full generations of both models from each prompt with the same seed: agreement and steps. options: the
    quant side's generate options (the cheaper steps, e.g. sc_top_k, head_reuse)."""
    agree, ref_steps, quant_steps, seconds = [], [], [], []
    for i, prompt in enumerate(prompts):
        r = exact(ref.generate, prompt, max_new_tokens=new_tokens, seed=seed + i)
        q = quant.generate(prompt, max_new_tokens=new_tokens, seed=seed + i, **(options or {}))
        agree.append(position_agreement(r.ids, q.ids))
        ref_steps += r.stats.steps_per_canvas
        quant_steps += q.stats.steps_per_canvas
        seconds.append(q.stats.seconds_per_step)
    return {"committed": float(np.mean(agree)), "ref_steps_per_canvas": float(np.mean(ref_steps)),
            "quant_steps_per_canvas": float(np.mean(quant_steps)),
            "steps_ratio": float(np.mean(quant_steps) / np.mean(ref_steps)),
            "quant_seconds_per_step": float(np.median(seconds))}


def evaluate(ref, quant, text: str, seed: int = 0, max_tokens: int | None = None, segment: int | None = None,
             prompts: int = 8, prompt_tokens: int | None = None, new_tokens: int | None = None,
             options: dict | None = None) -> QualityReport:
    """Compare two loaded Models (runtime.model.Model) on a held-out text; see the module docstring. options:
    generate options for the quant's generations (the cheaper steps); the canvas metrics run without them."""
    _check_pair(ref, quant)
    C = ref.config.canvas_length
    tok = ref.tokenizer
    ids = tok.encode(text, bos=False)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    bos = tok.bos_id
    segment = segment or max(C, min(ref.ctx, quant.ctx, 1024) - 1) // C * C
    if segment < C or segment + 1 > min(ref.ctx, quant.ctx):
        raise DggufError(f"segment length {segment} must be at least the canvas length {C} and fit ctx "
                         f"{min(ref.ctx, quant.ctx)}")
    if len(ids) < C + 1:
        raise DggufError(f"the text has {len(ids)} tokens; at least {C + 1} (one canvas and a context) needed")
    by_noise, all_kl, all_agree = canvas_metrics(ref, quant, ids, bos, seed, segment)
    gen = generation_metrics(ref, quant, held_out_prompts(ids, bos, prompts, prompt_tokens or C), new_tokens or 2 * C,
                             seed, options)
    return QualityReport(tokens=len(ids), positions=int(all_kl.size), kl_mean=float(all_kl.mean()),
                         kl_p99=float(np.percentile(all_kl, 99)), top1=float(all_agree.mean()),
                         by_noise=by_noise, **gen)


def file_stats(path) -> dict:
    """Size on disk (every part of a split set) and bits per weight (tensor data bits over tensor elements)."""
    from dgguf.format.gguf_file import read_gguf
    g = read_gguf(path)
    try:
        bits = sum(t.nbytes for t in g.tensors) * 8
        weights = sum(int(np.prod(t.ne)) for t in g.tensors)
        size = sum(os.path.getsize(p) for p in getattr(g, "paths", [path]))
    finally:
        g.close()
    return {"size_bytes": size, "bits_per_weight": bits / weights}
