"""Split GGUF sets (issue 19, item 1): written in llama.cpp's gguf-split layout and read back through read_gguf
given the first file (so by inspect, run, plan, eval and quantize); sets written by two reference writers
(gguf-py's GGUFWriter, part by part from the documented layout, and gguf-py's own splitting) read too; broken
sets are one-line errors; a failed write leaves no part behind."""
import json
import os
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf.constants import GGUFValueType as V

from dgguf.cli import main
from dgguf.core.errors import DggufError
from dgguf.format import split as split_mod
from dgguf.format.gguf_file import Field, TensorInfo, read_gguf
from dgguf.format.quant_types import TENSOR_TYPES
from dgguf.format.split import SplitWriter, parse_size

ROOT = Path(__file__).resolve().parent.parent
SMALL = ROOT / "models" / "small"
SPLIT_KEYS = {"split.no", "split.count", "split.tensors.count"}


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def one_error(capsys, *argv) -> str:
    code, _, err = cli(capsys, *argv)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """models/small as one Q8_0 file and as split sets: by size (3 parts) and by tensor count (40 per part)."""
    d = tmp_path_factory.mktemp("split")
    assert main(["convert", str(SMALL), "-o", str(d / "one.gguf"), "--type", "Q8_0", "-q"]) == 0
    assert main(["convert", str(SMALL), "-o", str(d / "bysize.gguf"), "--type", "Q8_0", "-q",
                 "--split-max-size", "4M"]) == 0
    assert main(["convert", str(SMALL), "-o", str(d / "bycount.gguf"), "--type", "Q8_0", "-q",
                 "--split-max-tensors", "40"]) == 0
    return d


def parts_of(d: Path, prefix: str) -> list[Path]:
    return sorted(d.glob(f"{prefix}-*-of-*.gguf"))


