"""A DiffusionGemma GGUF, validated: hyper-parameters with their defaults, and every tensor checked by name,
shape and type against the architecture before any compute.

Reads our files and PR #24423's: a missing softcap key means 30, a missing embedding scale sqrt(H) in F32,
a missing eos list the eos id plus the end-of-turn tokens.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from gguf.constants import GGUFValueType as V

from dgguf.core.errors import DggufError
from dgguf.format.gguf_file import GGUFFile, TensorInfo, printable
from dgguf.format.arch import ARCH, ModelShape, expected_tensors

END_OF_TURN_TOKENS = ("<turn|>", "<end_of_turn>")


@dataclass
class ModelConfig(ModelShape):
    rope_theta_full: float
    rope_theta_sliding: float
    rope_rotated_pairs_full: int     # leading dim pairs the full layers rotate (the rest have factor 1e30)
    rms_norm_eps: float
    softcap: float
    embedding_scale: float
    eos_token_ids: list[int]
    pad_token_id: int
    mask_token_id: int | None
    sampler: dict                    # transformers' names → defaults from the file


_INT_MAX = 2**31 - 1     # sizes go to native code as C ints
_INTEGER = (V.UINT8, V.INT8, V.UINT16, V.INT16, V.UINT32, V.INT32, V.UINT64, V.INT64)
_MISSING = object()


def _full_key(key: str) -> str:
    return key if key.startswith(("general.", "diffusion.", "tokenizer.")) else f"{ARCH}.{key}"


def _value(g: GGUFFile, key: str, kinds, what: str, default=_MISSING):
    name = _full_key(key)
    f = g.fields.get(name)
    if f is None:
        if default is _MISSING:
            raise DggufError(f"{g.path}: missing key {name}")
        return default
    if f.type not in kinds:
        raise DggufError(f"{g.path}: key {name} is a {f.type.name}, expected {what}")
    return f.value


def _int(g: GGUFFile, key: str, lo: int = 1, hi: int = _INT_MAX, default=_MISSING) -> int:
    if _full_key(key) not in g.fields and default is not _MISSING:
        return default   # a missing optional key: its default, unchecked (it may be None)
    v = _value(g, key, _INTEGER, "an integer")
    if not lo <= v <= hi:
        raise DggufError(f"{g.path}: key {_full_key(key)} = {v} is outside {lo}..{hi}")
    return int(v)


def _float(g: GGUFFile, key: str, positive: bool = True, default=_MISSING) -> float:
    v = float(_value(g, key, (V.FLOAT32, V.FLOAT64), "a float", default))
    if not math.isfinite(v) or (positive and v <= 0):
        raise DggufError(f"{g.path}: key {_full_key(key)} = {v} must be a finite{' positive' if positive else ''} "
                         "number")
    return v


def _int_list(g: GGUFFile, key: str, n: int, lo: int = 1, hi: int = _INT_MAX, default=_MISSING) -> list[int]:
    """A per-layer array of n integers (a single integer means the same for every layer)."""
    name = _full_key(key)
    f = g.fields.get(name)
    if f is None and default is not _MISSING:
        return default
    if f is not None and f.type in _INTEGER:
        v = [f.value] * (n or 1)
    else:
        v = _value(g, key, (V.ARRAY,), "an array")
        if f.item_type not in _INTEGER + (V.BOOL,):
            raise DggufError(f"{g.path}: key {name} is an array of {f.item_type.name}, expected integers")
        if n is not None and len(v) != n:
            raise DggufError(f"{g.path}: key {name} has {len(v)} entries, expected {n}")
    if not all(lo <= x <= hi for x in v):
        raise DggufError(f"{g.path}: key {name} has a value outside {lo}..{hi}")
    return [int(x) for x in v]


def read_model_config(g: GGUFFile) -> ModelConfig:
    """Hyper-parameters from the metadata, then every tensor validated against them."""
    arch = g.get("general.architecture")
    if arch != ARCH:
        shown = "(missing)" if arch is None else f"'{printable(arch)}'"
        raise DggufError(f"{g.path}: architecture {shown} is not {ARCH}")
    n = _int(g, "block_count", 1, 4096)
    H = _int(g, "embedding_length")
    sliding = [bool(x) for x in _int_list(g, "attention.sliding_window_pattern", n, 0, 1)]
    d_full, d_swa = _int(g, "attention.key_length"), _int(g, "attention.key_length_swa")
    tensors = {t.name: t for t in g.tensors}
    emb = tensors.get("token_embd.weight")
    if emb is None or len(emb.ne) != 2 or emb.ne[1] > _INT_MAX:
        raise DggufError(f"{g.path}: missing or invalid tensor token_embd.weight")
    vocab = int(emb.ne[1])
    rotated = _rotated_pairs(g, tensors.get("rope_freqs.weight"), d_full)
    f = g.fields.get("tokenizer.ggml.tokens")   # only to find end-of-turn ids: anything but strings is ignored
    tok = f.value if f is not None and f.type == V.ARRAY and f.item_type == V.STRING else []
    eos = _int_list(g, "diffusion.eos_token_ids", None, 0, vocab - 1, default=None)
    if eos is None:
        eos = [_int(g, "tokenizer.ggml.eos_token_id", 0, vocab - 1, default=1)]
        eos += [i for i, t in enumerate(tok) if t in END_OF_TURN_TOKENS and i not in eos]
    c = ModelConfig(
        vocab_size=vocab, hidden_size=H, n_layers=n, n_heads=_int(g, "attention.head_count"),
        kv_heads=_int_list(g, "attention.head_count_kv", n),
        head_dims=[d_swa if s else d_full for s in sliding], sliding=sliding,
        sliding_window=_int(g, "attention.sliding_window"),
        rope_theta_full=_float(g, "rope.freq_base"), rope_theta_sliding=_float(g, "rope.freq_base_swa"),
        rope_rotated_pairs_full=rotated,
        rms_norm_eps=_float(g, "attention.layer_norm_rms_epsilon"),
        n_experts=_int(g, "expert_count"), top_k=_int(g, "expert_used_count"),
        expert_ff=_int(g, "expert_feed_forward_length"), dense_ff=_int(g, "feed_forward_length"),
        canvas_length=_int(g, "diffusion.canvas_length", 1, 1 << 16, default=256),
        context_length=_int(g, "context_length"),
        softcap=_float(g, "final_logit_softcapping", default=30.0),
        embedding_scale=_float(g, "embedding_scale", default=float(np.float32(math.sqrt(H)))),
        eos_token_ids=eos,
        pad_token_id=_int(g, "tokenizer.ggml.padding_token_id", 0, vocab - 1, default=0),
        mask_token_id=_int(g, "tokenizer.ggml.mask_token_id", 0, vocab - 1, default=None),
        sampler={"max_denoising_steps": _int(g, "diffusion.eb_max_steps", default=48),
                 "t_min": _float(g, "diffusion.eb_t_min", default=0.4),
                 "t_max": _float(g, "diffusion.eb_t_max", default=0.8),
                 "entropy_bound": _float(g, "diffusion.eb_entropy_bound", default=0.1),
                 "stability_threshold": _int(g, "diffusion.eb_stability_threshold", default=1),
                 "confidence_threshold": _float(g, "diffusion.eb_confidence_threshold", positive=False,
                                                default=0.005)},
    )
    if c.canvas_length > c.context_length:
        raise DggufError(f"{g.path}: diffusion.canvas_length {c.canvas_length} is larger than the context length "
                         f"{c.context_length}")
    if not 1 <= c.top_k <= c.n_experts:
        raise DggufError(f"{g.path}: expert_used_count {c.top_k} is not within 1..{c.n_experts}")
    if c.n_heads % max(min(c.kv_heads), 1) or min(c.kv_heads) < 1:
        raise DggufError(f"{g.path}: head_count {c.n_heads} is not a multiple of every layer's KV head count")
    _check_tensors(g, c, tensors)
    return c


def _rotated_pairs(g: GGUFFile, freqs: TensorInfo | None, d_full: int) -> int:
    """How many leading dim pairs the full layers rotate: rope_freqs must be 1 for those and >= 1e20 (no
    rotation) after, the only pattern the native RoPE implements."""
    if freqs is None:
        return d_full // 2
    if freqs.type.name != "F32":
        raise DggufError(f"{g.path}: tensor rope_freqs.weight is {freqs.type.name}; vectors must be F32")
    f = g.tensor_bytes(freqs).view("<f4")
    r = int((f == 1.0).sum())
    if not (np.all(f[:r] == 1.0) and np.all(f[r:] >= 1e20)):
        raise DggufError(f"{g.path}: rope_freqs.weight is not 1 for leading pairs then >= 1e20; "
                         "this RoPE variant is not supported")
    return r


def _check_tensors(g: GGUFFile, c: ModelConfig, tensors: dict[str, TensorInfo]) -> None:
    expected = expected_tensors(c)
    for name, ne in expected.items():
        t = tensors.get(name)
        if t is None:
            raise DggufError(f"{g.path}: missing tensor {name}")
        if tuple(t.ne) != ne:
            raise DggufError(f"{g.path}: tensor {name} has shape {list(t.ne)}, expected {list(ne)}")
        if len(ne) == 1 and t.type.name != "F32":
            raise DggufError(f"{g.path}: tensor {name} is {t.type.name}; vectors must be F32")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise DggufError(f"{g.path}: unexpected tensor {printable(extra[0])}")
