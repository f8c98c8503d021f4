# One command each, on a fresh machine: `make demo` (the main job) and `make test`.
# Both create .venv and install what they need first (about a minute the first time).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build of torch on machines without CUDA (a pinned version is a local wheel here);
# set TORCH_SPEC to install another build.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: setup test test-kernels test-trl-min demo lint clean

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

# The oldest TRL that setup.py's `trl` extra admits, installed beside .venv's own TRL (no deps: the
# newer transformers, accelerate and datasets of .venv serve it), and the adapter tests run on it.
TRL_MIN := $(shell sed -n 's/.*"trl>=\([0-9.]*\)".*/\1/p' setup.py)
TRL_MIN_DIR := $(VENV)/trl-$(TRL_MIN)

test-trl-min: $(STAMP)
	test -n "$(TRL_MIN)" || { echo "test-trl-min: no trl>= bound found in setup.py"; exit 1; }
	test -d $(TRL_MIN_DIR) || $(PY) -m pip install --quiet --no-deps --target $(TRL_MIN_DIR) "trl==$(TRL_MIN)"
	PYTHONPATH=$(TRL_MIN_DIR) $(PY) -c "import trl, sys; sys.exit(trl.__version__ != '$(TRL_MIN)' and f'test-trl-min: imported trl {trl.__version__}, not $(TRL_MIN)')"
	PYTHONPATH=$(TRL_MIN_DIR) $(PY) -m pytest -q -p no:cacheprovider tests/test_integrations_trl.py

demo: $(STAMP)
	$(VENV)/bin/mta-distill demo $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
