"""Coverage-guided fuzzing of what dgguf reads from untrusted files (atheris: libFuzzer over Python bytecode).

Targets (each input must end in success or DggufError; any other exception, a crash, a hang past -timeout
or RSS past -rss_limit_mb is a finding):

  gguf   the bytes are a GGUF file: read_gguf, read_model_config, Model.load and one canvas forward (2 context
         tokens, up to 4 canvas tokens, 1 thread), the model closed again.
  hf     the bytes are an HF checkpoint directory (see split_parts): config.json, generation_config.json,
         tokenizer_config.json, tokenizer.json, model.safetensors (its data zero-filled, sparse) and optionally
         model.safetensors.index.json, converted by convert_checkpoint (headers, configs, tokenizer fields,
         tensor plan, quantization, GGUF writer). A file convert writes must then load: read_model_config and
         a canvas forward on it must succeed (convert must not write what run refuses).
  tokenizer  (not in CI) a GGUF whose tokenizer is built (runtime/tokenizer.py) and used to encode and decode.

    python scripts/fuzz.py seeds DIR                # write seed corpora DIR/gguf and DIR/hf (from the fixtures)
    python scripts/fuzz.py run TARGET CORPUS [libFuzzer flags...]    # fuzz (CORPUS grows; -runs, -seed, ...)
    python scripts/fuzz.py replay TARGET FILE...   # run inputs once, no fuzzer: print each outcome (reproducers)
    python scripts/fuzz.py ci [--runs N] [--seed S] # the CI run: fresh seeds, each target for N inputs

scripts/fuzz.sh runs long sessions. The seeds are made at run time: small synthetic models of every tensor
type written with our GGUF writer, the PR #24423 fixture's headers (cut where the data starts, and shorter),
and tiny HF checkpoints whose configs and tokenizer files derive from the fixture's hf/ directory.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "pr24423-tiny"
TARGETS = ("gguf", "hf", "tokenizer")
CI_TARGETS = ("gguf", "hf")

# hf inputs: a control byte, then the files' contents joined by PART (absent trailing parts: no such file)
PART = b"\n#--dgguf-part--#\n"
HF_FILES = ("config.json", "generation_config.json", "tokenizer_config.json", "tokenizer.json", "model.safetensors",
            "model.safetensors.index.json")
HF_TYPES = (None, "Q8_0", "Q4_K_M", "F16", "Q4_0", "BF16", "Q6_K", "F32")   # control byte bits 1-3
MAX_PAD = 1 << 22          # zero-filled safetensors data at most this long (sparse, never read past the header)

_work: Path | None = None


def work_dir() -> Path:
    """A private scratch directory for this process, in memory where possible (/dev/shm). libFuzzer ends the
    process with exit(), past Python's clean-up, so directories of processes that no longer run are removed
    here."""
    global _work
    if _work is None:
        base = Path("/dev/shm" if os.access("/dev/shm", os.W_OK) else tempfile.gettempdir())
        for old in base.glob("dgguf-fuzz-[0-9]*"):
            try:
                os.kill(int(old.name.rsplit("-", 1)[1]), 0)
            except ProcessLookupError:
                shutil.rmtree(old, ignore_errors=True)
            except (OSError, ValueError):
                pass
        _work = base / f"dgguf-fuzz-{os.getpid()}"
        shutil.rmtree(_work, ignore_errors=True)
        _work.mkdir()
    return _work


def _write(path: Path, data: bytes) -> None:
    """A fresh inode each time: mappings of the last input's file (kept alive by garbage) stay untouched."""
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    path.write_bytes(data)


# ------------------------------------------------------------------------------------------------ targets

def run_gguf(data: bytes) -> None:
    from dgguf.core.errors import DggufError
    from dgguf.runtime.model import Model

    path = work_dir() / "input.gguf"
    _write(path, data)
    try:
        m = Model.load(path, threads=1, ctx=64)
    except DggufError:
        return
    try:
        V = m.config.vocab_size
        n = min(4, m.config.canvas_length)
        m.canvas_logits([0, 1 % V], [(i + 2) % V for i in range(n)])
    except DggufError:
        pass
    finally:
        m.close()


def run_tokenizer(data: bytes) -> None:
    from dgguf.core.errors import DggufError
    from dgguf.format.gguf_file import read_gguf
    from dgguf.runtime.tokenizer import Tokenizer

    path = work_dir() / "input.gguf"
    _write(path, data)
    try:
        g = read_gguf(path)
    except DggufError:
        return
    try:
        tok = Tokenizer(g)
        ids = tok.encode("def f(x):\n    return x <|turn> é\u2581")
        tok.decode(ids)
        tok.decode(ids, special=True)
    except DggufError:
        pass
    finally:
        g.close()


