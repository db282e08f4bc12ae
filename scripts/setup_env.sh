#!/usr/bin/env bash
# Idempotent set-up of .venv: torch first (a CPU build where there is no GPU, so a
# CPU-only machine never pulls the multi-GB CUDA wheels), then the project, then
# DeepSpeed's JIT-compiled comm op.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
stamp="$VENV/.tamt-installed"
want=$(cat pyproject.toml scripts/setup_env.sh | sha256sum | cut -c1-16)
if ! { [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; }; then
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
fi

# DeepSpeed's CPU accelerator compiles a comm op into the torch extensions dir when the
# first process group forms (~1-2 min, once).  Build it here, in one process, so that
# no multi-rank run (a test, a search) compiles it.  A file test on every `make`: a new
# or emptied TORCH_EXTENSIONS_DIR builds it again.  The stamp holds "EXTENSIONS_DIR|OP".
ops_stamp="$VENV/.tamt-ops"
built=$(cat "$ops_stamp" 2>/dev/null || true)
op=${built#*|}
if [ -z "$built" ] || [ "${built%%|*}" != "${TORCH_EXTENSIONS_DIR:-}" ] || { [ "$op" != none ] && [ ! -f "$op" ]; }; then
  echo "setup: compiling DeepSpeed's comm op (once per extensions dir, 1-2 min)"
  op=$("$VENV/bin/python" -c "from tamt_ds.engine import build_comm_op; print(build_comm_op() or 'none')" | tail -n 1)
  [ "$op" = none ] || [ -f "$op" ] || { echo "setup: building DeepSpeed's comm op failed" >&2; exit 1; }
  echo "${TORCH_EXTENSIONS_DIR:-}|$op" > "$ops_stamp"
fi
