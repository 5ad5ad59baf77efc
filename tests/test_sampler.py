"""The numpy sampler against transformers' DiffusionGemma generation code (generation_diffusion_gemma.py)."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import DiffusionGemmaForBlockDiffusion
from transformers.generation import EosTokenCriteria, StoppingCriteriaList
from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
    DiffusionGemmaGenerationConfig,
    DiffusionGemmaGenerationMixin,
    EntropyBoundSampler,
    EntropyBoundSamplerConfig,
    LinearTemperatureScheduleLogitsProcessor,
)

from conftest import RecordingDraws
from dgguf.core import native
from dgguf.core.errors import DggufError
from dgguf.runtime.sampler import (
    SamplerConfig,
    SeededDraws,
    accept_mask,
    commit_canvas,
    denoise_canvas,
    entropy_bound_accept,
    inverse_cdf_sample,
    scale_logits,
    temperature,
    token_stats,
)

EOS_IDS = [1, 6, 50]  # the tiny checkpoint's generation config
PAD_ID = 0


def reference_acceptance(logits, temp, bound):
    """transformers' (accept mask, argmax, entropy) for one canvas of softcapped logits at temperature `temp`."""
    scaled = torch.from_numpy(logits)[None] / torch.tensor(temp, dtype=torch.float32)
    sampler = EntropyBoundSampler(EntropyBoundSamplerConfig(entropy_bound=float(bound)), canvas_length=len(logits),
                                  vocab_size=logits.shape[1], max_denoising_steps=1)
    canvas = torch.zeros(scaled.shape[:2], dtype=torch.long)
    sampler.accept_canvas(canvas, canvas + 1, scaled, cur_step=1)
    entropy = torch.distributions.Categorical(logits=scaled).entropy()
    return sampler.accepted_token_mask[0].numpy(), scaled.argmax(-1)[0].numpy(), entropy[0].numpy()


def reference_entropy_float64(logits, temp):
    """The reference's entropy formula evaluated in float64: the exact value, up to float32 input rounding."""
    scaled = torch.from_numpy(logits) / torch.tensor(temp, dtype=torch.float32)
    return torch.distributions.Categorical(logits=scaled.double()).entropy().numpy()


def assert_same_acceptance(mine, ref, ref_entropy):
    """Equal masks, except that inside a group of exactly tied entropies torch's unstable sort may pick other
    members than our position order: there only the number accepted must agree."""
    assert mine.sum() == ref.sum()
    for pos in np.flatnonzero(mine != ref):
        tied = ref_entropy == ref_entropy[pos]
        assert tied.sum() > 1, f"position {pos} differs without a tie"
        assert mine[tied].sum() == ref[tied].sum()


def random_logits(rng, n_rows, vocab):
    """Softcapped (30 tanh(x/30)) rows from near-uniform to sharply peaked: entropies from ~0 to ~log V."""
    sharpness = np.exp(rng.uniform(np.log(0.05), np.log(40.0), size=(n_rows, 1)))
    return (30 * np.tanh(rng.standard_normal((n_rows, vocab)) * sharpness / 30)).astype(np.float32)


@pytest.mark.parametrize("n_rows,vocab", [(1, 7), (5, 512), (16, 64), (33, 4096), (64, 1000), (4, 262144)])
@pytest.mark.parametrize("temp,bound", [(0.4, 0.1), (0.8, 1.0), (1.0, 5.0), (2.5, 0.3)])
def test_entropy_bound_accept_matches_transformers(n_rows, vocab, temp, bound):
    rng = np.random.default_rng([n_rows, vocab, int(temp * 10), int(bound * 10)])
    logits = random_logits(rng, n_rows, vocab)
    accept, argmax, entropy = entropy_bound_accept(logits, np.float32(temp), bound)
    ref_accept, ref_argmax, ref_entropy = reference_acceptance(logits, np.float32(temp), bound)
    np.testing.assert_array_equal(accept, ref_accept)
    np.testing.assert_array_equal(argmax, ref_argmax)
    np.testing.assert_allclose(entropy, reference_entropy_float64(logits, np.float32(temp)), rtol=0, atol=1e-6)
    if vocab <= 4096:  # beyond that torch's own float32 sum drifts by up to ~1.5e-4 (at V = 262144)
        np.testing.assert_allclose(entropy, ref_entropy, rtol=0, atol=1e-5)
    assert accept.dtype == bool and argmax.dtype == np.int64 and entropy.dtype == np.float32
    assert accept.any()


