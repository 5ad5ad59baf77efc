"""The DiffusionGemma sampler on plain arrays: temperature schedule, entropy-bound acceptance, the denoising loop
of one canvas, and committing a canvas (EOS → pad).

It follows transformers' `generation_diffusion_gemma.py` (../shared/docs/diffusiongemma.md §7) step for step,
with two deliberate differences, both confined to cases the reference leaves to its implementation:
- Entropies are computed in float64 and rounded to float32. The reference sums in float32, which drifts by up
  to ~1e-5 relative at the real vocabulary (1.5e-4 nats near log V). A mask can only differ where that drift
  moves a partial entropy sum across the bound, or reorders two entropies on either side of it.
- Tied entropies are ranked by position (stable sort). The reference uses torch's unstable sort, whose tie
  order depends on the CPU's SIMD width and the canvas length. The two masks then accept the same number of
  positions and differ at most in which members of one tied group straddling the bound are accepted.

Randomness comes from a `draws` source rather than a global RNG, so a runtime can be replayed token for token
against the reference (whose `torch.randint` / `torch.multinomial` a test patches to return the same draws).

Numpy, plus one native call per step for the reductions over the vocabulary; the runtime needs no torch.
"""
from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from numbers import Integral, Real

import numpy as np

from dgguf.core import native
from dgguf.core.errors import DggufError

# Rows are processed in blocks of about this many elements, so the float64 work arrays stay a few MiB even
# for the real vocabulary (262144) instead of one [C, V] float64 copy.
_BLOCK_ELEMENTS = 1 << 20

# A draw source's stream is keyed by (seed, kind, canvas, step); the kind enters the key as this number.
_DRAW_KINDS = {"init": 0, "sample": 1, "noise": 2}


@dataclass(frozen=True)
class SamplerConfig:
    """Sampler hyper-parameters, named as in the reference's generation config; defaults are its defaults.

    steps:                maximum denoising steps per canvas (`max_denoising_steps`, N).
    t_min, t_max:         temperature at the (never reached) step 0 and at the first step.
    entropy_bound:        acceptance budget in nats (see `accept_mask`).
    stability_threshold:  the argmax canvas must equal each of this many previous ones to count as stable.
    confidence_threshold: the mean entropy (nats) must be below this to count as confident.

    Unlike the reference, t_min == t_max (a constant temperature) and confidence_threshold == 0 (never stop
    early) are accepted; stability_threshold 0 is not (the reference would treat every step as stable).
    """
    steps: int = 48
    t_min: float = 0.4
    t_max: float = 0.8
    entropy_bound: float = 0.1
    stability_threshold: int = 1
    confidence_threshold: float = 0.005

    def __post_init__(self):
        _require_int("steps", self.steps, minimum=1)
        _require_int("stability_threshold", self.stability_threshold, minimum=1)
        _require_real("t_min", self.t_min, positive=True)
        _require_real("t_max", self.t_max, positive=True)
        _require_real("entropy_bound", self.entropy_bound, positive=True)
        _require_real("confidence_threshold", self.confidence_threshold, positive=False)
        if self.t_min > self.t_max:
            raise DggufError(f"sampler option t_min ({self.t_min}) must not exceed t_max ({self.t_max})")


def _require_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        raise DggufError(f"sampler option {name} must be an integer >= {minimum}, got {value!r}")


def _require_real(name, value, positive):
    bound = "> 0" if positive else ">= 0"
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise DggufError(f"sampler option {name} must be a finite number {bound}, got {value!r}")
    if value < 0 or (positive and value == 0):
        raise DggufError(f"sampler option {name} must be {bound}, got {value!r}")


def temperature(step_remaining, n_steps, t_min, t_max):
    """Temperature of the step with `step_remaining` steps left (N for the first step, 1 for the last):
    t_min + (t_max - t_min) * step_remaining / n_steps, so t_max first and t_min + (t_max - t_min)/N last.

    Evaluated in float32 in the reference's operation order, because the reference computes it from an int32
    step tensor: the float64 formula differs in the last bit for some steps, and so would the scaled logits.
    """
    fraction = np.float32(step_remaining) / np.float32(n_steps)
    return np.float32(t_min) + np.float32(t_max - t_min) * fraction


