# The two commands of the README do all of their own set-up on a fresh machine with python3:
#   make lab        JupyterLab on notebooks/
#   make test       the whole test suite, as CI runs it (unit tests, doctests, every notebook under nbval,
#                   browser tests, compiling tests), then the ten slowest tests
#   make test-fast  the everyday loop: the core package and the CLI (no notebooks, browser, compiling or slow tests)
#   make test-slow  only the tests marked slow (long versions: soaks, full reproductions)
#   make app        the Voila dashboard of the explorers (no code shown) on http://127.0.0.1:8866
# Everything is installed into .venv with the pinned versions of constraints.txt. docs/testing.md has the tiers.

PYTHON ?= python3
# The Pythons `make` is tested with: 3.11, from Debian 12's 3.11.2 on (pyenv's 3.11.7 too). Every pin of
# constraints.txt installs there (tests/test_project.py checks each package's Requires-Python against
# OLDEST_PYTHON), and torch's CPU wheel of this machine is built for 3.11 only. pyproject.toml admits more
# (>= 3.10); `make ... ANY_PYTHON=1` skips the check, at your own risk.
OLDEST_PYTHON := 3.11.2
ANY_PYTHON ?=
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
HOST   ?= 127.0.0.1
PORT   ?= 8888
APP_PORT ?= 8866
# The browser tests drive Debian's Chromium through Playwright (never `playwright install`).
CHROMIUM ?= /usr/bin/chromium
PYTEST_ARGS ?=

NBVAL_FLAGS := --nbval --nbval-current-env --nbval-sanitize-with notebooks/sanitize.cfg

.PHONY: all lab app test test-fast test-slow test-min test-torch lint venv clean browser screenshot

all: test

venv: $(STAMP)

# Stops with a message unless the interpreter ($(1)) is a tested one: 3.11, OLDEST_PYTHON or newer.
define check_python
@[ -n "$(ANY_PYTHON)" ] || $(1) -c 'import sys; oldest = tuple(map(int, "$(OLDEST_PYTHON)".split("."))); \
sys.exit(0 if oldest <= sys.version_info[:3] and sys.version_info[:2] == oldest[:2] else 1)' 2>/dev/null || { \
  echo "make: $(1) is $$($(1) -V 2>/dev/null || echo 'not a working Python'); valueloss's pinned set (constraints.txt," \
       "torch 2.13.0's CPU wheel) is tested on Python 3.11 from $(OLDEST_PYTHON) on." >&2; \
  echo "  Use one of those (make $(MAKECMDGOALS) PYTHON=python3.11; a stale venv: make clean), or try another" \
       "anyway with ANY_PYTHON=1 (pip may then fail to resolve, or download a multi-GB CUDA torch)." >&2; \
  exit 1; }
endef

# Re-install whenever the dependency declarations change; first check the interpreter.
$(STAMP): pyproject.toml constraints.txt
	$(call check_python,$(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON)))
	@if [ ! -x "$(BIN)/python" ]; then \
	  $(PYTHON) -m venv $(VENV) 2>/dev/null || { \
	    echo "python3 -m venv failed: installing Debian's python3-venv"; \
	    if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	      apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv; \
	    else echo "run: sudo apt-get install python3-venv" >&2; exit 1; fi; \
	    rm -rf $(VENV); $(PYTHON) -m venv $(VENV); }; \
	fi
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[all,test]'
	@touch $(STAMP)

ROOT_FLAG := $(shell [ "$$(id -u)" = 0 ] && echo --allow-root)

lab: $(STAMP)
	$(BIN)/jupyter lab --notebook-dir=notebooks --ServerApp.ip=$(HOST) --ServerApp.port=$(PORT) --no-browser $(ROOT_FLAG)

