"""The GGUF metadata of a DiffusionGemma file: PR #24423's keys, values and types, plus the keys we add.

Our additions (documented in docs/gguf-format.md): diffusion-gemma.final_logit_softcapping,
diffusion-gemma.embedding_scale, diffusion-gemma.text_only, diffusion.eos_token_ids,
tokenizer.huggingface.json.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from gguf.constants import GGUFValueType as V
from gguf.utility import size_label

from dgguf.core.errors import DggufError
from dgguf.format.arch import ARCH
from dgguf.format.gguf_file import Field, printable

from .checkpoint import TextConfig, embedding_scale, load_json


# llama.cpp token types
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_BYTE_TOKEN = re.compile(r"^<0x[0-9A-F]{2}>$")


def _u32(v):
    return Field(V.UINT32, int(v))


def _f32(v):
    return Field(V.FLOAT32, float(v))


def _arr(item_type, values):
    return Field(V.ARRAY, list(values), item_type)


def model_fields(cfg: TextConfig, gen: dict, name: str, file_type: int, n_params: tuple[int, int, int]) -> dict:
    """Architecture and sampler keys, in the order PR #24423's converter writes them."""
    a = ARCH + "."
    total, shared, expert = n_params
    return {
        "general.architecture": Field(V.STRING, ARCH),
        "general.type": Field(V.STRING, "model"),
        "general.name": Field(V.STRING, name),
        "general.size_label": Field(V.STRING, size_label(total, shared, expert, cfg.num_experts)),
        a + "block_count": _u32(cfg.num_hidden_layers),
        a + "context_length": _u32(cfg.max_position_embeddings),
        a + "embedding_length": _u32(cfg.hidden_size),
        a + "feed_forward_length": _u32(cfg.intermediate_size),
        a + "attention.head_count": _u32(cfg.num_attention_heads),
        a + "attention.head_count_kv": _arr(V.INT32, cfg.kv_heads),
        a + "rope.freq_base": _f32(cfg.rope_theta_full),
        a + "rope.freq_base_swa": _f32(cfg.rope_theta_sliding),
        a + "attention.layer_norm_rms_epsilon": _f32(cfg.rms_norm_eps),
        a + "expert_count": _u32(cfg.num_experts),
        a + "expert_used_count": _u32(cfg.top_k_experts),
        a + "attention.key_length": _u32(cfg.global_head_dim),
        a + "attention.value_length": _u32(cfg.global_head_dim),
        "general.file_type": _u32(file_type),
        a + "attention.sliding_window": _u32(cfg.sliding_window),
        a + "attention.shared_kv_layers": _u32(0),
        a + "embedding_length_per_layer_input": _u32(0),
        a + "attention.sliding_window_pattern": _arr(V.BOOL, [cfg.is_sliding(i) for i in range(cfg.num_hidden_layers)]),
        a + "attention.key_length_swa": _u32(cfg.head_dim),
        a + "attention.value_length_swa": _u32(cfg.head_dim),
        a + "expert_feed_forward_length": _u32(cfg.moe_intermediate_size),
        a + "rope.dimension_count": _u32(cfg.global_head_dim),
        a + "rope.dimension_count_swa": _u32(cfg.head_dim),
        a + "attention.causal": Field(V.BOOL, False),
        "diffusion.canvas_length": _u32(cfg.canvas_length),
        "diffusion.eb_max_steps": _u32(gen["max_denoising_steps"]),
        "diffusion.eb_t_min": _f32(gen["t_min"]),
        "diffusion.eb_t_max": _f32(gen["t_max"]),
        "diffusion.eb_entropy_bound": _f32(gen["entropy_bound"]),
        "diffusion.eb_stability_threshold": _u32(gen["stability_threshold"]),
        "diffusion.eb_confidence_threshold": _f32(gen["confidence_threshold"]),
        "general.quantization_version": _u32(2),
        # ours
        a + "final_logit_softcapping": _f32(cfg.final_logit_softcapping),
        a + "embedding_scale": _f32(embedding_scale(cfg.hidden_size, cfg.dtype)),
        a + "text_only": Field(V.BOOL, True),
        "diffusion.eos_token_ids": _arr(V.UINT32, gen["eos_token_ids"] or cfg.eos_token_ids),
    }


def rope_freqs(cfg: TextConfig) -> list[float]:
    """Frequency factors of the full layers' proportional RoPE: 1 for rotated pairs, 1e30 (no rotation) after."""
    n = cfg.global_head_dim // 2
    rotated = int(cfg.partial_rotary_factor * cfg.global_head_dim / 2)
    return [1.0] * rotated + [1e30] * (n - rotated)


