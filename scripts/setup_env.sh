#!/usr/bin/env bash
# Create ./.venv (once) and install distill with what it needs. Sourced by scripts/demo.sh and scripts/test.sh.
# torch: if the venv has none, `torch==2.13.0` is installed — on these CPU machines that is the local CPU build;
# on your own GPU machine install the torch build you want into .venv first and it is kept.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${DISTILL_VENV:-$ROOT/.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "torch==${DISTILL_TORCH_VERSION:-2.13.0}"
fi
"$PY" -m pip install -q -e "$ROOT[test]"
export PATH="$VENV/bin:$PATH"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" TOKENIZERS_PARALLELISM=false
