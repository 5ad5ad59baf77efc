#!/usr/bin/env python3
"""Train the small DiffusionGemma that ships with dgguf (models/small) on pinned CPython standard-library sources.

    python scripts/train_small.py --out DIR [--steps N] [--threads T] [--export MODEL_DIR] [--stop-after N]
    python scripts/train_small.py --write-heldout PATH     # the held-out files, concatenated
    python scripts/train_small.py --write-manifest PATH    # pin a corpus (maintainers)

The corpus is the top-level *.py modules of CPython 3.11.7's standard library (no packages, so no test/ or
site-packages), listed with their sha256 in scripts/corpus/stdlib-3.11.7.txt; every 20th file is held out. The
script checks every hash before it trains and stops with one error naming the first file that differs.

Model: transformers' DiffusionGemmaForBlockDiffusion (the released architecture), H=256, 4 layers [S, F, S, F]
(sliding window 64, full layers K=V), dense MLP 512 beside 8 experts of width 256 (top-2), self-conditioning,
canvas 32, a byte-level BPE of 4096 pieces trained on the training files. Objective (block diffusion): a clean
causal prefix of random length (shared by the batch) goes through the encoder; the next 32 tokens are the canvas,
each position replaced by a uniform random token with probability t ~ U(0, 1] per example; the decoder sees the
noisy canvas bidirectionally and the loss is the cross-entropy of the clean tokens at every canvas position
(clean positions too: uniform noise gives no mask, so the model must also recognise which tokens to keep, and
the runtime commits the argmax of every position). Self-conditioning uses the two-pass trick: for half the
examples (per example) a first pass without it runs under no_grad and its logits feed the second pass, the only
one with a loss.

One torch.Generator drives data order, noise and the self-conditioning coin, so a run is deterministic for a
fixed --threads. DIR holds state.pt (weights, optimizer, generator, step, clocks), written atomically every
--save-every steps; rerunning the same command continues from it and ends with the same bytes as an
uninterrupted run. loss.jsonl logs step, train loss, lr, wall and CPU seconds, and held-out canvas loss at
--eval-every steps. At the end the bf16 HF checkpoint is written to DIR/model (or --export).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import shutil
import sys
import sysconfig
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPTS))

from make_checkpoint import (  # noqa: E402
    BOS_ID, EOS_ID, PAD_ID, SPECIAL_TOKENS, TinySpec, build_config, write_json)

from dgguf.core.errors import DggufError  # noqa: E402

S, F = "sliding_attention", "full_attention"
CORPUS_PYTHON = "3.11.7"
MANIFEST = SCRIPTS / "corpus" / f"stdlib-{CORPUS_PYTHON}.txt"
HELDOUT_EVERY = 20  # file i (sorted) is held out when i % 20 == 10: 5% of the files, spread over the alphabet

# Reserved so that the vision placeholder ids of the config never collide with a text piece.
IMAGE_TOKENS = ["<start_of_image>", "<end_of_image>", "<image>"]
TOKENS = SPECIAL_TOKENS + IMAGE_TOKENS

SMALL = TinySpec(
    vocab_size=4096, hidden_size=256, intermediate_size=512, moe_intermediate_size=256, layer_types=(S, F, S, F),
    num_attention_heads=4, head_dim=64, num_key_value_heads=2, global_head_dim=128, num_global_key_value_heads=1,
    num_experts=8, top_k_experts=2, sliding_window=64, canvas_length=32, dtype="bf16",
)
# For tests: every size minimal, same structure.
TINY = TinySpec(
    vocab_size=320, hidden_size=64, intermediate_size=64, moe_intermediate_size=32, layer_types=(S, F),
    num_attention_heads=2, head_dim=16, num_key_value_heads=1, global_head_dim=32, num_global_key_value_heads=1,
    num_experts=4, top_k_experts=2, sliding_window=8, canvas_length=8, dtype="bf16",
)
SIZES = {"small": SMALL, "tiny": TINY}

# Fixed, distinct layer scalars (buffers, not trained) so that a runtime mixing the encoder's and the decoder's
# values changes the output.
DECODER_SCALAR, ENCODER_SCALAR = 0.9, 0.8

# Sampler defaults calibrated for the small model with dgguf's runtime (scripts/evaluate_small.py --calibrate).
# Cooler than the release's 0.4..0.8: at those temperatures this model's canvases rarely settle (the stop fired on
# 9% of canvases); here it fires on all of them, median 19 of 32 steps (docs/small-model.md has the table).
GENERATION_DEFAULTS = dict(max_new_tokens=64, max_denoising_steps=32, t_min=0.1, t_max=0.5, stability_threshold=1,
                           confidence_threshold=0.02)
ENTROPY_BOUND = 0.1

EVAL_NOISE = (0.25, 0.5, 0.75, 1.0)
EVAL_CONTEXT = 64


@dataclass(frozen=True)
class TrainConfig:
    """Everything that shapes the run; a resumed run must match it exactly."""
    size: str = "small"
    steps: int = 1200
    batch: int = 32
    max_context: int = 128  # clean prefix tokens after <bos>, drawn uniformly from 0..max_context per batch
    lr: float = 2e-3
    warmup: int = 50
    weight_decay: float = 0.01
    seed: int = 0
    threads: int = 2
    manifest: str = str(MANIFEST)
    corpus_root: str = ""


# --------------------------------------------------------------------------------------------------- corpus


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def select_files(root: Path) -> list[str]:
    """The pinned selection rule: top-level modules only (packages hold the test/ trees), sorted by name."""
    return sorted(p.name for p in root.glob("*.py") if p.is_file())


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_manifest(root: Path, path: Path) -> None:
    lines = [f"# {len(select_files(root))} files under the stdlib of CPython {CORPUS_PYTHON}: sha256 split path"]
    for i, name in enumerate(select_files(root)):
        split = "heldout" if i % HELDOUT_EVERY == HELDOUT_EVERY // 2 else "train"
        lines.append(f"{sha256(root / name)} {split} {name}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def read_corpus(root: Path, manifest: Path) -> dict[str, list[str]]:
    """{"train": [text...], "heldout": [text...]} in manifest order, every file checked against its sha256."""
    if not manifest.is_file():
        raise DggufError(f"{manifest}: corpus manifest not found")
    splits: dict[str, list[str]] = {"train": [], "heldout": []}
    for n, line in enumerate(manifest.read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split(" ", 2)
        if len(parts) != 3 or parts[1] not in splits:
            raise DggufError(f"{manifest}:{n}: expected 'sha256 train|heldout path', got {line!r}")
        digest, split, rel = parts
        path = root / rel
        if not path.is_file():
            raise DggufError(f"{path}: corpus file missing (pinned by {manifest}; the corpus is the standard library "
                             f"of CPython {CORPUS_PYTHON}, this is Python {sys.version.split()[0]})")
        if sha256(path) != digest:
            raise DggufError(f"{path}: sha256 differs from {manifest} (the corpus is the standard library of "
                             f"CPython {CORPUS_PYTHON}, this is Python {sys.version.split()[0]})")
        splits[split].append(path.read_text(encoding="utf-8"))
    if not splits["train"] or not splits["heldout"]:
        raise DggufError(f"{manifest}: needs at least one train and one heldout file")
    return splits


def write_heldout(path: Path, root: Path | None = None, manifest: Path = MANIFEST) -> None:
    """The held-out files concatenated in manifest order (what `dgguf eval --text` reads)."""
    text = "".join(read_corpus(root or stdlib_root(), manifest)["heldout"])
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


# --------------------------------------------------------------------------------------------------- tokenizer


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE (any text round-trips) with the Gemma special-token layout; prepends <bos> like Gemma's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    if tok.get_vocab_size() != vocab_size:
        raise DggufError(f"the training files give a BPE of {tok.get_vocab_size()} pieces, the model needs "
                         f"{vocab_size}: use a larger corpus")
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", BOS_ID)])
    return tok


def encode_files(tok, texts: list[str]):
    """One int64 tensor per file: its pieces then <eos>."""
    import torch
    return [torch.tensor(e.ids + [EOS_ID], dtype=torch.long)
            for e in tok.encode_batch(texts, add_special_tokens=False)]


# --------------------------------------------------------------------------------------------------- data


def sample_batch(files, batch: int, context: int, canvas: int, gen, whole: bool = False):
    """`batch` windows at uniform positions over all files: <bos> + `context` clean tokens, then `canvas` clean
    target tokens, padded with <pad> past the file's <eos> unless `whole` keeps every canvas inside its file.
    Files too short for a window are skipped."""
    import torch
    tail = canvas - 1 if whole else 0
    starts = torch.tensor([max(len(f) - context - tail, 0) for f in files])
    cum = torch.cumsum(starts, 0)
    pick = torch.randint(int(cum[-1]), (batch,), generator=gen)
    ctx = torch.full((batch, 1 + context), BOS_ID, dtype=torch.long)
    clean = torch.full((batch, canvas), PAD_ID, dtype=torch.long)
    for b, u in enumerate(pick.tolist()):
        i = int(torch.searchsorted(cum, u, right=True))
        s = context + u - (int(cum[i - 1]) if i else 0)
        ctx[b, 1:] = files[i][s - context:s]
        window = files[i][s:s + canvas]
        clean[b, :len(window)] = window
    return ctx, clean


def add_noise(clean, t, vocab: int, gen):
    """Replace each position by a uniform random token with probability t (one level per example)."""
    import torch
    hit = torch.rand(clean.shape, generator=gen) < t[:, None]
    return torch.where(hit, torch.randint(vocab, clean.shape, generator=gen), clean)


def canvas_logits(model, context, noisy, sc_mask=None):
    """Decoder logits of `noisy` after encoding `context`; with sc_mask, the two-pass self-conditioning trick."""
    import torch
    cache = model.model.encoder(input_ids=context).cache
    sc = None
    if sc_mask is not None and bool(sc_mask.any()):
        with torch.no_grad():
            sc = model(cache=cache, decoder_input_ids=noisy).logits
    return model(cache=cache, decoder_input_ids=noisy, self_conditioning_logits=sc,
                 self_conditioning_mask=sc_mask if sc is not None else None).logits


def heldout_set(files, spec: TinySpec, n: int = 64, seed: int = 1234):
    """Fixed held-out canvases: n windows with EVAL_CONTEXT tokens of context and one noise draw per level."""
    import torch
    gen = torch.Generator().manual_seed(seed)
    context = min(EVAL_CONTEXT, max(len(f) for f in files) - spec.canvas_length)  # tiny test corpora
    ctx, clean = sample_batch(files, n, context, spec.canvas_length, gen, whole=True)
    noisy = {t: add_noise(clean, torch.full((n,), t), spec.vocab_size, gen) for t in EVAL_NOISE}
    return ctx, clean, noisy


def heldout_loss(model, heldout, batch: int = 16) -> dict[str, float]:
    """Mean cross-entropy (nats) of the clean held-out canvas tokens per noise level, first step (no SC)."""
    import torch
    import torch.nn.functional as nnf
    ctx, clean, noisy = heldout
    out = {}
    with torch.no_grad():
        for t, canvas in noisy.items():
            total = 0.0
            for i in range(0, len(ctx), batch):
                logits = canvas_logits(model, ctx[i:i + batch], canvas[i:i + batch])
                total += float(nnf.cross_entropy(logits.flatten(0, 1), clean[i:i + batch].flatten(), reduction="sum"))
            out[f"{t:g}"] = total / clean.numel()
    return out


# --------------------------------------------------------------------------------------------------- model


def build_model(spec: TinySpec):
    import torch
    from transformers import DiffusionGemmaForBlockDiffusion

    V = spec.vocab_size
    config = build_config(spec, "f32")
    # Only <eos> ends a text here (make_checkpoint's list mimics the release's three ids).
    config.eos_token_id = [EOS_ID]
    config.text_config.eos_token_id = EOS_ID
    config.boi_token_id, config.eoi_token_id, config.image_token_id = (TOKENS.index(t) for t in IMAGE_TOKENS)
    model = DiffusionGemmaForBlockDiffusion(config)
    assert model.config.text_config.vocab_size == V
    with torch.no_grad():
        for layer in model.model.decoder.layers:
            layer.layer_scalar.fill_(DECODER_SCALAR)
        for layer in model.model.encoder.language_model.layers:
            layer.layer_scalar.fill_(ENCODER_SCALAR)
    return model.train()


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1)
    return cfg.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(progress, 1.0))))


def make_optimizer(model, cfg: TrainConfig):
    import torch
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "vision" not in n]
    rest = [p for n, p in model.named_parameters() if p.ndim < 2 and "vision" not in n]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))


# --------------------------------------------------------------------------------------------------- output


def atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_generation_config(model) -> None:
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
        DiffusionGemmaGenerationConfig, EntropyBoundSamplerConfig)
    model.generation_config = DiffusionGemmaGenerationConfig(
        **GENERATION_DEFAULTS, sampler_config=EntropyBoundSamplerConfig(entropy_bound=ENTROPY_BOUND),
        eos_token_id=[EOS_ID], pad_token_id=PAD_ID, bos_token_id=BOS_ID)


def export(model, tok, out: Path, log: Path | None) -> None:
    """The HF layout in bf16: config, generation config, weights, tokenizer files, loss log."""
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    final = copy.deepcopy(model).to(torch.bfloat16).eval()
    write_generation_config(final)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out) as scratch:
        final.save_pretrained(scratch)
        tok.save(str(Path(scratch) / "tokenizer.json"))
        special = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
                   "mask_token": "<mask>"}
        write_json(Path(scratch) / "tokenizer_config.json", {
            "tokenizer_class": "PreTrainedTokenizerFast", **special, "add_bos_token": True,
            "add_eos_token": False, "model_max_length": 1024, "clean_up_tokenization_spaces": False})
        if log is not None:
            shutil.copy(log, Path(scratch) / "loss.jsonl")
        for path in Path(scratch).iterdir():
            os.replace(path, out / path.name)


# --------------------------------------------------------------------------------------------------- training


class Run:
    """A training run in DIR: corpus, tokenizer, model, optimizer and generator, restored from state.pt if there."""

    def __init__(self, out: Path, cfg: TrainConfig):
        import torch
        from tokenizers import Tokenizer

        self.out, self.cfg, self.spec = out, cfg, SIZES[cfg.size]
        out.mkdir(parents=True, exist_ok=True)
        root = Path(cfg.corpus_root) if cfg.corpus_root else stdlib_root()
        corpus = read_corpus(root, Path(cfg.manifest))
        tok_path = out / "tokenizer.json"
        if tok_path.is_file():
            self.tok = Tokenizer.from_file(str(tok_path))
        else:
            self.tok = train_tokenizer(corpus["train"], self.spec.vocab_size)
            atomic_write(tok_path, lambda tmp: self.tok.save(str(tmp)))
        self.train_files = encode_files(self.tok, corpus["train"])
        self.heldout = heldout_set(encode_files(self.tok, corpus["heldout"]), self.spec)

        torch.manual_seed(cfg.seed)
        self.model = build_model(self.spec)
        self.optim = make_optimizer(self.model, cfg)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.step, self.seconds, self.cpu_seconds = 0, 0.0, 0.0
        self.log = out / "loss.jsonl"
        state_path = out / "state.pt"
        if state_path.is_file():
            state = torch.load(state_path, weights_only=False)
            if state["config"] != asdict(cfg):
                raise DggufError(f"{state_path}: holds a run with other settings {state['config']}; "
                                 "rerun with the same options or use another --out")
            self.model.load_state_dict(state["model"])
            self.optim.load_state_dict(state["optim"])
            self.gen.set_state(state["generator"])
            self.step, self.seconds, self.cpu_seconds = state["step"], state["seconds"], state["cpu_seconds"]
            # Drop log lines written after the checkpoint (an interrupted run), so the log reads as one run.
            lines = self.log.read_text().splitlines() if self.log.is_file() else []
            kept = [ln for ln in lines if json.loads(ln)["step"] <= self.step]
            atomic_write(self.log, lambda tmp: tmp.write_text("".join(ln + "\n" for ln in kept)))

    def save(self) -> None:
        import torch
        state = {"config": asdict(self.cfg), "step": self.step, "model": self.model.state_dict(),
                 "optim": self.optim.state_dict(), "generator": self.gen.get_state(), "seconds": self.seconds,
                 "cpu_seconds": self.cpu_seconds}
        atomic_write(self.out / "state.pt", lambda tmp: torch.save(state, tmp))

    def train_step(self) -> float:
        import torch
        import torch.nn.functional as nnf
        cfg, spec, gen = self.cfg, self.spec, self.gen
        context = int(torch.randint(cfg.max_context + 1, (), generator=gen))
        ctx, clean = sample_batch(self.train_files, cfg.batch, context, spec.canvas_length, gen)
        t = 1.0 - torch.rand(cfg.batch, generator=gen)  # U(0, 1]
        noisy = add_noise(clean, t, spec.vocab_size, gen)
        sc_mask = torch.rand(cfg.batch, generator=gen) < 0.5
        for group in self.optim.param_groups:
            group["lr"] = learning_rate(cfg, self.step)
        logits = canvas_logits(self.model, ctx, noisy, sc_mask)
        loss = nnf.cross_entropy(logits.flatten(0, 1), clean.flatten())
        self.optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optim.step()
        return float(loss.detach())

    def write_log(self, entry: dict) -> None:
        with self.log.open("a") as f:
            f.write(json.dumps(entry) + "\n")

    def evaluate(self) -> None:
        self.model.eval()
        self.write_log({"step": self.step, "heldout_loss": heldout_loss(self.model, self.heldout)})
        self.model.train()

    def train(self, save_every: int, eval_every: int, log_every: int, stop_after: int | None) -> None:
        if self.step == 0 and not self.log.is_file():
            self.evaluate()
        done_here = 0
        while self.step < self.cfg.steps and (stop_after is None or done_here < stop_after):
            wall, cpu = time.perf_counter(), cpu_time()
            loss = self.train_step()
            self.step += 1
            done_here += 1
            self.seconds += time.perf_counter() - wall
            self.cpu_seconds += cpu_time() - cpu
            if not math.isfinite(loss):
                raise DggufError(f"training loss became {loss} at step {self.step}; lower --lr")
            if self.step % log_every == 0 or self.step == self.cfg.steps:
                self.write_log({"step": self.step, "loss": round(loss, 5), "lr": learning_rate(self.cfg, self.step - 1),
                                "seconds": round(self.seconds, 1), "cpu_seconds": round(self.cpu_seconds, 1)})
                print(f"step {self.step}/{self.cfg.steps} loss {loss:.4f} {self.seconds:.0f} s", flush=True)
            if self.step % eval_every == 0 or self.step == self.cfg.steps:
                self.evaluate()
            if self.step % save_every == 0 or self.step == self.cfg.steps:
                self.save()


def cpu_time() -> float:
    t = os.times()
    return t.user + t.system


def user_errors(command, args) -> int:
    """Run command(args); a DggufError prints one line, `error: ...`, and gives exit status 2."""
    try:
        command(args)
    except DggufError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def train_command(a) -> None:
    root = a.corpus_root or stdlib_root()
    if a.write_manifest:
        write_manifest(root, a.write_manifest)
        return
    if a.write_heldout:
        write_heldout(a.write_heldout, root, a.manifest)
        return
    if a.out is None:
        raise DggufError("--out DIR is required to train")
    for name in ("steps", "batch", "threads", "save_every", "eval_every", "log_every"):
        if getattr(a, name) < 1:
            raise DggufError(f"--{name.replace('_', '-')} must be at least 1")
    import torch
    torch.set_num_threads(a.threads)
    cfg = TrainConfig(size=a.size, steps=a.steps, batch=a.batch, max_context=a.max_context, lr=a.lr,
                      warmup=a.warmup, seed=a.seed, threads=a.threads, manifest=str(a.manifest),
                      corpus_root=str(a.corpus_root or ""))
    run = Run(a.out, cfg)
    run.train(a.save_every, a.eval_every, a.log_every, a.stop_after)
    if run.step == cfg.steps:
        export(run.model, run.tok, a.export or a.out / "model", run.log)
        print(f"wrote {a.export or a.out / 'model'}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    d = TrainConfig()
    p.add_argument("--out", type=Path, help="run directory (state.pt, loss.jsonl, tokenizer.json, model/)")
    p.add_argument("--export", type=Path, help="where to write the HF checkpoint (default: OUT/model)")
    p.add_argument("--size", default=d.size, choices=list(SIZES))
    p.add_argument("--steps", type=int, default=d.steps, help="total optimizer steps of the run")
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--max-context", type=int, default=d.max_context)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=d.threads)
    p.add_argument("--corpus-root", type=Path, help="where the manifest's paths live (default: this stdlib)")
    p.add_argument("--manifest", type=Path, default=MANIFEST)
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--stop-after", type=int, help="stop after this many steps of this invocation (resume later)")
    p.add_argument("--write-heldout", type=Path, metavar="PATH", help="write the held-out text and exit")
    p.add_argument("--write-manifest", type=Path, metavar="PATH", help="pin the corpus root's files and exit")
    return user_errors(train_command, p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
