"""Native forward pass (native/model.c via runtime/native_model.py) against transformers in fp32.

Every reference is `DiffusionGemmaForBlockDiffusion(input_ids=context, decoder_input_ids=canvas,
self_conditioning_logits=sc).logits`, never our own code: contexts three sliding windows long, with and
without self-conditioning, on the first canvas and on a later one (the first canvas encoded after the
context). Plus PR #24423's golden logits, thread-count invariance, chunked encoding and bad inputs.

How close is close: PR #24423's fixture (logits below 0.6) matches its golden fp32 logits to 1e-5. The
make_checkpoint models have logits up to ~7.5, and there transformers' own fp32 result is 5e-5..1.6e-4 away
from its fp64 result (the same model loaded in float64): fp32 rounding alone, whoever computes. So those
checks take the fp64 run as the truth and require our error to stay within 2e-5 of the largest logit (1.5e-4 at
7.5; or 1e-4, whichever is larger): the size of fp32 noise at that scale, which transformers' own fp32 run shows
too. The gap to the fp32 run must stay within 2.5e-4 (both runs carry fp32 noise).
The parity tests run once per matmul kernel this CPU has (reference, avx2, avx512 and their int8-* forms, which
take F32 weights through the same float kernels).

Quantized files: through a float kernel they give exactly the logits of their dequantized weights; through an
int8 kernel (activations rounded to int8 per 32 values) they stay within per-type bounds of that. The bounds are
measured, not derived: these random tiny models amplify any perturbation (an F32 file and its Q8_0 copy, both
through the float path, already differ by 2.1 in logits of up to 7.5, mean 0.24), and int8 activations move them
about as much: the largest max / mean gap measured over the tiny, odd and decisive checkpoints (k256 for the
K-quants) times 1.5.
"""
import dataclasses

import numpy as np
import pytest

from conftest import PR_TINY
from dgguf.core._native import ffi, lib
from dgguf.core import native
from dgguf.core.errors import DggufError
from dgguf.format.gguf_file import read_gguf
from dgguf.convert.quantize import convert_checkpoint, requantize
from dgguf.runtime.model_config import read_model_config
from dgguf.runtime.native_model import NativeModel

TOL = 1e-4          # absolute, against the fp64 truth (or PR #24423's golden fp32 logits)
TOL_FP32 = 2.5e-4   # absolute, against transformers in fp32: two fp32 results, each ~1e-4 from the truth
REL_TOL = 2e-5      # against the fp64 truth, relative to the largest |logit|


FLOAT_KERNEL = native.float_kernel()
INT8_KERNELS = [k for k in native.matmul_kernels() if k.startswith("int8")]


@pytest.fixture
def float_kernel():
    """The fastest kernel that keeps float activations for every weight type."""
    before = native.matmul_kernel()
    native.set_matmul_kernel(FLOAT_KERNEL)
    yield FLOAT_KERNEL
    native.set_matmul_kernel(before)


class Case:
    """One tiny checkpoint: its transformers model in fp32, its F32 GGUF, the native model, inputs."""

    def __init__(self, hf_dir, gguf_path, seed=0):
        import torch
        from transformers import DiffusionGemmaForBlockDiffusion
        self.torch = torch
        self.hf = {dt: DiffusionGemmaForBlockDiffusion.from_pretrained(
            hf_dir, dtype=dt, experts_implementation="eager", attn_implementation="eager").eval()
            for dt in (torch.float32, torch.float64)}   # grouped_mm has no float64 kernel
        self.gguf = read_gguf(gguf_path)
        self.cfg = read_model_config(self.gguf)
        rng = np.random.default_rng(seed)
        W, C, V = self.cfg.sliding_window, self.cfg.canvas_length, self.cfg.vocab_size
        self.context = rng.integers(0, V, 3 * W + 1, dtype=np.int32)
        self.canvas1 = rng.integers(0, V, C, dtype=np.int32)
        self.canvas2 = rng.integers(0, V, C, dtype=np.int32)
        self.sc = (rng.standard_normal((C, V)) * 4).astype(np.float32)

    def native(self, threads=1):
        return NativeModel(self.gguf, self.cfg, threads=threads)

    def reference(self, context, canvas, sc=None):
        """Transformers' canvas logits in fp32 and in fp64, as float64 arrays."""
        t = self.torch
        out = []
        for dt, model in self.hf.items():
            with t.no_grad():
                logits = model(input_ids=t.from_numpy(context.astype(np.int64))[None],
                               decoder_input_ids=t.from_numpy(canvas.astype(np.int64))[None],
                               self_conditioning_logits=None if sc is None else t.from_numpy(sc).to(dt)[None])
            out.append(logits.logits[0].double().numpy())
        return out


