"""Issue 13, converter side: broken, hostile and unusual HF checkpoints. Every reproducer of items 5, 7 and 9
gives one line `error: ...` naming the file and key, exit status 2, and no output file; the re-saved checkpoint
whose full layers have the sliding layers' head dim converts and matches transformers.
"""
import json
import os
import shutil
import struct
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from dgguf.cli import main
from dgguf.convert import checkpoint as ckpt

CONTROL = [chr(c) for c in range(32)] + ["\x7f"]


@pytest.fixture
def hf(checkpoints, tmp_path):
    """A private, editable copy of the tiny checkpoint."""
    d = tmp_path / "hf"
    shutil.copytree(checkpoints("tiny"), d)
    return d


def convert(capsys, tmp_path, hf_dir, *extra):
    out = tmp_path / "out.gguf"
    code = main(["convert", str(hf_dir), "-o", str(out), "-q", *extra])
    return code, capsys.readouterr().err, out


def expect_error(capsys, tmp_path, hf_dir, *needles):
    code, err, out = convert(capsys, tmp_path, hf_dir)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    assert not any(c in lines[0] for c in CONTROL), lines[0]
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.gguf")]
    return lines[0]


def edit_json(path, fn):
    c = json.loads(path.read_text())
    c = fn(c) or c
    path.write_text(json.dumps(c))


def edit_text_config(hf_dir, **kv):
    def f(c):
        c["text_config"].update(kv)
    edit_json(hf_dir / "config.json", f)


def shard(hf_dir, n=2):
    """Split model.safetensors into n shards with an index; returns the index path."""
    tensors = load_file(hf_dir / "model.safetensors")
    (hf_dir / "model.safetensors").unlink()
    names = sorted(tensors)
    weight_map = {}
    for k in range(n):
        fname = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        part = {name: tensors[name] for name in names[k::n]}
        save_file(part, hf_dir / fname)
        weight_map.update({name: fname for name in part})
    index = hf_dir / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index


def set_weight_map_entry(index, value):
    """Point the first tensor of the index at `value`."""
    def f(c):
        first = sorted(c["weight_map"])[0]
        c["weight_map"][first] = value
    edit_json(index, f)


# ---------------------------------------------------------------------------------- item 5: no traceback

@pytest.mark.parametrize("name", ["config.json", "generation_config.json", "tokenizer_config.json"])
def test_json_file_that_is_a_list(capsys, tmp_path, hf, name):
    (hf / name).write_text("[1, 2, 3]")
    expect_error(capsys, tmp_path, hf, name, "JSON object", "list")


@pytest.mark.parametrize("key,value,needles", [
    ("sliding_window", -5, ["sliding_window", "-5"]),
    ("max_position_embeddings", 2**40, ["max_position_embeddings", str(2**40)]),
    ("rope_parameters", [1, 2], ["rope_parameters", "object"]),
    ("rope_parameters", "yarn", ["rope_parameters", "object"]),
    ("rope_parameters", {"full_attention": 7}, ["rope_parameters.full_attention", "object"]),
    ("per_layer_config", [1, 2], ["per_layer_config", "object"]),
    ("per_layer_config", {"1": 32}, ["per_layer_config.1", "object"]),
    ("per_layer_config", {"x": {}}, ["per_layer_config", "layer index"]),
    ("per_layer_config", {"9": {}}, ["per_layer_config", "layer index"]),
    ("eos_token_id", "x", ["eos_token_id", "integer"]),
    ("layer_types", "sliding_attention", ["layer_types"]),
    ("num_hidden_layers", "4", ["num_hidden_layers", "integer"]),
])
def test_text_config_values_of_the_wrong_type_or_range(capsys, tmp_path, hf, key, value, needles):
    edit_text_config(hf, **{key: value})
    expect_error(capsys, tmp_path, hf, "config.json", *needles)


