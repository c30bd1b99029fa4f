#!/usr/bin/env bash
# Creates .venv with kubetune and its test tools. Downloads are cached outside the repository
# (uv's cache in $KUBETUNE_CACHE/uv), so a fresh clone on a machine that ran this before is fast.
#   hack/setup.sh            operator + dev tools
#   hack/setup.sh trainer    ... plus the trainer extra (torch, transformers, peft, trl, datasets)
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
extras="dev"
for extra in "$@"; do extras="$extras,$extra"; done
"$uv_bin" pip install -q --python .venv/bin/python -e ".[$extras]"
echo "setup: .venv ready with extras [$extras]"
