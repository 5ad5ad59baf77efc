"""dgguf eval: the metric definitions on inputs with known answers, and the whole comparison on tiny models."""
import json
import math

import numpy as np
import pytest

from dgguf.core import native
from dgguf.convert.quantize import convert_checkpoint
from dgguf.runtime import Model
from dgguf.cli import main
from dgguf.runtime.quality import (evaluate, kl_divergence, noise_canvas, position_agreement, segments,
                                   top1_agreement)

TEXT = "def add(a, b):\n    return a + b\n\nclass Point:\n    x = 1\n    y = 2\n" * 12


def test_kl_divergence_known_values():
    ref = np.log(np.array([[0.5, 0.5], [0.25, 0.75]]))
    quant = np.log(np.array([[0.9, 0.1], [0.25, 0.75]])) + 3.0     # a shift changes no distribution
    kl = kl_divergence(ref, quant)
    assert kl[0] == pytest.approx(0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1), rel=1e-12)
    assert kl[1] == pytest.approx(0.0, abs=1e-15)
    assert kl_divergence(quant, ref)[0] == pytest.approx(0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5))


def test_top1_and_position_agreement_known_values():
    ref = np.array([[0.0, 2.0, 1.0], [3.0, 0.0, 0.0], [0.0, 0.0, 5.0]])
    quant = np.array([[0.0, 1.0, 2.0], [9.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    assert top1_agreement(ref, quant).tolist() == [False, True, True]
    assert position_agreement([1, 2, 3], [1, 5, 3, 4]) == 0.5          # 2 of the longer one's 4 positions
    assert position_agreement([7, 8], [7, 8]) == 1.0
    assert position_agreement([], [1]) == 0.0


@pytest.mark.parametrize("t", [0.25, 0.5, 0.75, 1.0])
def test_noise_canvas_replaces_exactly_the_fraction(t):
    clean = np.full(32, 1000, dtype=np.int32)           # outside [0, 10): every replaced position shows
    noisy = noise_canvas(clean, t, 10, np.random.default_rng(5))
    assert int(np.sum(noisy != clean)) == round(t * 32)
    assert noisy[noisy != clean].max() < 10
    again = noise_canvas(clean, t, 10, np.random.default_rng(5))
    assert np.array_equal(noisy, again)


def test_segments_cover_the_stream_in_order():
    ids = list(range(23))
    parts = segments(ids, 8)
    assert [len(p) for p in parts] == [8, 8, 7]
    assert sum(parts, []) == ids


@pytest.fixture(scope="module")
def tiny_files(checkpoints, tmp_path_factory):
    hf = checkpoints("tiny")
    d = tmp_path_factory.mktemp("quality")
    return {t: convert_checkpoint(hf, d / f"tiny-{t}.gguf", t, pure=True) for t in ("F32", "Q4_0")}


def test_eval_of_a_model_against_itself_is_exact(tiny_files):
    m = Model.load(tiny_files["F32"], threads=1)
    rep = evaluate(m, m, TEXT, prompts=2)
    assert rep.kl_mean == 0.0 and rep.kl_p99 == 0.0
    assert rep.top1 == 1.0 and rep.committed == 1.0 and rep.steps_ratio == 1.0
    assert rep.positions == 4 * rep.tokens               # every position at each of the 4 noise levels


def test_eval_runs_the_reference_exact_and_the_quant_on_the_current_kernel(checkpoints, tmp_path):
    """A BF16 file against itself: under a kernel that rounds BF16 activations to bfloat16 the quant side shows
    that rounding while the reference side stays on the float path; under the float path both sides agree."""
    path = convert_checkpoint(checkpoints("tiny"), tmp_path / "tiny-BF16.gguf", "BF16", pure=True)
    m = Model.load(path, threads=1)
    before = native.matmul_kernel()
    try:
        native.set_matmul_kernel("int8-bf16-reference")
        rounded = evaluate(m, m, TEXT, prompts=1)
        assert native.matmul_kernel() == "int8-bf16-reference"   # restored after the reference's passes
        native.set_matmul_kernel(native.float_kernel())
        same = evaluate(m, m, TEXT, prompts=1)
    finally:
        native.set_matmul_kernel(before)
    assert rounded.kl_mean > 0 and rounded.top1 < 1.0
    assert same.kl_mean == 0.0 and same.top1 == 1.0


def test_eval_canvas_kl_equals_stateless_recomputation(tiny_files):
    """Two canvases of text: the second is scored after the clean first one, as canvas_logits computes it."""
    ref, quant = (Model.load(tiny_files[t], threads=1) for t in ("F32", "Q4_0"))
    C = ref.config.canvas_length
    ids = ref.tokenizer.encode(TEXT, bos=False)[:2 * C]
    text = ref.tokenizer.decode(ids)
    assert ref.tokenizer.encode(text, bos=False) == ids
    rep = evaluate(ref, quant, text, prompts=1, new_tokens=C)
    bos = ref.tokenizer.bos_id
    expected = []
    for t_index, t in enumerate((0.25, 0.5, 0.75, 1.0)):
        kls = []
        for ci in range(2):
            rng = np.random.Generator(np.random.PCG64([0, 0, ci, t_index]))
            noisy = noise_canvas(np.asarray(ids[ci * C:(ci + 1) * C]), t, ref.config.vocab_size, rng)
            context = [bos] + ids[:ci * C]
            kls.append(kl_divergence(ref.canvas_logits(context, noisy), quant.canvas_logits(context, noisy)))
        expected.append(np.concatenate(kls).mean())
    got = [n.kl_mean for n in rep.by_noise]
    assert got == pytest.approx(expected, rel=1e-9)
    assert min(got) > 0                                   # Q4_0 is not the F32 model
    assert 0.0 <= rep.top1 <= 1.0 and rep.positions == 8 * C


def test_eval_cli_json_and_errors(tiny_files, checkpoints, tmp_path, capsys):
    text = tmp_path / "heldout.txt"
    text.write_text(TEXT)
    assert main(["eval", "-m", str(tiny_files["Q4_0"]), "--ref", str(tiny_files["F32"]), "--text", str(text),
                 "--prompts", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("kl_mean", "kl_p99", "top1", "committed", "steps_ratio", "size_bytes", "bits_per_weight",
                "quant_seconds_per_step", "by_noise"):
        assert key in out
    assert 4.0 < out["bits_per_weight"] < 8.0             # Q4_0 matrices, F32 norms

    other = convert_checkpoint(checkpoints("odd"), tmp_path / "odd.gguf", "F32")
    assert main(["eval", "-m", str(other), "--ref", str(tiny_files["F32"]), "--text", str(text)]) == 2
    assert "not the same model" in capsys.readouterr().err
    assert main(["eval", "-m", str(other), "--ref", str(other), "--text", str(tmp_path / "missing")]) == 2
    assert "cannot read --text" in capsys.readouterr().err
