"""Native quantizers/dequantizers against gguf-py (bytes and floats) and llama.cpp (RMSE)."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q
from gguf.quants import dequantize as gguf_dequantize, quantize as gguf_quantize

from dgguf.core import native
from dgguf.core.errors import DggufError

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "ggml_rmse.json").read_text())

FLOAT_TYPES = [Q.F32, Q.F16, Q.BF16]
LEGACY_TYPES = [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0]
K_TYPES = [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K]
ALL_TYPES = FLOAT_TYPES + LEGACY_TYPES + K_TYPES


def gguf_q(x: np.ndarray, t: Q) -> np.ndarray:
    with np.errstate(all="ignore"):
        return np.ascontiguousarray(gguf_quantize(x, t)).view(np.uint8).reshape(x.shape[0], -1)


def gguf_dq(raw: np.ndarray, t: Q, ncols: int) -> np.ndarray:
    with np.errstate(all="ignore"):
        return gguf_dequantize(raw, t).reshape(-1, ncols)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def awkward_rows(ncols: int = 256) -> np.ndarray:
    """Rows that exercise the edges of the legacy quantizers' arithmetic."""
    rng = np.random.default_rng(7)
    rows = [
        rng.standard_normal(ncols),
        rng.standard_normal(ncols) * 1e4,
        rng.standard_normal(ncols) * 1e-3,
        np.zeros(ncols),
        np.full(ncols, -0.0),
        np.full(ncols, 1e-38) * rng.choice([-1, 1], ncols),          # scale underflows, 1/d overflows
        rng.standard_normal(ncols) * 1e-30,
        rng.standard_normal(ncols) * 1e-42,                         # float32 subnormals
        np.full(ncols, 3e38) * rng.choice([-1, 1], ncols),           # scale overflows f16
        rng.standard_normal(ncols) * 7e4,                            # scale just past f16 max for Q8_0
        np.round(rng.standard_normal(ncols) * 16) / 2,               # exact halves: ties everywhere
        rng.integers(-8, 8, ncols) * 0.25,                           # values on the Q4_0 grid
        rng.integers(-127, 128, ncols) / 127.0 * 3,                  # values on the Q8_0 grid
        np.where(np.arange(ncols) % 32 == 5, 1.0, 0.0),              # one spike per block
        np.full(ncols, 0.5),                                         # constant blocks (max == min)
        rng.uniform(0, 1, ncols),                                    # all positive: min > 0
        -rng.uniform(0, 1, ncols),
    ]
    return np.array(rows, dtype=np.float32)


# ---- sizes -------------------------------------------------------------------

@pytest.mark.parametrize("t", ALL_TYPES, ids=lambda t: t.name)
def test_block_and_type_sizes_match_gguf(t):
    assert native.type_size(int(t)) == GGML_QUANT_SIZES[t]


def test_unknown_type_is_rejected():
    with pytest.raises(DggufError, match="not supported"):
        native.type_size(9)  # Q8_1: not a storage type here
    with pytest.raises(DggufError):
        native.quantize_rows(np.zeros((1, 32), np.float32), 9)


# ---- dequantization: bit-identical to gguf-py --------------------------------

