"""Which tensor type each tensor gets for a file type: llama-quantize's preset rules for this architecture.

Checked against the choices PR #24423's llama-quantize made for the fixture files (tests/fixtures/
pr24423-tiny/gguf-dumps). Only the rules that can fire for DiffusionGemma's tensor names are here.
"""
from __future__ import annotations

import re

from dgguf.format.quant_types import FALLBACK, TENSOR_TYPES, FileType, TensorType


def _more_bits(i: int, n: int) -> bool:
    """llama.cpp's use_more_bits: first and last eighth of the layers, and every third one between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def quantizable(name: str, ndim: int) -> bool:
    """Matrices named *.weight, except norms and the router (kept F32 for exact expert choice)."""
    return (ndim >= 2 and name.endswith("weight") and not name.endswith("_norm.weight")
            and "ffn_gate_inp.weight" not in name)


class TypeChooser:
    """Stateful like llama-quantize: attn_v's rule depends on how many attn_v tensors came before."""

    def __init__(self, ft: FileType, n_layers: int, n_experts: int, n_attn_v: int, n_gqa: int,
                 pure: bool = False, imatrix: bool = False):
        # n_gqa: query heads per KV head in layer 0, as llama.cpp reads it; imatrix: quantizing with one (a rule
        # of IQ4_XS depends on it, as in llama-quantize).
        self.ft, self.n_layers, self.n_experts, self.n_attn_v, self.n_gqa = ft, n_layers, n_experts, n_attn_v, n_gqa
        self.pure, self.imatrix = pure, imatrix
        self.i_attn_v = 0

    def choose(self, name: str, ne: tuple[int, ...]) -> TensorType:
        if not quantizable(name, len(ne)):
            return TENSOR_TYPES["F32"]
        base = self.ft.base
        if base in ("F32", "F16", "BF16"):
            return TENSOR_TYPES[base]
        t = base if self.pure else self._preset(name, ne, base)
        return _fit(t, ne[0])

    def _preset(self, name: str, ne: tuple[int, ...], t: str) -> str:
        ft, n_exp = self.ft.name, self.n_experts
        layer = int(m.group(1)) if (m := re.match(r"blk\.(\d+)\.", name)) else -1
        if name == "token_embd.weight":
            # Tied with the output head: llama.cpp gives it the output's type.
            if ne[0] % TENSOR_TYPES[t].block_size:
                return "Q8_0"
            return t if t == "Q8_0" else "Q6_K"
        if "attn_v.weight" in name:
            i = self.i_attn_v
            self.i_attn_v += 1
            if ft == "Q2_K":
                t = "Q4_K" if self.n_gqa >= 4 else "Q3_K"
            elif ft == "Q3_K_M":
                t = "Q5_K" if i < 2 else "Q4_K"
            elif ft in ("Q4_K_M", "Q5_K_M") and _more_bits(i, self.n_attn_v):
                t = "Q6_K"
            elif ft == "Q4_K_S" and i < 4:
                t = "Q5_K"
            elif ft == "IQ4_XS" and self.n_gqa >= 4:
                t = "Q5_K"
            return "Q8_0" if n_exp == 8 else t
        if "attn_k.weight" in name:
            return "Q8_0" if n_exp == 8 else t
        if "ffn_down" in name:
            n = self.n_layers
            if ft == "Q2_K":
                return "Q3_K"
            if ft == "Q3_K_M":
                return "Q5_K" if layer < n // 16 else "Q4_K"
            if ft in ("Q4_K_M", "Q5_K_M") and _more_bits(layer, n):
                return "Q6_K"
            if ft == "Q4_K_S" and layer < n // 8:
                return "Q5_K"
            if ft == "IQ4_XS" and layer < n // 8 and not self.imatrix:
                return "Q5_K"
            return t
        if "attn_output.weight" in name:
            if n_exp == 8:
                return "Q5_K" if ft in ("Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_S", "Q4_K_M", "IQ4_XS") else t
            return {"Q2_K": "Q3_K", "Q3_K_M": "Q4_K"}.get(ft, t)
        return t


def _fit(t: str, ncols: int) -> TensorType:
    """Fall back to a 32-block type when rows cannot hold whole 256-blocks, then to F16 (llama.cpp's rule)."""
    if ncols % TENSOR_TYPES[t].block_size:
        t = FALLBACK.get(t, t)
        if ncols % TENSOR_TYPES[t].block_size:
            t = "F16"
    return TENSOR_TYPES[t]
