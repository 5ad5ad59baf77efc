"""Reading an HF DiffusionGemma checkpoint: config, generation config, tokenizer files, safetensors shards.

Safetensors are parsed here (8-byte header length, JSON header, raw data) and memory-mapped with numpy rather
than loaded through the safetensors package: its numpy API has no bfloat16 and copies whole tensors, while
the converter must stream 47 GB of BF16 in bounded memory and name the file and tensor of any corruption.
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dgguf.core.errors import DggufError
from dgguf.format.arch import ModelShape

ARCHITECTURE = "DiffusionGemmaForBlockDiffusion"

# Sampler defaults transformers applies when generation_config.json leaves a field unset.
SAMPLER_DEFAULTS = {"max_denoising_steps": 48, "t_min": 0.4, "t_max": 0.8, "entropy_bound": 0.1,
                    "stability_threshold": 1, "confidence_threshold": 0.005}

_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}


@dataclass
class TextConfig:
    """The text-model hyper-parameters, named as in transformers' DiffusionGemmaTextConfig."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_experts: int
    top_k_experts: int
    rms_norm_eps: float
    sliding_window: int
    max_position_embeddings: int
    layer_types: list[str]
    head_dims: list[int]          # per layer
    kv_heads: list[int]           # per layer
    rope_theta_sliding: float
    rope_theta_full: float
    partial_rotary_factor: float  # of the full layers' proportional RoPE
    final_logit_softcapping: float
    canvas_length: int
    dtype: str                    # checkpoint compute dtype: float32, bfloat16 or float16
    eos_token_ids: list[int]
    pad_token_id: int | None
    bos_token_id: int | None

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == "sliding_attention"

    def shape(self) -> ModelShape:
        n = self.num_hidden_layers
        return ModelShape(vocab_size=self.vocab_size, hidden_size=self.hidden_size, n_layers=n,
                          n_heads=self.num_attention_heads, kv_heads=list(self.kv_heads),
                          head_dims=list(self.head_dims), sliding=[self.is_sliding(i) for i in range(n)],
                          sliding_window=self.sliding_window, n_experts=self.num_experts, top_k=self.top_k_experts,
                          expert_ff=self.moe_intermediate_size, dense_ff=self.intermediate_size,
                          canvas_length=self.canvas_length, context_length=self.max_position_embeddings)

    @property
    def head_dim(self) -> int:
        return next((d for d, t in zip(self.head_dims, self.layer_types) if t == "sliding_attention"),
                    self.head_dims[0])

    @property
    def global_head_dim(self) -> int:
        return next((d for d, t in zip(self.head_dims, self.layer_types) if t == "full_attention"),
                    self.head_dims[0])


