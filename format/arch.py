"""The `diffusion-gemma` architecture as data: its shape parameters and the one table of its tensors.

Every other list of tensors derives from TENSORS: the converter's checkpoint-name map and expected shapes
(convert/tensor_names.py), the loader's validation (runtime/model_config.py), the native structs' fields
(runtime/native_model.py; tests/test_arch.py checks native/dgguf.h's dg_layer and dg_model against it) and
the planner's parts (runtime/planner.py). Names are those of the published files (llama.cpp draft PR #24423).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

ARCH = "diffusion-gemma"


@dataclass
class ModelShape:
    """The hyper-parameters that fix tensor sizes and the work of a pass."""
    vocab_size: int
    hidden_size: int
    n_layers: int
    n_heads: int
    kv_heads: list[int]
    head_dims: list[int]
    sliding: list[bool]
    sliding_window: int
    n_experts: int
    top_k: int
    expert_ff: int
    dense_ff: int
    canvas_length: int
    context_length: int

    def full_head_dim(self) -> int | None:
        return next((d for d, s in zip(self.head_dims, self.sliding) if not s), None)


@dataclass(frozen=True)
class TensorSpec:
    """One tensor: its GGUF name (under blk.N. for layer tensors), its checkpoint name ({i}: the layer; None
    when the converter computes it), its shape as ggml ne in the symbols of `sizes`, the field of native/dgguf.h
    that points at it (None: read by Python only), the planner's part, and which layers have it."""
    gguf: str
    hf: str | None
    ne: tuple[str, ...]
    field: str | None
    part: str
    layers: str = "all"     # all, sliding (layer tensors); global


def _t(gguf, hf, ne, field, part, layers="all"):
    return TensorSpec(gguf, hf, tuple(ne.split()), field, part, layers)


_D = "model.decoder."
_L = "model.decoder.layers.{i}."
TENSORS = (
    _t("token_embd.weight", _D + "embed_tokens.weight", "H V", "token_embd", "embedding", "global"),  # also the head
    _t("output_norm.weight", _D + "norm.weight", "H", "output_norm", "norms", "global"),
    _t("self_cond_pre_norm.weight", _D + "self_conditioning.pre_norm.weight", "H", "sc_pre_norm",
       "self_conditioning", "global"),
    _t("self_cond_gate.weight", _D + "self_conditioning.gate_proj.weight", "H F", "sc_gate", "self_conditioning",
       "global"),
    _t("self_cond_up.weight", _D + "self_conditioning.up_proj.weight", "H F", "sc_up", "self_conditioning", "global"),
    _t("self_cond_down.weight", _D + "self_conditioning.down_proj.weight", "F H", "sc_down", "self_conditioning",
       "global"),
    _t("rope_freqs.weight", None, "R", None, "norms", "global"),   # written when some layer is full attention
    _t("attn_norm.weight", _L + "input_layernorm.weight", "H", "attn_norm", "attention"),
    _t("attn_q.weight", _L + "self_attn.q_proj.weight", "H nh*d", "attn_q", "attention"),
    _t("attn_k.weight", _L + "self_attn.k_proj.weight", "H kv*d", "attn_k", "attention"),
    _t("attn_v.weight", _L + "self_attn.v_proj.weight", "H kv*d", "attn_v", "attention", "sliding"),  # full: V = K
    _t("attn_output.weight", _L + "self_attn.o_proj.weight", "nh*d H", "attn_output", "attention"),
    _t("attn_q_norm.weight", _L + "self_attn.q_norm.weight", "d", "attn_q_norm", "attention"),
    _t("attn_k_norm.weight", _L + "self_attn.k_norm.weight", "d", "attn_k_norm", "attention"),
    _t("post_attention_norm.weight", _L + "post_attention_layernorm.weight", "H", "post_attention_norm", "norms"),
    _t("ffn_norm.weight", _L + "pre_feedforward_layernorm.weight", "H", "ffn_norm", "norms"),
    _t("ffn_gate.weight", _L + "mlp.gate_proj.weight", "H F", "ffn_gate", "dense"),
    _t("ffn_up.weight", _L + "mlp.up_proj.weight", "H F", "ffn_up", "dense"),
    _t("ffn_down.weight", _L + "mlp.down_proj.weight", "F H", "ffn_down", "dense"),
    _t("post_ffw_norm_1.weight", _L + "post_feedforward_layernorm_1.weight", "H", "post_ffw_norm_1", "norms"),
    _t("ffn_gate_inp.weight", _L + "router.proj.weight", "H E", "ffn_gate_inp", "router"),
    _t("ffn_gate_inp.scale", _L + "router.scale", "H", "ffn_gate_inp_scale", "router"),
    _t("ffn_down_exps.scale", _L + "router.per_expert_scale", "E", "ffn_down_exps_scale", "router"),
    _t("pre_ffw_norm_2.weight", _L + "pre_feedforward_layernorm_2.weight", "H", "pre_ffw_norm_2", "norms"),
    # [E, 2I, H] in the checkpoint, gate rows first, kept merged as the published files do
    _t("ffn_gate_up_exps.weight", _L + "experts.gate_up_proj", "H 2*I E", "ffn_gate_up_exps", "experts"),
    _t("ffn_down_exps.weight", _L + "experts.down_proj", "I H E", "ffn_down_exps", "experts"),
    _t("post_ffw_norm_2.weight", _L + "post_feedforward_layernorm_2.weight", "H", "post_ffw_norm_2", "norms"),
    _t("post_ffw_norm.weight", _L + "post_feedforward_layernorm.weight", "H", "post_ffw_norm", "norms"),
    _t("layer_output_scale.weight", _L + "layer_scalar", "1", None, "norms"),                  # decoder scalar
    _t("enc_layer_output_scale.weight", "model.encoder.language_model.layers.{i}.layer_scalar", "1", None,
       "norms"),                                                                                  # encoder scalar
)
GLOBAL_TENSORS = tuple(t for t in TENSORS if t.layers == "global")
LAYER_TENSORS = tuple(t for t in TENSORS if t.layers != "global")
BY_GGUF = {t.gguf: t for t in TENSORS}


