"""`dgguf run` as a llama.cpp user drives it, on the published-layout fixtures (PR #24423's converter wrote them;
they carry llama.cpp's vocabulary, no HF tokenizer JSON): text in and out, streaming, Ctrl-C, llama.cpp's flag
spellings, and one-line errors."""
import json
import os
import select
import signal
import subprocess
import sys
import time

import pytest
from tokenizers import Tokenizer

from dgguf.cli import main
from dgguf.runtime import Model

from conftest import PR_TINY

Q4 = str(PR_TINY / "tiny-Q4_K_M.gguf")
CMD = [sys.executable, "-m", "dgguf.cli"]


def run_cli(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_published_file_main_job_prints_text(capsys):
    code, out, err = run_cli(capsys, "run", "-m", Q4, "-p", "hello", "-n", "32", "--seed", "5")
    assert code == 0
    assert out.startswith("hello") and len(out) > len("hello\n")
    assert "32 tokens" in err and "seed 5" in err


def test_published_file_tokenizer_is_the_checkpoints():
    hf = Tokenizer.from_file(str(PR_TINY / "hf" / "tokenizer.json"))
    m = Model.load(Q4)
    try:
        text = "def add(a, b):\n    return a + b  # <|turn>user\n"
        assert m.tokenizer.encode(text) == [2] + hf.encode(text, add_special_tokens=False).ids
        assert m.tokenizer.source.startswith("llama.cpp vocabulary (gemma4 BPE")
    finally:
        m.close()


def test_json_has_the_seed_and_no_pads(capsys):
    code, out, _ = run_cli(capsys, "run", "-m", Q4, "-p", "hello", "-n", "20", "-s", "7", "--json")
    d = json.loads(out)
    assert code == 0 and d["seed"] == 7 and len(d["ids"]) == 20 and not d["interrupted"]
    code, again, _ = run_cli(capsys, "run", "-m", Q4, "-p", "hello", "-n", "20", "--seed", "7", "--json")
    assert json.loads(again)["ids"] == d["ids"]   # the printed seed reproduces the run


def test_random_seed_is_printed_and_reproduces(capsys):
    _, out, _ = run_cli(capsys, "run", "-m", Q4, "-p", "hi", "-n", "16", "--json")
    d = json.loads(out)
    _, again, _ = run_cli(capsys, "run", "-m", Q4, "-p", "hi", "-n", "16", "--json", "-s", str(d["seed"]))
    assert json.loads(again)["ids"] == d["ids"]


def test_llama_cpp_spellings_are_accepted(capsys, tmp_path):
    prompt = tmp_path / "p.txt"
    prompt.write_text("hello")
    code, out, _ = run_cli(capsys, "run", "-m", Q4, "-f", str(prompt), "-n", "16", "-s", "3", "-t", "1",
                           "-c", "512", "--temp", "0.6", "-ngl", "0", "--no-echo")
    assert code == 0 and not out.startswith("hello")
    code, ref, _ = run_cli(capsys, "run", "-m", Q4, "--prompt", "hello", "--n-predict", "16", "--seed", "3",
                           "--threads", "1", "--ctx-size", "512", "--temp", "0.6", "--n-gpu-layers", "0", "--no-echo")
    assert code == 0 and ref == out


def test_temp_maps_onto_the_schedule():
    from dgguf.cli.run import NEAR_GREEDY, sampler_overrides

    class A:
        steps = None
        temp = 0.6
    m = Model.load(Q4)
    try:
        o = sampler_overrides(m, A)
        sc = m.sampler_config()
        assert o["t_max"] == 0.6 and o["t_min"] == pytest.approx(0.6 * sc.t_min / sc.t_max)
        A.temp = 0.0
        assert sampler_overrides(m, A)["t_max"] == NEAR_GREEDY
        A.temp = None
        assert sampler_overrides(m, A) == {}
    finally:
        m.close()


def test_prompt_from_stdin():
    r = subprocess.run(CMD + ["run", "-m", Q4, "-f", "-", "-n", "16", "-s", "1"], input="hello from stdin",
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("hello from stdin")


@pytest.mark.parametrize("args, message", [
    (["-p", "x", "-ngl", "99"], "-ngl/--n-gpu-layers and --n-cpu-moe"),
    (["-p", "x", "--n-cpu-moe", "4"], "-ngl/--n-gpu-layers and --n-cpu-moe"),
    (["--prompt-ids", "2,3", "--chat"], "cannot go with --chat"),
    (["-p", "x", "--temp", "-1"], "--temp must be a number >= 0"),
    (["-p", "x", "-n", "0"], "-n must be an integer"),
    (["-f", "/nonexistent/prompt.txt"], "cannot read the prompt file"),
    (["-p", "x", "-s", "-2"], "--seed must be an integer"),
])
def test_bad_values_are_one_line_errors(args, message):
    r = subprocess.run(CMD + ["run", "-m", Q4, *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
    assert [line for line in r.stderr.splitlines() if line.startswith("error:")] == [r.stderr.splitlines()[-1]]


def test_no_prompt_is_an_error(capsys):
    code, _, err = run_cli(capsys, "run", "-m", Q4)
    assert code == 2 and "give a prompt" in err


def test_unknown_flag_gets_a_suggestion():
    r = subprocess.run(CMD + ["run", "-m", Q4, "-p", "x", "--thrads", "2"], capture_output=True, text=True)
    assert r.returncode == 2 and "did you mean --threads?" in r.stderr and "Traceback" not in r.stderr


def test_debug_anywhere_and_version():
    r = subprocess.run(CMD + ["run", "-m", "/nonexistent.gguf", "-p", "x", "--debug"], capture_output=True,
                       text=True)
    assert r.returncode != 0 and "Traceback" in r.stderr            # --debug after the command: tracebacks
    r = subprocess.run(CMD + ["run", "-m", "/nonexistent.gguf", "-p", "x"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr
    r = subprocess.run(CMD + ["--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("dgguf ") and "CPU features" in r.stdout


def test_help_shows_defaults():
    r = subprocess.run(CMD + ["run", "--help"], capture_output=True, text=True)
    assert "(default: 256)" in r.stdout and "(default: -1)" in r.stdout and "--threads" in r.stdout
    assert f"(default: {len(os.sched_getaffinity(0))})" in r.stdout


def _start(*args):
    return subprocess.Popen(CMD + ["run", "-m", Q4, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _read_until(p, n_bytes=None, marker=None, stream="stdout", timeout=60):
    """Read stdout (or stderr) as it arrives until n_bytes have come or marker has appeared; (bytes, whether the
    process was still running)."""
    pipe = getattr(p, stream)
    got, deadline = b"", time.time() + timeout
    while (len(got) < n_bytes if marker is None else marker not in got) and time.time() < deadline:
        ready, _, _ = select.select([pipe], [], [], 0.05)
        if ready:
            chunk = os.read(pipe.fileno(), 65536)
            if not chunk:
                break
            got += chunk
    return got, p.poll() is None


def test_text_is_streamed_canvas_by_canvas():
    # 16-token canvases, 60 forced steps each: ~40 canvases take several seconds; text must arrive before the end.
    p = _start("-p", "hello", "-n", "640", "-s", "1", "--steps", "60", "--no-early-stop")
    got, running = _read_until(p, len(b"hello") + 1)
    rest, _ = p.communicate(timeout=300)
    assert got.startswith(b"hello") and len(got) > len(b"hello")
    assert running, "generated text arrived only after the process ended"
    assert p.returncode == 0 and len(got + rest) > len(got)


def test_ctrl_c_keeps_committed_text_and_exits_130():
    p = _start("-p", "hello", "-n", "960", "-s", "1", "--steps", "60", "--no-early-stop")
    got, running = _read_until(p, len(b"hello") + 1)
    assert running
    p.send_signal(signal.SIGINT)
    rest, err = p.communicate(timeout=120)
    assert p.returncode == 130
    out = (got + rest).decode("utf-8", "replace")
    assert out.startswith("hello") and len(out) > len("hello")
    assert b"interrupted after" in err and b"Traceback" not in err
    n = int(err.decode().split("interrupted after ")[1].split()[0])
    assert 0 < n < 960 and n % 16 == 0   # whole canvases


def test_ctrl_c_in_json_mode_prints_what_was_committed():
    p = _start("-p", "hello", "-n", "960", "-s", "1", "--steps", "60", "--no-early-stop", "--json",
               "--visual")
    _, running = _read_until(p, marker=b"[canvas 1,", stream="stderr")   # a canvas committed, 58 to go
    assert running
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    d = json.loads(out)
    assert d["interrupted"] and len(d["ids"]) % 16 == 0 and d["seed"] == 1


def test_chat_prompt_is_the_templates_and_a_conversation_reuses_its_cache(monkeypatch):
    from transformers import PreTrainedTokenizerFast

    from dgguf.runtime.model import Context
    hf = PreTrainedTokenizerFast(tokenizer_file=str(PR_TINY / "hf" / "tokenizer.json"), bos_token="<bos>",
                                 eos_token="<eos>")
    hf.chat_template = json.loads((PR_TINY / "hf" / "tokenizer_config.json").read_text())["chat_template"]
    m = Model.load(Q4)
    try:
        messages = [{"role": "user", "content": "hello there"}]
        expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert m.chat_prompt(messages) == [2] + hf.encode(expected, add_special_tokens=False)
        encoded = []
        sync = Context.sync
        monkeypatch.setattr(Context, "sync", lambda self, p: encoded.append(sync(self, p)) or encoded[-1])
        ctx = m.new_context()
        first = m.chat(messages, context=ctx, max_new_tokens=16, seed=1)
        assert isinstance(first.reply.content, str) and first.ids
        # (this template writes the role as given, and its generation prompt says "model")
        turn2 = messages + [{"role": "model", "content": first.reply.content},
                            {"role": "user", "content": "and again"}]
        second = m.chat(turn2, context=ctx, max_new_tokens=16, seed=2)
        assert encoded[0] == len(m.chat_prompt(messages))
        # nothing held is encoded again: the first prompt and the reply's first canvases keep their ids, and only
        # the reply's last canvas and the new turn are encoded
        prompt2 = m.chat_prompt(turn2, context=ctx)
        held = len(m.chat_prompt(messages)) + 16 * (len(first.stats.steps_per_canvas) - 1)
        assert ctx.ids[:len(prompt2)] == prompt2 and encoded[1] == len(prompt2) - held
        assert m.tokenizer.decode(prompt2, special=True) == m.tokenizer.decode(m.chat_prompt(turn2), special=True)
        assert second.ids
    finally:
        m.close()


def test_interactive_mode_answers_each_line():
    r = subprocess.run(CMD + ["run", "-m", Q4, "-i", "-n", "16", "-s", "1"], input="hello\nand again\n\n",
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("16 tokens") == 2 and "chat template" in r.stderr and "Traceback" not in r.stderr


def test_chat_flag_renders_the_template(capsys):
    code, out, err = run_cli(capsys, "run", "-m", Q4, "--chat", "-p", "hello", "-n", "16", "-s", "1",
                             "--system", "be brief")
    assert code == 0 and "16 tokens" in err and not out.startswith("<|turn>")   # the template is not echoed


def test_run_notes_a_busy_machine(capsys, monkeypatch):
    monkeypatch.setattr(os, "getloadavg", lambda: (7.5, 7.0, 6.0))
    code, _, err = run_cli(capsys, "run", "-m", Q4, "-p", "hi", "-n", "16", "-s", "1")
    assert code == 0 and "note: load average 7.5" in err
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    code, _, err = run_cli(capsys, "run", "-m", Q4, "-p", "hi", "-n", "16", "-s", "1")
    assert code == 0 and "load average" not in err
