# alignsam: `make demo` and `make test` each set up what they need on a fresh machine
# (virtual environment, package, MobileSAM weights) and are idempotent.

PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.alignsam-installed
# Memory allocation is expensive on small VMs; these glibc settings roughly halve encoder time.
export MALLOC_TRIM_THRESHOLD_ ?= 68719476736
export MALLOC_TOP_PAD_ ?= 1073741824
# Setting those turns off glibc's dynamic mmap threshold: keep large buffers in the heap too.
export MALLOC_MMAP_THRESHOLD_ ?= 33554432
export HF_HUB_OFFLINE ?= 0

.PHONY: install weights demo test lint clean-venv

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

weights: $(STAMP)
	$(BIN)/alignsam weights fetch mobile_sam

demo: weights
	$(BIN)/alignsam demo

lint: $(STAMP)
	$(BIN)/ruff check .

test: weights lint
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -p no:cacheprovider --durations=15

clean-venv:
	rm -rf $(VENV)
