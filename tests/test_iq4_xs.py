"""IQ4_XS and IQ4_NL (the non-linear 4-bit types): layout and dequantization against gguf-py, quantization
quality, and the importance-weighted quantizers of every type that takes an importance matrix.

The matmul kernels of both types are checked with every other type's in tests/test_kernels.py."""
import numpy as np
import pytest
from gguf.constants import GGML_QUANT_SIZES
from gguf.constants import GGMLQuantizationType as Q
from gguf.quants import dequantize as gguf_dequantize

from dgguf.core import native
from dgguf.core.errors import DggufError
from dgguf.core.imatrix import quantize_rows_imatrix
from dgguf.format.quant_types import FILE_TYPES, TENSOR_TYPES

IQ4 = [Q.IQ4_NL, Q.IQ4_XS]
WEIGHTED = [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.IQ4_NL, Q.IQ4_XS]


def roundtrip(x, t, imp=None):
    raw = native.quantize_rows(x, int(t)) if imp is None else quantize_rows_imatrix(x, int(t), imp)
    return native.dequantize_rows(raw, int(t), x.shape[1])


def student(rows=64, cols=2048, seed=3):
    return (np.random.default_rng(seed).standard_t(4, (rows, cols)) * 0.02).astype(np.float32)


@pytest.mark.parametrize("t", IQ4, ids=lambda t: t.name)
def test_sizes_and_tables_match_gguf(t):
    assert native.type_size(int(t)) == GGML_QUANT_SIZES[t]
    tt = TENSOR_TYPES[t.name]
    assert (tt.ggml, tt.block_size, tt.type_size) == (int(t), *GGML_QUANT_SIZES[t])


def test_iq4_xs_file_type_is_llama_cpps():
    assert FILE_TYPES["IQ4_XS"].ftype == 30 and FILE_TYPES["IQ4_XS"].base == "IQ4_XS"


