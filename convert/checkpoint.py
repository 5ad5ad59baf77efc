"""Reading an HF DiffusionGemma checkpoint: config, generation config, tokenizer files, safetensors shards.

Safetensors are parsed here (8-byte header length, JSON header, raw data) and memory-mapped with numpy rather
than loaded through the safetensors package: its numpy API has no bfloat16 and copies whole tensors, while
the converter must stream 47 GB of BF16 in bounded memory and name the file and tensor of any corruption.
"""
from __future__ import annotations

import json
import math
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dgguf.core.errors import DggufError
from dgguf.format.arch import ModelShape
from dgguf.format.gguf_file import printable

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
    """A JSON file that must hold an object; any other content is one clear error naming the file."""
    if not path.is_file():
        raise DggufError(f"{path}: {what} not found")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DggufError(f"{path}: invalid JSON ({printable(e, 200)})") from e
    except RecursionError as e:
        raise DggufError(f"{path}: invalid JSON (nested too deeply)") from e
    except OSError as e:
        raise DggufError(f"{path}: cannot read: {e.strerror or e}") from e
    if not isinstance(obj, dict):
        raise DggufError(f"{path}: {what} must be a JSON object, not {_json_kind(obj)}")
    return obj


def _json_kind(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    return {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number"}.get(
        type(v), type(v).__name__)


def _show(v) -> str:
    """A config value for a message: JSON-spelled, escaped and cut short."""
    try:
        text = json.dumps(v)
    except (TypeError, ValueError, RecursionError):
        text = repr(v)
    return printable(text)


# Upper bounds on config values. Sizes reach native code as C ints and the GGUF as UINT32.
INT_MAX = 2**31 - 1
MAX_LAYERS = 4096           # as the loader (runtime/model_config.py)
MAX_HEAD_DIM = 1 << 16
MAX_CANVAS = 1 << 16        # and at most max_position_embeddings
MAX_STEPS = 1 << 16         # max_denoising_steps, stability_threshold


def _int_value(path, key: str, v, lo: int, hi: int) -> int:
    """An integer in lo..hi. A float is accepted only when integral (256.0), never truncated (256.7)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not v.is_integer()):
        raise DggufError(f"{path}: {key} must be an integer, not {_show(v)}")
    v = int(v)
    if not lo <= v <= hi:
        raise DggufError(f"{path}: {key} = {v} is outside {lo}..{hi}")
    return v


_F32_MAX = float(np.finfo(np.float32).max)


def _float_value(path, key: str, v, lo: float | None = None, hi: float | None = None, lo_open: bool = True) -> float:
    """A finite number in (lo, hi] (or [lo, hi] when not lo_open)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise DggufError(f"{path}: {key} must be a number, not {_show(v)}")
    x = float(v)
    if not math.isfinite(x):
        raise DggufError(f"{path}: {key} must be a finite number, not {_show(v)}")
    # The GGUF stores it as FLOAT32: the rounded value must be finite and in range too (1e39 is inf, 1e-50 is 0)
    x32 = float(np.float32(x)) if abs(x) <= _F32_MAX else math.inf
    if not math.isfinite(x32):
        raise DggufError(f"{path}: {key} = {x!r} is outside the float32 range")
    if lo is not None and (min(x, x32) < lo or (lo_open and lo in (x, x32))) or hi is not None and max(x, x32) > hi:
        left = "(" if lo_open else "["
        raise DggufError(f"{path}: {key} = {x!r} is outside {left}{'-inf' if lo is None else lo}, "
                         f"{'inf' if hi is None else hi}]")
    return x


class _Values:
    """Typed, range-checked reads from one JSON object; every error names the file and the key."""

    def __init__(self, path, obj: dict, prefix: str = ""):
        self.path, self.obj, self.prefix = path, obj, prefix

    def key(self, k: str) -> str:
        return self.prefix + k

    def get(self, k: str):
        """The value, None when absent or null."""
        return self.obj.get(k)

    def int(self, k: str, lo: int = 1, hi: int = INT_MAX, default=None, required: bool = False) -> int | None:
        v = self.obj.get(k)
        if v is None:
            if required:
                raise DggufError(f"{self.path}: {self.prefix.rstrip('.') or 'config'} lacks {k}")
            return default
        return _int_value(self.path, self.key(k), v, lo, hi)

    def float(self, k: str, lo: float | None = 0.0, hi: float | None = None, default=None, lo_open=True):
        v = self.obj.get(k)
        return default if v is None else _float_value(self.path, self.key(k), v, lo, hi, lo_open)

    def obj_(self, k: str) -> "_Values":
        """A nested object (absent or null: empty)."""
        v = self.obj.get(k)
        if v is None:
            v = {}
        if not isinstance(v, dict):
            raise DggufError(f"{self.path}: {self.key(k)} must be an object, not {_json_kind(v)}")
        return _Values(self.path, v, self.key(k) + ".")

    def token_ids(self, k: str, vocab_size: int | None) -> list[int]:
        """An id or a list of ids (absent or null: none), each within the vocabulary."""
        v = self.obj.get(k)
        if v is None:
            return []
        hi = vocab_size - 1 if vocab_size else INT_MAX
        items = v if isinstance(v, list) else [v]
        return [_int_value(self.path, self.key(k), x, 0, hi) for x in items]


def read_config(hf_dir: Path, tensor_shapes: dict[str, tuple[int, ...]] | None = None) -> tuple[TextConfig, dict]:
    """Parse HF_DIR/config.json; see read_config_file."""
    return read_config_file(hf_dir / "config.json", tensor_shapes)


_LAYER = "model.decoder.layers.{i}.self_attn."


def _dims_from_tensors(shapes: dict[str, tuple[int, ...]], i: int) -> tuple[int | None, int | None]:
    """(head_dim, KV heads) of layer i as its k_norm and k_proj tensors give them, None where they do not."""
    k_norm = shapes.get(_LAYER.format(i=i) + "k_norm.weight")
    k_proj = shapes.get(_LAYER.format(i=i) + "k_proj.weight")
    d = int(k_norm[0]) if k_norm is not None and len(k_norm) == 1 and k_norm[0] > 0 else None
    kv = None
    if d is not None and k_proj is not None and len(k_proj) == 2 and k_proj[0] % d == 0 and k_proj[0] > 0:
        kv = int(k_proj[0]) // d
    return d, kv


def read_config_file(path: Path, tensor_shapes: dict[str, tuple[int, ...]] | None = None
                     ) -> tuple[TextConfig, dict]:
    """Parse a config.json (release form with global_head_dim, or re-saved form with per_layer_config).

    Every value is type- and range-checked (one error naming the key). Head dims and KV heads the config leaves
    unset (no head_dim / num_key_value_heads; for full layers no global_* key and no per_layer_config entry) come
    from the checkpoint's k_norm / k_proj tensors when `tensor_shapes` is given, else transformers' defaults.
    Returns the text config and the raw config dict."""
    raw = load_json(path, "config.json")
    archs = raw.get("architectures") or []
    if not isinstance(archs, list):
        archs = [archs]
    if ARCHITECTURE not in archs and raw.get("model_type") != "diffusion_gemma":
        found = ", ".join(printable(a) for a in archs) or printable(raw.get("model_type") or "none")
        raise DggufError(f"{path}: unknown architecture {found} (expected {ARCHITECTURE})")
    if not isinstance(raw.get("text_config"), dict):
        raise DggufError(f"{path}: no text_config")
    top = _Values(path, raw)
    tc = top.obj_("text_config")
    n_layers = tc.int("num_hidden_layers", 1, MAX_LAYERS, required=True)
    layer_types = tc.get("layer_types") or [
        "full_attention" if (i + 1) % 6 == 0 or i == n_layers - 1 else "sliding_attention" for i in range(n_layers)]
    if not isinstance(layer_types, list) or len(layer_types) != n_layers or any(
            t not in ("sliding_attention", "full_attention") for t in layer_types):
        raise DggufError(f"{path}: text_config.layer_types must list {n_layers} sliding_attention/full_attention "
                         "entries")
    n_heads = tc.int("num_attention_heads", required=True)
    head_dim = tc.int("head_dim", 2, MAX_HEAD_DIM)
    n_kv = tc.int("num_key_value_heads", 1, n_heads)
    g_dim = tc.int("global_head_dim", 2, MAX_HEAD_DIM)
    g_kv = tc.int("num_global_key_value_heads", 1, n_heads)
    plc_raw = tc.get("per_layer_config")
    plc = tc.obj_("per_layer_config")
    overrides: dict[int, _Values] = {}
    for k in plc.obj:
        if not (isinstance(k, str) and k.isdigit() and int(k) < n_layers):
            raise DggufError(f"{path}: text_config.per_layer_config has key {_show(k)}, expected a layer index "
                             f"0..{n_layers - 1}")
        overrides[int(k)] = plc.obj_(k)
    # Full layers: a per_layer_config entry wins, then global_* keys (release form). Where neither is given, the
    # tensors decide; without tensors, transformers' defaults: the base values when per_layer_config is present
    # (re-saved form: it lists only layers that differ), else head_dim 512 and the sliding layers' KV heads.
    head_dims, kv_heads = [], []
    for i, t in enumerate(layer_types):
        sliding = t == "sliding_attention"
        o = overrides.get(i)
        d = o.int("head_dim", 2, MAX_HEAD_DIM) if o is not None else None
        kv = o.int("num_key_value_heads", 1, n_heads) if o is not None else None
        if d is None:
            d = head_dim if sliding or plc_raw is not None else g_dim
        if kv is None:
            kv = n_kv if sliding or plc_raw is not None else g_kv
        if tensor_shapes is not None and (d is None or kv is None):
            td, tkv = _dims_from_tensors(tensor_shapes, i)
            d, kv = d or td, kv or tkv
        default_d = 256 if sliding or plc_raw is not None else 512
        head_dims.append(d or default_d)
        kv_heads.append(kv or n_kv or 4)
    for i, (d, kv) in enumerate(zip(head_dims, kv_heads)):
        if d % 2 or not 2 <= d <= MAX_HEAD_DIM:
            raise DggufError(f"{path}: layer {i} has head_dim {d}; an even number in 2..{MAX_HEAD_DIM} is expected")
        if not 1 <= kv <= n_heads or n_heads % kv:
            raise DggufError(f"{path}: layer {i} has {kv} KV heads; num_attention_heads {n_heads} must be a "
                             "multiple of it")
    rope = tc.obj_("rope_parameters")
    full, sliding_rope = rope.obj_("full_attention"), rope.obj_("sliding_attention")
    dtype = raw.get("dtype") or raw.get("torch_dtype") or tc.get("dtype") or "float32"
    if dtype not in ("float32", "bfloat16", "float16"):
        raise DggufError(f"{path}: unsupported dtype {_show(dtype)} (float32, bfloat16 or float16)")
    vocab = tc.int("vocab_size", required=True)
    n_experts = tc.int("num_experts", 1, 1 << 16, required=True)
    context = tc.int("max_position_embeddings", default=131072)
    tc.token_ids("eos_token_id", vocab)     # checked even where the top-level list is used
    canvas = top.int("canvas_length", 1, min(MAX_CANVAS, context))
    if canvas is None:
        canvas = 256     # transformers' default
        if canvas > context:
            raise DggufError(f"{path}: canvas_length is not set and its default {canvas} is larger than "
                             f"text_config.max_position_embeddings {context}")
    cfg = TextConfig(
        vocab_size=vocab, hidden_size=tc.int("hidden_size", required=True),
        intermediate_size=tc.int("intermediate_size", required=True),
        moe_intermediate_size=tc.int("moe_intermediate_size", required=True),
        num_hidden_layers=n_layers, num_attention_heads=n_heads,
        num_experts=n_experts, top_k_experts=tc.int("top_k_experts", 1, n_experts, required=True),
        rms_norm_eps=tc.float("rms_norm_eps", 0.0, 1.0, default=1e-6),
        sliding_window=tc.int("sliding_window", default=512),
        max_position_embeddings=context,
        layer_types=list(layer_types), head_dims=head_dims, kv_heads=kv_heads,
        rope_theta_sliding=sliding_rope.float("rope_theta", default=10000.0),
        rope_theta_full=full.float("rope_theta", default=1000000.0),
        partial_rotary_factor=full.float("partial_rotary_factor", 0.0, 1.0, default=0.25),
        final_logit_softcapping=tc.float("final_logit_softcapping", default=30.0),
        canvas_length=canvas, dtype=dtype,
        eos_token_ids=top.token_ids("eos_token_id", vocab) or tc.token_ids("eos_token_id", vocab),
        pad_token_id=tc.int("pad_token_id", 0, vocab - 1), bos_token_id=tc.int("bos_token_id", 0, vocab - 1),
    )
    for kind in ("sliding_attention", "full_attention"):
        dims = {(d, kv) for d, kv, t in zip(cfg.head_dims, cfg.kv_heads, cfg.layer_types) if t == kind}
        if len(dims) > 1:
            raise DggufError(f"{path}: {kind} layers differ in head_dim / KV heads {sorted(dims)}; the GGUF layout "
                             "holds one value per layer type")
    return cfg, raw


def read_generation_config(hf_dir: Path, vocab_size: int | None = None) -> dict:
    """Sampler settings (defaults filled in, each checked as the runtime's sampler checks it) plus eos/pad as
    generation_config.json gives them (ids checked against vocab_size when given)."""
    path = hf_dir / "generation_config.json"
    raw = load_json(path, "generation_config.json") if path.exists() else {}
    g = _Values(path, raw)
    sampler = g.obj_("sampler_config")
    bound, nested_bound = g.float("entropy_bound"), sampler.float("entropy_bound")   # both checked
    out = {
        "max_denoising_steps": g.int("max_denoising_steps", 1, MAX_STEPS),
        "t_min": g.float("t_min"), "t_max": g.float("t_max"),
        "entropy_bound": nested_bound if nested_bound is not None else bound,
        "stability_threshold": g.int("stability_threshold", 1, MAX_STEPS),
        "confidence_threshold": g.float("confidence_threshold", lo_open=False),
    }
    out = {k: v if v is not None else SAMPLER_DEFAULTS[k] for k, v in out.items()}
    if out["t_min"] > out["t_max"]:
        raise DggufError(f"{path}: t_min ({out['t_min']}) must not exceed t_max ({out['t_max']})")
    out["eos_token_ids"] = g.token_ids("eos_token_id", vocab_size)
    out["pad_token_id"] = g.int("pad_token_id", 0, vocab_size - 1 if vocab_size else INT_MAX)
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

    def view(self):
        """The data as a read-only memory-mapped 2-D array [rows, row length] in its stored dtype. Where the data
        does not start at a multiple of its item size (a header not padded to 8 bytes: old writers, or hostile
        files), rows are copied when sliced, so native code never gets a misaligned pointer (UB in C)."""
        ncols = self.shape[-1] if self.shape else 1
        dtype = _DTYPES[self.dtype]
        mm = np.memmap(self.file, dtype=dtype, mode="r", offset=self.offset, shape=(self.rows(), ncols))
        return mm if self.offset % dtype.itemsize == 0 else _CopiedRows(mm)


class _CopiedRows:
    """Row slices of a misaligned mapping, each copied (so aligned) when taken."""

    def __init__(self, mm: np.memmap):
        self._mm = mm
        self.shape, self.dtype = mm.shape, mm.dtype

    def __len__(self) -> int:
        return len(self._mm)

    def __getitem__(self, key) -> np.ndarray:
        return np.array(self._mm[key])

    def __array__(self, dtype=None, copy=None):
        return np.array(self._mm, dtype=dtype)


def _read_safetensors_header(path: Path) -> list[SourceTensor]:
    where = _shown(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise DggufError(f"{where}: truncated safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100 * 2**20:
                raise DggufError(f"{where}: truncated or corrupt safetensors header (claims {n} bytes)")
            meta = json.loads(f.read(n))
    except OSError as e:
        raise DggufError(f"{where}: cannot read: {e.strerror or e}") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DggufError(f"{where}: corrupt safetensors header ({printable(e, 200)})") from e
    except RecursionError as e:
        raise DggufError(f"{where}: corrupt safetensors header (JSON nested too deeply)") from e
    if not isinstance(meta, dict):
        raise DggufError(f"{where}: corrupt safetensors header (not a JSON object)")
    base = 8 + n
    out = []
    for name, info in meta.items():
        if name == "__metadata__":
            continue
        shown = printable(name)
        if not isinstance(info, dict):
            raise DggufError(f"{where}: corrupt safetensors entry for {shown} (not a JSON object)")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise DggufError(f"{where}: corrupt safetensors entry for {shown}: shape {_show(shape)} is not a list "
                             "of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise DggufError(f"{where}: corrupt safetensors entry for {shown}: data_offsets {_show(offsets)} are not "
                             "two increasing non-negative integers")
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise DggufError(f"{where}: tensor {shown} has unsupported dtype {_show(dtype)} (F32, F16 and BF16 are "
                             "supported)")
        shape, (start, end) = tuple(shape), offsets
        nbytes = math.prod(shape) * _DTYPES[dtype].itemsize
        if end - start != nbytes:
            raise DggufError(f"{where}: tensor {shown} has {end - start} bytes for shape {list(shape)} {dtype}")
        if base + end > size:
            raise DggufError(f"{where}: truncated: tensor {shown} ends at byte {base + end}, file has {size}")
        out.append(SourceTensor(name, dtype, shape, path, base + start, nbytes))
    return out


def _shown(path: Path) -> str:
    """A path whose file name came from a file (an index), escaped for a message."""
    return f"{path.parent}{os.sep}{printable(path.name, 200)}"


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _allowed_roots(hf_dir: Path) -> list[Path]:
    """Where a shard may really live: the checkpoint directory, and for a Hugging Face hub cache snapshot
    (.../models--ORG--NAME/snapshots/REV, whose files are links to ../../blobs/HASH) that repository's blobs."""
    root = hf_dir.resolve()
    roots = [root]
    if root.parent.name == "snapshots":
        roots.append(root.parent.parent / "blobs")
    return roots


def shard_path(hf_dir: Path, index: Path, tensor, fname) -> Path:
    """The shard an index names for a tensor: a plain file name inside the checkpoint directory, checked
    before anything is opened (no absolute path, no separator, no . or .., nothing that links outside)."""
    if not isinstance(fname, str):
        raise DggufError(f"{index}: weight_map entry for {printable(tensor)} is {_json_kind(fname)}, expected "
                         "a file name")
    shown = printable(fname)
    if (not fname or fname in (".", "..") or "/" in fname or "\\" in fname or "\0" in fname
            or os.path.isabs(fname) or os.sep in fname or (os.altsep and os.altsep in fname)):
        raise DggufError(f"{index}: weight_map names '{shown}' for {printable(tensor)}; expected a file name in "
                         "the checkpoint directory (no path)")
    path = hf_dir / fname
    try:
        real = path.resolve()
    except (OSError, RuntimeError) as e:   # a name too long, a link loop
        raise DggufError(f"{index}: weight_map names '{shown}', which cannot be resolved ({e})") from e
    if not any(real.parent == r or r in real.parents for r in _allowed_roots(hf_dir)):
        raise DggufError(f"{index}: weight_map names '{shown}', which leads outside the checkpoint directory "
                         f"(to {printable(real, 200)})")
    return path


def input_files(hf_dir: Path) -> list[Path]:
    """The files a conversion of hf_dir reads (for the output-path check): configs, tokenizer files, index and
    every safetensors file of the directory. Only those that exist."""
    names = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
             "chat_template.jinja", "model.safetensors.index.json"]
    out = [hf_dir / n for n in names if (hf_dir / n).exists()]
    return out + sorted(hf_dir.glob("*.safetensors"))


def read_tensors(hf_dir: Path) -> dict[str, SourceTensor]:
    """Every tensor of the checkpoint (single file or index + shards), headers only. The index's file names are
    all checked (shard_path) before any shard is opened."""
    index = hf_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = load_json(index, "index").get("weight_map")
        if not isinstance(weight_map, dict):
            raise DggufError(f"{index}: no weight_map")
        paths = {name: shard_path(hf_dir, index, name, fname) for name, fname in weight_map.items()}
        files = sorted(set(paths.values()))
    elif (hf_dir / "model.safetensors").exists():
        paths, files = None, [hf_dir / "model.safetensors"]
    else:
        raise DggufError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json")
    tensors: dict[str, SourceTensor] = {}
    for path in files:
        try:
            mode = path.stat().st_mode
        except FileNotFoundError:
            raise DggufError(f"{_shown(path)}: shard listed in the index is missing") from None
        except OSError as e:   # a name too long, a link loop, no permission
            raise DggufError(f"{_shown(path)}: cannot read: {e.strerror or e}") from e
        if not stat.S_ISREG(mode):
            raise DggufError(f"{_shown(path)}: not a regular file")
        for t in _read_safetensors_header(path):
            if t.name in tensors:
                raise DggufError(f"{path}: tensor {printable(t.name)} also appears in {tensors[t.name].file.name}")
            tensors[t.name] = t
    if paths is not None:
        for name, path in paths.items():
            if name not in tensors:
                raise DggufError(f"{_shown(path)}: tensor {printable(name)} listed in the index is not in the shard")
    return tensors
