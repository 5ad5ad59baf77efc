"""`--target-size SIZE`: per-tensor types from the presets' ladder so that the file fits SIZE with the least
predicted loss.

A tensor's predicted loss in a type is the error that type's quantization (with the importance matrix, when there
is one) puts into the tensor's outputs, relative to the outputs themselves: sum over rows and columns of
importance * (w - q(w))^2 over sum of importance * w^2, the importance of a column being the mean squared input it
meets (1 without an importance matrix), and the rows of an expert weighted by how many inputs that expert met.
The token embedding, which is also looked up row by row, adds its plain relative error. Summed over tensors this
is the relative output noise of every matmul: each lands in a residual stream that is normalised before it is
read, so relative noise is what the next layer sees. Large tensors are measured on evenly spaced samples of rows.

The choice is a knapsack over the ladder, solved greedily on each tensor's lower convex hull of (bytes, loss):
every tensor starts in its cheapest type, and the upgrade that removes the most loss per byte is taken while it
fits.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Callable

import numpy as np

from dgguf.core import native
from dgguf.core.errors import DggufError
from dgguf.core.imatrix import encode_imatrix
from dgguf.format.gguf_file import _align
from dgguf.format.quant_types import TensorType

from .presets import _fit

LADDER = ("Q2_K", "Q3_K", "IQ4_XS", "Q4_K", "Q5_K", "Q6_K", "Q8_0")
# Tensors that keep the preset's type: the tied embedding is the output head, whose error lands on the logits
# undiluted by the residual stream (the relative-error sum undervalues it; on models/small, letting it go to IQ4_XS
# doubled the kl at Q3_K_M's size).
KEEP_PRESET = ("token_embd.weight",)
SAMPLE_ROWS = 2048        # rows measured per tensor at most, in runs of RUN consecutive rows
RUN = 16


@dataclass
class Candidate:
    """A quantizable tensor: its name, shape, rows (nrows, read_rows(r0, r1) -> float32), importance per matrix
    ([n_mat, ne0] or None) and the input rows each matrix met (or None: equal use)."""
    name: str
    ne: tuple[int, ...]
    nrows: int
    read_rows: Callable[[int, int], np.ndarray]
    importance: np.ndarray | None = None
    use: np.ndarray | None = None


@dataclass
class Choice:
    name: str
    type: TensorType
    nbytes: int
    loss: float
    options: list[tuple[str, int, float]]   # (type, bytes, loss) measured


def _sample_starts(nrows: int) -> list[int]:
    if nrows <= SAMPLE_ROWS:
        return [0]
    n = SAMPLE_ROWS // RUN
    return sorted({int(s) for s in np.linspace(0, nrows - RUN, n)})


def measure(c: Candidate, types: list[TensorType]) -> list[tuple[TensorType, float]]:
    """Predicted loss of each type for candidate c (module docstring)."""
    ne0 = c.ne[0]
    n_mat = c.ne[2] if len(c.ne) == 3 else 1
    per_mat = c.nrows // n_mat
    use = np.ones(n_mat) if c.use is None else np.asarray(c.use, dtype=np.float64)
    use = use / use.sum() * n_mat if use.sum() > 0 else np.ones(n_mat)
    errs = np.zeros(len(types))
    plain = np.zeros(len(types))
    signal = plain_signal = 0.0
    for s in _sample_starts(c.nrows):
        r1 = c.nrows if c.nrows <= SAMPLE_ROWS else s + RUN
        x = np.ascontiguousarray(c.read_rows(s, r1), dtype=np.float32)
        mats = np.arange(s, r1) // per_mat
        for e in np.unique(mats):
            xe = x[mats == e]
            imp = None if c.importance is None else np.ascontiguousarray(c.importance[e], dtype=np.float32)
            col = np.ones(ne0) if imp is None else imp.astype(np.float64)
            signal += use[e] * float((xe.astype(np.float64) ** 2 @ col).sum())
            plain_signal += float((xe.astype(np.float64) ** 2).sum())
            for i, t in enumerate(types):
                q = encode_imatrix(xe, t.ggml, imp)
                d = (native.dequantize_rows(q, t.ggml, ne0) - xe).astype(np.float64) ** 2
                errs[i] += use[e] * float((d @ col).sum())
                plain[i] += float(d.sum())
    loss = errs / max(signal, 1e-300)
    if c.name == "token_embd.weight":      # also looked up row by row (input and self-conditioning embeddings)
        loss = loss + plain / max(plain_signal, 1e-300)
    return list(zip(types, loss.tolist()))


def ladder_types(ne0: int) -> list[TensorType]:
    out, seen = [], set()
    for name in LADDER:
        t = _fit(name, ne0)
        if t.ggml not in seen and t.name not in ("F16", "F32"):
            seen.add(t.ggml)
            out.append(t)
    return out


def choose(candidates: list[Candidate], budget: int, progress: Callable[[str], None] | None = None) -> list[Choice]:
    """Types for the candidates whose tensor data (each tensor padded to the GGUF alignment) fits `budget` bytes
    with the least total predicted loss."""
    opts = []
    for c in candidates:
        if progress:
            progress(c.name)
        nvalues = int(np.prod(c.ne))
        measured = [(t, _align(t.nbytes(nvalues)), loss) for t, loss in measure(c, ladder_types(c.ne[0]))]
        measured.sort(key=lambda o: (o[1], o[2]))
        hull: list[tuple[TensorType, int, float]] = []
        for o in measured:                  # lower convex hull of (bytes, loss), loss strictly falling
            if hull and o[2] >= hull[-1][2]:
                continue
            while len(hull) >= 2:
                (_, b1, l1), (_, b2, l2) = hull[-2], hull[-1]
                if (l1 - l2) * (o[1] - b2) <= (l2 - o[2]) * (b2 - b1):   # hull[-1] lies above the chord
                    hull.pop()
                else:
                    break
            hull.append(o)
        opts.append((measured, hull))
    at = [0] * len(candidates)
    used = sum(h[0][1] for _, h in opts)
    if used > budget:
        raise DggufError(f"the target size leaves {budget:,} bytes for the quantized tensors; the smallest types of "
                         f"the ladder ({', '.join(LADDER)}) need {used:,}")
    heap = []

    def push(i):
        h = opts[i][1]
        if at[i] + 1 < len(h):
            (_, b0, l0), (_, b1, l1) = h[at[i]], h[at[i] + 1]
            heapq.heappush(heap, (-(l0 - l1) / (b1 - b0), i))

    for i in range(len(candidates)):
        push(i)
    while heap:
        _, i = heapq.heappop(heap)
        h = opts[i][1]
        step = h[at[i] + 1][1] - h[at[i]][1]
        if used + step <= budget:
            used += step
            at[i] += 1
            push(i)
    out = []
    for c, (measured, hull), k in zip(candidates, opts, at):
        t, b, loss = hull[k]
        out.append(Choice(c.name, t, b, loss, [(m[0].name, m[1], m[2]) for m in measured]))
    return out


def describe(choices: list[Choice], fixed_bytes: int, target: int) -> list[str]:
    """The chosen mix: per type, how many tensors and bytes; then each tensor's type and predicted loss."""
    lines = []
    by_type: dict[str, list[Choice]] = {}
    for ch in choices:
        by_type.setdefault(ch.type.name, []).append(ch)
    total = fixed_bytes + sum(ch.nbytes for ch in choices)
    lines.append(f"target size {target:,} bytes: chose {total:,} bytes ({total / 2**20:.2f} MiB), predicted loss "
                 f"{sum(ch.loss for ch in choices):.4g} (sum of relative output errors)")
    for name in sorted(by_type, key=lambda n: LADDER.index(n) if n in LADDER else len(LADDER)):
        chs = by_type[name]
        lines.append(f"  {name:<7} {len(chs):>4} tensors {sum(c.nbytes for c in chs):>14,} bytes")
    for ch in choices:
        lines.append(f"  {ch.name:<44} {ch.type.name:<7} loss {ch.loss:.3e}")
    return lines
