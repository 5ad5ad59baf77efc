"""The one Python wrapper around the native library (dgguf.core._native): checks shapes and dtypes once, turns
status codes into errors."""
from __future__ import annotations

import functools
import os

import numpy as np

from dgguf.core.errors import DggufError

from ._native import ffi, lib

ERRLEN = 512
MAX_THREADS = 1024


def default_threads() -> int:
    """The CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def check(status: int, err) -> None:
    """Raise the native error message of a failed call as a DggufError."""
    if status != 0:
        raise DggufError(ffi.string(err).decode(errors="replace"))


def cpu_features() -> str:
    return ffi.string(lib.dg_cpu_features()).decode()


def type_size(ggml_type: int) -> tuple[int, int]:
    """(values per block, bytes per block) of a ggml type."""
    bs, ts, err = ffi.new("int64_t *"), ffi.new("int64_t *"), ffi.new("char[]", ERRLEN)
    check(lib.dg_type_size(ggml_type, bs, ts, err, ERRLEN), err)
    return bs[0], ts[0]


def row_bytes(ggml_type: int, ncols: int) -> int:
    bs, ts = type_size(ggml_type)
    if ncols % bs:
        raise DggufError(f"row length {ncols} is not a multiple of the block size {bs} of type {ggml_type}")
    return ncols // bs * ts


def quantize_rows(x: np.ndarray, ggml_type: int) -> np.ndarray:
    """Quantize a 2-D float32 array row by row; returns uint8 [nrows, row_bytes]."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError("quantize_rows takes a 2-D array")
    nrows, ncols = x.shape
    out = np.empty((nrows, row_bytes(ggml_type, ncols)), dtype=np.uint8)
    err = ffi.new("char[]", ERRLEN)
    check(lib.dg_quantize_rows(ggml_type, ffi.from_buffer("float[]", x), ffi.from_buffer(out),
                                nrows, ncols, err, ERRLEN), err)
    return out


def dequantize_rows(raw: np.ndarray, ggml_type: int, ncols: int) -> np.ndarray:
    """Inverse of quantize_rows: uint8 [nrows, row_bytes] (or flat) → float32 [nrows, ncols]."""
    raw = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1)
    rb = row_bytes(ggml_type, ncols)
    if raw.size % rb:
        raise DggufError(f"{raw.size} bytes do not hold whole rows of {ncols} values of type {ggml_type}")
    nrows = raw.size // rb
    out = np.empty((nrows, ncols), dtype=np.float32)
    err = ffi.new("char[]", ERRLEN)
    check(lib.dg_dequantize_rows(ggml_type, ffi.from_buffer(raw), ffi.from_buffer("float[]", out),
                                  nrows, ncols, err, ERRLEN), err)
    return out


def encode(x: np.ndarray, ggml_type: int) -> np.ndarray:
    """float32 rows → the stored form of a tensor type: F32 and F16 as numpy arrays, the rest quantized."""
    if ggml_type == 0:     # F32
        return x
    if ggml_type == 1:     # F16
        return x.astype(np.float16)
    return quantize_rows(x, ggml_type)


def bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    """Widen raw bfloat16 bits (uint16) to float32, same shape."""
    raw = np.ascontiguousarray(raw, dtype=np.uint16)
    out = np.empty(raw.shape, dtype=np.float32)
    lib.dg_bf16_to_f32(ffi.from_buffer("uint16_t[]", raw), ffi.from_buffer("float[]", out), raw.size)
    return out


MATMUL_KERNELS = ("reference", "int8-reference", "int8-bf16-reference", "avx2", "int8-avx2", "avx512",
                  "int8-avx512vnni", "int8-avx512bf16")