@pytest.mark.parametrize("t", LEGACY_TYPES + K_TYPES, ids=lambda t: t.name)
def test_dequantize_random_blocks_matches_gguf_bitwise(t):
    """Random bytes cover every scale/nibble/high-bit combination, f16 inf/NaN scales included."""
    bs, ts = GGML_QUANT_SIZES[t]
    ncols = 512
    raw = np.random.default_rng(int(t)).integers(0, 256, (48, ncols // bs * ts), dtype=np.uint8)
    assert same_bits(native.dequantize_rows(raw, int(t), ncols), gguf_dq(raw, t, ncols))


@pytest.mark.parametrize("t", [Q.F16, Q.BF16], ids=lambda t: t.name)
def test_dequantize_every_16bit_pattern_matches_gguf(t):
    raw = np.arange(65536, dtype=np.uint16).view(np.uint8).reshape(256, 512)
    assert same_bits(native.dequantize_rows(raw, int(t), 256), gguf_dq(raw, t, 256))


def test_dequantize_f32_is_identity():
    x = np.random.default_rng(1).standard_normal((3, 40)).astype(np.float32)
    assert same_bits(native.dequantize_rows(x.view(np.uint8), int(Q.F32), 40), x)


@pytest.mark.parametrize("t", [Q.Q4_K, Q.Q5_0, Q.F16], ids=lambda t: t.name)
def test_dequantize_from_misaligned_buffer(t):
    bs, ts = GGML_QUANT_SIZES[t]
    raw = np.random.default_rng(3).integers(0, 256, (4, 512 // bs * ts), dtype=np.uint8)
    buf = np.empty(raw.size + 1, np.uint8)
    buf[1:] = raw.ravel()
    assert same_bits(native.dequantize_rows(buf[1:], int(t), 512), gguf_dq(raw, t, 512))


# ---- quantization: byte-identical to gguf-py for float and legacy types ------

@pytest.mark.parametrize("t", FLOAT_TYPES + LEGACY_TYPES, ids=lambda t: t.name)
def test_quantize_awkward_rows_matches_gguf_bytes(t):
    x = awkward_rows()
    assert np.array_equal(native.quantize_rows(x, int(t)), gguf_q(x, t))


@pytest.mark.parametrize("t", FLOAT_TYPES + LEGACY_TYPES, ids=lambda t: t.name)
def test_quantize_random_matrix_matches_gguf_bytes(t):
    rng = np.random.default_rng(11)
    x = (rng.standard_t(3, (256, 1024)) * rng.uniform(1e-3, 10, (256, 1))).astype(np.float32)
    assert np.array_equal(native.quantize_rows(x, int(t)), gguf_q(x, t))


@pytest.mark.parametrize("t", [Q.F16, Q.BF16], ids=lambda t: t.name)
def test_quantize_arbitrary_float_bits_matches_gguf(t):
    """Random bit patterns hit every rounding boundary, subnormals, overflow, inf and NaN payloads."""
    bits = np.random.default_rng(5).integers(0, 2**32, 1 << 20, dtype=np.uint64).astype(np.uint32)
    # add every exact halfway point between neighbouring f16 / bf16 values
    hi = np.arange(65536, dtype=np.uint32)
    halfway = (hi << 16) | 0x8000 if t == Q.BF16 else np.arange(1 << 20, dtype=np.uint32) << 12
    x = np.concatenate([bits, halfway]).view(np.float32).reshape(-1, 1024)
    assert np.array_equal(native.quantize_rows(x, int(t)), gguf_q(x, t))


def test_quantize_f32_is_identity():
    x = np.random.default_rng(1).standard_normal((3, 40)).astype(np.float32)
    assert same_bits(native.quantize_rows(x, int(Q.F32)).view(np.float32), x)


def test_quantize_into_misaligned_input():
    x = awkward_rows()
    buf = np.empty(x.size * 4 + 1, np.uint8)
    buf[1:] = x.view(np.uint8).ravel()
    # the wrapper passes a misaligned float view straight through to C
    raw = native.ffi.from_buffer(buf[1:])
    out = np.empty((x.shape[0], 256 // 32 * 18), np.uint8)
    err = native.ffi.new("char[]", 256)
    assert native.lib.dg_quantize_rows(int(Q.Q4_0), native.ffi.cast("float *", raw), native.ffi.from_buffer(out),
                                       x.shape[0], 256, err, 256) == 0
    assert np.array_equal(out, gguf_q(x, Q.Q4_0))


# ---- K-quants: RMSE against llama.cpp's reference quantizers ----------------

def seeded_matrices() -> dict[str, np.ndarray]:
    """Same construction as scripts/measure_ggml_rmse.py (the fixture records their hashes)."""
    gauss = np.random.default_rng(20240601).standard_normal((704, 2816)).astype(np.float32) * np.float32(0.02)
    student = (np.random.default_rng(20240602).standard_t(4, (704, 2816)) * 0.02).astype(np.float32)
    return {"gauss_704x2816": gauss, "student4_704x2816": student,
            "gauss_2816x704": gauss.reshape(2816, 704), "student4_2816x704": student.reshape(2816, 704)}



_MATRICES: dict[str, np.ndarray] = {}
RMSE_CASES = [(m, t) for m, d in FIXTURE["rmse"].items() for t in d]


def matrix(name: str) -> np.ndarray:
    if not _MATRICES:
        _MATRICES.update(seeded_matrices())
    m = _MATRICES[name]
    assert hashlib.sha256(m.tobytes()).hexdigest() == FIXTURE["matrices"][name], \
        "test matrix differs from the measured one"
    return m


@pytest.mark.parametrize("name,tname", RMSE_CASES, ids=[f"{t}-{m}" for m, t in RMSE_CASES])
def test_rmse_within_2_percent_of_ggml_reference(name, tname):
    x = matrix(name)
    t = Q[tname]
    y = native.dequantize_rows(native.quantize_rows(x, int(t)), int(t), x.shape[1])
    rmse = float(np.sqrt(np.mean((y.astype(np.float64) - x) ** 2)))
    ggml = FIXTURE["rmse"][name][tname]
    assert rmse <= 1.02 * ggml, f"{tname} on {name}: {rmse:.6e} vs ggml {ggml:.6e}"


@pytest.mark.parametrize("t", K_TYPES, ids=lambda t: t.name)
def test_k_quants_survive_degenerate_rows(t):
    """Zeros, constants, one outlier, tiny and sign-only rows: finite output, error bounded by the row's scale."""
    rng = np.random.default_rng(13)
    n = 512
    rows = np.array([
        np.zeros(n), np.full(n, -0.0), np.full(n, 0.25), np.full(n, -3.0),
        np.where(np.arange(n) == 77, 50.0, rng.standard_normal(n) * 0.01),
        rng.standard_normal(n) * 1e-20, rng.standard_normal(n) * 1e-42,
        np.sign(rng.standard_normal(n)), rng.uniform(0, 1, n), -rng.uniform(0, 1, n),
    ], dtype=np.float32)
    y = native.dequantize_rows(native.quantize_rows(rows, int(t)), int(t), n)
    assert np.isfinite(y).all()
    assert not y[0].any() and not y[1].any()
    # one bit of slack per level beyond the type's precision: 2 bits for Q2_K and so on
    bits = {Q.Q2_K: 2, Q.Q3_K: 3, Q.Q4_K: 4, Q.Q5_K: 5, Q.Q6_K: 6}[t]
    for r in (2, 3, 7, 8, 9):
        scale = np.abs(rows[r]).max()
        assert np.abs(y[r] - rows[r]).max() <= scale * 2.0 ** (1 - bits), f"row {r}"


def _quantize_in_subprocess(path, t, no_simd):
    """sha256 of quantize_rows(np.load(path)) in a fresh process with DGGUF_NO_SIMD set (read once per process)."""
    code = ("import sys, hashlib, numpy as np; from dgguf.core import native; "
            f"print(hashlib.sha256(native.quantize_rows(np.load({str(path)!r}), {int(t)}).tobytes()).hexdigest())")
    env = {**os.environ, "DGGUF_NO_SIMD": no_simd}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout


@pytest.mark.parametrize("t", K_TYPES, ids=lambda t: t.name)
def test_k_quant_vector_paths_match_scalar_reference(t, tmp_path):
    """The scalar reference, the baseline vector build and (where present) the AVX2 build agree bit for bit."""
    path = tmp_path / "x.npy"
    np.save(path, matrix("student4_704x2816")[:64])
    default, baseline_vec, scalar = (_quantize_in_subprocess(path, t, v) for v in ("", "avx2", "1"))
    assert len(scalar) == 65
    assert scalar == baseline_vec == default


# ---- errors --------------------------------------------------------------------

@pytest.mark.parametrize("t", LEGACY_TYPES + K_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan], ids=["inf", "-inf", "nan"])
def test_quantize_rejects_non_finite_values_with_their_position(t, bad):
    x = np.ones((3, 512), np.float32)
    x[2, 300] = bad
    with pytest.raises(DggufError, match="row 2, column 300"):
        native.quantize_rows(x, int(t))


@pytest.mark.parametrize("t", [Q.F16, Q.BF16, Q.F32], ids=lambda t: t.name)
def test_float_types_store_non_finite_values(t):
    x = np.array([[np.inf, -np.inf, np.nan, 1.0]], np.float32)
    y = native.dequantize_rows(native.quantize_rows(x, int(t)), int(t), 4)
    assert y[0, 0] == np.inf and y[0, 1] == -np.inf and np.isnan(y[0, 2]) and y[0, 3] == 1.0


@pytest.mark.parametrize("t", LEGACY_TYPES + K_TYPES, ids=lambda t: t.name)
def test_row_length_must_be_a_whole_number_of_blocks(t):
    bs = GGML_QUANT_SIZES[t][0]
    err = native.ffi.new("char[]", 256)
    x = np.zeros(bs * 2, np.float32)
    out = np.zeros(4096, np.uint8)
    rc = native.lib.dg_quantize_rows(int(t), native.ffi.from_buffer("float[]", x), native.ffi.from_buffer(out), 1,
                                     bs + 16, err, 256)
    assert rc == native.lib.DG_E_SHAPE and b"multiple" in native.ffi.string(err)
    rc = native.lib.dg_dequantize_rows(int(t), native.ffi.from_buffer(out), native.ffi.from_buffer("float[]", x), 1,
                                       bs + 16, err, 256)
    assert rc == native.lib.DG_E_SHAPE


def test_negative_sizes_are_rejected():
    err = native.ffi.new("char[]", 256)
    x = np.zeros(64, np.float32)
    out = np.zeros(64, np.uint8)
    for nrows, ncols in [(-1, 32), (1, -32)]:
        rc = native.lib.dg_quantize_rows(int(Q.Q8_0), native.ffi.from_buffer("float[]", x),
                                         native.ffi.from_buffer(out), nrows, ncols, err, 256)
        assert rc == native.lib.DG_E_SHAPE and b"negative" in native.ffi.string(err)


def test_empty_matrix_is_fine():
    assert native.quantize_rows(np.zeros((0, 256), np.float32), int(Q.Q4_K)).shape == (0, 144)
