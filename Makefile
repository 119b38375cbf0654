# Two commands do everything on a fresh machine (see README):
#   make demo   — the SAM polyp example on its built-in default (tiny SAM, synthetic data, CPU)
#   make test   — the whole test suite
# Both create .venv, install requirements-dev.txt and build the extension lora_fused._C in place.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
MAX_JOBS ?= 2
PYTEST_ARGS ?=

DEPS_STAMP  := $(VENV)/.deps-installed
BUILD_STAMP := $(VENV)/.extension-built
EXT_SOURCES := setup.py $(wildcard csrc/*)

.PHONY: demo test build install bench gpu-check clean

$(DEPS_STAMP): requirements-dev.txt
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

bench: $(BUILD_STAMP)
	$(PY) benchmarks/bench_layer.py --quick
	$(PY) benchmarks/bench_sam.py --quick

gpu-check:
	bash benchmarks/gpu_check.sh benchmarks/results/local

clean:
	rm -rf $(VENV) build *.egg-info lora_fused/_C*.so
