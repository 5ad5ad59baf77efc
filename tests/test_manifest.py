"""Manifests and `dgguf verify` (issue 19, item 2), `quantize/convert --dry-run` and `--allow-requantize`."""
import hashlib
import json
import shutil
from pathlib import Path

import gguf
import pytest

from dgguf.cli import main
from dgguf.format.gguf_file import read_gguf
from dgguf.format.manifest import load_manifest, verify

ROOT = Path(__file__).resolve().parent.parent
SMALL = ROOT / "models" / "small"


def cli(capsys, *argv):
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:          # verify's exit 1
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def one_error(capsys, *argv) -> str:
    code, _, err = cli(capsys, *argv)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """models/small as Q8_0: one file and a 3-part set, each with --manifest; and BF16 (unquantized)."""
    d = tmp_path_factory.mktemp("manifest")
    assert main(["convert", str(SMALL), "-o", str(d / "one.gguf"), "--type", "Q8_0", "-q", "--manifest"]) == 0
    assert main(["convert", str(SMALL), "-o", str(d / "set.gguf"), "--type", "Q8_0", "-q", "--manifest",
                 "--split-max-size", "4M"]) == 0
    assert main(["convert", str(SMALL), "-o", str(d / "bf16.gguf"), "--type", "BF16", "-q"]) == 0
    return d


def copy(made: Path, d: Path, *names: str) -> None:
    for n in names:
        shutil.copy(made / n, d / n)


SET = [f"set-0000{i}-of-00003.gguf" for i in (1, 2, 3)]


@pytest.mark.parametrize("name,files", [("one", ["one.gguf"]), ("set", SET)])
def test_manifest_holds_every_file_and_tensor_hash(made, name, files):
    m = json.loads((made / f"{name}.manifest.json").read_text())
    assert m["format"] == "dgguf-manifest" and m["version"] == 1 and m["algorithm"] == "sha256"
    assert [(f["name"], f["size"], f["sha256"]) for f in m["files"]] == \
        [(n, (made / n).stat().st_size, sha((made / n).read_bytes())) for n in files]
    expect = []
    for n in files:                  # tensors as gguf-py's reader sees them, part by part
        for t in gguf.GGUFReader(made / n).tensors:
            expect.append({"name": t.name, "file": n, "type": t.tensor_type.name, "ne": [int(x) for x in t.shape],
                           "bytes": int(t.n_bytes), "sha256": sha(t.data.tobytes())})
    assert m["tensors"] == expect and len(expect) == 97
    assert len((made / f"{name}.manifest.json").read_text().splitlines()) == 9 + len(files) + len(expect)


@pytest.mark.parametrize("first", ["one.gguf", SET[0]])
def test_verify_all_match(capsys, made, first):
    code, out, err = cli(capsys, "verify", made / first, "--threads", "3")
    assert code == 0, out + err
    lines = out.strip().splitlines()
    assert len(lines) == 1 and f"{len(SET) if first == SET[0] else 1} file(s) and 97 tensors match" in lines[0]


def flip(path: Path, offset: int) -> None:
    b = bytearray(path.read_bytes())
    b[offset] ^= 0xFF
    path.write_bytes(bytes(b))


def test_a_changed_tensor_byte_is_one_file_line_and_one_tensor_line(capsys, made, tmp_path):
    copy(made, tmp_path, *SET, "set.manifest.json")
    part = read_gguf(tmp_path / SET[1], whole_set=False)
    t = part.tensors[3]
    offset = part.data_offset + t.offset + t.nbytes // 2
    part.close()
    flip(tmp_path / SET[1], offset)
    code, out, err = cli(capsys, "verify", tmp_path / SET[0])
    assert code == 1
    lines = out.strip().splitlines()
    assert len(lines) == 2, out
    assert lines[0].startswith(f"{tmp_path / SET[1]}: sha256 ")
    assert lines[1] == f"tensor {t.name} ({SET[1]}): its bytes' sha256 differs"
    assert "2 mismatches" in err


