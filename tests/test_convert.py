"""Converter: layout equal to PR #24423's files, every type and preset, both config forms, shards, BF16."""
import json

import numpy as np
import pytest
from gguf import GGUFReader
from gguf.quants import dequantize

from conftest import PR_TINY
from dgguf.convert.quantize import convert_checkpoint, requantize
from dgguf.format.quant_types import FILE_TYPES
from dgguf.convert.tensor_names import gguf_name

# Keys whose value legitimately differs from PR #24423's files, and the keys we add.
NAME_KEYS = {"general.name", "general.size_label"}
OUR_KEYS = {"diffusion-gemma.final_logit_softcapping", "diffusion-gemma.embedding_scale",
            "diffusion-gemma.text_only", "diffusion.eos_token_ids", "tokenizer.huggingface.json"}

# Relative RMS error bound of each tensor type on Gaussian-like weights (F32 is exact): about 1.2x the
# uniform-quantizer error step/sqrt(12) for a block of 32 normals (max |x| ~ 2.4 sigma). A wrong byte layout
# gives errors near 1 or above.
REL_RMSE = {"F32": 0.0, "F16": 1e-3, "BF16": 5e-3, "Q8_0": 0.01, "Q6_K": 0.025, "Q5_1": 0.06, "Q5_0": 0.06,
            "Q5_K": 0.06, "Q4_0": 0.11, "Q4_1": 0.11, "Q4_K": 0.11, "IQ4_NL": 0.11, "IQ4_XS": 0.11, "Q3_K": 0.22,
            "Q2_K": 0.45}


def read_kv(path):
    r = GGUFReader(path)
    kv = {}
    for k, f in r.fields.items():
        if k.startswith("GGUF."):
            continue
        v = f.contents()
        kv[k] = ([t.name for t in f.types], v)
    return r, kv


def tensor_table(r):
    return {t.name: (tuple(int(x) for x in t.shape), t.tensor_type.name) for t in r.tensors}


def source_arrays(hf_dir):
    """Every text tensor of a checkpoint as float32, by GGUF name."""
    out = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        from safetensors import safe_open
        with safe_open(f, framework="pt") as s:
            for k in s.keys():
                g = gguf_name(k)
                if g is not None:
                    out[g] = s.get_tensor(k).float().numpy()
    return out


@pytest.fixture(scope="module")
def fixture_f32(tmp_path_factory):
    out = tmp_path_factory.mktemp("fx") / "tiny-f32.gguf"
    return convert_checkpoint(PR_TINY / "hf", out)


def test_f32_file_matches_pr24423_layout_keys_and_data(fixture_f32):
    ours, our_kv = read_kv(fixture_f32)
    ref, ref_kv = read_kv(PR_TINY / "tiny-f32.gguf")
    assert set(our_kv) - set(ref_kv) == OUR_KEYS
    assert set(ref_kv) - set(our_kv) == set()
    for k in set(ref_kv) - NAME_KEYS:
        assert our_kv[k] == ref_kv[k], k
    assert tensor_table(ours) == tensor_table(ref)
    assert [t.name for t in ours.tensors] == [t.name for t in ref.tensors]
    ref_data = {t.name: np.asarray(t.data) for t in ref.tensors}
    for t in ours.tensors:
        np.testing.assert_array_equal(np.asarray(t.data), ref_data[t.name], err_msg=t.name)


def test_f32_file_carries_our_documented_extra_keys(fixture_f32):
    _, kv = read_kv(fixture_f32)
    assert kv["diffusion-gemma.final_logit_softcapping"][1] == 30.0
    assert kv["diffusion-gemma.embedding_scale"][1] == pytest.approx(8.0)        # sqrt(64), F32 checkpoint
    assert kv["diffusion-gemma.text_only"][1] is True
    tok = json.loads(kv["tokenizer.huggingface.json"][1])
    assert tok == json.loads((PR_TINY / "hf" / "tokenizer.json").read_text())


@pytest.mark.parametrize("ftype", ["Q8_0", "Q4_K_M"])
def test_quantized_fixture_types_match_pr24423_llama_quantize(fixture_f32, tmp_path, ftype):
    """Per-tensor type choices equal llama-quantize's, both from the checkpoint and from our F32 GGUF."""
    ref, ref_kv = read_kv(PR_TINY / f"tiny-{ftype}.gguf")
    direct = convert_checkpoint(PR_TINY / "hf", tmp_path / "a.gguf", ftype)
    requant = requantize(fixture_f32, tmp_path / "b.gguf", ftype)
    for path in (direct, requant):
        ours, kv = read_kv(path)
        assert tensor_table(ours) == tensor_table(ref)
        assert kv["general.file_type"] == ref_kv["general.file_type"]


def test_q8_0_fixture_bytes_equal_llama_quantize(tmp_path):
    """Q8_0 is deterministic arithmetic: our bytes equal those PR #24423's llama-quantize wrote."""
    ours = GGUFReader(convert_checkpoint(PR_TINY / "hf", tmp_path / "q8.gguf", "Q8_0"))
    ref = {t.name: np.asarray(t.data) for t in GGUFReader(PR_TINY / "tiny-Q8_0.gguf").tensors}
    for t in ours.tensors:
        np.testing.assert_array_equal(np.asarray(t.data), ref[t.name], err_msg=t.name)


