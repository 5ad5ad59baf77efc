"""Random DiffusionGemma checkpoints of any size, streamed to one safetensors file without torch.

Used by the benchmarks: bench_convert.py (real layer shapes) and bench_step.py (a mid-size model that
transformers also runs). The tokenizer is the 512-token fixture one (ids above it are padding in the GGUF).
"""
from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np

FIXTURE_HF = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "pr24423-tiny" / "hf"
_TORCH_DTYPE = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def text_config(vocab: int, hidden: int, dense: int, expert: int, layers: int, heads: int, kv: int, head_dim: int,
                global_kv: int, global_head_dim: int, experts: int, top_k: int, window: int) -> dict:
    """A text_config in the release form; every 6th and the last layer are full attention."""
    full = [(i + 1) % 6 == 0 or i == layers - 1 for i in range(layers)]
    return {
        "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": dense, "moe_intermediate_size": expert,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": head_dim,
        "global_head_dim": global_head_dim, "num_global_key_value_heads": global_kv, "num_experts": experts,
        "top_k_experts": top_k, "sliding_window": window, "max_position_embeddings": 262144, "rms_norm_eps": 1e-6,
        "layer_types": ["full_attention" if f else "sliding_attention" for f in full],
        "hidden_activation": "gelu_pytorch_tanh", "model_type": "diffusion_gemma_text",
        "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2,
        "rope_parameters": {"full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                               "rope_theta": 1000000.0},
                            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}}


def write_checkpoint(out: Path, text: dict, dtype: str, canvas: int = 256, seed: int = 0) -> Path:
    """config.json, the fixture's tokenizer and generation config, and model.safetensors of N(0, 0.02) weights
    (norm weights 1 + N(0, 0.02), layer scalars 1) in F32, F16 or BF16."""
    from dgguf.convert.checkpoint import read_config
    from dgguf.convert.tensor_names import expected_shapes

    out.mkdir(parents=True, exist_ok=True)
    config = {"architectures": ["DiffusionGemmaForBlockDiffusion"], "model_type": "diffusion_gemma",
              "canvas_length": canvas, "dtype": _TORCH_DTYPE[dtype], "eos_token_id": [1], "text_config": text,
              "vision_config": {"model_type": "gemma4_vision", "hidden_size": 32, "intermediate_size": 64,
                                "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
                                "head_dim": 16}}
    (out / "config.json").write_text(json.dumps(config, indent=1))
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(FIXTURE_HF / f, out / f)
    cfg, _ = read_config(out)
    shapes = expected_shapes(cfg)
    width = {"F32": 4, "F16": 2, "BF16": 2}[dtype]
    header, offset = {}, 0
    for name, shape in shapes.items():
        n = int(np.prod(shape)) * width
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    hjson = json.dumps(header).encode()
    hjson += b" " * (-len(hjson) % 8)
    rng = np.random.default_rng(seed)
    with open(out / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(hjson)) + hjson)
        for name, shape in shapes.items():
            n = int(np.prod(shape))
            for s in range(0, n, 1 << 24):
                x = rng.standard_normal(min(n - s, 1 << 24), dtype=np.float32) * 0.02
                if name.endswith("layer_scalar"):
                    x[:] = 1.0
                elif len(shape) == 1:
                    x += 1.0
                if dtype == "F32":
                    f.write(x.tobytes())
                elif dtype == "F16":
                    f.write(x.astype(np.float16).tobytes())
                else:
                    f.write((x.view(np.uint32) >> 16).astype(np.uint16).tobytes())
    return out
