"""README's quick tour runs as written: every ```sh block's commands and every ```python block, in order, from the
repository's root (the ```bash set-up blocks make virtual environments and are what CI itself runs)."""
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def blocks(kind: str) -> list[str]:
    return re.findall(rf"^```{kind}\n(.*?)^```", (ROOT / "README.md").read_text(), flags=re.M | re.S)


def test_readme_has_a_tour():
    assert len(blocks("sh")) >= 5 and len(blocks("python")) >= 1


def test_readme_tour_runs_as_written():
    commands = [line for block in blocks("sh") for line in block.splitlines() if line.strip()]
    for line in commands:
        argv = shlex.split(line)
        assert argv[0] == "dgguf", line
        r = subprocess.run([sys.executable, "-m", "dgguf.cli", *argv[1:]], cwd=ROOT, capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 0, f"{line}\n{r.stderr}"
        assert "Traceback" not in r.stderr
    for code in blocks("python"):
        r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"{code}\n{r.stderr}"
