"""The benchmarks' foreign-load check sees another process's work and not this process's own."""
import subprocess
import sys
import time

from dgguf.runtime.bench import foreign_load


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


def test_one_token_bytes_counts_top_k_experts_and_only_the_last_layers_kv(checkpoints, tmp_path):
    """Against the file's own tensor sizes: every layer but the last whole (its experts scaled by top_k / E), the
    last layer's K/V projections and norms, one embedding row; nothing from the head or self-conditioning."""
    from dgguf.convert.gguf_file import read_gguf
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