def tanh(x: np.ndarray) -> np.ndarray:
    """The forward's float tanh (gelu and softcap), elementwise."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty_like(x)
    lib.dg_tanh(ffi.from_buffer("float[]", x), ffi.from_buffer("float[]", out), x.size)
    return out


def matmul_kernel() -> str:
    """The matmul kernel in use (one of MATMUL_KERNELS; the int8-* ones quantize activations for quantized weights)."""
    return ffi.string(lib.dg_matmul_kernel()).decode()


def set_matmul_kernel(name: str) -> None:
    """Switch the process-wide matmul kernel (tests and benchmarks); DggufError if the CPU lacks it."""
    err = ffi.new("char[]", ERRLEN)
    check(lib.dg_set_matmul_kernel(name.encode(), err, ERRLEN), err)


def matmul_kernels() -> list[str]:
    """Every kernel this CPU can run, the reference first."""
    current, usable = matmul_kernel(), []
    for name in MATMUL_KERNELS:
        try:
            set_matmul_kernel(name)
            usable.append(name)
        except DggufError:
            pass
    set_matmul_kernel(current)
    return usable


@functools.cache
def float_kernel() -> str:
    """The best kernel this CPU has that keeps float activations for every weight type (exact for F32, F16 and
    BF16 weights)."""
    return [k for k in matmul_kernels() if not k.startswith("int8")][-1]


def _weight(w_raw: np.ndarray, ggml_type: int, shape: tuple[int, int], x: np.ndarray):
    """(the dg_tensor of a stored weight of `shape` (rows, K), the raw bytes it points into, x as float32 [n, cols])
    where cols is K for a matmul's x and rows for a soft embedding's logits; ValueError when they do not fit."""
    rows, k = shape
    x = np.ascontiguousarray(x, dtype=np.float32)
    w_raw = np.ascontiguousarray(w_raw, dtype=np.uint8).reshape(-1)
    if x.ndim != 2 or w_raw.size != rows * row_bytes(ggml_type, k):
        raise ValueError("weight bytes do not match its shape")
    t = ffi.new("dg_tensor *", {"data": ffi.from_buffer(w_raw), "type": ggml_type, "ne0": k, "ne1": rows, "ne2": 1})
    return t, w_raw, x


def matmul(w_raw: np.ndarray, ggml_type: int, shape: tuple[int, int], x: np.ndarray, threads: int = 1) -> np.ndarray:
    """x [n, K] float32 times a stored weight of `shape` (rows, K) in ggml_type: [n, rows], the forward's matmul."""
    t, w_raw, x = _weight(w_raw, ggml_type, shape, x)
    if x.shape[1] != shape[1]:
        raise ValueError("matmul: shapes do not match")
    out = np.empty((x.shape[0], shape[0]), dtype=np.float32)
    err = ffi.new("char[]", ERRLEN)
    check(lib.dg_matmul(t, 0, ffi.from_buffer("float[]", x), x.shape[0], ffi.from_buffer("float[]", out),
                         threads, err, ERRLEN), err)
    return out


def soft_embed(w_raw: np.ndarray, ggml_type: int, shape: tuple[int, int], logits: np.ndarray, scale: float = 1.0,
               threads: int = 1, top_k: int = 0) -> np.ndarray:
    """scale * softmax(logits [n, rows]) @ W for a stored weight of `shape` (rows, K): [n, K], the forward's
    self-conditioning soft embedding under the active kernel; top_k > 0: over each row's top_k most probable rows
    of W only, renormalised."""
    t, w_raw, logits = _weight(w_raw, ggml_type, shape, logits)
    if logits.shape[1] != shape[0]:
        raise ValueError("soft_embed: shapes do not match")
    out = np.empty((logits.shape[0], shape[1]), dtype=np.float32)
    err = ffi.new("char[]", ERRLEN)
    check(lib.dg_soft_embed(t, ffi.from_buffer("float[]", logits), logits.shape[0], scale, top_k,
                            ffi.from_buffer("float[]", out), threads, err, ERRLEN), err)
    return out


ATTENTION_KERNELS = ("per-query", "blocked")


def attention_kernel() -> str:
    """The attention kernel in use: "blocked" (the default) or "per-query" (the reference)."""
    return ffi.string(lib.dg_attention_kernel()).decode()


def set_attention_kernel(name: str) -> None:
    """Switch the process-wide attention kernel (tests and benchmarks); DggufError for an unknown name."""
    err = ffi.new("char[]", ERRLEN)
    check(lib.dg_set_attention_kernel(name.encode(), err, ERRLEN), err)


