"""A DiffusionGemma GGUF, validated: hyper-parameters with their defaults, and every tensor checked by name,
shape and type against the architecture before any compute.

Reads our files and PR #24423's: a missing softcap key means 30, a missing embedding scale sqrt(H) in F32,
a missing eos list the eos id plus the end-of-turn tokens.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from dgguf.convert.errors import DggufError
from dgguf.convert.gguf_file import GGUFFile, TensorInfo
from dgguf.convert.metadata import ARCH

END_OF_TURN_TOKENS = ("<turn|>", "<end_of_turn>")


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    n_layers: int
    n_heads: int
    kv_heads: list[int]
    head_dims: list[int]
    sliding: list[bool]
    sliding_window: int
    rope_theta_full: float
    rope_theta_sliding: float
    rope_rotated_pairs_full: int     # leading dim pairs the full layers rotate (the rest have factor 1e30)
    rms_norm_eps: float
    n_experts: int
    top_k: int
    expert_ff: int
    dense_ff: int
    canvas_length: int
    context_length: int
    softcap: float
    embedding_scale: float
    eos_token_ids: list[int]
    pad_token_id: int
    mask_token_id: int | None
    sampler: dict                    # transformers' names → defaults from the file


def _req(g: GGUFFile, key: str):
    v = g.get(f"{ARCH}.{key}")
    if v is None:
        raise DggufError(f"{g.path}: missing key {ARCH}.{key}")
    return v


def _per_layer(g: GGUFFile, key: str, n: int) -> list[int]:
    v = _req(g, key)
    v = v if isinstance(v, list) else [v] * n
    if len(v) != n:
        raise DggufError(f"{g.path}: {ARCH}.{key} has {len(v)} entries for {n} layers")
    return [int(x) for x in v]


def expected_tensors(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    """GGUF name → ggml ne of every tensor the runtime needs."""
    H, V, F, I, E = c.hidden_size, c.vocab_size, c.dense_ff, c.expert_ff, c.n_experts
    out = {"token_embd.weight": (H, V), "output_norm.weight": (H,), "self_cond_pre_norm.weight": (H,),
           "self_cond_gate.weight": (H, F), "self_cond_up.weight": (H, F), "self_cond_down.weight": (F, H)}
    if not all(c.sliding):
        out["rope_freqs.weight"] = (c.head_dims[c.sliding.index(False)] // 2,)
    for i in range(c.n_layers):
        d, kv, nh = c.head_dims[i], c.kv_heads[i], c.n_heads
        b = f"blk.{i}."
        layer = {
            "attn_norm.weight": (H,), "attn_q.weight": (H, nh * d), "attn_k.weight": (H, kv * d),
            "attn_output.weight": (nh * d, H), "attn_q_norm.weight": (d,), "attn_k_norm.weight": (d,),
            "post_attention_norm.weight": (H,), "ffn_norm.weight": (H,), "ffn_gate.weight": (H, F),
            "ffn_up.weight": (H, F), "ffn_down.weight": (F, H), "post_ffw_norm_1.weight": (H,),
            "ffn_gate_inp.weight": (H, E), "ffn_gate_inp.scale": (H,), "ffn_down_exps.scale": (E,),
            "pre_ffw_norm_2.weight": (H,), "ffn_gate_up_exps.weight": (H, 2 * I, E),
            "ffn_down_exps.weight": (I, H, E), "post_ffw_norm_2.weight": (H,), "post_ffw_norm.weight": (H,),
            "layer_output_scale.weight": (1,), "enc_layer_output_scale.weight": (1,)}
        if c.sliding[i]:
            layer["attn_v.weight"] = (H, kv * d)
        out.update({b + k: s for k, s in layer.items()})
    return out


def read_model_config(g: GGUFFile) -> ModelConfig:
    """Hyper-parameters from the metadata, then every tensor validated against them."""
    arch = g.get("general.architecture")
    if arch != ARCH:
        raise DggufError(f"{g.path}: architecture {arch!r} is not {ARCH}")
    n = int(_req(g, "block_count"))
    H = int(_req(g, "embedding_length"))
    sliding = [bool(x) for x in _req(g, "attention.sliding_window_pattern")]
    if len(sliding) != n:
        raise DggufError(f"{g.path}: sliding_window_pattern has {len(sliding)} entries for {n} layers")
    d_full, d_swa = int(_req(g, "attention.key_length")), int(_req(g, "attention.key_length_swa"))
    tensors = {t.name: t for t in g.tensors}
    emb = tensors.get("token_embd.weight")
    if emb is None or len(emb.ne) != 2:
        raise DggufError(f"{g.path}: missing tensor token_embd.weight")
    freqs = tensors.get("rope_freqs.weight")
    rotated = d_full // 2
    if freqs is not None and freqs.type.name == "F32":
        f = g.tensor_bytes(freqs).view("<f4")
        rotated = int((f < 1e20).sum())
    tok = g.get("tokenizer.ggml.tokens") or []
    eos = g.get("diffusion.eos_token_ids")
    if eos is None:
        eos = [int(g.get("tokenizer.ggml.eos_token_id", 1))]
        eos += [i for i, t in enumerate(tok) if t in END_OF_TURN_TOKENS and i not in eos]
    c = ModelConfig(
        vocab_size=int(emb.ne[1]), hidden_size=H, n_layers=n, n_heads=int(_req(g, "attention.head_count")),
        kv_heads=_per_layer(g, "attention.head_count_kv", n),
        head_dims=[d_swa if s else d_full for s in sliding], sliding=sliding,
        sliding_window=int(_req(g, "attention.sliding_window")),
        rope_theta_full=float(_req(g, "rope.freq_base")), rope_theta_sliding=float(_req(g, "rope.freq_base_swa")),
        rope_rotated_pairs_full=rotated,
        rms_norm_eps=float(_req(g, "attention.layer_norm_rms_epsilon")),
        n_experts=int(_req(g, "expert_count")), top_k=int(_req(g, "expert_used_count")),
        expert_ff=int(_req(g, "expert_feed_forward_length")), dense_ff=int(_req(g, "feed_forward_length")),
        canvas_length=int(g.get("diffusion.canvas_length", 256)),
        context_length=int(_req(g, "context_length")),
        softcap=float(g.get(f"{ARCH}.final_logit_softcapping", 30.0)),
        embedding_scale=float(g.get(f"{ARCH}.embedding_scale", float(np.float32(math.sqrt(H))))),
        eos_token_ids=[int(x) for x in eos],
        pad_token_id=int(g.get("tokenizer.ggml.padding_token_id", 0)),
        mask_token_id=g.get("tokenizer.ggml.mask_token_id"),
        sampler={"max_denoising_steps": int(g.get("diffusion.eb_max_steps", 48)),
                 "t_min": float(g.get("diffusion.eb_t_min", 0.4)), "t_max": float(g.get("diffusion.eb_t_max", 0.8)),
                 "entropy_bound": float(g.get("diffusion.eb_entropy_bound", 0.1)),
                 "stability_threshold": int(g.get("diffusion.eb_stability_threshold", 1)),
                 "confidence_threshold": float(g.get("diffusion.eb_confidence_threshold", 0.005))},
    )
    if not 1 <= c.top_k <= c.n_experts:
        raise DggufError(f"{g.path}: expert_used_count {c.top_k} is not within 1..{c.n_experts}")
    if c.n_heads % max(min(c.kv_heads), 1) or min(c.kv_heads) < 1:
        raise DggufError(f"{g.path}: head_count {c.n_heads} is not a multiple of every layer's KV head count")
    _check_tensors(g, c, tensors)
    return c


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
        raise DggufError(f"{g.path}: unexpected tensor {extra[0]}")
