"""Fuzzing (scripts/fuzz.py, issue 13): the harness's seeds load and run, a short in-suite run of its structured
mutations ends in success or DggufError only, and each finding of the fuzzer as a regression test with its
reproducer (written out, not an opaque input)."""
import importlib.util
import json
import random
import struct
import sys
from pathlib import Path

import pytest
from gguf.constants import GGUFValueType as V

from dgguf.convert.quantize import convert_checkpoint
from dgguf.core.errors import DggufError
from dgguf.format.gguf_file import Field
from dgguf.runtime.model import Model

ROOT = Path(__file__).resolve().parent.parent


def _load_fuzz():
    spec = importlib.util.spec_from_file_location("dgguf_fuzz", ROOT / "scripts" / "fuzz.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["dgguf_fuzz"] = mod
    spec.loader.exec_module(mod)
    return mod


fuzz = _load_fuzz()


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz-seeds")
    fuzz.write_seeds(d)
    return d


# ------------------------------------------------------------------------------------------ the harness

def test_synthetic_gguf_seeds_load_and_run_a_canvas(seeds):
    """The seeds reach the forward: every synthetic model loads and gives finite logits (not just an error)."""
    import numpy as np
    paths = sorted(p for p in (seeds / "gguf").glob("*.gguf") if not p.stem.startswith("tiny-"))
    assert len(paths) >= 9
    for p in paths:
        m = Model.load(p, threads=1, ctx=64)
        try:
            logits = m.canvas_logits([0, 1], [2, 3, 4, 5])
            assert logits.shape == (4, m.config.vocab_size) and np.isfinite(logits).all(), p.name
        finally:
            m.close()


def test_hf_seeds_convert_and_load(seeds, tmp_path):
    for name, (control, parts) in fuzz.hf_seed_parts().items():
        d = fuzz.write_hf_dir(tmp_path / name, control, parts)
        if name in ("tiny-nodata", "tiny-minimal"):      # no tensor data / no tokenizer files: a clean error
            with pytest.raises(DggufError):
                convert_checkpoint(d, tmp_path / f"{name}.gguf", force=True, threads=1)
            continue
        out = convert_checkpoint(d, tmp_path / f"{name}.gguf", fuzz.HF_TYPES[(control >> 1) & 7], threads=1)
        Model.load(out, threads=1).close()


def test_every_seed_passes_the_targets(seeds):
    for target in ("gguf", "hf"):
        for p in sorted((seeds / target).iterdir()):
            fuzz.RUNNERS[target](p.read_bytes())


@pytest.mark.parametrize("target", ["gguf", "hf"])
def test_structured_mutations_end_in_success_or_dgguf_error(seeds, target):
    """A short fixed-seed run of the structure-aware mutations (CI's libFuzzer run adds the byte-level ones):
    chains of up to 4 mutations from every seed; anything but success or DggufError fails."""
    r = random.Random(13)
    corpus = [p.read_bytes() for p in sorted((seeds / target).iterdir())]
    mutate = fuzz.STRUCTURED[target]
    done = 0
    for i in range(150):
        data = corpus[i % len(corpus)]
        for _ in range(r.randint(1, 4)):
            data = mutate(data, r) or data
        fuzz.RUNNERS[target](data)
        done += 1
    assert done == 150


def test_replay_reports_a_finding(tmp_path, capsys, monkeypatch):
    def boom(data):
        raise KeyError("x")
    monkeypatch.setitem(fuzz.RUNNERS, "gguf", boom)
    f = tmp_path / "input"
    f.write_bytes(b"GGUF")
    assert fuzz.replay("gguf", [str(f)]) == 1
    assert "FINDING" in capsys.readouterr().out


# ------------------------------------------------------------------------------- findings: the converter

def hf_dir(tmp_path, config=None, gen=None, tok=None, header=None, index=None, name="hf"):
    """The tiny release-form checkpoint of the fuzz seeds, with parts replaced (edit functions take the parsed
    JSON and change it in place)."""
    control, parts = fuzz.hf_seed_parts()["tiny-resaved-f32"]
    parts = list(parts)
    for i, edit in ((0, config), (1, gen), (3, tok)):
        if edit is not None:
            obj = json.loads(parts[i])
            edit(obj)
            parts[i] = json.dumps(obj).encode()
    if header is not None:
        (n,) = struct.unpack("<Q", parts[4][:8])
        obj = json.loads(parts[4][8:8 + n])
        header(obj)
        raw = json.dumps(obj).encode()
        parts[4] = struct.pack("<Q", len(raw)) + raw
    if index is not None:
        parts.append(json.dumps(index).encode())
    return fuzz.write_hf_dir(tmp_path / name, control, parts)


def convert_error(d, tmp_path) -> str:
    with pytest.raises(DggufError) as e:
        convert_checkpoint(d, tmp_path / "out.gguf", force=True, threads=1)
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.mark.parametrize("dtype", [["F32"], {"F32": 1}, 32, None])
def test_safetensors_dtype_that_is_not_a_string(tmp_path, dtype):
    """Finding: a dtype that is a JSON list or object raised TypeError (unhashable) in the header reader."""
    def header(h):
        h["model.decoder.norm.weight"]["dtype"] = dtype
    assert "unsupported dtype" in convert_error(hf_dir(tmp_path, header=header), tmp_path)


@pytest.mark.parametrize("merges", [[1.5], [["d"]], [["d", 2]], "d e", {"d": "e"}, 7])
def test_tokenizer_merges_of_the_wrong_type(tmp_path, merges):
    """Finding: tokenizer.json merges holding numbers (or not a list) raised TypeError in str.join."""
    def tok(t):
        t["model"]["merges"] = merges
    assert "model.merges" in convert_error(hf_dir(tmp_path, tok=tok), tmp_path)


def test_index_naming_a_file_name_too_long(tmp_path):
    """Finding: an index naming a 5000-character shard raised OSError (ENAMETOOLONG) from Path.exists."""
    control, parts = fuzz.hf_seed_parts()["tiny-index-q40"]
    index = json.loads(parts[5])
    index["weight_map"]["model.decoder.norm.weight"] = "x" * 5000
    d = fuzz.write_hf_dir(tmp_path / "hf", control, parts[:5] + [json.dumps(index).encode()])
    msg = convert_error(d, tmp_path)
    assert "cannot read" in msg and "xxx..." in msg


def test_canvas_length_default_larger_than_the_context(tmp_path):
    """Finding: without canvas_length the default 256 was written into a file whose context is 64, which the
    runtime then refused (convert must not write what run refuses)."""
    def config(c):
        c.pop("canvas_length")
    msg = convert_error(hf_dir(tmp_path, config=config), tmp_path)
    assert "canvas_length is not set" in msg and "max_position_embeddings 64" in msg


@pytest.mark.parametrize("where,key,value", [
    ("config", "rms_norm_eps", 1e-50),                   # rounds to 0 in float32
    ("config", "final_logit_softcapping", 1e39),         # inf in float32
    ("rope", "rope_theta", 3.5e38),
    ("gen", "t_max", 1e39),
    ("gen", "entropy_bound", 1e-46),
])
def test_float_values_that_float32_cannot_hold(tmp_path, where, key, value):
    """Values are stored as FLOAT32: one that becomes inf or 0 there was written, then refused by the loader."""
    def config(c):
        if where == "config":
            c["text_config"][key] = value
        elif where == "rope":
            c["text_config"]["rope_parameters"]["full_attention"][key] = value

    def gen(g):
        if where == "gen":
            g[key] = value
    msg = convert_error(hf_dir(tmp_path, config=config, gen=gen), tmp_path)
    assert key in msg and ("float32" in msg or "outside" in msg)


def test_float32_rounding_inside_the_range_is_accepted(tmp_path):
    def config(c):
        c["text_config"]["rms_norm_eps"] = 1e-40          # a float32 subnormal: positive, kept
    out = convert_checkpoint(hf_dir(tmp_path, config=config), tmp_path / "out.gguf", threads=1)
    Model.load(out, threads=1).close()


# ---------------------------------------------------------------------------------- findings: the loader

def gguf(tmp_path, edit, name="m.gguf"):
    return fuzz.write_gguf_seed(tmp_path / name, fuzz.micro_shape(), ["F32"], edit=edit)


@pytest.mark.parametrize("tokens", [Field(V.UINT32, 7), Field(V.ARRAY, [1, 2, 3], V.INT32),
                                    Field(V.STRING, "<turn|>")])
def test_token_list_of_another_type_is_ignored_for_end_of_turn_ids(tmp_path, tokens):
    """Finding: tokenizer.ggml.tokens of another type (an integer) raised TypeError while the loader looked for
    end-of-turn tokens (files without diffusion.eos_token_ids)."""
    def edit(f):
        del f["diffusion.eos_token_ids"]
        f["tokenizer.ggml.tokens"] = tokens
    m = Model.load(gguf(tmp_path, edit), threads=1)
    assert m.config.eos_token_ids == [1]
    m.close()


@pytest.mark.parametrize("arch", ["llama\x1b[2J\n", b"\xff\xfe".decode("latin-1")])
def test_architecture_from_the_file_is_escaped(tmp_path, arch):
    def edit(f):
        f["general.architecture"] = Field(V.STRING, arch)
    with pytest.raises(DggufError, match="architecture '") as e:
        Model.load(gguf(tmp_path, edit), threads=1)
    assert not any(c in str(e.value) for c in "\x1b\n")


def test_missing_architecture_is_named(tmp_path):
    def edit(f):
        del f["general.architecture"]
    with pytest.raises(DggufError, match=r"architecture \(missing\) is not diffusion-gemma"):
        Model.load(gguf(tmp_path, edit), threads=1)


@pytest.mark.parametrize("where,value", [("vocab", float("inf")), ("vocab", 1.5), ("vocab", "3"), ("added", 1e300),
                                         ("added", True)])
def test_tokenizer_ids_that_are_not_integers(tmp_path, where, value):
    """Finding: a vocabulary id Infinity raised OverflowError in int(); 1.5 was silently truncated to 1."""
    def tok(t):
        if where == "vocab":
            t["model"]["vocab"]["x"] = value
        else:
            t["added_tokens"][0]["id"] = value
    assert "is not an integer" in convert_error(hf_dir(tmp_path, tok=tok), tmp_path)


@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16"])
def test_misaligned_safetensors_data_converts_as_aligned(tmp_path, dtype):
    """Sanitizer finding (the hf target under UBSan): a safetensors header whose length is not a multiple of 4
    put the tensor data at a misaligned address, and the converter handed that float pointer to
    dg_quantize_rows. Rows of such files are now copied; the output is the same as for the aligned file."""
    import numpy as np
    from dgguf.format.gguf_file import read_gguf

    outs = []
    for pad in (0, 1):
        control, parts = fuzz.hf_seed_parts()["tiny-resaved-f32"]
        (n,) = struct.unpack("<Q", parts[4][:8])
        head = json.loads(parts[4][8:8 + n])
        for k, v in head.items():
            if k != "__metadata__":
                v["dtype"] = dtype
                v["data_offsets"] = [x // 2 if dtype != "F32" else x for x in v["data_offsets"]]
        raw = json.dumps(head).encode()
        raw += b" " * (-len(raw) % 8 + pad)        # pad 1: the data starts at an odd offset
        parts = list(parts)
        parts[4] = struct.pack("<Q", len(raw)) + raw
        d = fuzz.write_hf_dir(tmp_path / f"hf{pad}", control, parts)
        with open(d / "model.safetensors", "r+b") as f:   # non-zero data, the same values in both files
            f.seek(8 + len(raw))
            size = fuzz._data_length(parts[4]) - 8 - len(raw)
            f.write(np.random.default_rng(0).integers(0, 60, size, dtype=np.uint8).tobytes())
        outs.append(convert_checkpoint(d, tmp_path / f"out{pad}.gguf", "Q8_0", threads=1))
    a, b = read_gguf(outs[0]), read_gguf(outs[1])
    for ta, tb in zip(a.tensors, b.tensors):
        assert np.array_equal(a.tensor_bytes(ta), b.tensor_bytes(tb)), ta.name
    a.close()
    b.close()
