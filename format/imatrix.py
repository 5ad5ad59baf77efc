"""Importance matrices in llama.cpp's imatrix GGUF layout (what llama-imatrix writes and llama-quantize reads).

Keys: general.type = "imatrix", imatrix.datasets (array of strings), imatrix.chunk_count and imatrix.chunk_size
(UINT32). Per weight NAME (its GGUF tensor name) two F32 tensors: NAME.in_sum2 [ne0, n_mat], the sums of the
squared inputs each column met, per matrix (n_mat = the experts of an expert tensor, else 1), and NAME.counts
[1, n_mat], the input rows summed. A column's importance is in_sum2 / counts, and 1 for a matrix that met no
input (llama.cpp's rule).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf.constants import GGUFValueType as V

from dgguf.core.errors import DggufError

from .gguf_file import Field, GGUFWriter, TensorInfo, printable, read_gguf
from .quant_types import TENSOR_TYPES

SUMS, COUNTS = ".in_sum2", ".counts"
DATASETS, CHUNK_COUNT, CHUNK_SIZE = "imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size"


@dataclass
class Imatrix:
    sums: dict[str, np.ndarray] = field(default_factory=dict)     # name -> float64 [n_mat, ne0]
    counts: dict[str, np.ndarray] = field(default_factory=dict)   # name -> float64 [n_mat]
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0

    def importance(self, name: str, ne0: int, n_mat: int) -> np.ndarray | None:
        """float32 [n_mat, ne0] mean squared inputs of weight `name` (an entry of one matrix serves every matrix),
        or None when the file has no entry for it."""
        s = self.sums.get(name)
        if s is None:
            return None
        if s.shape[1] != ne0 or s.shape[0] not in (1, n_mat):
            raise DggufError(f"imatrix entry {printable(name)} has shape {list(s.shape)[::-1]}; the weight has rows of "
                             f"{ne0} values in {n_mat} matrices: not an importance matrix of this model")
        c = self.counts[name]
        imp = np.where(c[:, None] > 0, s / np.maximum(c, 1e-300)[:, None], 1.0).astype(np.float32)
        return np.broadcast_to(imp, (n_mat, ne0)) if imp.shape[0] != n_mat else imp


def write_imatrix(path, im: Imatrix, force: bool = False, inputs=()) -> None:
    fields = {
        "general.type": Field(V.STRING, "imatrix"),
        DATASETS: Field(V.ARRAY, list(im.datasets), V.STRING),
        CHUNK_COUNT: Field(V.UINT32, int(im.chunk_count)),
        CHUNK_SIZE: Field(V.UINT32, int(im.chunk_size)),
    }
    f32 = TENSOR_TYPES["F32"]
    tensors, data = [], []
    for name in sorted(im.sums):
        s = np.ascontiguousarray(im.sums[name], dtype=np.float32)
        c = np.ascontiguousarray(im.counts[name], dtype=np.float32).reshape(-1, 1)
        tensors += [TensorInfo(name + SUMS, (s.shape[1], s.shape[0]), f32),
                    TensorInfo(name + COUNTS, (1, c.shape[0]), f32)]
        data += [s, c]
    with GGUFWriter(Path(path), fields, tensors, force, inputs) as w:
        for a in data:
            w.write(a)


def read_imatrix(path) -> Imatrix:
    """An imatrix GGUF, checked: the keys, F32 pairs of matching shapes, finite non-negative values."""
    path = Path(path)
    g = read_gguf(path)
    try:
        kind = g.get("general.type", "imatrix")
        if kind != "imatrix":
            raise DggufError(f"{path}: general.type is {printable(repr(kind))}, not 'imatrix': "
                             "not an importance matrix")
        for key in (DATASETS, CHUNK_COUNT, CHUNK_SIZE):
            if key not in g.fields:
                raise DggufError(f"{path}: key {key} is missing: not an importance matrix in llama.cpp's GGUF layout")
        datasets = g.get(DATASETS)
        if not isinstance(datasets, list) or not all(isinstance(d, str) for d in datasets):
            raise DggufError(f"{path}: key {DATASETS} is not an array of strings")
        chunks = [g.get(k) for k in (CHUNK_COUNT, CHUNK_SIZE)]
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in chunks):
            raise DggufError(f"{path}: {CHUNK_COUNT} and {CHUNK_SIZE} must be non-negative integers")
        pairs: dict[str, dict[str, object]] = {}
        for t in g.tensors:
            for suffix in (SUMS, COUNTS):
                if t.name.endswith(suffix) and len(t.name) > len(suffix):
                    pairs.setdefault(t.name[:-len(suffix)], {})[suffix] = t
        im = Imatrix(datasets=list(datasets), chunk_count=chunks[0], chunk_size=chunks[1])
        for name, p in pairs.items():
            if SUMS not in p or COUNTS not in p:
                raise DggufError(f"{path}: {printable(name)} has {'in_sum2' if SUMS in p else 'counts'} but not "
                                 f"{'counts' if SUMS in p else 'in_sum2'}")
            s, c = p[SUMS], p[COUNTS]
            ne_s = tuple(s.ne) + (1,) * (2 - len(s.ne))
            ne_c = tuple(c.ne) + (1,) * (2 - len(c.ne))
            if s.type.name != "F32" or c.type.name != "F32" or len(ne_s) != 2 or len(ne_c) != 2 or ne_c[0] != 1 \
                    or ne_c[1] != ne_s[1] or ne_s[0] < 1:
                raise DggufError(f"{path}: {printable(name)}: in_sum2 {list(s.ne)} {s.type.name} and counts "
                                 f"{list(c.ne)} {c.type.name} are not F32 [ne0, n_mat] and [1, n_mat]")
            sums = g.tensor_bytes(s).view("<f4").reshape(ne_s[1], ne_s[0]).astype(np.float64)
            counts = g.tensor_bytes(c).view("<f4").astype(np.float64)
            if not (np.isfinite(sums).all() and np.isfinite(counts).all()) or (sums < 0).any() or (counts < 0).any():
                raise DggufError(f"{path}: {printable(name)} holds negative or non-finite values")
            im.sums[name], im.counts[name] = sums, counts
        if not im.sums:
            raise DggufError(f"{path}: no in_sum2/counts tensors: an empty importance matrix")
        return im
    finally:
        g.close()
