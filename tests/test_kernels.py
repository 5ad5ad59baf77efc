"""Every matmul kernel variant against the plain reference and against float64 numpy, for every stored type."""
import numpy as np
import pytest

from dgguf.convert import native
from dgguf.convert.quant_types import TENSOR_TYPES

KERNELS = native.matmul_kernels()


@pytest.fixture(params=KERNELS)
def kernel(request):
    before = native.matmul_kernel()
    native.set_matmul_kernel(request.param)
    yield request.param
    native.set_matmul_kernel(before)


def stored(rng, rows, k, type_name):
    """A random weight in a stored type, and its exact float values (what the kernel multiplies)."""
    w = rng.standard_normal((rows, k)).astype(np.float32)
    t = TENSOR_TYPES[type_name]
    raw = native.quantize_rows(w, t.ggml)
    return raw, native.dequantize_rows(raw, t.ggml, k), t


# Shapes with remainders everywhere: rows not a multiple of 4, tokens not a multiple of 4, K tails of 1..15.
SHAPES = [(1, 1, 32), (3, 5, 64), (7, 9, 96), (13, 6, 160), (4, 4, 256), (17, 33, 544), (5, 3, 2816)]


@pytest.mark.parametrize("type_name", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q6_K",
                                       "Q4_K", "Q2_K"])
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
        assert np.all(np.abs(got - exact) <= bound), (kernel, type_name, n, rows, k)


def test_fast_kernels_agree_with_the_reference_and_ignore_thread_count():
    rng = np.random.default_rng(1)
    raw, _, t = stored(rng, 37, 2816, "Q4_K")
    x = rng.standard_normal((21, 2816)).astype(np.float32)
    before = native.matmul_kernel()
    try:
        native.set_matmul_kernel("reference")
        ref = native.matmul(raw, t.ggml, (37, 2816), x)
        for k in KERNELS:
            native.set_matmul_kernel(k)
            one = native.matmul(raw, t.ggml, (37, 2816), x, threads=1)
            np.testing.assert_array_equal(one, native.matmul(raw, t.ggml, (37, 2816), x, threads=2))
            np.testing.assert_array_equal(one, native.matmul(raw, t.ggml, (37, 2816), x, threads=3))
            assert np.abs(one - ref).max() <= 1e-4 * np.abs(ref).max(), k
    finally:
        native.set_matmul_kernel(before)


def test_unknown_or_unsupported_kernel_is_a_clear_error():
    with pytest.raises(native.DggufError, match="unknown matmul kernel"):
        native.set_matmul_kernel("avx1024")