def split_parts(data: bytes) -> tuple[int, list[bytes]]:
    """An hf input: (control byte, file contents in HF_FILES order; fewer parts: the rest absent)."""
    if not data:
        return 0, []
    return data[0], data[1:].split(PART)[:len(HF_FILES)]


def join_parts(control: int, parts: list[bytes]) -> bytes:
    return bytes([control]) + PART.join(parts)


def _data_length(st: bytes) -> int:
    """How far a safetensors header's tensors reach past it (the largest end offset), 0 if unreadable."""
    if len(st) < 8:
        return 0
    (n,) = struct.unpack("<Q", st[:8])
    if n > len(st) - 8:
        return 0
    try:
        meta = json.loads(st[8:8 + n])
    except (ValueError, RecursionError):
        return 0
    end = 0
    if isinstance(meta, dict):
        for info in meta.values():
            off = info.get("data_offsets") if isinstance(info, dict) else None
            if isinstance(off, list) and len(off) == 2 and isinstance(off[1], int):
                end = max(end, off[1])
    return 8 + n + end


def write_hf_dir(d: Path, control: int, parts: list[bytes]) -> Path:
    """The checkpoint directory of an hf input (emptied first). Control bit 0: the safetensors file is extended
    with zeros to what its header claims (sparse: never written), so that conversion reads tensor data."""
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    for name, content in zip(HF_FILES, parts):
        (d / name).write_bytes(content)
    st = d / "model.safetensors"
    if control & 1 and st.exists():
        need = _data_length(parts[4])
        if len(parts[4]) < need <= len(parts[4]) + MAX_PAD:
            os.truncate(st, need)
    return d


def run_hf(data: bytes) -> None:
    from dgguf.convert.quantize import convert_checkpoint
    from dgguf.core.errors import DggufError
    from dgguf.runtime.model import Model

    control, parts = split_parts(data)
    d = write_hf_dir(work_dir() / "hf", control, parts)
    out = work_dir() / "out.gguf"
    try:
        convert_checkpoint(d, out, HF_TYPES[(control >> 1) & 7], force=True, threads=1)
    except DggufError:
        return
    # What convert wrote must load and run: a DggufError here means convert accepted what the runtime refuses.
    m = Model.load(out, threads=1, ctx=64)
    try:
        V = m.config.vocab_size
        m.canvas_logits([0, 1 % V], [(i + 2) % V for i in range(min(4, m.config.canvas_length))])
    finally:
        m.close()


RUNNERS = {"gguf": run_gguf, "hf": run_hf, "tokenizer": run_tokenizer}


# ----------------------------------------------------------------------------------------------- mutators
# Half of the mutations are libFuzzer's byte-level ones; the other half change one value of the structure
# (a metadata value or type, a tensor's shape, type, offset or name; a JSON value anywhere in a config or the
# safetensors header) and serialize it again, so that deep checks are reached and not only the parsers.

INTERESTING_INTS = (0, 1, 2, 3, 7, 8, 16, 31, 32, 255, 256, 257, 4095, 4096, 65535, 65536, 65537, 2**31 - 1, 2**31,
                    2**32 - 1, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -1, -2, -2**31, -2**63, 10**30)
INTERESTING_FLOATS = (0.0, -0.0, 0.5, 1.0, -1.0, 1e-30, 1e-50, 1e30, 3.4e38, 1e39, 1e309, float("nan"), float("inf"),
                      float("-inf"), 2.5, 256.7, 1e-45)
INTERESTING_STRINGS = ("", "x", "diffusion-gemma", "gemma4", "gpt2", "float32", "bfloat16", "F32", "BF16",
                       "\x1b[2J\x1b]0;t\x07", "a\0b", "\u202e", "../etc/passwd", "/dev/zero",
                       "model.safetensors", "sliding_attention", "full_attention", "<pad>", "x" * 5000)


def _rand_value(r, like=None):
    """A value for a JSON slot: usually an interesting one of the slot's own kind, sometimes any kind."""
    kinds = ("int", "float", "str", "bool", "null", "list", "dict")
    kind = r.choice(kinds)
    if like is not None and r.random() < 0.6:
        kind = {bool: "bool", int: "int", float: "float", str: "str", list: "list", dict: "dict"}.get(
            type(like), kind)
    if kind == "int":
        v = r.choice(INTERESTING_INTS)
        return v if r.random() < 0.7 or not isinstance(like, int) or isinstance(like, bool) else like + r.randint(-3, 3)
    if kind == "float":
        return r.choice(INTERESTING_FLOATS)
    if kind == "str":
        return r.choice(INTERESTING_STRINGS)
    if kind == "bool":
        return r.random() < 0.5
    if kind == "null":
        return None
    if kind == "list":
        if isinstance(like, list) and like and r.random() < 0.5:
            v = list(like)
            op = r.randrange(3)
            if op == 0:
                v.pop(r.randrange(len(v)))
            elif op == 1:
                v.append(r.choice(v))
            else:
                v[r.randrange(len(v))] = _rand_value(r, v[0])
            return v
        return [_rand_value(r) for _ in range(r.randrange(4))]
    return {} if r.random() < 0.5 else {"0": _rand_value(r)}


