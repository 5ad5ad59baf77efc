"""The hybrid executor (native/executor.c) on the host backend (native/backend_host.c): the GPU placement machinery
proven without a GPU.

For every placement the planner produces for models/small (and a few mixed ones, as -ngl / --n-cpu-moe give) and
three on the mid shape: the executor's logits equal the CPU forward's bit for bit (f32 KV cache; the host backend
runs the same CPU kernels in model.c's order); its device allocations equal the plan's groups to the byte and fill
a budget of exactly that many bytes (one byte less fails); and each pass copies exactly the bytes the planner's
pass_traffic says.
"""
import json
import shutil

import numpy as np
import pytest
from conftest import FIXTURES, ROOT, _load_script
from dgguf.core._native import lib
from dgguf.core.errors import DggufError
from dgguf.runtime import Model
from dgguf.runtime import gpu
from dgguf.runtime import planner as P

CPU = P.CpuSpeed(100, 100, 20, "given")
GIB = 1 << 30


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    from dgguf.convert.quantize import convert_checkpoint
    out = tmp_path_factory.mktemp("small") / "small-Q8_0.gguf"
    return convert_checkpoint(ROOT / "models" / "small", out, "Q8_0")


@pytest.fixture(scope="module")
def mid(tmp_path_factory):
    """The mid shape of scripts/bench_step.py (hidden 1024, vocabulary 32768, 6 layers, 32 experts top 4, sliding and
    full layers of different head dims) at Q4_K_M with random weights, canvas 64."""
    synthetic, real_shape = _load_script("synthetic"), _load_script("real_shape")
    d = tmp_path_factory.mktemp("mid")
    text = synthetic.text_config(vocab=32768, hidden=1024, dense=768, expert=256, layers=6, heads=16, kv=4,
                                 head_dim=128, global_kv=1, global_head_dim=256, experts=32, top_k=4, window=48)
    (d / "config.json").write_text(json.dumps({"architectures": ["DiffusionGemmaForBlockDiffusion"],
                                               "model_type": "diffusion_gemma", "canvas_length": 64,
                                               "eos_token_id": [1], "text_config": text}))
    shutil.copy(FIXTURES / "pr24423-tiny" / "hf" / "generation_config.json", d / "generation_config.json")
    return real_shape.write_real_shape(d, "Q4_K_M", d / "mid-Q4_K_M.gguf", progress=False, block_rows=8)


def test_planner_uses_the_executors_constants():
    assert (P.ALIGN, P.MOE_CHUNK, P.SOFT_SLICES) == (lib.DG_EXEC_ALIGN, lib.DG_EXEC_MOE_CHUNK,
                                                     lib.DG_EXEC_SOFT_SLICES)


