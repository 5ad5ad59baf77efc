"""Checkpoint tensor names → GGUF tensor names and shapes, as PR #24423's published files lay them out.

Read top to bottom: each row maps one HF name (under model.decoder., per layer under layers.N.) to its GGUF
name. Shapes are given in PyTorch order; GGUF stores the reverse (ggml `ne`).
"""
from __future__ import annotations

import re

from .checkpoint import TextConfig
from .errors import DggufError

DECODER = "model.decoder."
ENCODER_LAYER = "model.encoder.language_model.layers."
# Vision weights are dropped: the GGUF is text-only (diffusion-gemma.text_only).
DROPPED_PREFIXES = ("model.encoder.vision_tower.", "model.encoder.embed_vision.")

GLOBAL_NAMES = {
    "embed_tokens.weight": "token_embd.weight",          # also the output head (tied)
    "norm.weight": "output_norm.weight",
    "self_conditioning.pre_norm.weight": "self_cond_pre_norm.weight",
    "self_conditioning.gate_proj.weight": "self_cond_gate.weight",
    "self_conditioning.up_proj.weight": "self_cond_up.weight",
    "self_conditioning.down_proj.weight": "self_cond_down.weight",
}

LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",          # sliding layers only: full layers use K as V
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    "pre_feedforward_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "post_feedforward_layernorm_1.weight": "post_ffw_norm_1.weight",
    "router.proj.weight": "ffn_gate_inp.weight",
    "router.scale": "ffn_gate_inp.scale",
    "router.per_expert_scale": "ffn_down_exps.scale",
    "pre_feedforward_layernorm_2.weight": "pre_ffw_norm_2.weight",
    "experts.gate_up_proj": "ffn_gate_up_exps.weight",   # [E, 2I, H], gate rows first, kept merged
    "experts.down_proj": "ffn_down_exps.weight",         # [E, H, I]
    "post_feedforward_layernorm_2.weight": "post_ffw_norm_2.weight",
    "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
    "layer_scalar": "layer_output_scale.weight",         # decoder scalar
}
ENCODER_SCALAR = "enc_layer_output_scale.weight"
ROPE_FREQS = "rope_freqs.weight"


def expected_shapes(cfg: TextConfig) -> dict[str, tuple[int, ...]]:
    """HF name → PyTorch shape of every text tensor the checkpoint must hold."""
    H, V, F, I, E = (cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size, cfg.moe_intermediate_size,
                     cfg.num_experts)
    out = {DECODER + k: s for k, s in {
        "embed_tokens.weight": (V, H), "norm.weight": (H,), "self_conditioning.pre_norm.weight": (H,),
        "self_conditioning.gate_proj.weight": (F, H), "self_conditioning.up_proj.weight": (F, H),
        "self_conditioning.down_proj.weight": (H, F)}.items()}
    for i in range(cfg.num_hidden_layers):
        d, kv, nh = cfg.head_dims[i], cfg.kv_heads[i], cfg.num_attention_heads
        shapes = {
            "input_layernorm.weight": (H,), "self_attn.q_proj.weight": (nh * d, H),
            "self_attn.k_proj.weight": (kv * d, H), "self_attn.v_proj.weight": (kv * d, H),
            "self_attn.o_proj.weight": (H, nh * d), "self_attn.q_norm.weight": (d,),
            "self_attn.k_norm.weight": (d,), "post_attention_layernorm.weight": (H,),
            "pre_feedforward_layernorm.weight": (H,), "mlp.gate_proj.weight": (F, H), "mlp.up_proj.weight": (F, H),
            "mlp.down_proj.weight": (H, F), "post_feedforward_layernorm_1.weight": (H,),
            "router.proj.weight": (E, H), "router.scale": (H,), "router.per_expert_scale": (E,),
            "pre_feedforward_layernorm_2.weight": (H,), "experts.gate_up_proj": (E, 2 * I, H),
            "experts.down_proj": (E, H, I), "post_feedforward_layernorm_2.weight": (H,),
            "post_feedforward_layernorm.weight": (H,), "layer_scalar": (1,)}
        if not cfg.is_sliding(i):
            del shapes["self_attn.v_proj.weight"]
        out.update({f"{DECODER}layers.{i}.{k}": s for k, s in shapes.items()})
        out[f"{ENCODER_LAYER}{i}.layer_scalar"] = (1,)
    return out


_LAYER_RE = re.compile(r"^model\.decoder\.layers\.(\d+)\.(.+)$")
_ENC_RE = re.compile(r"^model\.encoder\.language_model\.layers\.(\d+)\.layer_scalar$")


def gguf_name(hf_name: str) -> str | None:
    """The GGUF name of a checkpoint tensor, or None for a dropped (vision) tensor."""
    if hf_name.startswith(DROPPED_PREFIXES):
        return None
    if m := _LAYER_RE.match(hf_name):
        if m.group(2) in LAYER_NAMES:
            return f"blk.{m.group(1)}.{LAYER_NAMES[m.group(2)]}"
    elif m := _ENC_RE.match(hf_name):
        return f"blk.{m.group(1)}.{ENCODER_SCALAR}"
    elif hf_name.startswith(DECODER) and hf_name[len(DECODER):] in GLOBAL_NAMES:
        return GLOBAL_NAMES[hf_name[len(DECODER):]]
    raise DggufError(f"unexpected tensor {hf_name} (not part of DiffusionGemma)")


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
        raise DggufError(f"unexpected tensor {extra[0]} (not part of DiffusionGemma with this config)")
    for n, s in present.items():
        if tuple(s) != expected[n]:
            raise DggufError(f"tensor {n} has shape {list(s)}, config implies {list(expected[n])}")
    return [(n, gguf_name(n)) for n in sorted(present, key=_natural_key)]
