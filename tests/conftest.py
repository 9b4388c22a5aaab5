"""Shared test fixtures: CPU only, tiny models and images."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


# Tests write only under temporary directories: the checkout's own MLflow and output folders must not grow.
_WATCHED = ("mlruns", "mlartifacts", "outputs", "ray_results", "mlflow.db")


def _checkout_state() -> set[str]:
    found = set()
    for name in _WATCHED:
        path = ROOT / name
        if path.is_dir():
            found |= {str(p.relative_to(ROOT)) for p in path.rglob("*")}
        elif path.exists():
            found.add(f"{name}@{path.stat().st_size}")
    return found


def pytest_sessionstart(session):
    session.config._checkout_before = _checkout_state()


def pytest_sessionfinish(session, exitstatus):
    before = getattr(session.config, "_checkout_before", None)
    if before is None or exitstatus not in (0,):
        return
    written = sorted(_checkout_state() - before)
    if written:
        print(f"\nerror: the tests wrote into the checkout ({len(written)} paths, first: {written[0]}); "
              "tests must write only under temporary directories", file=sys.stderr)
        session.exitstatus = 1


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# Set by tests/test_exact_everywhere.py: keep the thread count its subprocess was started with.
KEEP_THREADS = "UNITSTUDY_KEEP_THREADS"


@pytest.fixture
def one_thread():
    """Tiny tensors: one intra-op thread (OpenMP spin-waits stall on a shared 2-core machine)."""
    if os.environ.get(KEEP_THREADS):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def run_study():
    """Run the ``study`` CLI in a subprocess; returns CompletedProcess (text)."""

    def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "study.cli", *args],
            capture_output=True,
            text=True,
            cwd=cwd or ROOT,
            timeout=300,
        )

    return run


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole test session (4 logical CPUs on 2 cores, DESIGN.md).

    Ray Train's health-check interval is shortened so fault-injection tests spend
    less time waiting for the controller to notice a dead worker.
    """
    import ray

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    ray.init(num_cpus=4, log_to_driver=False, logging_level="WARNING")
    yield ray
    ray.shutdown()
