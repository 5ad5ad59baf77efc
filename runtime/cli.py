"""The `dgguf` command: convert, quantize, inspect, run, bench, eval, plan.

User errors print one line, `error: <message>`, and exit 2; `--debug` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import json
import sys

from dgguf.convert.errors import DggufError
from dgguf.convert.native import MAX_THREADS
from dgguf.convert.quant_types import FILE_TYPES


def _type_name(v: str) -> str:
    if v.upper() not in FILE_TYPES:
        raise argparse.ArgumentTypeError(f"unknown type {v!r}; choose one of: {', '.join(FILE_TYPES)}")
    return v.upper()


def cmd_convert(a) -> None:
    from dgguf.convert.quantize import convert_checkpoint
    out = convert_checkpoint(a.hf_dir, a.output, a.type, a.pure, a.force, a.threads, progress=not a.quiet)
    print(f"wrote {out}")


def cmd_quantize(a) -> None:
    from dgguf.convert.quantize import requantize
    out = requantize(a.input, a.output, a.type, a.pure, a.force, a.threads, progress=not a.quiet)
    print(f"wrote {out}")


def _short(v, limit: int = 6):
    if isinstance(v, list) and len(v) > limit:
        return v[:limit] + [f"... {len(v) - limit} more"]
    if isinstance(v, str) and len(v) > 200:
        return v[:200] + f"... ({len(v)} chars)"
    return v


def cmd_inspect(a) -> None:
    from dgguf.convert.gguf_file import read_gguf
    g = read_gguf(a.file)
    try:
        kv = {k: {"type": f.type.name if f.item_type is None else f"ARRAY[{f.item_type.name}]", "value": f.value}
              for k, f in g.fields.items()}
        tensors = [{"name": t.name, "ne": list(t.ne), "type": t.type.name, "bytes": t.nbytes} for t in g.tensors]
        if a.json:
            json.dump({"file": str(a.file), "kv": kv, "tensors": tensors}, sys.stdout)
            print()
            return
        print(f"{a.file}: {len(kv)} KV pairs, {len(tensors)} tensors, "
              f"{sum(t['bytes'] for t in tensors) / 2**20:.2f} MiB of tensor data")
        for k, f in kv.items():
            print(f"KV  {k:<52} {f['type']:<16} {_short(f['value'])!r}")
        for t in tensors:
            print(f"T   {t['name']:<52} {str(t['ne']):<22} {t['type']:<6} {t['bytes']}")
    finally:
        g.close()


def _integer(name: str, lo: int, hi: int):
    def parse(v: str) -> int:
        try:
            n = int(v)
        except ValueError:
            n = lo - 1
        if not lo <= n <= hi:
            raise argparse.ArgumentTypeError(f"{name} must be an integer in {lo}..{hi}, not {v!r}")
        return n
    return parse


def _positive(name: str, hi: int = 2**31 - 1):
    return _integer(name, 1, hi)


def _id_list(v: str) -> list[int]:
    try:
        ids = [int(x) for x in v.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--prompt-ids takes comma-separated integers, not {v!r}") from None
    if not ids:
        raise argparse.ArgumentTypeError("--prompt-ids is empty")
    return ids


def cmd_run(a) -> None:
    from dgguf.runtime.model import Model
    m = Model.load(a.model, threads=a.threads, ctx=a.ctx)
    if a.prompt_ids is not None:
        prompt = a.prompt_ids
    else:
        text = m.tokenizer.chat_prompt(a.prompt) if a.chat else a.prompt
        prompt = m.tokenizer.encode(text)
    overrides = {"max_denoising_steps": a.steps} if a.steps else {}
    show = _visual(m) if a.visual else None
    res = m.generate(prompt, max_new_tokens=a.n, seed=a.seed, early_stop=not a.no_early_stop, on_step=show,
                     **overrides)
    text = _decode(m, res.ids)
    st = res.stats
    if a.json:
        json.dump({"ids": res.ids, "text": text, "steps_per_canvas": st.steps_per_canvas,
                   "tokens_per_forward": st.tokens_per_forward, "seconds_per_step": st.seconds_per_step,
                   "tokens_per_s": st.tokens_per_s, "max_steps": st.max_steps}, sys.stdout)
        print()
        return
    if a.visual:
        sys.stderr.write("\n")
    print(text if text is not None else ",".join(map(str, res.ids)))
    print(f"[{len(res.ids)} tokens, steps per canvas {st.steps_per_canvas} (max {st.max_steps}), "
          f"{st.seconds_per_step:.3f} s/step, {st.tokens_per_s:.1f} tok/s]", file=sys.stderr)


def cmd_bench(a) -> None:
    import numpy as np

    from dgguf.runtime.bench import (best_of, denoise_step, floor_note, foreign_load, measured_peaks, peaks_note,
                                     step_floor, step_macs_by_part)
    from dgguf.runtime.model import Model
    m = Model.load(a.model, threads=a.threads, ctx=a.prompt + 2 * 4096)
    c = m.config
    C = c.canvas_length
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, c.vocab_size, a.prompt).astype(np.int32)
    canvas = rng.integers(0, c.vocab_size, C).astype(np.int32)
    sc = rng.standard_normal((C, c.vocab_size)).astype(np.float32)

    def best(fn):
        return best_of(fn, a.repeats)

    def encode_prompt():
        m.native.new_cache(a.prompt).encode(prompt)

    cache = m.native.new_cache(a.prompt + C)
    cache.encode(prompt)
    load = foreign_load()
    peaks = measured_peaks(m.native.threads)   # before the timing, as scripts/bench_step.py does
    logits = np.empty_like(sc)   # reused, as generation does: no fresh pages in the timing
    step = best(lambda: cache.decode(canvas, sc, out=logits))
    denoise = min(denoise_step(m, prompt, a.steps) for _ in range(a.repeats))
    enc_prompt = best(encode_prompt)
    enc_canvas = best(lambda: m.native.new_cache(C).encode(canvas))
    parts = step_macs_by_part(c, C, a.prompt)
    gops = 2 * sum(parts.values()) / step / 1e9
    floor = step_floor(m.gguf, parts, peaks)
    out = {"threads": m.native.threads, "canvas": C, "prompt_tokens": a.prompt, "seconds_per_step": step,
           "seconds_per_denoise_step": denoise, "seconds_prompt_encode": enc_prompt,
           "seconds_canvas_encode": enc_canvas, "step_gops": gops,
           "tokens_per_s": C / (a.steps * denoise + enc_canvas), "steps_per_canvas": a.steps,
           "foreign_load_cores": load, "peaks": peaks,
           "step_floor_seconds": sum(floor.values()) if floor else None}
    if a.json:
        json.dump(out, sys.stdout)
        print()
        return
    print(f"{a.model}: {m.native.threads} threads, canvas {C}, {a.prompt}-token prompt, best of {a.repeats}")
    if load is not None and load > 0.2:
        print(f"warning: other processes kept {load:.2f} cores busy before timing; the figures are low",
              file=sys.stderr)
    print(f"decoder step {step:.4f} s ({gops:.1f} GOP/s effective), denoising step with the sampler "
          f"{denoise:.4f} s ({a.steps} forced steps), prompt encode {enc_prompt:.4f} s, "
          f"canvas encode {enc_canvas:.4f} s; {out['tokens_per_s']:.1f} tok/s at {a.steps} steps per canvas")
    print(peaks_note(peaks))
    if floor:
        print(floor_note(floor, step))


def cmd_eval(a) -> None:
    from dgguf.runtime.model import Model
    from dgguf.runtime.quality import evaluate, file_stats
    try:
        with open(a.text, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise DggufError(f"cannot read --text {a.text}: {e}") from e
    ref = Model.load(a.ref, threads=a.threads, ctx=a.ctx)
    quant = Model.load(a.model, threads=a.threads, ctx=a.ctx)
    rep = evaluate(ref, quant, text, seed=a.seed, max_tokens=a.max_tokens, prompts=a.prompts,
                   new_tokens=a.new_tokens)
    out = {"model": a.model, "ref": a.ref, **file_stats(a.model), **rep.as_dict()}
    if a.json:
        json.dump(out, sys.stdout)
        print()
        return
    print(f"{a.model} against {a.ref}: {rep.tokens} held-out tokens, {rep.positions} canvas positions")
    print(f"size {out['size_bytes'] / 2**20:.2f} MiB, {out['bits_per_weight']:.2f} bits per weight")
    print(f"kl mean {rep.kl_mean:.3g} p99 {rep.kl_p99:.3g} nats, top1 {rep.top1:.4f}")
    for n in rep.by_noise:
        print(f"  noise {n.t:.2f}: kl mean {n.kl_mean:.3g} p99 {n.kl_p99:.3g}, top1 {n.top1:.4f}")
    print(f"committed {rep.committed:.4f}, steps_ratio {rep.steps_ratio:.3f} "
          f"({rep.quant_steps_per_canvas:.2f} / {rep.ref_steps_per_canvas:.2f} steps per canvas), "
          f"{rep.quant_seconds_per_step:.4f} s/step")

def _positive_number(name: str):
    def parse(v: str) -> float:
        try:
            x = float(v)
        except ValueError:
            x = -1.0
        if not 0 < x < float("inf"):
            raise argparse.ArgumentTypeError(f"{name} must be a positive number, not {v!r}")
        return x
    return parse


def cmd_plan(a) -> None:
    from dgguf.convert.quantize import default_threads
    from dgguf.runtime import planner as P
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
    model = P.model_from_gguf(a.model) if a.model else P.model_from_config(a.config, a.type)
    plan = P.make_plan(model, budget, card or P.card_for_budget(budget), a.ctx, a.steps,
                       lambda: P.measure_cpu(model, default_threads(), a.cpu_gops, a.cpu_gbs),
                       a.kv_type, P.parse_size(a.reserve, "--reserve", zero=True), a.gemm)
    if a.json:
        json.dump(plan.to_json(), sys.stdout)
        print()
    else:
        print(P.format_plan(plan))


def _decode(m, ids):
    try:
        return m.tokenizer.decode(ids)
    except DggufError:
        return None   # a file without the embedded tokenizer: ids only


def _visual(m):
    """Redraw the canvas in place on stderr before every denoising step."""
    def show(canvas_index, canvas):
        text = _decode(m, canvas)
        line = text if text is not None else " ".join(map(str, canvas))
        line = line.replace("\n", "\u21b5")[:200]
        sys.stderr.write(f"\r\x1b[2K[canvas {canvas_index}] {line}")
        sys.stderr.flush()
    return show


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dgguf", description="DiffusionGemma GGUF converter and runtime")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert", help="HF checkpoint directory → GGUF")
    c.add_argument("hf_dir")
    c.add_argument("-o", "--output", required=True)
    c.add_argument("--type", type=_type_name, default=None,
                   help=f"file type ({', '.join(FILE_TYPES)}); default: the checkpoint's dtype")
    c.set_defaults(func=cmd_convert)

    q = sub.add_parser("quantize", help="GGUF → GGUF of another type")
    q.add_argument("input")
    q.add_argument("output")
    q.add_argument("type", type=_type_name)
    q.set_defaults(func=cmd_quantize)

    for s in (c, q):
        s.add_argument("--pure", action="store_true", help="every matrix in the base type (no preset mix)")
        s.add_argument("--force", action="store_true", help="overwrite an existing output file")
        s.add_argument("--threads", type=_positive("--threads", MAX_THREADS), default=None)
        s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    r = sub.add_parser("run", help="generate text with a DiffusionGemma GGUF")
    r.add_argument("-m", "--model", required=True)
    src = r.add_mutually_exclusive_group(required=True)
    src.add_argument("-p", "--prompt", help="prompt text (tokenized with the model's own tokenizer)")
    src.add_argument("--prompt-ids", type=_id_list, help="prompt token ids, e.g. 2,17,42 (used verbatim)")
    r.add_argument("-n", type=_positive("-n"), default=256, help="new tokens (whole canvases are generated)")
    r.add_argument("--seed", type=_integer("--seed", 0, 2**64 - 1), default=None)
    r.add_argument("--threads", type=_positive("--threads", MAX_THREADS), default=None)
    r.add_argument("--ctx", type=_positive("--ctx"), default=None, help="context limit (default 8192)")
    r.add_argument("--steps", type=_positive("--steps"), default=None, help="max denoising steps per canvas")
    r.add_argument("--no-early-stop", action="store_true", help="always run --steps steps per canvas")
    r.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    r.add_argument("--json", action="store_true", help="print ids, text and stats as JSON")
    r.add_argument("--visual", action="store_true", help="show the canvas being denoised")
    r.set_defaults(func=cmd_run)

    b = sub.add_parser("bench", help="time a decoder step and the encoder passes of a GGUF")
    b.add_argument("-m", "--model", required=True)
    b.add_argument("--threads", type=_positive("--threads", MAX_THREADS), default=None)
    b.add_argument("--prompt", type=_positive("--prompt", 1 << 16), default=23, help="prompt tokens (random ids)")
    b.add_argument("--steps", type=_positive("--steps"), default=16, help="steps per canvas for tok/s")
    b.add_argument("--repeats", type=_positive("--repeats", 100), default=3)
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=cmd_bench)

    e = sub.add_parser("eval", help="divergence of a quantized GGUF from its reference on a held-out text")
    e.add_argument("-m", "--model", required=True, help="the GGUF to judge")
    e.add_argument("--ref", required=True, help="the reference GGUF (same model, BF16/F32)")
    e.add_argument("--text", required=True, help="held-out UTF-8 text file")
    e.add_argument("--seed", type=_integer("--seed", 0, 2**32 - 1), default=0)
    e.add_argument("--threads", type=_positive("--threads", MAX_THREADS), default=None)
    e.add_argument("--ctx", type=_positive("--ctx"), default=None, help="context limit (default 8192)")
    e.add_argument("--max-tokens", type=_positive("--max-tokens"), default=None,
                   help="score only the first N tokens of the text")
    e.add_argument("--prompts", type=_positive("--prompts", 1000), default=8, help="generations compared")
    e.add_argument("--new-tokens", type=_positive("--new-tokens"), default=None,
                   help="tokens per generation (default two canvases)")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=cmd_eval)

    pl = sub.add_parser("plan", help="what lives on the GPU at a VRAM budget, and the predicted speed")
    src = pl.add_mutually_exclusive_group(required=True)
    src.add_argument("-m", "--model", help="a DiffusionGemma GGUF (only its header is read)")
    src.add_argument("--config", help="an HF config.json or its directory (with --type)")
    pl.add_argument("--type", type=_type_name, help="the file type `dgguf convert --type` would write")
    pl.add_argument("--vram", help="budget in binary units (12GiB, 12288MiB, bytes) or auto (GPU 0's free memory)")
    pl.add_argument("--ctx", type=_positive("--ctx"), default=8192, help="KV cache positions (default 8192)")
    pl.add_argument("--steps", type=_positive("--steps"), default=16, help="denoising steps per canvas (default 16)")
    pl.add_argument("--card", help="GPU to predict for (default: the detected one, else the smallest listed card "
                                   "holding the budget); cpu = no GPU")
    pl.add_argument("--kv-type", choices=("f16", "f32"), help="KV cache element (default f16; f32 with --card cpu)")
    pl.add_argument("--gemm", choices=("fp16", "int8"), default="fp16", help="tensor-core path of the GEMMs")
    pl.add_argument("--reserve", default="512MiB", help="VRAM kept for the CUDA context and workspaces")
    pl.add_argument("--cpu-gops", type=_positive_number("--cpu-gops"), help="CPU matmul GOP/s (default: measured)")
    pl.add_argument("--cpu-gbs", type=_positive_number("--cpu-gbs"), help="CPU memory GB/s (default: measured)")
    pl.add_argument("--json", action="store_true")
    pl.set_defaults(func=cmd_plan)

    i = sub.add_parser("inspect", help="show a GGUF's metadata and tensors")
    i.add_argument("file")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_inspect)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except DggufError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:   # output piped into `head`: not an error
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
