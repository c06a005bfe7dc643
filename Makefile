# Set-up and entry points. `make release` and `make test` each install what they need first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU build of torch 2.13.0 first, so no later requirement pulls a multi-GB CUDA build.
TORCH ?= torch==2.13.0

.PHONY: install release test test-interop clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed

release: install
	$(PY) jobs/release.py $(ARGS)

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

# SAELens and sparsify pin newer transformers than qsae allows, so they get a venv of their own;
# the tests there load the release formats with each library and compare its codes with qsae's.
INTEROP_VENV ?= .venv-interop
$(INTEROP_VENV)/.installed:
	$(PYTHON) -m venv $(INTEROP_VENV)
	$(INTEROP_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(INTEROP_VENV)/bin/python -m pip install --quiet "$(TORCH)"
	$(INTEROP_VENV)/bin/python -m pip install --quiet sae-lens==6.54.12 eai-sparsify==1.3.3 pytest
	touch $@

test-interop: $(INTEROP_VENV)/.installed
	PYTHONPATH=. $(INTEROP_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/test_sae.py -k "saelens or sparsify"

clean:
	rm -rf runs .pytest_cache
