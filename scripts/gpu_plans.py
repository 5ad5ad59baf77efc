"""The planner's placements and predictions for scripts/gpu_check.sh's real-shape stage, one line each:

    CARD NAME EXECUTOR_BUDGET_BYTES PLACEMENT PREDICTED_S_PER_STEP

for the real config at Q4_K_M (tests/fixtures/real-config), ctx 1024 (the check's 512-token prompt and its canvases),
an f16 KV cache, TF32 GEMMs, the 512 MiB reserve, budgets 8/12/16/24 GiB and fully resident, on the H100 and the
H200 (the machines the check runs on), with the CPU given as 500 GOP/s and 100 GB/s (the lent machine's 16 cores,
assumed). PLACEMENT has a letter a layer: G resident, C CPU, S streamed. EXECUTOR_BUDGET is the budget less the
reserve: what the executor may allocate (dg_cuda_check holds the CUDA backend to it).

    python scripts/gpu_plans.py > scripts/gpu_plans.txt     (tests/test_planner.py checks the file is current)
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUDGETS = (("8GiB", 8), ("12GiB", 12), ("16GiB", 16), ("24GiB", 24), ("resident", 40))
CTX = 1024


def lines() -> list[str]:
    from dgguf.cli.plan import model_from_config
    from dgguf.runtime import planner as P

    model = model_from_config(ROOT / "tests" / "fixtures" / "real-config", "Q4_K_M")
    cpu = P.CpuSpeed(500, 500, 100, "given")
    out = []
    for card in ("h100", "h200"):
        for name, gib in BUDGETS:
            plan = P.make_plan(model, gib * P.GIB, card, ctx=CTX, cpu=cpu, kv_type="f16")
            letters = "".join({"gpu": "G", "cpu": "C", "stream": "S"}[w] for w in plan.layers)
            out.append(f"{card} {name} {plan.budget_bytes - plan.reserve_bytes} {letters} {plan.seconds_per_step:.4f}")
    return out


if __name__ == "__main__":
    sys.stdout.write("\n".join(lines()) + "\n")
