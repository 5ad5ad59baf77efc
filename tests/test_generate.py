"""Model API end to end: generate equals transformers token for token under the same draws, reproducibility,
one encoder pass per canvas, and bad input."""
import numpy as np
import pytest
import torch
from transformers import DiffusionGemmaForBlockDiffusion
from transformers.models.diffusion_gemma.generation_diffusion_gemma import EntropyBoundSamplerConfig

from conftest import PR_TINY, RecordingDraws
from dgguf.core.errors import DggufError
from dgguf.convert.quantize import convert_checkpoint
from dgguf.runtime import Model
from dgguf.runtime.native_model import NativeCache
from dgguf.runtime.sampler import SeededDraws

PROMPT = [2, 17, 42, 99, 123, 7, 300, 301, 302, 5, 6, 77, 81, 90]   # longer than the sliding window (8)
STEPS = 6


@pytest.fixture(scope="module")
def tiny(checkpoints, tmp_path_factory):
    hf = checkpoints("tiny")
    gguf = convert_checkpoint(hf, tmp_path_factory.mktemp("gen") / "tiny-f32.gguf", "F32")
    return hf, gguf


@pytest.fixture(scope="module")
def reference(tiny):
    return DiffusionGemmaForBlockDiffusion.from_pretrained(tiny[0], dtype=torch.float32).eval()


def reference_generate(model, monkeypatch, draws, max_new, **kw):
    draws.replay(monkeypatch)
    out = model.generate(torch.tensor([PROMPT]), max_new_tokens=max_new, max_denoising_steps=STEPS,
                         sampler_config=EntropyBoundSamplerConfig(0.1), **kw)
    assert draws.log == []   # every draw we made was consumed by the reference, in our order
    return out.sequences[0, len(PROMPT):].tolist()


def test_generate_equals_transformers_token_for_token_over_two_canvases(tiny, reference, monkeypatch):
    m = Model.load(tiny[1], threads=2)
    C = m.config.canvas_length
    draws = RecordingDraws(SeededDraws(7, m.config.vocab_size, C))
    ours = m.generate(PROMPT, max_new_tokens=2 * C, draws=draws, max_denoising_steps=STEPS)
    assert ours.stats.steps_per_canvas == [STEPS, STEPS]     # a random model never meets the adaptive stop
    ref = reference_generate(reference, monkeypatch, draws, 2 * C, eos_token_id=None, pad_token_id=None)
    assert ours.ids == ref


def test_generate_stops_at_eos_and_pads_like_transformers(tiny, reference, monkeypatch):
    m = Model.load(tiny[1])
    C = m.config.canvas_length
    free = m.generate(PROMPT, max_new_tokens=2 * C, draws=SeededDraws(3, m.config.vocab_size, C),
                      max_denoising_steps=STEPS)
    eos = free.ids[5]                 # a token the first canvas commits: make it the end of sequence
    first = free.ids.index(eos)
    m.config.eos_token_ids = [eos]
    draws = RecordingDraws(SeededDraws(3, m.config.vocab_size, C))
    ours = m.generate(PROMPT, max_new_tokens=2 * C, draws=draws, max_denoising_steps=STEPS)
    assert len(ours.stats.steps_per_canvas) == 1
    assert ours.ids[first] == eos and set(ours.ids[first + 1:]) <= {m.config.pad_token_id}
    ref = reference_generate(reference, monkeypatch, draws, 2 * C, eos_token_id=[eos], pad_token_id=0)
    assert ours.ids == ref


def test_same_seed_same_output_across_runs_and_thread_counts(tiny):
    runs = []
    for threads in (1, 2, 2):
        m = Model.load(tiny[1], threads=threads)
        runs.append(m.generate(PROMPT, max_new_tokens=20, seed=11, max_denoising_steps=4).ids)
    assert runs[0] == runs[1] == runs[2]
    assert len(runs[0]) == 20
    other = Model.load(tiny[1]).generate(PROMPT, max_new_tokens=20, seed=12, max_denoising_steps=4).ids
    assert other != runs[0]


def test_prompt_encoded_once_and_each_canvas_once(tiny, monkeypatch):
    encoded = []
    real = NativeCache.encode

    def spy(self, ids):
        encoded.append(len(ids))
        return real(self, ids)

    monkeypatch.setattr(NativeCache, "encode", spy)
    m = Model.load(tiny[1])
    C = m.config.canvas_length
    res = m.generate(PROMPT, max_new_tokens=3 * C, seed=1, max_denoising_steps=2)
    assert len(res.stats.steps_per_canvas) == 3
    assert encoded == [len(PROMPT), C, C]     # the last canvas is never encoded, the prompt never again


def test_no_early_stop_and_step_override(tiny):
    m = Model.load(tiny[1])
    res = m.generate(PROMPT, max_new_tokens=8, seed=1, max_denoising_steps=3, early_stop=False)
    assert res.stats.steps_per_canvas == [3] and res.stats.max_steps == 3
    assert res.stats.tokens_per_forward == pytest.approx(m.config.canvas_length / 3)


