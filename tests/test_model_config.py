"""Loading a GGUF's hyper-parameters and validating its tensors before any compute."""
import numpy as np
import pytest

from conftest import PR_TINY
from gguf.constants import GGUFValueType as V

from dgguf.core.errors import DggufError
from dgguf.format.gguf_file import Field, GGUFWriter, TensorInfo
from dgguf.format.gguf_file import read_gguf
from dgguf.convert.quantize import convert_checkpoint
from dgguf.runtime.model_config import read_model_config


def test_pr24423_file_gets_the_documented_defaults():
    g = read_gguf(PR_TINY / "tiny-Q4_K_M.gguf")
    c = read_model_config(g)
    assert c.softcap == 30.0
    assert c.embedding_scale == np.float32(8.0)
    assert c.eos_token_ids == [1, 6]          # eos id plus the end-of-turn token <turn|>
    assert c.sliding == [True, False, True, False] and c.head_dims == [16, 32, 16, 32]
    assert c.kv_heads == [2, 1, 2, 1] and c.rope_rotated_pairs_full == 4   # 0.25 * 32 / 2
    assert c.sampler["max_denoising_steps"] == 48 and c.mask_token_id == 4
    g.close()


def test_our_file_carries_its_own_values(checkpoints, tmp_path):
    g = read_gguf(convert_checkpoint(checkpoints("bf16"), tmp_path / "o.gguf"))
    c = read_model_config(g)
    assert c.embedding_scale == pytest.approx(9.8125, abs=0)    # sqrt(96) rounded to bf16
    assert c.eos_token_ids == [1, 6, 50]
    g.close()


def _rewrite(src, dst, drop_tensor=None, arch=None, fields=None, tensor_data=None):
    """Copy a GGUF through our writer, optionally dropping a tensor, changing the architecture, replacing
    fields, or replacing a tensor's bytes."""
    g = read_gguf(src)
    new_fields = dict(g.fields)
    if arch:
        new_fields["general.architecture"] = Field(V.STRING, arch)
    new_fields.update(fields or {})
    keep = [t for t in g.tensors if t.name != drop_tensor]
    infos = [TensorInfo(t.name, t.ne, t.type) for t in keep]
    with GGUFWriter(dst, new_fields, infos) as w:
        for t in keep:
            w.write((tensor_data or {}).get(t.name, g.tensor_bytes(t)))
    g.close()
    return dst


def test_missing_tensor_is_named(tmp_path):
    p = _rewrite(PR_TINY / "tiny-Q8_0.gguf", tmp_path / "m.gguf", drop_tensor="blk.2.attn_v.weight")
    with pytest.raises(DggufError, match="missing tensor blk.2.attn_v.weight"):
        read_model_config(read_gguf(p))


def test_wrong_architecture_is_named(tmp_path):
    p = _rewrite(PR_TINY / "tiny-Q8_0.gguf", tmp_path / "a.gguf", arch="llama")
    with pytest.raises(DggufError, match="architecture 'llama' is not diffusion-gemma"):
        read_model_config(read_gguf(p))


@pytest.mark.parametrize("key,field,message", [
    ("diffusion-gemma.block_count", Field(V.STRING, "4"), "block_count is a STRING"),
    ("diffusion-gemma.attention.sliding_window_pattern", Field(V.BOOL, True), "sliding_window_pattern"),
    ("diffusion.canvas_length", Field(V.UINT32, 0), "canvas_length = 0"),
    ("diffusion.eos_token_ids", Field(V.ARRAY, ["1"], V.STRING), "eos_token_ids"),
    ("diffusion-gemma.embedding_length", Field(V.UINT64, 2**40), "embedding_length"),
])
def test_mistyped_or_out_of_range_metadata_is_a_clear_error(tmp_path, key, field, message):
    p = _rewrite(PR_TINY / "tiny-Q8_0.gguf", tmp_path / "m.gguf", fields={key: field})
    with pytest.raises(DggufError, match=message):
        read_model_config(read_gguf(p))


def test_rope_factors_other_than_the_supported_pattern_are_refused(tmp_path):
    f = np.ones(16, np.float32)
    f[4:] = 1e30
    f[2] = 0.5
    p = _rewrite(PR_TINY / "tiny-Q8_0.gguf", tmp_path / "r.gguf", tensor_data={"rope_freqs.weight": f})
    with pytest.raises(DggufError, match="rope_freqs"):
        read_model_config(read_gguf(p))


def _without_key(tmp_path, key):
    g = read_gguf(PR_TINY / "tiny-Q8_0.gguf")
    fields = {k: f for k, f in g.fields.items() if k != key}
    infos = [TensorInfo(t.name, t.ne, t.type) for t in g.tensors]
    with GGUFWriter(tmp_path / "k.gguf", fields, infos) as w:
        for t in g.tensors:
            w.write(g.tensor_bytes(t))
    g.close()
    return tmp_path / "k.gguf"


def test_a_file_without_the_optional_mask_id_loads_and_runs(tmp_path, capsys):
    """Issue 13 item 1: tokenizer.ggml.mask_token_id is optional (the sampler never uses it)."""
    from dgguf.cli import main
    p = _without_key(tmp_path, "tokenizer.ggml.mask_token_id")
    c = read_model_config(read_gguf(p))
    assert c.mask_token_id is None and c.pad_token_id == 0
    assert main(["run", "-m", str(p), "-p", "hello", "-n", "16", "-s", "1"]) == 0
    assert capsys.readouterr().out.startswith("hello")


@pytest.mark.parametrize("value, message", [
    (1 << 20, "canvas_length = 1048576 is outside 1..65536"),
    (2048, "canvas_length 2048 is larger than the context length 1024"),
])
def test_huge_canvas_lengths_are_refused_before_any_allocation(tmp_path, value, message):
    """Issue 13 item 3: the canvas length sizes canvas x vocabulary float buffers."""
    p = _rewrite(PR_TINY / "tiny-Q8_0.gguf", tmp_path / "c.gguf",
                 fields={"diffusion.canvas_length": Field(V.UINT32, value)})
    with pytest.raises(DggufError, match=message):
        read_model_config(read_gguf(p))


def test_generation_memory_beyond_this_machine_is_a_clear_error(monkeypatch):
    """The canvas buffers and KV cache are checked against physical memory before they are allocated."""
    import os

    from dgguf.runtime import Model
    from dgguf.runtime.model import working_bytes
    real = os.sysconf
    monkeypatch.setattr(os, "sysconf", lambda n: 1 if n == "SC_PHYS_PAGES" else real(n))   # one page of RAM
    with pytest.raises(DggufError, match=r"canvas buffers .* diffusion.canvas_length 16 x vocabulary 512"):
        Model.load(PR_TINY / "tiny-Q8_0.gguf")
    c = read_model_config(read_gguf(PR_TINY / "tiny-Q8_0.gguf"))
    need = working_bytes(c, 100)
    assert need["canvas"] == 4 * 4 * 16 * 512
    # sliding layers (window 8) hold 7 positions of 2 x 16; full layers 100 of 1 x 32; K and V, float32
    assert need["kv_cache"] == 2 * 4 * (2 * (7 * 2 * 16) + 2 * (100 * 1 * 32))
