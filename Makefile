# One command each, on a fresh machine: `make demo` (the main job) and `make test`.
# Both create .venv and install what they need first (about a minute the first time).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build of torch on machines without CUDA (a pinned version is a local wheel here);
# set TORCH_SPEC to install another build.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: setup test test-kernels demo lint clean

setup: $(STAMP)

$(STAMP): setup.py pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev,spacy,train,liger,peft,trl]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest tests -q

test-kernels: $(STAMP)
	$(PY) -m pytest -q tests/test_reference.py tests/test_validation.py \
		tests/test_token_importance.py tests/test_span_pool.py tests/test_pairwise_distance.py \
		tests/test_structural_loss.py tests/test_hidden_alignment.py tests/test_compile.py \
		tests/test_nan_policy.py

demo: $(STAMP)
	$(VENV)/bin/mta-distill demo $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