def assert_matches_transformers(got, ref32, ref64, label):
    err64, err32, hf_err = (float(np.abs(a - b).max()) for a, b in ((got, ref64), (got, ref32), (ref32, ref64)))
    print(f"{label} ({native.matmul_kernel()}): max abs vs fp32 {err32:.3g}, vs fp64 {err64:.3g} "
          f"(transformers fp32 vs fp64 {hf_err:.3g})")
    assert err64 <= max(TOL, REL_TOL * float(np.abs(ref64).max())), label
    assert err32 <= TOL_FP32, label


def _case(checkpoints, tmp_path_factory, config):
    hf = checkpoints(config)
    out = convert_checkpoint(hf, tmp_path_factory.mktemp(f"fwd-{config}") / "model-f32.gguf", "F32")
    return Case(hf, out)


@pytest.fixture(scope="module")
def cases(checkpoints, tmp_path_factory):
    made = {}

    def get(config):
        if config not in made:
            made[config] = _case(checkpoints, tmp_path_factory, config)
        return made[config]
    return get


def _native_logits(case, threads=1, later=False, sc=None):
    cache = case.native(threads).new_cache(256)
    cache.encode(case.context)
    if later:
        cache.encode(case.canvas1)
    canvas = case.canvas2 if later else case.canvas1
    return cache.decode(canvas, sc)


@pytest.mark.parametrize("config", ["tiny", "odd", "decisive"])
@pytest.mark.parametrize("later", [False, True], ids=["first_canvas", "later_canvas"])
@pytest.mark.parametrize("with_sc", [False, True], ids=["no_sc", "sc"])
def test_canvas_logits_match_transformers_beyond_sliding_window(cases, config, later, with_sc, kernel):
    case = cases(config)
    sc = case.sc if with_sc else None
    context = np.concatenate([case.context, case.canvas1]) if later else case.context
    ref32, ref64 = case.reference(context, case.canvas2 if later else case.canvas1, sc)
    got = _native_logits(case, later=later, sc=sc)
    assert_matches_transformers(got, ref32, ref64, f"{config} later={later} sc={with_sc}")


@pytest.mark.parametrize("later", [False, True], ids=["first_canvas", "later_canvas"])
def test_bf16_checkpoint_matches_transformers_fp32_compute(cases, later, kernel):
    """BF16 weights widened to F32 on both sides. The GGUF records the bf16 embedding scale (9.8125 for H=96),
    transformers loaded in fp32 uses sqrt(96) in fp32: the native model is given the fp32 value to compare."""
    case = cases("bf16")
    assert case.cfg.embedding_scale == 9.8125
    fp32 = dataclasses.replace(case.cfg, embedding_scale=float(np.float32(np.sqrt(case.cfg.hidden_size))))
    context = np.concatenate([case.context, case.canvas1]) if later else case.context
    ref32, ref64 = case.reference(context, case.canvas2 if later else case.canvas1, case.sc)
    cache = NativeModel(case.gguf, fp32).new_cache(256)
    cache.encode(case.context)
    if later:
        cache.encode(case.canvas1)
    got = cache.decode(case.canvas2 if later else case.canvas1, case.sc)
    assert_matches_transformers(got, ref32, ref64, f"bf16 later={later}")


