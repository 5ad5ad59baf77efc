"""The quantization quality card: convert a checkpoint to each type, run `dgguf eval` against its BF16 GGUF,
print README's table.

    python scripts/quality_card.py models/small --text heldout.txt --out-dir /tmp/card

Every figure comes from `dgguf eval --json` (definitions in runtime/quality.py); the BF16 file is the
reference because the shipped checkpoint is stored in BF16, so it is lossless. The reference runs on the float
path; each row, the BF16 file's own included, runs on the default kernel (which rounds BF16 weights' activations
to bfloat16 where the CPU has AVX512_BF16), so the BF16 row is that rounding's cost.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

TYPES = ["F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "Q3_K_M", "Q2_K"]


def dgguf(*args: str) -> str:
    return subprocess.run([sys.executable, "-m", "dgguf.cli", *args], check=True, text=True,
                          stdout=subprocess.PIPE).stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("hf_dir", type=Path)
    ap.add_argument("--text", type=Path, required=True, help="held-out text")
    ap.add_argument("--out-dir", type=Path, required=True)
    ap.add_argument("--types", nargs="+", default=TYPES)
    ap.add_argument("--threads", default="2")
    ap.add_argument("--max-tokens", default=None, help="score only the first N held-out tokens")
    ap.add_argument("--prompts", default="8")
    a = ap.parse_args()
    a.out_dir.mkdir(parents=True, exist_ok=True)
    ref = a.out_dir / "ref-BF16.gguf"
    dgguf("convert", str(a.hf_dir), "-o", str(ref), "--type", "BF16", "--force", "-q")
    common = ["--ref", str(ref), "--text", str(a.text), "--threads", a.threads, "--prompts", a.prompts, "--json"]
    if a.max_tokens:
        common += ["--max-tokens", a.max_tokens]
    rows = []
    for t in ["BF16", *a.types]:
        path = ref if t == "BF16" else a.out_dir / f"{t}.gguf"
        if t != "BF16":
            dgguf("convert", str(a.hf_dir), "-o", str(path), "--type", t, "--force", "-q")
        r = json.loads(dgguf("eval", "-m", str(path), *common))
        rows.append((t, r))
        print(f"{t}: {json.dumps(r)}", file=sys.stderr)
    r0 = rows[0][1]
    print(f"Held-out text: {r0['tokens']} tokens, {r0['positions']} canvas positions (4 noise levels); "
          f"{a.prompts} generations of the reference took {r0['ref_steps_per_canvas']:.2f} steps per canvas.\n")
    print("| type | size (MiB) | bits/weight | kl mean | kl p99 | top1 | committed | steps_ratio | s/step |")
    print("|---|---|---|---|---|---|---|---|---|")
    for t, r in rows:
        name = f"{t} (the reference file)" if t == "BF16" else t
        print(f"| {name} | {r['size_bytes'] / 2**20:.2f} | {r['bits_per_weight']:.2f} | {r['kl_mean']:.2e} | "
              f"{r['kl_p99']:.2e} | {r['top1']:.4f} | {r['committed']:.4f} | {r['steps_ratio']:.3f} | "
              f"{r['quant_seconds_per_step']:.4f} |")


if __name__ == "__main__":
    main()
