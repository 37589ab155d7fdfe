# One-command set-up: every target installs what it needs itself, idempotently (DESIGN.md §Running it).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
KAFKA   := deploy/kafka/kafka.sh
PYTEST_ARGS ?=

.PHONY: setup venv kafka-jars kafka-up kafka-down demo test soak bench clean

setup: venv kafka-jars

venv: $(STAMP)
$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q -c constraints.txt -e '.[dev,profile]'
	touch $@

kafka-jars:
	$(KAFKA) fetch

kafka-up: kafka-jars
	$(KAFKA) up

kafka-down:
	$(KAFKA) down

demo: setup kafka-up
	$(BIN)/adaptwin demo

test: setup
	$(BIN)/pytest -m "not soak" $(PYTEST_ARGS)

soak: setup
	$(BIN)/pytest -m soak $(PYTEST_ARGS)

bench: setup
	$(BIN)/python -m benchmarks.run_all

clean: kafka-down
	rm -rf $(VENV) .cache build dist *.egg-info lake run