CONFIGS = ["tiny", "k256", "odd", "bf16"]


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("ftype", list(FILE_TYPES))
def test_every_type_converts_and_dequantizes_within_bound(checkpoints, tmp_path, config, ftype):
    hf = checkpoints(config)
    out = convert_checkpoint(hf, tmp_path / "out.gguf", ftype)
    r = GGUFReader(out)
    src = source_arrays(hf)
    assert int(r.fields["general.file_type"].contents()) == FILE_TYPES[ftype].ftype
    seen_types = set()
    for t in r.tensors:
        if t.name == "rope_freqs.weight":
            continue
        x = src[t.name].reshape(-1)
        y = dequantize(np.asarray(t.data), t.tensor_type).reshape(-1)
        seen_types.add(t.tensor_type.name)
        if t.tensor_type.name == "F32":
            np.testing.assert_array_equal(y, x, err_msg=t.name)
            continue
        rel = np.sqrt(np.mean((y - x) ** 2)) / np.sqrt(np.mean(x ** 2))
        assert rel <= REL_RMSE[t.tensor_type.name], (t.name, t.tensor_type.name, rel)
    if config == "k256" and ftype not in ("F32", "F16", "BF16"):
        # widths are multiples of 256: the preset's base type really appears, no fallback
        assert FILE_TYPES[ftype].base in seen_types


def test_router_and_vectors_stay_f32_in_every_preset(checkpoints, tmp_path):
    out = convert_checkpoint(checkpoints("k256"), tmp_path / "o.gguf", "Q2_K")
    for t in GGUFReader(out).tensors:
        if "ffn_gate_inp" in t.name or len(t.shape) == 1:
            assert t.tensor_type.name == "F32", t.name


def test_pure_puts_every_matrix_in_the_base_type(checkpoints, tmp_path):
    out = convert_checkpoint(checkpoints("k256"), tmp_path / "o.gguf", "Q4_K_M", pure=True)
    for t in GGUFReader(out).tensors:
        if len(t.shape) >= 2 and "ffn_gate_inp" not in t.name:
            assert t.tensor_type.name == "Q4_K", t.name


def test_release_and_resaved_config_forms_give_identical_files(checkpoints, tmp_path):
    a = convert_checkpoint(checkpoints("tiny", config_form="release"), tmp_path / "a.gguf", "Q8_0")
    b = convert_checkpoint(checkpoints("tiny", config_form="resaved"), tmp_path / "b.gguf", "Q8_0")
    assert tensor_table(GGUFReader(a)) == tensor_table(GGUFReader(b))
    ra, rb = GGUFReader(a), GGUFReader(b)
    for ta, tb in zip(ra.tensors, rb.tensors):
        np.testing.assert_array_equal(np.asarray(ta.data), np.asarray(tb.data))


def test_sharded_checkpoint_converts_to_the_same_tensors(checkpoints, tmp_path):
    one = GGUFReader(convert_checkpoint(checkpoints("tiny"), tmp_path / "a.gguf"))
    shards_dir = checkpoints("tiny", shards=3)
    assert (shards_dir / "model.safetensors.index.json").exists()
    three = GGUFReader(convert_checkpoint(shards_dir, tmp_path / "b.gguf"))
    assert tensor_table(one) == tensor_table(three)
    for ta, tb in zip(one.tensors, three.tensors):
        np.testing.assert_array_equal(np.asarray(ta.data), np.asarray(tb.data))


def test_bf16_checkpoint_keeps_bf16_bits_and_rounds_embedding_scale(checkpoints, tmp_path):
    hf = checkpoints("bf16")
    out = convert_checkpoint(hf, tmp_path / "o.gguf")   # default type: the source dtype
    r, kv = read_kv(out)
    H = kv["diffusion-gemma.embedding_length"][1]
    assert int(np.sqrt(H)) ** 2 != H
    scale = kv["diffusion-gemma.embedding_scale"][1]
    bf16_scale = np.float32(np.sqrt(H))
    bits = int(bf16_scale.view(np.uint32))
    expected = np.uint32((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).view(np.float32)
    assert scale == pytest.approx(float(expected), abs=0) and scale != pytest.approx(np.sqrt(H), abs=1e-4)
    from safetensors import safe_open
    with safe_open(next(hf.glob("*.safetensors")), framework="pt") as s:
        w = s.get_tensor("model.decoder.embed_tokens.weight")
    raw = w.view(__import__("torch").int16).numpy().view(np.uint16)
    emb = next(t for t in r.tensors if t.name == "token_embd.weight")
    assert emb.tensor_type.name == "BF16"
    np.testing.assert_array_equal(np.asarray(emb.data).view(np.uint16).reshape(raw.shape), raw)


def test_vision_tower_is_dropped(checkpoints, tmp_path):
    r = GGUFReader(convert_checkpoint(checkpoints("tiny"), tmp_path / "o.gguf"))
    assert not any("vision" in t.name or "embed_vision" in t.name for t in r.tensors)


def test_inspect_shows_keys_and_tensors_as_json_and_text(fixture_f32, capsys):
    from dgguf.cli import main
    assert main(["inspect", str(fixture_f32), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["kv"]["diffusion-gemma.embedding_scale"] == {"type": "FLOAT32", "value": 8.0}
    assert doc["kv"]["diffusion.eos_token_ids"]["type"] == "ARRAY[UINT32]"
    ref = GGUFReader(PR_TINY / "tiny-f32.gguf")
    assert [t["name"] for t in doc["tensors"]] == [t.name for t in ref.tensors]
    assert main(["inspect", str(fixture_f32)]) == 0
    text = capsys.readouterr().out
    for key in OUR_KEYS:
        assert key in text


def test_inspect_rejects_a_truncated_gguf_in_one_line(fixture_f32, tmp_path, capsys):
    from dgguf.cli import main
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(fixture_f32.read_bytes()[:-5000])
    assert main(["inspect", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "truncated" in err and "\n" not in err
