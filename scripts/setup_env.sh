#!/usr/bin/env bash
# Idempotent set-up of .venv: torch first (a CPU build where there is no GPU, so a
# CPU-only machine never pulls the multi-GB CUDA wheels), then the project.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
stamp="$VENV/.tamt-installed"
want=$(cat pyproject.toml scripts/setup_env.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@"; }
pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    pip install -q torch                       # GPU machine: the default (CUDA) build
  else
    # CPU machine: 2.13.0 is the CPU build kept on this machine kind's disk; elsewhere
    # the CPU index serves the same build without the CUDA libraries.
    pip install -q torch==2.13.0 || pip install -q torch --index-url https://download.pytorch.org/whl/cpu
  fi
fi
pip install -q -e ".[test]"
echo "$want" > "$stamp"