def sizes(s: ModelShape, layer: int | None = None) -> dict[str, int]:
    """The symbols of TensorSpec.ne: model sizes, and the layer's head dim and KV heads."""
    out = {"H": s.hidden_size, "V": s.vocab_size, "F": s.dense_ff, "I": s.expert_ff, "E": s.n_experts,
           "nh": s.n_heads, "R": (s.full_head_dim() or 0) // 2}
    if layer is not None:
        out.update(d=s.head_dims[layer], kv=s.kv_heads[layer])
    return out


def _dim(expr: str, sym: dict[str, int]) -> int:
    n = 1
    for f in expr.split("*"):
        n *= int(f) if f.isdigit() else sym[f]
    return n


def has_tensor(spec: TensorSpec, s: ModelShape, layer: int | None = None) -> bool:
    if spec.layers == "sliding":
        return s.sliding[layer]
    if spec.gguf == "rope_freqs.weight":
        return not all(s.sliding)
    return True


def expected_tensors(s: ModelShape) -> dict[str, tuple[int, ...]]:
    """GGUF name → ggml ne of every tensor of a model of this shape, in table order (globals, then layers)."""
    sym = sizes(s)
    out = {t.gguf: tuple(_dim(e, sym) for e in t.ne) for t in GLOBAL_TENSORS if has_tensor(t, s)}
    for i in range(s.n_layers):
        sym = sizes(s, i)
        out.update({f"blk.{i}.{t.gguf}": tuple(_dim(e, sym) for e in t.ne)
                    for t in LAYER_TENSORS if has_tensor(t, s, i)})
    return out


_LAYER_NAME = re.compile(r"^blk\.(\d+)\.(.+)$")


def spec_of(name: str) -> tuple[int | None, TensorSpec | None]:
    """(layer or None, spec or None) of a GGUF tensor name."""
    m = _LAYER_NAME.match(name)
    if m is None:
        t = BY_GGUF.get(name)
        return None, t if t is not None and t.layers == "global" else None
    t = BY_GGUF.get(m.group(2))
    return int(m.group(1)), t if t is not None and t.layers != "global" else None