def planner_layouts(pm, ctx):
    """Every placement make_plan gives for this model over a sweep of budgets, with offload auto, cpu and stream,
    as (plan, layers); a few explicit mixed placements besides."""
    n = pm.shape.n_layers
    base = P.make_plan(pm, 80 * GIB, "h100", ctx=ctx, cpu=CPU, reserve=0, kv_type="f32")
    floor = base.vram_bytes - sum(g.bytes for g in base.groups if g.name.endswith(".experts"))
    seen = {}
    for mode in ("auto", "cpu", "stream"):
        for extra in np.linspace(0, base.vram_bytes - floor + 2 * max(g.bytes for g in base.groups), 24):
            try:
                plan = P.make_plan(pm, int(floor + extra), "h100", ctx=ctx, cpu=CPU, reserve=0, offload=mode,
                                   kv_type="f32")
            except DggufError:
                continue
            seen.setdefault(tuple(plan.layers), plan)
    for layers in (["cpu"] + ["gpu"] * (n - 1), ["gpu", "stream"] * (n // 2) + ["cpu"] * (n % 2),
                   ["stream", "cpu"] * (n // 2) + ["gpu"] * (n % 2)):
        seen.setdefault(tuple(layers), P.make_plan(pm, 80 * GIB, "h100", ctx=ctx, cpu=CPU, reserve=0,
                                                   layers=list(layers), kv_type="f32"))
    return seen


def reference(m, prompt, canvas, pieces):
    """The CPU forward: the prompt encoded in the executor's pieces, two decoder passes (no sc, then sc)."""
    cache = m.native.new_cache(len(prompt) + 8)
    for a, b in pieces:
        cache.encode(prompt[a:b])
    first = cache.decode(canvas).copy()
    sc = (first / np.float32(0.8)).astype(np.float32)
    return first, sc, cache.decode(canvas, sc).copy()


def run_on_executor(m, plan, prompt, canvas, sc, kv="f32", budget=None):
    native = m.native
    backend = gpu.Backend.host(plan.device_bytes if budget is None else budget, 2)
    dm = gpu.DeviceModel(native, backend, plan.layers, kv)
    gpu.check_against_plan(dm, plan)
    cache = dm.new_cache(plan.ctx)
    stats = backend.stats()
    assert stats["allocated"] == stats["peak"] == plan.device_bytes        # exactly the plan, nothing transient
    cache.encode(prompt)
    enc = (dm.stats()["pass_h2d"], dm.stats()["pass_d2h"])
    first = cache.decode(canvas).copy()
    dec1 = (dm.stats()["pass_h2d"], dm.stats()["pass_d2h"])
    second = cache.decode(canvas, sc).copy()
    dec2 = (dm.stats()["pass_h2d"], dm.stats()["pass_d2h"])
    assert backend.stats()["peak"] == plan.device_bytes
    return first, second, enc, dec1, dec2


def expected_encode_traffic(pm, layers, n, T):
    up = down = 0
    for a in range(0, n, T):
        u, d = P.pass_traffic(pm, layers, min(T, n - a), decoder=False)
        up, down = up + u, down + d
    return up, down


@pytest.mark.parametrize("which", ["small", "mid"])
def test_every_planner_placement_gives_the_cpu_logits_and_the_planned_bytes(request, which):
    path = request.getfixturevalue(which)
    m = Model.load(path, threads=2, ctx=512)
    try:
        pm = P.model_from_gguf(path)
        C, V = m.config.canvas_length, m.config.vocab_size
        rng = np.random.default_rng(1)
        prompt = rng.integers(3, V, C + C // 2 + 3).astype(np.int32)     # more than a pass: encoded in two pieces
        canvas = rng.integers(3, V, C).astype(np.int32)
        pieces = [(0, C), (C, len(prompt))]
        first, sc, second = reference(m, prompt, canvas, pieces)
        layouts = planner_layouts(pm, ctx=len(prompt) + 8)
        if which == "mid":   # three placements: resident, CPU and streamed layers mixed, all streamed
            n = pm.shape.n_layers
            keep = [tuple(["gpu"] * n), tuple(["gpu", "cpu", "stream"] * (n // 3)), tuple(["stream"] * n)]
            layouts = {k: layouts.get(k) or P.make_plan(pm, 80 * GIB, "h100", ctx=len(prompt) + 8, cpu=CPU,
                                                        reserve=0, layers=list(k), kv_type="f32") for k in keep}
        else:
            modes = {w for k in layouts for w in k}
            assert modes == {"gpu", "cpu", "stream"} and len(layouts) >= 9
        for layers, plan in layouts.items():
            g1, g2, enc, dec1, dec2 = run_on_executor(m, plan, prompt, canvas, sc)
            assert np.array_equal(g1, first) and np.array_equal(g2, second), layers
            assert enc == expected_encode_traffic(pm, plan.layers, len(prompt), C), layers
            assert dec1 == P.pass_traffic(pm, plan.layers, C, True, sc=False), layers
            assert dec2 == P.pass_traffic(pm, plan.layers, C, True, sc=True) == \
                (plan.step_h2d_bytes, plan.step_d2h_bytes), layers
    finally:
        m.close()


def test_the_budget_is_enforced_to_the_byte(small):
    m = Model.load(small, threads=1, ctx=128)
    try:
        pm = P.model_from_gguf(small)
        plan = P.make_plan(pm, 80 * GIB, "h100", ctx=128, cpu=CPU, reserve=0,
                           layers=["gpu", "stream", "cpu", "stream"], kv_type="f32")
        backend = gpu.Backend.host(plan.device_bytes - 1, 1)
        with pytest.raises(DggufError, match=r"device budget exceeded: \d+ bytes held \+ \d+ requested > budget"):
            dm = gpu.DeviceModel(m.native, backend, plan.layers, "f32")
            dm.new_cache(128)
        assert backend.stats()["allocated"] < plan.device_bytes
    finally:
        m.close()


def test_f16_cache_stays_close_and_truncation_matches_the_cpu(small):
    m = Model.load(small, threads=2, ctx=128)
    try:
        pm = P.model_from_gguf(small)
        C, V = m.config.canvas_length, m.config.vocab_size
        rng = np.random.default_rng(2)
        prompt = rng.integers(3, V, 60).astype(np.int32)
        canvas = rng.integers(3, V, C).astype(np.int32)
        layers = ["gpu", "cpu", "stream", "gpu"]
        ref = m.native.new_cache(128)
        ref.encode(prompt[:32])
        ref.encode(prompt[32:])
        ref.truncate(50)
        want = ref.decode(canvas).copy()
        for kv in ("f32", "f16"):
            plan = P.make_plan(pm, 80 * GIB, "h100", ctx=128, cpu=CPU, reserve=0, layers=layers, kv_type=kv)
            dm = gpu.DeviceModel(m.native, gpu.Backend.host(plan.device_bytes, 2), layers, kv)
            gpu.check_against_plan(dm, plan)
            c = dm.new_cache(128)
            c.encode(prompt)
            c.truncate(50)
            assert c.length == 50
            got = c.decode(canvas)
            if kv == "f32":
                assert np.array_equal(got, want)
            else:   # K/V rounded to half: close, not equal
                err = np.abs(got - want).max() / np.abs(want).max()
                assert 0 < err < 1e-2
                assert (got.argmax(1) == want.argmax(1)).mean() > 0.9
    finally:
        m.close()


def test_use_device_runs_generation_like_the_cpu(small):
    cpu = Model.load(small, threads=1, ctx=256)
    dev = Model.load(small, threads=1, ctx=256)
    try:
        pm = P.model_from_gguf(small)
        plan = P.make_plan(pm, 12 << 20, "rtx3060", ctx=256, cpu=CPU, reserve=0, kv_type="f32", offload="stream")
        assert plan.offload == "stream" and plan.vram_bytes <= 12 << 20
        gpu.use_device(dev, "host", plan)
        a = cpu.generate([2, 5, 6, 7], max_new_tokens=64, seed=3, max_denoising_steps=6)
        b = dev.generate([2, 5, 6, 7], max_new_tokens=64, seed=3, max_denoising_steps=6)
        assert a.ids == b.ids
        assert np.array_equal(cpu.canvas_logits([2, 5, 6], [9, 10, 11]), dev.canvas_logits([2, 5, 6], [9, 10, 11]))
    finally:
        cpu.close()
        dev.close()


def test_a_plan_the_executor_disagrees_with_is_an_internal_error(small):
    m = Model.load(small, threads=1, ctx=64)
    try:
        plan = P.make_plan(P.model_from_gguf(small), 80 * GIB, "h100", ctx=64, cpu=CPU, reserve=0, kv_type="f32")
        dm = gpu.DeviceModel(m.native, gpu.Backend.host(0, 1), plan.layers, "f32")
        plan.groups[1] = P.Group("embedding", plan.groups[1].bytes + 256, "gpu")
        with pytest.raises(DggufError, match="internal error: the executor's device bytes differ from the plan's"):
            gpu.check_against_plan(dm, plan)
    finally:
        m.close()


def test_cheaper_steps_on_the_executor_equal_the_cpu_paths(small):
    """sc_top_k and head_rows (dg_decode's cheaper steps) through the executor: the same bits, and only the flagged
    rows' logits cross."""
    m = Model.load(small, threads=2, ctx=128)
    try:
        pm = P.model_from_gguf(small)
        C, V = m.config.canvas_length, m.config.vocab_size
        rng = np.random.default_rng(4)
        prompt = rng.integers(3, V, 40).astype(np.int32)
        canvas = rng.integers(3, V, C).astype(np.int32)
        sc = rng.standard_normal((C, V)).astype(np.float32)
        rows = rng.random(C) < 0.3
        ref = m.native.new_cache(128)
        ref.encode(prompt)
        want = np.full((C, V), 7.0, dtype=np.float32)
        ref.decode(canvas, sc, out=want, sc_top_k=5, head_rows=rows)
        layers = ["stream", "cpu", "gpu", "stream"]
        plan = P.make_plan(pm, 80 * GIB, "h100", ctx=128, cpu=CPU, reserve=0, layers=layers, kv_type="f32")
        dm = gpu.DeviceModel(m.native, gpu.Backend.host(plan.device_bytes, 2), layers, "f32")
        c = dm.new_cache(128)
        c.encode(prompt)
        got = np.full((C, V), 7.0, dtype=np.float32)
        c.decode(canvas, sc, out=got, sc_top_k=5, head_rows=rows)
        assert np.array_equal(got, want) and (got[~rows] == 7.0).all()
        st = dm.stats()
        assert (st["pass_h2d"], st["pass_d2h"]) == P.pass_traffic(pm, layers, C, True, sc=True,
                                                                   logits_rows=int(rows.sum()))
    finally:
        m.close()
