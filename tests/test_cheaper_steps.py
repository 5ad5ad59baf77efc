"""The decoder's cheaper steps (off by default): a head computed for some rows only, which leaves the others as
they were, and self-conditioning from each position's most probable tokens, which with every token is the exact
soft embedding; generation with them runs, and with them off is unchanged."""
import numpy as np
import pytest

from dgguf.core.errors import DggufError
from dgguf.runtime import Model

from conftest import PR_TINY

Q8 = PR_TINY / "tiny-Q8_0.gguf"


@pytest.fixture(scope="module")
def model():
    m = Model.load(Q8, threads=2)
    yield m
    m.close()


def _cache(m, prompt=(2, 5, 9, 11, 300)):
    cache = m.native.new_cache(len(prompt) + m.config.canvas_length)
    cache.encode(np.asarray(prompt, dtype=np.int32))
    return cache


def test_head_rows_computes_flagged_rows_only_and_leaves_the_rest(model):
    cache = _cache(model)
    C, V = model.config.canvas_length, model.config.vocab_size
    canvas = np.arange(20, 20 + C, dtype=np.int32)
    full = cache.decode(canvas, out=np.empty((C, V), np.float32))
    rows = np.zeros(C, bool)
    rows[[0, 3, 4, C - 1]] = True
    out = np.full((C, V), 7.0, np.float32)
    cache.decode(canvas, out=out, head_rows=rows)
    assert np.array_equal(out[rows], full[rows])          # the same bits as the whole head
    assert np.all(out[~rows] == 7.0)                      # the others keep what the buffer held
    none = np.full((C, V), 3.0, np.float32)
    cache.decode(canvas, out=none, head_rows=np.zeros(C, bool))
    assert np.all(none == 3.0)
    with pytest.raises(DggufError, match="head_rows needs out"):
        cache.decode(canvas, head_rows=rows)


def test_self_conditioning_on_every_token_is_the_exact_soft_embedding(model):
    cache = _cache(model)
    C, V = model.config.canvas_length, model.config.vocab_size
    rng = np.random.default_rng(0)
    canvas = rng.integers(0, V, C).astype(np.int32)
    sc = (rng.standard_normal((C, V)) * 2).astype(np.float32)
    exact = cache.decode(canvas, sc)
    assert np.allclose(cache.decode(canvas, sc, sc_top_k=V), exact, atol=2e-4)
    few = cache.decode(canvas, sc, sc_top_k=8)
    assert not np.allclose(few, exact, atol=2e-4)         # an approximation: it moves the logits
    with pytest.raises(DggufError, match="sc_top_k"):
        cache.decode(canvas, sc, sc_top_k=V + 1)


def test_generation_with_cheaper_steps_runs_and_without_them_is_unchanged(model):
    base = model.generate([2, 5, 9], max_new_tokens=32, seed=3, max_denoising_steps=12)
    same = model.generate([2, 5, 9], max_new_tokens=32, seed=3, max_denoising_steps=12, sc_top_k=0, head_reuse=0.0)
    assert same.ids == base.ids
    V = model.config.vocab_size
    # every token, and a threshold no entropy is below: the exact path's ids (the soft embedding's sum order aside)
    close = model.generate([2, 5, 9], max_new_tokens=32, seed=3, max_denoising_steps=12, head_reuse=1e-30)
    assert close.ids == base.ids
    cheap = model.generate([2, 5, 9], max_new_tokens=32, seed=3, max_denoising_steps=12, sc_top_k=16,
                           head_reuse=0.5)
    assert len(cheap.ids) == 32 and all(0 <= i < V for i in cheap.ids)
    for bad, message in (({"sc_top_k": -1}, "sc_top_k"), ({"head_reuse": float("nan")}, "head_reuse")):
        with pytest.raises(DggufError, match=message):
            model.generate([2, 5], max_new_tokens=16, **bad)


def test_head_reuse_skips_settled_rows(model, monkeypatch):
    """The sampler asks for fewer rows once positions settle (a threshold above any entropy: every accepted,
    stable position is settled)."""
    from dgguf.runtime import native_model
    asked = []
    decode = native_model.NativeCache.decode

    def spy(self, ids, sc_logits=None, out=None, sc_top_k=0, head_rows=None):
        asked.append(None if head_rows is None else int(np.count_nonzero(head_rows)))
        return decode(self, ids, sc_logits, out=out, sc_top_k=sc_top_k, head_rows=head_rows)

    monkeypatch.setattr(native_model.NativeCache, "decode", spy)
    model.generate([2, 5, 9], max_new_tokens=16, seed=1, max_denoising_steps=20, early_stop=False, head_reuse=100.0)
    C = model.config.canvas_length
    assert asked[0] is None and len(asked) == 20
    assert min(a for a in asked[1:]) < C       # some steps computed fewer rows than the canvas has
