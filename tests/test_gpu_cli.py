"""`dgguf run --gpu` / -ngl / --n-cpu-moe and `dgguf plan` with the same options: run uses the placement plan
prints. Without a GPU, --gpu host runs the executor on the host backend (the budget enforced)."""
import json

import pytest
from dgguf.cli import main
from dgguf.cli.plan import explicit_layers
from dgguf.runtime.cuda import driver_devices

HAS_GPU = driver_devices()[0] > 0


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    from conftest import ROOT
    from dgguf.convert.quantize import convert_checkpoint
    return convert_checkpoint(ROOT / "models" / "small", tmp_path_factory.mktemp("s") / "small-Q8_0.gguf", "Q8_0")


def test_llama_cpp_spellings_as_placements():
    assert explicit_layers(4, 0, None) is None
    assert explicit_layers(4, 99, None) == ["gpu"] * 4
    assert explicit_layers(4, 2, None) == ["gpu", "gpu", "cpu", "cpu"]
    assert explicit_layers(4, 0, 1) == ["cpu", "gpu", "gpu", "gpu"]
    assert explicit_layers(4, 3, 1) == ["cpu", "gpu", "gpu", "cpu"]


def _run_json(args, capsys):
    assert main(["run"] + args + ["--json", "--prompt-ids", "2,5,6,7", "-n", "64", "-s", "3", "--steps", "6",
                                  "-t", "1", "-c", "256"]) == 0
    out = capsys.readouterr()
    return json.loads(out.out)["ids"], out.err


@pytest.mark.parametrize("placement", [["--n-cpu-moe", "1"], ["-ngl", "2"], ["--offload", "stream"], []])
def test_run_on_the_host_backend_gives_the_cpu_ids(small, capsys, placement):
    cpu, _ = _run_json(["-m", str(small)], capsys)
    dev, err = _run_json(["-m", str(small), "--gpu", "host", "--vram", "12MiB", "--kv-type", "f32"] + placement,
                         capsys)
    assert dev == cpu
    assert "gpu: host backend" in err


def test_plan_prints_the_placement_run_uses(small, capsys):
    assert main(["plan", "-m", str(small), "--vram", "12MiB", "--card", "rtx3060", "--ctx", "256", "--reserve", "0",
                 "--kv-type", "f32", "-ngl", "2", "--cpu-gops", "50", "--cpu-gbs", "10", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["layers"] == ["gpu", "gpu", "cpu", "cpu"] and plan["offload"] == "cpu"
    _, err = _run_json(["-m", str(small), "--gpu", "host", "--vram", "12MiB", "--kv-type", "f32", "-ngl", "2"], capsys)
    assert "expert layers 2 resident, 2 on the CPU, 0 streamed" in err


def test_host_backend_budget_too_small_is_one_line(small, capsys):
    assert main(["run", "-m", str(small), "--gpu", "host", "--vram", "1MiB", "--prompt-ids", "2,5", "-n", "8"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --vram 1.0 MiB is too small") and "Traceback" not in err


@pytest.mark.skipif(HAS_GPU, reason="a GPU is present")
@pytest.mark.parametrize("args", [["-ngl", "99"], ["--n-cpu-moe", "2"], ["--gpu"], ["--gpu", "0", "--vram", "4GiB"]])
def test_gpu_options_without_a_gpu_name_the_reason(small, capsys, args):
    assert main(["run", "-m", str(small), "--prompt-ids", "2,5", "-n", "8"] + args) == 2
    err = capsys.readouterr().err
    assert "need a GPU: no GPU: " in err and "--gpu host" in err and "Traceback" not in err