@pytest.mark.parametrize("t", IQ4, ids=lambda t: t.name)
def test_dequantize_random_blocks_matches_gguf_bitwise(t):
    """Random bytes: every index, every 6-bit scale code, f16 inf/NaN scales."""
    bs, ts = GGML_QUANT_SIZES[t]
    raw = np.random.default_rng(int(t)).integers(0, 256, (40, 512 // bs * ts), dtype=np.uint8)
    with np.errstate(all="ignore"):
        ref = gguf_dequantize(raw, t).reshape(-1, 512).astype(np.float32)
    got = native.dequantize_rows(raw, int(t), 512)
    assert np.array_equal(got.view(np.uint32), ref.view(np.uint32))


@pytest.mark.parametrize("t", IQ4, ids=lambda t: t.name)
def test_quantized_bytes_dequantize_the_same_through_gguf(t):
    x = student(8, 1024)
    raw = native.quantize_rows(x, int(t))
    ref = gguf_dequantize(raw, t).reshape(x.shape)
    assert np.array_equal(native.dequantize_rows(raw, int(t), 1024), ref)


def rmse(a, b):
    return float(np.sqrt(np.mean((a.astype(np.float64) - b) ** 2)))


@pytest.mark.parametrize("dist", ["gauss", "student"])
def test_iq4_quality_between_q4_0_and_q4_k(dist):
    """At 4.25 bits IQ4_XS beats Q4_0 (4.5 bits, uniform levels) clearly and stays within 8% of Q4_K (4.5
    bits, scale and min per 32); IQ4_NL (4.5 bits) beats Q4_0 too."""
    rng = np.random.default_rng(11)
    x = student() if dist == "student" else (rng.standard_normal((64, 2048)) * 0.02).astype(np.float32)
    e = {t: rmse(roundtrip(x, t), x) for t in (Q.Q4_0, Q.Q4_K, Q.IQ4_XS, Q.IQ4_NL)}
    assert e[Q.IQ4_XS] < 0.9 * e[Q.Q4_0], e
    assert e[Q.IQ4_NL] < 0.9 * e[Q.Q4_0], e
    assert e[Q.IQ4_XS] < 1.08 * e[Q.Q4_K], e


@pytest.mark.parametrize("t", IQ4, ids=lambda t: t.name)
def test_iq4_degenerate_rows(t):
    rng = np.random.default_rng(13)
    n = 512
    rows = np.array([np.zeros(n), np.full(n, -0.0), np.full(n, 0.25), np.full(n, -3.0),
                     np.where(np.arange(n) == 77, 50.0, rng.standard_normal(n) * 0.01),
                     rng.standard_normal(n) * 1e-20, np.sign(rng.standard_normal(n)), rng.uniform(0, 1, n)],
                    dtype=np.float32)
    y = roundtrip(rows, t)
    assert np.isfinite(y).all()
    assert not y[0].any() and not y[1].any()
    for r in (2, 3, 6, 7):   # the table's widest gap (24 of 240) at the row's scale, with f16 and code rounding
        assert np.abs(y[r] - rows[r]).max() <= np.abs(rows[r]).max() * 0.12, r


@pytest.mark.parametrize("t", IQ4, ids=lambda t: t.name)
@pytest.mark.parametrize("bad", [np.inf, np.nan], ids=["inf", "nan"])
def test_iq4_rejects_non_finite_values(t, bad):
    x = np.zeros((2, 256), np.float32)
    x[1, 5] = bad
    with pytest.raises(DggufError, match="row 1, column 5"):
        native.quantize_rows(x, int(t))


# ---- importance-weighted quantizers ---------------------------------------------------------------------------

def heavy_importance(n, seed=5):
    """Column importances spread over orders of magnitude, as mean squared activations are."""
    return (np.random.default_rng(seed).lognormal(0.0, 1.5, n)).astype(np.float32)


def weighted_error(y, x, imp):
    return float(((y.astype(np.float64) - x) ** 2 @ imp.astype(np.float64)).sum())


@pytest.mark.parametrize("t", WEIGHTED, ids=lambda t: t.name)
def test_importance_lowers_the_weighted_error(t):
    """Against the plain quantizer of the same type (same bytes), the importance-weighted one puts less error on
    the columns that matter."""
    x = student(48, 1024, seed=int(t))
    imp = heavy_importance(1024)
    plain, weighted = (weighted_error(roundtrip(x, t, i), x, imp) for i in (None, imp))
    assert weighted < 0.95 * plain, (plain, weighted)


@pytest.mark.parametrize("t", WEIGHTED, ids=lambda t: t.name)
def test_weighted_quantizer_follows_the_importance(t):
    """Swapping which half of the columns matters (every other column, so every block holds both) swaps where
    the error goes."""
    x = student(32, 512, seed=7)
    first = np.where(np.arange(512) % 2 == 0, 100.0, 0.01).astype(np.float32)
    second = np.roll(first, 1)
    ya, yb = roundtrip(x, t, first), roundtrip(x, t, second)
    hi_a, hi_b = first > 1, second > 1
    err = lambda y, m: float(np.mean((y - x)[:, m] ** 2))   # noqa: E731
    assert err(ya, hi_a) < err(ya, ~hi_a) and err(yb, hi_b) < err(yb, ~hi_b)


def test_types_without_a_weighted_quantizer_ignore_the_importance():
    x = student(4, 512)
    imp = heavy_importance(512)
    for t in (Q.Q8_0, Q.F16, Q.BF16, Q.F32):
        assert np.array_equal(quantize_rows_imatrix(x, int(t), imp), native.quantize_rows(x, int(t)))


def test_uniform_importance_still_gives_a_good_quantization():
    x = student(32, 1024)
    for t in WEIGHTED:
        plain = rmse(roundtrip(x, t), x)
        assert rmse(roundtrip(x, t, np.ones(1024, np.float32)), x) <= 1.1 * plain, t.name


def test_weighted_quantizer_survives_zero_importance_and_degenerate_rows():
    x = np.array([np.zeros(512), np.full(512, 0.5), np.random.default_rng(1).standard_normal(512)], np.float32)
    for t in WEIGHTED:
        for imp in (np.zeros(512, np.float32), np.ones(512, np.float32)):
            y = roundtrip(x, t, imp)
            assert np.isfinite(y).all() and not y[0].any(), t.name


@pytest.mark.parametrize("bad", [np.nan, np.inf, -1.0])
def test_importance_must_be_finite_and_non_negative(bad):
    imp = np.ones(256, np.float32)
    imp[9] = bad
    with pytest.raises(DggufError, match="column 9"):
        quantize_rows_imatrix(np.zeros((1, 256), np.float32), int(Q.Q4_K), imp)
    with pytest.raises(DggufError, match="shape"):
        quantize_rows_imatrix(np.zeros((1, 256), np.float32), int(Q.Q4_K), np.ones(255, np.float32))
