"""Importance matrices: the activation tap, `dgguf imatrix` (canvas denoising and --encoder-only), llama.cpp's
imatrix GGUF layout both ways, `--imatrix` in convert/quantize, and `--target-size`."""
import numpy as np
import pytest
from gguf import GGUFReader
from gguf import GGUFWriter as RefWriter

from dgguf.cli import main
from dgguf.convert.quantize import Quant, convert_checkpoint, requantize
from dgguf.convert.target_size import Candidate, measure
from dgguf.core import native
from dgguf.core.errors import DggufError
from dgguf.core.imatrix import Collector
from dgguf.format.gguf_file import read_gguf
from dgguf.format.imatrix import Imatrix, read_imatrix, write_imatrix
from dgguf.format.quant_types import TENSOR_TYPES
from dgguf.runtime import Model
from dgguf.runtime.imatrix import DENOISING_LEVELS, gather

TEXT = "def add(a, b):\n    return a + b\n\nclass Point:\n    x = 1\n    y = 2\n" * 6


# ---- the tap ----------------------------------------------------------------------------------------------

def test_tap_adds_the_squares_of_every_input_of_a_watched_weight():
    rng = np.random.default_rng(0)
    t = TENSOR_TYPES["Q4_K"]
    w = native.quantize_rows(rng.standard_normal((8, 256)).astype(np.float32), t.ggml)
    other = native.quantize_rows(rng.standard_normal((8, 256)).astype(np.float32), t.ggml)
    x1, x2 = (rng.standard_normal((n, 256)).astype(np.float32) for n in (5, 3))
    with Collector({"w": (w, 256, 1)}) as c:
        native.matmul(w, t.ggml, (8, 256), x1, threads=2)
        native.matmul(w, t.ggml, (8, 256), x2)
        native.matmul(other, t.ggml, (8, 256), x1)           # not watched
    native.matmul(w, t.ggml, (8, 256), x1)                   # after the collection
    expected = (np.concatenate([x1, x2]).astype(np.float64) ** 2).sum(axis=0)
    np.testing.assert_allclose(c.sum2["w"][0], expected, rtol=1e-12)
    assert c.count["w"].tolist() == [8.0]


@pytest.fixture(scope="module")
def k256(checkpoints, tmp_path_factory):
    d = tmp_path_factory.mktemp("imatrix")
    hf = checkpoints("k256")
    return hf, convert_checkpoint(hf, d / "ref-F32.gguf", "F32"), d


def test_gather_counts_every_pass(k256):
    _, ref, _ = k256
    m = Model.load(ref, threads=1)
    n = len(m.tokenizer.encode(TEXT, bos=False))
    im, st = gather(m, TEXT)
    enc, _ = gather(m, TEXT, encoder_only=True)
    cfg = m.config
    levels = len(DENOISING_LEVELS)
    assert st.tokens == n and st.decoder_passes == levels * st.canvases
    # layer 0's K projection: the BOS prefix and the text through the encoder, each canvas through the decoder at
    # every noise level
    assert im.counts["blk.0.attn_k.weight"].tolist() == [1 + n + levels * n]
    assert enc.counts["blk.0.attn_k.weight"].tolist() == [1 + n]
    # experts: top-k of each token, per expert
    ex = im.counts["blk.0.ffn_gate_up_exps.weight"]
    assert ex.shape == (cfg.n_experts,) and ex.sum() == cfg.top_k * (1 + n + levels * n)
    assert im.sums["blk.0.ffn_gate_up_exps.weight"].shape == (cfg.n_experts, cfg.hidden_size)
    # the head (tied embedding) runs on decoder passes, self-conditioning on every pass but the first of a canvas
    assert im.counts["token_embd.weight"].tolist() == [levels * n]
    assert im.counts["self_cond_gate.weight"].tolist() == [(levels - 1) * n]
    assert "token_embd.weight" not in enc.sums and "self_cond_gate.weight" not in enc.sums
    # the same statistics from a fresh run (seeded noise)
    again, _ = gather(m, TEXT)
    assert all(np.array_equal(again.sums[k], im.sums[k]) for k in im.sums)
    m.close()


# ---- the file layout ---------------------------------------------------------------------------------------

def sample_imatrix():
    rng = np.random.default_rng(1)
    return Imatrix(sums={"blk.0.attn_q.weight": rng.uniform(0, 5, (1, 32)),
                         "blk.0.ffn_up_exps.weight": rng.uniform(0, 5, (4, 32))},
                   counts={"blk.0.attn_q.weight": np.array([10.0]),
                           "blk.0.ffn_up_exps.weight": np.array([3.0, 0.0, 5.0, 2.0])},
                   datasets=["calib.txt"], chunk_count=7, chunk_size=32)