def _json_slots(obj, path=()):
    """Every (path, value) of a JSON tree, containers included."""
    yield path, obj
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _json_slots(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _json_slots(v, path + (i,))


def mutate_json(obj, r):
    """One change somewhere in a JSON tree: a value replaced, a key removed or added, a container emptied."""
    slots = list(_json_slots(obj))
    path, value = r.choice(slots)
    op = r.randrange(4)
    if not path:
        return _rand_value(r, obj) if op == 0 else obj if not isinstance(obj, dict) else \
            dict(obj, **{r.choice(HF_KEYS): _rand_value(r)})
    parent = obj
    for k in path[:-1]:
        parent = parent[k]
    key = path[-1]
    if op == 0 and isinstance(parent, dict):
        del parent[key]
    elif op == 1 and isinstance(value, dict) and value:
        value[r.choice(HF_KEYS)] = _rand_value(r)
    else:
        parent[key] = _rand_value(r, value)
    return obj


HF_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
           "num_attention_heads", "num_key_value_heads", "head_dim", "global_head_dim", "num_global_key_value_heads",
           "num_experts", "top_k_experts", "rms_norm_eps", "sliding_window", "max_position_embeddings",
           "layer_types", "per_layer_config", "rope_parameters", "partial_rotary_factor", "rope_theta",
           "final_logit_softcapping", "canvas_length", "dtype", "torch_dtype", "eos_token_id", "pad_token_id",
           "bos_token_id", "text_config", "architectures", "model_type", "max_denoising_steps", "t_min", "t_max",
           "entropy_bound", "stability_threshold", "confidence_threshold", "sampler_config", "bos_token",
           "eos_token", "pad_token", "mask_token", "unk_token", "add_bos_token", "add_eos_token", "chat_template",
           "weight_map", "__metadata__", "data_offsets", "shape", "model", "vocab", "merges", "added_tokens", "id",
           "content", "special", "1", "0")


def _mutate_hf(data: bytes, r) -> bytes | None:
    control, parts = split_parts(data)
    if not parts:
        return None
    if r.random() < 0.1:
        return join_parts(r.randrange(256), parts)
    i = r.randrange(len(parts))
    raw = parts[i]
    st = i == 4
    try:
        if st:
            (n,) = struct.unpack("<Q", raw[:8])
            obj, rest = json.loads(raw[8:8 + n]), raw[8 + n:]
        else:
            obj = json.loads(raw)
    except (ValueError, RecursionError, struct.error):
        return None
    text = json.dumps(mutate_json(obj, r)).encode("utf-8", "surrogatepass")
    parts[i] = struct.pack("<Q", len(text)) + text + rest if st else text
    return join_parts(control, parts)


def _gguf_header(data: bytes):
    from dgguf.format.gguf_file import _parse
    return _parse(Path("mutating"), data)


def _serialize_gguf(version: int, fields: dict, tensors: list, align: int, data_section: bytes) -> bytes:
    """A header with the given (possibly inconsistent) values, tensor offsets as they are, then the old data."""
    from dgguf.format.gguf_file import MAGIC, _pack_field, _pack_string
    out = [MAGIC, struct.pack("<IQQ", version, len(tensors), len(fields))]
    out += [_pack_field(k, f) for k, f in fields.items()]
    for name, ne, gt, off in tensors:
        out.append(_pack_string(name) + struct.pack(f"<I{len(ne)}Q", len(ne), *ne) + struct.pack("<IQ", gt, off))
    head = b"".join(out)
    return head + b"\0" * (-len(head) % align) + data_section


