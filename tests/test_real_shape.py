"""scripts/real_shape.py: a random-weight GGUF of a config has exactly the tensors and types `dgguf convert` writes
for that config, loads, runs, and repeats a block of rows in large matrices only."""
import numpy as np

from dgguf.convert.quantize import convert_checkpoint
from dgguf.format.gguf_file import read_gguf
from dgguf.runtime import Model

from conftest import PR_TINY, _load_script


def test_random_shape_file_matches_a_conversion_and_runs(tmp_path):
    real_shape = _load_script("real_shape")
    out = real_shape.write_real_shape(PR_TINY / "hf", "Q4_K_M", tmp_path / "r.gguf", progress=False, block_rows=4)
    ref = convert_checkpoint(PR_TINY / "hf", tmp_path / "c.gguf", "Q4_K_M")
    g, c = read_gguf(out), read_gguf(ref)
    try:
        assert [(t.name, tuple(t.ne), t.type.name) for t in g.tensors] == \
               [(t.name, tuple(t.ne), t.type.name) for t in c.tensors]
        for key in ("diffusion-gemma.block_count", "diffusion.canvas_length", "diffusion.eb_max_steps",
                    "general.file_type"):
            assert g.get(key) == c.get(key)
        blocks = {t.name: g.tensor_bytes(t) for t in g.tensors}
        emb = blocks["token_embd.weight"].reshape(512, -1)
        assert np.array_equal(emb[:4], emb[4:8]) and not np.array_equal(emb[0], emb[1])   # a repeated block
        router = blocks["blk.0.ffn_gate_inp.weight"].reshape(8, -1)
        assert len({r.tobytes() for r in router}) == 8                                       # routers all random
    finally:
        g.close()
        c.close()
    m = Model.load(out)
    try:
        assert len(m.generate([2, 5, 6], max_new_tokens=16, seed=0, max_denoising_steps=2).ids) == 16
    finally:
        m.close()
