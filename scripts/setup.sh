#!/usr/bin/env bash
# Create .venv and install the project with its pinned stack. Idempotent: a second run is quick.
# torch goes first and exactly pinned: pip then takes the CPU wheel on this disk; a looser pin, or
# letting another package pull torch, downloads a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[test]"
.venv/bin/python - <<'PY'
import torch
print(f"codeunlearn environment ready: torch {torch.__version__}")
PY