def test_canvas_logits_api_matches_the_pr24423_golden_logits():
    m = Model.load(PR_TINY / "tiny-f32.gguf")
    par = PR_TINY / "parity"
    prompt = np.fromfile(par / "prompt.i32", dtype=np.int32)
    canvas = np.fromfile(par / "canvasA.i32", dtype=np.int32)
    a0 = np.fromfile(par / "hf_A0.bin", dtype=np.float32).reshape(16, 512)
    a1 = np.fromfile(par / "hf_A1.bin", dtype=np.float32).reshape(16, 512)
    got0 = m.canvas_logits(prompt, canvas)
    assert got0.dtype == np.float32 and got0.flags.c_contiguous and got0.shape == (16, 512)
    assert np.abs(got0 - a0).max() <= 1e-4
    assert np.abs(m.canvas_logits(prompt, canvas, a0) - a1).max() <= 1e-4


@pytest.mark.parametrize("call,message", [
    (lambda m: m.generate([3] * 9000, max_new_tokens=16), "exceeds ctx"),
    (lambda m: m.generate([2, 600], max_new_tokens=16), "outside the vocabulary"),
    (lambda m: m.generate([], max_new_tokens=16), "non-empty"),
    (lambda m: m.generate([2, 3], max_new_tokens=0), "max_new_tokens"),
    (lambda m: m.generate([2, 3], t_min=-1.0), "t_min"),
    (lambda m: m.generate([2, 3], max_denoising_steps=0), "steps"),
    (lambda m: m.generate([2, 3], entropy_bound=0.0), "entropy_bound"),
    (lambda m: m.generate([2, 3], temperature=1.0), "unknown sampler option"),
    (lambda m: m.canvas_logits([2, 3], list(range(40))), "canvas_length"),
    (lambda m: m.generate([2, 3], max_new_tokens=8, seed=-1), "seed"),
])
def test_bad_input_gives_one_clear_error(tiny, call, message):
    m = Model.load(tiny[1])
    with pytest.raises(DggufError, match=message):
        call(m)


def test_cli_run_json_and_errors(tiny, capsys):
    import json
    from dgguf.cli import main
    assert main(["run", "-m", str(tiny[1]), "--prompt-ids", "2,17,42", "-n", "20", "--seed", "5", "--steps", "3",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["ids"]) == 20 and out["steps_per_canvas"] == [3, 3] and out["max_steps"] == 3
    assert isinstance(out["text"], str) and out["tokens_per_s"] > 0
    assert main(["run", "-m", str(tiny[1]), "-p", "def f(x):", "-n", "8", "--seed", "5", "--steps", "2"]) == 0
    assert main(["run", "-m", str(tiny[1]), "--prompt-ids", "2,9999"]) == 2
    err = capsys.readouterr().err
    assert "error: " in err and "9999" in err and "Traceback" not in err
    # -1 is llama.cpp's "random seed" (tests/test_cli_run.py); below it is a usage error
    for bad in (["--prompt-ids", "2,x"], ["--prompt-ids", "2", "--seed", "-2"],
                ["--prompt-ids", "2", "--threads", "5000000000"]):
        with pytest.raises(SystemExit) as e:
            main(["run", "-m", str(tiny[1])] + bad)
        assert e.value.code == 2
    with pytest.raises(DggufError, match="threads"):
        Model.load(tiny[1], threads=0)


def test_cli_bench_reports_step_and_encoder_times(tiny, capsys):
    import json
    from dgguf.runtime.bench import step_macs
    from dgguf.cli import main
    assert main(["bench", "-m", str(tiny[1]), "--repeats", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("seconds_per_step", "seconds_per_denoise_step", "seconds_prompt_encode", "seconds_canvas_encode",
                "step_gops", "tokens_per_s"):
        assert out[key] > 0, key
    # the step cannot beat its floor at the machine's measured peaks (where the kernel has them)
    if out["step_floor_seconds"] is not None:
        assert 0 < out["step_floor_seconds"] < out["seconds_per_step"]
    assert out["peaks"]["read"] > 0
    m = Model.load(tiny[1])
    c = m.config
    # the soft embedding and the tied head alone are 2 * V * H multiply-adds per canvas token
    assert step_macs(c, 16, 23) > 2 * c.vocab_size * c.hidden_size * 16


def test_bench_denoise_step_times_exactly_the_forced_steps_of_one_canvas(tiny, monkeypatch):
    from dgguf.runtime import native_model
    from dgguf.runtime.bench import denoise_step
    m = Model.load(tiny[1])
    calls = []
    decode = native_model.NativeCache.decode
    monkeypatch.setattr(native_model.NativeCache, "decode",
                        lambda self, *a, **kw: calls.append(a) or decode(self, *a, **kw))
    assert denoise_step(m, np.arange(3, 8, dtype=np.int32), 5) > 0
    assert len(calls) == 5                       # every step ran: no early stop
    assert calls[0][1] is None and all(sc is not None for _, sc in calls[1:])