def _mutate_gguf(data: bytes, r) -> bytes | None:
    from gguf.constants import GGUFValueType as V
    from dgguf.format.gguf_file import Field
    from dgguf.core.errors import DggufError
    from dgguf.format.quant_types import TENSOR_TYPES

    try:
        g = _gguf_header(data)
    except (DggufError, struct.error, ValueError, IndexError):
        return None
    fields = dict(g.fields)
    tensors = [(t.name, list(t.ne), t.type.ggml, t.offset) for t in g.tensors]
    align = int(fields["general.alignment"].value) if "general.alignment" in fields else 32
    version = 3
    op = r.randrange(10)
    keys = list(fields)
    if op <= 3 and keys:                           # a metadata value: same type, other value
        k = r.choice(keys)
        f = fields[k]
        if f.type == V.ARRAY:
            v = list(f.value)
            if v and r.random() < 0.7:
                v[r.randrange(len(v))] = _gguf_scalar(r, f.item_type, v[0])
            elif r.random() < 0.5 and v:
                v = v[:r.randrange(len(v))]
            else:
                v = v + v[:r.randrange(1, 4)]
            fields[k] = Field(f.type, v, f.item_type)
        else:
            fields[k] = Field(f.type, _gguf_scalar(r, f.type, f.value))
    elif op == 4 and keys:                         # a metadata value of another type
        k = r.choice(keys)
        t = r.choice([V.UINT8, V.INT8, V.UINT32, V.INT32, V.UINT64, V.INT64, V.FLOAT32, V.FLOAT64, V.BOOL,
                      V.STRING, V.ARRAY])
        if t == V.ARRAY:
            it = r.choice([V.UINT32, V.INT32, V.BOOL, V.FLOAT32, V.STRING, V.UINT8])
            fields[k] = Field(t, [_gguf_scalar(r, it, None) for _ in range(r.randrange(5))], it)
        else:
            fields[k] = Field(t, _gguf_scalar(r, t, None))
    elif op == 5 and keys:                         # a key removed, or an optional/known key added
        if r.random() < 0.5:
            del fields[r.choice(keys)]
        else:
            k = r.choice(GGUF_KEYS)
            fields[k] = Field(V.UINT32, _gguf_scalar(r, V.UINT32, None)) if r.random() < 0.6 else \
                Field(V.FLOAT32, r.choice(INTERESTING_FLOATS))
    elif tensors:                                  # a tensor's shape, type, offset, name; dropped or doubled
        i = r.randrange(len(tensors))
        name, ne, gt, off = tensors[i]
        what = r.randrange(6)
        if what == 0:
            j = r.randrange(len(ne))
            ne[j] = r.choice([0, 1, 2, 32, 256, ne[j] * 2, ne[j] // 2 or 1, ne[j] + 1, 2**31, 2**32 + ne[j],
                              2**63, 2**64 - 1])
        elif what == 1:
            ne = ne + [1] if len(ne) < 4 and r.random() < 0.5 else ne[:-1] or [1]
        elif what == 2:
            gt = r.choice([t.ggml for t in TENSOR_TYPES.values()] + [2, 3, 99, 2**32 - 1])
        elif what == 3:
            off = r.choice([0, off + align, max(off - align, 0), 2**63, 2**64 - 1, off + 1])
        elif what == 4:
            name = r.choice([t[0] for t in tensors] + ["", "blk.99.attn_q.weight", "blk.0.attn_v.weight",
                                                       "rope_freqs.weight", "x\x1b[2J"])
        else:
            if r.random() < 0.5:
                tensors.pop(i)
                name = None
            else:
                tensors.append((name, list(ne), gt, off))
        if name is not None:
            tensors[i] = (name, ne, gt, off)
        if not tensors:
            return None
    else:
        return None
    try:
        out = _serialize_gguf(version, fields, tensors, align, bytes(data[g.data_offset:]))
    except (struct.error, OverflowError, ValueError, TypeError, UnicodeEncodeError):
        return None
    return out


GGUF_KEYS = [f"diffusion-gemma.{k}" for k in (
    "block_count", "context_length", "embedding_length", "feed_forward_length", "attention.head_count",
    "attention.head_count_kv", "rope.freq_base", "rope.freq_base_swa", "attention.layer_norm_rms_epsilon",
    "expert_count", "expert_used_count", "attention.key_length", "attention.key_length_swa",
    "attention.sliding_window", "attention.sliding_window_pattern", "expert_feed_forward_length",
    "final_logit_softcapping", "embedding_scale")] + [
    "general.alignment", "general.architecture", "diffusion.canvas_length", "diffusion.eos_token_ids",
    "diffusion.eb_max_steps", "diffusion.eb_t_min", "diffusion.eb_t_max", "diffusion.eb_entropy_bound",
    "diffusion.eb_stability_threshold", "diffusion.eb_confidence_threshold", "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.padding_token_id", "tokenizer.ggml.mask_token_id", "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens",
    "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.huggingface.json",
    "tokenizer.ggml.add_bos_token"]


def _gguf_scalar(r, t, like):
    from gguf.constants import GGUFValueType as V
    from dgguf.format.gguf_file import _SCALAR
    if t == V.STRING:
        return r.choice(INTERESTING_STRINGS)
    if t == V.BOOL:
        return r.random() < 0.5
    if t in (V.FLOAT32, V.FLOAT64):
        return r.choice(INTERESTING_FLOATS)
    fmt = _SCALAR.get(t)
    if fmt is None:
        return 0
    bits = struct.calcsize(fmt) * 8
    lo, hi = (-(1 << bits - 1), (1 << bits - 1) - 1) if fmt[1].islower() else (0, (1 << bits) - 1)
    cands = [v for v in INTERESTING_INTS if lo <= v <= hi]
    if isinstance(like, int) and not isinstance(like, bool) and r.random() < 0.4:
        return min(max(like + r.choice((-1, 1, 2, -2)), lo), hi)
    return r.choice(cands)


