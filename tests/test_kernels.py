"""Every matmul kernel variant against the plain reference and against float64 numpy, for every stored type.

The float kernels multiply the stored weights' exact float values; the int8 kernels (int8-*) first round the
activations to int8 per 32 values, so they are held to that rounding's worst case on top of the float bound, and
must equal the int8 reference bit for bit (integer sums are exact, the float steps are in a fixed order)."""
import itertools
import os
import subprocess
import sys

import numpy as np
import pytest

from dgguf.core import native
from dgguf.core.errors import DggufError
from dgguf.format.quant_types import TENSOR_TYPES

KERNELS = native.matmul_kernels()
INT8_KERNELS = [k for k in KERNELS if k.startswith("int8")]
FLOAT_KERNELS = [k for k in KERNELS if k not in INT8_KERNELS]
QUANTIZED = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS"]
BF16_KERNELS = [k for k in KERNELS if "bf16" in k]   # bfloat16 matmul of BF16 weights, bfloat16 soft embedding


def stored(rng, rows, k, type_name):
    """A random weight in a stored type, and its exact float values (what the kernel multiplies)."""
    w = rng.standard_normal((rows, k)).astype(np.float32)
    t = TENSOR_TYPES[type_name]
    raw = native.quantize_rows(w, t.ggml)
    return raw, native.dequantize_rows(raw, t.ggml, k), t


# Shapes with remainders everywhere: rows not a multiple of 4 (or 32), tokens not a multiple of 3, 4 or 12, K tails
# of 1..15 float lanes and of 1..15 int8 blocks (groups of 512 values); (40, 70, 1280) has two row blocks of 32
# and three token chunks of 12 plus a tail.
SHAPES = [(1, 1, 32), (3, 5, 64), (7, 9, 96), (13, 6, 160), (4, 4, 256), (17, 33, 544), (5, 3, 2816),
          (40, 70, 1280)]


