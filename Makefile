# Every target works on a fresh machine: the venv and models are made on demand.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
MODEL := models/SmolLM2-135M-Instruct.Q4_1.gguf

.PHONY: setup setup-test test-roots browser nginx elf-tools models models-all test test-fast test-slow bench bench-big demo clean

setup: $(VENV)/.runtime

$(VENV)/.runtime: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $@

# Test references (torch, transformers, gguf, llama-cpp-python). llama-cpp-python
# compiles from source once (~15 min on 2 cores); pip caches the wheel afterwards.
setup-test: $(VENV)/.test browser nginx elf-tools test-roots

# Built for this CPU, but without AMX: on a VM that reports AMX yet faults on its
# first tile instruction (ldtilecfg), every llama.cpp call segfaulted. Not from
# pip's wheel cache: a wheel cached on another CPU may not run on this one.
PEER_CMAKE_ARGS := -DCMAKE_C_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16' -DCMAKE_CXX_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16'

$(VENV)/.test: $(VENV)/.runtime
	CMAKE_ARGS="$(PEER_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=2 $(PY) -m pip install --quiet --no-cache-dir 'llama-cpp-python>=0.3'
	CMAKE_BUILD_PARALLEL_LEVEL=2 $(PY) -m pip install --quiet -e '.[test]'
	touch $@

# Debian trixie roots (Python 3.13) that the bundle tests run a bundle in, made once with
# debootstrap from Debian's packages and kept outside the clone, so later `make test` runs reuse them.
TEST_ROOTS ?= /var/cache/llamazip-test-roots
test-roots: $(TEST_ROOTS)/trixie-amd64/.complete $(TEST_ROOTS)/trixie-arm64/.complete

$(TEST_ROOTS)/trixie-amd64/.complete:
	command -v debootstrap >/dev/null || { apt-get update -q && apt-get install -y -q debootstrap; }
	rm -rf $(TEST_ROOTS)/trixie-amd64.partial && mkdir -p $(TEST_ROOTS)
	debootstrap --variant=minbase --include=python3 trixie $(TEST_ROOTS)/trixie-amd64.partial http://deb.debian.org/debian
	rm -rf $(TEST_ROOTS)/trixie-amd64 && mv $(TEST_ROOTS)/trixie-amd64.partial $(TEST_ROOTS)/trixie-amd64
	touch $@

# The arm64 root runs under qemu-user-static, started by hand inside the chroot (no binfmt_misc
# needed, which a container may not have). Without binfmt nothing arm64 can run debootstrap's
# second stage, so the first stage's packages are unpacked with dpkg-deb (no maintainer scripts:
# Python needs none to run).
$(TEST_ROOTS)/trixie-arm64/.complete:
	command -v debootstrap >/dev/null || { apt-get update -q && apt-get install -y -q debootstrap; }
	command -v qemu-aarch64-static >/dev/null || { apt-get update -q && apt-get install -y -q qemu-user-static; }
	rm -rf $(TEST_ROOTS)/trixie-arm64.partial && mkdir -p $(TEST_ROOTS)
	debootstrap --arch=arm64 --foreign --variant=minbase --include=python3 trixie $(TEST_ROOTS)/trixie-arm64.partial http://deb.debian.org/debian
	for deb in $(TEST_ROOTS)/trixie-arm64.partial/var/cache/apt/archives/*.deb; do dpkg-deb -x "$$deb" $(TEST_ROOTS)/trixie-arm64.partial || exit 1; done
	cp "$$(command -v qemu-aarch64-static)" $(TEST_ROOTS)/trixie-arm64.partial/usr/bin/qemu-aarch64-static
	rm -rf $(TEST_ROOTS)/trixie-arm64 && mv $(TEST_ROOTS)/trixie-arm64.partial $(TEST_ROOTS)/trixie-arm64
	touch $@

# The ELF stripper's tests build small shared libraries (64- and 32-bit) and read them back.
elf-tools:
	command -v gcc >/dev/null && command -v readelf >/dev/null || { apt-get update -q && apt-get install -y -q gcc binutils; }

# The web chat test drives Debian's Chromium (our machines run as root).
browser:
	command -v chromium >/dev/null || { apt-get update -q && apt-get install -y -q chromium; }

# The balancer test runs Debian's nginx on loopback with its own configuration (never the
# system's service). The package lists are fetched only when the install needs them.
nginx:
	command -v nginx >/dev/null || apt-get install -y -q nginx || { apt-get update -q && apt-get install -y -q nginx; }

models: $(MODEL)

$(MODEL): $(VENV)/.runtime
	$(PY) tests/models.py smollm2

models-all: models
	$(PY) tests/models.py smollm2 qwen2.5 gemma3

test: setup-test models-all
	$(PY) -m pytest -q

# Everything neither `model` (a real model) nor `slow`: needs `make setup-test`, no model
# download. LLAMAZIP_MODELS_DIR names a folder that cannot exist, so a test that reads a
# real model without the `model` marker fails here even where models/ has been fetched.
test-fast: setup-test
	LLAMAZIP_MODELS_DIR=/dev/null/models $(PY) -m pytest -q -m "not model and not slow"

# The long runs: fuzzing with 10,000 inputs per reader, the server under load (~10 minutes).
test-slow: setup-test models
	nice $(PY) -m pytest -q -s -m slow

bench: setup-test models
	$(PY) bench/bench.py
	$(PY) bench/bench_server.py
	$(PY) bench/bench_lookup.py

# Decode at real sizes (Llama 3.2 1B / 3B, Llama 3.1 8B shapes; random weights written
# once into models/big/, ~15 GB), beside llama.cpp on the same files (~20 minutes).
bench-big: setup-test models
	$(PY) bench/bench_big.py

BUNDLE := smollm2.llamazip

$(BUNDLE): $(MODEL) $(VENV)/.runtime
	$(VENV)/bin/llamazip build -m $(MODEL) -o $(BUNDLE)

# Chat with the bundle in the terminal (Ctrl-D leaves).
demo: $(BUNDLE)
	./$(BUNDLE)

clean:
	rm -rf $(VENV) build *.egg-info $(BUNDLE)
