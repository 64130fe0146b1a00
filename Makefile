# peftjax: `make test` and `make demo` set everything up themselves.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.peftjax-stamp
DEPS_HASH := $(shell cat pyproject.toml requirements/stack.txt requirements/constraints.txt requirements/fixtures.txt 2>/dev/null | sha256sum | cut -c1-16)

# Two shared cores: keep BLAS/OpenMP single-threaded and passive
# (docs/architecture.md#measuring-on-a-shared-cpu).
export OPENBLAS_NUM_THREADS := 1
export OMP_NUM_THREADS := 1
export MKL_NUM_THREADS := 1
export OMP_WAIT_POLICY := PASSIVE
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PYTHONHASHSEED := 0

PYTEST_ARGS ?=

.PHONY: setup test demo docs bench-env lint clean

$(PY):
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found; set PYTHON=/path/to/python3.11" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)

# Reinstall only when a dependency file changed (stamp keyed on their hash).
setup: $(PY)
	@if [ "$$(cat $(STAMP) 2>/dev/null)" != "$(DEPS_HASH)" ]; then \
	  set -e; \
	  echo "== installing the pinned stack into $(VENV)"; \
	  $(PIP) install -q --upgrade "pip>=24"; \
	  $(PIP) install -q -c requirements/constraints.txt -r requirements/stack.txt; \
	  $(PIP) install -q --no-deps -r requirements/fixtures.txt; \
	  $(PIP) install -q --no-deps -e .; \
	  echo "$(DEPS_HASH)" > $(STAMP); \
	else echo "== $(VENV) up to date"; fi

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

demo: setup
	$(PY) experiments/demo.py $(DEMO_ARGS)

# API reference from the Google-style docstrings: a static site in build/docs.
DOC_MODULES := peftjax peftjax.tree peftjax.adapters peftjax.optim peftjax.data \
  peftjax.io peftjax.io.checkpoint peftjax.models peftjax.models.llama peftjax.models.bert \
  peftjax.report peftjax.factored peftjax.quant peftjax.merge peftjax.inits peftjax.masks \
  peftjax.shard
docs: setup
	$(PY) -m pdoc --docformat google --no-show-source -o build/docs $(DOC_MODULES) '!peftjax\..*\._.*'
	@echo "== API reference: build/docs/index.html"

# Side environment for golden files and torch baselines only (never a
# dependency of the library or of make test).
bench-env:
	@test -x .venv-torch/bin/python || $(PYTHON) -m venv .venv-torch
	.venv-torch/bin/python -m pip install -q --upgrade pip
	.venv-torch/bin/python -m pip install -q torch==2.13.0
	.venv-torch/bin/python -m pip install -q torch==2.13.0 transformers==5.23.0 peft==0.21.2 galore-torch==1.0 gguf==0.19.0 safetensors==0.8.0 scikit-learn==1.9.1 numpy attrs
	touch .venv-torch/.ready

# ruff is a dev tool, not part of the tested stack: installed on first use.
RUFF_VERSION := 0.16.9
lint: setup
	@$(PY) -m ruff --version 2>/dev/null | grep -q "$(RUFF_VERSION)" || $(PIP) install -q ruff==$(RUFF_VERSION)
	$(PY) -m ruff check peftjax tests

clean:
	rm -rf $(VENV) .pytest_cache