def test_missing_part_and_a_changed_header(capsys, made, tmp_path):
    copy(made, tmp_path, *SET, "set.manifest.json")
    (tmp_path / SET[2]).unlink()
    code, out, _ = cli(capsys, "verify", tmp_path / SET[0])
    lines = out.strip().splitlines()
    assert code == 1 and lines[0] == f"{tmp_path / SET[2]}: missing"
    assert lines[1].startswith("tensors not checked: ") and "is missing" in lines[1] and len(lines) == 2

    copy(made, tmp_path, "one.gguf", "one.manifest.json")
    one = tmp_path / "one.gguf"
    b = one.read_bytes().replace(b"Small", b"Smell", 1)    # general.name: the file differs, its tensors match
    one.write_bytes(b)
    code, out, _ = cli(capsys, "verify", one)
    lines = out.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith(f"{one}: sha256"), out
    flip(one, 40)                                 # inside a key: the file differs, its tensors cannot be read
    code, out, _ = cli(capsys, "verify", one)
    lines = out.strip().splitlines()
    assert code == 1 and len(lines) == 2 and lines[0].startswith(f"{one}: sha256"), out
    assert lines[1].startswith(f"tensors not checked: {one}: corrupt or truncated GGUF")


def test_tensors_missing_or_unlisted(made, tmp_path):
    copy(made, tmp_path, "one.gguf")
    m = json.loads((made / "one.manifest.json").read_text())
    dropped = m["tensors"].pop(5)
    m["tensors"][0]["name"] = "no.such.tensor"
    m["tensors"][1]["type"] = "Q4_0"
    (tmp_path / "m.json").write_text(json.dumps(m))
    bad, _ = verify(tmp_path / "one.gguf", tmp_path / "m.json")
    assert bad == ["tensor no.such.tensor: missing from one.gguf",
                   f"tensor {m['tensors'][1]['name']} (one.gguf): type Q8_0, the manifest says 'Q4_0'",
                   "tensor rope_freqs.weight (one.gguf): not in the manifest",
                   f"tensor {dropped['name']} (one.gguf): not in the manifest"]


def test_user_errors_exit_2(capsys, made, tmp_path):
    copy(made, tmp_path, "one.gguf")
    line = one_error(capsys, "verify", tmp_path / "one.gguf")
    assert "one.manifest.json" in line and "no manifest" in line
    (tmp_path / "bad.json").write_text("{not json")
    assert "cannot read the manifest" in one_error(capsys, "verify", tmp_path / "one.gguf", "--manifest",
                                                   tmp_path / "bad.json")
    (tmp_path / "bad.json").write_text('{"format": "something-else"}')
    assert "not a dgguf manifest" in one_error(capsys, "verify", tmp_path / "one.gguf", "--manifest",
                                               tmp_path / "bad.json")
    (tmp_path / "bad.json").write_text('{"format": "dgguf-manifest", "version": 1, "algorithm": "sha256", '
                                       '"files": [{"name": "../one.gguf", "size": 1, "sha256": ""}], "tensors": []}')
    assert "not a plain file name" in one_error(capsys, "verify", tmp_path / "one.gguf", "--manifest",
                                                tmp_path / "bad.json")
    line = one_error(capsys, "verify", made / SET[1])
    assert "set.manifest.json" in line and f"by its first file, {SET[0]}" in line
    line = one_error(capsys, "verify", tmp_path / "one.gguf", "--manifest", made / "set.manifest.json")
    assert "set-00001-of-00003.gguf" in line and "not one.gguf" in line
    # a manifest named explicitly, elsewhere: the files are looked for beside FILE
    code, out, _ = cli(capsys, "verify", tmp_path / "one.gguf", "--manifest", made / "one.manifest.json")
    assert code == 0 and "match" in out