def scale_logits(logits, temp):
    """Softcapped logits [C, V] divided by the temperature, in float32 (the reference's `processed_logits`)."""
    return np.asarray(logits, dtype=np.float32) / np.float32(temp)


def token_stats(scaled_logits):
    """(argmax int64[C], entropy float32[C]) of temperature-scaled logits [C, V] (finite values).

    Entropy is -sum p log p of softmax(row), in nats, computed in float64 blocks of rows as
    log Z - sum(e * z) / Z with z = row - max(row), e = exp(z), Z = sum(e). The argmax is the first maximal
    index, as torch.argmax returns.
    """
    n_rows, vocab = scaled_logits.shape
    argmax = np.empty(n_rows, dtype=np.int64)
    entropy = np.empty(n_rows, dtype=np.float32)
    block = max(1, _BLOCK_ELEMENTS // vocab)
    for start in range(0, n_rows, block):
        z = scaled_logits[start:start + block].astype(np.float64)
        argmax[start:start + block] = z.argmax(axis=1)
        z -= z.max(axis=1, keepdims=True)
        e = np.exp(z)
        total = e.sum(axis=1)
        entropy[start:start + block] = np.log(total) - np.einsum("ij,ij->i", e, z) / total
    return argmax, entropy


def accept_mask(entropy, entropy_bound):
    """Positions to accept: rank entropies ascending; a position is accepted iff the sum of the entropies ranked
    strictly before it is <= entropy_bound. The accepted set is a prefix of the ranking and never empty.

    The arithmetic is the reference's on CPU: prefix sums accumulated in float64 and rounded to float32, the
    position's own entropy subtracted in float32, compared with the bound rounded to float32. Ties rank by
    position (see the module docstring).
    """
    entropy = np.asarray(entropy, dtype=np.float32)
    order = np.argsort(entropy, kind="stable")
    ranked = entropy[order]
    before = np.cumsum(ranked, dtype=np.float64).astype(np.float32) - ranked
    accept = np.empty(entropy.shape, dtype=bool)
    accept[order] = before <= np.float32(entropy_bound)
    return accept


def entropy_bound_accept(logits, temp, entropy_bound):
    """(accept bool[C], argmax int64[C], entropy float32[C]) for softcapped logits [C, V] at temperature `temp`.

    The argmax and entropy are those of logits / temp, the distribution the step samples from.
    """
    argmax, entropy = token_stats(scale_logits(logits, temp))
    return accept_mask(entropy, entropy_bound), argmax, entropy


def inverse_cdf_sample(scaled_logits, uniforms):
    """One token per row of scaled_logits [C, V] from softmax(row), using uniforms[c] in [0, 1) for row c:
    the token whose cumulative-probability interval contains uniforms[c]. Zero-probability tokens are never
    chosen. The CDF is built per row in float64 and left unnormalised (the uniform is scaled by the total).
    """
    ids = np.empty(len(scaled_logits), dtype=np.int64)
    for c, row in enumerate(scaled_logits):
        cdf = np.cumsum(np.exp(row.astype(np.float64) - row.max()))
        # Searching the first V-1 bounds yields an index in [0, V-1] even if u * total rounds up to total.
        ids[c] = np.searchsorted(cdf[:-1], uniforms[c] * cdf[-1], side="right")
    return ids


class SeededDraws:
    """The default draw source: reproducible, and independent of call order and thread count.

    Each call seeds its own numpy Generator (PCG64) from (seed, kind, canvas_index, step), so a draw depends on
    nothing but its key:
      "init", "noise": canvas_length uniform token ids in [0, vocab_size);
      "sample":        one uniform per position, turned into a token by `inverse_cdf_sample`.
    """

    def __init__(self, seed, vocab_size, canvas_length):
        self.seed = seed
        self.vocab_size = vocab_size
        self.canvas_length = canvas_length

    def _rng(self, kind, canvas_index, step):
        return np.random.Generator(np.random.PCG64([self.seed, _DRAW_KINDS[kind], canvas_index, step]))

    def sample_uniforms(self, canvas_index, step, n):
        """The n uniforms a "sample" draw turns into tokens (denoise_canvas samples with them natively)."""
        return self._rng("sample", canvas_index, step).random(n)

    def __call__(self, kind, canvas_index, step, scaled_logits=None):
        if kind == "sample":
            return inverse_cdf_sample(scaled_logits, self.sample_uniforms(canvas_index, step, len(scaled_logits)))
        return self._rng(kind, canvas_index, step).integers(0, self.vocab_size, self.canvas_length, dtype=np.int64)


@dataclass
class CanvasResult:
    """What `denoise_canvas` returns: the argmax canvas of the last step run (the tokens to commit), the number
    of steps (decoder passes) run, and that step's per-position entropies."""
    tokens: np.ndarray
    steps: int
    entropy: np.ndarray


@dataclass
class StepReport:
    """What one denoising step decided, for observers (`denoise_canvas(on_report=...)`; a server's stream).

    step:     steps run so far in this canvas (1 on the first).
    accept:   bool[C], the positions whose sample this step kept (the entropy bound).
    argmax:   int64[C], this step's argmax canvas (what would be committed if the canvas stopped here).
    stable:   bool[C], positions whose argmax equals each of the last stability_threshold argmaxes: the
              sampler's stability rule, per position (the canvas is stable when every position is).
    pinned:   the pinned prefix's length (0 unless pin_prefix): positions [0, pinned) are final.
    tokens:   int64[C], argmax with the pinned prefix in place: the tokens committed if the canvas ended now.
    The arrays are the sampler's own: copy them to keep them past the callback.
    """
    step: int
    accept: np.ndarray
    argmax: np.ndarray
    stable: np.ndarray
    pinned: int
    tokens: np.ndarray


def denoise_canvas(canvas_logits: Callable, draws: Callable, config: SamplerConfig, canvas_index: int = 0,
                   threads: int = 1, pin_prefix: bool = False, on_report: Callable | None = None,
                   head_reuse: float = 0.0):
    """Run the denoising loop of one canvas, as the reference's inner loop does for a batch of one.

    canvas_logits(canvas_ids int64[C], sc) -> softcapped logits [C, V] float32, where sc is None on the first
        step and otherwise the previous step's temperature-scaled logits (the self-conditioning input).
    draws(kind, canvas_index, step, scaled_logits=None) -> int64[C], with step the steps remaining (N..1):
        ("init", i, N)               the random starting canvas;
        ("sample", i, s, scaled)     one token per position sampled from softmax(scaled), scaled = logits / T_s;
        ("noise", i, s)              uniform tokens for the positions not accepted at step s.
        `SeededDraws` is the default; a parity test can return the ids it feeds the reference.

    Each step s = N..1: T = temperature(s); sample y; accept by entropy bound; the next canvas keeps y where
    accepted and noise elsewhere; the argmax canvas is stable when it equals each of the last
    stability_threshold argmax canvases, confident when the mean entropy is below confidence_threshold; stop
    after a step that is both.

    The per-step reductions (scale, argmax, entropy, and the sampling itself when draws is a SeededDraws) run
    natively on `threads` threads (native/sample.c); the functions above are their reference. The scaled logits
    handed to canvas_logits (as sc) and to draws live in two buffers reused every other step: copy them to keep
    them.

    pin_prefix (off by default: the reference's behaviour) makes text final before the canvas ends, so a stream
    never has to take it back: after each step, the longest prefix of positions that are accepted, stable (per
    position, the rule above) and whose kept sample is the argmax is pinned, if longer than the pinned prefix
    so far; pinned positions are committed with the token they had when pinned, even if a later argmax differs
    there. The denoising itself (canvases, draws, stopping) is unchanged; only the committed tokens at pinned
    positions can differ from the reference's, where an argmax flips after pinning. on_report(StepReport) is
    called after each step.

    head_reuse > 0 (off by default: an approximation) recomputes the logits only of positions still settling:
    after a step, a position that was accepted, is stable and whose entropy is below head_reuse nats is settled,
    and the next step calls canvas_logits(canvas, sc, rows) with rows flagging the others, so a settled position
    keeps its previous logits (the caller's buffer keeps them).
    """
    canvas = draws("init", canvas_index, config.steps)
    # The reference starts the history at -1, which no argmax equals, so the first step is never stable.
    history = deque([np.full(len(canvas), -1, dtype=np.int64)] * config.stability_threshold,
                    maxlen=config.stability_threshold)
    sc = None
    scaled_bufs = [None, None]   # this step's scaled logits, and the previous step's (being read as sc)
    pinned = np.zeros(len(canvas), dtype=np.int64)
    n_pinned = 0
    rows = None                  # head_reuse: the positions whose logits the next step computes (None: all)
    for step in range(config.steps, 0, -1):
        logits = canvas_logits(canvas, sc, rows) if head_reuse > 0 else canvas_logits(canvas, sc)
        logits = np.ascontiguousarray(logits, dtype=np.float32)
        temp = temperature(step, config.steps, config.t_min, config.t_max)
        uniforms = draws.sample_uniforms(canvas_index, step, len(logits)) if isinstance(draws, SeededDraws) else None
        if scaled_bufs[0] is None or scaled_bufs[0].shape != logits.shape:
            scaled_bufs[0] = np.empty_like(logits)
        scaled, argmax, entropy, sampled = native.sample_step(logits, temp, uniforms, threads, out=scaled_bufs[0])
        scaled_bufs.reverse()
        if sampled is None:
            sampled = draws("sample", canvas_index, step, scaled)
        accept = accept_mask(entropy, config.entropy_bound)
        canvas = np.where(accept, sampled, draws("noise", canvas_index, step))

        stable = all(np.array_equal(argmax, past) for past in history)
        if pin_prefix or on_report is not None or head_reuse > 0:
            stable_at = np.logical_and.reduce([argmax == past for past in history])
            if head_reuse > 0:
                rows = ~(accept & stable_at & (entropy < head_reuse))
            if pin_prefix:
                final = accept & stable_at & (sampled == argmax)
                n = len(final) if final.all() else int(final.argmin())
                if n > n_pinned:
                    pinned[n_pinned:n] = argmax[n_pinned:n]
                    n_pinned = n
            if on_report is not None:
                tokens = argmax.copy()
                tokens[:n_pinned] = pinned[:n_pinned]
                on_report(StepReport(config.steps - step + 1, accept, argmax, stable_at, n_pinned, tokens))
        history.append(argmax)
        confident = entropy.mean(dtype=np.float64) < config.confidence_threshold
        sc = scaled  # float32 here; a runtime computing in bf16 hands off bf16, as the reference does
        if stable and confident:
            break
    if n_pinned:
        argmax = argmax.copy()
        argmax[:n_pinned] = pinned[:n_pinned]
    return CanvasResult(tokens=argmax, steps=config.steps - step + 1, entropy=entropy)


def commit_canvas(argmax, eos_ids, pad_id):
    """(ids, stop) for a finished canvas: with no EOS the canvas as is and stop=False; otherwise stop=True and
    every token after the first EOS becomes pad_id (the EOS itself is kept; nothing is replaced if pad_id is
    None)."""
    ids = np.array(argmax, dtype=np.int64)
    is_eos = np.isin(ids, np.asarray(eos_ids, dtype=np.int64))
    if not is_eos.any():
        return ids, False
    if pad_id is not None:
        ids[int(is_eos.argmax()) + 1:] = pad_id
    return ids, True
