"""`dgguf run --visual` in a real terminal (tmux): the canvas is wrapped to the terminal's width and redrawn in
place, settled and changing positions are told apart, and token bytes never reach the terminal as controls."""
import re
import shutil
import subprocess
import sys
import time

import pytest

from dgguf.cli.visual import shown, width, wrap

from conftest import PR_TINY

TMUX = shutil.which("tmux")


def test_tokens_are_shown_with_every_control_escaped():
    assert shown("a\nb\tc\x1b[2J\x00\u200b") == "a\u21b5b\u2192c\\x1b[2J\\x00\\u200b"
    assert width("ab\u4e2d\u0301") == 4            # a wide CJK character takes two columns, a combining mark none
    rows = wrap([("", "abc"), ("", "de"), ("", "\u4e2d\u4e2d"), ("", "x" * 30)], 6)
    assert [sum(width(t) for _, t in r) for r in rows] == [5, 4, 6]


@pytest.mark.skipif(TMUX is None, reason="tmux not installed: the terminal test did not run")
def test_visual_redraws_in_place_within_the_terminal(tmp_path):
    session = f"dgguf-visual-{time.time_ns()}"
    done = tmp_path / "done"
    cmd = (f"{sys.executable} -m dgguf.cli run -m {PR_TINY / 'tiny-Q4_K_M.gguf'} -p hello -n 160 -s 1 "
           f"--steps 40 --no-early-stop --visual; echo EXIT=$? > {done}; sleep 30")
    subprocess.run([TMUX, "new-session", "-d", "-s", session, "-x", "60", "-y", "20", cmd], check=True)
    try:
        frames = []
        deadline = time.time() + 120
        while not done.exists() and time.time() < deadline:
            frames.append(subprocess.run([TMUX, "capture-pane", "-p", "-e", "-t", session], capture_output=True,
                                         text=True).stdout)
            time.sleep(0.05)
        final = subprocess.run([TMUX, "capture-pane", "-p", "-t", session], capture_output=True, text=True).stdout
    finally:
        subprocess.run([TMUX, "kill-session", "-t", session], check=False)
    assert done.read_text().strip() == "EXIT=0"
    live = [f for f in frames if "[canvas" in f]
    assert len(live) >= 3, "the view was never seen while generating"
    assert any(len([line for line in f.split("\n") if line.strip()]) >= 2 for f in live)   # wrapped, not one line
    for f in live:
        plain = subprocess.run(["sed", "s/\x1b\\[[0-9;]*m//g"], input=f, capture_output=True, text=True).stdout
        lines = plain.split("\n")
        assert sum("[canvas" in line for line in lines) == 1, plain   # redrawn in place: one view at a time
        assert len([line for line in lines if line.strip()]) < 20     # never more rows than the terminal has
        assert re.search(r"\x1b\[(?:\d+;)*(?:32|2)m", f)                # settled (green) / changing (dim) shown
    # at the end the view is gone: the prompt, the text and the summary remain
    assert "[canvas" not in final and "hello" in final and "160 tokens" in final
