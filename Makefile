# The two commands of the README: `make train` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/default.py
WORKDIR ?= runs/default
# Tests and benchmarks simulate an 8-device mesh on the CPU.
TEST_XLA_FLAGS := --xla_force_host_platform_device_count=8
# Test files run in this many processes (pytest-xdist; one file stays in one process, so its
# shared compiled functions are compiled once). Most of the suite is single-threaded compiling.
# Files are handed out in tests/conftest.py's order, slowest first (--no-loadscope-reorder keeps
# xdist from sorting them by test count, which put the slow one-test files last).
TEST_WORKERS ?= 2

.PHONY: train test bench setup clean

setup: $(VENV)/.installed

# --no-compile: pip does not byte-compile every installed module (torch and transformers are most
# of them: about a minute here); Python compiles the modules a run imports, once, on first use.
$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --no-compile -e '.[test]'
	touch $@

train: $(VENV)/.installed
	$(PY) -m moejax.main --config=$(CONFIG) --workdir=$(WORKDIR)

test: $(VENV)/.installed
	XLA_FLAGS=$(TEST_XLA_FLAGS) $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder tests

bench: $(VENV)/.installed
	$(PY) benchmarks/moe_layer.py

clean:
	rm -rf $(VENV) runs .jax_cache
