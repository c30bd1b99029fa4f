# kubetune: the two entry points are `make demo` (a local cluster where a FineTuneJob trains and a
# ModelServer answers) and `make test` (everything CI runs, the Kueue tests included: `dev build --kueue` builds
# Kueue once, about 30 min on 2 busy cores, then cached). Both install what they need.
SHELL := /bin/bash
PY := .venv/bin/python

.PHONY: demo setup test lint unit integration crds dev-up dev-down bench-operator bench-adapters

setup:
	hack/setup.sh trainer server

# the server extra (vLLM) when hack/setup.sh offers it; the demo stops after training without it
demo:
	if grep -q 'want server' hack/setup.sh; then hack/setup.sh trainer server; else hack/setup.sh trainer; fi
	$(PY) -m kubetune dev demo

lint: setup
	.venv/bin/ruff check operator tests bench
	.venv/bin/mypy

test: setup lint
	$(PY) -m kubetune dev build --kueue
	$(PY) -m pytest -m "not gpu" -q

unit: setup
	$(PY) -m pytest tests/unit -q

integration: setup
	$(PY) -m kubetune dev build --kueue
	$(PY) -m pytest tests/integration -q

crds: setup
	$(PY) -m kubetune.crdgen --output-dir crds --docs docs/api.md
	$(PY) -m kubetune.chart

dev-up: setup
	$(PY) -m kubetune dev up

dev-down:
	$(PY) -m kubetune dev down

bench-operator: setup
	$(PY) bench/operator_scale.py

bench-adapters: setup
	$(PY) bench/adapter_latency.py