def test_pr24423_fixture_matches_its_golden_transformers_logits(kernel):
    g = read_gguf(PR_TINY / "tiny-f32.gguf")
    cfg = read_model_config(g)
    par = PR_TINY / "parity"
    ids = {k: np.fromfile(par / f"{k}.i32", dtype=np.int32) for k in ("prompt", "canvasA", "canvasB")}
    hf = {k: np.fromfile(par / f"hf_{k}.bin", dtype=np.float32).reshape(16, cfg.vocab_size)
          for k in ("A0", "A1", "B0")}
    cache = NativeModel(g, cfg).new_cache(64)
    cache.encode(ids["prompt"])
    got = {"A0": cache.decode(ids["canvasA"]), "A1": cache.decode(ids["canvasA"], hf["A0"]),
           "B0": cache.decode(ids["canvasB"])}
    for k in got:
        err = float(np.abs(got[k] - hf[k]).max())
        print(f"pr24423 {k} ({kernel}): max abs {err:.3g}")
        assert err <= TOL, k


def _canvas_logits(path, threads=2):
    g = read_gguf(path)
    cfg = read_model_config(g)
    rng = np.random.default_rng(1)
    cache = NativeModel(g, cfg, threads=threads).new_cache(128)
    cache.encode(rng.integers(0, cfg.vocab_size, 3 * cfg.sliding_window, dtype=np.int32))
    canvas = rng.integers(0, cfg.vocab_size, cfg.canvas_length, dtype=np.int32)
    sc = (rng.standard_normal((cfg.canvas_length, cfg.vocab_size)) * 4).astype(np.float32)
    return cache.decode(canvas, sc), {t.type.name for t in g.tensors}


@pytest.mark.parametrize("source", ["pr24423:tiny-Q8_0", "pr24423:tiny-Q4_K_M", "tiny:F16", "tiny:BF16",
                                    "k256:Q4_K_M", "k256:Q2_K"])
def test_quantized_weights_give_the_logits_of_their_dequantized_values(checkpoints, tmp_path, source, float_kernel):
    """Every stored type goes through dg_dequantize_rows row by row: a quantized file gives exactly the logits
    of an F32 file holding its dequantized weights (requantize to F32)."""
    origin, name = source.split(":")
    if origin == "pr24423":
        quant = PR_TINY / f"{name}.gguf"
    else:
        quant = convert_checkpoint(checkpoints(origin), tmp_path / f"{name}.gguf", name)
    f32 = requantize(quant, tmp_path / "dequantized-f32.gguf", "F32")
    got, types = _canvas_logits(quant)
    want, _ = _canvas_logits(f32)
    assert types - {"F32"}, types
    assert np.array_equal(got, want)


# file type -> (max, mean) bound on |int8 path - float path| of the canvas logits; see the module docstring.
INT8_BOUNDS = {"Q8_0": (3.7, 0.55), "Q4_0": (5.3, 0.56), "Q5_1": (3.5, 0.44), "Q4_K_M": (6.1, 0.51),
               "Q6_K": (5.7, 0.42), "Q3_K_M": (4.4, 0.42), "Q2_K": (5.9, 0.35), "Q5_K_M": (4.9, 0.38)}
INT8_SOURCES = [f"{config}:{t}" for config in ("tiny", "odd", "decisive") for t in ("Q8_0", "Q4_0", "Q5_1", "Q4_K_M")]
INT8_SOURCES += [f"k256:{t}" for t in ("Q4_K_M", "Q6_K", "Q3_K_M", "Q2_K", "Q5_K_M")]


@pytest.fixture(scope="module")
def quantized_files(checkpoints, tmp_path_factory):
    made = {}

    def get(source):
        if source not in made:
            config, name = source.split(":")
            made[source] = convert_checkpoint(checkpoints(config), tmp_path_factory.mktemp("q") / f"{name}.gguf", name)
        return made[source]
    return get