def test_top_level_eos_token_id_that_is_not_an_integer(capsys, tmp_path, hf):
    edit_json(hf / "config.json", lambda c: c.update(eos_token_id=["x"]))
    expect_error(capsys, tmp_path, hf, "config.json", "eos_token_id", "integer")


@pytest.mark.parametrize("key,value,needles", [
    ("t_min", "abc", ["t_min", "number", '"abc"']),
    ("max_denoising_steps", -5, ["max_denoising_steps", "-5"]),
    ("max_denoising_steps", 2**40, ["max_denoising_steps", str(2**40)]),
    ("max_denoising_steps", 4.5, ["max_denoising_steps", "integer"]),
    ("eos_token_id", "x", ["eos_token_id", "integer"]),
    ("eos_token_id", [1, 99999], ["eos_token_id", "99999"]),      # outside the vocabulary
    ("pad_token_id", -1, ["pad_token_id"]),
    ("t_max", 0.1, ["t_min", "t_max"]),                          # t_min 0.4 > t_max
    ("entropy_bound", 0, ["entropy_bound"]),
    ("stability_threshold", 0, ["stability_threshold"]),
    ("confidence_threshold", float("nan"), ["confidence_threshold", "finite"]),
    ("sampler_config", [1], ["sampler_config", "object"]),
])
def test_generation_config_values(capsys, tmp_path, hf, key, value, needles):
    edit_json(hf / "generation_config.json", lambda c: c.update({key: value}))
    expect_error(capsys, tmp_path, hf, "generation_config.json", *needles)


@pytest.mark.parametrize("value,kind", [(7, "an integer"), (["model.safetensors"], "a list"), (None, "null")])
def test_weight_map_value_that_is_not_a_string(capsys, tmp_path, hf, value, kind):
    index = shard(hf)
    set_weight_map_entry(index, value)
    expect_error(capsys, tmp_path, hf, "index.json", "weight_map", kind, "file name")


def test_deeply_nested_safetensors_header_is_no_recursion_error(capsys, tmp_path, hf):
    body = b"[" * 100_000 + b"]" * 100_000
    (hf / "model.safetensors").write_bytes(struct.pack("<Q", len(body)) + body)
    expect_error(capsys, tmp_path, hf, "model.safetensors", "corrupt", "nested too deeply")


