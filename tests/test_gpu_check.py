"""benchmarks/gpu_check.py runs on a bare GPU box: torch, pydantic and the worker-side modules only."""

import json
import re
import runpy
import subprocess
import sys

import pytest

from .conftest import ROOT

# Make `import ray` (and the other driver-side packages) fail inside the script's process.
BLOCKED = "import sys; [sys.modules.__setitem__(m, None) for m in ('ray', 'mlflow', 'optuna', 'typer')]"


def run_script(name: str, *args: str) -> subprocess.CompletedProcess:
    """``benchmarks/<name>`` with ``args``, in a process where ray, mlflow, optuna and typer cannot be imported."""
    code = f"{BLOCKED}; import runpy; sys.argv = [{name!r}, *{list(args)!r}]; " \
           f"runpy.run_path('benchmarks/{name}', run_name='__main__')"
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)


def run_check(*args: str) -> subprocess.CompletedProcess:
    return run_script("gpu_check.py", *args)


def test_without_cuda_it_says_in_one_line_that_it_skipped():
    r = run_check()
    assert r.returncode == 0 and r.stdout.strip().splitlines() == [
        "gpu_check: skipped, no CUDA device here (run it on a GPU node; --device cpu checks the script)"]


@pytest.mark.slow
def test_its_checks_pass_on_the_cpu_without_ray_mlflow_or_optuna():
    r = run_check("--device", "cpu", "--width", "0.0625", "--images", "128")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "gpu_check: 8/8 checks passed"


def run_gpu_benchmark(*args: str) -> subprocess.CompletedProcess:
    return run_script("gpu.py", *args)


def test_the_gpu_benchmark_skips_in_one_line_without_cuda_and_runs_without_ray_mlflow_or_optuna(tmp_path):
    r = run_gpu_benchmark()
    assert r.returncode == 0 and r.stdout.strip().splitlines() == [
        "gpu: skipped, no CUDA device here (run it on a GPU node; --device cpu checks the script)"]
    out = tmp_path / "gpu.json"
    r = run_gpu_benchmark("--device", "cpu", "--width", "0.0625", "--batch-size", "16", "--steps", "1",
                          "--images", "256", "--no-compile", "--packing", "1,2", "--packed-steps", "2",
                          "--json", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 11 and "images/s" in lines[1] and "1 epochs" not in lines[6], lines
    # two trials packed: separate processes whose steps were all counted (2 x 2 steps x 16 images in the span)
    assert lines[7].startswith("packing, 1 trial sharing the device: ") and "1.00x 1 alone" in lines[7]
    assert lines[8].startswith("packing, 2 trials sharing the device: ")
    assert lines[9].startswith("at the best packing (") and "the 12-run Table 2 grid" in lines[9]
    assert re.fullmatch(r"[\d,]+ images/s \(.+\); penalty [\d.]+x, finite difference [\d.]+x; ablation [\d.]+x; "
                        r"150 epochs [\d.]+ h plain, [\d.]+ h with the exact penalty; [12] packed: [\d,]+ images/s, "
                        r"Table 2 grid [\d.]+ h", lines[-1]), lines[-1]
    figures = json.loads(out.read_text())
    per_trial_1, per_trial_2 = figures["packed images/s, k=1"], figures["packed images/s, k=2"] / 2
    assert per_trial_1 > 0 and per_trial_2 > 0 and figures["best packing"] in (1, 2)
    best = figures["best packing"]
    # the projections follow from the measured rates: 150 x 50,000 images at the best packing's per-trial rate,
    # and the grid's 9 plain + 3 penalised runs at its aggregate rate
    rate = figures[f"packed images/s, k={best}"]
    assert figures["150 epochs h, best packing"] == pytest.approx(150 * 50_000 / (rate / best) / 3600)
    penalty = figures["penalty ratio, double_backprop"]
    assert figures["Table 2 grid h, best packing"] == pytest.approx(150 * 50_000 * (9 + 3 * penalty) / rate / 3600)

    # `make gpu-check`'s table holds every check and every figure, one row each
    check = runpy.run_path(str(ROOT / "benchmarks" / "gpu_check.py"), run_name="gpu_check")
    table = check["gpu_table"]("the CPU", [("train step, plain", True, "cosine 0.999")], figures, "")
    rows = table.splitlines()
    assert rows[0] == "| gpu-check on the CPU | result |" and rows[2] == "| train step, plain | ok: cosine 0.999 |"
    assert len(rows) == 3 + len(figures) - 3  # header, rule, the check, every figure but device, batch, width
    assert f"| packed images/s, k=2 | {figures['packed images/s, k=2']:,.0f} |" in rows


def test_make_gpu_check_says_in_one_line_that_it_skipped_without_cuda():
    r = subprocess.run(["make", "-s", "gpu-check"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().splitlines() == [
        "gpu-check: skipped, no CUDA device here (run it on a GPU node; --device cpu checks the script)"], r.stderr
