"""scripts/soak.py in small (issue 13): load/close cycles and generations in one process keep open descriptors,
memory mappings and resident memory flat, and the soak's verdict catches a leak. The full soak (200 cycles,
1,000 generations on models/small) is run by hand: python scripts/soak.py MODEL."""
import importlib.util
import sys
from pathlib import Path

import pytest

from dgguf.runtime.model import Model

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests" / "fixtures" / "pr24423-tiny" / "tiny-Q8_0.gguf"


def _load_soak():
    spec = importlib.util.spec_from_file_location("dgguf_soak", ROOT / "scripts" / "soak.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["dgguf_soak"] = mod
    spec.loader.exec_module(mod)
    return mod


soak = _load_soak()


@pytest.fixture(autouse=True)
def _linux_proc():
    if not Path("/proc/self/statm").exists():
        pytest.skip("the soak reads /proc/self")


def test_load_close_cycles_are_flat():
    ph = soak.load_cycles(TINY, 12, threads=1)
    # few iterations: RSS noise of a page or two per sample would read as a slope, so only gross growth counts
    v = ph.judge(slope_kib=256)
    assert v["flat"], v["reasons"]
    assert v["fds_end"] == v["fds_after_warmup"] and v["maps_end"] <= v["maps_after_warmup"] + soak.MAX_NEW_MAPS


def test_generations_are_flat():
    ph = soak.generations(TINY, 16, threads=1)
    v = ph.judge(slope_kib=256)
    assert v["flat"], v["reasons"]
    assert len(ph.samples) == 17 and ph.samples[-1][0] == 16


def test_a_leak_is_not_flat():
    """Models never closed (as a server that forgets close would): mappings and descriptors pile up."""
    kept = []

    def leaky_load(path, threads):
        m = Model.load(path, threads=threads)
        m.close = lambda: None
        kept.append(m)
        return m
    try:
        v = soak.load_cycles(TINY, 12, threads=1, load=leaky_load).judge()
    finally:
        for m in kept:
            m.gguf.close()
    assert not v["flat"]
    assert any("mappings" in r or "descriptors" in r for r in v["reasons"]), v["reasons"]


def test_cli_reports_and_passes(tmp_path, capsys):
    assert soak.main([str(TINY), "--cycles", "4", "--generations", "4", "--json", str(tmp_path / "s.json")]) in (0, 1)
    out = capsys.readouterr().out
    assert "load/close: 4 iterations" in out and "generations: 4 iterations" in out and "soak: " in out
    assert (tmp_path / "s.json").exists()