def test_deeply_nested_config_is_no_recursion_error(capsys, tmp_path, hf):
    (hf / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    expect_error(capsys, tmp_path, hf, "config.json", "nested too deeply")


def test_deeply_nested_tokenizer_json_is_no_recursion_error(capsys, tmp_path, hf):
    (hf / "tokenizer.json").write_text('{"model": ' + "[" * 100_000 + "]" * 100_000 + "}")
    expect_error(capsys, tmp_path, hf, "tokenizer.json")


def test_tokenizer_json_that_is_not_utf8(capsys, tmp_path, hf):
    (hf / "tokenizer.json").write_bytes(b"\xff\xfe\x00garbage")
    expect_error(capsys, tmp_path, hf, "tokenizer.json", "UTF-8")


@pytest.mark.parametrize("value", ["yes", 1])
def test_tokenizer_config_flag_that_is_not_a_boolean(capsys, tmp_path, hf, value):
    edit_json(hf / "tokenizer_config.json", lambda c: c.update(add_bos_token=value))
    expect_error(capsys, tmp_path, hf, "tokenizer_config.json", "add_bos_token")


def test_chat_template_list_of_non_objects(capsys, tmp_path, hf):
    (hf / "chat_template.jinja").unlink(missing_ok=True)
    edit_json(hf / "tokenizer_config.json", lambda c: c.update(chat_template=["a", "b"]))
    expect_error(capsys, tmp_path, hf, "tokenizer_config.json", "chat_template")


# --------------------------------------------------------------- item 7: values checked before writing

@pytest.mark.parametrize("key,value,needles", [
    ("top_k_experts", 0, ["top_k_experts", "0", "1..8"]),
    ("top_k_experts", 9, ["top_k_experts", "9", "1..8"]),
    ("rms_norm_eps", float("nan"), ["rms_norm_eps", "finite"]),
    ("rms_norm_eps", float("inf"), ["rms_norm_eps", "finite"]),
    ("rms_norm_eps", 0, ["rms_norm_eps", "outside"]),
    ("rms_norm_eps", -1e-6, ["rms_norm_eps", "outside"]),
    ("sliding_window", 0, ["sliding_window", "outside"]),
    ("max_position_embeddings", 0, ["max_position_embeddings", "outside"]),
    ("final_logit_softcapping", -30.0, ["final_logit_softcapping", "outside"]),
    ("hidden_size", 64.7, ["hidden_size", "integer", "64.7"]),
    ("vocab_size", True, ["vocab_size", "integer"]),
    ("num_experts", 0, ["num_experts"]),
    ("num_key_value_heads", 3, ["KV heads", "num_attention_heads"]),    # 4 heads are not a multiple of 3
    ("head_dim", 15, ["head_dim", "even"]),
])
def test_config_values_out_of_range(capsys, tmp_path, hf, key, value, needles):
    edit_text_config(hf, **{key: value})
    expect_error(capsys, tmp_path, hf, "config.json", *needles)


@pytest.mark.parametrize("value", [2.0, 0.0, -0.5, float("nan")])
def test_partial_rotary_factor_outside_0_1(capsys, tmp_path, hf, value):
    def f(c):
        c["text_config"]["rope_parameters"]["full_attention"]["partial_rotary_factor"] = value
    edit_json(hf / "config.json", f)
    line = expect_error(capsys, tmp_path, hf, "config.json", "partial_rotary_factor")
    assert "internal" not in line


@pytest.mark.parametrize("value", [0, 2**31, 2**16 + 1, 2048])   # 2048: longer than the 1024-token context
def test_canvas_length_out_of_range(capsys, tmp_path, hf, value):
    edit_json(hf / "config.json", lambda c: c.update(canvas_length=value))
    expect_error(capsys, tmp_path, hf, "config.json", "canvas_length", str(value), "1..1024")


def test_negative_rope_theta(capsys, tmp_path, hf):
    def f(c):
        c["text_config"]["rope_parameters"]["sliding_attention"]["rope_theta"] = -1
    edit_json(hf / "config.json", f)
    expect_error(capsys, tmp_path, hf, "config.json", "rope_parameters.sliding_attention.rope_theta")


def test_integral_float_sizes_are_accepted(capsys, tmp_path, hf):
    edit_text_config(hf, hidden_size=64.0, num_experts=8.0)
    code, err, out = convert(capsys, tmp_path, hf)
    assert code == 0, err
    assert out.read_bytes()[:4] == b"GGUF"


@pytest.mark.parametrize("offsets", [[0.5, 4.5], ["0", "4"], [0], [True, 4], [8, 4]])
def test_safetensors_data_offsets_that_are_not_two_integers(capsys, tmp_path, hf, offsets):
    p = hf / "model.safetensors"
    data = p.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    header["model.decoder.norm.weight"]["data_offsets"] = offsets
    body = json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    p.write_bytes(struct.pack("<Q", len(body)) + body + data[8 + n:])
    expect_error(capsys, tmp_path, hf, "model.safetensors", "model.decoder.norm.weight", "data_offsets")


@pytest.mark.parametrize("shape", [[64.0], [-64], ["64"], 64])
def test_safetensors_shape_that_is_not_a_list_of_integers(capsys, tmp_path, hf, shape):
    p = hf / "model.safetensors"
    data = p.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    header["model.decoder.norm.weight"]["shape"] = shape
    body = json.dumps(header).encode()
    p.write_bytes(struct.pack("<Q", len(body)) + body + data[8 + n:])
    expect_error(capsys, tmp_path, hf, "model.safetensors", "model.decoder.norm.weight", "shape")


@pytest.fixture(scope="module")
def same_dims_checkpoint(make_checkpoint, tmp_path_factory):
    """A checkpoint saved by transformers whose full layers have the sliding layers' head dim and KV heads:
    its config.json has no global_head_dim and an empty per_layer_config."""
    mc = sys.modules["make_checkpoint"]
    spec = mc.TinySpec(**{**mc.TINY.__dict__, "global_head_dim": mc.TINY.head_dim,
                          "num_global_key_value_heads": mc.TINY.num_key_value_heads})
    mc.CONFIGS["same-dims"] = spec
    try:
        d = make_checkpoint(tmp_path_factory.mktemp("same-dims") / "hf", config="same-dims", config_form="resaved")
    finally:
        del mc.CONFIGS["same-dims"]
    return d


def test_resaved_checkpoint_with_equal_head_dims_converts_and_matches_transformers(same_dims_checkpoint, tmp_path,
                                                                                   capsys):
    import torch
    from transformers import DiffusionGemmaForBlockDiffusion
    from dgguf.runtime import Model

    tc = json.loads((same_dims_checkpoint / "config.json").read_text())["text_config"]
    assert tc.get("global_head_dim") is None and not tc["per_layer_config"]     # the form
    out = tmp_path / "same.gguf"
    assert main(["convert", str(same_dims_checkpoint), "-o", str(out), "-q", "--type", "F32"]) == 0, \
        capsys.readouterr().err
    m = Model.load(out, threads=2)
    try:
        assert m.config.head_dims == [16, 16, 16, 16] and m.config.kv_heads == [2, 2, 2, 2]
        rng = np.random.default_rng(0)
        context = rng.integers(0, m.config.vocab_size, 3 * m.config.sliding_window + 1)
        canvas = rng.integers(0, m.config.vocab_size, m.config.canvas_length)
        got = m.canvas_logits(context, canvas)
    finally:
        m.close()
    ref_model = DiffusionGemmaForBlockDiffusion.from_pretrained(
        same_dims_checkpoint, dtype=torch.float64, experts_implementation="eager", attn_implementation="eager").eval()
    with torch.no_grad():
        ref = ref_model(input_ids=torch.from_numpy(context)[None], decoder_input_ids=torch.from_numpy(canvas)[None],
                        self_conditioning_logits=None).logits[0].numpy()
    # test_forward.py's bound against the fp64 truth: 2e-5 of the largest logit, or 1e-4
    assert float(np.abs(got - ref).max()) <= max(1e-4, 2e-5 * float(np.abs(ref).max()))


def test_head_dims_come_from_the_tensors_where_the_config_is_silent(checkpoints, tmp_path):
    """Release form without global_* keys: transformers would assume 512; the tensors say 32 / 1 KV head."""
    d = tmp_path / "hf"
    shutil.copytree(checkpoints("tiny"), d)

    def f(c):
        c["text_config"].pop("global_head_dim")
        c["text_config"].pop("num_global_key_value_heads")
        c["text_config"].pop("per_layer_config", None)
    edit_json(d / "config.json", f)
    shapes = {t.name: t.shape for t in ckpt.read_tensors(d).values()}
    cfg, _ = ckpt.read_config(d, shapes)
    assert cfg.head_dims == [16, 32, 16, 32] and cfg.kv_heads == [2, 1, 2, 1]
    cfg, _ = ckpt.read_config(d)      # no tensors (plan --config): transformers' default
    assert cfg.head_dims == [16, 512, 16, 512]


def test_explicit_head_dims_still_win_over_the_tensors(capsys, tmp_path, hf):
    edit_text_config(hf, global_head_dim=64)
    expect_error(capsys, tmp_path, hf, "k_norm.weight", "shape")


# ------------------------------------------------------------------------ item 9: paths from the index

@pytest.mark.parametrize("value", ["/etc/passwd", "../outside.safetensors", "sub/model-00001-of-00002.safetensors",
                                   "..", ".", "", "a\\b.safetensors", "/proc/self/mem", "x\0y"])
def test_weight_map_value_that_is_not_a_plain_file_name(capsys, tmp_path, hf, monkeypatch, value):
    index = shard(hf)
    (tmp_path / "outside.safetensors").write_bytes((hf / "model-00001-of-00002.safetensors").read_bytes())
    set_weight_map_entry(index, value)
    opened = []
    real_open = open
    monkeypatch.setattr(ckpt, "open", lambda p, *a: opened.append(p) or real_open(p, *a), raising=False)
    expect_error(capsys, tmp_path, hf, "index.json", "weight_map", "file name")
    assert opened == []          # refused before any shard was opened


def test_weight_map_symlink_leading_outside_the_directory(capsys, tmp_path, hf, monkeypatch):
    index = shard(hf)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "evil.safetensors").write_bytes((hf / "model-00001-of-00002.safetensors").read_bytes())
    (hf / "evil.safetensors").symlink_to(outside / "evil.safetensors")
    set_weight_map_entry(index, "evil.safetensors")
    opened = []
    real_open = open
    monkeypatch.setattr(ckpt, "open", lambda p, *a: opened.append(p) or real_open(p, *a), raising=False)
    expect_error(capsys, tmp_path, hf, "index.json", "evil.safetensors", "outside the checkpoint directory")
    assert opened == []