def test_parse_size():
    assert parse_size("4G") == 4 * 10**9 and parse_size("500M") == 500 * 10**6      # gguf-split's units
    assert parse_size("2GiB") == 2 * 2**30 and parse_size("1.5k") == 1500 and parse_size("4096") == 4096
    for bad in ("", "G", "-1G", "4X", "0", "0.1"):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_parts_follow_gguf_split_layout(sets):
    """Names, the three split keys with gguf-split's types in every part, all metadata in the first part only,
    no part over the size (tensor data padded to 32, headers not counted, as gguf-split counts)."""
    one = read_gguf(sets / "one.gguf")
    n = len(one.tensors)
    parts = parts_of(sets, "bysize")
    assert [p.name for p in parts] == [f"bysize-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    seen = []
    for i, p in enumerate(parts):
        r = gguf.GGUFReader(p)                          # an independent reader: each part is a whole GGUF
        keys = {f.name: f for f in r.fields.values() if not f.name.startswith("GGUF.")}
        assert keys["split.no"].types == [V.UINT16] and int(keys["split.no"].contents()) == i
        assert keys["split.count"].types == [V.UINT16] and int(keys["split.count"].contents()) == 3
        assert keys["split.tensors.count"].types == [V.INT32] and int(keys["split.tensors.count"].contents()) == n
        if i == 0:
            assert set(keys) == set(one.fields) | SPLIT_KEYS
            assert list(keys)[-3:] == ["split.no", "split.count", "split.tensors.count"]   # appended, as gguf-split
        else:
            assert set(keys) == SPLIT_KEYS
        assert 0 < sum((t.n_bytes + 31) // 32 * 32 for t in r.tensors) <= 4 * 10**6
        seen += [t.name for t in r.tensors]
    assert seen == [t.name for t in one.tensors]
    assert [len(read_gguf(p, whole_set=False).tensors) for p in parts_of(sets, "bycount")] == [40, 40, n - 80]
    one.close()


@pytest.mark.parametrize("prefix", ["bysize", "bycount"])
def test_set_reads_back_equal_to_the_single_file(sets, prefix):
    one = read_gguf(sets / "one.gguf")
    first = parts_of(sets, prefix)[0]
    s = read_gguf(first)
    assert s.path == first and [p.name for p in s.paths] == [p.name for p in parts_of(sets, prefix)]
    assert {k: f for k, f in s.fields.items() if k not in SPLIT_KEYS} == one.fields
    assert s.get("general.architecture") == "diffusion-gemma" and s.get("no.such.key", 7) == 7
    assert [(t.name, t.ne, t.type) for t in s.tensors] == [(t.name, t.ne, t.type) for t in one.tensors]
    for a, b in zip(one.tensors, s.tensors):
        assert np.array_equal(one.tensor_bytes(a), s.tensor_bytes(b)), a.name
    s.close()
    one.close()


def test_run_inspect_plan_quantize_open_a_set(capsys, sets):
    first = parts_of(sets, "bysize")[0]
    ids = []
    for path in (sets / "one.gguf", first):
        code, out, err = cli(capsys, "run", "-m", path, "-p", "def ", "-n", "48", "--seed", "3", "--json", "-t", "1")
        assert code == 0, err
        ids.append(json.loads(out)["ids"])
    assert ids[0] == ids[1] and len(ids[0]) == 48

    code, out, _ = cli(capsys, "inspect", first, "--json")
    assert code == 0 and len(json.loads(out)["tensors"]) == len(read_gguf(sets / "one.gguf").tensors)
    code, out, _ = cli(capsys, "plan", "-m", first, "--vram", "1GiB", "--cpu-gops", "100", "--cpu-gbs", "10")
    assert code == 0 and "Q8_0" in out

    # quantize reads a set, writes a single file without the set's split keys, equal to quantizing the file
    code, _, err = cli(capsys, "quantize", first, sets / "from-set.gguf", "F16", "-q")
    assert code == 0, err
    code, _, err = cli(capsys, "quantize", sets / "one.gguf", sets / "from-one.gguf", "F16", "-q")
    assert code == 0, err
    assert (sets / "from-set.gguf").read_bytes() == (sets / "from-one.gguf").read_bytes()
    assert not SPLIT_KEYS & set(read_gguf(sets / "from-set.gguf").fields)


def test_eval_opens_a_set(capsys, sets, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(Path(json.__file__).read_text()[:2000])
    reports = []
    for model in (parts_of(sets, "bycount")[0], sets / "one.gguf"):
        code, out, err = cli(capsys, "eval", "-m", model, "--ref", parts_of(sets, "bysize")[0], "--text", text,
                             "--max-tokens", "40", "--prompts", "1", "--json")
        assert code == 0, err
        reports.append({k: v for k, v in json.loads(out).items() if "seconds" not in k and k != "model"})
    sizes = [r.pop("size_bytes") for r in reports]
    assert reports[0] == reports[1] and reports[0]["tokens"] == 40
    # a set's size is all its parts: within their extra headers (a few KiB each) of the single file's
    assert sizes[1] <= sizes[0] < sizes[1] + 65536


def test_quantize_writes_a_set_from_a_set(capsys, sets):
    first = parts_of(sets, "bysize")[0]
    code, out, err = cli(capsys, "quantize", first, sets / "re.gguf", "Q8_0", "-q", "--split-max-tensors", "50")
    assert code == 0, err
    parts = parts_of(sets, "re")
    assert out.split() == [w for p in parts for w in ("wrote", str(p))]
    assert [p.name for p in parts] == ["re-00001-of-00002.gguf", "re-00002-of-00002.gguf"]
    a, b = read_gguf(sets / "one.gguf"), read_gguf(parts[0])
    assert [t.name for t in b.tensors] == [t.name for t in a.tensors]
    assert all(np.array_equal(a.tensor_bytes(t), b.tensor_bytes(u)) for t, u in zip(a.tensors, b.tensors))
    assert b.get("split.count") == 2 and b.get("split.tensors.count") == len(a.tensors)


# ------------------------------------------------------------------------------------- reference writers

def _add_field(w: gguf.GGUFWriter, key: str, f: Field) -> None:
    if f.type == V.ARRAY:
        w.add_key_value(key, list(f.value), V.ARRAY, sub_type=f.item_type)
    else:
        w.add_key_value(key, f.value, f.type)


def _add_tensor(w: gguf.GGUFWriter, g, t: TensorInfo) -> None:
    raw = np.array(g.tensor_bytes(t)).reshape(*reversed(t.ne[1:]), t.type.row_bytes(t.ne[0]))
    w.add_tensor(t.name, raw, raw_dtype=gguf.GGMLQuantizationType(t.type.ggml))


def reference_split(src: Path, prefix: Path, sizes: list[int], tensors_count: int | None = None,
                    count: int | None = None) -> list[Path]:
    """A split set written part by part with gguf-py's GGUFWriter from the documented layout: every part has
    split.no (UINT16), split.count (UINT16), split.tensors.count (INT32); the first all metadata besides; the
    rest nothing else. `sizes`: tensors per part. tensors_count / count: values to write instead of the true ones."""
    g = read_gguf(src)
    n = count or len(sizes)
    paths, start = [], 0
    for i, k in enumerate(sizes):
        p = Path(f"{prefix}-{i + 1:05d}-of-{n:05d}.gguf")
        w = gguf.GGUFWriter(p, g.get("general.architecture"))
        if i:
            w.kv_data[0].clear()                  # only the split keys in later parts
        else:
            for key, f in g.fields.items():
                if key != "general.architecture":
                    _add_field(w, key, f)
        w.add_uint16("split.no", i)
        w.add_uint16("split.count", n)
        w.add_int32("split.tensors.count", len(g.tensors) if tensors_count is None else tensors_count)
        for t in g.tensors[start:start + k]:
            _add_tensor(w, g, t)
        start += k
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        paths.append(p)
    g.close()
    return paths


def assert_same_model(a_path: Path, b_path: Path) -> None:
    a, b = read_gguf(a_path), read_gguf(b_path)
    assert {k: f.value for k, f in b.fields.items() if k not in SPLIT_KEYS} == \
        {k: f.value for k, f in a.fields.items()}
    assert [(t.name, t.ne, t.type) for t in b.tensors] == [(t.name, t.ne, t.type) for t in a.tensors]
    assert all(np.array_equal(a.tensor_bytes(t), b.tensor_bytes(u)) for t, u in zip(a.tensors, b.tensors))


def test_a_set_written_by_hand_with_gguf_py_reads(capsys, sets, tmp_path):
    paths = reference_split(sets / "one.gguf", tmp_path / "ref", [30, 0, 30, 37])   # an empty part too
    assert_same_model(sets / "one.gguf", paths[0])
    code, out, err = cli(capsys, "run", "-m", paths[0], "-p", "def ", "-n", "16", "--seed", "1", "--json")
    assert code == 0, err
    code, out1, _ = cli(capsys, "run", "-m", sets / "one.gguf", "-p", "def ", "-n", "16", "--seed", "1", "--json")
    assert json.loads(out)["ids"] == json.loads(out1)["ids"]


def test_a_set_split_by_gguf_py_reads(sets, tmp_path):
    """gguf-py's GGUFWriter splits by itself (split_max_tensors): another writer of the same layout."""
    g = read_gguf(sets / "one.gguf")
    w = gguf.GGUFWriter(tmp_path / "py.gguf", g.get("general.architecture"), split_max_tensors=33)
    for key, f in g.fields.items():
        if key != "general.architecture":
            _add_field(w, key, f)
    for t in g.tensors:
        _add_tensor(w, g, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    g.close()
    parts = parts_of(tmp_path, "py")
    assert len(parts) == 3
    assert_same_model(sets / "one.gguf", parts[0])


# ------------------------------------------------------------------------------------------- broken sets

def copy_set(sets: Path, prefix: str, d: Path) -> list[Path]:
    return [Path(shutil.copy(p, d / p.name)) for p in parts_of(sets, prefix)]


def broken(capsys, first: Path, *words: str) -> None:
    """read_gguf and the CLI's commands that read a model refuse the set with one line naming the problem."""
    with pytest.raises(DggufError) as e:
        read_gguf(first)
    for w in words:
        assert w in str(e.value), str(e.value)
    for argv in (["inspect", first], ["run", "-m", first, "-p", "x", "-n", "4"],
                 ["quantize", first, first.parent / "q.gguf", "F16", "-q"]):
        line = one_error(capsys, *argv)
        assert all(w in line for w in words), line
    assert not (first.parent / "q.gguf").exists()


def test_missing_part(capsys, sets, tmp_path):
    parts = copy_set(sets, "bysize", tmp_path)
    parts[1].unlink()
    broken(capsys, parts[0], "part 2", "bysize-00002-of-00003.gguf", "missing")


def test_part_with_another_count(capsys, sets, tmp_path):
    parts = copy_set(sets, "bysize", tmp_path)
    other = reference_split(sets / "one.gguf", tmp_path / "two", [50, 47])
    shutil.copy(other[1], parts[1])                    # part 2 of a 2-part set named as part 2 of 3
    broken(capsys, parts[0], "bysize-00002-of-00003.gguf", "split.count is 2", "another split set")


def test_part_of_another_set_with_the_same_count(capsys, sets, tmp_path):
    parts = copy_set(sets, "bysize", tmp_path)
    other = reference_split(sets / "one.gguf", tmp_path / "x", [10, 10, 77])
    shutil.copy(other[1], parts[1])                    # its tensors are also in our part 1
    broken(capsys, parts[0], "bysize-00002-of-00003.gguf", "also in bysize-00001-of-00003.gguf")


def test_parts_swapped(capsys, sets, tmp_path):
    parts = copy_set(sets, "bysize", tmp_path)
    os.replace(parts[1], tmp_path / "t")
    os.replace(parts[2], parts[1])
    os.replace(tmp_path / "t", parts[2])
    broken(capsys, parts[0], "bysize-00002-of-00003.gguf", "split.no is 2")


def test_wrong_tensor_count(capsys, sets, tmp_path):
    paths = reference_split(sets / "one.gguf", tmp_path / "w", [50, 47], tensors_count=98)
    broken(capsys, paths[0], "hold 97 tensors", "split.tensors.count says 98")


def test_a_later_part_or_a_renamed_first_part(capsys, sets, tmp_path):
    parts = copy_set(sets, "bysize", tmp_path)
    broken(capsys, parts[1], "part 2 of a 3-part split set", "open its first part (bysize-00001-of-00003.gguf)")
    renamed = Path(shutil.copy(parts[0], tmp_path / "model.gguf"))
    broken(capsys, renamed, "does not end in -00001-of-00003.gguf")


def test_split_keys_of_the_wrong_kind(capsys, sets, tmp_path):
    g = read_gguf(sets / "one.gguf")
    w = gguf.GGUFWriter(tmp_path / "k-00001-of-00001.gguf", "diffusion-gemma")
    w.add_string("split.count", "three")
    w.add_uint16("split.no", 0)
    w.add_int32("split.tensors.count", 1)
    _add_tensor(w, g, g.tensors[0])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    broken(capsys, tmp_path / "k-00001-of-00001.gguf", "split.count is 'three'")


# ----------------------------------------------------------------------------------------------- writing

def _tensors(n: int, rows: int = 8) -> list[TensorInfo]:
    return [TensorInfo(f"t{i}", (64, rows), TENSOR_TYPES["F32"]) for i in range(n)]


def _write_set(path: Path, tensors, fail_after: int | None = None, **kw) -> SplitWriter:
    fields = {"general.architecture": Field(V.STRING, "test")}
    with SplitWriter(path, fields, tensors, **kw) as w:
        for i, t in enumerate(tensors):
            if i == fail_after:
                raise RuntimeError("boom")
            w.write(np.full(t.nbytes, i, np.uint8))
    return w


def test_a_failed_write_leaves_no_part(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        _write_set(tmp_path / "f.gguf", _tensors(6), fail_after=4, max_tensors=2)    # two parts were complete
    assert list(tmp_path.iterdir()) == []


def test_a_failed_rename_leaves_no_part(tmp_path, monkeypatch):
    real, calls = os.replace, []

    def flaky(a, b):
        calls.append(b)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real(a, b)
    monkeypatch.setattr(split_mod.os, "replace", flaky)
    with pytest.raises(DggufError, match="write failed: No space left on device"):
        _write_set(tmp_path / "f.gguf", _tensors(6), max_tensors=2)
    assert list(tmp_path.iterdir()) == []


def test_staging_left_by_a_dead_process_is_removed(tmp_path, capsys):
    stale = tmp_path / ".f-00001-of-00002.gguf.split-4194305"        # above Linux's largest pid: never alive
    stale.mkdir()
    (stale / "f-00001-of-00002.gguf").write_bytes(b"x")
    w = _write_set(tmp_path / "f.gguf", _tensors(4), max_tensors=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f-00001-of-00002.gguf", "f-00002-of-00002.gguf"]
    assert w.paths == parts_of(tmp_path, "f")
    assert "removed" in capsys.readouterr().err


def test_existing_parts_need_force_and_inputs_are_never_replaced(capsys, sets, tmp_path):
    parts = copy_set(sets, "bysize", tmp_path)
    before = [p.read_bytes() for p in parts]
    line = one_error(capsys, "convert", SMALL, "-o", tmp_path / "bysize.gguf", "--type", "Q8_0", "-q",
                     "--split-max-size", "4M")
    assert "bysize-00001-of-00003.gguf" in line and "--force" in line
    line = one_error(capsys, "quantize", parts[0], tmp_path / "bysize.gguf", "Q8_0", "-q", "--force",
                     "--split-max-size", "4M")
    assert "input file" in line
    assert [p.read_bytes() for p in parts] == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [p.name for p in parts]
    code, _, err = cli(capsys, "convert", SMALL, "-o", tmp_path / "bysize.gguf", "--type", "Q8_0", "-q",
                       "--split-max-size", "4M", "--force")
    assert code == 0, err
    assert [p.read_bytes() for p in parts] == before                 # the conversion is deterministic


def test_a_tensor_larger_than_the_split_size(capsys, tmp_path):
    line = one_error(capsys, "convert", SMALL, "-o", tmp_path / "x.gguf", "--type", "Q8_0", "-q",
                     "--split-max-size", "100K")
    assert "token_embd.weight" in line and "never cut" in line
    assert list(tmp_path.iterdir()) == []


def test_bad_split_options(capsys, tmp_path):
    for argv in (["--split-max-size", "4X"], ["--split-max-size", "0"], ["--split-max-tensors", "0"]):
        with pytest.raises(SystemExit) as e:
            main(["convert", str(SMALL), "-o", str(tmp_path / "x.gguf"), "-q", *argv])
        err = capsys.readouterr().err
        assert e.value.code == 2 and argv[0] in err.splitlines()[-1] and argv[1] in err.splitlines()[-1]
    assert list(tmp_path.iterdir()) == []


def test_dry_run_lists_the_parts(capsys, sets, tmp_path):
    code, out, err = cli(capsys, "convert", SMALL, "-o", tmp_path / "bysize.gguf", "--type", "Q8_0", "--dry-run",
                         "--split-max-size", "4M")
    assert code == 0, err
    listed = [line.split() for line in out.splitlines() if line.startswith("part ")]
    actual = [read_gguf(p, whole_set=False) for p in parts_of(sets, "bysize")]
    assert [(w[1], int(w[2])) for w in listed] == [(p.path.name + ":", len(p.tensors)) for p in actual]
    assert list(tmp_path.iterdir()) == []
