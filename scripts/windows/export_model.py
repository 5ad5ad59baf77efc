"""A GGUF's forward, as native/dgguf.h's structs hold it, in one file for scripts/windows/driver.c: the dg_model and
dg_layer structs exactly as the Linux loader filled them (raw bytes, pointers cleared; Windows x64 lays them out as
Linux x86-64 does, and the driver checks the sizes), every tensor's bytes, a context and a canvas, and this build's
canvas logits without and then with self-conditioning (Model.canvas_logits). The driver rebuilds the structs, runs
dg_encode and dg_decode under Wine and compares.

    python scripts/windows/export_model.py MODEL.gguf OUT.bin

Layout (little-endian): b"DGWIN001", u64 sizeof dg_model, dg_layer, dg_tensor; u64 n_layers; the dg_model bytes;
the dg_layer bytes; 64 bytes naming the matmul kernel and 64 the attention kernel (NUL-padded); u64 n_tensors and per
tensor u64 owner (0: the model, 1 + i: layer i), u64 offset of its dg_tensor in that struct, u64 bytes, the bytes;
u64 n_ctx, int32 ids; u64 n_canvas, int32 ids; u64 vocab; float32 logits [n_canvas, vocab] without
self-conditioning, then with those logits as its input.
"""
from __future__ import annotations

import struct
import sys

import numpy as np

from dgguf.core import native
from dgguf.core._native import ffi
from dgguf.runtime import Model

PROMPT = "import os\n\n\ndef parse(path, sep=','):\n    with open(path) as f:\n        return [line.split(sep)"


def tensor_fields(ctype: str) -> list[str]:
    return [name for name, f in ffi.typeof(ctype).fields if f.type is ffi.typeof("dg_tensor")]


def main(gguf: str, out: str) -> None:
    m = Model.load(gguf, threads=2)
    nm, cfg = m.native, m.config
    n_layers = cfg.n_layers
    model_bytes = bytearray(ffi.buffer(nm._model))
    layer_bytes = bytearray(ffi.buffer(nm._layers))
    tensors = []                      # (owner, offset, bytes)

    def take(owner: int, struct_ptr, ctype: str, raw: bytearray, base: int) -> None:
        for name in tensor_fields(ctype):
            t = getattr(struct_ptr, name)
            if t.data == ffi.NULL:
                continue              # a tensor this layer does not have (full layers: no V)
            nbytes = native.row_bytes(t.type, t.ne0) * t.ne1 * t.ne2
            off = ffi.offsetof(ctype, name)
            tensors.append((owner, off, ffi.buffer(t.data, nbytes)[:]))
            raw[base + off: base + off + ffi.sizeof("void *")] = bytes(ffi.sizeof("void *"))
    take(0, nm._model, "dg_model", model_bytes, 0)
    off = ffi.offsetof("dg_model", "layers")
    model_bytes[off: off + ffi.sizeof("void *")] = bytes(ffi.sizeof("void *"))
    for i in range(n_layers):
        take(1 + i, nm._layers[i], "dg_layer", layer_bytes, i * ffi.sizeof("dg_layer"))

    ctx = m.tokenizer.encode(PROMPT)
    rng = np.random.default_rng(0)
    canvas = rng.integers(0, cfg.vocab_size, cfg.canvas_length).astype(np.int32)
    if cfg.mask_token_id is not None:
        canvas[: cfg.canvas_length // 2] = cfg.mask_token_id   # half masked, as a denoising step sees it
    plain = m.canvas_logits(ctx, canvas)
    conditioned = m.canvas_logits(ctx, canvas, plain)
    m.close()

    u64 = lambda v: struct.pack("<Q", v)
    with open(out, "wb") as f:
        f.write(b"DGWIN001")
        for ctype in ("dg_model", "dg_layer", "dg_tensor"):
            f.write(u64(ffi.sizeof(ctype)))
        f.write(u64(n_layers) + model_bytes + layer_bytes)
        f.write(native.matmul_kernel().encode().ljust(64, b"\0") + native.attention_kernel().encode().ljust(64, b"\0"))
        f.write(u64(len(tensors)))
        for owner, off, data in tensors:
            f.write(u64(owner) + u64(off) + u64(len(data)) + data)
        for ids in (np.asarray(ctx, np.int32), canvas):
            f.write(u64(ids.size) + ids.astype("<i4").tobytes())
        f.write(u64(cfg.vocab_size) + plain.astype("<f4").tobytes() + conditioned.astype("<f4").tobytes())
    print(f"export_model: {len(tensors)} tensors, {n_layers} layers, context {len(ctx)}, canvas {canvas.size}, "
          f"vocab {cfg.vocab_size}, kernels {native.matmul_kernel()} / {native.attention_kernel()}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
