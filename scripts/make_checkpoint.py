#!/usr/bin/env python3
"""Write a deterministic tiny DiffusionGemma HF checkpoint (config, generation config, weights, tokenizer).

    python scripts/make_checkpoint.py OUT_DIR --config NAME [--dtype f32|bf16|f16] [--shards N]
                                      [--config-form release|resaved] [--seed S]

The weights are random, but drawn so that a converter or runtime that maps a tensor wrongly changes the logits:
every norm weight, router.scale and router.per_expert_scale is 1 + 0.1*N(0,1) (not the all-ones init), and the
decoder and encoder `layer_scalar` buffers hold distinct values that never coincide (decoder 0.5+0.1*i, encoder
0.85-0.1*i). The tokenizer is a Gemma-style byte-fallback BPE of exactly the config's vocab size (0..6 specials,
7..262 <0x00>..<0xFF>, then merges learned from a fixed built-in text) that prepends <bos>, as Gemma's does.
Same arguments give byte-identical files.

Named configs (S = sliding layer, F = full layer; every sliding window is shorter than the contexts tests use):
  tiny      like ../fixtures/pr24423-tiny: V=512, H=64, dense 128, 4 layers [S,F,S,F], 4 heads, sliding d16/2kv,
            full d32/1kv, 8 experts top-2, moe 32, window 8, canvas 16.
  k256      every width a multiple of 256 so K-quants apply: V=1024, H=256, dense 256, moe 256, 3 layers [S,S,F],
            4 heads, sliding d64/2kv, full d128/1kv, 8 experts top-2, window 16, canvas 16.
  odd       widths multiples of 32 but not of 256, odd sizes: V=544, H=96, dense 160, moe 32, 5 layers
            [S,S,F,S,F], 6 heads, sliding d16/3kv, full d32/2kv, 6 experts top-3, window 6, canvas 12.
  bf16      BF16 by default, H=96 (sqrt(96)=9.798 becomes 9.8125 in bf16): V=512, dense 192, moe 32, 3 layers
            [S,S,F], 4 heads, sliding d16/2kv, full d32/1kv, 8 experts top-2, window 8, canvas 16.
  decisive  tiny with router.proj scaled x50 so top-k routing is far from a tie (runtime parity tests).

--config-form release writes `global_head_dim` / `num_global_key_value_heads` as plain text_config keys, as the
released config.json does; resaved keeps what transformers 5.x writes (`per_layer_config`). Both load to the same
model.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

S, F = "sliding_attention", "full_attention"


@dataclass(frozen=True)
class TinySpec:
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # dense MLP and self-conditioning MLP width
    moe_intermediate_size: int
    layer_types: tuple[str, ...]
    num_attention_heads: int
    head_dim: int  # sliding layers
    num_key_value_heads: int  # sliding layers
    global_head_dim: int  # full layers
    num_global_key_value_heads: int  # full layers (K=V)
    num_experts: int
    top_k_experts: int
    sliding_window: int
    canvas_length: int
    dtype: str = "f32"
    router_gain: float = 1.0  # multiplies router.proj after init; >1 makes routing decisive


TINY = TinySpec(
    vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, layer_types=(S, F, S, F),
    num_attention_heads=4, head_dim=16, num_key_value_heads=2, global_head_dim=32, num_global_key_value_heads=1,
    num_experts=8, top_k_experts=2, sliding_window=8, canvas_length=16,
)

CONFIGS: dict[str, TinySpec] = {
    "tiny": TINY,
    "k256": TinySpec(
        vocab_size=1024, hidden_size=256, intermediate_size=256, moe_intermediate_size=256, layer_types=(S, S, F),
        num_attention_heads=4, head_dim=64, num_key_value_heads=2, global_head_dim=128,
        num_global_key_value_heads=1, num_experts=8, top_k_experts=2, sliding_window=16, canvas_length=16,
    ),
    "odd": TinySpec(
        vocab_size=544, hidden_size=96, intermediate_size=160, moe_intermediate_size=32,
        layer_types=(S, S, F, S, F), num_attention_heads=6, head_dim=16, num_key_value_heads=3, global_head_dim=32,
        num_global_key_value_heads=2, num_experts=6, top_k_experts=3, sliding_window=6, canvas_length=12,
    ),
    "bf16": TinySpec(
        vocab_size=512, hidden_size=96, intermediate_size=192, moe_intermediate_size=32, layer_types=(S, S, F),
        num_attention_heads=4, head_dim=16, num_key_value_heads=2, global_head_dim=32, num_global_key_value_heads=1,
        num_experts=8, top_k_experts=2, sliding_window=8, canvas_length=16, dtype="bf16",
    ),
    "decisive": TinySpec(**{**TINY.__dict__, "router_gain": 50.0}),
}

DTYPES = {"f32": "float32", "bf16": "bfloat16", "f16": "float16"}

# Token ids shared by every config's tokenizer (Gemma layout: specials, then the 256 byte-fallback pieces).
SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<|turn>", "<turn|>"]
PAD_ID, EOS_ID, BOS_ID, END_OF_TURN_ID = 0, 1, 2, 6
# The real list is [1, 106 (end of turn), 50 (unknown)]; 50 is kept as a third id that every tiny vocab has.
EOS_TOKEN_IDS = [EOS_ID, END_OF_TURN_ID, 50]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|turn>{{ message['role'] }}\n{{ message['content'] }}<turn|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|turn>model\n{% endif %}"
)

# Real-checkpoint sampler defaults (generation_config.json of google/diffusiongemma-26B-A4B-it).
SAMPLER_DEFAULTS = dict(
    max_new_tokens=256, max_denoising_steps=48, t_min=0.4, t_max=0.8, stability_threshold=1,
    confidence_threshold=0.005,
)
ENTROPY_BOUND = 0.1

WEIGHT_STD = 0.02  # transformers' initializer_range
# Every layer output is RMS-normalised before it joins the residual, so the embedding alone sets the logit scale:
# logits = rms_w(h) @ E.T have std ~ sqrt(H) * embed_std. Aim at ~2: softmax neither flat nor one-hot.
LOGIT_STD = 2.0
NORM_JITTER = 0.1

# Fixed BPE training text: ASCII prose and code, long enough to learn >700 merges without repeating itself.
TRAINING_TEXT = """\
The llama walked slowly across the high plateau, carrying a small bag of files for the village library.
Each file held a model: weights, a tokenizer, and a short note that explained how the numbers were stored.
A diffusion model does not write one word at a time. It starts from noise, a canvas of random tokens, and
refines the whole canvas over many steps until the text settles. Then it commits the canvas and starts again.
GGUF is a single-file format: a header of key/value pairs, a table of tensors, and the aligned tensor data.
Quantization packs blocks of 32 or 256 weights with a shared scale; Q8_0, Q4_K and Q6_K are common types.
def rms_norm(x, w, eps=1e-6):
    return x * (x.pow(2).mean(-1, keepdim=True) + eps).rsqrt() * w
