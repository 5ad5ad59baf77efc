"""`dgguf run`: generate text with a DiffusionGemma GGUF, with llama.cpp's flag spellings beside ours.

Text is printed canvas by canvas as each is committed; Ctrl-C keeps what was committed and exits 130. `--chat`
renders the prompt with the file's chat template; `-i` keeps a conversation (and its KV cache) across turns.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from dgguf.core.errors import DggufError
from dgguf.core.native import MAX_THREADS, default_threads
from dgguf.runtime.textstream import TextStream, open_tail_for

from .args import add_cheaper_steps, cheaper_steps, integer, number, positive, read_text
from .visual import CanvasView

# --temp T sets the schedule's first-step temperature (t_max) to T and scales t_min with it; 0 (llama.cpp's
# greedy) maps to this, since the entropy-bound sampler needs a positive temperature.
NEAR_GREEDY = 0.01


class Interrupted(Exception):
    """Ctrl-C during generation, after what was committed has been printed."""


def _id_list(v: str) -> list[int]:
    try:
        ids = [int(x) for x in v.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--prompt-ids takes comma-separated integers, not {v!r}") from None
    if not ids:
        raise argparse.ArgumentTypeError("--prompt-ids is empty")
    return ids


def _seed(v: str) -> int:
    """-1 (llama.cpp's spelling) or nothing: a random seed, which the summary prints."""
    n = integer("--seed", -1, 2**64 - 1)(v)
    return int.from_bytes(os.urandom(8), "little") if n == -1 else n


def _gpu_choice(v: str) -> str:
    if v in ("auto", "host") or (v.isdigit() and int(v) < 64):
        return v
    raise argparse.ArgumentTypeError(f"--gpu takes auto, a device number or host, not {v!r}")


def _read_prompt(a) -> str | None:
    if a.file is None:
        return a.prompt
    if a.file != "-":
        return read_text(a.file, "the prompt file")
    try:
        return sys.stdin.read()
    except (OSError, UnicodeDecodeError) as e:
        raise DggufError(f"cannot read the prompt from standard input: {e}") from e


def sampler_overrides(m, a) -> dict:
    out = {}
    if a.steps:
        out["max_denoising_steps"] = a.steps
    if a.temp is not None:
        sc = m.sampler_config()
        t_max = a.temp if a.temp > 0 else NEAR_GREEDY
        out.update(t_max=t_max, t_min=t_max * sc.t_min / sc.t_max)
    return out


def _summary(res, seed, n_tokens, interrupted=False) -> str:
    st = res.stats if res is not None else None
    head = f"interrupted after {n_tokens} tokens" if interrupted else f"{n_tokens} tokens"
    if st is None or not st.steps_per_canvas:
        return f"[{head}, seed {seed}]"
    return (f"[{head}, steps per canvas {st.steps_per_canvas} (max {st.max_steps}), {st.seconds_per_step:.3f} s/step, "
            f"{st.tokens_per_s:.1f} tok/s, seed {seed}]")


def _generate(m, a, prompt, context=None, echo: str | None = None):
    """Generate after prompt ids, streaming committed text to stdout; returns (result, committed ids). With
    --visual on the same terminal as stdout the text is written once the view is gone, not under it."""
    view = CanvasView(m, sys.stderr) if a.visual else None
    live = not (view is not None and view.tty and sys.stdout.isatty())
    stream = TextStream(m.tokenizer.decode, open_tail=open_tail_for(m.tokenizer, special=False)) \
        if m.has_tokenizer and not a.json else None
    committed: list[int] = []
    echoed = []

    def show(final):
        if stream is not None and (live or final):
            if not echoed:
                echoed.append(sys.stdout.write(echo or ""))
            delta = stream.finish(committed) if final else stream.update(committed)
            sys.stdout.write(delta.content)
            sys.stdout.flush()

    def on_step(c, canvas):
        if not echoed:   # the first step: the request was valid, the prompt is encoded
            show(final=False)
        if view is not None:
            view.step(c, canvas)

    def on_canvas(c, ids):
        committed.extend(ids)
        if view is not None:
            view.commit(ids)
        show(final=False)

    try:
        res = m.generate(prompt, max_new_tokens=a.n, seed=a.seed, early_stop=not a.no_early_stop,
                         on_step=on_step, on_canvas=on_canvas, context=context, **cheaper_steps(a),
                         **sampler_overrides(m, a))
    except KeyboardInterrupt:
        res = None
    if view is not None:
        view.close()
    show(final=True)
    if res is None:
        _finish(m, a, None, committed, interrupted=True)
        raise Interrupted
    return res, committed


def _finish(m, a, res, committed, interrupted=False) -> None:
    pad = m.config.pad_token_id
    ids = [i for i in committed if i != pad]
    if a.json:
        st = res.stats if res is not None else None
        text = m.tokenizer.decode(ids) if m.has_tokenizer else None
        json.dump({"ids": ids, "text": text, "seed": a.seed, "interrupted": interrupted,
                   "steps_per_canvas": st.steps_per_canvas if st else [],
                   "tokens_per_forward": st.tokens_per_forward if st else None,
                   "seconds_per_step": st.seconds_per_step if st else None,
                   "tokens_per_s": st.tokens_per_s if st else None,
                   "max_steps": st.max_steps if st else None}, sys.stdout)
        print()
        return
    if not m.has_tokenizer:
        print(",".join(map(str, ids)))
    else:
        print()
    print(_summary(res, a.seed, len(ids), interrupted), file=sys.stderr)


def _interactive(m, a) -> None:
    """A REPL: each line is a user turn; the conversation's KV cache is kept, so earlier turns are never encoded
    again. Without a chat template each line continues the text."""
    context = m.new_context()
    messages = [{"role": "system", "content": a.system}] if a.system else []
    history: list[int] = []
    use_template = bool(m.tokenizer.template)
    print(f"dgguf interactive: {m.path} ({'chat template' if use_template else 'plain text'}); "
          "an empty line or Ctrl-D ends, Ctrl-C stops a reply", file=sys.stderr)
    first = _read_prompt(a)
    while True:
        if first:
            line, first = first, None
        else:
            sys.stderr.write("> ")
            sys.stderr.flush()
            line = sys.stdin.readline()
            if not line or not line.strip():
                return
            line = line.rstrip("\n")
        if use_template:
            messages.append({"role": "user", "content": line})
            prompt = m.chat_prompt(messages, enable_thinking=a.think, context=context)
        else:
            prompt = history + m.tokenizer.encode(line, bos=not history)
        try:
            res, committed = _generate(m, a, prompt, context=context)
        except Interrupted:
            committed = []
            res = None
        ids = [i for i in committed if i != m.config.pad_token_id]
        if use_template:
            from dgguf.runtime.chat import parse_reply
            reply = parse_reply(m.tokenizer.decode(ids, special=True))
            messages.append({"role": "assistant", "content": reply.content})
        else:
            history = prompt + ids
        if res is not None:
            print(_summary(res, a.seed, len(ids)), file=sys.stderr)


def _warn_if_busy() -> None:
    """A note when other processes already keep most CPUs busy (the 1-minute load average, free to read)."""
    try:
        load, cpus = os.getloadavg()[0], os.cpu_count() or 1
    except (AttributeError, OSError):   # no load average on this system
        return
    if load > 0.75 * cpus:
        print(f"note: load average {load:.1f} on {cpus} CPUs: other processes are busy, so steps will be slower "
              "than on a quiet machine", file=sys.stderr)


def _use_gpu(m, a) -> None:
    """--gpu, --vram, -ngl, --n-cpu-moe: the plan `dgguf plan` prints for the same options, run by the hybrid
    executor (runtime/gpu.py); nothing when none is given (the CPU forward)."""
    if a.gpu is None and not a.n_gpu_layers and a.n_cpu_moe is None:
        return
    from dgguf.runtime import gpu
    from dgguf.runtime import planner as P
    from dgguf.runtime.cuda import cuda_status, detect_gpu

    from .plan import explicit_layers
    where = a.gpu or "auto"
    reserve = P.parse_size(a.reserve, "--reserve", zero=True)
    if where == "host":
        if a.vram in (None, "auto"):
            raise DggufError("--gpu host runs the executor on the CPU's twins with a budget: give it, e.g. --vram 8GiB")
        budget, card, device, reserve = P.parse_size(a.vram), None, 0, 0
    else:
        device = 0 if where == "auto" else int(where)
        status = cuda_status()
        if not status.available:
            raise DggufError(f"--gpu, -ngl/--n-gpu-layers and --n-cpu-moe need a GPU: {status.reason} (--gpu host runs "
                             "the same placement on the CPU; without these options dgguf run computes on the CPU)")
        free, total, name = detect_gpu(device=device)
        budget = free if a.vram in (None, "auto") else P.parse_size(a.vram)
        card = P.card_for_gpu_name(name) or P.card_for_budget(total)
    if card is None:
        card = P.card_for_budget(budget) if budget <= 80 * P.GIB else "h200"
    pm = P.model_from_gguf(a.model)
    layers = explicit_layers(pm.shape.n_layers, a.n_gpu_layers, a.n_cpu_moe)
    plan = P.make_plan(pm, budget, card, ctx=m.ctx, cpu=lambda: P.measure_cpu(pm, a.threads),
                       kv_type=a.kv_type, reserve=reserve, offload=a.offload, layers=layers)
    gpu.use_device(m, "host" if where == "host" else "cuda", plan, threads=a.threads, device=device)
    counts = {w: plan.layers.count(w) for w in ("gpu", "cpu", "stream")}
    print(f"gpu: {'host backend' if where == 'host' else f'CUDA device {device}'}, {P.fmt_size(plan.vram_bytes)} "
          f"planned of {P.fmt_size(budget)}: expert layers {counts['gpu']} resident, {counts['cpu']} on the CPU, "
          f"{counts['stream']} streamed (dgguf plan shows the groups); KV cache {plan.kv_cache}", file=sys.stderr)


def run(a) -> None:
    from dgguf.runtime.model import Model
    if a.prompt_ids is not None and (a.chat or a.interactive):
        raise DggufError("--prompt-ids are used verbatim: they cannot go with --chat or -i")
    if not a.interactive and a.prompt is None and a.file is None and a.prompt_ids is None:
        raise DggufError("give a prompt: -p TEXT, -f FILE (- for stdin) or --prompt-ids, or -i for a conversation")
    m = Model.load(a.model, threads=a.threads, ctx=a.ctx)
    try:
        _use_gpu(m, a)
    except BaseException:
        m.close()
        raise
    _warn_if_busy()
    try:
        if a.interactive:
            return _interactive(m, a)
        text = _read_prompt(a)
        if a.prompt_ids is not None:
            prompt = a.prompt_ids
            echo = m.tokenizer.decode(prompt) if m.has_tokenizer else None
        elif a.chat:
            messages = ([{"role": "system", "content": a.system}] if a.system else []) + [
                {"role": "user", "content": text}]
            prompt, echo = m.chat_prompt(messages, enable_thinking=a.think), None
        else:
            prompt, echo = m.tokenizer.encode(text), text
        res, committed = _generate(m, a, prompt, echo=None if a.no_echo else echo)
        _finish(m, a, res, committed)
    finally:
        m.close()


def add_parser(sub) -> None:
    r = sub.add_parser("run", help="generate text with a DiffusionGemma GGUF",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    r.add_argument("-m", "--model", required=True, help="the GGUF (dgguf's or a published one)")
    src = r.add_mutually_exclusive_group()
    src.add_argument("-p", "--prompt", help="prompt text (tokenized with the model's own tokenizer)")
    src.add_argument("-f", "--file", help="read the prompt from a file (- for stdin)")
    src.add_argument("--prompt-ids", type=_id_list, help="prompt token ids, e.g. 2,17,42 (used verbatim)")
    r.add_argument("-n", "--n-predict", dest="n", type=positive("-n"), default=256,
                   help="new tokens at most (whole canvases are generated, then cut)")
    r.add_argument("-s", "--seed", type=_seed, default="-1", help="random seed; -1 picks one (printed at the end)")
    r.add_argument("-t", "--threads", type=positive("--threads", MAX_THREADS), default=default_threads(),
                   help="CPU threads")
    r.add_argument("-c", "--ctx-size", "--ctx", dest="ctx", type=positive("--ctx"), default=None,
                   help="context limit in tokens (default 8192, capped by the model)")
    r.add_argument("--steps", type=positive("--steps"), default=None,
                   help="max denoising steps per canvas (default: the file's, 48 for the released model)")
    r.add_argument("--temp", type=number("--temp", zero=True), default=None,
                   help="first-step temperature (the schedule's t_max; t_min scales with it; 0 means "
                        f"{NEAR_GREEDY}, near greedy); default: the file's schedule (0.8 to 0.4)")
    r.add_argument("--no-early-stop", action="store_true", help="always run --steps steps per canvas")
    add_cheaper_steps(r)
    r.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    r.add_argument("--system", help="a system message for --chat and -i")
    r.add_argument("--think", action="store_true", default=None,
                   help="enable_thinking for templates that have it (--chat, -i)")
    r.add_argument("-i", "--interactive", action="store_true",
                   help="a conversation: one turn per line, keeping the KV cache between turns")
    r.add_argument("--no-echo", action="store_true", help="do not print the prompt before the generated text")
    r.add_argument("--json", action="store_true", help="print ids, text and stats as JSON (no streaming)")
    r.add_argument("--visual", action="store_true", help="show the canvas being denoised (on stderr)")
    r.add_argument("--gpu", nargs="?", const="auto", default=None, type=_gpu_choice, metavar="auto|N|host",
                   help="run on a GPU (device N; auto: 0) as `dgguf plan` places the model; host: the same executor "
                        "on the CPU's twins, for checking a placement without a GPU")
    r.add_argument("--vram", default=None, help="GPU memory budget in binary units (8GiB) or auto (the device's free "
                                                "memory; the default)")
    r.add_argument("--kv-type", choices=("f16", "f32"), default=None, help="the GPU KV cache's element (default f16)")
    r.add_argument("--offload", choices=("auto", "cpu", "stream"), default="auto",
                   help="where expert layers that do not fit the GPU go: computed on the CPU or streamed over PCIe "
                        "(auto: the faster by the planner's cost model)")
    r.add_argument("--reserve", default="512MiB", help="GPU memory left for the CUDA context and libraries")
    r.add_argument("-ngl", "--n-gpu-layers", "--gpu-layers", dest="n_gpu_layers", type=integer("-ngl", 0, 10**6),
                   default=0, help="llama.cpp's spelling: the experts of the first N layers on the GPU, the rest "
                                   "computed on the CPU (the other weights are always on the GPU); 0: no GPU")
    r.add_argument("--n-cpu-moe", type=integer("--n-cpu-moe", 0, 10**6), default=None,
                   help="llama.cpp's spelling: the experts of the first N layers computed on the CPU")
    r.set_defaults(func=run)
