# probekit — set-up, demo, tests, benchmarks. Every target installs what it needs first.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.probekit-installed
TORCH   := torch==2.13.0
PYTEST  := $(BIN)/python -m pytest

.PHONY: setup demo test test-all bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# The pinned CPU torch goes in first when no torch is present: an unpinned `torch` pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml | $(BIN)/python
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[dev,browser]"
	@touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/probekit demo

test: setup
	$(PYTEST) -m "not slow" -q

test-all: setup
	$(PYTEST) -q

bench: setup
	@set -e; for f in benchmarks/bench_*.py; do echo "== $$f"; $(BIN)/python $$f; done

clean:
	rm -rf $(VENV) build *.egg-info
