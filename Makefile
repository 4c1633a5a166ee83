# Every target works on a fresh machine: the venv and models are made on demand.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
MODEL := models/SmolLM2-135M-Instruct.Q4_1.gguf

.PHONY: setup setup-test models models-all test bench demo clean

setup: $(VENV)/.runtime

$(VENV)/.runtime: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $@

# Test references (torch, transformers, gguf, llama-cpp-python). llama-cpp-python
# compiles from source once (~15 min on 2 cores); pip caches the wheel afterwards.
setup-test: $(VENV)/.test

$(VENV)/.test: $(VENV)/.runtime
	CMAKE_BUILD_PARALLEL_LEVEL=2 $(PY) -m pip install --quiet -e '.[test]'
	touch $@

models: $(MODEL)

$(MODEL): $(VENV)/.runtime
	$(PY) tests/models.py smollm2

models-all: models
	$(PY) tests/models.py smollm2 qwen2.5 gemma3

test: setup-test models-all
	$(PY) -m pytest -q

bench: setup models
	$(PY) bench/bench.py

demo: setup models
	$(VENV)/bin/llamazip run -m $(MODEL) -p "The capital of France is" -n 48 --temp 0

clean:
	rm -rf $(VENV) build *.egg-info
