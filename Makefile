# Each target bootstraps .venv from pyproject.toml (re-installed when pyproject changes).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: quickstart test bench gpu-check clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing unitstudy and its dependencies into $(VENV) (first time: a few minutes)"
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[test]' 2>&1 | grep -v "^WARNING: Location" || true
	@$(BIN)/python -c "import torch, torchvision, ray, optuna, mlflow, study, trainables, analysis" \
	  || { echo "error: the install into $(VENV) failed; see the pip output above" >&2; exit 1; }
	@touch $(STAMP)

quickstart: $(STAMP)
	$(BIN)/study quickstart --config configs/quickstart.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	@for b in benchmarks/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

# The GPU check and speed figures in one command (under 8 minutes on a CUDA machine), ending with one table;
# without CUDA one line. Needs torch and pydantic only: no .venv is built when there is none (a bare GPU box).
GPU_PYTHON := $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON))
gpu-check:
	@$(GPU_PYTHON) benchmarks/gpu_check.py --table

clean:
	rm -rf $(VENV) .pytest_cache