# Installs Debian's chromium for tests/browser when absent (root + apt-get only); never fails:
# without a browser the browser tests skip and say how to enable them.
browser:
	@if [ -x "$(CHROMIUM)" ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "browser tests: installing Debian's chromium (apt-get install -y chromium)"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y -q -o DPkg::Lock::Timeout=300 chromium >/dev/null \
	  || { apt-get update -q -o DPkg::Lock::Timeout=300 >/dev/null \
	       && apt-get install -y -q -o DPkg::Lock::Timeout=300 chromium >/dev/null; } \
	  || echo "browser tests: could not install chromium; they will be skipped" >&2; \
	else \
	  echo "browser tests: $(CHROMIUM) not found and not root with apt-get; they will be skipped" \
	       "(enable with: sudo apt-get install -y chromium, or CHROMIUM=/path/to/chromium make test)" >&2; \
	fi

# notebooks/voila.json caps the kernels (one per page view) and culls idle ones: docs/servers.md.
app: $(STAMP)
	@echo "valueloss explorer: http://$(HOST):$(APP_PORT)/  (Ctrl-C stops it)"
	$(BIN)/voila notebooks/explorer.ipynb --no-browser --Voila.ip=$(HOST) --port=$(APP_PORT) \
	  --Voila.config_file_paths=notebooks --strip_sources=True --theme=light

# The README's picture of the app, taken by the Voilà browser test.
screenshot: $(STAMP) browser
	VALUELOSS_CHROMIUM=$(CHROMIUM) VALUELOSS_APP_SCREENSHOT=docs/images/explorer_app.png \
	$(BIN)/python -m pytest -q tests/browser/test_voila_app.py -k every_control

# Tiers (markers set in conftest.py or on the tests; docs/testing.md). PYTEST_ARGS go last, so
# `make test PYTEST_ARGS='-m ""'` runs the slow tests too.
PYTEST := $(BIN)/python -m pytest -q --timeout=900

# Everything but the slow tests, as CI runs it (.ci/run); the ten slowest tests are listed at the end.
test: $(STAMP) browser
	VALUELOSS_CHROMIUM=$(CHROMIUM) \
	$(PYTEST) $(NBVAL_FLAGS) -m "not slow" --durations=10 tests valueloss notebooks $(PYTEST_ARGS)

# The everyday loop: the core package (its tests and doctests) and the batch report with its CLI, without
# notebooks, browser, compiling or slow tests (under a minute here). nbval is not even loaded. The
# subpackages for the notebooks (viz, lessons, experiments) are tested by make test.
FAST_TESTS := tests/test_functional.py tests/test_loss.py tests/test_fused.py tests/test_diagnostics.py \
  tests/test_distributed.py tests/test_peers.py tests/test_batch.py tests/test_cli.py tests/test_project.py \
  tests/test_core_without_extras.py $(wildcard valueloss/*.py) valueloss/batch
test-fast: $(STAMP)
	$(PYTEST) -p no:nbval -m "not (slow or notebooks or browser or compile)" $(FAST_TESTS) $(PYTEST_ARGS)

# Only the long versions (none may exist yet: pytest's "no tests ran", exit code 5, is then fine).
test-slow: $(STAMP) browser
	VALUELOSS_CHROMIUM=$(CHROMIUM) \
	$(PYTEST) $(NBVAL_FLAGS) -m slow --durations=10 tests valueloss notebooks $(PYTEST_ARGS) \
	|| { status=$$?; [ $$status = 5 ] && echo "make test-slow: no test is marked slow"; [ $$status = 5 ]; }

# The core package (functional, loss, fused, distributed) on another torch, each in a venv of its own;
# neither is part of `make test` (PyPI's torch builds are CUDA builds of several GB; they run on the CPU).
#   make test-min     the oldest torch pyproject.toml allows (2.1.2 with numpy < 2: about 3 minutes to
#                     install here). There the fused path runs the eager closed form
#                     (valueloss.fused.MIN_COMPILE_TORCH) and its compiled tests skip.
#   make test-torch   a newer release than the pinned one, TORCH=torch==x.y.z (default 2.14.1, whose
#                     clamp opened the clip band: valueloss.functional.BAND_CLOSED).
MIN_VENV  ?= .venv-min
MIN_TORCH ?= torch==2.1.2
TORCH       ?= torch==2.14.1
TORCH_VENV  ?= .venv-torch
TORCH_EXTRA ?=
CORE_TESTS := tests/test_functional.py tests/test_loss.py tests/test_fused.py tests/test_distributed.py

test-min:
	$(MAKE) test-torch TORCH=$(MIN_TORCH) TORCH_VENV=$(MIN_VENV) TORCH_EXTRA="numpy<2"

# With TORCH_EXTRA (numpy<2) the constraints leave numpy to it; otherwise numpy keeps its pin.
test-torch:
	$(call check_python,$(if $(wildcard $(TORCH_VENV)/bin/python),$(TORCH_VENV)/bin/python,$(PYTHON)))
	@if [ ! -x "$(TORCH_VENV)/bin/python" ]; then $(PYTHON) -m venv $(TORCH_VENV); fi
	$(TORCH_VENV)/bin/python -m pip install -q --disable-pip-version-check "$(TORCH)" $(if $(TORCH_EXTRA),"$(TORCH_EXTRA)")
	grep -v -E '^(torch|triton|nvidia-[a-z0-9-]+$(if $(TORCH_EXTRA),|numpy))==' constraints.txt > $(TORCH_VENV)/constraints.txt
	$(TORCH_VENV)/bin/python -m pip install -q --disable-pip-version-check -c $(TORCH_VENV)/constraints.txt -e '.[test]'
	$(TORCH_VENV)/bin/python -c "import torch; assert torch.__version__.split('+')[0] == '$(TORCH)'.split('==')[1], torch.__version__"
	$(TORCH_VENV)/bin/python -m pytest -q -p no:cacheprovider --timeout=900 $(CORE_TESTS) $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check valueloss tests

clean:
	rm -rf $(VENV) $(MIN_VENV) $(TORCH_VENV) *.egg-info .hypothesis