def test_entropy_bound_accept_matches_transformers_on_ties_and_near_uniform_rows():
    rng = np.random.default_rng(7)
    vocab = 512
    peaked = rng.standard_normal(vocab).astype(np.float32) * 30
    near_uniform = [(rng.standard_normal(vocab) * 0.02 * (k + 1)).astype(np.float32) for k in range(6)]
    tied_argmax = np.zeros(vocab, np.float32)
    tied_argmax[[3, 9]] = 5.0  # two maximal logits: the first index wins on both sides
    rows = ([peaked] * 6 + [peaked * 0.2]                   # a tied accepted group, then one distinct row
            + [np.zeros(vocab, np.float32)] * 8            # exactly uniform rows: a tied rejected group
            + near_uniform + [tied_argmax] * 3 + [np.full(vocab, 7.0, np.float32)] * 4)
    logits = np.stack(rows)
    order = rng.permutation(len(logits))
    for bound in (0.1, 0.5):
        for rows_used in (logits, logits[order]):
            accept, argmax, entropy = entropy_bound_accept(rows_used, np.float32(0.8), bound)
            ref_accept, ref_argmax, ref_entropy = reference_acceptance(rows_used, np.float32(0.8), bound)
            np.testing.assert_array_equal(accept, ref_accept)
            np.testing.assert_array_equal(argmax, ref_argmax)
            np.testing.assert_allclose(entropy, ref_entropy, rtol=0, atol=1e-5)

    # Only uniform rows: one tied group straddles any bound below log V, so at most the chosen member differs.
    uniform = np.zeros((40, vocab), np.float32)
    accept, _, _ = entropy_bound_accept(uniform, np.float32(0.8), 0.1)
    ref_accept, _, ref_entropy = reference_acceptance(uniform, np.float32(0.8), 0.1)
    assert_same_acceptance(accept, ref_accept, ref_entropy)
    assert accept.sum() == 1 and accept[0]  # ours: the first position


def reference_accept_mask(entropy, bound, monkeypatch):
    """EntropyBoundSampler's mask when the per-position entropies are exactly `entropy`."""
    class FixedEntropy:
        def __init__(self, logits):
            pass

        def entropy(self):
            return torch.from_numpy(entropy)[None]

    monkeypatch.setattr(torch.distributions, "Categorical", FixedEntropy)
    sampler = EntropyBoundSampler(EntropyBoundSamplerConfig(entropy_bound=float(bound)),
                                  canvas_length=len(entropy), vocab_size=2, max_denoising_steps=1)
    canvas = torch.zeros(1, len(entropy), dtype=torch.long)
    sampler.accept_canvas(canvas, canvas + 1, torch.zeros(1, len(entropy), 2), cur_step=1)
    return sampler.accepted_token_mask[0].numpy()


def test_accept_mask_matches_transformers_at_the_bound(monkeypatch):
    """Bounds equal to a partial sum, where only the exact arithmetic (float64 prefix sums rounded to float32,
    float32 subtraction, bound rounded to float32) decides."""
    entropy = np.random.default_rng(11).uniform(0.001, 0.02, 256).astype(np.float32)
    assert len(np.unique(entropy)) == len(entropy)  # no ties: the masks must be identical
    ranked = torch.sort(torch.from_numpy(entropy)).values
    partial_sums = (torch.cumsum(ranked, -1) - ranked).numpy()[7::7]
    for bound in [*map(float, partial_sums), *map(float, np.nextafter(partial_sums, 0))]:
        np.testing.assert_array_equal(accept_mask(entropy, bound),
                                      reference_accept_mask(entropy, bound, monkeypatch))
    # float32(0.1) + float32(0.1) - float32(0.1) is float32(0.1), above the float64 0.1: both are accepted
    # only because the bound is compared in float32.
    entropy = np.float32([0.3, 0.1, 0.1, 0.7])
    np.testing.assert_array_equal(accept_mask(entropy, 0.1), [False, True, True, False])
    np.testing.assert_array_equal(reference_accept_mask(entropy, 0.1, monkeypatch), [False, True, True, False])


