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
