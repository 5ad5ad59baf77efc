"""The native forward pass: a DiffusionGemma GGUF's weights handed to native/model.c, and its KV cache.

NativeModel fills the dg_model / dg_layer structs of native/dgguf.h with pointers into the memory-mapped
GGUF (no weight is copied or expanded); NativeCache owns one sequence's native KV cache and runs the encoder
(`encode`: append tokens) and the decoder (`decode`: canvas logits). Shapes and dtypes are checked here,
once, before any native call; native code checks again and reports errors as DggufError.
"""
from __future__ import annotations

import numpy as np

from dgguf.core._native import ffi, lib
from dgguf.core.errors import DggufError
from dgguf.core.native import ERRLEN, MAX_THREADS, check
from dgguf.format.arch import GLOBAL_TENSORS, LAYER_TENSORS, has_tensor
from dgguf.format.gguf_file import GGUFFile

from .model_config import ModelConfig

def float_rows(a, shape: tuple[int, int], what: str) -> None:
    """DggufError unless a is a C-contiguous float32 array of `shape`."""
    if not isinstance(a, np.ndarray) or a.dtype != np.float32 or a.shape != shape or not a.flags.c_contiguous:
        got = (getattr(a, "dtype", type(a)), getattr(a, "shape", None))
        raise DggufError(f"{what} must be a C-contiguous float32 array of shape {shape}, got {got[0]} {got[1]}")


def token_ids(ids, vocab: int, what: str, allow_empty: bool = True) -> np.ndarray:
    """Token ids as a contiguous int32 vector, or a DggufError naming `what` and the offending id."""
    a = np.asarray(ids)
    if a.ndim != 1 or (a.size and not np.issubdtype(a.dtype, np.integer)):
        raise DggufError(f"{what}: token ids must be a 1-D sequence of integers, got shape {a.shape} {a.dtype}")
    if not a.size and not allow_empty:
        raise DggufError(f"{what} must be a non-empty 1-D sequence of token ids")
    if a.size and (a.min() < 0 or a.max() >= vocab):
        bad = a[(a < 0) | (a >= vocab)][0]
        raise DggufError(f"{what}: token id {int(bad)} is outside the vocabulary 0..{vocab - 1}")
    return np.ascontiguousarray(a, dtype=np.int32)


def decode_args(ids, vocab: int, sc_logits, out, head_rows):
    """A decoder pass's arguments checked and as C sees them: (ids, sc_logits or NULL, head_rows or NULL, out),
    out allocated when None (see NativeCache.decode)."""
    a = token_ids(ids, vocab, "decode")
    n = a.size
    if head_rows is not None and out is None:
        raise DggufError("decode: head_rows needs out (the rows not computed keep out's logits)")
    sc = ffi.NULL
    if sc_logits is not None:
        float_rows(sc_logits, (n, vocab), "decode: sc_logits")
        sc = ffi.from_buffer("float[]", sc_logits)
    if out is None:
        out = np.empty((n, vocab), dtype=np.float32)
    else:
        float_rows(out, (n, vocab), "decode: out")
        if sc_logits is not None and np.shares_memory(out, sc_logits):
            raise DggufError("decode: out must not overlap sc_logits")
    rows = ffi.NULL
    if head_rows is not None:
        flags = np.ascontiguousarray(head_rows, dtype=np.uint8)
        if flags.shape != (n,):
            raise DggufError(f"decode: head_rows must have {n} entries, got shape {flags.shape}")
        rows = ffi.from_buffer("uint8_t[]", flags)   # the cdata keeps flags alive
    return a, sc, rows, out


