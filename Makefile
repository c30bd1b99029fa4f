# kubetune: the two entry points are `make demo` (a local cluster where a FineTuneJob trains and a
# ModelServer answers) and `make test` (everything CI runs, the Kueue tests included: `dev build --kueue` builds
# Kueue once, about 30 min on 2 busy cores, then cached). Both install what they need.
SHELL := /bin/bash
PY := .venv/bin/python

.PHONY: demo setup test lint unit integration crds dev-up dev-down bench-operator bench-adapters images \
	test-images image-archives push

setup:
	hack/setup.sh trainer server

# the server extra (vLLM) when hack/setup.sh offers it; the demo stops after training without it
demo:
	if grep -q 'want server' hack/setup.sh; then hack/setup.sh trainer server; else hack/setup.sh trainer; fi
	$(PY) -m kubetune dev demo

lint: setup
	.venv/bin/ruff check operator tests bench
	.venv/bin/mypy

# The operator image is built and run by tests/integration/test_images.py; the trainer and server images
# (several GB) by test-images.
test: setup lint
	$(PY) -m kubetune dev build --kueue
	$(PY) -m pytest -m "not gpu and not images" -q

test-images: setup
	$(PY) -m pytest -m images -q

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

# The images without a Docker daemon (hack/images.sh, docs/images.md): IMAGES="operator server-cpu" for others.
IMAGES ?=
images:
	hack/images.sh build $(IMAGES)

image-archives:
	hack/images.sh archive $(IMAGES)

push:
	@test -n "$(REGISTRY)" || { echo "usage: make push REGISTRY=registry.example.com/team [IMAGES=...]"; exit 2; }
	hack/images.sh push $(REGISTRY) $(IMAGES)
