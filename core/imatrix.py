"""Native calls for importance matrices: quantizing with per-column importances (dg_quantize_rows_imatrix) and
collecting per-column squared matmul inputs during a forward pass (dg_imatrix_collect)."""
from __future__ import annotations

import numpy as np

from ._native import ffi, lib
from .errors import DggufError
from .native import ERRLEN, check, quantize_rows, row_bytes


def quantize_rows_imatrix(x: np.ndarray, ggml_type: int, importance: np.ndarray | None) -> np.ndarray:
    """quantize_rows minimising the error weighted by `importance` (float32 [ncols], finite, >= 0), as llama.cpp's
    imatrix quantization; types that take no importance (F32, F16, BF16, Q8_0) and None quantize plainly."""
    if importance is None:
        return quantize_rows(x, ggml_type)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError("quantize_rows_imatrix takes a 2-D array")
    nrows, ncols = x.shape
    imp = np.ascontiguousarray(importance, dtype=np.float32)
    if imp.shape != (ncols,):
        raise DggufError(f"importance has shape {imp.shape}; rows of {ncols} values need ({ncols},)")
    out = np.empty((nrows, row_bytes(ggml_type, ncols)), dtype=np.uint8)
    err = ffi.new("char[]", ERRLEN)
    check(lib.dg_quantize_rows_imatrix(ggml_type, ffi.from_buffer("float[]", x), ffi.from_buffer(out), nrows, ncols,
                                        ffi.from_buffer("float[]", imp), err, ERRLEN), err)
    return out


def encode_imatrix(x: np.ndarray, ggml_type: int, importance: np.ndarray | None) -> np.ndarray:
    """native.encode with per-column importances for the quantized types."""
    if ggml_type == 0:
        return x
    if ggml_type == 1:
        return x.astype(np.float16)
    return quantize_rows_imatrix(x, ggml_type, importance)


class Collector:
    """While active (a context manager), every matmul input meeting one of the watched weights adds its squares
    to that weight's per-matrix, per-column sums (`sum2` [ne2, ne0], float64) and its row count (`count` [ne2]).

    `weights` maps a name to (data, ne0, ne2): data a buffer the forward reads the weight from (the same memory,
    so the same address, as the model's dg_tensor)."""

    def __init__(self, weights: dict[str, tuple[object, int, int]]):
        self.names = list(weights)
        self.sum2 = {n: np.zeros((ne2, ne0), np.float64) for n, (_, ne0, ne2) in weights.items()}
        self.count = {n: np.zeros(ne2, np.float64) for n, (_, _, ne2) in weights.items()}
        self._bufs = [ffi.from_buffer(weights[n][0]) for n in self.names]
        self._entries = ffi.new("dg_imatrix_entry[]", len(self.names))
        for i, n in enumerate(self.names):
            e = self._entries[i]
            e.data = self._bufs[i]
            e.ne2, e.ne0 = self.sum2[n].shape
            e.sum2 = ffi.from_buffer("double[]", self.sum2[n])
            e.count = ffi.from_buffer("double[]", self.count[n])

    def __enter__(self):
        err = ffi.new("char[]", ERRLEN)
        check(lib.dg_imatrix_collect(self._entries, len(self.names), err, ERRLEN), err)
        return self

    def __exit__(self, *exc):
        lib.dg_imatrix_collect(ffi.NULL, 0, ffi.NULL, 0)
        return False