for step in range(48, 0, -1):
    temperature = t_min + (t_max - t_min) * step / 48
    logits = model(canvas) / temperature
Questions people ask: How many experts are active per token? Why is the sliding window 1024 tokens long?
What happens when the entropy of every position is below the bound? Is the answer stable after two steps?
User: Write a short story about a llama and a gguf file.
Model: Once upon a time, a curious llama found a file named model-00001-of-00002.safetensors on a hill.
She read the index, counted 1047 tensors, and converted them, one by one, into a tidy GGUF archive.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 16 32 64 128 256 512 1024 2048 4096 8192 16384 32768 65536 131072 262144.
Symbols: ! " # $ % & ' ( ) * + , - . / : ; < = > ? @ [ \\ ] ^ _ ` { | } ~ and tabs\tbetween\twords.
The router scores every expert, keeps the top few, renormalises their weights and mixes their outputs.
Attention in full layers shares keys and values; sliding layers see only a window of recent positions.
The encoder writes the cache for the prompt and for every finished canvas; the decoder only reads it.
Self-conditioning feeds the previous step's soft prediction back in, so each step builds on the last.
Weather report: cold morning, clear skies, light wind from the north, and snow expected on the passes.
Recipe: mix flour, water, salt and yeast; knead for ten minutes; rest one hour; bake at 220 degrees.
Tests must be quick, deterministic and named for the behaviour they check, not for their order.
"""


# --------------------------------------------------------------------------------------------------- tokenizer


def build_tokenizer(vocab_size: int):
    """Gemma-style byte-fallback BPE with exactly `vocab_size` pieces: specials, <0x00>..<0xFF>, learned pieces."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers

    byte_pieces = [f"<0x{b:02X}>" for b in range(256)]
    # Printable ASCII plus tab/newline/▁ as the base alphabet, so every config's vocab has the same first pieces.
    alphabet = [chr(c) for c in range(33, 127)] + ["\t", "\n", "\u2581"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS + byte_pieces, initial_alphabet=alphabet,
        limit_alphabet=len(alphabet), show_progress=False,
    )
    scratch = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    scratch.normalizer = normalizers.Replace(" ", "\u2581")
    scratch.train_from_iterator(TRAINING_TEXT.splitlines(keepends=True), trainer=trainer)
    if scratch.get_vocab_size() != vocab_size:
        raise ValueError(f"BPE training text gives {scratch.get_vocab_size()} pieces, config needs {vocab_size}")

    # Rebuild from the learned vocab/merges so that only the 7 specials are added tokens: the trainer would also
    # register the byte pieces as added tokens, which Gemma's tokenizer.json does not.
    learned = json.loads(scratch.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in learned["merges"]]
    tok = Tokenizer(models.BPE(learned["vocab"], merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens(SPECIAL_TOKENS)
    # Gemma's tokenizer.json prepends <bos> itself; transformers 5 ignores tokenizer_config's add_bos_token.
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos>:1 $B:1", special_tokens=[("<bos>", BOS_ID)])
    return tok


def write_tokenizer(out: Path, vocab_size: int) -> None:
    build_tokenizer(vocab_size).save(str(out / "tokenizer.json"))
    special = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
               "mask_token": "<mask>"}
    turn_tokens = ["<|turn>", "<turn|>"]
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast", **special,
        "add_bos_token": True, "add_eos_token": False, "model_max_length": 131072,
        "clean_up_tokenization_spaces": False, "chat_template": CHAT_TEMPLATE,
        "additional_special_tokens": turn_tokens, "extra_special_tokens": turn_tokens,
    }
    write_json(out / "tokenizer_config.json", tokenizer_config)
    write_json(out / "special_tokens_map.json", special)


