"""The VRAM planner (runtime/planner.py) and `dgguf plan`: exact sizes, placement within budget, and a cost
model whose predictions move the right way and respect physical lower bounds."""
import json

import pytest
from conftest import FIXTURES
from dgguf.cli import main
from dgguf.cli.plan import model_from_config
from dgguf.core.errors import DggufError
from dgguf.runtime import cuda
from dgguf.runtime import planner as P

REAL = FIXTURES / "real-config" / "config.json"
GIB = 1 << 30
MANDATORY = ("reserve", "embedding", "globals", "layers", "kv_cache", "buffers")
# A CPU figure fixed for the tests (about a desktop 8-core on quantized GEMMs); the default is measured.
CPU = P.CpuSpeed(gops_dense=300, gops_expert=200, gbs=50, source="given")


@pytest.fixture(scope="module")
def real():
    return {t: model_from_config(REAL, t) for t in ("Q4_K_M", "Q8_0")}


def expert_groups(plan):
    return [g for g in plan.groups if g.name.endswith(".experts")]


# ------------------------------------------------------------------------------------------------- sizes

def test_real_config_sizes_follow_the_q4_k_m_preset_by_hand(real):
    """Expert bytes from the spec's shapes and llama-quantize's rules, computed here without the converter:
    gate_up rows of 2816 take Q4_K (144 B per 256); down rows of 704 cannot hold 256-blocks, so Q4_K falls back
    to Q5_0 (22 B per 32) and, in the layers use_more_bits picks, Q6_K falls back to Q8_0 (34 B per 32)."""
    H, I, E, n = 2816, 704, 128, 30
    more_bits = [i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2 for i in range(n)]
    gate_up = H * 2 * I * E // 256 * 144
    down = [I * H * E // 32 * (34 if mb else 22) for mb in more_bits]
    plan = P.make_plan(real["Q4_K_M"], 80 * GIB, "h100", cpu=CPU)
    assert [g.bytes for g in expert_groups(plan)] == [gate_up + d for d in down]
    embedding = {g.name: g.bytes for g in plan.groups}["embedding"]
    assert embedding == 262144 * H // 256 * 210        # tied head: Q6_K, 210 B per 256


def test_kv_cache_matches_the_spec_per_token_figures(real):
    """Spec: sliding layers 25 x 8 x 256 x 2 (K, V) x 2 B = 200 KiB per token for at most W-1 = 1023 tokens; full
    layers 5 x 2 x 512 x 2 (K and V apart, as the executor and model.c store them) x 2 B per token; f32 twice."""
    m = real["Q4_K_M"]
    for ctx in (512, 8192, 262144):
        groups = {g.name: g.bytes for g in P.make_plan(m, 80 * GIB, "h100", ctx=ctx, cpu=CPU).groups}
        assert groups["kv_cache"] == min(ctx, 1023) * 200 * 1024 + ctx * 5 * 2 * 512 * 2 * 2
    cpu_plan = P.make_plan(m, None, "cpu", ctx=8192, cpu=CPU)   # the CPU runtime: f32
    groups = {g.name: g.bytes for g in cpu_plan.groups}
    assert groups["kv_cache"] == 2 * (1023 * 200 * 1024 + 8192 * 5 * 2 * 512 * 2 * 2)


@pytest.mark.parametrize("config,type_name", [("tiny", "Q8_0"), ("k256", "Q4_K_M"), ("k256", "Q2_K"),
                                              ("odd", "Q4_K_M")])
def test_config_and_type_plan_equals_the_converted_file(checkpoints, tmp_path, config, type_name):
    from dgguf.convert.quantize import convert_checkpoint
    hf = checkpoints(config)
    out = convert_checkpoint(hf, tmp_path / f"{config}.gguf", type_name)
    from_file, from_config = P.model_from_gguf(out), model_from_config(hf / "config.json", type_name)
    assert from_file.tensors == from_config.tensors
    assert from_file.shape == from_config.shape
    whole = P.make_plan(from_file, GIB, "rtx4090", ctx=64, cpu=CPU, reserve=0)
    budget = whole.vram_bytes - sum(g.bytes for g in expert_groups(whole)[1:])   # room for one expert layer
    a = P.make_plan(from_file, budget, "rtx4090", ctx=64, cpu=CPU, reserve=0)
    b = P.make_plan(from_config, budget, "rtx4090", ctx=64, cpu=CPU, reserve=0)
    assert a.groups == b.groups and a.seconds_per_step == b.seconds_per_step
    assert a.gpu_expert_layers == 1 and a.offload in ("cpu", "stream")


# --------------------------------------------------------------------------------------------- placement

@pytest.mark.parametrize("type_name", ["Q4_K_M", "Q8_0"])
@pytest.mark.parametrize("gib", [8, 12, 16, 24])
def test_real_config_plans_stay_within_budget_with_mandatory_groups_on_gpu(real, type_name, gib):
    budget = gib * GIB
    plan = P.make_plan(real[type_name], budget, "rtx4090", cpu=CPU)
    gpu = [g for g in plan.groups if g.placement == "gpu"]
    assert plan.vram_bytes == sum(g.bytes for g in gpu) <= budget
    assert [g.name for g in plan.groups[:6]] == list(MANDATORY) and all(g.placement == "gpu" for g in gpu[:6])
    experts = expert_groups(plan)
    assert [g.name for g in experts] == [f"blk.{i}.experts" for i in range(30)]
    places = [g.placement for g in experts]
    k = plan.gpu_expert_layers
    assert places == ["gpu"] * k + [plan.offload] * (30 - k)        # whole layers, in layer order
    if plan.offload == "none":
        return
    # sensible: not one more layer would have fitted (streaming also needs room for the next streamed layers)
    staging = sum(g.bytes for g in plan.groups if g.name == "staging")
    after = [g.bytes for g in experts[k + 1:]]
    staging_next = min(2, len(after)) * max(after, default=0) if plan.offload == "stream" else 0
    assert plan.vram_bytes - staging + experts[k].bytes + staging_next > budget
    assert plan.alternatives[plan.offload] == min(t for t in plan.alternatives.values() if t is not None)


def test_q4_k_m_fits_whole_at_24_gib_but_not_at_16(real):
    assert P.make_plan(real["Q4_K_M"], 24 * GIB, "rtx4090", cpu=CPU).offload == "none"
    assert P.make_plan(real["Q4_K_M"], 16 * GIB, "rtx4080", cpu=CPU).offload != "none"
    assert P.make_plan(real["Q8_0"], 24 * GIB, "rtx4090", cpu=CPU).offload != "none"   # 25 GB of weights


@pytest.mark.parametrize("type_name", ["Q4_K_M", "Q8_0"])
@pytest.mark.parametrize("card", sorted(P.CARDS))
def test_predicted_speed_never_falls_as_the_budget_grows(real, type_name, card):
    top = int(min(P.CARDS[card].vram_gib, 34) * 4)     # beyond 34 GiB both types fit whole
    plans = []
    for quarter in range(16, top + 1):      # 4 GiB up to the card's memory, in 0.25 GiB steps
        try:
            plans.append(P.make_plan(real[type_name], quarter * GIB // 4, card, cpu=CPU))
        except DggufError as e:
            assert "too small" in str(e)
    assert len(plans) >= 8
    for a, b in zip(plans, plans[1:]):
        assert b.seconds_per_step <= a.seconds_per_step
        assert b.tokens_per_s >= a.tokens_per_s


def test_longer_context_moves_expert_layers_off_the_gpu(real):
    short = P.make_plan(real["Q4_K_M"], 8 * GIB, "rtx4060-laptop", ctx=4096, cpu=CPU)
    long = P.make_plan(real["Q4_K_M"], 8 * GIB, "rtx4060-laptop", ctx=262144, cpu=CPU)
    kv = lambda p: {g.name: g.bytes for g in p.groups}["kv_cache"]
    assert kv(long) > kv(short) + 2 * GIB
    assert long.gpu_expert_layers < short.gpu_expert_layers
    assert long.seconds_per_step > short.seconds_per_step


def test_impossible_budget_names_the_budget_and_the_minimum(real):
    with pytest.raises(DggufError, match=r"--vram 2\.00 GiB is too small: the GPU needs at least 2\.7\d GiB"):
        P.make_plan(real["Q4_K_M"], 2 * GIB, "rtx4090", cpu=CPU)
    with pytest.raises(DggufError, match="more than the RTX 3060 12 GB's 12 GiB"):
        P.make_plan(real["Q4_K_M"], 16 * GIB, "rtx3060", cpu=CPU)
    with pytest.raises(DggufError, match="--ctx 300000 is outside"):
        P.make_plan(real["Q4_K_M"], 16 * GIB, "rtx4090", ctx=300000, cpu=CPU)


def test_cpu_card_places_everything_on_the_cpu(real):
    plan = P.make_plan(real["Q4_K_M"], None, "cpu", cpu=CPU)
    assert plan.vram_bytes == 0 and {g.placement for g in plan.groups} == {"cpu"}
    assert plan.kv_cache == "f32"


# ------------------------------------------------------------------------------------------- cost model

def test_step_work_matches_the_spec_totals(real):
    """Spec: one denoising step over 256 tokens is about 2.3 TFLOP, of which the experts are about 0.73."""
    glob, layers = P.pass_work(real["Q4_K_M"].shape, 256, 0, decoder=True)
    experts = sum(ly["experts"].flops for ly in layers)
    assert experts == 2 * 256 * 8 * 3 * 2816 * 704 * 30
    total = sum(w.flops for w in glob.values()) + sum(w.flops for ly in layers for w in ly.values())
    assert 2.2e12 < total < 2.45e12
    assert glob["head"].flops == glob["soft_embedding"].flops == 2 * 256 * 262144 * 2816


@pytest.mark.parametrize("context", [0, 23, 1500, 8192])
def test_decoder_work_equals_the_bench_multiply_add_count(real, context):
    from dgguf.runtime.bench import step_macs  # dgguf bench's own count, written independently
    shape = real["Q4_K_M"].shape
    glob, layers = P.pass_work(shape, 256, context, decoder=True)
    flops = sum(w.flops for w in glob.values()) + sum(w.flops for ly in layers for w in ly.values())
    assert flops == 2 * step_macs(shape, 256, context)


def test_predictions_respect_physical_lower_bounds(real):
    m = real["Q4_K_M"]
    weights = sum(t.nbytes for t in m.tensors)
    full = P.make_plan(m, 24 * GIB, "rtx4090", cpu=CPU)          # every weight read once per step
    assert full.seconds_per_step >= weights / (P.CARDS["rtx4090"].mem_gbs * 1e9)
    card = P.CARDS["rtx4060-laptop"]
    for mode, cpu in (("stream", CPU), ("cpu", P.CpuSpeed(1e5, 1e5, 1e4, "given"))):
        plan = P.make_plan(m, 8 * GIB, "rtx4060-laptop", cpu=cpu)
        assert plan.offload == mode
        off = [g for g in expert_groups(plan) if g.placement == mode]
        if mode == "stream":      # every streamed byte crosses the link each step
            assert plan.seconds_per_step >= sum(g.bytes for g in off) / (card.pcie_gbs * 1e9)
        else:                     # the CPU does the offloaded layers' expert GEMMs each step
            assert plan.seconds_per_step >= len(off) * 2 * 256 * 8 * 3 * 2816 * 704 / 1e14


def test_a_slow_cpu_streams_and_int8_gemms_are_never_slower(real):
    m = real["Q4_K_M"]
    slow = P.make_plan(m, 12 * GIB, "rtx3060", cpu=P.CpuSpeed(10, 10, 10, "given"))
    assert slow.offload == "stream" and "beats computing them on the CPU" in slow.reason
    for card in P.CARDS:
        a = P.make_plan(m, min(16, P.CARDS[card].vram_gib) * GIB, card, cpu=CPU)
        b = P.make_plan(m, min(16, P.CARDS[card].vram_gib) * GIB, card, cpu=CPU, gemm="int8")
        assert b.seconds_per_step <= a.seconds_per_step


def test_measured_cpu_speed_is_positive_on_a_small_model(checkpoints, tmp_path):
    from dgguf.convert.quantize import convert_checkpoint
    m = P.model_from_gguf(convert_checkpoint(checkpoints("k256"), tmp_path / "k.gguf", "Q4_K_M"))
    speed = P.measure_cpu(m, threads=1, repeats=1)
    assert speed.gops_dense > 0.1 and speed.gops_expert > 0.1 and speed.gbs > 0.1
    assert P.measure_cpu(m, 1, gops=5.0, gbs=7.0) == P.CpuSpeed(5.0, 5.0, 7.0, "given")


# ------------------------------------------------------------------------------------------ sizes, cards

@pytest.mark.parametrize("text,expected", [("12GiB", 12 * GIB), ("12288MiB", 12 * GIB), ("12 gib", 12 * GIB),
                                           ("11.5GiB", 23 * GIB // 2), ("4096", 4096), ("1TiB", 1 << 40)])
def test_parse_size_accepts_binary_units(text, expected):
    assert P.parse_size(text) == expected


@pytest.mark.parametrize("text,message", [("12GB", "write 12GiB"), ("12G", "write 12GiB"), ("12M", "write 12MiB"),
                                          ("twelve", "not a size"), ("0", "positive"), ("1.5", "whole number"),
                                          ("-3GiB", "not a size"), ("12 parsecs", "not a size")])
def test_parse_size_rejects_decimal_and_bad_values(text, message):
    with pytest.raises(DggufError, match=message):
        P.parse_size(text)


def test_card_names():
    assert P.card_key("RTX 4060 Laptop") == P.card_key("4060-laptop") == "rtx4060-laptop"
    assert P.card_key("H100") == "h100" and P.card_key("cpu") == "cpu"
    with pytest.raises(DggufError, match="unknown card"):
        P.card_key("Voodoo 2")
    assert P.card_for_gpu_name("NVIDIA GeForce RTX 3090 Ti") == "rtx3090ti"
    assert P.card_for_gpu_name("NVIDIA GeForce RTX 3090") == "rtx3090"
    assert P.card_for_gpu_name("NVIDIA H200") == "h200"
    assert P.card_for_gpu_name("NVIDIA A100-SXM4-80GB") is None
    assert [P.card_for_budget(g * GIB) for g in (8, 12, 16, 24, 32, 48)] == \
        ["rtx4060-laptop", "rtx3060", "rtx4080", "rtx4090", "rtx5090", "h100"]


@pytest.mark.parametrize("name,card,note", [("NVIDIA GeForce RTX 4070", "RTX 4070 12 GB", False),
                                            ("NVIDIA A100-SXM4-80GB", "H100 SXM 80 GB", True)])
def test_cli_auto_budget_is_the_free_memory_of_the_detected_card(monkeypatch, capsys, name, card, note):
    total = 12 * GIB if "4070" in name else 80 * GIB
    monkeypatch.setattr(cuda, "detect_gpu", lambda: (total - GIB, total, name))
    assert main(["plan", "--config", str(REAL), "--type", "Q4_K_M", "--vram", "auto", "--cpu-gops", "100",
                 "--cpu-gbs", "20", "--json"]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert out["budget_bytes"] == total - GIB and out["card"] == card
    assert ("no figures for " + name in captured.err) == note


def test_auto_without_a_driver_is_a_clear_error():
    with pytest.raises(DggufError, match="--vram auto: no GPU found"):
        cuda.detect_gpu("libcuda-absent.so.1")


# ------------------------------------------------------------------------------------------------- CLI

def test_cli_plan_json_carries_the_documented_keys(capsys):
    assert main(["plan", "--config", str(REAL), "--type", "Q4_K_M", "--vram", "12GiB", "--ctx", "4096",
                 "--steps", "24", "--card", "RTX 4070", "--cpu-gops", "150", "--cpu-gbs", "40", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("budget_bytes", "vram_bytes", "ctx", "steps_per_canvas", "seconds_per_step", "tokens_per_s",
                "card", "groups", "reason", "offload"):
        assert key in out, key
    assert out["budget_bytes"] == 12 * GIB >= out["vram_bytes"] > 11 * GIB
    assert (out["ctx"], out["steps_per_canvas"], out["card"]) == (4096, 24, "RTX 4070 12 GB")
    assert out["tokens_per_s"] == pytest.approx(256 / (24 * (out["seconds_per_step"] + out["sampler_seconds_per_step"])
                                                       + out["seconds_per_encoder_pass"]))
    assert {g["placement"] for g in out["groups"]} <= {"gpu", "cpu", "stream"}
    assert sum(g["bytes"] for g in out["groups"] if g["placement"] == "gpu") == out["vram_bytes"]


def test_cli_plan_of_a_gguf_prints_a_table(checkpoints, tmp_path, capsys):
    from dgguf.convert.quantize import convert_checkpoint
    out = convert_checkpoint(checkpoints("tiny"), tmp_path / "t.gguf", "Q8_0")
    assert main(["plan", "-m", str(out), "--vram", "1GiB", "--card", "rtx4060-laptop", "--ctx", "64",
                 "--reserve", "0"]) == 0
    text = capsys.readouterr().out
    assert "blk.0-3.experts" in text and "offload: none" in text and "tok/s at 16 steps" in text


@pytest.mark.parametrize("args,message", [
    (["--vram", "12GB"], "write 12GiB"),
    (["--vram", "2GiB"], "too small"),
    ([], "--vram is required"),
    (["--vram", "12GiB", "--card", "Voodoo"], "unknown card"),
    (["--vram", "12GiB", "--reserve", "lots"], "--reserve"),
])
def test_cli_plan_errors_are_one_line(capsys, args, message):
    assert main(["plan", "--config", str(REAL), "--type", "Q4_K_M"] + args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_cli_plan_needs_type_with_config_and_not_with_a_file(capsys, tmp_path):
    assert main(["plan", "--config", str(REAL), "--vram", "12GiB"]) == 2
    assert "--config needs --type" in capsys.readouterr().err
    assert main(["plan", "-m", str(tmp_path / "x.gguf"), "--type", "Q8_0", "--vram", "12GiB"]) == 2
    assert "--type goes with --config" in capsys.readouterr().err


def test_cli_plan_caps_ctx_at_the_models_limit_as_run_does(capsys):
    """The tiny published file's context is 1024: plan's default 8192 is capped, as `dgguf run` caps it, and an
    explicit --ctx beyond it is capped with a note instead of refused."""
    f = str(FIXTURES / "pr24423-tiny" / "tiny-Q8_0.gguf")
    assert main(["plan", "-m", f, "--vram", "8GiB", "--card", "rtx4060-laptop", "--cpu-gops", "100", "--cpu-gbs", "20",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ctx"] == 1024
    assert main(["plan", "-m", f, "--vram", "8GiB", "--card", "rtx4060-laptop", "--cpu-gops", "100", "--cpu-gbs", "20",
                 "--ctx", "100000", "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["ctx"] == 1024 and "note: --ctx 100000 is beyond the model's context length" in err


def test_cli_plan_warns_when_foreign_load_skews_the_cpu_measurement(capsys, monkeypatch):
    from dgguf.runtime import bench
    monkeypatch.setattr(bench, "foreign_load", lambda seconds=0.5: 1.3)
    monkeypatch.setattr(P, "measure_cpu", lambda *a, **k: P.CpuSpeed(100.0, 100.0, 20.0, "stub"))
    f = str(FIXTURES / "pr24423-tiny" / "tiny-Q8_0.gguf")
    assert main(["plan", "-m", f, "--card", "cpu"]) == 0
    assert "other processes kept 1.30 cores busy" in capsys.readouterr().err


# ------------------------------------------------------------------------------- the executor's placements

def test_forced_offload_and_explicit_placements(real):
    m = real["Q4_K_M"]
    stream = P.make_plan(m, 12 * GIB, "rtx3060", cpu=CPU, offload="stream")
    cpu = P.make_plan(m, 12 * GIB, "rtx3060", cpu=CPU, offload="cpu")
    names = lambda p: {g.name for g in p.groups}
    assert stream.offload == "stream" and "staging" in names(stream) and set(stream.layers) == {"gpu", "stream"}
    assert cpu.offload == "cpu" and "staging" not in names(cpu) and set(cpu.layers) == {"gpu", "cpu"}
    assert cpu.gpu_expert_layers > stream.gpu_expert_layers      # streaming's two slots take room
    layers = ["cpu"] * 2 + ["gpu"] * 27 + ["stream"]
    mixed = P.make_plan(m, 80 * GIB, "h100", cpu=CPU, layers=layers)
    assert mixed.layers == layers and mixed.offload == "mixed"
    assert {g.name: g.placement for g in mixed.groups}["blk.29.experts"] == "stream"
    with pytest.raises(DggufError, match="too small for this placement"):
        P.make_plan(m, 8 * GIB, "rtx4060-laptop", cpu=CPU, layers=["gpu"] * 30)


def test_step_traffic_is_what_crosses(real):
    """A resident step copies the ids, the self-conditioning logits up and the logits down; each CPU layer adds its
    [256, H] input and output and the routing; each streamed layer its experts."""
    m = real["Q4_K_M"]
    full = P.make_plan(m, 24 * GIB, "rtx4090", cpu=CPU)
    assert (full.step_h2d_bytes, full.step_d2h_bytes) == (4 * 256 + 4 * 256 * 262144, 4 * 256 * 262144)
    cpu = P.make_plan(m, 12 * GIB, "rtx3060", cpu=CPU, offload="cpu")
    n_cpu = cpu.layers.count("cpu")
    assert cpu.step_h2d_bytes - full.step_h2d_bytes == n_cpu * 4 * 256 * 2816
    assert cpu.step_d2h_bytes - full.step_d2h_bytes == n_cpu * 256 * (4 * 2816 + 8 * 8)
    stream = P.make_plan(m, 12 * GIB, "rtx3060", cpu=CPU, offload="stream")
    streamed = sum(g.bytes for g in stream.groups if g.placement == "stream")
    assert stream.step_h2d_bytes - full.step_h2d_bytes == streamed


def test_gpu_check_plans_are_current():
    from conftest import ROOT, _load_script
    assert (ROOT / "scripts" / "gpu_plans.txt").read_text() == "\n".join(_load_script("gpu_plans").lines()) + "\n"
