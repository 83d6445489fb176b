# rsql-agent: the two commands a newcomer needs are `make demo` and `make test`.
SHELL := /bin/bash
CARGO ?= cargo
PYTHON ?= python3
VENV := .venv
VENV_STAMP := $(VENV)/.installed

.PHONY: demo test deps build release venv fmt-check clippy lint-cfn check-systemd nextest bench bench-smoke clean

## demo: run the blog workflow on a throwaway PostgreSQL with `rsql-agent workflow run`
demo: deps build
	$(CARGO) run --quiet -p rsql-agent-tests --bin rsql-demo

## deps: system packages the demo and the tests need (PostgreSQL), installed when missing
deps:
	@bash .ci/install-deps

build:
	$(CARGO) build --workspace --bins

release:
	$(CARGO) build --workspace --release --bins

## venv: the project-local virtualenv with the pinned AWS emulator (moto) and linters
venv: $(VENV_STAMP)
$(VENV_STAMP): tests/moto/requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r tests/moto/requirements.txt
	touch $@

fmt-check:
	$(CARGO) fmt --all -- --check

## lint-cfn: cfn-lint (pinned in tests/moto/requirements.txt) on the CloudFormation stack
lint-cfn: venv
	$(VENV)/bin/cfn-lint packaging/aws/stack.yaml

## check-systemd: `systemd-analyze verify` and the `security --offline` exposure of the unit
check-systemd: deps
	bash packaging/check-systemd.sh

clippy:
	$(CARGO) clippy --workspace --all-targets -- -D warnings

nextest: deps venv build
	$(CARGO) nextest run --workspace --no-fail-fast

## test: everything CI runs: formatting, lints, unit tests, system tests and the bench smoke run
test: fmt-check clippy lint-cfn check-systemd nextest bench-smoke

## bench: the agent measured against the per-job-process baseline, on a release build
## (minutes; not part of `make test`). Prints a table and writes bench/results.json.
bench: venv
	$(CARGO) build --release --workspace --bins
	$(CARGO) run --release --quiet -p rsql-agent-tests --bin rsql-bench

## bench-smoke: the same program with a few jobs per figure (debug build; checks sanity, not targets)
bench-smoke: venv build
	$(CARGO) run --quiet -p rsql-agent-tests --bin rsql-bench -- --smoke

clean:
	$(CARGO) clean
	rm -rf $(VENV)