def load_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise DggufError(f"{path}: {what} not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DggufError(f"{path}: invalid JSON ({e})") from e


def _as_list(v) -> list[int]:
    if v is None:
        return []
    return [int(x) for x in (v if isinstance(v, list) else [v])]


def read_config(hf_dir: Path) -> tuple[TextConfig, dict]:
    """Parse HF_DIR/config.json; see read_config_file."""
    return read_config_file(hf_dir / "config.json")


def read_config_file(path: Path) -> tuple[TextConfig, dict]:
    """Parse a config.json (release form with global_head_dim, or re-saved form with per_layer_config).

    Returns the text config and the raw config dict."""
    raw = load_json(path, "config.json")
    archs = raw.get("architectures") or []
    if ARCHITECTURE not in archs and raw.get("model_type") != "diffusion_gemma":
        found = ", ".join(archs) or raw.get("model_type") or "none"
        raise DggufError(f"{path}: unknown architecture {found} (expected {ARCHITECTURE})")
    tc = raw.get("text_config")
    if not isinstance(tc, dict):
        raise DggufError(f"{path}: no text_config")
    try:
        n_layers = int(tc["num_hidden_layers"])
        layer_types = tc.get("layer_types") or [
            "full_attention" if (i + 1) % 6 == 0 or i == n_layers - 1 else "sliding_attention"
            for i in range(n_layers)]
        if len(layer_types) != n_layers or any(t not in ("sliding_attention", "full_attention") for t in layer_types):
            raise DggufError(f"{path}: layer_types must list {n_layers} sliding_attention/full_attention entries")
        head_dim, n_kv = int(tc.get("head_dim", 256)), int(tc.get("num_key_value_heads", 4))
        # Full layers: per_layer_config (re-saved form) wins, then global_* keys (release form),
        # then transformers' defaults (head_dim 512, KV heads as the sliding layers).
        g_dim = int(tc.get("global_head_dim") or 512)
        g_kv = int(tc.get("num_global_key_value_heads") or n_kv)
        plc = {int(k): v for k, v in (tc.get("per_layer_config") or {}).items()}
        head_dims, kv_heads = [], []
        for i, t in enumerate(layer_types):
            d, kv = (head_dim, n_kv) if t == "sliding_attention" else (g_dim, g_kv)
            d = int(plc.get(i, {}).get("head_dim", d))
            kv = int(plc.get(i, {}).get("num_key_value_heads", kv))
            head_dims.append(d)
            kv_heads.append(kv)
        rope = tc.get("rope_parameters") or {}
        full, sliding = rope.get("full_attention") or {}, rope.get("sliding_attention") or {}
        dtype = str(raw.get("dtype") or raw.get("torch_dtype") or tc.get("dtype") or "float32")
        cfg = TextConfig(
            vocab_size=int(tc["vocab_size"]), hidden_size=int(tc["hidden_size"]),
            intermediate_size=int(tc["intermediate_size"]),
            moe_intermediate_size=int(tc["moe_intermediate_size"]),
            num_hidden_layers=n_layers, num_attention_heads=int(tc["num_attention_heads"]),
            num_experts=int(tc["num_experts"]), top_k_experts=int(tc["top_k_experts"]),
            rms_norm_eps=float(tc.get("rms_norm_eps", 1e-6)), sliding_window=int(tc.get("sliding_window", 512)),
            max_position_embeddings=int(tc.get("max_position_embeddings", 131072)),
            layer_types=list(layer_types), head_dims=head_dims, kv_heads=kv_heads,
            rope_theta_sliding=float(sliding.get("rope_theta", 10000.0)),
            rope_theta_full=float(full.get("rope_theta", 1000000.0)),
            partial_rotary_factor=float(full.get("partial_rotary_factor", 0.25)),
            final_logit_softcapping=float(tc.get("final_logit_softcapping") or 30.0),
            canvas_length=int(raw.get("canvas_length", 256)), dtype=dtype,
            eos_token_ids=_as_list(raw.get("eos_token_id", tc.get("eos_token_id"))),
            pad_token_id=tc.get("pad_token_id"), bos_token_id=tc.get("bos_token_id"),
        )
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, KeyError):
            raise DggufError(f"{path}: text_config lacks {e.args[0]}") from e
        raise DggufError(f"{path}: invalid value in text_config ({e})") from e
    for kind in ("sliding_attention", "full_attention"):
        dims = {(d, kv) for d, kv, t in zip(cfg.head_dims, cfg.kv_heads, cfg.layer_types) if t == kind}
        if len(dims) > 1:
            raise DggufError(f"{path}: {kind} layers differ in head_dim / KV heads {sorted(dims)}; the GGUF layout "
                             "holds one value per layer type")
    if cfg.dtype not in ("float32", "bfloat16", "float16"):
        raise DggufError(f"{path}: unsupported dtype {cfg.dtype}")
    if cfg.top_k_experts > cfg.num_experts or cfg.num_hidden_layers < 1:
        raise DggufError(f"{path}: inconsistent config (top_k {cfg.top_k_experts} of {cfg.num_experts} experts)")
    return cfg, raw


def read_generation_config(hf_dir: Path) -> dict:
    """Sampler settings (defaults filled in) plus eos/pad as generation_config.json gives them."""
    path = hf_dir / "generation_config.json"
    raw = load_json(path, "generation_config.json") if path.exists() else {}
    out = {k: raw.get(k) if raw.get(k) is not None else v for k, v in SAMPLER_DEFAULTS.items()}
    sampler = raw.get("sampler_config") or {}
    if isinstance(sampler, dict) and sampler.get("entropy_bound") is not None:
        out["entropy_bound"] = sampler["entropy_bound"]
    out["eos_token_ids"] = _as_list(raw.get("eos_token_id"))
    out["pad_token_id"] = raw.get("pad_token_id")
    return out


