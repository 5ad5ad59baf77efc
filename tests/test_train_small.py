"""scripts/train_small.py on a tiny corpus the test writes itself: a few steps train, a resumed run ends with the
same bytes as an uninterrupted one, the manifest pins the files, and the result converts and generates."""
import json
import math

import pytest

from conftest import _load_script
from dgguf.convert.quantize import convert_checkpoint
from dgguf.runtime import Model

train_small = _load_script("train_small")

N_FILES = 12  # file 10 (sorted) is held out


def corpus_file(i: int) -> str:
    """Small Python-like modules that differ from each other (names, constants, structure)."""
    lines = [f'"""Module {i}: helpers for shapes number {i}."""', "", "import math", ""]
    for k in range(6):
        lines += [f"def area_{i}_{k}(width, height=1.0):",
                  f"    '''Area of shape {k} scaled by {i + k}.'''",
                  f"    if width < {k}:",
                  "        return 0.0",
                  f"    return width * height * {i + k} + math.sqrt({k + 1})", ""]
    lines += [f"class Shape{i}:", "    def __init__(self, size):", "        self.size = size", ""]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    for i in range(N_FILES):
        (root / f"mod_{i:02d}.py").write_text(corpus_file(i))
    manifest = root.parent / "manifest.txt"
    assert train_small.main(["--corpus-root", str(root), "--write-manifest", str(manifest)]) == 0
    return root, manifest


def train(out, corpus, *extra):
    root, manifest = corpus
    args = ["--out", str(out), "--size", "tiny", "--corpus-root", str(root), "--manifest", str(manifest),
            "--steps", "4", "--batch", "4", "--max-context", "12", "--warmup", "2", "--save-every", "2",
            "--eval-every", "2", "--log-every", "1", "--threads", "2", *extra]
    return train_small.main(args)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, corpus):
    out = tmp_path_factory.mktemp("run-a")
    assert train(out, corpus) == 0
    return out


def log_entries(out):
    return [json.loads(line) for line in (out / "loss.jsonl").read_text().splitlines()]


def test_manifest_marks_every_twentieth_file_heldout(corpus):
    root, manifest = corpus
    rows = [line.split(" ") for line in manifest.read_text().splitlines() if not line.startswith("#")]
    assert [r[2] for r in rows] == [f"mod_{i:02d}.py" for i in range(N_FILES)]
    assert [r[2] for r in rows if r[1] == "heldout"] == ["mod_10.py"]


def test_few_steps_log_finite_losses_and_export_the_checkpoint(uninterrupted):
    entries = log_entries(uninterrupted)
    train_losses = [e["loss"] for e in entries if "loss" in e]
    assert [e["step"] for e in entries if "loss" in e] == [1, 2, 3, 4]
    assert all(math.isfinite(v) for v in train_losses)
    heldout = [e["heldout_loss"] for e in entries if "heldout_loss" in e]
    assert [e["step"] for e in entries if "heldout_loss" in e] == [0, 2, 4]
    assert set(heldout[0]) == {"0.25", "0.5", "0.75", "1"}
    # The untrained model is near the uniform distribution over the 320 pieces.
    assert abs(heldout[0]["1"] - math.log(320)) < 0.5
    assert all(math.isfinite(v) for h in heldout for v in h.values())
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "loss.jsonl"):
        assert (uninterrupted / "model" / name).is_file(), name


def test_resumed_run_equals_uninterrupted_run_bit_for_bit(tmp_path, corpus, uninterrupted):
    # Stop after 3 steps: the checkpoint is at step 2, so the rerun discards step 3's log line and redoes it.
    assert train(tmp_path, corpus, "--stop-after", "3") == 0
    assert not (tmp_path / "model").exists()
    assert max(e["step"] for e in log_entries(tmp_path)) == 3
    assert train(tmp_path, corpus) == 0
    a = (uninterrupted / "model" / "model.safetensors").read_bytes()
    b = (tmp_path / "model" / "model.safetensors").read_bytes()
    assert a == b

    def without_clocks(out):
        return [{k: v for k, v in e.items() if k not in ("seconds", "cpu_seconds")} for e in log_entries(out)]
    assert without_clocks(tmp_path) == without_clocks(uninterrupted)


def test_resume_with_other_settings_is_refused(tmp_path, corpus, capsys):
    assert train(tmp_path, corpus, "--stop-after", "2") == 0
    assert train(tmp_path, corpus, "--lr", "0.01") == 2
    assert "holds a run with other settings" in capsys.readouterr().err


def test_manifest_rejects_a_changed_or_missing_file(tmp_path, corpus, capsys):
    root, manifest = corpus
    changed = tmp_path / "corpus"
    changed.mkdir()
    for p in root.iterdir():
        (changed / p.name).write_bytes(p.read_bytes())
    (changed / "mod_03.py").write_text(corpus_file(3).replace("math.sqrt", "math.exp"))
    assert train_small.main(["--corpus-root", str(changed), "--manifest", str(manifest),
                             "--write-heldout", str(tmp_path / "h.txt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "mod_03.py: sha256 differs" in err and err.count("\n") == 1
    assert not (tmp_path / "h.txt").exists()

    (changed / "mod_03.py").unlink()
    assert train(tmp_path / "run", (changed, manifest)) == 2
    assert "mod_03.py: corpus file missing" in capsys.readouterr().err


def test_write_heldout_writes_the_heldout_files_in_manifest_order(tmp_path, corpus):
    root, manifest = corpus
    out = tmp_path / "heldout.txt"
    assert train_small.main(["--corpus-root", str(root), "--manifest", str(manifest),
                             "--write-heldout", str(out)]) == 0
    assert out.read_text() == corpus_file(10)


def test_trained_checkpoint_converts_and_generates(tmp_path, uninterrupted):
    gguf = tmp_path / "tiny.gguf"
    convert_checkpoint(uninterrupted / "model", gguf, "Q8_0")
    m = Model.load(gguf, threads=2)
    assert m.config.canvas_length == 8
    text = "def area(width):\n    return width * 2.5  # ünïcode too\n"
    ids = m.tokenizer.encode(text)
    assert ids[0] == train_small.BOS_ID and m.tokenizer.decode(ids) == text   # byte-level: any text round-trips
    out = m.generate(m.tokenizer.encode("def "), max_new_tokens=16, seed=0)
    assert 1 <= len(out.ids) <= 16 and all(0 <= i < 320 for i in out.ids)
    assert 1 <= len(out.stats.steps_per_canvas) <= 2
    assert all(1 <= s <= train_small.GENERATION_DEFAULTS["max_denoising_steps"] for s in out.stats.steps_per_canvas)