# --------------------------------------------------------------------------------------------------- model


def build_config(spec: TinySpec, dtype: str):
    from transformers import DiffusionGemmaConfig

    V = spec.vocab_size
    return DiffusionGemmaConfig(
        text_config=dict(
            vocab_size=V, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
            num_hidden_layers=len(spec.layer_types), layer_types=list(spec.layer_types),
            num_attention_heads=spec.num_attention_heads, num_key_value_heads=spec.num_key_value_heads,
            head_dim=spec.head_dim,
            # Without these the full layers silently get head_dim 512 (the real model's value).
            global_head_dim=spec.global_head_dim, num_global_key_value_heads=spec.num_global_key_value_heads,
            sliding_window=spec.sliding_window, max_position_embeddings=1024,
            num_experts=spec.num_experts, top_k_experts=spec.top_k_experts,
            moe_intermediate_size=spec.moe_intermediate_size, use_bidirectional_attention="vision",
            pad_token_id=PAD_ID, eos_token_id=EOS_ID, bos_token_id=BOS_ID),
        # A vision tower is always built (a default one has 167M params); keep it minimal. A 64-entry position
        # table instead of 10240 keeps it from dominating the file.
        vision_config=dict(model_type="gemma4_vision", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=2, head_dim=16, position_embedding_size=64),
        canvas_length=spec.canvas_length, boi_token_id=V - 3, eoi_token_id=V - 2, image_token_id=V - 1,
        eos_token_id=EOS_TOKEN_IDS, dtype=DTYPES[dtype],
    )


def randomise_(model, spec: TinySpec, seed: int) -> None:
    """Overwrite every parameter and the layer scalars from one seeded generator (independent of HF's init)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    embed_std = LOGIT_STD / spec.hidden_size**0.5

    def normal(shape, std):
        return torch.randn(shape, generator=gen, dtype=torch.float32) * std

    with torch.no_grad():
        # named_parameters yields each tied tensor once, in registration order: a fixed draw order.
        for name, p in model.named_parameters():
            if name.endswith("embed_tokens.weight"):
                value = normal(p.shape, embed_std)
            elif p.ndim == 1 and (name.endswith("norm.weight") or name.endswith(("router.scale", "per_expert_scale"))):
                value = 1.0 + normal(p.shape, NORM_JITTER)
            else:
                value = normal(p.shape, WEIGHT_STD)
                if name.endswith("router.proj.weight"):
                    value *= spec.router_gain
            p.copy_(value)
        # Values chosen so that no decoder scalar equals any encoder scalar, and none is 1.
        for i, layer in enumerate(model.model.decoder.layers):
            layer.layer_scalar.fill_(0.5 + 0.1 * i)
        for i, layer in enumerate(model.model.encoder.language_model.layers):
            layer.layer_scalar.fill_(max(0.85 - 0.1 * i, 0.25))


def write_generation_config(model, pad_id: int, bos_id: int) -> None:
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
        DiffusionGemmaGenerationConfig, EntropyBoundSamplerConfig)

    # transformers writes nulls here by default; the real file spells the defaults out, and converters read them.
    model.generation_config = DiffusionGemmaGenerationConfig(
        **SAMPLER_DEFAULTS, sampler_config=EntropyBoundSamplerConfig(entropy_bound=ENTROPY_BOUND),
        eos_token_id=EOS_TOKEN_IDS, pad_token_id=pad_id, bos_token_id=bos_id)


def to_release_form(config_path: Path, spec: TinySpec) -> None:
    """Replace transformers' `per_layer_config` with the plain keys the released config.json carries."""
    config = json.loads(config_path.read_text())
    text = config["text_config"]
    del text["per_layer_config"]
    text["global_head_dim"] = spec.global_head_dim
    text["num_global_key_value_heads"] = spec.num_global_key_value_heads
    write_json(config_path, config)