class NativeModel:
    """The weights of one GGUF (validated by read_model_config) as native structs. Keeps the file mapped."""

    def __init__(self, gguf: GGUFFile, cfg: ModelConfig, threads: int = 1):
        if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= MAX_THREADS:
            raise DggufError(f"threads must be an integer in 1..{MAX_THREADS}, got {threads!r}")
        self.gguf, self.cfg, self.threads = gguf, cfg, threads
        self._keep = []                     # every buffer a native pointer refers to
        self._tensors = {t.name: t for t in gguf.tensors}
        n = cfg.n_layers
        self._layers = ffi.new("dg_layer[]", n)
        for i in range(n):
            ly = self._layers[i]
            ly.sliding = int(cfg.sliding[i])
            ly.head_dim = cfg.head_dims[i]
            ly.n_kv_heads = cfg.kv_heads[i]
            for t in LAYER_TENSORS:
                if t.field is not None and has_tensor(t, cfg, i):   # full layers have no V: V is K
                    self._fill(getattr(ly, t.field), f"blk.{i}.{t.gguf}")
            ly.dec_scale = self._scalar(f"blk.{i}.layer_output_scale.weight")
            ly.enc_scale = self._scalar(f"blk.{i}.enc_layer_output_scale.weight")
        m = self._model = ffi.new("dg_model *")
        m.n_layers, m.hidden, m.n_heads = n, cfg.hidden_size, cfg.n_heads
        m.n_experts, m.top_k, m.expert_ff = cfg.n_experts, cfg.top_k, cfg.expert_ff
        m.dense_ff, m.vocab, m.sliding_window = cfg.dense_ff, cfg.vocab_size, cfg.sliding_window
        m.rope_pairs_full = cfg.rope_rotated_pairs_full
        m.eps, m.theta_full, m.theta_sliding = cfg.rms_norm_eps, cfg.rope_theta_full, cfg.rope_theta_sliding
        m.softcap, m.embed_scale = cfg.softcap, cfg.embedding_scale
        for t in GLOBAL_TENSORS:
            if t.field is not None:
                self._fill(getattr(m, t.field), t.gguf)
        m.layers = self._layers
        m.n_threads = threads

    def _fill(self, t, name: str) -> None:
        info = self._tensors.get(name)
        if info is None:
            raise DggufError(f"{self.gguf.path}: missing tensor {name}")
        buf = ffi.from_buffer(self.gguf.tensor_bytes(info))
        self._keep.append(buf)
        ne = tuple(info.ne) + (1,) * (3 - len(info.ne))
        if len(ne) != 3:
            raise DggufError(f"{self.gguf.path}: tensor {name} has {len(info.ne)} dimensions")
        t.data = buf
        t.type = info.type.ggml
        t.ne0, t.ne1, t.ne2 = ne

    def _scalar(self, name: str) -> float:
        info = self._tensors.get(name)
        if info is None or info.type.name != "F32":
            raise DggufError(f"{self.gguf.path}: missing F32 tensor {name}")
        return float(self.gguf.tensor_bytes(info).view("<f4")[0])

    def new_cache(self, capacity: int) -> "NativeCache":
        return NativeCache(self, capacity)


class NativeCache:
    """One sequence's KV cache: `encode` appends tokens, `decode` returns canvas logits without writing it."""

    def __init__(self, model: NativeModel, capacity: int):
        capacity = int(capacity)
        if capacity < 1:
            raise DggufError(f"cache capacity must be positive, got {capacity}")
        self.model = model
        self.capacity = capacity
        err = ffi.new("char[]", ERRLEN)
        c = lib.dg_cache_new(model._model, capacity, err, ERRLEN)
        if c == ffi.NULL:
            raise DggufError(ffi.string(err).decode(errors="replace"))
        self._c = ffi.gc(c, lib.dg_cache_free)

    @property
    def length(self) -> int:
        return int(lib.dg_cache_length(self._c))


    def encode(self, ids: np.ndarray) -> None:
        """Run the encoder over ids at positions length.., appending their K/V to the cache."""
        a = token_ids(ids, self.model.cfg.vocab_size, "encode")
        if self.length + a.size > self.capacity:
            raise DggufError(f"encode: {a.size} tokens after {self.length} exceed the cache capacity "
                             f"{self.capacity}")
        err = ffi.new("char[]", ERRLEN)
        check(lib.dg_encode(self.model._model, self._c, ffi.from_buffer("int32_t[]", a), a.size, err, ERRLEN),
               err)

    def decode(self, ids: np.ndarray, sc_logits: np.ndarray | None = None, out: np.ndarray | None = None,
               sc_top_k: int = 0, head_rows: np.ndarray | None = None) -> np.ndarray:
        """Canvas logits float32 [n, V] for ids at positions length..length+n-1; sc_logits [n, V] float32
        (the previous step's processed logits) or None for the first step. out: a float32 [n, V] array to write
        the logits into (not sc_logits), so a denoising loop does not fault in fresh pages every step.
        Cheaper steps (dgguf.h's dg_decode): sc_top_k > 0 self-conditions on each position's sc_top_k most probable
        tokens only; head_rows (bool [n]) computes the logits of those rows only, the others keep out's."""
        a, sc, rows, out = decode_args(ids, self.model.cfg.vocab_size, sc_logits, out, head_rows)
        err = ffi.new("char[]", ERRLEN)
        check(lib.dg_decode(self.model._model, self._c, ffi.from_buffer("int32_t[]", a), a.size, sc, int(sc_top_k),
                            rows, ffi.from_buffer("float[]", out), err, ERRLEN), err)
        return out

    def truncate(self, n: int) -> None:
        """Forget every position from n on (sliding layers must still hold the last window before n)."""
        err = ffi.new("char[]", ERRLEN)
        check(lib.dg_cache_truncate(self._c, int(n), err, ERRLEN), err)
