# Two commands do everything on a fresh machine (see README):
#   make demo   — the SAM polyp example on its built-in default (tiny SAM, synthetic data, CPU)
#   make test   — the whole test suite
# Both create .venv, install requirements-dev.txt and build the extension lora_fused._C in place.
#   make test-gpu-stack — CI's second leg: the suite on the GPU machines' torch 2.11 / triton 3.6,
#                 in its own venv and a copy of the tree (so the two builds of _C never mix).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
MAX_JOBS ?= 2
PYTEST_ARGS ?=

DEPS_STAMP  := $(VENV)/.deps-installed
BUILD_STAMP := $(VENV)/.extension-built
EXT_SOURCES := setup.py $(wildcard csrc/*)

STACK_DIR   ?= .gpu-stack
STACK_PY    := $(STACK_DIR)/venv/bin/python
STACK_STAMP := $(STACK_DIR)/venv/.deps-installed
# The slow CPU training runs and the GPU check's shell dry run do not depend on the stack.
STACK_PYTEST_ARGS ?= -m "not slow" --ignore=tests/test_gpu_check.py

.PHONY: demo test test-gpu-stack build install bench gpu-check clean

$(DEPS_STAMP): requirements-dev.txt requirements-common.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet -r requirements-dev.txt
	touch $@

# The extension builds against the torch in .venv, hence --no-build-isolation.
$(BUILD_STAMP): $(DEPS_STAMP) $(EXT_SOURCES)
	MAX_JOBS=$(MAX_JOBS) $(PIP) install --quiet --no-deps --no-build-isolation -e .
	touch $@

install: $(BUILD_STAMP)
build: $(BUILD_STAMP)

demo: $(BUILD_STAMP)
	$(PY) -m examples.sam_polyp demo

# make test always builds lora_fused._C, so a missing extension is a failure, not a skip.
test: $(BUILD_STAMP)
	LORA_FUSED_REQUIRE_EXTENSION=1 $(PY) -m pytest $(PYTEST_ARGS)

$(STACK_STAMP): requirements-gpu-stack.txt requirements-common.txt
	$(PYTHON) -m venv $(STACK_DIR)/venv
	$(STACK_PY) -m pip install --quiet -r requirements-gpu-stack.txt
	touch $@

# A fresh copy of the tracked and untracked-but-not-ignored files, with a CPU-only _C built
# against torch 2.11 (the CUDA kernels are compiled by `make test` already).
test-gpu-stack: $(STACK_STAMP)
	rm -rf $(STACK_DIR)/src && mkdir -p $(STACK_DIR)/src
	git ls-files -co --exclude-standard | tar -cf - -T - | tar -xf - -C $(STACK_DIR)/src
	cd $(STACK_DIR)/src && LORA_FUSED_SKIP_CUDA=1 MAX_JOBS=$(MAX_JOBS) ../venv/bin/python setup.py -q build_ext --inplace
	cd $(STACK_DIR)/src && LORA_FUSED_SKIP_CUDA=1 LORA_FUSED_REQUIRE_EXTENSION=1 ../venv/bin/python -m pytest $(STACK_PYTEST_ARGS) $(PYTEST_ARGS)

bench: $(BUILD_STAMP)
	$(PY) benchmarks/bench_layer.py --quick
	$(PY) benchmarks/bench_sam.py --quick

gpu-check:
	bash benchmarks/gpu_check.sh benchmarks/results/local

clean:
	rm -rf $(VENV) $(STACK_DIR) build *.egg-info lora_fused/_C*.so