def shard_weights(out: Path, shards: int) -> None:
    """Split model.safetensors into `shards` files named and indexed as save_pretrained does."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    single = out / "model.safetensors"
    with safe_open(single, "pt") as f:
        tensors = {name: f.get_tensor(name) for name in sorted(f.keys())}
    if shards > len(tensors):
        raise ValueError(f"shards must be at most {len(tensors)} (the tensor count), got {shards}")
    sizes = {name: t.numel() * t.element_size() for name, t in tensors.items()}
    total = sum(sizes.values())

    # Contiguous runs of sorted names, each closed once it reaches its share of the bytes; every shard gets at
    # least one tensor and the remaining shards always have enough tensors left.
    names = list(tensors)
    groups: list[list[str]] = [[] for _ in range(shards)]
    filled, k = 0, 0
    for i, name in enumerate(names):
        groups[k].append(name)
        filled += sizes[name]
        tensors_left, shards_left = len(names) - i - 1, shards - k - 1
        if shards_left and (filled >= total * (k + 1) / shards or tensors_left == shards_left):
            k += 1

    weight_map = {}
    for k, group in enumerate(groups):
        file_name = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        save_file({name: tensors[name] for name in group}, out / file_name, metadata={"format": "pt"})
        weight_map.update({name: file_name for name in group})
    single.unlink()
    write_json(out / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})


def write_json(path: Path, obj) -> None:
    # Same layout as transformers' own config files.
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def make_checkpoint(out_dir, config: str = "tiny", dtype: str | None = None, shards: int = 1,
                    config_form: str = "release", seed: int = 0) -> Path:
    """Write the named tiny checkpoint to `out_dir` (created; existing files overwritten) and return its path."""
    import torch
    from transformers import DiffusionGemmaForBlockDiffusion
    from transformers.utils import logging as hf_logging

    if config not in CONFIGS:
        raise ValueError(f"unknown config {config!r}; expected one of {', '.join(CONFIGS)}")
    spec = CONFIGS[config]
    dtype = dtype or spec.dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    if config_form not in ("release", "resaved"):
        raise ValueError(f"unknown config form {config_form!r}; expected release or resaved")
    if shards < 1:
        raise ValueError(f"shards must be at least 1, got {shards}")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf_logging.disable_progress_bar()

    model = DiffusionGemmaForBlockDiffusion(build_config(spec, dtype)).eval()
    randomise_(model, spec, seed)
    model.to(getattr(torch, DTYPES[dtype]))
    write_generation_config(model, PAD_ID, BOS_ID)

    # save_pretrained decides which tensors are stored (tied copies dropped, both layer-scalar sets kept).
    # Write to a scratch folder so stale shards from an earlier run in out_dir cannot survive.
    with tempfile.TemporaryDirectory(dir=out) as scratch:
        model.save_pretrained(scratch, max_shard_size="100GB")
        for stale in [*out.glob("model*.safetensors"), out / "model.safetensors.index.json"]:
            stale.unlink(missing_ok=True)
        for path in Path(scratch).iterdir():
            shutil.move(str(path), out / path.name)
    if config_form == "release":
        to_release_form(out / "config.json", spec)
    if shards > 1:
        shard_weights(out, shards)
    write_tokenizer(out, spec.vocab_size)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--config", default="tiny", choices=list(CONFIGS))
    parser.add_argument("--dtype", choices=list(DTYPES), help="default: the config's own (f32 except bf16)")
    parser.add_argument("--shards", type=int, default=1)
    parser.add_argument("--config-form", default="release", choices=["release", "resaved"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = make_checkpoint(args.out_dir, args.config, args.dtype, args.shards, args.config_form, args.seed)
    for path in sorted(out.iterdir()):
        print(f"{path.stat().st_size:>12,}  {path}")


if __name__ == "__main__":
    main()