def activation_rounding_bound(x, wf):
    """Worst case of int8 activations: each value moves by at most half its block's step, max|x| / 127 / 2 (plus
    a 1% allowance for the float steps of the rounding), times |w|, summed per 32-value block."""
    n, k = x.shape
    half_step = np.abs(x).reshape(n, k // 32, 32).max(axis=2).astype(np.float64) / 254 * 1.01
    w_abs = np.abs(wf).astype(np.float64).reshape(wf.shape[0], k // 32, 32).sum(axis=2)
    return half_step @ w_abs.T


@pytest.mark.parametrize("type_name", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q6_K",
                                       "Q4_K", "Q2_K", "IQ4_NL", "IQ4_XS"])
def test_every_kernel_matches_float64_on_the_stored_values(kernel, type_name):
    rng = np.random.default_rng(0)
    for n, rows, k in SHAPES:
        if k % TENSOR_TYPES[type_name].block_size:
            continue
        raw, wf, t = stored(rng, rows, k, type_name)
        x = rng.standard_normal((n, k)).astype(np.float32)
        got = native.matmul(raw, t.ggml, (rows, k), x)
        exact = x.astype(np.float64) @ wf.astype(np.float64).T
        # the classical worst case of a float32 sum of k products: k * eps * sum |x_i w_i|, per output
        bound = k * np.finfo(np.float32).eps * (np.abs(x).astype(np.float64) @ np.abs(wf).astype(np.float64).T)
        if kernel in INT8_KERNELS and type_name in QUANTIZED:
            bound += activation_rounding_bound(x, wf)
        if kernel in BF16_KERNELS and type_name == "BF16":
            # activations rounded to bfloat16: each moves by at most 2^-8 of itself (8 significant bits)
            bound += 2.0**-8 * 1.01 * (np.abs(x).astype(np.float64) @ np.abs(wf).astype(np.float64).T)
        assert np.all(np.abs(got - exact) <= bound), (kernel, type_name, n, rows, k)


def test_fast_kernels_agree_with_the_reference_and_ignore_thread_count():
    rng = np.random.default_rng(1)
    raw, _, t = stored(rng, 37, 2816, "Q4_K")
    x = rng.standard_normal((21, 2816)).astype(np.float32)
    before = native.matmul_kernel()
    try:
        native.set_matmul_kernel("reference")
        ref = native.matmul(raw, t.ggml, (37, 2816), x)
        for k in FLOAT_KERNELS:
            native.set_matmul_kernel(k)
            one = native.matmul(raw, t.ggml, (37, 2816), x, threads=1)
            np.testing.assert_array_equal(one, native.matmul(raw, t.ggml, (37, 2816), x, threads=2))
            np.testing.assert_array_equal(one, native.matmul(raw, t.ggml, (37, 2816), x, threads=3))
            assert np.abs(one - ref).max() <= 1e-4 * np.abs(ref).max(), k
    finally:
        native.set_matmul_kernel(before)


def _with_kernel(name, fn):
    before = native.matmul_kernel()
    try:
        native.set_matmul_kernel(name)
        return fn()
    finally:
        native.set_matmul_kernel(before)


@pytest.mark.parametrize("type_name", QUANTIZED)
def test_int8_kernels_equal_the_int8_reference_bit_for_bit_for_any_thread_count(type_name):
    rng = np.random.default_rng(2)
    for n, rows, k in SHAPES + [(2, 37, 2816), (25, 5, 1536)]:
        if k % TENSOR_TYPES[type_name].block_size:
            continue
        raw, _, t = stored(rng, rows, k, type_name)
        x = (rng.standard_normal((n, k)) * rng.uniform(0.01, 10, (n, 1))).astype(np.float32)
        x[:, : k // 2 : 7] = 0.0          # zero values, and all-zero blocks where k is short
        ref = _with_kernel("int8-reference", lambda: native.matmul(raw, t.ggml, (rows, k), x))
        for kernel in INT8_KERNELS:
            for threads in (1, 2, 3):
                got = _with_kernel(kernel, lambda: native.matmul(raw, t.ggml, (rows, k), x, threads=threads))
                np.testing.assert_array_equal(got, ref, err_msg=f"{kernel} {type_name} {n}x{rows}x{k} {threads}")


def test_bf16_kernels_equal_their_reference_bit_for_bit_for_any_thread_count():
    """BF16 weights straight from the file (denormal ones included, which VDPBF16PS reads as zero) against
    activations rounded to bfloat16 (some denormal, some zero): every bf16 kernel gives the reference's bits."""
    rng = np.random.default_rng(5)
    t = TENSOR_TYPES["BF16"]
    for n, rows, k in SHAPES + [(2, 37, 2816), (25, 5, 1536)]:
        w = rng.standard_normal((rows, k)).astype(np.float32)
        w[:, 1::5] *= 1e-39                    # denormal in bfloat16 too
        raw = native.quantize_rows(w, t.ggml)
        x = (rng.standard_normal((n, k)) * rng.uniform(0.01, 10, (n, 1))).astype(np.float32)
        x[:, ::7] = 0.0
        x[:, 3::11] *= 1e-39
        x[:, 1::5] *= 1e37                     # against the denormal weights: products that would show
        ref = _with_kernel("int8-bf16-reference", lambda: native.matmul(raw, t.ggml, (rows, k), x))
        assert np.isfinite(ref).all()
        for kernel in BF16_KERNELS:
            for threads in (1, 2, 3):
                got = _with_kernel(kernel, lambda: native.matmul(raw, t.ggml, (rows, k), x, threads=threads))
                np.testing.assert_array_equal(got, ref, err_msg=f"{kernel} {n}x{rows}x{k} {threads}")


def test_int8_kernels_hold_q8_0_levels_at_the_extremes():
    """Q8_0 levels -128..127 against activations rounded to +-127: the sums AVX2 forms in 16 bits must not
    saturate. Raw blocks with every level, scale 1."""
    rng = np.random.default_rng(3)
    rows, k, n = 9, 1024, 7
    blocks = np.zeros((rows, k // 32, 34), dtype=np.uint8)
    blocks[:, :, :2] = np.frombuffer(np.float16(1.0).tobytes(), dtype=np.uint8)
    q = rng.integers(-128, 128, (rows, k // 32, 32), dtype=np.int8)
    q[:, ::2] = np.where(q[:, ::2] < 0, -128, 127)        # runs of extreme levels
    blocks[:, :, 2:] = q.view(np.uint8)
    x = np.where(rng.random((n, k)) < 0.5, -1.0, 1.0).astype(np.float32) * 3.0   # every value at +-127 steps
    wf = q.reshape(rows, k).astype(np.float64)
    exact = x.astype(np.float64) @ wf.T
    for kernel in INT8_KERNELS:
        got = _with_kernel(kernel, lambda: native.matmul(blocks, TENSOR_TYPES["Q8_0"].ggml, (rows, k), x))
        np.testing.assert_allclose(got, exact, rtol=1e-6, err_msg=kernel)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_int8_kernels_turn_every_output_of_a_token_with_a_non_finite_activation_into_nan(bad):
    rng = np.random.default_rng(4)
    raw, _, t = stored(rng, 6, 544, "Q8_0")
    x = rng.standard_normal((3, 544)).astype(np.float32)
    x[1, 300] = bad
    for kernel in INT8_KERNELS:
        got = _with_kernel(kernel, lambda: native.matmul(raw, t.ggml, (6, 544), x))
        assert np.isnan(got[1]).all() and np.isfinite(got[[0, 2]]).all(), kernel


def test_dgguf_no_simd_naming_a_kernel_leaves_the_best_one_below_it():
    """DGGUF_NO_SIMD=<kernel> (read once per process) turns that kernel and those above it off; an unknown value
    forces the reference."""
    def default_with(value):
        code = "from dgguf.core import native; print(native.matmul_kernel())"
        env = {**os.environ, "DGGUF_NO_SIMD": value}
        return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                              check=True).stdout.strip()
    best = default_with("")
    assert best in KERNELS
    if best != "reference":
        below = default_with(best)
        assert below in KERNELS and KERNELS.index(below) < KERNELS.index(best)
    assert default_with("no-such-kernel") == "reference"


def test_unknown_or_unsupported_kernel_is_a_clear_error():
    with pytest.raises(native.DggufError, match="unknown matmul kernel"):
        native.set_matmul_kernel("avx1024")


def test_forward_tanh_is_within_2_1_ulp_of_float64_and_keeps_signs_and_specials():
    """The vectorised tanh the gelu and the softcap use: both polynomial pieces, the switch between them at
    |x| = 0.625, the saturation near 9.1, and the values a libm tanhf gets exactly."""
    x = np.concatenate([np.linspace(-12, 12, 400001), np.geomspace(1e-30, 20, 200000),
                        -np.geomspace(1e-30, 20, 200000), np.nextafter(np.float32(0.625), [0, 1])]).astype(np.float32)
    exact = np.tanh(x.astype(np.float64))
    ulps = np.abs(native.tanh(x) - exact) / np.spacing(np.abs(exact).astype(np.float32))
    assert ulps.max() <= 2.1
    assert np.array_equal(native.tanh(-x), -native.tanh(x))
    special = np.array([0.0, -0.0, np.inf, -np.inf, 1e-45, 50.0, -50.0], np.float32)
    assert np.array_equal(native.tanh(special), np.tanh(special))
    assert np.signbit(native.tanh(special)).tolist() == np.signbit(special).tolist()
    assert np.isnan(native.tanh(np.array([np.nan], np.float32)))[0]


# (tokens, vocabulary rows, width): token tails of the 6-token tile, an odd vocabulary (a half pair at the end),
# blocks of 128 rows plus a tail, widths with 32-column tails.
SOFT_SHAPES = [(1, 3, 32), (7, 129, 64), (13, 517, 96), (6, 300, 256), (20, 1000, 288)]


def softmax64(logits):
    z = logits.astype(np.float64)
    p = np.exp(z - z.max(axis=1, keepdims=True))
    return p / p.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("type_name", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q6_K", "Q4_K", "IQ4_XS"])
def test_soft_embedding_matches_float64_under_every_kernel(kernel, type_name):
    """Float accumulation: within the float32 sum bound (plus the exp's and the division's few ulp). The bf16
    kernels round the probabilities and a quantized W to bfloat16 (unit roundoff 2^-8 each), so each product is
    off by at most 2^-7 of itself; a BF16 W is exact there, so 2^-8; F32/F16 embeddings stay on the float path."""
    rng = np.random.default_rng(2)
    for n, V, H in SOFT_SHAPES:
        if H % TENSOR_TYPES[type_name].block_size:
            continue
        raw, wf, t = stored(rng, V, H, type_name)
        logits = (rng.standard_normal((n, V)) * 3).astype(np.float32)
        got = native.soft_embed(raw, t.ggml, (V, H), logits, scale=1.5, threads=2)
        p = softmax64(logits)
        exact, mass = 1.5 * p @ wf.astype(np.float64), 1.5 * p @ np.abs(wf).astype(np.float64)
        rel = 0.0 if kernel not in BF16_KERNELS else 2.0**-7 if type_name in QUANTIZED else \
            2.0**-8 if type_name == "BF16" else 0.0
        bound = (rel + (V + 8) * np.finfo(np.float32).eps) * mass + 1e-30
        assert np.all(np.abs(got - exact) <= bound), (kernel, type_name, n, V, H)
        assert np.array_equal(got, native.soft_embed(raw, t.ggml, (V, H), logits, scale=1.5, threads=3)), \
            "the thread count changed the bits"
        assert rel == 0 or np.abs(got - exact).max() > 1e-4 * mass.max(), "the bf16 path was not taken"


def test_bf16_soft_embedding_equals_its_reference_bit_for_bit_for_any_thread_count():
    """VDPBF16PS adds the odd product, then the even one, each rounded with denormals flushed: the reference
    does the same in plain C, so the AVX-512 BF16 kernel must give its bits."""
    rng = np.random.default_rng(3)
    before = native.matmul_kernel()
    try:
        for (n, V, H), type_name in itertools.product(SOFT_SHAPES, ("Q8_0", "BF16")):
            raw, _, t = stored(rng, V, H, type_name)
            logits = (rng.standard_normal((n, V)) * 4).astype(np.float32)
            native.set_matmul_kernel("int8-bf16-reference")
            want = native.soft_embed(raw, t.ggml, (V, H), logits, threads=1)
            for k in BF16_KERNELS:
                native.set_matmul_kernel(k)
                for threads in (1, 2, 3):
                    assert np.array_equal(native.soft_embed(raw, t.ggml, (V, H), logits, threads=threads), want), \
                        (k, threads, n, V, H)
    finally:
        native.set_matmul_kernel(before)


@pytest.mark.skipif(not {"avx2", "avx512"} <= set(KERNELS), reason="needs a CPU with AVX2 and AVX-512")
def test_avx2_soft_embedding_equals_avx512_bit_for_bit():
    """Both float-path kernels sum each block's products per column in float (fused, rows ascending) and add the
    block sum in double, so AVX2 (16 columns at a time, from a copy of the block) must give AVX-512's bits."""
    rng = np.random.default_rng(4)
    before = native.matmul_kernel()
    try:
        for (n, V, H), type_name in itertools.product(SOFT_SHAPES, ("F32", "Q8_0")):
            raw, _, t = stored(rng, V, H, type_name)
            logits = (rng.standard_normal((n, V)) * 4).astype(np.float32)
            got = {}
            for k in ("avx2", "avx512"):
                native.set_matmul_kernel(k)
                got[k] = [native.soft_embed(raw, t.ggml, (V, H), logits, threads=th) for th in (1, 3)]
            assert all(np.array_equal(a, got["avx512"][0]) for a in got["avx2"] + got["avx512"]), (n, V, H)
    finally:
        native.set_matmul_kernel(before)


def top_k_reference(logits, wf, k, scale):
    """float64: each row's k largest logits (ties to the lower row), softmax over them alone, times their rows."""
    out = np.zeros((len(logits), wf.shape[1]))
    for t, row in enumerate(logits):
        idx = np.sort(np.argsort(-row, kind="stable")[:k])
        z = row[idx].astype(np.float64)
        p = np.exp(z - z.max())
        out[t] = scale * (p / p.sum()) @ wf[idx].astype(np.float64)
    return out


@pytest.mark.parametrize("type_name", ["F32", "BF16", "Q8_0", "Q6_K", "Q4_K"])
def test_top_k_soft_embedding_matches_its_float64_reference_for_any_thread_count(type_name):
    """The cheaper self-conditioning (dg_decode's sc_top_k): the k most probable rows, renormalised, summed in
    double; ties at the cut go to the lower row (repeated logits make ties)."""
    rng = np.random.default_rng(7)
    for n, V, H in SOFT_SHAPES:
        if H % TENSOR_TYPES[type_name].block_size:
            continue
        raw, wf, t = stored(rng, V, H, type_name)
        logits = np.round(rng.standard_normal((n, V)) * 3, 1).astype(np.float32)   # rounded: many ties
        for k in sorted({1, 2, min(V, 16), V}):
            want = top_k_reference(logits, wf, k, 1.5)
            got = [native.soft_embed(raw, t.ggml, (V, H), logits, scale=1.5, threads=th, top_k=k) for th in (1, 2, 3)]
            assert np.array_equal(got[0], got[1]) and np.array_equal(got[0], got[2])
            assert np.allclose(got[0], want, rtol=1e-5, atol=1e-6), (type_name, n, V, H, k)
        full = native.soft_embed(raw, t.ggml, (V, H), logits, scale=1.5, threads=2, top_k=V)
        assert np.allclose(full, 1.5 * softmax64(logits) @ wf.astype(np.float64), rtol=1e-5, atol=1e-6)
    raw, _, t = stored(rng, 8, 256, type_name)
    with pytest.raises(DggufError, match="top_k 9 is outside 1..8"):
        native.soft_embed(raw, t.ggml, (8, 256), np.zeros((2, 8), np.float32), top_k=9)


def test_soft_embedding_rejects_mismatched_shapes_and_bad_arguments():
    raw, _, t = stored(np.random.default_rng(4), 8, 32, "Q8_0")
    with pytest.raises(ValueError):
        native.soft_embed(raw, t.ggml, (8, 32), np.zeros((2, 7), np.float32))
    with pytest.raises(ValueError):
        native.soft_embed(raw[:-1], t.ggml, (8, 32), np.zeros((2, 8), np.float32))


def test_many_short_parallel_passes_give_the_same_bits(checkpoints, tmp_path):
    """A cache's pool runs a few hundred parallel steps per decoder pass, its workers spinning and then sleeping
    between them: pass after pass (some after a pause long enough to put them to sleep) must complete and give
    the single-thread bits."""
    import time

    from dgguf.format.gguf_file import read_gguf
    from dgguf.convert.quantize import convert_checkpoint
    from dgguf.runtime.model_config import read_model_config
    from dgguf.runtime.native_model import NativeModel
    g = read_gguf(convert_checkpoint(checkpoints("tiny"), tmp_path / "t.gguf", "Q8_0"))
    cfg = read_model_config(g)
    ids = np.random.default_rng(5).integers(0, cfg.vocab_size, cfg.canvas_length, dtype=np.int32)
    caches = [NativeModel(g, cfg, threads=t).new_cache(8) for t in (1, 3)]
    for c in caches:
        c.encode(ids[:8])
    want = caches[0].decode(ids)
    for i in range(60):
        assert np.array_equal(caches[1].decode(ids), want), i
        if i % 20 == 0:
            time.sleep(0.01)