STRUCTURED = {"gguf": _mutate_gguf, "tokenizer": _mutate_gguf, "hf": _mutate_hf}


def custom_mutator(target: str):
    import random
    import atheris

    structured = STRUCTURED[target]

    def mutate(data: bytes, max_size: int, seed: int) -> bytes:
        r = random.Random(seed)
        if r.random() < 0.5:
            out = structured(data, r)
            if out is not None and len(out) <= max(max_size, len(data)):
                return out
        return atheris.Mutate(data, max_size)
    return mutate


# -------------------------------------------------------------------------------------------------- seeds

def _shape(vocab, hidden, heads, kv, d_swa, d_full, experts, top_k, expert_ff, dense_ff, window, canvas, context):
    from dgguf.format.arch import ModelShape
    return ModelShape(vocab_size=vocab, hidden_size=hidden, n_layers=2, n_heads=heads, kv_heads=[kv, kv],
                      head_dims=[d_swa, d_full], sliding=[True, False], sliding_window=window, n_experts=experts,
                      top_k=top_k, expert_ff=expert_ff, dense_ff=dense_ff, canvas_length=canvas,
                      context_length=context)


def micro_shape():       # float types only: the file is mostly header
    return _shape(8, 8, 2, 1, 4, 8, 2, 1, 8, 8, 4, 4, 64)


def small_shape():       # rows of one 32-block
    return _shape(16, 32, 4, 2, 8, 16, 2, 1, 32, 32, 4, 4, 64)


def k_quant_shape():     # rows of one 256-block where the hidden size is the row
    return _shape(8, 256, 4, 2, 8, 16, 1, 1, 32, 32, 4, 4, 64)


TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<|turn>", "<turn|>", "\u2581", "d", "e", "f", "x", "de",
          "def", "\u2581x", "<0x0A>"]


def _gguf_fields(s, tokens: bool, optional: bool, pairs_rotated: int) -> dict:
    from gguf.constants import GGUFValueType as V
    from dgguf.format.arch import ARCH
    from dgguf.format.gguf_file import Field

    a = ARCH + "."
    u32 = lambda v: Field(V.UINT32, v)
    f32 = lambda v: Field(V.FLOAT32, v)
    f = {
        "general.architecture": Field(V.STRING, ARCH), "general.name": Field(V.STRING, "fuzz seed"),
        a + "block_count": u32(s.n_layers), a + "context_length": u32(s.context_length),
        a + "embedding_length": u32(s.hidden_size), a + "feed_forward_length": u32(s.dense_ff),
        a + "attention.head_count": u32(s.n_heads),
        a + "attention.head_count_kv": Field(V.ARRAY, list(s.kv_heads), V.INT32),
        a + "rope.freq_base": f32(1e6), a + "rope.freq_base_swa": f32(1e4),
        a + "attention.layer_norm_rms_epsilon": f32(1e-6), a + "expert_count": u32(s.n_experts),
        a + "expert_used_count": u32(s.top_k), a + "attention.key_length": u32(s.head_dims[1]),
        a + "attention.sliding_window": u32(s.sliding_window),
        a + "attention.sliding_window_pattern": Field(V.ARRAY, list(s.sliding), V.BOOL),
        a + "attention.key_length_swa": u32(s.head_dims[0]), a + "expert_feed_forward_length": u32(s.expert_ff),
        "diffusion.canvas_length": u32(s.canvas_length),
    }
    if optional:
        f.update({
            "diffusion.eb_max_steps": u32(8), "diffusion.eb_t_min": f32(0.4), "diffusion.eb_t_max": f32(0.8),
            "diffusion.eb_entropy_bound": f32(0.1), "diffusion.eb_stability_threshold": u32(1),
            "diffusion.eb_confidence_threshold": f32(0.005),
            a + "final_logit_softcapping": f32(30.0), a + "embedding_scale": f32(math.sqrt(s.hidden_size)),
            "diffusion.eos_token_ids": Field(V.ARRAY, [1, 6 % s.vocab_size], V.UINT32),
            "tokenizer.ggml.eos_token_id": u32(1), "tokenizer.ggml.padding_token_id": u32(0),
            "tokenizer.ggml.mask_token_id": u32(4 % s.vocab_size),
        })
    if tokens:
        toks = (TOKENS * 2)[:s.vocab_size]
        types = [3 if t.startswith("<") and not t.startswith("<0x") else 6 if t.startswith("<0x") else 1
                 for t in toks]
        f.update({
            "tokenizer.ggml.model": Field(V.STRING, "gemma4"),
            "tokenizer.ggml.tokens": Field(V.ARRAY, toks, V.STRING),
            "tokenizer.ggml.scores": Field(V.ARRAY, [-1000.0] * len(toks), V.FLOAT32),
            "tokenizer.ggml.token_type": Field(V.ARRAY, types, V.INT32),
            "tokenizer.ggml.merges": Field(V.ARRAY, ["d e", "de f", "\u2581 x"], V.STRING),
            "tokenizer.ggml.bos_token_id": u32(2), "tokenizer.ggml.add_bos_token": Field(V.BOOL, True),
            "tokenizer.chat_template": Field(V.STRING, "{% for m in messages %}{{ m['content'] }}{% endfor %}"),
        })
    return f


