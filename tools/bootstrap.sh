#!/usr/bin/env bash
# Create a virtual environment with everything megatron_prune and its tests need.
# Usage: tools/bootstrap.sh [VENV_DIR]   (default .venv; reused when already complete)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv}"
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import megatron_prune, megatron.core, pytest" 2>/dev/null; then
  exit 0
fi
python3 -m venv "$VENV"
quiet() { grep -v "^WARNING: Location" || true; }
"$VENV/bin/python" -m pip install -q --upgrade pip 2>&1 | quiet
# torch first: 2.13.0 is a CPU wheel available locally; other specs may pull a multi-GB CUDA build
"$VENV/bin/python" -m pip install -q torch==2.13.0 2>&1 | quiet
"$VENV/bin/python" -m pip install -q "megatron-core==0.16.1" -e ".[test]" 2>&1 | quiet
"$VENV/bin/python" -c "import torch, megatron.core; print('installed torch', torch.__version__, 'megatron-core', megatron.core.__version__)"