def test_imatrix_file_is_llama_cpps_layout(tmp_path):
    im = sample_imatrix()
    write_imatrix(tmp_path / "im.gguf", im)
    r = GGUFReader(tmp_path / "im.gguf")
    assert r.fields["general.type"].contents() == "imatrix"
    assert r.fields["imatrix.datasets"].contents() == ["calib.txt"]
    assert r.fields["imatrix.chunk_count"].contents() == 7 and r.fields["imatrix.chunk_size"].contents() == 32
    t = {x.name: x for x in r.tensors}
    s, c = t["blk.0.ffn_up_exps.weight.in_sum2"], t["blk.0.ffn_up_exps.weight.counts"]
    assert list(s.shape) == [32, 4] and list(c.shape) == [1, 4] and s.tensor_type.name == "F32"
    np.testing.assert_array_equal(np.asarray(s.data).reshape(4, 32), im.sums["blk.0.ffn_up_exps.weight"]
                                  .astype(np.float32))
    back = read_imatrix(tmp_path / "im.gguf")
    assert back.datasets == ["calib.txt"] and (back.chunk_count, back.chunk_size) == (7, 32)
    for k in im.sums:
        np.testing.assert_array_equal(back.sums[k], im.sums[k].astype(np.float32))
        np.testing.assert_array_equal(back.counts[k], im.counts[k])