def _tensor_type(name: str, ne: tuple[int, ...], k: int, types: list[str]):
    from dgguf.format.quant_types import TENSOR_TYPES
    if len(ne) == 1 or name.startswith("rope") or "gate_inp.weight" in name:
        return TENSOR_TYPES["F32"]
    for t in types[k % len(types):] + types[:k % len(types)]:
        if ne[0] % TENSOR_TYPES[t].block_size == 0:
            return TENSOR_TYPES[t]
    return TENSOR_TYPES["F32"]


def write_gguf_seed(path: Path, s, types: list[str], tokens: bool = True, optional: bool = True,
                    seed: int = 0, edit=None) -> Path:
    """A small valid model of shape s, matrices in `types` (cycled; F32 where a row does not fit a block).
    edit(fields) may change the metadata before it is written."""
    import numpy as np
    from dgguf.core import native
    from dgguf.format.arch import expected_tensors
    from dgguf.format.gguf_file import GGUFWriter, TensorInfo

    rng = np.random.default_rng(seed)
    rotated = max(1, s.head_dims[1] // 8)
    infos, data = [], []
    for k, (name, ne) in enumerate(expected_tensors(s).items()):
        t = _tensor_type(name, ne, k, types)
        n = math.prod(ne)
        if name == "rope_freqs.weight":
            x = np.array([1.0] * rotated + [1e30] * (ne[0] - rotated), dtype=np.float32)
        elif len(ne) == 1:
            x = (1.0 + 0.05 * rng.standard_normal(n)).astype(np.float32)
        else:
            x = (0.1 * rng.standard_normal(n)).astype(np.float32)
        rows = x.reshape(-1, ne[0])
        if t.name == "BF16":
            raw = (rows.view(np.uint32) >> 16).astype(np.uint16)   # truncated: fine for a seed
        else:
            raw = native.encode(rows, t.ggml)
        infos.append(TensorInfo(name, ne, t))
        data.append(np.ascontiguousarray(raw))
    fields = _gguf_fields(s, tokens, optional, rotated)
    if edit is not None:
        edit(fields)
    with GGUFWriter(path, fields, infos, force=True) as w:
        for raw in data:
            w.write(raw)
    return path


def gguf_seeds(out: Path) -> list[Path]:
    """Small synthetic models of every tensor type and the fixture headers, cut where the data starts and
    earlier."""
    from dgguf.format.gguf_file import read_gguf

    out.mkdir(parents=True, exist_ok=True)
    micro, small, k_shape = micro_shape(), small_shape(), k_quant_shape()
    seeds = []
    for i, types in enumerate((["F32"], ["F16"], ["BF16"], ["F32", "F16", "BF16"])):
        seeds.append(write_gguf_seed(out / f"micro-{'-'.join(types)}.gguf", micro, types, seed=i))
    seeds.append(write_gguf_seed(out / "micro-bare.gguf", micro, ["F16"], tokens=False, optional=False))
    for i, types in enumerate((["Q8_0"], ["Q4_0", "Q4_1"], ["Q5_0", "Q5_1"], ["Q8_0", "F16", "Q4_0", "BF16", "Q5_1"])):
        seeds.append(write_gguf_seed(out / f"small-{'-'.join(types)}.gguf", small, types, seed=i))
    seeds.append(write_gguf_seed(out / "k-quants.gguf", k_shape, ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0"]))
    for f in sorted(FIXTURE.glob("*.gguf")):
        g = read_gguf(f)
        head = f.read_bytes()[:g.data_offset]
        g.close()
        for n, cut in (("header", len(head)), ("start", 2048)):
            p = out / f"{f.stem}-{n}.gguf"
            p.write_bytes(head[:cut])
            seeds.append(p)
    return seeds


def _tokenizer_json(tokens: list[str], special: int) -> str:
    """A minimal HF tokenizer.json (BPE) over `tokens`, the first `special` of them added special tokens."""
    return json.dumps({
        "version": "1.0", "added_tokens": [{"id": i, "content": t, "special": True, "single_word": False,
                                            "lstrip": False, "rstrip": False, "normalized": False}
                                           for i, t in enumerate(tokens[:special])],
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
        "model": {"type": "BPE", "byte_fallback": True, "fuse_unk": True, "unk_token": "<unk>",
                  "vocab": {t: i for i, t in enumerate(tokens)}, "merges": [["d", "e"], ["de", "f"], ["\u2581", "x"]]},
    }, ensure_ascii=False)


def _safetensors_header(shapes: dict[str, tuple[int, ...]], dtype: str, extra: dict | None = None) -> bytes:
    width = {"F32": 4, "F16": 2, "BF16": 2}[dtype]
    head, off = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in shapes.items():
        n = math.prod(shape) * width
        head[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    head.update(extra or {})
    raw = json.dumps(head).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def _hf_seed(config: dict, gen: bytes, tok_cfg: bytes, tok: bytes, dtype: str, index: bool = False,
             extra_tensors: dict | None = None) -> list[bytes]:
    from dgguf.convert.checkpoint import read_config_file
    from dgguf.convert.tensor_names import expected_shapes

    d = work_dir() / "seed-config"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps(config))
    cfg, _ = read_config_file(d / "config.json")
    parts = [json.dumps(config, indent=1).encode(), gen, tok_cfg, tok,
             _safetensors_header(expected_shapes(cfg), dtype, extra_tensors)]
    if index:
        parts.append(json.dumps({"metadata": {}, "weight_map": {n: "model.safetensors"
                                                                for n in expected_shapes(cfg)}}).encode())
    return parts


def hf_seeds(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, (control, parts) in hf_seed_parts().items():
        p = out / name
        p.write_bytes(join_parts(control, parts))
        paths.append(p)
    return paths


def hf_seed_parts() -> dict[str, tuple[int, list[bytes]]]:
    """Tiny checkpoints (release and re-saved config forms, F32/F16/BF16, single file and index) with the
    fixture's generation and tokenizer configs, under several output types; plus the fixture's own config."""
    hf = FIXTURE / "hf"
    gen, tok_cfg = (hf / "generation_config.json").read_bytes(), (hf / "tokenizer_config.json").read_bytes()
    fixture = json.loads((hf / "config.json").read_text())
    tiny = json.loads(json.dumps(fixture))
    tc = tiny["text_config"]
    tc.update(vocab_size=16, hidden_size=32, intermediate_size=32, moe_intermediate_size=32, num_hidden_layers=2,
              layer_types=["sliding_attention", "full_attention"], num_attention_heads=4, num_key_value_heads=2,
              head_dim=8, global_head_dim=16, num_global_key_value_heads=1, num_experts=2, top_k_experts=1,
              sliding_window=4, max_position_embeddings=64, per_layer_config={"1": {"head_dim": 16,
                                                                                  "num_key_value_heads": 1}})
    tiny["canvas_length"] = 4
    release = json.loads(json.dumps(tiny))
    del release["text_config"]["per_layer_config"]
    tok = _tokenizer_json(TOKENS, 7).encode()
    vision = {"model.encoder.vision_tower.patch.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}
    seeds = {
        "tiny-resaved-f32": (1, _hf_seed(tiny, gen, tok_cfg, tok, "F32")),
        "tiny-release-bf16-q8": (1 | 1 << 1, _hf_seed(dict(release, dtype="bfloat16"), gen, tok_cfg, tok, "BF16")),
        "tiny-f16-q4km": (1 | 2 << 1, _hf_seed(dict(tiny, dtype="float16"), gen, tok_cfg, tok, "F16")),
        "tiny-index-q40": (1 | 4 << 1, _hf_seed(tiny, gen, tok_cfg, tok, "F32", index=True)),
        "tiny-vision-bf16": (1 | 5 << 1, _hf_seed(release, gen, tok_cfg, tok, "F32", extra_tensors=vision)),
        "tiny-nodata": (0, _hf_seed(tiny, gen, tok_cfg, tok, "F32")),
        "tiny-minimal": (1, _hf_seed(tiny, b"{}", b"{}", tok, "F32")[:2]),
        "fixture-config-q6k": (1 | 6 << 1, _hf_seed(fixture, gen, tok_cfg, (hf / "tokenizer.json").read_bytes(),
                                                    "F32")),
    }
    return seeds


def write_seeds(out: Path) -> None:
    gguf_seeds(out / "gguf")
    hf_seeds(out / "hf")
    shutil.copytree(out / "gguf", out / "tokenizer", dirs_exist_ok=True)


# ------------------------------------------------------------------------------------------------ drivers

def _fuzz(target: str, argv: list[str]) -> None:
    import atheris

    with atheris.instrument_imports(include=["dgguf"]):
        import dgguf.convert.quantize  # noqa: F401  (instrumented imports of everything the targets reach)
        import dgguf.runtime.model  # noqa: F401
        import dgguf.runtime.tokenizer  # noqa: F401
    runner = RUNNERS[target]
    keep = os.environ.get("DGGUF_FUZZ_FINDINGS")
    if keep:   # exploration: record each distinct finding (exception type and where) and go on
        runner = _recording(runner, Path(keep))
    atheris.Setup([sys.argv[0]] + argv, runner, custom_mutator=custom_mutator(target))
    atheris.Fuzz()


def _recording(runner, out: Path):
    import hashlib
    import traceback
    from dgguf.core.errors import DggufError

    out.mkdir(parents=True, exist_ok=True)
    seen = {p.name.split("-")[0] for p in out.iterdir()}

    def run(data: bytes) -> None:
        try:
            runner(data)
        except (Exception, DggufError) as e:   # noqa: B014
            tb = traceback.extract_tb(e.__traceback__)
            where = f"{type(e).__name__}:{tb[-1].filename}:{tb[-1].lineno}"
            key = hashlib.sha1(where.encode()).hexdigest()[:12]
            if key not in seen:
                seen.add(key)
                (out / f"{key}-input").write_bytes(data)
                (out / f"{key}-trace.txt").write_text("".join(traceback.format_exception(e)))
                print(f"FINDING {where}", file=sys.stderr)
    return run


def replay(target: str, files: list[str]) -> int:
    """Each input once, outside the fuzzer; prints its outcome. Exit status 1 if any is a finding."""
    import traceback
    from dgguf.core.errors import DggufError

    bad = 0
    for f in files:
        t = time.perf_counter()
        try:
            RUNNERS[target](Path(f).read_bytes())
            outcome = "ok"
        except DggufError as e:   # escaped from a stage that must not fail (hf: loading what convert wrote)
            outcome, bad = f"FINDING: DggufError after a successful stage: {e}", bad + 1
        except Exception:
            outcome, bad = "FINDING:\n" + traceback.format_exc(), bad + 1
        print(f"{f}: {outcome} ({time.perf_counter() - t:.3f} s)")
    return 1 if bad else 0


def ci(runs: int, seed: int, timeout: int, targets=CI_TARGETS) -> int:
    """Fresh seeds, then each target for `runs` inputs with a fixed libFuzzer seed, one process each."""
    base = Path(tempfile.mkdtemp(prefix="dgguf-fuzz-ci-"))
    try:
        write_seeds(base / "seeds")
        for target in targets:
            corpus = base / "corpus" / target
            corpus.mkdir(parents=True)
            t = time.perf_counter()
            r = subprocess.run([sys.executable, __file__, "run", target, str(corpus), str(base / "seeds" / target),
                                f"-runs={runs}", f"-seed={seed}", f"-timeout={timeout}", "-rss_limit_mb=3072",
                                f"-artifact_prefix={base}/{target}-", "-print_final_stats=1"],
                               env=dict(os.environ, PYTHONHASHSEED="0"), capture_output=True, text=True)
            dt = time.perf_counter() - t
            stats = dict(ln[6:].split(":", 1) for ln in r.stderr.splitlines() if ln.startswith("stat::"))
            print(f"fuzz {target}: {stats.get('number_of_executed_units', '?').strip()} inputs, "
                  f"{stats.get('average_exec_per_sec', '?').strip()} inputs/s, {dt:.1f} s in all "
                  f"(seed {seed}), exit status {r.returncode}", flush=True)
            if r.returncode != 0:
                print(r.stderr[-8000:], file=sys.stderr)
                for a in base.glob(f"{target}-*"):
                    keep = ROOT / "build" / "fuzz-findings" / a.name
                    keep.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy(a, keep)
                    print(f"finding kept as {keep}; reproduce: python scripts/fuzz.py replay {target} {keep}",
                          file=sys.stderr)
                return 1
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    cmd, rest = argv[0], argv[1:]
    try:
        if cmd == "seeds" and len(rest) == 1:
            write_seeds(Path(rest[0]))
            return 0
        if cmd == "run" and len(rest) >= 2 and rest[0] in TARGETS:
            _fuzz(rest[0], rest[1:])
            return 0
        if cmd == "replay" and len(rest) >= 2 and rest[0] in TARGETS:
            return replay(rest[0], rest[1:])
        if cmd == "ci":
            import argparse
            p = argparse.ArgumentParser(prog="fuzz.py ci")
            p.add_argument("--runs", type=int, default=10000)
            p.add_argument("--seed", type=int, default=1)
            p.add_argument("--timeout", type=int, default=10)
            p.add_argument("--targets", default=",".join(CI_TARGETS))
            a = p.parse_args(rest)
            return ci(a.runs, a.seed, a.timeout, a.targets.split(","))
    finally:
        if _work is not None:
            shutil.rmtree(_work, ignore_errors=True)
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