@pytest.mark.parametrize("n_steps", [1, 3, 10, 48, 100])
@pytest.mark.parametrize("t_min,t_max", [(0.4, 0.8), (0.1, 1.7), (0.3, 0.30000001)])
def test_temperature_schedule_matches_transformers(n_steps, t_min, t_max):
    logits = np.random.default_rng(n_steps).standard_normal((3, 257)).astype(np.float32) * 20
    processor = LinearTemperatureScheduleLogitsProcessor(t_min=t_min, t_max=t_max, max_denoising_steps=n_steps)
    for step in range(n_steps, 0, -1):
        # generate passes the remaining-steps count as an int32 tensor, which makes the schedule float32
        ref = processor(None, torch.from_numpy(logits), cur_step=torch.tensor(step, dtype=torch.int32))
        mine = scale_logits(logits, temperature(step, n_steps, t_min, t_max))
        np.testing.assert_array_equal(mine, ref.numpy())
    assert temperature(n_steps, n_steps, t_min, t_max) == np.float32(t_max)
    assert temperature(1, n_steps, t_min, t_max) == pytest.approx(t_min + (t_max - t_min) / n_steps, rel=1e-6)


class FakeDecoder:
    """Canvas logits that depend on the canvas and the self-conditioning input, identical for both loops:
    pos_scale * P + tok_scale * (A[x] + B[x shifted by one]) + sc_mix * sc, in float32, where each row of P
    has one planted winner. With pos_scale large the argmax settles and, as the temperature falls and the
    self-conditioning feeds back, the entropy drops until the adaptive stop fires."""

    def __init__(self, vocab, canvas, pos_scale, tok_scale, sc_mix, seed=0):
        rng = np.random.default_rng(seed)
        self.tok_a, self.tok_b = rng.standard_normal((2, vocab, vocab), dtype=np.float32)
        self.pos = rng.standard_normal((canvas, vocab), dtype=np.float32)
        self.pos[np.arange(canvas), rng.integers(0, vocab, canvas)] += 4
        self.pos_scale, self.tok_scale, self.sc_mix = map(np.float32, (pos_scale, tok_scale, sc_mix))
        self.calls = 0

    def __call__(self, ids, sc):
        self.calls += 1
        logits = self.pos_scale * self.pos + self.tok_scale * (self.tok_a[ids] + self.tok_b[np.roll(ids, 1)])
        return logits if sc is None else logits + self.sc_mix * sc

    def forward(self, decoder_input_ids, self_conditioning_logits=None, **_):
        """Stands in for DiffusionGemmaForBlockDiffusion.forward inside transformers' generate."""
        sc = None if self_conditioning_logits is None else self_conditioning_logits[0].numpy()
        return SimpleNamespace(logits=torch.from_numpy(self(decoder_input_ids[0].numpy(), sc))[None])


@pytest.fixture(scope="module")
def tiny_model(checkpoints):
    return DiffusionGemmaForBlockDiffusion.from_pretrained(checkpoints("tiny")).eval()