def test_weight_map_naming_a_fifo_does_not_hang(capsys, tmp_path, hf):
    index = shard(hf)
    os.mkfifo(hf / "fifo.safetensors")
    set_weight_map_entry(index, "fifo.safetensors")
    expect_error(capsys, tmp_path, hf, "fifo.safetensors", "not a regular file")


def test_links_inside_the_directory_and_the_hub_cache_layout_are_followed(capsys, tmp_path, checkpoints):
    """huggingface_hub's cache: snapshots/REV/NAME are links to ../../blobs/HASH; that is not 'outside'."""
    src = checkpoints("tiny", shards=3)
    repo = tmp_path / "models--google--tiny"
    snap, blobs = repo / "snapshots" / "0123abc", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for i, f in enumerate(sorted(src.iterdir())):
        shutil.copy(f, blobs / f"blob{i}")
        (snap / f.name).symlink_to(os.path.join("..", "..", "blobs", f"blob{i}"))
    out = tmp_path / "out.gguf"
    assert main(["convert", str(snap), "-o", str(out), "-q"]) == 0, capsys.readouterr().err
    assert out.read_bytes()[:4] == b"GGUF"


# ---------------------------------------------------------------------- item 8: file bytes are escaped

def test_tensor_name_with_control_characters_is_escaped_and_cut(capsys, tmp_path, hf):
    def f(t):
        t["model.decoder.\x1b[2J\x1b]0;pwned\x07\nfake\0" + "A" * 5000] = np.zeros(4, np.float32)
    p = hf / "model.safetensors"
    t = load_file(p)
    f(t)
    save_file(t, p)
    line = expect_error(capsys, tmp_path, hf, "unexpected tensor", "\\x1b[2J", "\\n", "\\x00", "...")
    assert len(line) < 300


def test_weight_map_name_with_escape_sequences_is_escaped(capsys, tmp_path, hf):
    index = shard(hf)
    set_weight_map_entry(index, "../\x1b[31mred\n" + "B" * 1000)
    line = expect_error(capsys, tmp_path, hf, "index.json", "\\x1b[31mred\\n")
    assert len(line) < 400


def test_unknown_architecture_name_is_escaped(capsys, tmp_path, hf):
    def f(c):
        c["architectures"] = ["Evil\x1b[31m\n" + "C" * 1000]
        c["model_type"] = "evil"
    edit_json(hf / "config.json", f)
    line = expect_error(capsys, tmp_path, hf, "unknown architecture", "Evil\\x1b[31m\\n")
    assert len(line) < 400
