# fleetd: every entry point a developer or CI needs. `make demo` and `make test`
# do all of their own set-up on a fresh machine (virtualenv, packages, test bed).
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# fleetd's modules compiled with mypyc (fleetd/native.py): checked on every run (from
# ~/.cache/fleetd-native, ~0.3 s, when built before), so a deleted or stale build, or a
# compiler installed since, is seen. Where a C compiler is, a failed build is an error.
NATIVE := native

.PHONY: help install native lock demo test test-unit test-integration testbed testbed-up lint bench proto clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-18s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -c requirements.lock -e '.[dev]'
	touch $@

native: $(STAMP) ## compile fleetd's per-record telemetry loop with mypyc (or take it from the cache)
	$(BIN)/python -m fleetd.native build

install: $(NATIVE) ## create .venv, install fleetd with its pinned dependencies, compile its hot loop

# (freeze --all: setuptools too, which grpcio-tools needs and mypyc builds with; a plain
# freeze leaves it out)
lock: ## re-pin requirements.lock from a fresh resolve of pyproject.toml
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q -e '.[dev]'
	{ echo "# Exact versions for every fresh machine: make installs with '-c requirements.lock'."; \
	  echo "# Regenerate with 'make lock' after changing pyproject.toml."; \
	  .venv-lock/bin/python -m pip freeze --all --exclude-editable | grep -v '^pip==' | sort; } > requirements.lock
	rm -rf .venv-lock

demo: $(NATIVE) ## run the main job on embedded defaults (no Kafka, no Kubernetes)
	$(BIN)/fleetd demo

test-unit: $(NATIVE) ## unit tests of the core and the daemon, no test bed
	$(BIN)/python -m pytest tests/unit -q

testbed: $(STAMP) ## build (or reuse from ~/.cache/fleetd-testbed) Kafka, etcd, kube-apiserver, kube-scheduler, kwok
	$(BIN)/python -m tests.testbed build

test-integration: $(NATIVE) testbed ## integration tests only, against the real test bed
	FLEETD_TESTBED=required $(BIN)/python -m pytest tests/integration -q

testbed-up: $(STAMP) testbed ## start Kafka and both control planes until Ctrl-C (prints bootstrap and kubeconfig)
	$(BIN)/python -m tests.testbed up

test: $(NATIVE) testbed ## the whole suite against the real test bed (started and stopped by the tests)
	FLEETD_TESTBED=required $(BIN)/python -m pytest tests -q

lint: $(NATIVE) ## ruff, mypy --strict on fleetd and scheduling, import contracts
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy fleetd scheduling
	$(BIN)/lint-imports

proto: $(STAMP) ## regenerate fleetd/v1/ stubs from proto/fleetd/v1/*.proto (a unit test checks for drift)
	$(BIN)/python -m fleetd.protogen

bench: $(NATIVE) ## every benchmark, each ending with a JSON line
	$(BIN)/python -m benchmarks all --json

clean: ## remove the virtualenv and caches (the test bed cache in ~/.cache stays)
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache build *.egg-info fleetd/sources/*_native*.so fleetd/sources/.*_native*.so.*