def tokenizer_fields(hf_dir: Path, cfg: TextConfig, gen: dict) -> dict:
    """tokenizer.ggml.* from tokenizer.json / tokenizer_config.json, plus the exact HF JSON and chat template."""
    tok_path = hf_dir / "tokenizer.json"
    if not tok_path.is_file():
        raise DggufError(f"{tok_path}: tokenizer.json not found (dgguf embeds the HF tokenizer)")
    try:
        raw_json = tok_path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DggufError(f"{tok_path}: not UTF-8 ({e})") from e
    except OSError as e:
        raise DggufError(f"{tok_path}: cannot read: {e.strerror or e}") from e
    tc_path = hf_dir / "tokenizer_config.json"
    tcfg = load_json(tc_path, "tokenizer_config.json") if tc_path.exists() else {}
    try:
        tok = json.loads(raw_json)
        model = tok["model"]
        tokens: dict[int, str] = {_token_id(i): str(t) for t, i in model["vocab"].items()}
        special = set()
        for added in tok.get("added_tokens", []):
            tokens[_token_id(added["id"])] = str(added["content"])
            if added.get("special"):
                special.add(added["id"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError, RecursionError) as e:
        raise DggufError(f"{tok_path}: not an HF tokenizer.json ({printable(repr(e), 200)})") from e
    if not tokens or min(tokens) < 0:
        raise DggufError(f"{tok_path}: empty vocabulary or negative token id")
    if max(tokens) >= cfg.vocab_size:
        raise DggufError(f"{tok_path}: token id {max(tokens)} is outside the model's vocabulary ({cfg.vocab_size})")
    names, types = [], []
    for i in range(cfg.vocab_size):
        t = tokens.get(i)
        if t is None:
            names.append(f"[PAD{i}]")
            types.append(UNUSED)
        else:
            names.append(t)
            types.append(CONTROL if i in special else BYTE if _BYTE_TOKEN.match(t) else NORMAL)
    merges = model.get("merges") or []
    if not isinstance(merges, list) or not all(
            isinstance(m, str) or (isinstance(m, list) and len(m) == 2 and all(isinstance(x, str) for x in m))
            for m in merges):
        raise DggufError(f"{tok_path}: not an HF tokenizer.json (model.merges must list \"a b\" strings or "
                         "[a, b] pairs of strings)")
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]

    ids = {t: i for i, t in tokens.items()}

    def special_id(key):
        v = tcfg.get(key)
        if isinstance(v, dict):
            v = v.get("content")
        return ids.get(v) if isinstance(v, str) else None

    eos = special_id("eos_token")
    eos = eos if eos is not None else (cfg.eos_token_ids or [None])[0]
    pad = special_id("pad_token")
    pad = pad if pad is not None else gen["pad_token_id"] if gen["pad_token_id"] is not None else cfg.pad_token_id
    mask = special_id("mask_token")
    out = {
        "tokenizer.ggml.model": Field(V.STRING, "gpt2" if _byte_level(tok) else "gemma4"),
        "tokenizer.ggml.tokens": _arr(V.STRING, names),
        "tokenizer.ggml.scores": _arr(V.FLOAT32, [-1000.0] * cfg.vocab_size),
        "tokenizer.ggml.token_type": _arr(V.INT32, types),
        "tokenizer.ggml.merges": _arr(V.STRING, merges),
    }
    bos = special_id("bos_token")
    for key, v in (("bos", bos if bos is not None else cfg.bos_token_id),
                   ("eos", eos), ("unknown", special_id("unk_token")), ("padding", pad),
                   ("mask", mask if mask is not None else pad)):
        if v is not None:
            out[f"tokenizer.ggml.{key}_token_id"] = _u32(v)
    out["tokenizer.ggml.add_bos_token"] = Field(V.BOOL, _flag(tc_path, tcfg, "add_bos_token", True))
    out["tokenizer.ggml.add_eos_token"] = Field(V.BOOL, _flag(tc_path, tcfg, "add_eos_token", False))
    template = _chat_template(hf_dir, tcfg)
    if template is not None:
        out["tokenizer.chat_template"] = Field(V.STRING, template)
    out["tokenizer.ggml.add_space_prefix"] = Field(V.BOOL, False)
    out["tokenizer.huggingface.json"] = Field(V.STRING, raw_json)
    return out


def _byte_level(tok: dict) -> bool:
    """Whether tokenizer.json is a byte-level BPE (GPT-2 style; llama.cpp's "gpt2" vocabulary): a ByteLevel
    pre-tokenizer, alone or in a Sequence. Gemma 4's tokenizer (no pre-tokenizer, "▁" for spaces) is "gemma4"."""
    pre = tok.get("pre_tokenizer")
    parts = pre.get("pretokenizers") if isinstance(pre, dict) and pre.get("type") == "Sequence" else [pre]
    return any(isinstance(p, dict) and p.get("type") == "ByteLevel" for p in parts or [])


def _token_id(v) -> int:
    """A token id of tokenizer.json: an integer, never a float (Infinity, 1.5) or a string."""
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"token id {printable(json.dumps(v))} is not an integer")
    return v


def _flag(path: Path, tcfg: dict, key: str, default: bool) -> bool:
    v = tcfg.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise DggufError(f"{path}: {key} must be true or false, not {printable(json.dumps(v))}")
    return v


def _chat_template(hf_dir: Path, tcfg: dict) -> str | None:
    """The template from chat_template.jinja (transformers >= 4.47 saves it there) or tokenizer_config.json."""
    jinja = hf_dir / "chat_template.jinja"
    if jinja.exists():
        if not jinja.is_file():
            raise DggufError(f"{jinja}: not a regular file")
        try:
            return jinja.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DggufError(f"{jinja}: not UTF-8 ({e})") from e
        except OSError as e:
            raise DggufError(f"{jinja}: cannot read: {e.strerror or e}") from e
    t = tcfg.get("chat_template")
    if isinstance(t, list):   # named templates: take the default one
        if not all(isinstance(x, dict) for x in t):
            raise DggufError(f"{hf_dir / 'tokenizer_config.json'}: chat_template must be a string or a list of "
                             "{name, template} objects")
        t = next((x.get("template") for x in t if x.get("name") == "default"), None)
    return t if isinstance(t, str) else None