def embedding_scale(hidden_size: int, dtype: str) -> float:
    """sqrt(H) rounded to the checkpoint's compute dtype, as transformers computes it (53.0 for 2816 in bf16)."""
    x = np.float32(math.sqrt(hidden_size))
    if dtype == "bfloat16":
        b = int(x.view(np.uint32))
        b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
        return float(np.uint32(b).view(np.float32))
    if dtype == "float16":
        return float(np.float16(x))
    return float(x)


# ------------------------------------------------------------------------------------------ safetensors

@dataclass
class SourceTensor:
    """One tensor of a safetensors file, mapped lazily."""
    name: str
    dtype: str            # F32, F16 or BF16
    shape: tuple[int, ...]
    file: Path
    offset: int           # absolute byte offset of the data
    nbytes: int

    def rows(self) -> int:
        return math.prod(self.shape[:-1]) if len(self.shape) > 1 else 1

    def view(self) -> np.ndarray:
        """The data as a read-only memory-mapped 2-D array [rows, row length] in its stored dtype."""
        ncols = self.shape[-1] if self.shape else 1
        return np.memmap(self.file, dtype=_DTYPES[self.dtype], mode="r", offset=self.offset,
                         shape=(self.rows(), ncols))


def _read_safetensors_header(path: Path) -> list[SourceTensor]:
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise DggufError(f"{path}: truncated safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100 * 2**20:
                raise DggufError(f"{path}: truncated or corrupt safetensors header (claims {n} bytes)")
            meta = json.loads(f.read(n))
    except OSError as e:
        raise DggufError(f"{path}: cannot read: {e.strerror}") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DggufError(f"{path}: corrupt safetensors header ({e})") from e
    if not isinstance(meta, dict):
        raise DggufError(f"{path}: corrupt safetensors header (not a JSON object)")
    base = 8 + n
    out = []
    for name, info in meta.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
            start, end = int(start), int(end)
            if min(shape, default=1) < 0 or not 0 <= start <= end:
                raise ValueError("negative size or offset")
        except (KeyError, TypeError, ValueError) as e:
            raise DggufError(f"{path}: corrupt safetensors entry for {name}") from e
        if dtype not in _DTYPES:
            raise DggufError(f"{path}: tensor {name} has unsupported dtype {dtype} (F32, F16 and BF16 are supported)")
        nbytes = math.prod(shape) * _DTYPES[dtype].itemsize
        if end - start != nbytes or start < 0:
            raise DggufError(f"{path}: tensor {name} has {end - start} bytes for shape {list(shape)} {dtype}")
        if base + end > size:
            raise DggufError(f"{path}: truncated: tensor {name} ends at byte {base + end}, file has {size}")
        out.append(SourceTensor(name, dtype, shape, path, base + start, nbytes))
    return out


def read_tensors(hf_dir: Path) -> dict[str, SourceTensor]:
    """Every tensor of the checkpoint (single file or index + shards), headers only."""
    index = hf_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = load_json(index, "index").get("weight_map")
        if not isinstance(weight_map, dict):
            raise DggufError(f"{index}: no weight_map")
        files = sorted(set(weight_map.values()))
    elif (hf_dir / "model.safetensors").exists():
        weight_map, files = None, ["model.safetensors"]
    else:
        raise DggufError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json")
    tensors: dict[str, SourceTensor] = {}
    for fname in files:
        path = hf_dir / fname
        if not path.is_file():
            raise DggufError(f"{path}: shard listed in the index is missing")
        for t in _read_safetensors_header(path):
            if t.name in tensors:
                raise DggufError(f"{path}: tensor {t.name} also appears in {tensors[t.name].file.name}")
            tensors[t.name] = t
    if weight_map is not None:
        for name, fname in weight_map.items():
            if name not in tensors:
                raise DggufError(f"{hf_dir / fname}: tensor {name} listed in the index is not in the shard")
    return tensors
