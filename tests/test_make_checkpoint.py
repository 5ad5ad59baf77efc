"""scripts/make_checkpoint.py: every named config loads in transformers and runs, files are deterministic, and the
config forms / sharding change the files but not the model."""
import hashlib
import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoTokenizer, DiffusionGemmaForBlockDiffusion

CONFIGS = ["tiny", "k256", "odd", "bf16", "decisive"]


def load(path):
    return DiffusionGemmaForBlockDiffusion.from_pretrained(path).eval()


def canvas_logits(model):
    """Decoder logits for a fixed canvas after a context three sliding windows long."""
    cfg = model.config
    gen = torch.Generator().manual_seed(7)
    ctx = torch.randint(0, cfg.text_config.vocab_size, (1, 3 * cfg.text_config.sliding_window), generator=gen)
    canvas = torch.randint(0, cfg.text_config.vocab_size, (1, cfg.canvas_length), generator=gen)
    with torch.no_grad():
        return model(input_ids=ctx, decoder_input_ids=canvas).logits


def read_tensors(path):
    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            tensors.update({name: f.get_tensor(name) for name in f.keys()})
    return tensors


def file_hashes(path):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


@pytest.mark.parametrize("config", CONFIGS)
def test_transformers_loads_config_and_decoder_logits_are_finite(checkpoints, config):
    model = load(checkpoints(config))
    logits = canvas_logits(model)
    cfg = model.config
    assert logits.shape == (1, cfg.canvas_length, cfg.text_config.vocab_size)
    assert torch.isfinite(logits).all()
    # Not degenerate: neither near-uniform nor saturated at the softcap.
    assert 0.5 < logits.float().std() < 10
    assert model.dtype == (torch.bfloat16 if config == "bf16" else torch.float32)


@pytest.mark.parametrize("config", CONFIGS)
def test_release_and_resaved_config_forms_give_identical_logits(checkpoints, config):
    release, resaved = checkpoints(config), checkpoints(config, config_form="resaved")
    release_text = json.loads((release / "config.json").read_text())["text_config"]
    resaved_text = json.loads((resaved / "config.json").read_text())["text_config"]
    assert "per_layer_config" not in release_text and "global_head_dim" in release_text
    assert "per_layer_config" in resaved_text and "global_head_dim" not in resaved_text

    a, b = load(release), load(resaved)
    per_layer = [m.config.text_config.to_dict()["per_layer_config"] for m in (a, b)]
    assert per_layer[0] == per_layer[1] and per_layer[0]  # non-empty: full layers got their own head_dim
    assert torch.equal(canvas_logits(a), canvas_logits(b))


def test_sharded_checkpoint_holds_the_same_tensors_as_unsharded(checkpoints):
    single, sharded = checkpoints("odd"), checkpoints("odd", shards=3)
    assert sorted(p.name for p in sharded.glob("*.safetensors")) == [
        f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    a, b = read_tensors(single), read_tensors(sharded)
    assert set(index["weight_map"]) == set(a) == set(b)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in a.values())
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert torch.equal(canvas_logits(load(single)), canvas_logits(load(sharded)))


@pytest.mark.parametrize("config,kw", [("tiny", {"shards": 2}), ("bf16", {"config_form": "resaved"}),
                                       ("k256", {"dtype": "f16"})])
def test_same_arguments_give_byte_identical_files(tmp_path, make_checkpoint, config, kw):
    first = make_checkpoint(tmp_path / "a", config=config, **kw)
    second = make_checkpoint(tmp_path / "b", config=config, **kw)
    assert file_hashes(first) == file_hashes(second)
    assert file_hashes(first) != file_hashes(make_checkpoint(tmp_path / "c", config=config, seed=1, **kw))


def test_decoder_and_encoder_layer_scalars_are_distinct_and_not_one(checkpoints):
    tensors = read_tensors(checkpoints("odd"))
    decoder = [tensors[f"model.decoder.layers.{i}.layer_scalar"].item() for i in range(5)]
    encoder = [tensors[f"model.encoder.language_model.layers.{i}.layer_scalar"].item() for i in range(5)]
    values = decoder + encoder
    assert len(set(values)) == len(values) and 1.0 not in values
    norm = tensors["model.decoder.layers.0.input_layernorm.weight"]
    assert not torch.allclose(norm, torch.ones_like(norm))


def test_decisive_router_is_tiny_router_times_fifty(checkpoints):
    tiny, decisive = read_tensors(checkpoints("tiny")), read_tensors(checkpoints("decisive"))
    for name, t in tiny.items():
        expected = t * 50 if name.endswith("router.proj.weight") else t
        assert torch.equal(decisive[name], expected), name


def test_bf16_checkpoint_is_bf16_on_disk_and_in_config(checkpoints):
    path = checkpoints("bf16")
    assert json.loads((path / "config.json").read_text())["dtype"] == "bfloat16"
    assert {t.dtype for t in read_tensors(path).values()} == {torch.bfloat16}


def test_generation_config_carries_real_sampler_defaults(checkpoints):
    gen = load(checkpoints("tiny")).generation_config
    assert (gen.max_denoising_steps, gen.t_min, gen.t_max) == (48, 0.4, 0.8)
    assert (gen.stability_threshold, gen.confidence_threshold, gen.max_new_tokens) == (1, 0.005, 256)
    assert gen.sampler_config.entropy_bound == 0.1
    assert gen.eos_token_id == [1, 6, 50] and gen.pad_token_id == 0


@pytest.mark.parametrize("config", ["tiny", "odd", "k256"])
def test_tokenizer_has_config_vocab_size_and_round_trips_text(checkpoints, config):
    from tokenizers import Tokenizer

    path = checkpoints(config)
    vocab_size = json.loads((path / "config.json").read_text())["text_config"]["vocab_size"]
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    assert tok.get_vocab_size() == vocab_size
    assert [tok.id_to_token(i) for i in (0, 1, 2, 3, 4, 5, 6, 7, 262)] == [
        "<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<|turn>", "<turn|>", "<0x00>", "<0xFF>"]
    text = "A llama met a GGUF file, café ☃ 12345!\n\tTabs too."
    ids = tok.encode(text).ids
    assert ids[0] == 2 and tok.decode(ids) == text

    hf = AutoTokenizer.from_pretrained(path)
    assert hf(text).input_ids == ids and len(hf) == vocab_size
    prompt = hf.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|turn>user\nhi<turn|>\n<|turn>model\n"
