"""Checkpoint tensor names → GGUF tensor names and shapes, from the architecture's tensor table
(format/arch.py). Shapes are given here in PyTorch order; GGUF stores the reverse (ggml `ne`).
"""
from __future__ import annotations

import re

from dgguf.core.errors import DggufError
from dgguf.format.gguf_file import printable
from dgguf.format.arch import BY_GGUF, GLOBAL_TENSORS, LAYER_TENSORS, expected_tensors, has_tensor

from .checkpoint import TextConfig

DECODER = "model.decoder."
# Vision weights are dropped: the GGUF is text-only (diffusion-gemma.text_only).
DROPPED_PREFIXES = ("model.encoder.vision_tower.", "model.encoder.embed_vision.")
ROPE_FREQS = BY_GGUF["rope_freqs.weight"].gguf   # computed from the config, not read

# checkpoint name → GGUF name, globals by full name, layer tensors by their checkpoint pattern
GLOBAL_NAMES = {t.hf: t.gguf for t in GLOBAL_TENSORS if t.hf is not None}
_LAYER_PATTERNS = [(re.compile("^" + re.escape(t.hf).replace(r"\{i\}", r"(\d+)") + "$"), t) for t in LAYER_TENSORS]


def expected_shapes(cfg: TextConfig) -> dict[str, tuple[int, ...]]:
    """HF name → PyTorch shape (ggml ne reversed) of every text tensor the checkpoint must hold."""
    s = cfg.shape()
    ne = expected_tensors(s)
    out = {t.hf: tuple(reversed(ne[t.gguf])) for t in GLOBAL_TENSORS if t.hf is not None}
    for i in range(s.n_layers):
        out.update({t.hf.format(i=i): tuple(reversed(ne[f"blk.{i}.{t.gguf}"]))
                    for t in LAYER_TENSORS if has_tensor(t, s, i)})
    return out


def gguf_name(hf_name: str) -> str | None:
    """The GGUF name of a checkpoint tensor, or None for a dropped (vision) tensor."""
    if hf_name.startswith(DROPPED_PREFIXES):
        return None
    if hf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[hf_name]
    for pattern, t in _LAYER_PATTERNS:
        if m := pattern.match(hf_name):
            return f"blk.{m.group(1)}.{t.gguf}"
    raise DggufError(f"unexpected tensor {printable(hf_name)} (not part of DiffusionGemma)")


def _natural_key(name: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def plan_tensors(cfg: TextConfig, source_shapes: dict[str, tuple[int, ...]]) -> list[tuple[str, str]]:
    """Check the checkpoint's text tensors against the config; return (hf_name, gguf_name) in file order.

    File order is the checkpoint's name order with layers numerically sorted (decoder before encoder), as
    the published files have it; llama.cpp's per-layer type choices count tensors in this order.
    """
    expected = expected_shapes(cfg)
    present = {n: s for n, s in source_shapes.items() if gguf_name(n) is not None}
    missing = sorted(set(expected) - set(present), key=_natural_key)
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise DggufError(f"checkpoint lacks tensor {', '.join(missing[:3])}{more}")
    extra = sorted(set(present) - set(expected), key=_natural_key)
    if extra:
        raise DggufError(f"unexpected tensor {printable(extra[0])} (not part of DiffusionGemma with this config)")
    for n, s in present.items():
        if tuple(s) != expected[n]:
            raise DggufError(f"tensor {n} has shape {list(s)}, config implies {list(expected[n])}")
    return [(n, gguf_name(n)) for n in sorted(present, key=_natural_key)]
