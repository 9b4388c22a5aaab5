"""benchmarks/gpu_check.py runs on a bare GPU box: torch, pydantic and the worker-side modules only."""

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


def test_the_gpu_benchmark_skips_in_one_line_without_cuda_and_runs_without_ray_mlflow_or_optuna():
    r = run_gpu_benchmark()
    assert r.returncode == 0 and r.stdout.strip().splitlines() == [
        "gpu: skipped, no CUDA device here (run it on a GPU node; --device cpu checks the script)"]
    r = run_gpu_benchmark("--device", "cpu", "--width", "0.0625", "--batch-size", "16", "--steps", "1",
                          "--images", "256", "--no-compile")
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 8 and "images/s" in lines[1] and "1 epochs" not in lines[-2]
    assert lines[-1].endswith("h with the exact penalty") and "penalty" in lines[-1] and "ablation" in lines[-1]
