"""Per-tensor type choices against what PR #24423's llama-quantize wrote (tests/fixtures/.../gguf-dumps)."""
import ast
import re

import pytest

from conftest import PR_TINY
from dgguf.convert.presets import TypeChooser
from dgguf.format.quant_types import file_type


def read_dump(name):
    """(kv, [(tensor name, ne, type)]) from a dump file."""
    kv, tensors = {}, []
    for line in (PR_TINY / "gguf-dumps" / f"{name}.dump.txt").read_text().splitlines():
        parts = [p.strip() for p in line.split("|")]
        if parts[0] == "KV" and parts[2] in ("UINT32", "FLOAT32"):
            kv[parts[1]] = ast.literal_eval(parts[3])
        elif parts[0] == "KV" and parts[1].endswith("head_count_kv"):
            kv[parts[1]] = ast.literal_eval(parts[3].split(":", 1)[1].strip())
        elif parts[0] == "T":
            tensors.append((parts[1], tuple(ast.literal_eval(parts[2])), parts[3]))
    return kv, tensors


def layer_order(name):
    m = re.match(r"blk\.(\d+)\.", name)
    return (int(m.group(1)) if m else -1, name)


@pytest.mark.parametrize("dump", ["mid-Q4_K_M", "tiny-Q4_K_M", "tiny-Q8_0"])
def test_preset_choices_equal_llama_quantize(dump):
    kv, tensors = read_dump(dump)
    a = "diffusion-gemma."
    ft = file_type(dump.split("-", 1)[1])
    assert kv["general.file_type"] == ft.ftype
    chooser = TypeChooser(ft, kv[a + "block_count"], kv[a + "expert_count"],
                          sum(1 for n, _, _ in tensors if n.endswith("attn_v.weight")),
                          kv[a + "attention.head_count"] // kv[a + "attention.head_count_kv"][0])
    # llama-quantize counts attn_v tensors in the source file's order: layer by layer.
    chosen = {n: chooser.choose(n, ne).name for n, ne, _ in sorted(tensors, key=lambda t: layer_order(t[0]))}
    assert chosen == {n: t for n, _, t in tensors}


def test_mid_dump_exercises_the_more_bits_rules():
    """Guard against a vacuous comparison: the mid file mixes Q4_K, Q6_K and F32."""
    _, tensors = read_dump("mid-Q4_K_M")
    assert {t for _, _, t in tensors} == {"Q4_K", "Q6_K", "F32"}
