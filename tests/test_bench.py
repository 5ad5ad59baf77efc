"""What the benchmarks measure with: the foreign-load check (sees another process's work and not this process's
own), the peak loops of native/peak.c (every round runs: their exact sums), the read-bandwidth sum, and the
one-token byte count."""
import subprocess
import sys
import time

import numpy as np
import pytest

from dgguf.core import native
from dgguf.core.errors import DggufError
from dgguf.runtime.bench import foreign_load

# The instruction kinds each kernel has a peak loop for (the kernels' own instructions; none for the references).
PEAK_KINDS = {"avx2": {"fp32"}, "int8-avx2": {"fp32", "int8"}, "avx512": {"fp32"},
              "int8-avx512vnni": {"fp32", "int8"}, "int8-avx512bf16": {"fp32", "int8", "bf16"}}


def test_foreign_load_counts_a_busy_child_process():
    child = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)                      # let it start spinning
        load = foreign_load(1.0)
    finally:
        child.kill()
        child.wait()
    assert load is not None and load >= 0.5   # one spinning process is ~1 core


def test_foreign_load_excludes_this_process():
    import threading
    stop = threading.Event()
    before = foreign_load(0.5)
    spinner = threading.Thread(target=lambda: [None for _ in iter(stop.is_set, True)])
    spinner.start()
    try:
        during = foreign_load(1.0)
    finally:
        stop.set()
        spinner.join()
    assert during < before + 0.5             # our own spinning thread (~1 core) is not foreign load


def test_foreign_load_is_unknown_without_os_sysconf(monkeypatch):
    """Windows has no os.sysconf (nor /proc/stat): the load is unknown, and the note says so."""
    from dgguf.runtime.bench import load_note
    monkeypatch.delattr("os.sysconf")
    assert foreign_load(0.01) is None
    assert "unknown" in load_note(0.01)


def test_one_token_bytes_counts_top_k_experts_and_only_the_last_layers_kv(checkpoints, tmp_path):
    """Against the file's own tensor sizes: every layer but the last whole (its experts scaled by top_k / E), the
    last layer's K/V projections and norms, one embedding row; nothing from the head or self-conditioning."""
    from dgguf.format.gguf_file import read_gguf
    from dgguf.convert.quantize import convert_checkpoint
    from dgguf.runtime.bench import one_token_bytes
    from dgguf.runtime.model_config import read_model_config
    g = read_gguf(convert_checkpoint(checkpoints("tiny"), tmp_path / "t.gguf", "Q8_0"))
    c = read_model_config(g)
    size = {t.name: t.nbytes for t in g.tensors}
    last = c.n_layers - 1
    layers = sum(n for name, n in size.items() if name.startswith("blk.") and not name.startswith(f"blk.{last}.")
                 and "_exps." not in name)
    experts = sum(n for name, n in size.items() if "_exps." in name and not name.startswith(f"blk.{last}."))
    kv = sum(size.get(f"blk.{last}.{n}.weight", 0) for n in ("attn_norm", "attn_k", "attn_v", "attn_k_norm"))
    assert c.top_k < c.n_experts and kv > 0
    got = one_token_bytes(g, c)
    assert abs(got - (layers + experts * c.top_k / c.n_experts + kv + size["token_embd.weight"] / c.vocab_size)) \
        < 2 * c.n_layers


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_peak_loops_run_every_round_on_every_thread(kernel, threads):
    """Each multiply-add adds 1 x 1 to its lane, so the lanes sum to the multiply-adds done, ops / 2; the kinds a
    kernel lacks are a clear error."""
    for kind in native.PEAK_KINDS:
        if kind in PEAK_KINDS.get(kernel, set()):
            for rounds in (1, 1000):
                ops, check = native.peak(kind, rounds, threads)
                assert check == ops / 2 and ops > 0, (kind, rounds)
                assert native.peak(kind, 2 * rounds, threads)[0] == 2 * ops   # ops scale with the rounds
        else:
            with pytest.raises(DggufError, match=f"no {kind} instruction under the {kernel} kernel"):
                native.peak(kind, 10, threads)


def test_peak_rejects_bad_rounds_threads_and_kinds():
    for rounds, threads in ((0, 1), ((1 << 22) + 1, 1), (10, 0), (10, 257)):
        with pytest.raises(DggufError, match="out of range"):
            native.peak("fp32", rounds, threads)
    with pytest.raises(DggufError, match="no fp64 instruction"):
        native.peak("fp64", 10, 1)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_read_words_sums_every_word_mod_2_64(threads):
    rng = np.random.default_rng(threads)
    for n in (0, 1, 7, 1001, 100_003):
        words = rng.integers(0, 2**64, n, dtype=np.uint64)
        assert native.read_words(words, threads) == int(sum(int(w) for w in words)) % 2**64, n
    with pytest.raises(DggufError, match="uint64"):
        native.read_words(np.ones(8, dtype=np.int64), threads)


@pytest.mark.parametrize("file_type", ["Q8_0", "BF16", "F32"])
def test_step_floor_takes_each_part_at_the_peak_of_the_instructions_that_run_it(checkpoints, tmp_path, kernel,
                                                                               file_type):
    """Peaks 1, 2 and 4 GOP/s for int8, bf16 and fp32 tell which one each part was divided by."""
    from dgguf.format.gguf_file import read_gguf
    from dgguf.convert.quantize import convert_checkpoint
    from dgguf.runtime.bench import step_floor
    g = read_gguf(convert_checkpoint(checkpoints("tiny"), tmp_path / "t.gguf", file_type, pure=True))
    parts = {"matmul": 3e9, "soft_embed": 5e9, "attention": 7e9}
    peaks = {"int8": 1.0, "bf16": 2.0, "fp32": 4.0, "read": 1.0}
    bf16 = "bf16" in kernel
    quantized = file_type == "Q8_0"
    matmul_peak = 1.0 if kernel.startswith("int8") and quantized else 2.0 if bf16 and file_type == "BF16" else 4.0
    soft_peak = 2.0 if bf16 and file_type != "F32" else 4.0
    floor = step_floor(g, parts, peaks)
    assert floor == {"matmuls": 6 / matmul_peak, "soft embedding": 10 / soft_peak, "attention": 7 / 2 + 7 / 4}
    assert step_floor(g, parts, {**peaks, "fp32": None}) is None


def test_dgguf_bench_reports_the_vocabulary_parts_first_steps_and_anonymous_memory(capsys):
    import json

    from dgguf.cli import main
    from conftest import PR_TINY
    assert main(["bench", "-m", str(PR_TINY / "tiny-Q8_0.gguf"), "--repeats", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["part_seconds"]) == {"head", "soft embedding", "sampler"}
    assert all(v > 0 for v in out["part_seconds"].values())
    assert out["seconds_first_step_warm"] > 0 and out["seconds_first_step_cold"] > 0
    # the canvas buffers and the cache are anonymous; the weights stay in the mapping and are not counted
    assert 0 < out["rss_anon_bytes"] < 2**31
