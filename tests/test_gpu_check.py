"""benchmarks/gpu_check.py runs on a bare GPU box: torch, pydantic and the worker-side modules only."""

import subprocess
import sys

import pytest

from .conftest import ROOT

# Make `import ray` (and the other driver-side packages) fail inside the script's process.
BLOCKED = "import sys; [sys.modules.__setitem__(m, None) for m in ('ray', 'mlflow', 'optuna', 'typer')]"


def run_check(*args: str) -> subprocess.CompletedProcess:
    code = f"{BLOCKED}; import runpy; sys.argv = ['gpu_check.py', *{list(args)!r}]; " \
           f"runpy.run_path('benchmarks/gpu_check.py', run_name='__main__')"
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_without_cuda_it_says_in_one_line_that_it_skipped():
    r = run_check()
    assert r.returncode == 0 and r.stdout.strip().splitlines() == [
        "gpu_check: skipped, no CUDA device here (run it on a GPU node; --device cpu checks the script)"]


@pytest.mark.slow
def test_its_checks_pass_on_the_cpu_without_ray_mlflow_or_optuna():
    r = run_check("--device", "cpu", "--width", "0.0625", "--images", "128")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "gpu_check: 7/7 checks passed"
