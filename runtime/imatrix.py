"""Importance matrices gathered the way DiffusionGemma runs: `dgguf imatrix -m REF.gguf --text FILE -o OUT`.

The text is read as `dgguf eval` reads it (runtime/quality.py): cut into segments, each encoded canvas by canvas
after its prefix. Every canvas of clean text is first denoised the way the sampler meets it: the decoder runs at
noise levels 1.0, 0.75, 0.5 and 0.25 in turn (a fraction t of the positions, chosen once per canvas and nested,
so each level keeps the previous level's clean positions, holds seeded uniform random tokens), each pass
self-conditioned on the previous pass's logits (temperature 1), the first on none. Then the encoder pass writes
the clean canvas into the KV cache as context for the next one. `encoder_only` runs the encoder passes alone:
the autoregressive way (llama-imatrix's), which never runs the decoder, the head or self-conditioning.

Every matmul input is tapped (native/imatrix.c): per weight, per matrix (expert), the sum of each column's
squared inputs and the number of input rows, stored in llama.cpp's imatrix GGUF layout (format/imatrix.py).
The passes run on the float kernel, so the statistics are those of the exact activations.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dgguf.core.errors import DggufError
from dgguf.core.imatrix import Collector
from dgguf.format.imatrix import Imatrix

from .quality import exact, segments

DENOISING_LEVELS = (1.0, 0.75, 0.5, 0.25)


def matrix_weights(model) -> dict[str, tuple[np.ndarray, int, int]]:
    """The weights the forward multiplies (every tensor of two or three dimensions): name -> (bytes, ne0, ne2)."""
    out = {}
    for t in model.gguf.tensors:
        if len(t.ne) in (2, 3):
            out[t.name] = (model.gguf.tensor_bytes(t), t.ne[0], t.ne[2] if len(t.ne) == 3 else 1)
    return out


@dataclass
class GatherStats:
    tokens: int          # text tokens encoded
    canvases: int        # canvases denoised (0 for encoder_only)
    decoder_passes: int


def gather(model, text: str, encoder_only: bool = False, levels=DENOISING_LEVELS, seed: int = 0,
           max_tokens: int | None = None, segment: int | None = None, dataset: str = "text",
           progress=None) -> tuple[Imatrix, GatherStats]:
    """The importance matrix of a loaded Model (runtime.model.Model) over `text` (see the module docstring)."""
    C, V = model.config.canvas_length, model.config.vocab_size
    tok = model.tokenizer
    ids = tok.encode(text, bos=False)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise DggufError(f"the text has {len(ids)} tokens; at least 2 needed")
    bos = tok.bos_id
    segment = segment or max(C, min(model.ctx, 1024) - 1) // C * C
    if segment < C or segment + 1 > model.ctx:
        raise DggufError(f"segment length {segment} must be at least the canvas length {C} and fit ctx {model.ctx}")
    collector = Collector(matrix_weights(model))
    canvases = passes = encoded = 0
    with collector:
        for si, seg in enumerate(segments(ids, segment)):
            prefix = [bos] if bos is not None else seg[:1]
            body = seg if bos is not None else seg[1:]
            if not body:
                continue
            cache = model.native.new_cache(len(prefix) + len(body))
            exact(cache.encode, np.asarray(prefix, dtype=np.int32))
            for ci, start in enumerate(range(0, len(body), C)):
                clean = np.asarray(body[start:start + C], dtype=np.int32)
                if not encoder_only:
                    rng = np.random.Generator(np.random.PCG64([seed, si, ci]))
                    order = rng.permutation(len(clean))
                    noise = rng.integers(0, V, size=len(clean)).astype(np.int32)
                    sc = None
                    for t in levels:
                        noisy = clean.copy()
                        pos = order[:int(round(t * len(clean)))]
                        noisy[pos] = noise[pos]
                        sc = exact(cache.decode, noisy, sc)
                        passes += 1
                    canvases += 1
                exact(cache.encode, clean)
                encoded += len(clean)
                if progress:
                    progress(len(clean))
    im = Imatrix(datasets=[dataset], chunk_count=canvases if not encoder_only else (encoded + C - 1) // C,
                 chunk_size=C)
    for name in collector.names:
        if collector.count[name].any():
            im.sums[name], im.counts[name] = collector.sum2[name], collector.count[name]
    return im, GatherStats(tokens=encoded, canvases=canvases, decoder_passes=passes)