def _gaps_from_the_float_path(path, kernels):
    """(float-path logits, the file's types, |logits - float-path logits| under each of kernels)."""
    before = native.matmul_kernel()
    try:
        native.set_matmul_kernel(FLOAT_KERNEL)
        want, types = _canvas_logits(path)
        gaps = []
        for k in kernels:
            native.set_matmul_kernel(k)
            gaps.append(np.abs(_canvas_logits(path)[0] - want))
    finally:
        native.set_matmul_kernel(before)
    return want, types, gaps


@pytest.mark.parametrize("source", INT8_SOURCES)
def test_int8_activations_stay_within_the_stated_bounds_of_the_float_path(quantized_files, source):
    want, types, gaps = _gaps_from_the_float_path(quantized_files(source), INT8_KERNELS)
    assert types - {"F32"}, types
    for k, gap in zip(INT8_KERNELS, gaps):
        print(f"{source} {k}: max {gap.max():.3f}, mean {gap.mean():.4f}, max |logit| {np.abs(want).max():.2f}")
        bound_max, bound_mean = INT8_BOUNDS[source.split(":")[1]]
        assert 0 < gap.max() <= bound_max and gap.mean() <= bound_mean, source


# BF16 weights against activations rounded to bfloat16 (the bf16 kernels' tile): (max, mean) bound on |that path -
# the float path| of the canvas logits, as INT8_BOUNDS (the soft embedding of a BF16 embedding rounds its
# probabilities to bfloat16 too). Measured 0.67-0.91 max and 0.06-0.12 mean over the three configs (bound x1.5);
# transformers in bf16 against itself in fp32 on these checkpoints moves 1.3-3.2 max, 0.15-0.37 mean.
BF16_BOUND = (1.4, 0.18)
BF16_KERNELS = [k for k in native.matmul_kernels() if "bf16" in k]


@pytest.mark.parametrize("config", ["tiny", "odd", "decisive"])
def test_bf16_activations_stay_within_the_stated_bound_of_the_float_path(quantized_files, config):
    want, types, gaps = _gaps_from_the_float_path(quantized_files(f"{config}:BF16"), BF16_KERNELS)
    assert "BF16" in types and BF16_KERNELS
    for k, gap in zip(BF16_KERNELS, gaps):
        print(f"{config}:BF16 {k}: max {gap.max():.4f}, mean {gap.mean():.5f}, max |logit| {np.abs(want).max():.2f}")
        assert 0 < gap.max() <= BF16_BOUND[0] and gap.mean() <= BF16_BOUND[1], config


@pytest.mark.parametrize("int8_kernel", INT8_KERNELS)
def test_quantized_results_are_bit_identical_for_any_thread_count_under_int8(quantized_files, int8_kernel):
    """The grouped expert matmul shares experts and row blocks across threads; the bits must not move."""
    path = quantized_files("k256:Q4_K_M")
    before = native.matmul_kernel()
    try:
        native.set_matmul_kernel(int8_kernel)
        one, _ = _canvas_logits(path, threads=1)
        for threads in (2, 3):
            assert np.array_equal(_canvas_logits(path, threads=threads)[0], one), threads
    finally:
        native.set_matmul_kernel(before)


@pytest.mark.parametrize("kernel_name", [FLOAT_KERNEL] + INT8_KERNELS[-1:])
def test_a_long_pass_equals_its_chunks_through_the_chunked_moe(quantized_files, kernel_name):
    """600 tokens in one encoder pass run the MoE in token chunks (of 256); the cache they leave must equal the one
    left by encoding the same tokens in short passes."""
    g = read_gguf(quantized_files("k256:Q4_K_M"))
    cfg = read_model_config(g)
    ids = np.random.default_rng(5).integers(0, cfg.vocab_size, 600, dtype=np.int32)
    before = native.matmul_kernel()
    try:
        native.set_matmul_kernel(kernel_name)
        model = NativeModel(g, cfg, threads=2)
        whole, parts = model.new_cache(700), model.new_cache(700)
        whole.encode(ids)
        for part in np.array_split(ids, [7, 200, 457]):
            parts.encode(part)
        canvas = ids[:cfg.canvas_length]
        assert np.array_equal(whole.decode(canvas), parts.decode(canvas))
    finally:
        native.set_matmul_kernel(before)