@pytest.mark.parametrize("decoder,config,stops_early", [
    (dict(pos_scale=3.0, tok_scale=0.5, sc_mix=0.3),
     SamplerConfig(steps=12, entropy_bound=0.1, stability_threshold=1, confidence_threshold=0.3), True),
    (dict(pos_scale=5.0, tok_scale=0.5, sc_mix=0.3),
     SamplerConfig(steps=12, t_min=0.3, t_max=0.9, entropy_bound=0.5, stability_threshold=3,
                   confidence_threshold=0.3), True),
    (dict(pos_scale=0.0, tok_scale=1.0, sc_mix=0.1),
     SamplerConfig(steps=6, entropy_bound=0.3, stability_threshold=1, confidence_threshold=0.005), False),
])
def test_denoise_canvas_matches_transformers_generate(tiny_model, monkeypatch, decoder, config, stops_early):
    vocab, canvas = tiny_model.config.text_config.vocab_size, tiny_model.config.canvas_length
    draws = RecordingDraws(SeededDraws(seed=1234, vocab_size=vocab, canvas_length=canvas))
    ours = FakeDecoder(vocab, canvas, **decoder)
    result = denoise_canvas(ours, draws, config)
    tokens, _ = commit_canvas(result.tokens, EOS_IDS, PAD_ID)
    assert result.steps == ours.calls
    assert (result.steps < config.steps) == stops_early

    reference = FakeDecoder(vocab, canvas, **decoder)
    monkeypatch.setattr(tiny_model, "forward", reference.forward)
    draws.replay(monkeypatch)
    out = tiny_model.generate(
        torch.tensor([[2, 17, 99, 300]]), max_new_tokens=canvas, max_denoising_steps=config.steps,
        t_min=config.t_min, t_max=config.t_max, sampler_config=EntropyBoundSamplerConfig(config.entropy_bound),
        stability_threshold=config.stability_threshold, confidence_threshold=config.confidence_threshold)
    np.testing.assert_array_equal(tokens, out.sequences[0, -canvas:].numpy())
    assert reference.calls == result.steps
    assert draws.log == []  # the reference consumed every draw, in our order


def test_seeded_draws_depend_only_on_their_key():
    draws = SeededDraws(seed=5, vocab_size=1000, canvas_length=64)
    noise = draws("noise", 2, 7)
    assert noise.dtype == np.int64 and noise.shape == (64,) and noise.min() >= 0 and noise.max() < 1000
    np.testing.assert_array_equal(noise, SeededDraws(5, 1000, 64)("noise", 2, 7))
    for other in [draws("init", 2, 7), draws("noise", 3, 7), draws("noise", 2, 6), SeededDraws(6, 1000, 64)(
            "noise", 2, 7)]:
        assert not np.array_equal(noise, other)
    logits = np.random.default_rng(0).standard_normal((64, 1000)).astype(np.float32)
    np.testing.assert_array_equal(draws("sample", 0, 3, logits), draws("sample", 0, 3, logits))


@pytest.mark.parametrize("n_rows,vocab,temp", [(1, 1, 0.5), (3, 17, 0.8), (64, 1000, 0.4), (7, 4099, 1.3)])
def test_native_sample_step_matches_the_numpy_reference(n_rows, vocab, temp):
    rng = np.random.default_rng(vocab)
    logits = (30 * np.tanh(3 * rng.standard_normal((n_rows, vocab)))).astype(np.float32)   # softcapped range
    logits[0, -1] = logits[0].max()                     # a tie: the first maximal index wins
    uniforms = rng.random(n_rows)
    scaled, argmax, entropy, sampled = native.sample_step(logits, temp, uniforms, threads=2)
    ref_scaled = scale_logits(logits, np.float32(temp))
    ref_argmax, ref_entropy = token_stats(ref_scaled)
    np.testing.assert_array_equal(scaled, ref_scaled)                     # the self-conditioning input, bit for bit
    np.testing.assert_array_equal(argmax, ref_argmax)
    np.testing.assert_allclose(entropy, ref_entropy, rtol=3e-7, atol=1e-7)  # float exp vs float64 exp
    np.testing.assert_array_equal(sampled, inverse_cdf_sample(ref_scaled, uniforms))


def test_native_sample_step_is_independent_of_threads():
    logits = np.random.default_rng(1).standard_normal((37, 2053)).astype(np.float32) * 5
    uniforms = np.random.default_rng(2).random(37)
    runs = [native.sample_step(logits, 0.7, uniforms, threads=t) for t in (1, 2, 3)]
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            np.testing.assert_array_equal(a, b)
    assert native.sample_step(logits, 0.7, None)[3] is None


def test_native_sample_step_rejects_bad_values():
    logits = np.zeros((2, 8), dtype=np.float32)
    for temp in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(DggufError, match="temperature"):
            native.sample_step(logits, temp)
    with pytest.raises(DggufError, match="float32"):
        native.sample_step(logits.astype(np.float64), 0.5)
    with pytest.raises(DggufError, match="uniforms"):
        native.sample_step(logits, 0.5, np.zeros(3))


