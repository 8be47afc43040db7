# The two commands of the README do all of their own set-up on a fresh machine with python3:
#   make lab    JupyterLab on notebooks/
#   make test   the whole test suite (unit tests, doctests, every notebook under nbval)
# Everything is installed into .venv with the pinned versions of constraints.txt.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
HOST   ?= 127.0.0.1
PORT   ?= 8888
PYTEST_ARGS ?=

NBVAL_FLAGS := --nbval --nbval-current-env --nbval-sanitize-with notebooks/sanitize.cfg

.PHONY: all lab test lint venv clean

all: test

venv: $(STAMP)

# Re-install whenever the dependency declarations change.
$(STAMP): pyproject.toml constraints.txt
	@if [ ! -x "$(BIN)/python" ]; then \
	  $(PYTHON) -m venv $(VENV) 2>/dev/null || { \
	    echo "python3 -m venv failed: installing Debian's python3-venv"; \
	    if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	      apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv; \
	    else echo "run: sudo apt-get install python3-venv" >&2; exit 1; fi; \
	    rm -rf $(VENV); $(PYTHON) -m venv $(VENV); }; \
	fi
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[test,app,io]'
	@touch $(STAMP)

ROOT_FLAG := $(shell [ "$$(id -u)" = 0 ] && echo --allow-root)

lab: $(STAMP)
	$(BIN)/jupyter lab --notebook-dir=notebooks --ServerApp.ip=$(HOST) --ServerApp.port=$(PORT) --no-browser $(ROOT_FLAG)

test: $(STAMP)
	$(BIN)/python -m pytest -q --timeout=900 $(NBVAL_FLAGS) tests valueloss notebooks $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check valueloss tests

clean:
	rm -rf $(VENV) *.egg-info .hypothesis
