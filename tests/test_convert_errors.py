"""Bad input: one clear line naming the file and the problem, exit code 2, no traceback, no output file."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from dgguf.format import gguf_file
from dgguf.cli import main


def run_cli(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err
    return code, err


@pytest.fixture
def hf(checkpoints, tmp_path):
    """A private, editable copy of the tiny checkpoint."""
    d = tmp_path / "hf"
    shutil.copytree(checkpoints("tiny"), d)
    return d


def expect_error(capsys, tmp_path, hf_dir, *needles, extra=()):
    out = tmp_path / "out.gguf"
    code, err = run_cli(capsys, "convert", str(hf_dir), "-o", str(out), "-q", *extra)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.gguf")]
    return lines[0]


def edit_config(hf_dir, fn):
    p = hf_dir / "config.json"
    c = json.loads(p.read_text())
    fn(c)
    p.write_text(json.dumps(c))


def edit_tensors(hf_dir, fn):
    p = hf_dir / "model.safetensors"
    t = load_file(p)
    fn(t)
    save_file(t, p)


def test_missing_config(capsys, tmp_path, hf):
    (hf / "config.json").unlink()
    expect_error(capsys, tmp_path, hf, "config.json", "not found")


def test_unknown_architecture(capsys, tmp_path, hf):
    def f(c):
        c["architectures"] = ["LlamaForCausalLM"]
        c["model_type"] = "llama"
    edit_config(hf, f)
    expect_error(capsys, tmp_path, hf, "config.json", "LlamaForCausalLM", "DiffusionGemmaForBlockDiffusion")


def test_missing_tensor(capsys, tmp_path, hf):
    edit_tensors(hf, lambda t: t.pop("model.decoder.layers.1.self_attn.q_proj.weight"))
    expect_error(capsys, tmp_path, hf, "model.decoder.layers.1.self_attn.q_proj.weight", "lacks")


def test_extra_tensor(capsys, tmp_path, hf):
    edit_tensors(hf, lambda t: t.__setitem__("model.decoder.layers.0.mystery.weight", np.zeros(4, np.float32)))
    expect_error(capsys, tmp_path, hf, "model.decoder.layers.0.mystery.weight", "unexpected")


def test_v_proj_in_a_full_layer_is_an_extra_tensor(capsys, tmp_path, hf):
    def f(t):
        t["model.decoder.layers.1.self_attn.v_proj.weight"] = t["model.decoder.layers.1.self_attn.k_proj.weight"]
    edit_tensors(hf, f)
    expect_error(capsys, tmp_path, hf, "layers.1.self_attn.v_proj")


def test_shape_mismatch(capsys, tmp_path, hf):
    edit_config(hf, lambda c: c["text_config"].__setitem__("moe_intermediate_size", 48))
    expect_error(capsys, tmp_path, hf, "experts", "shape")


def test_truncated_safetensors(capsys, tmp_path, hf):
    p = hf / "model.safetensors"
    os.truncate(p, p.stat().st_size - 1000)
    expect_error(capsys, tmp_path, hf, "model.safetensors", "truncated")


def test_corrupt_safetensors_header(capsys, tmp_path, hf):
    p = hf / "model.safetensors"
    data = bytearray(p.read_bytes())
    data[8:12] = b"\xff\xfe{{"
    p.write_bytes(bytes(data))
    expect_error(capsys, tmp_path, hf, "model.safetensors", "corrupt")


def test_unsupported_dtype(capsys, tmp_path, hf):
    def f(t):
        k = "model.decoder.norm.weight"
        t[k] = t[k].astype(np.float64)
    edit_tensors(hf, f)
    expect_error(capsys, tmp_path, hf, "model.decoder.norm.weight", "F64")


def test_missing_shard(capsys, tmp_path, checkpoints):
    d = tmp_path / "sharded"
    shutil.copytree(checkpoints("tiny", shards=3), d)
    victim = sorted(d.glob("model-*.safetensors"))[1]
    victim.unlink()
    expect_error(capsys, tmp_path, d, victim.name, "missing")


def test_existing_output_needs_force(capsys, tmp_path, hf):
    out = tmp_path / "out.gguf"
    out.write_bytes(b"keep me")
    code, err = run_cli(capsys, "convert", str(hf), "-o", str(out), "-q")
    assert code == 2 and "exists" in err and "--force" in err
    assert out.read_bytes() == b"keep me"
    assert run_cli(capsys, "convert", str(hf), "-o", str(out), "-q", "--force")[0] == 0
    assert out.read_bytes()[:4] == b"GGUF"


def test_bad_type_name_is_a_usage_error(capsys, tmp_path, hf):
    with pytest.raises(SystemExit) as e:
        main(["convert", str(hf), "-o", str(tmp_path / "o.gguf"), "--type", "Q9_X"])
    assert e.value.code == 2
    assert "Q9_X" in capsys.readouterr().err


def test_not_enough_disk_space_is_refused_before_writing(capsys, tmp_path, hf, monkeypatch):
    monkeypatch.setattr(gguf_file, "_disk_free", lambda d: 1000)
    expect_error(capsys, tmp_path, hf, "out.gguf", "disk space")


def test_disk_full_during_write_leaves_nothing(capsys, tmp_path, hf, monkeypatch):
    real_open = open

    class Full:
        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, b):
            self.n += memoryview(b).nbytes
            if self.n > 100_000:
                raise OSError(28, "No space left on device")
            return self.f.write(b)

        def __getattr__(self, k):
            return getattr(self.f, k)

    monkeypatch.setattr(gguf_file, "open", lambda p, m="r": Full(real_open(p, m)), raising=False)
    expect_error(capsys, tmp_path, hf, "out.gguf", "No space left")


def test_interrupted_conversion_leaves_no_output(capsys, tmp_path, hf, monkeypatch):
    from dgguf.convert import quantize
    calls = {"n": 0}
    real = quantize.encode

    def interrupt(x, t):
        calls["n"] += 1
        if calls["n"] == 20:
            raise KeyboardInterrupt
        return real(x, t)

    monkeypatch.setattr(quantize, "encode", interrupt)
    code, err = run_cli(capsys, "convert", str(hf), "-o", str(tmp_path / "out.gguf"), "-q", "--threads", "1")
    assert code == 130 and "interrupted" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_killed_conversion_leaves_no_file_that_looks_like_gguf(tmp_path, hf):
    """SIGKILL cannot be cleaned up after: the partial temp file must not carry the GGUF magic."""
    out = tmp_path / "out.gguf"
    script = (
        "import os, signal, sys\n"
        "from dgguf.convert import quantize\n"
        "real = quantize.encode\n"
        "n = [0]\n"
        "def enc(x, t):\n"
        "    n[0] += 1\n"
        "    if n[0] == 30: os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return real(x, t)\n"
        "quantize.encode = enc\n"
        f"quantize.convert_checkpoint({str(hf)!r}, {str(out)!r}, threads=1)\n")
    p = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert p.returncode == -9
    assert not out.exists()
    leftovers = [q for q in tmp_path.iterdir() if q.name != "hf"]
    assert leftovers, "expected the killed run's temp file"
    for q in leftovers:
        assert q.name.startswith(".out.gguf.partial")
        assert q.read_bytes()[:4] != b"GGUF"


def test_full_layers_with_different_head_dims_are_refused(capsys, tmp_path, checkpoints):
    d = tmp_path / "hf"
    shutil.copytree(checkpoints("tiny", config_form="resaved"), d)
    edit_config(d, lambda c: c["text_config"]["per_layer_config"].update({"3": {"head_dim": 64,
                                                                                  "num_key_value_heads": 1}}))
    expect_error(capsys, tmp_path, d, "full_attention layers differ")


def test_safetensors_header_that_is_not_an_object(capsys, tmp_path, hf):
    import struct
    body = b"[1, 2, 3]"
    (hf / "model.safetensors").write_bytes(struct.pack("<Q", len(body)) + body)
    expect_error(capsys, tmp_path, hf, "model.safetensors", "corrupt")


def test_invalid_tokenizer_config_json(capsys, tmp_path, hf):
    (hf / "tokenizer_config.json").write_text("{not json")
    expect_error(capsys, tmp_path, hf, "tokenizer_config.json", "invalid JSON")


def test_pad_id_falls_back_to_the_text_config(tmp_path, hf):
    from gguf import GGUFReader
    from dgguf.convert.quantize import convert_checkpoint
    tc = json.loads((hf / "tokenizer_config.json").read_text())
    tc.pop("pad_token", None)
    (hf / "tokenizer_config.json").write_text(json.dumps(tc))
    gc = json.loads((hf / "generation_config.json").read_text())
    gc.pop("pad_token_id", None)
    (hf / "generation_config.json").write_text(json.dumps(gc))
    edit_config(hf, lambda c: c["text_config"].__setitem__("pad_token_id", 3))
    r = GGUFReader(convert_checkpoint(hf, tmp_path / "o.gguf"))
    assert int(r.fields["tokenizer.ggml.padding_token_id"].contents()) == 3
