"""Issue 13, item 8, reader side: duplicate metadata keys, general.alignment of any integer type, and names
from a file escaped (format.gguf_file.printable) in every message."""
import numpy as np
import pytest
from gguf.constants import GGUFValueType as V

from dgguf.cli import main
from dgguf.core.errors import DggufError
from dgguf.format.gguf_file import Field, GGUFWriter, TensorInfo, printable, read_gguf
from dgguf.format.quant_types import TENSOR_TYPES

CONTROL = [chr(c) for c in range(32)] + ["\x7f"]


def write(path, fields, name="x", values=np.arange(8, dtype=np.float32)):
    t = TensorInfo(name, (len(values),), TENSOR_TYPES["F32"])
    with GGUFWriter(path, fields, [t]) as w:
        w.write(values)
    return path


def patch(path, old: bytes, new: bytes):
    data = path.read_bytes()
    assert data.count(old) == 1 and len(old) == len(new)
    path.write_bytes(data.replace(old, new))


def cli_error(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert not any(c in lines[0] for c in CONTROL), lines[0]
    return lines[0]


# ------------------------------------------------------------------------------------------ printable

@pytest.mark.parametrize("raw,shown", [
    ("blk.0.attn_q.weight", "blk.0.attn_q.weight"),
    ("a\0b\nc\rd\te", "a\\x00b\\nc\\rd\\te"),
    ("\x1b[2J\x1b]0;title\x07", "\\x1b[2J\\x1b]0;title\\x07"),
    ("\x7f\x85", "\\x7f\\x85"),
    ("é中文▁<0x0A>", "é中文▁<0x0A>"),                 # printable non-ASCII stays as it is
    ("\u202eevil\u200b", "\\u202eevil\\u200b"),        # bidi override, zero-width space
    ("\U000e0001", "\\U000e0001"),
    (b"ok\xff\xfe\x00", "ok\\xff\\xfe\\x00"),           # bytes: undecodable ones as \xNN
    (42, "42"),
])
def test_printable_escapes(raw, shown):
    assert printable(raw) == shown


def test_printable_caps_the_length_without_splitting_an_escape():
    assert printable("A" * 80) == "A" * 80
    assert printable("A" * 81) == "A" * 80 + "..."
    assert printable("A" * 78 + "\0") == "A" * 78 + "..."          # \x00 would make 82
    assert printable("A" * 10, limit=4) == "AAAA..."
    assert printable("\n" * 1000, limit=None) == "\\n" * 1000
    assert len(printable("\0" * 10**7)) == 80 + 3


# ---------------------------------------------------------------------------------- duplicate keys

def test_duplicate_metadata_key_is_an_error_naming_it(tmp_path, capsys):
    p = write(tmp_path / "d.gguf", {"general.architecture": Field(V.STRING, "diffusion-gemma"),
                                    "x.key1": Field(V.UINT32, 1), "x.key2": Field(V.UINT32, 2)})
    patch(p, b"x.key2", b"x.key1")
    with pytest.raises(DggufError, match="duplicate metadata key x.key1"):
        read_gguf(p)
    line = cli_error(capsys, "inspect", str(p))
    assert "duplicate" in line and "x.key1" in line
    line = cli_error(capsys, "quantize", str(p), str(tmp_path / "q.gguf"), "Q8_0", "-q")
    assert "duplicate" in line and "x.key1" in line
    assert not (tmp_path / "q.gguf").exists()


def test_duplicate_key_with_escape_sequences_is_escaped(tmp_path, capsys):
    k1, k2 = "\x1b]0;pwned\x07\x1b[2J" + "K" * 500 + "1", "\x1b]0;pwned\x07\x1b[2J" + "K" * 500 + "2"
    p = write(tmp_path / "e.gguf", {k1: Field(V.UINT32, 1), k2: Field(V.UINT32, 2)})
    patch(p, k2.encode(), k1.encode())
    line = cli_error(capsys, "inspect", str(p))
    assert "duplicate" in line and "\\x1b]0;pwned\\x07\\x1b[2J" in line and "..." in line
    assert len(line) < 300


def test_key_that_is_not_utf8_is_shown_escaped(tmp_path, capsys):
    p = write(tmp_path / "u.gguf", {"x.k\x01\x02\x03": Field(V.UINT32, 1)})
    patch(p, b"x.k\x01\x02\x03", b"x.k\xff\x1b\n")
    line = cli_error(capsys, "inspect", str(p))
    assert "not UTF-8" in line and "x.k\\xff\\x1b\\n" in line


def test_tensor_name_is_escaped_in_messages(tmp_path, capsys):
    name = "blk.0.\x1b[31m\n" + "T" * 300
    p = write(tmp_path / "t.gguf", {}, name=name)
    data = bytearray(p.read_bytes())
    at = data.index(name.encode()) + len(name.encode()) + 4 + 8     # n_dims u32, ne[0] u64, then the type
    data[at:at + 4] = (1234).to_bytes(4, "little")
    p.write_bytes(bytes(data))
    line = cli_error(capsys, "inspect", str(p))
    assert "unsupported type 1234" in line and "blk.0.\\x1b[31m\\n" in line and len(line) < 300


# ------------------------------------------------------------------------------------- alignment

@pytest.mark.parametrize("vtype", [V.UINT8, V.INT8, V.UINT16, V.INT16, V.UINT32, V.INT32, V.UINT64, V.INT64])
def test_alignment_of_any_integer_type_is_accepted(tmp_path, vtype):
    p = write(tmp_path / "a.gguf", {"general.alignment": Field(vtype, 32)})
    g = read_gguf(p)
    np.testing.assert_array_equal(g.tensor_bytes(g.tensors[0]).view(np.float32), np.arange(8))
    g.close()


@pytest.mark.parametrize("field", [Field(V.INT64, -32), Field(V.INT8, -8), Field(V.INT64, 2**17),
                                   Field(V.UINT64, 2**63), Field(V.INT32, 0), Field(V.INT64, 24),
                                   Field(V.FLOAT32, 32.0), Field(V.BOOL, True)],
                         ids=["negative", "negative-int8", "2^17", "2^63", "zero", "24", "float", "bool"])
def test_alignment_value_is_checked_strictly(tmp_path, capsys, field):
    p = write(tmp_path / "a.gguf", {"general.alignment": field})
    with pytest.raises(DggufError, match="general.alignment"):
        read_gguf(p)
    assert "general.alignment" in cli_error(capsys, "inspect", str(p))


def test_alignment_64_places_the_data_accordingly(tmp_path):
    """A file written with 64-byte alignment (patched from 32: the header is padded to 64 here) reads right."""
    from dgguf.format import gguf_file
    fields = {"general.alignment": Field(V.INT64, 64)}
    t = TensorInfo("x", (8,), TENSOR_TYPES["F32"])
    head = gguf_file.header_bytes(fields, [t])
    head += b"\0" * (-len(head) % 64)
    p = tmp_path / "a64.gguf"
    p.write_bytes(head + np.arange(8, dtype=np.float32).tobytes())
    g = read_gguf(p)
    assert g.data_offset % 64 == 0
    np.testing.assert_array_equal(g.tensor_bytes(g.tensors[0]).view(np.float32), np.arange(8))
    g.close()
