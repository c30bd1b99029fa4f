#!/usr/bin/env bash
# Fills .whl/ (git-ignored) with the wheels the GPU machine lacks (docs/gpu-baselines.md): it has torch and
# transformers but no internet, so the benchmarks' commands carry these and install them with
# `pip install --no-index --no-deps --target /tmp/site .whl/*.whl`. Python 3.12, x86_64, as on that machine.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --implementation cp --dest .whl \
  trl==1.16.0 datasets==5.2.0 liger_kernel==0.8.5 hjson==3.1.0 dill==0.4.1 multiprocess==0.70.19 \
  pydantic==2.14.3 pydantic_core==2.50.4 annotated_types==0.8.0 typing_inspection==0.4.5 typing_extensions==4.16.0
# DeepSpeed is only a source archive: the pure-Python wheel that hack/setup.sh trainer built (DS_BUILD_OPS=0, its ops
# JIT-compile on the GPU machine) is in uv's cache.
if ! ls .whl/deepspeed-*.whl >/dev/null 2>&1; then
  built=$(find "${KUBETUNE_CACHE:-$HOME/.cache/kubetune}/uv" -name 'deepspeed-0.19.8-py3-none-any.whl' -print -quit)
  [ -n "$built" ] || { echo "no DeepSpeed wheel in uv's cache: run hack/setup.sh trainer first" >&2; exit 1; }
  cp "$built" .whl/
fi
ls .whl
