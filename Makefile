# pvt-dist: `make demo` and `make test` set up everything from a fresh checkout.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# DeepSpeed JIT-compiles a communication op on first init (~80 s): cache it inside the ignored build area.
export TORCH_EXTENSIONS_DIR := $(CURDIR)/build/torch_extensions
PYTEST_ARGS ?= --durations=25
# DALI wheel for torch's CUDA major (pyproject extras cuda13 | cuda12).
CUDA_EXTRA ?= cuda13

.PHONY: all venv system-deps cluster lint format test test-all demo bench clean

all: test

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	# torch/torchvision first, pinned to the releases this machine's index serves.
	$(BIN)/pip install torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -e '.[$(CUDA_EXTRA),dev]'
	touch $@

venv: $(STAMP)

# Debian packages: Slurm + munge + MariaDB (the local test cluster) and the Fashion-MNIST data set.
system-deps:
	bash scripts/install_system_deps.sh

# A real two-node Slurm cluster on this machine (idempotent).
cluster: system-deps
	bash slurm/local-cluster/up.sh

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: venv
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Default test run: everything except GPU-only and long tests (those are skipped / deselected, not hidden).
test: venv system-deps cluster lint
	OMP_NUM_THREADS=1 $(BIN)/pytest -m "not slow" $(PYTEST_ARGS)

test-all: venv system-deps cluster
	OMP_NUM_THREADS=1 $(BIN)/pytest $(PYTEST_ARGS)

demo: venv system-deps
	bash scripts/demo.sh

bench: venv
	$(BIN)/python bench/model_throughput.py --model pvt_v2_b2 --batch 8 --size 224 --dtype fp32 bf16

clean:
	rm -rf build runs .pytest_cache .ruff_cache
