"""`dgguf plan`: what of a model lives on the GPU at a VRAM budget, and the predicted speed: the placement
`dgguf run --gpu` uses with the same --vram, --ctx, --kv-type, --offload, -ngl and --n-cpu-moe."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from dgguf.core.errors import DggufError

from .args import integer, number, positive, type_name


def model_from_config(path, type_name: str):
    """The planner's model for an HF config.json (a file or its directory) at a file type: the tensors
    `dgguf convert --type` would write, with the same names, shapes and per-tensor types."""
    from dgguf.convert.checkpoint import read_config_file
    from dgguf.convert.quantize import output_tensors
    from dgguf.convert.tensor_names import expected_shapes
    from dgguf.format.quant_types import file_type
    from dgguf.runtime.planner import PlannedModel, Tensor

    path = Path(path)
    cfg, _ = read_config_file(path / "config.json" if path.is_dir() else path)
    ft = file_type(type_name)
    planned = output_tensors(cfg, expected_shapes(cfg), ft)
    tensors = [Tensor(t.name, t.nbytes, t.type.name) for _, t in planned]
    return PlannedModel(str(path), ft.name, cfg.shape(), tensors)


def explicit_layers(n_layers: int, n_gpu_layers: int | None, n_cpu_moe: int | None) -> list[str] | None:
    """llama.cpp's spellings as a placement of expert layers (the other weights are always on the GPU): -ngl N puts
    the experts of the first N layers on the GPU and computes the rest on the CPU; --n-cpu-moe N computes the
    first N layers' experts on the CPU. None when neither is given (the planner places them)."""
    if not n_gpu_layers and n_cpu_moe is None:
        return None
    g = n_layers if not n_gpu_layers else min(n_gpu_layers, n_layers)
    c = n_cpu_moe or 0
    return ["cpu" if i < c or i >= g else "gpu" for i in range(n_layers)]


def run(a) -> None:
    from dgguf.core.native import default_threads
    from dgguf.runtime import planner as P
    from dgguf.runtime.bench import foreign_load
    from dgguf.runtime.model import DEFAULT_CTX
    if a.config is not None and a.type is None:
        raise DggufError("--config needs --type, the file type to plan for (e.g. --type Q4_K_M)")
    if a.model is not None and a.type is not None:
        raise DggufError("--type goes with --config; -m plans the file's own tensor types")
    card = P.card_key(a.card) if a.card else None
    budget = None
    if a.vram == "auto":
        from dgguf.runtime.cuda import detect_gpu
        free, total, name = detect_gpu()
        budget = free
        if card is None:
            card = P.card_for_gpu_name(name)
            if card is None:
                card = P.card_for_budget(total)
                print(f"note: no figures for {name}; predicting for the {P.CARDS[card].name} (use --card)",
                      file=sys.stderr)
    elif a.vram is not None:
        budget = P.parse_size(a.vram)
    elif card != P.CPU_CARD:
        raise DggufError("--vram is required: a size such as 12GiB, or auto (or --card cpu for no GPU)")
    model = P.model_from_gguf(a.model) if a.model else model_from_config(a.config, a.type)
    limit = model.shape.context_length
    ctx = min(a.ctx or DEFAULT_CTX, limit)   # as `dgguf run`: the model's context length caps it
    if a.ctx is not None and a.ctx > limit:
        print(f"note: --ctx {a.ctx} is beyond the model's context length; planning for {limit}", file=sys.stderr)

    def measure_cpu():
        if a.cpu_gops is None or a.cpu_gbs is None:
            load = foreign_load()
            if load is not None and load > 0.2:
                print(f"warning: other processes kept {load:.2f} cores busy while the CPU's speed was measured; "
                      "its figures (and the CPU-side alternatives) are pessimistic: pass --cpu-gops/--cpu-gbs "
                      "from a quiet run", file=sys.stderr)
        return P.measure_cpu(model, default_threads(), a.cpu_gops, a.cpu_gbs)

    layers = explicit_layers(model.shape.n_layers, a.n_gpu_layers, a.n_cpu_moe)
    plan = P.make_plan(model, budget, card or P.card_for_budget(budget), ctx, a.steps, measure_cpu,
                       a.kv_type, P.parse_size(a.reserve, "--reserve", zero=True), a.gemm, a.offload, layers)
    if a.json:
        json.dump(plan.to_json(), sys.stdout)
        print()
    else:
        print(P.format_plan(plan))


def add_parser(sub) -> None:
    pl = sub.add_parser("plan", help="what lives on the GPU at a VRAM budget, and the predicted speed")
    src = pl.add_mutually_exclusive_group(required=True)
    src.add_argument("-m", "--model", help="a DiffusionGemma GGUF (only its header is read)")
    src.add_argument("--config", help="an HF config.json or its directory (with --type)")
    pl.add_argument("--type", type=type_name, help="the file type `dgguf convert --type` would write")
    pl.add_argument("--vram", help="budget in binary units (12GiB, 12288MiB, bytes) or auto (GPU 0's free memory)")
    pl.add_argument("--ctx", type=positive("--ctx"), default=None,
                    help="KV cache positions (default 8192, capped by the model, as dgguf run)")
    pl.add_argument("--steps", type=positive("--steps"), default=16, help="denoising steps per canvas (default 16)")
    pl.add_argument("--card", help="GPU to predict for (default: the detected one, else the smallest listed card "
                                   "holding the budget); cpu = no GPU")
    pl.add_argument("--kv-type", choices=("f16", "f32"), help="KV cache element (default f16; f32 with --card cpu)")
    pl.add_argument("--gemm", choices=("tf32", "fp16", "int8"), default="tf32",
                    help="GEMM path: tf32 (native/cuda's kernels, what dgguf run --gpu uses); fp16 and int8 price "
                         "tensor-core kernels it does not have")
    pl.add_argument("--offload", choices=("auto", "cpu", "stream"), default="auto",
                    help="where expert layers that do not fit go (auto: the faster by the cost model)")
    pl.add_argument("-ngl", "--n-gpu-layers", dest="n_gpu_layers", type=integer("-ngl", 0, 10**6), default=None,
                    help="as dgguf run: the experts of the first N layers on the GPU, the rest on the CPU")
    pl.add_argument("--n-cpu-moe", type=integer("--n-cpu-moe", 0, 10**6), default=None,
                    help="as dgguf run: the experts of the first N layers on the CPU")
    pl.add_argument("--reserve", default="512MiB", help="VRAM kept for the CUDA context and workspaces")
    pl.add_argument("--cpu-gops", type=number("--cpu-gops"), help="CPU matmul GOP/s (default: measured)")
    pl.add_argument("--cpu-gbs", type=number("--cpu-gbs"), help="CPU memory GB/s (default: measured)")
    pl.add_argument("--json", action="store_true")
    pl.set_defaults(func=run)