def attention(q: np.ndarray, cached_k: np.ndarray, cached_v: np.ndarray, k: np.ndarray, v: np.ndarray,
              window: int = 0, causal: bool = False, threads: int = 1) -> np.ndarray:
    """One layer's attention as the forward runs it: q [n, heads, d] against the cached rows [held, kv, d] and
    then the pass's own rows k, v [n, kv, d]; window > 0 keeps keys p - window < k <= p, causal the pass's rows
    up to the query's own. Returns [n, heads, d] float32."""
    q, cached_k, cached_v, k, v = (np.ascontiguousarray(a, dtype=np.float32) for a in (q, cached_k, cached_v, k, v))
    n, heads, d = q.shape
    held, kv = cached_k.shape[:2]
    if cached_k.shape != (held, kv, d) or cached_v.shape != cached_k.shape or k.shape != (n, kv, d) \
            or v.shape != k.shape:
        raise ValueError("attention: shapes do not match")
    out = np.empty_like(q)
    err = ffi.new("char[]", ERRLEN)
    f = lambda a: ffi.from_buffer("float[]", a)  # noqa: E731
    check(lib.dg_attention(f(q), f(cached_k), f(cached_v), held, f(k), f(v), n, heads, kv, d, window, int(causal),
                           f(out), threads, err, ERRLEN), err)
    return out


def sample_step(logits: np.ndarray, temp: float, uniforms: np.ndarray | None = None, threads: int = 1,
                out: np.ndarray | None = None):
    """(scaled, argmax, entropy, sampled or None) of one sampler step: native/sample.c's fused version of
    runtime/sampler.py's scale_logits, token_stats and inverse_cdf_sample. out: where to write scaled (an array
    like logits, or logits itself), instead of a new array."""
    def rows(a):
        return isinstance(a, np.ndarray) and a.dtype == np.float32 and a.ndim == 2 and a.flags.c_contiguous
    if not rows(logits):
        raise DggufError("sample_step: logits must be a C-contiguous float32 [n, V] array")
    n, V = logits.shape
    if out is not None and not (rows(out) and out.shape == logits.shape):
        raise DggufError(f"sample_step: out must be a C-contiguous float32 array of shape {logits.shape}")
    scaled = np.empty_like(logits) if out is None else out
    argmax = np.empty(n, dtype=np.int64)
    entropy = np.empty(n, dtype=np.float32)
    sampled = u = ffi.NULL
    if uniforms is not None:
        uniforms = np.ascontiguousarray(uniforms, dtype=np.float64)
        if uniforms.shape != (n,):
            raise DggufError(f"sample_step: {uniforms.shape} uniforms for {n} rows")
        u = ffi.from_buffer("double[]", uniforms)
        sampled = np.empty(n, dtype=np.int64)
    err = ffi.new("char[]", ERRLEN)
    check(lib.dg_sample_step(ffi.from_buffer("float[]", logits), n, V, float(temp), u,
                             ffi.from_buffer("float[]", scaled), ffi.from_buffer("int64_t[]", argmax),
                             ffi.from_buffer("float[]", entropy),
                             ffi.NULL if sampled is ffi.NULL else ffi.from_buffer("int64_t[]", sampled),
                             threads, err, ERRLEN), err)
    return scaled, argmax, entropy, (None if sampled is ffi.NULL else sampled)


PEAK_KINDS = ("fp32", "int8", "bf16")


def peak(kind: str, rounds: int, threads: int = 1) -> tuple[float, float]:
    """(operations, check) of native/peak.c's loop of one kind under the active matmul kernel; check equals
    operations / 2 when every round ran. DggufError where the kernel has no such instruction."""
    ops, chk = ffi.new("double *"), ffi.new("double *")
    err = ffi.new("char[]", ERRLEN)
    check(lib.dg_peak(kind.encode(), rounds, threads, ops, chk, err, ERRLEN), err)
    return ops[0], chk[0]


def read_words(words: np.ndarray, threads: int = 1) -> int:
    """The sum (mod 2^64) of a C-contiguous uint64 array, read on `threads` threads."""
    if not (isinstance(words, np.ndarray) and words.dtype == np.uint64 and words.ndim == 1
            and words.flags.c_contiguous):
        raise DggufError("read_words: words must be a C-contiguous 1-D uint64 array")
    total = ffi.new("uint64_t *")
    err = ffi.new("char[]", ERRLEN)
    check(lib.dg_read_words(ffi.from_buffer("uint64_t[]", words), words.size, threads, total, err, ERRLEN), err)
    return int(total[0])
