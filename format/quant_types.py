"""The tensor types and file types dgguf reads and writes: one table each, everything else is driven by them.

Mirrors the type table in native/quant.c. Numbers are ggml's (tensor types) and llama.cpp's (file types),
so files interoperate.
"""
from __future__ import annotations

from dataclasses import dataclass

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as T, LlamaFileType as F

from dgguf.core.errors import DggufError


@dataclass(frozen=True)
class TensorType:
    name: str
    ggml: int
    block_size: int   # values per block
    type_size: int    # bytes per block

    def row_bytes(self, ncols: int) -> int:
        return ncols // self.block_size * self.type_size

    def nbytes(self, nvalues: int) -> int:
        return nvalues // self.block_size * self.type_size


TENSOR_TYPES = {t.name: TensorType(t.name, int(t), *GGML_QUANT_SIZES[t]) for t in (
    T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K,
    T.IQ4_NL, T.IQ4_XS)}
BY_GGML = {t.ggml: t for t in TENSOR_TYPES.values()}

# What a 256-block type becomes when a row cannot hold whole 256-blocks (llama.cpp's rule).
FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0", "IQ4_XS": "IQ4_NL"}


@dataclass(frozen=True)
class FileType:
    name: str      # llama-quantize's name, e.g. Q4_K_M
    ftype: int     # general.file_type
    base: str      # default tensor type of the preset


FILE_TYPES = {ft.name: ft for ft in (
    FileType("F32", int(F.ALL_F32), "F32"),
    FileType("F16", int(F.MOSTLY_F16), "F16"),
    FileType("BF16", int(F.MOSTLY_BF16), "BF16"),
    FileType("Q8_0", int(F.MOSTLY_Q8_0), "Q8_0"),
    FileType("Q4_0", int(F.MOSTLY_Q4_0), "Q4_0"),
    FileType("Q5_0", int(F.MOSTLY_Q5_0), "Q5_0"),
    FileType("Q5_1", int(F.MOSTLY_Q5_1), "Q5_1"),
    FileType("Q2_K", int(F.MOSTLY_Q2_K), "Q2_K"),
    FileType("Q3_K_S", int(F.MOSTLY_Q3_K_S), "Q3_K"),
    FileType("Q3_K_M", int(F.MOSTLY_Q3_K_M), "Q3_K"),
    FileType("Q4_K_S", int(F.MOSTLY_Q4_K_S), "Q4_K"),
    FileType("Q4_K_M", int(F.MOSTLY_Q4_K_M), "Q4_K"),
    FileType("Q5_K_S", int(F.MOSTLY_Q5_K_S), "Q5_K"),
    FileType("Q5_K_M", int(F.MOSTLY_Q5_K_M), "Q5_K"),
    FileType("Q6_K", int(F.MOSTLY_Q6_K), "Q6_K"),
    FileType("IQ4_XS", int(F.MOSTLY_IQ4_XS), "IQ4_XS"),
)}


def file_type(name: str) -> FileType:
    ft = FILE_TYPES.get(name.upper())
    if ft is None:
        raise DggufError(f"unknown type {name!r}; choose one of: {', '.join(FILE_TYPES)}")
    return ft


def is_quantized(t: TensorType) -> bool:
    return t.name not in ("F32", "F16", "BF16")
