"""The GGUF reader against corrupt input, and the writer/reader round trip."""
import numpy as np
import pytest
from gguf.constants import GGUFValueType as V

from conftest import PR_TINY
from dgguf.core.errors import DggufError
from dgguf.format.gguf_file import Field, GGUFWriter, TensorInfo, read_gguf
from dgguf.format.quant_types import TENSOR_TYPES


def test_reader_parses_pr24423_file_like_gguf_py():
    from gguf import GGUFReader
    ours = read_gguf(PR_TINY / "tiny-Q4_K_M.gguf")
    ref = GGUFReader(PR_TINY / "tiny-Q4_K_M.gguf")
    assert [t.name for t in ours.tensors] == [t.name for t in ref.tensors]
    for a, b in zip(ours.tensors, ref.tensors):
        assert list(a.ne) == [int(x) for x in b.shape] and a.type.ggml == int(b.tensor_type)
        np.testing.assert_array_equal(ours.tensor_bytes(a), np.asarray(b.data).reshape(-1).view(np.uint8))
    assert ours.get("tokenizer.ggml.tokens") == ref.fields["tokenizer.ggml.tokens"].contents()
    ours.close()


def test_random_header_corruption_gives_dggufError_or_a_valid_parse(tmp_path):
    data = (PR_TINY / "tiny-f32.gguf").read_bytes()
    header_end = read_gguf(PR_TINY / "tiny-f32.gguf").data_offset
    rng = np.random.default_rng(0)
    p = tmp_path / "c.gguf"
    outcomes = {"error": 0, "ok": 0}
    for _ in range(400):
        b = bytearray(data)
        for pos in rng.integers(4, header_end, size=rng.integers(1, 4)):
            b[pos] = rng.integers(0, 256)
        p.write_bytes(bytes(b))
        try:
            read_gguf(p).close()
            outcomes["ok"] += 1
        except DggufError as e:
            assert str(p) in str(e)
            outcomes["error"] += 1
    assert outcomes["error"] > 50   # the corruptions really were detected, not silently accepted


@pytest.mark.parametrize("cut", [3, 20, 100, 5000, -40])   # -40: into the last tensor, past its padding
def test_truncated_files_are_rejected(tmp_path, cut):
    data = (PR_TINY / "tiny-f32.gguf").read_bytes()
    p = tmp_path / "t.gguf"
    p.write_bytes(data[:cut])
    with pytest.raises(DggufError):
        read_gguf(p)


def test_writer_round_trip_and_offsets_beyond_4_gib(tmp_path):
    """A sparse tensor placed past 4 GiB: 64-bit offsets survive the round trip."""
    big = TensorInfo("big", (1 << 20, 1 << 10), TENSOR_TYPES["F32"])          # 4 GiB of zeros, sparse on disk
    small = TensorInfo("small", (8,), TENSOR_TYPES["F32"])
    fields = {"general.architecture": Field(V.STRING, "diffusion-gemma"),
              "x.list": Field(V.ARRAY, [1, 2, 3], V.INT32), "x.f": Field(V.FLOAT32, 0.5)}
    out = tmp_path / "big.gguf"
    with GGUFWriter(out, fields, [big, small]) as w:
        w._f.seek(big.nbytes, 1)      # leave a hole instead of writing 4 GiB
        w._index, w._written = 1, 0
        w.write(np.arange(8, dtype=np.float32))
    g = read_gguf(out)
    t = {t.name: t for t in g.tensors}
    assert t["small"].offset >= 1 << 32
    np.testing.assert_array_equal(g.tensor_bytes(t["small"]).view(np.float32), np.arange(8))
    assert g.get("x.list") == [1, 2, 3] and g.get("x.f") == 0.5
    g.close()


@pytest.mark.parametrize("value", [Field(V.STRING, "32"), Field(V.UINT32, 1), Field(V.UINT32, 48)],
                         ids=["string", "one", "not-power-of-two"])
def test_bad_alignment_field_is_rejected(tmp_path, value):
    t = TensorInfo("x", (8,), TENSOR_TYPES["F32"])
    out = tmp_path / "a.gguf"
    with GGUFWriter(out, {"general.alignment": value}, [t]) as w:
        w.write(np.zeros(8, np.float32))
    with pytest.raises(DggufError, match="general.alignment"):
        read_gguf(out)
