"""The package's structure: one tensor table (format/arch.py) that the native contract, the converter, the
loader and the published files agree with, and the layering (runtime and convert never import each other)."""
import re
import subprocess
import sys
from pathlib import Path

from dgguf.convert.tensor_names import expected_shapes, gguf_name
from dgguf.core._native import ffi
from dgguf.format.arch import GLOBAL_TENSORS, LAYER_TENSORS, TENSORS, expected_tensors
from dgguf.format.gguf_file import read_gguf
from dgguf.runtime.model_config import read_model_config

from conftest import FIXTURES

ROOT = Path(__file__).resolve().parent.parent


def _tensor_fields(struct: str) -> list[str]:
    return [name for name, f in ffi.typeof(struct).fields if f.type is ffi.typeof("dg_tensor")]


def test_native_structs_have_the_tables_tensor_fields_in_order():
    assert _tensor_fields("dg_layer") == [t.field for t in LAYER_TENSORS if t.field is not None]
    assert _tensor_fields("dg_model") == [t.field for t in GLOBAL_TENSORS if t.field is not None]


def test_table_names_are_unique():
    assert len({t.gguf for t in TENSORS}) == len(TENSORS)
    assert len({t.hf for t in TENSORS if t.hf}) == len([t for t in TENSORS if t.hf])
    assert all(t.part in {"embedding", "self_conditioning", "norms", "attention", "dense", "router", "experts"}
               for t in TENSORS)


def test_table_gives_the_published_files_tensors_exactly():
    """PR #24423's converter wrote the fixture: its tensor list is the table's, name for name and shape for shape."""
    g = read_gguf(FIXTURES / "pr24423-tiny" / "tiny-f32.gguf")
    try:
        cfg = read_model_config(g)
        assert {t.name: tuple(t.ne) for t in g.tensors} == expected_tensors(cfg)
    finally:
        g.close()


def test_converter_maps_every_checkpoint_tensor_through_the_table():
    from dgguf.convert.checkpoint import read_config, read_tensors
    hf = FIXTURES / "pr24423-tiny" / "hf"
    cfg, _ = read_config(hf)
    shapes = expected_shapes(cfg)
    source = {n: tuple(t.shape) for n, t in read_tensors(hf).items() if gguf_name(n) is not None}
    assert source == shapes
    ne = expected_tensors(cfg.shape())
    assert {gguf_name(n): tuple(reversed(s)) for n, s in shapes.items()} == {
        n: s for n, s in ne.items() if n != "rope_freqs.weight"}


def _imported(package: str) -> set[str]:
    code = f"import sys, {package}; print(' '.join(m for m in sys.modules if m.startswith('dgguf.')))"
    return set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
               .stdout.split())


def _source_imports(folder: str) -> set[str]:
    """dgguf modules named in the folder's import statements, including those inside functions."""
    names = set()
    for p in (ROOT / folder).glob("*.py"):
        names |= set(re.findall(r"^\s*(?:from|import) (dgguf\.\w+)", p.read_text(), flags=re.M))
    return names


def test_runtime_and_convert_do_not_import_each_other():
    assert not {m for m in _imported("dgguf.runtime") if m.startswith(("dgguf.convert", "dgguf.cli"))}
    assert not {m for m in _imported("dgguf.convert.quantize") if m.startswith(("dgguf.runtime", "dgguf.cli"))}
    assert _source_imports("runtime") <= {"dgguf.core", "dgguf.format", "dgguf.runtime"}
    assert _source_imports("convert") <= {"dgguf.core", "dgguf.format", "dgguf.convert"}
    assert _source_imports("format") <= {"dgguf.core", "dgguf.format"}
    assert _source_imports("core") <= {"dgguf.core"}