def test_manifest_is_not_replaced_without_force(capsys, made, tmp_path):
    (tmp_path / "x.manifest.json").write_text("keep")
    line = one_error(capsys, "convert", SMALL, "-o", tmp_path / "x.gguf", "--type", "Q8_0", "-q", "--manifest")
    assert "x.manifest.json" in line and "--force" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.manifest.json"]       # nothing converted
    code, out, _ = cli(capsys, "convert", SMALL, "-o", tmp_path / "x.gguf", "--type", "Q8_0", "-q", "--manifest",
                       "--force")
    assert code == 0 and out.split() == ["wrote", str(tmp_path / "x.gguf"), "wrote", str(tmp_path / "x.manifest.json")]
    assert load_manifest(tmp_path / "x.manifest.json")["files"][0]["name"] == "x.gguf"
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_quantize_writes_a_manifest_too(capsys, made, tmp_path):
    code, _, err = cli(capsys, "quantize", made / "bf16.gguf", tmp_path / "q.gguf", "Q4_0", "-q", "--manifest",
                       "--split-max-tensors", "60")
    assert code == 0, err
    code, out, _ = cli(capsys, "verify", tmp_path / "q-00001-of-00002.gguf")
    assert code == 0 and "2 file(s) and 97 tensors match q.manifest.json" in out


# ------------------------------------------------------------------------------------- --dry-run

def plan_lines(out: str):
    lines = out.strip().splitlines()
    rows = [line.split() for line in lines[:-1]]
    return {r[0]: (r[1], int(r[-1].replace(",", ""))) for r in rows}, lines[-1]


@pytest.mark.parametrize("ftype", ["Q4_K_M", "Q8_0"])
def test_dry_run_prints_the_plan_and_writes_nothing(capsys, made, tmp_path, ftype):
    code, out, err = cli(capsys, "quantize", made / "bf16.gguf", tmp_path / "q.gguf", ftype, "--dry-run")
    assert code == 0, err
    planned, total = plan_lines(out)
    assert list(tmp_path.iterdir()) == []
    code, out, err = cli(capsys, "convert", SMALL, "-o", tmp_path / "c.gguf", "--type", ftype, "--dry-run")
    assert code == 0, err
    assert plan_lines(out) == (planned, total) and list(tmp_path.iterdir()) == []

    assert main(["quantize", str(made / "bf16.gguf"), str(tmp_path / "q.gguf"), ftype, "-q"]) == 0
    g = read_gguf(tmp_path / "q.gguf")
    assert planned == {t.name: (t.type.name, t.nbytes) for t in g.tensors}
    n_bytes, n_weights = sum(t.nbytes for t in g.tensors), sum(t.nvalues for t in g.tensors)
    assert f"{len(g.tensors)} tensors, {n_bytes:,} bytes" in total
    assert f"{8 * n_bytes / n_weights:.3f} bits per weight" in total and "nothing written" in total
    g.close()


# ---------------------------------------------------------------------------------- --allow-requantize

def test_requantizing_quantized_tensors_needs_allow_requantize(capsys, made, tmp_path):
    src = made / "one.gguf"                                          # Q8_0
    for argv in ([], ["--dry-run"]):
        line = one_error(capsys, "quantize", src, tmp_path / "q.gguf", "Q4_K_M", "-q", *argv)
        assert "already quantized (Q8_0)" in line and "--allow-requantize" in line
    assert list(tmp_path.iterdir()) == []
    code, _, err = cli(capsys, "quantize", src, tmp_path / "q.gguf", "Q4_K_M", "-q", "--allow-requantize")
    assert code == 0, err
    assert {t.type.name for t in read_gguf(tmp_path / "q.gguf").tensors} >= {"Q4_K", "Q6_K"}
    # neither copying (same type) nor dequantizing (to F32/F16/BF16) requantizes
    for t in ("Q8_0", "F32", "BF16"):
        code, _, err = cli(capsys, "quantize", src, tmp_path / f"{t}.gguf", t, "-q")
        assert code == 0, err
    # a quantized split set as well
    line = one_error(capsys, "quantize", made / SET[0], tmp_path / "q2.gguf", "Q4_0", "-q")
    assert "--allow-requantize" in line
