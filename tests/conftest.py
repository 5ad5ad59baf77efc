"""Shared fixtures: tiny checkpoints from scripts/make_checkpoint.py (generated once per session), the
PR #24423 fixture files copied into tests/fixtures, and `kernel` (a test run once per matmul kernel)."""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from dgguf.core import native

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
PR_TINY = FIXTURES / "pr24423-tiny"


def _load_script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def make_checkpoint():
    return _load_script("make_checkpoint").make_checkpoint


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory, make_checkpoint):
    """name → HF directory, built lazily once per test session."""
    cache = {}

    def get(config, **kw):
        key = (config, tuple(sorted(kw.items())))
        if key not in cache:
            d = tmp_path_factory.mktemp(f"ckpt-{config}")
            cache[key] = make_checkpoint(d / "hf", config=config, **kw)
        return cache[key]
    return get


class RecordingDraws:
    """Our draws, recorded in call order so that the reference's torch.randint / torch.multinomial replay them."""

    def __init__(self, draws):
        self.draws, self.log = draws, []

    def __call__(self, kind, canvas_index, step, scaled_logits=None):
        ids = self.draws(kind, canvas_index, step, scaled_logits)
        self.log.append((kind, ids))
        return ids

    def replay(self, monkeypatch):
        def next_draw(expected_kinds, shape):
            kind, ids = self.log.pop(0)
            assert kind in expected_kinds
            return torch.from_numpy(ids.copy()).reshape(shape)

        monkeypatch.setattr(torch, "randint", lambda low, high, size, device=None: next_draw(("init", "noise"), size))
        monkeypatch.setattr(torch, "multinomial", lambda probs, num_samples: next_draw(("sample",), (-1, 1)))


@pytest.fixture(params=native.matmul_kernels())
def kernel(request):
    """Run the test with one matmul kernel, then restore the default."""
    before = native.matmul_kernel()
    native.set_matmul_kernel(request.param)
    yield request.param
    native.set_matmul_kernel(before)