def test_results_are_bit_identical_for_any_thread_count(cases, kernel):
    case = cases("odd")
    one = _native_logits(case, threads=1, later=True, sc=case.sc)
    for threads in (2, 3):
        assert np.array_equal(_native_logits(case, threads=threads, later=True, sc=case.sc), one)


def test_decode_leaves_the_cache_as_it_was(cases):
    case = cases("tiny")
    cache = case.native().new_cache(256)
    cache.encode(case.context)
    first = cache.decode(case.canvas1, case.sc)
    cache.decode(case.canvas2)
    assert cache.length == len(case.context)
    assert np.array_equal(cache.decode(case.canvas1, case.sc), first)


def test_chunked_encoding_equals_one_pass(cases):
    case = cases("tiny")
    model = case.native()
    whole = model.new_cache(256)
    whole.encode(case.context)
    parts = model.new_cache(256)
    for chunk in np.array_split(case.context, [1, 5, 6, 18]):
        parts.encode(chunk)
    assert parts.length == whole.length == len(case.context)
    assert np.array_equal(parts.decode(case.canvas1), whole.decode(case.canvas1))


def test_truncate_rewinds_when_the_window_is_held_and_refuses_otherwise(cases):
    case = cases("tiny")
    W = case.cfg.sliding_window
    model = case.native()
    short = case.context[: W - 2]                  # shorter than the window: every position is still held
    fresh = model.new_cache(256)
    fresh.encode(short[:3])
    rewound = model.new_cache(256)
    rewound.encode(short)
    rewound.truncate(3)
    assert rewound.length == 3
    assert np.array_equal(rewound.decode(case.canvas1), fresh.decode(case.canvas1))
    long = model.new_cache(256)
    long.encode(case.context)
    with pytest.raises(DggufError, match="sliding layer"):
        long.truncate(len(case.context) - 1)
    assert long.length == len(case.context)
    long.truncate(len(case.context))               # a no-op is always possible
    with pytest.raises(DggufError):
        long.truncate(len(case.context) + 1)


def test_bad_ids_and_shapes_raise_dggufferror(cases):
    case = cases("tiny")
    V = case.cfg.vocab_size
    cache = case.native().new_cache(64)
    for bad in (np.array([1, V], dtype=np.int32), np.array([-1, 2], dtype=np.int32)):
        with pytest.raises(DggufError, match="outside the vocabulary"):
            cache.encode(bad)
        with pytest.raises(DggufError, match="outside the vocabulary"):
            cache.decode(bad)
    assert cache.length == 0
    with pytest.raises(DggufError, match="sc_logits"):
        cache.decode(case.canvas1, case.sc[:, :-1].copy())
    with pytest.raises(DggufError, match="sc_logits"):
        cache.decode(case.canvas1, case.sc.astype(np.float64))
    with pytest.raises(DggufError, match="capacity"):
        cache.encode(np.zeros(65, dtype=np.int32))
    # the native checks stand on their own
    err = ffi.new("char[]", 256)
    ids = np.array([3, V + 7], dtype=np.int32)
    out = np.empty((2, V), dtype=np.float32)
    rc = lib.dg_decode(cache.model._model, cache._c, ffi.from_buffer("int32_t[]", ids), 2, ffi.NULL, 0, ffi.NULL,
                       ffi.from_buffer("float[]", out), err, 256)
    assert rc != 0 and b"outside the vocabulary" in ffi.string(err)
    rc = lib.dg_encode(cache.model._model, cache._c, ffi.from_buffer("int32_t[]", ids), 2, err, 256)
    assert rc != 0 and cache.length == 0
