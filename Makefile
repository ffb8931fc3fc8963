# Two commands do all set-up on a fresh machine:
#   make demo   - create .venv if needed, then run a simulated federation on defaults
#   make test   - create .venv if needed, then lint and run the whole test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: venv demo test test-fast lint bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: the CPU build on local disk (a bare `torch` may pull a CUDA build)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

demo: venv
	$(BIN)/fedrg simulate

lint: venv
	$(BIN)/ruff check fedrg server clients tests benchmarks
	$(BIN)/mypy

test: venv lint
	$(BIN)/python -m pytest tests -q

test-fast: venv
	$(BIN)/python -m pytest tests -q -m "not slow"

bench: venv
	$(BIN)/python benchmarks/dp_overhead.py
	$(BIN)/python benchmarks/secagg_overhead.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