def test_reads_an_imatrix_written_by_another_writer(tmp_path):
    """Written with gguf-py from the documented layout (as llama-imatrix lays it out), 1-D and 2-D tensors."""
    w = RefWriter(tmp_path / "ref.gguf", arch="imatrix")
    w.add_string("general.type", "imatrix")
    w.add_array("imatrix.datasets", ["wiki.train.raw"])
    w.add_uint32("imatrix.chunk_count", 100)
    w.add_uint32("imatrix.chunk_size", 512)
    w.add_tensor("output.weight.in_sum2", np.full(64, 200.0, np.float32))
    w.add_tensor("output.weight.counts", np.array([100.0], np.float32))
    w.add_tensor("blk.0.ffn_down_exps.weight.in_sum2", np.arange(2 * 64, dtype=np.float32).reshape(2, 64))
    w.add_tensor("blk.0.ffn_down_exps.weight.counts", np.array([[4.0], [0.0]], np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    im = read_imatrix(tmp_path / "ref.gguf")
    np.testing.assert_array_equal(im.importance("output.weight", 64, 1), np.full((1, 64), 2.0, np.float32))
    imp = im.importance("blk.0.ffn_down_exps.weight", 64, 2)
    np.testing.assert_array_equal(imp[0], np.arange(64, dtype=np.float32) / 4)
    np.testing.assert_array_equal(imp[1], np.ones(64, np.float32))      # no input: 1, llama.cpp's rule
    assert im.importance("blk.9.attn_q.weight", 64, 1) is None
    assert im.importance("output.weight", 64, 8).shape == (8, 64)        # one matrix serves every expert
    with pytest.raises(DggufError, match="not an importance matrix of this model"):
        im.importance("output.weight", 32, 1)


def test_bad_imatrix_files_are_clear_errors(tmp_path, checkpoints):
    base = sample_imatrix()
    write_imatrix(tmp_path / "ok.gguf", base)
    with pytest.raises(DggufError, match="not 'imatrix'"):
        read_imatrix(convert_checkpoint(checkpoints("tiny"), tmp_path / "model.gguf", "F32"))
    w = RefWriter(tmp_path / "half.gguf", arch="imatrix")
    w.add_string("general.type", "imatrix")
    w.add_array("imatrix.datasets", ["x"])
    w.add_uint32("imatrix.chunk_count", 1)
    w.add_uint32("imatrix.chunk_size", 1)
    w.add_tensor("a.weight.in_sum2", np.ones(32, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(DggufError, match="has in_sum2 but not counts"):
        read_imatrix(tmp_path / "half.gguf")
    bad = sample_imatrix()
    bad.sums["blk.0.attn_q.weight"][0, 3] = -1.0
    write_imatrix(tmp_path / "neg.gguf", bad)
    with pytest.raises(DggufError, match="negative or non-finite"):
        read_imatrix(tmp_path / "neg.gguf")


# ---- convert / quantize --imatrix and --target-size ---------------------------------------------------------

def weighted_errors(path, ref_path, im):
    """Per quantized tensor: sum over rows of importance-weighted squared error against the reference."""
    q, r = read_gguf(path), read_gguf(ref_path)
    ref = {t.name: t for t in r.tensors}
    out = {}
    for t in q.tensors:
        if t.type.name in ("F32", "F16", "BF16"):
            continue
        n_mat = t.ne[2] if len(t.ne) == 3 else 1
        imp = im.importance(t.name, t.ne[0], n_mat)
        if imp is None:
            continue
        y = native.dequantize_rows(q.tensor_bytes(t), t.type.ggml, t.ne[0]).reshape(n_mat, -1, t.ne[0])
        x = r.tensor_bytes(ref[t.name]).view("<f4").reshape(n_mat, -1, t.ne[0])
        out[t.name] = float(sum(((y[e] - x[e]).astype(np.float64) ** 2 @ imp[e]).sum() for e in range(n_mat)))
    return out


def test_cli_imatrix_then_quantize_with_it(k256, tmp_path, capsys):
    hf, ref, _ = k256
    (tmp_path / "calib.txt").write_text(TEXT)
    im_path = tmp_path / "im.gguf"
    assert main(["imatrix", "-m", str(ref), "--text", str(tmp_path / "calib.txt"), "-o", str(im_path), "-q"]) == 0
    assert "canvases denoised" in capsys.readouterr().out
    assert main(["imatrix", "-m", str(ref), "--text", str(tmp_path / "calib.txt"), "-o", str(tmp_path / "enc.gguf"),
                 "-q", "--encoder-only"]) == 0
    assert "encoder passes only" in capsys.readouterr().out
    im = read_imatrix(im_path)
    plain, weighted = tmp_path / "plain.gguf", tmp_path / "weighted.gguf"
    assert main(["quantize", str(ref), str(plain), "Q2_K", "-q"]) == 0
    assert main(["quantize", str(ref), str(weighted), "Q2_K", "-q", "--imatrix", str(im_path)]) == 0
    assert plain.stat().st_size == weighted.stat().st_size
    ep, ew = weighted_errors(plain, ref, im), weighted_errors(weighted, ref, im)
    assert ep.keys() == ew.keys() and len(ep) > 10
    # a random tiny model's activations are nearly uniform across columns, so the gain is small but general
    assert sum(ew.values()) < 0.97 * sum(ep.values())
    assert sum(ew[k] < ep[k] for k in ep) >= 0.75 * len(ep)
    Model.load(weighted).close()
    # from the checkpoint, the same bytes as from the F32 file
    conv = convert_checkpoint(hf, tmp_path / "conv.gguf", "Q2_K", quant=Quant(im_path))
    a, b = read_gguf(conv), read_gguf(weighted)
    for x, y in zip(a.tensors, b.tensors):
        assert np.array_equal(a.tensor_bytes(x), b.tensor_bytes(y)), x.name
    capsys.readouterr()
    assert main(["quantize", str(ref), str(tmp_path / "x.gguf"), "Q2_K", "-q", "--imatrix",
                 str(tmp_path / "calib.txt")]) == 2
    assert "error:" in capsys.readouterr().err


def predicted_loss(path, ref_path, im):
    q, r = read_gguf(path), read_gguf(ref_path)
    ref = {t.name: t for t in r.tensors}
    total = 0.0
    for t in q.tensors:
        if t.type.name in ("F32", "F16", "BF16"):
            continue
        src = ref[t.name]
        x = r.tensor_bytes(src).view("<f4").reshape(-1, t.ne[0])
        n_mat = t.ne[2] if len(t.ne) == 3 else 1
        c = Candidate(t.name, t.ne, x.shape[0], lambda r0, r1, x=x: x[r0:r1], im.importance(t.name, t.ne[0], n_mat),
                      im.counts.get(t.name))
        total += measure(c, [t.type])[0][1]
    return total


def test_target_size_fits_and_predicts_no_more_loss_than_the_preset(k256, tmp_path, capsys):
    _, ref, _ = k256
    (tmp_path / "calib.txt").write_text(TEXT)
    im_path = tmp_path / "im.gguf"
    m = Model.load(ref, threads=1)
    write_imatrix(im_path, gather(m, TEXT)[0])
    m.close()
    preset = requantize(ref, tmp_path / "preset.gguf", "Q3_K_M", quant=Quant(im_path))
    size = preset.stat().st_size
    out = tmp_path / "fit.gguf"
    assert main(["quantize", str(ref), str(out), "Q3_K_M", "-q", "--imatrix", str(im_path),
                 "--target-size", str(size)]) == 0
    text = capsys.readouterr().out
    assert f"target size {size:,} bytes" in text and "blk.0.attn_q.weight" in text
    assert out.stat().st_size <= size
    im = read_imatrix(im_path)
    assert predicted_loss(out, ref, im) <= predicted_loss(preset, ref, im) * (1 + 1e-9)
    Model.load(out).close()
    # a dry run prints the same mix and writes nothing
    assert main(["quantize", str(ref), str(tmp_path / "dry.gguf"), "Q3_K_M", "--imatrix", str(im_path),
                 "--target-size", str(size), "--dry-run"]) == 0
    assert not (tmp_path / "dry.gguf").exists()
    assert "target size" in capsys.readouterr().out
    # without an importance matrix the error is unweighted; far too small a size is a clear error
    assert main(["quantize", str(ref), str(tmp_path / "plain.gguf"), "Q3_K_M", "-q", "--target-size",
                 str(size)]) == 0
    assert (tmp_path / "plain.gguf").stat().st_size <= size
    capsys.readouterr()
    assert main(["quantize", str(ref), str(tmp_path / "tiny.gguf"), "Q3_K_M", "-q", "--target-size", "100K"]) == 2
    assert "smallest types of the ladder" in capsys.readouterr().err
