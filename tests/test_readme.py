"""README's quick tour runs as written: every ```sh block's commands and every ```python block, in order, from the
repository's root (the ```bash set-up blocks make virtual environments and are what CI itself runs). A command
ending in `&` (the server) runs in the background until the end, once it answers on /health."""
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def blocks(kind: str) -> list[str]:
    return re.findall(rf"^```{kind}\n(.*?)^```", (ROOT / "README.md").read_text(), flags=re.M | re.S)


def test_readme_has_a_tour():
    assert len(blocks("sh")) >= 5 and len(blocks("python")) >= 1


def _wait_for_health(port: int, p: subprocess.Popen) -> None:
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"the server did not come up: {p.stderr.read() if p.poll() is not None else 'timeout'}")


def test_readme_tour_runs_as_written():
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    background = []
    try:
        for kind, code in re.findall(r"^```(sh|python)\n(.*?)^```", (ROOT / "README.md").read_text(),
                                     flags=re.M | re.S):
            if kind == "python":
                r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                                   timeout=600)
                assert r.returncode == 0, f"{code}\n{r.stderr}"
                continue
            for line in filter(str.strip, code.splitlines()):
                assert line.startswith(("dgguf ", "curl ")), line
                if line.endswith("&"):
                    p = subprocess.Popen(["bash", "-c", line[:-1]], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.PIPE, text=True)
                    background.append(p)
                    _wait_for_health(int(re.search(r"--port (\d+)", line).group(1)), p)
                    continue
                r = subprocess.run(["bash", "-c", line], cwd=ROOT, env=env, capture_output=True, text=True,
                                   timeout=600)
                assert r.returncode == 0 and "Traceback" not in r.stderr, f"{line}\n{r.stderr}"
    finally:
        for p in background:
            p.terminate()
            p.wait(timeout=30)
