"""Shared test fixtures: CPU only, tiny models and images."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


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