def test_denoise_canvas_samples_natively_as_the_draws_would():
    """SeededDraws' fast path (native inverse-CDF) gives what calling the draws for each sample gives."""
    vocab, canvas = 300, 16
    config = SamplerConfig(steps=10, entropy_bound=0.2, stability_threshold=1, confidence_threshold=0.3)
    seeded = SeededDraws(seed=77, vocab_size=vocab, canvas_length=canvas)
    fast = denoise_canvas(FakeDecoder(vocab, canvas, 3.0, 0.5, 0.3), seeded, config)
    slow = denoise_canvas(FakeDecoder(vocab, canvas, 3.0, 0.5, 0.3), lambda *a: seeded(*a), config)
    assert fast.steps == slow.steps
    np.testing.assert_array_equal(fast.tokens, slow.tokens)
    np.testing.assert_array_equal(fast.entropy, slow.entropy)


def test_inverse_cdf_sample_follows_the_probabilities():
    probs = np.array([0.5, 0.0, 0.125, 0.375])
    n = 4096
    rows = np.tile(np.log(np.maximum(probs, 1e-300)).astype(np.float32), (n, 1))
    ids = inverse_cdf_sample(rows, (np.arange(n) + 0.5) / n)  # evenly spread uniforms: exact quotas
    np.testing.assert_array_equal(np.bincount(ids, minlength=4), (probs * n).astype(int))
    assert inverse_cdf_sample(rows[:2], np.array([0.0, np.nextafter(1.0, 0.0)])).tolist() == [0, 3]


@pytest.mark.parametrize("canvas,pad_id", [
    ([5, 7, 9, 11], PAD_ID),          # no EOS
    ([5, 6, 9, 1, 11], PAD_ID),       # two EOS ids: pad after the first
    ([5, 7, 9, 50], PAD_ID),          # EOS last: nothing to pad
    ([1, 7, 9, 11], 3),
    ([5, 6, 9, 11], None),            # no pad id: stop without replacing
])
def test_commit_canvas_matches_transformers_finalize(canvas, pad_id):
    ids, stop = commit_canvas(np.array(canvas), EOS_IDS, pad_id)
    config = DiffusionGemmaGenerationConfig(pad_token_id=pad_id, eos_token_id=EOS_IDS)
    ref_ids, finished = DiffusionGemmaGenerationMixin._finalize_canvas(
        torch.tensor([[2, 40] + canvas]), torch.zeros(1, dtype=torch.bool), config,
        StoppingCriteriaList([EosTokenCriteria(EOS_IDS)]), len(canvas), torch.tensor(EOS_IDS))
    np.testing.assert_array_equal(ids, ref_ids[0, 2:].numpy())
    assert stop == bool(finished[0])


@pytest.mark.parametrize("options,message", [
    (dict(t_min=0.0), "t_min must be > 0"),
    (dict(t_max=-1.0), "t_max must be > 0"),
    (dict(t_min=0.9, t_max=0.8), r"t_min \(0.9\) must not exceed t_max \(0.8\)"),
    (dict(t_max=float("nan")), "t_max must be a finite number > 0"),
    (dict(entropy_bound=0), "entropy_bound must be > 0"),
    (dict(steps=0), "steps must be an integer >= 1"),
    (dict(steps=4.0), "steps must be an integer >= 1"),
    (dict(stability_threshold=0), "stability_threshold must be an integer >= 1"),
    (dict(confidence_threshold=-0.1), "confidence_threshold must be >= 0"),
    (dict(confidence_threshold="0.1"), "confidence_threshold must be a finite number >= 0"),
])
def test_sampler_config_rejects_bad_values(options, message):
    with pytest.raises(DggufError, match=message):
        SamplerConfig(**options)


def test_sampler_config_accepts_constant_temperature_and_zero_confidence():
    config = SamplerConfig(t_min=0.5, t_max=0.5, confidence_threshold=0)
    assert temperature(1, config.steps, config.t_min, config.t_max) == np.float32(0.5)
