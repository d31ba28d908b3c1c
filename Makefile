# The two README commands: `make demo` (the worker end to end on the bundled example) and
# `make test` (the whole suite, as CI runs it); `make quick` is the loop while you work (every test
# not marked slow). Each creates or refreshes the local virtual environment first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARCH := $(shell uname -m)

# torch first (sam2's build step imports it), pinned to the releases these machines carry:
# a CUDA build on x86_64 (it runs on the CPU too), a CPU build on aarch64.
ifeq ($(ARCH),aarch64)
TORCH_PINS := torch==2.9.1 torchvision==0.24.1
else
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
endif

.PHONY: venv test quick demo bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_PINS)
	SAM2_BUILD_CUDA=0 $(PY) -m pip install --quiet --no-build-isolation sam2==1.1.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: venv
	$(PY) -m pytest

quick: venv
	$(PY) -m pytest -m "not slow"

demo: venv
	$(PY) -m sam2_refine.demo

clean:
	rm -rf $(VENV) out
